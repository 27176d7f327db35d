//! The real binary as the container runs it: configured from the environment, logging JSON,
//! serving on a port it picks, stopping cleanly on SIGTERM (it is PID 1 in its image).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use hyper::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_from_the_environment_logs_json_and_stops_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .arg("serve")
        .env("OUTPOST_MODEL", model_path("mlp"))
        .env("OUTPOST_MODEL_NAME", "anomaly")
        .env("OUTPOST_LISTEN", "127.0.0.1:0")
        .env("OUTPOST_LOG_FORMAT", "json")
        .env("OUTPOST_INPUT_SHAPES", "sensor=4,16")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Every log line is JSON; the "serving" one says where.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a log line within 20 s");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "serving" {
            break v["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    wait_for("ready", Duration::from_secs(20), || async move {
        get_json(addr, "/v2/health/ready").await.0 == StatusCode::OK
    })
    .await;
    let (st, v) = get_json(addr, "/v2/models/anomaly").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(
        v["inputs"][0]["shape"],
        serde_json::json!([4, 16]),
        "declared shape in force"
    );
    let (st, _) = post_json(addr, "/v2/models/anomaly/infer", &reference_request("mlp")).await;
    assert_eq!(st, StatusCode::OK);

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(code, Some(0), "SIGTERM is a clean stop");
}

#[test]
fn a_bad_bus_url_is_a_configuration_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--bus",
            "mqtts://broker:8883",
            "--model",
        ])
        .arg(model_path("mlp"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OUTPOST_BUS_URL"));
}
