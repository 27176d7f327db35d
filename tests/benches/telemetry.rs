//! Benchmark of the outbox, with its durability as configured (every commit fsynced):
//!
//! 1. **Enqueue**: 200-byte records into the outbox as the bus submits them (many waiting
//!    at once, each answered only once durable); records/s.
//! 2. **Enqueue, one at a time**: a single producer waiting for each record (the worst case:
//!    one fsync per record).
//! 3. **Drain to Mosquitto** (mutual TLS on loopback): the same records sent by the drain
//!    until the outbox is empty, against `mosquitto_pub -l -q 1` pushing the same records
//!    as one message each over the same TLS (the floor the broker allows) in the same run.
//!
//! `cargo bench -p outpost-e2e --bench telemetry` (needs Mosquitto and `mosquitto_pub`).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_agent::hub::topics::Topics;
use outpost_agent::telemetry::outbox::{Limits, NewRecord, Outbox};
use outpost_agent::telemetry::upstream;
use outpost_e2e::*;
use tokio_util::sync::CancellationToken;

const RECORDS: usize = 50_000;
const SINGLE: usize = 500;
const DRAIN: usize = 20_000;
const ROUNDS: usize = 3;

fn record(n: usize) -> NewRecord {
    let head = format!("{{\"n\":{n},\"pad\":\"");
    let payload = format!("{head}{}\"}}", "x".repeat(200 - head.len() - 2));
    NewRecord {
        stream: "bench".into(),
        priority: 5,
        topic: "modules/bench/outputs/data".into(),
        payload: payload.into_bytes(),
    }
}

fn open(dir: &std::path::Path) -> (Outbox, CancellationToken, tokio::task::JoinHandle<()>) {
    let (outbox, writer) = Outbox::open(
        dir,
        Limits {
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(86400),
            disk_high_percent: 100,
        },
        std::sync::Arc::new(outpost_agent::clock::SystemClock::new()),
    )
    .expect("outbox");
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    (outbox, stop, task)
}

/// Submits `count` records keeping up to `window` waiting, like the bus does for its modules.
async fn enqueue(outbox: &Outbox, count: usize, window: usize) -> Duration {
    let started = Instant::now();
    let mut waiting = std::collections::VecDeque::new();
    for n in 0..count {
        waiting.push_back(outbox.submit(record(n)).await.expect("submit"));
        if waiting.len() >= window
            && let Some(rx) = waiting.pop_front()
        {
            rx.await.expect("durable");
        }
    }
    for rx in waiting {
        rx.await.expect("durable");
    }
    started.elapsed()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    outpost_agent::hub::install_crypto_provider();
    // On the same file system as a device's state (not tmpfs), so fsync costs what it costs.
    let base = std::env::var_os("OUTPOST_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| target_dir().join("bench-outbox"));
    std::fs::create_dir_all(&base).unwrap();

    // 1 and 2: enqueue.
    let mut rates = Vec::new();
    let mut single = Vec::new();
    for _ in 0..ROUNDS {
        let dir = tempfile::tempdir_in(&base).unwrap();
        let (outbox, stop, task) = open(dir.path());
        let took = enqueue(&outbox, RECORDS, 4096).await;
        rates.push(RECORDS as f64 / took.as_secs_f64());
        let took = enqueue(&outbox, SINGLE, 1).await;
        single.push(took.as_secs_f64() * 1000.0 / SINGLE as f64);
        stop.cancel();
        task.await.unwrap();
    }
    println!(
        "enqueue, 200-byte records, fsync per commit: median {:.0} records/s over {ROUNDS} rounds of {RECORDS} ({:?})",
        median(rates.clone()),
        rates.iter().map(|r| *r as u64).collect::<Vec<_>>()
    );
    println!(
        "enqueue one at a time (one fsync each): median {:.2} ms per record",
        median(single)
    );

    // 3: drain against mosquitto_pub.
    let broker = Broker::start(Auth::MutualTls)
        .unwrap()
        .expect("mosquitto is required");
    let pki = &broker.pki;
    let lines: String = (0..DRAIN)
        .map(|n| String::from_utf8(record(n).payload).unwrap() + "\n")
        .collect();
    let mut floor = Vec::new();
    let mut ours = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let mut child = Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &broker.port.to_string()])
            .args(["--cafile", pki.ca.to_str().unwrap()])
            .args(["--cert", pki.client_cert.to_str().unwrap()])
            .args(["--key", pki.client_key.to_str().unwrap()])
            .args(["-q", "1", "-l", "-t", "bench/floor", "-i"])
            .arg(format!("floor-{round}"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("mosquitto_pub (package mosquitto-clients)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(lines.as_bytes())
            .unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "mosquitto_pub failed");
        floor.push(DRAIN as f64 / started.elapsed().as_secs_f64());

        let dir = tempfile::tempdir_in(&base).unwrap();
        let (outbox, stop, task) = open(dir.path());
        enqueue(&outbox, DRAIN, 4096).await;
        let mut settings = broker.operator_settings(dir.path()).unwrap();
        settings.client_id = format!("bench-drain-{round}");
        let drain_stop = CancellationToken::new();
        let counters = Arc::new(upstream::LinkCounters::default());
        let started = Instant::now();
        let drain = tokio::spawn(upstream::run(
            upstream::Context {
                settings,
                topics: Topics::new("outpost", "bench"),
                outbox: outbox.clone(),
                link_session: tokio::sync::watch::channel(0).1,
                counters,
            },
            drain_stop.clone(),
        ));
        while outbox.stats().records > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "drain did not finish"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ours.push(DRAIN as f64 / started.elapsed().as_secs_f64());
        drain_stop.cancel();
        drain.await.unwrap();
        stop.cancel();
        task.await.unwrap();
    }
    let (f, o) = (median(floor.clone()), median(ours.clone()));
    println!(
        "drain to Mosquitto (mutual TLS): median {o:.0} records/s vs mosquitto_pub -q 1 {f:.0} records/s: {:.2}x the floor (rounds: ours {:?}, floor {:?})",
        o / f,
        ours.iter().map(|r| *r as u64).collect::<Vec<_>>(),
        floor.iter().map(|r| *r as u64).collect::<Vec<_>>()
    );
}
