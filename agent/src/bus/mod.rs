//! The local bus: the MQTT broker modules reach from their containers, their credentials, and
//! the routes that carry their outputs to the hub (through the outbox) or to other modules.
//!
//! # Layout
//!
//! - this file: module credentials (derived from a device secret, so they survive agent
//!   restarts without being stored per module) and the environment each module gets.
//! - [`broker`]: the embedded MQTT 3.1.1 broker, with per-module topic rules.
//! - [`routes`]: the route table, swapped whole when a deployment is accepted.
//! - [`router`]: routes on an external broker (`bus.external_url`), the agent being a client.
//!
//! Why an embedded broker of our own rather than rumqttd: a module's QoS 1 message routed to
//! `$upstream` is acknowledged only once it is durable in the outbox, and a module may publish
//! only to `modules/{name}/outputs/#` and subscribe only to `modules/{name}/inputs/#`. Neither
//! can be said to rumqttd 0.20, which would also bring a second, older TLS/HTTP stack. The
//! broker reuses rumqttc's packet codec, which the hub link already compiles.

pub mod broker;
pub mod router;
pub mod routes;
pub mod start;

/// How the embedded broker reaches the reconciler for modules' update locks: set once the
/// reconciler is built (the bus starts before it, as the reconciler needs the bus's address).
pub type LockHandle = std::sync::Arc<std::sync::OnceLock<crate::control::AgentHandle>>;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Environment variables the agent gives every module (manifests may not set `OUTPOST_*`).
pub mod env {
    pub const URL: &str = "OUTPOST_BUS_URL";
    pub const USER: &str = "OUTPOST_BUS_USER";
    pub const PASSWORD: &str = "OUTPOST_BUS_PASSWORD";
    pub const MODULE: &str = "OUTPOST_MODULE_NAME";
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot read or create the bus secret {path}: {source}")]
    Secret {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read bus.password_file: {0}")]
    Password(String),
    #[error("cannot listen on {addr} for the local bus: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The device's bus secret: 32 random bytes in `STATE_DIR/bus.key` (owner-only). Module
/// passwords are HMAC-SHA256(secret, module name), so they are the same after an agent restart
/// and containers need not be recreated.
/// The size of the bus secret in `bus.key`.
const SECRET_LEN: usize = 32;

#[derive(Clone)]
pub struct BusSecret(Arc<ring::hmac::Key>);

impl std::fmt::Debug for BusSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BusSecret(<redacted>)")
    }
}

impl BusSecret {
    /// Reads the secret, creating it on first use. The file is written atomically (a crash
    /// leaves no file or the whole one), so a file of the wrong size was not written by this
    /// agent: it refuses start-up rather than replace it, which would change every module's
    /// password.
    pub fn load_or_create(state_dir: &Path) -> Result<BusSecret, BusError> {
        let path = state_dir.join("bus.key");
        let err = |source| BusError::Secret {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(err)?;
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) if bytes.len() == SECRET_LEN => Ok(Some(BusSecret::from_bytes(&bytes))),
            Ok(bytes) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "it holds {} bytes, not {SECRET_LEN}: this agent writes it whole, so it was changed by something else \
                     (or left short by an older agent that crashed while writing it). Restore it, or delete it to make \
                     a new one (every module is then recreated with new bus credentials)",
                    bytes.len()
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        if let Some(secret) = read(&path).map_err(err)? {
            return Ok(secret);
        }
        let mut bytes = [0u8; SECRET_LEN];
        getrandom::fill(&mut bytes).map_err(|e| err(std::io::Error::other(e.to_string())))?;
        match crate::fsutil::write_new_atomic(&path, &bytes, 0o600) {
            Ok(()) => Ok(BusSecret::from_bytes(&bytes)),
            // Made by someone else meanwhile: theirs is the secret.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                read(&path).map_err(err)?.ok_or_else(|| err(e))
            }
            Err(e) => Err(err(e)),
        }
    }

    pub fn from_bytes(bytes: &[u8]) -> BusSecret {
        BusSecret(Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            bytes,
        )))
    }

    /// The module's bus password.
    pub fn password(&self, module: &str) -> String {
        let tag = ring::hmac::sign(&self.0, format!("outpost-bus/{module}").as_bytes());
        tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `password` is the module's, compared in constant time.
    pub fn verify(&self, module: &str, password: &str) -> bool {
        let expected = self.password(module);
        expected.len() == password.len()
            && expected
                .bytes()
                .zip(password.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// What the agent adds to each module's environment: the bus address and the module's own
/// credentials. Empty when the bus is off.
#[derive(Debug, Clone, Default)]
pub struct ModuleEnv {
    url: Option<String>,
    secret: Option<BusSecret>,
}

impl ModuleEnv {
    /// The embedded broker at `url`, with per-module credentials.
    pub fn embedded(url: String, secret: BusSecret) -> ModuleEnv {
        ModuleEnv {
            url: Some(url),
            secret: Some(secret),
        }
    }

    /// An external broker: its address only; its own configuration holds the credentials.
    pub fn external(url: String) -> ModuleEnv {
        ModuleEnv {
            url: Some(url),
            secret: None,
        }
    }

    pub fn for_module(&self, module: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(url) = &self.url else {
            return env;
        };
        env.insert(env::URL.to_string(), url.clone());
        env.insert(env::MODULE.to_string(), module.to_string());
        if let Some(secret) = &self.secret {
            env.insert(env::USER.to_string(), module.to_string());
            env.insert(env::PASSWORD.to_string(), secret.password(module));
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_per_module_stable_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let a = BusSecret::load_or_create(dir.path()).unwrap();
        let b = BusSecret::load_or_create(dir.path()).unwrap();
        assert_eq!(a.password("cam"), b.password("cam"), "same after a restart");
        assert_ne!(a.password("cam"), a.password("infer"));
        assert!(a.verify("cam", &b.password("cam")));
        assert!(!a.verify("infer", &a.password("cam")));
        assert!(!a.verify("cam", ""));
        let other = tempfile::tempdir().unwrap();
        let c = BusSecret::load_or_create(other.path()).unwrap();
        assert_ne!(a.password("cam"), c.password("cam"), "per device");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("bus.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!format!("{a:?}").contains(&a.password("cam")));
    }

    #[test]
    fn a_bus_key_of_the_wrong_size_refuses_start_up_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.key");
        std::fs::write(&path, [1u8; 20]).unwrap();
        let err = BusSecret::load_or_create(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bus.key") && text.contains("20 bytes"),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), [1u8; 20]);
        // No temporary file is left beside it either.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("bus.key")]);
    }

    #[test]
    fn module_env_names_the_bus_and_credentials() {
        let secret = BusSecret::from_bytes(&[7; 32]);
        let env =
            ModuleEnv::embedded("mqtt://172.17.0.1:1884".into(), secret.clone()).for_module("cam");
        assert_eq!(env[env::URL], "mqtt://172.17.0.1:1884");
        assert_eq!(env[env::USER], "cam");
        assert_eq!(env[env::PASSWORD], secret.password("cam"));
        assert!(ModuleEnv::default().for_module("cam").is_empty());
        assert!(
            !ModuleEnv::external("mqtt://x:1".into())
                .for_module("cam")
                .contains_key(env::PASSWORD)
        );
    }
}
