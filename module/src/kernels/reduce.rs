//! Max over axes that are not the innermost: a global max pool over time, as magika's
//! `[1, 508, 512]` → `[1, 1, 512]`. tract reduces such axes one output at a time through a
//! strided view (0.38 ms there, for 260 k values); this kernel folds whole rows into a row of
//! running maxima, which the compiler vectorises.
//!
//! Same values as tract's fold for strided views, NaN and infinities included: each output
//! starts at `f32::MIN` and takes a value unless the running maximum is greater, in axis
//! order. (Where the reduced axes are innermost, tract's contiguous routine is fast and
//! answers differently for NaN: left to it.)

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// Max over one run of consecutive axes, with axes after it (`[outer, reduced, inner]`).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct ReduceMaxRows {
    /// The first and last reduced axis.
    first: usize,
    last: usize,
}

/// Folds `input`, seen as `[outer, reduced, inner]`, into `out` (`[outer, inner]`).
pub fn max_rows(input: &[f32], reduced: usize, inner: usize, out: &mut [f32]) {
    for (block, acc) in input
        .chunks_exact(reduced * inner)
        .zip(out.chunks_exact_mut(inner))
    {
        acc.fill(f32::MIN);
        for row in block.chunks_exact(inner) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a = if *a > v { *a } else { v };
            }
        }
    }
}

impl ReduceMaxRows {
    /// This kernel for `node` when it is an f32 max over consecutive axes, at least two
    /// values each, with at least two values after them per row, on a concrete shape.
    pub fn replacing(model: &TypedModel, node: &TypedNode) -> TractResult<Option<ReduceMaxRows>> {
        let Some(op) = node.op_as::<Reduce>() else {
            return Ok(None);
        };
        let input = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = input.shape.as_concrete() else {
            return Ok(None);
        };
        let mut axes = op.axes.to_vec();
        axes.sort_unstable();
        let (Some(&first), Some(&last)) = (axes.first(), axes.last()) else {
            return Ok(None);
        };
        let consecutive = last - first + 1 == axes.len();
        let reduced: usize = shape[first..=last].iter().product();
        let inner: usize = shape[last + 1..].iter().product();
        let fits = matches!(op.reducer, Reducer::Max)
            && input.datum_type == f32::datum_type()
            && consecutive
            && reduced >= 2
            && inner >= 2;
        Ok(fits.then_some(ReduceMaxRows { first, last }))
    }
}

impl Op for ReduceMaxRows {
    fn name(&self) -> StaticName {
        "ReduceMaxRows(outpost)".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ReduceMaxRows {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(
            self.last < shape.len(),
            "ReduceMaxRows: rank {}",
            shape.len()
        );
        let reduced: usize = shape[self.first..=self.last].iter().product();
        let inner: usize = shape[self.last + 1..].iter().product();
        let out_shape: TVec<usize> = shape
            .iter()
            .enumerate()
            .map(|(ax, &d)| {
                if (self.first..=self.last).contains(&ax) {
                    1
                } else {
                    d
                }
            })
            .collect();
        let ram = input.try_as_plain_ram()?;
        let mut out = vec![0f32; out_shape.iter().product()];
        max_rows(ram.as_slice::<f32>()?, reduced, inner, &mut out);
        Ok(tvec!(Tensor::from_shape(&out_shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for ReduceMaxRows {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape: TVec<TDim> = inputs[0]
            .shape
            .iter()
            .enumerate()
            .map(|(ax, d)| {
                if (self.first..=self.last).contains(&ax) {
                    1.to_dim()
                } else {
                    d.clone()
                }
            })
            .collect();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// tract's max over `axes` of `x`, and ours after the swap: (tract's, ours, swapped).
    fn both(x: &Tensor, axes: &[usize]) -> (Tensor, Tensor, usize) {
        let mut model = TypedModel::default();
        let src = model.add_source("x", f32::fact(x.shape())).unwrap();
        let op = Reduce::new(axes.iter().copied().collect(), Reducer::Max);
        let y = model.wire_node("max", op, &[src]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let theirs = model.into_optimized().unwrap();
        let mut ours = theirs.clone();
        let swapped = crate::kernels::apply(&mut ours).unwrap();
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec![x.clone().into_tvalue()])
                .unwrap()[0]
                .clone()
                .into_tensor()
        };
        (run(theirs), run(ours), swapped)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let ram = t.try_as_plain_ram().unwrap();
        ram.as_slice::<f32>()
            .unwrap()
            .iter()
            .map(|v| if v.is_nan() { u32::MAX } else { v.to_bits() })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any rank-3 or rank-4 shape, any one run of axes, NaN and infinities among the
        /// values: swapped in where it applies, and tract's values bit for bit either way.
        #[test]
        fn the_row_max_matches_tract(
            shape in prop::collection::vec(1usize..6, 3..5),
            first in 0usize..4, len in 1usize..3, seed in any::<u64>(),
        ) {
            let first = first.min(shape.len() - 1);
            let last = (first + len - 1).min(shape.len() - 1);
            let axes: Vec<usize> = (first..=last).collect();
            let n: usize = shape.iter().product();
            let mut s = seed | 1;
            let v: Vec<f32> = (0..n).map(|_| {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                match s % 23 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    _ => (s >> 40) as f32 / 1000.0 - 8000.0,
                }
            }).collect();
            let x = Tensor::from_shape(&shape, &v).unwrap();
            let (theirs, ours, swapped) = both(&x, &axes);
            let reduced: usize = shape[first..=last].iter().product();
            let inner: usize = shape[last + 1..].iter().product();
            prop_assert_eq!(swapped, usize::from(reduced >= 2 && inner >= 2));
            prop_assert_eq!(theirs.shape(), ours.shape());
            prop_assert_eq!(bits(&theirs), bits(&ours));
        }
    }
}
