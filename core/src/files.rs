//! Writing a new file so that a crash or a power cut leaves either no file or the whole of it,
//! and never replaces one that exists: for keys. Portable (the operator's tools run on laptops);
//! the agent's own atomic writes, Linux-only, are in its `fsutil`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The suffix of temporary files; the agent removes ones a crash left behind.
pub const TEMP_SUFFIX: &str = ".outpost-tmp";

/// Writes `bytes` to `path` with `mode` (Unix permission bits; ignored elsewhere), failing with
/// [`io::ErrorKind::AlreadyExists`] when `path` exists. The content goes to a temporary file
/// first, which is then hard-linked to `path`: the link is atomic and refuses an existing name.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    if path.symlink_metadata().is_ok() {
        // Checked again, atomically, by the link; this only saves writing the content.
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already exists", path.display()),
        ));
    }
    let (dir, temp) = write_temp(path, bytes, mode)?;
    let result = fs::hard_link(&temp, path).and_then(|()| sync_dir(&dir));
    // The temporary name is ours alone; once linked (or failed) it is of no use.
    let _ = fs::remove_file(&temp);
    result
}

/// Writes `bytes` to `path` with `mode`, replacing what is there, whole or not at all (a
/// temporary file renamed over it).
pub fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, temp) = write_temp(path, bytes, mode)?;
    let result = fs::rename(&temp, path).and_then(|()| sync_dir(&dir));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// `bytes` in a new temporary file beside `path`, synced; returns the folder and the file.
/// Nothing is left behind when writing fails.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<(PathBuf, PathBuf)> {
    let (dir, name) = split(path)?;
    let temp = temp_name(&dir, &name);
    // A failed create leaves nothing of ours to remove.
    let mut file = create(&temp, mode)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    match written {
        Ok(()) => Ok((dir, temp)),
        Err(e) => {
            let _ = fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The folder `path` is in (`.` for a bare name) and its file name.
fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

fn temp_name(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(
        ".{name}.{:016x}{TEMP_SUFFIX}",
        getrandom::u64().unwrap_or_else(|_| u64::from(std::process::id()))
    ))
}

#[cfg(unix)]
fn create(path: &Path, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have taken bits off the mode; the caller asked for these.
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn create(path: &Path, _mode: u32) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_file_is_whole_and_an_existing_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_new(&path, b"first", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let err = write_new(&path, b"second", 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
    }
}
