//! The deployment manifest: its types, its JSON Schema and its validation.
//!
//! This module owns the contract between the operator and the device. Parsing goes in three
//! passes so that an operator sees every mistake at once, each with the JSON path of the field:
//!
//! 1. [`json`]: the text is read as JSON, with duplicate keys (which JSON parsers silently
//!    collapse) reported by path;
//! 2. [`schema`]: the JSON is checked against the schema generated from these types (unknown
//!    fields, wrong types, out-of-range numbers, enum values) collecting every error;
//! 3. [`validate`]: the typed manifest is checked for what a schema cannot say (image references,
//!    routes naming existing modules, host paths, registry credentials being used, ...).

pub mod image;
pub mod json;
pub mod schema;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use image::ImageRef;

/// The only manifest schema version this agent understands.
pub const SCHEMA_VERSION: &str = "1.0";

/// Largest manifest accepted, in bytes: a manifest is configuration, not data.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// A deployment: the complete desired state of one device's modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Outpost deployment manifest")]
pub struct Deployment {
    /// Always "1.0" for this version of the format.
    pub schema_version: String,
    /// Names the deployment in reported state and logs (e.g. `line-3-vision`).
    pub id: String,
    /// Grows with every new deployment for the device; older or equal versions are refused.
    #[schemars(range(min = 1))]
    pub version: u64,
    /// Decides between group deployments that both target a device: the higher one wins.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u32,
    /// The modules to run, by name (a lowercase DNS label).
    pub modules: BTreeMap<String, Module>,
    /// Credentials for the registries the modules' images come from, by registry host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registries: BTreeMap<String, RegistryCredentials>,
    /// Where module outputs go: upstream to the hub, or to another module's input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    /// What to do when this deployment does not become healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// The one device or group this deployment is for. Signed with the rest, so an envelope
    /// signed for one device cannot be replayed on another's topic. Required on a device that
    /// trusts keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// When this deployment stops being accepted (RFC 3339, e.g. `2026-12-31T00:00:00Z`), so
    /// that an old signed envelope cannot be held back and delivered later. A deployment
    /// already in force keeps running after it. Required on a device that trusts keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The agent this device should run. Updated like a module but with more care: downloaded,
    /// verified, switched under a health gate and rolled back when the new agent does not pass
    /// it (docs/operations.md#updating-the-agent). Without it the agent is left as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentSpec>,
    /// Files the modules read (models, lookup tables), by name (a lowercase DNS label), each
    /// pinned by its SHA-256. Fetched and verified before a module that names one is started;
    /// a new digest reaches a running module without restarting it (docs/manifest.md#artifacts).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifacts: BTreeMap<String, Artifact>,
    /// Apply at once, outside the device's update windows (a security fix). Update locks
    /// still hold it until their deadline (docs/manifest.md#update-windows-and-locks).
    #[serde(default, skip_serializing_if = "is_false")]
    pub urgent: bool,
    /// How long a module's update lock may hold this deployment back, in seconds from when
    /// only locks held it (default 3600, at most a week). Past it, the deployment switches
    /// anyway and the lock is dropped with the module's old container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 604800))]
    pub update_lock_deadline_secs: Option<u64>,
}

/// How long an update lock holds a deployment without `updateLockDeadlineSecs`.
pub const DEFAULT_UPDATE_LOCK_DEADLINE_SECS: u64 = 3600;

impl Deployment {
    /// How long an update lock may hold this deployment back.
    pub fn update_lock_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.update_lock_deadline_secs
                .unwrap_or(DEFAULT_UPDATE_LOCK_DEADLINE_SECS),
        )
    }
}

/// The wanted agent: a version and, per platform, the build to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// What the new agent reports (`outpost --version`): `1.4.2`, `1.5.0-rc.1`.
    pub version: String,
    /// One build per platform, by the platform's name (`linux/amd64`, `linux/arm64`,
    /// `linux/arm/v7`). A device whose platform is not named keeps its agent.
    #[schemars(length(min = 1))]
    pub artifacts: BTreeMap<String, Artifact>,
}

/// A file the device downloads and checks before using it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Artifact {
    /// `https://…`, `http://…` (the digest protects it) or `file:///absolute/path`.
    pub url: String,
    /// SHA-256 of the file, 64 lowercase hex digits: the file is used only if it matches.
    pub sha256: String,
    /// Its size in bytes: a download stops at it, and the disk is checked for it first.
    #[schemars(range(min = 1))]
    pub size: u64,
}

/// Where a deployment may apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Target {
    /// One device, by its `device_id`.
    Device(String),
    /// A group, by name: the devices that list it in `hub.groups`.
    Group(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Device(d) => write!(f, "device `{d}`"),
            Target::Group(g) => write!(f, "group `{g}`"),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One module: a container the agent keeps in its desired status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Module {
    /// The runtime that runs the module: `docker` (a container) or `process` (a native
    /// executable the agent runs itself, on a device without a container engine).
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// `registry/repository:tag` or `registry/repository@sha256:<64 hex>`; required for a
    /// `docker` module, left out for a `process` one (whose executable takes its place once
    /// the device accepted the deployment: in its plans and reports).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// For a `process` module: the executable (an absolute path the device's policy allows,
    /// `policy.allowed_executables`) and its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// For a `process` module: its working directory (absolute). Without it, a private folder
    /// of the module's own under the agent's state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// The platform to pull for a multi-platform image (`linux/arm64`, `linux/arm/v7`), when
    /// it must not be the engine's own: an armv7 image on an arm64 board, say. Without it the
    /// engine's platform is pulled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    #[serde(default)]
    pub status: DesiredStatus,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Modules start in groups of equal order, lowest first; a group starts when the
    /// lower groups are running.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub startup_order: u32,
    /// Environment variables for the module's process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The subset of Docker's container-create options that Outpost supports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_options: Option<CreateOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// What the device must have for this module; a device that lacks it refuses the deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires: Option<Requires>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<Security>,
    /// The deployment's artifacts this module reads, by name: each appears read-only as
    /// `$OUTPOST_ARTIFACTS_DIR/NAME` (`/outpost/artifacts/NAME` in a container).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    #[default]
    Docker,
    Process,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Docker => "docker",
            RuntimeKind::Process => "process",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull on every (re)creation of the container.
    Always,
    /// Pull only when the image is not on the device: what lets a device run offline.
    #[default]
    IfNotPresent,
    /// Never pull: the image must have been placed on the device.
    Never,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredStatus {
    #[default]
    Running,
    Stopped,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever the module exits, whatever its exit code.
    #[default]
    Always,
    /// Restart when the module exits with a non-zero code or is killed.
    OnFailure,
    /// As `on-failure`, and also when its health check reports unhealthy.
    OnUnhealthy,
    /// Leave the module exited.
    Never,
}

impl RestartPolicy {
    /// The manifest's name for the policy (also written as a container label).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::OnUnhealthy => "on-unhealthy",
            RestartPolicy::Never => "never",
        }
    }

    /// The policy a label names; `None` for anything else.
    pub fn from_label(label: &str) -> Option<RestartPolicy> {
        [
            RestartPolicy::Always,
            RestartPolicy::OnFailure,
            RestartPolicy::OnUnhealthy,
            RestartPolicy::Never,
        ]
        .into_iter()
        .find(|p| p.as_str() == label)
    }
}

/// Docker create options Outpost passes through. Anything else is refused, so that a manifest
/// cannot reach engine features the device's policy has not been written for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// `uid[:gid]` or a user name known to the image.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// Extra labels; keys under `io.outpost.` are the agent's own and refused.
    #[serde(rename = "Labels", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(
        rename = "HostConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host_config: Option<HostConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// `host-path-or-volume:container-path[:ro|rw]`. Host paths must be allowed by local policy.
    #[serde(rename = "Binds", default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<String>,
    /// `"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]`.
    #[serde(
        rename = "PortBindings",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub port_bindings: BTreeMap<String, Vec<PortBinding>>,
    /// Needs `allow_privileged` in the device policy.
    #[serde(rename = "Privileged", default, skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// `bridge` (default), `none` or `host` (`host` needs `allow_host_network`).
    #[serde(
        rename = "NetworkMode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub network_mode: Option<NetworkMode>,
    #[serde(rename = "Devices", default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceMapping>,
    #[serde(rename = "CapAdd", default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(rename = "CapDrop", default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(rename = "ReadonlyRootfs", default, skip_serializing_if = "is_false")]
    pub readonly_rootfs: bool,
    /// `hostname:IP` entries written to the container's `/etc/hosts`.
    #[serde(rename = "ExtraHosts", default, skip_serializing_if = "Vec::is_empty")]
    pub extra_hosts: Vec<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    Bridge,
    Host,
    None,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortBinding {
    /// The host address to bind; empty means Docker's default (all interfaces).
    #[serde(rename = "HostIp", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    #[serde(rename = "HostPort")]
    pub host_port: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    #[serde(rename = "PathOnHost")]
    pub path_on_host: String,
    #[serde(
        rename = "PathInContainer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub path_in_container: Option<String>,
    /// Any combination of `r`, `w` and `m`.
    #[serde(
        rename = "CgroupPermissions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cgroup_permissions: Option<String>,
}

/// Resource limits; what a module leaves out, the device policy's defaults fill in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// Hard memory limit in MiB (no swap on top of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 6, max = 1048576))]
    pub memory_mb: Option<u64>,
    /// CPU share as a number of cores, e.g. 0.5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 1024))]
    pub cpus: Option<f64>,
    /// The most processes and threads the module may have at once (a fork bomb stops there);
    /// without it, the device policy's `default_pids_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pids_limit: Option<u64>,
}

/// How a module hardens itself beyond the device's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Security {
    /// Drop every capability the engine grants by default; `CapAdd` then names all the module
    /// keeps.
    #[serde(default, skip_serializing_if = "is_false")]
    pub cap_drop_all: bool,
}

/// What a module needs from the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requires {
    /// The CPU architectures the image runs on; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arch: Vec<Arch>,
    /// Memory the device must have in total, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_memory_mb: Option<u64>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
    Armv7,
}

impl Arch {
    /// The architecture this agent was built for.
    pub fn current() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            "arm" => Some(Arch::Armv7),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
        })
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: Secret,
}

impl fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// A string that never appears in logs, `Debug` output or reported state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself: call only where it is handed to the party that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A route from a module output topic filter to the hub or to another module's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// `modules/{name}/outputs/{filter}` where filter may use MQTT wildcards.
    pub from: String,
    /// `$upstream/{stream}` or `modules/{name}/inputs/{topic}`.
    pub to: String,
    /// For `$upstream` routes: 0 (most important) to 9 (least), default 5. When the outbox is
    /// full, the oldest records of the least important stream are dropped first, and the drain
    /// favours important streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 9))]
    pub priority: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollback {
    /// Return to the last good deployment when this one does not become healthy in time.
    pub on_failure: bool,
    /// How long every module has to be running (and healthy, if it has a health check).
    #[serde(default = "default_healthy_within")]
    #[schemars(range(min = 1, max = 86400))]
    pub healthy_within_secs: u64,
}

fn default_healthy_within() -> u64 {
    60
}

/// One thing wrong with a manifest: where, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// JSON pointer of the field (`/modules/infer/image`), or `line L, column C` for text
    /// that is not JSON at all.
    pub path: String,
    pub message: String,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Issue {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a manifest was refused. Every variant lists all the issues found, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("manifest is not valid JSON: {0}")]
    Syntax(Issue),
    #[error("manifest is invalid ({} issue{}): {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, join_issues(.0))]
    Invalid(Vec<Issue>),
}

fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(Issue::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl ManifestError {
    /// Every issue with its path, for reports and `--json` output.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            ManifestError::TooLarge { .. } => vec![Issue::new("", self.to_string())],
            ManifestError::Syntax(issue) => vec![issue.clone()],
            ManifestError::Invalid(issues) => issues.clone(),
        }
    }
}

/// Parses and validates a manifest's JSON text: all three passes, every issue reported.
///
/// Fails when the text is too large, is not JSON, does not match the schema, or breaks a rule
/// of [`validate`]. Checks that depend on the device (policy, version history) are not made here.
pub fn parse(bytes: &[u8]) -> Result<Deployment, ManifestError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            size: bytes.len(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    let (value, mut issues) = json::parse_checked(bytes).map_err(ManifestError::Syntax)?;
    issues.extend(schema::check(&value));
    if !issues.is_empty() {
        return Err(ManifestError::Invalid(issues));
    }
    let deployment: Deployment = serde_json::from_value(value).map_err(|e| {
        // The schema is generated from these types, so this is a disagreement between the two;
        // report it as an issue rather than trusting either blindly.
        ManifestError::Invalid(vec![Issue::new(
            "",
            format!("manifest does not match its types: {e}"),
        )])
    })?;
    let issues = validate::validate(&deployment);
    if issues.is_empty() {
        Ok(deployment)
    } else {
        Err(ManifestError::Invalid(issues))
    }
}

/// Builds the JSON pointer of a child: escapes `~` and `/` as RFC 6901 says.
pub fn pointer(parent: &str, key: &str) -> String {
    format!("{parent}/{}", key.replace('~', "~0").replace('/', "~1"))
}
