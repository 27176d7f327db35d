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
//!
//! Layout: [`Outbox`] (`handle.rs`) is what producers and the drain hold; [`Writer`]
//! (`writer.rs`) owns the write side and carries out each group in one transaction
//! (`commit.rs`); `recovery.rs` closes and reopens the file after an I/O error; `open.rs` opens
//! and counts it; `format.rs` is the file's layout and record encoding; `shared.rs` the state
//! the handle and the writer share; `stats.rs` the counters and health reported.

mod commit;
mod format;
mod handle;
mod open;
mod recovery;
mod shared;
mod stats;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

pub use handle::{Outbox, Receipt};
pub use stats::{DropReason, OutboxStats};
pub use writer::Writer;

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

#[cfg(test)]
pub(crate) mod testing;
