//! The planner's vocabulary: the world it looks at, the actions and plan it gives back, and
//! what the agent remembers of a module between passes.

use std::collections::{BTreeMap, BTreeSet};

use crate::container::Observed;
use crate::manifest::Deployment;
use crate::state::ModuleStatus;

/// What the agent remembers of a module between passes (kept in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleHistory {
    /// Consecutive short runs that ended in an exit the policy restarts.
    pub failures: u32,
    /// Restarts the agent has made (and failed start attempts), for reporting.
    pub restarts: u32,
}

/// Something that failed, and when (monotonic ms), for backoff and reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub attempts: u32,
    /// Monotonic milliseconds of the last failure.
    pub at: u64,
    pub message: String,
    /// Retrying will not help without a change (a missing tag, a wrong platform, no disk, a
    /// start the engine refuses): the deployment is reported failed at once.
    pub definitive: bool,
}

/// An exit of a container as this agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// The engine's `FinishedAt` of the exit (Unix seconds): a new value is a new exit.
    pub finished_at: Option<u64>,
    /// Monotonic milliseconds when this agent first saw the container exited.
    pub seen_at: u64,
    /// It was already exited when this agent process first listed it (a reboot, or the
    /// agent's own restart): it comes back in startup order, not as a counted restart.
    pub before_agent: bool,
}

/// The desired deployment with each module's config hash computed.
#[derive(Debug, Clone)]
pub struct Desired {
    pub deployment: Deployment,
    pub hashes: BTreeMap<String, String>,
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct World<'a> {
    pub device: &'a str,
    pub desired: Option<&'a Desired>,
    pub observed: &'a [Observed],
    /// Image references present on the engine and verified for this device.
    pub images: &'a BTreeSet<String>,
    pub pulling: &'a BTreeSet<String>,
    /// Images pulled by this agent since it started (for the `always` pull policy).
    pub pulled: &'a BTreeSet<String>,
    /// Failed pulls and verifications, by image.
    pub pull_failures: &'a BTreeMap<String, Failure>,
    /// Failed creates and starts, by module.
    pub start_failures: &'a BTreeMap<String, Failure>,
    pub history: &'a BTreeMap<String, ModuleHistory>,
    /// Exits seen, by container id.
    pub exits: &'a BTreeMap<String, Exit>,
    /// Modules with an action under way: nothing more is planned for them until it ends.
    pub busy: &'a BTreeSet<String>,
    /// Monotonic milliseconds.
    pub now: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop (with the grace period) and remove a container.
    Remove {
        id: String,
        module: String,
    },
    Stop {
        id: String,
        module: String,
    },
    Pull {
        module: String,
        image: String,
    },
    /// Create the module's container from the desired deployment under `name`; started at
    /// once only when `start` (a first deployment: nothing runs that it would switch).
    Create {
        module: String,
        name: String,
        start: bool,
    },
    /// Start an existing container. `restart` counts it against the module's backoff.
    Start {
        id: String,
        module: String,
        restart: bool,
    },
    /// Stop and start a running container (unhealthy under `on-unhealthy`).
    Restart {
        id: String,
        module: String,
    },
    /// The switch of one module: stop `old`, start the staged `new`; if it starts, remove
    /// `old` and give `new` the module's container name, else start `old` again.
    Replace {
        module: String,
        old: Vec<String>,
        new: String,
        name: String,
    },
    /// Give a container its module's name (after an interrupted switch).
    Rename {
        id: String,
        module: String,
        name: String,
    },
}

impl Action {
    pub fn module(&self) -> &str {
        match self {
            Action::Remove { module, .. }
            | Action::Stop { module, .. }
            | Action::Pull { module, .. }
            | Action::Create { module, .. }
            | Action::Start { module, .. }
            | Action::Restart { module, .. }
            | Action::Replace { module, .. }
            | Action::Rename { module, .. } => module,
        }
    }
}

/// How one module stands after this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    pub status: ModuleStatus,
    /// Set when the module cannot be brought up or keeps failing.
    pub problem: Option<String>,
    /// The problem is one retrying will not fix: the deployment fails now.
    pub definitive: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The earliest monotonic time a new pass is due even without events (backoffs, retries).
    pub wake_at: Option<u64>,
    pub modules: BTreeMap<String, ModulePlan>,
    /// Every image the deployment needs is present and every new container created.
    pub staged: bool,
    /// Every module is in its desired status and nothing is left to do.
    pub converged: bool,
}

impl Plan {
    pub(super) fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
    pub(super) fn set(&mut self, module: &str, status: ModuleStatus, problem: Option<String>) {
        self.modules.insert(
            module.to_string(),
            ModulePlan {
                status,
                problem,
                definitive: false,
            },
        );
    }
    pub(super) fn fail(&mut self, module: &str, problem: String, definitive: bool) {
        self.modules.insert(
            module.to_string(),
            ModulePlan {
                status: ModuleStatus::Failed,
                problem: Some(problem),
                definitive,
            },
        );
    }
}
