//! Parse + verify + validate on arbitrary bytes, with and without trusted keys: no input may
//! panic, and whatever is accepted must validate again after a serialization round trip.
#![no_main]

use std::sync::LazyLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use outpost_agent::intake::intake;
use outpost_agent::manifest;
use outpost_agent::signing::{self, TrustedKeys};

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[42; 32]));
static TRUSTED: LazyLock<TrustedKeys> = LazyLock::new(|| TrustedKeys::new([KEY.verifying_key()]));

fuzz_target!(|data: &[u8]| {
    // As a bare message, on a device with and without trusted keys.
    let _ = intake(data, &TrustedKeys::default());
    let _ = intake(data, &TRUSTED);
    let bare = manifest::parse(data);
    // Signed with the trusted key: the signature must pass, so validation decides alone.
    let envelope = serde_json::to_vec(&signing::sign(data, &KEY)).expect("an envelope serializes");
    let signed = intake(&envelope, &TRUSTED);
    assert_eq!(bare.is_ok(), signed.is_ok(), "signing changed the verdict");
    if let Ok(deployment) = bare {
        let again = serde_json::to_vec(&deployment).expect("a deployment serializes");
        assert!(manifest::parse(&again).is_ok(), "an accepted manifest did not survive a round trip");
    }
});
