//! What the reconciler keeps: the desired deployment with the start of its rollback window,
//! the last good one, the highest version and last digest per source, the last report, the
//! wall-clock floor, restart history, and the images deployments named.

use std::collections::{BTreeMap, BTreeSet};

use redb::ReadableTable as _;

use super::files::wall_ms;
use super::tables::{
    DESIRED, DIGESTS, GATE, HISTORY, IMAGES, LAST_GOOD, REPORT, TIME_FLOOR, VERSIONS, WINDOW,
    decode, encode, storage,
};
use super::{Kind, Store, StoreError, StoredDeployment};
use crate::clock::BootInstant;
use crate::planner::ModuleHistory;
use crate::state::{DeploymentReport, Source};

/// Where the desired deployment stands against update windows and locks
/// (docs/reconciler.md#update-windows-and-locks), kept so a restarted agent neither holds a
/// switch under way nor forgets when a lock's deadline started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SwitchGate {
    /// The desired deployment's digest: a gate of another deployment means nothing.
    pub digest: String,
    /// The switch began (or the deployment is a rollback): windows and locks no longer hold it.
    pub passed: bool,
    /// When an update lock first held it back: the lock's deadline counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_since: Option<BootInstant>,
}

impl Store {
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

    /// The desired deployment's gate; `None` from an agent before gates (its switch is then
    /// taken as begun).
    pub fn gate(&self) -> Result<Option<SwitchGate>, StoreError> {
        self.get(GATE)
    }

    /// Restarts the rollback window (a held deployment's switch begins).
    pub fn set_window(&self, window: &BootInstant) -> Result<(), StoreError> {
        self.write("set window", Kind::Write, |t| {
            t.put(WINDOW, window)?;
            Ok(((), true))
        })
    }

    pub fn set_gate(&self, gate: &SwitchGate) -> Result<(), StoreError> {
        self.write("set gate", Kind::Write, |t| {
            t.put(GATE, gate)?;
            Ok(((), true))
        })
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
            t.put(
                GATE,
                &SwitchGate {
                    digest: d.digest.clone(),
                    passed: false,
                    lock_since: None,
                },
            )?;
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

    /// Replaces the desired deployment (a rollback, or a switch that begins), the report and
    /// the window's start; its gate is passed (a rollback is never held by a window or a
    /// lock). On a full disk the reserve is given back for it.
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
            t.put(
                GATE,
                &SwitchGate {
                    digest: d.digest.clone(),
                    passed: true,
                    lock_since: None,
                },
            )?;
            Ok(((), true))
        })
    }

    /// Critical: the last good deployment is what a rollback restores, so a full disk may
    /// spend the reserve on it (whether the acceptance before it needed the reserve depends on
    /// the database's free pages, not on anything the device decides).
    pub fn set_last_good(&self, d: &StoredDeployment) -> Result<(), StoreError> {
        self.write("set last good", Kind::Critical, |t| {
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
}

/// The key under which a source's versions are counted.
pub fn source_key(source: &Source) -> String {
    match source {
        Source::Device => "device".into(),
        Source::Group { name } => format!("group:{name}"),
        Source::Local => "local".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    use crate::store::FILE_NAME;
    use crate::store::tests::{at, open, report, stored};

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
}
