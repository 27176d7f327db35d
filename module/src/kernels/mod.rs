//! Kernels of our own for operators where tract was measured slow on the models we serve,
//! swapped into an optimized model in place of tract's operator (no fork of tract). Each
//! replaces one operator only in the configurations it implements and leaves every other
//! node to tract; each is checked against tract's own implementation by property tests.
//!
//! Safe Rust only, written so the compiler vectorises it on every target (x86_64, aarch64,
//! armv7): no intrinsics, no `unsafe`.
//!
//! | kernel | replaces | when |
//! |---|---|---|
//! | [`maxpool::MaxPool2x2`] | `OptMaxPool` (after codegen) | f32, NCHW, 2×2 window, stride 2, no padding or dilation |
//! | [`reduce::ReduceMaxRows`] | `Reduce<Max>` (after codegen) | f32, one run of axes with axes after it (a global max pool over time) |
//! | [`one_hot::OneHotMatMul`] | `Equal` with `0..K` → `Cast` → `EinSum` with a `[K, D]` weight (before codegen) | integer input, f32 finite weights |

pub mod maxpool;
pub mod one_hot;
pub mod reduce;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::TypedModelPatch;

/// Whether plans use these kernels: yes unless `OUTPOST_TRACT_KERNELS_ONLY` is set (to compare
/// with tract alone, in benchmarks and when chasing a wrong answer).
pub fn enabled() -> bool {
    std::env::var_os("OUTPOST_TRACT_KERNELS_ONLY").is_none()
}

/// tract's `into_optimized` (declutter, then codegen) with our kernels swapped in: those that
/// replace high-level operators before tract's codegen turns them into its own, the others
/// after.
pub fn into_optimized(mut model: TypedModel) -> TractResult<TypedModel> {
    model.declutter()?;
    if enabled() {
        before_codegen(&mut model)?;
    }
    model.optimize()?;
    if enabled() {
        apply(&mut model)?;
    }
    Ok(model)
}

/// Replaces, in a decluttered model, the patterns kernels here implement; answers how many.
pub fn before_codegen(model: &mut TypedModel) -> TractResult<usize> {
    let mut patches = Vec::new();
    for node in model.nodes() {
        if let Some(patch) = one_hot::OneHotMatMul::patch(model, node)? {
            patches.push(patch);
        }
    }
    let replaced = patches.len();
    for patch in patches {
        patch.apply(model)?;
    }
    if replaced > 0 {
        // What fed the replaced products (the comparison, the cast) now feeds nothing.
        model.compact()?;
    }
    Ok(replaced)
}

/// Replaces, in an optimized model, every node a kernel here implements; answers how many.
pub fn apply(model: &mut TypedModel) -> TractResult<usize> {
    let mut candidates: Vec<(usize, Box<dyn TypedOp>)> = Vec::new();
    for node in model.nodes() {
        if let Some(kernel) = maxpool::MaxPool2x2::replacing(model, node)? {
            candidates.push((node.id, Box::new(kernel)));
        } else if let Some(kernel) = reduce::ReduceMaxRows::replacing(model, node)? {
            candidates.push((node.id, Box::new(kernel)));
        }
    }
    let replaced = candidates.len();
    for (id, kernel) in candidates {
        let node = model.node(id);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, kernel)?;
        patch.apply(model)?;
    }
    Ok(replaced)
}
