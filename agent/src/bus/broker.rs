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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::BusSecret;
use super::routes::{RouteTable, Target};
use crate::telemetry::outbox::{Outbox, OutboxError};

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

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct BusCounters {
    pub clients: AtomicU64,
    /// Connections refused (credentials) or closed for a publish outside the module's topics,
    /// and refused subscriptions.
    pub refused: AtomicU64,
    /// Messages routed to a module input that was not connected or could not keep up.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Publishes routed upstream that the outbox could not store (a QoS 1 one is then not
    /// acknowledged and its connection closed).
    pub unstored: AtomicU64,
}

struct Client {
    /// Tells apart a newer connection with the same client id.
    conn: u64,
    module: String,
    filters: Vec<(String, QoS)>,
    tx: mpsc::Sender<Publish>,
    /// Bytes in `tx` not written yet.
    queued: Arc<AtomicUsize>,
    kick: CancellationToken,
}

/// Clients by (module, client id): a client id is scoped to its module, so one module can
/// never take over another's connection or subscriptions by reusing its client id.
type ClientKey = (String, String);

struct Shared {
    secret: BusSecret,
    routes: watch::Receiver<Arc<RouteTable>>,
    outbox: Outbox,
    clients: std::sync::Mutex<HashMap<ClientKey, Client>>,
    counters: Arc<BusCounters>,
    next_conn: AtomicU64,
    /// Connection tasks alive, authenticated or not.
    connections: AtomicUsize,
    /// Connections before CONNECT completes, by peer address.
    unauthenticated: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Per module: when a refusal was last warned about, and how many were not since.
    unstored_log: std::sync::Mutex<HashMap<String, (tokio::time::Instant, u64)>>,
}

impl Shared {
    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Client>> {
        // Entries are inserted and removed whole; a poisoned lock holds nothing half-done.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a publish the outbox could not store and says why, at most every
    /// [`UNSTORED_WARN_EVERY`] per module as a warning (a module resending into a full disk
    /// must not fill it with log lines too).
    fn unstored(&self, module: &str, qos: QoS, error: &OutboxError) {
        self.counters.unstored.fetch_add(1, Ordering::Relaxed);
        let what = if qos == QoS::AtMostOnce {
            "QoS 0 publish not stored in the outbox; dropped"
        } else {
            "publish not stored in the outbox; not acknowledged, connection closed (the module must send it again)"
        };
        let now = tokio::time::Instant::now();
        // Entries are replaced whole; a poisoned lock holds nothing half-done.
        let mut log = self.unstored_log.lock().unwrap_or_else(|p| p.into_inner());
        match log.get_mut(module) {
            Some((at, suppressed)) if now.duration_since(*at) < UNSTORED_WARN_EVERY => {
                *suppressed += 1;
                tracing::debug!(module, reason = %error, "{what}");
            }
            entry => {
                let suppressed = entry.map_or(0, |(_, n)| *n);
                log.insert(module.to_string(), (now, 0));
                tracing::warn!(module, reason = %error, suppressed, "{what}");
            }
        }
    }

    /// Delivers to every subscriber whose filter matches `topic`; with none, the message is
    /// dropped and counted (the bus keeps nothing for modules that are not connected).
    fn deliver(&self, topic: &str, payload: &bytes::Bytes, qos: QoS) {
        let mut delivered = false;
        for client in self.clients().values() {
            let Some(granted) = client
                .filters
                .iter()
                .filter(|(f, _)| rumqttc::matches(topic, f))
                .map(|(_, q)| *q)
                .max_by_key(|q| *q as u8)
            else {
                continue;
            };
            let qos = if (granted as u8) < (qos as u8) {
                granted
            } else {
                qos
            };
            let publish = Publish::from_bytes(topic, qos, payload.clone());
            // The target topic may be longer than the source: what cannot be written to the
            // subscriber would close its connection, so it is not sent at all.
            let size = publish.size();
            if size > MAX_PACKET || client.queued.load(Ordering::Relaxed) + size > SUBSCRIBER_BYTES
            {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(module = %client.module, topic, size, "message too large or subscriber too far behind; dropped");
                continue;
            }
            client.queued.fetch_add(size, Ordering::Relaxed);
            if client.tx.try_send(publish).is_err() {
                client.queued.fetch_sub(size, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(module = %client.module, topic, "subscriber queue full; message dropped");
            } else {
                delivered = true;
            }
        }
        if !delivered {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic, "no module subscribed; message dropped");
        }
    }
}

/// Serves the bus on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    secret: BusSecret,
    routes: watch::Receiver<Arc<RouteTable>>,
    outbox: Outbox,
    counters: Arc<BusCounters>,
    stop: CancellationToken,
) {
    let shared = Broker::new(secret, routes, outbox, counters).shared;
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

/// A connection counted as not logged in yet, until it is dropped (login done or failed).
struct Pending {
    shared: Arc<Shared>,
    peer: std::net::IpAddr,
}

impl Pending {
    fn take(shared: &Arc<Shared>, peer: std::net::IpAddr) -> Option<Pending> {
        let mut map = shared
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        let mine = map.entry(peer).or_default();
        if total >= MAX_UNAUTHENTICATED || *mine >= MAX_UNAUTHENTICATED_PER_PEER {
            return None;
        }
        *mine += 1;
        Some(Pending {
            shared: shared.clone(),
            peer,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = self
            .shared
            .unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

type AckWait = Pin<Box<dyn Future<Output = Result<(), OutboxError>> + Send>>;

/// What a module's connection runs over: TCP in the agent, an in-memory pipe in the fuzz
/// target.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

struct Conn<'a, S: Stream> {
    shared: &'a Shared,
    module: String,
    key: ClientKey,
    conn_id: u64,
    /// Bytes queued for this connection by [`Shared::deliver`].
    queued: Arc<AtomicUsize>,
    stream: S,
    input: BytesMut,
    output: BytesMut,
    /// PUBACKs waiting for the outbox, in arrival order.
    acks: VecDeque<(u16, AckWait)>,
    next_pkid: u16,
}

async fn connection<S: Stream>(
    mut stream: S,
    shared: &Arc<Shared>,
    pending: Pending,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut input = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(&mut stream, &mut input, MAX_CONNECT),
    )
    .await
    .map_err(|_| "no CONNECT in time".to_string())??;
    let Packet::Connect(connect) = first else {
        return Err("first packet is not CONNECT".into());
    };
    let mut output = BytesMut::with_capacity(4096);
    let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
    if connect.protocol != rumqttc::Protocol::V4 {
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::RefusedProtocolVersion),
        )
        .await?;
        return Err("MQTT 5 is not spoken here; use 3.1.1".into());
    }
    let (module, authorized) = match &connect.login {
        Some(login) => (
            login.username.clone(),
            crate::manifest::validate::is_module_name(&login.username)
                && shared.secret.verify(&login.username, &login.password),
        ),
        None => (String::new(), false),
    };
    if !authorized {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(user = %module, "bus connection refused: bad module name or password");
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::BadUserNamePassword),
        )
        .await?;
        return Err("bad credentials".into());
    }
    // Only the modules of the deployment in force: a module removed from it (or never in it)
    // still has a password that verifies, derived from its name.
    if !shared.routes.borrow().allows(&module) {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            module,
            "bus connection refused: the module is not in the deployment in force"
        );
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::NotAuthorized),
        )
        .await?;
        return Err("not in the deployment".into());
    }
    let held = shared
        .clients()
        .values()
        .filter(|c| c.module == module)
        .count();
    if held >= MAX_PER_MODULE {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            module,
            max = MAX_PER_MODULE,
            "bus connection refused: the module holds too many connections"
        );
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::ServiceUnavailable),
        )
        .await?;
        return Err("too many connections of this module".into());
    }
    drop(pending);
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let client_id = if connect.client_id.is_empty() {
        format!("{module}-{conn_id}")
    } else {
        connect.client_id.clone()
    };
    // Acknowledge before registering: a failed write leaves nothing behind.
    write(
        &mut stream,
        &mut output,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await?;
    let (tx, mut rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let kick = stop.child_token();
    let queued = Arc::new(AtomicUsize::new(0));
    let key: ClientKey = (module.clone(), client_id.clone());
    if let Some(old) = shared.clients().insert(
        key.clone(),
        Client {
            conn: conn_id,
            module: module.clone(),
            filters: Vec::new(),
            tx,
            queued: queued.clone(),
            kick: kick.clone(),
        },
    ) {
        // MQTT: a new connection with the same client id (of the same module) takes over.
        old.kick.cancel();
    }
    shared.counters.clients.fetch_add(1, Ordering::Relaxed);
    tracing::info!(module, client_id, "module connected to the bus");
    let mut conn = Conn {
        shared,
        module,
        key,
        conn_id,
        queued,
        stream,
        input,
        output,
        acks: VecDeque::new(),
        next_pkid: 0,
    };
    // Keep-alive: 1.5 times what the client asked for; a client that asks for none is closed
    // after a long silence instead of holding its connection forever.
    let keep_alive = Some(if connect.keep_alive > 0 {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500)
    } else {
        IDLE_WITHOUT_KEEP_ALIVE
    });
    let result = conn.run(&mut rx, keep_alive, kick, &stop).await;
    {
        let mut clients = shared.clients();
        if clients.get(&conn.key).is_some_and(|c| c.conn == conn_id) {
            clients.remove(&conn.key);
        }
    }
    shared.counters.clients.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(module = %conn.module, reason = result.as_ref().err().map(String::as_str).unwrap_or("disconnected"), "module left the bus");
    result
}

async fn read_packet<S: Stream>(
    stream: &mut S,
    input: &mut BytesMut,
    max: usize,
) -> Result<Packet, String> {
    loop {
        match Packet::read(input, max) {
            Ok(p) => return Ok(p),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("bad packet: {e}")),
        }
        if stream.read_buf(input).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
    }
}

async fn write<S: Stream>(stream: &mut S, output: &mut BytesMut, p: Packet) -> Result<(), String> {
    output.clear();
    p.write(output, MAX_PACKET).map_err(|e| e.to_string())?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(output))
        .await
        .map_err(|_| "the module stopped reading".to_string())?
        .map_err(|e| e.to_string())
}

async fn front(acks: &mut VecDeque<(u16, AckWait)>) -> (u16, Result<(), OutboxError>) {
    match acks.front_mut() {
        Some((pkid, wait)) => (*pkid, wait.await),
        None => std::future::pending().await,
    }
}

impl<S: Stream> Conn<'_, S> {
    async fn send(&mut self, p: Packet) -> Result<(), String> {
        write(&mut self.stream, &mut self.output, p).await
    }

    async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<Publish>,
        keep_alive: Option<Duration>,
        kick: CancellationToken,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let mut deadline = keep_alive.map(|k| tokio::time::Instant::now() + k);
        // Packets that came in the same read as the CONNECT (a client need not wait for the
        // CONNACK): handled now, not after the next read, which may never come.
        if self.drain().await? {
            return Ok(());
        }
        loop {
            let reading = self.acks.len() < MAX_PENDING_ACKS;
            tokio::select! {
                _ = kick.cancelled() => return Err(if stop.is_cancelled() {
                    "the agent is shutting down"
                } else {
                    "taken over by a newer connection with the same client id"
                }.into()),
                _ = sleep_until(deadline) => return Err("keep-alive expired".into()),
                (pkid, result) = front(&mut self.acks) => {
                    self.acks.pop_front();
                    match result {
                        Ok(()) => self.send(Packet::PubAck(PubAck::new(pkid))).await?,
                        // Counted as dropped by the outbox; acknowledging stops a resend loop.
                        Err(OutboxError::TooLarge { size, .. }) => {
                            tracing::warn!(module = %self.module, size, "record too large for the outbox; dropped");
                            self.send(Packet::PubAck(PubAck::new(pkid))).await?;
                        }
                        Err(OutboxError::Closed) => return Err("the agent is shutting down".into()),
                        // Not stored: no PUBACK, and the module sends it again on reconnect.
                        Err(e) => {
                            self.shared.unstored(&self.module, QoS::AtLeastOnce, &e);
                            return Err(format!("publish not stored: {e}"));
                        }
                    }
                }
                Some(mut publish) = rx.recv() => {
                    self.queued.fetch_sub(publish.size(), Ordering::Relaxed);
                    if publish.qos != QoS::AtMostOnce {
                        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                        publish.pkid = self.next_pkid;
                    }
                    self.send(Packet::Publish(publish)).await?;
                }
                read = self.stream.read_buf(&mut self.input), if reading => {
                    if read.map_err(|e| e.to_string())? == 0 {
                        return Err("closed by the module".into());
                    }
                    deadline = keep_alive.map(|k| tokio::time::Instant::now() + k);
                    if self.drain().await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Handles the complete packets buffered in `input`; true after a DISCONNECT.
    async fn drain(&mut self) -> Result<bool, String> {
        loop {
            match Packet::read(&mut self.input, MAX_PACKET) {
                Ok(Packet::Disconnect) => return Ok(true),
                Ok(p) => self.handle(p).await?,
                Err(rumqttc::Error::InsufficientBytes(_)) => return Ok(false),
                Err(e) => return Err(format!("bad packet: {e}")),
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), String> {
        match packet {
            Packet::Publish(p) => self.publish(p).await,
            Packet::Subscribe(s) => {
                let mut codes = Vec::with_capacity(s.filters.len());
                let mut granted = Vec::new();
                let held = self
                    .shared
                    .clients()
                    .get(&self.key)
                    .map_or(0, |c| c.filters.len());
                for f in s.filters {
                    if held + granted.len() >= MAX_FILTERS {
                        tracing::warn!(module = %self.module, max = MAX_FILTERS, "too many subscriptions; refused");
                        codes.push(SubscribeReasonCode::Failure);
                    } else if allowed_filter(&self.module, &f.path) {
                        let qos = if f.qos == QoS::AtMostOnce {
                            QoS::AtMostOnce
                        } else {
                            QoS::AtLeastOnce
                        };
                        codes.push(SubscribeReasonCode::Success(qos));
                        granted.push((f.path, qos));
                    } else {
                        self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(module = %self.module, filter = %f.path, "subscription outside the module's inputs refused");
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                if let Some(c) = self
                    .shared
                    .clients()
                    .get_mut(&self.key)
                    .filter(|c| c.conn == self.conn_id)
                {
                    for (filter, qos) in granted {
                        c.filters.retain(|(f, _)| *f != filter);
                        c.filters.push((filter, qos));
                    }
                }
                self.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await
            }
            Packet::Unsubscribe(u) => {
                if let Some(c) = self
                    .shared
                    .clients()
                    .get_mut(&self.key)
                    .filter(|c| c.conn == self.conn_id)
                {
                    c.filters.retain(|(f, _)| !u.topics.contains(f));
                }
                self.send(Packet::UnsubAck(UnsubAck::new(u.pkid))).await
            }
            Packet::PingReq => self.send(Packet::PingResp).await,
            // Acknowledgements of what the broker delivered: nothing is redelivered, so nothing
            // to track.
            Packet::PubAck(_) => Ok(()),
            other => Err(format!("unexpected packet {:?}", packet_kind(&other))),
        }
    }

    async fn publish(&mut self, p: Publish) -> Result<(), String> {
        if p.qos == QoS::ExactlyOnce {
            return Err("QoS 2 is not supported on the local bus; use QoS 0 or 1".into());
        }
        if !allowed_publish(&self.module, &p.topic) {
            self.shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(module = %self.module, topic = %p.topic, "publish outside the module's outputs refused; connection closed");
            return Err(format!("publish to `{}` refused", p.topic));
        }
        self.shared
            .counters
            .received
            .fetch_add(1, Ordering::Relaxed);
        let table = self.shared.routes.borrow().clone();
        let mut waits = Vec::new();
        // Refused at once (the outbox's file is being reopened): answered in order with the
        // publishes before it, like a refusal at commit.
        let mut refused = None;
        for target in table.targets(&p.topic) {
            match target {
                Target::Module { topic } => self.shared.deliver(topic, &p.payload, p.qos),
                Target::Upstream { .. } => {
                    let Some(record) = target.record(&p.topic, &p.payload) else {
                        continue;
                    };
                    if refused.is_some() {
                        continue;
                    }
                    match self.shared.outbox.submit(record).await {
                        Ok(receipt) => waits.push(receipt),
                        Err(e) => refused = Some(e),
                    }
                }
            }
        }
        if p.qos == QoS::AtLeastOnce {
            let wait: AckWait = Box::pin(async move {
                if let Some(e) = refused {
                    return Err(e);
                }
                for receipt in waits {
                    receipt.await?;
                }
                Ok(())
            });
            self.acks.push_back((p.pkid, wait));
        } else if let Some(e) = refused.filter(|e| !matches!(e, OutboxError::Closed)) {
            self.shared.unstored(&self.module, p.qos, &e);
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => "QoS 2 flow",
        Packet::SubAck(_) | Packet::UnsubAck(_) => "SUBACK/UNSUBACK",
        Packet::PingResp => "PINGRESP",
        _ => "other",
    }
}

/// A module may publish to concrete topics under its own outputs.
pub fn allowed_publish(module: &str, topic: &str) -> bool {
    let prefix = format!("modules/{module}/outputs/");
    topic.len() > prefix.len() && topic.starts_with(&prefix) && rumqttc::valid_topic(topic)
}

/// A module may subscribe to filters under its own inputs (wildcards only below them).
pub fn allowed_filter(module: &str, filter: &str) -> bool {
    let prefix = format!("modules/{module}/inputs/");
    filter.len() > prefix.len() && filter.starts_with(&prefix) && rumqttc::valid_filter(filter)
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn modules_stay_within_their_own_topics() {
        assert!(allowed_publish("cam", "modules/cam/outputs/frames"));
        assert!(allowed_publish("cam", "modules/cam/outputs/a/b"));
        assert!(!allowed_publish("cam", "modules/cam/outputs/"));
        assert!(!allowed_publish("cam", "modules/cam/outputs/#"));
        assert!(!allowed_publish("cam", "modules/infer/outputs/x"));
        assert!(!allowed_publish("cam", "modules/cam/inputs/x"));
        assert!(!allowed_publish("cam", "modules/camera/outputs/x"));
        assert!(!allowed_publish("ca", "modules/cam/outputs/x"));
        assert!(!allowed_publish("cam", "outpost/dev/deployment"));

        assert!(allowed_filter("cam", "modules/cam/inputs/#"));
        assert!(allowed_filter("cam", "modules/cam/inputs/+/x"));
        assert!(!allowed_filter("cam", "modules/+/inputs/#"));
        assert!(!allowed_filter("cam", "modules/#"));
        assert!(!allowed_filter("cam", "#"));
        assert!(!allowed_filter("cam", "modules/cam/outputs/#"));
        assert!(!allowed_filter("cam", "modules/infer/inputs/#"));
        assert!(!allowed_filter("cam", "modules/cam/inputs/"));
    }
}
