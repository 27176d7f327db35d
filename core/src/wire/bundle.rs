//! A file sent over the hub in chunks: the device's answer to `support-bundle` is too large for
//! one MQTT message (brokers cap packets, often at 1 MiB), so it goes out as numbered replies on
//! `{prefix}/{device}/responses/{id}`, each carrying the total and the SHA-256 of the whole,
//! which the operator checks after putting the chunks together. QoS 1 may deliver a chunk
//! twice: chunks are keyed by number, so a duplicate is harmless.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::intake::hex_sha256;

/// Raw bytes per chunk: base64 and JSON bring a message to about 350 KiB, under the 1 MiB
/// packet limit brokers are told to set (docs/hub.md).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Most bytes of a file sent in chunks: the operator refuses more (a bound on what a device,
/// or whoever publishes on its response topic, can make it hold).
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// One chunk, the `result` of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Chunk {
    /// 0-based.
    pub chunk: u32,
    /// How many chunks make the file.
    pub chunks: u32,
    /// The whole file's size in bytes.
    pub size: u64,
    /// The whole file's SHA-256, hex.
    pub sha256: String,
    /// This chunk's bytes, base64 (standard alphabet, padded).
    pub data: String,
}

/// Why a chunked file could not be put together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("{size} bytes is over the {max}-byte cap for a file sent over the hub")]
    TooLarge { size: u64, max: u64 },
    #[error("chunk {chunk} disagrees with the first chunk about the file (count, size or digest)")]
    Inconsistent { chunk: u32 },
    #[error("chunk {chunk} of {chunks} is out of range")]
    OutOfRange { chunk: u32, chunks: u32 },
    #[error("chunk {chunk} is not base64")]
    NotBase64 { chunk: u32 },
    #[error("the file is {got} bytes; the device said {want}")]
    WrongSize { got: u64, want: u64 },
    #[error("SHA-256 mismatch: got {got}, the device said {want}")]
    WrongDigest { got: String, want: String },
}

/// Cuts `file` into chunks. Fails when it is over [`MAX_FILE_BYTES`].
pub fn split(file: &[u8]) -> Result<Vec<Chunk>, ChunkError> {
    let size = file.len() as u64;
    if size > MAX_FILE_BYTES {
        return Err(ChunkError::TooLarge {
            size,
            max: MAX_FILE_BYTES,
        });
    }
    let sha256 = hex_sha256(file);
    let pieces: Vec<&[u8]> = if file.is_empty() {
        vec![&[][..]]
    } else {
        file.chunks(CHUNK_BYTES).collect()
    };
    let chunks = pieces.len() as u32;
    Ok(pieces
        .into_iter()
        .enumerate()
        .map(|(i, piece)| Chunk {
            chunk: i as u32,
            chunks,
            size,
            sha256: sha256.clone(),
            data: base64::engine::general_purpose::STANDARD.encode(piece),
        })
        .collect())
}

/// Chunks as they arrive, in any order, duplicates allowed.
#[derive(Debug, Default)]
pub struct Assembly {
    first: Option<(u32, u64, String)>,
    parts: BTreeMap<u32, Vec<u8>>,
}

impl Assembly {
    /// Takes one chunk; `Ok(Some(file))` once every chunk is in and the digest matches.
    ///
    /// Fails when the chunk contradicts the earlier ones, is out of range or not base64, the
    /// announced size is over the cap, or the whole does not match its size or digest.
    pub fn add(&mut self, chunk: Chunk) -> Result<Option<Vec<u8>>, ChunkError> {
        if chunk.size > MAX_FILE_BYTES {
            return Err(ChunkError::TooLarge {
                size: chunk.size,
                max: MAX_FILE_BYTES,
            });
        }
        let header = (chunk.chunks, chunk.size, chunk.sha256.clone());
        match &self.first {
            None => self.first = Some(header),
            Some(first) if *first != header => {
                return Err(ChunkError::Inconsistent { chunk: chunk.chunk });
            }
            Some(_) => {}
        }
        if chunk.chunk >= chunk.chunks {
            return Err(ChunkError::OutOfRange {
                chunk: chunk.chunk,
                chunks: chunk.chunks,
            });
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&chunk.data)
            .map_err(|_| ChunkError::NotBase64 { chunk: chunk.chunk })?;
        self.parts.insert(chunk.chunk, bytes);
        if self.parts.len() < chunk.chunks as usize {
            return Ok(None);
        }
        let file: Vec<u8> = std::mem::take(&mut self.parts)
            .into_values()
            .flatten()
            .collect();
        if file.len() as u64 != chunk.size {
            return Err(ChunkError::WrongSize {
                got: file.len() as u64,
                want: chunk.size,
            });
        }
        let got = hex_sha256(&file);
        if got != chunk.sha256 {
            return Err(ChunkError::WrongDigest {
                got,
                want: chunk.sha256,
            });
        }
        Ok(Some(file))
    }

    /// How many distinct chunks arrived, and of how many.
    pub fn progress(&self) -> (usize, u32) {
        (self.parts.len(), self.first.as_ref().map_or(0, |f| f.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_go_back_together_in_any_order_with_duplicates() {
        let file: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| i as u8).collect();
        let mut chunks = split(&file).unwrap();
        assert_eq!(chunks.len(), 3);
        chunks.reverse();
        let mut a = Assembly::default();
        assert_eq!(a.add(chunks[0].clone()), Ok(None));
        assert_eq!(
            a.add(chunks[0].clone()),
            Ok(None),
            "a duplicate is harmless"
        );
        assert_eq!(a.add(chunks[1].clone()), Ok(None));
        assert_eq!(a.add(chunks[2].clone()), Ok(Some(file)));
    }

    #[test]
    fn an_empty_file_is_one_chunk() {
        let chunks = split(b"").unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            Assembly::default().add(chunks[0].clone()),
            Ok(Some(Vec::new()))
        );
    }

    #[test]
    fn a_tampered_chunk_fails_the_digest() {
        let mut chunks = split(b"hello world").unwrap();
        chunks[0].data = base64::engine::general_purpose::STANDARD.encode(b"hello wOrld");
        assert!(matches!(
            Assembly::default().add(chunks[0].clone()),
            Err(ChunkError::WrongDigest { .. })
        ));
    }

    #[test]
    fn caps_and_contradictions_are_refused() {
        assert!(split(&vec![0u8; MAX_FILE_BYTES as usize + 1]).is_err());
        let chunks = split(&vec![1u8; CHUNK_BYTES + 1]).unwrap();
        let mut a = Assembly::default();
        a.add(chunks[0].clone()).unwrap();
        let mut other = chunks[1].clone();
        other.sha256 = "00".into();
        assert_eq!(a.add(other), Err(ChunkError::Inconsistent { chunk: 1 }));
        let mut wild = chunks[1].clone();
        wild.chunk = 9;
        assert!(matches!(a.add(wild), Err(ChunkError::OutOfRange { .. })));
    }
}
