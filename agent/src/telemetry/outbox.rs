//! The outbox: telemetry records waiting for the hub, in their own redb file
//! (`STATE_DIR/outbox.redb`, owner-only).
//!
//! - A record is *accepted* only once the transaction holding it is committed with fsync
//!   (redb's `Durability::Immediate`); callers get its id then, not before.
//! - It is deleted only when the hub acknowledged the batch carrying it ([`Outbox::ack`]).
//! - Records are keyed `(stream, sequence)`: the sequence is one counter for the whole outbox,
//!   stored with the records, so ids never repeat across restarts and order per stream is the
//!   key order.
//! - Limits: the bytes held (record sizes) and the age of the oldest record. When an enqueue
//!   would go over the byte limit, the oldest records of the lowest-priority stream are dropped
//!   first; expired records are dropped on a timer. Every drop is counted by reason, in the
//!   store, so the counts survive restarts.
//!
//! One thread owns the write side and commits in groups: whatever enqueues and acks are waiting
//! when it finishes a commit go into the next one. One fsync then accepts thousands of records,
//! which is what makes durable enqueue fast. Reads (the drain) use read transactions and never
//! wait for the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
const STREAMS: TableDefinition<&str, u32> = TableDefinition::new("streams");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const NEXT_SEQ: &str = "next_seq";
const NEXT_STREAM: &str = "next_stream";
const ENQUEUED: &str = "enqueued_total";
const DELIVERED: &str = "delivered_total";

/// Why records were dropped; each has its own counter.
pub const DROP_REASONS: [&str; 3] = ["full", "expired", "too-large"];

/// Per-record overhead counted against the byte limit (key and bookkeeping).
const RECORD_OVERHEAD: u64 = 16;
/// Most operations one commit takes.
const GROUP_MAX: usize = 8192;
/// How many operations may wait for the writer.
const QUEUE: usize = 16384;
/// Payload bytes (in KiB) that may wait for the writer: beyond it, producers wait.
const QUEUED_KIB: u32 = 64 * 1024;
/// Payload bytes one commit takes at most.
const GROUP_BYTES: usize = 16 << 20;
/// How often expired records are looked for.
const EXPIRY_EVERY: Duration = Duration::from_secs(5);
/// Largest single record.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the outbox at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("outbox {op} failed: {message}")]
    Io { op: &'static str, message: String },
    #[error("record of {size} bytes is larger than the outbox allows ({limit} bytes)")]
    TooLarge { size: usize, limit: u64 },
    #[error("the outbox is shutting down")]
    Closed,
}

fn io<E: std::fmt::Display>(op: &'static str) -> impl Fn(E) -> OutboxError {
    move |e| OutboxError::Io {
        op,
        message: e.to_string(),
    }
}

/// Limits from the device configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// A record to enqueue.
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub stream: String,
    /// 0 is the most important, 9 the least; the least important stream is dropped first.
    pub priority: u8,
    /// The bus topic it was published on (or the agent's own, for metrics).
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A record read back for sending.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Unique per device, growing: the hub drops duplicates by it.
    pub id: u64,
    /// Unix milliseconds when it was accepted.
    pub ts_ms: u64,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What is queued for one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInfo {
    pub(crate) id: u32,
    pub priority: u8,
    pub records: u64,
    pub bytes: u64,
    /// The oldest and newest sequence queued (meaningful when `records > 0`).
    pub head: u64,
    pub tail: u64,
    pub(crate) head_ts: u64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub enqueued_total: u64,
    pub delivered_total: u64,
    pub dropped_total: BTreeMap<String, u64>,
}

/// Where an enqueue's outcome goes.
type Reply = oneshot::Sender<Result<u64, OutboxError>>;

enum Op {
    /// The permit holds the record's bytes against [`QUEUED_KIB`] until it is committed.
    Enqueue(NewRecord, Reply, tokio::sync::OwnedSemaphorePermit),
    /// The hub acknowledged `first..=last` of `stream`.
    Ack {
        stream: String,
        first: u64,
        last: u64,
    },
    Expire,
    Stop,
}

struct Shared {
    streams: Mutex<BTreeMap<String, StreamInfo>>,
    /// Bumped after every commit that added records.
    added: watch::Sender<u64>,
    enqueued: AtomicU64,
    delivered: AtomicU64,
    dropped: [AtomicU64; 3],
    limits: Limits,
}

/// The handle: enqueue, read, acknowledge. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    db: Arc<Database>,
    ops: mpsc::Sender<Op>,
    budget: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

/// The write side, to be run by its owner ([`Writer::run`]).
pub struct Writer {
    db: Arc<Database>,
    ops: mpsc::Receiver<Op>,
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn key(stream: u32, seq: u64) -> u128 {
    (u128::from(stream) << 64) | u128::from(seq)
}

fn seq_of(key: u128) -> u64 {
    // The low 64 bits are the sequence by construction.
    (key & u128::from(u64::MAX)) as u64
}

fn encode(ts_ms: u64, r: &NewRecord) -> Vec<u8> {
    let topic = r.topic.as_bytes();
    let topic_len = topic.len().min(u16::MAX as usize);
    let mut v = Vec::with_capacity(11 + topic_len + r.payload.len());
    v.extend_from_slice(&ts_ms.to_le_bytes());
    v.push(r.priority);
    v.extend_from_slice(&(topic_len as u16).to_le_bytes());
    v.extend_from_slice(&topic[..topic_len]);
    v.extend_from_slice(&r.payload);
    v
}

/// `(ts_ms, priority, topic, payload)`, or `None` for bytes this module did not write.
fn decode(v: &[u8]) -> Option<(u64, u8, &str, &[u8])> {
    let ts = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let priority = *v.get(8)?;
    let topic_len = u16::from_le_bytes(v.get(9..11)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(11..11 + topic_len)?).ok()?;
    Some((ts, priority, topic, v.get(11 + topic_len..)?))
}

fn record_size(value_len: usize) -> u64 {
    value_len as u64 + RECORD_OVERHEAD
}

impl Outbox {
    /// Opens (or creates) `DIR/outbox.redb` and counts what it holds.
    pub fn open(dir: &Path, limits: Limits) -> Result<(Outbox, Writer), OutboxError> {
        let path = dir.join("outbox.redb");
        let open_err = |message: String| OutboxError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;
        set_owner_only(&path).map_err(|e| open_err(e.to_string()))?;
        let txn = db.begin_write().map_err(io("begin"))?;
        let (streams, counters) = {
            let records = txn.open_table(RECORDS).map_err(io("open table"))?;
            let names = txn.open_table(STREAMS).map_err(io("open table"))?;
            let meta = txn.open_table(META).map_err(io("open table"))?;
            let mut streams = BTreeMap::new();
            for entry in names.iter().map_err(io("read"))? {
                let (name, id) = entry.map_err(io("read"))?;
                let id = id.value();
                let mut info = StreamInfo {
                    id,
                    priority: 9,
                    records: 0,
                    bytes: 0,
                    head: 0,
                    tail: 0,
                    head_ts: 0,
                };
                for r in records
                    .range(key(id, 0)..=key(id, u64::MAX))
                    .map_err(io("read"))?
                {
                    let (k, v) = r.map_err(io("read"))?;
                    let seq = seq_of(k.value());
                    let v = v.value();
                    let (ts, priority, _, _) = decode(v).unwrap_or((0, 9, "", &[]));
                    if info.records == 0 {
                        info.head = seq;
                        info.head_ts = ts;
                    }
                    info.tail = seq;
                    info.priority = priority;
                    info.records += 1;
                    info.bytes += record_size(v.len());
                }
                streams.insert(name.value().to_string(), info);
            }
            let get = |k: &str| -> Result<u64, OutboxError> {
                Ok(meta.get(k).map_err(io("read"))?.map_or(0, |v| v.value()))
            };
            let counters = (
                get(ENQUEUED)?,
                get(DELIVERED)?,
                [
                    get(DROP_REASONS[0])?,
                    get(DROP_REASONS[1])?,
                    get(DROP_REASONS[2])?,
                ],
            );
            (streams, counters)
        };
        txn.commit().map_err(io("commit"))?;
        let shared = Arc::new(Shared {
            streams: Mutex::new(streams),
            added: watch::channel(0).0,
            enqueued: AtomicU64::new(counters.0),
            delivered: AtomicU64::new(counters.1),
            dropped: counters.2.map(AtomicU64::new),
            limits,
        });
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(QUEUE);
        Ok((
            Outbox {
                db: db.clone(),
                ops: tx.clone(),
                budget: Arc::new(tokio::sync::Semaphore::new(QUEUED_KIB as usize)),
                shared: shared.clone(),
            },
            Writer {
                db,
                ops: rx,
                tx,
                shared,
            },
        ))
    }

    /// Queues a record and resolves once it is durable, with its id.
    ///
    /// Fails when the record is larger than [`MAX_RECORD_BYTES`] or the byte limit (it is
    /// counted as dropped, reason `too-large`), when the store cannot be written, or when the
    /// outbox is shutting down.
    pub async fn enqueue(&self, record: NewRecord) -> Result<u64, OutboxError> {
        self.submit(record)
            .await?
            .await
            .map_err(|_| OutboxError::Closed)?
    }

    /// Queues a record and returns at once; the receiver resolves once it is durable. Callers
    /// that must keep their own order (the bus, answering a module in order) submit in order
    /// and await the receivers in order.
    pub async fn submit(
        &self,
        record: NewRecord,
    ) -> Result<oneshot::Receiver<Result<u64, OutboxError>>, OutboxError> {
        let (tx, rx) = oneshot::channel();
        let kib = (record.payload.len() / 1024 + 1).min(QUEUED_KIB as usize) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| OutboxError::Closed)?;
        self.ops
            .send(Op::Enqueue(record, tx, permit))
            .await
            .map_err(|_| OutboxError::Closed)?;
        Ok(rx)
    }

    /// The hub acknowledged `first..=last` of `stream`: delete them (in the next commit).
    pub async fn ack(&self, stream: &str, first: u64, last: u64) {
        let _ = self
            .ops
            .send(Op::Ack {
                stream: stream.to_string(),
                first,
                last,
            })
            .await;
    }

    /// Up to `max_records` records (and about `max_bytes`, at least one record) of `stream`
    /// from sequence `from` on.
    pub fn read(
        &self,
        stream: &str,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let Some(id) = self.stream_id(stream) else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read().map_err(io("begin"))?;
        let table = txn.open_table(RECORDS).map_err(io("open table"))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in table
            .range(key(id, from)..=key(id, u64::MAX))
            .map_err(io("read"))?
        {
            let (k, v) = r.map_err(io("read"))?;
            let v = v.value();
            let Some((ts, _, topic, payload)) = decode(v) else {
                tracing::warn!(
                    seq = seq_of(k.value()),
                    stream,
                    "unreadable outbox record skipped"
                );
                continue;
            };
            if !out.is_empty() && (out.len() >= max_records || bytes + v.len() > max_bytes) {
                break;
            }
            bytes += v.len();
            out.push(Record {
                id: seq_of(k.value()),
                ts_ms: ts,
                topic: topic.to_string(),
                payload: payload.to_vec(),
            });
        }
        Ok(out)
    }

    fn stream_id(&self, stream: &str) -> Option<u32> {
        self.lock_streams().get(stream).map(|s| s.id)
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StreamInfo>> {
        // A panic while holding this lock cannot leave the map half-updated: it is replaced
        // whole after each commit. Recover the guard rather than propagating the poison.
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What each stream holds now.
    pub fn streams(&self) -> BTreeMap<String, StreamInfo> {
        self.lock_streams().clone()
    }

    /// Changes after every commit that adds records.
    pub fn added(&self) -> watch::Receiver<u64> {
        self.shared.added.subscribe()
    }

    pub fn stats(&self) -> OutboxStats {
        let streams = self.lock_streams();
        OutboxStats {
            records: streams.values().map(|s| s.records).sum(),
            bytes: streams.values().map(|s| s.bytes).sum(),
            max_bytes: self.shared.limits.max_bytes,
            enqueued_total: self.shared.enqueued.load(Ordering::Relaxed),
            delivered_total: self.shared.delivered.load(Ordering::Relaxed),
            dropped_total: DROP_REASONS
                .iter()
                .zip(&self.shared.dropped)
                .map(|(r, c)| (r.to_string(), c.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

/// What one commit changes, applied to the shared view only once it is durable.
struct Batch {
    streams: BTreeMap<String, StreamInfo>,
    next_seq: u64,
    next_stream: u32,
    enqueued: u64,
    delivered: u64,
    dropped: [u64; 3],
    replies: Vec<(Reply, Result<u64, OutboxError>)>,
    added: bool,
}

impl Writer {
    /// Runs the writer on a thread of its own until `stop` is cancelled; what was submitted
    /// but not committed by then is answered with [`OutboxError::Closed`].
    pub async fn run(self, stop: CancellationToken) {
        let tx = self.tx.clone();
        let thread = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || self.thread_main());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the outbox writer thread");
                return;
            }
        };
        let mut tick = tokio::time::interval(EXPIRY_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => { let _ = tx.send(Op::Expire).await; }
            }
        }
        let _ = tx.send(Op::Stop).await;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    fn thread_main(mut self) {
        let (mut next_seq, mut next_stream) = match self.read_counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "outbox cannot start");
                return;
            }
        };
        while let Some(first) = self.ops.blocking_recv() {
            let size = |op: &Op| match op {
                Op::Enqueue(r, _, _) => r.payload.len(),
                _ => 0,
            };
            let mut bytes = size(&first);
            let mut ops = vec![first];
            while ops.len() < GROUP_MAX && bytes < GROUP_BYTES {
                match self.ops.try_recv() {
                    Ok(op) => {
                        bytes += size(&op);
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
            let stop = ops.iter().any(|op| matches!(op, Op::Stop));
            match self.commit(ops, next_seq, next_stream) {
                Ok(batch) => {
                    next_seq = batch.next_seq;
                    next_stream = batch.next_stream;
                    self.publish(batch);
                }
                Err((e, replies)) => {
                    tracing::error!(error = %e, "outbox commit failed; the records were not accepted");
                    for reply in replies {
                        let _ = reply.send(Err(OutboxError::Io {
                            op: "commit",
                            message: e.to_string(),
                        }));
                    }
                }
            }
            if stop {
                break;
            }
        }
        // Answer whatever is still waiting: not accepted.
        self.ops.close();
        while let Ok(op) = self.ops.try_recv() {
            if let Op::Enqueue(_, reply, _) = op {
                let _ = reply.send(Err(OutboxError::Closed));
            }
        }
    }

    fn read_counters(&self) -> Result<(u64, u32), OutboxError> {
        let txn = self.db.begin_read().map_err(io("begin"))?;
        let meta = txn.open_table(META).map_err(io("open table"))?;
        let seq = meta
            .get(NEXT_SEQ)
            .map_err(io("read"))?
            // A new outbox starts its ids at the clock (microseconds), so that ids keep
            // growing even if the outbox file was lost or deleted: hub consumers de-duplicate
            // by id.
            .map_or_else(|| now_ms().saturating_mul(1000).max(1), |v| v.value());
        let stream = meta
            .get(NEXT_STREAM)
            .map_err(io("read"))?
            .map_or(1, |v| v.value());
        Ok((seq, stream as u32))
    }

    fn publish(&self, batch: Batch) {
        let s = &self.shared;
        *s.streams.lock().unwrap_or_else(|p| p.into_inner()) = batch.streams;
        s.enqueued.store(batch.enqueued, Ordering::Relaxed);
        s.delivered.store(batch.delivered, Ordering::Relaxed);
        for (c, v) in s.dropped.iter().zip(batch.dropped) {
            c.store(v, Ordering::Relaxed);
        }
        for (reply, result) in batch.replies {
            let _ = reply.send(result);
        }
        if batch.added {
            s.added.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// One write transaction for `ops`. On failure the replies are handed back to be failed.
    #[allow(clippy::type_complexity)]
    fn commit(
        &self,
        ops: Vec<Op>,
        next_seq: u64,
        next_stream: u32,
    ) -> Result<Batch, (OutboxError, Vec<oneshot::Sender<Result<u64, OutboxError>>>)> {
        let s = &self.shared;
        let mut batch = Batch {
            streams: s.streams.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            next_seq,
            next_stream,
            enqueued: s.enqueued.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            dropped: [0, 1, 2].map(|i| s.dropped[i].load(Ordering::Relaxed)),
            replies: Vec::new(),
            added: false,
        };
        let mut pending_replies = Vec::new();
        let result = (|| -> Result<(), OutboxError> {
            let txn = self.db.begin_write().map_err(io("begin"))?;
            {
                let mut records = txn.open_table(RECORDS).map_err(io("open table"))?;
                let mut names = txn.open_table(STREAMS).map_err(io("open table"))?;
                let mut meta = txn.open_table(META).map_err(io("open table"))?;
                let now = now_ms();
                for op in ops {
                    match op {
                        Op::Enqueue(record, reply, _permit) => {
                            let value = encode(now, &record);
                            let size = record_size(value.len());
                            if record.payload.len() > MAX_RECORD_BYTES || size > s.limits.max_bytes
                            {
                                batch.dropped[2] += 1;
                                batch.replies.push((
                                    reply,
                                    Err(OutboxError::TooLarge {
                                        size: record.payload.len(),
                                        limit: s.limits.max_bytes.min(MAX_RECORD_BYTES as u64),
                                    }),
                                ));
                                continue;
                            }
                            let seq = batch.next_seq;
                            batch.next_seq += 1;
                            let info = match batch.streams.get_mut(&record.stream) {
                                Some(info) => info,
                                None => {
                                    let id = batch.next_stream;
                                    batch.next_stream += 1;
                                    names
                                        .insert(record.stream.as_str(), id)
                                        .map_err(io("write"))?;
                                    batch.streams.entry(record.stream.clone()).or_insert(
                                        StreamInfo {
                                            id,
                                            priority: record.priority,
                                            records: 0,
                                            bytes: 0,
                                            head: seq,
                                            tail: seq,
                                            head_ts: now,
                                        },
                                    )
                                }
                            };
                            records
                                .insert(key(info.id, seq), value.as_slice())
                                .map_err(io("write"))?;
                            if info.records == 0 {
                                info.head = seq;
                                info.head_ts = now;
                            }
                            info.tail = seq;
                            info.records += 1;
                            info.bytes += size;
                            info.priority = record.priority;
                            batch.enqueued += 1;
                            batch.added = true;
                            pending_replies.push((reply, seq));
                        }
                        Op::Ack {
                            stream,
                            first,
                            last,
                        } => {
                            let Some(info) = batch.streams.get_mut(&stream) else {
                                continue;
                            };
                            let id = info.id;
                            let mut removed = 0u64;
                            let mut freed = 0u64;
                            // One range of this stream's keys: sequences are shared by all
                            // streams, so `first..=last` may span many ids of others.
                            for entry in records
                                .extract_from_if(key(id, first)..=key(id, last), |_, _| true)
                                .map_err(io("delete"))?
                            {
                                let (_, v) = entry.map_err(io("delete"))?;
                                removed += 1;
                                freed += record_size(v.value().len());
                            }
                            info.records -= removed.min(info.records);
                            info.bytes -= freed.min(info.bytes);
                            batch.delivered += removed;
                            Self::refresh_head(&records, info)?;
                        }
                        Op::Expire => {
                            let cutoff = now.saturating_sub(s.limits.max_age.as_millis() as u64);
                            for info in batch.streams.values_mut() {
                                while info.records > 0 && info.head_ts < cutoff {
                                    Self::drop_head(&mut records, info)?;
                                    batch.dropped[1] += 1;
                                }
                            }
                        }
                        Op::Stop => {}
                    }
                }
                // Over the limit: the oldest records of the least important stream go first.
                let mut total: u64 = batch.streams.values().map(|i| i.bytes).sum();
                let mut full_drops = 0u64;
                while total > s.limits.max_bytes {
                    let victim = batch
                        .streams
                        .values_mut()
                        .filter(|i| i.records > 0)
                        .max_by_key(|i| (i.priority, std::cmp::Reverse(i.head)));
                    let Some(info) = victim else { break };
                    let before = info.bytes;
                    Self::drop_head(&mut records, info)?;
                    total -= before - info.bytes;
                    full_drops += 1;
                }
                if full_drops > 0 {
                    batch.dropped[0] += full_drops;
                    tracing::warn!(
                        dropped = full_drops,
                        max_bytes = s.limits.max_bytes,
                        "outbox full: oldest records of the least important stream dropped"
                    );
                }
                meta.insert(NEXT_SEQ, batch.next_seq).map_err(io("write"))?;
                meta.insert(NEXT_STREAM, u64::from(batch.next_stream))
                    .map_err(io("write"))?;
                meta.insert(ENQUEUED, batch.enqueued).map_err(io("write"))?;
                meta.insert(DELIVERED, batch.delivered)
                    .map_err(io("write"))?;
                for (reason, n) in DROP_REASONS.iter().zip(batch.dropped) {
                    meta.insert(*reason, n).map_err(io("write"))?;
                }
            }
            txn.commit().map_err(io("commit"))
        })();
        match result {
            Ok(()) => {
                batch
                    .replies
                    .extend(pending_replies.into_iter().map(|(r, seq)| (r, Ok(seq))));
                Ok(batch)
            }
            Err(e) => {
                let mut replies: Vec<_> = pending_replies.into_iter().map(|(r, _)| r).collect();
                replies.extend(batch.replies.into_iter().map(|(r, _)| r));
                Err((e, replies))
            }
        }
    }

    fn drop_head(
        records: &mut redb::Table<u128, &[u8]>,
        info: &mut StreamInfo,
    ) -> Result<(), OutboxError> {
        let first = records
            .range(key(info.id, info.head)..=key(info.id, u64::MAX))
            .map_err(io("read"))?
            .next()
            .transpose()
            .map_err(io("read"))?
            .map(|(k, v)| (k.value(), v.value().len()));
        match first {
            Some((k, len)) => {
                records.remove(k).map_err(io("delete"))?;
                info.records -= 1.min(info.records);
                info.bytes -= record_size(len).min(info.bytes);
            }
            None => {
                info.records = 0;
                info.bytes = 0;
            }
        }
        Self::refresh_head(records, info)
    }

    fn refresh_head(
        records: &redb::Table<u128, &[u8]>,
        info: &mut StreamInfo,
    ) -> Result<(), OutboxError> {
        if info.records == 0 {
            info.bytes = 0;
            return Ok(());
        }
        let first = records
            .range(key(info.id, 0)..=key(info.id, u64::MAX))
            .map_err(io("read"))?
            .next()
            .transpose()
            .map_err(io("read"))?;
        if let Some((k, v)) = first {
            info.head = seq_of(k.value());
            info.head_ts = decode(v.value()).map_or(0, |d| d.0);
        }
        Ok(())
    }
}

fn set_owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stream: &str, priority: u8, n: usize) -> NewRecord {
        NewRecord {
            stream: stream.into(),
            priority,
            topic: "modules/m/outputs/x".into(),
            payload: format!("{n:0200}").into_bytes(),
        }
    }

    fn start(
        dir: &Path,
        limits: Limits,
    ) -> (Outbox, CancellationToken, tokio::task::JoinHandle<()>) {
        let (outbox, writer) = Outbox::open(dir, limits).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(stop.clone()));
        (outbox, stop, task)
    }

    const ROOMY: Limits = Limits {
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
    };

    #[tokio::test]
    async fn records_survive_reopen_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, stop, task) = start(dir.path(), ROOMY);
        let mut ids = Vec::new();
        for n in 0..50 {
            ids.push(
                outbox
                    .enqueue(rec(if n % 2 == 0 { "a" } else { "b" }, 5, n))
                    .await
                    .unwrap(),
            );
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
        let a = outbox.read("a", 0, 10, 1 << 20).unwrap();
        assert_eq!(a.len(), 10);
        outbox.ack("a", a[0].id, a[9].id).await;
        // Round-trip through the writer so the ack is committed.
        outbox.enqueue(rec("c", 5, 0)).await.unwrap();
        stop.cancel();
        task.await.unwrap();
        drop(outbox);

        let (outbox, stop, task) = start(dir.path(), ROOMY);
        let a = outbox.read("a", 0, 100, 1 << 20).unwrap();
        assert_eq!(a.len(), 15, "10 of 25 acknowledged");
        assert!(a.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(a[0].payload, rec("a", 5, 20).payload);
        let stats = outbox.stats();
        assert_eq!(stats.records, 15 + 25 + 1);
        assert_eq!(stats.delivered_total, 10);
        let next = outbox.enqueue(rec("a", 5, 99)).await.unwrap();
        assert!(
            next > *ids.last().unwrap(),
            "ids do not repeat after a restart"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn full_outbox_drops_oldest_of_least_important_stream_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let one = record_size(encode(0, &rec("low", 9, 0)).len());
        let limits = Limits {
            max_bytes: one * 10,
            max_age: Duration::from_secs(3600),
        };
        let (outbox, stop, task) = start(dir.path(), limits);
        for n in 0..4 {
            outbox.enqueue(rec("high", 1, n)).await.unwrap();
        }
        for n in 0..10 {
            outbox.enqueue(rec("low", 9, n)).await.unwrap();
        }
        let stats = outbox.stats();
        assert_eq!(stats.records, 10);
        assert!(stats.bytes <= limits.max_bytes);
        assert_eq!(stats.dropped_total["full"], 4);
        assert_eq!(outbox.read("high", 0, 100, 1 << 20).unwrap().len(), 4);
        let low = outbox.read("low", 0, 100, 1 << 20).unwrap();
        assert_eq!(low.len(), 6);
        assert_eq!(
            low[0].payload,
            rec("low", 9, 4).payload,
            "the oldest went first"
        );
        let too_big = NewRecord {
            payload: vec![0; (one * 11) as usize],
            ..rec("high", 1, 0)
        };
        assert!(matches!(
            outbox.enqueue(too_big).await,
            Err(OutboxError::TooLarge { .. })
        ));
        assert_eq!(outbox.stats().dropped_total["too-large"], 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn expired_records_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_bytes: 1 << 20,
            max_age: Duration::from_millis(1),
        };
        let (outbox, stop, task) = start(dir.path(), limits);
        outbox.enqueue(rec("a", 5, 0)).await.unwrap();
        // Wait for the millisecond to pass, then force an expiry pass.
        let deadline = now_ms() + 2;
        while now_ms() < deadline {
            tokio::task::yield_now().await;
        }
        outbox.ops.send(Op::Expire).await.unwrap();
        outbox.enqueue(rec("b", 5, 0)).await.unwrap();
        let stats = outbox.stats();
        assert_eq!(stats.dropped_total["expired"], 1);
        assert_eq!(stats.records, 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn decode_refuses_bytes_it_did_not_write() {
        assert!(decode(&[1, 2, 3]).is_none());
        let v = encode(7, &rec("a", 3, 1));
        let (ts, p, topic, payload) = decode(&v).unwrap();
        assert_eq!((ts, p, topic), (7, 3, "modules/m/outputs/x"));
        assert_eq!(payload.len(), 200);
        assert!(decode(&v[..12]).is_none());
    }
}
