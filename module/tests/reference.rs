//! Outputs match onnxruntime's committed references within the stated tolerance
//! (|got - want| <= 1e-5 + 1e-4·|want| for floats, 1e-3 for FP16, exact otherwise), for every
//! test model, at one thread and with multithreaded matrix products.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use outpost_module::model::{Dim, LoadOptions, load};
use outpost_module::plans::PlanMode;
use tract_onnx::prelude::*;

/// Runs the model on `reference/inputs/*.npy` (by input name) and compares every output with
/// `reference/outputs/<i>.npy`.
fn check(model: &Path, reference: &Path, shapes: &[(&str, &[usize])], threads: usize) {
    for plan_mode in [PlanMode::PerShape, PlanMode::Symbolic] {
        check_with(model, reference, shapes, threads, plan_mode);
    }
}

fn check_with(
    model: &Path,
    reference: &Path,
    shapes: &[(&str, &[usize])],
    threads: usize,
    plan_mode: PlanMode,
) {
    let options = LoadOptions {
        shapes: shapes
            .iter()
            .map(|(n, s)| (n.to_string(), s.iter().map(|&d| Dim::Fixed(d)).collect()))
            .collect::<HashMap<_, _>>(),
        threads: Some(threads),
        plan_mode,
        ..LoadOptions::default()
    };
    let m = match load(model, &options, 1) {
        Ok(m) => m,
        // Some models only type with known shapes: the symbolic mode says so and stops there.
        Err(e) if plan_mode == PlanMode::Symbolic && e.to_string().contains("per shape") => {
            eprintln!("{}: no symbolic plan: {e}", model.display());
            return;
        }
        Err(e) => panic!("{e}"),
    };
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
fn pypi(case: &str, shapes: &[(&str, &[usize])]) {
    let dir = testdata().join("pypi");
    // `magika_b4`: the references of batch 4 for `magika.onnx`.
    let name = case.split_once("_b").map_or(case, |(n, _)| n);
    let model = dir.join(format!("{name}.onnx"));
    let reference = dir.join("reference").join(case);
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

/// Symbolic batch (and, for PP-OCR, height and width): no shape declared, batches of 1 and
/// 4, and the shape fixed at load as `--input-shape` does.
#[test]
fn magika_matches_onnxruntime() {
    pypi("magika", &[]);
    pypi("magika_b4", &[]);
    pypi("magika", &[("bytes", &[1, 2048])]);
}

#[test]
fn ppocr_cls_matches_onnxruntime() {
    pypi("ppocr_cls", &[]);
    pypi("ppocr_cls_b4", &[]);
    pypi("ppocr_cls", &[("x", &[1, 3, 48, 192])]);
}
