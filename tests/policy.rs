//! The local policy on the real engine: the attacks a signed-but-hostile manifest (or a foothold
//! in one module) tried against a device, each refused with the field and the policy key that
//! would allow it, and nothing that ran before is lost. And what every module gets by default.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// `docker inspect --format FORMAT` of a module's container.
fn inspect(device: &str, module: &str, format: &str) -> String {
    run(Command::new("docker").args([
        "inspect",
        "--format",
        format,
        &format!("outpost.{device}.{module}"),
    ]))
    .trim()
    .to_string()
}

fn manifest(version: u64, modules: Value) -> Value {
    json!({ "schemaVersion": "1.0", "id": "policy", "version": version, "modules": modules })
}

/// The version of the deployment in force on the device.
fn reported_version(agent: &Agent) -> u64 {
    agent.state()["deployment"]["version"].as_u64().unwrap_or(0)
}

#[test]
fn added_capabilities_are_refused_unless_listed_and_every_module_gets_the_defaults() {
    let image = "outpost-test/busybox:policy-caps";
    busybox_image(image);
    let device = format!("pol-caps-{}", std::process::id());
    let agent = Agent::start(
        &device,
        "[policy]\nallowed_capabilities = [\"NET_BIND_SERVICE\"]\n",
    );
    let sleeper = |caps: Value| {
        json!({ "app": { "image": image, "createOptions": {
            "Cmd": ["sleep", "3600"], "HostConfig": { "CapAdd": caps } } } })
    };
    let (code, out) = agent.deploy(&manifest(1, sleeper(json!(["NET_BIND_SERVICE"]))), 120);
    assert_eq!(code, 0, "a listed capability: {out}");
    let id = inspect(&device, "app", "{{.Id}}");
    assert_eq!(
        inspect(&device, "app", "{{json .HostConfig.CapAdd}}"),
        r#"["NET_BIND_SERVICE"]"#
    );
    // What every module gets without asking.
    assert_eq!(
        inspect(&device, "app", "{{json .HostConfig.SecurityOpt}}"),
        r#"["no-new-privileges:true"]"#
    );
    assert_eq!(inspect(&device, "app", "{{.HostConfig.PidsLimit}}"), "1024");
    assert_eq!(
        inspect(&device, "app", "{{.HostConfig.Memory}}"),
        (512u64 << 20).to_string()
    );

    // The campaign's manifest: DAC_READ_SEARCH reads any host file by handle.
    let (code, out) = agent.deploy(
        &manifest(2, sleeper(json!(["DAC_READ_SEARCH", "SYS_ADMIN"]))),
        60,
    );
    assert_ne!(code, 0, "the CapAdd manifest was accepted: {out}");
    for expected in [
        "/modules/app/createOptions/HostConfig/CapAdd/0",
        "/modules/app/createOptions/HostConfig/CapAdd/1",
        "open_by_handle_at",
        "policy.allowed_capabilities",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from: {out}");
    }
    // Nothing changed: the same container, version 1.
    assert_eq!(inspect(&device, "app", "{{.Id}}"), id);
    assert_eq!(inspect(&device, "app", "{{.State.Running}}"), "true");
    assert_eq!(reported_version(&agent), 1);
}

#[test]
fn a_module_past_its_memory_limit_is_reported_out_of_memory() {
    let image = "outpost-test/busybox:policy-oom";
    busybox_image(image);
    let device = format!("pol-oom-{}", std::process::id());
    let agent = Agent::start(&device, "");
    // A 96 MiB buffer under a 32 MiB limit (no swap on top): the kernel ends it.
    let hog = json!({ "hog": { "image": image, "restartPolicy": "never",
        "resources": { "memoryMb": 32 },
        "createOptions": { "Cmd": ["dd", "if=/dev/zero", "of=/dev/null", "bs=96M", "count=2"] } } });
    let _ = agent.deploy(&manifest(1, hog), 60);
    let hog = wait_for(
        "the module ended by its memory limit",
        Duration::from_secs(60),
        || {
            let m = agent.try_state()["modules"]["hog"].clone();
            (m["exitCode"] == 137).then_some(m)
        },
    );
    // The exit code alone does not tell it from a `kill -9`: the report says why.
    assert_eq!(inspect(&device, "hog", "{{.State.OOMKilled}}"), "true");
    assert!(
        hog["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("out of memory")),
        "{hog}"
    );
}

#[test]
fn a_planted_link_is_not_followed_into_the_host() {
    let image = "outpost-test/busybox:policy-link";
    busybox_image(image);
    let host = tempfile::tempdir().expect("host folders");
    let writable = host.path().join("data");
    let secret_dir = host.path().join("root-only");
    std::fs::create_dir_all(writable.join("app")).expect("module folder");
    std::fs::create_dir_all(&secret_dir).expect("victim folder");
    let device = format!("pol-link-{}", std::process::id());
    let agent = Agent::start(
        &device,
        &format!(
            "[policy]\nwritable_host_paths = [\"{}\"]\n",
            writable.display()
        ),
    );
    // Version 1: the module's own folder, read-write; the module plants a link to the host's
    // folder in it (here the test's victim folder; in the campaign, `/`).
    let v1 = manifest(
        1,
        json!({ "app": { "image": image, "createOptions": {
            "Cmd": ["sh", "-c", format!("ln -s {} /data/root; exec sleep 3600", secret_dir.display())],
            "HostConfig": { "Binds": [format!("{}/app:/data", writable.display())] } } } }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "the module's own folder: {out}");
    let planted = writable.join("app").join("root");
    wait_for("the module to plant its link", MINUTE, || {
        planted.symlink_metadata().ok().map(|_| ())
    });

    // Version 2 binds the path through the link, read-write, and writes through it.
    let pwned = secret_dir.join("pwned");
    let v2 = manifest(
        2,
        json!({ "app": { "image": image, "createOptions": {
            "Cmd": ["sh", "-c", "echo owned > /host/pwned; exec sleep 3600"],
            "HostConfig": { "Binds": [format!("{}:/host", planted.display())] } } } }),
    );
    let (code, out) = agent.deploy(&v2, 60);
    assert_ne!(code, 0, "the two-step was accepted: {out}");
    assert!(
        out.contains("/modules/app/createOptions/HostConfig/Binds/0")
            && out.contains("symbolic link"),
        "{out}"
    );
    assert!(!pwned.exists(), "the module wrote through the link");
    assert_eq!(reported_version(&agent), 1);

    // Without the link check, the layout still refuses any path below the module's folder,
    // and any other module's folder: no deployment can name a path a module could plant in.
    for (version, bind) in [
        (3, format!("{}/app/sub:/x", writable.display())),
        (4, format!("{}/other:/x", writable.display())),
        (5, format!("{}:/x:ro", writable.display())),
    ] {
        let v = manifest(
            version,
            json!({ "app": { "image": image, "createOptions": {
                "Cmd": ["sleep", "3600"], "HostConfig": { "Binds": [bind] } } } }),
        );
        let (code, out) = agent.deploy(&v, 60);
        assert_ne!(code, 0, "{bind} was accepted: {out}");
        assert!(out.contains("policy.writable_host_paths"), "{out}");
    }
    assert!(!Path::new(&pwned).exists());
}

#[test]
fn volumes_are_scoped_and_ports_bind_loopback_within_the_allowed_ranges() {
    let image = "outpost-test/busybox:policy-vol";
    busybox_image(image);
    let device = format!("pol-vol-{}", std::process::id());
    // Another application's volume on the same engine, holding something of its own.
    let foreign = format!("pol-foreign-{}", std::process::id());
    run(Command::new("docker").args(["volume", "create", &foreign]));
    let agent = Agent::start(&device, "");
    let port = free_port();
    let module = |binds: Value, ports: Value| {
        json!({ "app": { "image": image, "createOptions": {
            "Cmd": ["sh", "-c", "ls /v > /dev/null; exec sleep 3600"],
            "HostConfig": { "Binds": binds, "PortBindings": { "8080/tcp": ports } } } } })
    };
    let (code, out) = agent.deploy(
        &manifest(
            1,
            module(
                json!([format!("{foreign}:/v")]),
                json!([{ "HostPort": port.to_string() }]),
            ),
        ),
        120,
    );
    assert_eq!(code, 0, "{out}");
    // The name means this device's own volume, not the other application's.
    let mounts = inspect(&device, "app", "{{range .Mounts}}{{.Name}} {{end}}");
    assert_eq!(mounts, format!("outpost.{device}.{foreign}"));
    // A binding without an address binds loopback, not every interface.
    let bound = inspect(
        &device,
        "app",
        "{{range $p, $b := .HostConfig.PortBindings}}{{range $b}}{{.HostIp}}:{{.HostPort}} {{end}}{{end}}",
    );
    assert_eq!(bound, format!("127.0.0.1:{port}"));
    let id = inspect(&device, "app", "{{.Id}}");

    // A privileged port, and every interface: refused, with the keys that would allow them.
    let (code, out) = agent.deploy(
        &manifest(
            2,
            module(
                json!([]),
                json!([{ "HostPort": "80" }, { "HostIp": "0.0.0.0", "HostPort": port.to_string() }]),
            ),
        ),
        60,
    );
    assert_ne!(code, 0, "{out}");
    for expected in [
        "/modules/app/createOptions/HostConfig/PortBindings/8080~1tcp/0/HostPort",
        "policy.allowed_host_ports",
        "/modules/app/createOptions/HostConfig/PortBindings/8080~1tcp/1/HostIp",
        "every interface",
    ] {
        assert!(out.contains(expected), "`{expected}` missing from: {out}");
    }
    assert_eq!(inspect(&device, "app", "{{.Id}}"), id);
    drop(agent);
    let _ = Command::new("docker")
        .args([
            "volume",
            "rm",
            "-f",
            &foreign,
            &format!("outpost.{device}.{foreign}"),
        ])
        .output();
}
