//! From checked JSON values to tract tensors: the datatype and shape a request declares, and
//! every value checked to fit its datatype (no wrapping, saturating or turning into infinity).

use tract_onnx::prelude::{Tensor, f16};

use super::{
    DataType, FlatData, Origin, RequestInput, SUPPORTED, Scalar, TensorError, checked_len,
};

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
    let expected = elements(origin.shape_field(), name, dt, shape)?;
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

/// The element count of a tensor of `dt` and `shape`, or the 400 (naming `field`) for a shape
/// whose bytes would not fit in memory ([`checked_len`]).
pub(super) fn elements(
    field: String,
    name: &str,
    dt: DataType,
    shape: &[usize],
) -> Result<usize, TensorError> {
    checked_len(shape, dt.size()).ok_or_else(|| TensorError::ShapeOverflow {
        field,
        name: name.to_string(),
        shape: shape.iter().map(|&d| d as u64).collect(),
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
    if let Some(raw) = &input.raw {
        return super::binary::raw_tensor(
            format!("inputs[{index}].parameters.binary_data_size"),
            &input.name,
            dt,
            &shape,
            raw,
        );
    }
    let Some(data) = &input.data else {
        return Err(TensorError::MissingData {
            field: origin.data_field(),
            name: input.name.clone(),
        });
    };
    if let Some(what) = &data.non_scalar {
        return Err(TensorError::NonScalar {
            field: origin.data_field(),
            name: input.name.clone(),
            what: what.clone(),
        });
    }
    tensor_from_scalars(origin, &input.name, dt, &shape, &data.values)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{InferRequest, parse_infer_request, parse_score_request};

    fn flat(json: &str) -> FlatData {
        serde_json::from_str(json).unwrap()
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
}
