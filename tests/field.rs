//! Field drills on the real Docker engine and a real registry: the conditions edge devices
//! live in, each once a drill by hand that took a working device down, now a test.
//!
//! - an update whose pull takes time keeps the module serving: downtime is stop → start only;
//! - a deployment naming a tag that does not exist changes nothing and fails at once;
//! - a wiped store keeps every module running (unmanaged) until a deployment arrives;
//! - a container that cannot start (its host port is taken) backs off and says why;
//! - after a reboot, modules come back in startup order, not counted as restarts;
//! - a device whose clock reads 1970 still restarts crashed modules, and NTP's jump of 56
//!   years ends neither a rollback window nor the telemetry backlog early;
//! - a full disk under the state folder does not wedge the agent: deployments still apply,
//!   and when space returns everything works again without a restart.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn manifest(registry: &Registry, version: u64, modules: Value) -> Value {
    json!({
        "schemaVersion": "1.0",
        "id": "field",
        "version": version,
        "modules": modules,
        "registries": { registry.addr.clone(): { "username": registry.username, "password": registry.password } }
    })
}

fn status(state: &Value) -> &str {
    state["deployment"]["status"].as_str().unwrap_or("")
}

fn ids(device: &str) -> BTreeMap<String, String> {
    containers(device)
        .into_iter()
        .map(|(module, id, _, _)| (module, id))
        .collect()
}

fn inspect(id: &str, format: &str) -> String {
    let out = Command::new("docker")
        .args(["inspect", "--format", format, id])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `outpost deploy --local` in the background, so the test can watch while it runs.
fn deploy_in_background(agent: &Agent, manifest: &Value) -> std::process::Child {
    let file = agent
        .dir
        .path()
        .join(format!("bg-{}.json", manifest["version"]));
    std::fs::write(&file, manifest.to_string()).expect("write manifest");
    outpost_command()
        .arg("--config")
        .arg(&agent.config)
        .args(["deploy", "--local"])
        .arg(&file)
        .args(["--wait-secs", "240"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("outpost deploy")
}

#[test]
fn an_update_keeps_the_module_serving_while_its_image_is_pulled() {
    let registry = Registry::start();
    let v1_image = test_image(&registry, "field-update", "1");
    // v2 carries 64 MiB of random bytes: a pull that takes a while.
    let v2_image = format!("{}/field-update:2", registry.addr);
    big_test_image(&v2_image, 64);
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["push", "-q", &v2_image]));
    remove_image(&v2_image);
    let device = format!("field-update-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let (code, out) = agent.deploy(
        &manifest(&registry, 1, json!({ "app": { "image": v1_image } })),
        120,
    );
    assert_eq!(code, 0, "{out}");
    let old = ids(&device)["app"].clone();

    let since = unix_now().saturating_sub(1);
    let mut deploy = deploy_in_background(
        &agent,
        &manifest(&registry, 2, json!({ "app": { "image": v2_image } })),
    );
    // While the pull runs, the old container serves.
    let mut saw_pulling = false;
    let state = wait_for("v2 applied", MINUTE * 3, || {
        let s = agent.try_state();
        if s["deployment"]["version"] == 2 && s["modules"]["app"]["status"] == "pulling" {
            saw_pulling = true;
            assert_eq!(
                inspect(&old, "{{.State.Status}}"),
                "running",
                "the old container stopped while the new image was still being pulled"
            );
        }
        (s["deployment"]["version"] == 2 && status(&s) == "applied").then_some(s)
    });
    let _ = deploy.wait();
    assert!(saw_pulling, "the pull was never seen: {state}");
    let new = ids(&device)["app"].clone();
    assert_ne!(new, old);

    let label = format!("label=io.outpost.device={device}");
    let containers = events(since, &[&label]);
    // `docker ps` gives short ids, events full ones.
    let at = |id: &str, action: &str| {
        containers
            .iter()
            .find(|e| e.id.starts_with(id) && e.action == action)
            .map(|e| e.time_nano)
            .unwrap_or_else(|| panic!("no `{action}` event of {id}: {containers:?}"))
    };
    let (old_died, new_started) = (at(&old, "die"), at(&new, "start"));
    let pulled = events(since, &["type=image", "event=pull"])
        .into_iter()
        .find(|e| e.id == v2_image || e.name == v2_image)
        .map(|e| e.time_nano)
        .expect("the engine's pull event of v2");
    assert!(
        pulled <= old_died,
        "the old container died {:.3} s before the pull ended",
        (pulled - old_died) as f64 / 1e9
    );
    let gap = new_started.saturating_sub(old_died) as f64 / 1e9;
    eprintln!("FIGURE update downtime (stop → start), 64 MiB pull: {gap:.3} s");
    assert!(
        gap < 5.0,
        "the module was down {gap:.3} s: more than the stop → start gap"
    );
}

#[test]
fn a_missing_tag_leaves_the_running_module_alone_and_fails_at_once() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-tag", "1");
    let device = format!("field-tag-{}", std::process::id());
    let agent = Agent::start(&device, "");
    let (code, out) = agent.deploy(
        &manifest(&registry, 1, json!({ "app": { "image": image } })),
        120,
    );
    assert_eq!(code, 0, "{out}");
    let old = ids(&device)["app"].clone();
    let since = unix_now().saturating_sub(1);
    let started = Instant::now();
    let missing = format!("{}/field-tag:does-not-exist", registry.addr);
    let (code, out) = agent.deploy(
        &manifest(&registry, 2, json!({ "app": { "image": missing } })),
        60,
    );
    let took = started.elapsed();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("failed"), "{out}");
    assert!(
        out.contains("manifest unknown") && out.contains("nothing running was changed"),
        "{out}"
    );
    assert!(took < Duration::from_secs(30), "failed after {took:?}");
    assert_eq!(ids(&device)["app"], old);
    assert_eq!(inspect(&old, "{{.State.Status}}"), "running");
    let touched: Vec<_> = events(since, &[&format!("label=io.outpost.device={device}")])
        .into_iter()
        .filter(|e| {
            e.id.starts_with(&old)
                && ["kill", "die", "stop", "destroy"].contains(&e.action.as_str())
        })
        .collect();
    assert!(
        touched.is_empty(),
        "the running module was touched: {touched:?}"
    );
    let state = agent.state();
    assert_eq!(status(&state), "failed");
    assert_eq!(state["modules"]["app"]["status"], "failed");
}

#[test]
fn a_wiped_store_keeps_every_module_running_until_a_deployment_arrives() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-store", "1");
    let device = format!("field-store-{}", std::process::id());
    // Without the bus: its secret lives in the wiped folder too, and a new secret means new
    // module credentials, so new containers; adoption is what this drill looks at.
    let mut agent = Agent::start(&device, "[bus]\nenabled = false\n");
    let v1 = manifest(
        &registry,
        1,
        json!({ "db": { "image": image, "startupOrder": 0 }, "api": { "image": image, "startupOrder": 10 } }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}");
    let before = ids(&device);

    // The state folder is lost (a re-flashed data partition, a failed disk); no hub.
    agent.stop();
    std::fs::remove_dir_all(agent.state_dir()).expect("wipe the state folder");
    agent.spawn();
    let state = wait_for("modules reported unmanaged", MINUTE, || {
        let s = agent.try_state();
        let modules = s["modules"].as_object()?;
        (modules.len() == 2 && modules.values().all(|m| m["status"] == "unmanaged"))
            .then_some(s.clone())
    });
    assert!(
        state["conditions"].to_string().contains("no-deployment"),
        "{state}"
    );
    // A crash now is still restarted (by the policy the container's labels carry): the agent
    // is reconciling, and removes nothing.
    run(Command::new("docker").args(["kill", &before["api"]]));
    wait_for("api restarted", MINUTE, || {
        (inspect(&before["api"], "{{.State.Status}}") == "running").then_some(())
    });
    assert_eq!(
        ids(&device),
        before,
        "a module was removed without a deployment"
    );
    for id in before.values() {
        assert_eq!(inspect(id, "{{.State.Status}}"), "running");
    }
    // A deployment adopts them (same containers).
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}");
    assert_eq!(ids(&device), before, "adoption recreated containers");
}

#[test]
fn a_container_that_cannot_start_backs_off_and_says_why() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-port", "1");
    let device = format!("field-port-{}", std::process::id());
    let agent = Agent::start(&device, "");
    // Another program holds the host port the module wants.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = holder.local_addr().expect("port").port().to_string();
    let d = manifest(
        &registry,
        1,
        json!({ "web": { "image": image, "createOptions": { "HostConfig": {
            "PortBindings": { "8080/tcp": [ { "HostIp": "127.0.0.1", "HostPort": port } ] }
        } } } }),
    );
    let started = Instant::now();
    let (code, out) = agent.deploy(&d, 60);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("failed") && out.contains("start-failing"),
        "{out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the failure took {:?} to be reported",
        started.elapsed()
    );
    // Attempts back off (1, 2, 4, 8 s ...), each counted; the engine's message is shown. A
    // flat retry every 2 s would make the fifth attempt 8 s after the first.
    let count = |s: &Value| s["modules"]["web"]["restartCount"].as_u64();
    let first = wait_for("the first failed start counted", MINUTE, || {
        (count(&agent.try_state())? >= 1).then(Instant::now)
    });
    let state = wait_for("five attempts", MINUTE * 2, || {
        let s = agent.try_state();
        (count(&s)? >= 5).then_some(s)
    });
    let span = first.elapsed();
    assert!(
        span >= Duration::from_secs(10),
        "five attempts within {span:?}: no backoff"
    );
    let error = state["modules"]["web"]["lastError"].as_str().unwrap_or("");
    assert!(
        error.contains("start-failing") && error.contains("address already in use"),
        "{error}"
    );
    assert_eq!(state["modules"]["web"]["status"], "failed");
    // Once the port is free, a later attempt starts it.
    drop(holder);
    wait_for("web running", MINUTE * 2, || {
        let s = agent.try_state();
        (s["modules"]["web"]["status"] == "running" && status(&s) == "applied").then_some(())
    });
}

#[test]
fn after_a_reboot_modules_come_back_in_startup_order_uncounted() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-reboot", "1");
    let device = format!("field-reboot-{}", std::process::id());
    let mut agent = Agent::start(&device, "");
    let d = manifest(
        &registry,
        1,
        json!({
            "db": { "image": image, "startupOrder": 0 },
            "api": { "image": image, "startupOrder": 10 },
            "ui": { "image": image, "startupOrder": 20 }
        }),
    );
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}");
    let before = ids(&device);
    // A reboot: the agent goes down and the engine stops every container.
    agent.stop();
    let mut stop = Command::new("docker");
    stop.args(["stop", "-t", "5"]);
    for id in before.values() {
        stop.arg(id);
    }
    run(&mut stop);
    // The agent learns of a reboot from the boot id it noted at its last start.
    std::fs::write(agent.state_dir().join("boot"), "another-boot").expect("note another boot");
    agent.spawn();
    let state = wait_for("every module running again", MINUTE, || {
        let s = agent.try_state();
        let modules = s["modules"].as_object()?;
        (modules.len() == 3 && modules.values().all(|m| m["status"] == "running"))
            .then_some(s.clone())
    });
    for m in ["db", "api", "ui"] {
        assert_eq!(
            state["modules"][m]["restartCount"], 0,
            "{m} counted as a restart: {state}"
        );
    }
    assert_eq!(ids(&device), before, "containers were recreated");
    let started = |m: &str| inspect(&before[m], "{{.State.StartedAt}}");
    assert!(
        started("db") <= started("api") && started("api") <= started("ui"),
        "startup order not kept: db {} api {} ui {}",
        started("db"),
        started("api"),
        started("ui")
    );
}

#[test]
fn a_clock_at_1970_then_a_jump_of_56_years_breaks_nothing() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-clock", "1");
    let sick = test_image_with(
        &registry,
        "field-clock-sick",
        "1",
        "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/testmod\", \"health\"]\n",
    );
    let device = format!("field-clock-{}", std::process::id());
    let mut agent = Agent::configure(&device, "", "");
    let clock = agent.dir.path().join("faketime");
    std::fs::write(&clock, offset_to_1970()).expect("write the fake clock");
    agent.env = faketime_env(&clock);
    agent.spawn();
    // The agent believes it is 1970; the engine's timestamps say 2026.
    let d = manifest(
        &registry,
        1,
        json!({
            "crasher": { "image": image, "restartPolicy": "always",
                         "env": { "TESTMOD_EXIT_AFTER_MS": "300", "TESTMOD_EXIT_CODE": "3" } },
            "steady": { "image": image }
        }),
    );
    let _ = agent.deploy(&d, 30);
    wait_for("crashes restarted at 1970", MINUTE, || {
        let s = agent.try_state();
        (s["modules"]["crasher"]["restartCount"].as_u64()? >= 3).then_some(())
    });
    assert!(
        agent.log().contains("1970-01-0"),
        "the agent's clock was not faked: the drill proves nothing"
    );

    // A deployment with a 20 s rollback window that never gets healthy; 3 s in, NTP jumps
    // the clock 56 years forward. The window must run its 20 s, not end at the jump.
    let mut v2 = manifest(
        &registry,
        2,
        json!({ "steady": { "image": image },
                "sick": { "image": sick, "env": { "TESTMOD_UNHEALTHY_AFTER_MS": "0" } } }),
    );
    v2["rollback"] = json!({ "onFailure": true, "healthyWithinSecs": 20 });
    let accepted = Instant::now();
    let mut deploy = deploy_in_background(&agent, &v2);
    wait_for("v2 accepted", MINUTE, || {
        (agent.try_state()["deployment"]["version"] == 2).then_some(())
    });
    wait_for("three seconds into the window", MINUTE, || {
        (accepted.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    std::fs::write(&clock, "+0").expect("jump the clock");
    let rolled_back = wait_for("v2 rolled back", MINUTE * 2, || {
        let s = agent.try_state();
        assert!(
            !(s["deployment"]["version"] == 2 && status(&s) == "rolled-back")
                || accepted.elapsed() >= Duration::from_secs(15),
            "the window ended {:?} after acceptance: the clock jump cut it short",
            accepted.elapsed()
        );
        (status(&s) == "rolled-back").then_some(accepted.elapsed())
    });
    let _ = deploy.wait();
    eprintln!(
        "FIGURE 20 s rollback window through a 56-year clock jump fired after {rolled_back:?}"
    );
    // Crashes are still restarted after the jump.
    let count = agent.state()["modules"]["crasher"]["restartCount"]
        .as_u64()
        .unwrap_or(0);
    wait_for("a restart after the jump", MINUTE, || {
        (agent.try_state()["modules"]["crasher"]["restartCount"].as_u64()? > count).then_some(())
    });
    agent.kill9();
}

#[test]
fn a_pull_that_would_fill_the_disk_is_refused_before_anything_changes() {
    let registry = Registry::start();
    let v1 = test_image(&registry, "field-disk", "1");
    let v2 = test_image(&registry, "field-disk", "2");
    // v1 is on the engine already; v2 would have to be pulled.
    run(Command::new("docker")
        .env("DOCKER_CONFIG", &registry.docker_config)
        .args(["pull", "-q", &v1]));
    let device = format!("field-disk-{}", std::process::id());
    // A reserve no disk here has: every pull must be refused, naming the setting.
    let agent = Agent::start(&device, "[disk]\npull_reserve_mb = 100000000\n");
    let (code, out) = agent.deploy(
        &manifest(&registry, 1, json!({ "app": { "image": v1 } })),
        60,
    );
    assert_eq!(code, 0, "{out}");
    let old = ids(&device)["app"].clone();
    let (code, out) = agent.deploy(
        &manifest(&registry, 2, json!({ "app": { "image": v2 } })),
        60,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("disk.pull_reserve_mb") && out.contains("MB free"),
        "{out}"
    );
    assert_eq!(ids(&device)["app"], old);
    assert_eq!(inspect(&old, "{{.State.Status}}"), "running");
    let present = Command::new("docker")
        .args(["image", "inspect", &v2])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(!present, "the image was pulled anyway");
    remove_image(&v1);
}

#[test]
fn a_full_disk_under_the_state_folder_wedges_nothing_and_recovers_without_a_restart() {
    let registry = Registry::start();
    let image = test_image(&registry, "field-full", "1");
    let device = format!("field-full-{}", std::process::id());
    // A hub that is not there: metrics go into the outbox every second and stay.
    let mut agent = Agent::configure(
        &device,
        "",
        "[hub]\nurl = \"mqtt://127.0.0.1:9\"\n[telemetry]\ninterval_secs = 1\n",
    );
    let tmpfs = Tmpfs::mount(&agent.state_dir(), "16m");
    agent.spawn();
    let pid = agent.pid();
    let version = |v: u64| {
        manifest(
            &registry,
            v,
            json!({ "app": { "image": image, "env": { "V": v.to_string() } } }),
        )
    };
    let (code, out) = agent.deploy(&version(1), 120);
    assert_eq!(code, 0, "{out}");

    // The disk fills up (a module's logs, a runaway file: anything).
    let filler = tmpfs.fill();
    // A deployment that needs no disk still applies: the store's reserve takes it.
    let (code, out) = agent.deploy(&version(2), 120);
    assert_eq!(
        code,
        0,
        "a deployment on a full disk: {out}\n{}",
        agent.log()
    );
    // The reserve it used is free space again: the disk goes on filling up.
    let refill = tmpfs.path.join("filler-2");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", refill.display()))
        .output();
    let kinds = |s: &Value| s["conditions"].to_string();
    let reported = Instant::now();
    loop {
        let k = kinds(&agent.try_state());
        if k.contains("outbox-degraded") && k.contains("store-reserve-used") {
            break;
        }
        assert!(
            reported.elapsed() < MINUTE,
            "the full disk was not reported within a minute; conditions: {k}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Space comes back: everything works again, without a restart.
    std::fs::remove_file(&filler).expect("free the disk");
    std::fs::remove_file(&refill).expect("free the disk");
    wait_for("the conditions cleared", MINUTE, || {
        let k = kinds(&agent.try_state());
        (!k.contains("outbox-degraded") && !k.contains("store-reserve-used")).then_some(())
    });
    let (code, out) = agent.deploy(&version(3), 120);
    assert_eq!(code, 0, "after the disk was freed: {out}");
    assert_eq!(agent.pid(), pid, "the agent was restarted");
    assert!(
        std::fs::metadata(agent.state_dir().join("reserve")).is_ok_and(|m| m.len() > 0),
        "the store's reserve was not made again"
    );
    agent.kill9();
    drop(tmpfs);
}
