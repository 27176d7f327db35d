//! The drain: a hub connection of its own (client id `{device}-telemetry`) that sends the
//! outbox's records to `{prefix}/{device}/telemetry/{stream}` in batches at QoS 1 and deletes
//! them once the hub acknowledged the batch (PUBACK).
//!
//! Why a connection of its own: PUBACKs name packet ids, and only on a connection that carries
//! nothing but batches does the order of rumqttc's `Outgoing::Publish(pkid)` events say which
//! batch got which id. The event loop is also dropped and made anew after every failure, so
//! rumqttc never replays a batch by itself: after a reconnect the drain starts again from the
//! oldest unacknowledged record of each stream. A batch whose PUBACK was lost is therefore sent
//! again — at-least-once — and the hub drops duplicates by record id.
//!
//! While the outbox's file is being reopened after an I/O error its reads fail; the drain then
//! stops asking (its cursors stay where they were) until the outbox says records are there
//! again ([`Outbox::added`] changes when the file is back).
//!
//! Streams take turns by weight: a stream of priority `p` (0 most important) is charged `p + 1`
//! per batch and the least charged goes next, so a week of backlog on one stream neither
//! blocks the others nor starves itself, and order within a stream is kept.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{Event, Outgoing, Packet, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::outbox::{Outbox, OutboxError, Record, StreamInfo};
use outpost_core::backoff::Backoff;
use outpost_core::wire::topics::Topics;
use outpost_mqtt::{self as link, Settings};

/// Records per batch (one MQTT message).
pub const BATCH_RECORDS: usize = 500;
/// About this many bytes of records per batch.
pub const BATCH_BYTES: usize = 128 * 1024;
/// Batches sent and not yet acknowledged.
pub const WINDOW: usize = 16;

/// The drain's state, for metrics.
#[derive(Debug, Default)]
pub struct LinkCounters {
    pub connected: AtomicBool,
    /// Connections made after the first one.
    pub reconnects: AtomicU64,
}

pub struct Context {
    /// The hub settings with this connection's client id.
    pub settings: Settings,
    pub topics: Topics,
    pub outbox: Outbox,
    /// The main hub link's session number: when it comes back, retry at once instead of
    /// waiting out the backoff.
    pub link_session: watch::Receiver<u64>,
    pub counters: Arc<LinkCounters>,
}

#[derive(Debug, Clone)]
struct Batch {
    stream: String,
    first: u64,
    last: u64,
}

/// One connection's bookkeeping; dropped with the connection.
#[derive(Default)]
struct Flight {
    /// Next sequence to read, per stream.
    cursors: HashMap<String, u64>,
    /// Weighted turns, per stream.
    charge: HashMap<String, u64>,
    /// Requested, no packet id yet (in request order).
    queued: VecDeque<Batch>,
    /// Sent, waiting for PUBACK.
    sent: HashMap<u16, Batch>,
}

impl Flight {
    fn in_flight(&self) -> usize {
        self.queued.len() + self.sent.len()
    }
}

/// Runs until `stop` is cancelled, reconnecting with capped, jittered backoff.
pub async fn run(mut ctx: Context, stop: CancellationToken) {
    let mut backoff = Backoff::new(ctx.settings.reconnect_min, ctx.settings.reconnect_max);
    let mut added = ctx.outbox.added();
    let mut ever = false;
    loop {
        let (client, eventloop) = match link::client(&ctx.settings, None) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "telemetry link cannot be set up");
                return;
            }
        };
        // `EventLoop::poll` is not cancel-safe (a publish may be counted as sent and never
        // written), so it runs in a task of its own that is never interrupted, and events come
        // through a channel.
        let (mut events, mut poller) = spawn_poller(eventloop);
        let mut flight = Flight::default();
        let mut connected = false;
        let error = loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    ctx.counters.connected.store(false, Ordering::Relaxed);
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_millis(500), &mut poller).await;
                    poller.abort();
                    return;
                }
                event = events.recv() => match event.unwrap_or(Err(rumqttc::ConnectionError::RequestsDone)) {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        backoff.reset();
                        ctx.counters.connected.store(true, Ordering::Relaxed);
                        if ever {
                            ctx.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        ever = true;
                        let queued = ctx.outbox.stats().records;
                        tracing::info!(queued, "telemetry link connected; draining");
                        fill(&ctx, &client, &mut flight);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(batch) = flight.queued.pop_front() {
                            flight.sent.insert(pkid, batch);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(b) = flight.sent.remove(&ack.pkid) {
                            ctx.outbox.ack(&b.stream, b.first, b.last).await;
                        }
                        fill(&ctx, &client, &mut flight);
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                },
                changed = added.changed(), if connected => {
                    if changed.is_err() {
                        return;
                    }
                    fill(&ctx, &client, &mut flight);
                }
            }
        };
        ctx.counters.connected.store(false, Ordering::Relaxed);
        let delay = backoff.next_delay();
        let err = ctx.settings.explain(&error);
        if connected {
            tracing::warn!(error = %err, unacknowledged = flight.in_flight(), "telemetry link lost; records stay queued");
        } else if err.is_configuration() {
            // Refused (certificate, credentials, the broker's rules for this client id): not
            // something a retry fixes, so say it where it is seen.
            tracing::warn!(error = %err, client_id = %ctx.settings.client_id, retry_in_ms = delay.as_millis() as u64, "telemetry link refused by the hub");
        } else {
            tracing::debug!(error = %err, retry_in_ms = delay.as_millis() as u64, "telemetry link connection failed");
        }
        poller.abort();
        // A clustered hub: the next attempt goes to the next node (the link does the same).
        ctx.settings = ctx.settings.next_endpoint();
        ctx.link_session.borrow_and_update();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = wait_connected(&mut ctx.link_session) => {}
        }
    }
}

/// Polls `eventloop` in a task of its own until it fails (the error is the last event) or the
/// receiver is dropped.
pub(crate) fn spawn_poller(
    mut eventloop: rumqttc::EventLoop,
) -> (
    tokio::sync::mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            if tx.send(event).await.is_err() || failed {
                return;
            }
        }
    });
    (rx, task)
}

/// Resolves when the main link connects (again).
async fn wait_connected(session: &mut watch::Receiver<u64>) {
    loop {
        if session.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if *session.borrow_and_update() != 0 {
            return;
        }
    }
}

/// Requests batches until the window is full or nothing is left to send.
fn fill(ctx: &Context, client: &rumqttc::AsyncClient, flight: &mut Flight) {
    while flight.in_flight() < WINDOW {
        let streams = ctx.outbox.streams();
        let Some((stream, priority)) = next_stream(&streams, &flight.cursors, &flight.charge)
        else {
            return;
        };
        let from = flight.cursors.get(&stream).copied().unwrap_or(0);
        let records = match ctx.outbox.read(&stream, from, BATCH_RECORDS, BATCH_BYTES) {
            Ok(r) => r,
            // Being reopened, or stopping: nothing to send now; `added` changes when it is back.
            Err(
                e @ (OutboxError::NoSpace { .. }
                | OutboxError::Unavailable { .. }
                | OutboxError::Closed),
            ) => {
                tracing::debug!(error = %e, stream, "outbox not readable; draining resumes when it is back");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, stream, "cannot read the outbox");
                return;
            }
        };
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            // Dropped (expired or evicted) since the stream was counted.
            flight.cursors.insert(
                stream.clone(),
                streams.get(&stream).map_or(0, |i| i.tail) + 1,
            );
            continue;
        };
        let batch = Batch {
            stream: stream.clone(),
            first: first.id,
            last: last.id,
        };
        let payload = encode_batch(&stream, &records);
        if let Err(e) = client.try_publish(
            ctx.topics.telemetry(&stream),
            QoS::AtLeastOnce,
            false,
            payload,
        ) {
            tracing::debug!(error = %e, "telemetry request queue full");
            return;
        }
        flight.cursors.insert(stream.clone(), batch.last + 1);
        charge(&mut flight.charge, stream, priority);
        flight.queued.push_back(batch);
    }
}

/// The stream to send from next: one with records beyond its cursor, the least charged first
/// (then the more important, then the one with the oldest record).
fn next_stream(
    streams: &BTreeMap<String, StreamInfo>,
    cursors: &HashMap<String, u64>,
    charge: &HashMap<String, u64>,
) -> Option<(String, u8)> {
    streams
        .iter()
        .filter(|(name, info)| {
            info.records > 0 && info.tail >= cursors.get(*name).copied().unwrap_or(0)
        })
        .min_by_key(|(name, info)| {
            (
                charge.get(*name).copied().unwrap_or(0),
                info.priority,
                info.head,
            )
        })
        .map(|(name, info)| (name.clone(), info.priority))
}

/// Charges a stream for one batch: `priority + 1`, so a stream of priority 0 gets ten turns for
/// one of priority 9. A stream new to this connection starts level with the least charged, not
/// at zero, so it cannot take every turn until it has caught up.
fn charge(charges: &mut HashMap<String, u64>, stream: String, priority: u8) {
    let floor = charges.values().copied().min().unwrap_or(0);
    *charges.entry(stream).or_insert(floor) += u64::from(priority) + 1;
}

/// Deepest nesting of a payload embedded as JSON; deeper ones travel as base64. A consumer's
/// parser has a recursion limit (serde_json's is 128) that applies to the whole batch: one
/// record nested 126 deep made the batch unreadable and lost the records beside it.
pub const MAX_EMBEDDED_DEPTH: usize = 32;
/// Largest payload embedded as JSON; larger ones travel as base64.
pub const MAX_EMBEDDED_BYTES: usize = 64 * 1024;

/// How deep `json` nests (objects and arrays), counted without parsing it; strings (with
/// their escapes) are skipped.
pub fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// `{"stream": S, "records": [{"id", "ts", "topic", "body" | "bodyBase64"}]}`: a payload that
/// is JSON (valid UTF-8, at most [`MAX_EMBEDDED_DEPTH`] deep and [`MAX_EMBEDDED_BYTES`] long)
/// is embedded as is, anything else as base64, so no record can make its batch unreadable.
pub fn encode_batch(stream: &str, records: &[Record]) -> Vec<u8> {
    use base64::Engine as _;
    let size: usize = records
        .iter()
        .map(|r| r.payload.len() + r.topic.len() + 64)
        .sum();
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"{\"stream\":");
    // Strings serialize infallibly into a Vec.
    let _ = serde_json::to_writer(&mut out, stream);
    out.extend_from_slice(b",\"records\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!("{{\"id\":{},\"ts\":{},\"topic\":", r.id, r.ts_ms).as_bytes(),
        );
        let _ = serde_json::to_writer(&mut out, &r.topic);
        // Valid UTF-8 first: serde_json skips strings without checking it, and a batch with
        // invalid UTF-8 would be acknowledged by the hub yet unreadable there.
        if !r.payload.is_empty()
            && r.payload.len() <= MAX_EMBEDDED_BYTES
            && json_depth(&r.payload) <= MAX_EMBEDDED_DEPTH
            && std::str::from_utf8(&r.payload).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(&r.payload).is_ok()
        {
            out.extend_from_slice(b",\"body\":");
            out.extend_from_slice(&r.payload);
        } else {
            out.extend_from_slice(b",\"bodyBase64\":\"");
            out.extend_from_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(&r.payload)
                    .as_bytes(),
            );
            out.push(b'"');
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

pub use outpost_core::wire::telemetry::{ReceivedBatch, ReceivedRecord, dedup};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_embed_json_and_encode_the_rest() {
        let records = vec![
            Record {
                id: 1,
                ts_ms: 5,
                topic: "modules/a/outputs/x".into(),
                payload: br#"{"t": 21.5}"#.to_vec(),
            },
            Record {
                id: 2,
                ts_ms: 6,
                topic: "modules/a/outputs/\"q\"".into(),
                payload: vec![0xff, 0x00],
            },
            Record {
                id: 3,
                ts_ms: 7,
                topic: "t".into(),
                payload: b"{not json".to_vec(),
            },
            Record {
                id: 4,
                ts_ms: 8,
                topic: "t".into(),
                payload: b"{\"a\":\"\xff\"}".to_vec(),
            },
        ];
        let bytes = encode_batch("s\"1", &records);
        let batch: ReceivedBatch = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(batch.stream, "s\"1");
        assert_eq!(batch.records.len(), 4);
        assert!(
            std::str::from_utf8(&bytes).is_ok(),
            "a batch is always UTF-8"
        );
        assert!(
            batch.records[3].body_base64.is_some(),
            "JSON with invalid UTF-8 goes as base64"
        );
        assert_eq!(batch.records[0].body, Some(serde_json::json!({"t": 21.5})));
        assert_eq!(batch.records[1].topic, "modules/a/outputs/\"q\"");
        assert_eq!(batch.records[1].body_base64.as_deref(), Some("/wA="));
        assert_eq!(
            batch.records[2].body_base64.as_deref(),
            Some("e25vdCBqc29u")
        );
    }

    #[test]
    fn a_deeply_nested_record_cannot_make_its_batch_unreadable() {
        let deep = format!("{}1{}", "[".repeat(126), "]".repeat(126));
        let records: Vec<Record> = (0..11)
            .map(|i| Record {
                id: i,
                ts_ms: 1,
                topic: "t".into(),
                payload: if i == 5 {
                    deep.clone().into_bytes()
                } else {
                    br#"{"ok": true}"#.to_vec()
                },
            })
            .collect();
        let bytes = encode_batch("s", &records);
        let batch: ReceivedBatch = serde_json::from_slice(&bytes).expect("the batch is readable");
        assert_eq!(batch.records.len(), 11, "no record lost");
        assert!(batch.records[5].body_base64.is_some());
        assert_eq!(json_depth(deep.as_bytes()), 126);
        assert_eq!(
            json_depth(br#"{"a":"[[[[\"]]"}"#),
            1,
            "brackets in strings do not count"
        );
    }

    fn info(id: u32, priority: u8, head: u64, tail: u64) -> StreamInfo {
        StreamInfo {
            id,
            priority,
            records: tail - head + 1,
            bytes: 0,
            head,
            tail,
            head_odo: 0,
        }
    }

    #[test]
    fn streams_take_turns_by_priority_and_none_starves() {
        // A big backlog of bulk data (least important) and live alerts (most important).
        let streams: BTreeMap<String, StreamInfo> = [
            ("bulk".to_string(), info(1, 9, 1, 100_000)),
            ("alerts".to_string(), info(2, 0, 100_001, 100_010)),
        ]
        .into();
        let (cursors, mut charges) = (HashMap::new(), HashMap::new());
        let mut turns = Vec::new();
        for _ in 0..22 {
            let (stream, priority) = next_stream(&streams, &cursors, &charges).unwrap();
            charge(&mut charges, stream.clone(), priority);
            turns.push(stream);
        }
        assert_eq!(turns[0], "alerts", "the important stream goes first");
        let bulk = turns.iter().filter(|s| *s == "bulk").count();
        assert!(
            (1..=3).contains(&bulk),
            "bulk gets about one turn in eleven, not none and not half: {turns:?}"
        );
        // A stream whose records were all sent on this connection is not picked again.
        let sent: HashMap<String, u64> = [("alerts".to_string(), 100_011)].into();
        assert_eq!(
            next_stream(&streams, &sent, &HashMap::new()).map(|s| s.0),
            Some("bulk".to_string())
        );
    }

    #[test]
    fn dedup_keeps_first_delivery_in_order() {
        let mk = |ids: &[u64]| ReceivedBatch {
            stream: "s".into(),
            records: ids
                .iter()
                .map(|&id| ReceivedRecord {
                    id,
                    ts: 0,
                    topic: String::new(),
                    body: None,
                    body_base64: None,
                })
                .collect(),
        };
        let out = dedup([mk(&[1, 2, 3]), mk(&[2, 3]), mk(&[4])]);
        let ids: Vec<u64> = out["s"].iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 2, 3, 4]);
    }
}
