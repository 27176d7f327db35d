//! Hot reload under load: the model file is replaced (by rename, as deployments do) while
//! clients keep sending requests. No request may fail, answers switch from the old model's
//! to the new one's, and a broken replacement keeps the current model serving.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::Value;

fn replace(target: &std::path::Path, contents: &[u8]) {
    let tmp = target.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, target).unwrap();
}

fn first_score(v: &Value) -> f64 {
    v["outputs"][0]["data"][0].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_loses_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::copy(model_path("mlp"), &path).unwrap();
    let mut cfg = config(&path, "mlp");
    cfg.reload_interval = Some(Duration::from_millis(25));
    let s = Running::ready(cfg).await;
    let a = s.addr;

    let v1 = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")))[0];
    let v2 = values(&read_npy(
        &testdata().join("reference/mlp_v2/outputs/0.npy"),
    ))[0];
    assert!(
        (v1 - v2).abs() > 1e-3,
        "the two models must answer differently"
    );

    // Clients: send the reference request in a loop; record failures and which model answered.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed, saw_v1, saw_v2) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let body = reference_request("mlp");
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stop, sent, failed, saw_v1, saw_v2, body) = (
            stop.clone(),
            sent.clone(),
            failed.clone(),
            saw_v1.clone(),
            saw_v2.clone(),
            body.clone(),
        );
        clients.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (st, v) = post_json(a, "/v2/models/mlp/infer", &body).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if st != StatusCode::OK {
                    eprintln!("request failed: {st} {v}");
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let got = first_score(&v);
                if (got - v1).abs() < 1e-4 {
                    saw_v1.fetch_add(1, Ordering::Relaxed);
                } else if (got - v2).abs() < 1e-4 {
                    saw_v2.fetch_add(1, Ordering::Relaxed);
                } else {
                    eprintln!("answer from neither model: {got}");
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let version = |a| async move { get_json(a, "/v2/health/ready").await.1 };
    wait_for("traffic on v1", Duration::from_secs(10), || {
        let s = saw_v1.clone();
        async move { s.load(Ordering::Relaxed) >= 20 }
    })
    .await;

    // 1. A new model: swapped in while requests run.
    replace(&path, &std::fs::read(model_path("mlp_v2")).unwrap());
    wait_for(
        "version 2 in service",
        Duration::from_secs(20),
        || async move { version(a).await["model_version"] == "2" },
    )
    .await;
    let at_swap = saw_v2.load(Ordering::Relaxed);
    wait_for("traffic on v2", Duration::from_secs(10), || {
        let s = saw_v2.clone();
        async move { s.load(Ordering::Relaxed) >= at_swap + 20 }
    })
    .await;

    // 2. A broken file: the load fails, version 2 keeps serving, the failure is reported.
    replace(&path, b"garbage, not a model");
    wait_for(
        "the reload failure reported",
        Duration::from_secs(20),
        || async move { version(a).await["last_reload_error"].is_string() },
    )
    .await;
    let r = version(a).await;
    assert_eq!(r["model_version"], "2", "{r}");
    assert!(
        r["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("not a loadable ONNX model")
    );
    let before = saw_v2.load(Ordering::Relaxed);
    wait_for(
        "v2 still serving after the bad file",
        Duration::from_secs(10),
        || {
            let s = saw_v2.clone();
            async move { s.load(Ordering::Relaxed) >= before + 20 }
        },
    )
    .await;

    // 3. A good file again: version 3, the error cleared.
    replace(&path, &std::fs::read(model_path("mlp")).unwrap());
    wait_for(
        "version 3 in service",
        Duration::from_secs(20),
        || async move {
            let r = version(a).await;
            r["model_version"] == "3" && r["last_reload_error"].is_null()
        },
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    while let Some(r) = clients.join_next().await {
        r.unwrap();
    }
    let (_, m) = http(a, "GET", "/metrics", None).await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("outpost_infer_model_loads_total{model=\"mlp\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("outpost_infer_model_load_failures_total{model=\"mlp\"} 1"),
        "{m}"
    );
    eprintln!(
        "sent {} requests: {} on v1, {} on v2 (either side of the swaps), {} failed",
        sent.load(Ordering::Relaxed),
        saw_v1.load(Ordering::Relaxed),
        saw_v2.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request may fail across reloads"
    );
    s.stop().await;
}
