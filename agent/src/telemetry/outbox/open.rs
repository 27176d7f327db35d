//! Opening the file: creating it owner-only, counting what it holds, settling the record format
//! and the odometer at the first open ([`Outbox::open`]), and counting again after a reopen.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, RwLock};

use redb::{Database, ReadableDatabase as _, ReadableTable};
use tokio::sync::{mpsc, watch};

use super::commit::DISK_HIGH_FLOOR;
use super::format::{
    DELIVERED, ENQUEUED, FORMAT2_FROM, Format, LEGACY_ODO, META, NEXT_SEQ, NEXT_STREAM, ODO_BOOT,
    ODO_MONO, ODO_VALUE, Odometer, RECORDS, STREAMS, TEXT, key, record_size, seq_of,
};
use super::shared::{Condition, Shared};
use super::stats::DropReason;
use super::writer::{QUEUE, QUEUED_KIB, Writer};
use super::{Limits, Outbox, OutboxError, StreamInfo};
use crate::clock::{Clock, SharedClock};
use crate::disk::DiskUsage;

/// Opens the database file; a seam so that tests can put a failing storage under redb.
pub(super) type OpenFn = dyn Fn(&Path) -> Result<Database, redb::DatabaseError> + Send + Sync;
/// Measures the filesystem holding a path; a seam so that tests can fill a disk by decree.
pub(super) type DiskFn = dyn Fn(&Path) -> Option<DiskUsage> + Send + Sync;

#[derive(Clone)]
pub(super) struct Hooks {
    pub(super) open: Arc<OpenFn>,
    pub(super) disk: Arc<DiskFn>,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            open: Arc::new(|path| Database::create(path)),
            disk: Arc::new(crate::disk::usage),
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
pub(super) struct Loaded {
    pub(super) streams: BTreeMap<String, StreamInfo>,
    pub(super) enqueued: u64,
    pub(super) delivered: u64,
    pub(super) dropped: [u64; 4],
    pub(super) next_seq: u64,
    pub(super) next_stream: u32,
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
    let (enqueued, delivered) = (get(ENQUEUED)?, get(DELIVERED)?);
    let mut dropped = [0; 4];
    for reason in DropReason::ALL {
        dropped[reason.index()] = get(reason.as_str())?;
    }
    Ok((enqueued, delivered, dropped))
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
pub(super) fn reload(
    db: &Database,
    format: Format,
    fallback_seq: u64,
) -> Result<Loaded, redb::Error> {
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

    pub(super) fn open_with(
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
            reopen_attempts: 0,
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
}

fn set_owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::clock::{FakeClock, PLAUSIBLE_AFTER_MS};

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
}
