//! Fleet rollouts (`outpost-ctl rollout`) over a real broker with TLS, to 20 real agents
//! (`outpost run`, process modules) on this machine: a good deployment reaches every device
//! wave by wave, a bad one stops at the canary (and is reverted there) while the others never
//! receive it, and a rollout whose operator process is killed is finished by another one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use outpost_agent::signing;
use outpost_agent::state::{DeploymentStatus, ReportedState};
use outpost_ctl::hub::{DeviceView, Operator, describe_deployment, fold};
use outpost_ctl::rollout::plan::{DeviceStatus, Record, Status};
use outpost_e2e::*;
use serde_json::Value;

const DEVICES: usize = 20;
const MINUTE: Duration = Duration::from_secs(60);

/// `outpost-ctl` (the built binary, so the test can kill it) with the broker's flags.
fn ctl_command(broker: &Broker, dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(ctl_bin());
    c.args(broker.cli_flags(dir).expect("cli flags"))
        .args(args)
        .stdin(Stdio::null());
    c
}

/// Runs `outpost-ctl` to the end; (exit code, standard error).
fn ctl_run(broker: &Broker, dir: &Path, args: &[&str]) -> (i32, String) {
    let out = ctl_command(broker, dir, args)
        .output()
        .expect("run outpost-ctl");
    // What the operator would have seen, in the test's output.
    eprintln!(
        "$ outpost-ctl {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn write_manifest(dir: &Path, name: &str, manifest: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, manifest.to_string()).expect("write manifest");
    path.display().to_string()
}

/// The retained record of rollout `id`.
async fn record(op: &mut Operator, id: &str) -> Record {
    let topic = format!("outpost/_rollouts/{id}/state");
    let messages = op
        .snapshot(std::slice::from_ref(&topic), Duration::from_secs(10))
        .await
        .expect("snapshot");
    let m = messages
        .iter()
        .rev()
        .find(|m| m.topic == topic && !m.payload.is_empty())
        .unwrap_or_else(|| panic!("no record of rollout {id}"));
    serde_json::from_slice(&m.payload).expect("a rollout record")
}

/// Every device's retained state and own deployment, as the hub has them now.
async fn fleet_view(op: &mut Operator) -> (BTreeMap<String, DeviceView>, BTreeMap<String, u64>) {
    let messages = op
        .snapshot(
            &["outpost/+/state".into(), "outpost/+/deployment".into()],
            Duration::from_secs(10),
        )
        .await
        .expect("snapshot");
    let mut views = BTreeMap::new();
    fold("outpost", &messages, &mut views);
    let deployments = messages
        .iter()
        .filter_map(|m| {
            let device = m
                .topic
                .strip_prefix("outpost/")?
                .strip_suffix("/deployment")?;
            Some((device.to_string(), describe_deployment(&m.payload)?.1))
        })
        .collect();
    (views, deployments)
}

fn in_force(state: Option<&ReportedState>) -> Option<(String, u64, DeploymentStatus)> {
    let d = state?.deployment.as_ref()?;
    Some((d.id.clone(), d.version, d.status))
}

/// The wave rule, from the record: no device of a wave was sent the deployment before every
/// device of the wave before had settled.
fn assert_wave_by_wave(r: &Record) {
    for (i, pair) in r.waves.windows(2).enumerate() {
        let settled_before = pair[0]
            .devices
            .iter()
            .map(|d| r.devices[d].settled_at.expect("settled"))
            .max()
            .expect("a wave has devices");
        let sent_next = pair[1]
            .devices
            .iter()
            .map(|d| r.devices[d].sent_at.expect("sent"))
            .min()
            .expect("a wave has devices");
        assert!(
            sent_next >= settled_before,
            "wave {} was sent at {sent_next}, before wave {i} had settled ({settled_before})",
            i + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_go_wave_by_wave_stop_at_a_failing_canary_and_survive_their_operator() {
    init();
    let Some(broker) = Broker::start(Auth::Tls).expect("broker") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let key = signing::generate_key().expect("key");
    let (private, public) =
        signing::write_key_pair(&key, &dir.path().join("operator")).expect("keys");
    let private = private.display().to_string();
    let mut options = FleetOptions::new(&format!("r{}", std::process::id() % 10_000), DEVICES);
    options.trusted_key = Some(public);
    options.log_level = "info".into();
    let fleet = Fleet::start(&broker, options).expect("fleet");
    fleet
        .wait_online(&broker, 2 * MINUTE)
        .await
        .expect("the fleet comes online");
    let mut op = broker.operator(dir.path()).await.expect("operator");
    let devices = fleet.ids().join(",");

    // 1. A good deployment reaches all 20, wave by wave: 2 (canary), 4, 8, 6.
    let v1 = write_manifest(dir.path(), "v1.json", &sleeper("fleet", 1));
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v1,
            "--devices",
            &devices,
            "--canary",
            "2",
            "--sign-key",
            &private,
            "--id",
            "good",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let good = record(&mut op, "good").await;
    assert_eq!(good.status, Status::Completed, "{out}");
    let sizes: Vec<usize> = good.waves.iter().map(|w| w.devices.len()).collect();
    assert_eq!(sizes, vec![2, 4, 8, 6]);
    assert_wave_by_wave(&good);
    let (views, _) = fleet_view(&mut op).await;
    for id in fleet.ids() {
        assert_eq!(
            in_force(views.get(&id).and_then(|v| v.state.as_ref())),
            Some(("fleet".into(), 1, DeploymentStatus::Applied)),
            "{id}: {}",
            fleet.member(&id).map(|m| m.log()).unwrap_or_default()
        );
    }

    // 2. A deployment that fails (here: the device's policy refuses its executable) stops at
    // the canary; the other 18 never receive it; the canary is reverted to v1's content.
    let mut bad = sleeper("fleet", 2);
    bad["modules"]["app"]["command"] = serde_json::json!(["/bin/true"]);
    let v2 = write_manifest(dir.path(), "v2.json", &bad);
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v2,
            "--devices",
            &devices,
            "--canary",
            "2",
            "--sign-key",
            &private,
            "--id",
            "bad",
            "--revert-on-abort",
        ],
    );
    assert_eq!(code, 1, "an aborted rollout exits 1: {out}");
    let aborted = record(&mut op, "bad").await;
    assert_eq!(aborted.status, Status::Reverted, "{out}");
    assert!(
        aborted
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("failed")),
        "{:?}",
        aborted.reason
    );
    let canary: Vec<String> = aborted.waves[0].devices.clone();
    assert_eq!(canary.len(), 2);
    let (views, deployments) = fleet_view(&mut op).await;
    for id in fleet.ids() {
        let state = views.get(&id).and_then(|v| v.state.as_ref());
        if canary.contains(&id) {
            // Refused with the reason, then the revert (v1's content as v3) applied.
            assert_eq!(aborted.devices[&id].status, DeviceStatus::Reverted, "{id}");
            assert_eq!(
                in_force(state),
                Some(("fleet".into(), 3, DeploymentStatus::Applied)),
                "{id}"
            );
        } else {
            assert_eq!(aborted.devices[&id].status, DeviceStatus::Pending, "{id}");
            assert_eq!(deployments.get(&id), Some(&1), "{id} never received v2");
            assert_eq!(
                in_force(state),
                Some(("fleet".into(), 1, DeploymentStatus::Applied)),
                "{id}"
            );
        }
    }
    assert!(
        out.contains("/modules/app"),
        "the refusal's reason is shown: {out}"
    );
    // The canary device whose refusal spent the budget reported it with the reason (the other
    // may have been sent the revert before it read v2: a device takes the newest message).
    assert!(
        canary.iter().any(|id| views[id]
            .state
            .as_ref()
            .and_then(|s| s.last_rejected.as_ref())
            .is_some_and(|r| r.version == 2)),
        "{aborted:?}"
    );

    // 3. The operator's process is killed mid-rollout; another one finds the rollout on the
    // hub and finishes it (after being refused while the dead runner's heartbeat is fresh).
    let v4 = write_manifest(dir.path(), "v4.json", &sleeper("fleet", 4));
    let mut runner = ctl_command(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v4,
            "--devices",
            &devices,
            "--canary",
            "2",
            "--sign-key",
            &private,
            "--id",
            "resumed",
            "--bake",
            "2",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start the rollout");
    let deadline = tokio::time::Instant::now() + 2 * MINUTE;
    loop {
        let topic = "outpost/_rollouts/resumed/state".to_string();
        let messages = op
            .snapshot(std::slice::from_ref(&topic), Duration::from_secs(10))
            .await
            .expect("snapshot");
        let r: Option<Record> = messages
            .iter()
            .rev()
            .find(|m| m.topic == topic && !m.payload.is_empty())
            .and_then(|m| serde_json::from_slice(&m.payload).ok());
        if r.as_ref().is_some_and(|r| r.current_wave >= 2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rollout did not get past wave 1: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runner.kill().expect("kill -9 the operator's process");
    runner.wait().expect("reap it");
    let before = record(&mut op, "resumed").await;
    assert_eq!(
        before.status,
        Status::Running,
        "a killed runner leaves it running"
    );
    assert!(
        before.tally(None).pending > 0,
        "killed mid-rollout: {before:?}"
    );
    let (code, out) = ctl_run(&broker, dir.path(), &["rollout", "resume", "resumed"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("--force"), "{out}");
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &["rollout", "resume", "resumed", "--force"],
    );
    assert_eq!(code, 0, "{out}");
    let done = record(&mut op, "resumed").await;
    assert_eq!(done.status, Status::Completed, "{out}");
    assert_wave_by_wave(&done);
    let (views, _) = fleet_view(&mut op).await;
    for id in fleet.ids() {
        assert_eq!(
            in_force(views.get(&id).and_then(|v| v.state.as_ref())),
            Some(("fleet".into(), 4, DeploymentStatus::Applied)),
            "{id}"
        );
    }
    // The table an operator reads.
    let (code, out) = ctl_run(&broker, dir.path(), &["rollout", "status", "resumed"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("completed") && out.contains("WAVE"), "{out}");

    // 4. Prepared on the hub without running (--no-run), cancelled from another process:
    // nothing is sent, and it cannot be resumed.
    let v5 = write_manifest(dir.path(), "v5.json", &sleeper("fleet", 5));
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v5,
            "--devices",
            &devices,
            "--sign-key",
            &private,
            "--id",
            "later",
            "--no-run",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let later = record(&mut op, "later").await;
    assert_eq!(later.status, Status::Paused);
    assert_eq!(later.tally(None).pending, DEVICES);
    let (code, out) = ctl_run(&broker, dir.path(), &["rollout", "cancel", "later"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(record(&mut op, "later").await.status, Status::Cancelled);
    let (code, out) = ctl_run(&broker, dir.path(), &["rollout", "resume", "later"]);
    assert_eq!(code, 1, "a cancelled rollout is not resumed: {out}");
    let (_, deployments) = fleet_view(&mut op).await;
    assert!(
        deployments.values().all(|v| *v == 4),
        "nothing of the cancelled rollout was sent: {deployments:?}"
    );
    let (code, out) = ctl_run(&broker, dir.path(), &["rollout", "status"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("later") && l.contains("cancelled")),
        "{out}"
    );

    // 5. A device that is online (its connection open) but answers nothing — its agent
    // frozen with SIGSTOP — counts as failed once the device timeout passes.
    let frozen = fleet.member(&fleet.ids()[19]).expect("a member");
    let pid = frozen.pid().expect("the agent runs").to_string();
    let signal = |sig: &str| {
        // A positive pid, checked above: the `kill` program is never given a group here.
        let status = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    signal("-STOP");
    let v6 = write_manifest(dir.path(), "v6.json", &sleeper("fleet", 6));
    let pair = format!("{},{}", fleet.ids()[18], fleet.ids()[19]);
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v6,
            "--devices",
            &pair,
            "--canary",
            "2",
            "--sign-key",
            &private,
            "--id",
            "silent",
            "--device-timeout",
            "3",
        ],
    );
    signal("-CONT");
    assert_eq!(code, 1, "{out}");
    let silent = record(&mut op, "silent").await;
    assert_eq!(silent.status, Status::Aborted, "{out}");
    assert_eq!(
        silent.devices[&fleet.ids()[19]].status,
        DeviceStatus::Silent
    );
    assert_eq!(
        silent.devices[&fleet.ids()[18]].status,
        DeviceStatus::Applied
    );

    // 6. A device that says it waits (its module holds the update lock) is neither settled nor
    // silent, however short the device timeout: the rollout waits for it, and completes once
    // the lock's deadline in the deployment has passed and the device applied.
    let locked = fleet.member(&fleet.ids()[17]).expect("a member");
    let out = outpost_command()
        .arg("--config")
        .arg(locked.dir.join("config.toml"))
        .args(["lock", "app"])
        .output()
        .expect("outpost lock");
    assert!(out.status.success(), "{out:?}");
    let mut held = sleeper("fleet", 7);
    held["updateLockDeadlineSecs"] = serde_json::json!(6);
    let v7 = write_manifest(dir.path(), "v7.json", &held);
    let pair = format!("{},{}", fleet.ids()[16], fleet.ids()[17]);
    let (code, out) = ctl_run(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v7,
            "--devices",
            &pair,
            "--canary",
            "2",
            "--sign-key",
            &private,
            "--id",
            "held",
            "--device-timeout",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("waiting"),
        "the wait and its reason are shown: {out}"
    );
    let held = record(&mut op, "held").await;
    assert_eq!(held.status, Status::Completed, "{out}");
    assert!(
        held.devices
            .values()
            .all(|d| d.status == DeviceStatus::Applied),
        "{held:?}"
    );
}

/// The hub restarts while a rollout runs (Mosquitto, stopped gracefully so its retained
/// messages are kept, as a hub's would be): the runner reconnects, subscribes again, and the
/// rollout completes — no device is taken for silent because the runner was away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_rides_out_a_hub_restart() {
    init();
    let Some(mut broker) = Broker::start_persistent(Auth::Tls).expect("broker") else {
        return;
    };
    if broker.kind != Kind::Mosquitto {
        eprintln!(
            "UNSUPPORTED on {}: the harness restarts only Mosquitto with its retained messages kept",
            broker.kind.name()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let key = signing::generate_key().expect("key");
    let (private, public) =
        signing::write_key_pair(&key, &dir.path().join("operator")).expect("keys");
    let mut options = FleetOptions::new(&format!("h{}", std::process::id() % 10_000), 6);
    options.trusted_key = Some(public);
    options.log_level = "info".into();
    let fleet = Fleet::start(&broker, options).expect("fleet");
    fleet
        .wait_online(&broker, MINUTE)
        .await
        .expect("the fleet comes online");
    let devices = fleet.ids().join(",");
    let v1 = write_manifest(dir.path(), "v1.json", &sleeper("fleet", 1));
    let log = std::fs::File::create(dir.path().join("runner.log")).expect("log");
    let mut runner = ctl_command(
        &broker,
        dir.path(),
        &[
            "rollout",
            "start",
            &v1,
            "--devices",
            &devices,
            "--canary",
            "1",
            "--bake",
            "3",
            "--device-timeout",
            "30",
            "--sign-key",
            &private.display().to_string(),
            "--id",
            "restart",
        ],
    )
    .stdout(Stdio::null())
    .stderr(log)
    .spawn()
    .expect("start the rollout");
    let runner_log = || std::fs::read_to_string(dir.path().join("runner.log")).unwrap_or_default();
    let mut op = broker.operator(dir.path()).await.expect("operator");
    let deadline = tokio::time::Instant::now() + MINUTE;
    while !runner_log().contains("watching it for 3 s") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the canary did not settle: {}",
            runner_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An operator's connection that only listens (as `outpost-ctl watch` does) keeps hearing
    // after the restart: the connection subscribes again by itself.
    let mut watcher = broker.operator(dir.path()).await.expect("watcher");
    watcher
        .subscribe(&["outpost/+/state".to_string()])
        .await
        .expect("subscribe");
    broker.outage_begin();
    broker.outage_end().expect("the broker starts again");
    let restarted_at = tokio::time::Instant::now();
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    let status = loop {
        if let Some(status) = runner.try_wait().expect("runner") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rollout did not finish: {}",
            runner_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = runner_log();
    assert!(status.success(), "{out}");
    assert!(out.contains("reconnected to the hub"), "{out}");
    let done = record(&mut op, "restart").await;
    // The devices after the canary applied only after the restart (the canary was still being
    // watched when the hub went down): hearing them live means the connection subscribed again.
    let later: Vec<&String> = done.waves[1..].iter().flat_map(|w| &w.devices).collect();
    let mut heard = std::collections::BTreeSet::new();
    while let Some(m) = watcher
        .recv_until(tokio::time::Instant::now() + Duration::from_millis(300))
        .await
        .expect("watcher")
    {
        let Ok(state) = serde_json::from_slice::<ReportedState>(&m.payload) else {
            continue;
        };
        if !m.retain
            && in_force(Some(&state)) == Some(("fleet".into(), 1, DeploymentStatus::Applied))
        {
            heard.insert(state.device_id);
        }
    }
    assert!(
        later.iter().any(|d| heard.contains(*d)),
        "the listening connection heard none of {later:?} apply after the restart ({:?} ago); heard {heard:?}",
        restarted_at.elapsed()
    );
    assert_eq!(done.status, Status::Completed, "{out}");
    assert!(
        done.devices.values().all(|d| !d.status.is_failure()),
        "{out}"
    );
    let deadline = tokio::time::Instant::now() + MINUTE;
    loop {
        let (views, _) = fleet_view(&mut op).await;
        let applied = fleet
            .ids()
            .iter()
            .filter(|id| {
                in_force(views.get(*id).and_then(|v| v.state.as_ref()))
                    == Some(("fleet".into(), 1, DeploymentStatus::Applied))
            })
            .count();
        if applied == fleet.ids().len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{applied} of 6 applied: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
