//! The device configuration: read raw from a TOML file and `OUTPOST__SECTION__KEY` environment
//! variables (the `config` crate), then validated into [`Config`], the form the program uses.
//! Every problem is reported at once, each naming its key and value.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::logging::LogFormat;
use crate::signing::TrustedKeys;

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

// ----- raw form: exactly what the file and the environment say -----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device_id: Option<String>,
    state_dir: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<String>,
    hub: Option<RawHub>,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    bus: RawBus,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    disk: RawDisk,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    url: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    topic_prefix: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    allow_insecure: bool,
    keep_alive_secs: Option<u64>,
    reconnect_max_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    kind: Option<String>,
    docker_socket: Option<PathBuf>,
    stop_grace_secs: Option<u64>,
    max_concurrent_pulls: Option<usize>,
    max_parallel_actions: Option<usize>,
    image_gc_after_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    high_watermark_percent: Option<u8>,
    pull_reserve_mb: Option<u64>,
    store_reserve_kb: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    trusted_keys: Vec<PathBuf>,
    #[serde(default)]
    allowed_registries: Vec<String>,
    #[serde(default)]
    allow_privileged: bool,
    #[serde(default)]
    allow_host_network: bool,
    #[serde(default)]
    allowed_host_paths: Vec<PathBuf>,
    #[serde(default)]
    writable_host_paths: Vec<PathBuf>,
    #[serde(default)]
    allowed_capabilities: Vec<String>,
    #[serde(default)]
    allowed_devices: Vec<PathBuf>,
    #[serde(default)]
    allowed_volumes: Vec<String>,
    allowed_host_ports: Option<Vec<String>>,
    allowed_host_ips: Option<Vec<String>>,
    default_memory_mb: Option<u64>,
    max_memory_mb: Option<u64>,
    default_pids_limit: Option<u64>,
    max_pids_limit: Option<u64>,
    #[serde(default)]
    allow_image_tags: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBus {
    enabled: Option<bool>,
    listen: Option<String>,
    external_url: Option<String>,
    username: Option<String>,
    password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    interval_secs: Option<u64>,
    outbox_max_bytes: Option<u64>,
    outbox_max_age_secs: Option<u64>,
    metrics_listen: Option<String>,
}

// ----- validated form -----

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
    pub runtime: RuntimeConfig,
    pub policy: PolicyConfig,
    /// The local API's Unix socket (owner-only), used by `outpost deploy --local`, `list`, `logs`.
    pub api_socket: PathBuf,
    pub bus: BusConfig,
    pub telemetry: TelemetryConfig,
    pub disk: DiskConfig,
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub url: url::Url,
    pub host: String,
    pub port: u16,
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
    pub docker_socket: PathBuf,
    pub stop_grace: Duration,
    pub max_concurrent_pulls: usize,
    /// Container operations (stop, remove, create, start) carried out at once when a
    /// deployment switches: ten modules that ignore SIGTERM then cost one stop grace, not ten.
    pub max_parallel_actions: usize,
    /// Images no deployment uses are removed after this long.
    pub image_gc_after: Duration,
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

pub use outpost_core::policy::{PolicyConfig, SYSTEM_PATHS};

/// A port range is `N` or `N-M`.
fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let (lo, hi) = (
        lo.trim().parse::<u16>().ok()?,
        hi.trim().parse::<u16>().ok()?,
    );
    (lo >= 1 && lo <= hi).then_some((lo, hi))
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
                    .with_list_parse_key("policy.trusted_keys")
                    .with_list_parse_key("policy.allowed_registries")
                    .with_list_parse_key("policy.allowed_host_paths")
                    .with_list_parse_key("policy.writable_host_paths")
                    .with_list_parse_key("policy.allowed_capabilities")
                    .with_list_parse_key("policy.allowed_devices")
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

struct Issues(Vec<ConfigIssue>);

impl Issues {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// `SECTION.username` with `SECTION.password_file`: both or neither.
    fn credentials(
        &mut self,
        section: &str,
        username: Option<String>,
        password_file: Option<PathBuf>,
        base: &Path,
    ) -> Option<(String, PathBuf)> {
        match (username, password_file) {
            (Some(u), Some(p)) => {
                Some((u, self.file(&format!("{section}.password_file"), &p, base)))
            }
            (None, None) => None,
            (Some(_), None) => {
                self.push(
                    &format!("{section}.password_file"),
                    format!("is required with {section}.username (the password is kept in a file, never in the config)"),
                );
                None
            }
            (None, Some(_)) => {
                self.push(
                    &format!("{section}.username"),
                    format!("is required with {section}.password_file"),
                );
                None
            }
        }
    }

    /// A file the agent will need: relative paths are taken from the config file's folder.
    fn file(&mut self, key: &str, path: &Path, base: &Path) -> PathBuf {
        let path = if path.is_relative() {
            base.join(path)
        } else {
            path.to_path_buf()
        };
        if !path.is_file() {
            self.push(
                key,
                format!(
                    "file {} does not exist or is not a regular file",
                    path.display()
                ),
            );
        }
        path
    }
}

fn validate(raw: RawConfig, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
    let mut issues = Issues(Vec::new());

    let device_id = raw.device_id.unwrap_or_default();
    if device_id.is_empty() {
        issues.push(
            "device_id",
            "is required: the name this device has on the hub",
        );
    } else if !is_topic_level(&device_id) {
        issues.push(
            "device_id",
            format!("`{device_id}` is not valid: 1 to 128 letters, digits, `.`, `_` or `-`"),
        );
    } else if device_id == "groups" || device_id.starts_with('_') {
        // `{prefix}/groups/...` holds group deployments and `{prefix}/_...` the operator's
        // own topics: a device of that name would collide with them.
        issues.push(
            "device_id",
            format!("`{device_id}` is reserved on the hub (`groups` and names starting with `_`)"),
        );
    }
    let state_dir = raw
        .state_dir
        .unwrap_or_else(|| PathBuf::from("/var/lib/outpost"));
    if state_dir.is_relative() {
        issues.push(
            "state_dir",
            format!("`{}` must be an absolute path", state_dir.display()),
        );
    }
    let log_level = raw.log_level.unwrap_or_else(|| "info".into());
    // A bare word must be a level: `inf0` would otherwise pass as a target name.
    let bare_ok = log_level.contains(['=', ',', ':'])
        || ["error", "warn", "info", "debug", "trace", "off"].contains(&log_level.as_str());
    if !bare_ok || tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        issues.push(
            "log_level",
            format!("`{log_level}` is not a level (error, warn, info, debug, trace) or filter"),
        );
    }
    let log_format = match raw.log_format.as_deref() {
        None | Some("human") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            issues.push("log_format", format!("`{other}` is not `human` or `json`"));
            LogFormat::Human
        }
    };

    let hub = raw.hub.and_then(|h| hub(h, base, &mut issues));

    let r = raw.runtime;
    if let Some(kind) = r.kind.as_deref()
        && kind != "docker"
    {
        issues.push(
            "runtime.kind",
            format!("`{kind}` is not supported; use `docker`"),
        );
    }
    let max_concurrent_pulls = r.max_concurrent_pulls.unwrap_or(2);
    if !(1..=16).contains(&max_concurrent_pulls) {
        issues.push(
            "runtime.max_concurrent_pulls",
            format!("{max_concurrent_pulls} is outside 1..=16"),
        );
    }
    let stop_grace_secs = r.stop_grace_secs.unwrap_or(10);
    if stop_grace_secs > 600 {
        issues.push(
            "runtime.stop_grace_secs",
            format!("{stop_grace_secs} is over 600 seconds"),
        );
    }
    let max_parallel_actions = r.max_parallel_actions.unwrap_or(16);
    if !(1..=64).contains(&max_parallel_actions) {
        issues.push(
            "runtime.max_parallel_actions",
            format!("{max_parallel_actions} is outside 1..=64"),
        );
    }
    let runtime = RuntimeConfig {
        max_parallel_actions,
        docker_socket: r
            .docker_socket
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
        stop_grace: Duration::from_secs(stop_grace_secs),
        max_concurrent_pulls,
        image_gc_after: Duration::from_secs(r.image_gc_after_secs.unwrap_or(24 * 3600)),
    };

    let p = raw.policy;
    let trusted_key_files: Vec<PathBuf> = p
        .trusted_keys
        .iter()
        .enumerate()
        .map(|(i, f)| issues.file(&format!("policy.trusted_keys[{i}]"), f, base))
        .collect();
    let trusted_keys = if trusted_key_files.iter().all(|f| f.is_file()) {
        TrustedKeys::load(&trusted_key_files).unwrap_or_else(|e| {
            issues.push("policy.trusted_keys", e.to_string());
            TrustedKeys::default()
        })
    } else {
        TrustedKeys::default()
    };
    for (key, prefixes) in [
        ("allowed_host_paths", &p.allowed_host_paths),
        ("writable_host_paths", &p.writable_host_paths),
        ("allowed_devices", &p.allowed_devices),
    ] {
        for (i, prefix) in prefixes.iter().enumerate() {
            if prefix.is_relative()
                || prefix
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                issues.push(
                    &format!("policy.{key}[{i}]"),
                    format!(
                        "`{}` must be an absolute path without `..`",
                        prefix.display()
                    ),
                );
            }
        }
    }
    // A module writes under a writable prefix: if a read-only prefix could reach into it (or
    // it into one), a module could plant a link there that a later bind follows.
    for (i, w) in p.writable_host_paths.iter().enumerate() {
        for r in &p.allowed_host_paths {
            if w.starts_with(r) || r.starts_with(w) {
                issues.push(
                    &format!("policy.writable_host_paths[{i}]"),
                    format!(
                        "`{}` overlaps the read-only prefix `{}`: modules could plant links \
                         where read-only binds resolve; keep them apart",
                        w.display(),
                        r.display()
                    ),
                );
            }
        }
    }
    for (i, registry) in p.allowed_registries.iter().enumerate() {
        if registry.is_empty() || registry.contains('/') {
            issues.push(
                &format!("policy.allowed_registries[{i}]"),
                format!("`{registry}` must be a registry host[:port], such as `registry.example.com:5000`"),
            );
        }
    }
    let defaults = PolicyConfig::default();
    let mut allowed_capabilities = Vec::new();
    for (i, cap) in p.allowed_capabilities.iter().enumerate() {
        let upper = cap.to_ascii_uppercase();
        let name = upper.trim_start_matches("CAP_").to_string();
        if !crate::manifest::validate::is_capability(&name) {
            issues.push(
                &format!("policy.allowed_capabilities[{i}]"),
                format!("`{cap}` is not a Linux capability name such as `NET_BIND_SERVICE`"),
            );
        }
        allowed_capabilities.push(name);
    }
    for (i, v) in p.allowed_volumes.iter().enumerate() {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        {
            issues.push(
                &format!("policy.allowed_volumes[{i}]"),
                format!("`{v}` is not a volume name"),
            );
        }
    }
    let allowed_host_ports = match p.allowed_host_ports {
        None => defaults.allowed_host_ports.clone(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let parsed = parse_port_range(r);
                if parsed.is_none() {
                    issues.push(
                        &format!("policy.allowed_host_ports[{i}]"),
                        format!(
                            "`{r}` must be a port (`8080`) or a range (`8000-8099`) within 1-65535"
                        ),
                    );
                }
                parsed
            })
            .collect(),
    };
    let allowed_host_ips = match p.allowed_host_ips {
        None => defaults.allowed_host_ips.clone(),
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, ip)| {
                let parsed = ip.parse::<std::net::IpAddr>().ok();
                if parsed.is_none() {
                    issues.push(
                        &format!("policy.allowed_host_ips[{i}]"),
                        format!("`{ip}` is not an IP address"),
                    );
                }
                parsed
            })
            .collect(),
    };
    let default_memory_mb = match p.default_memory_mb {
        None => defaults.default_memory_mb,
        Some(0) => None,
        Some(mb) if mb < 6 => {
            issues.push(
                "policy.default_memory_mb",
                "must be at least 6 (the engine's minimum), or 0 for no limit",
            );
            None
        }
        Some(mb) => Some(mb),
    };
    let max_memory_mb = p.max_memory_mb.filter(|mb| *mb > 0);
    if let (Some(d), Some(m)) = (default_memory_mb, max_memory_mb)
        && d > m
    {
        issues.push(
            "policy.default_memory_mb",
            format!("{d} is above policy.max_memory_mb ({m})"),
        );
    }
    let default_pids_limit = p.default_pids_limit.unwrap_or(defaults.default_pids_limit);
    let max_pids_limit = p.max_pids_limit.unwrap_or(defaults.max_pids_limit);
    if default_pids_limit == 0 || default_pids_limit > max_pids_limit {
        issues.push(
            "policy.default_pids_limit",
            format!("must be between 1 and policy.max_pids_limit ({max_pids_limit})"),
        );
    }
    let mut policy = PolicyConfig {
        trusted_key_files,
        trusted_keys,
        allowed_registries: p.allowed_registries,
        allow_privileged: p.allow_privileged,
        allow_host_network: p.allow_host_network,
        allowed_host_paths: p.allowed_host_paths,
        writable_host_paths: p.writable_host_paths,
        allowed_capabilities,
        allowed_devices: p.allowed_devices,
        allowed_volumes: p.allowed_volumes,
        allowed_host_ports,
        allowed_host_ips,
        default_memory_mb,
        max_memory_mb,
        default_pids_limit,
        max_pids_limit,
        allow_image_tags: p.allow_image_tags,
        forbidden_host_paths: Vec::new(),
    };

    let api_socket = raw
        .api
        .socket
        .unwrap_or_else(|| PathBuf::from("/run/outpost/api.sock"));
    if api_socket.is_relative() {
        issues.push(
            "api.socket",
            format!("`{}` must be an absolute path", api_socket.display()),
        );
    }
    policy.forbidden_host_paths = SYSTEM_PATHS
        .iter()
        .map(PathBuf::from)
        .chain([
            state_dir.clone(),
            runtime.docker_socket.clone(),
            api_socket.clone(),
        ])
        .chain(policy.trusted_key_files.iter().cloned())
        .chain(hub.iter().flat_map(|h| {
            h.client_auth
                .iter()
                .flat_map(|(cert, key)| [cert.clone(), key.clone()])
                .chain(h.credentials.iter().map(|(_, file)| file.clone()))
                .chain(h.ca_file.clone())
        }))
        .collect();

    let listen = raw
        .bus
        .listen
        .and_then(|bus_listen| match bus_listen.parse::<SocketAddr>() {
            Ok(addr) => {
                if addr.ip().is_unspecified() {
                    issues.push("bus.listen", format!("`{bus_listen}` listens on every interface; name the address modules reach (e.g. the Docker bridge's), or leave it out for that default"));
                }
                Some(addr)
            }
            Err(_) => {
                issues.push(
                    "bus.listen",
                    format!("`{bus_listen}` is not an address:port"),
                );
                None
            }
        });
    let external_url = raw
        .bus
        .external_url
        .and_then(|u| match url::Url::parse(&u) {
            Ok(url) if !url.username().is_empty() || url.password().is_some() => {
                issues.push(
                    "bus.external_url",
                    "must not hold credentials: put them in bus.username and bus.password_file",
                );
                None
            }
            Ok(url) if matches!(url.scheme(), "mqtt" | "mqtts") => Some(url),
            _ => {
                issues.push(
                    "bus.external_url",
                    format!("`{u}` is not an mqtt:// or mqtts:// URL"),
                );
                None
            }
        });
    let external_credentials =
        issues.credentials("bus", raw.bus.username, raw.bus.password_file, base);
    if external_credentials.is_some() && external_url.is_none() {
        issues.push(
            "bus.username",
            "credentials are for an external broker: set bus.external_url too",
        );
    }
    let bus = BusConfig {
        enabled: raw.bus.enabled.unwrap_or(true),
        listen,
        external_url,
        external_credentials,
    };

    let t = raw.telemetry;
    let interval_secs = t.interval_secs.unwrap_or(60);
    if interval_secs == 0 {
        issues.push("telemetry.interval_secs", "must be at least 1");
    }
    let metrics_listen = t
        .metrics_listen
        .and_then(|m| match m.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                issues.push(
                    "telemetry.metrics_listen",
                    format!("`{m}` is not a loopback address; metrics are served on loopback only"),
                );
                None
            }
            Err(_) => {
                issues.push(
                    "telemetry.metrics_listen",
                    format!("`{m}` is not an address:port"),
                );
                None
            }
        });
    let outbox_max_bytes = t.outbox_max_bytes.unwrap_or(64 * 1024 * 1024);
    if outbox_max_bytes < 64 * 1024 {
        issues.push(
            "telemetry.outbox_max_bytes",
            format!("{outbox_max_bytes} is below the minimum of 65536 (64 KiB)"),
        );
    }
    let outbox_max_age_secs = t.outbox_max_age_secs.unwrap_or(7 * 24 * 3600);
    if outbox_max_age_secs < 60 {
        issues.push(
            "telemetry.outbox_max_age_secs",
            format!("{outbox_max_age_secs} is below the minimum of 60"),
        );
    }
    let telemetry = TelemetryConfig {
        interval: Duration::from_secs(interval_secs),
        outbox_max_bytes,
        outbox_max_age: Duration::from_secs(outbox_max_age_secs),
        metrics_listen,
    };

    let defaults = DiskConfig::default();
    let high_watermark_percent = raw
        .disk
        .high_watermark_percent
        .unwrap_or(defaults.high_watermark_percent);
    if !(50..=99).contains(&high_watermark_percent) {
        issues.push(
            "disk.high_watermark_percent",
            format!("{high_watermark_percent} is outside 50..=99"),
        );
    }
    let store_reserve_kb = raw
        .disk
        .store_reserve_kb
        .unwrap_or(defaults.store_reserve_bytes >> 10);
    if store_reserve_kb > 1 << 20 {
        issues.push(
            "disk.store_reserve_kb",
            format!("{store_reserve_kb} is over 1048576 (1 GiB)"),
        );
    }
    let disk = DiskConfig {
        high_watermark_percent,
        pull_reserve_bytes: raw
            .disk
            .pull_reserve_mb
            .map_or(defaults.pull_reserve_bytes, |mb| mb.saturating_mul(1 << 20)),
        store_reserve_bytes: store_reserve_kb << 10,
    };

    if !issues.0.is_empty() {
        return Err(issues.0);
    }
    Ok(Config {
        source: PathBuf::new(),
        device_id,
        state_dir,
        log_level,
        log_format,
        hub,
        runtime,
        policy,
        api_socket,
        bus,
        telemetry,
        disk,
    })
}

fn hub(h: RawHub, base: &Path, issues: &mut Issues) -> Option<HubConfig> {
    let Some(text) = h.url else {
        issues.push(
            "hub.url",
            "is required when [hub] is present, e.g. `mqtts://hub.example.com:8883`",
        );
        return None;
    };
    let url = match url::Url::parse(&text) {
        Ok(u) => u,
        Err(e) => {
            issues.push("hub.url", format!("`{text}` is not a URL: {e}"));
            return None;
        }
    };
    let tls = match url.scheme() {
        "mqtts" => true,
        "mqtt" => false,
        other => {
            issues.push(
                "hub.url",
                format!(
                    "scheme `{other}` is not supported; use `mqtts://` (or `mqtt://` on loopback)"
                ),
            );
            return None;
        }
    };
    let Some(host) = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
    else {
        issues.push("hub.url", format!("`{text}` names no host"));
        return None;
    };
    if !tls && !h.allow_insecure && !is_loopback(&host) {
        issues.push(
            "hub.url",
            format!("`{text}` is plaintext MQTT to a remote host; use `mqtts://`, or set hub.allow_insecure = true if you accept that"),
        );
    }
    let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
    let ca_file = h.ca_file.map(|f| issues.file("hub.ca_file", &f, base));
    let client_auth = match (h.cert_file, h.key_file) {
        (Some(c), Some(k)) => Some((
            issues.file("hub.cert_file", &c, base),
            issues.file("hub.key_file", &k, base),
        )),
        (None, None) => None,
        (Some(_), None) => {
            issues.push("hub.key_file", "is required with hub.cert_file");
            None
        }
        (None, Some(_)) => {
            issues.push("hub.cert_file", "is required with hub.key_file");
            None
        }
    };
    if client_auth.is_some() && !tls {
        issues.push(
            "hub.cert_file",
            "a client certificate needs an `mqtts://` URL",
        );
    }
    let credentials = issues.credentials("hub", h.username, h.password_file, base);
    let topic_prefix = h.topic_prefix.unwrap_or_else(|| "outpost".into());
    if topic_prefix.is_empty()
        || topic_prefix.contains(['+', '#'])
        || topic_prefix.starts_with('/')
        || topic_prefix.ends_with('/')
    {
        issues.push(
            "hub.topic_prefix",
            format!("`{topic_prefix}` must be a topic without wildcards or leading/trailing `/`"),
        );
    }
    for (i, group) in h.groups.iter().enumerate() {
        if !is_topic_level(group) {
            issues.push(
                &format!("hub.groups[{i}]"),
                format!("`{group}` is not valid: 1 to 128 letters, digits, `.`, `_` or `-`"),
            );
        }
    }
    let keep_alive = h.keep_alive_secs.unwrap_or(30);
    if !(5..=3600).contains(&keep_alive) {
        issues.push(
            "hub.keep_alive_secs",
            format!("{keep_alive} is outside 5..=3600"),
        );
    }
    let reconnect_max = h.reconnect_max_secs.unwrap_or(30);
    if !(1..=3600).contains(&reconnect_max) {
        issues.push(
            "hub.reconnect_max_secs",
            format!("{reconnect_max} is outside 1..=3600"),
        );
    }
    Some(HubConfig {
        url,
        host,
        port,
        tls,
        ca_file,
        client_auth,
        credentials,
        topic_prefix,
        groups: h.groups,
        keep_alive: Duration::from_secs(keep_alive),
        reconnect_max: Duration::from_secs(reconnect_max),
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        Config::load(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    fn issues(r: Result<Config, ConfigError>) -> Vec<String> {
        match r {
            Err(ConfigError::Invalid { issues, .. }) => {
                issues.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn policy_keys_are_checked_and_default_to_deny() {
        let c = load("device_id = \"cam-1\"\n", &[]).unwrap();
        let p = &c.policy;
        assert!(p.allowed_capabilities.is_empty() && p.allowed_devices.is_empty());
        assert_eq!(p.allowed_host_ports, [(1024, 65535)]);
        assert!(p.allowed_host_ips.iter().all(|ip| ip.is_loopback()));
        assert_eq!(
            (p.default_memory_mb, p.default_pids_limit),
            (Some(512), 1024)
        );
        assert!(!p.allow_image_tags);
        for forbidden in ["/var/lib/outpost", "/var/run/docker.sock", "/proc", "/sys"] {
            assert!(
                p.forbidden_host_paths.contains(&PathBuf::from(forbidden)),
                "{forbidden} is not forbidden"
            );
        }
        let found = issues(load(
            "device_id = \"cam-1\"\n[policy]\nallowed_host_paths = [\"/srv\"]\n\
             writable_host_paths = [\"/srv/data\"]\nallowed_capabilities = [\"CAP_SYS_ADMIN\", \"FLY\"]\n\
             allowed_host_ports = [\"80\", \"90-70\"]\nallowed_host_ips = [\"lan\"]\n\
             default_memory_mb = 2048\nmax_memory_mb = 1024\n",
            &[],
        ));
        let keys: Vec<&str> = found
            .iter()
            .map(|i| i.split(':').next().unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            [
                "policy.writable_host_paths[0]",
                "policy.allowed_capabilities[1]",
                "policy.allowed_host_ports[1]",
                "policy.allowed_host_ips[0]",
                "policy.default_memory_mb",
            ],
            "{found:?}"
        );
        let c = load(
            "device_id = \"cam-1\"\n[policy]\nallowed_capabilities = [\"cap_net_admin\"]\n\
             default_memory_mb = 0\n",
            &[("OUTPOST__POLICY__ALLOWED_HOST_PORTS", "8000-8099,9000")],
        )
        .unwrap();
        assert_eq!(c.policy.allowed_capabilities, ["NET_ADMIN"]);
        assert_eq!(c.policy.default_memory_mb, None);
        assert_eq!(c.policy.allowed_host_ports, [(8000, 8099), (9000, 9000)]);
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
    fn plaintext_is_allowed_on_loopback_or_when_asked() {
        assert!(
            load(
                "device_id = \"a\"\n[hub]\nurl = \"mqtt://127.0.0.1:1883\"\n",
                &[]
            )
            .is_ok()
        );
        assert!(
            load(
                "device_id = \"a\"\n[hub]\nurl = \"mqtt://hub.lan\"\nallow_insecure = true\n",
                &[]
            )
            .is_ok()
        );
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
