//! Reported state: what the device tells the hub (and `outpost list`) about its deployment,
//! its modules and itself. Built by the reconciler, published by the hub link. It never holds
//! secrets: registry passwords and keys stay in the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::Issue;

/// Where a deployment came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    /// The device's own deployment topic.
    Device,
    /// A group's deployment topic.
    Group { name: String },
    /// `outpost deploy --local` on the device.
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentStatus {
    /// Passed intake and stored; not acted on yet.
    Received,
    /// Being carried out (pulls, creates, starts).
    Applying,
    /// Stored and staged as far as it can be, but not switched yet: outside the device's
    /// update windows, or a module it would replace holds its update lock (see `waiting`).
    /// The modules of the deployment before it keep running untouched.
    Waiting,
    /// Every module is in its desired status.
    Applied,
    /// Did not become healthy and there is no rollback (or the rollback failed too).
    Failed,
    /// Did not become healthy; the last good deployment was restored.
    RolledBack,
    /// Refused before anything changed (intake, policy, version rule).
    Rejected,
}

/// One deployment as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentReport {
    pub id: String,
    pub version: u64,
    pub status: DeploymentStatus,
    pub source: Source,
    /// Why it failed, was rolled back or rejected; each with a field path where there is one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<Issue>,
    /// SHA-256 of the manifest bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Unix seconds of the last status change.
    pub updated_at: u64,
    /// Why a `waiting` deployment waits, and until when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
}

/// Why a deployment has not been switched yet (docs/reconciler.md#update-windows-and-locks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiting {
    pub reason: WaitReason,
    /// When the next update window opens (Unix seconds, by the device's clock); absent when
    /// the device's clock is not set, so no window can be judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opens_at: Option<u64>,
    /// The modules whose update locks hold the deployment back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// When the locks stop holding it (Unix seconds, by the device's clock; the agent keeps
    /// the deadline on its monotonic clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// The same in words, for people.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WaitReason {
    /// Outside every update window of the device (`[maintenance] windows`).
    UpdateWindow,
    /// A module it would replace, stop or remove holds its update lock.
    UpdateLock,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModuleStatus {
    /// Its image is being pulled; whatever ran before keeps running meanwhile.
    Pulling,
    /// Its new version is ready (image verified, container created); the old one keeps running
    /// until the whole deployment is ready and the switch reaches it.
    Staged,
    Created,
    Running,
    /// Exited and waiting for its restart backoff to pass.
    Backoff,
    /// Exited and, by its restart policy, staying so.
    Exited,
    Stopped,
    /// Cannot be brought up (pull, create or start keeps failing); still retried.
    Failed,
    /// A container of this device found without a deployment to say what it should be (the
    /// store was lost or is new): kept running by its own labels until a deployment arrives.
    Unmanaged,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleReport {
    pub status: ModuleStatus,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The platform of the image the module's container runs (`linux/arm64`), as the engine
    /// describes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    pub restart_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Unix seconds when the container last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// The last error carrying this module out (pull, create, start), for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentFacts {
    pub version: String,
    pub arch: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_version: Option<String>,
    pub uptime_secs: u64,
    /// Which binary runs: `installed` (the one the service starts) or the update slot `a` or
    /// `b` (docs/operations.md#updating-the-agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The last or current agent update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<AgentUpdate>,
}

/// Where an agent update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdatePhase {
    /// The new build is being fetched (see `progress`).
    Downloading,
    /// Its digest and its self-test (`outpost --version`) are being checked.
    Verifying,
    /// The running agent is handing over to the new one; modules keep running.
    Switching,
    /// The new agent runs and has not passed its health gate yet.
    Probation,
    /// The new agent passed its health gate and is the one the device keeps.
    Committed,
    /// The new agent failed its health gate; the previous one runs again.
    RolledBack,
    /// The new build could not be fetched or did not verify; nothing was switched.
    Failed,
    /// The deployment names an agent this device does not take (no build for its platform,
    /// updates disabled, a version already rolled back); the agent is left as it is.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentUpdate {
    /// The version the update is for.
    pub version: String,
    pub phase: UpdatePhase,
    /// Why it failed, was rolled back or skipped; what probation still waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Bytes fetched so far, while downloading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
}

/// The whole reported state of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedState {
    pub device_id: String,
    /// The deployment in force (or being applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<DeploymentReport>,
    /// The last deployment that was refused, kept so the operator sees why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejected: Option<DeploymentReport>,
    /// The last deployment that became healthy: what a rollback returns to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_good: Option<DeploymentRef>,
    pub modules: BTreeMap<String, ModuleReport>,
    pub agent: AgentFacts,
    /// What the operator should know that is not one module's: a store recovered from
    /// corruption, a disk above its watermark, a degraded outbox, no deployment on the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition of the device as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// A stable name: `store-recovered`, `store-reserve-used`, `disk-high`,
    /// `outbox-degraded`, `no-deployment`.
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRef {
    pub id: String,
    pub version: u64,
}

impl AgentFacts {
    /// Facts known without asking the runtime.
    pub fn local(uptime_secs: u64) -> AgentFacts {
        AgentFacts {
            version: crate::version::current().to_string(),
            arch: std::env::consts::ARCH.to_string(),
            os: std::env::consts::OS.to_string(),
            runtime_version: None,
            uptime_secs,
            slot: None,
            update: None,
        }
    }
}
