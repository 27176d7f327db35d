//! Depthwise 2D convolution over NCHW (or CHW, tract's form for a batch of one) f32 (one filter per channel, as in MobileNet-style
//! models: PP-OCR's classifier spends a fifth of its time there in tract's `DepthWiseConv`).
//!
//! Each output row is the bias plus, for every kernel tap, the weight times a slice of one
//! input row: at stride 1 the slice is contiguous, so every tap is one multiply-add over two
//! slices, which the compiler vectorises. Padding is handled by clipping each tap's slice to
//! the columns where it lands in the input, never by copying a padded plane.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::model::TypedModelPatch;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// The geometry of one depthwise convolution, concrete.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub struct Geometry {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// Padding before each spatial axis (after is implied by the output size).
    pub pad: [usize; 2],
    pub input: [usize; 2],
    pub output: [usize; 2],
}

/// A depthwise convolution with its weights (`[C, kh, kw]`) and bias (`[C]`) held by the op.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct DepthwiseConv {
    pub geometry: Geometry,
    kernel: Arc<Tensor>,
    bias: Arc<Tensor>,
}

/// Computes one channel plane: `out` (`oh × ow`) from `plane` (`h × w`).
pub fn depthwise_plane(plane: &[f32], weights: &[f32], bias: f32, g: &Geometry, out: &mut [f32]) {
    let ([kh, kw], [sh, sw], [pt, pl]) = (g.kernel, g.strides, g.pad);
    let ([h, w], [_, ow]) = (g.input, g.output);
    out.fill(bias);
    for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
        for ky in 0..kh {
            // The input row of this tap, when it is inside the image.
            let Some(iy) = (oy * sh + ky).checked_sub(pt).filter(|&iy| iy < h) else {
                continue;
            };
            let in_row = &plane[iy * w..(iy + 1) * w];
            for kx in 0..kw {
                let wt = weights[ky * kw + kx];
                // Output columns whose input column ox*sw + kx - pl is inside the row.
                let first = pl.saturating_sub(kx).div_ceil(sw);
                let end = ((w + pl).saturating_sub(kx)).div_ceil(sw).min(ow);
                if first >= end {
                    continue;
                }
                let start = first * sw + kx - pl;
                let outs = &mut out_row[first..end];
                if sw == 1 {
                    let len = outs.len();
                    for (o, &i) in outs.iter_mut().zip(&in_row[start..start + len]) {
                        *o += wt * i;
                    }
                } else {
                    for (o, &i) in outs.iter_mut().zip(in_row[start..].iter().step_by(sw)) {
                        *o += wt * i;
                    }
                }
            }
        }
    }
}

impl DepthwiseConv {
    /// This kernel for `node`, and the patch that wires it in, when `node` is a depthwise
    /// convolution it implements: f32, NCHW, 2D, OIHW weights and a bias known at load, no
    /// dilation, a concrete input shape.
    pub fn patch(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        let Some(op) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let spec = &op.pool_spec;
        let channels = spec.input_channels;
        if op.q_params.is_some()
            || op.group != channels
            || spec.output_channels != channels
            || channels < 2
            || !matches!(spec.data_format, DataFormat::NCHW | DataFormat::CHW)
            || op.kernel_fmt != KernelFormat::OIHW
            || spec.rank() != 2
            || spec.dilations().iter().any(|&d| d != 1)
            || node.inputs.len() != 3
        {
            return Ok(None);
        }
        let input = model.outlet_fact(node.inputs[0])?;
        let (Some(shape), true) = (
            input.shape.as_concrete(),
            input.datum_type == f32::datum_type(),
        ) else {
            return Ok(None);
        };
        let (Some(kernel), Some(bias)) = (
            model.outlet_fact(node.inputs[1])?.konst.clone(),
            model.outlet_fact(node.inputs[2])?.konst.clone(),
        ) else {
            return Ok(None);
        };
        let [kh, kw] = [spec.kernel_shape[0], spec.kernel_shape[1]];
        // tract drops a batch of one: CHW then, [C, H, W].
        let rank = if spec.data_format == DataFormat::NCHW {
            4
        } else {
            3
        };
        if shape.len() != rank
            || kernel.datum_type() != f32::datum_type()
            || kernel.shape() != [channels, 1, kh, kw]
            || bias.datum_type() != f32::datum_type()
            || !(bias.len() == channels || bias.len() == 1)
        {
            return Ok(None);
        }
        let hw = &shape[rank - 2..];
        let padding = spec.computed_padding(hw);
        let geometry = Geometry {
            kernel: [kh, kw],
            strides: [spec.stride(0), spec.stride(1)],
            pad: [padding[0].pad_before, padding[1].pad_before],
            input: [hw[0], hw[1]],
            output: [padding[0].convoluted, padding[1].convoluted],
        };
        let bias = if bias.len() == channels {
            bias.into_tensor().into_shape(&[channels])?
        } else {
            let b = bias.try_as_plain_ram()?.as_slice::<f32>()?[0];
            tensor1(&vec![b; channels])
        };
        let ours = DepthwiseConv {
            geometry,
            kernel: Arc::new(kernel.into_tensor().into_shape(&[channels, kh * kw])?),
            bias: Arc::new(bias),
        };
        if ours.output_facts(&[input])?[0].shape != node.outputs[0].fact.shape {
            return Ok(None);
        }
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let y = patch.wire_node(&node.name, ours, &[x])?;
        patch.shunt_outside(model, node.id.into(), y[0])?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        "DepthwiseConv(outpost)".into()
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let g = &self.geometry;
        let (n, c, h, w) = match *input.shape() {
            [n, c, h, w] => (n, c, h, w),
            [c, h, w] => (1, c, h, w),
            _ => bail!("DepthwiseConv takes NCHW or CHW, got {:?}", input.shape()),
        };
        ensure!([h, w] == g.input, "planned for {:?}, got {h}x{w}", g.input);
        let data = input.try_as_plain_ram()?;
        let data = data.as_slice::<f32>()?;
        let kernel = self.kernel.try_as_plain_ram()?;
        let kernel = kernel.as_slice::<f32>()?;
        let bias = self.bias.try_as_plain_ram()?;
        let bias = bias.as_slice::<f32>()?;
        let [oh, ow] = g.output;
        let mut out = vec![0f32; n * c * oh * ow];
        let taps = g.kernel[0] * g.kernel[1];
        for (p, (plane, out)) in data
            .chunks_exact(h * w)
            .zip(out.chunks_exact_mut(oh * ow))
            .enumerate()
        {
            let ch = p % c;
            depthwise_plane(plane, &kernel[ch * taps..][..taps], bias[ch], g, out);
        }
        let shape: TVec<usize> = if input.rank() == 4 {
            tvec![n, c, oh, ow]
        } else {
            tvec![c, oh, ow]
        };
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for DepthwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        let [oh, ow] = self.geometry.output;
        let mut shape: TVec<TDim> = match s.rank() {
            4 | 3 => s.iter().take(s.rank() - 2).cloned().collect(),
            _ => bail!("DepthwiseConv takes NCHW or CHW, got {s:?}"),
        };
        shape.push(oh.to_dim());
        shape.push(ow.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::tract_core::ops::cnn::{PaddingSpec, PoolSpec};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// A depthwise convolution as tract plans it, and as planned with our kernels:
    /// (tract's output, ours, kernels swapped in).
    #[allow(clippy::too_many_arguments)]
    fn both(
        [n, c, h, w]: [usize; 4],
        format: DataFormat,
        kernel: [usize; 2],
        strides: [usize; 2],
        dilations: [usize; 2],
        pads: [usize; 4],
        seed: u64,
    ) -> (Tensor, Tensor, usize) {
        let shape: Vec<usize> = if format == DataFormat::CHW {
            vec![c, h, w]
        } else {
            vec![n, c, h, w]
        };
        let x = Tensor::from_shape(&shape, &random(shape.iter().product(), seed)).unwrap();
        let k = Tensor::from_shape(
            &[c, 1, kernel[0], kernel[1]],
            &random(c * kernel[0] * kernel[1], seed ^ 7),
        )
        .unwrap();
        let b = Tensor::from_shape(&[c], &random(c, seed ^ 11)).unwrap();
        let mut model = TypedModel::default();
        let source = model.add_source("x", f32::fact(x.shape())).unwrap();
        let k = model.add_const("k", k).unwrap();
        let b = model.add_const("b", b).unwrap();
        let spec = PoolSpec {
            data_format: format,
            kernel_shape: kernel.into_iter().collect(),
            padding: PaddingSpec::Explicit(
                pads[..2].iter().copied().collect(),
                pads[2..].iter().copied().collect(),
            ),
            dilations: Some(dilations.into_iter().collect()),
            strides: Some(strides.into_iter().collect()),
            input_channels: c,
            output_channels: c,
        };
        let conv = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: None,
        };
        let y = model.wire_node("conv", conv, &[source, k, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let mut ours = model.clone();
        ours.declutter().unwrap();
        let swapped = crate::kernels::before_codegen(&mut ours).unwrap();
        ours.optimize().unwrap();
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec![x.clone().into_tvalue()])
                .unwrap()[0]
                .clone()
                .into_tensor()
        };
        (run(model.into_optimized().unwrap()), run(ours), swapped)
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        let (a_ram, b_ram) = (a.try_as_plain_ram().unwrap(), b.try_as_plain_ram().unwrap());
        a.shape() == b.shape()
            && a_ram
                .as_slice::<f32>()
                .unwrap()
                .iter()
                .zip(b_ram.as_slice::<f32>().unwrap())
                .all(|(x, y)| (x - y).abs() <= 1e-5 + 1e-5 * y.abs())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Any kernel size, stride, padding and image size (batches, odd sizes, images
        /// smaller than the kernel once padded): swapped in, and tract's values within
        /// float rounding (the taps are summed in another order).
        #[test]
        fn the_depthwise_kernel_matches_tract(
            n in 1usize..3, c in 2usize..6, h in 1usize..14, w in 1usize..14,
            kernel in prop::array::uniform2(1usize..6),
            strides in prop::array::uniform2(1usize..4),
            pads in prop::array::uniform4(0usize..3),
            seed in any::<u64>(), chw in any::<bool>(),
        ) {
            // The padded image must hold one window.
            prop_assume!(h + pads[0] + pads[2] >= kernel[0] && w + pads[1] + pads[3] >= kernel[1]);
            // tract's form for a batch of one: [C, H, W].
            let format = if chw { DataFormat::CHW } else { DataFormat::NCHW };
            let (theirs, ours, swapped) =
                both([n, c, h, w], format, kernel, strides, [1, 1], pads, seed);
            prop_assert_eq!(swapped, 1);
            prop_assert!(close(&ours, &theirs), "{:?}\nvs tract {:?}", ours, theirs);
        }

        /// Dilated depthwise convolutions are left to tract.
        #[test]
        fn dilated_convolutions_are_left_to_tract(
            d in 2usize..4, h in 8usize..14, seed in any::<u64>(),
        ) {
            let (theirs, ours, swapped) =
                both([1, 3, h, h], DataFormat::NCHW, [3, 3], [1, 1], [d, 1], [1, 1, 1, 1], seed);
            prop_assert_eq!(swapped, 0);
            prop_assert!(close(&ours, &theirs));
        }
    }
}
