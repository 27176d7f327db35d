//! The vocabulary of the container runtime boundary: what the planner reasons about (observed
//! containers, the specs it asks for, the labels that mark them) and what an engine reports
//! (images, progress, events, usage). The engines themselves live in the agent.

use std::collections::BTreeMap;

/// This device's architecture in Go's names, which Docker and registries use (`amd64`,
/// `arm64`, `arm`).
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Labels that mark a container as Outpost's.
pub mod labels {
    pub const MANAGED: &str = "io.outpost.managed";
    pub const DEVICE: &str = "io.outpost.device";
    pub const MODULE: &str = "io.outpost.module";
    pub const DEPLOYMENT: &str = "io.outpost.deployment";
    pub const VERSION: &str = "io.outpost.version";
    pub const CONFIG_HASH: &str = "io.outpost.config-hash";
    /// The module's restart policy when the container was created: what the agent follows for
    /// a container it finds without a deployment to read it from (a lost store).
    pub const RESTART_POLICY: &str = "io.outpost.restart-policy";
    /// The module's startup group when the container was created: leaving modules are stopped
    /// in reverse startup order.
    pub const STARTUP_ORDER: &str = "io.outpost.startup-order";
    /// `process` on a process module's record (absent on containers): which runtime runs it.
    pub const RUNTIME: &str = "io.outpost.runtime";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running,
    Restarting,
    Paused,
    Exited,
    Dead,
    Removing,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The image has no health check.
    None,
    Starting,
    Healthy,
    Unhealthy,
}

/// One of Outpost's containers as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub id: String,
    pub name: String,
    pub module: String,
    pub config_hash: String,
    pub state: ContainerState,
    pub health: Health,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    /// Unix seconds.
    pub started_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub image: String,
    pub image_id: String,
    pub labels: BTreeMap<String, String>,
}

/// What the executor asks the engine to create.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub binds: Vec<String>,
    /// Container port (`8080/tcp`) → (host IP, host port).
    pub port_bindings: BTreeMap<String, Vec<(Option<String>, String)>>,
    pub privileged: bool,
    pub network_mode: Option<String>,
    /// (host path, container path, cgroup permissions).
    pub devices: Vec<(String, String, String)>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub readonly_rootfs: bool,
    pub extra_hosts: Vec<String>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    /// `no-new-privileges:true` for every module.
    pub security_opt: Vec<String>,
    /// json-file log rotation: size of one file and how many are kept.
    pub log_max_size: String,
    pub log_max_files: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub id: String,
    pub tags: Vec<String>,
    /// `repo@sha256:...` digests known for the image.
    pub digests: Vec<String>,
    /// Unix seconds when the image was created.
    pub created: i64,
    /// The platform the image is built for, in Go's names (`linux`, `amd64`/`arm64`/`arm`);
    /// empty when the engine does not say (image lists do not).
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

/// What the agent needs to know about the engine itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// For reported state: `docker 20.10.24 (API 1.41)`.
    pub version: String,
    /// The engine's platform in Go's names: images for another one are refused before a switch.
    pub os: String,
    pub architecture: String,
    /// Where the engine keeps images (`/var/lib/docker`): the filesystem pulls fill.
    pub root_dir: Option<std::path::PathBuf>,
}

/// Progress of an image pull, for `outpost deploy --local` and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct PullProgress {
    pub image: String,
    pub status: String,
    pub current_bytes: u64,
    pub total_bytes: u64,
}

/// Something that happened to one of Outpost's containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    pub container_id: String,
    pub module: Option<String>,
    /// Docker's action: `start`, `die`, `oom`, `health_status: unhealthy`, `destroy`, ...
    pub action: String,
}

/// A container's resource use at one moment, for telemetry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerUsage {
    /// CPU use in percent of one CPU (a container busy on two CPUs shows 200); `None` when the
    /// engine had no earlier reading to compare with.
    pub cpu_percent: Option<f64>,
    /// Memory in use, reclaimable page cache excluded.
    pub memory_bytes: Option<u64>,
    /// The container's memory limit, or the host's memory when it has none.
    pub memory_limit_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    pub tail: Option<usize>,
    pub follow: bool,
    /// Unix seconds.
    pub since: Option<i64>,
    pub timestamps: bool,
}
