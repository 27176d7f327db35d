//! A tar.gz of regular files, written by hand: the ustar header is 512 bytes of fixed fields,
//! which is less code (and device binary) than the `tar` crate for what the bundle needs —
//! regular files, short names, no links, no extended headers. flate2 (pure Rust) compresses.

use std::io::Write as _;

use flate2::Compression;
use flate2::write::GzEncoder;

const BLOCK: usize = 512;

/// Why a member could not be added.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("member name `{0}` is longer than 100 bytes or not a plain relative path")]
    Name(String),
    #[error("compressing: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds a gzip-compressed tar in memory.
pub struct TarGz {
    gz: GzEncoder<Vec<u8>>,
    mtime: u64,
}

impl TarGz {
    /// Members get `mtime` (Unix seconds) and mode 0600.
    pub fn new(mtime: u64) -> TarGz {
        TarGz {
            gz: GzEncoder::new(Vec::new(), Compression::default()),
            mtime,
        }
    }

    /// Appends a regular file.
    ///
    /// Fails when the name does not fit a ustar header (100 bytes, relative, no `..`).
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<(), TarError> {
        if name.is_empty()
            || name.len() > 100
            || name.starts_with('/')
            || name.split('/').any(|p| p == ".." || p.is_empty())
        {
            return Err(TarError::Name(name.to_string()));
        }
        self.gz
            .write_all(&header(name, data.len() as u64, self.mtime))?;
        self.gz.write_all(data)?;
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.gz.write_all(&[0u8; BLOCK][..pad])?;
        Ok(())
    }

    /// Ends the archive (two zero blocks) and the gzip stream.
    pub fn finish(mut self) -> Result<Vec<u8>, TarError> {
        self.gz.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.gz.finish()?)
    }
}

/// An octal field of `width` bytes: digits, then a NUL.
fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let text = format!("{value:0width$o}");
    field[..width].copy_from_slice(&text.as_bytes()[text.len() - width..]);
    field[width] = 0;
}

fn header(name: &str, size: u64, mtime: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o600);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_tar_reads_what_is_written() {
        let mut t = TarGz::new(1_795_787_401);
        t.add("README.txt", b"hello\n").unwrap();
        t.add("modules/a.log", &vec![b'x'; 1000]).unwrap();
        t.add("empty", b"").unwrap();
        assert!(t.add("../evil", b"").is_err());
        assert!(t.add(&"n".repeat(101), b"").is_err());
        let bytes = t.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.tar.gz");
        std::fs::write(&file, &bytes).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-xzf")
            .arg(&file)
            .arg("-C")
            .arg(dir.path())
            .output()
            .expect("tar runs");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read(dir.path().join("README.txt")).unwrap(),
            b"hello\n"
        );
        assert_eq!(
            std::fs::read(dir.path().join("modules/a.log"))
                .unwrap()
                .len(),
            1000
        );
        assert!(dir.path().join("empty").is_file());
    }
}
