//! The agent's durable state in an embedded redb database (`STATE_DIR/outpost.redb`): the
//! accepted deployment and the start of its rollback window, the last deployment that became
//! healthy, the highest version and last digest per source, the last report, restart history,
//! and the set of images deployments named. Everything here is committed with fsync before the
//! agent acts on it, so a `kill -9` or a power cut at any point leaves either the old or the new
//! state, never a mix.
//!
//! The store also owns what keeps it working on a bad disk:
//!
//! - **I/O errors.** A redb handle that met an I/O error refuses everything after it
//!   (`PreviousIo`) until it is closed and opened again. The [`Database`] sits behind a lock
//!   that can swap it: on such an error it is dropped and reopened (redb recovers to the last
//!   commit) and the operation is tried once more. Reopens are limited ([`ReopenLimiter`]) so
//!   that a dead disk does not spin. Every transaction lives inside this file's methods, so no
//!   other handle holds the file lock when a reopen needs it.
//! - **A full disk.** `STATE_DIR/reserve`, a file of zeros of `disk.store_reserve_bytes`, is
//!   given back when a write that changes the deployment fails for lack of space; the write then
//!   commits. [`Store::maintain`] makes the reserve again once the filesystem has room.
//! - **Corruption.** A file that is not a readable database, or holds an entry that does not
//!   decode, is moved aside to `outpost.redb.corrupt-<unix ms>` by [`Store::open`] (the newest
//!   three are kept for diagnosis) and a fresh store takes its place.
//!
//! The file holds registry credentials, so it is created owner-only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tracing::{debug, info, warn};

use crate::clock::BootInstant;
use crate::intake::Provenance;
use crate::manifest::Deployment;
use crate::planner::ModuleHistory;
use crate::state::{DeploymentReport, Source};

/// The database file in the state directory.
pub const FILE_NAME: &str = "outpost.redb";
/// The emergency reserve in the state directory.
pub const RESERVE_FILE: &str = "reserve";
/// Damaged stores moved aside that are kept; older ones are deleted so that a store that keeps
/// getting damaged cannot fill the disk with copies.
const CORRUPT_KEPT: usize = 3;
/// How long after a failed attempt to write the reserve the next one may be made.
const RESERVE_RETRY: Duration = Duration::from_secs(60);

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("restart_history");
/// The images deployments named: what image cleanup may remove. The value is the Unix ms when
/// the image was first named, for people only (the table's types predate the set, and changing
/// them would make older stores unreadable).
const IMAGES: TableDefinition<&str, u64> = TableDefinition::new("images");

const DESIRED: &str = "desired";
const LAST_GOOD: &str = "last_good";
const VERSIONS: &str = "versions";
const DIGESTS: &str = "digests";
const REPORT: &str = "report";
/// When the desired deployment's rollback window started ([`BootInstant`]).
const WINDOW: &str = "window";
/// The latest wall-clock time (Unix ms) known to be true: when a deployment was accepted with a
/// plausible clock. Expiry is never judged earlier than this after a reboot at 1970.
const TIME_FLOOR: &str = "time_floor";

/// A deployment as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredDeployment {
    pub deployment: Deployment,
    pub source: Source,
    pub provenance: Provenance,
    pub digest: String,
    /// Unix milliseconds when it was accepted (or restored by a rollback).
    pub accepted_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not even a fresh store could be created (or the store is in use by another process):
    /// the agent exits and its service manager starts it again.
    #[error("cannot open the store at {path}: {message}")]
    Open { path: PathBuf, message: String },
    /// The disk is full and the reserve was spent (or the write was not one it is kept for).
    #[error("store {op} failed: the disk is full: {source}")]
    NoSpace {
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("store {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: redb::Error,
    },
    /// An earlier reopen failed; the next operation (or [`Store::maintain`]) tries again.
    #[error("store {op} failed: the store is closed after an I/O error ({reason})")]
    Closed { op: &'static str, reason: String },
    #[error("store entry `{key}` is corrupt: {message}")]
    Corrupt { key: String, message: String },
    #[error("cannot encode store entry `{key}`: {message}")]
    Encode { key: String, message: String },
    #[error("cannot make the store's emergency reserve {path}: {source}")]
    Reserve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// Whether the operation failed for lack of disk space.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }

    /// Whether the database handle may be what failed, so that reopening it may help.
    fn wants_reopen(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } | StoreError::Closed { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source,
                redb::Error::Io(_)
                    | redb::Error::PreviousIo
                    | redb::Error::DatabaseClosed
                    // "Allocator state was discarded by a failed ... commit; reopen the database"
                    | redb::Error::Corrupted(_)
                    | redb::Error::TransactionPoisoned
                    | redb::Error::Backend(_)
                    | redb::Error::LockPoisoned(_)
            ),
            _ => false,
        }
    }
}

/// A store that could not be read and was replaced by a fresh one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    /// Where the damaged file now is, kept for diagnosis.
    pub moved_to: PathBuf,
    /// Why it could not be used.
    pub reason: String,
}

/// How the store is doing on its disk, for the reported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreHealth {
    /// The size of the emergency reserve (`disk.store_reserve_kb`); 0 for none.
    pub reserve_bytes: u64,
    /// Whether the reserve file is in place, ready to be given back to a write on a full disk.
    pub reserve_held: bool,
    /// Since when (Unix ms, wall clock) the reserve has been in use: given back to a write on
    /// a full disk, or not made for lack of room. `None` while it is held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserve_in_use_since_ms: Option<u64>,
    /// The error the store's operations are failing with; cleared by the next success.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_error: Option<StoreIoError>,
    /// The damaged store this process moved aside when it started: the device lost its
    /// stored state (versions, history), which the fleet's operator should know.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovery>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreIoError {
    pub message: String,
    pub no_space: bool,
    /// Unix ms (wall clock) of the first failure in this run of failures.
    pub since_ms: u64,
}

/// How an operation may use the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// A write that changes what the device runs (or makes the store usable at all): the one
    /// the reserve is kept for. Restart counts and reports do not spend it.
    Critical,
}

/// The database handle and how many times it was (re)opened: a caller whose operation failed
/// on generation N reopens only if nobody else already did.
struct Slot {
    db: Option<Database>,
    generation: u64,
}

struct Status {
    reserve_held: bool,
    reserve_in_use_since: Option<u64>,
    io_error: Option<StoreIoError>,
    /// Why the last reopen failed, while the store stays closed.
    closed_reason: Option<String>,
    limiter: ReopenLimiter,
    /// No attempt to write the reserve before this, after one failed.
    reserve_retry_at: Option<Instant>,
    recovery: Option<Recovery>,
}

struct Inner {
    dir: PathBuf,
    path: PathBuf,
    reserve: PathBuf,
    reserve_bytes: u64,
    slot: RwLock<Slot>,
    status: Mutex<Status>,
    commits: AtomicU64,
}

/// The handle the agent's parts share (cloning shares the one database).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

/// The tables of one write transaction.
struct Tables<'t> {
    meta: redb::Table<'t, &'static str, &'static [u8]>,
    history: redb::Table<'t, &'static str, &'static [u8]>,
    images: redb::Table<'t, &'static str, u64>,
}

impl Tables<'_> {
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let value = self.meta.get(key).map_err(|e| storage("read", e))?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    fn put<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(key, value)?;
        self.meta
            .insert(key, bytes.as_slice())
            .map_err(|e| storage("write", e))?;
        Ok(())
    }
}

impl Store {
    /// Opens (or creates) `DIR/outpost.redb`, creating the folder owner-only, and keeps an
    /// emergency reserve of `reserve_bytes` beside it when the disk has room (0: none).
    ///
    /// A file that is not a readable database, or holds an entry that does not decode, is moved
    /// aside and a fresh store is created: the [`Recovery`] says where and why. Fails only when
    /// the folder cannot be made, the store is open in another process, the disk fails, or not
    /// even a fresh store can be created.
    pub fn open(dir: &Path, reserve_bytes: u64) -> Result<(Store, Option<Recovery>), StoreError> {
        let path = dir.join(FILE_NAME);
        let open_err = |message: String| StoreError::Open {
            path: path.clone(),
            message,
        };
        fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        set_mode(dir, 0o700).map_err(|e| open_err(e.to_string()))?;
        let inner = Inner {
            dir: dir.to_path_buf(),
            path: path.clone(),
            reserve: dir.join(RESERVE_FILE),
            reserve_bytes,
            slot: RwLock::new(Slot {
                db: None,
                generation: 0,
            }),
            status: Mutex::new(Status {
                reserve_held: false,
                reserve_in_use_since: None,
                io_error: None,
                closed_reason: None,
                limiter: ReopenLimiter::default(),
                reserve_retry_at: None,
                recovery: None,
            }),
            commits: AtomicU64::new(0),
        };
        inner.adopt_reserve();
        // The integrity check on this first open reads the whole (small) file and reports a
        // damaged one instead of trusting it.
        let checked = inner
            .open_file(true, true)
            .and_then(|db| match validate(&db) {
                Ok(()) => Ok(db),
                Err(failure) => {
                    drop(db);
                    Err(failure)
                }
            });
        let mut recovery = None;
        let db = match checked {
            Ok(db) => db,
            Err(OpenFailure::Damaged(reason)) => {
                let moved_to = move_aside(&path).map_err(|e| {
                    open_err(format!(
                        "it is damaged ({reason}) and cannot be moved aside: {e}"
                    ))
                })?;
                warn!(path = %path.display(), moved_to = %moved_to.display(), %reason,
                    "the store is damaged: moved aside, starting with an empty store");
                recovery = Some(Recovery { moved_to, reason });
                inner.open_file(false, true).map_err(|f| {
                    open_err(format!(
                        "cannot create a fresh store after moving the damaged one aside: {f}"
                    ))
                })?
            }
            Err(failure) => return Err(open_err(failure.to_string())),
        };
        // Stores made before the file was created owner-only.
        set_mode(&path, 0o600).map_err(|e| open_err(e.to_string()))?;
        inner
            .slot
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .db = Some(db);
        let store = Store {
            inner: Arc::new(inner),
        };
        // Create the tables so that readers never meet a missing one; only when one is missing,
        // so that a restart on a full disk commits nothing.
        let missing = store.read("check tables", |txn| {
            Ok(table_missing(txn.open_table(META))?
                | table_missing(txn.open_table(HISTORY))?
                | table_missing(txn.open_table(IMAGES))?)
        })?;
        if missing {
            store.write("create tables", Kind::Critical, |_| Ok(((), true)))?;
        }
        // The file's name survives a power cut too (a fresh store, or one just moved aside).
        crate::fsutil::sync_dir(dir).map_err(|e| open_err(e.to_string()))?;
        // No write can be under way in the folder: the store's file lock keeps a second agent
        // out, and the agent writes nothing else there before the store is open.
        match crate::fsutil::remove_stale_temps(dir) {
            Ok(0) => {}
            Ok(n) => info!(dir = %dir.display(), files = n, "removed temporary files a crash left"),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot remove stale temporary files")
            }
        }
        store.inner.status().recovery = recovery.clone();
        if let Err(e) = store.maintain() {
            warn!(error = %e, "no emergency reserve for the store yet");
        }
        Ok((store, recovery))
    }

    pub fn desired(&self) -> Result<Option<StoredDeployment>, StoreError> {
        self.get(DESIRED)
    }

    pub fn last_good(&self) -> Result<Option<StoredDeployment>, StoreError> {
        self.get(LAST_GOOD)
    }

    /// When the desired deployment's rollback window started, as stored with it: a restarted
    /// agent in the same boot keeps the deadline; one from another boot starts it again.
    pub fn window(&self) -> Result<Option<BootInstant>, StoreError> {
        self.get(WINDOW)
    }

    /// The highest version accepted from each source (`device`, `group:NAME`, `local`).
    pub fn versions(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        Ok(self.get(VERSIONS)?.unwrap_or_default())
    }

    /// The digest of the last deployment accepted from each source.
    pub fn digests(&self) -> Result<BTreeMap<String, String>, StoreError> {
        Ok(self.get(DIGESTS)?.unwrap_or_default())
    }

    /// The last reported deployment status, so a restarted agent reports where it was.
    pub fn report(&self) -> Result<Option<DeploymentReport>, StoreError> {
        self.get(REPORT)
    }

    /// Stores a newly accepted deployment, its source's version and digest, the report and the
    /// start of its rollback window in one transaction. On a full disk the reserve is given
    /// back for it.
    pub fn accept(
        &self,
        d: &StoredDeployment,
        report: &DeploymentReport,
        window: &BootInstant,
    ) -> Result<(), StoreError> {
        let key = source_key(&d.source);
        self.write("accept", Kind::Critical, |t| {
            let mut versions: BTreeMap<String, u64> = t.get(VERSIONS)?.unwrap_or_default();
            let mut digests: BTreeMap<String, String> = t.get(DIGESTS)?.unwrap_or_default();
            let v = versions.entry(key.clone()).or_default();
            *v = (*v).max(d.deployment.version);
            digests.insert(key.clone(), d.digest.clone());
            t.put(DESIRED, d)?;
            t.put(VERSIONS, &versions)?;
            t.put(DIGESTS, &digests)?;
            t.put(REPORT, report)?;
            t.put(WINDOW, window)?;
            if d.accepted_at >= crate::clock::PLAUSIBLE_AFTER_MS {
                let floor: u64 = t.get(TIME_FLOOR)?.unwrap_or(0);
                t.put(TIME_FLOOR, &floor.max(d.accepted_at))?;
            }
            Ok(((), true))
        })
    }

    /// The latest wall-clock time (Unix ms) this device has known to be true, or 0.
    pub fn time_floor(&self) -> Result<u64, StoreError> {
        Ok(self.get(TIME_FLOOR)?.unwrap_or(0))
    }

    /// Replaces the desired deployment (a rollback), the report and the window's start. On a
    /// full disk the reserve is given back for it.
    pub fn set_desired(
        &self,
        d: &StoredDeployment,
        report: &DeploymentReport,
        window: &BootInstant,
    ) -> Result<(), StoreError> {
        self.write("set desired", Kind::Critical, |t| {
            t.put(DESIRED, d)?;
            t.put(REPORT, report)?;
            t.put(WINDOW, window)?;
            Ok(((), true))
        })
    }

    pub fn set_last_good(&self, d: &StoredDeployment) -> Result<(), StoreError> {
        self.write("set last good", Kind::Write, |t| {
            t.put(LAST_GOOD, d)?;
            Ok(((), true))
        })
    }

    pub fn set_report(&self, report: &DeploymentReport) -> Result<(), StoreError> {
        self.write("set report", Kind::Write, |t| {
            t.put(REPORT, report)?;
            Ok(((), true))
        })
    }

    pub fn history(&self) -> Result<BTreeMap<String, ModuleHistory>, StoreError> {
        self.read("read history", |txn| {
            let table = txn
                .open_table(HISTORY)
                .map_err(|e| storage("read history", e))?;
            let mut out = BTreeMap::new();
            for entry in table.iter().map_err(|e| storage("read history", e))? {
                let (k, v) = entry.map_err(|e| storage("read history", e))?;
                out.insert(k.value().to_string(), decode(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    pub fn set_history(&self, module: &str, h: &ModuleHistory) -> Result<(), StoreError> {
        let bytes = encode(module, h)?;
        self.write("set history", Kind::Write, |t| {
            t.history
                .insert(module, bytes.as_slice())
                .map_err(|e| storage("set history", e))?;
            Ok(((), true))
        })
    }

    /// Forgets the history of modules no longer deployed; commits only if there was any.
    pub fn retain_history(&self, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        self.write("retain history", Kind::Write, |t| {
            let stale: Vec<String> = t
                .history
                .iter()
                .map_err(|e| storage("retain history", e))?
                .map(|entry| entry.map(|(k, _)| k.value().to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| storage("retain history", e))?
                .into_iter()
                .filter(|k| !keep(k))
                .collect();
            for k in &stale {
                t.history
                    .remove(k.as_str())
                    .map_err(|e| storage("retain history", e))?;
            }
            Ok(((), !stale.is_empty()))
        })
    }

    /// The images deployments have named: the ones image cleanup may remove once unused.
    pub fn images(&self) -> Result<BTreeSet<String>, StoreError> {
        self.read("read images", |txn| {
            let table = txn
                .open_table(IMAGES)
                .map_err(|e| storage("read images", e))?;
            let mut out = BTreeSet::new();
            for entry in table.iter().map_err(|e| storage("read images", e))? {
                let (k, _) = entry.map_err(|e| storage("read images", e))?;
                out.insert(k.value().to_string());
            }
            Ok(out)
        })
    }

    /// Records images a deployment names. Commits (and fsyncs) only when one of them is new,
    /// so calling it on every pass costs a read, not a write to flash.
    pub fn add_images<S: AsRef<str>>(
        &self,
        images: impl IntoIterator<Item = S>,
    ) -> Result<(), StoreError> {
        let wanted: BTreeSet<String> = images.into_iter().map(|s| s.as_ref().to_string()).collect();
        let known = self.images()?;
        let new: Vec<&String> = wanted.difference(&known).collect();
        if new.is_empty() {
            return Ok(());
        }
        let now = wall_ms();
        self.write("add images", Kind::Write, |t| {
            let mut changed = false;
            for image in &new {
                let present = t
                    .images
                    .get(image.as_str())
                    .map_err(|e| storage("add images", e))?
                    .is_some();
                if !present {
                    t.images
                        .insert(image.as_str(), now)
                        .map_err(|e| storage("add images", e))?;
                    changed = true;
                }
            }
            Ok(((), changed))
        })
    }

    /// Forgets an image (it was removed from the engine); commits only if it was known.
    pub fn forget_image(&self, image: &str) -> Result<(), StoreError> {
        self.write("forget image", Kind::Write, |t| {
            let removed = t
                .images
                .remove(image)
                .map_err(|e| storage("forget image", e))?
                .is_some();
            Ok(((), removed))
        })
    }

    /// Upkeep the reconciler runs every pass: makes the emergency reserve again once the disk
    /// has room for it (one `statvfs` while it is missing, nothing while it is held), and
    /// reopens a store that an earlier failed reopen left closed (limited like every reopen).
    ///
    /// Fails when the reserve could not be written although the disk seemed to have room.
    pub fn maintain(&self) -> Result<(), StoreError> {
        let closed = {
            let slot = self
                .inner
                .slot
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            slot.db.is_none().then_some(slot.generation)
        };
        if let Some(generation) = closed {
            self.inner.reopen(generation, false);
        }
        self.inner.make_reserve()
    }

    /// How the store is doing on its disk.
    pub fn health(&self) -> StoreHealth {
        let status = self.inner.status();
        StoreHealth {
            reserve_bytes: self.inner.reserve_bytes,
            reserve_held: status.reserve_held,
            reserve_in_use_since_ms: status.reserve_in_use_since,
            io_error: status.io_error.clone(),
            recovered: status.recovery.clone(),
        }
    }

    /// Commits this handle has made (each one an fsync): what tests and metrics count.
    pub fn commits(&self) -> u64 {
        self.inner.commits.load(Ordering::Relaxed)
    }

    fn get<T: DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, StoreError> {
        self.read("read", |txn| {
            let table = txn.open_table(META).map_err(|e| storage("read", e))?;
            let value = table.get(key).map_err(|e| storage("read", e))?;
            value.map(|v| decode(key, v.value())).transpose()
        })
    }

    fn read<T>(
        &self,
        op: &'static str,
        f: impl Fn(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.run(op, Kind::Read, |db| {
            let txn = db.begin_read().map_err(|e| storage(op, e))?;
            f(&txn)
        })
    }

    /// One write transaction: `f` says whether it changed anything; if not, the transaction is
    /// aborted instead of committed (no fsync, no wear).
    fn write<T>(
        &self,
        op: &'static str,
        kind: Kind,
        f: impl Fn(&mut Tables<'_>) -> Result<(T, bool), StoreError>,
    ) -> Result<T, StoreError> {
        self.run(op, kind, |db| {
            let txn = db.begin_write().map_err(|e| storage(op, e))?;
            let (value, changed) = {
                let mut tables = Tables {
                    meta: txn.open_table(META).map_err(|e| storage(op, e))?,
                    history: txn.open_table(HISTORY).map_err(|e| storage(op, e))?,
                    images: txn.open_table(IMAGES).map_err(|e| storage(op, e))?,
                };
                f(&mut tables)?
            };
            if changed {
                txn.commit().map_err(|e| storage(op, e))?;
                self.inner.commits.fetch_add(1, Ordering::Relaxed);
            } else {
                txn.abort().map_err(|e| storage(op, e))?;
            }
            Ok(value)
        })
    }

    /// Runs `f` on the database; after an error a reopen may cure, reopens and runs it once
    /// more. For lack of space, a critical write first gets the reserve; other operations are
    /// not tried again (nothing has freed space), but the store is still reopened so that reads
    /// keep working.
    fn run<T>(
        &self,
        op: &'static str,
        kind: Kind,
        f: impl Fn(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut released = false;
        let mut retried = false;
        loop {
            let (result, generation) = {
                let slot = self
                    .inner
                    .slot
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let result = match &slot.db {
                    Some(db) => f(db),
                    None => Err(StoreError::Closed {
                        op,
                        reason: self
                            .inner
                            .status()
                            .closed_reason
                            .clone()
                            .unwrap_or_else(|| "not reopened yet".into()),
                    }),
                };
                (result, slot.generation)
            };
            let err = match result {
                Ok(value) => {
                    self.inner.succeeded(kind);
                    return Ok(value);
                }
                Err(e) if !e.wants_reopen() => return Err(e),
                Err(e) => e,
            };
            let no_space = err.is_no_space();
            self.inner.failed(&err);
            if no_space && kind == Kind::Critical && !released {
                released = self.inner.release_reserve();
            }
            let reopened = self.inner.reopen(generation, kind == Kind::Critical);
            if retried || !reopened || (no_space && !released) {
                return Err(err);
            }
            retried = true;
        }
    }
}

impl Inner {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn succeeded(&self, kind: Kind) {
        let mut status = self.status();
        // A read proves nothing about writes on a full disk.
        let clears = match &status.io_error {
            None => false,
            Some(e) => kind != Kind::Read || !e.no_space,
        };
        if clears {
            status.io_error = None;
            info!(path = %self.path.display(), "the store works again");
        }
    }

    fn failed(&self, err: &StoreError) {
        let message = err.to_string();
        let no_space = err.is_no_space();
        let mut status = self.status();
        match &mut status.io_error {
            Some(e) => {
                e.message = message;
                e.no_space = no_space;
            }
            None => {
                warn!(path = %self.path.display(), error = %message, no_space, "store operation failed; reopening the store");
                status.io_error = Some(StoreIoError {
                    message,
                    no_space,
                    since_ms: wall_ms(),
                });
            }
        }
    }

    /// Takes a reserve left by an earlier run if it has the configured size; one of another
    /// size (the setting changed) is removed, to be made again at the right size.
    fn adopt_reserve(&self) {
        let len = fs::metadata(&self.reserve).map(|m| m.len()).ok();
        let held = self.reserve_bytes > 0 && len == Some(self.reserve_bytes);
        if !held
            && len.is_some()
            && let Err(e) = fs::remove_file(&self.reserve)
        {
            warn!(path = %self.reserve.display(), error = %e, "cannot remove an old store reserve");
        }
        let mut status = self.status();
        status.reserve_held = held;
        status.reserve_in_use_since = (!held && self.reserve_bytes > 0).then(wall_ms);
    }

    /// Deletes the reserve so that a write can use its space. Returns whether space was freed.
    fn release_reserve(&self) -> bool {
        let mut status = self.status();
        if !status.reserve_held {
            return false;
        }
        match fs::remove_file(&self.reserve) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %self.reserve.display(), error = %e, "cannot give back the store reserve");
                return false;
            }
        }
        status.reserve_held = false;
        status.reserve_in_use_since = Some(wall_ms());
        warn!(path = %self.reserve.display(), bytes = self.reserve_bytes,
            "the disk is full: gave back the store's emergency reserve so that the deployment commits");
        true
    }

    /// Writes the reserve when it is missing and the disk has room for it twice over (so that
    /// making it never fills the disk itself).
    fn make_reserve(&self) -> Result<(), StoreError> {
        {
            let status = self.status();
            let backing_off = status
                .reserve_retry_at
                .is_some_and(|at| Instant::now() < at);
            if self.reserve_bytes == 0 || status.reserve_held || backing_off {
                return Ok(());
            }
        }
        let Some(usage) = crate::disk::usage(&self.dir) else {
            return Ok(());
        };
        if usage.available_bytes < self.reserve_bytes.saturating_mul(2) {
            return Ok(());
        }
        let zeros = vec![0u8; 64 << 10];
        let mut left = self.reserve_bytes;
        crate::fsutil::write_atomic_with(
            &self.reserve,
            0o600,
            crate::fsutil::Existing::Replace,
            |file| {
                use std::io::Write as _;
                while left > 0 {
                    // At most the 64 KiB of `zeros`, so the cast cannot truncate.
                    let n = left.min(zeros.len() as u64) as usize;
                    file.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                Ok(())
            },
        )
        .map_err(|source| {
            // A filesystem that refuses it (read-only, a race for the last blocks) is not
            // asked again on every pass.
            self.status().reserve_retry_at = Some(Instant::now() + RESERVE_RETRY);
            StoreError::Reserve {
                path: self.reserve.clone(),
                source,
            }
        })?;
        let mut status = self.status();
        status.reserve_retry_at = None;
        status.reserve_held = true;
        status.reserve_in_use_since = None;
        info!(path = %self.reserve.display(), bytes = self.reserve_bytes, "store reserve in place");
        Ok(())
    }

    /// Drops the handle that failed on `generation` and opens the file again. Returns whether
    /// there is an open handle now (someone else's reopen counts).
    fn reopen(&self, generation: u64, may_release: bool) -> bool {
        let mut slot = self.slot.write().unwrap_or_else(PoisonError::into_inner);
        if slot.generation != generation {
            return slot.db.is_some();
        }
        if !self.status().limiter.allow(Instant::now()) {
            debug!(path = %self.path.display(), "store reopen held back (at most one a second)");
            return false;
        }
        if let Some(old) = slot.db.take() {
            // Closing flushes; after an I/O error that fails as well, which is expected.
            if let Err(e) = old.close() {
                debug!(error = %e, "closing the failed store handle");
            }
        }
        slot.generation += 1;
        match self.open_file(false, may_release) {
            Ok(db) => {
                slot.db = Some(db);
                self.status().closed_reason = None;
                info!(path = %self.path.display(), "store reopened");
                true
            }
            Err(failure) => {
                warn!(path = %self.path.display(), error = %failure, "cannot reopen the store; trying again later");
                self.status().closed_reason = Some(failure.to_string());
                false
            }
        }
    }

    /// Opens the file, giving back the reserve and trying again if that failed for lack of
    /// space (opening after a crash commits a repair).
    fn open_file(&self, check: bool, may_release: bool) -> Result<Database, OpenFailure> {
        match open_db(&self.path, check) {
            Err(OpenFailure::NoSpace(_)) if may_release && self.release_reserve() => {
                open_db(&self.path, check)
            }
            other => other,
        }
    }
}

/// Why a database file could not be opened.
#[derive(Debug)]
enum OpenFailure {
    /// Not a readable database, or an entry does not decode: moved aside at start-up.
    Damaged(String),
    NoSpace(String),
    Other(String),
}

impl std::fmt::Display for OpenFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenFailure::Damaged(m) => write!(f, "damaged: {m}"),
            OpenFailure::NoSpace(m) => write!(f, "the disk is full: {m}"),
            OpenFailure::Other(m) => f.write_str(m),
        }
    }
}

fn open_db(path: &Path, check: bool) -> Result<Database, OpenFailure> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Created owner-only before redb sees it (redb would create it with the umask's mode).
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(classify(redb::Error::Io(e))),
    }
    // redb may panic on a file damaged outside it (its own documentation says so of a plain
    // open; debug builds assert on impossible pages): a damaged file must not stop the agent.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(check);
        builder.create(path)
    }));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(classify(e.into())),
        Err(panic) => Err(OpenFailure::Damaged(format!(
            "reading it panicked: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// Reads every entry, so that one that does not decode is found at start-up (and the store
/// moved aside) rather than failing a read forever after.
fn validate(db: &Database) -> Result<(), OpenFailure> {
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let txn = db.begin_read().map_err(|e| classify(e.into()))?;
        match txn.open_table(META) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| classify(e.into()))? {
                    let (k, v) = entry.map_err(|e| classify(e.into()))?;
                    check_entry(k.value(), v.value()).map_err(|e| {
                        OpenFailure::Damaged(format!("entry `{}` does not decode: {e}", k.value()))
                    })?;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(classify(e.into())),
        }
        match txn.open_table(HISTORY) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| classify(e.into()))? {
                    let (k, v) = entry.map_err(|e| classify(e.into()))?;
                    serde_json::from_slice::<ModuleHistory>(v.value()).map_err(|e| {
                        OpenFailure::Damaged(format!(
                            "restart history of `{}` does not decode: {e}",
                            k.value()
                        ))
                    })?;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(classify(e.into())),
        }
        match txn.open_table(IMAGES) {
            Ok(table) => {
                for entry in table.iter().map_err(|e| classify(e.into()))? {
                    entry.map_err(|e| classify(e.into()))?;
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(classify(e.into())),
        }
        Ok(())
    }));
    checked.unwrap_or_else(|panic| {
        Err(OpenFailure::Damaged(format!(
            "reading it panicked: {}",
            panic_message(panic.as_ref())
        )))
    })
}

/// Decodes an entry as the type its key holds. Keys this version does not know (written by a
/// newer agent) are left alone.
fn check_entry(key: &str, bytes: &[u8]) -> Result<(), serde_json::Error> {
    match key {
        DESIRED | LAST_GOOD => serde_json::from_slice::<StoredDeployment>(bytes).map(drop),
        VERSIONS => serde_json::from_slice::<BTreeMap<String, u64>>(bytes).map(drop),
        DIGESTS => serde_json::from_slice::<BTreeMap<String, String>>(bytes).map(drop),
        REPORT => serde_json::from_slice::<DeploymentReport>(bytes).map(drop),
        WINDOW => serde_json::from_slice::<BootInstant>(bytes).map(drop),
        _ => Ok(()),
    }
}

/// Whether opening a table failed only because it does not exist yet.
fn table_missing<T>(opened: Result<T, redb::TableError>) -> Result<bool, StoreError> {
    match opened {
        Ok(_) => Ok(false),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(true),
        Err(e) => Err(storage("check tables", e)),
    }
}

fn classify(e: redb::Error) -> OpenFailure {
    match &e {
        redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
            OpenFailure::Other(format!("{e} (is another agent running?)"))
        }
        redb::Error::Corrupted(_)
        | redb::Error::UpgradeRequired(_)
        | redb::Error::ValueTooLarge(_)
        | redb::Error::TableTypeMismatch { .. }
        | redb::Error::TypeDefinitionChanged { .. }
        | redb::Error::TableIsMultimap(_) => OpenFailure::Damaged(e.to_string()),
        // What redb says of a file that does not hold a database.
        redb::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
            OpenFailure::Damaged(e.to_string())
        }
        _ if is_no_space(&e) => OpenFailure::NoSpace(e.to_string()),
        _ => OpenFailure::Other(e.to_string()),
    }
}

fn is_no_space(e: &redb::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(e, redb::Error::Io(io) if matches!(io.raw_os_error(), Some(ENOSPC | EDQUOT)))
        || crate::disk::is_no_space(&e.to_string())
}

/// A redb error as the store reports it: lack of space apart, as callers treat it apart.
fn storage(op: &'static str, e: impl Into<redb::Error>) -> StoreError {
    let source = e.into();
    if is_no_space(&source) {
        StoreError::NoSpace { op, source }
    } else {
        StoreError::Io { op, source }
    }
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// Moves a damaged store to `outpost.redb.corrupt-<unix ms>` and deletes all but the newest
/// [`CORRUPT_KEPT`] such copies.
fn move_aside(path: &Path) -> io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let stamp = wall_ms();
    let mut target = dir.join(format!("{FILE_NAME}.corrupt-{stamp}"));
    let mut n = 1;
    while target.symlink_metadata().is_ok() {
        target = dir.join(format!("{FILE_NAME}.corrupt-{stamp}-{n}"));
        n += 1;
    }
    fs::rename(path, &target)?;
    crate::fsutil::sync_dir(dir)?;
    prune_corrupt(dir);
    Ok(target)
}

fn prune_corrupt(dir: &Path) {
    let prefix = format!("{FILE_NAME}.corrupt-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut copies: Vec<((u64, u64), PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix(&prefix)?;
            let (ms, n) = rest.split_once('-').unwrap_or((rest, "0"));
            Some(((ms.parse().ok()?, n.parse().ok()?), e.path()))
        })
        .collect();
    copies.sort();
    let excess = copies.len().saturating_sub(CORRUPT_KEPT);
    for (_, path) in copies.into_iter().take(excess) {
        match fs::remove_file(&path) {
            Ok(()) => info!(path = %path.display(), "deleted an old damaged store"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot delete an old damaged store")
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// At most [`ReopenLimiter::BURST`] reopens in any [`ReopenLimiter::WINDOW`]: a dead disk
/// costs one reopen a second, while one disk-full event (a failed write, a reopen, a retry
/// that fails again and a reopen to leave the store readable) is not held back.
#[derive(Debug, Default)]
pub struct ReopenLimiter {
    recent: VecDeque<Instant>,
}

impl ReopenLimiter {
    pub const BURST: usize = 3;
    pub const WINDOW: Duration = Duration::from_secs(3);

    /// Whether a reopen may happen at `now`; counts it if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        while let Some(&oldest) = self.recent.front() {
            if now.saturating_duration_since(oldest) >= Self::WINDOW {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= Self::BURST {
            return false;
        }
        self.recent.push_back(now);
        true
    }
}

/// The key under which a source's versions are counted.
pub fn source_key(source: &Source) -> String {
    match source {
        Source::Device => "device".into(),
        Source::Group { name } => format!("group:{name}"),
        Source::Local => "local".into(),
    }
}

/// Unix ms by the wall clock: only for what people read (health, file names).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeploymentStatus;
    use std::os::unix::fs::PermissionsExt as _;

    fn stored(version: u64) -> StoredDeployment {
        StoredDeployment {
            deployment: serde_json::from_str(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":{version},"modules":{{}}}}"#
            ))
            .unwrap(),
            source: Source::Device,
            provenance: Provenance::Unsigned,
            digest: format!("digest-{version}"),
            accepted_at: 1,
        }
    }

    fn report(version: u64) -> DeploymentReport {
        DeploymentReport {
            id: "d".into(),
            version,
            status: DeploymentStatus::Received,
            source: Source::Device,
            reasons: vec![],
            digest: None,
            updated_at: 1,
        }
    }

    fn at(mono_ms: u64) -> BootInstant {
        BootInstant {
            boot_id: "boot-1".into(),
            mono_ms,
        }
    }

    fn open(dir: &Path) -> (Store, Option<Recovery>) {
        Store::open(dir, 64 << 10).unwrap()
    }

    fn corrupt_copies(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, recovery) = open(dir.path());
            assert!(recovery.is_none());
            store.accept(&stored(3), &report(3), &at(10)).unwrap();
            store.set_last_good(&stored(2)).unwrap();
            store
                .set_history(
                    "a",
                    &ModuleHistory {
                        failures: 2,
                        restarts: 5,
                    },
                )
                .unwrap();
        }
        let (store, recovery) = open(dir.path());
        assert!(recovery.is_none());
        assert_eq!(store.commits(), 0, "a restart commits nothing");
        assert_eq!(store.desired().unwrap().unwrap().deployment.version, 3);
        assert_eq!(store.last_good().unwrap().unwrap().deployment.version, 2);
        assert_eq!(store.versions().unwrap()["device"], 3);
        assert_eq!(store.digests().unwrap()["device"], "digest-3");
        assert_eq!(store.history().unwrap()["a"].restarts, 5);
        store.retain_history(|m| m != "a").unwrap();
        assert!(store.history().unwrap().is_empty());
        let mode = fs::metadata(dir.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn versions_only_go_up_and_the_window_travels_with_the_deployment() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path());
            assert_eq!(store.window().unwrap(), None);
            store.accept(&stored(5), &report(5), &at(1_000)).unwrap();
            // A rollback to an older version keeps the source's highest version.
            store
                .set_desired(&stored(4), &report(5), &at(9_000))
                .unwrap();
            assert_eq!(store.window().unwrap(), Some(at(9_000)));
            store.accept(&stored(3), &report(3), &at(12_000)).unwrap();
            assert_eq!(store.versions().unwrap()["device"], 5);
        }
        let (store, _) = open(dir.path());
        assert_eq!(
            store.window().unwrap(),
            Some(at(12_000)),
            "survives a restart"
        );
        assert_eq!(store.desired().unwrap().unwrap().deployment.version, 3);
    }

    #[test]
    fn images_are_a_set_and_an_unchanged_set_costs_no_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path());
        assert!(store.images().unwrap().is_empty());
        store.add_images(["reg/a:1", "reg/b:1", "reg/a:1"]).unwrap();
        assert_eq!(
            store.images().unwrap(),
            BTreeSet::from(["reg/a:1".to_string(), "reg/b:1".to_string()])
        );
        let file = dir.path().join(FILE_NAME);
        let (commits, modified) = (
            store.commits(),
            fs::metadata(&file).unwrap().modified().unwrap(),
        );
        // What the reconciler does on every pass with nothing new: no commit, no write.
        for _ in 0..10 {
            store.add_images(["reg/b:1", "reg/a:1"]).unwrap();
            store.add_images(Vec::<String>::new()).unwrap();
            store.forget_image("reg/never-named:1").unwrap();
        }
        assert_eq!(store.commits(), commits);
        assert_eq!(fs::metadata(&file).unwrap().modified().unwrap(), modified);
        store.add_images(["reg/c:1".to_string()]).unwrap();
        assert_eq!(store.commits(), commits + 1);
        store.forget_image("reg/a:1").unwrap();
        assert_eq!(store.commits(), commits + 2);
        drop(store);
        let (store, _) = open(dir.path());
        assert_eq!(
            store.images().unwrap(),
            BTreeSet::from(["reg/b:1".to_string(), "reg/c:1".to_string()])
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let garbage: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + 3) as u8).collect();
        fs::write(dir.path().join(FILE_NAME), &garbage).unwrap();
        let (store, recovery) = open(dir.path());
        let recovery = recovery.expect("a recovery");
        assert!(
            recovery
                .moved_to
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("outpost.redb.corrupt-"),
            "{recovery:?}"
        );
        assert_eq!(
            fs::read(&recovery.moved_to).unwrap(),
            garbage,
            "kept as it was"
        );
        assert!(!recovery.reason.is_empty());
        assert_eq!(store.health().recovered.as_ref(), Some(&recovery));
        // A fresh store that works and survives.
        assert!(store.desired().unwrap().is_none());
        store.accept(&stored(1), &report(1), &at(1)).unwrap();
        drop(store);
        let (store, recovery) = open(dir.path());
        assert!(recovery.is_none());
        assert_eq!(store.desired().unwrap().unwrap().deployment.version, 1);
    }

    #[test]
    fn a_database_damaged_inside_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path());
            for v in 1..=20 {
                store.accept(&stored(v), &report(v), &at(v)).unwrap();
                store
                    .set_history(
                        &format!("module-{v}"),
                        &ModuleHistory {
                            failures: 1,
                            restarts: v as u32,
                        },
                    )
                    .unwrap();
            }
        }
        let file = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&file).unwrap();
        // Everything past redb's header pages: the tables' pages.
        for b in bytes.iter_mut().skip(8192) {
            *b ^= 0x5a;
        }
        fs::write(&file, &bytes).unwrap();
        let (store, recovery) = open(dir.path());
        let recovery = recovery.expect("a recovery");
        assert_eq!(fs::read(&recovery.moved_to).unwrap(), bytes);
        assert!(store.desired().unwrap().is_none());
    }

    #[test]
    fn an_entry_that_does_not_decode_moves_the_store_aside() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path());
            store.accept(&stored(1), &report(1), &at(1)).unwrap();
            store
                .write("test", Kind::Write, |t| {
                    t.meta
                        .insert(DESIRED, b"{\"not\": \"a deployment\"}".as_slice())
                        .unwrap();
                    Ok(((), true))
                })
                .unwrap();
            assert!(matches!(
                store.desired(),
                Err(StoreError::Corrupt { ref key, .. }) if key == DESIRED
            ));
        }
        let (store, recovery) = open(dir.path());
        let recovery = recovery.expect("a recovery");
        assert!(recovery.reason.contains("desired"), "{}", recovery.reason);
        assert!(store.desired().unwrap().is_none());
        assert_eq!(corrupt_copies(dir.path()), vec![recovery.moved_to]);
    }

    #[test]
    fn unknown_keys_from_a_newer_agent_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path());
            store.accept(&stored(2), &report(2), &at(1)).unwrap();
            store
                .write("test", Kind::Write, |t| {
                    t.meta
                        .insert("from_the_future", b"\x00\x01".as_slice())
                        .unwrap();
                    Ok(((), true))
                })
                .unwrap();
        }
        let (store, recovery) = open(dir.path());
        assert!(recovery.is_none());
        assert_eq!(store.desired().unwrap().unwrap().deployment.version, 2);
    }

    #[test]
    fn only_the_newest_damaged_copies_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        for ms in [100u64, 200, 300, 400] {
            fs::write(dir.path().join(format!("{FILE_NAME}.corrupt-{ms}")), b"old").unwrap();
        }
        fs::write(dir.path().join(FILE_NAME), b"not a database at all").unwrap();
        let (_store, recovery) = open(dir.path());
        let recovery = recovery.unwrap();
        let kept = corrupt_copies(dir.path());
        assert_eq!(kept.len(), CORRUPT_KEPT, "{kept:?}");
        assert!(kept.contains(&recovery.moved_to));
        assert!(kept.contains(&dir.path().join(format!("{FILE_NAME}.corrupt-400"))));
        assert!(!kept.contains(&dir.path().join(format!("{FILE_NAME}.corrupt-200"))));
    }

    #[test]
    fn a_store_in_use_is_refused_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = open(dir.path());
        first.accept(&stored(1), &report(1), &at(1)).unwrap();
        let err = Store::open(dir.path(), 0).unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert!(corrupt_copies(dir.path()).is_empty());
        assert_eq!(first.desired().unwrap().unwrap().deployment.version, 1);
    }

    #[test]
    fn the_reserve_is_made_at_open_and_resized_with_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = dir.path().join(RESERVE_FILE);
        {
            let (store, _) = Store::open(dir.path(), 100_000).unwrap();
            assert_eq!(fs::metadata(&reserve).unwrap().len(), 100_000);
            assert_eq!(
                fs::metadata(&reserve).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let health = store.health();
            assert!(health.reserve_held && health.reserve_in_use_since_ms.is_none());
            assert!(health.io_error.is_none());
        }
        {
            let (store, _) = Store::open(dir.path(), 50_000).unwrap();
            assert_eq!(fs::metadata(&reserve).unwrap().len(), 50_000);
            assert!(store.health().reserve_held);
        }
        let (store, _) = Store::open(dir.path(), 0).unwrap();
        assert!(!reserve.exists(), "no reserve configured, none kept");
        assert!(!store.health().reserve_held);
        assert_eq!(store.health().reserve_in_use_since_ms, None);
    }

    #[test]
    fn a_reserve_given_back_is_made_again_by_maintain() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), 100_000).unwrap();
        assert!(store.inner.release_reserve());
        assert!(!dir.path().join(RESERVE_FILE).exists());
        let health = store.health();
        assert!(!health.reserve_held && health.reserve_in_use_since_ms.is_some());
        assert!(!store.inner.release_reserve(), "nothing left to give");
        store.maintain().unwrap();
        assert_eq!(
            fs::metadata(dir.path().join(RESERVE_FILE)).unwrap().len(),
            100_000
        );
        assert!(store.health().reserve_held);
    }

    #[test]
    fn a_reserve_that_cannot_be_written_is_not_retried_every_pass() {
        let dir = tempfile::tempdir().unwrap();
        // Something that is not ours where the reserve goes: it cannot be replaced.
        fs::create_dir_all(dir.path().join(RESERVE_FILE).join("keep")).unwrap();
        let (store, _) = Store::open(dir.path(), 100_000).unwrap();
        let health = store.health();
        assert!(!health.reserve_held && health.reserve_in_use_since_ms.is_some());
        // The attempt at open failed; the next passes do not try again for a while.
        store.maintain().unwrap();
        store.maintain().unwrap();
        assert!(dir.path().join(RESERVE_FILE).join("keep").is_dir());
        assert_eq!(crate::fsutil::remove_stale_temps(dir.path()).unwrap(), 0);
        assert!(matches!(
            {
                store.inner.status().reserve_retry_at = None;
                store.maintain()
            },
            Err(StoreError::Reserve { .. })
        ));
    }

    #[test]
    fn stale_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir
            .path()
            .join(format!(".bus.key.99-0{}", crate::fsutil::TEMP_SUFFIX));
        fs::write(&stale, b"half").unwrap();
        let _store = open(dir.path());
        assert!(!stale.exists());
    }

    #[test]
    fn reopens_are_limited_to_a_burst_then_one_a_second() {
        let mut limiter = ReopenLimiter::default();
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(limiter.allow(ms(0)));
        assert!(limiter.allow(ms(1)));
        assert!(limiter.allow(ms(2)));
        assert!(!limiter.allow(ms(3)), "a fourth at once is held back");
        assert!(!limiter.allow(ms(2_999)));
        assert!(limiter.allow(ms(3_000)), "the first one left the window");
        assert!(!limiter.allow(ms(3_000)));
        // Steady state on a dead disk: one a second.
        let allowed = (0..10_000)
            .filter(|i| limiter.allow(ms(3_002 + i * 10)))
            .count();
        assert!((99..=101).contains(&allowed), "{allowed} in 100 s");
    }

    #[test]
    fn errors_say_what_failed() {
        let e = storage("accept", redb::Error::Io(io::Error::from_raw_os_error(28)));
        assert!(e.is_no_space() && e.wants_reopen(), "{e}");
        assert!(e.to_string().contains("disk is full"), "{e}");
        let e = storage("read", redb::Error::PreviousIo);
        assert!(!e.is_no_space() && e.wants_reopen());
        let e = StoreError::Corrupt {
            key: "desired".into(),
            message: "x".into(),
        };
        assert!(!e.wants_reopen(), "a bad entry is not the handle's fault");
    }
}
