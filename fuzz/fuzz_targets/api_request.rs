//! Request lines of the local API: no input may panic, and what is accepted names only valid
//! modules and bounded numbers (a module name becomes part of a URL path of the engine's API).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::api::{ApiRequest, MAX_TAIL, parse_request};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    match parse_request(&line) {
        Ok(ApiRequest::Logs { module, tail, .. }) => {
            assert!(module.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
            assert!(tail.is_none_or(|t| t <= MAX_TAIL));
        }
        Ok(ApiRequest::Restart { module }) => {
            assert!(!module.is_empty() && !module.contains(['/', '.', '?', '#']));
        }
        Ok(_) | Err(_) => {}
    }
});
