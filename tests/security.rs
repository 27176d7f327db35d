//! Security drills on the real agent and engine: no configured secret reaches the agent's log
//! at any level, the reported state or `outpost list --json`.

use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::json;

#[test]
fn no_secret_reaches_the_log_at_trace_or_the_state() {
    let registry = Registry::start();
    let image = test_image(&registry, "sec-trace", "1");
    let device = format!("sec-trace-{}", std::process::id());
    let mut agent = Agent::configure(&device, "", "");
    // Everything at trace, as someone debugging a device would set it.
    let config = std::fs::read_to_string(&agent.config).expect("config");
    std::fs::write(
        &agent.config,
        config.replace(
            "log_level = \"info,outpost_agent=debug\"",
            "log_level = \"trace\"",
        ),
    )
    .expect("rewrite config");
    agent.spawn();
    let module_secret = "tok-4b1d-module-secret";
    let d = json!({
        "schemaVersion": "1.0",
        "id": "sec",
        "version": 1,
        "modules": { "app": { "image": image, "env": { "API_TOKEN": module_secret } } },
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    });
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}");
    // The module's own bus password, as the engine holds it.
    let bus_password = env_var(&device, "app", "OUTPOST_BUS_PASSWORD");
    let bus_key = std::fs::read(agent.state_dir().join("bus.key")).expect("bus.key");
    let bus_key_hex: String = bus_key.iter().map(|b| format!("{b:02x}")).collect();
    let log = agent.log();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the agent did not log at trace: the scan proves nothing"
    );
    let state = agent.state().to_string();
    let list = String::from_utf8_lossy(&agent.outpost(&["list", "--json"]).stdout).into_owned();
    for (what, secret) in [
        ("the registry password", registry.password.as_str()),
        ("the module's bus password", bus_password.as_str()),
        ("the bus key", bus_key_hex.as_str()),
        ("a module's environment value", module_secret),
    ] {
        for (place, text) in [
            ("the agent's log", &log),
            ("the reported state", &state),
            ("outpost list --json", &list),
        ] {
            assert!(!text.contains(secret), "{what} appears in {place}");
        }
    }
}

#[test]
fn a_module_printing_its_secrets_does_not_leak_them_through_logs() {
    let image = "outpost-test/busybox:sec-logs";
    busybox_image(image);
    let device = format!("sec-logs-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let module_secret = "tok-9c2e-printed-secret";
    // A careless module: prints its whole environment, bus password included.
    let d = json!({
        "schemaVersion": "1.0", "id": "sec-logs", "version": 1,
        "modules": { "app": {
            "image": image,
            "env": { "API_TOKEN": module_secret },
            "createOptions": { "Cmd": ["sh", "-c", "env; echo done printing; exec sleep 3600"] }
        } }
    });
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}");
    let bus_password = env_var(&device, "app", "OUTPOST_BUS_PASSWORD");
    let logs = wait_for("the module's output", Duration::from_secs(60), || {
        let out = agent.outpost(&["logs", "app", "--tail", "100"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("done printing").then_some(text)
    });
    assert!(logs.contains("API_TOKEN="), "{logs}");
    // The engine holds the raw output: the secrets are really there to leak.
    let raw = run(Command::new("docker").args(["logs", &format!("outpost.{device}.app")]));
    assert!(raw.contains(module_secret) && raw.contains(&bus_password));
    for (what, secret) in [
        ("an environment value", module_secret),
        ("the bus password", bus_password.as_str()),
    ] {
        assert!(
            !logs.contains(secret),
            "{what} appears in `outpost logs`: {logs}"
        );
    }
}

/// An MQTT 3.1.1 CONNECT as a module (keep-alive 0) on a fresh socket; the CONNACK's return
/// code, or `None` when the broker closed the socket instead.
fn bus_connect(
    addr: &str,
    user: &str,
    password: &str,
    client: &str,
) -> (std::net::TcpStream, Option<u8>) {
    use std::io::{Read as _, Write as _};
    let field = |b: &[u8]| {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 0]); // level 4; user, password, clean; keep-alive 0
    body.extend(field(client.as_bytes()));
    body.extend(field(user.as_bytes()));
    body.extend(field(password.as_bytes()));
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend(body);
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the bus");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    if s.write_all(&packet).is_err() {
        return (s, None);
    }
    let mut ack = [0u8; 4];
    match s.read_exact(&mut ack) {
        Ok(()) if ack[0] == 0x20 => (s, Some(ack[3])),
        _ => (s, None),
    }
}

/// One variable of a module container's environment.
fn env_var(device: &str, module: &str, name: &str) -> String {
    outpost_e2e::telemetry::module_env(device, module)
        .remove(name)
        .unwrap_or_else(|| panic!("{module} has no {name}"))
}

#[test]
fn one_module_cannot_lock_the_others_out_of_the_bus() {
    let registry = Registry::start();
    let image = test_image(&registry, "sec-bus", "1");
    let flooder = format!("outpost-test/sec-bus-flood:{}", std::process::id());
    sigterm_ignoring_image(&flooder);
    let device = format!("sec-bus-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let modules = |names: &[&str], v: u64| {
        let m: serde_json::Map<String, serde_json::Value> = names
            .iter()
            .map(|n| (n.to_string(), json!({ "image": image })))
            .collect();
        json!({
            "schemaVersion": "1.0", "id": "sec", "version": v, "modules": m,
            "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
        })
    };
    let (code, out) = agent.deploy(&modules(&["noisy", "quiet"], 1), 120);
    assert_eq!(code, 0, "{out}");
    let url = env_var(&device, "quiet", "OUTPOST_BUS_URL");
    let addr = url.trim_start_matches("mqtt://").to_string();
    let (noisy_pw, quiet_pw) = (
        env_var(&device, "noisy", "OUTPOST_BUS_PASSWORD"),
        env_var(&device, "quiet", "OUTPOST_BUS_PASSWORD"),
    );

    // 128 idle logins as `noisy`, keep-alive 0: only a few are let in.
    let mut held = Vec::new();
    let mut accepted = 0;
    for i in 0..128 {
        let (s, code) = bus_connect(&addr, "noisy", &noisy_pw, &format!("flood-{i}"));
        if code == Some(0) {
            accepted += 1;
        }
        held.push(s);
    }
    assert!(
        (1..=8).contains(&accepted),
        "{accepted} of 128 logins of one module were let in"
    );
    // Another module still gets in at once.
    let (_quiet, code) = bus_connect(&addr, "quiet", &quiet_pw, "quiet-1");
    assert_eq!(code, Some(0), "quiet was locked out");

    // 40 sockets that never log in, from another container on the bridge.
    let flood = run(Command::new("docker").args([
        "run",
        "-d",
        "--rm",
        "--entrypoint",
        "/busybox",
        &flooder,
        "sh",
        "-c",
        &format!(
            "for i in $(/busybox seq 40); do /busybox nc {} {} </dev/zero >/dev/null & done; /busybox sleep 60",
            addr.split(':').next().unwrap_or_default(),
            addr.split(':').nth(1).unwrap_or_default()
        ),
    ]))
    .trim()
    .to_string();
    let started = std::time::Instant::now();
    let (_quiet2, code) = bus_connect(&addr, "quiet", &quiet_pw, "quiet-2");
    assert_eq!(
        code,
        Some(0),
        "idle sockets of another peer locked quiet out"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    let _ = Command::new("docker").args(["rm", "-f", &flood]).output();

    // A module removed from the deployment cannot log in any more, though its password (a
    // hash of its name) still verifies.
    let (code, out) = agent.deploy(&modules(&["quiet"], 2), 120);
    assert_eq!(code, 0, "{out}");
    let (_, code) = bus_connect(&addr, "noisy", &noisy_pw, "late");
    assert_eq!(
        code,
        Some(5),
        "a removed module logged in (CONNACK {code:?})"
    );
    drop(held);
    remove_image(&flooder);
}
