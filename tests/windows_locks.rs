//! Update windows and update locks on the real agent (`outpost run`) with process modules
//! (docs/reconciler.md#update-windows-and-locks): a deployment outside the window waits,
//! reported `waiting`, while the old module keeps running (same process), and applies when
//! the window opens; an `urgent` one applies at once; a module's update lock, taken through
//! the local API or the local bus, holds back a deployment that would replace it until it is
//! released or the deployment's deadline passes, and never one that leaves it alone.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_e2e::*;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// A process-runtime agent allowing the test module and `/bin/sh`, with `extra` sections.
fn device(name: &str, extra: &str) -> Agent {
    let testmod = testmod_binary();
    let dir = testmod.parent().expect("a folder").display().to_string();
    Agent::start_with(
        &format!("wl-{name}-{}", std::process::id()),
        "kind = \"process\"",
        &format!("[policy]\nallowed_executables = [\"{dir}/\", \"/bin/sh\"]\n{extra}\n"),
    )
}

fn testmod(env: Value) -> Value {
    json!({
        "runtime": "process",
        "command": [testmod_binary().display().to_string()],
        "env": env,
    })
}

fn manifest(version: u64, modules: Value) -> Value {
    json!({ "schemaVersion": "1.0", "id": "wl", "version": version, "modules": modules })
}

/// The module's running process: (pid, kernel start ticks).
fn running(agent: &Agent, module: &str) -> Option<(i64, u64)> {
    agent
        .processes()
        .into_iter()
        .filter(|(m, _, _)| m == module)
        .find_map(|(_, _, run)| {
            let pid = run["pid"].as_i64()?;
            let ticks = run["startTicks"].as_u64()?;
            (start_ticks(pid) == Some(ticks)).then_some((pid, ticks))
        })
}

/// Waits until the deployment of `version` has `status`; returns the state.
fn deployment_is(agent: &Agent, version: u64, status: &str, within: Duration) -> Value {
    wait_for(&format!("v{version} {status}"), within, || {
        let s = agent.try_state();
        (s["deployment"]["version"] == version && s["deployment"]["status"] == status).then_some(s)
    })
}

fn outpost_ok(agent: &Agent, args: &[&str]) {
    let out = agent.outpost(args);
    assert!(
        out.status.success(),
        "outpost {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn outside_the_window_a_deployment_waits_and_applies_when_it_opens() {
    // A ten-minute window that opens at the start of a minute 25 to 85 s from now, in UTC (the
    // configured zone, so the test does not depend on the machine's).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let opens = (now + 25).div_ceil(60) * 60;
    let minute_of_day = (opens % 86_400) / 60;
    let hm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let window = format!(
        "daily {}-{}",
        hm(minute_of_day),
        hm((minute_of_day + 10) % 1440)
    );
    let agent = device(
        "window",
        &format!("[maintenance]\nwindows = [\"{window}\"]\ntimezone = \"UTC\"\n"),
    );

    // Nothing runs yet: the first deployment applies at once, window or not.
    let (code, out) = agent.deploy(
        &manifest(1, json!({ "app": testmod(json!({"N": "1"})) })),
        60,
    );
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let first = running(&agent, "app").expect("app runs");

    // v2 changes app: accepted, staged, and waiting for the window; app keeps running.
    let (code, out) = agent.deploy(
        &manifest(2, json!({ "app": testmod(json!({"N": "2"})) })),
        3,
    );
    assert_eq!(code, 1, "not applied within the wait: {out}");
    assert!(
        out.contains("waiting for the update window (opens at"),
        "deploy says why: {out}"
    );
    let s = deployment_is(&agent, 2, "waiting", MINUTE);
    let waiting = &s["deployment"]["waiting"];
    assert_eq!(waiting["reason"], "update-window", "{s}");
    assert_eq!(waiting["opensAt"], opens, "{s}");
    let list = agent.outpost(&["list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("waiting for the update window"),
        "{list:?}"
    );
    assert_eq!(running(&agent, "app"), Some(first), "app untouched");

    // v3 is urgent: it applies at once, outside the window.
    let mut v3 = manifest(3, json!({ "app": testmod(json!({"N": "3"})) }));
    v3["urgent"] = json!(true);
    let (code, out) = agent.deploy(&v3, 60);
    assert_eq!(code, 0, "urgent applies now: {out}\n{}", agent.log());
    let urgent = running(&agent, "app").expect("app runs");
    assert_ne!(urgent, first, "replaced by the urgent deployment");

    // v4 waits again, then applies once the window opens.
    let (code, out) = agent.deploy(
        &manifest(4, json!({ "app": testmod(json!({"N": "4"})) })),
        2,
    );
    assert_eq!(code, 1, "{out}");
    deployment_is(&agent, 4, "waiting", MINUTE);
    assert_eq!(
        running(&agent, "app"),
        Some(urgent),
        "app untouched while waiting"
    );
    deployment_is(&agent, 4, "applied", Duration::from_secs(150));
    let applied_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    assert!(
        applied_at >= opens,
        "applied at {applied_at}, before the window ({opens})"
    );
    assert_ne!(
        running(&agent, "app"),
        Some(urgent),
        "app replaced in the window"
    );
}

/// A module that takes its update lock on the local bus as it starts, and releases it once
/// the file `release` appears in `dir`; then it idles.
fn bus_locker(dir: &str) -> Value {
    let script = format!(
        r#"u=${{OUTPOST_BUS_URL#mqtt://}}
pub() {{ mosquitto_pub -h "${{u%:*}}" -p "${{u##*:}}" -u "$OUTPOST_BUS_USER" -P "$OUTPOST_BUS_PASSWORD" -q 1 -t "modules/$OUTPOST_MODULE_NAME/lock" -m "$1"; }}
until pub lock; do sleep 0.2; done
echo locked
while [ ! -e {dir}/release ]; do sleep 0.2; done
pub unlock
echo unlocked
while :; do sleep 1; done"#
    );
    json!({ "runtime": "process", "command": ["/bin/sh", "-c", script] })
}

#[test]
fn a_module_holding_its_lock_delays_its_replacement_until_release_or_deadline() {
    require(
        "mosquitto_pub",
        "install mosquitto-clients (the bus-locking module publishes with it)",
    );
    let agent = device("lock", "");
    let scratch = agent.dir.path().display().to_string();
    let modules = |app: &str, worker_env: &str| {
        let mut worker = bus_locker(&scratch);
        worker["env"] = json!({ "V": worker_env });
        json!({ "app": testmod(json!({ "N": app })), "worker": worker })
    };
    let (code, out) = agent.deploy(&manifest(1, modules("1", "1")), 60);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    // The worker took its lock over the bus.
    wait_for("the worker's bus lock", MINUTE, || {
        let s = agent.try_state();
        let held = s["conditions"].as_array()?.iter().any(|c| {
            c["kind"] == "update-locks"
                && c["message"].as_str().is_some_and(|m| m.contains("worker"))
        });
        held.then_some(())
    });

    // Through the local API: app is locked; v2 changes app only and waits for its lock.
    outpost_ok(&agent, &["lock", "app"]);
    let app1 = running(&agent, "app").expect("app runs");
    let worker1 = running(&agent, "worker").expect("worker runs");
    let mut v2 = manifest(2, modules("2", "1"));
    v2["updateLockDeadlineSecs"] = json!(600);
    let (code, out) = agent.deploy(&v2, 2);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("waiting for the update lock of `app`"),
        "{out}"
    );
    let s = deployment_is(&agent, 2, "waiting", MINUTE);
    let waiting = &s["deployment"]["waiting"];
    assert_eq!(waiting["reason"], "update-lock", "{s}");
    assert_eq!(
        waiting["modules"],
        json!(["app"]),
        "worker's lock does not matter: {s}"
    );
    assert!(waiting["deadline"].as_u64().is_some(), "{s}");
    assert_eq!(
        running(&agent, "app"),
        Some(app1),
        "app untouched while locked"
    );

    // Released: v2 applies at once; the worker, unchanged, kept its process and its lock.
    outpost_ok(&agent, &["unlock", "app"]);
    deployment_is(&agent, 2, "applied", MINUTE);
    let app2 = running(&agent, "app").expect("app runs");
    assert_ne!(app2, app1, "app replaced");
    assert_eq!(running(&agent, "worker"), Some(worker1), "worker untouched");

    // The deadline: app locked again, v3 gives locks 3 s; it waits, then applies anyway, and
    // the lock goes with the replaced process.
    outpost_ok(&agent, &["lock", "app"]);
    let mut v3 = manifest(3, modules("3", "1"));
    v3["updateLockDeadlineSecs"] = json!(3);
    let started = std::time::Instant::now();
    let _ = agent.deploy(&v3, 1);
    deployment_is(&agent, 3, "applied", MINUTE);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "held until the deadline ({:?})",
        started.elapsed()
    );
    assert_ne!(
        running(&agent, "app"),
        Some(app2),
        "app replaced after the deadline"
    );
    assert!(
        !agent.state_dir().join("locks/app.json").exists(),
        "the lock is dropped with the process that held it"
    );

    // Through the bus: v4 changes the worker, which holds its lock; it waits until the worker
    // publishes `unlock`.
    let (code, out) = agent.deploy(&manifest(4, modules("3", "2")), 2);
    assert_eq!(code, 1, "{out}");
    let s = deployment_is(&agent, 4, "waiting", MINUTE);
    assert_eq!(
        s["deployment"]["waiting"]["modules"],
        json!(["worker"]),
        "{s}"
    );
    assert_eq!(
        running(&agent, "worker"),
        Some(worker1),
        "worker untouched while locked"
    );
    std::fs::write(agent.dir.path().join("release"), b"").expect("release file");
    deployment_is(&agent, 4, "applied", MINUTE);
    assert_ne!(running(&agent, "worker"), Some(worker1), "worker replaced");
}

/// A file artifact of `content` in `dir`, as a deployment names it.
fn file_artifact(dir: &std::path::Path, name: &str, content: &str) -> Value {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write the artifact");
    let sha = run(std::process::Command::new("sha256sum").arg(&path));
    json!({
        "url": format!("file://{}", path.display()),
        "sha256": sha.split_whitespace().next().expect("a digest"),
        "size": content.len()
    })
}

#[test]
fn a_new_model_alone_waits_for_the_window_and_for_its_modules_lock() {
    // A window that is closed now (it opens in six hours, UTC).
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let start = ((now / 60) + 6 * 60) % 1440;
    let hm = |m: u64| format!("{:02}:{:02}", (m / 60) % 24, m % 60);
    let window = format!("daily {}-{}", hm(start), hm((start + 30) % 1440));
    let agent = device(
        "model",
        &format!("[maintenance]\nwindows = [\"{window}\"]\ntimezone = \"UTC\"\n"),
    );
    let files = tempfile::tempdir().expect("artifact files");
    let model = agent.state_dir().join("artifacts/modules/app/model");
    let deployment = |version: u64, content: &str| {
        let mut d = manifest(
            version,
            json!({ "app": { "runtime": "process", "artifacts": ["model"],
                "command": [testmod_binary().display().to_string()] } }),
        );
        d["artifacts"] =
            json!({ "model": file_artifact(files.path(), &format!("m{version}"), content) });
        d
    };

    // The first deployment applies at once (nothing runs yet).
    let (code, out) = agent.deploy(&deployment(1, "model one"), 60);
    assert_eq!(code, 0, "{out}\n{}", agent.log());
    let app = running(&agent, "app").expect("app runs");
    assert_eq!(
        std::fs::read_to_string(&model).ok().as_deref(),
        Some("model one")
    );

    // v2 changes the model only: no container changes, and still it waits for the window;
    // the module keeps reading the model it has.
    let (code, out) = agent.deploy(&deployment(2, "model two"), 2);
    assert_eq!(code, 1, "{out}");
    let s = deployment_is(&agent, 2, "waiting", MINUTE);
    assert_eq!(s["deployment"]["waiting"]["reason"], "update-window", "{s}");
    assert_eq!(
        std::fs::read_to_string(&model).ok().as_deref(),
        Some("model one")
    );

    // Urgent, but the module holds its lock: the new model waits for the lock.
    outpost_ok(&agent, &["lock", "app"]);
    let mut v3 = deployment(3, "model three");
    v3["urgent"] = json!(true);
    v3["updateLockDeadlineSecs"] = json!(600);
    let (code, out) = agent.deploy(&v3, 2);
    assert_eq!(code, 1, "{out}");
    let s = deployment_is(&agent, 3, "waiting", MINUTE);
    assert_eq!(s["deployment"]["waiting"]["reason"], "update-lock", "{s}");
    assert_eq!(
        std::fs::read_to_string(&model).ok().as_deref(),
        Some("model one")
    );

    // Released: swapped in, the same process reading it.
    outpost_ok(&agent, &["unlock", "app"]);
    deployment_is(&agent, 3, "applied", MINUTE);
    assert_eq!(
        std::fs::read_to_string(&model).ok().as_deref(),
        Some("model three")
    );
    assert_eq!(running(&agent, "app"), Some(app), "not restarted");
}
