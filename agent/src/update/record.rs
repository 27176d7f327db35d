//! The update record, `{state_dir}/agent/update.json`, and the slots beside it.
//!
//! The record says which binary the device keeps (`active`), which one is on trial, what the
//! last update came to, and which versions were given up. It is written whole (temporary file,
//! fsync, rename, fsync of the folder), so each step of an update has one commit point: a
//! `kill -9` or a power cut between two steps finds the record as it was before the step or
//! after it, never between.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::UpdatePhase;

/// Versions remembered as given up; the oldest are forgotten beyond this.
const MAX_REFUSED: usize = 16;

/// Where a binary of the agent lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    /// The binary the service starts (`/usr/bin/outpost` from the package): never written by
    /// an update, always there to fall back on.
    Installed,
    A,
    B,
}

impl Slot {
    pub fn name(self) -> &'static str {
        match self {
            Slot::Installed => "installed",
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    pub fn from_name(name: &str) -> Option<Slot> {
        [Slot::Installed, Slot::A, Slot::B]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The slot a new build goes into while this one is active: never the active one.
    pub fn free_beside(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::Installed | Slot::B => Slot::A,
        }
    }
}

/// One build of the agent, where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Build {
    pub slot: Slot,
    pub version: String,
    /// SHA-256 of the binary (`None` for the installed one: the package manager owns it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A build on probation: it runs under the launcher until it passes its health gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trial {
    pub build: Build,
    /// Times the launcher has started it; counted before each start, so that a crash (or a
    /// `kill -9` of the launcher) is counted too.
    pub starts: u32,
    /// The version it replaces, for messages.
    pub replaces: String,
}

/// How the last update ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub version: String,
    pub phase: UpdatePhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Unix seconds, as the device's clock said (for people; nothing is timed by it).
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// The build the device keeps: what runs whenever no trial is under way.
    pub active: Build,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<Trial>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Outcome>,
    /// Versions that were rolled back or did not verify: not tried again until a deployment
    /// names another version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

impl Record {
    /// The record of a device that never updated: the installed binary, at `version`.
    pub fn installed(version: &str) -> Record {
        Record {
            active: Build {
                slot: Slot::Installed,
                version: version.to_string(),
                sha256: None,
            },
            trial: None,
            last: None,
            refused: Vec::new(),
        }
    }

    /// Gives the trial up: the active build stays, and the trial's version is not tried again.
    pub fn roll_back(&mut self, reason: String, now: u64) {
        if let Some(trial) = self.trial.take() {
            self.refuse(&trial.build.version);
            self.last = Some(Outcome {
                version: trial.build.version,
                phase: UpdatePhase::RolledBack,
                reason: Some(reason),
                at: now,
            });
        }
    }

    /// Keeps the trial: it becomes the active build.
    pub fn commit(&mut self, now: u64) {
        if let Some(trial) = self.trial.take() {
            self.last = Some(Outcome {
                version: trial.build.version.clone(),
                phase: UpdatePhase::Committed,
                reason: None,
                at: now,
            });
            self.active = trial.build;
        }
    }

    pub fn refuse(&mut self, version: &str) {
        self.refused.retain(|v| v != version);
        self.refused.push(version.to_string());
        if self.refused.len() > MAX_REFUSED {
            self.refused.remove(0);
        }
    }

    pub fn is_refused(&self, version: &str) -> bool {
        self.refused.iter().any(|v| v == version)
    }
}

/// The files of the agent's own updates, under `{state_dir}/agent/`.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

/// The binary's file name inside a slot.
pub const BINARY: &str = "outpost";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is damaged ({detail}); the installed agent runs until an update writes it again"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Paths {
    pub fn new(state_dir: &Path) -> Paths {
        Paths {
            dir: state_dir.join("agent"),
        }
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("update.json")
    }

    /// What the agent on trial writes about its gate, for the launcher's messages.
    pub fn probation(&self) -> PathBuf {
        self.dir.join("probation.json")
    }

    pub fn downloads(&self) -> PathBuf {
        self.dir.join("download")
    }

    /// The binary of `slot`; `installed` is the launcher's own path.
    pub fn binary(&self, slot: Slot, installed: &Path) -> PathBuf {
        match slot {
            Slot::Installed => installed.to_path_buf(),
            s => self.dir.join(s.name()).join(BINARY),
        }
    }

    /// The record, or `None` when there is none (the device never updated).
    pub fn read(&self) -> Result<Option<Record>, RecordError> {
        let path = self.record();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(RecordError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| RecordError::Damaged {
                path,
                detail: e.to_string(),
            })
    }

    pub fn write(&self, record: &Record) -> Result<(), RecordError> {
        let path = self.record();
        let write = || {
            private_dir(&self.dir)?;
            // Serialising these plain types cannot fail.
            let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
            crate::fsutil::write_atomic(&path, &bytes, 0o600)
        };
        write().map_err(|source| RecordError::Write {
            path: path.clone(),
            source,
        })
    }
}

/// Creates `dir` (and its parents) owner-only when missing.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trial(version: &str) -> Trial {
        Trial {
            build: Build {
                slot: Slot::A,
                version: version.into(),
                sha256: Some("ab".repeat(32)),
            },
            starts: 0,
            replaces: "0.1.0".into(),
        }
    }

    #[test]
    fn commit_and_roll_back_end_the_trial() {
        let mut r = Record::installed("0.1.0");
        r.trial = Some(trial("0.2.0"));
        r.commit(5);
        assert_eq!(r.active.version, "0.2.0");
        assert_eq!(r.active.slot, Slot::A);
        assert_eq!(r.last.as_ref().unwrap().phase, UpdatePhase::Committed);
        assert!(r.trial.is_none());

        r.trial = Some(trial("0.3.0"));
        r.roll_back("it crashed".into(), 6);
        assert_eq!(r.active.version, "0.2.0", "the active build stays");
        assert_eq!(r.last.as_ref().unwrap().phase, UpdatePhase::RolledBack);
        assert!(r.is_refused("0.3.0") && !r.is_refused("0.2.0"));
    }

    #[test]
    fn the_refused_list_is_bounded() {
        let mut r = Record::installed("0.1.0");
        for i in 0..40 {
            r.refuse(&format!("0.0.{i}"));
        }
        assert_eq!(r.refused.len(), MAX_REFUSED);
        assert!(r.is_refused("0.0.39") && !r.is_refused("0.0.0"));
    }

    #[test]
    fn the_record_round_trips_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        assert!(paths.read().unwrap().is_none());
        let mut r = Record::installed("0.1.0");
        r.trial = Some(trial("0.2.0"));
        paths.write(&r).unwrap();
        assert_eq!(paths.read().unwrap(), Some(r));
        std::fs::write(paths.record(), b"{\"active\":").unwrap();
        let e = paths.read().unwrap_err().to_string();
        assert!(e.contains("update.json is damaged"), "{e}");
    }

    #[test]
    fn a_new_build_never_goes_into_the_active_slot() {
        for s in [Slot::Installed, Slot::A, Slot::B] {
            assert_ne!(s.free_beside(), s);
            assert_ne!(s.free_beside(), Slot::Installed);
        }
    }
}
