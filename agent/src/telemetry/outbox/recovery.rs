//! Surviving I/O errors: what a failed redb operation means ([`Fault`]), closing the file after
//! a storage error, keeping acknowledgements meanwhile, and reopening it with backoff.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::OutboxError;
use super::open::reload;
use super::writer::{Ack, Reply, Writer};

/// Backoff between attempts to reopen the file after an I/O error.
pub(super) const REOPEN_MIN: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);
/// Acknowledgements kept while the file is closed (the drain has at most a window in flight;
/// past this, the oldest are forgotten and those records are sent again).
const PENDING_ACKS_MAX: usize = 4096;

/// What a failed redb operation means for the outbox.
#[derive(Debug)]
pub(super) enum Fault {
    /// The file could not be read or written (ENOSPC and other I/O errors, or redb refusing
    /// after one): close it and reopen.
    Storage { no_space: bool, message: String },
    /// Anything else (a value it cannot read, a bug): this batch fails, the file stays open.
    Other { op: &'static str, message: String },
}

impl Fault {
    pub(super) fn of(op: &'static str, e: impl Into<redb::Error>) -> Fault {
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
    pub(super) fn error(&self, path: &Path) -> OutboxError {
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

/// A commit that failed: what went wrong, and the replies still owed.
pub(super) struct Failed {
    pub(super) fault: Fault,
    pub(super) replies: Vec<Reply>,
}

impl Writer {
    /// A commit failed: answer its producers, and close the file if it was the storage.
    pub(super) fn failed(&mut self, failed: Failed, acks: Vec<Ack>) {
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

    pub(super) fn keep_acks(&mut self, acks: Vec<Ack>) {
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
            self.reopen_attempts = 0;
        }
        self.reopen_attempts = self.reopen_attempts.saturating_add(1);
        let retry_in =
            outpost_core::backoff::exponential(REOPEN_MIN, self.reopen_attempts, REOPEN_MAX);
        self.reopen_at_mono = mono + retry_in.as_millis() as u64;
        self.shared
            .reopen_at_mono
            .store(self.reopen_at_mono, Ordering::Relaxed);
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
    pub(super) fn reopen(&mut self, mono: u64) {
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
}

#[cfg(test)]
mod tests {
    use super::super::OutboxHealth;
    use super::super::testing::*;
    use super::*;
    use crate::clock::Clock as _;

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
}
