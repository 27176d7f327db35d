//! The outbox: telemetry records waiting for the hub, in their own redb file
//! (`STATE_DIR/outbox.redb`, owner-only).
//!
//! What it owns:
//! - **Accepted means durable.** A record is accepted only once the transaction holding it is
//!   committed with fsync (redb's `Durability::Immediate`); callers get its id then, not before.
//!   It is deleted only when the hub acknowledged the batch carrying it ([`Outbox::ack`]), or
//!   dropped for a limit and counted.
//! - **Ids.** Records are keyed `(stream, sequence)`: the sequence is one counter for the whole
//!   outbox, stored with the records, so ids never repeat across restarts and order per stream
//!   is the key order.
//! - **Limits.** The bytes held, the age of the oldest record, and the disk: while the state
//!   directory's filesystem is above its high watermark the outbox does not grow (beyond a
//!   small working size, `DISK_HIGH_FLOOR`, so that a connected device keeps streaming). A new record
//!   that needs room makes it by dropping the oldest records of the least important stream that
//!   is not more important than itself; when nothing such is left it is *refused*
//!   ([`OutboxError::Full`], [`OutboxError::DiskHigh`]), so that its producer knows it was not
//!   stored. Every drop is counted by reason, in the file, so the counts survive restarts.
//! - **Age on an uptime odometer, not the wall clock.** A device without a real-time clock
//!   boots at 1970 and jumps decades when NTP answers; aging by the wall clock would drop the
//!   whole backlog at that jump. Each record keeps its wall-clock time (the hub reads it) and an
//!   odometer reading: milliseconds of device uptime, summed across boots, from the monotonic
//!   clock. Expiry compares odometer readings only. The odometer's base (boot id, monotonic
//!   reading, odometer value) is written with the commits that happen anyway; a new boot
//!   continues from the largest value known, so time powered off does not count.
//! - **Surviving I/O errors.** After one I/O error (ENOSPC) redb refuses every transaction
//!   (`PreviousIo`) until the file is closed and opened again. The writer then drops its handle
//!   and reopens the file with backoff (1 s doubling to 30 s). Meanwhile enqueues fail at once
//!   with the cause ([`OutboxError::NoSpace`], [`OutboxError::Unavailable`]), reads return
//!   nothing, and [`Outbox::health`] says since when. Readers take the database handle per read
//!   from a slot the writer empties, because redb's file lock lets the reopen succeed only once
//!   no other handle is alive.
//!
//! One thread owns the write side and commits in groups: whatever enqueues and acks are waiting
//! when it finishes a commit go into the next one. One fsync then accepts thousands of records,
//! which is what makes durable enqueue fast. Nothing is written while nothing changes: the
//! periodic tick commits only when a record expired. Reads (the drain) use read transactions
//! and never wait for the writer.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use redb::{Database, ReadableDatabase as _, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SharedClock};
use crate::disk::DiskUsage;

const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
const STREAMS: TableDefinition<&str, u32> = TableDefinition::new("streams");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TEXT: TableDefinition<&str, &str> = TableDefinition::new("text");

const NEXT_SEQ: &str = "next_seq";
const NEXT_STREAM: &str = "next_stream";
const ENQUEUED: &str = "enqueued_total";
const DELIVERED: &str = "delivered_total";
/// The first sequence written with an odometer reading (format 2). Records below it were
/// written by a version without one (format 1).
const FORMAT2_FROM: &str = "format2_from_seq";
/// The odometer reading format-1 records are aged from: when this version first opened the
/// file, so that an upgrade never drops a backlog.
const LEGACY_ODO: &str = "format1_odometer_ms";
/// The odometer's base: in boot `ODO_BOOT`, the monotonic clock read `ODO_MONO` when the
/// odometer read `ODO_VALUE`.
const ODO_MONO: &str = "odometer_mono_ms";
const ODO_VALUE: &str = "odometer_ms";
const ODO_BOOT: &str = "odometer_boot_id";

/// Why records were dropped; each has its own counter, stored in the file.
pub const DROP_REASONS: [&str; 4] = ["full", "expired", "too-large", "disk"];
const FULL: usize = 0;
const EXPIRED: usize = 1;
const TOO_LARGE: usize = 2;
const DISK: usize = 3;

/// Per-record overhead counted against the byte limit (key and bookkeeping).
const RECORD_OVERHEAD: u64 = 16;
/// Bytes of a record's header: time, priority, flags, odometer, topic length.
const HEADER: usize = 20;
/// Most operations one commit takes.
const GROUP_MAX: usize = 8192;
/// How many operations may wait for the writer.
const QUEUE: usize = 16384;
/// Payload bytes (in KiB) that may wait for the writer: beyond it, producers wait.
const QUEUED_KIB: u32 = 64 * 1024;
/// Payload bytes one commit takes at most.
const GROUP_BYTES: usize = 16 << 20;
/// How often the writer wakes up by itself (expiry, disk, reopening).
const TICK: Duration = Duration::from_secs(1);
/// How often expired records are looked for (in memory; a commit only if one expired).
const EXPIRY_EVERY_MS: u64 = 5_000;
/// How often the disk's usage is measured (one `statvfs`), at most.
const DISK_EVERY_MS: u64 = 2_000;
/// Above the disk's watermark the outbox still takes records up to this many bytes (or the
/// byte limit, if smaller) without making room: a device whose disk is full of something else
/// (images) keeps streaming telemetry to a connected hub — the drain keeps up to 2 MiB in
/// flight — while a backlog cannot grow.
const DISK_HIGH_FLOOR: u64 = 4 << 20;
/// Backoff between attempts to reopen the file after an I/O error.
const REOPEN_MIN: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);
/// Drops for room are warned about at most this often per reason, with the count since.
const DROP_WARN_EVERY_MS: u64 = 30_000;
/// Acknowledgements kept while the file is closed (the drain has at most a window in flight;
/// past this, the oldest are forgotten and those records are sent again).
const PENDING_ACKS_MAX: usize = 4096;
/// Largest single record.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the outbox at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("outbox {op} failed: {message}")]
    Io { op: &'static str, message: String },
    #[error("record of {size} bytes is larger than the outbox allows ({limit} bytes)")]
    TooLarge { size: usize, limit: u64 },
    /// The file could not be written for lack of space; it is being reopened with backoff.
    #[error(
        "no space left on the device holding {path}; records are refused until there is room again"
    )]
    NoSpace { path: PathBuf },
    /// The file could not be written (another I/O error); it is being reopened with backoff.
    #[error("the outbox is unavailable ({reason}); records are refused until it can be reopened")]
    Unavailable { reason: String },
    /// Over the byte limit, with only more important records to make room from.
    #[error(
        "outbox full of more important streams (a record of priority {priority}, {size} bytes, with {max_bytes} bytes allowed)"
    )]
    Full {
        priority: u8,
        size: u64,
        max_bytes: u64,
    },
    /// Above the disk's high watermark, with only more important records to make room from.
    #[error(
        "the disk is {used_percent}% full, above the outbox's high watermark of {high_percent}%, and only more important streams are queued (a record of priority {priority})"
    )]
    DiskHigh {
        used_percent: u8,
        high_percent: u8,
        priority: u8,
    },
    /// Only when the agent is stopping.
    #[error("the outbox is shutting down")]
    Closed,
}

/// Limits from the device configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    /// Measured on the uptime odometer, not the wall clock.
    pub max_age: Duration,
    /// Above this share of the state directory's filesystem in use the outbox stops growing
    /// (`disk.high_watermark_percent`). 100 or more: never.
    pub disk_high_percent: u8,
}

/// Whether the outbox is doing its job, for the reported state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxHealth {
    Ok,
    /// Records are refused or dropped for the reason given, since `since_wall_ms` (Unix ms by
    /// the wall clock, which may not have been set yet).
    Degraded {
        reason: String,
        since_wall_ms: u64,
    },
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
    /// Unix milliseconds when it was accepted. If the wall clock was not set then and is now,
    /// this is now minus the record's age on the odometer.
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
    /// The odometer reading of the oldest record: what expiry compares.
    pub(crate) head_odo: u64,
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

/// The hub acknowledged `first..=last` of `stream`.
#[derive(Debug, Clone)]
struct Ack {
    stream: String,
    first: u64,
    last: u64,
}

enum Op {
    /// The permit holds the record's bytes against [`QUEUED_KIB`] until it is committed.
    Enqueue(NewRecord, Reply, tokio::sync::OwnedSemaphorePermit),
    Ack(Ack),
    /// Time passed: expire, measure the disk, reopen, as each is due.
    Tick,
    /// Look for expired records now (tests).
    #[cfg(test)]
    Expire,
    /// Answered once everything before it was handled (tests).
    #[cfg(test)]
    Sync(oneshot::Sender<()>),
    Stop,
}

/// Uptime summed across boots: `odo_at` when the monotonic clock read `mono_at` (this boot).
#[derive(Debug, Clone, Copy)]
struct Odometer {
    mono_at: u64,
    odo_at: u64,
}

impl Odometer {
    fn at(&self, mono_ms: u64) -> u64 {
        self.odo_at
            .saturating_add(mono_ms.saturating_sub(self.mono_at))
    }
}

/// How to read a stored value: format 1 (no odometer) below `v2_from`, format 2 from it on.
#[derive(Debug, Clone, Copy)]
struct Format {
    v2_from: u64,
    legacy_odo: u64,
}

/// A stored value, decoded.
struct Decoded<'a> {
    ts_ms: u64,
    priority: u8,
    /// The wall clock was plausible when the record was accepted (format 1: assumed).
    wall_plausible: bool,
    odo_ms: u64,
    topic: &'a str,
    payload: &'a [u8],
}

impl Format {
    fn decode<'a>(&self, seq: u64, v: &'a [u8]) -> Option<Decoded<'a>> {
        if seq >= self.v2_from {
            decode_v2(v)
        } else {
            decode_v1(v).map(|(ts_ms, priority, topic, payload)| Decoded {
                ts_ms,
                priority,
                wall_plausible: true,
                odo_ms: self.legacy_odo,
                topic,
                payload,
            })
        }
    }

    fn odo_of(&self, seq: u64, v: &[u8]) -> u64 {
        self.decode(seq, v).map_or(self.legacy_odo, |d| d.odo_ms)
    }
}

/// What the writer is dealing with, for [`Outbox::health`] and for refusing at once.
#[derive(Debug, Default)]
struct Condition {
    /// The file is closed after an I/O error: what enqueues are told, and since when.
    down: Option<(OutboxError, u64)>,
    /// The disk is above the watermark: percent used, and since when.
    disk_high: Option<(u8, u64)>,
}

/// Opens the database file; a seam so that tests can put a failing storage under redb.
type OpenFn = dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync;
/// Measures the filesystem holding a path; a seam so that tests can fill a disk by decree.
type DiskFn = dyn Fn(&Path) -> Option<DiskUsage> + Send + Sync;

#[derive(Clone)]
struct Hooks {
    open: Arc<OpenFn>,
    disk: Arc<DiskFn>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            open: Arc::new(|path| Database::create(path)),
            disk: Arc::new(crate::disk::usage),
        }
    }
}

struct Shared {
    /// The state directory (whose filesystem the watermark is about) and the file in it.
    dir: PathBuf,
    path: PathBuf,
    /// The open database; empty while it is being reopened. Readers clone the handle for one
    /// read and drop it, so the writer's reopen is not blocked by the file lock for long.
    db: RwLock<Option<Arc<Database>>>,
    streams: Mutex<BTreeMap<String, StreamInfo>>,
    /// Bumped after every commit that added records, and when the file is back after a failure.
    added: watch::Sender<u64>,
    enqueued: AtomicU64,
    delivered: AtomicU64,
    dropped: [AtomicU64; 4],
    limits: Limits,
    clock: SharedClock,
    /// Fixed for the life of the process (one boot).
    odometer: Odometer,
    format: Format,
    condition: Mutex<Condition>,
    /// Set when the writer is told to stop: only then is [`OutboxError::Closed`] the truth.
    stopping: AtomicBool,
    /// Write transactions committed (to show that idle ticks do not write).
    commits: AtomicU64,
    /// When the writer plans to reopen the file (monotonic ms; `u64::MAX`: not planned), so
    /// that the ticking task wakes it then rather than at its next tick.
    reopen_at_mono: AtomicU64,
}

impl Shared {
    fn condition(&self) -> std::sync::MutexGuard<'_, Condition> {
        // Fields are replaced whole; a poisoned lock holds nothing half-done.
        self.condition.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StreamInfo>> {
        // A panic while holding this lock cannot leave the map half-updated: it is replaced
        // whole after each commit. Recover the guard rather than propagating the poison.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_db(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = db;
    }

    fn db(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What a producer is told while the file is closed, if it is.
    fn refusal(&self) -> Option<OutboxError> {
        self.condition().down.as_ref().map(|(e, _)| e.clone())
    }

    /// What a producer is told when its request can no longer reach the writer.
    fn gone(&self) -> OutboxError {
        if self.stopping.load(Ordering::Relaxed) {
            return OutboxError::Closed;
        }
        self.refusal().unwrap_or_else(|| OutboxError::Unavailable {
            reason: "the outbox writer is not running".into(),
        })
    }

    fn odo_now(&self) -> u64 {
        self.odometer.at(self.clock.mono_ms())
    }
}

/// The handle: enqueue, read, acknowledge. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    ops: mpsc::Sender<Op>,
    budget: Arc<tokio::sync::Semaphore>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

/// Resolves once a submitted record is durable (its id) or was not accepted (why).
pub struct Receipt {
    rx: oneshot::Receiver<Result<u64, OutboxError>>,
    shared: Arc<Shared>,
}

impl Future for Receipt {
    type Output = Result<u64, OutboxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(_)) => Poll::Ready(Err(self.shared.gone())),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The write side, to be run by its owner ([`Writer::run`]).
pub struct Writer {
    ops: mpsc::Receiver<Op>,
    tx: mpsc::Sender<Op>,
    shared: Arc<Shared>,
    hooks: Hooks,
    /// The writer's own handle; `None` while the file is closed after an I/O error.
    db: Option<Arc<Database>>,
    next_seq: u64,
    next_stream: u32,
    /// Acknowledgements that arrived while the file was closed, applied when it is back.
    pending_acks: Vec<Ack>,
    reopen_at_mono: u64,
    reopen_backoff: Duration,
    /// When the file last came back (monotonic ms): a failure soon after keeps the backoff.
    recovered_at_mono: Option<u64>,
    /// When the current outage began (monotonic ms), for the log line when it ends.
    down_since_mono: u64,
    last_expiry_mono: u64,
    last_disk_mono: Option<u64>,
    /// Bytes the outbox may hold above the disk's watermark without making room.
    disk_floor: u64,
    /// Per drop reason: when a drop for room was last warned about, and drops since.
    drop_warnings: [(Option<u64>, u64); 4],
}

fn key(stream: u32, seq: u64) -> u128 {
    (u128::from(stream) << 64) | u128::from(seq)
}

fn seq_of(key: u128) -> u64 {
    // The low 64 bits are the sequence by construction.
    (key & u128::from(u64::MAX)) as u64
}

/// Format 2: `ts_ms u64 | priority u8 | flags u8 (bit 0: wall clock plausible) | odometer u64 |
/// topic length u16 | topic | payload`, little-endian.
fn encode(ts_ms: u64, odo_ms: u64, wall_plausible: bool, r: &NewRecord) -> Vec<u8> {
    let topic = r.topic.as_bytes();
    let topic_len = topic.len().min(u16::MAX as usize);
    let mut v = Vec::with_capacity(HEADER + topic_len + r.payload.len());
    v.extend_from_slice(&ts_ms.to_le_bytes());
    v.push(r.priority);
    v.push(u8::from(wall_plausible));
    v.extend_from_slice(&odo_ms.to_le_bytes());
    v.extend_from_slice(&(topic_len as u16).to_le_bytes());
    v.extend_from_slice(&topic[..topic_len]);
    v.extend_from_slice(&r.payload);
    v
}

fn decode_v2(v: &[u8]) -> Option<Decoded<'_>> {
    let ts_ms = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let priority = *v.get(8)?;
    let flags = *v.get(9)?;
    let odo_ms = u64::from_le_bytes(v.get(10..18)?.try_into().ok()?);
    let topic_len = u16::from_le_bytes(v.get(18..20)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(HEADER..HEADER + topic_len)?).ok()?;
    Some(Decoded {
        ts_ms,
        priority,
        wall_plausible: flags & 1 == 1,
        odo_ms,
        topic,
        payload: v.get(HEADER + topic_len..)?,
    })
}

/// Format 1 (before the odometer): `ts_ms u64 | priority u8 | topic length u16 | topic |
/// payload`. `(ts_ms, priority, topic, payload)`, or `None` for bytes it did not write.
fn decode_v1(v: &[u8]) -> Option<(u64, u8, &str, &[u8])> {
    let ts = u64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let priority = *v.get(8)?;
    let topic_len = u16::from_le_bytes(v.get(9..11)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(v.get(11..11 + topic_len)?).ok()?;
    Some((ts, priority, topic, v.get(11 + topic_len..)?))
}

fn record_size(value_len: usize) -> u64 {
    value_len as u64 + RECORD_OVERHEAD
}

/// What a failed redb operation means for the outbox.
#[derive(Debug)]
enum Fault {
    /// The file could not be read or written (ENOSPC and other I/O errors, or redb refusing
    /// after one): close it and reopen.
    Storage { no_space: bool, message: String },
    /// Anything else (a value it cannot read, a bug): this batch fails, the file stays open.
    Other { op: &'static str, message: String },
}

impl Fault {
    fn of(op: &'static str, e: impl Into<redb::Error>) -> Fault {
        match e.into() {
            redb::Error::Io(io) => Fault::Storage {
                no_space: io.kind() == std::io::ErrorKind::StorageFull
                    || io.kind() == std::io::ErrorKind::QuotaExceeded
                    || crate::disk::is_no_space(&io.to_string()),
                message: io.to_string(),
            },
            e @ (redb::Error::PreviousIo | redb::Error::Backend(_)) => {
                let message = e.to_string();
                Fault::Storage {
                    no_space: crate::disk::is_no_space(&message),
                    message,
                }
            }
            e => Fault::Other {
                op,
                message: e.to_string(),
            },
        }
    }

    /// What producers are told.
    fn error(&self, path: &Path) -> OutboxError {
        match self {
            Fault::Storage { no_space: true, .. } => OutboxError::NoSpace {
                path: path.to_path_buf(),
            },
            Fault::Storage { message, .. } => OutboxError::Unavailable {
                reason: message.clone(),
            },
            Fault::Other { op, message } => OutboxError::Io {
                op,
                message: message.clone(),
            },
        }
    }
}

fn open_error(path: &Path) -> impl Fn(String) -> OutboxError + '_ {
    move |message| OutboxError::Open {
        path: path.to_path_buf(),
        message,
    }
}

/// What the file holds, counted once when it is opened (and again after a reopen).
struct Loaded {
    streams: BTreeMap<String, StreamInfo>,
    enqueued: u64,
    delivered: u64,
    dropped: [u64; 4],
    next_seq: u64,
    next_stream: u32,
}

/// Counts what each stream holds; also the largest odometer reading of a format-2 record.
fn scan<N, R>(
    names: &N,
    records: &R,
    format: Format,
) -> Result<(BTreeMap<String, StreamInfo>, u64), redb::Error>
where
    N: ReadableTable<&'static str, u32>,
    R: ReadableTable<u128, &'static [u8]>,
{
    let mut streams = BTreeMap::new();
    let mut max_odo = 0;
    for entry in names.iter()? {
        let (name, id) = entry?;
        let id = id.value();
        let mut info = StreamInfo {
            id,
            priority: 9,
            records: 0,
            bytes: 0,
            head: 0,
            tail: 0,
            head_odo: 0,
        };
        for r in records.range(key(id, 0)..=key(id, u64::MAX))? {
            let (k, v) = r?;
            let seq = seq_of(k.value());
            let v = v.value();
            let (priority, odo) = format
                .decode(seq, v)
                .map_or((9, format.legacy_odo), |d| (d.priority, d.odo_ms));
            if seq >= format.v2_from {
                max_odo = max_odo.max(odo);
            }
            if info.records == 0 {
                info.head = seq;
                info.head_odo = odo;
            }
            info.tail = seq;
            info.priority = priority;
            info.records += 1;
            info.bytes += record_size(v.len());
        }
        streams.insert(name.value().to_string(), info);
    }
    Ok((streams, max_odo))
}

fn read_counters<M: ReadableTable<&'static str, u64>>(
    meta: &M,
) -> Result<(u64, u64, [u64; 4]), redb::Error> {
    let get = |k: &str| -> Result<u64, redb::Error> { Ok(meta.get(k)?.map_or(0, |v| v.value())) };
    Ok((
        get(ENQUEUED)?,
        get(DELIVERED)?,
        [
            get(DROP_REASONS[FULL])?,
            get(DROP_REASONS[EXPIRED])?,
            get(DROP_REASONS[TOO_LARGE])?,
            get(DROP_REASONS[DISK])?,
        ],
    ))
}

/// The first open in this process: counts what is stored, settles the record format and the
/// odometer, and writes both back (one commit at start-up).
fn first_load(db: &Database, clock: &dyn Clock) -> Result<(Loaded, Odometer, Format), redb::Error> {
    let txn = db.begin_write()?;
    let out = {
        let records = txn.open_table(RECORDS)?;
        let names = txn.open_table(STREAMS)?;
        let mut meta = txn.open_table(META)?;
        let mut text = txn.open_table(TEXT)?;
        let get =
            |k: &str| -> Result<Option<u64>, redb::Error> { Ok(meta.get(k)?.map(|v| v.value())) };
        let stored_seq = get(NEXT_SEQ)?;
        let next_stream = get(NEXT_STREAM)?.map_or(1, |v| v as u32);
        // First open by this version: everything stored so far is format 1.
        let v2_from = get(FORMAT2_FROM)?.unwrap_or(stored_seq.unwrap_or(0));
        let legacy = get(LEGACY_ODO)?;
        let persisted = (
            text.get(ODO_BOOT)?.map(|v| v.value().to_string()),
            get(ODO_MONO)?,
            get(ODO_VALUE)?,
        );
        let (mut streams, max_odo) = scan(
            &names,
            &records,
            Format {
                v2_from,
                legacy_odo: legacy.unwrap_or(0),
            },
        )?;
        let (mono, boot) = (clock.mono_ms(), clock.boot_id());
        let odometer = match persisted {
            // The same boot (an agent restart): the monotonic clock still counts from it.
            (Some(b), Some(m), Some(o)) if b == boot && m <= mono => Odometer {
                mono_at: m,
                odo_at: o,
            },
            // A new boot: go on from the largest reading known; time powered off is lost.
            (_, _, o) => Odometer {
                mono_at: mono,
                odo_at: o.unwrap_or(0).max(max_odo),
            },
        };
        let odo_now = odometer.at(mono);
        let legacy_odo = legacy.unwrap_or(odo_now);
        if legacy.is_none() {
            for info in streams.values_mut() {
                if info.head < v2_from {
                    info.head_odo = legacy_odo;
                }
            }
        }
        meta.insert(FORMAT2_FROM, v2_from)?;
        meta.insert(LEGACY_ODO, legacy_odo)?;
        meta.insert(ODO_MONO, mono)?;
        meta.insert(ODO_VALUE, odo_now)?;
        text.insert(ODO_BOOT, boot.as_str())?;
        let (enqueued, delivered, dropped) = read_counters(&meta)?;
        let next_seq = stored_seq.unwrap_or_else(|| {
            // A new outbox starts its ids at the clock (microseconds), so that ids keep
            // growing even if the outbox file was lost or deleted: hub consumers de-duplicate
            // by id.
            clock.wall_ms().saturating_mul(1000).max(1)
        });
        (
            Loaded {
                streams,
                enqueued,
                delivered,
                dropped,
                next_seq,
                next_stream,
            },
            odometer,
            Format {
                v2_from,
                legacy_odo,
            },
        )
    };
    txn.commit()?;
    Ok(out)
}

/// Counts what is stored again, after a reopen (format and odometer are known).
fn reload(db: &Database, format: Format, fallback_seq: u64) -> Result<Loaded, redb::Error> {
    let txn = db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    let names = txn.open_table(STREAMS)?;
    let meta = txn.open_table(META)?;
    let (streams, _) = scan(&names, &records, format)?;
    let (enqueued, delivered, dropped) = read_counters(&meta)?;
    Ok(Loaded {
        streams,
        enqueued,
        delivered,
        dropped,
        next_seq: meta.get(NEXT_SEQ)?.map_or(fallback_seq, |v| v.value()),
        next_stream: meta.get(NEXT_STREAM)?.map_or(1, |v| v.value() as u32),
    })
}

impl Outbox {
    /// Opens (or creates) `DIR/outbox.redb` and counts what it holds.
    ///
    /// Fails when the directory or the file cannot be created or read (the agent then stops;
    /// once running, storage failures are retried, not returned).
    pub fn open(
        dir: &Path,
        limits: Limits,
        clock: SharedClock,
    ) -> Result<(Outbox, Writer), OutboxError> {
        Self::open_with(dir, limits, clock, Hooks::default())
    }

    fn open_with(
        dir: &Path,
        limits: Limits,
        clock: SharedClock,
        hooks: Hooks,
    ) -> Result<(Outbox, Writer), OutboxError> {
        let path = dir.join("outbox.redb");
        let at = path.clone();
        let open_err = open_error(&at);
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        let db = (hooks.open)(&path).map_err(|e| open_err(e.to_string()))?;
        set_owner_only(&path).map_err(|e| open_err(e.to_string()))?;
        let (loaded, odometer, format) =
            first_load(&db, clock.as_ref()).map_err(|e| open_err(e.to_string()))?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            path,
            db: RwLock::new(Some(db.clone())),
            streams: Mutex::new(loaded.streams),
            added: watch::channel(0).0,
            enqueued: AtomicU64::new(loaded.enqueued),
            delivered: AtomicU64::new(loaded.delivered),
            dropped: loaded.dropped.map(AtomicU64::new),
            limits,
            clock,
            odometer,
            format,
            condition: Mutex::new(Condition::default()),
            stopping: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            reopen_at_mono: AtomicU64::new(u64::MAX),
        });
        let (tx, rx) = mpsc::channel(QUEUE);
        let mono = shared.clock.mono_ms();
        let mut writer = Writer {
            ops: rx,
            tx: tx.clone(),
            shared: shared.clone(),
            hooks,
            db: Some(db),
            next_seq: loaded.next_seq,
            next_stream: loaded.next_stream,
            pending_acks: Vec::new(),
            reopen_at_mono: 0,
            reopen_backoff: REOPEN_MIN,
            recovered_at_mono: None,
            down_since_mono: 0,
            last_expiry_mono: mono,
            last_disk_mono: None,
            disk_floor: limits.max_bytes.min(DISK_HIGH_FLOOR),
            drop_warnings: [(None, 0); 4],
        };
        // Know the disk before the first record arrives.
        writer.check_disk(mono);
        Ok((
            Outbox {
                ops: tx,
                budget: Arc::new(tokio::sync::Semaphore::new(QUEUED_KIB as usize)),
                shared,
            },
            writer,
        ))
    }

    /// Queues a record and resolves once it is durable, with its id.
    ///
    /// Fails when the record is larger than [`MAX_RECORD_BYTES`] or the byte limit (it is
    /// counted as dropped, reason `too-large`); when it could only be stored by dropping more
    /// important records ([`OutboxError::Full`], [`OutboxError::DiskHigh`]); when the file
    /// cannot be written ([`OutboxError::NoSpace`], [`OutboxError::Unavailable`]: at once while
    /// it is being reopened); or when the agent is stopping ([`OutboxError::Closed`]).
    pub async fn enqueue(&self, record: NewRecord) -> Result<u64, OutboxError> {
        self.submit(record).await?.await
    }

    /// Queues a record and returns at once; the receipt resolves once it is durable. Callers
    /// that must keep their own order (the bus, answering a module in order) submit in order
    /// and await the receipts in order.
    ///
    /// Fails at once while the file is being reopened after an I/O error, with the cause.
    pub async fn submit(&self, record: NewRecord) -> Result<Receipt, OutboxError> {
        if let Some(e) = self.shared.refusal() {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        let kib = (record.payload.len() / 1024 + 1).min(QUEUED_KIB as usize) as u32;
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| self.shared.gone())?;
        self.ops
            .send(Op::Enqueue(record, tx, permit))
            .await
            .map_err(|_| self.shared.gone())?;
        Ok(Receipt {
            rx,
            shared: self.shared.clone(),
        })
    }

    /// The hub acknowledged `first..=last` of `stream`: delete them (in the next commit; kept
    /// until then if the file is being reopened).
    pub async fn ack(&self, stream: &str, first: u64, last: u64) {
        let _ = self
            .ops
            .send(Op::Ack(Ack {
                stream: stream.to_string(),
                first,
                last,
            }))
            .await;
    }

    /// Up to `max_records` records (and about `max_bytes`, at least one record) of `stream`
    /// from sequence `from` on.
    ///
    /// Fails (returns nothing) while the file is being reopened after an I/O error, with the
    /// same error enqueues get; [`Outbox::added`] changes when it is back.
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
        let Some(db) = self.shared.db() else {
            return Err(self.shared.gone());
        };
        let read_err = |e: redb::Error| Fault::of("read", e).error(&self.shared.path);
        let txn = db.begin_read().map_err(|e| read_err(e.into()))?;
        let table = txn.open_table(RECORDS).map_err(|e| read_err(e.into()))?;
        let clock = &self.shared.clock;
        // Timestamps taken before the wall clock was set are corrected once it is.
        let correct = clock
            .wall_is_plausible()
            .then(|| (clock.wall_ms(), self.shared.odo_now()));
        let format = self.shared.format;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for r in table
            .range(key(id, from)..=key(id, u64::MAX))
            .map_err(|e| read_err(e.into()))?
        {
            let (k, v) = r.map_err(|e| read_err(e.into()))?;
            let seq = seq_of(k.value());
            let v = v.value();
            let Some(d) = format.decode(seq, v) else {
                tracing::warn!(seq, stream, "unreadable outbox record skipped");
                continue;
            };
            if !out.is_empty() && (out.len() >= max_records || bytes + v.len() > max_bytes) {
                break;
            }
            bytes += v.len();
            let ts_ms = match correct {
                Some((wall, odo)) if !d.wall_plausible => {
                    wall.saturating_sub(odo.saturating_sub(d.odo_ms))
                }
                _ => d.ts_ms,
            };
            out.push(Record {
                id: seq,
                ts_ms,
                topic: d.topic.to_string(),
                payload: d.payload.to_vec(),
            });
        }
        Ok(out)
    }

    fn stream_id(&self, stream: &str) -> Option<u32> {
        self.shared.streams().get(stream).map(|s| s.id)
    }

    /// What each stream holds now.
    pub fn streams(&self) -> BTreeMap<String, StreamInfo> {
        self.shared.streams().clone()
    }

    /// Changes after every commit that adds records, and when the file is back after a
    /// failure (so that a drain reads again).
    pub fn added(&self) -> watch::Receiver<u64> {
        self.shared.added.subscribe()
    }

    pub fn stats(&self) -> OutboxStats {
        let streams = self.shared.streams();
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

    /// The error every enqueue gets at once now, while the file is being reopened after an
    /// I/O error; `None` when records are accepted (they may still be refused one by one for
    /// room).
    pub fn refusing(&self) -> Option<OutboxError> {
        self.shared.refusal()
    }

    /// `Ok`, or what is wrong and since when: the file closed after an I/O error (records are
    /// refused), else the disk above its watermark (records make room or are refused).
    pub fn health(&self) -> OutboxHealth {
        let c = self.shared.condition();
        if let Some((e, since)) = &c.down {
            let reason = match e {
                OutboxError::NoSpace { .. } => "no space left on device".to_string(),
                e => e.to_string(),
            };
            return OutboxHealth::Degraded {
                reason,
                since_wall_ms: *since,
            };
        }
        if let Some((used, since)) = c.disk_high {
            return OutboxHealth::Degraded {
                reason: format!(
                    "disk {used}% full, above the {}% high watermark: the outbox stops growing (it keeps taking records up to {} KiB)",
                    self.shared.limits.disk_high_percent,
                    self.shared.limits.max_bytes.min(DISK_HIGH_FLOOR) / 1024
                ),
                since_wall_ms: since,
            };
        }
        OutboxHealth::Ok
    }
}

/// What one commit changes, applied to the shared view only once it is durable.
struct Batch {
    streams: BTreeMap<String, StreamInfo>,
    next_seq: u64,
    next_stream: u32,
    enqueued: u64,
    delivered: u64,
    dropped: [u64; 4],
    replies: Vec<(Reply, Result<u64, OutboxError>)>,
    added: bool,
    /// Records dropped for room in this commit, by reason (for the warnings).
    made_room: [u64; 4],
    disk_used: Option<u8>,
}

/// A commit that failed: what went wrong, and the replies still owed.
struct Failed {
    fault: Fault,
    replies: Vec<Reply>,
}

/// An enqueue waiting for the writer.
type Pending = (NewRecord, Reply, tokio::sync::OwnedSemaphorePermit);

impl Writer {
    /// Runs the writer on a thread of its own until `stop` is cancelled; what was submitted
    /// but not committed by then is answered with [`OutboxError::Closed`].
    pub async fn run(self, stop: CancellationToken) {
        let tx = self.tx.clone();
        let shared = self.shared.clone();
        let thread = match self.spawn() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the outbox writer thread");
                shared.condition().down = Some((
                    OutboxError::Unavailable {
                        reason: format!("the writer thread could not start: {e}"),
                    },
                    shared.clock.wall_ms(),
                ));
                return;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut woken_for = u64::MAX;
        loop {
            let reopen_at = shared.reopen_at_mono.load(Ordering::Relaxed);
            let wake = (reopen_at != u64::MAX && reopen_at != woken_for)
                .then(|| shared.clock.instant_at(reopen_at));
            tokio::select! {
                _ = stop.cancelled() => break,
                // A full queue means the writer is busy: it sees the next tick.
                _ = tick.tick() => { let _ = tx.try_send(Op::Tick); }
                _ = sleep_until(wake) => {
                    woken_for = reopen_at;
                    let _ = tx.try_send(Op::Tick);
                }
            }
        }
        shared.stopping.store(true, Ordering::Relaxed);
        let _ = tx.send(Op::Stop).await;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }

    fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        // Inside the runtime's context, a clock that follows the runtime's time (a test's
        // paused clock) reads the same time on this thread as on the runtime's.
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn(move || {
                let _context = runtime.as_ref().map(|h| h.enter());
                self.thread_main();
            })
    }

    fn thread_main(mut self) {
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
            if self.handle(ops) {
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
        self.shared.set_db(None);
    }

    /// Carries out one group of operations; true when told to stop.
    fn handle(&mut self, ops: Vec<Op>) -> bool {
        let mut enqueues = Vec::new();
        let mut acks = Vec::new();
        let (mut tick, mut stop) = (false, false);
        #[cfg(test)]
        let mut expire_now = false;
        #[cfg(not(test))]
        let expire_now = false;
        #[cfg(test)]
        let mut syncs = Vec::new();
        for op in ops {
            match op {
                Op::Enqueue(r, reply, permit) => enqueues.push((r, reply, permit)),
                Op::Ack(a) => acks.push(a),
                Op::Tick => tick = true,
                #[cfg(test)]
                Op::Expire => expire_now = true,
                #[cfg(test)]
                Op::Sync(done) => syncs.push(done),
                Op::Stop => stop = true,
            }
        }
        self.carry_out(enqueues, acks, tick, expire_now);
        #[cfg(test)]
        for done in syncs {
            let _ = done.send(());
        }
        stop
    }

    fn carry_out(&mut self, enqueues: Vec<Pending>, acks: Vec<Ack>, tick: bool, expire_now: bool) {
        let mut expire_now = expire_now;
        let mono = self.shared.clock.mono_ms();
        if self.db.is_none() && tick && mono >= self.reopen_at_mono {
            self.reopen(mono);
        }
        if self.db.is_none() {
            let refusal = self.shared.gone();
            for (_, reply, _) in enqueues {
                let _ = reply.send(Err(refusal.clone()));
            }
            self.keep_acks(acks);
            return;
        }
        let disk_stale = self
            .last_disk_mono
            .is_none_or(|at| mono.saturating_sub(at) >= DISK_EVERY_MS);
        if disk_stale && (tick || !enqueues.is_empty()) {
            self.check_disk(mono);
        }
        if tick && mono.saturating_sub(self.last_expiry_mono) >= EXPIRY_EVERY_MS {
            self.last_expiry_mono = mono;
            expire_now = true;
        }
        // No idle writes: a tick commits only when a record actually expired.
        let expire = expire_now && self.anything_expired();
        let mut all_acks = std::mem::take(&mut self.pending_acks);
        all_acks.extend(acks);
        if enqueues.is_empty() && all_acks.is_empty() && !expire {
            return;
        }
        match self.commit(enqueues, &all_acks, expire) {
            Ok(batch) => self.publish(batch),
            Err(failed) => self.failed(failed, all_acks),
        }
    }

    /// A commit failed: answer its producers, and close the file if it was the storage.
    fn failed(&mut self, failed: Failed, acks: Vec<Ack>) {
        let Failed { fault, replies } = failed;
        let error = fault.error(&self.shared.path);
        match &fault {
            Fault::Storage { .. } => {
                self.go_down(&fault);
                self.keep_acks(acks);
            }
            Fault::Other { .. } => {
                tracing::error!(error = %error, acks = acks.len(), "outbox commit failed; the records were not accepted");
            }
        }
        for reply in replies {
            let _ = reply.send(Err(error.clone()));
        }
    }

    fn keep_acks(&mut self, acks: Vec<Ack>) {
        self.pending_acks.extend(acks);
        if self.pending_acks.len() > PENDING_ACKS_MAX {
            let excess = self.pending_acks.len() - PENDING_ACKS_MAX;
            // Forgetting an acknowledgement only means those records are sent again.
            self.pending_acks.drain(..excess);
        }
    }

    /// Closes the file after an I/O error and plans the reopen.
    fn go_down(&mut self, fault: &Fault) {
        self.db = None;
        self.shared.set_db(None);
        let mono = self.shared.clock.mono_ms();
        let error = fault.error(&self.shared.path);
        let mut c = self.shared.condition();
        let was_down = c.down.is_some();
        // A new outage starts the backoff over, unless it comes soon after the last one ended.
        if !was_down
            && self
                .recovered_at_mono
                .is_none_or(|at| mono.saturating_sub(at) > REOPEN_MAX.as_millis() as u64)
        {
            self.reopen_backoff = REOPEN_MIN;
        }
        self.reopen_at_mono = mono + self.reopen_backoff.as_millis() as u64;
        self.shared
            .reopen_at_mono
            .store(self.reopen_at_mono, Ordering::Relaxed);
        let retry_in = self.reopen_backoff;
        self.reopen_backoff = (self.reopen_backoff * 2).min(REOPEN_MAX);
        let since = c
            .down
            .as_ref()
            .map_or_else(|| self.shared.clock.wall_ms(), |(_, s)| *s);
        c.down = Some((error.clone(), since));
        drop(c);
        if !was_down {
            self.down_since_mono = mono;
        }
        if was_down {
            tracing::debug!(error = %error, retry_in_ms = retry_in.as_millis() as u64, "outbox still cannot be written");
        } else {
            tracing::warn!(error = %error, path = %self.shared.path.display(), retry_in_ms = retry_in.as_millis() as u64,
                "outbox cannot be written: records are refused until the file is reopened");
        }
    }

    /// Opens the file again, counts what it holds, and proves it writable with one commit
    /// (the acknowledgements kept meanwhile and the odometer).
    fn reopen(&mut self, mono: u64) {
        let db = match (self.hooks.open)(&self.shared.path) {
            Ok(db) => Arc::new(db),
            Err(e) => {
                // `DatabaseAlreadyOpen`: a reader still holds the old handle; soon it will not.
                let fault = Fault::of("open", e);
                let fault = match fault {
                    Fault::Other { message, .. } => Fault::Storage {
                        no_space: crate::disk::is_no_space(&message),
                        message,
                    },
                    f => f,
                };
                self.go_down(&fault);
                return;
            }
        };
        let loaded = match reload(&db, self.shared.format, self.next_seq) {
            Ok(l) => l,
            Err(e) => {
                drop(db);
                self.go_down(&Fault::of("read", e));
                return;
            }
        };
        {
            let s = &self.shared;
            let (enqueued, delivered) = (
                s.enqueued.load(Ordering::Relaxed),
                s.delivered.load(Ordering::Relaxed),
            );
            if (enqueued, delivered) != (loaded.enqueued, loaded.delivered) {
                tracing::warn!(
                    enqueued,
                    delivered,
                    file_enqueued = loaded.enqueued,
                    file_delivered = loaded.delivered,
                    "outbox counters differ from the file after reopening; the file's are kept"
                );
            }
            *s.streams() = loaded.streams;
            s.enqueued.store(loaded.enqueued, Ordering::Relaxed);
            s.delivered.store(loaded.delivered, Ordering::Relaxed);
            for (c, v) in s.dropped.iter().zip(loaded.dropped) {
                c.store(v, Ordering::Relaxed);
            }
        }
        self.next_seq = loaded.next_seq;
        self.next_stream = loaded.next_stream;
        self.db = Some(db.clone());
        let acks = std::mem::take(&mut self.pending_acks);
        match self.commit(Vec::new(), &acks, false) {
            Ok(batch) => {
                self.publish(batch);
                self.shared.set_db(Some(db));
                self.shared
                    .reopen_at_mono
                    .store(u64::MAX, Ordering::Relaxed);
                self.recovered_at_mono = Some(mono);
                self.shared.condition().down = None;
                tracing::info!(
                    down_for_ms = mono.saturating_sub(self.down_since_mono),
                    acks = acks.len(),
                    "outbox reopened: records are accepted again"
                );
                self.shared.added.send_modify(|n| *n = n.wrapping_add(1));
            }
            Err(failed) => {
                // Whatever the cause, the file is not usable yet: closed again, retried later.
                drop(db);
                self.go_down(&failed.fault);
                self.keep_acks(acks);
            }
        }
    }

    /// Measures the state directory's filesystem against the watermark (one `statvfs`).
    fn check_disk(&mut self, mono: u64) {
        self.last_disk_mono = Some(mono);
        let high = self.shared.limits.disk_high_percent;
        let used = if high >= 100 {
            None
        } else {
            (self.hooks.disk)(&self.shared.dir).map(|u| u.used_percent())
        };
        let mut c = self.shared.condition();
        match used {
            Some(used) if used > f64::from(high) => {
                let used = used.ceil().min(100.0) as u8;
                match &mut c.disk_high {
                    Some((u, _)) => *u = used,
                    None => {
                        c.disk_high = Some((used, self.shared.clock.wall_ms()));
                        tracing::warn!(used_percent = used, high_percent = high, dir = %self.shared.dir.display(),
                            "disk above the high watermark: the outbox stops growing; the least important streams make room");
                    }
                }
            }
            _ => {
                if c.disk_high.take().is_some() {
                    tracing::info!(
                        high_percent = high,
                        "disk below the high watermark again: the outbox grows again"
                    );
                }
            }
        }
    }

    /// Whether any stream's oldest record is past the age limit (in memory, no transaction).
    fn anything_expired(&self) -> bool {
        let cutoff = self.cutoff();
        self.shared
            .streams()
            .values()
            .any(|i| i.records > 0 && i.head_odo < cutoff)
    }

    /// Records read on the odometer before this are too old.
    fn cutoff(&self) -> u64 {
        self.shared
            .odo_now()
            .saturating_sub(self.shared.limits.max_age.as_millis() as u64)
    }

    /// Says that records were dropped for room: at once the first time, then at most every
    /// [`DROP_WARN_EVERY_MS`] per reason with how many since (a stream into a full outbox would
    /// otherwise log every commit, onto a disk that may be full too).
    fn warn_drops(&mut self, made_room: [u64; 4], disk_used: Option<u8>) {
        let mono = self.shared.clock.mono_ms();
        let limits = self.shared.limits;
        for reason in [FULL, DISK] {
            let (last, since) = &mut self.drop_warnings[reason];
            *since += made_room[reason];
            if *since == 0 || last.is_some_and(|at| mono.saturating_sub(at) < DROP_WARN_EVERY_MS) {
                continue;
            }
            let dropped = std::mem::take(since);
            *last = Some(mono);
            if reason == FULL {
                tracing::warn!(
                    dropped,
                    max_bytes = limits.max_bytes,
                    "outbox full: oldest records of the least important stream dropped"
                );
            } else {
                tracing::warn!(
                    dropped,
                    used_percent = disk_used.unwrap_or(0),
                    high_percent = limits.disk_high_percent,
                    "disk above the high watermark: oldest records of the least important stream dropped"
                );
            }
        }
    }

    fn publish(&mut self, batch: Batch) {
        self.warn_drops(batch.made_room, batch.disk_used);
        let s = &self.shared;
        *s.streams() = batch.streams;
        s.enqueued.store(batch.enqueued, Ordering::Relaxed);
        s.delivered.store(batch.delivered, Ordering::Relaxed);
        for (c, v) in s.dropped.iter().zip(batch.dropped) {
            c.store(v, Ordering::Relaxed);
        }
        s.commits.fetch_add(1, Ordering::Relaxed);
        for (reply, result) in batch.replies {
            let _ = reply.send(result);
        }
        if batch.added {
            s.added.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// One write transaction: acknowledgements, expiry, then each enqueue in order.
    fn commit(
        &mut self,
        enqueues: Vec<Pending>,
        acks: &[Ack],
        expire: bool,
    ) -> Result<Batch, Failed> {
        let s = self.shared.clone();
        let Some(db) = self.db.clone() else {
            return Err(Failed {
                fault: Fault::Storage {
                    no_space: false,
                    message: "the file is closed".into(),
                },
                replies: enqueues.into_iter().map(|(_, r, _)| r).collect(),
            });
        };
        let mut batch = Batch {
            streams: s.streams().clone(),
            next_seq: self.next_seq,
            next_stream: self.next_stream,
            enqueued: s.enqueued.load(Ordering::Relaxed),
            delivered: s.delivered.load(Ordering::Relaxed),
            dropped: [0, 1, 2, 3].map(|i| s.dropped[i].load(Ordering::Relaxed)),
            replies: Vec::new(),
            added: false,
            made_room: [0; 4],
            disk_used: None,
        };
        let disk_high = s.condition().disk_high.map(|(used, _)| used);
        batch.disk_used = disk_high;
        let cutoff = self.cutoff();
        let format = s.format;
        let floor = self.disk_floor;
        // Replies are given only once the transaction is settled: `pending` on commit, and on a
        // failure every producer (those not reached yet included) gets its cause.
        let mut pending = Vec::new();
        let mut current: Option<Reply> = None;
        let mut queue = enqueues.into_iter();
        let result = (|| -> Result<(), Fault> {
            let txn = db.begin_write().map_err(|e| Fault::of("begin", e))?;
            {
                let mut records = txn.open_table(RECORDS).map_err(|e| Fault::of("open", e))?;
                let mut names = txn.open_table(STREAMS).map_err(|e| Fault::of("open", e))?;
                let mut meta = txn.open_table(META).map_err(|e| Fault::of("open", e))?;
                let clock = &s.clock;
                let (wall, mono) = (clock.wall_ms(), clock.mono_ms());
                let odo = s.odometer.at(mono);
                let plausible = clock.wall_is_plausible();
                for ack in acks {
                    if let Some(info) = batch.streams.get_mut(&ack.stream) {
                        batch.delivered += delete_acked(&mut records, info, ack, format)?;
                    }
                }
                if expire {
                    for info in batch.streams.values_mut() {
                        while info.records > 0 && info.head_odo < cutoff {
                            drop_head(&mut records, info, format)?;
                            batch.dropped[EXPIRED] += 1;
                        }
                    }
                }
                let mut total: u64 = batch.streams.values().map(|i| i.bytes).sum();
                let mut made_room = [0u64; 4];
                for (record, reply, _permit) in queue.by_ref() {
                    current = Some(reply);
                    let value = encode(wall, odo, plausible, &record);
                    let size = record_size(value.len());
                    let max = s.limits.max_bytes;
                    let answer = |batch: &mut Batch, current: &mut Option<Reply>, r| {
                        if let Some(reply) = current.take() {
                            batch.replies.push((reply, r));
                        }
                    };
                    if record.payload.len() > MAX_RECORD_BYTES || size > max {
                        batch.dropped[TOO_LARGE] += 1;
                        let limit = max.min(MAX_RECORD_BYTES as u64);
                        let e = OutboxError::TooLarge {
                            size: record.payload.len(),
                            limit,
                        };
                        answer(&mut batch, &mut current, Err(e));
                        continue;
                    }
                    // Room: under the byte limit, and nothing net past the floor while the disk
                    // is high.
                    let need_full = (total + size).saturating_sub(max);
                    let need_disk = match disk_high {
                        Some(_) => (total + size).saturating_sub(floor).min(size),
                        None => 0,
                    };
                    let need = need_full.max(need_disk);
                    if need > 0 {
                        let eligible: u64 = batch
                            .streams
                            .values()
                            .filter(|i| i.records > 0 && i.priority >= record.priority)
                            .map(|i| i.bytes)
                            .sum();
                        if eligible < need {
                            let e = match disk_high {
                                Some(used) if eligible >= need_full => OutboxError::DiskHigh {
                                    used_percent: used,
                                    high_percent: s.limits.disk_high_percent,
                                    priority: record.priority,
                                },
                                _ => OutboxError::Full {
                                    priority: record.priority,
                                    size,
                                    max_bytes: max,
                                },
                            };
                            answer(&mut batch, &mut current, Err(e));
                            continue;
                        }
                        let mut freed = 0u64;
                        while freed < need {
                            let Some(victim) = least_important(&mut batch.streams, record.priority)
                            else {
                                break;
                            };
                            let before = victim.bytes;
                            drop_head(&mut records, victim, format)?;
                            // Counted `full` while the byte limit needed the room, else `disk`.
                            let reason = if freed < need_full { FULL } else { DISK };
                            freed += before - victim.bytes;
                            made_room[reason] += 1;
                        }
                        total -= freed.min(total);
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
                                .map_err(|e| Fault::of("write", e))?;
                            batch
                                .streams
                                .entry(record.stream.clone())
                                .or_insert(StreamInfo {
                                    id,
                                    priority: record.priority,
                                    records: 0,
                                    bytes: 0,
                                    head: seq,
                                    tail: seq,
                                    head_odo: odo,
                                })
                        }
                    };
                    records
                        .insert(key(info.id, seq), value.as_slice())
                        .map_err(|e| Fault::of("write", e))?;
                    if info.records == 0 {
                        info.head = seq;
                        info.head_odo = odo;
                    }
                    info.tail = seq;
                    info.records += 1;
                    info.bytes += size;
                    info.priority = record.priority;
                    total += size;
                    batch.enqueued += 1;
                    batch.added = true;
                    if let Some(reply) = current.take() {
                        pending.push((reply, seq));
                    }
                }
                // Still over the limit (it was lowered since the records came): the oldest
                // records of the least important stream go, whatever their priority.
                while total > s.limits.max_bytes {
                    let Some(info) = least_important(&mut batch.streams, 0) else {
                        break;
                    };
                    let before = info.bytes;
                    drop_head(&mut records, info, format)?;
                    total -= (before - info.bytes).min(total);
                    made_room[FULL] += 1;
                }
                batch.made_room = made_room;
                batch.dropped[FULL] += made_room[FULL];
                batch.dropped[DISK] += made_room[DISK];
                let w = |e| Fault::of("write", e);
                meta.insert(NEXT_SEQ, batch.next_seq).map_err(w)?;
                meta.insert(NEXT_STREAM, u64::from(batch.next_stream))
                    .map_err(w)?;
                meta.insert(ENQUEUED, batch.enqueued).map_err(w)?;
                meta.insert(DELIVERED, batch.delivered).map_err(w)?;
                for (reason, n) in DROP_REASONS.iter().zip(batch.dropped) {
                    meta.insert(*reason, n).map_err(w)?;
                }
                // The odometer's base rides along with every commit (same boot as at open).
                meta.insert(ODO_MONO, mono).map_err(w)?;
                meta.insert(ODO_VALUE, odo).map_err(w)?;
            }
            txn.commit().map_err(|e| Fault::of("commit", e))
        })();
        match result {
            Ok(()) => {
                self.next_seq = batch.next_seq;
                self.next_stream = batch.next_stream;
                batch
                    .replies
                    .extend(pending.into_iter().map(|(r, seq)| (r, Ok(seq))));
                Ok(batch)
            }
            Err(fault) => {
                let mut replies: Vec<_> = pending.into_iter().map(|(r, _)| r).collect();
                replies.extend(current);
                replies.extend(queue.map(|(_, r, _)| r));
                replies.extend(batch.replies.into_iter().map(|(r, _)| r));
                Err(Failed { fault, replies })
            }
        }
    }
}

/// The stream that gives up its oldest record when room is needed for a record of priority
/// `at_least`: the least important of those not more important than it (the highest number),
/// and among equals the one whose oldest record is oldest.
fn least_important(
    streams: &mut BTreeMap<String, StreamInfo>,
    at_least: u8,
) -> Option<&mut StreamInfo> {
    streams
        .values_mut()
        .filter(|i| i.records > 0 && i.priority >= at_least)
        .max_by_key(|i| (i.priority, std::cmp::Reverse(i.head)))
}

/// Deletes what the hub acknowledged of one stream; how many records that was.
fn delete_acked(
    records: &mut redb::Table<u128, &[u8]>,
    info: &mut StreamInfo,
    ack: &Ack,
    format: Format,
) -> Result<u64, Fault> {
    let mut removed = 0u64;
    let mut freed = 0u64;
    // One range of this stream's keys: sequences are shared by all streams, so `first..=last`
    // may span many ids of others.
    for entry in records
        .extract_from_if(key(info.id, ack.first)..=key(info.id, ack.last), |_, _| {
            true
        })
        .map_err(|e| Fault::of("delete", e))?
    {
        let (_, v) = entry.map_err(|e| Fault::of("delete", e))?;
        removed += 1;
        freed += record_size(v.value().len());
    }
    info.records -= removed.min(info.records);
    info.bytes -= freed.min(info.bytes);
    refresh_head(records, info, format)?;
    Ok(removed)
}

fn drop_head(
    records: &mut redb::Table<u128, &[u8]>,
    info: &mut StreamInfo,
    format: Format,
) -> Result<(), Fault> {
    let first = records
        .range(key(info.id, info.head)..=key(info.id, u64::MAX))
        .map_err(|e| Fault::of("read", e))?
        .next()
        .transpose()
        .map_err(|e| Fault::of("read", e))?
        .map(|(k, v)| (k.value(), v.value().len()));
    match first {
        Some((k, len)) => {
            records.remove(k).map_err(|e| Fault::of("delete", e))?;
            info.records -= 1.min(info.records);
            info.bytes -= record_size(len).min(info.bytes);
        }
        None => {
            info.records = 0;
            info.bytes = 0;
        }
    }
    refresh_head(records, info, format)
}

fn refresh_head(
    records: &redb::Table<u128, &[u8]>,
    info: &mut StreamInfo,
    format: Format,
) -> Result<(), Fault> {
    if info.records == 0 {
        info.bytes = 0;
        return Ok(());
    }
    let first = records
        .range(key(info.id, 0)..=key(info.id, u64::MAX))
        .map_err(|e| Fault::of("read", e))?
        .next()
        .transpose()
        .map_err(|e| Fault::of("read", e))?;
    if let Some((k, v)) = first {
        let seq = seq_of(k.value());
        info.head = seq;
        info.head_odo = format.odo_of(seq, v.value());
    }
    Ok(())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn set_owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Storage that fails on demand under redb, for tests of what the outbox does after an I/O
/// error without filling a real disk (`agent/tests/outbox_disk.rs` does that).
#[cfg(test)]
pub(crate) mod testing {
    use std::ops::Bound;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, Database, StorageBackend};

    use super::{Hooks, Limits, Outbox, OutboxError, Writer};
    use crate::clock::SharedClock;

    /// A file whose writes fail with ENOSPC while `full` is set.
    #[derive(Debug)]
    struct Failing {
        inner: FileBackend,
        full: Arc<AtomicBool>,
    }

    impl Failing {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            Ok(())
        }
    }

    impl StorageBackend for Failing {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), std::io::Error> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }

    /// The switch that fills the "disk", and how many times the file was opened.
    #[derive(Clone, Default)]
    pub(crate) struct Switch {
        pub full: Arc<AtomicBool>,
        pub opens: Arc<AtomicU32>,
    }

    /// An outbox whose file fails its writes while `switch.full` is set.
    pub(crate) fn open_failing(
        dir: &Path,
        limits: Limits,
        clock: SharedClock,
        switch: &Switch,
    ) -> Result<(Outbox, Writer), OutboxError> {
        let s = switch.clone();
        let hooks = Hooks {
            open: Arc::new(move |path: &Path| {
                s.opens.fetch_add(1, Ordering::SeqCst);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)?;
                let backend = Failing {
                    inner: FileBackend::new(file)?,
                    full: s.full.clone(),
                };
                Database::builder().create_with_backend(backend)
            }),
            ..Hooks::default()
        };
        Outbox::open_with(dir, limits, clock, hooks)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use super::testing::{Switch, open_failing};
    use super::*;
    use crate::clock::{FakeClock, PLAUSIBLE_AFTER_MS};

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);

    fn rec(stream: &str, priority: u8, n: usize) -> NewRecord {
        NewRecord {
            stream: stream.into(),
            priority,
            topic: "modules/m/outputs/x".into(),
            payload: format!("{n:0200}").into_bytes(),
        }
    }

    /// The counted size of one `rec`.
    fn one() -> u64 {
        record_size(encode(0, 0, true, &rec("s", 9, 0)).len())
    }

    fn limits(max_bytes: u64, max_age: Duration) -> Limits {
        Limits {
            max_bytes,
            max_age,
            disk_high_percent: 100,
        }
    }

    const ROOMY: Limits = Limits {
        max_bytes: 1 << 30,
        max_age: HOUR,
        disk_high_percent: 100,
    };

    /// A clock set to a plausible time (wall clocks in 1970 are set where a test is about them).
    fn plausible_clock() -> Arc<FakeClock> {
        Arc::new(FakeClock::new(PLAUSIBLE_AFTER_MS + 86_400_000, 50_000))
    }

    /// An outbox whose writer thread runs without the ticking task: the test sends the ticks.
    struct Running {
        outbox: Outbox,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(dir: &Path, limits: Limits, clock: &Arc<FakeClock>) -> Running {
            let (outbox, writer) = Outbox::open(dir, limits, clock.clone()).unwrap();
            Running::with(outbox, writer)
        }

        fn with(outbox: Outbox, writer: Writer) -> Running {
            Running {
                outbox,
                thread: Some(writer.spawn().unwrap()),
            }
        }

        /// Sends `op` and waits until the writer has handled it.
        async fn send(&self, op: Op) {
            self.outbox.ops.send(op).await.unwrap();
            let (tx, rx) = oneshot::channel();
            self.outbox.ops.send(Op::Sync(tx)).await.unwrap();
            rx.await.unwrap();
        }

        async fn tick(&self) {
            self.send(Op::Tick).await;
        }

        async fn expire(&self) {
            self.send(Op::Expire).await;
        }

        async fn ack(&self, stream: &str, first: u64, last: u64) {
            self.outbox.ack(stream, first, last).await;
            let (tx, rx) = oneshot::channel();
            self.outbox.ops.send(Op::Sync(tx)).await.unwrap();
            rx.await.unwrap();
        }

        fn commits(&self) -> u64 {
            self.outbox.shared.commits.load(Ordering::Relaxed)
        }

        async fn stop(mut self) {
            self.outbox.shared.stopping.store(true, Ordering::Relaxed);
            self.outbox.ops.send(Op::Stop).await.unwrap();
            if let Some(t) = self.thread.take() {
                tokio::task::spawn_blocking(move || t.join().unwrap())
                    .await
                    .unwrap();
            }
        }
    }

    fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.payload.clone()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn records_survive_reopen_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let clock = plausible_clock();
        let run = Running::start(dir.path(), ROOMY, &clock);
        let mut ids = Vec::new();
        for n in 0..50 {
            let stream = if n % 2 == 0 { "a" } else { "b" };
            ids.push(run.outbox.enqueue(rec(stream, 5, n)).await.unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
        let a = run.outbox.read("a", 0, 10, 1 << 20).unwrap();
        assert_eq!(a.len(), 10);
        run.ack("a", a[0].id, a[9].id).await;
        run.stop().await;

        let run = Running::start(dir.path(), ROOMY, &clock);
        let a = run.outbox.read("a", 0, 100, 1 << 20).unwrap();
        assert_eq!(a.len(), 15, "10 of 25 acknowledged");
        assert!(a.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(a[0].payload, rec("a", 5, 20).payload);
        let stats = run.outbox.stats();
        assert_eq!(stats.records, 15 + 25);
        assert_eq!((stats.enqueued_total, stats.delivered_total), (50, 10));
        let next = run.outbox.enqueue(rec("a", 5, 99)).await.unwrap();
        assert!(
            next > *ids.last().unwrap(),
            "ids do not repeat after a restart"
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn full_outbox_drops_oldest_of_least_important_stream_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let limits = limits(one() * 10, HOUR);
        let run = Running::start(dir.path(), limits, &plausible_clock());
        let outbox = &run.outbox;
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
            payload: vec![0; (one() * 11) as usize],
            ..rec("high", 1, 0)
        };
        assert!(matches!(
            outbox.enqueue(too_big).await,
            Err(OutboxError::TooLarge { .. })
        ));
        assert_eq!(outbox.stats().dropped_total["too-large"], 1);
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_that_could_only_push_out_more_important_ones_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let run = Running::start(dir.path(), limits(one() * 10, HOUR), &plausible_clock());
        let outbox = &run.outbox;
        for n in 0..10 {
            outbox.enqueue(rec("alerts", 1, n)).await.unwrap();
        }
        let refused = outbox.enqueue(rec("metrics", 9, 0)).await;
        assert!(
            matches!(refused, Err(OutboxError::Full { priority: 9, .. })),
            "{refused:?}"
        );
        assert_eq!(
            refused.unwrap_err().to_string().split(" (").next(),
            Some("outbox full of more important streams")
        );
        let stats = outbox.stats();
        assert_eq!((stats.records, stats.dropped_total["full"]), (10, 0));
        // An alert still makes room among its own kind: the oldest goes.
        outbox.enqueue(rec("alerts", 1, 10)).await.unwrap();
        let alerts = outbox.read("alerts", 0, 100, 1 << 20).unwrap();
        assert_eq!(alerts[0].payload, rec("alerts", 1, 1).payload);
        assert_eq!(outbox.stats().dropped_total["full"], 1);
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_jump_does_not_expire_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        // A device without a real-time clock: 1970 at boot.
        let clock = Arc::new(FakeClock::new(1_000, 8_000));
        let run = Running::start(dir.path(), ROOMY, &clock);
        for n in 0..59 {
            run.outbox.enqueue(rec("readings", 5, n)).await.unwrap();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // NTP answers: 56 years later.
        clock.set_wall(PLAUSIBLE_AFTER_MS + 10 * 86_400_000);
        let jumped_at = clock.wall_ms();
        run.tick().await;
        run.expire().await;
        let stats = run.outbox.stats();
        assert_eq!(stats.records, 59, "nothing dropped by the jump");
        assert_eq!(stats.dropped_total["expired"], 0);
        // The hub does not see 1970: each timestamp is now minus the record's age.
        let read = run.outbox.read("readings", 0, 100, 1 << 20).unwrap();
        for (n, r) in read.iter().enumerate() {
            assert_eq!(r.ts_ms, jumped_at - (59 - n as u64) * 1000, "record {n}");
        }
        // Records taken with a plausible clock keep their own time.
        let id = run.outbox.enqueue(rec("readings", 5, 59)).await.unwrap();
        let last = run.outbox.read("readings", id, 1, 1 << 20).unwrap();
        assert_eq!(last[0].ts_ms, jumped_at);
        // An hour of uptime later the first 59 are too old; the one after the jump is not.
        tokio::time::advance(HOUR).await;
        run.expire().await;
        let stats = run.outbox.stats();
        assert_eq!(stats.dropped_total["expired"], 59);
        assert_eq!(stats.records, 1);
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn age_counts_uptime_across_reboots_not_time_powered_off() {
        let dir = tempfile::tempdir().unwrap();
        let wall = PLAUSIBLE_AFTER_MS + 86_400_000;
        let boot1 = Arc::new(FakeClock::new(wall, 50_000));
        let run = Running::start(dir.path(), ROOMY, &boot1);
        run.outbox.enqueue(rec("a", 5, 0)).await.unwrap();
        tokio::time::advance(40 * MIN).await;
        run.outbox.enqueue(rec("a", 5, 1)).await.unwrap();
        run.stop().await;

        // Ten hours powered off; the monotonic clock starts again near zero in a new boot.
        let boot2 = Arc::new(FakeClock::new(wall + 40 * 60_000 + 10 * 3_600_000, 2_000));
        boot2.reboot("boot-2");
        let run = Running::start(dir.path(), ROOMY, &boot2);
        tokio::time::advance(15 * MIN).await;
        run.expire().await;
        assert_eq!(run.outbox.stats().records, 2, "55 minutes of uptime: kept");
        tokio::time::advance(10 * MIN).await;
        run.expire().await;
        let left = run.outbox.read("a", 0, 10, 1 << 20).unwrap();
        assert_eq!(
            payloads(&left),
            vec![rec("a", 5, 1).payload],
            "65 minutes: the first went"
        );
        run.stop().await;

        // An agent restart in the same boot: the odometer goes on exactly.
        tokio::time::advance(20 * MIN).await;
        let run = Running::start(dir.path(), ROOMY, &boot2);
        run.expire().await;
        assert_eq!(run.outbox.stats().records, 1, "45 minutes: kept");
        tokio::time::advance(16 * MIN).await;
        run.expire().await;
        let stats = run.outbox.stats();
        assert_eq!((stats.records, stats.dropped_total["expired"]), (0, 2));
        run.stop().await;
    }

    /// Writes an outbox the way the version before the odometer did.
    fn write_format1(path: &Path) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            let mut names = txn.open_table(STREAMS).unwrap();
            let mut meta = txn.open_table(META).unwrap();
            names.insert("old", 1).unwrap();
            for seq in 100..103u64 {
                let mut v = Vec::new();
                v.extend_from_slice(&5_000u64.to_le_bytes());
                v.push(4);
                v.extend_from_slice(&1u16.to_le_bytes());
                v.extend_from_slice(b"t");
                v.extend_from_slice(format!("old-{seq}").as_bytes());
                records.insert(key(1, seq), v.as_slice()).unwrap();
            }
            meta.insert(NEXT_SEQ, 103).unwrap();
            meta.insert(NEXT_STREAM, 2).unwrap();
            meta.insert(ENQUEUED, 7).unwrap();
            meta.insert(DELIVERED, 4).unwrap();
            meta.insert("full", 0).unwrap();
            meta.insert("expired", 0).unwrap();
            meta.insert("too-large", 0).unwrap();
        }
        txn.commit().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn records_of_the_previous_format_are_read_and_aged_from_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        write_format1(&dir.path().join("outbox.redb"));
        let clock = plausible_clock();
        let run = Running::start(dir.path(), ROOMY, &clock);
        let old = run.outbox.read("old", 0, 10, 1 << 20).unwrap();
        assert_eq!(old.len(), 3);
        assert_eq!(
            (old[0].id, old[0].ts_ms, old[0].topic.as_str()),
            (100, 5_000, "t")
        );
        assert_eq!(old[2].payload, b"old-102");
        let stats = run.outbox.stats();
        assert_eq!(
            (stats.records, stats.enqueued_total, stats.delivered_total),
            (3, 7, 4)
        );
        // Though their timestamps say 1970, nothing is dropped for the upgrade.
        run.expire().await;
        assert_eq!(run.outbox.stats().dropped_total["expired"], 0);
        tokio::time::advance(30 * MIN).await;
        let id = run.outbox.enqueue(rec("old", 4, 0)).await.unwrap();
        assert_eq!(id, 103, "the sequence goes on");
        assert_eq!(run.outbox.read("old", 0, 10, 1 << 20).unwrap().len(), 4);
        tokio::time::advance(29 * MIN).await;
        run.expire().await;
        assert_eq!(
            run.outbox.stats().records,
            4,
            "59 minutes since the upgrade: kept"
        );
        run.stop().await;

        // A restart does not move the upgrade's reading: an hour after it, the old ones go.
        let run = Running::start(dir.path(), ROOMY, &clock);
        tokio::time::advance(2 * MIN).await;
        run.expire().await;
        let left = run.outbox.read("old", 0, 10, 1 << 20).unwrap();
        assert_eq!(left.iter().map(|r| r.id).collect::<Vec<_>>(), [103]);
        assert_eq!(run.outbox.stats().dropped_total["expired"], 3);
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn idle_ticks_do_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let clock = plausible_clock();
        let limits = Limits {
            disk_high_percent: 90,
            ..limits(1 << 20, HOUR)
        };
        let used = Arc::new(AtomicU8::new(40));
        let (outbox, writer) =
            Outbox::open_with(dir.path(), limits, clock.clone(), disk_at(&used)).unwrap();
        let run = Running::with(outbox, writer);
        run.outbox.enqueue(rec("a", 5, 0)).await.unwrap();
        let (commits, modified) = (
            run.commits(),
            std::fs::metadata(&path).unwrap().modified().unwrap(),
        );
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            run.tick().await;
        }
        assert_eq!(
            run.commits(),
            commits,
            "30 s of ticks, nothing expired: no commit"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );
        tokio::time::advance(HOUR).await;
        run.tick().await;
        assert_eq!(run.commits(), commits + 1, "a record expired: one commit");
        assert_eq!(run.outbox.stats().dropped_total["expired"], 1);
        run.stop().await;
    }

    /// A disk whose usage the test sets.
    fn disk_at(used: &Arc<AtomicU8>) -> Hooks {
        let used = used.clone();
        Hooks {
            disk: Arc::new(move |_: &Path| {
                let u = u64::from(used.load(Ordering::SeqCst));
                Some(DiskUsage {
                    total_bytes: 100,
                    available_bytes: 100 - u,
                })
            }),
            ..Hooks::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_disk_watermark_the_least_important_make_room_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let used = Arc::new(AtomicU8::new(50));
        let limits = Limits {
            disk_high_percent: 90,
            ..ROOMY
        };
        let clock = plausible_clock();
        let (outbox, mut writer) =
            Outbox::open_with(dir.path(), limits, clock.clone(), disk_at(&used)).unwrap();
        // The shedding order, without the working floor (tested below).
        writer.disk_floor = 0;
        let run = Running::with(outbox, writer);
        let outbox = &run.outbox;
        for n in 0..4 {
            outbox.enqueue(rec("bulk", 9, n)).await.unwrap();
        }
        for n in 0..2 {
            outbox.enqueue(rec("mid", 5, n)).await.unwrap();
        }
        for n in 0..3 {
            outbox.enqueue(rec("alerts", 1, n)).await.unwrap();
        }
        assert_eq!(outbox.health(), OutboxHealth::Ok);

        used.store(95, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(2)).await;
        run.tick().await;
        let OutboxHealth::Degraded { reason, .. } = outbox.health() else {
            panic!("degraded above the watermark");
        };
        assert!(
            reason.contains("95% full, above the 90% high watermark"),
            "{reason}"
        );
        let bytes = outbox.stats().bytes;

        // More important records make room from the least important stream, oldest first.
        outbox.enqueue(rec("alerts", 1, 3)).await.unwrap();
        outbox.enqueue(rec("mid", 5, 2)).await.unwrap();
        // A record of the least important stream replaces its own oldest.
        outbox.enqueue(rec("bulk", 9, 4)).await.unwrap();
        let bulk = outbox.read("bulk", 0, 10, 1 << 20).unwrap();
        assert_eq!(
            payloads(&bulk),
            [rec("bulk", 9, 3).payload, rec("bulk", 9, 4).payload]
        );
        assert_eq!(outbox.stats().bytes, bytes, "the outbox did not grow");
        assert_eq!(outbox.stats().dropped_total["disk"], 3);

        // With bulk gone, the next least important stream (mid) makes room for alerts ...
        for n in 4..7 {
            outbox.enqueue(rec("alerts", 1, n)).await.unwrap();
        }
        assert!(outbox.read("bulk", 0, 10, 1 << 20).unwrap().is_empty());
        assert_eq!(outbox.read("mid", 0, 10, 1 << 20).unwrap().len(), 2);
        // ... but nothing less important than metrics is left: refused, nothing dropped.
        let refused = outbox.enqueue(rec("metrics", 9, 0)).await;
        assert!(
            matches!(
                refused,
                Err(OutboxError::DiskHigh {
                    used_percent: 95,
                    high_percent: 90,
                    priority: 9
                })
            ),
            "{refused:?}"
        );
        let stats = outbox.stats();
        assert_eq!((stats.bytes, stats.dropped_total["disk"]), (bytes, 6));

        // Room again: the outbox grows again, nothing dropped.
        used.store(60, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(2)).await;
        run.tick().await;
        assert_eq!(outbox.health(), OutboxHealth::Ok);
        outbox.enqueue(rec("metrics", 9, 1)).await.unwrap();
        let stats = outbox.stats();
        assert_eq!(
            (stats.bytes, stats.dropped_total["disk"]),
            (bytes + one(), 6)
        );
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_disk_watermark_a_small_outbox_still_takes_records() {
        let dir = tempfile::tempdir().unwrap();
        let used = Arc::new(AtomicU8::new(97));
        let limits = Limits {
            disk_high_percent: 90,
            ..ROOMY
        };
        let (outbox, mut writer) =
            Outbox::open_with(dir.path(), limits, plausible_clock(), disk_at(&used)).unwrap();
        writer.disk_floor = one() * 3;
        let run = Running::with(outbox, writer);
        let outbox = &run.outbox;
        // The disk is full of something else: a connected device keeps streaming ...
        for n in 0..3 {
            outbox.enqueue(rec("metrics", 9, n)).await.unwrap();
        }
        assert_eq!(outbox.stats().dropped_total["disk"], 0);
        // ... but a backlog does not grow past the floor.
        outbox.enqueue(rec("metrics", 9, 3)).await.unwrap();
        let stats = outbox.stats();
        assert_eq!((stats.records, stats.dropped_total["disk"]), (3, 1));
        run.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_io_error_the_file_is_reopened_and_counts_stay_right() {
        let dir = tempfile::tempdir().unwrap();
        let clock = plausible_clock();
        let switch = Switch::default();
        let (outbox, writer) = open_failing(dir.path(), ROOMY, clock.clone(), &switch).unwrap();
        let run = Running::with(outbox, writer);
        let outbox = run.outbox.clone();
        let mut added = outbox.added();
        for n in 0..5 {
            outbox.enqueue(rec("a", 5, n)).await.unwrap();
        }
        let sent = outbox.read("a", 0, 3, 1 << 20).unwrap();
        run.ack("a", sent[0].id, sent[1].id).await;

        switch.full.store(true, Ordering::SeqCst);
        let failed = outbox.enqueue(rec("a", 5, 5)).await;
        assert!(
            matches!(failed, Err(OutboxError::NoSpace { .. })),
            "{failed:?}"
        );
        assert!(
            failed
                .unwrap_err()
                .to_string()
                .starts_with("no space left on the device holding"),
        );
        let OutboxHealth::Degraded {
            reason,
            since_wall_ms,
        } = outbox.health()
        else {
            panic!("degraded while the file is closed");
        };
        assert_eq!(
            (reason.as_str(), since_wall_ms),
            ("no space left on device", clock.wall_ms())
        );
        // Refused at once, without waiting for the writer; reads return nothing.
        assert!(matches!(
            outbox.submit(rec("a", 5, 6)).await,
            Err(OutboxError::NoSpace { .. })
        ));
        assert!(matches!(
            outbox.read("a", 0, 10, 1 << 20),
            Err(OutboxError::NoSpace { .. })
        ));
        // The hub acknowledged a batch meanwhile: kept for when the file is back.
        run.ack("a", sent[2].id, sent[2].id).await;

        // Still full: tries after 1 s, then waits 2 s.
        added.borrow_and_update();
        let opens = || switch.opens.load(Ordering::SeqCst);
        assert_eq!(opens(), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        run.tick().await;
        assert_eq!(opens(), 2, "first attempt after 1 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        run.tick().await;
        assert_eq!(opens(), 2, "backoff doubled");
        assert!(matches!(outbox.health(), OutboxHealth::Degraded { .. }));

        // Space is back: reopened on the next attempt, without a restart.
        switch.full.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(1)).await;
        run.tick().await;
        assert_eq!(opens(), 3);
        assert_eq!(outbox.health(), OutboxHealth::Ok);
        assert!(
            added.has_changed().unwrap(),
            "the drain is told to read again"
        );
        outbox.enqueue(rec("a", 5, 7)).await.unwrap();
        let left = outbox.read("a", 0, 10, 1 << 20).unwrap();
        assert_eq!(
            payloads(&left),
            [3, 4, 7].map(|n| rec("a", 5, n).payload),
            "acknowledged while closed: deleted once back"
        );
        let stats = outbox.stats();
        assert_eq!(
            (stats.records, stats.enqueued_total, stats.delivered_total),
            (3, 6, 3)
        );
        run.stop().await;

        // The file says the same.
        let run = Running::start(dir.path(), ROOMY, &clock);
        let again = run.outbox.stats();
        assert_eq!(again, stats);
        run.stop().await;
    }

    #[tokio::test]
    async fn only_a_stopping_agent_is_told_shutting_down() {
        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) = Outbox::open(dir.path(), ROOMY, plausible_clock()).unwrap();
        drop(writer);
        let e = outbox.enqueue(rec("a", 5, 0)).await.unwrap_err();
        assert!(matches!(e, OutboxError::Unavailable { .. }), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let (outbox, writer) = Outbox::open(dir.path(), ROOMY, plausible_clock()).unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(stop.clone()));
        outbox.enqueue(rec("a", 5, 0)).await.unwrap();
        stop.cancel();
        task.await.unwrap();
        let e = outbox.enqueue(rec("a", 5, 1)).await.unwrap_err();
        assert!(matches!(e, OutboxError::Closed), "{e}");
    }

    #[test]
    fn decode_refuses_bytes_it_did_not_write() {
        assert!(decode_v2(&[1, 2, 3]).is_none());
        assert!(decode_v1(&[1, 2, 3]).is_none());
        let v = encode(7, 99, false, &rec("a", 3, 1));
        let d = decode_v2(&v).unwrap();
        assert_eq!(
            (d.ts_ms, d.priority, d.wall_plausible, d.odo_ms, d.topic),
            (7, 3, false, 99, "modules/m/outputs/x")
        );
        assert_eq!(d.payload.len(), 200);
        assert!(decode_v2(&v[..HEADER + 2]).is_none());
    }
}
