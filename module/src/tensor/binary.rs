//! The binary tensor data extension of the Open Inference Protocol (KServe v2, Triton): a
//! request or response body is a JSON header followed by raw tensor bytes, the
//! `Inference-Header-Content-Length` header saying where the JSON ends. An input sends
//! `parameters.binary_data_size` instead of `data`; an output is sent raw when the request asks
//! (`parameters.binary_data_output` for all, `outputs[i].parameters.binary_data` for one) and
//! then carries `parameters.binary_data_size`. Raw bytes are row-major, little-endian, BOOL one
//! byte per element — what `tritonclient`'s `set_data_from_numpy` sends by default.

use bytes::Bytes;
use tract_onnx::prelude::{Tensor, f16};

use super::{DataType, InferRequest, OutputData, TensorError};

/// The HTTP header that says how long the JSON part of a body is.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// Splits a body into its JSON header and its binary part, given the value of
/// [`HEADER_LENGTH`].
pub fn split(body: &Bytes, header_length: &str) -> Result<(Bytes, Bytes), TensorError> {
    let bad = |why: String| TensorError::Binary {
        field: "Inference-Header-Content-Length".into(),
        reason: why,
    };
    let n: usize = header_length
        .trim()
        .parse()
        .map_err(|_| bad(format!("'{header_length}' is not a byte count")))?;
    if n > body.len() {
        return Err(bad(format!(
            "{n} is longer than the body ({} bytes)",
            body.len()
        )));
    }
    Ok((body.slice(..n), body.slice(n..)))
}

/// `parameters.binary_data_size` of an input, if it declares one.
fn binary_size(
    index: usize,
    parameters: &Option<serde_json::Value>,
) -> Result<Option<usize>, TensorError> {
    let Some(v) = parameters.as_ref().and_then(|p| p.get("binary_data_size")) else {
        return Ok(None);
    };
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| TensorError::Binary {
            field: format!("inputs[{index}].parameters.binary_data_size"),
            reason: format!("{v} is not a byte count"),
        })
}

/// Hands each input that declares `parameters.binary_data_size` its bytes, in input order;
/// the sizes must add up to the binary part exactly.
pub fn attach(request: &mut InferRequest, mut binary: Bytes) -> Result<(), TensorError> {
    for (index, input) in request.inputs.iter_mut().enumerate() {
        let Some(size) = binary_size(index, &input.parameters)? else {
            continue;
        };
        if input.data.is_some() {
            return Err(TensorError::Binary {
                field: format!("inputs[{index}]"),
                reason: format!(
                    "input '{}' has both 'data' and parameters.binary_data_size",
                    input.name
                ),
            });
        }
        if size > binary.len() {
            return Err(TensorError::Binary {
                field: format!("inputs[{index}].parameters.binary_data_size"),
                reason: format!(
                    "input '{}' declares {size} bytes but only {} remain after the JSON header",
                    input.name,
                    binary.len()
                ),
            });
        }
        input.raw = Some(binary.split_to(size));
    }
    if !binary.is_empty() {
        return Err(TensorError::Binary {
            field: "Inference-Header-Content-Length".into(),
            reason: format!(
                "{} bytes after the JSON header belong to no input (the inputs' binary_data_size do not add up to the body)",
                binary.len()
            ),
        });
    }
    Ok(())
}

/// Rejects a binary size declared on a body that has no binary part (a JSON-only request).
pub fn refuse_binary_without_header(request: &InferRequest) -> Result<(), TensorError> {
    for (index, input) in request.inputs.iter().enumerate() {
        if binary_size(index, &input.parameters)?.is_some() {
            return Err(TensorError::Binary {
                field: format!("inputs[{index}].parameters.binary_data_size"),
                reason: "binary data needs the Inference-Header-Content-Length header".into(),
            });
        }
    }
    Ok(())
}

/// Decodes the raw bytes of input `name` into a tensor of `dt` and `shape`: the byte count
/// must be exactly what the shape needs, and BOOL bytes must be 0 or 1.
pub fn raw_tensor(
    field: String,
    name: &str,
    dt: DataType,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Tensor, TensorError> {
    let expected = super::convert::elements(field.clone(), name, dt, shape)? * dt.size();
    if bytes.len() != expected {
        return Err(TensorError::Binary {
            field,
            reason: format!(
                "input '{name}': {} bytes of binary data, but shape {shape:?} of {dt} needs {expected}",
                bytes.len()
            ),
        });
    }
    macro_rules! le {
        ($t:ty) => {{
            let v: Vec<$t> = bytes
                .chunks_exact(std::mem::size_of::<$t>())
                // chunks_exact yields slices of exactly the array's length.
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                .collect();
            Tensor::from_shape(shape, &v)
        }};
    }
    let t = match dt {
        DataType::Bool => {
            if let Some(index) = bytes.iter().position(|&b| b > 1) {
                return Err(TensorError::BadValue {
                    field,
                    name: name.to_string(),
                    index,
                    value: bytes[index].to_string(),
                    datatype: dt.oip_name(),
                });
            }
            let v: Vec<bool> = bytes.iter().map(|&b| b == 1).collect();
            Tensor::from_shape(shape, &v)
        }
        DataType::Uint8 => Tensor::from_shape(shape, bytes),
        DataType::Uint16 => le!(u16),
        DataType::Uint32 => le!(u32),
        DataType::Uint64 => le!(u64),
        DataType::Int8 => {
            let v: Vec<i8> = bytes.iter().map(|&b| b as i8).collect();
            Tensor::from_shape(shape, &v)
        }
        DataType::Int16 => le!(i16),
        DataType::Int32 => le!(i32),
        DataType::Int64 => le!(i64),
        DataType::Fp16 => {
            let v: Vec<f16> = bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            Tensor::from_shape(shape, &v)
        }
        DataType::Fp32 => le!(f32),
        DataType::Fp64 => le!(f64),
    };
    t.map_err(|e| TensorError::Internal {
        name: name.to_string(),
        reason: e.to_string(),
    })
}

/// The raw little-endian bytes of an output in its datatype. The values came from a tensor of
/// `dt`, so narrowing them back loses nothing.
pub fn output_bytes(dt: DataType, data: &OutputData) -> Vec<u8> {
    macro_rules! le {
        ($v:expr, $t:ty) => {
            $v.iter().flat_map(|&x| (x as $t).to_le_bytes()).collect()
        };
    }
    match (dt, data) {
        (_, OutputData::Bool(v)) => v.iter().map(|&b| b as u8).collect(),
        (DataType::Uint8, OutputData::UInt(v)) => le!(v, u8),
        (DataType::Uint16, OutputData::UInt(v)) => le!(v, u16),
        (DataType::Uint32, OutputData::UInt(v)) => le!(v, u32),
        (_, OutputData::UInt(v)) => le!(v, u64),
        (DataType::Int8, OutputData::Int(v)) => le!(v, i8),
        (DataType::Int16, OutputData::Int(v)) => le!(v, i16),
        (DataType::Int32, OutputData::Int(v)) => le!(v, i32),
        (_, OutputData::Int(v)) => le!(v, i64),
        (DataType::Fp16, OutputData::F32(v)) => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        (_, OutputData::F32(v)) => le!(v, f32),
        (_, OutputData::F64(v)) => le!(v, f64),
    }
}

/// Which outputs go back raw: `binary_data` of the output when given, else the request's
/// `binary_data_output` (false by default, as in the protocol). Taken from the request before
/// it is run.
#[derive(Debug, Clone, Default)]
pub struct BinaryOutputs {
    all: bool,
    per_output: Vec<(String, bool)>,
}

impl BinaryOutputs {
    pub fn of(request: &InferRequest) -> BinaryOutputs {
        let flag = |p: &Option<serde_json::Value>, key: &str| {
            p.as_ref()
                .and_then(|p| p.get(key))
                .and_then(serde_json::Value::as_bool)
        };
        BinaryOutputs {
            all: flag(&request.parameters, "binary_data_output").unwrap_or(false),
            per_output: request
                .outputs
                .iter()
                .flatten()
                .filter_map(|o| Some((o.name.clone(), flag(&o.parameters, "binary_data")?)))
                .collect(),
        }
    }

    pub fn wants(&self, output: &str) -> bool {
        self.per_output
            .iter()
            .find(|(name, _)| name == output)
            .map_or(self.all, |(_, binary)| *binary)
    }

    pub fn any(&self) -> bool {
        self.all || self.per_output.iter().any(|(_, b)| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{SUPPORTED, output_data, parse_infer_request};

    fn request(json: &str) -> InferRequest {
        parse_infer_request(json.as_bytes()).unwrap()
    }

    #[test]
    fn every_datatype_round_trips_through_raw_bytes() {
        for name in SUPPORTED.split(", ") {
            let dt = DataType::from_oip(name).unwrap();
            let bytes: Vec<u8> = (0..3 * dt.size())
                .map(|i| {
                    if dt == DataType::Bool {
                        (i % 2) as u8
                    } else {
                        i as u8
                    }
                })
                .collect();
            let t = raw_tensor("x".into(), "x", dt, &[3], &bytes).unwrap();
            assert_eq!(t.shape(), &[3]);
            let (back_dt, data) = output_data("x", &t).unwrap();
            assert_eq!(back_dt, dt);
            assert_eq!(output_bytes(dt, &data), bytes, "{name}");
        }
    }

    #[test]
    fn wrong_sizes_and_bools_are_named() {
        let e = raw_tensor("inputs[0]".into(), "x", DataType::Fp32, &[2], &[0; 7]).unwrap_err();
        assert!(
            e.to_string()
                .contains("7 bytes of binary data, but shape [2] of FP32 needs 8"),
            "{e}"
        );
        let e = raw_tensor("inputs[0]".into(), "x", DataType::Bool, &[2], &[1, 2]).unwrap_err();
        assert!(
            e.to_string().contains("element 1 (2) is not a valid BOOL"),
            "{e}"
        );
    }

    #[test]
    fn binary_parts_go_to_their_inputs_in_order() {
        let mut r = request(
            r#"{"inputs": [
                {"name": "a", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}},
                {"name": "b", "shape": [1], "datatype": "INT32", "data": [7]},
                {"name": "c", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}}
            ]}"#,
        );
        attach(&mut r, Bytes::from_static(&[1, 2, 3])).unwrap();
        assert_eq!(r.inputs[0].raw.as_deref(), Some(&[1u8][..]));
        assert!(r.inputs[1].raw.is_none());
        assert_eq!(r.inputs[2].raw.as_deref(), Some(&[2u8, 3][..]));

        let mut short = request(
            r#"{"inputs": [{"name": "a", "shape": [4], "datatype": "UINT8", "parameters": {"binary_data_size": 4}}]}"#,
        );
        let e = attach(&mut short, Bytes::from_static(&[1, 2])).unwrap_err();
        assert!(
            e.to_string().contains("declares 4 bytes but only 2 remain"),
            "{e}"
        );
        let mut extra = request(
            r#"{"inputs": [{"name": "a", "shape": [1], "datatype": "UINT8", "parameters": {"binary_data_size": 1}}]}"#,
        );
        let e = attach(&mut extra, Bytes::from_static(&[1, 2])).unwrap_err();
        assert!(
            e.to_string()
                .contains("1 bytes after the JSON header belong to no input"),
            "{e}"
        );
        assert!(refuse_binary_without_header(&extra).is_err());
    }

    #[test]
    fn the_header_length_must_fit_the_body() {
        let body = Bytes::from_static(b"{}\x01\x02");
        let (json, raw) = split(&body, "2").unwrap();
        assert_eq!((&json[..], &raw[..]), (&b"{}"[..], &[1u8, 2][..]));
        assert!(split(&body, "5").is_err());
        assert!(split(&body, "-1").is_err());
    }

    #[test]
    fn outputs_are_binary_when_asked() {
        let all = request(
            r#"{"inputs": [], "parameters": {"binary_data_output": true},
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": false}}]}"#,
        );
        assert!(BinaryOutputs::of(&all).wants("a"));
        assert!(!BinaryOutputs::of(&all).wants("b"));
        let one = request(
            r#"{"inputs": [], "outputs": [{"name": "a", "parameters": {"binary_data": true}}]}"#,
        );
        assert!(BinaryOutputs::of(&one).wants("a"));
        assert!(!BinaryOutputs::of(&request(r#"{"inputs": []}"#)).any());
    }
}
