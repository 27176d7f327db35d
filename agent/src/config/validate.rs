//! From the raw form to [`Config`]: the top-level keys, `[runtime]`, `[api]` and `[disk]` here,
//! the larger sections in their own modules, and every problem gathered in [`Issues`] so all
//! are reported at once, each with its key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bus::bus;
use super::hub::hub;
use super::policy::policy;
use super::provisioning::provisioning;
use super::raw::{RawConfig, RawDisk, RawRuntime};
use super::telemetry::telemetry;
use super::{Config, ConfigIssue, DiskConfig, RuntimeConfig, SYSTEM_PATHS};
use crate::logging::LogFormat;

pub(super) struct Issues(pub(super) Vec<ConfigIssue>);

impl Issues {
    pub(super) fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// `SECTION.username` with `SECTION.password_file`: both or neither.
    pub(super) fn credentials(
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
    pub(super) fn file(&mut self, key: &str, path: &Path, base: &Path) -> PathBuf {
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

pub(super) fn validate(raw: RawConfig, base: &Path) -> Result<Config, Vec<ConfigIssue>> {
    let mut issues = Issues(Vec::new());

    let device_id = raw.device_id.unwrap_or_default();
    if raw.provisioning.is_some() {
        if !device_id.is_empty() {
            issues.push(
                "device_id",
                "must be left out with [provisioning]: the responder names the device at first boot",
            );
        }
    } else if device_id.is_empty() {
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
    let provisioning = raw
        .provisioning
        .and_then(|p| provisioning(p, hub.as_ref(), base, &mut issues));

    let runtime = runtime(raw.runtime, &mut issues);

    let mut policy = policy(raw.policy, base, &mut issues);

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
        .chain(provisioning.iter().flat_map(|p| {
            [p.claim_cert.clone(), p.claim_key.clone()]
                .into_iter()
                .chain(p.ca_file.clone())
        }))
        .collect();

    let bus = bus(raw.bus, base, &mut issues);

    let telemetry = telemetry(raw.telemetry, &mut issues);

    let disk = disk(raw.disk, &mut issues);

    let update = super::update::update(raw.update, base, &mut issues);

    let maintenance = super::maintenance::maintenance(raw.maintenance, &mut issues);

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
        provisioning,
        runtime,
        policy,
        api_socket,
        bus,
        telemetry,
        disk,
        update,
        maintenance,
    })
}

/// `[runtime]`: the engine and how much is done at once.
fn runtime(r: RawRuntime, issues: &mut Issues) -> RuntimeConfig {
    let kind = match r.kind.as_deref() {
        None | Some("docker") => crate::manifest::RuntimeKind::Docker,
        Some("process") => crate::manifest::RuntimeKind::Process,
        Some(other) => {
            issues.push(
                "runtime.kind",
                format!(
                    "`{other}` is not supported; use `docker` (an engine, and process modules as the policy allows) or `process` (no engine)"
                ),
            );
            crate::manifest::RuntimeKind::Docker
        }
    };
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
    use crate::runtime::process::cgroup::Setting;
    let process_cgroup = match r.process_cgroup.as_deref() {
        None | Some("auto") => Setting::Auto,
        Some("off") => Setting::Off,
        Some(p) if p.starts_with("/sys/fs/cgroup/") && !p.split('/').any(|c| c == "..") => {
            Setting::Path(PathBuf::from(p))
        }
        Some(other) => {
            issues.push(
                "runtime.process_cgroup",
                format!(
                    "`{other}` is not `auto`, `off` or a folder under /sys/fs/cgroup/ (without `..`)"
                ),
            );
            Setting::Off
        }
    };
    use crate::runtime::process::user;
    let process_user = match r.process_user.as_deref() {
        None => user::Setting::Default,
        Some(v) => user::Setting::parse(v).unwrap_or_else(|why| {
            issues.push("runtime.process_user", why);
            user::Setting::Default
        }),
    };
    RuntimeConfig {
        kind,
        max_parallel_actions,
        process_cgroup,
        process_user,
        docker_socket: r
            .docker_socket
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock")),
        stop_grace: Duration::from_secs(stop_grace_secs),
        max_concurrent_pulls,
        image_gc_after: Duration::from_secs(r.image_gc_after_secs.unwrap_or(24 * 3600)),
    }
}

/// `[disk]`: the high watermark and the reserves.
fn disk(disk: RawDisk, issues: &mut Issues) -> DiskConfig {
    let defaults = DiskConfig::default();
    let high_watermark_percent = disk
        .high_watermark_percent
        .unwrap_or(defaults.high_watermark_percent);
    if !(50..=99).contains(&high_watermark_percent) {
        issues.push(
            "disk.high_watermark_percent",
            format!("{high_watermark_percent} is outside 50..=99"),
        );
    }
    let store_reserve_kb = disk
        .store_reserve_kb
        .unwrap_or(defaults.store_reserve_bytes >> 10);
    if store_reserve_kb > 1 << 20 {
        issues.push(
            "disk.store_reserve_kb",
            format!("{store_reserve_kb} is over 1048576 (1 GiB)"),
        );
    }
    DiskConfig {
        high_watermark_percent,
        pull_reserve_bytes: disk
            .pull_reserve_mb
            .map_or(defaults.pull_reserve_bytes, |mb| mb.saturating_mul(1 << 20)),
        store_reserve_bytes: store_reserve_kb << 10,
    }
}

pub(super) fn is_topic_level(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
