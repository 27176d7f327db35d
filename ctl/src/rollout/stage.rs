//! What a rollout sends each device, prepared (and signed) before the first wave: the
//! deployment bound to that device, and the revert that would put its previous deployment
//! back. Both are kept retained on the broker beside the record, so a rollout resumed or
//! reverted from another machine needs neither the manifest nor the signing key.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use outpost_core::intake::hex_sha256;
use outpost_core::manifest::Target;
use outpost_core::{binding, signing};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How the rollout's messages are signed: with the operator's key for devices that trust keys,
/// or not at all (devices without trusted keys, labs).
pub struct Signer {
    pub key: Option<SigningKey>,
    pub expires_in: Duration,
    /// Unix milliseconds now (the expiry is counted from it).
    pub now_ms: u64,
}

/// One message for a device's deployment topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// The bytes to publish (a manifest or a DSSE envelope: JSON text). Empty: clear the
    /// retained message (an unsigned withdrawal).
    pub wire: String,
    /// SHA-256 of the manifest inside, which the device reports back; `None` for a withdrawal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// What is kept for one device (`{prefix}/_rollouts/{id}/devices/{device}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Staged {
    pub deployment: Message,
    pub revert: Message,
}

/// The manifest bound to `device` (signed when there is a key).
pub fn for_device(manifest: &[u8], device: &str, signer: &Signer) -> Result<Message> {
    let Some(key) = &signer.key else {
        let wire = String::from_utf8(manifest.to_vec())
            .map_err(|_| anyhow!("the manifest is not UTF-8 text"))?;
        return Ok(Message {
            wire,
            digest: Some(hex_sha256(manifest)),
        });
    };
    let bound = binding::bind(
        manifest,
        Some(&Target::Device(device.to_string())),
        &binding::expiry_after(signer.now_ms, signer.expires_in),
    )
    .map_err(|e| anyhow!("{device}: {e}"))?;
    let envelope = signing::sign(&bound, key);
    Ok(Message {
        wire: serde_json::to_string(&envelope)?,
        digest: Some(hex_sha256(&bound)),
    })
}

/// What puts `device` back where it was before a rollout of `version`.
///
/// - It had a deployment of its own (`previous`, the message retained on its topic): that
///   manifest again, as version `version + 1` (devices refuse versions that are not newer; a
///   rollback is a newer version carrying the old content), bound to the device anew.
/// - It had none (it followed a group, or nothing): a withdrawal of the rollout's deployment,
///   so the device falls back to its group's. Signed when there is a key; otherwise an empty
///   retained message. A device that had no deployment at all keeps running what the rollout
///   gave it (devices never remove modules on a withdrawal: they cannot put back nothing).
pub fn revert(
    previous: Option<&[u8]>,
    device: &str,
    version: u64,
    signer: &Signer,
) -> Result<Message> {
    let previous = previous.filter(|p| !p.is_empty());
    let Some(previous) = previous else {
        let Some(key) = &signer.key else {
            return Ok(Message {
                wire: String::new(),
                digest: None,
            });
        };
        let withdrawal = binding::Withdrawal {
            withdraw: Target::Device(device.to_string()),
            version,
            expires_at: binding::expiry_after(signer.now_ms, signer.expires_in),
        };
        let envelope = signing::sign_as(
            signing::WITHDRAWAL_TYPE,
            &serde_json::to_vec(&withdrawal)?,
            key,
        );
        return Ok(Message {
            wire: serde_json::to_string(&envelope)?,
            digest: None,
        });
    };
    let manifest = match serde_json::from_slice::<signing::Envelope>(previous) {
        Ok(envelope) => signing::open(&envelope)
            .map_err(|e| anyhow!("{device}: its retained deployment is not readable: {e}"))?,
        Err(_) => previous.to_vec(),
    };
    let mut value: Value = serde_json::from_slice(&manifest)
        .map_err(|e| anyhow!("{device}: its retained deployment is not JSON: {e}"))?;
    let Some(object) = value.as_object_mut() else {
        bail!("{device}: its retained deployment is not a JSON object");
    };
    // Bound anew below: the old binding's expiry may have passed.
    object.remove("target");
    object.remove("expiresAt");
    object.insert("version".into(), (version + 1).into());
    let mut bytes = serde_json::to_vec_pretty(&value)?;
    bytes.push(b'\n');
    for_device(&bytes, device, signer)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: u64 = 1_900_000_000_000;

    fn signer(key: Option<SigningKey>) -> Signer {
        Signer {
            key,
            expires_in: Duration::from_secs(86_400),
            now_ms: NOW_MS,
        }
    }

    fn manifest_of(m: &Message) -> Value {
        let envelope: signing::Envelope = serde_json::from_str(&m.wire).unwrap();
        serde_json::from_slice(&signing::open(&envelope).unwrap()).unwrap()
    }

    #[test]
    fn each_device_gets_its_own_binding() {
        let key = signing::generate_key().unwrap();
        let s = signer(Some(key));
        let manifest = br#"{"schemaVersion":"1.0","id":"x","version":3,"modules":{}}"#;
        let a = for_device(manifest, "a", &s).unwrap();
        let b = for_device(manifest, "b", &s).unwrap();
        assert_ne!(a.digest, b.digest);
        assert_eq!(
            manifest_of(&a)["target"],
            serde_json::json!({"device": "a"})
        );
        let plain = for_device(manifest, "a", &signer(None)).unwrap();
        assert_eq!(plain.wire.as_bytes(), manifest);
        assert_eq!(plain.digest, Some(hex_sha256(manifest)));
    }

    #[test]
    fn a_revert_is_the_previous_content_one_version_up() {
        let key = signing::generate_key().unwrap();
        let s = signer(Some(key));
        let old =
            br#"{"schemaVersion":"1.0","id":"x","version":2,"modules":{"a":{"image":"i:1"}}}"#;
        let previous = for_device(old, "d", &s).unwrap();
        let r = revert(Some(previous.wire.as_bytes()), "d", 3, &s).unwrap();
        let m = manifest_of(&r);
        assert_eq!(m["version"], 4);
        assert_eq!(m["modules"]["a"]["image"], "i:1");
        assert_eq!(m["target"], serde_json::json!({"device": "d"}));
        // Nothing of its own before: a signed withdrawal of the rollout's version.
        let w = revert(None, "d", 3, &s).unwrap();
        assert_eq!(w.digest, None);
        let envelope: signing::Envelope = serde_json::from_str(&w.wire).unwrap();
        let payload = signing::open_as(signing::WITHDRAWAL_TYPE, &envelope).unwrap();
        let withdrawal: binding::Withdrawal = serde_json::from_slice(&payload).unwrap();
        assert_eq!(withdrawal.version, 3);
        // Unsigned: the empty message.
        assert_eq!(revert(Some(b""), "d", 3, &signer(None)).unwrap().wire, "");
    }
}
