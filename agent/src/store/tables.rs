//! The store's schema in redb: its three tables and the keys of the `meta` table, the read and
//! write transactions every operation goes through, the check at start-up that every entry
//! decodes, and how entries are encoded and redb's errors reported.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use super::files::{OpenFailure, classify, is_no_space, panic_message};
use super::{Kind, Store, StoreError, StoredDeployment};
use crate::clock::BootInstant;
use crate::planner::ModuleHistory;
use crate::state::DeploymentReport;

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("restart_history");
/// The images deployments named: what image cleanup may remove. The value is the Unix ms when
/// the image was first named, for people only (the table's types predate the set, and changing
/// them would make older stores unreadable).
pub(super) const IMAGES: TableDefinition<&str, u64> = TableDefinition::new("images");

pub(super) const DESIRED: &str = "desired";
pub(super) const LAST_GOOD: &str = "last_good";
pub(super) const VERSIONS: &str = "versions";
pub(super) const DIGESTS: &str = "digests";
pub(super) const REPORT: &str = "report";
/// When the desired deployment's rollback window started ([`BootInstant`]).
pub(super) const WINDOW: &str = "window";
/// The latest wall-clock time (Unix ms) known to be true: when a deployment was accepted with a
/// plausible clock. Expiry is never judged earlier than this after a reboot at 1970.
pub(super) const TIME_FLOOR: &str = "time_floor";
/// Whether the desired deployment's switch has begun, and since when an update lock holds it
/// ([`SwitchGate`](super::SwitchGate)).
pub(super) const GATE: &str = "gate";

/// The tables of one write transaction.
pub(super) struct Tables<'t> {
    pub(super) meta: redb::Table<'t, &'static str, &'static [u8]>,
    pub(super) history: redb::Table<'t, &'static str, &'static [u8]>,
    pub(super) images: redb::Table<'t, &'static str, u64>,
}

impl Tables<'_> {
    pub(super) fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let value = self.meta.get(key).map_err(|e| storage("read", e))?;
        value.map(|v| decode(key, v.value())).transpose()
    }

    pub(super) fn put<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = encode(key, value)?;
        self.meta
            .insert(key, bytes.as_slice())
            .map_err(|e| storage("write", e))?;
        Ok(())
    }
}

impl Store {
    pub(super) fn get<T: DeserializeOwned>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        self.read("read", |txn| {
            let table = txn.open_table(META).map_err(|e| storage("read", e))?;
            let value = table.get(key).map_err(|e| storage("read", e))?;
            value.map(|v| decode(key, v.value())).transpose()
        })
    }

    pub(super) fn read<T>(
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
    pub(super) fn write<T>(
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
}

/// Reads every entry, so that one that does not decode is found at start-up (and the store
/// moved aside) rather than failing a read forever after.
pub(super) fn validate(db: &Database) -> Result<(), OpenFailure> {
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
        GATE => serde_json::from_slice::<super::SwitchGate>(bytes).map(drop),
        _ => Ok(()),
    }
}

/// Whether opening a table failed only because it does not exist yet.
pub(super) fn table_missing<T>(opened: Result<T, redb::TableError>) -> Result<bool, StoreError> {
    match opened {
        Ok(_) => Ok(false),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(true),
        Err(e) => Err(storage("check tables", e)),
    }
}

/// A redb error as the store reports it: lack of space apart, as callers treat it apart.
pub(super) fn storage(op: &'static str, e: impl Into<redb::Error>) -> StoreError {
    let source = e.into();
    if is_no_space(&source) {
        StoreError::NoSpace { op, source }
    } else {
        StoreError::Io { op, source }
    }
}

pub(super) fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode {
        key: key.to_string(),
        message: e.to_string(),
    })
}

pub(super) fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    use crate::store::tests::{at, corrupt_copies, open, report, stored};

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
