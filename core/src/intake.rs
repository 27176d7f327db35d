//! Intake: the one path from untrusted bytes (a hub message, a file, a local API body) to a
//! deployment the device may act on. Order matters: size, then envelope and signature, then the
//! manifest's own checks, so that nothing unsigned is even parsed as a manifest on a device that
//! requires signatures.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{self, Deployment, Issue, ManifestError};
use crate::signing::{Envelope, SignatureError, TrustedKeys};

/// Largest message intake reads: a maximal manifest, base64-encoded, plus the envelope.
pub const MAX_MESSAGE_BYTES: usize = manifest::MAX_MANIFEST_BYTES * 4 / 3 + 16 * 1024;

/// How a deployment reached the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Provenance {
    /// A bare manifest, accepted because the device trusts no keys.
    Unsigned,
    /// Signed by this trusted key.
    Signed { key_id: String },
    /// An envelope on a device that trusts no keys: its signature was not checked.
    SignatureNotChecked,
}

/// A deployment that passed intake.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub deployment: Deployment,
    pub provenance: Provenance,
    /// SHA-256 of the manifest bytes, hex: identifies exactly what was accepted.
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    #[error("message is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("signature check failed: {0}")]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl IntakeError {
    /// Every issue with its path, for reported state and `--json` output.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            IntakeError::TooLarge { .. } => vec![Issue::new("", self.to_string())],
            IntakeError::Signature(e) => vec![Issue::new(e.path(), e.to_string())],
            IntakeError::Manifest(e) => e.issues(),
        }
    }
}

/// Reads a message that holds either a manifest or a DSSE envelope around one.
///
/// With trusted keys, only an envelope signed by one of them is accepted. Without any, a bare
/// manifest is accepted and an envelope is opened without checking its signature (and says so
/// in its [`Provenance`]). Fails with every issue found.
pub fn intake(bytes: &[u8], trusted: &TrustedKeys) -> Result<Accepted, IntakeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(IntakeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let (payload, provenance) = match envelope_of(bytes)? {
        Some(envelope) if trusted.is_empty() => (
            crate::signing::open(&envelope)?,
            Provenance::SignatureNotChecked,
        ),
        Some(envelope) => {
            let (payload, key_id) = trusted.verify(&envelope)?;
            (payload, Provenance::Signed { key_id })
        }
        None if trusted.is_empty() => (bytes.to_vec(), Provenance::Unsigned),
        None => {
            return Err(SignatureError::Unsigned {
                count: trusted.len(),
            }
            .into());
        }
    };
    let mut deployment = manifest::parse(&payload)?;
    // A process module's executable stands where an image would: the planner stages it (is
    // it on the device?), the reports show it, like an image.
    for m in deployment.modules.values_mut() {
        if m.runtime == manifest::RuntimeKind::Process && m.image.is_empty() {
            m.image = m.command.first().cloned().unwrap_or_default();
        }
    }
    Ok(Accepted {
        deployment,
        provenance,
        digest: hex_sha256(&payload),
    })
}

/// `Some` when the message is a JSON object with a `payloadType` key, i.e. meant as an envelope.
fn envelope_of(bytes: &[u8]) -> Result<Option<Envelope>, SignatureError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "payloadType")]
        payload_type: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(Probe {
            payload_type: Some(_),
        }) => serde_json::from_slice::<Envelope>(bytes)
            .map(Some)
            .map_err(|e| SignatureError::Malformed(e.to_string())),
        // Not an envelope (or not JSON at all): the manifest parser reports it.
        _ => Ok(None),
    }
}

pub fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::sign;
    use ed25519_dalek::SigningKey;

    const MANIFEST: &str = r#"{"schemaVersion":"1.0","id":"t","version":1,
        "modules":{"a":{"image":"127.0.0.1:5000/a:1"}}}"#;

    #[test]
    fn a_signed_manifest_is_accepted_by_its_key_only() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let env = serde_json::to_vec(&sign(MANIFEST.as_bytes(), &key)).unwrap();
        let trusted = TrustedKeys::new([key.verifying_key()]);
        let accepted = intake(&env, &trusted).unwrap();
        assert!(matches!(accepted.provenance, Provenance::Signed { .. }));
        assert_eq!(accepted.digest, hex_sha256(MANIFEST.as_bytes()));

        let stranger = TrustedKeys::new([SigningKey::from_bytes(&[8; 32]).verifying_key()]);
        assert!(matches!(
            intake(&env, &stranger),
            Err(IntakeError::Signature(SignatureError::UnknownKey { .. }))
        ));
    }

    #[test]
    fn unsigned_is_refused_when_keys_are_trusted() {
        let trusted = TrustedKeys::new([SigningKey::from_bytes(&[7; 32]).verifying_key()]);
        assert!(matches!(
            intake(MANIFEST.as_bytes(), &trusted),
            Err(IntakeError::Signature(SignatureError::Unsigned {
                count: 1
            }))
        ));
        assert_eq!(
            intake(MANIFEST.as_bytes(), &TrustedKeys::default())
                .unwrap()
                .provenance,
            Provenance::Unsigned
        );
    }

    #[test]
    fn a_broken_envelope_says_so() {
        let err = intake(br#"{"payloadType": 5}"#, &TrustedKeys::default()).unwrap_err();
        assert!(matches!(
            err,
            IntakeError::Signature(SignatureError::Malformed(_))
        ));
    }
}
