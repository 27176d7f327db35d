//! The device configuration: read raw from a TOML file and `OUTPOST__SECTION__KEY` environment
//! variables (the `config` crate), then validated into [`Config`], the form the program uses.
//! Every problem is reported at once, each naming its key and value.
//!
//! Layout: `raw` (the serde form), `validate` (the top-level keys, `[runtime]`, `[api]`,
//! `[disk]`, and the gathering of issues), `hub`, `provisioning`, `policy`, `bus`, `telemetry`, `update`,
//! `maintenance` (one section each), `types` (the validated form).

mod bus;
mod hub;
mod maintenance;
mod policy;
mod provisioning;
mod raw;
mod telemetry;
mod types;
mod update;
mod validate;

use std::path::{Path, PathBuf};

use raw::RawConfig;
use validate::validate;

pub use types::{
    BusConfig, Config, DiskConfig, HubConfig, MaintenanceConfig, ProvisioningConfig, RuntimeConfig,
    SerialSource, TelemetryConfig, UpdateConfig,
};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/outpost/config.toml";

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `hub.url`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "configuration file {0} does not exist; copy manifests/device.example.toml there or pass --config PATH"
    )]
    NotFound(PathBuf),
    #[error("cannot read configuration from {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("invalid configuration in {path}:\n  {}", .issues.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

pub use outpost_core::policy::{PolicyConfig, SYSTEM_PATHS};

impl Config {
    /// Loads the file at `path`, overlays `OUTPOST__SECTION__KEY` variables from `env`, and
    /// validates the result.
    ///
    /// Fails when the file is missing or unreadable, is not TOML, has unknown keys or values of
    /// the wrong type, or breaks a rule (bad URL, missing files, unsafe settings).
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError::NotFound(path.to_path_buf()));
        }
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("OUTPOST__"))
            .collect();
        let raw: RawConfig = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("OUTPOST")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("hub.groups")
                    .with_list_parse_key("hub.failover_urls")
                    .with_list_parse_key("policy.trusted_keys")
                    .with_list_parse_key("policy.allowed_registries")
                    .with_list_parse_key("policy.allowed_host_paths")
                    .with_list_parse_key("policy.writable_host_paths")
                    .with_list_parse_key("policy.allowed_capabilities")
                    .with_list_parse_key("policy.allowed_devices")
                    .with_list_parse_key("policy.allowed_executables")
                    .with_list_parse_key("policy.allowed_volumes")
                    .with_list_parse_key("policy.allowed_host_ports")
                    .with_list_parse_key("policy.allowed_host_ips")
                    .source(Some(env)),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError::Read {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let base = path.parent().unwrap_or(Path::new("/"));
        validate(raw, base)
            .map_err(|issues| ConfigError::Invalid {
                path: path.to_path_buf(),
                issues,
            })
            .map(|mut c| {
                c.source = path.to_path_buf();
                c
            })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    pub(super) fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        Config::load(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    pub(super) fn issues(r: Result<Config, ConfigError>) -> Vec<String> {
        match r {
            Err(ConfigError::Invalid { issues, .. }) => {
                issues.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = load("device_id = \"cam-1\"\n", &[]).unwrap();
        assert!(c.hub.is_none());
        assert!(!c.policy.allow_privileged && !c.policy.allow_host_network);
        assert!(c.policy.allowed_host_paths.is_empty());
        assert!(
            c.bus.enabled && c.bus.listen.is_none(),
            "the bridge's address, found at start"
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = load(
            "device_id = \"cam-1\"\n[hub]\nurl = \"mqtts://hub.example.com\"\n",
            &[
                ("OUTPOST__HUB__URL", "mqtts://other.example.com:9000"),
                ("OUTPOST__DEVICE_ID", "cam-2"),
                ("OUTPOST__HUB__GROUPS", "a,b"),
            ],
        )
        .unwrap();
        let hub = c.hub.unwrap();
        assert_eq!((hub.host.as_str(), hub.port), ("other.example.com", 9000));
        assert_eq!(hub.groups, ["a", "b"]);
        assert_eq!(hub.reconnect_max, Duration::from_secs(30));
        assert_eq!(c.device_id, "cam-2");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = load("device_id = \"a\"\n[hub]\nurll = \"x\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bus_and_outbox_settings_are_checked() {
        let found = issues(load(
            "device_id = \"d\"\n[bus]\nexternal_url = \"mqtt://agent:secret@127.0.0.1:1883\"\n\
             [telemetry]\noutbox_max_bytes = 1000\noutbox_max_age_secs = 5\n",
            &[],
        ));
        assert_eq!(
            found,
            [
                "bus.external_url: must not hold credentials: put them in bus.username and bus.password_file",
                "telemetry.outbox_max_bytes: 1000 is below the minimum of 65536 (64 KiB)",
                "telemetry.outbox_max_age_secs: 5 is below the minimum of 60",
            ]
        );
        let found = issues(load(
            "device_id = \"d\"\n[bus]\nusername = \"agent\"\n",
            &[],
        ));
        assert_eq!(
            found,
            [
                "bus.password_file: is required with bus.username (the password is kept in a file, never in the config)",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let found = issues(load(
            "device_id = \"a b\"\n[hub]\nurl = \"mqtt://hub.example.com\"\nca_file = \"missing.pem\"\n\
             cert_file = \"ca.pem\"\n[bus]\nlisten = \"0.0.0.0:1883\"\n",
            &[],
        ));
        let keys: Vec<_> = found.iter().map(|i| i.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "device_id",
                "hub.url",
                "hub.ca_file",
                "hub.key_file",
                "bus.listen"
            ],
            "{found:#?}"
        );
        assert!(found[2].contains("missing.pem"));
    }

    #[test]
    fn hub_topic_names_are_reserved() {
        for id in ["groups", "_operator"] {
            let found = issues(load(&format!("device_id = \"{id}\"\n"), &[]));
            assert!(found[0].contains("reserved"), "{found:?}");
        }
        let found = issues(load(
            "device_id = \"a\"\n[hub]\nurl = \"mqtts://h\"\nreconnect_max_secs = 0\n",
            &[],
        ));
        assert!(found[0].starts_with("hub.reconnect_max_secs"), "{found:?}");
    }

    #[test]
    fn a_missing_file_says_what_to_do() {
        let err = Config::load(Path::new("/nonexistent/outpost.toml"), []).unwrap_err();
        assert!(err.to_string().contains("--config"));
    }
}

#[cfg(test)]
mod provisioning_tests {
    use super::tests::{issues, load};
    use super::*;

    const HUB: &str = "[hub]\nurl = \"mqtts://hub.example.com\"\nca_file = \"ca.pem\"\n";

    #[test]
    fn a_golden_image_config_has_no_device_id() {
        let c = load(
            &format!(
                "{HUB}[provisioning]\nclaim_cert_file = \"ca.pem\"\nclaim_key_file = \"ca.pem\"\n\
                 serial_file = \"/etc/machine-id\"\n"
            ),
            &[],
        )
        .unwrap();
        let p = c.provisioning.unwrap();
        assert_eq!(c.device_id, "");
        assert_eq!((p.host.as_str(), p.port), ("hub.example.com", 8883));
        assert_eq!(p.topic_prefix, "outpost/_provisioning");
        assert_eq!(p.serial, SerialSource::File("/etc/machine-id".into()));
        assert!(
            p.ca_file.unwrap().ends_with("ca.pem"),
            "hub.ca_file by default"
        );
    }

    #[test]
    fn provisioning_mistakes_are_named() {
        let found = issues(load(
            &format!(
                "device_id = \"cam-1\"\n{HUB}cert_file = \"ca.pem\"\nkey_file = \"ca.pem\"\n\
                 [provisioning]\nclaim_cert_file = \"missing.pem\"\nserial_file = \"/s\"\n\
                 serial_command = \"cat /s\"\n"
            ),
            &[],
        ));
        assert_eq!(
            found,
            [
                "device_id: must be left out with [provisioning]: the responder names the device at first boot",
                "hub.cert_file: must be left out with [provisioning]: the device's certificate is issued at first boot",
            ]
            .into_iter()
            .map(String::from)
            .chain(found.iter().skip(2).cloned())
            .collect::<Vec<_>>()
        );
        let rest = found[2..].join("\n");
        assert!(
            rest.contains("provisioning.claim_cert_file: file"),
            "{rest}"
        );
        assert!(
            rest.contains("provisioning.claim_key_file: is required"),
            "{rest}"
        );
        assert!(
            rest.contains("give serial_file or serial_command, not both"),
            "{rest}"
        );
        let found = issues(load(
            "[provisioning]\nclaim_cert_file = \"ca.pem\"\nclaim_key_file = \"ca.pem\"\nserial_file = \"/s\"\n",
            &[],
        ));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("provisioning: needs a [hub] section"),
            "{found:?}"
        );
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example loads once the files it names exist beside it.
    #[test]
    fn the_example_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/device.example.toml");
        let path = dir.path().join("config.toml");
        std::fs::copy(&example, &path).unwrap();
        for f in ["certs/hub-ca.pem", "certs/device.pem", "certs/device.key"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "x").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("keys")).unwrap();
        let key = crate::signing::generate_key().unwrap();
        crate::signing::write_key_pair(&key, &dir.path().join("keys/ops")).unwrap();
        let config = Config::load(&path, []).unwrap();
        assert_eq!(config.device_id, "line3-cam1");
        assert_eq!(config.policy.trusted_keys.len(), 1);
        assert_eq!(config.hub.unwrap().groups, ["line-3", "cameras"]);
    }
}
