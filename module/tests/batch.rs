//! Batch mode through the real binary, on a folder with broken files in it: every good input
//! gets its output, the broken ones are listed, the run goes on and exits 3.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

#[test]
fn batch_runs_a_folder_and_lists_the_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in"), dir.path().join("out"));
    std::fs::create_dir(&input).unwrap();
    let sensor = testdata().join("reference/mlp/inputs/sensor.npy");
    std::fs::copy(&sensor, input.join("a.npy")).unwrap();
    std::fs::write(
        input.join("b.json"),
        serde_json::to_vec(&reference_request("mlp")).unwrap(),
    )
    .unwrap();
    let row: Vec<f64> = values(&read_npy(&sensor))[..16].to_vec();
    std::fs::write(
        input.join("c.json"),
        serde_json::to_vec(&json!({"data": [row]})).unwrap(),
    )
    .unwrap();
    std::fs::write(input.join("broken.npy"), b"\x93NUMPY garbage").unwrap();
    std::fs::write(input.join("d-bad-shape.json"), br#"{"data": [[1, 2]]}"#).unwrap();
    std::fs::write(input.join("e-bad.json"), b"{").unwrap();
    std::fs::write(input.join("notes.txt"), b"not an input").unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .args(["batch", "--model"])
        .arg(model_path("mlp"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(3), "some inputs failed: exit 3");
    assert!(stderr.contains("[1/6] a.npy"), "progress per file");
    assert!(
        stdout.contains("3 of 6 inputs done"),
        "summary with throughput"
    );
    assert!(stdout.contains("per second"));
    assert!(stdout.contains("failed: broken.npy"));
    assert!(stdout.contains("skipped (not .npy or .json): notes.txt"));

    let want = read_npy(&testdata().join("reference/mlp/outputs/0.npy"));
    assert_close("batch a.npy", &read_npy(&output.join("a.npy")), &want);
    let b: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("b.json")).unwrap()).unwrap();
    let got: Vec<f64> = b["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_close_values("batch b.json", &got, &values(&want), ATOL, RTOL);
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("c.json")).unwrap()).unwrap();
    assert_close_values(
        "batch c.json",
        &[c["result"][0][0].as_f64().unwrap()],
        &values(&want)[..1],
        ATOL,
        RTOL,
    );

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("batch-report.json")).unwrap()).unwrap();
    assert_eq!(report["total"], 6);
    assert_eq!(report["succeeded"], 3);
    let failed: Vec<&str> = report["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["file"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["broken.npy", "d-bad-shape.json", "e-bad.json"]);
    assert_eq!(report["skipped"], json!(["notes.txt"]));
    assert!(report["per_second"].as_f64().unwrap() > 0.0);
    assert!(!output.join("broken.npy").exists());
}

#[test]
fn batch_with_a_missing_model_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .args(["batch", "--model", "/nonexistent.onnx", "--input"])
        .arg(dir.path())
        .arg("--output")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.onnx"));
}

#[test]
fn a_bad_input_shape_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_outpost-infer"))
        .args(["info", "--input-shape", "sensor=0,16", "--model"])
        .arg(model_path("mlp"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
