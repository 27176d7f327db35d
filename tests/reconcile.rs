//! The reconciler against the real Docker engine and a real registry (with credentials):
//! startup order, updates, removal, restarts with backoff, rollback, policy, `kill -9`,
//! adoption, foreign containers and a wrong registry password.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn manifest(registry: &Registry, version: u64, modules: Value) -> Value {
    json!({
        "schemaVersion": "1.0",
        "id": "e2e",
        "version": version,
        "modules": modules,
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    })
}

fn by_module(device: &str) -> BTreeMap<String, Vec<(String, String, String)>> {
    let mut map: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for (module, id, state, hash) in containers(device) {
        map.entry(module).or_default().push((id, state, hash));
    }
    map
}

fn status(state: &Value) -> &str {
    state["deployment"]["status"].as_str().unwrap_or("")
}

fn started_at(id: &str) -> String {
    run(Command::new("docker").args(["inspect", "--format", "{{.State.StartedAt}}", id]))
        .trim()
        .to_string()
}

#[test]
fn deployments_update_remove_and_survive_agent_restarts() {
    let registry = Registry::start();
    let image = test_image(&registry, "testmod", "1");
    let device = format!("e2e-main-{}", std::process::id());
    let mut agent = Agent::start(&device, "");

    // A container Outpost did not create, from the same image, with Outpost-like naming.
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["pull", "-q", &image]));
    let foreign = run(Command::new("docker").args([
        "run",
        "-d",
        "--name",
        &format!("foreign-{device}"),
        &image,
    ]))
    .trim()
    .to_string();

    // Three modules in startup order.
    let v1 = manifest(
        &registry,
        1,
        json!({
            "db": { "image": image, "startupOrder": 0 },
            "api": { "image": image, "startupOrder": 10, "env": { "ROLE": "api" } },
            "ui": { "image": image, "startupOrder": 20 }
        }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "deploy v1: {out}\n{}", agent.log());
    assert!(out.contains("applied"), "{out}");
    let v1_containers = by_module(&device);
    assert_eq!(v1_containers.len(), 3);
    for (module, cs) in &v1_containers {
        assert_eq!(cs.len(), 1, "{module}: {cs:?}");
        assert_eq!(cs[0].1, "running", "{module}");
    }
    let (db, api, ui) = (
        &v1_containers["db"][0].0,
        &v1_containers["api"][0].0,
        &v1_containers["ui"][0].0,
    );
    assert!(
        started_at(db) <= started_at(api) && started_at(api) <= started_at(ui),
        "startup order not kept"
    );

    // Updating one module recreates only it.
    let v2 = manifest(
        &registry,
        2,
        json!({
            "db": { "image": image, "startupOrder": 0 },
            "api": { "image": image, "startupOrder": 10, "env": { "ROLE": "api-v2" } },
            "ui": { "image": image, "startupOrder": 20 }
        }),
    );
    let (code, out) = agent.deploy(&v2, 120);
    assert_eq!(code, 0, "deploy v2: {out}");
    let v2_containers = by_module(&device);
    assert_eq!(&v2_containers["db"][0].0, db, "db was recreated");
    assert_eq!(&v2_containers["ui"][0].0, ui, "ui was recreated");
    assert_ne!(&v2_containers["api"][0].0, api, "api was not recreated");
    assert_eq!(v2_containers["api"].len(), 1);

    // An older version is refused and nothing changes.
    let (code, out) = agent.deploy(&v1, 30);
    assert_eq!(code, 1);
    assert!(
        out.contains("/version") && out.contains("not newer"),
        "{out}"
    );

    // A policy violation is refused as a whole with the reason, nothing changed.
    let privileged = manifest(
        &registry,
        3,
        json!({
            "db": { "image": image, "createOptions": { "HostConfig": { "Privileged": true, "Binds": ["/etc:/host-etc:ro"] } } }
        }),
    );
    let (code, out) = agent.deploy(&privileged, 30);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("/modules/db/createOptions/HostConfig/Privileged"),
        "{out}"
    );
    assert!(
        out.contains("/modules/db/createOptions/HostConfig/Binds/0"),
        "{out}"
    );
    assert_eq!(
        by_module(&device),
        v2_containers,
        "a refused deployment changed containers"
    );
    let state = agent.state();
    assert_eq!(state["lastRejected"]["version"], 3);
    assert_eq!(state["deployment"]["version"], 2);

    // Removing a module.
    let v4 = manifest(
        &registry,
        4,
        json!({
            "db": { "image": image, "startupOrder": 0 },
            "api": { "image": image, "startupOrder": 10, "env": { "ROLE": "api-v2" } }
        }),
    );
    let (code, out) = agent.deploy(&v4, 120);
    assert_eq!(code, 0, "deploy v4: {out}");
    let v4_containers = by_module(&device);
    assert!(!v4_containers.contains_key("ui"), "ui was not removed");
    assert_eq!(v4_containers["db"][0].0, *db);

    // The agent restarts (SIGTERM, then start): it adopts the running containers.
    agent.stop();
    assert_eq!(
        by_module(&device),
        v4_containers,
        "stopping the agent touched modules"
    );
    agent.restart();
    wait_for("the restarted agent to report v4 applied", MINUTE, || {
        let s = agent.try_state();
        (s["deployment"]["version"] == 4
            && status(&s) == "applied"
            && s["modules"]["api"]["status"] == "running")
            .then_some(())
    });
    assert_eq!(
        by_module(&device),
        v4_containers,
        "adoption recreated containers"
    );

    // `kill -9` in the middle of a deployment, then a restart: converges, no duplicates.
    let v5 = manifest(
        &registry,
        5,
        json!({
            "db": { "image": image, "startupOrder": 0, "env": { "V": "5" } },
            "api": { "image": image, "startupOrder": 10, "env": { "ROLE": "api-v5" } },
            "cache": { "image": image, "startupOrder": 10 },
            "ui": { "image": image, "startupOrder": 20 }
        }),
    );
    let file = agent.dir.path().join("v5.json");
    std::fs::write(&file, v5.to_string()).unwrap();
    let mut deploy = outpost_command()
        .arg("--config")
        .arg(&agent.config)
        .args(["deploy", "--local"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("v5 to be accepted", MINUTE, || {
        (agent.state()["deployment"]["version"] == 5).then_some(())
    });
    agent.kill9();
    let _ = deploy.wait();
    agent.restart();
    wait_for("v5 applied after kill -9", MINUTE, || {
        let s = agent.try_state();
        (s["deployment"]["version"] == 5 && status(&s) == "applied").then_some(())
    });
    let v5_containers = by_module(&device);
    assert_eq!(
        v5_containers.keys().collect::<Vec<_>>(),
        ["api", "cache", "db", "ui"]
    );
    for (module, cs) in &v5_containers {
        assert_eq!(cs.len(), 1, "duplicates of {module}: {cs:?}");
        assert_eq!(cs[0].1, "running", "{module}");
    }

    // The foreign container was never touched.
    let foreign_state =
        run(Command::new("docker").args(["inspect", "--format", "{{.State.Status}}", &foreign]));
    assert_eq!(foreign_state.trim(), "running");
    run(Command::new("docker").args(["rm", "-f", &foreign]));
}

#[test]
fn crashes_restart_with_backoff_and_never_stays_exited() {
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-crash", "1");
    let device = format!("e2e-crash-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let d = manifest(
        &registry,
        1,
        json!({
            "crasher": { "image": image, "restartPolicy": "always",
                         "env": { "TESTMOD_EXIT_AFTER_MS": "200", "TESTMOD_EXIT_CODE": "3" } },
            "oneshot": { "image": image, "restartPolicy": "never",
                         "env": { "TESTMOD_EXIT_AFTER_MS": "200", "TESTMOD_EXIT_CODE": "0" } },
            "steady": { "image": image, "restartPolicy": "on-failure" }
        }),
    );
    // The outcome of the deployment itself is not what this test is about: the three modules
    // may all be seen running in the 200 ms before two of them exit (then it is `applied`), or
    // not (then the one-second wait times out). Only a refusal would be wrong.
    let (code, out) = agent.deploy(&d, 1);
    assert!(code == 0 || code == 1, "{out}");
    assert!(!out.contains("rejected"), "{out}");
    // Backoff: the n-th restart waits 0, 1, 2, 4 s after the exit (runs are 0.2 s). Record when
    // each restart is first seen.
    let mut seen: Vec<std::time::Instant> = Vec::new();
    let state = wait_for("four restarts of the crasher", MINUTE, || {
        let s = agent.try_state();
        let count = s["modules"]["crasher"]["restartCount"].as_u64()? as usize;
        while seen.len() < count.min(4) {
            seen.push(std::time::Instant::now());
        }
        (count >= 4).then_some(s)
    });
    let gap = |a: usize, b: usize| seen[b].duration_since(seen[a]).as_secs_f64();
    // Without backoff a 0.2 s crash loop restarts several times a second.
    assert!(
        gap(2, 3) >= 2.5,
        "the 4th restart came {:.2} s after the 3rd: no backoff ({seen:?})",
        gap(2, 3)
    );
    assert!(gap(2, 3) > gap(0, 1), "backoff does not grow: {seen:?}");
    assert_eq!(
        state["modules"]["crasher"]["exitCode"]
            .as_i64()
            .unwrap_or(3),
        3
    );
    assert_eq!(state["modules"]["oneshot"]["status"], "exited", "{state}");
    assert_eq!(state["modules"]["oneshot"]["restartCount"], 0);
    assert_eq!(state["modules"]["steady"]["status"], "running");
    // Logs of the crasher through the CLI.
    let out = agent.outpost(&["logs", "crasher", "--tail", "5"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("exiting with code 3"),
        "{out:?}"
    );
}

#[test]
fn a_deployment_that_cannot_start_rolls_back_and_bad_credentials_are_reported() {
    let registry = Registry::start();
    let image = test_image(&registry, "testmod-rb", "1");
    let device = format!("e2e-rollback-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let good = manifest(&registry, 1, json!({ "app": { "image": image } }));
    let (code, out) = agent.deploy(&good, 120);
    assert_eq!(code, 0, "{out}");
    // The agent pulled the image, and showed the pull as it went.
    assert!(
        out.contains(&format!("pulling {image}")),
        "no pull progress: {out}"
    );
    // Not a terminal: plain lines, a handful per image, and no colour codes anywhere (the
    // command's output nor the agent's log file).
    assert!(
        out.lines().filter(|l| l.contains("pulling")).count() <= 40,
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "escape codes in piped output: {out:?}"
    );
    assert!(
        !agent.log().contains('\u{1b}'),
        "escape codes in the agent's log file"
    );
    let good_id = by_module(&device)["app"][0].0.clone();

    // v2 names an image that does not exist: rolled back to v1 within the window.
    let mut bad = manifest(
        &registry,
        2,
        json!({
            "app": { "image": format!("{}/testmod-rb:missing", registry.addr) }
        }),
    );
    bad["rollback"] = json!({ "onFailure": true, "healthyWithinSecs": 4 });
    let (code, out) = agent.deploy(&bad, 60);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rolled-back"), "{out}");
    let state = wait_for("the device back on v1", MINUTE, || {
        let s = agent.try_state();
        (s["modules"]["app"]["status"] == "running").then_some(s)
    });
    assert_eq!(state["deployment"]["version"], 2);
    assert_eq!(state["deployment"]["status"], "rolled-back");
    let reasons = state["deployment"]["reasons"].to_string();
    assert!(
        reasons.contains("/modules/app") && reasons.contains("manifest unknown"),
        "{reasons}"
    );
    assert_eq!(state["lastGood"]["version"], 1);
    let after = by_module(&device);
    assert_eq!(after["app"].len(), 1);
    // v2's module never had a container; v1's was replaced in place or kept.
    let _ = good_id;

    // A wrong registry password: the module's status says so.
    let mut wrong = manifest(
        &registry,
        3,
        json!({ "other": { "image": format!("{}/testmod-rb:1", registry.addr) } }),
    );
    remove_image(&format!("{}/testmod-rb:1", registry.addr));
    wrong["registries"][&registry.addr]["password"] = json!("wrong-password");
    let (code, _) = agent.deploy(&wrong, 3);
    assert_eq!(code, 1);
    let state = wait_for("the pull error in the module status", MINUTE, || {
        let s = agent.try_state();
        s["modules"]["other"]["lastError"]
            .as_str()
            .map(|_| s.clone())
    });
    let error = state["modules"]["other"]["lastError"].as_str().unwrap();
    assert!(
        error.contains("unauthorized") || error.contains("authentication required"),
        "{error}"
    );
    assert!(
        !state.to_string().contains("wrong-password"),
        "the password leaked into the state"
    );
    assert!(
        !agent.log().contains("wrong-password"),
        "the password leaked into the log"
    );
}

#[test]
fn images_no_deployment_uses_are_cleaned_up() {
    let registry = Registry::start();
    let old = test_image(&registry, "testmod-gc", "1");
    let new = test_image(&registry, "testmod-gc", "2");
    let device = format!("e2e-gc-{}", std::process::id());
    let agent = Agent::start_with(&device, "image_gc_after_secs = 1", "");
    let (code, out) = agent.deploy(
        &manifest(&registry, 1, json!({ "app": { "image": old } })),
        120,
    );
    assert_eq!(code, 0, "{out}");
    let (code, out) = agent.deploy(
        &manifest(&registry, 2, json!({ "gone": { "image": new } })),
        120,
    );
    assert_eq!(code, 0, "{out}");
    // v2 is now the last good deployment too, so v1's image is unused: removed after 1 s.
    let present = |image: &str| {
        Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    wait_for("the unused image to be removed", MINUTE, || {
        (!present(&old)).then_some(())
    });
    assert!(present(&new), "the image in use was removed");
}

#[test]
fn an_unhealthy_module_is_restarted_under_on_unhealthy_only() {
    let registry = Registry::start();
    // Runs as root: the test module marks itself unhealthy by writing to `/`.
    let image = test_image_with(
        &registry,
        "testmod-health",
        "1",
        "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/testmod\", \"health\"]\n",
    );
    let device = format!("e2e-health-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let env = json!({ "TESTMOD_UNHEALTHY_AFTER_MS": "500" });
    let d = manifest(
        &registry,
        1,
        json!({
            "watched": { "image": image, "restartPolicy": "on-unhealthy", "env": env },
            "ignored": { "image": image, "restartPolicy": "always", "env": env }
        }),
    );
    let _ = agent.deploy(&d, 5);
    let state = wait_for("the unhealthy module to be restarted", MINUTE, || {
        let s = agent.try_state();
        (s["modules"]["watched"]["restartCount"].as_u64()? >= 1).then_some(s)
    });
    assert_eq!(state["modules"]["ignored"]["restartCount"], 0, "{state}");
    assert_ne!(
        state["deployment"]["status"], "applied",
        "an unhealthy module counted as healthy"
    );
}
