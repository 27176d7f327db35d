//! The write side ([`Writer`]): one thread that takes operations off a bounded queue in groups
//! and carries each group out in one commit, plus the ticking task that wakes it for expiry,
//! the disk's watermark and reopening.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redb::Database;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::open::Hooks;
use super::shared::Shared;
use super::{NewRecord, OutboxError};

/// Most operations one commit takes.
const GROUP_MAX: usize = 8192;
/// How many operations may wait for the writer.
pub(super) const QUEUE: usize = 16384;
/// Payload bytes (in KiB) that may wait for the writer: beyond it, producers wait.
pub(super) const QUEUED_KIB: u32 = 64 * 1024;
/// Payload bytes one commit takes at most.
const GROUP_BYTES: usize = 16 << 20;
/// How often the writer wakes up by itself (expiry, disk, reopening).
const TICK: Duration = Duration::from_secs(1);
/// How often expired records are looked for (in memory; a commit only if one expired).
const EXPIRY_EVERY_MS: u64 = 5_000;
/// How often the disk's usage is measured (one `statvfs`), at most.
const DISK_EVERY_MS: u64 = 2_000;

/// Where an enqueue's outcome goes.
pub(super) type Reply = oneshot::Sender<Result<u64, OutboxError>>;

/// The hub acknowledged `first..=last` of `stream`.
#[derive(Debug, Clone)]
pub(super) struct Ack {
    pub(super) stream: String,
    pub(super) first: u64,
    pub(super) last: u64,
}

pub(super) enum Op {
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

/// The write side, to be run by its owner ([`Writer::run`]).
pub struct Writer {
    pub(super) ops: mpsc::Receiver<Op>,
    pub(super) tx: mpsc::Sender<Op>,
    pub(super) shared: Arc<Shared>,
    pub(super) hooks: Hooks,
    /// The writer's own handle; `None` while the file is closed after an I/O error.
    pub(super) db: Option<Arc<Database>>,
    pub(super) next_seq: u64,
    pub(super) next_stream: u32,
    /// Acknowledgements that arrived while the file was closed, applied when it is back.
    pub(super) pending_acks: Vec<Ack>,
    pub(super) reopen_at_mono: u64,
    /// Reopens tried in this outage: the next waits `exponential(REOPEN_MIN, n, REOPEN_MAX)`.
    pub(super) reopen_attempts: u32,
    /// When the file last came back (monotonic ms): a failure soon after keeps the backoff.
    pub(super) recovered_at_mono: Option<u64>,
    /// When the current outage began (monotonic ms), for the log line when it ends.
    pub(super) down_since_mono: u64,
    pub(super) last_expiry_mono: u64,
    pub(super) last_disk_mono: Option<u64>,
    /// Bytes the outbox may hold above the disk's watermark without making room.
    pub(super) disk_floor: u64,
    /// Per drop reason: when a drop for room was last warned about, and drops since.
    pub(super) drop_warnings: [(Option<u64>, u64); 4],
}

/// An enqueue waiting for the writer.
pub(super) type Pending = (NewRecord, Reply, tokio::sync::OwnedSemaphorePermit);

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

    pub(super) fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
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

    /// Measures the state directory's filesystem against the watermark (one `statvfs`).
    pub(super) fn check_disk(&mut self, mono: u64) {
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
    pub(super) fn cutoff(&self) -> u64 {
        self.shared
            .odo_now()
            .saturating_sub(self.shared.limits.max_age.as_millis() as u64)
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use super::super::testing::*;
    use super::super::{Limits, Outbox};
    use super::*;

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
}
