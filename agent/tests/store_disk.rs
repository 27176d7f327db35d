//! The store on a real full disk: a small tmpfs is the state directory, `dd` fills it to
//! `ENOSPC`, and the store must still take the deployment that fixes the device (the reserve
//! is given back for it), refuse further writes with a typed error while reads keep working,
//! recover by itself once space is freed, and make its reserve again.
//!
//! Needs root (to mount the tmpfs). Without it the test says so and passes, except under
//! `CI=true`, where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_agent::clock::BootInstant;
use outpost_agent::intake::Provenance;
use outpost_agent::state::{DeploymentReport, DeploymentStatus, Source};
use outpost_agent::store::{RESERVE_FILE, Store, StoredDeployment};

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/examples/line-3-vision.json"
);
const RESERVE: u64 = 2 << 20;

/// A tmpfs mounted for the test, unmounted when dropped (even when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying why) when mounting is not possible here and this is not CI.
    fn mount(size: &str) -> Option<Tmpfs> {
        // The store's logs, shown for a failing test.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_ansi(false)
            .with_env_filter("outpost_agent=debug")
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        let why = match out {
            Ok(o) if o.status.success() => return Some(Tmpfs { dir }),
            Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => e.to_string(),
        };
        let message = format!(
            "store_disk needs root and tmpfs (mount -t tmpfs failed: {why}); run it as root"
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
        None
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A process another test is starting may hold a copy of our descriptors for a moment
        // (between its fork and exec): wait for that, then detach if it is still busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let unmounted = Command::new("umount")
                .arg(self.dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if unmounted {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros into `dir/name` until the filesystem is full.
fn fill(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "status=none"])
        .arg(format!("of={}", path.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("No space left"),
        "dd should stop at ENOSPC: {stderr}"
    );
    let free = outpost_agent::disk::usage(dir).unwrap().available_bytes;
    assert!(free < 64 << 10, "the disk is full ({free} bytes left)");
    path
}

/// The example deployment at `version`, with `extra` modules to make it bigger.
fn deployment(version: u64, extra: usize) -> StoredDeployment {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(EXAMPLE).unwrap()).unwrap();
    json["version"] = version.into();
    for i in 0..extra {
        json["modules"][format!("extra-{i}")] = serde_json::json!({
            "image": format!("127.0.0.1:5000/extra-{i}:1.0.0"),
            "env": { "PAYLOAD": "x".repeat(1000) },
        });
    }
    StoredDeployment {
        deployment: serde_json::from_value(json).unwrap(),
        source: Source::Device,
        provenance: Provenance::Unsigned,
        digest: format!("digest-{version}"),
        accepted_at: 1,
    }
}

fn report(version: u64) -> DeploymentReport {
    DeploymentReport {
        id: "line-3-vision".into(),
        version,
        status: DeploymentStatus::Applying,
        source: Source::Device,
        reasons: vec![],
        digest: Some(format!("digest-{version}")),
        updated_at: 1,
        waiting: None,
    }
}

fn window(mono_ms: u64) -> BootInstant {
    BootInstant {
        boot_id: "boot-test".into(),
        mono_ms,
    }
}

#[test]
fn a_full_disk_takes_the_fixing_deployment_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    let dir = fs.path().join("state");
    let reserve = dir.join(RESERVE_FILE);
    {
        let (store, recovery) = Store::open(&dir, RESERVE).unwrap();
        assert!(recovery.is_none());
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE);
        assert!(store.health().reserve_held);
        store
            .accept(&deployment(6, 0), &report(6), &window(100))
            .unwrap();

        // Something else fills the disk (logs, a module's data).
        let filler = fill(fs.path(), "filler");
        // The deployment that fixes the device still commits: the reserve is given back.
        let fixing = deployment(7, 40);
        store.accept(&fixing, &report(7), &window(200)).unwrap();
        let health = store.health();
        assert!(!health.reserve_held, "{health:?}");
        assert!(health.reserve_in_use_since_ms.is_some(), "{health:?}");
        assert!(!reserve.exists());
        assert_eq!(store.desired().unwrap().unwrap(), fixing);

        // The runaway writer takes the freed space too: writes now fail, typed, and reads work.
        let filler2 = fill(fs.path(), "filler2");
        let err = store
            .accept(&deployment(8, 120), &report(8), &window(300))
            .unwrap_err();
        assert!(err.is_no_space(), "{err}");
        assert!(err.to_string().contains("disk is full"), "{err}");
        let health = store.health();
        let io = health
            .io_error
            .as_ref()
            .expect("the error is in the health");
        assert!(io.no_space && io.since_ms > 0, "{health:?}");
        assert_eq!(
            store.desired().unwrap().unwrap(),
            fixing,
            "reads still work"
        );
        assert_eq!(store.versions().unwrap()["device"], 7);
        assert_eq!(store.window().unwrap(), Some(window(200)));
        // A second failure is as clear as the first (the handle was reopened after it).
        let err = store
            .accept(&deployment(8, 120), &report(8), &window(300))
            .unwrap_err();
        assert!(err.is_no_space(), "{err}");
        store.maintain().unwrap();
        assert!(!reserve.exists(), "no room for the reserve yet");

        // Space comes back: writes work without anyone reopening anything.
        std::fs::remove_file(&filler).unwrap();
        std::fs::remove_file(&filler2).unwrap();
        let big = deployment(8, 120);
        store.accept(&big, &report(8), &window(300)).unwrap();
        assert!(store.health().io_error.is_none(), "{:?}", store.health());
        store.add_images(["127.0.0.1:5000/extra-1:1.0.0"]).unwrap();
        // And the next pass's upkeep makes the reserve again.
        store.maintain().unwrap();
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE);
        let health = store.health();
        assert!(health.reserve_held && health.reserve_in_use_since_ms.is_none());
    }

    // What was committed is in the files.
    let (store, recovery) = Store::open(&dir, RESERVE).unwrap();
    assert!(recovery.is_none());
    assert_eq!(store.desired().unwrap().unwrap(), deployment(8, 120));
    assert_eq!(store.versions().unwrap()["device"], 8);
    assert_eq!(store.window().unwrap(), Some(window(300)));
    assert!(
        store
            .images()
            .unwrap()
            .contains("127.0.0.1:5000/extra-1:1.0.0")
    );
}

/// An agent restarted while the disk is full (systemd restarts it) opens its store, and a
/// deployment still commits.
#[test]
fn the_store_opens_on_a_full_disk() {
    let Some(fs) = Tmpfs::mount("8m") else {
        return;
    };
    let dir = fs.path().join("state");
    {
        let (store, _) = Store::open(&dir, RESERVE).unwrap();
        store
            .accept(&deployment(1, 0), &report(1), &window(1))
            .unwrap();
    }
    fill(fs.path(), "filler");
    let (store, recovery) = Store::open(&dir, RESERVE).unwrap();
    assert!(recovery.is_none());
    assert_eq!(
        store.desired().unwrap().unwrap().deployment.version,
        1,
        "{:?}",
        store.health()
    );
    store
        .accept(&deployment(2, 40), &report(2), &window(2))
        .unwrap();
    assert_eq!(store.desired().unwrap().unwrap().deployment.version, 2);
}
