//! The HTTP endpoints over real loopback HTTP, checked the way a client following the Open
//! Inference Protocol v2 would, with its error cases; `/score`; `/metrics`; a model that does
//! not load; the body limit; graceful shutdown.

mod common;

use std::time::Duration;

use common::*;
use hyper::StatusCode;
use serde_json::{Value, json};

fn data_of(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_v2_metadata_health_and_inference() {
    let s = Running::ready(config(&model_path("mlp"), "anomaly")).await;
    let a = s.addr;

    let (st, v) = get_json(a, "/v2/health/live").await;
    assert_eq!((st, &v["live"]), (StatusCode::OK, &json!(true)));
    let (st, v) = get_json(a, "/v2/health/ready").await;
    assert_eq!((st, &v["ready"]), (StatusCode::OK, &json!(true)));
    let (st, v) = get_json(a, "/v2").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["name"], "outpost-infer");
    assert!(v["version"].is_string() && v["extensions"].is_array());

    // Model metadata: name, versions, platform, inputs and outputs with -1 for symbolic dims.
    let (st, v) = get_json(a, "/v2/models/anomaly").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["name"], "anomaly");
    assert_eq!(v["versions"], json!(["1"]));
    assert_eq!(v["platform"], "onnx_onnxv1");
    assert_eq!(
        v["inputs"],
        json!([{"name": "sensor", "datatype": "FP32", "shape": [-1, 16]}])
    );
    assert_eq!(v["outputs"][0]["name"], "score");
    assert_eq!(v["outputs"][0]["datatype"], "FP32");
    assert!(v["parameters"]["load_time_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        get_json(a, "/v2/models/anomaly/ready").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_json(a, "/v2/models/anomaly/versions/1/ready").await.0,
        StatusCode::OK
    );
    assert_eq!(
        get_json(a, "/v2/models/anomaly/versions/7").await.0,
        StatusCode::NOT_FOUND
    );
    let (st, v) = get_json(a, "/v2/models/other").await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown model 'other'")
    );
    assert_eq!(
        get_json(a, "/v2/models/other/ready").await.0,
        StatusCode::NOT_FOUND
    );

    // Inference on the reference input: the answer matches onnxruntime.
    let (st, v) = post_json(a, "/v2/models/anomaly/infer", &reference_request("mlp")).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["model_name"], "anomaly");
    assert_eq!(v["model_version"], "1");
    assert_eq!(v["id"], "ref");
    let out = &v["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str()),
        (Some("score"), Some("FP32"))
    );
    assert_eq!(out["shape"], json!([4, 1]));
    let want = values(&read_npy(&testdata().join("reference/mlp/outputs/0.npy")));
    assert_close_values("oip mlp", &data_of(&out["data"]), &want, ATOL, RTOL);
    // Same through the versioned path, with nested data and a requested output.
    let mut req = reference_request("mlp");
    let flat = req["inputs"][0]["data"].as_array().unwrap().clone();
    req["inputs"][0]["data"] =
        Value::Array(flat.chunks(16).map(|c| Value::Array(c.to_vec())).collect());
    req["outputs"] = json!([{"name": "score"}]);
    let (st, v) = post_json(a, "/v2/models/anomaly/versions/1/infer", &req).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_close_values(
        "oip mlp nested",
        &data_of(&v["outputs"][0]["data"]),
        &want,
        ATOL,
        RTOL,
    );

    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_v2_error_cases_are_400_and_the_server_keeps_serving() {
    let s = Running::ready(config(&model_path("mlp"), "mlp")).await;
    let a = s.addr;
    let good = reference_request("mlp");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "wrong shape",
            with(&|r| r["inputs"][0]["shape"] = json!([4, 15])),
            "shape [4, 15] but the model expects [N, 16]",
        ),
        (
            "wrong rank",
            with(&|r| r["inputs"][0]["shape"] = json!([64])),
            "shape [64]",
        ),
        (
            "count mismatch",
            with(&|r| r["inputs"][0]["shape"] = json!([3, 16])),
            "holds 48 elements but data has 64",
        ),
        (
            "negative dim",
            with(&|r| r["inputs"][0]["shape"] = json!([-4, 16])),
            "negative",
        ),
        (
            "wrong datatype",
            with(&|r| r["inputs"][0]["datatype"] = json!("INT64")),
            "datatype INT64 but the model expects FP32",
        ),
        (
            "unknown datatype",
            with(&|r| r["inputs"][0]["datatype"] = json!("BYTES")),
            "'BYTES' is not supported",
        ),
        (
            "wrong name",
            with(&|r| r["inputs"][0]["name"] = json!("temperature")),
            "unknown input 'temperature'",
        ),
        (
            "missing input",
            json!({"inputs": []}),
            "missing input 'sensor'",
        ),
        (
            "duplicate input",
            with(&|r| {
                let i = r["inputs"][0].clone();
                r["inputs"].as_array_mut().unwrap().push(i);
            }),
            "more than once",
        ),
        (
            "bad value",
            with(&|r| r["inputs"][0]["data"][3] = json!(true)),
            "element 3 (true) is not a valid FP32",
        ),
        (
            "string value",
            with(&|r| r["inputs"][0]["data"][3] = json!("x")),
            "string",
        ),
        (
            "unknown output",
            with(&|r| r["outputs"] = json!([{"name": "nope"}])),
            "unknown output 'nope'",
        ),
        (
            "missing field",
            json!({"inputs": [{"name": "sensor", "datatype": "FP32", "data": [1]}]}),
            "missing field `shape`",
        ),
        ("not an object", json!([1, 2]), "invalid JSON request"),
    ];
    for (what, body, needle) in cases {
        let (st, v) = post_json(a, "/v2/models/mlp/infer", &body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{what}: {v}");
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error field: {v}"));
        assert!(
            msg.contains(needle),
            "{what}: '{msg}' should contain '{needle}'"
        );
    }
    // Bad JSON and a body over the limit (1 MiB in these tests).
    let (st, b) = http(
        a,
        "POST",
        "/v2/models/mlp/infer",
        Some(b"{\"inputs\": [".to_vec()),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&b).contains("invalid JSON request"));
    let (st, b) = http(
        a,
        "POST",
        "/v2/models/mlp/infer",
        Some(vec![b' '; (1 << 20) + 1]),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        String::from_utf8_lossy(&b).contains("larger than the limit of 1048576 bytes"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    // Unknown model and unknown route.
    assert_eq!(
        post_json(a, "/v2/models/x/infer", &good).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get_json(a, "/v3").await.0, StatusCode::NOT_FOUND);
    // Still serving, and the errors were counted.
    assert_eq!(
        post_json(a, "/v2/models/mlp/infer", &good).await.0,
        StatusCode::OK
    );
    let (_, m) = http(a, "GET", "/metrics", None).await;
    let m = String::from_utf8(m).unwrap();
    assert!(
        m.contains("outpost_infer_errors_total{model=\"mlp\",source=\"v2\"} 16"),
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datatype_over_http() {
    let s = Running::ready(config(&model_path("dtypes"), "dtypes")).await;
    let (st, v) = post_json(
        s.addr,
        "/v2/models/dtypes/infer",
        &reference_request("dtypes"),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let outs = v["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 6);
    for (i, o) in outs.iter().enumerate() {
        let want = read_npy(&testdata().join(format!("reference/dtypes/outputs/{i}.npy")));
        let got: Vec<f64> = o["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                x.as_f64()
                    .or_else(|| x.as_bool().map(|b| b as u8 as f64))
                    .unwrap()
            })
            .collect();
        let dt = outpost_module::tensor::DataType::from_datum(want.datum_type()).unwrap();
        assert_eq!(o["datatype"], dt.oip_name());
        let tol = if dt.oip_name() == "FP16" { 1e-3 } else { ATOL };
        assert_close_values(dt.oip_name(), &got, &values(&want), tol, RTOL);
    }
    // 300 does not fit a UINT8.
    let mut r = reference_request("dtypes");
    let ix = r["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .position(|i| i["name"] == "in_uint8")
        .unwrap();
    r["inputs"][ix]["data"][0] = json!(300);
    let (st, v) = post_json(s.addr, "/v2/models/dtypes/infer", &r).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("(300) is outside the range of UINT8"),
        "{v}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_endpoint_and_metrics() {
    let s = Running::ready(config(&model_path("cnn"), "cnn")).await;
    let image = read_npy(&testdata().join("reference/cnn/inputs/image.npy"));
    let flat = values(&image);
    // Nested [3][64][64] without the batch dimension: taken as one sample.
    let nested: Vec<Vec<Vec<f64>>> = flat
        .chunks(64 * 64)
        .map(|c| c.chunks(64).map(|r| r.to_vec()).collect())
        .collect();
    let (st, v) = post_json(s.addr, "/score", &json!({ "data": nested })).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let result = v["result"].as_array().unwrap();
    assert_eq!(result.len(), 1);
    let want = values(&read_npy(&testdata().join("reference/cnn/outputs/0.npy")));
    assert_close_values("score cnn", &data_of(&result[0]), &want, ATOL, RTOL);
    for (what, body) in [
        ("ragged", json!({"data": [[1, 2], [3]]})),
        ("wrong shape", json!({"data": [[1, 2], [3, 4]]})),
        ("no data", json!({"rows": []})),
    ] {
        let (st, v) = post_json(s.addr, "/score", &body).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{what}: {v}");
        assert!(v["error"].is_string());
    }
    let (st, body) = http(s.addr, "GET", "/metrics", None).await;
    assert_eq!(st, StatusCode::OK);
    let m = String::from_utf8(body).unwrap();
    for needle in [
        "outpost_infer_requests_total{model=\"cnn\",source=\"score\"} 4",
        "outpost_infer_errors_total{model=\"cnn\",source=\"score\"} 3",
        "# TYPE outpost_infer_request_duration_seconds histogram",
        "outpost_infer_request_duration_seconds_count{model=\"cnn\",source=\"score\"} 4",
        "outpost_infer_model_loads_total{model=\"cnn\"} 1",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    assert!(
        m.lines()
            .any(|l| l.starts_with("outpost_infer_model_load_seconds{model=\"cnn\"} 0.")),
        "{m}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_load_leaves_the_server_up_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.onnx");
    std::fs::write(&path, b"this is not an onnx model").unwrap();
    let s = Running::start(config(&path, "broken")).await;
    let a = s.addr;
    wait_for("the load to fail", Duration::from_secs(10), || async move {
        // Not just any error: "still loading" comes first.
        get_json(a, "/v2/health/ready").await.1["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a loadable ONNX model"))
    })
    .await;
    let (st, v) = get_json(a, "/v2/health/ready").await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("not a loadable ONNX model"),
        "{v}"
    );
    assert_eq!(get_json(a, "/v2/health/live").await.0, StatusCode::OK);
    assert_eq!(
        get_json(a, "/v2/models/broken/ready").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let (st, v) = post_json(a, "/v2/models/broken/infer", &reference_request("mlp")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        v["error"].as_str().unwrap().contains("no model is loaded"),
        "{v}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_all_answer_and_shutdown_is_graceful() {
    let s = Running::ready(config(&model_path("cnn"), "cnn")).await;
    let body = reference_request("cnn");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (a, b) = (s.addr, body.clone());
        tasks.spawn(async move { post_json(a, "/v2/models/cnn/infer", &b).await.0 });
    }
    while let Some(st) = tasks.join_next().await {
        assert_eq!(st.unwrap(), StatusCode::OK);
    }
    let addr = s.addr;
    s.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed after shutdown"
    );
}
