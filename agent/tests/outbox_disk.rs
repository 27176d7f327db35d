//! The outbox on a real full disk: a small tmpfs as the state directory, filled with `dd`
//! until the kernel says ENOSPC. Needs root (to mount); without it the tests say so and stop,
//! and fail when `CI=true`.
//!
//! What a user relies on, shown here with the real parts:
//! - a full disk makes enqueues fail with "no space left", at once, and the health says so;
//!   once space is back, enqueue and read work again by themselves (no restart, no reopening
//!   by hand) within the reopen backoff, and nothing accepted before is lost or counted twice;
//! - above the disk's high watermark the outbox stops growing and the least important stream
//!   makes room (drop reason `disk`);
//! - a module publishing QoS 1 on the embedded bus gets no PUBACK for what could not be stored,
//!   its connection is closed with a warning naming it and the reason, and its client's resend
//!   is acknowledged once space is back;
//! - on an external broker (Mosquitto) the router does not acknowledge what could not be
//!   stored, and the broker's redelivery brings it into the outbox once space is back.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use outpost_agent::bus::broker::BusCounters;
use outpost_agent::bus::routes::RouteTable;
use outpost_agent::bus::{BusSecret, broker, router};
use outpost_agent::clock::{SharedClock, SystemClock};
use outpost_agent::manifest::Route;
use outpost_agent::telemetry::outbox::{
    Limits, NewRecord, Outbox, OutboxError, OutboxHealth, Writer,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

const WEEK: Duration = Duration::from_secs(7 * 86400);

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Says a test did not run, past the test harness's capture (which would hide it).
fn skipped(message: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {message}");
}

/// A tmpfs mounted on a temporary directory; unmounted when dropped (also when a test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when it cannot be mounted (not root): a clear message, and a failure on CI.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { dir }),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                let message = format!(
                    "these tests mount a tmpfs as a full disk and need root (mount -t tmpfs failed: {why})"
                );
                if on_ci() {
                    panic!("{message}");
                }
                skipped(&message);
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the filesystem with `dd` until ENOSPC; the file to delete to give the space back.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let out = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output()
            .expect("dd runs");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("No space left on device"),
            "dd should stop at ENOSPC: {said}"
        );
        filler
    }

    /// Writes a file of `bytes` (for a disk that is high but not full).
    fn occupy(&self, bytes: u64) -> PathBuf {
        let file = self.path().join("occupied");
        let status = Command::new("dd")
            .args([
                "if=/dev/zero",
                "bs=4k",
                &format!("count={}", bytes / 4096),
                "status=none",
            ])
            .arg(format!("of={}", file.display()))
            .status()
            .expect("dd runs");
        assert!(status.success());
        file
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Something still holds a file there: detach it rather than leave it mounted.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn clock() -> SharedClock {
    Arc::new(SystemClock::new())
}

fn record(stream: &str, priority: u8, n: usize, size: usize) -> NewRecord {
    let mut payload = format!("{n:08}").into_bytes();
    payload.resize(size.max(8), b'x');
    NewRecord {
        stream: stream.into(),
        priority,
        // One topic for all, so that records of one payload size count the same bytes.
        topic: "modules/m/outputs/x".into(),
        payload,
    }
}

fn limits(disk_high_percent: u8) -> Limits {
    Limits {
        max_bytes: 64 << 20,
        max_age: WEEK,
        disk_high_percent,
    }
}

fn start(writer: Writer) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let stop = CancellationToken::new();
    (stop.clone(), tokio::spawn(writer.run(stop)))
}

/// Waits until `check` holds, looking every 50 ms, for at most `limit`.
async fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Log lines of this test binary, for asserting what operators read.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_env_filter("info,rumqttc=warn")
            .with_writer(move || Sink(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines(logs: &Arc<Mutex<Vec<u8>>>, all_of: &[&str]) -> Vec<String> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| all_of.iter().all(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_records_and_they_are_accepted_again_once_space_is_back() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let (outbox, writer) = Outbox::open(fs.path(), limits(100), clock()).unwrap();
    let (stop, task) = start(writer);
    let mut accepted = Vec::new();
    for n in 0..20 {
        accepted.push(outbox.enqueue(record("s", 5, n, 1024)).await.unwrap());
    }

    let filler = fs.fill();
    // The file may still have a few free pages inside: enqueue until the disk says no.
    let mut n = 20;
    let refused = loop {
        match outbox.enqueue(record("s", 5, n, 16 * 1024)).await {
            Ok(id) => accepted.push(id),
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 600, "8 MiB cannot take 580 records of 16 KiB");
    };
    assert!(
        matches!(refused, OutboxError::NoSpace { .. }),
        "typed no-space error: {refused:?}"
    );
    assert!(
        refused
            .to_string()
            .contains("no space left on the device holding"),
        "{refused}"
    );
    let OutboxHealth::Degraded {
        reason,
        since_wall_ms,
    } = outbox.health()
    else {
        panic!("health must say the outbox is degraded");
    };
    assert_eq!(reason, "no space left on device");
    assert!(since_wall_ms > 0);
    // Refused at once while the file is closed, and nothing to read.
    let t = Instant::now();
    let again = outbox.enqueue(record("s", 5, n, 1024)).await;
    let refused_in = t.elapsed();
    assert!(
        matches!(again, Err(OutboxError::NoSpace { .. })),
        "{again:?}"
    );
    assert!(refused_in < Duration::from_millis(50), "{refused_in:?}");
    assert!(outbox.read("s", 0, 10, 1 << 20).is_err());

    let mut added = outbox.added();
    added.borrow_and_update();
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    tokio::time::timeout(Duration::from_secs(40), added.changed())
        .await
        .expect("the outbox comes back by itself within the backoff")
        .unwrap();
    let recovered_in = freed.elapsed();
    assert_eq!(outbox.health(), OutboxHealth::Ok);
    accepted.push(outbox.enqueue(record("s", 5, n, 1024)).await.unwrap());
    let enqueue_ok_in = freed.elapsed();
    eprintln!(
        "FIGURE outbox: refused in {refused_in:?} while full; back {recovered_in:?} after the filler was deleted (first enqueue durable after {enqueue_ok_in:?}); {} records accepted, the last {} while the disk filled",
        accepted.len(),
        accepted.len() - 21
    );

    let read = outbox.read("s", 0, 10_000, 64 << 20).unwrap();
    let ids: Vec<u64> = read.iter().map(|r| r.id).collect();
    assert_eq!(ids, accepted, "every accepted record, once, in order");
    let stats = outbox.stats();
    assert_eq!(stats.enqueued_total, accepted.len() as u64);
    assert_eq!(stats.records, accepted.len() as u64);
    stop.cancel();
    task.await.unwrap();
    drop(outbox);

    // And the file says the same after a restart.
    let (outbox, writer) = Outbox::open(fs.path(), limits(100), clock()).unwrap();
    assert_eq!(outbox.stats(), stats);
    drop(writer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_watermark_the_outbox_stops_growing_and_the_least_important_stream_makes_room() {
    // Above the watermark the outbox still takes up to 4 MiB: hold more than that first.
    const SIZE: usize = 32 * 1024;
    let Some(fs) = Tmpfs::mount("64m") else {
        return;
    };
    let (outbox, writer) = Outbox::open(fs.path(), limits(90), clock()).unwrap();
    let (stop, task) = start(writer);
    for n in 0..150 {
        outbox.enqueue(record("bulk", 9, n, SIZE)).await.unwrap();
    }
    for n in 0..5 {
        outbox.enqueue(record("alerts", 1, n, SIZE)).await.unwrap();
    }
    assert!(outbox.stats().bytes > 4 << 20);
    let usage = outpost_agent::disk::usage(fs.path()).unwrap();
    // Up to 95% in use.
    let target = usage.total_bytes * 95 / 100;
    let used = usage.total_bytes - usage.available_bytes;
    let occupied = fs.occupy(target - used);
    let reason = eventually(
        Duration::from_secs(10),
        "health reports the watermark",
        || match outbox.health() {
            OutboxHealth::Degraded { reason, .. } if reason.contains("watermark") => Some(reason),
            _ => None,
        },
    )
    .await;
    eprintln!("health: {reason}");
    let bytes = outbox.stats().bytes;
    for n in 5..10 {
        outbox.enqueue(record("alerts", 1, n, SIZE)).await.unwrap();
    }
    let stats = outbox.stats();
    assert_eq!(stats.bytes, bytes, "the outbox did not grow");
    assert_eq!(stats.dropped_total["disk"], 5);
    let bulk = outbox.read("bulk", 0, 1000, 64 << 20).unwrap();
    assert_eq!(bulk.len(), 145);
    assert_eq!(
        bulk[0].payload,
        record("bulk", 9, 5, SIZE).payload,
        "the oldest went"
    );
    assert_eq!(outbox.read("alerts", 0, 100, 64 << 20).unwrap().len(), 10);

    std::fs::remove_file(occupied).unwrap();
    eventually(Duration::from_secs(10), "health is ok again", || {
        (outbox.health() == OutboxHealth::Ok).then_some(())
    })
    .await;
    outbox.enqueue(record("bulk", 9, 150, SIZE)).await.unwrap();
    let after = outbox.stats();
    assert!(after.bytes > bytes, "grows again");
    assert_eq!(after.dropped_total["disk"], 5);
    stop.cancel();
    task.await.unwrap();
}

/// A module's client: connects, publishes QoS 1 and reports what came back.
struct Module {
    client: AsyncClient,
    events: rumqttc::EventLoop,
}

impl Module {
    fn new(port: u16, secret: &BusSecret) -> Module {
        let mut o = MqttOptions::new("sensor-1", "127.0.0.1", port);
        o.set_credentials("sensor", secret.password("sensor"));
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, events) = AsyncClient::new(o, 16);
        Module { client, events }
    }

    /// Polls until a PUBACK (true) or the connection fails (false).
    async fn outcome(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .expect("an outcome in time")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_is_not_acknowledged_what_cannot_be_stored_and_is_told_why() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let logs = captured_logs();
    let (outbox, writer) = Outbox::open(fs.path(), limits(100), clock()).unwrap();
    let (stop, task) = start(writer);
    let table = RouteTable::new(&[Route {
        from: "modules/sensor/outputs/#".into(),
        to: "$upstream/readings".into(),
        priority: None,
    }]);
    let (_routes_tx, routes) = tokio::sync::watch::channel(Arc::new(table));
    let secret = BusSecret::from_bytes(&[7; 32]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let counters = Arc::new(BusCounters::default());
    let bus = tokio::spawn(broker::serve(
        listener,
        secret.clone(),
        routes,
        outbox.clone(),
        counters.clone(),
        Default::default(),
        stop.clone(),
    ));

    let mut module = Module::new(port, &secret);
    module
        .client
        .publish(
            "modules/sensor/outputs/a",
            QoS::AtLeastOnce,
            false,
            b"first".to_vec(),
        )
        .await
        .unwrap();
    assert!(
        module.outcome(Duration::from_secs(10)).await,
        "stored: PUBACK"
    );

    let filler = fs.fill();
    let big = vec![b'x'; 200 * 1024];
    module
        .client
        .publish(
            "modules/sensor/outputs/a",
            QoS::AtLeastOnce,
            false,
            big.clone(),
        )
        .await
        .unwrap();
    assert!(
        !module.outcome(Duration::from_secs(10)).await,
        "not stored: no PUBACK, the connection is closed"
    );
    assert!(counters.unstored.load(Ordering::Relaxed) >= 1);
    let warned = log_lines(&logs, &["WARN", "sensor", "no space left on the device"]);
    assert_eq!(
        warned.len(),
        1,
        "one warning naming the module and the reason: {warned:?}"
    );
    assert!(warned[0].contains("not acknowledged"), "{}", warned[0]);
    assert!(
        log_lines(&logs, &["shutting down"]).is_empty(),
        "nobody is told the agent is shutting down"
    );

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    // The module reconnects and publishes again what was not acknowledged, a little later
    // each time. (The bus keeps no sessions, so its CONNACK says "no session present" and
    // MQTT clients such as rumqttc discard their unacknowledged publishes: the module's own
    // code resends.)
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut attempts = 0;
    loop {
        assert!(Instant::now() < deadline, "acknowledged once space is back");
        match tokio::time::timeout(Duration::from_secs(10), module.events.poll())
            .await
            .expect("the bus answers")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                attempts += 1;
                module
                    .client
                    .publish(
                        "modules/sensor/outputs/a",
                        QoS::AtLeastOnce,
                        false,
                        big.clone(),
                    )
                    .await
                    .unwrap();
                if module.outcome(Duration::from_secs(10)).await {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    eprintln!(
        "FIGURE bus: the resent publish was acknowledged {:?} after the filler was deleted ({attempts} attempt(s)); {} refusals counted, {} warning(s) logged",
        freed.elapsed(),
        counters.unstored.load(Ordering::Relaxed),
        log_lines(&logs, &["WARN", "sensor", "publish not stored"]).len()
    );
    let stored = outbox.read("readings", 0, 100, 1 << 20).unwrap();
    let payloads: Vec<&[u8]> = stored.iter().map(|r| r.payload.as_slice()).collect();
    assert_eq!(payloads, [b"first".as_slice(), big.as_slice()]);
    stop.cancel();
    bus.await.unwrap();
    task.await.unwrap();
}

/// Mosquitto on a free loopback port, killed when dropped.
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> Option<Mosquitto> {
        let Some(bin) = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
        else {
            let message = "mosquitto is not installed (apt-get install -y mosquitto)";
            if on_ci() {
                panic!("{message}");
            }
            skipped(message);
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"
            ),
        )
        .unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto listens within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Mosquitto {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_an_external_broker_what_cannot_be_stored_is_redelivered_once_space_is_back() {
    let Some(fs) = Tmpfs::mount("8m") else { return };
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let (outbox, writer) = Outbox::open(fs.path(), limits(100), clock()).unwrap();
    let (stop, task) = start(writer);
    let table = RouteTable::new(&[Route {
        from: "modules/sensor/outputs/#".into(),
        to: "$upstream/readings".into(),
        priority: None,
    }]);
    let (_routes_tx, routes) = tokio::sync::watch::channel(Arc::new(table));
    let counters = Arc::new(BusCounters::default());
    let routing = tokio::spawn(router::run(
        router::Context {
            url: format!("mqtt://127.0.0.1:{}", mosquitto.port)
                .parse()
                .unwrap(),
            credentials: None,
            client_id: "device-router".into(),
            routes,
            outbox: outbox.clone(),
            counters: counters.clone(),
        },
        stop.clone(),
    ));
    // The router subscribes once connected; its subscription is seen by the first stored record.
    let mut o = MqttOptions::new("sensor-pub", "127.0.0.1", mosquitto.port);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (publisher, mut events) = AsyncClient::new(o, 64);
    let pump = tokio::spawn(async move { while let Ok(_e) = events.poll().await {} });
    let stored = |outbox: &Outbox| {
        outbox
            .read("readings", 0, 1000, 16 << 20)
            .map(|r| r.into_iter().map(|r| r.payload).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut n = 0u32;
    eventually(Duration::from_secs(10), "the router routes", || {
        let _ = publisher.try_publish(
            "modules/sensor/outputs/x",
            QoS::AtLeastOnce,
            false,
            format!("probe-{n}"),
        );
        n += 1;
        (!stored(&outbox).is_empty()).then_some(())
    })
    .await;

    let filler = fs.fill();
    let big = |i: usize| {
        let mut v = format!("full-{i}-").into_bytes();
        v.resize(100 * 1024, b'x');
        v
    };
    for i in 0..5 {
        publisher
            .publish("modules/sensor/outputs/x", QoS::AtLeastOnce, false, big(i))
            .await
            .unwrap();
    }
    eventually(
        Duration::from_secs(10),
        "the router counts a refusal",
        || (counters.unstored.load(Ordering::Relaxed) > 0).then_some(()),
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let all = eventually(
        Duration::from_secs(60),
        "the refused messages are redelivered",
        || {
            let got = stored(&outbox);
            (0..5).all(|i| got.contains(&big(i))).then_some(got)
        },
    )
    .await;
    eprintln!(
        "FIGURE router: the 5 refused messages were stored {:?} after the filler was deleted ({} refusals counted; {} records in the outbox)",
        freed.elapsed(),
        counters.unstored.load(Ordering::Relaxed),
        all.len()
    );
    stop.cancel();
    routing.await.unwrap();
    task.await.unwrap();
    pump.abort();
}
