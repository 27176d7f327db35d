//! The response side: tract tensors read back into the JSON form of their datatype, OIP
//! responses, and the nested arrays of a `/score` answer.

use std::fmt;

use serde::Serialize;
use tract_onnx::prelude::{Tensor, f16};

use super::{DataType, TensorError};

/// Output values in the JSON form of their datatype (FP16 goes out as JSON numbers).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum OutputData {
    Bool(Vec<bool>),
    Int(Vec<i64>),
    UInt(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// One tensor of an OIP response.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseOutput {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<usize>,
    /// Absent when the output goes back as binary data (then `parameters` says its size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<OutputData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
}

/// `POST /v2/models/{name}/infer` answer.
#[derive(Debug, Clone, Serialize)]
pub struct InferResponse {
    pub model_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub outputs: Vec<ResponseOutput>,
}

fn internal(name: &str, e: impl fmt::Display) -> TensorError {
    TensorError::Internal {
        name: name.to_string(),
        reason: e.to_string(),
    }
}

/// Reads a tract tensor into its JSON form.
pub fn output_data(name: &str, t: &Tensor) -> Result<(DataType, OutputData), TensorError> {
    let dt = DataType::from_datum(t.datum_type()).ok_or_else(|| {
        internal(
            name,
            format!("datum type {:?} has no OIP datatype", t.datum_type()),
        )
    })?;
    // A no-op borrow except for TDim (shape results), which becomes plain i64.
    let t = t.cast_to_dt(dt.datum()).map_err(|e| internal(name, e))?;
    let view = t.try_as_plain_ram().map_err(|e| internal(name, e))?;
    macro_rules! slice {
        ($t:ty) => {
            view.as_slice::<$t>().map_err(|e| internal(name, e))?
        };
    }
    let data = match dt {
        DataType::Bool => OutputData::Bool(slice!(bool).to_vec()),
        DataType::Uint8 => OutputData::UInt(slice!(u8).iter().map(|&v| v as u64).collect()),
        DataType::Uint16 => OutputData::UInt(slice!(u16).iter().map(|&v| v as u64).collect()),
        DataType::Uint32 => OutputData::UInt(slice!(u32).iter().map(|&v| v as u64).collect()),
        DataType::Uint64 => OutputData::UInt(slice!(u64).to_vec()),
        DataType::Int8 => OutputData::Int(slice!(i8).iter().map(|&v| v as i64).collect()),
        DataType::Int16 => OutputData::Int(slice!(i16).iter().map(|&v| v as i64).collect()),
        DataType::Int32 => OutputData::Int(slice!(i32).iter().map(|&v| v as i64).collect()),
        DataType::Int64 => OutputData::Int(slice!(i64).to_vec()),
        DataType::Fp16 => OutputData::F32(slice!(f16).iter().map(|v| v.to_f32()).collect()),
        DataType::Fp32 => OutputData::F32(slice!(f32).to_vec()),
        DataType::Fp64 => OutputData::F64(slice!(f64).to_vec()),
    };
    Ok((dt, data))
}

/// Nests flat row-major values into JSON arrays of `shape` (the `/score` answer form).
pub fn nest(shape: &[usize], data: &OutputData) -> serde_json::Value {
    use serde_json::Value;
    let flat: Vec<Value> = match data {
        OutputData::Bool(v) => v.iter().map(|&x| Value::from(x)).collect(),
        OutputData::Int(v) => v.iter().map(|&x| Value::from(x)).collect(),
        OutputData::UInt(v) => v.iter().map(|&x| Value::from(x)).collect(),
        OutputData::F32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        OutputData::F64(v) => v.iter().map(|&x| Value::from(x)).collect(),
    };
    fn build(shape: &[usize], it: &mut std::vec::IntoIter<serde_json::Value>) -> serde_json::Value {
        match shape.split_first() {
            None => it.next().unwrap_or(serde_json::Value::Null),
            Some((&n, rest)) => serde_json::Value::Array((0..n).map(|_| build(rest, it)).collect()),
        }
    }
    build(shape, &mut flat.into_iter())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{FlatData, Origin, SUPPORTED, tensor_from_scalars};

    fn flat(json: &str) -> FlatData {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn large_int64_values_survive() {
        let v = flat("[9007199254740993]").values;
        let t = tensor_from_scalars(Origin::File, "x", DataType::Int64, &[1], &v).unwrap();
        let (_, data) = output_data("x", &t).unwrap();
        assert_eq!(data, OutputData::Int(vec![9_007_199_254_740_993]));
    }

    #[test]
    fn every_datatype_round_trips() {
        for name in SUPPORTED.split(", ") {
            let dt = DataType::from_oip(name).unwrap();
            assert_eq!(DataType::from_datum(dt.datum()), Some(dt));
            let vals = if dt == DataType::Bool {
                flat("[true, false]").values
            } else {
                flat("[1, 2]").values
            };
            let t = tensor_from_scalars(Origin::File, "x", dt, &[2], &vals).unwrap();
            assert_eq!(t.datum_type(), dt.datum());
            let (back, _) = output_data("x", &t).unwrap();
            assert_eq!(back, dt);
        }
    }

    #[test]
    fn shape_results_go_out_as_int64() {
        use tract_onnx::prelude::TDim;
        let t = tract_onnx::prelude::tensor1(&[TDim::from(3), TDim::from(4)]);
        assert_eq!(
            output_data("shape", &t).unwrap(),
            (DataType::Int64, OutputData::Int(vec![3, 4]))
        );
    }

    #[test]
    fn nest_rebuilds_rows() {
        let v = nest(&[2, 2], &OutputData::Int(vec![1, 2, 3, 4]));
        assert_eq!(v, serde_json::json!([[1, 2], [3, 4]]));
    }
}
