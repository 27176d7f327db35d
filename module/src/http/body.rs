//! Request bodies: read whole within the size limit, the byte budget of requests in flight
//! and the body timeout; decompressed when sent with `Content-Encoding: gzip` or `deflate`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{AppState, busy, count_error, error};
use crate::metrics::Source;

/// Why a request body was not read whole.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("too many request bytes in flight; try again")]
    Busy,
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the request body: {0}")]
    Read(String),
    #[error("Content-Encoding '{0}' is not supported; send gzip, deflate or identity")]
    Encoding(String),
    #[error("the request body is not valid {0}: {1}")]
    Corrupt(&'static str, String),
}

/// A body read whole, and the share of the byte budget it holds until it is dropped (after
/// the answer is built).
pub(super) struct Budgeted {
    pub(super) bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Reads a request body within the size limit, the byte budget and the body timeout, and
/// decompresses it when its `Content-Encoding` says gzip or deflate.
///
/// With a `Content-Length`, its whole size is taken from the budget before a byte is read, so
/// a refused body is never buffered; a chunked body takes its share chunk by chunk. A
/// compressed body is held to the same size limit once decompressed (a small gzip bomb is
/// still a large body), and its decompressed bytes take their share of the budget too.
pub(super) async fn read_body(state: &AppState, request: Request) -> Result<Budgeted, BodyError> {
    let max = state.limits.max_body_bytes;
    let encoding = Encoding::of(request.headers())?;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut permit = None;
    if let Some(len) = declared {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(BodyError::TooLarge(max))?;
        permit = take(&state.body_bytes, len, None)?;
    }
    let reserved = declared.is_some();
    let read = async move {
        let mut body: Body = request.into_body();
        let mut buf = Vec::with_capacity(if reserved { permit_len(&permit) } else { 0 });
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge(max));
            }
            if !reserved {
                permit = take(&state.body_bytes, data.len(), permit)?;
            }
            buf.extend_from_slice(&data);
        }
        Ok(Budgeted {
            bytes: Bytes::from(buf),
            _permit: permit,
        })
    };
    let body = tokio::time::timeout(state.limits.body_timeout, read)
        .await
        .map_err(|_| BodyError::Timeout(state.limits.body_timeout))??;
    match encoding {
        Encoding::Identity => Ok(body),
        Encoding::Gzip | Encoding::Deflate => {
            let Budgeted { bytes, _permit } = body;
            // Decompressing up to the size limit is CPU work: off the async threads.
            let bytes = tokio::task::spawn_blocking(move || encoding.decode(&bytes, max))
                .await
                .map_err(|e| BodyError::Read(e.to_string()))??;
            let permit = take(&state.body_bytes, bytes.len(), _permit)?;
            Ok(Budgeted {
                bytes,
                _permit: permit,
            })
        }
    }
}

/// What `Content-Encoding` a request body has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    /// HTTP's deflate: zlib-wrapped (RFC 9110), as Python's `zlib.compress` makes it.
    Deflate,
}

impl Encoding {
    fn of(headers: &axum::http::HeaderMap) -> Result<Encoding, BodyError> {
        let Some(value) = headers.get(header::CONTENT_ENCODING) else {
            return Ok(Encoding::Identity);
        };
        let value = value.to_str().unwrap_or("(not text)").trim();
        match value.to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Encoding::Identity),
            "gzip" | "x-gzip" => Ok(Encoding::Gzip),
            "deflate" => Ok(Encoding::Deflate),
            _ => Err(BodyError::Encoding(value.to_string())),
        }
    }

    /// Decompresses `bytes`, refusing more than `max` bytes of output.
    fn decode(self, bytes: &[u8], max: usize) -> Result<Bytes, BodyError> {
        use std::io::Read;
        let (name, reader): (&'static str, Box<dyn Read + '_>) = match self {
            Encoding::Identity => return Ok(Bytes::copy_from_slice(bytes)),
            Encoding::Gzip => ("gzip", Box::new(flate2::read::GzDecoder::new(bytes))),
            Encoding::Deflate => ("deflate", Box::new(flate2::read::ZlibDecoder::new(bytes))),
        };
        let mut out = Vec::new();
        reader
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| BodyError::Corrupt(name, e.to_string()))?;
        if out.len() > max {
            return Err(BodyError::TooLarge(max));
        }
        Ok(Bytes::from(out))
    }
}

fn permit_len(p: &Option<OwnedSemaphorePermit>) -> usize {
    p.as_ref().map_or(0, |p| p.num_permits())
}

/// Takes `n` more bytes from the budget, at once or not at all (503: never wait holding a
/// share, which is how a budget deadlocks).
fn take(
    budget: &Arc<Semaphore>,
    n: usize,
    held: Option<OwnedSemaphorePermit>,
) -> Result<Option<OwnedSemaphorePermit>, BodyError> {
    if n == 0 {
        return Ok(held);
    }
    let n = u32::try_from(n).map_err(|_| BodyError::Busy)?;
    let more = budget
        .clone()
        .try_acquire_many_owned(n)
        .map_err(|_| BodyError::Busy)?;
    Ok(Some(match held {
        Some(mut p) => {
            p.merge(more);
            p
        }
        None => more,
    }))
}

/// The answer for a body not read: 400, 503 with `Retry-After`, or 408 closing the
/// connection (the rest of a late body may still be on its way).
pub(super) fn body_error(state: &AppState, source: Source, e: BodyError) -> Response {
    match e {
        BodyError::Busy => busy(state, e.to_string()),
        BodyError::Timeout(_) => {
            count_error(state, source);
            let mut r = error(StatusCode::REQUEST_TIMEOUT, e.to_string());
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        BodyError::Encoding(_) => {
            count_error(state, source);
            error(StatusCode::UNSUPPORTED_MEDIA_TYPE, e.to_string())
        }
        BodyError::TooLarge(_) | BodyError::Read(_) | BodyError::Corrupt(..) => {
            count_error(state, source);
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn gzip_bodies_decode_within_the_limit() {
        let body = vec![b'7'; 10_000];
        let packed = gzip(&body);
        assert_eq!(
            &Encoding::Gzip.decode(&packed, 10_000).unwrap()[..],
            &body[..]
        );
        // 10 kB from a few dozen bytes: refused at the limit, never inflated past it.
        assert!(matches!(
            Encoding::Gzip.decode(&packed, 9_999),
            Err(BodyError::TooLarge(9_999))
        ));
        assert!(matches!(
            Encoding::Gzip.decode(b"not gzip", 100),
            Err(BodyError::Corrupt("gzip", _))
        ));
    }

    #[test]
    fn unknown_encodings_are_named() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Identity);
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("GZIP"));
        assert_eq!(Encoding::of(&h).unwrap(), Encoding::Gzip);
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        let e = Encoding::of(&h).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Content-Encoding 'br' is not supported; send gzip, deflate or identity"
        );
    }
}
