//! The agent's durable state in an embedded redb database: the accepted deployment, the last
//! deployment that became healthy, the highest version seen per source, and restart history.
//! Everything here is written (and committed with fsync) before the agent acts on it, so a
//! `kill -9` or a power cut at any point leaves either the old or the new state, never a mix.
//!
//! The file holds registry credentials, so it is created owner-only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::clock::BootInstant;
use crate::intake::Provenance;
use crate::manifest::Deployment;
use crate::planner::ModuleHistory;
use crate::state::{DeploymentReport, Source};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("restart_history");
/// Image reference → Unix ms when a deployment last used it: what image cleanup may remove.
const IMAGES: TableDefinition<&str, u64> = TableDefinition::new("images");

const DESIRED: &str = "desired";
const LAST_GOOD: &str = "last_good";
const VERSIONS: &str = "versions";
const DIGESTS: &str = "digests";
const REPORT: &str = "report";
const WINDOW: &str = "window";

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
    #[error("cannot open the store at {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("store {op} failed: {message}")]
    Io { op: &'static str, message: String },
    #[error("store entry `{key}` is corrupt: {message}")]
    Corrupt { key: String, message: String },
}

fn io(op: &'static str) -> impl Fn(redb::Error) -> StoreError {
    move |e| StoreError::Io {
        op,
        message: e.to_string(),
    }
}

#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens (or creates) `DIR/outpost.redb`, creating the folder owner-only.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: dir.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(e.to_string()))?;
        set_mode(dir, 0o700).map_err(|e| open_err(e.to_string()))?;
        let path = dir.join("outpost.redb");
        let db = Database::create(&path).map_err(|e| open_err(e.to_string()))?;
        set_mode(&path, 0o600).map_err(|e| open_err(e.to_string()))?;
        let store = Store { db: Arc::new(db) };
        // Create the tables so that readers never meet a missing one.
        store.write(|_, _| Ok(()))?;
        {
            let txn = store.db.begin_write().map_err(|e| io("begin")(e.into()))?;
            txn.open_table(IMAGES)
                .map_err(|e| io("open table")(e.into()))?;
            txn.commit().map_err(|e| io("commit")(e.into()))?;
        }
        Ok(store)
    }

    fn write(
        &self,
        f: impl FnOnce(
            &mut redb::Table<&str, &[u8]>,
            &mut redb::Table<&str, &[u8]>,
        ) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("begin")(e.into()))?;
        {
            let mut meta = txn
                .open_table(META)
                .map_err(|e| io("open table")(e.into()))?;
            let mut history = txn
                .open_table(HISTORY)
                .map_err(|e| io("open table")(e.into()))?;
            f(&mut meta, &mut history)?;
        }
        txn.commit().map_err(|e| io("commit")(e.into()))
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("begin")(e.into()))?;
        let table = txn
            .open_table(META)
            .map_err(|e| io("open table")(e.into()))?;
        let Some(value) = table.get(key).map_err(|e| io("read")(e.into()))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: key.to_string(),
                message: e.to_string(),
            })
    }

    fn put<T: Serialize>(
        meta: &mut redb::Table<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Io {
            op: "encode",
            message: e.to_string(),
        })?;
        meta.insert(key, bytes.as_slice())
            .map_err(|e| io("write")(e.into()))?;
        Ok(())
    }

    pub fn desired(&self) -> Result<Option<StoredDeployment>, StoreError> {
        self.get(DESIRED)
    }

    pub fn last_good(&self) -> Result<Option<StoredDeployment>, StoreError> {
        self.get(LAST_GOOD)
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

    /// When the deployment in force started applying (its rollback window), on the monotonic
    /// clock of the boot that started it.
    pub fn window(&self) -> Result<Option<BootInstant>, StoreError> {
        self.get(WINDOW)
    }

    /// Stores a newly accepted deployment, its version and its window in one transaction.
    pub fn accept(
        &self,
        d: &StoredDeployment,
        report: &DeploymentReport,
        window: &BootInstant,
    ) -> Result<(), StoreError> {
        let mut versions = self.versions()?;
        let mut digests = self.digests()?;
        let key = source_key(&d.source);
        let v = versions.entry(key.clone()).or_default();
        *v = (*v).max(d.deployment.version);
        digests.insert(key, d.digest.clone());
        self.write(|meta, _| {
            Self::put(meta, DESIRED, d)?;
            Self::put(meta, VERSIONS, &versions)?;
            Self::put(meta, DIGESTS, &digests)?;
            Self::put(meta, WINDOW, window)?;
            Self::put(meta, REPORT, report)
        })
    }

    /// Replaces the desired deployment (a rollback) and records the report.
    pub fn set_desired(
        &self,
        d: &StoredDeployment,
        report: &DeploymentReport,
        window: &BootInstant,
    ) -> Result<(), StoreError> {
        self.write(|meta, _| {
            Self::put(meta, DESIRED, d)?;
            Self::put(meta, WINDOW, window)?;
            Self::put(meta, REPORT, report)
        })
    }

    pub fn set_last_good(&self, d: &StoredDeployment) -> Result<(), StoreError> {
        self.write(|meta, _| Self::put(meta, LAST_GOOD, d))
    }

    pub fn set_report(&self, report: &DeploymentReport) -> Result<(), StoreError> {
        self.write(|meta, _| Self::put(meta, REPORT, report))
    }

    pub fn history(&self) -> Result<BTreeMap<String, ModuleHistory>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("begin")(e.into()))?;
        let table = txn
            .open_table(HISTORY)
            .map_err(|e| io("open table")(e.into()))?;
        let mut out = BTreeMap::new();
        for entry in table.iter().map_err(|e| io("read")(e.into()))? {
            let (k, v) = entry.map_err(|e| io("read")(e.into()))?;
            let h = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                key: k.value().to_string(),
                message: e.to_string(),
            })?;
            out.insert(k.value().to_string(), h);
        }
        Ok(out)
    }

    pub fn set_history(&self, module: &str, h: &ModuleHistory) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(h).map_err(|e| StoreError::Io {
            op: "encode",
            message: e.to_string(),
        })?;
        self.write(|_, history| {
            history
                .insert(module, bytes.as_slice())
                .map_err(|e| io("write")(e.into()))?;
            Ok(())
        })
    }

    /// Forgets the history of modules no longer deployed.
    pub fn retain_history(&self, keep: impl Fn(&str) -> bool) -> Result<(), StoreError> {
        let stale: Vec<String> = self.history()?.into_keys().filter(|k| !keep(k)).collect();
        if stale.is_empty() {
            return Ok(());
        }
        self.write(|_, history| {
            for k in &stale {
                history
                    .remove(k.as_str())
                    .map_err(|e| io("write")(e.into()))?;
            }
            Ok(())
        })
    }
}

impl Store {
    /// Images deployments have named: the ones image cleanup may remove once unused.
    pub fn images(&self) -> Result<BTreeSet<String>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| io("begin")(e.into()))?;
        let table = txn
            .open_table(IMAGES)
            .map_err(|e| io("open table")(e.into()))?;
        let mut out = BTreeSet::new();
        for entry in table.iter().map_err(|e| io("read")(e.into()))? {
            let (k, _) = entry.map_err(|e| io("read")(e.into()))?;
            out.insert(k.value().to_string());
        }
        Ok(out)
    }

    /// Records images a deployment names; commits only when one is new (no flash wear).
    pub fn add_images<'a>(
        &self,
        images: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), StoreError> {
        let known = self.images()?;
        let new: Vec<&str> = images.into_iter().filter(|i| !known.contains(*i)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| io("begin")(e.into()))?;
        {
            let mut table = txn
                .open_table(IMAGES)
                .map_err(|e| io("open table")(e.into()))?;
            for image in new {
                table.insert(image, 0).map_err(|e| io("write")(e.into()))?;
            }
        }
        txn.commit().map_err(|e| io("commit")(e.into()))
    }

    pub fn forget_image(&self, image: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| io("begin")(e.into()))?;
        {
            let mut table = txn
                .open_table(IMAGES)
                .map_err(|e| io("open table")(e.into()))?;
            table.remove(image).map_err(|e| io("write")(e.into()))?;
        }
        txn.commit().map_err(|e| io("commit")(e.into()))
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

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::DeploymentStatus;

    fn stored(version: u64) -> StoredDeployment {
        StoredDeployment {
            deployment: serde_json::from_str(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":{version},"modules":{{}}}}"#
            ))
            .unwrap(),
            source: Source::Device,
            provenance: Provenance::Unsigned,
            digest: "x".into(),
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

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let window = BootInstant {
                boot_id: "b".into(),
                mono_ms: 7,
            };
            store.accept(&stored(3), &report(3), &window).unwrap();
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
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.desired().unwrap().unwrap().deployment.version, 3);
        assert_eq!(store.last_good().unwrap().unwrap().deployment.version, 2);
        assert_eq!(store.versions().unwrap()["device"], 3);
        assert_eq!(store.window().unwrap().unwrap().mono_ms, 7);
        assert_eq!(store.history().unwrap()["a"].restarts, 5);
        store.retain_history(|m| m != "a").unwrap();
        assert!(store.history().unwrap().is_empty());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("outpost.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
