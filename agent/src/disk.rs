//! How full a filesystem is: what the disk watermarks (outbox shedding, refused pulls) and the
//! store's emergency reserve look at.

use std::path::Path;

/// Space on the filesystem holding a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    pub total_bytes: u64,
    /// What is left before `ENOSPC` for this process: the blocks reserved for root count as
    /// free when it runs as root (as the agent and the engine do), not otherwise.
    pub available_bytes: u64,
}

impl DiskUsage {
    /// Percent of the filesystem in use (0–100) for this process (see `available_bytes`).
    pub fn used_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            return 0.0;
        }
        100.0 * (self.total_bytes.saturating_sub(self.available_bytes)) as f64
            / self.total_bytes as f64
    }
}

/// The usage of the filesystem holding `path`; `None` when it cannot be measured (the path
/// does not exist, or the platform refuses `statvfs`).
pub fn usage(path: &Path) -> Option<DiskUsage> {
    let fs = rustix::fs::statvfs(path).ok()?;
    let free = if rustix::process::geteuid().is_root() {
        fs.f_bfree
    } else {
        fs.f_bavail
    };
    Some(DiskUsage {
        total_bytes: fs.f_blocks.saturating_mul(fs.f_frsize),
        available_bytes: free.saturating_mul(fs.f_frsize),
    })
}

/// Whether an I/O error (or its text, as redb and the engine pass it on) means the disk is full.
pub fn is_no_space(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("no space left") || m.contains("enospc") || m.contains("disk quota exceeded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_an_existing_path_and_not_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let u = usage(dir.path()).unwrap();
        assert!(u.total_bytes > 0 && u.available_bytes <= u.total_bytes);
        assert!((0.0..=100.0).contains(&u.used_percent()));
        assert!(usage(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn recognises_no_space_errors() {
        assert!(is_no_space(
            "I/O error: No space left on device (os error 28)"
        ));
        assert!(!is_no_space("permission denied"));
    }
}
