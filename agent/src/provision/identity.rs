//! The device's identity on disk, in `{state_dir}/identity/`:
//!
//! - `device.pem`: the private key and the certificate chain in one file (mode 600), so the
//!   key and its certificate are replaced together by one rename — never a key with another
//!   key's certificate;
//! - `identity.json`: the device id, groups, serial, and the certificate's times as the
//!   responder gave them. Written after `device.pem`: its presence is the commit point of first
//!   boot, so a power cut leaves either no identity or a complete one;
//! - `pending-key.pem`: a key made for a request not yet answered, kept across restarts so
//!   that a request repeated after a crash carries the same key (the responder answers it
//!   again instead of refusing a serial it already issued);
//! - `refusal.json`: the responder's last refusal, for `outpost check`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ProvisionError;
use crate::fsutil;

/// The files of the identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub dir: PathBuf,
    pub pem: PathBuf,
    pub meta: PathBuf,
    pub pending_key: PathBuf,
    pub refusal: PathBuf,
}

impl IdentityFiles {
    pub fn new(state_dir: &Path) -> IdentityFiles {
        let dir = state_dir.join("identity");
        IdentityFiles {
            pem: dir.join("device.pem"),
            meta: dir.join("identity.json"),
            pending_key: dir.join("pending-key.pem"),
            refusal: dir.join("refusal.json"),
            dir,
        }
    }
}

/// What the responder gave the device, and how long it has run since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub device_id: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub serial: String,
    /// The responder's clock at issuance (Unix seconds).
    pub issued_at: u64,
    pub not_before: u64,
    pub not_after: u64,
    /// The responder's clock minus the device's at issuance: the device's clock plus this is
    /// its best estimate of real time while the clock has not been reset (a device without a
    /// real-time clock that boots at 1970 has a large positive offset).
    pub clock_offset_secs: i64,
    /// How long the agent has run since the certificate was installed (persisted now and
    /// then): a lower bound of the certificate's age that no clock can move.
    #[serde(default)]
    pub run_secs: u64,
}

impl Identity {
    pub fn lifetime(&self) -> u64 {
        self.not_after.saturating_sub(self.not_before)
    }
}

/// The refusal kept for `outpost check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub serial: String,
    pub reason: String,
    /// Unix seconds by the device's clock.
    pub at: u64,
}

fn identity_error(files: &IdentityFiles, message: impl Into<String>) -> ProvisionError {
    ProvisionError::Identity {
        dir: files.dir.clone(),
        message: message.into(),
    }
}

/// The stored identity, if first boot completed: `identity.json` and `device.pem` both there.
///
/// Fails when they are there but unreadable or malformed (not the same as "no identity": the
/// device must not silently make a new one while an old one may still be good).
pub fn load(files: &IdentityFiles) -> Result<Option<Identity>, ProvisionError> {
    let text = match std::fs::read(&files.meta) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(identity_error(
                files,
                format!("cannot read {}: {e}", files.meta.display()),
            ));
        }
    };
    let identity: Identity = serde_json::from_slice(&text).map_err(|e| {
        identity_error(
            files,
            format!(
                "{} is not a valid identity: {e}; move the folder aside to provision again",
                files.meta.display()
            ),
        )
    })?;
    if !files.pem.is_file() {
        return Err(identity_error(
            files,
            format!(
                "{} is missing beside {}; move the folder aside to provision again",
                files.pem.display(),
                files.meta.display()
            ),
        ));
    }
    Ok(Some(identity))
}

/// The key to put in a request: the pending one (a request made before a restart), else the
/// current identity's (so the responder recognises the device), else a new one, stored as
/// pending before it is used.
pub fn request_key(files: &IdentityFiles, fresh: bool) -> Result<rcgen::KeyPair, ProvisionError> {
    ensure_dir(files)?;
    if let Ok(pem) = std::fs::read_to_string(&files.pending_key) {
        match rcgen::KeyPair::from_pem(&pem) {
            Ok(key) => return Ok(key),
            Err(e) => {
                tracing::warn!(file = %files.pending_key.display(), error = %e, "the pending key is unusable; making a new one")
            }
        }
    }
    if !fresh
        && let Ok(pem) = std::fs::read_to_string(&files.pem)
        && let Ok(key) = rcgen::KeyPair::from_pem(&pem)
    {
        return Ok(key);
    }
    let key = rcgen::KeyPair::generate().map_err(|e| ProvisionError::Key(e.to_string()))?;
    fsutil::write_atomic(&files.pending_key, key.serialize_pem().as_bytes(), 0o600).map_err(
        |source| ProvisionError::Store {
            path: files.pending_key.clone(),
            source,
        },
    )?;
    Ok(key)
}

/// A PKCS#10 request for `key` with `common_name` as its subject.
pub fn csr(key: &rcgen::KeyPair, common_name: &str) -> Result<String, ProvisionError> {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .serialize_request(key)
        .and_then(|r| r.pem())
        .map_err(|e| ProvisionError::Key(e.to_string()))
}

/// Stores a new certificate with its key: `device.pem` (key and chain, one rename), then
/// `identity.json`, then forgets the pending key and any refusal.
pub fn commit(
    files: &IdentityFiles,
    key: &rcgen::KeyPair,
    chain_pem: &str,
    identity: &Identity,
) -> Result<(), ProvisionError> {
    ensure_dir(files)?;
    let mut pem = key.serialize_pem();
    if !pem.ends_with('\n') {
        pem.push('\n');
    }
    pem.push_str(chain_pem);
    let store = |path: &Path, bytes: &[u8]| {
        fsutil::write_atomic(path, bytes, 0o600).map_err(|source| ProvisionError::Store {
            path: path.to_path_buf(),
            source,
        })
    };
    store(&files.pem, pem.as_bytes())?;
    save(files, identity)?;
    for done in [&files.pending_key, &files.refusal] {
        match std::fs::remove_file(done) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Harmless: a stale pending key is only reused for the next request.
            Err(e) => tracing::warn!(file = %done.display(), error = %e, "cannot remove"),
        }
    }
    fsutil::sync_dir(&files.dir).map_err(|source| ProvisionError::Store {
        path: files.dir.clone(),
        source,
    })
}

/// Writes `identity.json` again (its run time, after a renewal).
pub fn save(files: &IdentityFiles, identity: &Identity) -> Result<(), ProvisionError> {
    let json = serde_json::to_vec_pretty(identity).map_err(|e| ProvisionError::Store {
        path: files.meta.clone(),
        source: std::io::Error::other(e),
    })?;
    fsutil::write_atomic(&files.meta, &json, 0o600).map_err(|source| ProvisionError::Store {
        path: files.meta.clone(),
        source,
    })
}

/// Keeps the responder's refusal where `outpost check` finds it (best effort).
pub fn record_refusal(files: &IdentityFiles, refusal: &Refusal) {
    let result = ensure_dir(files).and_then(|()| {
        let json = serde_json::to_vec_pretty(refusal).unwrap_or_default();
        fsutil::write_atomic(&files.refusal, &json, 0o600).map_err(|source| ProvisionError::Store {
            path: files.refusal.clone(),
            source,
        })
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot record the refusal");
    }
}

/// The last refusal, if any.
pub fn last_refusal(files: &IdentityFiles) -> Option<Refusal> {
    serde_json::from_slice(&std::fs::read(&files.refusal).ok()?).ok()
}

fn ensure_dir(files: &IdentityFiles) -> Result<(), ProvisionError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&files.dir)
        .map_err(|source| ProvisionError::Store {
            path: files.dir.clone(),
            source,
        })?;
    // A crash mid-write leaves temporaries; nothing else writes here while this runs.
    let _ = fsutil::remove_stale_temps(&files.dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            device_id: "cam-1".into(),
            groups: vec!["line-3".into()],
            serial: "SN-1".into(),
            issued_at: 1_800_000_000,
            not_before: 1_799_999_700,
            not_after: 1_800_086_400,
            clock_offset_secs: 0,
            run_secs: 0,
        }
    }

    #[test]
    fn a_request_survives_a_restart_with_the_same_key() {
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(dir.path());
        let first = request_key(&files, false).unwrap();
        let again = request_key(&files, false).unwrap();
        assert_eq!(first.public_key_pem(), again.public_key_pem());
        assert!(load(&files).unwrap().is_none(), "no identity before commit");
        let pem = csr(&first, "SN-1").unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE REQUEST"), "{pem}");
    }

    #[test]
    fn commit_stores_key_and_chain_together_and_forgets_the_pending_key() {
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(dir.path());
        let key = request_key(&files, false).unwrap();
        record_refusal(
            &files,
            &Refusal {
                serial: "SN-1".into(),
                reason: "not yet".into(),
                at: 1,
            },
        );
        assert_eq!(last_refusal(&files).unwrap().reason, "not yet");
        commit(&files, &key, "-----BEGIN CERTIFICATE-----\n", &identity()).unwrap();
        assert_eq!(load(&files).unwrap(), Some(identity()));
        assert!(!files.pending_key.exists() && last_refusal(&files).is_none());
        let pem = std::fs::read_to_string(&files.pem).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
        assert!(pem.contains("BEGIN CERTIFICATE"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&files.pem).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The current key is what a renewal-by-claim asks with; a fresh one for a renewal.
        let same = request_key(&files, false).unwrap();
        assert_eq!(same.public_key_pem(), key.public_key_pem());
        let fresh = request_key(&files, true).unwrap();
        assert_ne!(fresh.public_key_pem(), key.public_key_pem());
    }

    #[test]
    fn a_damaged_identity_is_an_error_not_a_first_boot() {
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(dir.path());
        std::fs::create_dir_all(&files.dir).unwrap();
        std::fs::write(&files.meta, "{").unwrap();
        let err = load(&files).unwrap_err().to_string();
        assert!(
            err.contains("identity.json is not a valid identity"),
            "{err}"
        );
        save(&files, &identity()).unwrap();
        let err = load(&files).unwrap_err().to_string();
        assert!(err.contains("device.pem is missing"), "{err}");
    }
}
