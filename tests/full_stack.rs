//! The whole path with every real part: an operator runs `outpost-ctl deploy` against a real
//! Mosquitto hub (mutual TLS, certificates made by the test); the real agent (`outpost run`)
//! takes the signed deployment from the hub, pulls from a real registry with credentials, runs
//! the containers on the real Docker engine, and reports `applied` back through the hub.

use std::process::Command;

use outpost_e2e::*;
use serde_json::json;

#[test]
fn hub_deploy_reaches_the_engine_and_applied_comes_back() {
    let Some(broker) = Broker::start(Auth::MutualTls).unwrap() else {
        return;
    };
    let registry = Registry::start();
    // A device that trusts keys takes images pinned by digest only.
    let image = test_image_pinned(&registry, "testmod-hub", "1");
    let dir = tempfile::tempdir().unwrap();
    // The operator's key; the device trusts only it.
    let keys = dir.path().join("ops");
    run(Command::new(ctl_bin())
        .args(["keys", "generate", "--out"])
        .arg(&keys));
    let public = format!("{}.pub", keys.display());
    let device = format!("e2e-hub-{}", std::process::id());
    let agent = Agent::start(
        &device,
        &format!(
            "{}[policy]\ntrusted_keys = [\"{public}\"]\n",
            broker.device_hub_section()
        ),
    );

    let manifest = json!({
        "schemaVersion": "1.0", "id": "fleet", "version": 1,
        "modules": {
            "reader": { "image": image, "startupOrder": 0 },
            "writer": { "image": image, "startupOrder": 1 }
        },
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    });
    let file = dir.path().join("fleet.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let mut args: Vec<String> = Vec::new();
    args.extend(broker.cli_flags(dir.path()).unwrap());
    let sign_key = std::path::PathBuf::from(format!("{}.key", keys.display()));
    let out = ctl_deploy(&args, &device, &file, Some(&sign_key), 90);
    assert_eq!(
        out.status.code(),
        Some(0),
        "hub deploy: {}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );

    // The containers run on the engine.
    let running: Vec<_> = containers(&device)
        .into_iter()
        .filter(|c| c.2 == "running")
        .collect();
    assert_eq!(running.len(), 2, "{running:?}");

    // The hub's retained state says applied, names the source, and holds no secret.
    let state_text = ctl_status_json(&args, &device).to_string();
    assert!(state_text.contains("\"applied\""), "{state_text}");
    assert!(
        !state_text.contains(&registry.password),
        "the registry password is in the hub's state"
    );
    assert!(
        !state_text.contains("PRIVATE KEY"),
        "key material is in the hub's state"
    );

    // An unsigned deployment to the same device is refused; the modules keep running.
    let unsigned = dir.path().join("unsigned.json");
    let mut v2 = manifest.clone();
    v2["version"] = json!(2);
    std::fs::write(&unsigned, v2.to_string()).unwrap();
    let out = ctl_deploy(&args, &device, &unsigned, None, 30);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The refusal is in the hub's retained state, with its reason.
    let text = ctl_status_json(&args, &device).to_string();
    assert!(text.contains("accepts only signed deployments"), "{text}");
    let still: Vec<_> = containers(&device)
        .into_iter()
        .filter(|c| c.2 == "running")
        .collect();
    assert_eq!(still.len(), 2);
}
