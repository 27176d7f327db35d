//! The Debian package and the golden image, as a person makes them: the `outpost` package
//! built by `scripts/package-deb` from this test run's `outpost` (the dev build: no extra
//! release build), and root file system trees made by `scripts/golden-image` (debootstrap's
//! minbase, cached under /var/tmp per suite and architecture) with that package and a
//! provisioning configuration installed.
//!
//! **For the provisioning end-to-end test** (issue 15, parts 1–5): [`golden_tree`] gives a
//! tree whose agent is set up for first boot against the test's broker; run it with
//! [`GoldenTree::outpost`] (inside the tree, by chroot) or [`GoldenTree::outpost_from_host`]
//! (the tree's binary and files, from outside it), each with its own serial.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::{outpost_bin, target_dir, workspace};

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tools` are here (programs on `PATH`, or absolute paths), and root if
/// `root`. When something is missing: under `CI=true` this panics (a CI run never skips
/// silently); otherwise it says what is missing and returns false, and the test returns.
pub fn have_tools(test: &str, tools: &[&str], root: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| !have_tool(t))
        .map(|t| t.to_string())
        .collect();
    if root && !is_root() {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: needs {} (scripts/setup installs the tools; the test runs as root in CI)",
        missing.join(", ")
    );
    assert!(!on_ci(), "{msg}");
    eprintln!("SKIPPED {msg}");
    false
}

/// An absolute path that is a file, or a program on `PATH`.
fn have_tool(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).is_file();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// The cargo-deb that scripts/setup installs.
pub fn cargo_deb() -> PathBuf {
    let root = std::env::var_os("CARGO_DEB_ROOT").map_or_else(
        || PathBuf::from("/var/tmp/outpost-cargo-deb"),
        PathBuf::from,
    );
    root.join("bin/cargo-deb")
}

/// The `outpost` package (amd64) of the `outpost` the tests run ([`outpost_bin`]: this run's
/// dev build, or `OUTPOST_BIN`), made once per test binary by
/// `scripts/package-deb amd64 --profile dev --no-build` into TARGET/debian-test. The binary
/// is staged where that command looks (a target folder of its own, `debug/outpost`), so the
/// package holds exactly the binary the other tests run, wherever it was built.
pub fn package_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let bin = outpost_bin();
        let work = target_dir().join("debian-test");
        let stage = work.join("stage");
        std::fs::create_dir_all(stage.join("debug")).unwrap();
        std::fs::copy(&bin, stage.join("debug/outpost"))
            .unwrap_or_else(|e| panic!("cannot stage {}: {e}", bin.display()));
        let stdout = crate::run(
            Command::new(workspace().join("scripts/package-deb"))
                .args(["amd64", "--profile", "dev", "--no-build", "--out"])
                .arg(&work)
                .env("CARGO_TARGET_DIR", &stage)
                .env("CARGO_DEB", cargo_deb()),
        );
        let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(
            deb.is_file(),
            "package-deb printed `{stdout}`, not a package"
        );
        deb
    })
    .clone()
}

/// Runs `cmd`, returning its output whatever its exit status (the caller judges it).
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Both output streams, for assertions and messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `systemd-analyze verify` of the unit at `unit`, as installed with its binary at `bin`
/// (an unpacked package or a tree is not the running system: the unit is copied with
/// `ExecStart` pointing at `bin`, and checked against this machine's units, which supply
/// systemd's targets and Docker's `docker.service`). Returns verify's output, empty when
/// the unit is clean; panics if it fails.
pub fn verify_unit(unit: &Path, bin: &Path) -> String {
    let text_unit = std::fs::read_to_string(unit)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", unit.display()));
    assert!(
        text_unit.contains("ExecStart=/usr/bin/outpost "),
        "the unit runs /usr/bin/outpost:\n{text_unit}"
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("outpost.service");
    std::fs::write(
        &copy,
        text_unit.replace(
            "ExecStart=/usr/bin/outpost ",
            &format!("ExecStart={} ", bin.display()),
        ),
    )
    .unwrap();
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let said = text(&out);
    assert!(
        out.status.success(),
        "systemd-analyze verify {} failed:\n{said}{}",
        unit.display(),
        if said.contains("docker.service not found") {
            "\n(the unit needs docker.service: install docker.io)"
        } else {
            ""
        }
    );
    said
}

/// A root file system made by `scripts/golden-image`, removed when dropped.
pub struct GoldenTree {
    _dir: tempfile::TempDir,
    /// The tree's root folder.
    pub root: PathBuf,
}

/// What a golden image is made with: the hub and the batch's claim identity.
pub struct Golden {
    /// The hub as the devices reach it, e.g. the test broker's `mqtts://127.0.0.1:PORT`.
    pub hub_url: String,
    pub ca_file: PathBuf,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
    /// Where each device's serial comes from (the script's default is /etc/machine-id,
    /// left empty in the image for systemd to fill at first boot; see
    /// [`GoldenTree::first_boot_machine_id`]).
    pub serial_file: Option<String>,
}

impl GoldenTree {
    /// The tree's `outpost`, run inside the tree (`chroot ROOT /usr/bin/outpost ARGS`): it
    /// reads the tree's /etc/outpost/config.toml and writes the tree's /var/lib/outpost. The
    /// chroot shares this machine's network, so the test's broker on loopback is reachable;
    /// `run` also needs the Docker socket inside the tree (bind /run/docker.sock onto
    /// ROOT/run/docker.sock, or use [`GoldenTree::outpost_from_host`]).
    pub fn outpost(&self) -> Command {
        let mut cmd = Command::new("chroot");
        cmd.arg(&self.root).arg("/usr/bin/outpost");
        cmd
    }

    /// The tree's `outpost` run from this machine with the tree's configuration: its
    /// relative files (claim certificate and key, CA) come from ROOT/etc/outpost, its state
    /// goes to ROOT/var/lib/outpost and its API socket to ROOT/run/outpost; the engine is
    /// this machine's. Absolute paths in the configuration (the serial file) are this
    /// machine's: set `OUTPOST__PROVISIONING__SERIAL_FILE` per agent.
    pub fn outpost_from_host(&self) -> Command {
        let mut cmd = Command::new(self.root.join("usr/bin/outpost"));
        cmd.arg("--config")
            .arg(self.root.join("etc/outpost/config.toml"))
            .env("OUTPOST__STATE_DIR", self.root.join("var/lib/outpost"))
            .env(
                "OUTPOST__API__SOCKET",
                self.root.join("run/outpost/api.sock"),
            );
        cmd
    }

    /// What systemd does on a board's first boot with the image's empty /etc/machine-id:
    /// writes a new id (here `id`, 32 hex digits), the default serial source.
    pub fn first_boot_machine_id(&self, id: &str) {
        std::fs::write(self.root.join("etc/machine-id"), format!("{id}\n")).unwrap();
    }
}

/// The base tree of `arch` alone (debootstrap's minbase from the cache, nothing installed):
/// what the package's maintainer scripts are tested in.
pub fn base_tree(arch: &str) -> GoldenTree {
    golden_script(arch, &["--base-only"])
}

/// **For the provisioning e2e test.** A golden-image tree for `arch` (`amd64` runs here;
/// others need qemu-user-static and take long), made by `scripts/golden-image` with this run's
/// package and `golden`'s hub and claim identity: the agent is installed and enabled, its
/// configuration has `[hub]` and `[provisioning]` and no `device_id`, the state directory is
/// empty. The first call on a machine runs debootstrap (about 80 s here) and caches it.
pub fn golden_tree(arch: &str, golden: &Golden) -> GoldenTree {
    assert_eq!(
        arch, "amd64",
        "golden_tree: only amd64 packages come from the test build"
    );
    let deb = package_deb();
    let mut args: Vec<String> = vec!["--deb".into(), deb.display().to_string()];
    for (flag, value) in [
        ("--hub-url", golden.hub_url.clone()),
        ("--ca", golden.ca_file.display().to_string()),
        ("--claim-cert", golden.claim_cert.display().to_string()),
        ("--claim-key", golden.claim_key.display().to_string()),
    ] {
        args.push(flag.into());
        args.push(value);
    }
    if let Some(file) = &golden.serial_file {
        args.push("--serial-file".into());
        args.push(file.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    golden_script(arch, &refs)
}

fn golden_script(arch: &str, args: &[&str]) -> GoldenTree {
    // Trees are a few hundred MB: /var/tmp, not a tmpfs /tmp.
    let dir = tempfile::Builder::new()
        .prefix("outpost-golden-")
        .tempdir_in("/var/tmp")
        .unwrap();
    // The tree is readable by everyone, as a root file system is.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let root = dir.path().join("root");
    let started = std::time::Instant::now();
    let out = output(
        Command::new(workspace().join("scripts/golden-image"))
            .args(["--arch", arch, "--tree"])
            .arg(&root)
            .args(args),
    );
    assert!(
        out.status.success(),
        "scripts/golden-image failed:\n{}",
        text(&out)
    );
    eprintln!(
        "golden-image ({arch}) in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    GoldenTree { _dir: dir, root }
}
