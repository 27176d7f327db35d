//! The local bus broker's packet handling: after a valid CONNECT as module `cam`, arbitrary
//! bytes on the connection (packets, fragments, garbage) over an in-memory pipe, through the
//! real broker with its route table and a real outbox (on a RAM disk). No input may panic or
//! hang the connection past the time limit.
#![no_main]

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use outpost_agent::bus::BusSecret;
use outpost_agent::bus::broker::{Broker, BusCounters};
use outpost_agent::bus::routes::RouteTable;
use outpost_agent::telemetry::outbox::{Limits, Outbox};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

struct Harness {
    runtime: tokio::runtime::Runtime,
    broker: Broker,
    password: String,
    _dir: tempfile::TempDir,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = tempfile::Builder::new()
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" })
        .expect("a temporary folder");
    let secret = BusSecret::from_bytes(&[7; 32]);
    let password = secret.password("cam");
    let deployment: outpost_agent::manifest::Deployment = serde_json::from_str(
        r#"{"schemaVersion":"1.0","id":"f","version":1,"modules":{"cam":{"image":"r.io/a:1"},"other":{"image":"r.io/a:1"}},
            "routes":[{"from":"modules/cam/outputs/#","to":"$upstream/s"},{"from":"modules/cam/outputs/x","to":"modules/other/inputs/x"}]}"#,
    )
    .expect("the deployment parses");
    let (_tx, routes) = tokio::sync::watch::channel(Arc::new(RouteTable::for_deployment(&deployment)));
    std::mem::forget(_tx);
    let broker = runtime.block_on(async {
        let clock: outpost_agent::clock::SharedClock =
            Arc::new(outpost_agent::clock::SystemClock::new());
        let (outbox, writer) = Outbox::open(
            dir.path(),
            Limits {
                max_bytes: 1 << 20,
                max_age: Duration::from_secs(3600),
                disk_high_percent: 100,
            },
            clock,
        )
        .expect("the outbox opens");
        tokio::spawn(writer.run(CancellationToken::new()));
        Broker::new(secret, routes, outbox, Arc::new(BusCounters::default()))
    });
    Harness {
        runtime,
        broker,
        password,
        _dir: dir,
    }
});

fn connect_packet(user: &str, password: &str) -> Vec<u8> {
    let field = |b: &[u8]| {
        let mut v = (b.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    };
    let mut body = field(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    body.extend(field(b"fuzz"));
    body.extend(field(user.as_bytes()));
    body.extend(field(password.as_bytes()));
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

fuzz_target!(|data: &[u8]| {
    let h = &*HARNESS;
    h.runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let input = [connect_packet("cam", &h.password), data.to_vec()].concat();
        let feed = async move {
            let _ = client.write_all(&input).await;
            let _ = client.shutdown().await;
            let mut sink = vec![0u8; 1 << 16];
            while client.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        };
        let serve = h
            .broker
            .connection(server, IpAddr::from([127, 0, 0, 1]), CancellationToken::new());
        let both = async { tokio::join!(serve, feed) };
        // The broker must end the connection once the client is gone; a hang is a finding.
        // How the connection ended (an I/O error on a closed pipe is fine) is not the point.
        let _ended = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the broker did not let go of a closed connection");
    });
});
