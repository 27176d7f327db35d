//! Routes on an external broker (`bus.external_url`, e.g. the device's Mosquitto): the agent is
//! a client that subscribes to the routes' sources and carries each message to its targets —
//! into the outbox for `$upstream`, republished for module inputs.
//!
//! The session is persistent (clean session off) and acknowledgements are manual: a message
//! routed upstream is acknowledged to the broker only once the outbox holds it durably, so the
//! broker keeps (and redelivers) what the agent had not secured when it stopped. Who may publish
//! where is that broker's configuration (its ACL), not the agent's.

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
use crate::hub::link::Password;
use crate::telemetry::outbox::{Outbox, OutboxError};

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
        let config = crate::hub::tls::client_config(&crate::hub::tls::TlsFiles {
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
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    // `EventLoop::poll` is not cancel-safe (an acknowledgement may be taken from the queue and
    // never written): it runs in a task of its own, never interrupted; it keeps polling after
    // errors, which is how rumqttc reconnects.
    let (events_tx, mut events) = tokio::sync::mpsc::channel(64);
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
    // Bumped on every CONNACK: an acknowledgement is written only on the connection that
    // received its message (a packet id on a new session may name another message).
    let mut generation = 0u64;
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
                Ok(()) | Err(OutboxError::TooLarge { .. }) => outgoing.push_back(Out::Ack(of, p)),
                // Not acknowledged: the broker redelivers it on the next session.
                Err(e) => tracing::warn!(error = %e, topic = %p.topic, "not routed upstream"),
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
                    Ok(rx) => waits.push(rx),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox closed");
                        return None;
                    }
                }
            }
        }
    }
    if waits.is_empty() {
        outgoing.push_back(Out::Ack(generation, p));
        return None;
    }
    Some(Box::pin(async move {
        for rx in waits {
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return (generation, p, Err(e)),
                Err(_) => return (generation, p, Err(OutboxError::Closed)),
            }
        }
        (generation, p, Ok(()))
    }))
}
