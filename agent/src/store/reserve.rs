//! The emergency reserve (`STATE_DIR/reserve`): a file of zeros taken over from an earlier run
//! at open, given back when a write that changes the deployment fails for lack of space, and
//! made again once the disk has room.

use std::fs;
use std::io;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::files::wall_ms;
use super::{Inner, StoreError};

/// How long after a failed attempt to write the reserve the next one may be made.
const RESERVE_RETRY: Duration = Duration::from_secs(60);

impl Inner {
    /// Takes a reserve left by an earlier run if it has the configured size; one of another
    /// size (the setting changed) is removed, to be made again at the right size.
    pub(super) fn adopt_reserve(&self) {
        let len = fs::metadata(&self.reserve).map(|m| m.len()).ok();
        let held = self.reserve_bytes > 0 && len == Some(self.reserve_bytes);
        if !held
            && len.is_some()
            && let Err(e) = fs::remove_file(&self.reserve)
        {
            warn!(path = %self.reserve.display(), error = %e, "cannot remove an old store reserve");
        }
        let mut status = self.status();
        status.reserve_held = held;
        status.reserve_in_use_since = (!held && self.reserve_bytes > 0).then(wall_ms);
    }

    /// Deletes the reserve so that a write can use its space. Returns whether space was freed.
    pub(super) fn release_reserve(&self) -> bool {
        let mut status = self.status();
        if !status.reserve_held {
            return false;
        }
        match fs::remove_file(&self.reserve) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %self.reserve.display(), error = %e, "cannot give back the store reserve");
                return false;
            }
        }
        status.reserve_held = false;
        status.reserve_in_use_since = Some(wall_ms());
        warn!(path = %self.reserve.display(), bytes = self.reserve_bytes,
            "the disk is full: gave back the store's emergency reserve so that the deployment commits");
        true
    }

    /// Writes the reserve when it is missing and the disk has room for it twice over (so that
    /// making it never fills the disk itself).
    pub(super) fn make_reserve(&self) -> Result<(), StoreError> {
        {
            let status = self.status();
            let backing_off = status
                .reserve_retry_at
                .is_some_and(|at| Instant::now() < at);
            if self.reserve_bytes == 0 || status.reserve_held || backing_off {
                return Ok(());
            }
        }
        let Some(usage) = crate::disk::usage(&self.dir) else {
            return Ok(());
        };
        if usage.available_bytes < self.reserve_bytes.saturating_mul(2) {
            return Ok(());
        }
        let zeros = vec![0u8; 64 << 10];
        let mut left = self.reserve_bytes;
        crate::fsutil::write_atomic_with(
            &self.reserve,
            0o600,
            crate::fsutil::Existing::Replace,
            |file| {
                use std::io::Write as _;
                while left > 0 {
                    // At most the 64 KiB of `zeros`, so the cast cannot truncate.
                    let n = left.min(zeros.len() as u64) as usize;
                    file.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                Ok(())
            },
        )
        .map_err(|source| {
            // A filesystem that refuses it (read-only, a race for the last blocks) is not
            // asked again on every pass.
            self.status().reserve_retry_at = Some(Instant::now() + RESERVE_RETRY);
            StoreError::Reserve {
                path: self.reserve.clone(),
                source,
            }
        })?;
        let mut status = self.status();
        status.reserve_retry_at = None;
        status.reserve_held = true;
        status.reserve_in_use_since = None;
        info!(path = %self.reserve.display(), bytes = self.reserve_bytes, "store reserve in place");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    use crate::store::{RESERVE_FILE, Store};

    #[test]
    fn the_reserve_is_made_at_open_and_resized_with_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = dir.path().join(RESERVE_FILE);
        {
            let (store, _) = Store::open(dir.path(), 100_000).unwrap();
            assert_eq!(fs::metadata(&reserve).unwrap().len(), 100_000);
            assert_eq!(
                fs::metadata(&reserve).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let health = store.health();
            assert!(health.reserve_held && health.reserve_in_use_since_ms.is_none());
            assert!(health.io_error.is_none());
        }
        {
            let (store, _) = Store::open(dir.path(), 50_000).unwrap();
            assert_eq!(fs::metadata(&reserve).unwrap().len(), 50_000);
            assert!(store.health().reserve_held);
        }
        let (store, _) = Store::open(dir.path(), 0).unwrap();
        assert!(!reserve.exists(), "no reserve configured, none kept");
        assert!(!store.health().reserve_held);
        assert_eq!(store.health().reserve_in_use_since_ms, None);
    }

    #[test]
    fn a_reserve_given_back_is_made_again_by_maintain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 100_000).unwrap();
        assert!(store.inner.release_reserve());
        assert!(!dir.path().join(RESERVE_FILE).exists());
        let health = store.health();
        assert!(!health.reserve_held && health.reserve_in_use_since_ms.is_some());
        assert!(!store.inner.release_reserve(), "nothing left to give");
        store.maintain().unwrap();
        assert_eq!(
            fs::metadata(dir.path().join(RESERVE_FILE)).unwrap().len(),
            100_000
        );
        assert!(store.health().reserve_held);
    }

    #[test]
    fn a_reserve_that_cannot_be_written_is_not_retried_every_pass() {
        let dir = tempfile::tempdir().unwrap();
        // Something that is not ours where the reserve goes: it cannot be replaced.
        fs::create_dir_all(dir.path().join(RESERVE_FILE).join("keep")).unwrap();
        let (store, _) = Store::open(dir.path(), 100_000).unwrap();
        let health = store.health();
        assert!(!health.reserve_held && health.reserve_in_use_since_ms.is_some());
        // The attempt at open failed; the next passes do not try again for a while.
        store.maintain().unwrap();
        store.maintain().unwrap();
        assert!(dir.path().join(RESERVE_FILE).join("keep").is_dir());
        assert_eq!(crate::fsutil::remove_stale_temps(dir.path()).unwrap(), 0);
        assert!(matches!(
            {
                store.inner.status().reserve_retry_at = None;
                store.maintain()
            },
            Err(StoreError::Reserve { .. })
        ));
    }
}
