//! Ed25519 keys and DSSE envelopes: how an operator signs a deployment and a device checks it.
//!
//! The envelope is the one from the Secure Systems Lab's DSSE specification:
//! `{"payloadType": ..., "payload": base64, "signatures": [{"keyid": ..., "sig": base64}]}`,
//! signed over the pre-authentication encoding `DSSEv1 LEN(type) type LEN(body) body`, so the
//! payload type is covered by the signature and a signed deployment cannot be replayed as
//! something else. Key ids are the first 16 bytes of the SHA-256 of the raw public key, in hex.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The payload type of a signed Outpost deployment.
pub const PAYLOAD_TYPE: &str = "application/vnd.outpost.deployment+json";
/// The payload type of a signed withdrawal of a source's deployment (a tombstone).
pub const WITHDRAWAL_TYPE: &str = "application/vnd.outpost.withdrawal+json";
/// The payload type of a signed hub command.
pub const COMMAND_TYPE: &str = "application/vnd.outpost.command+json";

/// A DSSE envelope as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the 64-byte Ed25519 signature.
    pub sig: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an Ed25519 {kind} key in PEM (PKCS#8 / SPKI): {detail}")]
    Format {
        path: PathBuf,
        kind: &'static str,
        detail: String,
    },
    #[error("{path} already exists; move it away or choose another name")]
    Exists { path: PathBuf },
    #[error("the system random source failed: {0}")]
    Random(String),
}

/// Why an envelope was refused. Each case has its own message so an operator knows which of
/// "tampered", "signed by someone else" or "broken in transit" happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("not a DSSE envelope: {0}")]
    Malformed(String),
    #[error("payloadType is `{found}`, expected `{expected}`")]
    WrongPayloadType { found: String, expected: String },
    #[error("{field} is not valid base64")]
    BadBase64 { field: String },
    #[error("the envelope has no signatures")]
    NoSignatures,
    #[error("signed only by unknown key(s) {}; this device trusts {}", .found.join(", "), if .trusted.is_empty() { "no keys".to_string() } else { .trusted.join(", ") })]
    UnknownKey {
        found: Vec<String>,
        trusted: Vec<String>,
    },
    #[error(
        "signature by trusted key {keyid} does not match the payload: the deployment was altered after signing, or signed with a different key of the same id"
    )]
    BadSignature { keyid: String },
    #[error(
        "this device accepts only signed deployments (it has {count} trusted key(s)); sign it with `outpost-ctl manifest sign`"
    )]
    Unsigned { count: usize },
}

impl SignatureError {
    /// The JSON path in the envelope the error is about.
    pub fn path(&self) -> String {
        match self {
            SignatureError::Malformed(_) | SignatureError::Unsigned { .. } => String::new(),
            SignatureError::WrongPayloadType { .. } => "/payloadType".into(),
            SignatureError::BadBase64 { field } => field.clone(),
            SignatureError::NoSignatures
            | SignatureError::UnknownKey { .. }
            | SignatureError::BadSignature { .. } => "/signatures".into(),
        }
    }
}

/// The id of a public key: hex of the first 16 bytes of SHA-256 over its 32 raw bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    let digest = Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// DSSE's pre-authentication encoding: what is actually signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(
        format!(
            "DSSEv1 {} {payload_type} {} ",
            payload_type.len(),
            payload.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(payload);
    out
}

/// Signs `payload` (a manifest's bytes, kept exactly as given) into an envelope.
pub fn sign(payload: &[u8], key: &SigningKey) -> Envelope {
    sign_as(PAYLOAD_TYPE, payload, key)
}

/// Signs `payload` as `payload_type` (a deployment, a withdrawal, a command): the type is
/// signed too, so one cannot be replayed as another.
pub fn sign_as(payload_type: &str, payload: &[u8], key: &SigningKey) -> Envelope {
    let signature = key.sign(&pae(payload_type, payload));
    Envelope {
        payload_type: payload_type.to_string(),
        payload: STANDARD.encode(payload),
        signatures: vec![EnvelopeSignature {
            keyid: key_id(&key.verifying_key()),
            sig: STANDARD.encode(signature.to_bytes()),
        }],
    }
}

/// The public keys a device (or an operator's `verify`) trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
}

impl TrustedKeys {
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>) -> Self {
        TrustedKeys {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
        }
    }

    /// Loads each PEM public key file.
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let keys = paths
            .iter()
            .map(|p| load_verifying_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedKeys::new(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Checks an envelope and returns its payload and the id of the key that signed it.
    ///
    /// One valid signature by a trusted key is enough; a signature that claims a trusted key
    /// id but does not verify refuses the whole envelope, since it means the payload changed.
    pub fn verify(&self, envelope: &Envelope) -> Result<(Vec<u8>, String), SignatureError> {
        self.verify_as(PAYLOAD_TYPE, envelope)
    }

    /// As [`TrustedKeys::verify`], for an envelope of `payload_type`.
    pub fn verify_as(
        &self,
        payload_type: &str,
        envelope: &Envelope,
    ) -> Result<(Vec<u8>, String), SignatureError> {
        let payload = open_as(payload_type, envelope)?;
        if envelope.signatures.is_empty() {
            return Err(SignatureError::NoSignatures);
        }
        let message = pae(&envelope.payload_type, &payload);
        let mut unknown = Vec::new();
        let mut good = None;
        for (i, s) in envelope.signatures.iter().enumerate() {
            let sig = decode_b64(&s.sig).ok_or_else(|| SignatureError::BadBase64 {
                field: format!("/signatures/{i}/sig"),
            })?;
            let Some(key) = self.keys.get(&s.keyid) else {
                unknown.push(if s.keyid.is_empty() {
                    "(no keyid)".into()
                } else {
                    s.keyid.clone()
                });
                continue;
            };
            let valid = Signature::from_slice(&sig)
                .ok()
                .is_some_and(|sig| key.verify_strict(&message, &sig).is_ok());
            if !valid {
                return Err(SignatureError::BadSignature {
                    keyid: s.keyid.clone(),
                });
            }
            good.get_or_insert_with(|| s.keyid.clone());
        }
        match good {
            Some(keyid) => Ok((payload, keyid)),
            None => Err(SignatureError::UnknownKey {
                found: unknown,
                trusted: self.ids(),
            }),
        }
    }
}

/// The payload of an envelope after checking its type and encoding, without any signature
/// check: for devices that trust no keys, and for showing what an envelope holds.
pub fn open(envelope: &Envelope) -> Result<Vec<u8>, SignatureError> {
    open_as(PAYLOAD_TYPE, envelope)
}

/// As [`open`], for an envelope of `payload_type`.
pub fn open_as(payload_type: &str, envelope: &Envelope) -> Result<Vec<u8>, SignatureError> {
    if envelope.payload_type != payload_type {
        return Err(SignatureError::WrongPayloadType {
            found: envelope.payload_type.clone(),
            expected: payload_type.to_string(),
        });
    }
    decode_b64(&envelope.payload).ok_or_else(|| SignatureError::BadBase64 {
        field: "/payload".into(),
    })
}

/// DSSE allows standard or URL-safe base64; both are accepted, with or without padding.
fn decode_b64(text: &str) -> Option<Vec<u8>> {
    let trimmed = text.trim_end_matches('=');
    let padded = format!("{trimmed}{}", "=".repeat((4 - trimmed.len() % 4) % 4));
    STANDARD
        .decode(&padded)
        .or_else(|_| URL_SAFE.decode(&padded))
        .ok()
}

/// A new signing key from the operating system's random source.
pub fn generate_key() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes `PREFIX.key` (PKCS#8 PEM, owner-only) and `PREFIX.pub` (SPKI PEM), each atomically
/// (a crash leaves no file or a whole one); refuses to overwrite either, even one that
/// appears meanwhile. Returns both paths.
pub fn write_key_pair(key: &SigningKey, prefix: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    // Appended, not `with_extension`: a prefix like `ops.2026` keeps its dot.
    let private = PathBuf::from(format!("{}.key", prefix.display()));
    let public = PathBuf::from(format!("{}.pub", prefix.display()));
    for path in [&private, &public] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    let format_err = |path: &Path, kind, e: &dyn std::fmt::Display| KeyError::Format {
        path: path.to_path_buf(),
        kind,
        detail: e.to_string(),
    };
    let private_pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| format_err(&private, "private", &e))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| format_err(&public, "public", &e))?;
    let write_err = |path: &Path, source: io::Error| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Write {
                path: path.to_path_buf(),
                source,
            }
        }
    };
    crate::files::write_new(&private, private_pem.as_bytes(), 0o600)
        .map_err(|e| write_err(&private, e))?;
    if let Err(e) = crate::files::write_new(&public, public_pem.as_bytes(), 0o644) {
        // Half a pair is no use, and the private key is ours: it was created just now.
        if let Err(remove) = fs::remove_file(&private) {
            tracing::warn!(path = %private.display(), error = %remove, "cannot remove the private key of a pair not written");
        }
        return Err(write_err(&public, e));
    }
    Ok((private, public))
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        kind: "private",
        detail: e.to_string(),
    })
}

pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| KeyError::Format {
        path: path.to_path_buf(),
        kind: "public",
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let env = sign(b"{\"a\":1}", &k);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let (payload, id) = trusted.verify(&env).unwrap();
        assert_eq!(payload, b"{\"a\":1}");
        assert_eq!(id, key_id(&k.verifying_key()));
    }

    #[test]
    fn each_tampering_has_its_own_error() {
        let k = key(1);
        let trusted = TrustedKeys::new([k.verifying_key()]);
        let env = sign(b"{\"version\":1}", &k);

        let mut tampered = env.clone();
        tampered.payload = STANDARD.encode(b"{\"version\":2}");
        assert!(matches!(
            trusted.verify(&tampered),
            Err(SignatureError::BadSignature { .. })
        ));

        let other = sign(b"{\"version\":1}", &key(2));
        assert!(matches!(
            trusted.verify(&other),
            Err(SignatureError::UnknownKey { .. })
        ));

        let mut wrong_type = env.clone();
        wrong_type.payload_type = "application/json".into();
        assert!(matches!(
            trusted.verify(&wrong_type),
            Err(SignatureError::WrongPayloadType { .. })
        ));

        let mut bad_b64 = env.clone();
        bad_b64.payload = "!!!not base64!!!".into();
        assert_eq!(
            trusted.verify(&bad_b64),
            Err(SignatureError::BadBase64 {
                field: "/payload".into()
            })
        );
        let mut bad_sig = env.clone();
        bad_sig.signatures[0].sig = "%%%".into();
        assert_eq!(
            trusted.verify(&bad_sig),
            Err(SignatureError::BadBase64 {
                field: "/signatures/0/sig".into()
            })
        );

        let mut none = env;
        none.signatures.clear();
        assert_eq!(trusted.verify(&none), Err(SignatureError::NoSignatures));
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    #[cfg(unix)]
    fn keys_survive_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let k = generate_key().unwrap();
        let (private, public) = write_key_pair(&k, &dir.path().join("ops")).unwrap();
        assert_eq!(load_signing_key(&private).unwrap().to_bytes(), k.to_bytes());
        assert_eq!(load_verifying_key(&public).unwrap(), k.verifying_key());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(&public).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let before = fs::read(&private).unwrap();
        let other = generate_key().unwrap();
        assert!(matches!(
            write_key_pair(&other, &dir.path().join("ops")),
            Err(KeyError::Exists { .. })
        ));
        assert_eq!(
            fs::read(&private).unwrap(),
            before,
            "an existing key is never replaced"
        );
        // Only the public half exists: refused, and no private key is left without its pair.
        fs::write(dir.path().join("half.pub"), b"someone's").unwrap();
        assert!(matches!(
            write_key_pair(&other, &dir.path().join("half")),
            Err(KeyError::Exists { .. })
        ));
        assert!(!dir.path().join("half.key").exists());
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(crate::files::TEMP_SUFFIX))
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }
}
