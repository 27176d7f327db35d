//! The NumPy `.npy` file format, read and written without a crate.
//!
//! Owns parsing a `.npy` header (versions 1–3, little-endian or byte-sized types, C order) and
//! turning the payload into a tract [`Tensor`], and writing a tensor back. It is what batch
//! mode reads and writes, and what the tests compare against onnxruntime's references.

use tract_onnx::prelude::{Tensor, f16};

use crate::tensor::{DataType, OutputData, checked_len, output_data};

const MAGIC: &[u8] = b"\x93NUMPY";
/// A header larger than this is not a NumPy header (NumPy itself caps it near 64 KiB).
const MAX_HEADER: usize = 1 << 16;

/// Why a `.npy` payload could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("not a .npy file (bad magic)")]
    Magic,
    #[error("truncated .npy file")]
    Truncated,
    #[error(".npy header: {0}")]
    Header(String),
    #[error(".npy dtype '{0}' is not supported (little-endian bool, ints, uints, f2, f4, f8)")]
    Dtype(String),
    #[error("Fortran-order .npy arrays are not supported")]
    FortranOrder,
    #[error(".npy payload is {got} bytes but shape {shape:?} of {dtype} needs {expected}")]
    Size {
        shape: Vec<usize>,
        dtype: DataType,
        expected: usize,
        got: usize,
    },
    /// The header's shape multiplies out beyond what can be addressed: refused before the
    /// product is used (a crafted header must not panic or wrap).
    #[error(".npy header: shape {shape:?} of {dtype} has more elements than this server can hold")]
    ShapeOverflow { shape: Vec<usize>, dtype: DataType },
    #[error(".npy bool element {0} is neither 0 nor 1")]
    BadBool(usize),
    #[error("tensor: {0}")]
    Tensor(String),
}

fn dtype_of(descr: &str) -> Option<DataType> {
    Some(match descr {
        "|b1" => DataType::Bool,
        "|u1" | "<u1" => DataType::Uint8,
        "|i1" | "<i1" => DataType::Int8,
        "<u2" => DataType::Uint16,
        "<i2" => DataType::Int16,
        "<u4" => DataType::Uint32,
        "<i4" => DataType::Int32,
        "<u8" => DataType::Uint64,
        "<i8" => DataType::Int64,
        "<f2" => DataType::Fp16,
        "<f4" => DataType::Fp32,
        "<f8" => DataType::Fp64,
        _ => return None,
    })
}

fn descr_of(dt: DataType) -> &'static str {
    match dt {
        DataType::Bool => "|b1",
        DataType::Uint8 => "|u1",
        DataType::Int8 => "|i1",
        DataType::Uint16 => "<u2",
        DataType::Int16 => "<i2",
        DataType::Uint32 => "<u4",
        DataType::Int32 => "<i4",
        DataType::Uint64 => "<u8",
        DataType::Int64 => "<i8",
        DataType::Fp16 => "<f2",
        DataType::Fp32 => "<f4",
        DataType::Fp64 => "<f8",
    }
}

/// The value of `'key': ` in a NumPy header dict, up to the next top-level comma or brace.
fn field<'a>(header: &'a str, key: &str) -> Result<&'a str, NpyError> {
    let pat = format!("'{key}':");
    let start = header
        .find(&pat)
        .ok_or_else(|| NpyError::Header(format!("no '{key}'")))?
        + pat.len();
    let rest = header[start..].trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')').map(|i| i + 1)
    } else {
        rest.find([',', '}'])
    }
    .ok_or_else(|| NpyError::Header(format!("unterminated '{key}'")))?;
    Ok(rest[..end].trim())
}

/// Parses a `.npy` file into a tensor.
///
/// Fails on anything that is not a C-ordered array of a supported little-endian type, and on
/// payloads whose size does not match the header's shape.
pub fn read(bytes: &[u8]) -> Result<Tensor, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(NpyError::Magic);
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or(NpyError::Truncated)?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(NpyError::Header(format!("unknown version {v}"))),
    };
    if header_len > MAX_HEADER {
        return Err(NpyError::Header(format!("header of {header_len} bytes")));
    }
    let header = bytes
        .get(start..start + header_len)
        .ok_or(NpyError::Truncated)?;
    let header = std::str::from_utf8(header).map_err(|_| NpyError::Header("not UTF-8".into()))?;
    let descr = field(header, "descr")?.trim_matches(|c| c == '\'' || c == '"');
    let dt = dtype_of(descr).ok_or_else(|| NpyError::Dtype(descr.to_string()))?;
    if field(header, "fortran_order")? != "False" {
        return Err(NpyError::FortranOrder);
    }
    let shape_src = field(header, "shape")?;
    let shape = shape_src
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| NpyError::Header(format!("bad shape {shape_src}")))?;
    let data = &bytes[start + header_len..];
    let Some(count) = checked_len(&shape, dt.size()) else {
        return Err(NpyError::ShapeOverflow { shape, dtype: dt });
    };
    // Cannot overflow: checked_len bounds count × size by isize::MAX.
    let expected = count * dt.size();
    if data.len() != expected {
        return Err(NpyError::Size {
            shape,
            dtype: dt,
            expected,
            got: data.len(),
        });
    }
    from_le_bytes(dt, &shape, data)
}

fn from_le_bytes(dt: DataType, shape: &[usize], data: &[u8]) -> Result<Tensor, NpyError> {
    macro_rules! decode {
        ($t:ty, $n:expr) => {{
            let v: Vec<$t> = data
                .chunks_exact($n)
                .map(|c| {
                    let mut b = [0u8; $n];
                    b.copy_from_slice(c);
                    <$t>::from_le_bytes(b)
                })
                .collect();
            Tensor::from_shape(shape, &v)
        }};
    }
    let t = match dt {
        DataType::Bool => {
            let v = data
                .iter()
                .enumerate()
                .map(|(i, &b)| match b {
                    0 => Ok(false),
                    1 => Ok(true),
                    _ => Err(NpyError::BadBool(i)),
                })
                .collect::<Result<Vec<bool>, _>>()?;
            Tensor::from_shape(shape, &v)
        }
        DataType::Uint8 => Tensor::from_shape(shape, data),
        DataType::Int8 => decode!(i8, 1),
        DataType::Uint16 => decode!(u16, 2),
        DataType::Int16 => decode!(i16, 2),
        DataType::Uint32 => decode!(u32, 4),
        DataType::Int32 => decode!(i32, 4),
        DataType::Uint64 => decode!(u64, 8),
        DataType::Int64 => decode!(i64, 8),
        DataType::Fp16 => {
            let v: Vec<f16> = data
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            Tensor::from_shape(shape, &v)
        }
        DataType::Fp32 => decode!(f32, 4),
        DataType::Fp64 => decode!(f64, 8),
    };
    t.map_err(|e| NpyError::Tensor(e.to_string()))
}

/// Writes a tensor as a version 1.0 `.npy` file.
pub fn write(t: &Tensor) -> Result<Vec<u8>, NpyError> {
    let dt = DataType::from_datum(t.datum_type())
        .ok_or_else(|| NpyError::Dtype(format!("{:?}", t.datum_type())))?;
    let shape = t.shape();
    let shape_txt = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_txt}, }}",
        descr_of(dt)
    );
    // Pad so that the data starts on a 64-byte boundary, as NumPy does; end with '\n'.
    let total = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out =
        Vec::with_capacity((10 + header.len()).saturating_add(t.len().saturating_mul(dt.size())));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    let hlen = u16::try_from(header.len()).map_err(|_| NpyError::Header("too long".into()))?;
    out.extend_from_slice(&hlen.to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    if dt == DataType::Fp16 {
        let view = t
            .try_as_plain_ram()
            .map_err(|e| NpyError::Tensor(e.to_string()))?;
        let s = view
            .as_slice::<f16>()
            .map_err(|e| NpyError::Tensor(e.to_string()))?;
        s.iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        return Ok(out);
    }
    let (_, data) = output_data("npy", t).map_err(|e| NpyError::Tensor(e.to_string()))?;
    // Re-narrow the widened JSON forms to the tensor's own width.
    match (dt, data) {
        (_, OutputData::Bool(v)) => out.extend(v.iter().map(|&b| b as u8)),
        (DataType::Uint8, OutputData::UInt(v)) => out.extend(v.iter().map(|&x| x as u8)),
        (DataType::Uint16, OutputData::UInt(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&(x as u16).to_le_bytes())),
        (DataType::Uint32, OutputData::UInt(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&(x as u32).to_le_bytes())),
        (_, OutputData::UInt(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
        (DataType::Int8, OutputData::Int(v)) => out.extend(v.iter().map(|&x| x as i8 as u8)),
        (DataType::Int16, OutputData::Int(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&(x as i16).to_le_bytes())),
        (DataType::Int32, OutputData::Int(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&(x as i32).to_le_bytes())),
        (_, OutputData::Int(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
        (_, OutputData::F32(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
        (_, OutputData::F64(v)) => v
            .iter()
            .for_each(|&x| out.extend_from_slice(&x.to_le_bytes())),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Scalar, tensor_from_scalars};

    #[test]
    fn every_datatype_round_trips() {
        for name in crate::tensor::SUPPORTED.split(", ") {
            let dt = DataType::from_oip(name).unwrap();
            let vals = if dt == DataType::Bool {
                vec![Scalar::Bool(true), Scalar::Bool(false), Scalar::Bool(true)]
            } else {
                vec![Scalar::Int(1), Scalar::Int(2), Scalar::Int(3)]
            };
            let t =
                tensor_from_scalars(crate::tensor::Origin::File, "x", dt, &[3, 1], &vals).unwrap();
            let bytes = write(&t).unwrap();
            assert_eq!(
                (10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64,
                0
            );
            let back = read(&bytes).unwrap();
            assert_eq!(back, t, "{name}");
        }
    }

    /// A header in NumPy's own layout, with any shape text.
    fn with_shape(descr: &str, shape: &str, payload: &[u8]) -> Vec<u8> {
        let header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn overflowing_header_shapes_are_errors_not_panics() {
        let big = 1u64 << 62;
        for (descr, shape) in [
            ("<f4", format!("({big}, {big})")),
            ("<f4", format!("(0, {big}, {big})")),
            ("<f8", format!("({},)", 1u64 << 61)),
            ("|u1", format!("({}, 2)", u64::MAX)),
        ] {
            let e = read(&with_shape(descr, &shape, &[0; 16])).unwrap_err();
            assert!(matches!(e, NpyError::ShapeOverflow { .. }), "{shape}: {e}");
            assert!(
                e.to_string()
                    .contains("more elements than this server can hold"),
                "{e}"
            );
        }
        // A dimension beyond usize does not parse at all.
        assert!(matches!(
            read(&with_shape("<f4", "(18446744073709551616,)", &[])),
            Err(NpyError::Header(_))
        ));
        // Large but addressable: the size check refuses it, nothing is allocated.
        assert!(matches!(
            read(&with_shape("<f4", "(1048576, 1048576)", &[0; 8])),
            Err(NpyError::Size { .. })
        ));
        assert_eq!(
            read(&with_shape("<f4", "(2,)", &[0; 8])).unwrap().shape(),
            &[2]
        );
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        assert!(matches!(read(b"hello"), Err(NpyError::Magic)));
        let t = Tensor::from_shape(&[2], &[1.0f32, 2.0]).unwrap();
        let bytes = write(&t).unwrap();
        assert!(matches!(
            read(&bytes[..bytes.len() - 1]),
            Err(NpyError::Size { .. })
        ));
        assert!(matches!(read(&bytes[..12]), Err(NpyError::Truncated)));
        let mut big_endian = bytes.clone();
        let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        big_endian[at] = b'>';
        assert!(matches!(read(&big_endian), Err(NpyError::Dtype(_))));
    }
}
