//! Files written whole or not at all.
//!
//! A file written in place is left short by a crash, a power cut or a full disk, and a short
//! key file refuses start-up forever. So every file the agent and the CLI write for keeps (the
//! bus secret, key pairs, signed manifests, the store's emergency reserve) goes through here:
//! the bytes go to a temporary file in the same folder (created with its final mode and
//! `O_EXCL`), which is fsynced and renamed over the target, and the folder is fsynced so that
//! the rename itself survives a power cut. A reader sees the old content or the new, never a
//! mix, and a failed write removes its temporary file.
//!
//! Temporary files carry the suffix [`TEMP_SUFFIX`]; the ones a crash left behind are removed
//! by [`remove_stale_temps`] (the store calls it on the state directory when it opens).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Ends the name of every temporary file written here: what [`remove_stale_temps`] looks for.
pub use outpost_core::files::TEMP_SUFFIX;

/// What to do when the target already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (atomically).
    Replace,
    /// Fail with [`io::ErrorKind::AlreadyExists`] and leave it untouched, even against a
    /// writer racing this one (`renameat2(RENAME_NOREPLACE)`, or a hard link where the
    /// filesystem lacks it).
    Keep,
}

/// Writes `bytes` to `path` atomically with permissions `mode` (exactly: the umask does not
/// apply), replacing what was there.
///
/// Fails when the folder does not exist or cannot be written, or the disk is full; `path` then
/// keeps its old content (or stays absent).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, Existing::Replace, |file| file.write_all(bytes))
}

/// As [`write_atomic`], but refuses to replace an existing `path`
/// ([`io::ErrorKind::AlreadyExists`]): for keys, which must never be overwritten by mistake.
pub fn write_new_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, Existing::Keep, |file| file.write_all(bytes))
}

/// The general form: `fill` writes the content into the temporary file (for content that is
/// too large to hold in memory at once, such as the store's reserve).
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    existing: Existing,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = folder_of(path);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    if existing == Existing::Keep && path.symlink_metadata().is_ok() {
        // Checked again, atomically, at the rename; this only saves writing the content.
        return Err(already_exists(path));
    }
    let (temp, mut file) = create_temp(&dir, &name.to_string_lossy(), mode)?;
    let result = (|| {
        // The umask may have taken bits off the mode at creation; the caller asked for these.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(|e| context(e, "cannot set the mode of", &temp))?;
        fill(&mut file).map_err(|e| context(e, "cannot write", &temp))?;
        file.sync_all()
            .map_err(|e| context(e, "cannot fsync", &temp))?;
        drop(file);
        match existing {
            Existing::Replace => {
                fs::rename(&temp, path).map_err(|e| context(e, "cannot rename onto", path))
            }
            Existing::Keep => rename_no_replace(&temp, path),
        }
    })();
    if let Err(e) = result {
        // The temporary file is ours and useless now; failing to remove it changes nothing
        // for the caller, whose error is the one that matters (a later start removes it).
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    sync_dir(&dir)
}

/// Fsyncs a folder, so that the names created, renamed or removed in it survive a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let handle = File::open(dir).map_err(|e| context(e, "cannot open the folder", dir))?;
    match handle.sync_all() {
        Ok(()) => Ok(()),
        // Some filesystems (a few FUSE ones) cannot fsync a folder; the data itself is synced.
        Err(e) if e.raw_os_error() == Some(EINVAL) => Ok(()),
        Err(e) => Err(context(e, "cannot fsync the folder", dir)),
    }
}

/// Removes the temporary files a crash left in `dir` (those ending in [`TEMP_SUFFIX`]).
/// Returns how many were removed. Call it only when no write may be under way in `dir`.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).map_err(|e| context(e, "cannot list", dir))? {
        let entry = entry.map_err(|e| context(e, "cannot list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.ends_with(TEMP_SUFFIX)) {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(context(e, "cannot remove", &entry.path())),
        }
    }
    Ok(removed)
}

const EINVAL: i32 = 22;

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates `.NAME.PID-N.outpost-tmp` in `dir` with `O_EXCL`: never a file someone else made
/// (or a symlink planted there), and never shared with a concurrent writer.
fn create_temp(dir: &Path, name: &str, mode: u32) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Room for the suffix within the usual 255-byte limit on a name.
    let mut short = name;
    if short.len() > 120 {
        let mut cut = 120;
        while !short.is_char_boundary(cut) {
            cut -= 1;
        }
        short = &short[..cut];
    }
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{short}.{}-{n}{TEMP_SUFFIX}", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            // Left by an earlier process with our pid: take the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(context(e, "cannot create", &temp)),
        }
    }
}

fn rename_no_replace(temp: &Path, path: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, temp, CWD, path, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(already_exists(path)),
        // The filesystem has no RENAME_NOREPLACE: a hard link also fails if the name exists.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            match fs::hard_link(temp, path) {
                Ok(()) => fs::remove_file(temp).map_err(|e| context(e, "cannot remove", temp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(already_exists(path)),
                Err(e) => Err(context(e, "cannot link onto", path)),
            }
        }
        Err(e) => Err(context(e.into(), "cannot rename onto", path)),
    }
}

fn already_exists(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{} already exists", path.display()),
    )
}

/// The same kind of error, saying which step on which file failed.
fn context(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn temps_in(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(TEMP_SUFFIX))
            .collect()
    }

    #[test]
    fn writes_replaces_and_honours_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        write_atomic(&path, b"first", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        assert_eq!(mode_of(&path), 0o600);
        write_atomic(&path, b"second, longer", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        assert_eq!(mode_of(&path), 0o644, "the mode given, whatever the umask");
        assert!(temps_in(dir.path()).is_empty());
    }

    #[test]
    fn a_failed_write_leaves_the_old_content_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_atomic(&path, b"old", 0o644).unwrap();
        let err = write_atomic_with(&path, 0o644, Existing::Replace, |f| {
            f.write_all(b"half of the n")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(temps_in(dir.path()).is_empty());
    }

    #[test]
    fn keep_refuses_an_existing_file_and_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ops.key");
        write_new_atomic(&path, b"mine", 0o600).unwrap();
        let err = write_new_atomic(&path, b"theirs", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"mine");
        // The check at the rename itself, not only the early one: a file that appears while
        // the content is being written is not replaced either.
        let racing = dir.path().join("race.key");
        let err = write_atomic_with(&racing, 0o600, Existing::Keep, |f| {
            fs::write(&racing, b"the other writer")?;
            f.write_all(b"ours")
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&racing).unwrap(), b"the other writer");
        assert!(temps_in(dir.path()).is_empty());
    }

    #[test]
    fn a_missing_folder_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(&dir.path().join("no/such/file"), b"x", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("no/such"), "{err}");
    }

    #[test]
    fn stale_temporary_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!(".bus.key.1-0{TEMP_SUFFIX}")), b"x").unwrap();
        fs::write(dir.path().join("bus.key"), b"k").unwrap();
        fs::write(dir.path().join(format!("visible{TEMP_SUFFIX}")), b"x").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
        assert!(dir.path().join("bus.key").exists());
        assert!(dir.path().join(format!("visible{TEMP_SUFFIX}")).exists());
    }

    /// A reader running beside a writer that keeps replacing the file sees one whole version
    /// or the other, never a mix or a short file.
    #[test]
    fn readers_see_the_old_or_the_new_content_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flip");
        let a = vec![b'a'; 256 << 10];
        let b = vec![b'b'; 128 << 10];
        write_atomic(&path, &a, 0o644).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, a, b, stop) = (path.clone(), a.clone(), b.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut reads = 0;
                while !stop.load(Ordering::Relaxed) {
                    let got = fs::read(&path).unwrap();
                    assert!(got == a || got == b, "a torn read of {} bytes", got.len());
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..60 {
            write_atomic(&path, if i % 2 == 0 { &b } else { &a }, 0o644).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }
}
