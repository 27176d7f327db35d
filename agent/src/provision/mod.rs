//! First boot and certificate renewal: the device's own identity, from the operator's
//! responder over the hub (see `docs/provisioning.md`).
//!
//! - [`identity`]: what is stored in `{state_dir}/identity/` and how it is written so that a
//!   power cut at any moment leaves either no identity or a complete one.
//! - [`serial`]: the device's serial, from a file or a command.
//! - [`exchange`]: one request and its response over MQTT (shared by claim and renewal).
//! - [`claim`]: first boot — the claim identity, a CSR for a key made here, retries.
//! - [`renew`]: renewal at two thirds of the certificate's lifetime, judged so a clock at 1970
//!   neither renews in a loop nor lets the certificate lapse.

pub mod claim;
pub mod exchange;
pub mod identity;
pub mod renew;
pub mod serial;

use crate::config::Config;

pub use identity::{Identity, IdentityFiles};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot use the identity in {dir}: {message}")]
    Identity {
        dir: std::path::PathBuf,
        message: String,
    },
    #[error("cannot make the device's key or signing request: {0}")]
    Key(String),
    #[error("cannot store the device's identity in {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The configuration the agent runs with once it has an identity: the device id, the device
/// certificate (one PEM with key and chain) and the groups the responder assigned (beside
/// those of `[hub]`).
pub fn apply(mut config: Config, identity: &Identity, files: &IdentityFiles) -> Config {
    config.device_id = identity.device_id.clone();
    if let Some(hub) = config.hub.as_mut() {
        hub.client_auth = Some((files.pem.clone(), files.pem.clone()));
        for g in &identity.groups {
            if !hub.groups.contains(g) {
                hub.groups.push(g.clone());
            }
        }
    }
    config
}
