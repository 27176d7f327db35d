//! The reconciler: the one task that owns the device's deployment. It takes offers from the
//! hub link and the local API, checks policy and the version rule, stores what it accepts,
//! and then, on every engine event, pull or action completion, deadline or periodic resync,
//! asks the [`planner`](crate::planner) what to do and hands the actions to tasks of their own.
//!
//! It never waits on the engine for long: pulls, stops (with their grace periods), creates,
//! starts, restarts and log reads run in background tasks, bounded by semaphores, one task per
//! module at a time (a module with an action under way is *busy* and the planner leaves it
//! alone). So offers are answered, crashes restarted and deadlines kept while ten modules take
//! their grace period to stop.
//!
//! Deadlines (restart backoff, rollback window, retries, image cleanup) run on the monotonic
//! clock ([`crate::clock`]); the wall clock only stamps what people read.
//!
//! # Layout
//!
//! - this file: the settings, the [`Reconciler`] and its state, the run loop (requests,
//!   engine events, finished pulls and actions, deadlines, resync).
//! - `pass.rs`: one reconciliation pass: list, plan, hand out, track, publish.
//! - `offer.rs`: offers, the version rule, and offers waiting for the store.
//! - `execute.rs`: carrying out a plan's container actions, module by module.
//! - `rollout.rs`: applied, failed, or rolled back (the health window).
//! - `images.rs`: pulls, disk checks, image verification and cleanup.
//! - `artifacts.rs`: the modules' artifacts: fetches asked for, links swapped, cleanup.
//! - `hold.rs`: update windows and update locks: what holds a switch back, and the locks.
//! - `report.rs`: the reported state, module logs and the redaction of secrets.

mod artifacts;
mod execute;
mod hold;
mod images;
mod offer;
mod pass;
mod report;
mod rollout;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::SharedClock;
use crate::control::{AgentHandle, REQUEST_CAPACITY, Request};
use crate::planner::{self, Desired, Exit, Failure, ModuleHistory};
use crate::policy::DeviceFacts;
use crate::runtime::registry::Platform;
use crate::runtime::spec::config_hash;
use crate::runtime::{EngineInfo, Observed, PullProgress, Runtime};
use crate::state::{AgentFacts, Condition, DeploymentRef, DeploymentReport, ReportedState};
use crate::store::{Store, StoreError, StoredDeployment, SwitchGate};

use execute::ActionDone;
pub use hold::ModuleLock;
use images::PullDone;
pub use images::verify_image;
use offer::PendingOffer;
pub use report::redact;

/// How often the engine is listed even without events, to catch anything missed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How long a deployment without a rollback window may take before it is reported failed.
pub const DEFAULT_HEALTHY_WITHIN: Duration = Duration::from_secs(300);
/// How long a pass waits for more news while actions are under way.
const SETTLE_MS: u64 = 50;
/// First retry after the engine could not be listed or a stored offer could not be written.
const RETRY_BASE_MS: u64 = 1_000;
/// The longest wait between such retries.
const RETRY_CAP_MS: u64 = 30_000;

/// Settings the reconciler needs from the device configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: String,
    pub policy: crate::config::PolicyConfig,
    pub facts: DeviceFacts,
    pub stop_grace: Duration,
    pub max_concurrent_pulls: usize,
    /// Container operations under way at once (stops, removes, creates, starts).
    pub max_parallel_actions: usize,
    /// Images no deployment uses are removed after this long.
    pub image_gc_after: Duration,
    pub disk: crate::config::DiskConfig,
    /// What the agent adds to each module's environment (bus address and credentials).
    pub module_env: crate::bus::ModuleEnv,
    /// Where the deployment's routes go when it changes; `None` without a bus.
    pub routes: Option<watch::Sender<Arc<crate::bus::routes::RouteTable>>>,
    /// Deployment durations, for metrics.
    pub deployments: Arc<DeploymentCounters>,
    pub clock: SharedClock,
    /// Conditions other parts report (the outbox's health), shown in the reported state.
    pub conditions: Option<watch::Receiver<Vec<Condition>>>,
    /// Set when the store was found corrupt and replaced at start-up: reported until a
    /// deployment arrives.
    pub store_recovery: Option<String>,
    /// The desired deployment's `agent` section, sent whenever the desired deployment changes
    /// (the updater acts on it).
    pub agent_spec: Option<watch::Sender<Option<crate::manifest::AgentSpec>>>,
    /// Counts passes that reached the engine (an agent on trial waits for one).
    pub passes: Option<watch::Sender<u64>>,
    /// The agent's slot and update, from the updater or the health gate.
    pub agent_status: Option<watch::Receiver<crate::update::AgentStatus>>,
    /// Where the modules' artifacts are fetched, stored and linked; `None` (tests) fails any
    /// module that names one.
    pub artifacts: Option<crate::artifacts::Artifacts>,
    /// The update windows a new deployment's switch waits for.
    pub maintenance: crate::config::MaintenanceConfig,
    /// Where modules' update locks are kept across agent restarts; `None` (tests) keeps them
    /// in memory only.
    pub locks_dir: Option<std::path::PathBuf>,
    /// This start follows a reboot, or cannot tell ([`crate::clock::note_boot`]): exits found
    /// at the first look were the reboot's, and every module comes back, whatever its restart
    /// policy. In the same boot (an agent restart, a self-update) each exit follows its
    /// module's policy: a `never` module that ended stays ended.
    pub after_reboot: bool,
}

impl Settings {
    /// The defaults of a device configuration without a bus (tests, simulations), on `clock`.
    pub fn new(device: &str, clock: SharedClock) -> Settings {
        Settings {
            device: device.to_string(),
            policy: crate::config::PolicyConfig::default(),
            facts: crate::telemetry::metrics::device_facts(),
            stop_grace: Duration::from_secs(10),
            max_concurrent_pulls: 2,
            max_parallel_actions: 16,
            image_gc_after: Duration::from_secs(24 * 3600),
            disk: crate::config::DiskConfig::default(),
            module_env: crate::bus::ModuleEnv::default(),
            routes: None,
            deployments: Arc::default(),
            clock,
            conditions: None,
            store_recovery: None,
            agent_spec: None,
            passes: None,
            agent_status: None,
            artifacts: None,
            maintenance: crate::config::MaintenanceConfig::default(),
            locks_dir: None,
            after_reboot: true,
        }
    }
}

pub use crate::telemetry::counters::DeploymentCounters;

pub struct Reconciler<R: Runtime> {
    settings: Settings,
    clock: SharedClock,
    runtime: Arc<R>,
    store: Store,
    state: watch::Sender<ReportedState>,
    progress: broadcast::Sender<PullProgress>,
    pull_slots: Arc<Semaphore>,
    action_slots: Arc<Semaphore>,
    desired: Option<(StoredDeployment, Desired)>,
    report: Option<DeploymentReport>,
    last_rejected: Option<DeploymentReport>,
    /// The last deployment that became healthy, as stored: kept here so that passes and
    /// reports do not read it back from the store each time.
    last_good: Option<StoredDeployment>,
    history: BTreeMap<String, ModuleHistory>,
    /// Images present on the engine and verified for this device.
    images: BTreeSet<String>,
    /// The platform each verified image was checked for (a new pin checks it again).
    verified: BTreeMap<String, Platform>,
    /// What each image the agent has verified is built for, by image id: the platform a
    /// module's container runs, for reports.
    image_platforms: BTreeMap<String, String>,
    pulling: BTreeSet<String>,
    pulled: BTreeSet<String>,
    pull_failures: BTreeMap<String, Failure>,
    /// Failed actions per module (creates and starts above all), for backoff and reports.
    failures: BTreeMap<String, Failure>,
    exits: BTreeMap<String, Exit>,
    /// No listing has been made yet: every exited container found is from before this agent.
    first_look: bool,
    busy: BTreeSet<String>,
    /// The last error carrying out an action, per module, until the module is up again.
    errors: BTreeMap<String, String>,
    /// Monotonic ms when the deployment in force started applying (its rollback window).
    applying_since: u64,
    wake_at: Option<u64>,
    started_mono: u64,
    engine: Option<EngineInfo>,
    list_failures: u32,
    /// The images the agent may clean up, as stored, and since when (monotonic) each has been
    /// unused.
    managed_images: BTreeSet<String>,
    unused_since: BTreeMap<String, u64>,
    next_gc: u64,
    pending: Option<PendingOffer>,
    /// Containers as last listed, for requests (logs, restart) between passes.
    last_observed: Vec<Observed>,
    /// Problems of the agent itself (a store write that failed), shown as conditions.
    agent_problems: BTreeMap<&'static str, String>,
    /// The latest wall-clock time (Unix ms) the device has known to be true: expiry is never
    /// judged earlier than this, whatever the clock reads after a reboot.
    time_floor: u64,
    /// What each module still waits for of its artifacts, as of the last pass (absent: all
    /// in place).
    artifact_waits: BTreeMap<String, planner::ArtifactWait>,
    /// Modules waiting for an artifact to be fetched: their folders are left as they are.
    fetch_waiting: BTreeSet<String>,
    /// Artifact links that could not be made, per module, until they can.
    link_errors: BTreeMap<String, String>,
    /// The deployments artifacts were last collected for (desired, last good): collection
    /// runs again when either changes, or with image cleanup.
    artifacts_collected_for: Option<artifacts::Kept>,
    /// Whether the desired deployment's switch has begun (windows and locks hold it until).
    gate: Option<SwitchGate>,
    /// Monotonic ms when an update lock first held the desired deployment back: its
    /// deadline counts from here.
    lock_since: Option<u64>,
    /// The modules' update locks, by module.
    locks: BTreeMap<String, ModuleLock>,
}

/// What [`Reconciler::build`] hands back: the task to run and the handle to reach it.
pub struct Parts<R: Runtime> {
    pub reconciler: Reconciler<R>,
    pub requests: mpsc::Receiver<Request>,
    pub handle: AgentHandle,
    pub progress: broadcast::Sender<PullProgress>,
}

impl<R: Runtime> Reconciler<R> {
    /// Loads the stored deployment and history; nothing is done to the engine until `run`.
    ///
    /// Fails when the store cannot be read (a store that cannot even be read was not
    /// recovered by [`Store::open`]).
    pub fn build(
        settings: Settings,
        runtime: Arc<R>,
        store: Store,
    ) -> Result<Parts<R>, StoreError> {
        let clock = settings.clock.clone();
        let stored = store.desired()?;
        let history = store.history()?;
        let report = store.report()?;
        let last_good = store.last_good()?;
        let managed_images = store.images()?;
        let time_floor = store.time_floor()?;
        let now = clock.mono_ms();
        // The rollback window goes on where it was if this is the boot that started it; after
        // a reboot the time in between is unknown, and the window starts again (never early).
        let applying_since = store
            .window()?
            .and_then(|w| w.in_this_boot(clock.as_ref()))
            .filter(|at| *at <= now)
            .unwrap_or(now);
        let initial = ReportedState {
            device_id: settings.device.clone(),
            deployment: report.clone(),
            last_rejected: None,
            last_good: last_good.as_ref().map(|g| DeploymentRef {
                id: g.deployment.id.clone(),
                version: g.deployment.version,
            }),
            modules: BTreeMap::new(),
            agent: AgentFacts::local(0),
            conditions: Vec::new(),
        };
        let (state, state_rx) = watch::channel(initial);
        let (progress, _) = broadcast::channel(256);
        if let Some(artifacts) = &settings.artifacts {
            artifacts.report_progress_to(progress.clone());
        }
        let (requests_tx, requests) = mpsc::channel(REQUEST_CAPACITY);
        let desired = stored.map(|s| {
            let d = desired_of(&s, &settings);
            (s, d)
        });
        let gate = match &desired {
            Some((s, _)) => Some(hold::gate_of(store.gate()?, &s.digest)),
            None => None,
        };
        // A lock's deadline goes on where it was in this boot; after a reboot it starts again.
        let lock_since = gate.as_ref().and_then(|g| g.lock_since.as_ref()).map(|at| {
            at.in_this_boot(clock.as_ref())
                .filter(|at| *at <= now)
                .unwrap_or(now)
        });
        let locks = settings
            .locks_dir
            .as_deref()
            .map(hold::read_locks)
            .unwrap_or_default();
        // What the bus routes and the updater follow: the desired deployment once its switch
        // has begun, else the one that still runs.
        let in_force = if gate.as_ref().is_none_or(|g| g.passed) {
            desired.as_ref().map(|(s, _)| s)
        } else {
            last_good.as_ref()
        };
        if let Some(tx) = &settings.agent_spec {
            tx.send_replace(in_force.and_then(|s| s.deployment.agent.clone()));
        }
        if let (Some(tx), Some(s)) = (&settings.routes, in_force) {
            tx.send_replace(Arc::new(crate::bus::routes::RouteTable::for_deployment(
                &s.deployment,
            )));
        }
        let reconciler = Reconciler {
            pull_slots: Arc::new(Semaphore::new(settings.max_concurrent_pulls.max(1))),
            action_slots: Arc::new(Semaphore::new(settings.max_parallel_actions.max(1))),
            clock,
            settings,
            runtime,
            store,
            state,
            progress: progress.clone(),
            desired,
            report,
            last_rejected: None,
            last_good,
            history,
            images: BTreeSet::new(),
            verified: BTreeMap::new(),
            image_platforms: BTreeMap::new(),
            pulling: BTreeSet::new(),
            pulled: BTreeSet::new(),
            pull_failures: BTreeMap::new(),
            failures: BTreeMap::new(),
            exits: BTreeMap::new(),
            first_look: true,
            busy: BTreeSet::new(),
            errors: BTreeMap::new(),
            applying_since,
            wake_at: None,
            started_mono: now,
            engine: None,
            list_failures: 0,
            managed_images,
            unused_since: BTreeMap::new(),
            next_gc: now,
            pending: None,
            last_observed: Vec::new(),
            agent_problems: BTreeMap::new(),
            time_floor: time_floor.max(crate::clock::PLAUSIBLE_AFTER_MS),
            artifact_waits: BTreeMap::new(),
            fetch_waiting: BTreeSet::new(),
            link_errors: BTreeMap::new(),
            artifacts_collected_for: None,
            gate,
            lock_since,
            locks,
        };
        Ok(Parts {
            reconciler,
            requests,
            handle: AgentHandle {
                requests: requests_tx,
                state: state_rx,
            },
            progress,
        })
    }

    /// Runs until `shutdown`. Modules keep running when the agent stops: a restarted agent
    /// adopts them.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        let (pull_tx, mut pull_rx) = mpsc::channel::<PullDone>(64);
        let (action_tx, mut action_rx) = mpsc::channel::<ActionDone>(64);
        let (event_tx, mut event_rx) = mpsc::channel::<()>(64);
        tasks.spawn(forward_events(
            self.runtime.clone(),
            self.settings.device.clone(),
            event_tx,
            shutdown.clone(),
        ));
        let mut conditions = self.settings.conditions.clone();
        let mut agent_status = self.settings.agent_status.clone();
        let mut artifacts = self.settings.artifacts.as_ref().map(|a| a.subscribe());
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ctx = Ctx {
            tasks: &tasks,
            pull_tx: &pull_tx,
            action_tx: &action_tx,
            shutdown: &shutdown,
        };
        loop {
            let wake = self.wake_at.map(|w| self.clock.instant_at(w));
            let pass = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(req) = requests.recv() => self.handle(req, &ctx),
                Some(done) = pull_rx.recv() => { self.pull_done(done).await; true }
                Some(done) = action_rx.recv() => { self.action_done(done); self.settle() }
                Some(()) = event_rx.recv() => {
                    // A burst of events needs one pass.
                    while event_rx.try_recv().is_ok() {}
                    self.settle()
                }
                Ok(()) = changed(&mut conditions) => { self.publish(None); false }
                Ok(()) = changed(&mut agent_status) => { self.publish(None); false }
                // A fetch ended, failed or is retrying: its modules may move on.
                Ok(()) = changed(&mut artifacts) => self.settle(),
                _ = sleep_until(wake) => true,
                _ = resync.tick() => true,
            };
            if pass {
                self.pass(&ctx).await;
            }
        }
        tasks.close();
        tasks.wait().await;
        if let Some(a) = &self.settings.artifacts {
            a.shutdown().await;
        }
        info!("reconciler stopped");
    }

    /// Handles a request; returns whether a pass is due.
    fn handle(&mut self, req: Request, ctx: &Ctx<'_>) -> bool {
        match req {
            Request::Offer {
                accepted,
                source,
                handback,
                reply,
            } => {
                let outcome = self.offer(*accepted, source, handback);
                let _ = reply.send(outcome);
                true
            }
            Request::RestartModule { name, reply } => {
                self.restart_module(&name, reply, ctx);
                false
            }
            Request::Logs {
                name,
                tail,
                max_bytes,
                reply,
            } => {
                self.logs(&name, tail, max_bytes, reply, ctx);
                false
            }
            Request::Secrets { name, reply } => {
                let _ = reply.send(self.secrets_of(&name));
                false
            }
            Request::Lock {
                module,
                hold,
                via,
                reply,
            } => {
                let outcome = self.lock(&module, hold, via);
                let changed = matches!(outcome, Ok(true));
                let _ = reply.send(outcome);
                // A released lock may let a waiting switch go.
                if changed {
                    self.publish(None);
                }
                changed && !hold
            }
        }
    }

    fn wall_secs(&self) -> u64 {
        self.clock.wall_ms() / 1000
    }

    fn store_problem(&mut self, what: &str, e: &StoreError) {
        warn!(error = %e, "cannot {what}");
        self.agent_problems
            .insert("store", format!("the store could not {what}: {e}"));
    }

    /// Makes `stored` the deployment to carry out; its routes and agent take effect now if
    /// its switch may begin (a rollback), else when it does (see `hold.rs`).
    fn set_desired(&mut self, stored: StoredDeployment) {
        if self.gate.as_ref().is_none_or(|g| g.passed) {
            self.switch_extras(&stored);
        }
        let desired = desired_of(&stored, &self.settings);
        self.desired = Some((stored, desired));
    }

    /// The deployment's routes become the bus's (a route change applies without restarting
    /// modules) and its `agent` section the updater's.
    fn switch_extras(&self, stored: &StoredDeployment) {
        if let Some(tx) = &self.settings.routes {
            tx.send_replace(Arc::new(crate::bus::routes::RouteTable::for_deployment(
                &stored.deployment,
            )));
        }
        if let Some(tx) = &self.settings.agent_spec {
            let agent = stored.deployment.agent.clone();
            tx.send_if_modified(|a| {
                let changed = *a != agent;
                *a = agent;
                changed
            });
        }
    }

    /// Whether to pass now after an event or a finished action: at once when nothing else is
    /// under way, else a moment later, so that ten actions finishing together (and their
    /// engine events) make one pass rather than twenty, each listing every container.
    fn settle(&mut self) -> bool {
        if self.busy.is_empty() {
            return true;
        }
        let at = self.clock.mono_ms() + SETTLE_MS;
        self.wake(at);
        false
    }

    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// What the run loop lends the parts that start tasks.
struct Ctx<'a> {
    tasks: &'a TaskTracker,
    pull_tx: &'a mpsc::Sender<PullDone>,
    action_tx: &'a mpsc::Sender<ActionDone>,
    shutdown: &'a CancellationToken,
}

/// The desired deployment with its config hashes.
pub fn desired_of(stored: &StoredDeployment, settings: &Settings) -> Desired {
    let hashes = stored
        .deployment
        .modules
        .iter()
        .map(|(name, m)| {
            let env = settings.module_env.for_module(name);
            let hash = config_hash(m, &env, &settings.device, &settings.policy);
            (name.clone(), hash)
        })
        .collect();
    Desired {
        deployment: stored.deployment.clone(),
        hashes,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the watched value changes; never without a watch.
async fn changed<T>(rx: &mut Option<watch::Receiver<T>>) -> Result<(), watch::error::RecvError> {
    match rx {
        Some(rx) => rx.changed().await,
        None => std::future::pending().await,
    }
}

/// Turns the engine's event stream into "something changed" signals, reconnecting when it
/// breaks.
async fn forward_events<R: Runtime>(
    runtime: Arc<R>,
    device: String,
    tx: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let stream = runtime.events(&device);
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        failures = 0;
                        debug!(module = ?event.module, action = %event.action, "engine event");
                        // Full means a pass is already due: dropping the signal loses nothing.
                        let _ = tx.try_send(());
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "engine event stream failed; reconnecting");
                        break;
                    }
                    None => break,
                }
            }
        }
        failures = failures.saturating_add(1);
        let wait = planner::retry_delay(RETRY_BASE_MS, failures).min(RETRY_CAP_MS);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

#[cfg(test)]
mod tests;
