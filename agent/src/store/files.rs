//! The store's file: opening it owner-only (and surviving a redb panic on a damaged one),
//! telling a damaged file from a full disk or a second agent, moving damaged stores aside and
//! keeping only the newest copies, and small file-system helpers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use redb::Database;
use tracing::{info, warn};

use super::FILE_NAME;

/// Damaged stores moved aside that are kept; older ones are deleted so that a store that keeps
/// getting damaged cannot fill the disk with copies.
const CORRUPT_KEPT: usize = 3;

/// Why a database file could not be opened.
#[derive(Debug)]
pub(super) enum OpenFailure {
    /// Not a readable database, or an entry does not decode: moved aside at start-up.
    Damaged(String),
    NoSpace(String),
    Other(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Damaged(m) => write!(f, "damaged: {m}"),
            OpenFailure::NoSpace(m) => write!(f, "the disk is full: {m}"),
            OpenFailure::Other(m) => f.write_str(m),
        }
    }
}

pub(super) fn open_db(path: &Path, check: bool) -> Result<Database, OpenFailure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Created owner-only before redb sees it (redb would create it with the umask's mode).
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(classify(redb::Error::Io(e))),
    }
    // redb may panic on a file damaged outside it (its own documentation says so of a plain
    // open; debug builds assert on impossible pages): a damaged file must not stop the agent.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(check);
        builder.create(path)
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify(e.into())),
        Err(panic) => Err(OpenFailure::Damaged(format!(
            "reading it panicked: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

pub(super) fn classify(e: redb::Error) -> OpenFailure {
    match &e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            OpenFailure::Other(format!("{e} (is another agent running?)"))
        }
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::ValueTooLarge(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_) => OpenFailure::Damaged(e.to_string()),
        // What redb says of a file that does not hold a database.
        redb::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
            OpenFailure::Damaged(e.to_string())
        }
        _ if is_no_space(&e) => OpenFailure::NoSpace(e.to_string()),
        _ => OpenFailure::Other(e.to_string()),
    }
}

pub(super) fn is_no_space(e: &redb::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(e, redb::Error::Io(io) if matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT)))
        || crate::disk::is_no_space(&e.to_string())
}

/// Moves a damaged store to `outpost.redb.corrupt-<unix ms>` and deletes all but the newest
/// [`CORRUPT_KEPT`] such copies.
pub(super) fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let stamp = wall_ms();
    let mut target = dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
    let mut n = 1;
    while target.symlink_metadata().is_ok() {
        target = dir.join(format!("{FILE_NAME}.corrupt-{stamp}-{n}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    crate::fsutil::sync_dir(dir)?;
    prune_corrupt(dir);
    Ok(target)
}

fn prune_corrupt(dir: &Path) {
    let prefix = format!("{FILE_NAME}.corrupt-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut copies: Vec<((u64, u64), PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let (ms, n) = rest.split_once('-').unwrap_or((rest, "0"));
            Some(((ms.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .collect();
    copies.sort();
    let excess = copies.len().saturating_sub(CORRUPT_KEPT);
    for (_, path) in copies.into_iter().take(excess) {
        match fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "deleted an old damaged store"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot delete an old damaged store")
            }
        }
    }
}

pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Unix ms by the wall clock: only for what people read (health, file names).
pub(super) fn wall_ms() -> u64 {
    crate::clock::wall_now_ms()
}

pub(super) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{corrupt_copies, open};

    #[test]
    fn only_the_newest_damaged_copies_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [100u64, 200, 300, 400] {
            fs::write(dir.path().join(format!("{FILE_NAME}.corrupt-{ms}")), b"old").unwrap();
        }
        fs::write(dir.path().join(FILE_NAME), b"not a database at all").unwrap();
        let (_store, recovery) = open(dir.path());
        let recovery = recovery.unwrap();
        let kept = corrupt_copies(dir.path());
        assert_eq!(kept.len(), CORRUPT_KEPT, "{kept:?}");
        assert!(kept.contains(&recovery.moved_to));
        assert!(kept.contains(&dir.path().join(format!("{FILE_NAME}.corrupt-400"))));
        assert!(!kept.contains(&dir.path().join(format!("{FILE_NAME}.corrupt-200"))));
    }
}
