//! Routes on an external broker (`bus.external_url`, e.g. the device's Mosquitto): the agent is
//! a client that subscribes to the routes' sources and carries each message to its targets —
//! into the outbox for `$upstream`, republished for module inputs.
//!
//! The session is persistent (clean session off) and acknowledgements are manual: a message
//! routed upstream is acknowledged to the broker only once the outbox holds it durably, so the
//! broker keeps (and redelivers) what the agent had not secured when it stopped. Who may publish
//! where is that broker's configuration (its ACL), not the agent's.
//!
//! A message the outbox cannot store (no space, full of more important streams, its file being
//! reopened) is not acknowledged either. A broker sends unacknowledged messages again only on a
//! new connection of the session, and stops sending more once its in-flight window is full of
//! them; so after such a refusal the router reconnects (1 s later, doubling to 30 s while
//! refusals go on; if the outbox's file is still being reopened then, as soon as it is back),
//! and the broker redelivers what was refused.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::broker::{BusCounters, MAX_PACKET};
use super::routes::{RouteTable, Target};
use crate::telemetry::outbox::{Outbox, OutboxError};
use outpost_core::backoff::exponential;
use outpost_mqtt::Password;

pub struct Context {
    pub url: url::Url,
    pub credentials: Option<(String, Password)>,
    pub client_id: String,
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub outbox: Outbox,
    pub counters: Arc<BusCounters>,
}

/// Republished messages held while the client's request queue is full.
const MAX_OUTGOING: usize = 4096;
/// Delay before reconnecting for a redelivery of refused messages: doubles while they go on.
const REDELIVER_MIN: Duration = Duration::from_secs(1);
const REDELIVER_MAX: Duration = Duration::from_secs(30);
/// Refusals are warned about at most this often (a full disk may last); counted always.
const UNSTORED_WARN_EVERY: Duration = Duration::from_secs(30);

enum Out {
    Publish(Publish),
    /// An acknowledgement, with the connection generation its message came on.
    Ack(u64, Publish),
}

type Secured = Pin<Box<dyn Future<Output = (u64, Publish, Result<(), OutboxError>)> + Send>>;

/// Connection options for the external broker.
///
/// Fails when the URL has no host or TLS cannot be set up.
pub fn options(ctx: &Context) -> Result<MqttOptions, String> {
    let host = ctx
        .url
        .host_str()
        .ok_or_else(|| format!("bus.external_url `{}` has no host", ctx.url))?;
    let tls = ctx.url.scheme() == "mqtts";
    let port = ctx.url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let mut o = MqttOptions::new(&ctx.client_id, host, port);
    o.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if tls {
        let config = outpost_mqtt::tls::client_config(&outpost_mqtt::tls::TlsFiles {
            ca_file: None,
            client_auth: None,
            ca_setting: "bus.external_url",
        })
        .map_err(|e| e.to_string())?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    if let Some((user, password)) = &ctx.credentials {
        o.set_credentials(user, password.expose());
    }
    Ok(o)
}

/// Runs until `stop` is cancelled; connection failures are retried every second.
pub async fn run(mut ctx: Context, stop: CancellationToken) {
    let options = match options(&ctx) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "cannot route on the external bus");
            return;
        }
    };
    let (mut client, mut events, mut poller) = connect(&options);
    // Bumped on every CONNACK (and when the router reconnects by itself): an acknowledgement
    // is written only on the connection that received its message (a packet id on a new
    // session may name another message).
    let mut generation = 0u64;
    // When to reconnect so that the broker sends again what the outbox refused.
    let mut redeliver_at: Option<tokio::time::Instant> = None;
    let mut redeliver_attempts = 0u32;
    let mut refused = 0u64;
    let mut last_warning: Option<(tokio::time::Instant, u64)> = None;
    // Changes when the outbox's file is back after an I/O error (and on every commit).
    let mut outbox_back = ctx.outbox.added();
    let mut redeliver_when_back = false;
    let mut subscribed: Vec<String> = Vec::new();
    let mut securing: FuturesUnordered<Secured> = FuturesUnordered::new();
    // Republishes and acknowledgements waiting for room in the client's request queue, in
    // order: an acknowledgement must never be lost to a full queue, or the broker stops
    // delivering once its in-flight window is used up.
    let mut outgoing: VecDeque<Out> = VecDeque::new();
    loop {
        while let Some(out) = outgoing.pop_front() {
            let sent = match &out {
                Out::Publish(p) => client
                    .try_publish(p.topic.as_str(), p.qos, false, p.payload.clone())
                    .is_ok(),
                Out::Ack(of, _) if *of != generation => true, // stale: dropped
                Out::Ack(_, p) => client.try_ack(p).is_ok(),
            };
            if !sent {
                outgoing.push_front(out);
                break;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            event = events.recv() => match event.unwrap_or(Err(rumqttc::ConnectionError::RequestsDone)) {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    generation += 1;
                    tracing::info!(url = %ctx.url, session_present = ack.session_present, "routing on the external bus");
                    let sources = ctx.routes.borrow().sources();
                    if !ack.session_present {
                        subscribed.clear();
                    }
                    resubscribe(&client, &mut subscribed, sources);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Some(wait) = route(&ctx, p, generation, &mut outgoing).await {
                        securing.push(wait);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(url = %ctx.url, error = %e, "external bus connection failed; retrying in 1 s");
                }
            },
            Some((of, p, result)) = securing.next() => match result {
                Ok(()) | Err(OutboxError::TooLarge { .. }) => {
                    redeliver_attempts = 0;
                    outgoing.push_back(Out::Ack(of, p));
                }
                // Stopping: the broker keeps it for the next start.
                Err(OutboxError::Closed) => {}
                // Not acknowledged: the broker sends it again after the reconnect below.
                Err(e) => {
                    ctx.counters.unstored.fetch_add(1, Ordering::Relaxed);
                    refused += 1;
                    warn_unstored(&mut last_warning, &e, &p.topic);
                    if redeliver_at.is_none() {
                        redeliver_attempts = redeliver_attempts.saturating_add(1);
                        redeliver_at = Some(
                            tokio::time::Instant::now()
                                + exponential(REDELIVER_MIN, redeliver_attempts, REDELIVER_MAX),
                        );
                    }
                }
            },
            _ = sleep_until(redeliver_at), if redeliver_at.is_some() => {
                redeliver_at = None;
                outbox_back.borrow_and_update();
                if ctx.outbox.refusing().is_some() {
                    // Redelivered now, it would be refused again: wait until the file is back.
                    redeliver_when_back = true;
                } else {
                    tracing::info!(url = %ctx.url, refused, "reconnecting to the external bus so that it sends again what the outbox could not store");
                    refused = 0;
                    (client, events, poller) = reconnect(&options, &client, &poller, &mut generation);
                }
            },
            changed = outbox_back.changed(), if redeliver_when_back => {
                if changed.is_err() {
                    break;
                }
                if ctx.outbox.refusing().is_none() {
                    redeliver_when_back = false;
                    tracing::info!(url = %ctx.url, refused, "the outbox is back: reconnecting to the external bus so that it sends again what could not be stored");
                    refused = 0;
                    (client, events, poller) = reconnect(&options, &client, &poller, &mut generation);
                }
            },
            changed = ctx.routes.changed() => {
                if changed.is_err() {
                    break;
                }
                let sources = ctx.routes.borrow_and_update().sources();
                resubscribe(&client, &mut subscribed, sources);
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(e) = events.recv().await {
            if e.is_err() {
                break;
            }
        }
    })
    .await;
    poller.abort();
}

/// A client for `options` whose event loop is polled in a task of its own.
///
/// `EventLoop::poll` is not cancel-safe (an acknowledgement may be taken from the queue and
/// never written): it runs in a task of its own, never interrupted; it keeps polling after
/// errors, which is how rumqttc reconnects.
#[allow(clippy::type_complexity)]
fn connect(
    options: &MqttOptions,
) -> (
    AsyncClient,
    tokio::sync::mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    tokio::task::JoinHandle<()>,
) {
    let (client, mut eventloop) = AsyncClient::new(options.clone(), 256);
    let (events_tx, events) = tokio::sync::mpsc::channel(64);
    let poller = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if events_tx.send(event).await.is_err() {
                return;
            }
            if failed {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });
    (client, events, poller)
}

/// Drops the connection and makes a new one of the same session: the broker then sends again
/// what was not acknowledged.
#[allow(clippy::type_complexity)]
fn reconnect(
    options: &MqttOptions,
    client: &AsyncClient,
    poller: &tokio::task::JoinHandle<()>,
    generation: &mut u64,
) -> (
    AsyncClient,
    tokio::sync::mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    tokio::task::JoinHandle<()>,
) {
    // Acknowledgements still coming for the old connection must not be written on the new one.
    *generation += 1;
    let _ = client.try_disconnect();
    poller.abort();
    connect(options)
}

/// Says why a message was not stored: a warning at most every [`UNSTORED_WARN_EVERY`], with
/// how many were refused in between (at debug level).
fn warn_unstored(last: &mut Option<(tokio::time::Instant, u64)>, error: &OutboxError, topic: &str) {
    let now = tokio::time::Instant::now();
    match last {
        Some((at, suppressed)) if now.duration_since(*at) < UNSTORED_WARN_EVERY => {
            *suppressed += 1;
            tracing::debug!(reason = %error, topic, "message from the external bus not stored in the outbox; not acknowledged");
        }
        _ => {
            let suppressed = last.map_or(0, |(_, n)| n);
            *last = Some((now, 0));
            tracing::warn!(reason = %error, topic, suppressed,
                "message from the external bus not stored in the outbox; not acknowledged (the broker sends it again)");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Subscribes to new sources and unsubscribes from dropped ones.
fn resubscribe(client: &AsyncClient, subscribed: &mut Vec<String>, sources: Vec<String>) {
    for old in subscribed.iter().filter(|s| !sources.contains(s)) {
        let _ = client.try_unsubscribe(old.as_str());
    }
    for new in sources.iter().filter(|s| !subscribed.contains(s)) {
        let _ = client.try_subscribe(new.as_str(), QoS::AtLeastOnce);
    }
    *subscribed = sources;
}

/// Carries `p` to its targets; returns what to wait for before acknowledging it, or
/// acknowledges it at once when nothing needs securing.
async fn route(
    ctx: &Context,
    p: Publish,
    generation: u64,
    outgoing: &mut VecDeque<Out>,
) -> Option<Secured> {
    ctx.counters.received.fetch_add(1, Ordering::Relaxed);
    let table = ctx.routes.borrow().clone();
    let mut waits = Vec::new();
    for target in table.targets(&p.topic) {
        match target {
            Target::Module { topic } => {
                let qos = if p.qos == QoS::AtMostOnce {
                    QoS::AtMostOnce
                } else {
                    QoS::AtLeastOnce
                };
                if outgoing.len() >= MAX_OUTGOING {
                    ctx.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(topic, "republish queue full; message dropped");
                } else {
                    outgoing.push_back(Out::Publish(Publish::from_bytes(
                        topic.as_str(),
                        qos,
                        p.payload.clone(),
                    )));
                }
            }
            Target::Upstream { .. } => {
                let Some(record) = target.record(&p.topic, &p.payload) else {
                    continue;
                };
                match ctx.outbox.submit(record).await {
                    Ok(receipt) => waits.push(receipt),
                    // Refused at once (the outbox's file is being reopened): not acknowledged.
                    Err(e) => return Some(Box::pin(async move { (generation, p, Err(e)) })),
                }
            }
        }
    }
    if waits.is_empty() {
        outgoing.push_back(Out::Ack(generation, p));
        return None;
    }
    Some(Box::pin(async move {
        for receipt in waits {
            if let Err(e) = receipt.await {
                return (generation, p, Err(e));
            }
        }
        (generation, p, Ok(()))
    }))
}
