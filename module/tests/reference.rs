//! Outputs match onnxruntime's committed references within the stated tolerance
//! (|got - want| <= 1e-5 + 1e-4·|want| for floats, 1e-3 for FP16, exact otherwise), for every
//! test model, at one thread and with multithreaded matrix products.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use outpost_module::model::{LoadOptions, load};
use tract_onnx::prelude::*;

/// Runs the model on `reference/inputs/*.npy` (by input name) and compares every output with
/// `reference/outputs/<i>.npy`.
fn check(model: &Path, reference: &Path, shapes: &[(&str, &[usize])], threads: usize) {
    let options = LoadOptions {
        shapes: shapes
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect::<HashMap<_, _>>(),
        threads,
    };
    let m = load(model, &options, 1).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}: loaded in {:?}", model.display(), m.load_time);
    let inputs: TVec<TValue> = m
        .inputs
        .iter()
        .map(|s| read_npy(&reference.join("inputs").join(format!("{}.npy", s.name))).into_tvalue())
        .collect();
    let outputs = m.run(inputs).unwrap();
    assert_eq!(outputs.len(), m.outputs.len());
    for (i, got) in outputs.iter().enumerate() {
        let want = read_npy(&reference.join("outputs").join(format!("{i}.npy")));
        assert_close(
            &format!("{} output {i} ({})", model.display(), m.outputs[i].name),
            got,
            &want,
        );
    }
}

fn committed(name: &str, shapes: &[(&str, &[usize])]) {
    for threads in [1, 2] {
        check(
            &model_path(name),
            &testdata().join("reference").join(name),
            shapes,
            threads,
        );
    }
}

#[test]
fn mlp_matches_onnxruntime() {
    committed("mlp", &[]);
    // Fixing the symbolic batch is what `--input-shape` does; results must not change.
    committed("mlp", &[("sensor", &[4, 16])]);
}

#[test]
fn mlp_v2_matches_onnxruntime() {
    committed("mlp_v2", &[]);
}

#[test]
fn cnn_matches_onnxruntime() {
    committed("cnn", &[]);
}

#[test]
fn every_datatype_matches_onnxruntime() {
    committed("dtypes", &[]);
}

/// Models fetched from PyPI by scripts/fetch-pypi-models.sh. Skipped when absent, except
/// with CI=true, where the CI script has run the fetch script and absence is a failure.
fn pypi(name: &str, shapes: &[(&str, &[usize])]) {
    let dir = testdata().join("pypi");
    let model = dir.join(format!("{name}.onnx"));
    let reference = dir.join("reference").join(name);
    if !model.exists() || !reference.exists() {
        assert!(
            !in_ci(),
            "{} missing with CI=true: run scripts/fetch-pypi-models.sh",
            model.display()
        );
        eprintln!(
            "SKIPPED: {} missing; run scripts/fetch-pypi-models.sh",
            model.display()
        );
        return;
    }
    for threads in [1, 2] {
        check(&model, &reference, shapes, threads);
    }
}

#[test]
fn magika_matches_onnxruntime() {
    pypi("magika", &[("bytes", &[1, 2048])]);
}

#[test]
fn ppocr_cls_matches_onnxruntime() {
    pypi("ppocr_cls", &[("x", &[1, 3, 48, 192])]);
}
