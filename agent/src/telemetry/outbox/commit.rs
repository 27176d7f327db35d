//! One write transaction ([`Writer::commit`]): acknowledgements delete, expired records go,
//! then each enqueue is stored, making room under the byte limit and the disk's watermark by
//! dropping the oldest records of the least important stream, or refused. Once durable, its
//! changes are published to the shared view and the producers get their answers.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use redb::ReadableTable as _;

use super::format::{
    DELIVERED, ENQUEUED, Format, META, NEXT_SEQ, NEXT_STREAM, ODO_MONO, ODO_VALUE, RECORDS,
    STREAMS, encode, key, record_size, seq_of,
};
use super::recovery::{Failed, Fault};
use super::stats::DropReason;
use super::writer::{Ack, Pending, Reply, Writer};
use super::{MAX_RECORD_BYTES, OutboxError, StreamInfo};

/// Above the disk's watermark the outbox still takes records up to this many bytes (or the
/// byte limit, if smaller) without making room: a device whose disk is full of something else
/// (images) keeps streaming telemetry to a connected hub — the drain keeps up to 2 MiB in
/// flight — while a backlog cannot grow.
pub(super) const DISK_HIGH_FLOOR: u64 = 4 << 20;
/// Drops for room are warned about at most this often per reason, with the count since.
const DROP_WARN_EVERY_MS: u64 = 30_000;

/// What one commit changes, applied to the shared view only once it is durable.
pub(super) struct Batch {
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

impl Writer {
    /// Says that records were dropped for room: at once the first time, then at most every
    /// [`DROP_WARN_EVERY_MS`] per reason with how many since (a stream into a full outbox would
    /// otherwise log every commit, onto a disk that may be full too).
    fn warn_drops(&mut self, made_room: [u64; 4], disk_used: Option<u8>) {
        let mono = self.shared.clock.mono_ms();
        let limits = self.shared.limits;
        for reason in [DropReason::Full, DropReason::Disk] {
            let (last, since) = &mut self.drop_warnings[reason.index()];
            *since += made_room[reason.index()];
            if *since == 0 || last.is_some_and(|at| mono.saturating_sub(at) < DROP_WARN_EVERY_MS) {
                continue;
            }
            let dropped = std::mem::take(since);
            *last = Some(mono);
            if reason == DropReason::Full {
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

    pub(super) fn publish(&mut self, batch: Batch) {
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
    pub(super) fn commit(
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
            dropped: DropReason::ALL.map(|r| s.dropped[r.index()].load(Ordering::Relaxed)),
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
                            batch.dropped[DropReason::Expired.index()] += 1;
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
                        batch.dropped[DropReason::TooLarge.index()] += 1;
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
                            let reason = if freed < need_full {
                                DropReason::Full
                            } else {
                                DropReason::Disk
                            };
                            freed += before - victim.bytes;
                            made_room[reason.index()] += 1;
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
                    made_room[DropReason::Full.index()] += 1;
                }
                batch.made_room = made_room;
                for reason in [DropReason::Full, DropReason::Disk] {
                    batch.dropped[reason.index()] += made_room[reason.index()];
                }
                let w = |e| Fault::of("write", e);
                meta.insert(NEXT_SEQ, batch.next_seq).map_err(w)?;
                meta.insert(NEXT_STREAM, u64::from(batch.next_stream))
                    .map_err(w)?;
                meta.insert(ENQUEUED, batch.enqueued).map_err(w)?;
                meta.insert(DELIVERED, batch.delivered).map_err(w)?;
                for (reason, n) in DropReason::ALL.into_iter().zip(batch.dropped) {
                    meta.insert(reason.as_str(), n).map_err(w)?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use std::sync::Arc;
    use std::time::Duration;

    use super::super::testing::*;
    use super::super::{Limits, NewRecord, Outbox, OutboxHealth};
    use super::*;

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
}
