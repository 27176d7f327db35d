//! A matrix product by a one-hot encoding, done as the row lookup it is.
//!
//! Models exported from JAX and Keras often embed integer inputs as
//! `one_hot(x, K) @ W`: an `Equal` of the input against `0..K`, a cast to float, and a matrix
//! product with a `[K, D]` weight. magika does it for each of its 2048 bytes with K = 257,
//! D = 64: 34 million multiply-adds per sample, 62 % of its time in tract and most of
//! onnxruntime's, to pick 2048 rows of W. This kernel picks them: `out[.., m, :] = W[x[m], :]`,
//! a row of zeros where `x` is outside `0..K` (where the one-hot row is all zeros).
//!
//! Exact: each output of the product is one weight plus zeros, so the lookup gives the same
//! value (a weight of -0.0 may come out as +0.0 from the product). Weights that are not all
//! finite are left to tract (`0 × inf` is NaN in the product).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::model::TypedModelPatch;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::logic::CompEq;

/// `one_hot(x, K) @ W` as a lookup of rows of `W` (`[K, D]`, f32) by `x` (integers, last axis
/// of size 1, replaced by D in the output).
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct OneHotMatMul {
    weights: Arc<Tensor>,
}

/// The einsum of a product contracting the last axis of its first input with the first axis
/// of a 2D second input: `P k, k n -> P n` (magika's `amk,kn->amn`).
fn is_last_by_rows(expr: &str) -> bool {
    let Some((inputs, out)) = expr.split_once("->") else {
        return false;
    };
    let Some((a, b)) = inputs.split_once(',') else {
        return false;
    };
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (Some((&k, prefix)), [k2, n]) = (a.split_last(), b.as_slice()) else {
        return false;
    };
    let expected: String = prefix.iter().chain([n]).collect();
    k == *k2 && k != *n && !prefix.contains(&k) && !prefix.contains(n) && out == expected
}

/// Whether `t` is `0, 1, .., K-1` along its last axis, every other axis of size 1.
fn is_iota(t: &Tensor, k: usize) -> bool {
    let shape = t.shape();
    if shape.last() != Some(&k) || shape.iter().rev().skip(1).any(|&d| d != 1) {
        return false;
    }
    let Ok(values) = t.cast_to::<i64>() else {
        return false;
    };
    let Ok(values) = values
        .try_as_plain_ram()
        .and_then(|r| r.as_slice::<i64>().map(<[i64]>::to_vec))
    else {
        return false;
    };
    values.iter().enumerate().all(|(i, &v)| v == i as i64)
}

impl OneHotMatMul {
    /// The patch replacing `node` when it is the product of such a pattern, wired on the
    /// integer input of the comparison.
    pub fn patch(model: &TypedModel, node: &TypedNode) -> TractResult<Option<TypedModelPatch>> {
        let Some(einsum) = node.op_as::<EinSum>() else {
            return Ok(None);
        };
        if einsum.q_params.is_some()
            || einsum.operating_dt != f32::datum_type()
            || node.inputs.len() != 2
            || !is_last_by_rows(&einsum.axes.to_string())
        {
            return Ok(None);
        }
        let Some(weights) = model.outlet_fact(node.inputs[1])?.konst.clone() else {
            return Ok(None);
        };
        let (k, finite) = match (weights.shape(), weights.datum_type() == f32::datum_type()) {
            ([k, _], true) => {
                let ram = weights.try_as_plain_ram()?;
                (*k, ram.as_slice::<f32>()?.iter().all(|w| w.is_finite()))
            }
            _ => return Ok(None),
        };
        // The product's left input: a cast to f32 of an equality against 0..K.
        let cast = model.node(node.inputs[0].node);
        if cast
            .op_as::<Cast>()
            .is_none_or(|c| c.to != f32::datum_type())
            || !finite
        {
            return Ok(None);
        }
        let eq = model.node(cast.inputs[0].node);
        let Some(bin) = eq.op_as::<TypedBinOp>() else {
            return Ok(None);
        };
        if !bin.0.is::<CompEq>() || eq.inputs.len() != 2 {
            return Ok(None);
        }
        // One side the constant iota, the other the integers with a last axis of 1.
        let facts = [
            model.outlet_fact(eq.inputs[0])?,
            model.outlet_fact(eq.inputs[1])?,
        ];
        let x = match facts.map(|f| f.konst.as_ref().is_some_and(|t| is_iota(t, k))) {
            [false, true] => 0,
            [true, false] => 1,
            _ => return Ok(None),
        };
        let xf = facts[x];
        let integer = [i32::datum_type(), i64::datum_type()].contains(&xf.datum_type);
        if !integer || xf.rank() < 2 || xf.shape.last() != Some(&1.to_dim()) {
            return Ok(None);
        }
        let ours = OneHotMatMul { weights };
        if ours.output_facts(&[xf])?[0].shape != node.outputs[0].fact.shape {
            return Ok(None);
        }
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, eq.inputs[x])?;
        let y = patch.wire_node(&node.name, ours, &[input])?;
        patch.shunt_outside(model, node.id.into(), y[0])?;
        patch.obliterate(node.id)?;
        Ok(Some(patch))
    }
}

/// Copies row `x[r]` of `weights` (`k` rows of `d`) into row `r` of `out` for every `r`; zeros
/// where `x[r]` is outside `0..k`.
pub fn lookup(x: impl Iterator<Item = i64>, weights: &[f32], k: usize, d: usize, out: &mut [f32]) {
    for (row, i) in out.chunks_exact_mut(d).zip(x) {
        match usize::try_from(i).ok().filter(|&i| i < k) {
            Some(i) => row.copy_from_slice(&weights[i * d..(i + 1) * d]),
            None => row.fill(0.0),
        }
    }
}

impl Op for OneHotMatMul {
    fn name(&self) -> StaticName {
        "OneHotMatMul(outpost)".into()
    }

    op_as_typed_op!();
}

impl EvalOp for OneHotMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let &[k, d] = self.weights.shape() else {
            bail!("OneHotMatMul weights must be 2D");
        };
        let weights = self.weights.try_as_plain_ram()?;
        let weights = weights.as_slice::<f32>()?;
        let mut shape: TVec<usize> = x.shape().into();
        *shape.last_mut().context("rank 0 input")? = d;
        let mut out = vec![0f32; shape.iter().product()];
        let ram = x.try_as_plain_ram()?;
        if x.datum_type() == i32::datum_type() {
            let v = ram.as_slice::<i32>()?;
            lookup(v.iter().map(|&i| i as i64), weights, k, d, &mut out);
        } else {
            let v = ram.as_slice::<i64>()?;
            lookup(v.iter().copied(), weights, k, d, &mut out);
        }
        Ok(tvec!(Tensor::from_shape(&shape, &out)?.into_tvalue()))
    }
}

impl TypedOp for OneHotMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        let d = self.weights.shape()[1];
        *shape.last_mut().context("rank 0 input")? = d.to_dim();
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;

    /// `one_hot(x, k) @ w` as a model, the way magika's graph reads once decluttered: the
    /// output of tract's plan, of ours, and how many products were swapped.
    fn both(x: &[i64], m: usize, k: usize, w: &[f32], i64_input: bool) -> (Tensor, Tensor, usize) {
        let d = w.len() / k;
        let x = if i64_input {
            Tensor::from_shape(&[1, m], x).unwrap()
        } else {
            let v: Vec<i32> = x.iter().map(|&i| i as i32).collect();
            Tensor::from_shape(&[1, m], &v).unwrap()
        };
        let mut model = TypedModel::default();
        let src = model.add_source("x", x.datum_type().fact([1, m])).unwrap();
        let col = model.wire_node("col", AxisOp::Add(2), &[src]).unwrap();
        let iota: Vec<i64> = (0..k as i64).collect();
        let iota = Tensor::from_shape(&[1, 1, k], &iota)
            .unwrap()
            .cast_to_dt(x.datum_type())
            .unwrap()
            .into_owned();
        let iota = model.add_const("iota", iota).unwrap();
        let eq = model
            .wire_node("eq", TypedBinOp(Box::new(CompEq), None), &[col[0], iota])
            .unwrap();
        let f = model
            .wire_node("cast", Cast::new(f32::datum_type()), &eq)
            .unwrap();
        let w = model
            .add_const("w", Tensor::from_shape(&[k, d], w).unwrap())
            .unwrap();
        let axes: AxesMapping = "amk,kn->amn".parse().unwrap();
        let y = model
            .wire_node("dense", EinSum::new(axes, f32::datum_type()), &[f[0], w])
            .unwrap();
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

    fn values(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Indices in range, below and beyond it, either integer width: swapped in (unless K
        /// or D is 1), and the product's values exactly.
        #[test]
        fn the_lookup_matches_the_product(
            k in 1usize..20, d in 1usize..9, m in 1usize..12, i64_input in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
            let x: Vec<i64> = (0..m).map(|_| (next() % (k as u64 + 4)) as i64 - 2).collect();
            let w: Vec<f32> = (0..k * d).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let (theirs, ours, swapped) = both(&x, m, k, &w, i64_input);
            // With K or D of 1, tract's declutter rewrites the product into another form,
            // which stays tract's.
            prop_assert_eq!(swapped, usize::from(k > 1 && d > 1));
            prop_assert_eq!(theirs.shape(), ours.shape());
            prop_assert_eq!(values(&theirs), values(&ours));
        }
    }

    #[test]
    fn non_finite_weights_are_left_to_the_product() {
        let (theirs, ours, swapped) = both(&[0, 1], 2, 2, &[f32::INFINITY, 1.0], false);
        assert_eq!(swapped, 0);
        assert_eq!(format!("{theirs:?}"), format!("{ours:?}"));
    }

    #[test]
    fn only_products_by_rows_of_a_2d_weight_are_recognised() {
        assert!(is_last_by_rows("amk,kn->amn"));
        assert!(is_last_by_rows("k,kn->n"));
        assert!(!is_last_by_rows("amk,nk->amn"));
        assert!(!is_last_by_rows("amk,kn->anm"));
        assert!(!is_last_by_rows("akm,kn->amn"));
    }
}
