//! A logged-in module's session: its packets read and answered, publishes checked against its
//! outputs and routed (to subscribers, or to the outbox with the PUBACK held until the record
//! is durable, in arrival order), subscriptions checked against its inputs, messages for it
//! written out, and the keep-alive.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode, UnsubAck};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::super::routes::Target;
use super::Stream;
use super::clients::{ClientKey, Shared};
use super::codec::{packet_kind, write};
use super::topics::{allowed_filter, allowed_publish, lock_topic};
use super::{MAX_FILTERS, MAX_PACKET, MAX_PENDING_ACKS};
use crate::telemetry::outbox::OutboxError;

pub(super) type AckWait = Pin<Box<dyn Future<Output = Result<(), OutboxError>> + Send>>;

pub(super) struct Conn<'a, S: Stream> {
    pub(super) shared: &'a Shared,
    pub(super) module: String,
    pub(super) key: ClientKey,
    pub(super) conn_id: u64,
    /// Bytes queued for this connection by [`Shared::deliver`].
    pub(super) queued: Arc<AtomicUsize>,
    pub(super) stream: S,
    pub(super) input: BytesMut,
    pub(super) output: BytesMut,
    /// PUBACKs waiting for the outbox, in arrival order.
    pub(super) acks: VecDeque<(u16, AckWait)>,
    pub(super) next_pkid: u16,
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

    pub(super) async fn run(
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
        if p.topic == lock_topic(&self.module) {
            let module = self.module.clone();
            lock(self.shared, &module, &p.payload).await;
            if p.qos == QoS::AtLeastOnce {
                self.acks.push_back((p.pkid, Box::pin(async { Ok(()) })));
            }
            return Ok(());
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

/// `lock` or `unlock` on the module's own lock topic: handed to the reconciler, which
/// answers at once; the outcome is logged (MQTT 3.1.1 has no reply to a publish).
async fn lock(shared: &Shared, module: &str, payload: &[u8]) {
    let hold = match payload {
        b"lock" => true,
        b"unlock" => false,
        _ => {
            tracing::warn!(
                module,
                "a lock publish must carry `lock` or `unlock`; ignored"
            );
            return;
        }
    };
    let Some(handle) = shared.locks.get() else {
        tracing::warn!(
            module,
            "update lock asked before the agent is ready; ignored"
        );
        return;
    };
    match handle.lock(module, hold, "bus").await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(module, error = %e, "update lock refused"),
        Err(e) => tracing::warn!(module, error = %e, "update lock not handled"),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
