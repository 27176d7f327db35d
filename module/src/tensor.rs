//! Tensors as clients send them and as tract runs them.
//!
//! Owns the Open Inference Protocol (v2) JSON tensor forms (request and response), the
//! datatype names of that protocol, the flattening of nested JSON arrays, and the conversion
//! of checked values into tract [`Tensor`]s and back. Checking a request against a model's
//! inputs lives in [`crate::model`]; this module only knows about one tensor at a time.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::{DatumType, Tensor, f16};

/// Why a tensor could not be built or read. Every message names the tensor and the problem,
/// because it goes back to the client as the body of a 400.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error("input '{name}': datatype '{datatype}' is not supported (use one of {supported})")]
    UnknownDatatype {
        name: String,
        datatype: String,
        supported: &'static str,
    },
    #[error("input '{name}': shape {shape:?} has a negative dimension")]
    NegativeDim { name: String, shape: Vec<i64> },
    #[error("input '{name}': shape {shape:?} holds {expected} elements but data has {got}")]
    CountMismatch {
        name: String,
        shape: Vec<i64>,
        expected: usize,
        got: usize,
    },
    #[error("input '{name}': element {index} ({value}) is not a valid {datatype}")]
    BadValue {
        name: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    #[error("input '{name}': nested data is ragged (rows of different lengths)")]
    Ragged { name: String },
    #[error("tensor '{name}': {reason}")]
    Internal { name: String, reason: String },
}

/// The datatypes of the Open Inference Protocol that map onto tract datums. BYTES (strings)
/// has no tract equivalent in the models this module serves, so it is refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
}

/// Listed in error messages so the client sees what it may send.
pub const SUPPORTED: &str =
    "BOOL, UINT8, UINT16, UINT32, UINT64, INT8, INT16, INT32, INT64, FP16, FP32, FP64";

impl DataType {
    /// The protocol's name for the type (`"FP32"`).
    pub fn oip_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn from_oip(name: &str) -> Option<DataType> {
        Some(match name {
            "BOOL" => DataType::Bool,
            "UINT8" => DataType::Uint8,
            "UINT16" => DataType::Uint16,
            "UINT32" => DataType::Uint32,
            "UINT64" => DataType::Uint64,
            "INT8" => DataType::Int8,
            "INT16" => DataType::Int16,
            "INT32" => DataType::Int32,
            "INT64" => DataType::Int64,
            "FP16" => DataType::Fp16,
            "FP32" => DataType::Fp32,
            "FP64" => DataType::Fp64,
            _ => return None,
        })
    }

    pub fn datum(self) -> DatumType {
        match self {
            DataType::Bool => DatumType::Bool,
            DataType::Uint8 => DatumType::U8,
            DataType::Uint16 => DatumType::U16,
            DataType::Uint32 => DatumType::U32,
            DataType::Uint64 => DatumType::U64,
            DataType::Int8 => DatumType::I8,
            DataType::Int16 => DatumType::I16,
            DataType::Int32 => DatumType::I32,
            DataType::Int64 => DatumType::I64,
            DataType::Fp16 => DatumType::F16,
            DataType::Fp32 => DatumType::F32,
            DataType::Fp64 => DatumType::F64,
        }
    }

    /// `None` for datums a client cannot send (strings, quantized or complex types).
    pub fn from_datum(dt: DatumType) -> Option<DataType> {
        Some(match dt {
            DatumType::Bool => DataType::Bool,
            DatumType::U8 => DataType::Uint8,
            DatumType::U16 => DataType::Uint16,
            DatumType::U32 => DataType::Uint32,
            DatumType::U64 => DataType::Uint64,
            DatumType::I8 => DataType::Int8,
            DatumType::I16 => DataType::Int16,
            DatumType::I32 => DataType::Int32,
            // Shape computations come out of tract as symbolic dims; they are plain integers.
            DatumType::I64 | DatumType::TDim => DataType::Int64,
            DatumType::F16 => DataType::Fp16,
            DatumType::F32 => DataType::Fp32,
            DatumType::F64 => DataType::Fp64,
            _ => return None,
        })
    }

    /// Size of one element in bytes (for `.npy` and byte limits).
    pub fn size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.oip_name())
    }
}

/// One JSON scalar, kept in the widest form that loses nothing until the model's datatype is
/// known (an INT64 above 2^53 must not go through f64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::UInt(v) => write!(f, "{v}"),
            Scalar::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Tensor data as sent: a flat or nested JSON array, flattened in row-major order while it is
/// parsed (no `serde_json::Value` per element: a 64×64 image is 12k numbers). The nesting is
/// kept as a shape when it is rectangular, for `/score`, whose requests carry no shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlatData {
    pub values: Vec<Scalar>,
    /// Lengths at each nesting depth; `None` when ragged or when an element is not a scalar.
    pub shape: Option<Vec<usize>>,
    /// Set when some element was neither a number, a boolean nor an array (strings, null…).
    pub non_scalar: Option<String>,
}

struct Flattener<'a> {
    out: &'a mut FlatData,
    /// Length seen first at each depth; later arrays at the same depth must agree.
    dims: &'a mut Vec<Option<usize>>,
    /// Depth at which scalars were found; every scalar must sit at the same depth.
    leaf_depth: &'a mut Option<usize>,
    ragged: &'a mut bool,
    depth: usize,
}

impl Flattener<'_> {
    fn leaf(&mut self, s: Scalar) {
        match self.leaf_depth {
            None => *self.leaf_depth = Some(self.depth),
            Some(d) if *d != self.depth => *self.ragged = true,
            _ => {}
        }
        self.out.values.push(s);
    }
}

impl<'de> DeserializeSeed<'de> for Flattener<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flattener<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number, a boolean or an array of them")
    }
    fn visit_bool<E>(mut self, v: bool) -> Result<(), E> {
        self.leaf(Scalar::Bool(v));
        Ok(())
    }
    fn visit_i64<E>(mut self, v: i64) -> Result<(), E> {
        self.leaf(Scalar::Int(v));
        Ok(())
    }
    fn visit_u64<E>(mut self, v: u64) -> Result<(), E> {
        self.leaf(Scalar::UInt(v));
        Ok(())
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<(), E> {
        self.leaf(Scalar::Float(v));
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.out
            .non_scalar
            .get_or_insert_with(|| format!("string {v:?}"));
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.non_scalar.get_or_insert_with(|| "null".into());
        Ok(())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        self.out
            .non_scalar
            .get_or_insert_with(|| "an object".into());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth;
        let mut len = 0usize;
        loop {
            let child = Flattener {
                out: &mut *self.out,
                dims: &mut *self.dims,
                leaf_depth: &mut *self.leaf_depth,
                ragged: &mut *self.ragged,
                depth: depth + 1,
            };
            if seq.next_element_seed(child)?.is_none() {
                break;
            }
            len += 1;
        }
        if self.dims.len() <= depth {
            self.dims.resize(depth + 1, None);
        }
        match self.dims[depth] {
            None => self.dims[depth] = Some(len),
            Some(l) if l != len => *self.ragged = true,
            _ => {}
        }
        if len == 0 && self.leaf_depth.is_none() {
            // An empty innermost array: its depth is where scalars would have been.
            *self.leaf_depth = Some(depth + 1);
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for FlatData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = FlatData::default();
        let mut dims = Vec::new();
        let mut leaf_depth = None;
        let mut ragged = false;
        Flattener {
            out: &mut out,
            dims: &mut dims,
            leaf_depth: &mut leaf_depth,
            ragged: &mut ragged,
            depth: 0,
        }
        .deserialize(d)?;
        let depth = leaf_depth.unwrap_or(0);
        if !ragged && out.non_scalar.is_none() && dims.len() >= depth {
            let shape: Option<Vec<usize>> = dims[..depth].iter().copied().collect();
            out.shape = shape;
        }
        Ok(out)
    }
}

/// An input tensor of an OIP inference request.
#[derive(Debug, Deserialize)]
pub struct RequestInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    pub data: FlatData,
}

/// An output a client asks for by name; when a request names none, all are returned.
#[derive(Debug, Deserialize)]
pub struct RequestOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
}

/// `POST /v2/models/{name}/infer` body (also accepted on the local bus).
#[derive(Debug, Deserialize)]
pub struct InferRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub parameters: Option<serde_json::Value>,
    pub inputs: Vec<RequestInput>,
    #[serde(default)]
    pub outputs: Option<Vec<RequestOutput>>,
}

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
    pub data: OutputData,
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

fn convert<T>(
    name: &str,
    values: &[Scalar],
    datatype: &'static str,
    f: impl Fn(Scalar) -> Option<T>,
) -> Result<Vec<T>, TensorError> {
    values
        .iter()
        .enumerate()
        .map(|(index, &s)| {
            f(s).ok_or_else(|| TensorError::BadValue {
                name: name.to_string(),
                index,
                value: s.to_string(),
                datatype,
            })
        })
        .collect()
}

fn int<T: TryFrom<i64> + TryFrom<u64>>(s: Scalar) -> Option<T> {
    match s {
        Scalar::Int(v) => T::try_from(v).ok(),
        Scalar::UInt(v) => T::try_from(v).ok(),
        // Integral floats (1.0) are what some clients send for integer tensors.
        Scalar::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => T::try_from(v as i64).ok(),
        _ => None,
    }
}

fn float(s: Scalar) -> Option<f64> {
    match s {
        Scalar::Int(v) => Some(v as f64),
        Scalar::UInt(v) => Some(v as f64),
        Scalar::Float(v) => Some(v),
        Scalar::Bool(_) => None,
    }
}

/// Builds a tract tensor of `dt` and `shape` from JSON scalars, checking the element count
/// and that every value fits the type (300 is not a UINT8, `true` is not an FP32).
pub fn tensor_from_scalars(
    name: &str,
    dt: DataType,
    shape: &[usize],
    values: &[Scalar],
) -> Result<Tensor, TensorError> {
    let expected: usize = shape.iter().product();
    if expected != values.len() {
        return Err(TensorError::CountMismatch {
            name: name.to_string(),
            shape: shape.iter().map(|&d| d as i64).collect(),
            expected,
            got: values.len(),
        });
    }
    let dn = dt.oip_name();
    let t = match dt {
        DataType::Bool => Tensor::from_shape(
            shape,
            &convert(name, values, dn, |s| match s {
                Scalar::Bool(b) => Some(b),
                _ => None,
            })?,
        ),
        DataType::Uint8 => Tensor::from_shape(shape, &convert(name, values, dn, int::<u8>)?),
        DataType::Uint16 => Tensor::from_shape(shape, &convert(name, values, dn, int::<u16>)?),
        DataType::Uint32 => Tensor::from_shape(shape, &convert(name, values, dn, int::<u32>)?),
        DataType::Uint64 => Tensor::from_shape(shape, &convert(name, values, dn, int::<u64>)?),
        DataType::Int8 => Tensor::from_shape(shape, &convert(name, values, dn, int::<i8>)?),
        DataType::Int16 => Tensor::from_shape(shape, &convert(name, values, dn, int::<i16>)?),
        DataType::Int32 => Tensor::from_shape(shape, &convert(name, values, dn, int::<i32>)?),
        DataType::Int64 => Tensor::from_shape(shape, &convert(name, values, dn, int::<i64>)?),
        DataType::Fp16 => Tensor::from_shape(
            shape,
            &convert(name, values, dn, |s| float(s).map(f16::from_f64))?,
        ),
        DataType::Fp32 => Tensor::from_shape(
            shape,
            &convert(name, values, dn, |s| float(s).map(|v| v as f32))?,
        ),
        DataType::Fp64 => Tensor::from_shape(shape, &convert(name, values, dn, float)?),
    };
    t.map_err(|e| TensorError::Internal {
        name: name.to_string(),
        reason: e.to_string(),
    })
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

    fn flat(json: &str) -> FlatData {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn flattens_nested_arrays_and_keeps_their_shape() {
        let d = flat("[[1, 2, 3], [4.5, -5, 6]]");
        assert_eq!(d.values.len(), 6);
        assert_eq!(d.values[3], Scalar::Float(4.5));
        assert_eq!(d.values[4], Scalar::Int(-5));
        assert_eq!(d.shape, Some(vec![2, 3]));
        assert_eq!(flat("[1, 2]").shape, Some(vec![2]));
        assert_eq!(flat("3").shape, Some(vec![]));
    }

    #[test]
    fn ragged_and_non_numeric_data_are_noticed() {
        assert_eq!(flat("[[1, 2], [3]]").shape, None);
        assert_eq!(flat("[[1, 2], 3]").shape, None);
        assert!(flat(r#"[1, "x"]"#).non_scalar.is_some());
        assert!(flat("[1, null]").non_scalar.is_some());
    }

    #[test]
    fn values_are_checked_against_the_datatype() {
        let v = flat("[1, 300]").values;
        let e = tensor_from_scalars("x", DataType::Uint8, &[2], &v).unwrap_err();
        assert!(
            e.to_string()
                .contains("element 1 (300) is not a valid UINT8"),
            "{e}"
        );
        let v = flat("[true, 1]").values;
        assert!(tensor_from_scalars("x", DataType::Bool, &[2], &v).is_err());
        assert!(tensor_from_scalars("x", DataType::Fp32, &[2], &flat("[true, 1]").values).is_err());
        let e = tensor_from_scalars("x", DataType::Fp32, &[3], &flat("[1, 2]").values).unwrap_err();
        assert!(matches!(
            e,
            TensorError::CountMismatch {
                expected: 3,
                got: 2,
                ..
            }
        ));
    }

    #[test]
    fn large_int64_values_survive() {
        let v = flat("[9007199254740993]").values;
        let t = tensor_from_scalars("x", DataType::Int64, &[1], &v).unwrap();
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
            let t = tensor_from_scalars("x", dt, &[2], &vals).unwrap();
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
