//! Benchmark: a fleet of N real agents on one Mosquitto (TLS), process modules, rolled out to
//! with `outpost-ctl rollout`. For each N it records:
//!
//! - **start-up**: from starting the agents to every presence online on the hub;
//! - **memory**: each agent's resident and proportional set size once the fleet has applied a
//!   deployment (`/proc/PID/smaps_rollup`: PSS shares the binary's pages among the agents, RSS
//!   counts them for each, as a device with one agent would);
//! - **one wave**: a rollout whose canary is the whole fleet — from the first deployment
//!   message on the hub to the last device's `applied` report (seen by an observer on the
//!   broker);
//! - **in waves**: the default growth (×2) from a canary of 1% — total time, and how many waves;
//! - **broker messages per device** during the one-wave rollout, by kind (deployment, state,
//!   presence, telemetry, the rollout's own records), counted by an observer subscribed to
//!   `outpost/#`;
//! - **abort latency**: 10% of the devices (every tenth) refuse the deployment (their policy
//!   does not allow its executable); the rollout has a budget of 5% failures judged from 10
//!   settled devices. Latency = from the first refusal report on the hub to the rollout's
//!   record saying `aborted`; and how many devices had been sent the bad deployment by then.
//!
//! ```sh
//! scripts/bench-fleet            # FLEET_SIZES=100,1000 (default 100), release binaries
//! ```
//! or by hand: `OUTPOST_BIN=.../release/outpost OUTPOST_CTL_BIN=.../release/outpost-ctl
//! FLEET_SIZES=100 cargo bench -p outpost-e2e --bench fleet`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outpost_ctl::rollout::plan::Record;
use outpost_e2e::*;
use serde_json::Value;

/// What the observer saw.
#[derive(Default)]
struct Counts {
    messages: BTreeMap<&'static str, u64>,
    bytes: u64,
}

fn kind(topic: &str) -> &'static str {
    if topic.starts_with("outpost/_rollouts/") && topic.contains("/devices/") {
        "rollout staging"
    } else if topic.starts_with("outpost/_rollouts/") {
        "rollout record"
    } else if topic.starts_with("outpost/_operator/") {
        "operator sync"
    } else if topic.ends_with("/deployment") {
        "deployment"
    } else if topic.ends_with("/state") {
        "state"
    } else if topic.ends_with("/presence") {
        "presence"
    } else if topic.contains("/telemetry/") {
        "telemetry"
    } else {
        "other"
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Follows the hub while `run` goes on in a thread: counts messages, notes when the first
/// deployment went out, when every device reported `version` applied, when the first device
/// refused it, and when the rollout's record said `status`.
struct Observed {
    counts: Counts,
    first_deployment: Option<Instant>,
    all_applied: Option<Instant>,
    first_refusal: Option<Instant>,
    record_status: Option<(Instant, Record)>,
}

async fn observe(
    broker: &Broker,
    dir: &Path,
    devices: usize,
    version: u64,
    rollout: &str,
    until_status: &'static [&'static str],
    run: impl FnOnce() -> (i32, String) + Send + 'static,
) -> (Observed, (i32, String)) {
    let mut op = broker.operator(dir).await.expect("observer");
    op.subscribe(&["outpost/#".to_string()])
        .await
        .expect("subscribe");
    // Only what happens from now: the retained messages arrive first and are skipped.
    let _retained = op.fence(Duration::from_secs(30)).await.expect("fence");
    let task = tokio::task::spawn_blocking(run);
    let mut o = Observed {
        counts: Counts::default(),
        first_deployment: None,
        all_applied: None,
        first_refusal: None,
        record_status: None,
    };
    let mut applied = std::collections::BTreeSet::new();
    let record_topic = format!("outpost/_rollouts/{rollout}/state");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    let mut finished: Option<Instant> = None;
    loop {
        if task.is_finished() {
            let since = *finished.get_or_insert_with(Instant::now);
            // Reports may trail the command's exit a little; not for long.
            let all = o.all_applied.is_some() || devices == 0;
            if (all && o.record_status.is_some()) || since.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        let m = op
            .recv_until(tokio::time::Instant::now() + Duration::from_millis(500))
            .await
            .expect("observer");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the benchmark ran for 30 minutes"
        );
        let Some(m) = m else { continue };
        let now = Instant::now();
        let k = kind(&m.topic);
        *o.counts.messages.entry(k).or_default() += 1;
        o.counts.bytes += m.payload.len() as u64;
        match k {
            "deployment" => {
                o.first_deployment.get_or_insert(now);
            }
            "state" => {
                let Ok(v) = serde_json::from_slice::<Value>(&m.payload) else {
                    continue;
                };
                let device = v["deviceId"].as_str().unwrap_or_default().to_string();
                if v["deployment"]["version"] == version && v["deployment"]["status"] == "applied" {
                    applied.insert(device);
                    if applied.len() == devices {
                        o.all_applied.get_or_insert(now);
                    }
                }
                if v["lastRejected"]["version"] == version {
                    o.first_refusal.get_or_insert(now);
                }
            }
            "rollout record" if m.topic == record_topic => {
                if let Ok(r) = serde_json::from_slice::<Record>(&m.payload)
                    && until_status.contains(&r.status.name())
                    && o.record_status.is_none()
                {
                    o.record_status = Some((now, r));
                }
            }
            _ => {}
        }
    }
    let result = task.await.expect("the rollout thread");
    (o, result)
}

fn ms(a: Option<Instant>, b: Option<Instant>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!(
            "{:.0} ms",
            b.saturating_duration_since(a).as_secs_f64() * 1000.0
        ),
        _ => "n/a".into(),
    }
}

async fn bench(n: usize) {
    let broker = Broker::start_mosquitto(Auth::Tls)
        .expect("mosquitto")
        .expect("mosquitto is needed (scripts/setup installs it)");
    let dir = tempfile::tempdir().expect("temp dir");
    let key = outpost_agent::signing::generate_key().expect("key");
    let (private, public) =
        outpost_agent::signing::write_key_pair(&key, &dir.path().join("operator")).expect("keys");
    let private = private.display().to_string();
    let mut options = FleetOptions::new("fleet", n);
    options.trusted_key = Some(public);
    // `/bin/sleep` everywhere; `/usr/bin/sleep` (the same program) not on every tenth device.
    options.refusing = (0..n).filter(|i| i % 10 == 5).collect();
    let started = Instant::now();
    let fleet = Fleet::start(&broker, options).expect("fleet");
    let spawned = started.elapsed();
    let online = fleet
        .wait_online(&broker, Duration::from_secs(600))
        .await
        .expect("the fleet comes online");
    println!(
        "N={n}: {n} agents spawned in {:.1} s; all online on the hub {:.1} s after the first was started",
        spawned.as_secs_f64(),
        (spawned + online).as_secs_f64()
    );
    let ids = fleet.ids().join(",");
    let write = |name: &str, v: &Value| {
        let p = dir.path().join(name);
        std::fs::write(&p, v.to_string()).expect("manifest");
        p.display().to_string()
    };

    // One wave: the whole fleet at once.
    let v1 = write("v1.json", &sleeper("fleet", 1));
    let (b, p, ids2) = (
        broker_flags(&broker, dir.path()),
        private.clone(),
        ids.clone(),
    );
    let n_s = n.to_string();
    let (o, (code, out)) = observe(
        &broker,
        dir.path(),
        n,
        1,
        "one-wave",
        &["completed", "aborted"],
        move || {
            run_ctl(
                &b,
                &[
                    "rollout",
                    "start",
                    &v1,
                    "--devices",
                    &ids2,
                    "--canary",
                    &n_s,
                    "--sign-key",
                    &p,
                    "--id",
                    "one-wave",
                    "--device-timeout",
                    "600",
                ],
            )
        },
    )
    .await;
    assert_eq!(code, 0, "{out}");
    println!(
        "N={n}: one wave: first deployment message → all {n} applied: {}",
        ms(o.first_deployment, o.all_applied)
    );
    let per_device: Vec<String> = o
        .counts
        .messages
        .iter()
        .map(|(k, c)| format!("{k} {:.2}", *c as f64 / n as f64))
        .collect();
    let total: u64 = o.counts.messages.values().sum();
    println!(
        "N={n}: broker messages per device during it: {:.2} ({}), {:.0} bytes",
        total as f64 / n as f64,
        per_device.join(", "),
        o.counts.bytes as f64 / n as f64
    );

    // Memory, with the deployment applied and the module running.
    let mem: Vec<(u64, u64)> = fleet
        .members
        .iter()
        .filter_map(|m| m.memory_kib())
        .collect();
    let rss: Vec<u64> = mem.iter().map(|m| m.0).collect();
    let pss: Vec<u64> = mem.iter().map(|m| m.1).collect();
    println!(
        "N={n}: agent memory: RSS median {} KiB (max {}), PSS median {} KiB (max {}); total PSS {:.0} MiB",
        median(rss.clone()),
        rss.iter().max().copied().unwrap_or(0),
        median(pss.clone()),
        pss.iter().max().copied().unwrap_or(0),
        pss.iter().sum::<u64>() as f64 / 1024.0
    );

    // In waves: a 1% canary, then doubling.
    let v2 = write("v2.json", &sleeper("fleet", 2));
    let canary = (n / 100).max(1).to_string();
    let (b, p, ids2) = (
        broker_flags(&broker, dir.path()),
        private.clone(),
        ids.clone(),
    );
    let t = Instant::now();
    let (o, (code, out)) = observe(
        &broker,
        dir.path(),
        n,
        2,
        "waves",
        &["completed", "aborted"],
        move || {
            run_ctl(
                &b,
                &[
                    "rollout",
                    "start",
                    &v2,
                    "--devices",
                    &ids2,
                    "--canary",
                    &canary,
                    "--sign-key",
                    &p,
                    "--id",
                    "waves",
                ],
            )
        },
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let waves = o.record_status.as_ref().map_or(0, |(_, r)| r.waves.len());
    println!(
        "N={n}: in waves: {waves} waves from a canary of {}, first deployment message → all applied: {} (the command: {:.1} s)",
        (n / 100).max(1),
        ms(o.first_deployment, o.all_applied),
        t.elapsed().as_secs_f64()
    );

    // Abort: 10% of the devices refuse it.
    let mut bad = sleeper("fleet", 3);
    bad["modules"]["app"]["command"] = serde_json::json!(["/usr/bin/sleep", "86400"]);
    let v3 = write("v3.json", &bad);
    let (b, p, ids2) = (
        broker_flags(&broker, dir.path()),
        private.clone(),
        ids.clone(),
    );
    let (o, (code, out)) = observe(
        &broker,
        dir.path(),
        0,
        3,
        "abort",
        &["aborted", "completed"],
        move || {
            run_ctl(
                &b,
                &[
                    "rollout",
                    "start",
                    &v3,
                    "--devices",
                    &ids2,
                    "--canary",
                    &canary_of(n),
                    "--sign-key",
                    &p,
                    "--id",
                    "abort",
                    "--max-failures",
                    "5%",
                    "--min-devices",
                    "10",
                ],
            )
        },
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let (at, record) = o.record_status.expect("the rollout's record");
    assert_eq!(record.status.name(), "aborted", "{out}");
    let sent = record
        .devices
        .values()
        .filter(|d| d.sent_at.is_some())
        .count();
    println!(
        "N={n}: abort: first refusal on the hub → rollout aborted: {}; {sent} of {n} devices had been sent it ({})",
        ms(o.first_refusal, Some(at)),
        record.reason.unwrap_or_default()
    );
    drop(fleet);
}

fn canary_of(n: usize) -> String {
    (n / 100).max(1).to_string()
}

fn broker_flags(broker: &Broker, dir: &Path) -> Vec<String> {
    broker.cli_flags(dir).expect("cli flags")
}

fn run_ctl(flags: &[String], args: &[&str]) -> (i32, String) {
    let out = Command::new(ctl_bin())
        .args(flags)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run outpost-ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn main() {
    let sizes: Vec<usize> = std::env::var("FLEET_SIZES")
        .unwrap_or_else(|_| "100".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "fleet benchmark: agent {}, outpost-ctl {}",
        outpost_bin().display(),
        ctl_bin().display()
    );
    for n in sizes {
        runtime.block_on(bench(n));
    }
}
