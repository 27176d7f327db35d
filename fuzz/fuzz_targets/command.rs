//! Hub command payloads as the device screens them, on a device with and without trusted keys,
//! both as they arrive (any bytes) and signed by the trusted key (any JSON as the signed
//! command): no input may panic, nothing runs without a usable reply id, and on a device with
//! keys nothing unsigned, for another device or another command runs, nor any id twice.
#![no_main]

use std::sync::LazyLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use outpost_agent::hub::commands::{Seen, screen};
use outpost_agent::signing::{self, TrustedKeys};

static KEY: LazyLock<SigningKey> = LazyLock::new(|| SigningKey::from_bytes(&[42; 32]));
static TRUSTED: LazyLock<TrustedKeys> = LazyLock::new(|| TrustedKeys::new([KEY.verifying_key()]));
const NAMES: [&str; 5] = ["logs", "ping", "restart-module", "state", "x/y"];

fuzz_target!(|data: &[u8]| {
    let name = NAMES[data.first().map_or(0, |b| usize::from(*b) % NAMES.len())];
    let payload = data.get(1..).unwrap_or_default();
    let mut seen = Seen::default();
    // No keys: whatever parses runs, and only with an id safe to reply on.
    let (request, verdict) = screen(name, payload, "cam-1", &TrustedKeys::default(), &mut seen);
    if verdict.is_ok()
        && let Ok(r) = &request
    {
        assert!(!r.id.is_empty() && !r.id.contains(['/', '+', '#']));
    }
    // Keys, the raw bytes: anything that is not a signed envelope is refused.
    let (_, verdict) = screen(name, payload, "cam-1", &TRUSTED, &mut seen);
    if serde_json::from_slice::<signing::Envelope>(payload).is_err() {
        assert!(verdict.is_err(), "an unsigned command ran on a device with keys");
    }
    // Keys, the bytes signed as a command: runs at most once per id.
    let envelope = serde_json::to_vec(&signing::sign_as(signing::COMMAND_TYPE, payload, &KEY))
        .expect("an envelope serializes");
    let (first, verdict) = screen(name, &envelope, "cam-1", &TRUSTED, &mut seen);
    if verdict.is_ok() {
        let r = first.expect("a command that runs has a reply id");
        let signed: serde_json::Value = serde_json::from_slice(payload).expect("it parsed");
        assert_eq!(signed["device"], "cam-1");
        assert_eq!(signed["command"], name);
        assert_eq!(signed["id"], r.id.as_str());
        let (_, again) = screen(name, &envelope, "cam-1", &TRUSTED, &mut seen);
        assert!(again.is_err(), "a signed command ran twice");
    }
});
