//! Test support: storage that fails on demand under redb, for tests of what the outbox does
//! after an I/O error without filling a real disk (`agent/tests/outbox_disk.rs` does that),
//! and the harness the outbox's unit tests share.

use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, Database, StorageBackend};

use std::sync::atomic::AtomicU8;
use std::time::Duration;

use tokio::sync::oneshot;

use super::format::{encode, record_size};
use super::open::Hooks;
use super::writer::{Op, Writer};
use super::{Limits, NewRecord, Outbox, OutboxError, Record};
use crate::clock::{FakeClock, PLAUSIBLE_AFTER_MS, SharedClock};
use crate::disk::DiskUsage;

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
    fn try_lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
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

// The harness the unit tests share.

pub(super) const MIN: Duration = Duration::from_secs(60);
pub(super) const HOUR: Duration = Duration::from_secs(3600);

pub(super) fn rec(stream: &str, priority: u8, n: usize) -> NewRecord {
    NewRecord {
        stream: stream.into(),
        priority,
        topic: "modules/m/outputs/x".into(),
        payload: format!("{n:0200}").into_bytes(),
    }
}

/// The counted size of one `rec`.
pub(super) fn one() -> u64 {
    record_size(encode(0, 0, true, &rec("s", 9, 0)).len())
}

pub(super) fn limits(max_bytes: u64, max_age: Duration) -> Limits {
    Limits {
        max_bytes,
        max_age,
        disk_high_percent: 100,
    }
}

pub(super) const ROOMY: Limits = Limits {
    max_bytes: 1 << 30,
    max_age: HOUR,
    disk_high_percent: 100,
};

/// A clock set to a plausible time (wall clocks in 1970 are set where a test is about them).
pub(super) fn plausible_clock() -> Arc<FakeClock> {
    Arc::new(FakeClock::new(PLAUSIBLE_AFTER_MS + 86_400_000, 50_000))
}

/// An outbox whose writer thread runs without the ticking task: the test sends the ticks.
pub(super) struct Running {
    pub(super) outbox: Outbox,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    pub(super) fn start(dir: &Path, limits: Limits, clock: &Arc<FakeClock>) -> Running {
        let (outbox, writer) = Outbox::open(dir, limits, clock.clone()).unwrap();
        Running::with(outbox, writer)
    }

    pub(super) fn with(outbox: Outbox, writer: Writer) -> Running {
        Running {
            outbox,
            thread: Some(writer.spawn().unwrap()),
        }
    }

    /// Sends `op` and waits until the writer has handled it.
    pub(super) async fn send(&self, op: Op) {
        self.outbox.ops.send(op).await.unwrap();
        let (tx, rx) = oneshot::channel();
        self.outbox.ops.send(Op::Sync(tx)).await.unwrap();
        rx.await.unwrap();
    }

    pub(super) async fn tick(&self) {
        self.send(Op::Tick).await;
    }

    pub(super) async fn expire(&self) {
        self.send(Op::Expire).await;
    }

    pub(super) async fn ack(&self, stream: &str, first: u64, last: u64) {
        self.outbox.ack(stream, first, last).await;
        let (tx, rx) = oneshot::channel();
        self.outbox.ops.send(Op::Sync(tx)).await.unwrap();
        rx.await.unwrap();
    }

    pub(super) fn commits(&self) -> u64 {
        self.outbox.shared.commits.load(Ordering::Relaxed)
    }

    pub(super) async fn stop(mut self) {
        self.outbox.shared.stopping.store(true, Ordering::Relaxed);
        self.outbox.ops.send(Op::Stop).await.unwrap();
        if let Some(t) = self.thread.take() {
            tokio::task::spawn_blocking(move || t.join().unwrap())
                .await
                .unwrap();
        }
    }
}

pub(super) fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
    records.iter().map(|r| r.payload.clone()).collect()
}

/// A disk whose usage the test sets.
pub(super) fn disk_at(used: &Arc<AtomicU8>) -> Hooks {
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
