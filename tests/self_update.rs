//! The agent updates itself, on the real parts: a Mosquitto hub with mutual TLS, the Docker
//! engine, the real `outpost` binary under a supervisor that restarts it as systemd does, and
//! new builds made from it by `outpost-ctl agent stamp` (the same code, reporting another
//! version), served over HTTP with ranges.
//!
//! Each test deploys a module, then a signed deployment naming a new agent, and checks what
//! the device ends on: the version it reports (locally and through the hub), the update's
//! phase and reason, the update record, that the module's container is the same one
//! throughout, and that exactly one agent process runs for the device.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

const GATE_TIMEOUT_SECS: u64 = 25;

struct Rig {
    name: String,
    /// Kept for the test's length: the hub.
    broker: Broker,
    agent: Agent,
    dir: tempfile::TempDir,
    sign_key: PathBuf,
    hub_flags: Vec<String>,
    server: FileServer,
    /// The module's container id after the first deployment.
    module_id: String,
    version: u64,
}

/// A device with its hub, trusted key and `[update]` settings for tests (a 3-second
/// probation), supervised, running one module.
fn rig(name: &str) -> Option<Rig> {
    let broker = Broker::start(Auth::MutualTls).expect("broker")?;
    let dir = tempfile::tempdir().expect("dir");
    let keys = dir.path().join("ops");
    run(Command::new(ctl_bin())
        .args(["keys", "generate", "--out"])
        .arg(&keys));
    let image = format!("outpost-test/busybox:{name}");
    busybox_image(&image);
    let device = format!("upd-{name}-{}", std::process::id());
    let mut agent = Agent::configure(
        &device,
        "",
        &format!(
            "{}[policy]\ntrusted_keys = [\"{}.pub\"]\nallow_image_tags = true\n\
             [update]\nprobation_secs = 3\ngate_timeout_secs = {GATE_TIMEOUT_SECS}\nmax_starts = 3\n\
             ca_file = \"{}\"\n",
            broker.device_hub_section(),
            keys.display(),
            broker.pki.ca.display()
        ),
    );
    agent.spawn_supervised();
    let hub_flags = broker.cli_flags(dir.path()).expect("cli flags");
    let mut rig = Rig {
        name: name.to_string(),
        broker,
        agent,
        sign_key: PathBuf::from(format!("{}.key", keys.display())),
        hub_flags,
        dir,
        server: FileServer::start(),
        module_id: String::new(),
        version: 0,
    };
    rig.deploy(None);
    rig.module_id = rig.module().expect("the module runs");
    Some(rig)
}

impl Rig {
    fn image(&self) -> String {
        format!("outpost-test/busybox:{}", self.name)
    }

    /// Deploys the module (unchanged) with `agent` as the `agent` section, signed, through
    /// the hub, and waits for `applied`.
    fn deploy(&mut self, agent: Option<Value>) {
        self.version += 1;
        let mut d = json!({
            "schemaVersion": "1.0", "id": "upd", "version": self.version,
            "modules": { "app": {
                "image": self.image(),
                "createOptions": { "Cmd": ["sh", "-c", "exec sleep 3600"] }
            } }
        });
        if let Some(a) = agent {
            d["agent"] = a;
        }
        let file = self.dir.path().join(format!("d{}.json", self.version));
        std::fs::write(&file, d.to_string()).expect("write manifest");
        let out = ctl_deploy(
            &self.hub_flags,
            &self.agent.device,
            &file,
            Some(&self.sign_key),
            90,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "deploy: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The module's running container id.
    fn module(&self) -> Option<String> {
        containers(&self.agent.device)
            .into_iter()
            .find(|c| c.0 == "app" && c.2 == "running")
            .map(|c| c.1)
    }

    /// A copy of the agent reporting `version`, served; returns the `agent` section.
    fn stamped(&self, version: &str) -> (PathBuf, Value) {
        let out = self.dir.path().join(format!("outpost-{version}"));
        run(Command::new(ctl_bin())
            .args(["agent", "stamp"])
            .arg(outpost_bin())
            .args(["--version", version, "--out"])
            .arg(&out));
        let section = self.section(version, &out);
        (out, section)
    }

    /// Serves `file` and returns the `agent` section for it as this device's build.
    fn section(&self, version: &str, file: &Path) -> Value {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        let url = self.server.serve(&name, file.to_path_buf());
        let out = Command::new(ctl_bin())
            .args(["agent", "artifact"])
            .arg(file)
            .args([
                "--url",
                &url,
                "--platform",
                &this_platform(),
                "--version",
                version,
            ])
            .output()
            .expect("outpost-ctl agent artifact");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("the section is JSON")
    }

    /// Serves `file` over HTTPS (OpenSSL's `s_server -WWW`, with the test CA's certificate
    /// for `localhost`, which `[update] ca_file` trusts); returns the server and the section.
    fn https_section(&self, version: &str, file: &Path) -> (ChildGuard, Value) {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&self.broker.pki.server_cert)
            .arg("-key")
            .arg(&self.broker.pki.server_key)
            .current_dir(file.parent().unwrap())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let guard = ChildGuard(child);
        wait_for("the HTTPS server", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let name = file.file_name().unwrap().to_str().unwrap();
        let out = Command::new(ctl_bin())
            .args(["agent", "artifact"])
            .arg(file)
            .args([
                "--url",
                &format!("https://localhost:{port}/{name}"),
                "--platform",
                &this_platform(),
                "--version",
                version,
            ])
            .output()
            .expect("outpost-ctl agent artifact");
        assert!(out.status.success(), "{out:?}");
        (guard, serde_json::from_slice(&out.stdout).expect("JSON"))
    }

    /// A shell script that passes the self-test as `version` and then does `body`.
    fn script(&self, version: &str, body: &str) -> (PathBuf, Value) {
        let file = self.dir.path().join(format!("script-{version}"));
        std::fs::write(
            &file,
            format!(
                "#!/bin/sh\nif [ \"$1\" = --version ]; then echo \"outpost {version}\"; exit 0; fi\n{body}\n"
            ),
        )
        .expect("write script");
        run(Command::new("chmod").arg("755").arg(&file));
        let section = self.section(version, &file);
        (file, section)
    }

    /// Waits until the local state's `agent` satisfies `pred`; returns it.
    fn wait_agent(&self, what: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let found = try_wait(within, || {
            let s = self.agent.try_state();
            if s.is_null() {
                return None;
            }
            last = s["agent"].clone();
            if std::env::var_os("DEBUG_STATES").is_some() {
                eprintln!("seen: {last}");
            }
            pred(&last).then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            panic!(
                "{what}: not within {within:?}; the agent last said {last:#}\nrecord: {}",
                self.record()
            )
        })
    }

    fn record(&self) -> Value {
        std::fs::read(self.agent.state_dir().join("agent/update.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// What the hub says about the device's agent (`outpost-ctl status --json`).
    fn hub_agent(&self) -> Value {
        let rows = ctl_status_json(&self.hub_flags, &self.agent.device);
        rows[0]["agent"].clone()
    }

    /// Processes running the agent with this device's configuration.
    fn agent_processes(&self) -> Vec<u32> {
        let config = self.agent.config.to_string_lossy().to_string();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<String> = c
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).to_string())
                        .collect();
                    args.contains(&config) && args.iter().any(|a| a == "run")
                })
            })
            .collect()
    }

    /// The device ends on `version`, in `slot`, one agent, the module untouched.
    fn assert_settled(&self, version: &str, slot: &str) {
        let record = self.record();
        assert!(record["trial"].is_null(), "a trial is left: {record:#}");
        assert_eq!(record["active"]["version"], version, "{record:#}");
        assert_eq!(record["active"]["slot"], slot, "{record:#}");
        let procs = wait_for("one agent process", Duration::from_secs(10), || {
            let p = self.agent_processes();
            (p.len() == 1).then_some(p)
        });
        assert_eq!(
            procs.first().copied(),
            self.agent.pid(),
            "the agent is the supervised process"
        );
        assert_eq!(
            self.module().as_deref(),
            Some(self.module_id.as_str()),
            "the module's container is the one from before the update"
        );
    }
}

/// Kills the process when dropped.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// This build's platform, as the agent names its own (`linux/amd64`).
fn this_platform() -> String {
    outpost_agent::runtime::registry::Platform::of_this_build().to_string()
}

fn try_wait<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn phase(a: &Value) -> &str {
    a["update"]["phase"].as_str().unwrap_or("")
}

#[test]
fn a_good_update_is_committed_and_the_modules_keep_running() {
    let Some(mut rig) = rig("good") else { return };
    let before = rig.agent.state()["agent"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    // The first over HTTPS, trusted through `[update] ca_file`.
    let (file, _) = rig.stamped("9.1.0");
    let (_server, section) = rig.https_section("9.1.0", &file);
    rig.deploy(Some(section));
    let a = rig.wait_agent("committed at 9.1.0", Duration::from_secs(90), |a| {
        a["version"] == "9.1.0" && phase(a) == "committed"
    });
    assert_eq!(a["slot"], "a");
    rig.assert_settled("9.1.0", "a");
    let log = rig.agent.log();
    assert!(log.contains("passed its health gate"), "{log}");
    // The hub has it too.
    let hub = wait_for("the hub's view", Duration::from_secs(30), || {
        let h = rig.hub_agent();
        (h["version"] == "9.1.0" && h["update"]["phase"] == "committed").then_some(h)
    });
    assert_eq!(hub["slot"], "a");

    // The next update goes from slot a to slot b, through the installed binary's launcher.
    let (_, section) = rig.stamped("9.2.0");
    rig.deploy(Some(section));
    rig.wait_agent("committed at 9.2.0", Duration::from_secs(90), |a| {
        a["version"] == "9.2.0" && phase(a) == "committed" && a["slot"] == "b"
    });
    rig.assert_settled("9.2.0", "b");
    assert_ne!(before, "9.2.0");
    // A clean stop of the service stops the one agent.
    rig.agent.stop();
    assert!(rig.agent_processes().is_empty());
}

#[test]
fn a_build_that_exits_at_once_is_rolled_back() {
    let Some(mut rig) = rig("exits") else { return };
    let before = rig.agent.state()["agent"]["version"].clone();
    // Exit code 78 is the one systemd would not restart: the launcher counts it all the same.
    let (_, section) = rig.script("9.3.0", "echo 'broken build' >&2; exit 78");
    rig.deploy(Some(section));
    let a = rig.wait_agent("rolled back", Duration::from_secs(120), |a| {
        phase(a) == "rolled-back"
    });
    assert_eq!(a["version"], before, "the old agent runs again");
    let reason = a["update"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stopped 3 times before passing its health gate"),
        "{reason}"
    );
    assert!(reason.contains("exit code 78"), "{reason}");
    assert!(reason.contains("not tried again"), "{reason}");
    rig.assert_settled(before.as_str().unwrap(), "installed");
    assert_eq!(rig.record()["refused"], json!(["9.3.0"]));
}

#[test]
fn a_build_that_never_reaches_the_hub_is_rolled_back() {
    let Some(mut rig) = rig("nohub") else { return };
    let before = rig.agent.state()["agent"]["version"].clone();
    // The real agent, reporting 9.4.0, whose hub address leads nowhere.
    let (real, _) = rig.stamped("9.4.0");
    let (_, section) = rig.script(
        "9.4.0",
        &format!(
            "OUTPOST__HUB__URL=mqtts://127.0.0.1:9 exec {} \"$@\"",
            real.display()
        ),
    );
    rig.deploy(Some(section));
    rig.wait_agent("on probation", Duration::from_secs(60), |a| {
        phase(a) == "probation" && a["version"] == "9.4.0"
    });
    let a = rig.wait_agent(
        "rolled back",
        Duration::from_secs(GATE_TIMEOUT_SECS + 60),
        |a| phase(a) == "rolled-back",
    );
    assert_eq!(a["version"], before);
    let reason = a["update"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "did not pass its health gate within {GATE_TIMEOUT_SECS} s"
        )) && reason.contains("a connection to the hub"),
        "{reason}"
    );
    rig.assert_settled(before.as_str().unwrap(), "installed");
    // And the hub hears why.
    wait_for("the hub's view", Duration::from_secs(30), || {
        let h = rig.hub_agent();
        (h["update"]["phase"] == "rolled-back").then_some(())
    });
}

#[test]
fn a_build_with_the_wrong_digest_is_never_switched_to() {
    let Some(mut rig) = rig("digest") else { return };
    let before = rig.agent.state()["agent"]["version"].clone();
    let pid = rig.agent.pid();
    let starts = rig.agent.starts();
    // A build for another platform only: the agent is left alone, and says so.
    let (_, mut other) = rig.stamped("9.4.9");
    let mine = this_platform();
    let build = other["artifacts"][&mine].take();
    other["artifacts"] = json!({ "linux/riscv64": build });
    rig.deploy(Some(other));
    let a = rig.wait_agent("skipped", Duration::from_secs(30), |a| {
        phase(a) == "skipped"
    });
    let reason = a["update"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "no build for this device's platform {mine} (it names linux/riscv64)"
        )),
        "{reason}"
    );
    let (_, mut section) = rig.stamped("9.5.0");
    let platform = this_platform();
    section["artifacts"][&platform]["sha256"] = json!("0".repeat(64));
    rig.deploy(Some(section));
    let a = rig.wait_agent("failed", Duration::from_secs(60), |a| phase(a) == "failed");
    let reason = a["update"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SHA-256"), "{reason}");
    assert_eq!(a["version"], before);
    assert_eq!(
        (rig.agent.pid(), rig.agent.starts()),
        (pid, starts),
        "the agent was never stopped"
    );
    assert!(
        !rig.agent.state_dir().join("agent/a/outpost").exists(),
        "nothing was put in a slot"
    );
    rig.assert_settled(before.as_str().unwrap(), "installed");
}

#[test]
fn kill9_during_the_download_resumes_it() {
    let Some(mut rig) = rig("killdl") else { return };
    let (file, section) = rig.stamped("9.6.0");
    let size = std::fs::metadata(&file).unwrap().len();
    // About 8 seconds for the whole file.
    rig.server.throttle(size / 8);
    rig.deploy(Some(section));
    let part = wait_for("a partial download", Duration::from_secs(60), || {
        std::fs::read_dir(rig.agent.state_dir().join("agent/download"))
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| {
                e.file_name().to_string_lossy().ends_with(".part")
                    && e.metadata().is_ok_and(|m| m.len() > size / 5)
            })
            .map(|e| e.path())
    });
    rig.agent.kill9();
    let had = std::fs::metadata(&part).unwrap().len();
    rig.server.throttle(0);
    rig.wait_agent("committed", Duration::from_secs(120), |a| {
        a["version"] == "9.6.0" && phase(a) == "committed"
    });
    rig.assert_settled("9.6.0", "a");
    let resumed = rig
        .server
        .seen()
        .iter()
        .any(|s| s.from > 0 && s.from <= had);
    assert!(
        resumed,
        "the download went on from its part: {:?} (had {had})",
        rig.server.seen()
    );
}

#[test]
fn kill9_during_the_switch_and_the_probation_ends_on_one_version() {
    let Some(mut rig) = rig("killsw") else { return };
    let (_, section) = rig.stamped("9.7.0");
    rig.deploy(Some(section));
    // The switch: the trial is recorded and the old agent is handing over.
    let record = rig.agent.state_dir().join("agent/update.json");
    wait_for("the trial recorded", Duration::from_secs(60), || {
        let r: Value = serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
        (r["trial"]["starts"] == 0).then_some(())
    });
    rig.agent.kill9();
    // Probation: the launcher (the service's process) is killed; its agent on trial goes
    // with it, and the next start goes on with the trial.
    rig.wait_agent("on probation", Duration::from_secs(60), |a| {
        phase(a) == "probation"
    });
    rig.agent.kill9();
    rig.wait_agent("committed", Duration::from_secs(90), |a| {
        a["version"] == "9.7.0" && phase(a) == "committed"
    });
    rig.assert_settled("9.7.0", "a");
    let log = rig.agent.log();
    assert!(
        log.contains("version=9.7.0 slot=\"a\" start=2"),
        "the trial was started again after the kill: {log}"
    );

    // Probation again, on the next update: this time the agent on trial itself is killed.
    let (_, section) = rig.stamped("9.8.0");
    rig.deploy(Some(section));
    rig.wait_agent("on probation", Duration::from_secs(60), |a| {
        phase(a) == "probation" && a["version"] == "9.8.0"
    });
    let launcher = rig.agent.pid().unwrap();
    let child = rig
        .agent_processes()
        .into_iter()
        .find(|p| *p != launcher)
        .expect("the agent on trial is a child of the launcher");
    run(Command::new("kill").args(["-KILL", &child.to_string()]));
    rig.wait_agent("committed", Duration::from_secs(90), |a| {
        a["version"] == "9.8.0" && phase(a) == "committed"
    });
    rig.assert_settled("9.8.0", "b");
    assert_eq!(rig.record()["last"]["phase"], "committed");
    let log = rig.agent.log();
    assert!(
        log.contains("killed by signal 9"),
        "the launcher saw its trial killed and started it again: {log}"
    );
}
