//! Benchmark of the hub path with the real agent: time from an operator publishing a
//! deployment (retained, QoS 1, mutual TLS to Mosquitto) to the device's state on the hub
//! saying `applied`, for 5 modules whose images are present; and the agent's resident memory
//! while connected and idle with those 5 modules running.
//!
//! `cargo bench -p outpost-e2e --bench hub` (needs Mosquitto and the Docker engine). Set
//! `OUTPOST_BIN=target/release/outpost` to measure the release build, as a device runs it.

use std::time::{Duration, Instant};

use outpost_agent::state::{DeploymentStatus, ReportedState};
use outpost_e2e::*;
use serde_json::json;

const ROUNDS: u64 = 9;
const MODULES: usize = 5;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outpost_agent::hub::install_crypto_provider();
    let broker = Broker::start(Auth::MutualTls)
        .unwrap()
        .expect("mosquitto is required");
    let image = "outpost-bench/testmod:1";
    local_test_image(image, "");

    let device = format!("bench-hub-{}", std::process::id());
    let hub = format!(
        "[hub]\nurl = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        broker.url(),
        broker.pki.ca.display(),
        broker.pki.client_cert.display(),
        broker.pki.client_key.display()
    );
    let agent = Agent::start(&device, &hub);
    let dir = tempfile::tempdir().unwrap();
    let mut op = broker.operator(dir.path()).await.unwrap();
    let state_topic = format!("outpost/{device}/state");
    op.subscribe(std::slice::from_ref(&state_topic))
        .await
        .unwrap();
    let mut times = Vec::new();
    for version in 1..=ROUNDS {
        // Each version changes one module's environment: one container is replaced.
        let modules: serde_json::Map<String, serde_json::Value> = (0..MODULES)
            .map(|i| {
                let env = if i == 0 {
                    json!({ "ROUND": version.to_string() })
                } else {
                    json!({})
                };
                (format!("m{i}"), json!({ "image": image, "env": env }))
            })
            .collect();
        let manifest = json!({ "schemaVersion": "1.0", "id": "bench", "version": version, "modules": modules });
        let started = Instant::now();
        op.publish(
            &format!("outpost/{device}/deployment"),
            true,
            manifest.to_string().into_bytes(),
        )
        .await
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let message = op
                .recv_until(deadline)
                .await
                .unwrap()
                .expect("applied within 120 s");
            let Ok(state) = serde_json::from_slice::<ReportedState>(&message.payload) else {
                continue;
            };
            if state
                .deployment
                .as_ref()
                .is_some_and(|d| d.version == version && d.status == DeploymentStatus::Applied)
            {
                break;
            }
        }
        let t = started.elapsed().as_secs_f64();
        eprintln!("v{version}: publish -> applied {:.1} ms", t * 1e3);
        if version > 1 {
            // v1 creates all 5 containers; later versions replace one.
            times.push(t);
        }
    }
    times.sort_by(f64::total_cmp);
    // Idle: connected, 5 modules running, nothing to do. Sample for 5 s.
    let pid = agent.pid().unwrap();
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_kb(pid));
    }
    println!("binary: {}", outpost_bin().display());
    println!(
        "publish -> applied (one of 5 modules replaced), median of {}: {:.1} ms",
        times.len(),
        times[times.len() / 2] * 1e3
    );
    println!(
        "agent resident memory, idle with {MODULES} modules, connected: {:.1} MB (VmRSS peak over 5 s)",
        peak as f64 / 1024.0
    );
}
