//! The support bundle, on the real agent, engine and broker: made on the device
//! (`outpost support-bundle`, with the agent running and stopped) and asked for over the hub
//! (`outpost-ctl cmd support-bundle --out`). Each time it unpacks, holds the expected members,
//! and none of the secrets planted in the password file, the device key, the bus password and
//! a module's environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::json;

const HUB_PASSWORD: &str = "hubpw-7f3a9c-planted";
const MODULE_SECRET: &str = "tok-e41b-bundle-secret";
/// Five lines of 100 KB of random base64 (incompressible past base64's 3/4), then the
/// environment, then a marker.
const NOISY: &str = "for i in 1 2 3 4 5; do head -c 75000 /dev/urandom | base64 | tr -d '\\n'; echo; done; \
                     env; echo done printing; exec sleep 3600";

struct Setup {
    broker: Broker,
    agent: Agent,
    /// The secrets that must not be in any bundle, by what they are.
    secrets: Vec<(&'static str, String)>,
}

/// A broker with a password login (the planted password), an agent logging in with it and
/// presenting the test client certificate, and a module that prints its whole environment
/// after about 500 KB of random text (so the bundle, compressed, takes several chunks).
fn setup(name: &str) -> Option<Setup> {
    let broker = Broker::start_exact(Auth::Password {
        username: "device".into(),
        password: HUB_PASSWORD.into(),
    })
    .expect("broker")?;
    let image = format!("outpost-test/busybox:{name}");
    busybox_image(&image);
    let device = format!("{name}-{}", std::process::id());
    let hub = format!(
        "{}cert_file = \"{}\"\nkey_file = \"{}\"\n",
        broker.device_hub_section(),
        broker.pki.client_cert.display(),
        broker.pki.client_key.display()
    );
    let agent = Agent::start(&device, &hub);
    let d = json!({
        "schemaVersion": "1.0", "id": name, "version": 1,
        "modules": { "app": {
            "image": image,
            "env": { "API_TOKEN": MODULE_SECRET },
            "createOptions": { "Cmd": ["sh", "-c", NOISY] }
        } }
    });
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}");
    wait_for("the module's output", Duration::from_secs(60), || {
        module_logs(&device, "app")
            .contains("done printing")
            .then_some(())
    });
    let bus_password = module_env(&device, "app")
        .remove("OUTPOST_BUS_PASSWORD")
        .expect("the module's bus password");
    // The key's body: any of its base64 lines would do; the longest is the most telling.
    let key_text = std::fs::read_to_string(&broker.pki.client_key).expect("key");
    let key_line = key_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .max_by_key(|l| l.len())
        .expect("a key body")
        .to_string();
    let bus_key = std::fs::read(agent.state_dir().join("bus.key")).expect("bus.key");
    let bus_key_hex: String = bus_key.iter().map(|b| format!("{b:02x}")).collect();
    Some(Setup {
        broker,
        agent,
        secrets: vec![
            ("the hub password file's content", HUB_PASSWORD.to_string()),
            ("the device key", key_line),
            ("the module's bus password", bus_password),
            ("the bus key", bus_key_hex),
            ("a module's environment value", MODULE_SECRET.to_string()),
        ],
    })
}

/// Unpacks `bundle` with the system's tar; returns the folder and every member's text.
fn unpack(bundle: &Path) -> (tempfile::TempDir, Vec<(String, String)>) {
    let dir = tempfile::tempdir().expect("dir");
    run(Command::new("tar")
        .arg("-xzf")
        .arg(bundle)
        .arg("-C")
        .arg(dir.path()));
    let mut members = Vec::new();
    let mut stack = vec![dir.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path
                    .strip_prefix(dir.path())
                    .expect("inside")
                    .display()
                    .to_string();
                let text =
                    String::from_utf8_lossy(&std::fs::read(&path).expect("member")).into_owned();
                members.push((name, text));
            }
        }
    }
    (dir, members)
}

/// The members a bundle must hold, the module's log with its output (redacted), and no secret.
fn assert_bundle(bundle: &Path, secrets: &[(&'static str, String)]) -> Vec<(String, String)> {
    let (_dir, members) = unpack(bundle);
    let names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "README.txt",
        "config.json",
        "check.txt",
        "check.json",
        "state.json",
        "agent.log",
        "engine.json",
        "modules/app.log",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let text = |n: &str| &members.iter().find(|(m, _)| m == n).expect("member").1;
    let log = text("modules/app.log");
    assert!(log.contains("done printing"), "the module's log: {log}");
    assert!(
        log.contains("API_TOKEN=[redacted]"),
        "the module's log: {log}"
    );
    let config: serde_json::Value = serde_json::from_str(text("config.json")).expect("JSON");
    assert!(
        config["hub"]["passwordFile"].is_string() && config["hub"]["keyFile"].is_string(),
        "files are named by path: {config}"
    );
    let check: serde_json::Value = serde_json::from_str(text("check.json")).expect("JSON");
    assert!(check["findings"].as_array().is_some_and(|f| f.len() > 5));
    assert!(text("engine.json").contains("storageDriver"));
    for (what, secret) in secrets {
        for (name, body) in &members {
            assert!(!body.contains(secret.as_str()), "{what} is in {name}");
        }
    }
    members
}

#[test]
fn the_bundle_made_on_the_device_holds_no_secret() {
    let Some(mut s) = setup("bundle-cli") else {
        return;
    };
    let out_dir = tempfile::tempdir().expect("dir");
    let bundle = |agent: &Agent, file: &str| -> PathBuf {
        let path = out_dir.path().join(file);
        let out = agent.outpost(&["support-bundle", "--out", path.to_str().expect("utf-8")]);
        assert!(out.status.success(), "support-bundle: {out:?}");
        path
    };
    let running = bundle(&s.agent, "running.tar.gz");
    let members = assert_bundle(&running, &s.secrets);
    let state = &members
        .iter()
        .find(|(n, _)| n == "state.json")
        .expect("state")
        .1;
    assert!(state.contains("running agent"), "{state}");
    // Stopped, the logs come from the engine and the state from the store.
    s.agent.stop();
    let stopped = bundle(&s.agent, "stopped.tar.gz");
    let members = assert_bundle(&stopped, &s.secrets);
    let state = &members
        .iter()
        .find(|(n, _)| n == "state.json")
        .expect("state")
        .1;
    assert!(state.contains("the store"), "{state}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&stopped).expect("bundle").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn the_operator_gets_the_bundle_over_the_hub() {
    let Some(s) = setup("bundle-hub") else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("bundle.tar.gz");
    // Once the agent's hub link is up, it answers.
    let flags = s.broker.cli_flags(dir.path()).expect("flags");
    wait_for("the device online", Duration::from_secs(30), || {
        let out = Command::new(ctl_bin())
            .args(&flags)
            .args(["cmd", "--device", &s.agent.device, "ping", "--timeout", "5"])
            .output()
            .expect("ping");
        out.status.success().then_some(())
    });
    let out = Command::new(ctl_bin())
        .args(&flags)
        .args([
            "cmd",
            "--device",
            &s.agent.device,
            "support-bundle",
            "--timeout",
            "60",
        ])
        .arg("--out")
        .arg(&file)
        .output()
        .expect("outpost-ctl cmd support-bundle");
    assert!(
        out.status.success(),
        "cmd support-bundle: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("sha256"), "{said}");
    let size = std::fs::metadata(&file).expect("bundle").len();
    eprintln!("bundle over the hub: {size} bytes; {said}");
    assert!(
        size > outpost_core_chunk_bytes(),
        "{size} bytes: the bundle should have taken several chunks"
    );
    let members = assert_bundle(&file, &s.secrets);
    let check = &members
        .iter()
        .find(|(n, _)| n == "check.txt")
        .expect("check")
        .1;
    assert!(check.contains("hub-acl"), "{check}");
    // Without --out there is nowhere to put it: refused before anything is sent.
    let out = Command::new(ctl_bin())
        .args(&flags)
        .args(["cmd", "--device", &s.agent.device, "support-bundle"])
        .output()
        .expect("outpost-ctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--out"));
}

/// The device's chunk size (`outpost_core::wire::bundle::CHUNK_BYTES`, 256 KiB).
fn outpost_core_chunk_bytes() -> u64 {
    256 * 1024
}
