//! The broker's shared state: the connected clients by module and client id (with what each
//! subscribed to), delivery of a message to every matching subscriber, the outbox refusals
//! warned about, and the count of connections that have not logged in yet.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use rumqttc::{Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::super::BusSecret;
use super::super::routes::RouteTable;
use super::{
    BusCounters, MAX_PACKET, MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_PEER, SUBSCRIBER_BYTES,
    UNSTORED_WARN_EVERY,
};
use crate::telemetry::outbox::{Outbox, OutboxError};

pub(super) struct Client {
    /// Tells apart a newer connection with the same client id.
    pub(super) conn: u64,
    pub(super) module: String,
    pub(super) filters: Vec<(String, QoS)>,
    pub(super) tx: mpsc::Sender<Publish>,
    /// Bytes in `tx` not written yet.
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) kick: CancellationToken,
}

/// Clients by (module, client id): a client id is scoped to its module, so one module can
/// never take over another's connection or subscriptions by reusing its client id.
pub(super) type ClientKey = (String, String);

pub(super) struct Shared {
    pub(super) secret: BusSecret,
    pub(super) routes: watch::Receiver<Arc<RouteTable>>,
    pub(super) outbox: Outbox,
    pub(super) clients: std::sync::Mutex<HashMap<ClientKey, Client>>,
    pub(super) counters: Arc<BusCounters>,
    pub(super) next_conn: AtomicU64,
    /// Connection tasks alive, authenticated or not.
    pub(super) connections: AtomicUsize,
    /// Connections before CONNECT completes, by peer address.
    pub(super) unauthenticated: std::sync::Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Per module: when a refusal was last warned about, and how many were not since.
    pub(super) unstored_log: std::sync::Mutex<HashMap<String, (tokio::time::Instant, u64)>>,
    /// The reconciler, for modules' update locks; empty until it is built.
    pub(super) locks: super::super::LockHandle,
}

impl Shared {
    pub(super) fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Client>> {
        // Entries are inserted and removed whole; a poisoned lock holds nothing half-done.
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a publish the outbox could not store and says why, at most every
    /// [`UNSTORED_WARN_EVERY`] per module as a warning (a module resending into a full disk
    /// must not fill it with log lines too).
    pub(super) fn unstored(&self, module: &str, qos: QoS, error: &OutboxError) {
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
    pub(super) fn deliver(&self, topic: &str, payload: &bytes::Bytes, qos: QoS) {
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

/// A connection counted as not logged in yet, until it is dropped (login done or failed).
pub(super) struct Pending {
    shared: Arc<Shared>,
    peer: std::net::IpAddr,
}

impl Pending {
    pub(super) fn take(shared: &Arc<Shared>, peer: std::net::IpAddr) -> Option<Pending> {
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
