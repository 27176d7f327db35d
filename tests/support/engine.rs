//! Shared harness for the end-to-end tests: the real parts they run against.
//!
//! - [`Registry`]: the distribution registry from Debian's `docker-registry` package on a free
//!   loopback port, with htpasswd credentials, so the agent really pulls and really
//!   authenticates;
//! - [`test_image`]: the static `outpost-testmod` binary in a FROM-scratch image, pushed to a
//!   registry and removed locally;
//! - [`Agent`]: the real `outpost run` binary as a child process, with its own device id, state
//!   folder and API socket, killed and cleaned up on drop;
//! - [`wait_for`]: polls a condition with a timeout (no fixed sleeps in tests);
//! - for the benchmarks: [`sigterm_ignoring_image`] (busybox `sleep` as PID 1),
//!   [`test_image_with_random_layer`], [`Agent::start_configured`] (any `[runtime]`, JSON
//!   logs), [`device_events`] (the engine's events of one device) and [`rfc3339_unix_nanos`].
//!
//! Every part is required: a missing tool or engine fails the test with what to install.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Fails the test with an actionable message when a tool is missing.
pub fn require(tool: &str, hint: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    match found {
        Some(p) => p,
        None => panic!(
            "`{tool}` is required by this test and is not installed: {hint} (scripts/setup installs it)"
        ),
    }
}

/// Fails unless the Docker engine answers.
pub fn require_docker() {
    require("docker", "apt-get install docker.io");
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the Docker engine does not answer on /var/run/docker.sock; these tests need it"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Lets any user pass through `dir` (not list it), as `/var/lib` lets a process module reach
/// the agent's state folder: a temporary folder is private to root.
pub fn passable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod 0711");
}

/// Waits until `f` returns `Some`, polling every 100 ms; panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The workspace's target directory (where `outpost` and the test binaries are).
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Test binaries live in TARGET/debug/deps.
    let exe = std::env::current_exe().expect("the test binary has a path");
    exe.ancestors()
        .nth(3)
        .expect("TARGET/debug/deps/test")
        .to_path_buf()
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// The `outpost` binary (the device's), built if this test run did not build it already.
pub fn outpost_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("OUTPOST_BIN", "outpost-agent", "outpost"))
        .clone()
}

/// `outpost-infer`, beside the `outpost` binary (where `outpost demo` looks for it), built if
/// this test run did not build it already.
pub fn infer_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let beside = outpost_bin().with_file_name("outpost-infer");
        if !beside.is_file() {
            run(Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-q",
                    "-p",
                    "outpost-module",
                    "--bin",
                    "outpost-infer",
                ])
                .current_dir(workspace()));
        }
        assert!(beside.is_file(), "{} was not built", beside.display());
        beside
    })
    .clone()
}

/// The `outpost-ctl` binary (the operator's), built if this test run did not build it already.
pub fn ctl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("OUTPOST_CTL_BIN", "outpost-ctl", "outpost-ctl"))
        .clone()
}

/// A command running the device binary: `OUTPOST_RUNNER` (for example `qemu-aarch64 -L /`)
/// runs a binary built for another architecture, as the ARM tests do.
pub fn outpost_command() -> Command {
    match std::env::var("OUTPOST_RUNNER") {
        Ok(runner) if !runner.trim().is_empty() => {
            let mut words = runner.split_whitespace();
            // Not empty: checked above.
            let mut command = Command::new(words.next().expect("a runner program"));
            command.args(words).arg(outpost_bin());
            command
        }
        _ => Command::new(outpost_bin()),
    }
}

/// `outpost-ctl [hub args] deploy --device DEVICE FILE [--sign-key KEY] --timeout SECS`.
pub fn ctl_deploy(
    hub: &[String],
    device: &str,
    file: &Path,
    sign_key: Option<&Path>,
    timeout_secs: u64,
) -> std::process::Output {
    let mut command = Command::new(ctl_bin());
    command
        .args(hub)
        .args(["deploy", "--device", device])
        .arg(file);
    if let Some(key) = sign_key {
        command.arg("--sign-key").arg(key);
    }
    command
        .args(["--timeout", &timeout_secs.to_string()])
        .output()
        .expect("run outpost-ctl deploy")
}

/// `outpost-ctl [hub args] status --device DEVICE --json`: the hub's summary of the device.
pub fn ctl_status_json(hub: &[String], device: &str) -> Value {
    let out = Command::new(ctl_bin())
        .args(hub)
        .args(["status", "--device", device, "--json"])
        .output()
        .expect("run outpost-ctl status");
    assert!(out.status.success(), "outpost-ctl status: {out:?}");
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// `bin` of `package`; benchmarks measure the release build, which `env` names.
fn built(env: &str, package: &str, bin: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let path = target_dir().join("debug").join(bin);
    run(Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(workspace()));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A distribution registry on loopback with one user.
pub struct Registry {
    pub addr: String,
    /// The Docker client's config folder for this registry's login: tests run in parallel and
    /// must not share (and race on) `~/.docker/config.json`.
    pub docker_config: PathBuf,
    pub username: String,
    pub password: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts one, on another port when the one picked was taken meanwhile: a free port is
    /// only free until someone binds it, and tests start brokers and registries in parallel
    /// (CI once saw the wait connect to another test's listener, then `docker login` refused).
    pub fn start() -> Registry {
        let mut tried = Vec::new();
        for _ in 0..5 {
            match Registry::try_start() {
                Ok(r) => return r,
                Err(why) => tried.push(why),
            }
        }
        panic!("the registry could not be started: {}", tried.join("; "));
    }

    fn try_start() -> Result<Registry, String> {
        let bin = require("docker-registry", "apt-get install docker-registry");
        require("htpasswd", "apt-get install apache2-utils");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        // Credentials of this registry alone: a login that succeeds reached this one.
        let (username, password) = (
            "edge".to_string(),
            format!("pw-{}-{port}", std::process::id()),
        );
        let htpasswd = run(Command::new("htpasswd").args(["-Bbn", &username, &password]));
        std::fs::write(dir.path().join("htpasswd"), htpasswd).expect("write htpasswd");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n\
             http:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: outpost-test\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log_path = dir.path().join("registry.log");
        let log = std::fs::File::create(&log_path).expect("registry log");
        let mut child = Command::new(bin)
            .args(["serve"])
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("it exited ({status}) on {addr}: {}", log.trim()));
            }
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("it did not listen on {addr} within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let docker_config = dir.path().join("docker-config");
        std::fs::create_dir_all(&docker_config).expect("docker config dir");
        let registry = Registry {
            docker_config,
            addr,
            username,
            password,
            child,
            _dir: dir,
        };
        let mut login = Command::new("docker")
            .env("DOCKER_CONFIG", &registry.docker_config)
            .args([
                "login",
                "--username",
                &registry.username,
                "--password-stdin",
                &registry.addr,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("docker login");
        {
            use std::io::Write as _;
            let mut stdin = login.stdin.take().expect("piped stdin");
            stdin
                .write_all(registry.password.as_bytes())
                .expect("password to docker login");
        }
        let out = login.wait_with_output().expect("docker login finished");
        if !out.status.success() {
            // Dropped: the child is killed.
            return Err(format!(
                "docker login to {} failed: {}",
                registry.addr,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The static test-module binary, built once per test run.
pub fn testmod_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let target = "x86_64-unknown-linux-gnu";
        run(Command::new(env!("CARGO"))
            .args([
                "build",
                "-q",
                "--release",
                "-p",
                "outpost-testmod",
                "--target",
                target,
            ])
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .current_dir(workspace()));
        target_dir().join(target).join("release/outpost-testmod")
    })
    .clone()
}

/// Builds the test module's FROM-scratch image as `REGISTRY/REPO:TAG`, pushes it, and removes
/// it from the engine so that the agent has to pull it. Returns the reference.
pub fn test_image(registry: &Registry, repo: &str, tag: &str) -> String {
    test_image_with(registry, repo, tag, "USER 65532:65532\n")
}

/// As [`test_image`], but the reference is pinned by digest (`REGISTRY/REPO@sha256:...`), as
/// a device that trusts signing keys requires.
pub fn test_image_pinned(registry: &Registry, repo: &str, tag: &str) -> String {
    let reference = format!("{}/{repo}:{tag}", registry.addr);
    local_test_image(&reference, "USER 65532:65532\n");
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["push", "-q", &reference]));
    let digest = run(Command::new("docker").args([
        "inspect",
        "--format",
        "{{index .RepoDigests 0}}",
        &reference,
    ]))
    .trim()
    .to_string();
    assert!(
        digest.contains("@sha256:"),
        "no digest for {reference}: {digest}"
    );
    remove_image(&reference);
    digest
}

/// As [`test_image`], with `extra` Dockerfile instructions (a `HEALTHCHECK`, a `USER`).
pub fn test_image_with(registry: &Registry, repo: &str, tag: &str, extra: &str) -> String {
    let reference = format!("{}/{repo}:{tag}", registry.addr);
    local_test_image(&reference, extra);
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["push", "-q", &reference]));
    remove_image(&reference);
    reference
}

/// Builds the test module's FROM-scratch image as `reference` on the engine only (benchmarks
/// use it as an image already present on the device).
///
/// Builds never use the engine's cache: tests run in parallel and remove their images, and a
/// cached intermediate image another test just removed fails the build ("failed to get digest").
pub fn local_test_image(reference: &str, extra: &str) {
    require_docker();
    let ctx = tempfile::tempdir().expect("build context");
    std::fs::copy(testmod_binary(), ctx.path().join("testmod")).expect("copy testmod");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        // The label makes each reference its own image: tests running in parallel build the
        // same content, and without it they would share one image id, so one test removing its
        // tag could delete the image another test has just built.
        format!(
            "FROM scratch\nCOPY testmod /testmod\nLABEL io.outpost.test-image=\"{reference}\"\n{extra}ENTRYPOINT [\"/testmod\"]\n"
        ),
    )
    .expect("write Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "--no-cache", "-t", reference])
        .arg(ctx.path()));
}

pub fn remove_image(reference: &str) {
    let _ = Command::new("docker")
        .args(["rmi", "-f", reference])
        .output();
}

/// The id, state and config hash of every container of a device, by module.
pub fn containers(device: &str) -> Vec<(String, String, String, String)> {
    let out = run(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label=io.outpost.device={device}"),
        "--format",
        "{{.ID}}\t{{.Label \"io.outpost.module\"}}\t{{.State}}\t{{.Label \"io.outpost.config-hash\"}}",
    ]));
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() == 4).then(|| {
                (
                    f[1].to_string(),
                    f[0].to_string(),
                    f[2].to_string(),
                    f[3].to_string(),
                )
            })
        })
        .collect()
}

/// When `pid` started (ticks since boot), if it runs: the agent's own reading, so that the
/// tests judge a process alive exactly as the agent does.
pub fn start_ticks(pid: i64) -> Option<u64> {
    outpost_agent::runtime::process::files::start_ticks(i32::try_from(pid).ok()?)
}

/// Every `run.json` under a state folder's `processes/`.
fn process_runs(state: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(state.join("processes")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path().join("run.json")).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

/// The real agent as a child process.
pub struct Agent {
    pub device: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Extra environment for the agent process (the clock drills preload libfaketime).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    supervisor: Option<crate::supervisor::Supervisor>,
}

impl Agent {
    /// Writes a config and starts `outpost run`. `runtime` holds extra keys of `[runtime]`,
    /// `extra` whole sections appended after it.
    pub fn start(device: &str, extra: &str) -> Agent {
        Agent::start_with(device, "", extra)
    }

    pub fn start_with(device: &str, runtime: &str, extra: &str) -> Agent {
        let mut agent = Agent::configure(device, runtime, extra);
        agent.spawn();
        agent
    }

    /// Writes the config and clears the device's containers, without starting the agent: a
    /// test prepares the state folder (a tmpfs) or the environment, then calls
    /// [`Agent::spawn`].
    pub fn configure(device: &str, runtime: &str, extra: &str) -> Agent {
        Agent::write_config(
            device,
            &format!("device_id = \"{device}\"\n"),
            runtime,
            extra,
        )
    }

    /// As [`Agent::configure`] for a device named at first boot (`[provisioning]` in
    /// `extra`): the configuration has no `device_id`; `device` is the name the test expects
    /// it to get (its containers are cleared).
    pub fn configure_provisioned(device: &str, extra: &str) -> Agent {
        Agent::write_config(device, "", "", extra)
    }

    fn write_config(device: &str, id_line: &str, runtime: &str, extra: &str) -> Agent {
        require_docker();
        let dir = tempfile::tempdir().expect("agent dir");
        // Process modules run as `nobody` and pass through here to their folders, as they
        // pass through /var/lib on a device.
        passable(dir.path());
        // Agents of parallel tests share the engine: each gets its own bus port on the bridge
        // (the default, port 1884, is one per host).
        let bus = if extra.contains("[bus]") {
            String::new()
        } else {
            format!("[bus]\nlisten = \"{}\"\n", crate::telemetry::bus_listen())
        };
        let extra = format!("{extra}\n{bus}");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "{id_line}state_dir = \"{root}/state\"\nlog_level = \"info,outpost_agent=debug\"\n\
                 [api]\nsocket = \"{root}/api.sock\"\n[runtime]\nstop_grace_secs = 2\n{runtime}\n{extra}\n",
                root = dir.path().display()
            ),
        )
        .expect("write agent config");
        let agent = Agent {
            device: device.to_string(),
            dir,
            config,
            env: Vec::new(),
            child: None,
            supervisor: None,
        };
        agent.cleanup_containers();
        agent
    }

    /// The agent's state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts `outpost run` and waits for its API socket.
    pub fn spawn(&mut self) {
        self.spawn_detached();
        self.wait_ready(Duration::from_secs(20));
    }

    /// Waits for the agent's API socket (a provisioning device serves it once it has its
    /// identity).
    pub fn wait_ready(&self, within: Duration) {
        let socket = self.dir.path().join("api.sock");
        wait_for("the agent's API socket", within, || {
            socket.exists().then_some(())
        });
    }

    /// Starts `outpost run` under a supervisor that starts it again whenever it exits, as the
    /// service unit has systemd do (`Restart=always`, but not after exit code 78), and waits
    /// for its API socket. [`Agent::pid`], [`Agent::kill9`] and [`Agent::stop`] then act on
    /// the supervised process.
    pub fn spawn_supervised(&mut self) {
        let socket = self.dir.path().join("api.sock");
        let _ = std::fs::remove_file(&socket);
        let (env, config, log) = (
            self.env.clone(),
            self.config.clone(),
            self.dir.path().join("agent.log"),
        );
        self.supervisor = Some(crate::supervisor::Supervisor::start(move || {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .expect("agent log");
            let mut command = outpost_command();
            command
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(log);
            command
        }));
        self.wait_ready(Duration::from_secs(20));
    }

    /// How many times the supervisor has started the agent (0 when not supervised).
    pub fn starts(&self) -> u32 {
        self.supervisor.as_ref().map_or(0, |s| s.starts())
    }

    /// Starts `outpost run` without waiting for it.
    pub fn spawn_detached(&mut self) {
        let socket = self.dir.path().join("api.sock");
        // A killed agent leaves its socket behind; wait for the new one, not the old.
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        let child = outpost_command()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start outpost run");
        self.child = Some(child);
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        if let Some(s) = &self.supervisor {
            return s.pid();
        }
        self.child.as_ref().map(Child::id)
    }

    /// `kill -9`: no chance to clean up. A supervised agent is started again.
    pub fn kill9(&mut self) {
        if let Some(s) = &self.supervisor {
            s.kill9();
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            let status = s.stop();
            assert!(
                status.is_none_or(|s| s.success()),
                "agent exited with {status:?} on SIGTERM"
            );
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let status = c.wait().expect("agent exit");
            assert!(status.success(), "agent exited with {status} on SIGTERM");
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn outpost(&self, args: &[&str]) -> std::process::Output {
        outpost_command()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run outpost")
    }

    /// `outpost deploy --local` with the manifest as JSON; returns (exit code, stdout + stderr).
    pub fn deploy(&self, manifest: &Value, wait_secs: u64) -> (i32, String) {
        let file = self
            .dir
            .path()
            .join(format!("manifest-{}.json", manifest["version"]));
        std::fs::write(&file, manifest.to_string()).expect("write manifest");
        let out = self.outpost(&[
            "deploy",
            "--local",
            file.to_str().expect("utf-8 path"),
            "--wait-secs",
            &wait_secs.to_string(),
        ]);
        // Progress (pulls) goes to standard error, the outcome to standard output: both.
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The reported state (`outpost list --json`).
    pub fn state(&self) -> Value {
        let out = self.outpost(&["list", "--json"]);
        assert!(
            out.status.success(),
            "outpost list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("state is JSON")
    }

    /// The reported state, or `Null` while the agent is not answering (restarting).
    pub fn try_state(&self) -> Value {
        let out = self.outpost(&["list", "--json"]);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn cleanup_containers(&self) {
        for (_, id, _, _) in containers(&self.device) {
            let _ = Command::new("docker").args(["rm", "-f", &id]).output();
        }
        // Process modules outlive the agent, as containers do: kill them (their process
        // groups, so their children go too) and their shims.
        // Only a process that is still the one recorded (same pid *and* kernel start time): a
        // stale pid may belong to anything by now.
        for run in process_runs(&self.state_dir()) {
            if let Some(pid) = run["pid"].as_i64().filter(|p| *p > 1)
                && run["startTicks"].as_u64().is_some()
                && start_ticks(pid) == run["startTicks"].as_u64()
            {
                // The kill(2) system call, not the `kill` program: the one here took a
                // negative number for "every process" and took the machine down with it.
                outpost_agent::runtime::process::kill_group(pid as i32);
            }
        }
    }

    /// The process modules' records as `(module, id, run.json)`: what runs, from the agent's
    /// own files.
    pub fn processes(&self) -> Vec<(String, String, Value)> {
        let Ok(entries) = std::fs::read_dir(self.state_dir().join("processes")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| {
                let dir = e.ok()?.path();
                let record: Value =
                    serde_json::from_slice(&std::fs::read(dir.join("record.json")).ok()?).ok()?;
                let run: Value = std::fs::read(dir.join("run.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                Some((
                    record["labels"]["io.outpost.module"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    record["id"].as_str().unwrap_or_default().to_string(),
                    run,
                ))
            })
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.kill_all();
        }
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- agent log ({}) ----\n{}", self.device, self.log());
        }
        self.cleanup_containers();
    }
}

// ---- For the benchmarks against docker-compose and of the update gap -------------------------

/// Builds, on the engine only, a FROM-scratch image of Debian's static busybox as its
/// entrypoint, running as root: a module with a shell, for the attacks a foothold in a module
/// tries (planting links, reading host files). The command comes from the manifest's `Cmd`.
pub fn busybox_image(reference: &str) {
    busybox_image_with(reference, r#"["/busybox"]"#);
}

/// Builds, on the engine only, a FROM-scratch image whose PID 1 is Debian's static busybox
/// running `sleep 3600`. It has no SIGTERM handler, and as PID 1 the kernel drops signals it
/// does not handle: a stop waits out the whole grace period and then kills it. That is the
/// common real-world module the stop grace exists for (the test module exits on SIGTERM at
/// once, which hides what serial stops cost).
pub fn sigterm_ignoring_image(reference: &str) {
    busybox_image_with(reference, r#"["/busybox", "sleep", "3600"]"#);
}

/// A FROM-scratch image of the static busybox with `entrypoint` (JSON form).
fn busybox_image_with(reference: &str, entrypoint: &str) {
    require_docker();
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is required: apt-get install busybox-static (scripts/setup installs it)"
    );
    let ctx = tempfile::tempdir().expect("build context");
    std::fs::copy(busybox, ctx.path().join("busybox")).expect("copy busybox");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY busybox /busybox\nLABEL io.outpost.test-image=\"{reference}\"\n\
             ENTRYPOINT {entrypoint}\n"
        ),
    )
    .expect("write Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "--no-cache", "-t", reference])
        .arg(ctx.path()));
}

/// The test module's image with one more layer of `bytes` random (incompressible) bytes,
/// pushed to `registry` as `REGISTRY/REPO:TAG` and removed from the engine, so that pulling it
/// takes a while. Returns the reference.
pub fn test_image_with_random_layer(
    registry: &Registry,
    repo: &str,
    tag: &str,
    bytes: u64,
) -> String {
    require_docker();
    let reference = format!("{}/{repo}:{tag}", registry.addr);
    let ctx = tempfile::tempdir().expect("build context");
    std::fs::copy(testmod_binary(), ctx.path().join("testmod")).expect("copy testmod");
    {
        use std::io::Read as _;
        let mut random = std::fs::File::open("/dev/urandom")
            .expect("/dev/urandom")
            .take(bytes);
        let mut file = std::fs::File::create(ctx.path().join("random.bin")).expect("random.bin");
        let copied = std::io::copy(&mut random, &mut file).expect("write random.bin");
        assert_eq!(copied, bytes, "short read from /dev/urandom");
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM scratch\nCOPY testmod /testmod\nCOPY random.bin /random.bin\n\
             LABEL io.outpost.test-image=\"{reference}\"\nENTRYPOINT [\"/testmod\"]\n"
        ),
    )
    .expect("write Dockerfile");
    run(Command::new("docker")
        .args(["build", "-q", "--no-cache", "-t", &reference])
        .arg(ctx.path()));
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["push", "-q", &reference]));
    remove_image(&reference);
    reference
}

impl Agent {
    /// As [`Agent::start_with`], with top-level keys (`log_format = "json"`) and the whole
    /// `[runtime]` section given, `stop_grace_secs` included (`start_with` fixes it at 2 s;
    /// benchmarks against a peer need the peer's grace).
    pub fn start_configured(device: &str, top: &str, runtime: &str, extra: &str) -> Agent {
        require_docker();
        let dir = tempfile::tempdir().expect("agent dir");
        let bus = if extra.contains("[bus]") {
            String::new()
        } else {
            format!("[bus]\nlisten = \"{}\"\n", crate::telemetry::bus_listen())
        };
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "device_id = \"{device}\"\nstate_dir = \"{root}/state\"\nlog_level = \"info,outpost_agent=debug\"\n{top}\n\
                 [api]\nsocket = \"{root}/api.sock\"\n[runtime]\n{runtime}\n{extra}\n{bus}\n",
                root = dir.path().display()
            ),
        )
        .expect("write agent config");
        let mut agent = Agent {
            device: device.to_string(),
            dir,
            config,
            env: Vec::new(),
            child: None,
            supervisor: None,
        };
        agent.cleanup_containers();
        agent.spawn();
        agent
    }

    /// The log of an agent started with `log_format = "json"`, one value per line (lines that
    /// are not JSON are left out).
    pub fn json_log(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The engine's events for a device's containers between two moments (`docker events --since
/// --until --filter label=io.outpost.device=DEVICE`), as JSON values with `timeNano`.
/// `until` in the future makes this wait until then.
pub fn device_events(
    device: &str,
    since: std::time::SystemTime,
    until: std::time::SystemTime,
) -> Vec<Value> {
    let stamp = |t: std::time::SystemTime| {
        let d = t.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
        format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
    };
    let out = run(Command::new("docker").args([
        "events",
        "--since",
        &stamp(since),
        "--until",
        &stamp(until),
        "--filter",
        &format!("label=io.outpost.device={device}"),
        "--format",
        "{{json .}}",
    ]));
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Unix nanoseconds of an RFC 3339 time as `tracing` writes it
/// (`2026-11-28T19:47:12.123456Z`): the agent's own parser for the seconds, plus the fraction
/// it leaves out. `None` for anything else.
pub fn rfc3339_unix_nanos(s: &str) -> Option<i128> {
    let secs = outpost_agent::runtime::docker::parse_rfc3339(s)?;
    let fraction = s.split_once('T')?.1.split_once('.').map_or("", |(_, f)| f);
    let digits: String = fraction
        .chars()
        .take_while(char::is_ascii_digit)
        .take(9)
        .collect();
    let nanos: i64 = if digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}
