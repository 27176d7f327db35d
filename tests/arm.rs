//! The device's binaries built for another architecture, run under qemu-user on this x86_64
//! machine against the real parts: a real Mosquitto with mutual TLS, the real registry and
//! the host's Docker engine (reached through its socket, as the emulated binary would on a
//! board). `scripts/test-arm` builds the binaries and runs these tests with:
//!
//! - `OUTPOST_BIN` (the foreign `outpost`), `OUTPOST_RUNNER` (`qemu-aarch64 -L /`) and
//!   `OUTPOST_FOREIGN_ARCH` (`aarch64`, what the agent must report);
//! - with `--image`: `OUTPOST_INFER_AMD64`, `OUTPOST_INFER_ARM64` (and `OUTPOST_INFER_ARMV7`
//!   where it builds), static `outpost-infer` binaries for the multi-platform image.
//!
//! `cargo test` alone does not make these builds, so the tests are ignored there; the script
//! runs them with `--ignored`, and a missing variable fails them.

use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/test-arm"))
}

/// The whole device path on the emulated agent: an operator deploys a signed manifest over
/// the hub, the agent verifies it, pulls by digest from the registry with credentials, runs
/// the containers on the host's engine and reports `applied` — and says which architecture
/// it is, so this is known to be the foreign build and not a native one.
#[test]
#[ignore = "needs the ARM build: run by scripts/test-arm"]
fn a_foreign_agent_takes_a_signed_hub_deployment_to_applied() {
    let arch = var("OUTPOST_FOREIGN_ARCH");
    var("OUTPOST_RUNNER");
    let broker = Broker::start(Auth::MutualTls)
        .unwrap()
        .expect("Mosquitto is needed (scripts/setup installs it)");
    let registry = Registry::start();
    let image = test_image_pinned(&registry, "testmod-arm", "1");
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("ops");
    run(Command::new(ctl_bin())
        .args(["keys", "generate", "--out"])
        .arg(&keys));
    let device = format!("e2e-arm-{}", std::process::id());
    let agent = Agent::start(
        &device,
        &format!(
            "{}[policy]\ntrusted_keys = [\"{}.pub\"]\n",
            broker.device_hub_section(),
            keys.display()
        ),
    );
    let manifest = json!({
        "schemaVersion": "1.0", "id": "arm-smoke", "version": 1,
        "modules": { "probe": { "image": image } },
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    });
    let file = dir.path().join("arm-smoke.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let args = broker.cli_flags(dir.path()).unwrap();
    let sign_key = std::path::PathBuf::from(format!("{}.key", keys.display()));
    // Emulation makes the agent several times slower than native: a longer timeout.
    let out = ctl_deploy(&args, &device, &file, Some(&sign_key), 180);
    assert_eq!(
        out.status.code(),
        Some(0),
        "hub deploy: {}{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    // The hub's summary says applied; the device's full state (`outpost list --json`, the
    // emulated binary again, over the local API) says who reported it.
    let summary = ctl_status_json(&args, &device).to_string();
    assert!(summary.contains("\"applied\""), "{summary}");
    let state = agent.state();
    assert_eq!(
        state["agent"]["arch"], arch,
        "the reporting agent is the {arch} build: {state}"
    );
    assert_eq!(state["deployment"]["status"], "applied", "{state}");
    // The engine is x86_64: the agent asked it for its own platform, not the agent's.
    assert_eq!(
        state["modules"]["probe"]["platform"], "linux/amd64",
        "{state}"
    );
    let running: Vec<_> = containers(&device)
        .into_iter()
        .filter(|c| c.2 == "running")
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
}

/// `outpost-infer`'s FROM-scratch image for amd64, arm64 (and arm/v7) is pushed as one
/// manifest list by `scripts/push-infer-multiarch`; the registry holds the list; an agent
/// pulls it on this x86_64 engine, and the amd64 variant runs and loads its model.
#[test]
#[ignore = "needs the ARM build: run by scripts/test-arm"]
fn the_inference_image_is_one_manifest_list_and_the_engine_runs_its_own_variant() {
    let mut platforms = vec![
        format!("linux/amd64={}", var("OUTPOST_INFER_AMD64")),
        format!("linux/arm64={}", var("OUTPOST_INFER_ARM64")),
    ];
    if let Some(armv7) = std::env::var("OUTPOST_INFER_ARMV7")
        .ok()
        .filter(|v| !v.is_empty())
    {
        platforms.push(format!("linux/arm/v7={armv7}"));
    }
    let registry = Registry::start();
    let reference = format!("{}/outpost-infer:multi", registry.addr);
    let script = workspace().join("scripts/push-infer-multiarch");
    let out = Command::new(&script)
        .env("DOCKER_CONFIG", &registry.docker_config)
        .arg(&reference)
        .args(&platforms)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push-infer-multiarch: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The registry serves one list naming every platform.
    let list = run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["manifest", "inspect", "--insecure", &reference]));
    let list: Value = serde_json::from_str(&list).unwrap();
    let offered: Vec<String> = list["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("not a manifest list: {list}"))
        .iter()
        .map(|m| {
            let p = &m["platform"];
            match p["variant"].as_str() {
                Some(v) => format!(
                    "{}/{}/{v}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                ),
                None => format!(
                    "{}/{}",
                    p["os"].as_str().unwrap(),
                    p["architecture"].as_str().unwrap()
                ),
            }
        })
        .collect();
    for p in &platforms {
        let (platform, _) = p.split_once('=').unwrap();
        assert!(
            offered.iter().any(|o| o == platform),
            "{platform} not in {offered:?}"
        );
    }

    // An agent pulls the list: the engine's variant runs, with a model mounted read-only.
    remove_image(&reference);
    let models = tempfile::tempdir().unwrap();
    std::fs::copy(
        workspace().join("module/testdata/models/mlp.onnx"),
        models.path().join("model.onnx"),
    )
    .unwrap();
    for path in [
        models.path().to_path_buf(),
        models.path().join("model.onnx"),
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let device = format!("e2e-multiarch-{}", std::process::id());
    let agent = Agent::start(
        &device,
        &format!(
            "[policy]\nallowed_host_paths = [\"{}\"]\n",
            models.path().display()
        ),
    );
    let manifest = json!({
        "schemaVersion": "1.0", "id": "infer", "version": 1,
        "modules": { "infer": {
            "image": reference,
            "env": { "OUTPOST_MODEL_NAME": "anomaly" },
            "createOptions": { "HostConfig": { "Binds": [format!("{}:/models:ro", models.path().display())] } }
        } },
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    });
    let (code, output) = agent.deploy(&manifest, 180);
    assert_eq!(code, 0, "{output}\nagent log:\n{}", agent.log());
    let state = agent.state();
    assert_eq!(
        state["modules"]["infer"]["platform"], "linux/amd64",
        "{state}"
    );
    let (_, id, _, _) = containers(&device)
        .into_iter()
        .find(|c| c.0 == "infer")
        .expect("the infer container");
    let image_arch = run(Command::new("docker").args(["inspect", "--format", "{{.Image}}", &id]));
    let arch = run(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{.Os}}/{{.Architecture}}",
        image_arch.trim(),
    ]));
    assert_eq!(arch.trim(), "linux/amd64");
    // The model server came up in the container: it logs that the model is loaded.
    wait_for(
        "outpost-infer to load its model",
        Duration::from_secs(60),
        || {
            let logs = Command::new("docker").args(["logs", &id]).output().ok()?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
            (text.contains("serving") && text.contains("anomaly")).then_some(())
        },
    );
    let running =
        run(Command::new("docker").args(["inspect", "--format", "{{.State.Status}}", &id]));
    assert_eq!(running.trim(), "running");
}
