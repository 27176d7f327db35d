//! What the field drills need beyond the engine harness: a small tmpfs to fill (disk full), a
//! wall clock that lies (libfaketime from Debian's `faketime` package, the agent's C library
//! clock only — the monotonic clock stays real), and the engine's own event log to measure
//! downtime from (`docker events`, nanosecond times).
//!
//! Every part is required: a missing tool or permission fails the test with what to install.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::run;

/// A tmpfs mounted for the test, unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`8m`) at `path` (created). Needs root, as CI has.
    pub fn mount(path: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this drill mounts a tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Fills the filesystem with a file until `ENOSPC`; returns the file (delete it to free).
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        // dd stops with "No space left on device": that is the point.
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()
            .expect("run dd");
        let free = rustix_free(&self.path);
        assert!(free < 64 * 1024, "{free} bytes still free after filling");
        filler
    }
}

fn rustix_free(path: &Path) -> u64 {
    let out = run(Command::new("stat").args(["-f", "-c", "%a %S"]).arg(path));
    let mut f = out
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    f.next().unwrap_or(0) * f.next().unwrap_or(0)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}

/// The environment that makes the agent's wall clock read what `file` says (`-20785d`: 1970;
/// `+0`: the real time), re-read on every call so the test can jump it while the agent runs.
/// The monotonic clock is left alone, as on a device without an RTC.
pub fn faketime_env(file: &Path) -> Vec<(String, String)> {
    let lib = ["/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("libfaketimeMT.so.1 is required by the clock drill: apt-get install faketime (scripts/setup installs it)")
        });
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// Days from 1970 to now, as the offset that puts a faked clock at 1970.
pub fn offset_to_1970() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("-{}d", secs / 86_400)
}

/// One engine event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Unix nanoseconds.
    pub time_nano: u128,
    /// `create`, `start`, `kill`, `die`, `destroy`, `pull`, ...
    pub action: String,
    pub id: String,
    /// The container's name, or the image reference.
    pub name: String,
}

/// The engine's events since `since` (Unix seconds) until now, filtered (`label=...`,
/// `type=image`, ...), oldest first.
pub fn events(since: u64, filters: &[&str]) -> Vec<Event> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        + 1;
    let mut cmd = Command::new("docker");
    cmd.args([
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &now.to_string(),
        "--format",
        "{{json .}}",
    ]);
    for f in filters {
        cmd.args(["--filter", f]);
    }
    run(&mut cmd)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| Event {
            time_nano: v["timeNano"].as_u64().map_or(0, u128::from),
            action: v["Action"].as_str().unwrap_or_default().to_string(),
            id: v["Actor"]["ID"].as_str().unwrap_or_default().to_string(),
            name: v["Actor"]["Attributes"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
        .collect()
}

/// Builds `reference` on the engine: the test module plus a layer of `mb` MiB of random
/// bytes (incompressible, so a registry transfers all of it).
pub fn big_test_image(reference: &str, mb: usize) {
    crate::require_docker();
    let ctx = tempfile::tempdir().expect("build context");
    std::fs::copy(crate::testmod_binary(), ctx.path().join("testmod")).expect("copy testmod");
    run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", &format!("count={mb}")])
        .arg(format!("of={}", ctx.path().join("ballast").display()))
        .arg("status=none"));
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY testmod /testmod\nCOPY ballast /ballast\nLABEL io.outpost.test-image=\"{reference}\"\nUSER 65532:65532\nENTRYPOINT [\"/testmod\"]\n"
        ),
    )
    .expect("write Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "--no-cache", "-t", reference])
        .arg(ctx.path()));
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
