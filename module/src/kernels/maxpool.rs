//! 2×2 max pooling with stride 2 over NCHW f32: the pooling of most small CNNs, where tract
//! walks every output through its generic patch visitor (measured: the three pools of the test
//! CNN took as long as a third of its convolutions).
//!
//! Each output row reads two input rows and folds the four taps of each window in tract's
//! order with tract's operation (`f32::max` from `f32::MIN`, as tract's own 2×2 path does), so
//! both give the same values, NaN and signed zeros included, on each architecture: `f32::max`
//! is IEEE maxNum, and which zero it returns for `max(-0.0, 0.0)` is the hardware's (x86
//! keeps the first, aarch64's `fmaxnm` gives +0.0); the property test runs on both.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{OptMaxPool, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Max pooling, 2×2 window, stride 2, no padding, no dilation, NCHW, f32. Odd trailing rows
/// and columns are dropped, as valid pooling does.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub struct MaxPool2x2;

impl MaxPool2x2 {
    /// This kernel for `node` when it is a pool of exactly the configuration it implements.
    pub fn replacing(model: &TypedModel, node: &TypedNode) -> TractResult<Option<MaxPool2x2>> {
        let Some(op) = node.op_as::<OptMaxPool>() else {
            return Ok(None);
        };
        let spec = &op.pool_spec;
        let unpadded = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|&p| p == 0),
            PaddingSpec::ExplicitOnnxPool(before, after, ceil) => {
                !ceil && before.iter().chain(after).all(|&p| p == 0)
            }
            PaddingSpec::SameUpper | PaddingSpec::SameLower => false,
        };
        let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
        let input = model.outlet_fact(node.inputs[0])?;
        let fits = op.with_index_outputs.is_none()
            && spec.data_format == DataFormat::NCHW
            && spec.kernel_shape.as_slice() == [2, 2]
            && spec
                .strides
                .as_ref()
                .is_some_and(|s| s.as_slice() == [2, 2])
            && ones(&spec.dilations)
            && unpadded
            && input.datum_type == f32::datum_type()
            && input.rank() == 4;
        if !fits {
            return Ok(None);
        }
        // Windows tract would cut at the border (inputs under 2 high or wide) stay tract's.
        let ours = MaxPool2x2.output_facts(&[input])?;
        Ok((ours[0].shape == node.outputs[0].fact.shape).then_some(MaxPool2x2))
    }
}

/// Pools `planes` planes of `h`×`w` values into `out` (`planes` × `h/2` × `w/2`).
pub fn max_pool_2x2(input: &[f32], planes: usize, h: usize, w: usize, out: &mut [f32]) {
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        return;
    }
    // tract's 2×2 fold: maxNum, NaN taps ignored.
    let fold = |m: f32, v: f32| m.max(v);
    for (plane, out) in input
        .chunks_exact(h * w)
        .zip(out.chunks_exact_mut(oh * ow))
        .take(planes)
    {
        for (rows, out) in plane.chunks_exact(2 * w).zip(out.chunks_exact_mut(ow)) {
            let (top, bottom) = rows.split_at(w);
            for ((o, t), b) in out
                .iter_mut()
                .zip(top.chunks_exact(2))
                .zip(bottom.chunks_exact(2))
            {
                *o = fold(fold(fold(fold(f32::MIN, t[0]), t[1]), b[0]), b[1]);
            }
        }
    }
}

impl Op for MaxPool2x2 {
    fn name(&self) -> StaticName {
        "MaxPool2x2(outpost)".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPool2x2 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let &[n, c, h, w] = input.shape() else {
            bail!("MaxPool2x2 takes NCHW, got shape {:?}", input.shape());
        };
        let data = input.try_as_plain_ram()?;
        let data = data.as_slice::<f32>()?;
        let mut out = vec![0f32; n * c * (h / 2) * (w / 2)];
        max_pool_2x2(data, n * c, h, w, &mut out);
        Ok(tvec!(
            Tensor::from_shape(&[n, c, h / 2, w / 2], &out)?.into_tvalue()
        ))
    }
}

impl TypedOp for MaxPool2x2 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        ensure!(s.rank() == 4, "MaxPool2x2 takes NCHW, got {s:?}");
        let half = |d: &TDim| d.clone() / 2u64;
        Ok(tvec!(f32::fact([
            s[0].clone(),
            s[1].clone(),
            half(&s[2]),
            half(&s[3])
        ])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::tract_core::ops::cnn::{MaxPool, PoolSpec};

    /// tract's own max pool of `x` with this configuration, planned as tract plans it, then
    /// the same plan after our kernels were swapped in: (tract's, ours, kernels swapped in).
    fn both(
        x: &Tensor,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        pads: [usize; 4],
    ) -> (Tensor, Tensor, usize) {
        let mut model = TypedModel::default();
        let source = model.add_source("x", f32::fact(x.shape())).expect("source");
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: kernel.into_iter().collect(),
            padding: PaddingSpec::ExplicitOnnxPool(
                pads[..2].iter().copied().collect(),
                pads[2..].iter().copied().collect(),
                false,
            ),
            dilations: Some(dilations.into_iter().collect()),
            strides: Some(strides.into_iter().collect()),
            input_channels: x.shape()[1],
            output_channels: x.shape()[1],
        };
        let pooled = model
            .wire_node("pool", MaxPool::new(spec, None), &[source])
            .expect("wire");
        model.select_output_outlets(&pooled).expect("outputs");
        let optimized = model.into_optimized().expect("optimize");
        let run = |m: TypedModel| {
            let plan = m.into_runnable().expect("plan");
            plan.run(tvec![x.clone().into_tvalue()]).expect("run")[0]
                .clone()
                .into_tensor()
        };
        let mut ours = optimized.clone();
        let swapped = crate::kernels::apply(&mut ours).expect("apply");
        (run(optimized), run(ours), swapped)
    }

    fn tensor(shape: [usize; 4], seed: u64, specials: bool) -> Tensor {
        let mut s = seed | 1;
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match (specials, s % 16) {
                    (true, 0) => f32::NAN,
                    (true, 1) => -0.0,
                    (true, 2) => 0.0,
                    (true, 3) => f32::NEG_INFINITY,
                    _ => ((s >> 11) as f64 / (1u64 << 53) as f64 * 200.0 - 100.0) as f32,
                }
            })
            .collect();
        Tensor::from_shape(&shape, &v).expect("shape")
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        let (a_ram, b_ram) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
        a.shape() == b.shape()
            && a_ram
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(b_ram.as_slice::<f32>().unwrap())
                .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Where the kernel applies (any batch, channels, odd or even sizes, NaN, ±0, -inf),
        /// it is swapped in and gives tract's values bit for bit.
        #[test]
        fn the_2x2_kernel_matches_tract(
            n in 1usize..3, c in 1usize..5, h in 1usize..12, w in 1usize..12,
            seed in any::<u64>(), specials in any::<bool>(),
        ) {
            let x = tensor([n, c, h, w], seed, specials);
            let (theirs, ours, swapped) = both(&x, [2, 2], [2, 2], [1, 1], [0; 4]);
            // Under 2 high or wide, tract pools a partial window: left to tract.
            prop_assert_eq!(swapped, usize::from(h >= 2 && w >= 2));
            prop_assert!(same(&theirs, &ours), "{:?} vs {:?}", theirs, ours);
        }

        /// Every other configuration (kernels, strides, dilations, paddings) is left to
        /// tract: nothing swapped, same values.
        #[test]
        fn other_pools_are_left_to_tract(
            kernel in prop::array::uniform2(1usize..4),
            strides in prop::array::uniform2(1usize..4),
            dilations in prop::array::uniform2(1usize..3),
            pads in prop::array::uniform4(0usize..2),
            h in 6usize..12, w in 6usize..12, seed in any::<u64>(),
        ) {
            // ONNX pads are smaller than the window.
            let pads: [usize; 4] = std::array::from_fn(|i| pads[i].min(kernel[i % 2] - 1));
            let x = tensor([1, 2, h, w], seed, false);
            let (theirs, ours, swapped) = both(&x, kernel, strides, dilations, pads);
            let is_ours =
                kernel == [2, 2] && strides == [2, 2] && dilations == [1, 1] && pads == [0; 4];
            prop_assert_eq!(swapped, usize::from(is_ours));
            prop_assert!(same(&theirs, &ours));
        }
    }
}
