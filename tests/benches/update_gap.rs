//! Benchmark: how long a module is unavailable while it is updated to an image that has to be
//! pulled first, and whether the old container kept running during the pull.
//!
//! The agent runs module `app` from image v1 (the small test module); v2 adds a layer of
//! ~200 MB of random data and sits in a local registry (with credentials). v2 is deployed, and
//! the engine's own events for the device's containers say what happened when: the **pull
//! duration** (the agent's `pulling` → `pulled` log records for v2) and the module's
//! **unavailable time** = the new container's `start` − the old container's `die` (its `kill`
//! or `stop` when no `die` is seen), and whether the old container was still running when the
//! pull finished.
//!
//! ```sh
//! cargo build --release -p outpost-agent
//! OUTPOST_BIN=$CARGO_TARGET_DIR/release/outpost cargo bench -p outpost-e2e --bench update_gap
//! ```
//! `BENCH_RUNS` (default 1) repeats it, each round pulling afresh. Needs the Docker engine,
//! `docker-registry` and `htpasswd` (scripts/setup installs them).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_e2e::*;
use serde_json::{Value, json};

/// The size of v2's extra layer.
const LAYER_BYTES: u64 = 200 * 1024 * 1024;
const GRACE_SECS: u64 = 10;

fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// The first event of `id` among `actions`, tried in order of preference.
fn first_event(events: &[Value], id: &str, actions: &[&str]) -> Option<(String, i128)> {
    actions.iter().find_map(|action| {
        events
            .iter()
            .filter(|e| e["Type"] == "container" && e["id"] == id && e["Action"] == *action)
            .filter_map(|e| e["timeNano"].as_i64())
            .min()
            .map(|t| (action.to_string(), i128::from(t)))
    })
}

/// Unix nanoseconds of the agent's first log record `message` about `image`.
fn log_time(log: &[Value], message: &str, image: &str) -> Option<i128> {
    log.iter()
        .filter(|l| l["message"] == message && l["image"] == image)
        .find_map(|l| rfc3339_unix_nanos(l["timestamp"].as_str()?))
}

fn secs(nanos: i128) -> f64 {
    nanos as f64 / 1e9
}

fn main() {
    require_docker();
    let registry = Registry::start();
    let v1 = test_image(&registry, "gap/app", "1");
    let build = Instant::now();
    let v2 = test_image_with_random_layer(&registry, "gap/app", "2", LAYER_BYTES);
    eprintln!(
        "v2 built and pushed ({} MiB layer) in {:.1} s",
        LAYER_BYTES >> 20,
        build.elapsed().as_secs_f64()
    );
    let rounds: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1);
    let manifest = |version: u64, image: &str| {
        json!({
            "schemaVersion": "1.0",
            "id": "bench-gap",
            "version": version,
            "modules": { "app": { "image": image } },
            "registries": {
                registry.addr.clone(): { "username": registry.username, "password": registry.password }
            },
        })
    };
    println!("binary: {}", outpost_bin().display());
    for round in 0..rounds {
        // Each round pulls both images afresh.
        remove_image(&v1);
        remove_image(&v2);
        let device = format!("bench-gap-{}-{round}", std::process::id());
        let agent = Agent::start_configured(
            &device,
            "log_format = \"json\"",
            &format!("stop_grace_secs = {GRACE_SECS}"),
            "",
        );
        let (code, out) = agent.deploy(&manifest(1, &v1), 120);
        assert_eq!(code, 0, "v1 not applied: {out}");
        let old: Vec<_> = containers(&device);
        assert_eq!(old.len(), 1, "one container for v1: {old:?}");
        let old_id = old[0].1.clone();
        let old_full =
            run(std::process::Command::new("docker").args(["inspect", "-f", "{{.Id}}", &old_id]))
                .trim()
                .to_string();

        let since = SystemTime::now();
        let started = Instant::now();
        let (code, out) = agent.deploy(&manifest(2, &v2), 600);
        let deploy_secs = started.elapsed().as_secs_f64();
        assert_eq!(code, 0, "v2 not applied: {out}");
        let until = SystemTime::now() + Duration::from_secs(1);
        let events = device_events(&device, since, until);
        let log = agent.json_log();

        let t0 = unix_nanos(since);
        let (end_action, old_end) = first_event(&events, &old_full, &["die", "kill", "stop"])
            .unwrap_or_else(|| panic!("no die/kill/stop of the old container in {events:#?}"));
        let new_start = events
            .iter()
            .filter(|e| {
                e["Type"] == "container" && e["Action"] == "start" && e["id"] != old_full.as_str()
            })
            .filter_map(|e| e["timeNano"].as_i64())
            .min()
            .map(i128::from)
            .unwrap_or_else(|| panic!("no start of a new container in {events:#?}"));
        let pulling = log_time(&log, "pulling", &v2).expect("the agent logged `pulling` for v2");
        let pulled = log_time(&log, "pulled", &v2).expect("the agent logged `pulled` for v2");
        let kill = first_event(&events, &old_full, &["kill"]).map(|(_, t)| t);

        println!(
            "round {round}: v1 -> v2 ({} MiB layer pulled from a loopback registry)",
            LAYER_BYTES >> 20
        );
        println!("  deploy v2 command (start to `applied`): {deploy_secs:.2} s");
        println!("  times from the deploy command's start:");
        if let Some(kill) = kill {
            println!(
                "    old container kill (SIGTERM)    {:8.3} s",
                secs(kill - t0)
            );
        }
        println!(
            "    old container {end_action:<17} {:8.3} s",
            secs(old_end - t0)
        );
        println!(
            "    pull started (agent log)        {:8.3} s",
            secs(pulling - t0)
        );
        println!(
            "    pull finished (agent log)       {:8.3} s",
            secs(pulled - t0)
        );
        println!(
            "    new container start             {:8.3} s",
            secs(new_start - t0)
        );
        println!("  pull duration: {:.3} s", secs(pulled - pulling));
        println!(
            "  unavailable (new start - old {end_action}): {:.3} s",
            secs(new_start - old_end)
        );
        println!(
            "  old container still running when the pull finished: {}",
            if old_end > pulled { "yes" } else { "no" }
        );
        drop(agent);
    }
    remove_image(&v1);
    remove_image(&v2);
}
