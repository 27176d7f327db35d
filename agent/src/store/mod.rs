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
//!   that a dead disk does not spin. Every transaction lives inside this module's methods, so no
//!   other handle holds the file lock when a reopen needs it.
//! - **A full disk.** `STATE_DIR/reserve`, a file of zeros of `disk.store_reserve_bytes`, is
//!   given back when a write that changes the deployment fails for lack of space; the write then
//!   commits. [`Store::maintain`] makes the reserve again once the filesystem has room.
//! - **Corruption.** A file that is not a readable database, or holds an entry that does not
//!   decode, is moved aside to `outpost.redb.corrupt-<unix ms>` by [`Store::open`] (the newest
//!   three are kept for diagnosis) and a fresh store takes its place.
//!
//! The file holds registry credentials, so it is created owner-only.
//!
//! # Layout
//!
//! - this file: the public types, the handle and [`Store::open`] (with the start-up checks),
//!   upkeep and health.
//! - `tables.rs`: the redb tables and keys, transactions, the start-up check of every entry.
//! - `deployments.rs`: what the reconciler stores (deployments, versions, reports, history,
//!   images).
//! - `reopen.rs`: retrying an operation after an I/O error by reopening the database.
//! - `reserve.rs`: the emergency reserve for a full disk.
//! - `files.rs`: opening the file, moving a damaged one aside, file-system helpers.

mod deployments;
mod files;
mod reopen;
mod reserve;
mod tables;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use redb::Database;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::intake::Provenance;
use crate::manifest::Deployment;
use crate::state::Source;

pub use deployments::{SwitchGate, source_key};
use files::{OpenFailure, move_aside, set_mode};
pub use reopen::ReopenLimiter;
use tables::{HISTORY, IMAGES, META, table_missing, validate};

/// The database file in the state directory.
pub const FILE_NAME: &str = "outpost.redb";

/// The emergency reserve in the state directory.
pub const RESERVE_FILE: &str = "reserve";

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
}

impl Inner {
    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    //! The store's tests of opening, and the helpers the other files' tests share.

    use super::*;
    use crate::clock::BootInstant;
    use crate::planner::ModuleHistory;
    use crate::state::{DeploymentReport, DeploymentStatus};

    pub(super) fn stored(version: u64) -> StoredDeployment {
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

    pub(super) fn report(version: u64) -> DeploymentReport {
        DeploymentReport {
            id: "d".into(),
            version,
            status: DeploymentStatus::Received,
            source: Source::Device,
            reasons: vec![],
            digest: None,
            updated_at: 1,
            waiting: None,
        }
    }

    pub(super) fn at(mono_ms: u64) -> BootInstant {
        BootInstant {
            boot_id: "boot-1".into(),
            mono_ms,
        }
    }

    pub(super) fn open(dir: &Path) -> (Store, Option<Recovery>) {
        Store::open(dir, 64 << 10).unwrap()
    }

    pub(super) fn corrupt_copies(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        out.sort();
        out
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
    fn stale_temporary_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir
            .path()
            .join(format!(".bus.key.99-0{}", crate::fsutil::TEMP_SUFFIX));
        fs::write(&stale, b"half").unwrap();
        let _store = open(dir.path());
        assert!(!stale.exists());
    }
}
