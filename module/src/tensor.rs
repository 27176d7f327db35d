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

/// Why a tensor could not be built or read. Every message starts with the request field the
/// client must fix (`inputs[0].shape`, `inputs[0].data[5]`, `data[3]`) and names the tensor,
/// because it goes back to the client as the body of a 400.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TensorError {
    #[error(
        "{field}: input '{name}': datatype '{datatype}' is not supported (use one of {supported})"
    )]
    UnknownDatatype {
        field: String,
        name: String,
        datatype: String,
        supported: &'static str,
    },
    #[error("{field}: input '{name}': shape {shape:?} has a negative dimension")]
    NegativeDim {
        field: String,
        name: String,
        shape: Vec<i64>,
    },
    /// The product of the dimensions (or the bytes it needs) does not fit in memory's address
    /// space; refused before anything multiplies it unchecked (tract and ndarray do).
    #[error("{field}: input '{name}': shape {shape:?} has more elements than this server can hold")]
    ShapeOverflow {
        field: String,
        name: String,
        shape: Vec<u64>,
    },
    #[error(
        "{field}: input '{name}': shape {shape:?} holds {expected} elements but data has {got}"
    )]
    CountMismatch {
        field: String,
        name: String,
        shape: Vec<i64>,
        expected: usize,
        got: usize,
    },
    #[error("{field}: input '{name}': element {index} ({value}) is not a valid {datatype}")]
    BadValue {
        field: String,
        name: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    /// A number that is valid JSON but does not fit the datatype: refused rather than
    /// wrapped (INT8 300), saturated or turned into infinity (FP32 1e39).
    #[error(
        "{field}: input '{name}': element {index} ({value}) is outside the range of {datatype}"
    )]
    OutOfRange {
        field: String,
        name: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    #[error("{field}: input '{name}': data holds {what}; expected numbers or booleans")]
    NonScalar {
        field: String,
        name: String,
        what: String,
    },
    #[error("{field}: input '{name}': nested data is ragged (rows of different lengths)")]
    Ragged { field: String, name: String },
    #[error("tensor '{name}': {reason}")]
    Internal { name: String, reason: String },
}

/// Where a tensor sits in what the client sent, so that errors name the field to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `inputs[i]` of an Open Inference Protocol request.
    Input(usize),
    /// The `data` of a `{"data": ...}` request (`/score`, the bus, batch); its nesting is
    /// its shape.
    Data,
    /// A tensor that came whole (a `.npy` file, generated inputs); no request field.
    File,
}

impl Origin {
    /// The field holding the shape: `inputs[0].shape`, `data` (its nesting) or `shape`.
    pub fn shape_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].shape"),
            Origin::Data => "data".into(),
            Origin::File => "shape".into(),
        }
    }

    /// The field holding the data as a whole.
    pub fn data_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].data"),
            Origin::Data => "data".into(),
            Origin::File => "data".into(),
        }
    }

    /// The field of one element, by its flat (row-major) index.
    pub fn element_field(self, index: usize) -> String {
        format!("{}[{index}]", self.data_field())
    }

    /// The field holding the datatype.
    pub fn datatype_field(self) -> String {
        match self {
            Origin::Input(i) => format!("inputs[{i}].datatype"),
            Origin::Data | Origin::File => "datatype".into(),
        }
    }
}

/// Elements in a tensor of `shape` whose elements take `size` bytes, or `None` when such a
/// tensor cannot exist here.
///
/// Checks more than the element count: the product of the non-zero dimensions times `size`
/// (the largest stride in bytes, which tract and ndarray compute with unchecked
/// multiplication even for an empty tensor) must fit in `isize`, Rust's limit on one
/// allocation. So `[2^62, 2^62]` and `[0, 2^62, 2^62]` are both refused.
pub fn checked_len(shape: &[usize], size: usize) -> Option<usize> {
    let mut nonzero: usize = 1;
    let mut empty = false;
    for &d in shape {
        if d == 0 {
            empty = true;
        } else {
            nonzero = nonzero.checked_mul(d)?;
        }
    }
    let bytes = nonzero.checked_mul(size.max(1))?;
    if isize::try_from(bytes).is_err() {
        return None;
    }
    Some(if empty { 0 } else { nonzero })
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
            // Debug keeps large and small floats short (1e39, not 40 digits).
            Scalar::Float(v) => write!(f, "{v:?}"),
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

/// Why one JSON scalar does not convert: the wrong kind (`true` for FP32, 1.5 for INT32) or
/// a number out of the datatype's range.
enum Unfit {
    Kind,
    Range,
}

fn convert<T>(
    origin: Origin,
    name: &str,
    values: &[Scalar],
    datatype: &'static str,
    f: impl Fn(Scalar) -> Result<T, Unfit>,
) -> Result<Vec<T>, TensorError> {
    values
        .iter()
        .enumerate()
        .map(|(index, &s)| {
            f(s).map_err(|why| {
                let (field, name, value) =
                    (origin.element_field(index), name.to_string(), s.to_string());
                match why {
                    Unfit::Kind => TensorError::BadValue {
                        field,
                        name,
                        index,
                        value,
                        datatype,
                    },
                    Unfit::Range => TensorError::OutOfRange {
                        field,
                        name,
                        index,
                        value,
                        datatype,
                    },
                }
            })
        })
        .collect()
}

fn int<T: TryFrom<i64> + TryFrom<u64>>(s: Scalar) -> Result<T, Unfit> {
    match s {
        Scalar::Int(v) => T::try_from(v).map_err(|_| Unfit::Range),
        Scalar::UInt(v) => T::try_from(v).map_err(|_| Unfit::Range),
        // Integral floats (1.0) are what some clients send for integer tensors; beyond 2^53
        // a float no longer says which integer it means.
        Scalar::Float(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => {
            T::try_from(v as i64).map_err(|_| Unfit::Range)
        }
        _ => Err(Unfit::Kind),
    }
}

fn float(s: Scalar) -> Result<f64, Unfit> {
    match s {
        Scalar::Int(v) => Ok(v as f64),
        Scalar::UInt(v) => Ok(v as f64),
        // JSON cannot carry NaN or infinity (serde_json refuses them and numbers beyond f64),
        // so a non-finite value here can only come from elsewhere: refuse it all the same.
        Scalar::Float(v) if v.is_finite() => Ok(v),
        Scalar::Float(_) => Err(Unfit::Range),
        Scalar::Bool(_) => Err(Unfit::Kind),
    }
}

/// A float narrowed to FP32: values beyond its range would silently become infinity.
/// (Values too small for FP32 round towards zero, as in every float conversion.)
fn fp32(s: Scalar) -> Result<f32, Unfit> {
    let v = float(s)? as f32;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Unfit::Range)
    }
}

/// A float narrowed to FP16 (largest finite value 65504).
fn fp16(s: Scalar) -> Result<f16, Unfit> {
    let v = f16::from_f64(float(s)?);
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Unfit::Range)
    }
}

/// Builds a tract tensor of `dt` and `shape` from JSON scalars, checking that the shape can
/// exist ([`checked_len`]), the element count, and that every value fits the type (300 is
/// not a UINT8, 1e39 is not an FP32, `true` is not an FP32). Errors name the field by
/// `origin`.
pub fn tensor_from_scalars(
    origin: Origin,
    name: &str,
    dt: DataType,
    shape: &[usize],
    values: &[Scalar],
) -> Result<Tensor, TensorError> {
    let expected = checked_len(shape, dt.size()).ok_or_else(|| TensorError::ShapeOverflow {
        field: origin.shape_field(),
        name: name.to_string(),
        shape: shape.iter().map(|&d| d as u64).collect(),
    })?;
    if expected != values.len() {
        return Err(TensorError::CountMismatch {
            field: origin.shape_field(),
            name: name.to_string(),
            // Every dimension fits isize once checked_len has passed.
            shape: shape.iter().map(|&d| d as i64).collect(),
            expected,
            got: values.len(),
        });
    }
    let dn = dt.oip_name();
    let t = match dt {
        DataType::Bool => Tensor::from_shape(
            shape,
            &convert(origin, name, values, dn, |s| match s {
                Scalar::Bool(b) => Ok(b),
                _ => Err(Unfit::Kind),
            })?,
        ),
        DataType::Uint8 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<u8>)?)
        }
        DataType::Uint16 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<u16>)?)
        }
        DataType::Uint32 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<u32>)?)
        }
        DataType::Uint64 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<u64>)?)
        }
        DataType::Int8 => Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<i8>)?),
        DataType::Int16 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<i16>)?)
        }
        DataType::Int32 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<i32>)?)
        }
        DataType::Int64 => {
            Tensor::from_shape(shape, &convert(origin, name, values, dn, int::<i64>)?)
        }
        DataType::Fp16 => Tensor::from_shape(shape, &convert(origin, name, values, dn, fp16)?),
        DataType::Fp32 => Tensor::from_shape(shape, &convert(origin, name, values, dn, fp32)?),
        DataType::Fp64 => Tensor::from_shape(shape, &convert(origin, name, values, dn, float)?),
    };
    t.map_err(|e| TensorError::Internal {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// The datatype `inputs[index]` declares, or the 400 naming it.
pub fn request_datatype(index: usize, input: &RequestInput) -> Result<DataType, TensorError> {
    DataType::from_oip(&input.datatype).ok_or_else(|| TensorError::UnknownDatatype {
        field: Origin::Input(index).datatype_field(),
        name: input.name.clone(),
        datatype: input.datatype.clone(),
        supported: SUPPORTED,
    })
}

/// The shape `inputs[index]` declares, checked: no negative dimension, and a tensor of that
/// shape and datatype could exist ([`checked_len`]). Done before the shape is compared with
/// the model's or multiplied anywhere.
pub fn request_shape(
    index: usize,
    input: &RequestInput,
    dt: DataType,
) -> Result<Vec<usize>, TensorError> {
    let field = Origin::Input(index).shape_field();
    let shape = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d).ok())
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| TensorError::NegativeDim {
            field: field.clone(),
            name: input.name.clone(),
            shape: input.shape.clone(),
        })?;
    if checked_len(&shape, dt.size()).is_none() {
        return Err(TensorError::ShapeOverflow {
            field,
            name: input.name.clone(),
            shape: input.shape.iter().map(|&d| d as u64).collect(),
        });
    }
    Ok(shape)
}

/// Builds the tensor of `inputs[index]` from what the request alone says (its datatype,
/// shape and data), without a model: what the server does once the model has accepted the
/// datatype and shape, and what the `oip` fuzz target drives.
pub fn request_tensor(index: usize, input: &RequestInput) -> Result<Tensor, TensorError> {
    let dt = request_datatype(index, input)?;
    let shape = request_shape(index, input, dt)?;
    let origin = Origin::Input(index);
    if let Some(what) = &input.data.non_scalar {
        return Err(TensorError::NonScalar {
            field: origin.data_field(),
            name: input.name.clone(),
            what: what.clone(),
        });
    }
    tensor_from_scalars(origin, &input.name, dt, &shape, &input.data.values)
}

/// Parses an Open Inference Protocol request body (`POST /v2/models/{name}/infer`).
pub fn parse_infer_request(body: &[u8]) -> Result<InferRequest, serde_json::Error> {
    serde_json::from_slice(body)
}

/// A `{"data": ...}` body (`/score`); other fields are ignored.
#[derive(Debug, Deserialize)]
pub struct ScoreRequest {
    pub data: FlatData,
}

/// Parses a `/score` request body.
pub fn parse_score_request(body: &[u8]) -> Result<ScoreRequest, serde_json::Error> {
    serde_json::from_slice(body)
}

/// Builds the tensor of a `{"data": ...}` request for input `name` of type `dt`: the nesting
/// gives the shape.
pub fn data_tensor(name: &str, dt: DataType, data: &FlatData) -> Result<Tensor, TensorError> {
    if let Some(what) = &data.non_scalar {
        return Err(TensorError::NonScalar {
            field: Origin::Data.data_field(),
            name: name.to_string(),
            what: what.clone(),
        });
    }
    let shape = data.shape.as_ref().ok_or_else(|| TensorError::Ragged {
        field: Origin::Data.data_field(),
        name: name.to_string(),
    })?;
    tensor_from_scalars(Origin::Data, name, dt, shape, &data.values)
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
        let e = tensor_from_scalars(Origin::File, "x", DataType::Uint8, &[2], &v).unwrap_err();
        assert!(
            e.to_string()
                .contains("element 1 (300) is outside the range of UINT8"),
            "{e}"
        );
        let v = flat("[true, 1]").values;
        assert!(tensor_from_scalars(Origin::File, "x", DataType::Bool, &[2], &v).is_err());
        assert!(
            tensor_from_scalars(
                Origin::File,
                "x",
                DataType::Fp32,
                &[2],
                &flat("[true, 1]").values
            )
            .is_err()
        );
        let e = tensor_from_scalars(
            Origin::File,
            "x",
            DataType::Fp32,
            &[3],
            &flat("[1, 2]").values,
        )
        .unwrap_err();
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
    fn overflowing_shapes_are_refused_with_the_field_path() {
        assert_eq!(checked_len(&[2, 3], 4), Some(6));
        assert_eq!(checked_len(&[], 4), Some(1));
        assert_eq!(checked_len(&[0, 5], 4), Some(0));
        let big = 1usize << 62;
        assert_eq!(checked_len(&[big, big], 1), None);
        // Empty, but its strides would still overflow inside tract.
        assert_eq!(checked_len(&[0, big, big], 1), None);
        // Fits as a count, not as bytes.
        assert_eq!(checked_len(&[1 << 61], 8), None);
        let e = tensor_from_scalars(Origin::Input(0), "x", DataType::Fp32, &[big, big], &[])
            .unwrap_err();
        assert!(matches!(e, TensorError::ShapeOverflow { .. }), "{e}");
        assert!(e.to_string().starts_with("inputs[0].shape: "), "{e}");

        let req: InferRequest = parse_infer_request(
            br#"{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]},
                {"name": "b", "shape": [4611686018427387904, 4611686018427387904],
                 "datatype": "FP32", "data": [1]}]}"#,
        )
        .unwrap();
        assert!(request_tensor(0, &req.inputs[0]).is_ok());
        let e = request_tensor(1, &req.inputs[1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "inputs[1].shape: input 'b': shape [4611686018427387904, 4611686018427387904] has more elements than this server can hold"
        );
    }

    #[test]
    fn values_outside_the_datatype_range_are_refused() {
        let cases: [(DataType, &str, &str); 9] = [
            (
                DataType::Fp32,
                "[1, 1e39]",
                "inputs[2].data[1]: input 'x': element 1 (1e39) is outside the range of FP32",
            ),
            (DataType::Fp32, "[-3.5e38]", "data[0]"),
            (DataType::Fp16, "[65504, 70000]", "inputs[2].data[1]"),
            (
                DataType::Int8,
                "[300]",
                "(300) is outside the range of INT8",
            ),
            (DataType::Int8, "[-129]", "outside the range of INT8"),
            (DataType::Uint8, "[-1]", "outside the range of UINT8"),
            (DataType::Uint64, "[-1]", "outside the range of UINT64"),
            (
                DataType::Int64,
                "[18446744073709551615]",
                "outside the range of INT64",
            ),
            (DataType::Int16, "[40000.0]", "outside the range of INT16"),
        ];
        for (dt, json, needle) in cases {
            let v = flat(json).values;
            let origin = if needle.starts_with("data") {
                Origin::Data
            } else {
                Origin::Input(2)
            };
            let e = tensor_from_scalars(origin, "x", dt, &[v.len()], &v).unwrap_err();
            assert!(
                matches!(e, TensorError::OutOfRange { .. }),
                "{dt} {json}: {e}"
            );
            assert!(
                e.to_string().contains(needle),
                "{dt} {json}: '{e}' lacks '{needle}'"
            );
        }
        // The edges themselves fit.
        let v = flat("[3.4028234663852886e38, -128, 127]").values;
        assert!(tensor_from_scalars(Origin::File, "x", DataType::Fp32, &[3], &v).is_ok());
        assert!(tensor_from_scalars(Origin::File, "x", DataType::Int8, &[2], &v[1..]).is_ok());
        assert!(
            tensor_from_scalars(
                Origin::File,
                "x",
                DataType::Fp16,
                &[1],
                &flat("[65504]").values
            )
            .is_ok()
        );
        // A non-finite value can only come from outside JSON; refused all the same.
        let e = tensor_from_scalars(
            Origin::File,
            "x",
            DataType::Fp64,
            &[1],
            &[Scalar::Float(f64::NAN)],
        )
        .unwrap_err();
        assert!(matches!(e, TensorError::OutOfRange { .. }), "{e}");
        // JSON itself cannot say NaN, Infinity or 1e400: those are invalid JSON (a 400 too).
        for body in ["[NaN]", "[Infinity]", "[1e400]", "[-1e400]"] {
            assert!(serde_json::from_str::<FlatData>(body).is_err(), "{body}");
        }
    }

    #[test]
    fn data_requests_name_the_data_field() {
        let d = parse_score_request(br#"{"data": [[1, 2], [3]]}"#)
            .unwrap()
            .data;
        let e = data_tensor("x", DataType::Fp32, &d).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("data: input 'x': nested data is ragged"),
            "{e}"
        );
        let d = parse_score_request(br#"{"data": [[1, "a"]]}"#)
            .unwrap()
            .data;
        let e = data_tensor("x", DataType::Fp32, &d).unwrap_err();
        assert!(e.to_string().contains("data holds string"), "{e}");
        let d = parse_score_request(br#"{"data": [[1, 2]]}"#).unwrap().data;
        assert_eq!(
            data_tensor("x", DataType::Int32, &d).unwrap().shape(),
            &[1, 2]
        );
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
