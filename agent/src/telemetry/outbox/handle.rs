//! The handle producers and the drain hold ([`Outbox`]): submitting records and waiting for
//! their receipt, acknowledging, and reading back what is queued.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use redb::ReadableDatabase as _;
use tokio::sync::{mpsc, oneshot, watch};

use super::format::{RECORDS, key, seq_of};
use super::recovery::Fault;
use super::shared::Shared;
use super::writer::{Ack, Op, QUEUED_KIB};
use super::{NewRecord, OutboxError, Record, StreamInfo};

/// The handle: enqueue, read, acknowledge. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    pub(super) ops: mpsc::Sender<Op>,
    pub(super) budget: Arc<tokio::sync::Semaphore>,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

/// Resolves once a submitted record is durable (its id) or was not accepted (why).
pub struct Receipt {
    pub(super) rx: oneshot::Receiver<Result<u64, OutboxError>>,
    pub(super) shared: Arc<Shared>,
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

impl Outbox {
    /// Queues a record and resolves once it is durable, with its id.
    ///
    /// Fails when the record is larger than [`MAX_RECORD_BYTES`] or the byte limit (it is
    /// counted as dropped, reason `too-large`); when it could only be stored by dropping more
    /// important records ([`OutboxError::Full`], [`OutboxError::DiskHigh`]); when the file
    /// cannot be written ([`OutboxError::NoSpace`], [`OutboxError::Unavailable`]: at once while
    /// it is being reopened); or when the agent is stopping ([`OutboxError::Closed`]).
    ///
    /// [`MAX_RECORD_BYTES`]: super::MAX_RECORD_BYTES
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::super::testing::*;
    use super::*;
    use crate::clock::{Clock as _, FakeClock, PLAUSIBLE_AFTER_MS};

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
}
