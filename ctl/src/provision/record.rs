//! The responder's record of what it issued: an append-only file of JSON lines
//! (`issued.jsonl` in its state folder), each written and fsynced before the answer goes out,
//! and read back at start so a restarted responder knows every serial it issued.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// One issued certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Unix seconds (the responder's clock).
    pub at: u64,
    /// `claim`, `reissue`, `renew`.
    pub kind: String,
    pub serial: String,
    pub device_id: String,
    /// SHA-256 of the device's public key (hex): the same device asking again is recognised
    /// by it.
    pub key_sha256: String,
    pub not_after: u64,
    /// The certificate's serial number (hex).
    pub certificate_serial: String,
}

/// The record, and the latest entry per serial and per device.
pub struct Record {
    path: PathBuf,
    file: File,
    by_serial: HashMap<String, Entry>,
    serial_of_device: HashMap<String, String>,
}

impl Record {
    /// Opens (or creates) the record in `dir` and reads what it holds. A last line cut short
    /// by a crash is skipped with a warning: its answer was never sent.
    pub fn open(dir: &Path) -> Result<Record> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the state folder {}", dir.display()))?;
        let path = dir.join("issued.jsonl");
        let mut record = Record {
            file: OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?,
            path,
            by_serial: HashMap::new(),
            serial_of_device: HashMap::new(),
        };
        let reader = BufReader::new(
            File::open(&record.path)
                .with_context(|| format!("cannot read {}", record.path.display()))?,
        );
        for (n, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read {}", record.path.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Entry>(&line) {
                Ok(entry) => record.index(entry),
                Err(e) => {
                    tracing::warn!(file = %record.path.display(), line = n + 1, error = %e, "a damaged line of the record skipped")
                }
            }
        }
        Ok(record)
    }

    fn index(&mut self, entry: Entry) {
        self.serial_of_device
            .insert(entry.device_id.clone(), entry.serial.clone());
        self.by_serial.insert(entry.serial.clone(), entry);
    }

    /// Appends `entry` durably (fsync) before it counts.
    pub fn append(&mut self, entry: Entry) -> Result<()> {
        let mut line = serde_json::to_string(&entry)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .with_context(|| format!("cannot append to {}", self.path.display()))?;
        self.index(entry);
        Ok(())
    }

    /// The latest certificate issued for `serial`.
    pub fn for_serial(&self, serial: &str) -> Option<&Entry> {
        self.by_serial.get(serial)
    }

    /// The latest certificate issued to `device`.
    pub fn for_device(&self, device: &str) -> Option<&Entry> {
        self.by_serial.get(self.serial_of_device.get(device)?)
    }

    /// Whether `device` names a device of another serial.
    pub fn device_taken_by_other(&self, device: &str, serial: &str) -> bool {
        self.serial_of_device
            .get(device)
            .is_some_and(|s| s != serial)
    }

    pub fn len(&self) -> usize {
        self.by_serial.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_serial.is_empty()
    }
}
