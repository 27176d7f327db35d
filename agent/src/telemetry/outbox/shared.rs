//! The state the handle ([`Outbox`](super::Outbox)) and the writer share: the open database
//! (empty while it is reopened), what each stream holds, the counters, and the condition
//! (closed after an I/O error, disk above the watermark) that producers are told about.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use redb::Database;
use tokio::sync::watch;

use super::format::{Format, Odometer};
use super::{Limits, OutboxError, StreamInfo};
use crate::clock::SharedClock;

/// What the writer is dealing with, for [`Outbox::health`] and for refusing at once.
///
/// [`Outbox::health`]: super::Outbox::health
#[derive(Debug, Default)]
pub(super) struct Condition {
    /// The file is closed after an I/O error: what enqueues are told, and since when.
    pub(super) down: Option<(OutboxError, u64)>,
    /// The disk is above the watermark: percent used, and since when.
    pub(super) disk_high: Option<(u8, u64)>,
}

pub(super) struct Shared {
    /// The state directory (whose filesystem the watermark is about) and the file in it.
    pub(super) dir: PathBuf,
    pub(super) path: PathBuf,
    /// The open database; empty while it is being reopened. Readers clone the handle for one
    /// read and drop it, so the writer's reopen is not blocked by the file lock for long.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    pub(super) streams: Mutex<BTreeMap<String, StreamInfo>>,
    /// Bumped after every commit that added records, and when the file is back after a failure.
    pub(super) added: watch::Sender<u64>,
    pub(super) enqueued: AtomicU64,
    pub(super) delivered: AtomicU64,
    /// One counter per [`DropReason`](super::DropReason), in the order of `DropReason::ALL`.
    pub(super) dropped: [AtomicU64; 4],
    pub(super) limits: Limits,
    pub(super) clock: SharedClock,
    /// Fixed for the life of the process (one boot).
    pub(super) odometer: Odometer,
    pub(super) format: Format,
    pub(super) condition: Mutex<Condition>,
    /// Set when the writer is told to stop: only then is [`OutboxError::Closed`] the truth.
    pub(super) stopping: AtomicBool,
    /// Write transactions committed (to show that idle ticks do not write).
    pub(super) commits: AtomicU64,
    /// When the writer plans to reopen the file (monotonic ms; `u64::MAX`: not planned), so
    /// that the ticking task wakes it then rather than at its next tick.
    pub(super) reopen_at_mono: AtomicU64,
}

impl Shared {
    pub(super) fn condition(&self) -> std::sync::MutexGuard<'_, Condition> {
        // Fields are replaced whole; a poisoned lock holds nothing half-done.
        self.condition.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StreamInfo>> {
        // A panic while holding this lock cannot leave the map half-updated: it is replaced
        // whole after each commit. Recover the guard rather than propagating the poison.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_db(&self, db: Option<Arc<Database>>) {
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = db;
    }

    pub(super) fn db(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What a producer is told while the file is closed, if it is.
    pub(super) fn refusal(&self) -> Option<OutboxError> {
        self.condition().down.as_ref().map(|(e, _)| e.clone())
    }

    /// What a producer is told when its request can no longer reach the writer.
    pub(super) fn gone(&self) -> OutboxError {
        if self.stopping.load(Ordering::Relaxed) {
            return OutboxError::Closed;
        }
        self.refusal().unwrap_or_else(|| OutboxError::Unavailable {
            reason: "the outbox writer is not running".into(),
        })
    }

    pub(super) fn odo_now(&self) -> u64 {
        self.odometer.at(self.clock.mono_ms())
    }
}
