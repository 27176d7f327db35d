//! Process modules on the real agent (`outpost run`), on a device configured without a
//! container engine (`runtime.kind = "process"`), and beside containers on one with it: the
//! behaviours the Docker runtime's tests check — startup order, an update replaces only what
//! changed, crash backoff, `never` stays exited, `kill -9` of the agent then a restart adopts
//! without duplicates, logs, rollback, the stop grace — with the test module's static binary
//! (and `/bin/sh`) as the executables.

use std::time::Duration;

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// An agent without an engine whose policy allows the test module and `/bin/sh`.
fn device(name: &str, kind: &str) -> Agent {
    device_allowing(name, kind, "/bin/sh")
}

/// As [`device`], allowing `also` as well.
fn device_allowing(name: &str, kind: &str, also: &str) -> Agent {
    let testmod = testmod_binary();
    let dir = testmod.parent().expect("a folder").display().to_string();
    Agent::start_with(
        &format!("proc-{name}-{}", std::process::id()),
        &format!("kind = \"{kind}\""),
        &format!("[policy]\nallowed_executables = [\"{dir}/\", \"/bin/sh\", \"{also}\"]\n"),
    )
}

fn testmod(env: Value, order: u32) -> Value {
    json!({
        "runtime": "process",
        "command": [testmod_binary().display().to_string()],
        "env": env,
        "startupOrder": order
    })
}

fn manifest(version: u64, modules: Value) -> Value {
    json!({ "schemaVersion": "1.0", "id": "proc", "version": version, "modules": modules })
}

/// The module's running process: (record id, pid, kernel start ticks).
fn running(agent: &Agent, module: &str) -> Option<(String, i64, u64)> {
    agent
        .processes()
        .into_iter()
        .find(|(m, _, run)| {
            m == module
                && run["pid"].as_i64().is_some_and(|p| {
                    // A pid counts only with the start time recorded: pids are reused.
                    start_ticks(p).is_some() && start_ticks(p) == run["startTicks"].as_u64()
                })
        })
        .map(|(_, id, run)| {
            (
                id,
                run["pid"].as_i64().unwrap_or_default(),
                run["startTicks"].as_u64().unwrap_or_default(),
            )
        })
}

fn module_state(agent: &Agent, module: &str) -> Value {
    agent.try_state()["modules"][module].clone()
}

#[test]
fn startup_order_updates_of_what_changed_and_logs() {
    let agent = device("order", "process");
    let v1 = manifest(
        1,
        json!({ "first": testmod(json!({}), 0), "second": testmod(json!({"N": "1"}), 1) }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let (first_id, first_pid, first_ticks) = running(&agent, "first").expect("first runs");
    let (second_id, _, second_ticks) = running(&agent, "second").expect("second runs");
    assert!(
        first_ticks <= second_ticks,
        "the second group started after the first was running"
    );
    let s = agent.state();
    assert_eq!(s["modules"]["first"]["status"], "running");
    assert_eq!(
        s["modules"]["first"]["image"],
        testmod_binary().display().to_string()
    );

    // Logs, as for a container.
    let out = agent.outpost(&["logs", "first", "--tail", "5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("testmod started (pid {first_pid})")),
        "{out:?}"
    );

    // v2 changes only the second module's environment: only it is replaced.
    let v2 = manifest(
        2,
        json!({ "first": testmod(json!({}), 0), "second": testmod(json!({"N": "2"}), 1) }),
    );
    let (code, out) = agent.deploy(&v2, 120);
    assert_eq!(code, 0, "{out}");
    let (first_after, pid_after, _) = running(&agent, "first").expect("first runs");
    let (second_after, _, _) = running(&agent, "second").expect("second runs");
    assert_eq!(
        (first_after, pid_after),
        (first_id, first_pid),
        "first untouched"
    );
    assert_ne!(second_after, second_id, "second replaced");
    // The old second stopped cleanly on SIGTERM (its log says so before it was removed, and
    // only one second process is left).
    assert_eq!(
        agent
            .processes()
            .iter()
            .filter(|(m, _, _)| m == "second")
            .count(),
        1
    );
}

#[test]
fn crashes_back_off_and_never_stays_exited() {
    let agent = device("crash", "process");
    let crash = json!({"TESTMOD_EXIT_AFTER_MS": "200", "TESTMOD_EXIT_CODE": "3"});
    let mut never = testmod(crash.clone(), 0);
    never["restartPolicy"] = json!("never");
    let d = manifest(1, json!({ "crasher": testmod(crash, 0), "once": never }));
    // Applied or not, the deployment is carried out; crashing modules make it fail in time.
    let _ = agent.deploy(&d, 5);
    // Backing off after its third crash: waiting, with the exit code it ended with.
    let s = wait_for("three restarts, then backoff", MINUTE, || {
        let m = module_state(&agent, "crasher");
        (m["restartCount"].as_u64().unwrap_or(0) >= 3 && m["status"] == "backoff").then_some(m)
    });
    assert_eq!(s["exitCode"], 3, "{s}");
    let once = module_state(&agent, "once");
    assert_eq!(once["status"], "exited", "{once}");
    assert_eq!(once["restartCount"], 0, "{once}");
    assert_eq!(once["exitCode"], 3, "{once}");
}

#[test]
fn an_agent_restart_keeps_each_modules_policy_and_a_reboot_brings_all_back() {
    let mut agent = device("boot", "process");
    let mut once = testmod(json!({"TESTMOD_EXIT_AFTER_MS": "100"}), 0);
    once["restartPolicy"] = json!("never");
    let d = manifest(1, json!({ "app": testmod(json!({}), 0), "once": once }));
    let _ = agent.deploy(&d, 30);
    let ran = |agent: &Agent| -> Vec<Value> {
        agent
            .processes()
            .into_iter()
            .filter(|(m, _, _)| m == "once")
            .map(|(_, _, run)| run["pid"].clone())
            .collect()
    };
    wait_for("once ended", MINUTE, || {
        (module_state(&agent, "once")["status"] == "exited").then_some(())
    });
    let first = ran(&agent);

    // Restarted in the same boot (a self-update, a crash of the agent): `never` stays ended.
    agent.stop();
    agent.spawn();
    wait_for("app running again", MINUTE, || {
        (module_state(&agent, "app")["status"] == "running").then_some(())
    });
    let s = module_state(&agent, "once");
    assert_eq!(s["status"], "exited", "{s}");
    assert_eq!(ran(&agent), first, "not run again: {}", agent.log());

    // After a reboot, what the reboot stopped comes back, whatever its policy, uncounted.
    agent.stop();
    std::fs::write(agent.state_dir().join("boot"), "another-boot").expect("note another boot");
    agent.spawn();
    wait_for("once run again", MINUTE, || {
        (ran(&agent) != first).then_some(())
    });
    assert_eq!(module_state(&agent, "once")["restartCount"], 0);
}

#[test]
fn kill9_of_the_agent_then_a_restart_adopts_without_duplicates() {
    let mut agent = device("adopt", "process");
    let d = manifest(1, json!({ "app": testmod(json!({}), 0) }));
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}");
    let before = running(&agent, "app").expect("runs");
    // The module's shim is not the agent's child (started detached): an agent that execs
    // another build inherits no zombies.
    let parent = |pid: i64| -> Option<i64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let shim = parent(before.1).expect("the module's parent, its shim");
    assert_ne!(
        parent(shim),
        agent.pid().map(i64::from),
        "the shim is not the agent's child"
    );
    agent.kill9();
    // The module outlives the agent.
    assert_eq!(start_ticks(before.1), Some(before.2));
    agent.spawn();
    wait_for("applied again", MINUTE, || {
        let s = agent.try_state();
        (s["deployment"]["status"] == "applied" && s["modules"]["app"]["status"] == "running")
            .then_some(())
    });
    let after = running(&agent, "app").expect("runs");
    assert_eq!(after, before, "the same process, adopted");
    assert_eq!(agent.processes().len(), 1, "no duplicate");

    // A module killed from outside is a crash: restarted by its policy.
    run(std::process::Command::new("kill").args(["-KILL", &before.1.to_string()]));
    let restarted = wait_for("restarted", MINUTE, || {
        running(&agent, "app").filter(|r| r.1 != before.1)
    });
    assert_eq!(restarted.0, before.0, "the same record, started again");
    assert_eq!(module_state(&agent, "app")["restartCount"], 1);
}

#[test]
fn the_stop_grace_is_kept_and_a_failing_update_rolls_back() {
    let agent = device("rollback", "process");
    // A module that ignores SIGTERM: stopped after the grace (2 s in the harness), then killed.
    let stubborn = json!({
        "runtime": "process",
        "command": ["/bin/sh", "-c", "trap '' TERM; echo stubborn up; while :; do sleep 1; done"]
    });
    let v1 = manifest(
        1,
        json!({ "app": testmod(json!({}), 0), "stubborn": stubborn }),
    );
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}");
    let app = running(&agent, "app").expect("runs");
    let stubborn = running(&agent, "stubborn").expect("runs");

    let v2 = manifest(2, json!({ "app": testmod(json!({}), 0) }));
    let started = std::time::Instant::now();
    let (code, out) = agent.deploy(&v2, 60);
    assert_eq!(code, 0, "{out}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the stubborn module had its grace"
    );
    assert_ne!(
        start_ticks(stubborn.1),
        Some(stubborn.2),
        "the stubborn module is gone"
    );
    assert_eq!(running(&agent, "app"), Some(app.clone()), "app untouched");

    // v3 names an executable that is not on the device: it fails at staging, is rolled back
    // to v2, and nothing running was touched.
    let dir = testmod_binary().parent().unwrap().display().to_string();
    let mut v3 = manifest(
        3,
        json!({ "app": { "runtime": "process", "command": [format!("{dir}/missing")] } }),
    );
    v3["rollback"] = json!({ "onFailure": true, "healthyWithinSecs": 4 });
    let (code, out) = agent.deploy(&v3, 60);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rolled-back"), "{out}");
    let s = wait_for("v2 back", MINUTE, || {
        let s = agent.try_state();
        (s["deployment"]["status"] == "rolled-back" && s["modules"]["app"]["status"] == "running")
            .then_some(s)
    });
    let reasons = s["deployment"]["reasons"].to_string();
    assert!(reasons.contains("not found on the device"), "{reasons}");
    assert_eq!(
        running(&agent, "app"),
        Some(app),
        "the running module was never touched"
    );
}

#[test]
fn policy_and_engine_decide_what_may_run() {
    // No engine: a docker module is refused, with the reason, before anything changes.
    let agent = device("noengine", "process");
    let d = manifest(
        1,
        json!({ "web": { "image": "127.0.0.1:5000/web:1" }, "app": testmod(json!({}), 0) }),
    );
    let (code, out) = agent.deploy(&d, 30);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("/modules/web/runtime") && out.contains("no container engine"),
        "{out}"
    );
    assert!(agent.processes().is_empty(), "nothing started");
    // An executable the policy does not list is refused.
    let d = manifest(
        2,
        json!({ "app": { "runtime": "process", "command": ["/usr/bin/yes"] } }),
    );
    let (code, out) = agent.deploy(&d, 30);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("/modules/app/command/0") && out.contains("policy.allowed_executables"),
        "{out}"
    );
}

#[test]
fn containers_and_processes_in_one_deployment() {
    let agent = device("mixed", "docker");
    let image = "outpost-test/busybox:proc-mixed".to_string();
    busybox_image(&image);
    let d = manifest(
        1,
        json!({
            "box": { "image": image, "createOptions": { "Cmd": ["sh", "-c", "exec sleep 3600"] } },
            "app": testmod(json!({}), 1)
        }),
    );
    let (code, out) = agent.deploy(&d, 120);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    assert!(running(&agent, "app").is_some());
    assert!(
        containers(&agent.device)
            .iter()
            .any(|c| c.0 == "box" && c.2 == "running")
    );
    let s = agent.state();
    assert_eq!(s["modules"]["box"]["status"], "running");
    assert_eq!(s["modules"]["app"]["status"], "running");
}

/// `{url, sha256, size}` of a test model, as a `file://` artifact.
fn model_artifact(file: &str) -> Value {
    let path = workspace().join("module/testdata/models").join(file);
    let sha = run(std::process::Command::new("sha256sum").arg(&path));
    json!({
        "url": format!("file://{}", path.display()),
        "sha256": sha.split_whitespace().next().expect("a digest"),
        "size": std::fs::metadata(&path).expect("the model").len()
    })
}

/// The score `outpost-infer` gives 16 fixed sensor values, or `None` while it does not answer.
fn score(port: u16) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let body = json!({ "inputs": [{ "name": "sensor", "shape": [1, 16], "datatype": "FP32",
        "data": (0..16).map(|i| i as f32 / 16.0).collect::<Vec<_>>() }] })
    .to_string();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (_, body) = out.split_once("\r\n\r\n")?;
    let v: Value = serde_json::from_str(body).ok()?;
    Some(v["outputs"][0]["data"][0].to_string()).filter(|s| s != "null")
}

#[test]
fn a_new_model_artifact_is_served_without_restarting_the_module() {
    let infer = infer_bin().display().to_string();
    let agent = device_allowing("model", "process", &infer);
    let port = free_port();
    let model = agent
        .state_dir()
        .join("artifacts/modules/infer/model")
        .display()
        .to_string();
    let deployment = |version: u64, artifact: Value| {
        manifest(
            version,
            json!({ "infer": {
                "runtime": "process",
                "command": [infer, "serve", "--model", model, "--name", "m",
                    "--listen", format!("127.0.0.1:{port}"), "--reload-interval-ms", "200"],
                "artifacts": ["model"]
            } }),
        )
        .as_object()
        .cloned()
        .map(|mut d| {
            d.insert("artifacts".into(), json!({ "model": artifact }));
            Value::Object(d)
        })
        .expect("an object")
    };
    let (code, out) = agent.deploy(&deployment(1, model_artifact("mlp.onnx")), 120);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let first = wait_for("the first model's answer", MINUTE, || score(port));
    let process = running(&agent, "infer").expect("runs");

    // A new model: a new digest in a new deployment. Same process, new answers.
    let (code, out) = agent.deploy(&deployment(2, model_artifact("mlp_v2.onnx")), 120);
    assert_eq!(code, 0, "{out}");
    let second = wait_for("the new model's answer", MINUTE, || {
        score(port).filter(|s| *s != first)
    });
    assert_eq!(
        running(&agent, "infer"),
        Some(process.clone()),
        "not restarted"
    );

    // A wrong digest fails the module with the reason; what runs keeps serving the model it has.
    let mut wrong = model_artifact("mlp.onnx");
    wrong["sha256"] = json!("0".repeat(64));
    let (code, out) = agent.deploy(&deployment(3, wrong), 60);
    assert_eq!(code, 1, "{out}");
    let reasons = agent.state()["deployment"]["reasons"].to_string();
    assert!(reasons.contains("SHA-256"), "{reasons}");
    assert_eq!(running(&agent, "infer"), Some(process), "untouched");
    assert_eq!(score(port), Some(second));
}

/// Run as root, the agent starts process modules as `nobody` (`runtime.process_user` unset):
/// a module writes its own folder, but cannot read another module's record (its environment,
/// with its bus password), the agent's store, or list the modules.
#[test]
fn process_modules_run_as_nobody_and_reach_only_what_is_theirs() {
    let agent = device("user", "process");
    let v1 = manifest(1, json!({ "first": testmod(json!({}), 0) }));
    let (code, out) = agent.deploy(&v1, 120);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    assert!(
        agent
            .log()
            .contains("process modules run as uid 65534, gid 65534"),
        "{}",
        agent.log()
    );
    let check = agent.outpost(&["check", "--json"]);
    let report: Value = serde_json::from_slice(&check.stdout).expect("check --json");
    let finding = report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == "process-user"))
        .cloned()
        .unwrap_or_else(|| panic!("no process-user finding: {report}"));
    assert_eq!(finding["level"], "ok", "{finding}");
    assert!(
        finding["message"]
            .as_str()
            .is_some_and(|m| m.contains("uid 65534")),
        "{finding}"
    );
    let (first_id, first_pid, _) = running(&agent, "first").expect("first runs");
    let status = std::fs::read_to_string(format!("/proc/{first_pid}/status")).expect("status");
    let ids = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    // Real, effective, saved and filesystem ids; no supplementary group.
    assert_eq!(ids("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(ids("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(ids("Groups:"), "", "{status}");

    let state = agent.state_dir();
    let record = state.join("processes").join(&first_id).join("record.json");
    let store = state.join("outpost.redb");
    assert!(
        std::fs::read_to_string(&record)
            .expect("the record")
            .contains("OUTPOST_BUS_PASSWORD"),
        "the record holds a secret worth keeping"
    );
    let probe = format!(
        "echo id $(id -u):$(id -g); echo kept > data && echo wrote $(cat data); \
         cat {record} > /dev/null 2>&1 && echo LEAK record || echo denied record; \
         cat {store} > /dev/null 2>&1 && echo LEAK store || echo denied store; \
         ls {processes} > /dev/null 2>&1 && echo LEAK list || echo denied list; echo probe done; \
         exec sleep 600",
        record = record.display(),
        store = store.display(),
        processes = state.join("processes").display(),
    );
    let v2 = manifest(
        2,
        json!({
            "first": testmod(json!({}), 0),
            "probe": { "runtime": "process", "command": ["/bin/sh", "-c", probe] }
        }),
    );
    let (code, out) = agent.deploy(&v2, 120);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let said = wait_for("the probe's report", MINUTE, || {
        let out = agent.outpost(&["logs", "probe"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.contains("probe done").then_some(text)
    });
    for line in [
        "id 65534:65534",
        "wrote kept",
        "denied record",
        "denied store",
        "denied list",
    ] {
        assert!(said.contains(line), "`{line}` in:\n{said}");
    }
    assert!(!said.contains("LEAK"), "{said}");
    // Its folder is its own.
    use std::os::unix::fs::MetadataExt as _;
    let work = std::fs::metadata(state.join("processes/work/probe")).expect("its folder");
    assert_eq!((work.uid(), work.gid()), (65534, 65534));
}
