//! The raw form: exactly what the file and the environment say, as serde reads it. Unknown
//! keys are refused here; every other rule is [`validate`](super::validate)'s.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) device_id: Option<String>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) log_level: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) hub: Option<RawHub>,
    pub(super) provisioning: Option<RawProvisioning>,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default)]
    pub(super) policy: RawPolicy,
    #[serde(default)]
    pub(super) api: RawApi,
    #[serde(default)]
    pub(super) bus: RawBus,
    #[serde(default)]
    pub(super) telemetry: RawTelemetry,
    #[serde(default)]
    pub(super) disk: RawDisk,
    #[serde(default)]
    pub(super) update: RawUpdate,
    #[serde(default)]
    pub(super) maintenance: RawMaintenance,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMaintenance {
    #[serde(default, deserialize_with = "super::maintenance::windows")]
    pub(super) windows: Option<Vec<String>>,
    pub(super) timezone: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpdate {
    pub(super) enabled: Option<bool>,
    pub(super) probation_secs: Option<u64>,
    pub(super) gate_timeout_secs: Option<u64>,
    pub(super) max_starts: Option<u32>,
    pub(super) max_mb: Option<u64>,
    pub(super) ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHub {
    pub(super) url: Option<String>,
    #[serde(default)]
    pub(super) failover_urls: Vec<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    pub(super) topic_prefix: Option<String>,
    #[serde(default)]
    pub(super) groups: Vec<String>,
    #[serde(default)]
    pub(super) allow_insecure: bool,
    pub(super) keep_alive_secs: Option<u64>,
    pub(super) reconnect_max_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvisioning {
    pub(super) url: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) claim_cert_file: Option<PathBuf>,
    pub(super) claim_key_file: Option<PathBuf>,
    pub(super) serial_file: Option<PathBuf>,
    pub(super) serial_command: Option<String>,
    pub(super) topic_prefix: Option<String>,
    pub(super) retry_max_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) kind: Option<String>,
    pub(super) docker_socket: Option<PathBuf>,
    pub(super) stop_grace_secs: Option<u64>,
    pub(super) max_concurrent_pulls: Option<usize>,
    pub(super) max_parallel_actions: Option<usize>,
    pub(super) image_gc_after_secs: Option<u64>,
    pub(super) process_cgroup: Option<String>,
    pub(super) process_user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDisk {
    pub(super) high_watermark_percent: Option<u8>,
    pub(super) pull_reserve_mb: Option<u64>,
    pub(super) store_reserve_kb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    #[serde(default)]
    pub(super) trusted_keys: Vec<PathBuf>,
    #[serde(default)]
    pub(super) allowed_registries: Vec<String>,
    #[serde(default)]
    pub(super) allow_privileged: bool,
    #[serde(default)]
    pub(super) allow_host_network: bool,
    #[serde(default)]
    pub(super) allowed_host_paths: Vec<PathBuf>,
    #[serde(default)]
    pub(super) writable_host_paths: Vec<PathBuf>,
    #[serde(default)]
    pub(super) allowed_capabilities: Vec<String>,
    #[serde(default)]
    pub(super) allowed_devices: Vec<PathBuf>,
    #[serde(default)]
    pub(super) allowed_volumes: Vec<String>,
    pub(super) allowed_host_ports: Option<Vec<String>>,
    pub(super) allowed_host_ips: Option<Vec<String>>,
    pub(super) default_memory_mb: Option<u64>,
    pub(super) max_memory_mb: Option<u64>,
    pub(super) default_pids_limit: Option<u64>,
    pub(super) max_pids_limit: Option<u64>,
    #[serde(default)]
    pub(super) allow_image_tags: bool,
    #[serde(default)]
    pub(super) allowed_executables: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApi {
    pub(super) socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBus {
    pub(super) enabled: Option<bool>,
    pub(super) listen: Option<String>,
    pub(super) external_url: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) interval_secs: Option<u64>,
    pub(super) outbox_max_bytes: Option<u64>,
    pub(super) outbox_max_age_secs: Option<u64>,
    pub(super) metrics_listen: Option<String>,
}
