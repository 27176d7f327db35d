//! The embedded broker: MQTT 3.1.1 over TCP for the modules of this device.
//!
//! What it enforces:
//! - **Who:** the user name is the module's name and the password its own
//!   ([`super::BusSecret::password`]); anything else is refused at CONNECT.
//! - **Where:** a module publishes only under `modules/{name}/outputs/` and subscribes only
//!   under `modules/{name}/inputs/`. A publish elsewhere closes the connection (MQTT 3.1.1 has
//!   no negative acknowledgement; closing is what a client notices); a subscription elsewhere
//!   gets the failure return code.
//! - **When a message is safe:** a QoS 1 publish routed to `$upstream` is acknowledged only after
//!   the outbox made it durable, and PUBACKs go out in the order the publishes came in. One the
//!   outbox cannot store (no space, full of more important streams, the file being reopened) is
//!   not acknowledged: the connection is closed, a warning names the module and the reason, and
//!   the module's code must send it again after reconnecting (no sessions here: MQTT clients
//!   drop what was not acknowledged when CONNACK says "no session present").
//!
//! What it leaves out, on purpose (documented in `docs/telemetry.md`): QoS 2 (the connection is
//! closed), retained messages (the flag is ignored), persistent sessions and redelivery to
//! subscribers (a module's inputs reach it while it is connected; when its queue is full, or it
//! is not connected, messages are dropped and counted), wills, and TLS — the bus listens only on
//! an address the device's containers reach, never on every interface by default.
//!
//! Layout: `clients` (the shared state: who is connected, delivery to subscribers),
//! `connect` (a connection's login and its life), `session` (a logged-in module's packets),
//! `codec` (reading and writing packets), `topics` (each module's own topics).

mod clients;
mod codec;
mod connect;
mod session;
mod topics;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BusSecret;
use super::routes::RouteTable;
use crate::telemetry::outbox::Outbox;

use clients::{Pending, Shared};
use connect::connection;

pub use topics::{allowed_filter, allowed_publish, lock_topic};

/// Largest packet either way.
pub const MAX_PACKET: usize = 512 * 1024;
/// Messages waiting to be written to one subscriber.
const SUBSCRIBER_QUEUE: usize = 1024;
/// Bytes waiting to be written to one subscriber: beyond it, messages to it are dropped.
const SUBSCRIBER_BYTES: usize = 8 << 20;
/// Largest CONNECT packet (credentials and a will are small).
const MAX_CONNECT: usize = 64 * 1024;
/// Connections at once, authenticated or not.
const MAX_CONNECTIONS: usize = 128;
/// Connections that have not completed CONNECT yet, in all and per peer address: a module
/// holding idle sockets cannot lock the others out.
const MAX_UNAUTHENTICATED: usize = 32;
const MAX_UNAUTHENTICATED_PER_PEER: usize = 4;
/// Authenticated connections per module (a module usually needs one or two).
pub const MAX_PER_MODULE: usize = 8;
/// A client that asks for no keep-alive (0) is closed after this long without a packet.
const IDLE_WITHOUT_KEEP_ALIVE: Duration = Duration::from_secs(300);
/// Subscriptions per connection.
const MAX_FILTERS: usize = 64;
/// A write to a module that does not read in this long closes its connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Publishes waiting for the outbox, per connection: beyond it the broker stops reading from
/// that module (back-pressure through TCP).
const MAX_PENDING_ACKS: usize = 1024;
/// A connection that has not completed CONNECT in this long is closed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A module whose publishes keep being refused by the outbox (a full disk lasts) is warned
/// about at most this often; the refusals in between are logged at debug level and counted.
const UNSTORED_WARN_EVERY: Duration = Duration::from_secs(30);

pub use crate::telemetry::counters::BusCounters;

/// Serves the bus on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    secret: BusSecret,
    routes: watch::Receiver<Arc<RouteTable>>,
    outbox: Outbox,
    counters: Arc<BusCounters>,
    locks: super::LockHandle,
    stop: CancellationToken,
) {
    let shared = Broker::new(secret, routes, outbox, counters, locks).shared;
    let tracker = TaskTracker::new();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "local bus listening");
    }
    let mut deployment = shared.routes.clone();
    let mut deployments_open = true;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            changed = deployment.changed(), if deployments_open => {
                deployments_open = changed.is_ok();
                if changed.is_ok() {
                    // A module that left the deployment leaves the bus too.
                    let table = deployment.borrow_and_update().clone();
                    for c in shared.clients().values() {
                        if !table.allows(&c.module) {
                            tracing::info!(module = %c.module, "module no longer in the deployment: its bus connection is closed");
                            c.kick.cancel();
                        }
                    }
                }
                continue;
            }
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                if shared.connections.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, max = MAX_CONNECTIONS, "bus connection refused: too many connections");
                    continue;
                }
                let Some(pending) = Pending::take(&shared, peer.ip()) else {
                    shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, per_peer = MAX_UNAUTHENTICATED_PER_PEER, max = MAX_UNAUTHENTICATED,
                        "bus connection refused: too many connections that have not logged in");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (shared, stop) = (shared.clone(), stop.clone());
                shared.connections.fetch_add(1, Ordering::Relaxed);
                tracker.spawn(async move {
                    if let Err(reason) = connection(stream, &shared, pending, stop).await {
                        tracing::debug!(%peer, reason, "bus connection closed");
                    }
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "bus accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// The broker's shared state, for serving connections that do not come from its own
/// listener (the fuzz target feeds it in-memory pipes).
pub struct Broker {
    shared: Arc<Shared>,
}

impl Broker {
    pub fn new(
        secret: BusSecret,
        routes: watch::Receiver<Arc<RouteTable>>,
        outbox: Outbox,
        counters: Arc<BusCounters>,
        locks: super::LockHandle,
    ) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                secret,
                routes,
                outbox,
                clients: std::sync::Mutex::new(HashMap::new()),
                counters,
                next_conn: AtomicU64::new(1),
                connections: AtomicUsize::new(0),
                unauthenticated: std::sync::Mutex::new(HashMap::new()),
                unstored_log: std::sync::Mutex::new(HashMap::new()),
                locks,
            }),
        }
    }

    /// Serves one module's connection over `stream` as if it came from `peer`, until it ends.
    pub async fn connection<S: Stream>(
        &self,
        stream: S,
        peer: std::net::IpAddr,
        stop: CancellationToken,
    ) -> Result<(), String> {
        let pending = Pending::take(&self.shared, peer)
            .ok_or_else(|| "too many connections that have not logged in".to_string())?;
        connection(stream, &self.shared, pending, stop).await
    }
}

/// What a module's connection runs over: TCP in the agent, an in-memory pipe in the fuzz
/// target.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rumqttc::{Packet, Publish, QoS};

    use super::*;
    use crate::clock::FakeClock;
    use crate::manifest::Route;
    use crate::telemetry::outbox::testing::{Switch, open_failing};
    use crate::telemetry::outbox::{Limits, OutboxHealth};
    use rumqttc::{AsyncClient, Event, MqttOptions};

    /// Polls until a PUBACK (true) or the connection fails (false).
    async fn outcome(events: &mut rumqttc::EventLoop) -> bool {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .await
        .expect("an outcome within 10 s")
    }

    #[tokio::test]
    async fn a_publish_the_outbox_cannot_store_is_not_acknowledged_and_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let switch = Switch::default();
        let clock = Arc::new(FakeClock::new(crate::clock::PLAUSIBLE_AFTER_MS + 1, 1_000));
        let limits = Limits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
            disk_high_percent: 100,
        };
        let (outbox, writer) = open_failing(dir.path(), limits, clock, &switch).unwrap();
        let stop = CancellationToken::new();
        let writing = tokio::spawn(writer.run(stop.clone()));
        let table = RouteTable::new(&[Route {
            from: "modules/cam/outputs/#".into(),
            to: "$upstream/frames".into(),
            priority: None,
        }]);
        let (_tx, routes) = watch::channel(Arc::new(table));
        let secret = BusSecret::from_bytes(&[3; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let counters = Arc::new(BusCounters::default());
        let bus = tokio::spawn(serve(
            listener,
            secret.clone(),
            routes,
            outbox.clone(),
            counters.clone(),
            Default::default(),
            stop.clone(),
        ));
        let mut options = MqttOptions::new("cam-1", "127.0.0.1", port);
        options.set_credentials("cam", secret.password("cam"));
        let (client, mut events) = AsyncClient::new(options, 8);
        let topic = "modules/cam/outputs/f";
        client
            .publish(topic, QoS::AtLeastOnce, false, "one")
            .await
            .unwrap();
        assert!(outcome(&mut events).await, "stored: acknowledged");

        switch.full.store(true, std::sync::atomic::Ordering::SeqCst);
        client
            .publish(topic, QoS::AtLeastOnce, false, "two")
            .await
            .unwrap();
        assert!(
            !outcome(&mut events).await,
            "not stored: closed without PUBACK"
        );
        assert_eq!(counters.unstored.load(Ordering::Relaxed), 1);
        assert!(matches!(outbox.health(), OutboxHealth::Degraded { .. }));
        // While the file is closed, a QoS 0 publish is refused at once and counted; the
        // connection stays up for the module's other traffic.
        client
            .publish(topic, QoS::AtMostOnce, false, "three")
            .await
            .unwrap();
        client
            .publish(topic, QoS::AtLeastOnce, false, "four")
            .await
            .unwrap();
        assert!(!outcome(&mut events).await);
        assert_eq!(counters.unstored.load(Ordering::Relaxed), 3);
        let stored = outbox.read("frames", 0, 10, 1 << 20);
        assert!(stored.is_err(), "nothing to read while the file is closed");
        stop.cancel();
        bus.await.unwrap();
        writing.await.unwrap();
    }

    /// Found by the `bus` fuzz target: packets in the same read as the CONNECT waited for a
    /// next read. A client that pipelined CONNECT and SUBSCRIBE got no SUBACK until it sent
    /// something else, and one that sent CONNECT, PUBLISH, DISCONNECT and closed lost its
    /// publish.
    #[tokio::test]
    async fn packets_pipelined_after_connect_are_handled_at_once() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(FakeClock::new(crate::clock::PLAUSIBLE_AFTER_MS + 1, 1_000));
        let limits = Limits {
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(3600),
            disk_high_percent: 100,
        };
        let (outbox, writer) = Outbox::open(dir.path(), limits, clock).unwrap();
        let stop = CancellationToken::new();
        let writing = tokio::spawn(writer.run(stop.clone()));
        let table = RouteTable::new(&[Route {
            from: "modules/cam/outputs/#".into(),
            to: "$upstream/s".into(),
            priority: None,
        }]);
        let (_tx, routes) = watch::channel(Arc::new(table));
        let secret = BusSecret::from_bytes(&[3; 32]);
        let broker = Arc::new(Broker::new(
            secret.clone(),
            routes,
            outbox.clone(),
            Arc::new(BusCounters::default()),
            Default::default(),
        ));
        let mut login = rumqttc::Connect::new("cam-1");
        login.set_login("cam", secret.password("cam"));
        let mut input = BytesMut::new();
        Packet::Connect(login)
            .write(&mut input, MAX_PACKET)
            .unwrap();
        let mut subscribe = rumqttc::Subscribe::new("modules/cam/inputs/#", QoS::AtLeastOnce);
        subscribe.pkid = 1;
        Packet::Subscribe(subscribe)
            .write(&mut input, MAX_PACKET)
            .unwrap();
        let mut publish = Publish::new("modules/cam/outputs/t", QoS::AtLeastOnce, "21.5");
        publish.pkid = 7;
        Packet::Publish(publish)
            .write(&mut input, MAX_PACKET)
            .unwrap();

        // Pipelined, the client waiting for its SUBACK and PUBACK without sending more.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let (broker, stop) = (broker.clone(), stop.clone());
            tokio::spawn(
                async move { broker.connection(server, [127, 0, 0, 1].into(), stop).await },
            )
        };
        client.write_all(&input).await.unwrap();
        let mut replies = BytesMut::new();
        let mut kinds = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while kinds.len() < 3 {
                match Packet::read(&mut replies, MAX_PACKET) {
                    Ok(p) => kinds.push(p),
                    Err(rumqttc::Error::InsufficientBytes(_)) => {
                        assert!(client.read_buf(&mut replies).await.unwrap() > 0);
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await
        .expect("CONNACK, SUBACK and PUBACK without a further packet from the client");
        assert!(matches!(kinds[0], Packet::ConnAck(_)));
        assert!(matches!(&kinds[1], Packet::SubAck(s) if s.pkid == 1));
        assert!(matches!(&kinds[2], Packet::PubAck(a) if a.pkid == 7));
        drop(client);
        let _ = serving.await.unwrap();

        // CONNECT, PUBLISH (QoS 0), DISCONNECT and close: the publish is stored.
        let mut input = BytesMut::new();
        let mut login = rumqttc::Connect::new("cam-2");
        login.set_login("cam", secret.password("cam"));
        Packet::Connect(login)
            .write(&mut input, MAX_PACKET)
            .unwrap();
        let publish = Publish::new("modules/cam/outputs/t", QoS::AtMostOnce, "22.5");
        Packet::Publish(publish)
            .write(&mut input, MAX_PACKET)
            .unwrap();
        Packet::Disconnect.write(&mut input, MAX_PACKET).unwrap();
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            broker.connection(server, [127, 0, 0, 1].into(), stop.clone()),
        )
        .await
        .expect("the connection ends")
        .expect("ended by its DISCONNECT");
        let stored = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(records) = outbox.read("s", 0, 10, 1 << 20)
                    && records.len() == 2
                {
                    return records;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("both publishes stored");
        assert_eq!(stored.len(), 2);
        stop.cancel();
        writing.await.unwrap();
    }
}
