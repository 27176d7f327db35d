//! First boot by claim, against the real parts: Mosquitto with mutual TLS and exactly the ACL
//! file of docs/provisioning.md, the real responder (`outpost-ctl provision serve`), the real
//! agent (`outpost run`) started from a provisioning-only configuration, and the real engine.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

/// The ACL block of docs/provisioning.md: the tests run with what the docs give.
fn acl_from_docs() -> String {
    let doc = std::fs::read_to_string(workspace().join("docs/provisioning.md")).unwrap();
    let after = doc
        .split_once("<!-- acl-file -->")
        .expect("docs/provisioning.md marks its ACL file")
        .1;
    let block = after.split_once("```").unwrap().1;
    let body = block.split_once('\n').unwrap().1;
    body.split_once("```").unwrap().0.to_string()
}

/// The hub of these tests: the operator is `_operator` (full access by the ACL).
fn hub() -> Broker {
    Broker::start_mosquitto_acl_file("_operator", &acl_from_docs()).unwrap()
}

struct Responder {
    child: Child,
    log: PathBuf,
}

impl Responder {
    /// `outpost-ctl provision serve` against `broker`, signing with the test CA, its record in
    /// `state`; returns once it is subscribed.
    fn start(broker: &Broker, dir: &Path, state: &Path, extra: &[&str]) -> Responder {
        let log = dir.join(format!("responder-{}.log", free_port()));
        let child = Command::new(ctl_bin())
            .args(broker.cli_flags(dir).unwrap())
            .args(["provision", "serve", "--ca-cert"])
            .arg(&broker.pki.ca)
            .arg("--ca-key")
            .arg(&broker.pki.ca_key)
            .arg("--state-dir")
            .arg(state)
            .args(["--name-template", "cam-{serial}", "--groups", "line-3"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start outpost-ctl provision serve");
        let r = Responder { child, log };
        wait_for(
            "the responder to subscribe",
            Duration::from_secs(20),
            || r.log().contains("waiting for requests").then_some(()),
        );
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- responder log ----\n{}", self.log());
        }
    }
}

/// The golden image's configuration: the hub, its CA, the claim identity and where the serial
/// comes from (an environment variable here, so two agents share the same sections).
fn provisioning_sections(broker: &Broker, claim: &(PathBuf, PathBuf)) -> String {
    format!(
        "[hub]\nurl = \"{}\"\nca_file = \"{}\"\nreconnect_max_secs = 1\n\
         [provisioning]\nclaim_cert_file = \"{}\"\nclaim_key_file = \"{}\"\n\
         serial_command = \"echo $OUTPOST_TEST_SERIAL\"\nretry_max_secs = 5\n",
        broker.url(),
        broker.pki.ca.display(),
        claim.0.display(),
        claim.1.display()
    )
}

fn provisioned_agent(broker: &Broker, claim: &(PathBuf, PathBuf), serial: &str) -> Agent {
    let mut agent = Agent::configure_provisioned(
        &format!("cam-{serial}"),
        &provisioning_sections(broker, claim),
    );
    agent
        .env
        .push(("OUTPOST_TEST_SERIAL".into(), serial.to_string()));
    agent
}

fn identity(agent: &Agent) -> Option<Value> {
    let text = std::fs::read(agent.state_dir().join("identity/identity.json")).ok()?;
    serde_json::from_slice(&text).ok()
}

fn applied(args: &[String], device: &str) -> bool {
    let out = Command::new(ctl_bin())
        .args(args)
        .args(["status", "--device", device, "--json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && text.contains("\"applied\"")
}

/// A unique serial per test run (several runs may share the engine).
fn serial(name: &str) -> String {
    format!("SN-{name}-{}", std::process::id())
}

#[test]
fn one_image_provisions_two_devices_that_take_their_groups_deployment() {
    let broker = hub();
    let dir = tempfile::tempdir().unwrap();
    let claim = broker.pki.issue_client("_claim").unwrap();
    let _responder = Responder::start(
        &broker,
        dir.path(),
        &dir.path().join("responder"),
        &["--allow-pattern", "SN-*"],
    );
    let image = format!("outpost-test/provisioned:{}", std::process::id());
    local_test_image(&image, "");
    let args = broker.cli_flags(dir.path()).unwrap();
    // The group's deployment is on the hub before any device exists.
    let manifest = json!({
        "schemaVersion": "1.0", "id": "line-3", "version": 1,
        "modules": { "worker": { "image": image } }
    });
    let file = dir.path().join("line-3.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let out = Command::new(ctl_bin())
        .args(&args)
        .args(["deploy", "--group", "line-3", "--no-wait"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "group deploy: {out:?}");

    let (a, b) = (serial("a"), serial("b"));
    let mut first = provisioned_agent(&broker, &claim, &a);
    let mut second = provisioned_agent(&broker, &claim, &b);
    first.spawn_detached();
    second.spawn_detached();
    for (agent, serial) in [(&first, &a), (&second, &b)] {
        agent.wait_ready(Duration::from_secs(60));
        let id = identity(agent).expect("identity.json after first boot");
        assert_eq!(id["deviceId"], format!("cam-{serial}"));
        assert_eq!(id["groups"], json!(["line-3"]));
        let pem = std::fs::read_to_string(agent.state_dir().join("identity/device.pem")).unwrap();
        assert!(pem.contains("PRIVATE KEY") && pem.matches("BEGIN CERTIFICATE").count() == 2);
        assert!(
            !agent.state_dir().join("identity/pending-key.pem").exists(),
            "the pending key is gone once committed"
        );
        // Connected as the device (the broker knows it by its certificate), it takes its
        // group's deployment and reports applied on its own topics.
        let device = format!("cam-{serial}");
        wait_for(
            &format!("{device} to report applied"),
            Duration::from_secs(90),
            || applied(&args, &device).then_some(()),
        );
        let running = containers(&device)
            .into_iter()
            .filter(|c| c.2 == "running")
            .count();
        assert_eq!(running, 1, "{device}'s module runs");
    }
    // The key never left the device: the responder's record holds its hash, not the key.
    let record =
        std::fs::read_to_string(dir.path().join("responder/issued.jsonl")).unwrap_or_default();
    assert_eq!(record.lines().count(), 2, "{record}");
    assert!(!record.contains("PRIVATE KEY"));
}

#[test]
fn the_claim_identity_can_only_ask_and_a_serial_not_allowed_is_refused() {
    let broker = hub();
    let dir = tempfile::tempdir().unwrap();
    let claim = broker.pki.issue_client("_claim").unwrap();
    let args = broker.cli_flags(dir.path()).unwrap();
    // What a device and a group have on the hub (retained).
    let device = "cam-SN-victim";
    let deployment = dir.path().join("d.json");
    std::fs::write(
        &deployment,
        json!({"schemaVersion": "1.0", "id": "g", "version": 1, "modules": {}}).to_string(),
    )
    .unwrap();
    for target in [["--device", device], ["--group", "line-3"]] {
        let out = Command::new(ctl_bin())
            .args(&args)
            .arg("deploy")
            .args(target)
            .arg("--no-wait")
            .arg(&deployment)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut settings = broker.client_settings(dir.path(), "claim-SN-x").unwrap();
        if let Some(tls) = settings.tls.as_mut() {
            tls.client_auth = Some(claim.clone());
        }
        let (client, mut events) = outpost_agent::hub::link::client(&settings, None).unwrap();
        use rumqttc::{Event, Packet, QoS};
        let forbidden = [
            format!("outpost/{device}/deployment"),
            "outpost/groups/line-3/deployment".to_string(),
            "outpost/#".to_string(),
        ];
        let own = "outpost/_provisioning/claim/claim-SN-x/response";
        let mut seen: Vec<String> = Vec::new();
        let mut step = 0;
        let done = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match events.poll().await.expect("the claim identity connects") {
                    Event::Incoming(Packet::ConnAck(_)) => {
                        // Writes where it may not, then the one place it may, in order: once
                        // the last is acknowledged, the broker has dealt with all of them.
                        for t in [
                            format!("outpost/{device}/deployment"),
                            format!("outpost/{device}/state"),
                            "outpost/groups/line-3/deployment".to_string(),
                        ] {
                            client
                                .publish(t, QoS::AtLeastOnce, true, "forged")
                                .await
                                .unwrap();
                        }
                        for t in &forbidden {
                            client.subscribe(t.clone(), QoS::AtLeastOnce).await.unwrap();
                        }
                        client.subscribe(own, QoS::AtLeastOnce).await.unwrap();
                    }
                    // Retained messages follow their SUBACK: by the last SUBACK (its own
                    // topic's), every retained message of the earlier filters has arrived.
                    Event::Incoming(Packet::SubAck(_)) => {
                        step += 1;
                        if step == forbidden.len() + 1 {
                            return;
                        }
                    }
                    Event::Incoming(Packet::Publish(p)) => seen.push(p.topic.clone()),
                    _ => {}
                }
            }
        })
        .await;
        assert!(done.is_ok(), "subscriptions not acknowledged");
        assert!(
            seen.is_empty(),
            "the claim identity read device or group topics: {seen:?}"
        );
    });
    // Its writes did not land: the device's and the group's deployments are the operator's.
    for topic in [
        format!("outpost/{device}/deployment"),
        "outpost/groups/line-3/deployment".to_string(),
    ] {
        let out = Command::new("mosquitto_sub")
            .args(mosquitto_flags(&broker))
            .args(["-t", &topic, "-C", "1", "-W", "5"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("schemaVersion") && !text.contains("forged"),
            "{topic}: {text}"
        );
    }

    // A serial the responder does not allow: refused, with the reason in the device's log
    // and in its state folder (for `outpost check`); nothing is issued.
    let _responder = Responder::start(
        &broker,
        dir.path(),
        &dir.path().join("responder"),
        &["--allow-pattern", "SN-*"],
    );
    let mut outsider = provisioned_agent(&broker, &claim, "XX-1");
    outsider.spawn_detached();
    wait_for(
        "the refusal in the agent's log",
        Duration::from_secs(60),
        || {
            outsider
                .log()
                .contains("not allowed by this responder")
                .then_some(())
        },
    );
    let refusal = std::fs::read_to_string(outsider.state_dir().join("identity/refusal.json"))
        .expect("refusal.json");
    assert!(refusal.contains("XX-1"), "{refusal}");
    assert!(identity(&outsider).is_none());
    // `outpost check` names the refusal and what to do.
    let finding = check_finding(&outsider, "provisioning");
    assert_eq!(finding["level"], "error", "{finding}");
    assert!(
        finding["message"]
            .as_str()
            .unwrap()
            .contains("not allowed by this responder"),
        "{finding}"
    );
    assert!(
        finding["fix"].as_str().unwrap().contains("--allow"),
        "{finding}"
    );
}

/// `outpost check --json`'s finding named `name`.
fn check_finding(agent: &Agent, name: &str) -> Value {
    let out = agent.outpost(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --json: {e}: {out:?}"));
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == name)
        .unwrap_or_else(|| panic!("no `{name}` finding in {report}"))
        .clone()
}

/// `mosquitto_sub` flags for the operator's certificate.
fn mosquitto_flags(broker: &Broker) -> Vec<String> {
    vec![
        "-h".into(),
        "localhost".into(),
        "-p".into(),
        broker.port.to_string(),
        "--cafile".into(),
        broker.pki.ca.display().to_string(),
        "--cert".into(),
        broker.pki.client_cert.display().to_string(),
        "--key".into(),
        broker.pki.client_key.display().to_string(),
    ]
}

#[test]
fn a_device_killed_while_provisioning_provisions_on_restart_with_the_same_key() {
    let broker = hub();
    let dir = tempfile::tempdir().unwrap();
    let claim = broker.pki.issue_client("_claim").unwrap();
    let serial = serial("k");
    let device = format!("cam-{serial}");
    let mut agent = provisioned_agent(&broker, &claim, &serial);
    // No responder yet: the device made its key and keeps asking.
    agent.spawn_detached();
    let pending = agent.state_dir().join("identity/pending-key.pem");
    wait_for("the pending key", Duration::from_secs(30), || {
        pending.exists().then_some(())
    });
    let key = std::fs::read_to_string(&pending).unwrap();
    agent.kill9();

    let responder_state = dir.path().join("responder");
    let responder = Responder::start(&broker, dir.path(), &responder_state, &["--allow-any"]);
    agent.spawn_detached();
    agent.wait_ready(Duration::from_secs(60));
    let pem = std::fs::read_to_string(agent.state_dir().join("identity/device.pem")).unwrap();
    assert!(
        pem.starts_with(&key),
        "the key made before the kill is the device's key"
    );
    assert_eq!(identity(&agent).unwrap()["deviceId"], device);

    // Killed after the certificate was stored but before the identity was (the commit point):
    // it asks again with the same key, and the responder answers again — without --reissue.
    agent.kill9();
    std::fs::remove_file(agent.state_dir().join("identity/identity.json")).unwrap();
    drop(responder);
    let _responder = Responder::start(&broker, dir.path(), &responder_state, &["--allow-any"]);
    agent.spawn_detached();
    agent.wait_ready(Duration::from_secs(60));
    assert_eq!(identity(&agent).unwrap()["deviceId"], device);
    let again = std::fs::read_to_string(agent.state_dir().join("identity/device.pem")).unwrap();
    assert!(again.starts_with(&key), "still the same key");
    let record = std::fs::read_to_string(responder_state.join("issued.jsonl")).unwrap();
    assert_eq!(record.lines().count(), 2, "{record}");
}

/// Renewal records of the responder for `device`.
fn renewals(state: &Path, device: &str) -> usize {
    std::fs::read_to_string(state.join("issued.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"kind\":\"renew\"") && l.contains(device))
        .count()
}

fn online(args: &[String], device: &str) -> bool {
    let out = Command::new(ctl_bin())
        .args(args)
        .args(["status", "--device", device, "--json"])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let text = v.to_string();
    out.status.success() && text.contains("\"online\":true")
}

/// A hub, a responder issuing 30-second certificates, and a configured (not started) agent.
struct Renewing {
    broker: Broker,
    dir: tempfile::TempDir,
    /// The responder's state folder (its record).
    state: PathBuf,
    device: String,
    agent: Agent,
    _responder: Responder,
}

impl Renewing {
    fn start(name: &str) -> Renewing {
        let broker = hub();
        let dir = tempfile::tempdir().unwrap();
        let claim = broker.pki.issue_client("_claim").unwrap();
        let state = dir.path().join("responder");
        let responder = Responder::start(
            &broker,
            dir.path(),
            &state,
            &["--allow-any", "--validity-secs", "30"],
        );
        let serial = serial(name);
        let agent = provisioned_agent(&broker, &claim, &serial);
        Renewing {
            broker,
            dir,
            state,
            device: format!("cam-{serial}"),
            agent,
            _responder: responder,
        }
    }
}

/// Short-lived certificates (30 s): renewed at two thirds, and the renewed one is what the
/// device reconnects with once the first has expired.
#[test]
fn short_lived_certificates_are_renewed_and_used_after_the_first_expires() {
    let Renewing {
        mut broker,
        dir,
        state,
        device,
        mut agent,
        _responder,
    } = Renewing::start("r");
    agent.spawn_detached();
    agent.wait_ready(Duration::from_secs(60));
    let first = identity(&agent).unwrap();
    wait_for("a renewal", Duration::from_secs(60), || {
        (renewals(&state, &device) >= 1).then_some(())
    });
    // Past the first certificate's end, the hub restarts: the device must reconnect, which
    // only the renewed certificate can do.
    let first_end = first["notAfter"].as_u64().unwrap();
    wait_for(
        "the first certificate to expire",
        Duration::from_secs(60),
        || (unix_now() > first_end + 1).then_some(()),
    );
    broker.restart().unwrap();
    let args = broker.cli_flags(dir.path()).unwrap();
    wait_for("the device back online", Duration::from_secs(60), || {
        online(&args, &device).then_some(())
    });
    // About one renewal per 20 s: no loop.
    let count = renewals(&state, &device);
    assert!((1..=5).contains(&count), "{count} renewals");
}

/// A device whose clock reads 1970 (no RTC): it reaches the hub, renews in time on what it
/// measures, not in a loop; when NTP jumps the clock to now it renews at most once more.
#[test]
fn a_clock_at_1970_neither_loops_nor_lapses() {
    let Renewing {
        mut broker,
        dir,
        state,
        device,
        mut agent,
        _responder,
    } = Renewing::start("t");
    let clock = dir.path().join("faketime");
    std::fs::write(&clock, offset_to_1970()).unwrap();
    agent.env.extend(faketime_env(&clock));
    agent.spawn_detached();
    agent.wait_ready(Duration::from_secs(60));
    let first = identity(&agent).unwrap();
    assert!(
        first["clockOffsetSecs"].as_i64().unwrap() > 50 * 365 * 86_400,
        "the device saw its clock 56 years behind the responder's: {first}"
    );
    wait_for("two renewals at 1970", Duration::from_secs(90), || {
        (renewals(&state, &device) >= 2).then_some(())
    });
    let at_1970 = renewals(&state, &device);
    // It never lapsed: after the first certificate's end, a hub restart finds it back.
    broker.restart().unwrap();
    let args = broker.cli_flags(dir.path()).unwrap();
    wait_for("the device back online", Duration::from_secs(60), || {
        online(&args, &device).then_some(())
    });
    // NTP answers: the clock jumps 56 years. One early renewal at most, then the normal pace.
    std::fs::write(&clock, "+0").unwrap();
    let before_jump = renewals(&state, &device);
    wait_for(
        "the renewal after the jump",
        Duration::from_secs(60),
        || (renewals(&state, &device) > before_jump).then_some(()),
    );
    // The device stores what it got: the new offset is right.
    let jumped = wait_for("the renewed identity", Duration::from_secs(30), || {
        identity(&agent).filter(|id| id["clockOffsetSecs"].as_i64().unwrap().abs() < 60)
    });
    let after_jump = renewals(&state, &device);
    assert!(jumped["issuedAt"].as_u64() > first["issuedAt"].as_u64());
    assert!(
        at_1970 <= 4 && after_jump - before_jump <= 2,
        "renewals: {at_1970} at 1970, {} right after the jump",
        after_jump - before_jump
    );
}

/// The golden image's tree (scripts/golden-image: debootstrap, the package, a provisioning
/// config) boots its agent through first boot: the tree's binary and configuration, the serial
/// from the tree's /etc/machine-id, the state in the tree's /var/lib/outpost.
#[test]
fn the_golden_image_tree_boots_the_agent_through_provisioning() {
    let cargo_deb = cargo_deb().display().to_string();
    if !have_tools(
        "golden image",
        &["dpkg-deb", "debootstrap", "chroot", &cargo_deb],
        true,
    ) {
        return;
    }
    let broker = hub();
    let dir = tempfile::tempdir().unwrap();
    let claim = broker.pki.issue_client("_claim").unwrap();
    let tree = golden_tree(
        "amd64",
        &Golden {
            hub_url: broker.url(),
            ca_file: broker.pki.ca.clone(),
            claim_cert: claim.0.clone(),
            claim_key: claim.1.clone(),
            serial_file: None,
        },
    );
    let _responder = Responder::start(
        &broker,
        dir.path(),
        &dir.path().join("responder"),
        &["--allow-any"],
    );
    // The board's first boot: systemd writes its machine id, the image's serial source.
    let machine_id = format!(
        "{:032x}",
        u128::from(std::process::id()) * 0x9e37_79b9_7f4a_7c15
    );
    tree.first_boot_machine_id(&machine_id);
    std::fs::create_dir_all(tree.root.join("run/outpost")).unwrap();
    let log = dir.path().join("tree-agent.log");
    let mut agent = tree
        .outpost_from_host()
        .arg("run")
        .env(
            "OUTPOST__PROVISIONING__SERIAL_FILE",
            tree.root.join("etc/machine-id"),
        )
        .env("OUTPOST__BUS__LISTEN", bus_listen())
        .env("OUTPOST__HUB__RECONNECT_MAX_SECS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let identity = tree.root.join("var/lib/outpost/identity/identity.json");
    let device = format!("cam-{machine_id}");
    let args = broker.cli_flags(dir.path()).unwrap();
    let result = std::panic::catch_unwind(|| {
        wait_for(
            "the tree's agent provisioned",
            Duration::from_secs(90),
            || identity.exists().then_some(()),
        );
        let id: Value = serde_json::from_slice(&std::fs::read(&identity).unwrap()).unwrap();
        assert_eq!(id["deviceId"], device);
        wait_for(
            "the device online on the hub",
            Duration::from_secs(60),
            || online(&args, &device).then_some(()),
        );
    });
    let _ = agent.kill();
    let _ = agent.wait();
    if let Err(e) = result {
        eprintln!(
            "---- tree agent log ----\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::panic::resume_unwind(e);
    }
}
