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

/// Why a module's artifacts are not all in place; a module without an entry has every
/// artifact it names fetched and verified (or names none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactWait {
    /// Still being fetched and verified; `problem` is the last transient failure (a lost
    /// link, a busy server), which is being retried.
    Fetching { problem: Option<String> },
    /// Cannot be had as the deployment names it: a wrong digest or size, a file the server
    /// does not have. `definitive` when retrying cannot help without a new deployment.
    Failed { message: String, definitive: bool },
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
    /// Modules whose artifacts are not all fetched and verified yet, by module: they are
    /// staged like a missing image (nothing created, nothing switched until they are).
    pub artifacts: &'a BTreeMap<String, ArtifactWait>,
    /// Failed creates and starts, by module.
    pub start_failures: &'a BTreeMap<String, Failure>,
    pub history: &'a BTreeMap<String, ModuleHistory>,
    /// Exits seen, by container id.
    pub exits: &'a BTreeMap<String, Exit>,
    /// Modules with an action under way: nothing more is planned for them until it ends.
    pub busy: &'a BTreeSet<String>,
    /// Monotonic milliseconds.
    pub now: u64,
    /// What may hold back the switch of a deployment that has not begun switching; `None`
    /// once it has, and for a rollback: a switch under way is never held halfway.
    pub hold: Option<Hold<'a>>,
}

/// What may hold back a switch (docs/reconciler.md#update-windows-and-locks).
#[derive(Debug, Clone, Copy)]
pub struct Hold<'a> {
    /// The device is outside its update windows and the deployment is not urgent.
    pub window_closed: bool,
    /// Modules holding an update lock whose deadline has not passed.
    pub locked: &'a BTreeSet<String>,
    /// Modules whose artifact links the switch would swap (a new digest, a name dropped):
    /// work for the switch even when no container changes, so a new model waits for the
    /// window, and for its module's lock, like a new image.
    pub relinks: &'a BTreeSet<String>,
}

/// Why the planner did not switch a deployment that is (or is being) staged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Outside the update windows.
    Window,
    /// These modules, which the switch would replace, stop or remove, hold their locks.
    Locks(Vec<String>),
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
    /// Every image and artifact the deployment needs is present and every new container
    /// created.
    pub staged: bool,
    /// Every module is in its desired status and nothing is left to do.
    pub converged: bool,
    /// The switch was held back (a window or a lock): what runs was kept as it was.
    pub held: Option<Held>,
    /// The modules whose running containers the switch replaces, stops or removes (what an
    /// update lock protects); a module the deployment does not change is not here.
    pub changing: BTreeSet<String>,
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
