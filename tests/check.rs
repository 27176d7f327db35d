//! `outpost check` against the real broker (Mosquitto of the harness, test PKI) and the real
//! Docker engine: an all-good device, then a deliberately broken configuration, one failing
//! check at a time, each asserting the finding's level and that its fix is named.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::*;
use serde_json::Value;

/// A device configuration, part by part, so that each case changes one thing.
struct Device {
    dir: tempfile::TempDir,
    hub: String,
    policy: String,
    runtime: String,
    bus: String,
    state_dir: PathBuf,
    top: String,
}

impl Device {
    fn new(broker: &Broker) -> Device {
        require_docker();
        let dir = tempfile::tempdir().expect("dir");
        let key = outpost_agent::signing::generate_key().expect("key");
        outpost_agent::signing::write_key_pair(&key, &dir.path().join("ops")).expect("keys");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        let bus_port = free_port();
        Device {
            hub: broker.device_hub_section(),
            policy: format!(
                "[policy]\ntrusted_keys = [\"{}\"]\n",
                dir.path().join("ops.pub").display()
            ),
            runtime: String::new(),
            bus: format!("[bus]\nlisten = \"127.0.0.1:{bus_port}\"\n"),
            state_dir,
            top: String::new(),
            dir,
        }
    }

    fn write(&self) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        std::fs::write(
            &path,
            format!(
                "device_id = \"chk-{pid}\"\nstate_dir = \"{state}\"\n{top}\n[api]\nsocket = \"{root}/api.sock\"\n\
                 [runtime]\n{runtime}\n{hub}\n{policy}\n{bus}\n",
                pid = std::process::id(),
                state = self.state_dir.display(),
                top = self.top,
                root = self.dir.path().display(),
                runtime = self.runtime,
                hub = self.hub,
                policy = self.policy,
                bus = self.bus,
            ),
        )
        .expect("write config");
        path
    }

    /// `outpost check --json` and `outpost check` (human): exit code, findings, text.
    fn check(&self) -> Checked {
        self.check_env(&[])
    }

    fn check_env(&self, env: &[(String, String)]) -> Checked {
        let config = self.write();
        let started = Instant::now();
        let json = outpost_command()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--config")
            .arg(&config)
            .args(["check", "--json"])
            .output()
            .expect("run outpost check --json");
        let elapsed = started.elapsed();
        let human = outpost_command()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--config")
            .arg(&config)
            .arg("check")
            .output()
            .expect("run outpost check");
        let report: Value = serde_json::from_slice(&json.stdout).unwrap_or_else(|e| {
            panic!(
                "check --json is not JSON ({e}): {}{}",
                String::from_utf8_lossy(&json.stdout),
                String::from_utf8_lossy(&json.stderr)
            )
        });
        assert_eq!(json.status.code(), human.status.code());
        Checked {
            code: json.status.code().unwrap_or(-1),
            findings: report["findings"].as_array().cloned().unwrap_or_default(),
            text: String::from_utf8_lossy(&human.stdout).into_owned(),
            elapsed,
        }
    }
}

struct Checked {
    code: i32,
    findings: Vec<Value>,
    text: String,
    elapsed: Duration,
}

impl Checked {
    fn finding(&self, check: &str) -> &Value {
        self.findings
            .iter()
            .find(|f| f["check"] == check)
            .unwrap_or_else(|| panic!("no `{check}` finding in:\n{}", self.text))
    }

    /// Asserts `check` came out at `level`, its message has `says` and its fix has `fix`
    /// (in the JSON and in the human lines).
    fn expect(&self, check: &str, level: &str, says: &str, fix: &str) {
        let f = self.finding(check);
        assert_eq!(f["level"], level, "{check}:\n{}", self.text);
        let message = f["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(says),
            "{check} should say `{says}`:\n{}",
            self.text
        );
        if level == "ok" {
            return;
        }
        let fixed = f["fix"].as_str().unwrap_or_default();
        assert!(
            fixed.contains(fix),
            "{check}'s fix should name `{fix}`:\n{}",
            self.text
        );
        assert!(
            self.text.contains(&format!("fix: {fixed}")),
            "the human output shows the fix:\n{}",
            self.text
        );
        let worst = if level == "error" { 2 } else { 1 };
        assert!(self.code >= worst, "exit code {} for {level}", self.code);
    }
}

fn mutual_tls() -> Option<Broker> {
    Broker::start_exact(Auth::MutualTls).expect("broker")
}

#[test]
fn a_healthy_device_passes_every_check() {
    let Some(broker) = mutual_tls() else { return };
    let device = Device::new(&broker);
    let c = device.check();
    eprintln!("{}", c.text);
    for check in [
        "config",
        "state-dir",
        "disk-space",
        "identity",
        "cert-expiry",
        "hub-reachable",
        "hub-tls",
        "hub-mqtt",
        "hub-acl",
        "trusted-keys",
        "agent-update",
        "engine",
        "log-rotation",
        "clock",
        "bus-port",
    ] {
        c.finding(check);
    }
    let not_ok: Vec<&Value> = c.findings.iter().filter(|f| f["level"] != "ok").collect();
    // The engine's log rotation is the machine's, not the test's: allow only that warning.
    assert!(
        not_ok.iter().all(|f| f["check"] == "log-rotation"),
        "{}",
        c.text
    );
    assert_eq!(c.code, if not_ok.is_empty() { 0 } else { 1 }, "{}", c.text);
    assert!(
        c.finding("hub-acl")["message"]
            .as_str()
            .unwrap()
            .contains("read back")
    );
    assert!(c.text.contains("ok       config"), "{}", c.text);
    assert!(
        !c.text.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );
}

#[test]
fn a_ca_that_did_not_sign_the_broker_is_a_tls_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.hub = device.hub.replace(
        &broker.pki.ca.display().to_string(),
        &broker.pki.other_ca.display().to_string(),
    );
    let c = device.check();
    c.expect("hub-tls", "error", "not signed by", "hub.ca_file");
    assert_eq!(c.code, 2);
}

#[test]
fn a_hub_that_is_down_or_black_holed_fails_within_seconds() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    let url = broker.device_url();
    device.hub = device
        .hub
        .replace(&url, &format!("mqtts://localhost:{}", free_port()));
    let c = device.check();
    c.expect("hub-reachable", "error", "refused", "start the broker");
    // A black hole past the TCP handshake (a balancer with no live backend): connections
    // are accepted and never answered. Each step's timeout ends it within seconds.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = tarpit.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in tarpit.incoming() {
            held.push(stream);
        }
    });
    device.hub = broker
        .device_hub_section()
        .replace(&url, &format!("mqtts://localhost:{port}"));
    let c = device.check();
    c.expect("hub-reachable", "ok", "accepts TCP", "-");
    c.expect("hub-tls", "error", "timed out", "broker runs");
    assert!(
        c.elapsed < Duration::from_secs(10),
        "check took {:?} against a black-holed hub",
        c.elapsed
    );
}

#[test]
fn each_failover_endpoint_is_checked_on_its_own() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    let down = free_port();
    device.hub = format!(
        "{}failover_urls = [\"mqtts://localhost:{down}\"]\n",
        broker.device_hub_section()
    );
    let c = device.check();
    let up = format!("localhost:{}", broker.port);
    c.expect(&format!("hub-acl {up}"), "ok", "read back", "-");
    c.expect(
        &format!("hub-reachable localhost:{down}"),
        "error",
        "refused",
        "hub.failover_urls",
    );
    assert_eq!(c.code, 2);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused_by_the_broker() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.hub = device
        .hub
        .replace(
            &broker.pki.client_cert.display().to_string(),
            &broker.pki.other_client_cert.display().to_string(),
        )
        .replace(
            &broker.pki.client_key.display().to_string(),
            &broker.pki.other_client_key.display().to_string(),
        );
    let c = device.check();
    // TLS 1.3 reports the broker's verdict on the first read, after the handshake.
    let refused = ["hub-tls", "hub-mqtt"]
        .into_iter()
        .find(|check| {
            c.findings
                .iter()
                .any(|f| f["check"] == *check && f["level"] == "error")
        })
        .unwrap_or_else(|| panic!("no hub error:\n{}", c.text));
    c.expect(refused, "error", "client certificate", "hub.cert_file");
    c.expect("identity", "ok", "go together", "-");
}

#[test]
fn a_key_that_is_not_the_certificates_is_an_identity_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.hub = device.hub.replace(
        &broker.pki.client_key.display().to_string(),
        &broker.pki.other_client_key.display().to_string(),
    );
    let c = device.check();
    c.expect("identity", "error", "do not go together", "hub.key_file");
}

/// A client certificate and key valid from `from` to `to` (Unix days), self-signed.
fn certificate(dir: &Path, name: &str, from: i64, to: i64) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "device");
    let day = |d: i64| time::OffsetDateTime::from_unix_timestamp(d * 86_400).expect("a date");
    params.not_before = day(from);
    params.not_after = day(to);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).expect("cert");
    std::fs::write(&k, key.serialize_pem()).expect("key");
    (c, k)
}

#[test]
fn an_expired_or_expiring_certificate_is_named() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    let today = (unix_now() / 86_400) as i64;
    let with = |device: &mut Device, cert: &Path, key: &Path| {
        device.hub = broker
            .device_hub_section()
            .replace(
                &broker.pki.client_cert.display().to_string(),
                &cert.display().to_string(),
            )
            .replace(
                &broker.pki.client_key.display().to_string(),
                &key.display().to_string(),
            );
    };
    let (cert, key) = certificate(device.dir.path(), "expired", today - 400, today - 35);
    with(&mut device, &cert, &key);
    let c = device.check();
    c.expect("cert-expiry", "error", "expired", "new certificate");
    assert_eq!(c.code, 2);
    let (cert, key) = certificate(device.dir.path(), "soon", today - 300, today + 10);
    with(&mut device, &cert, &key);
    let c = device.check();
    c.expect("cert-expiry", "warning", "days left", "new certificate");
}

#[test]
fn a_missing_engine_socket_is_an_engine_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.runtime = format!(
        "docker_socket = \"{}\"\n",
        device.dir.path().join("no-docker.sock").display()
    );
    let c = device.check();
    c.expect("engine", "error", "no-docker.sock", "runtime.docker_socket");
}

#[test]
fn a_read_only_state_directory_is_an_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    let state = device.dir.path().join("ro-state");
    // Root writes through permission bits (CI runs as root): a read-only mount it cannot.
    let _mount = if rustix_is_root() {
        let tmpfs = Tmpfs::mount(&state, "1m");
        run(Command::new("mount").args(["-o", "remount,ro"]).arg(&state));
        Some(tmpfs)
    } else {
        std::fs::create_dir_all(&state).expect("state");
        run(Command::new("chmod").arg("500").arg(&state));
        None
    };
    device.state_dir = state;
    let c = device.check();
    c.expect("state-dir", "error", "not writable", "state_dir");
}

fn rustix_is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

#[test]
fn no_trusted_keys_is_a_warning() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.policy = String::new();
    let c = device.check();
    c.expect("trusted-keys", "warning", "unsigned", "policy.trusted_keys");
}

#[test]
fn an_invalid_configuration_is_one_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    device.top = "bogus_key = 1\n".into();
    let c = device.check();
    c.expect("config", "error", "bogus_key", "outpost config check");
    assert_eq!(c.findings.len(), 1);
    assert_eq!(c.code, 2);
}

#[test]
fn a_bus_port_held_by_another_process_is_an_error() {
    let Some(broker) = mutual_tls() else { return };
    let mut device = Device::new(&broker);
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    device.bus = format!(
        "[bus]\nlisten = \"{}\"\n",
        squatter.local_addr().expect("addr")
    );
    let c = device.check();
    c.expect("bus-port", "error", "not by a running agent", "bus.listen");
}

#[test]
fn a_clock_at_1970_is_an_error() {
    let Some(broker) = mutual_tls() else { return };
    let device = Device::new(&broker);
    let file = device.dir.path().join("faketime");
    std::fs::write(&file, offset_to_1970()).expect("faketime file");
    let c = device.check_env(&faketime_env(&file));
    c.expect("clock", "error", "not set", "NTP");
}

#[test]
fn a_publish_the_acl_drops_is_caught_by_the_probe() {
    let Some(broker) = Broker::start_acl(Acl {
        username: "device".into(),
        password: "probe-pw-1234".into(),
        publish: vec!["nowhere/#".into()],
    })
    .expect("broker") else {
        return;
    };
    let device = Device::new(&broker);
    let c = device.check();
    c.expect("hub-mqtt", "ok", "accepted CONNECT", "-");
    c.expect("hub-acl", "error", "did not come back", "docs/hub.md");
}
