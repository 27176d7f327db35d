//! The request side of the JSON forms: OIP inference requests and `{"data": ...}` bodies, their
//! tensor data flattened in row-major order while it is parsed, each number kept in the
//! widest form that loses nothing ([`Scalar`]).

use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

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
    /// Absent when the values come as binary data (`parameters.binary_data_size`).
    #[serde(default)]
    pub data: Option<FlatData>,
    /// The raw bytes of the binary tensor data extension, attached after parsing.
    #[serde(skip)]
    pub raw: Option<bytes::Bytes>,
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

/// Parses an Open Inference Protocol request body (`POST /v2/models/{name}/infer`).
pub fn parse_infer_request(body: &[u8]) -> Result<InferRequest, serde_json::Error> {
    serde_json::from_slice(body)
}

/// A `/score` body: `{"data": ...}`, or Azure ML's `{"input_data": ...}` where `input_data` is
/// the tensor itself, a pandas split frame (`{"columns", "index", "data"}`: its `data`), or
/// `{"<input name>": tensor}`. Other fields are ignored.
#[derive(Debug)]
pub struct ScoreRequest {
    pub data: FlatData,
    /// The input the `{"<input name>": tensor}` form names, to check against the model's.
    pub input: Option<String>,
    /// Which form it came in: Azure ML's answers with the bare result, not `{"result": ...}`.
    pub azure_ml: bool,
}

#[derive(Deserialize)]
struct ScoreBody {
    #[serde(default)]
    data: Option<FlatData>,
    #[serde(default)]
    input_data: Option<serde_json::Value>,
}

fn score_error(message: &str) -> serde_json::Error {
    <serde_json::Error as serde::de::Error>::custom(message)
}

/// Parses a `/score` request body.
pub fn parse_score_request(body: &[u8]) -> Result<ScoreRequest, serde_json::Error> {
    let body: ScoreBody = serde_json::from_slice(body)?;
    let (value, input) = match (body.data, body.input_data) {
        (Some(data), None) => {
            return Ok(ScoreRequest {
                data,
                input: None,
                azure_ml: false,
            });
        }
        (None, Some(serde_json::Value::Object(mut fields))) => match fields.remove("data") {
            Some(data) => (data, None),
            None => {
                let single = fields.len() == 1;
                match fields.into_iter().next() {
                    Some((name, data)) if single => (data, Some(name)),
                    _ => {
                        return Err(score_error(
                            "input_data: expected a tensor, {\"data\": tensor} or {\"<input name>\": tensor}",
                        ));
                    }
                }
            }
        },
        (None, Some(value)) => (value, None),
        (Some(_), Some(_)) => {
            return Err(score_error("give either 'data' or 'input_data', not both"));
        }
        (None, None) => {
            return Err(score_error(
                "expected 'data' ({\"data\": [[...]]}) or Azure ML's 'input_data'",
            ));
        }
    };
    Ok(ScoreRequest {
        data: FlatData::deserialize(value)?,
        input,
        azure_ml: true,
    })
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
    fn azure_ml_input_data_forms_are_read() {
        let plain = parse_score_request(br#"{"input_data": [[1, 2]]}"#).unwrap();
        assert_eq!(
            (plain.data.shape, plain.input, plain.azure_ml),
            (Some(vec![1, 2]), None, true)
        );
        let split = parse_score_request(
            br#"{"input_data": {"columns": [0, 1], "index": [0], "data": [[1, 2]]}}"#,
        )
        .unwrap();
        assert_eq!(split.data.values.len(), 2);
        let named = parse_score_request(br#"{"input_data": {"sensor": [[1, 2, 3]]}}"#).unwrap();
        assert_eq!(named.input.as_deref(), Some("sensor"));
        assert_eq!(named.data.shape, Some(vec![1, 3]));
        let old = parse_score_request(br#"{"data": [3]}"#).unwrap();
        assert!(!old.azure_ml);
        for bad in [
            r#"{}"#,
            r#"{"data": [1], "input_data": [1]}"#,
            r#"{"input_data": {"a": [1], "b": [2]}}"#,
        ] {
            assert!(parse_score_request(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn ragged_and_non_numeric_data_are_noticed() {
        assert_eq!(flat("[[1, 2], [3]]").shape, None);
        assert_eq!(flat("[[1, 2], 3]").shape, None);
        assert!(flat(r#"[1, "x"]"#).non_scalar.is_some());
        assert!(flat("[1, null]").non_scalar.is_some());
    }
}
