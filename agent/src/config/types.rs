//! The validated form: the configuration the agent runs with, section by section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::PolicyConfig;
use crate::logging::LogFormat;

/// The configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the configuration came from, for messages.
    pub source: PathBuf,
    pub device_id: String,
    pub state_dir: PathBuf,
    /// A `tracing` filter directive; `RUST_LOG` overrides it.
    pub log_level: String,
    pub log_format: LogFormat,
    /// `None` runs the device without a hub (local deployments only).
    pub hub: Option<HubConfig>,
    /// First boot by claim: the device's id, certificate and groups come from the responder
    /// (`device_id` is empty until then).
    pub provisioning: Option<ProvisioningConfig>,
    pub runtime: RuntimeConfig,
    pub policy: PolicyConfig,
    /// The local API's Unix socket (owner-only), used by `outpost deploy --local`, `list`, `logs`.
    pub api_socket: PathBuf,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    pub disk: DiskConfig,
    pub update: UpdateConfig,
    pub maintenance: MaintenanceConfig,
}

impl Config {
    /// Process modules may run here: a device without an engine, or a policy that names
    /// executables. Only then does the agent touch cgroups for them.
    pub fn runs_process_modules(&self) -> bool {
        self.runtime.kind == crate::manifest::RuntimeKind::Process
            || !self.policy.allowed_executables.is_empty()
    }
}

/// `[maintenance]`, validated: when the device may switch to a new deployment.
#[derive(Debug, Clone, Default)]
pub struct MaintenanceConfig {
    /// The update windows; none means always open.
    pub windows: outpost_core::window::Windows,
    /// The entries as written, for `config check` and messages.
    pub entries: Vec<String>,
    /// The zone the windows are in; `None` is the device's own (TZ, /etc/localtime), looked
    /// up at each decision so a changed zone applies without a restart.
    pub timezone: Option<jiff::tz::TimeZone>,
}

impl MaintenanceConfig {
    /// The zone windows are judged in now.
    pub fn zone(&self) -> jiff::tz::TimeZone {
        self.timezone
            .clone()
            .unwrap_or_else(jiff::tz::TimeZone::system)
    }
}

/// `[update]`, validated: how the agent takes an update of itself.
#[derive(Debug, Clone)]
pub struct UpdateConfig {
    /// Off: a deployment's `agent` section is reported as skipped, and the agent left alone.
    pub enabled: bool,
    /// How long a new agent must run (connected, reconciling) before it is kept.
    pub probation: Duration,
    /// How long a new agent has to pass its gate before the previous one is restored.
    pub gate_timeout: Duration,
    /// Starts of a new agent that end before its gate (crashes, kills) before it is given up.
    pub max_starts: u32,
    /// The largest agent build the device downloads.
    pub max_bytes: u64,
    /// Another CA to trust for `https://` downloads, beside the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            enabled: true,
            probation: Duration::from_secs(60),
            gate_timeout: Duration::from_secs(600),
            max_starts: 3,
            max_bytes: 256 << 20,
            ca_file: None,
        }
    }
}

/// `[provisioning]`, validated.
#[derive(Debug, Clone)]
pub struct ProvisioningConfig {
    pub host: String,
    pub port: u16,
    pub failover: Vec<(String, u16)>,
    pub ca_file: Option<PathBuf>,
    pub claim_cert: PathBuf,
    pub claim_key: PathBuf,
    pub serial: SerialSource,
    pub topic_prefix: String,
    /// The longest wait between attempts while the hub or the responder is away (or refuses).
    pub retry_max: Duration,
}

/// Where the device's serial comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSource {
    /// A file's content, trimmed of whitespace and NULs (`/etc/machine-id`,
    /// `/proc/device-tree/serial-number`).
    File(PathBuf),
    /// A command run by `/bin/sh -c`; its standard output, trimmed.
    Command(String),
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub url: url::Url,
    pub host: String,
    pub port: u16,
    /// Other nodes of a clustered hub (`hub.failover_urls`), tried in order when the current
    /// one fails.
    pub failover: Vec<(String, u16)>,
    pub tls: bool,
    /// Without it, the system's root certificates are used.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_auth: Option<(PathBuf, PathBuf)>,
    /// User name and the file holding the password; the password is read when connecting.
    pub credentials: Option<(String, PathBuf)>,
    pub topic_prefix: String,
    pub groups: Vec<String>,
    pub keep_alive: Duration,
    /// The longest wait between reconnect attempts (the backoff's cap).
    pub reconnect_max: Duration,
}

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `docker`: the engine runs docker modules (process modules run beside them, as the
    /// policy allows); `process`: no engine, process modules only.
    pub kind: crate::manifest::RuntimeKind,
    pub docker_socket: PathBuf,
    pub stop_grace: Duration,
    pub max_concurrent_pulls: usize,
    /// Container operations (stop, remove, create, start) carried out at once when a
    /// deployment switches: ten modules that ignore SIGTERM then cost one stop grace, not ten.
    pub max_parallel_actions: usize,
    /// Images no deployment uses are removed after this long.
    pub image_gc_after: Duration,
    /// Where process modules' cgroups v2 go (`auto`, `off` or a folder).
    pub process_cgroup: crate::runtime::process::cgroup::Setting,
    /// The user process modules run as (`nobody` by default when the agent is root).
    pub process_user: crate::runtime::process::user::Setting,
}

/// What the agent does as disks fill up.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Above this share of a filesystem in use, the outbox sheds its least important streams
    /// first (state directory's filesystem) and image pulls are refused (the engine's).
    pub high_watermark_percent: u8,
    /// Free space a pull must leave on the engine's filesystem, beyond the image's size.
    pub pull_reserve_bytes: u64,
    /// An emergency reserve kept as a file in the state directory and given back when the disk
    /// is full, so the store can still commit the deployment that fixes the device.
    pub store_reserve_bytes: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            high_watermark_percent: 90,
            pull_reserve_bytes: 256 << 20,
            store_reserve_bytes: 2 << 20,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BusConfig {
    pub enabled: bool,
    /// `None`: the Docker bridge's gateway address (what containers on the default network
    /// reach), port [`BusConfig::DEFAULT_PORT`]; loopback when there is no bridge.
    pub listen: Option<SocketAddr>,
    /// An external broker (e.g. the device's Mosquitto) instead of the embedded one.
    pub external_url: Option<url::Url>,
    /// The agent's user name and password file on the external broker.
    pub external_credentials: Option<(String, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub interval: Duration,
    pub outbox_max_bytes: u64,
    pub outbox_max_age: Duration,
    /// Prometheus endpoint; loopback only.
    pub metrics_listen: Option<SocketAddr>,
}

impl BusConfig {
    pub const DEFAULT_PORT: u16 = 1884;
}
