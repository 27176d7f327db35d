//! Security drills on the real agent and engine: no configured secret reaches the agent's log
//! at any level, the reported state or `outpost list --json`.

use std::process::Command;

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
    let env = run(Command::new("docker").args([
        "inspect",
        "--format",
        "{{range .Config.Env}}{{println .}}{{end}}",
        &format!("outpost.{device}.app"),
    ]));
    let bus_password = env
        .lines()
        .find_map(|l| l.strip_prefix("OUTPOST_BUS_PASSWORD="))
        .expect("the module has a bus password")
        .to_string();
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
