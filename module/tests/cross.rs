//! `outpost-infer` built for another architecture gives, on every test model, the outputs this
//! machine's build gives and onnxruntime's references, within the reference tests' tolerance
//! (|got - want| <= 1e-5 + 1e-4·|want| for floats, 1e-3 for FP16, exact otherwise). tract has
//! hand-written kernels per architecture (NEON on ARM, AVX/FMA on x86_64): this is where they
//! would disagree.
//!
//! The foreign build runs under qemu-user; `scripts/test-arm` builds it and runs this test with
//! `OUTPOST_INFER_FOREIGN` (the binary) and `OUTPOST_FOREIGN_RUNNER` (`qemu-aarch64 -L /`).
//! Both binaries run the same way: `outpost-infer batch` on the same request files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;
use tract_onnx::prelude::Tensor;

/// A model and the folder of its references (`inputs/*.npy`, `outputs/<i>.npy`).
struct Case {
    name: &'static str,
    model: PathBuf,
    reference: PathBuf,
}

fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = ["mlp", "mlp_v2", "cnn", "dtypes"]
        .into_iter()
        .map(|name| Case {
            name,
            model: model_path(name),
            reference: testdata().join("reference").join(name),
        })
        .collect();
    // Real models from PyPI with symbolic batches, at batch 1 and 4 (absent only outside CI).
    for (name, model) in [
        ("magika", "magika"),
        ("magika_b4", "magika"),
        ("ppocr_cls", "ppocr_cls"),
        ("ppocr_cls_b4", "ppocr_cls"),
    ] {
        let Some(path) = pypi_model(model) else {
            continue;
        };
        cases.push(Case {
            name,
            model: path,
            reference: testdata().join("pypi/reference").join(name),
        });
    }
    cases
}

/// Runs `outpost-infer batch` (under `runner` when given) on one request file; returns the
/// response's outputs.
fn batch(binary: &Path, runner: Option<&str>, case: &Case, work: &Path) -> Vec<Value> {
    let (input, output) = (work.join("in"), work.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let request = reference_request_from(&case.reference.join("inputs"));
    std::fs::write(
        input.join(format!("{}.json", case.name)),
        serde_json::to_vec(&request).unwrap(),
    )
    .unwrap();
    let mut command = match runner {
        Some(runner) => {
            let mut words = runner.split_whitespace();
            let mut c = Command::new(words.next().expect("OUTPOST_FOREIGN_RUNNER is not empty"));
            c.args(words).arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let out = command
        .args(["batch", "--threads", "1", "--model"])
        .arg(&case.model)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
    assert!(
        out.status.success(),
        "{} on {}: {}\n{}",
        binary.display(),
        case.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = output.join(format!("{}.json", case.name));
    let response: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    response["outputs"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no outputs in {response}", file.display()))
        .clone()
}

/// An output of a response as (datatype, shape, values).
fn decode(output: &Value) -> (String, Vec<usize>, Vec<f64>) {
    let shape = output["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let data = output["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::Bool(b) => f64::from(u8::from(*b)),
            v => v.as_f64().unwrap(),
        })
        .collect();
    (
        output["datatype"].as_str().unwrap().to_string(),
        shape,
        data,
    )
}

fn tolerance(datatype: &str) -> (f64, f64) {
    match datatype {
        "FP16" => (1e-3, 1e-3),
        "FP32" | "FP64" => (ATOL, RTOL),
        _ => (0.0, 0.0),
    }
}

fn assert_matches(what: &str, got: &Value, want: &Tensor) {
    let (datatype, shape, data) = decode(got);
    let want_type = outpost_module::tensor::DataType::from_datum(want.datum_type())
        .unwrap()
        .oip_name();
    assert_eq!(datatype, want_type, "{what}: datatype");
    assert_eq!(shape, want.shape(), "{what}: shape");
    let (atol, rtol) = tolerance(&datatype);
    assert_close_values(what, &data, &values(want), atol, rtol);
}

#[test]
#[ignore = "needs a build for another architecture: run by scripts/test-arm"]
fn a_foreign_build_matches_this_one_and_onnxruntime_on_every_test_model() {
    let foreign = PathBuf::from(
        std::env::var_os("OUTPOST_INFER_FOREIGN")
            .expect("OUTPOST_INFER_FOREIGN names the foreign outpost-infer (scripts/test-arm)"),
    );
    let runner = std::env::var("OUTPOST_FOREIGN_RUNNER")
        .expect("OUTPOST_FOREIGN_RUNNER names how to run it (`qemu-aarch64 -L /`)");
    let native = PathBuf::from(env!("CARGO_BIN_EXE_outpost-infer"));
    let cases = cases();
    assert!(cases.len() >= 4);
    for case in &cases {
        let work = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let theirs = batch(&foreign, Some(&runner), case, &work.path().join("foreign"));
        eprintln!(
            "{}: foreign build under qemu in {:?}",
            case.name,
            started.elapsed()
        );
        let ours = batch(&native, None, case, &work.path().join("native"));
        assert_eq!(theirs.len(), ours.len(), "{}: number of outputs", case.name);
        for (i, (t, o)) in theirs.iter().zip(&ours).enumerate() {
            let want = read_npy(&case.reference.join("outputs").join(format!("{i}.npy")));
            assert_matches(
                &format!("{} output {i}, foreign build", case.name),
                t,
                &want,
            );
            assert_matches(&format!("{} output {i}, native build", case.name), o, &want);
            // Foreign against native: the same tolerance, around the native result.
            let (datatype, _, native_values) = decode(o);
            let (atol, rtol) = tolerance(&datatype);
            assert_close_values(
                &format!("{} output {i}, foreign vs native", case.name),
                &decode(t).2,
                &native_values,
                atol,
                rtol,
            );
        }
    }
}
