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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::clock::{BootInstant, SharedClock};
use crate::control::{AgentHandle, REQUEST_CAPACITY, Request};
use crate::intake::Accepted;
use crate::manifest::Issue;
use crate::planner::{self, Action, Desired, Exit, Failure, ModuleHistory, Plan, World};
use crate::policy::{self, DeviceFacts};
use crate::runtime::spec::{config_hash, container_name, container_spec};
use crate::runtime::{
    ContainerState, EngineInfo, ImageInfo, LogOptions, Observed, PullProgress, Runtime,
    RuntimeError,
};
use crate::state::{
    AgentFacts, Condition, DeploymentRef, DeploymentReport, DeploymentStatus, ModuleReport,
    ModuleStatus, ReportedState, Source,
};
use crate::store::{Store, StoreError, StoredDeployment, source_key};

/// How often the engine is listed even without events, to catch anything missed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How long a deployment without a rollback window may take before it is reported failed.
pub const DEFAULT_HEALTHY_WITHIN: Duration = Duration::from_secs(300);
/// The longest a container listing may take before the pass gives up and retries.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the registry may take to say how big an image is before the pull goes ahead
/// without knowing.
const SIZE_TIMEOUT: Duration = Duration::from_secs(20);
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
        }
    }
}

/// How long deployments took from acceptance to applied, for metrics.
#[derive(Debug, Default)]
pub struct DeploymentCounters {
    pub applied_total: std::sync::atomic::AtomicU64,
    /// Milliseconds.
    pub last_ms: std::sync::atomic::AtomicU64,
    pub sum_ms: std::sync::atomic::AtomicU64,
}

/// The result of a background pull.
struct PullDone {
    image: String,
    result: Result<(), PullError>,
}

#[derive(Debug, Clone)]
struct PullError {
    message: String,
    /// Retrying will not help (missing tag, refused credentials, wrong platform, no disk).
    definitive: bool,
}

/// The result of one module's actions, carried out in a task of their own.
struct ActionDone {
    module: String,
    /// Whether the container now serving started (clears the module's start failures).
    started: bool,
    error: Option<ActionError>,
}

#[derive(Debug)]
struct ActionError {
    message: String,
    /// A create or start failed: counted and backed off as a start failure.
    start: bool,
    /// The image went away behind the agent's back: pull it again.
    image_gone: Option<String>,
}

impl ActionError {
    fn other(e: impl std::fmt::Display) -> ActionError {
        ActionError {
            message: e.to_string(),
            start: false,
            image_gone: None,
        }
    }
    fn start(e: impl std::fmt::Display) -> ActionError {
        ActionError {
            message: e.to_string(),
            start: true,
            image_gone: None,
        }
    }
}

/// An offer accepted by the rules but not yet stored (the store failed): kept and retried.
struct PendingOffer {
    accepted: Accepted,
    source: Source,
    handback: bool,
    attempts: u32,
    next_at: u64,
}

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
        let (requests_tx, requests) = mpsc::channel(REQUEST_CAPACITY);
        let desired = stored.map(|s| {
            let d = desired_of(&s, &settings);
            (s, d)
        });
        if let (Some(tx), Some((s, _))) = (&settings.routes, &desired) {
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
                _ = sleep_until(wake) => true,
                _ = resync.tick() => true,
            };
            if pass {
                self.pass(&ctx).await;
            }
        }
        tasks.close();
        tasks.wait().await;
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
        }
    }

    fn wall_secs(&self) -> u64 {
        self.clock.wall_ms() / 1000
    }

    fn offer(
        &mut self,
        accepted: Accepted,
        source: Source,
        handback: bool,
    ) -> Result<(), Vec<Issue>> {
        let d = &accepted.deployment;
        if let Some((current, _)) = &self.desired
            && current.digest == accepted.digest
            && current.source == source
        {
            debug!(id = %d.id, version = d.version, "duplicate delivery of the deployment in force");
            return Ok(());
        }
        // The same bytes as the last deployment reported (applied, or rolled back): a
        // redelivery of a retained message, for instance after the agent restarted.
        if let Some(report) = &self.report
            && report.digest.as_deref() == Some(accepted.digest.as_str())
            && report.source == source
        {
            debug!(id = %d.id, version = d.version, status = ?report.status, "deployment already handled");
            return Ok(());
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.accepted.digest == accepted.digest && p.source == source)
        {
            return Ok(());
        }
        match self.try_accept(accepted, source, handback) {
            Ok(()) => Ok(()),
            Err(Refusal::Rules(issues)) => Err(issues),
            Err(Refusal::Store {
                accepted,
                source,
                error,
            }) => {
                // The rules allow it; only the store failed (a full disk, say). Keep it and
                // retry: the sender is told it is taken, and the state says it waits.
                warn!(id = %accepted.deployment.id, version = accepted.deployment.version, error = %error, "cannot store the deployment yet; retrying");
                let now = self.clock.mono_ms();
                self.report = Some(DeploymentReport {
                    id: accepted.deployment.id.clone(),
                    version: accepted.deployment.version,
                    status: DeploymentStatus::Received,
                    source: source.clone(),
                    reasons: vec![Issue::new(
                        "",
                        format!("waiting to be stored on the device: {error}; retrying"),
                    )],
                    digest: Some(accepted.digest.clone()),
                    updated_at: self.wall_secs(),
                });
                self.pending = Some(PendingOffer {
                    accepted: *accepted,
                    source,
                    handback,
                    attempts: 1,
                    next_at: now + RETRY_BASE_MS,
                });
                self.wake(now + RETRY_BASE_MS);
                self.publish(None);
                Ok(())
            }
        }
    }

    /// The binding (target, expiry), the version floor, the policy and the device's
    /// requirements, then the store. Refused by the rules: nothing changes. Refused by the
    /// store: handed back to be retried.
    fn try_accept(
        &mut self,
        accepted: Accepted,
        source: Source,
        handback: bool,
    ) -> Result<(), Refusal> {
        let d = &accepted.deployment;
        let keys = !self.settings.policy.trusted_keys.is_empty();
        let store_failed = |accepted: Accepted, source: Source, e: StoreError| Refusal::Store {
            accepted: Box::new(accepted),
            source,
            error: e.to_string(),
        };
        // Control handed back to a source whose deployment was overridden (a device's own
        // deployment cleared, so its group's applies again): the same bytes that source had
        // accepted are not a replay. A local deployment is not overridden this way.
        let overridden = self.desired.as_ref().is_some_and(|(current, _)| {
            current.source != source && current.source != Source::Local
        });
        let handed_back = if overridden {
            match self.store.digests() {
                Ok(digests) => digests
                    .get(&source_key(&source))
                    .is_some_and(|digest| *digest == accepted.digest),
                Err(e) => return Err(store_failed(accepted, source, e)),
            }
        } else {
            false
        };
        // Going back to what an overridden source had accepted needs the override to have
        // been withdrawn by someone trusted: on a device with keys, a signed withdrawal.
        let handed_back = handed_back && (handback || !keys);
        let mut issues = crate::binding::check(
            d,
            &source,
            &crate::binding::Rules {
                device: &self.settings.device,
                require: keys,
                now_ms: crate::binding::trusted_now(self.clock.wall_ms(), self.time_floor),
            },
        );
        match self.store.versions() {
            Ok(versions) => {
                // One floor for the device, whatever the source: no source can take it below
                // the highest version it has accepted (a rollback is a newer version).
                if let Some((from, floor)) = versions.iter().max_by_key(|(_, v)| **v)
                    && d.version <= *floor
                    && !handed_back
                {
                    issues.push(Issue::new(
                        "/version",
                        format!(
                            "version {} is not newer than {floor}, the highest this device has accepted (from {from}); publish a higher version",
                            d.version
                        ),
                    ));
                }
            }
            Err(e) => return Err(store_failed(accepted, source, e)),
        }
        issues.extend(policy::check(d, &self.settings.policy, self.settings.facts));
        let wall = self.wall_secs();
        if !issues.is_empty() {
            warn!(id = %d.id, version = d.version, issues = issues.len(), "deployment rejected");
            self.last_rejected = Some(DeploymentReport {
                id: d.id.clone(),
                version: d.version,
                status: DeploymentStatus::Rejected,
                source,
                reasons: issues.clone(),
                digest: Some(accepted.digest.clone()),
                updated_at: wall,
            });
            self.publish(None);
            return Err(Refusal::Rules(issues));
        }
        let stored = StoredDeployment {
            deployment: accepted.deployment.clone(),
            source: source.clone(),
            provenance: accepted.provenance.clone(),
            digest: accepted.digest.clone(),
            accepted_at: self.clock.wall_ms(),
        };
        let report = DeploymentReport {
            id: d.id.clone(),
            version: d.version,
            status: DeploymentStatus::Applying,
            source: source.clone(),
            reasons: vec![],
            digest: Some(accepted.digest.clone()),
            updated_at: wall,
        };
        let window = BootInstant::now(self.clock.as_ref());
        if let Err(e) = self.store.accept(&stored, &report, &window) {
            return Err(store_failed(accepted, source, e));
        }
        info!(id = %d.id, version = d.version, modules = d.modules.len(), "deployment accepted");
        self.pending = None;
        if self.clock.wall_is_plausible() {
            self.time_floor = self.time_floor.max(self.clock.wall_ms());
        }
        // Every image a deployment names is the agent's to clean up once unused.
        let images: Vec<String> = d.modules.values().map(|m| m.image.clone()).collect();
        match self.store.add_images(images.iter().map(String::as_str)) {
            Ok(()) => {
                self.managed_images.extend(images);
                self.agent_problems.remove("store");
            }
            Err(e) => self.store_problem("record the deployment's images", &e),
        }
        self.set_desired(stored);
        self.report = Some(report);
        self.applying_since = window.mono_ms;
        self.errors.clear();
        self.wake_at = None;
        self.publish(None);
        Ok(())
    }

    fn store_problem(&mut self, what: &str, e: &StoreError) {
        warn!(error = %e, "cannot {what}");
        self.agent_problems
            .insert("store", format!("the store could not {what}: {e}"));
    }

    /// Makes `stored` the deployment to carry out, and its routes the bus's: a route change
    /// applies with the deployment, without restarting modules.
    fn set_desired(&mut self, stored: StoredDeployment) {
        if let Some(tx) = &self.settings.routes {
            tx.send_replace(Arc::new(crate::bus::routes::RouteTable::for_deployment(
                &stored.deployment,
            )));
        }
        let desired = desired_of(&stored, &self.settings);
        self.desired = Some((stored, desired));
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

    async fn pull_done(&mut self, done: PullDone) {
        self.pulling.remove(&done.image);
        let now = self.clock.mono_ms();
        match done.result {
            Ok(()) => {
                info!(image = %done.image, verified = true, "pulled");
                self.pull_failures.remove(&done.image);
                self.images.insert(done.image.clone());
                self.pulled.insert(done.image);
            }
            Err(e) => {
                warn!(image = %done.image, error = %e.message, definitive = e.definitive, "pull failed");
                let attempts = self
                    .pull_failures
                    .get(&done.image)
                    .map_or(0, |f| f.attempts)
                    + 1;
                self.pull_failures.insert(
                    done.image,
                    Failure {
                        attempts,
                        at: now,
                        message: e.message,
                        definitive: e.definitive,
                    },
                );
            }
        }
    }

    fn action_done(&mut self, done: ActionDone) {
        self.busy.remove(&done.module);
        let now = self.clock.mono_ms();
        if done.started {
            self.failures.remove(&done.module);
        }
        match done.error {
            None => {
                self.errors.remove(&done.module);
                self.failures.remove(&done.module);
            }
            Some(e) => {
                if let Some(image) = &e.image_gone {
                    self.images.remove(image);
                    self.pulled.remove(image);
                }
                warn!(module = %done.module, error = %e.message, "action failed; retrying after a backoff");
                let previous = self.failures.get(&done.module);
                let attempts = previous.map_or(0, |f| f.attempts) + 1;
                if e.start {
                    // A start that failed counts like a restart that failed.
                    let h = self.history.entry(done.module.clone()).or_default();
                    h.restarts = h.restarts.saturating_add(1);
                    let h = h.clone();
                    if let Err(err) = self.store.set_history(&done.module, &h) {
                        self.store_problem("record restart history", &err);
                    }
                }
                self.failures.insert(
                    done.module.clone(),
                    Failure {
                        attempts,
                        at: now,
                        message: e.message.clone(),
                        definitive: e.start,
                    },
                );
                self.errors.insert(done.module, e.message);
            }
        }
    }

    /// One reconciliation pass: list, plan, hand the actions out, track the deployment.
    async fn pass(&mut self, ctx: &Ctx<'_>) {
        let now = self.clock.mono_ms();
        // The store's emergency reserve comes back once the disk has room (cheap otherwise).
        if let Err(e) = self.store.maintain() {
            warn!(error = %e, "store upkeep failed");
        }
        if self.engine.is_none() {
            self.engine = self.runtime.info().await.ok();
        }
        self.retry_pending(now);
        let observed = match tokio::time::timeout(
            LIST_TIMEOUT,
            self.runtime.list(&self.settings.device),
        )
        .await
        {
            Ok(Ok(o)) => o,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer in {} s", LIST_TIMEOUT.as_secs()),
                };
                self.list_failures = self.list_failures.saturating_add(1);
                let retry =
                    planner::retry_delay(RETRY_BASE_MS, self.list_failures).min(RETRY_CAP_MS);
                warn!(error = %error, retry_ms = retry, "cannot list containers; retrying");
                self.agent_problems.insert(
                    "engine",
                    format!("the container engine does not answer: {error}"),
                );
                self.wake(now + retry);
                self.publish(None);
                return;
            }
        };
        self.list_failures = 0;
        self.agent_problems.remove("engine");
        self.see_exits(&observed, now);
        self.check_images().await;
        let plan = planner::plan(&World {
            device: &self.settings.device,
            desired: self.desired.as_ref().map(|(_, d)| d),
            observed: &observed,
            images: &self.images,
            pulling: &self.pulling,
            pulled: &self.pulled,
            pull_failures: &self.pull_failures,
            start_failures: &self.failures,
            history: &self.history,
            exits: &self.exits,
            busy: &self.busy,
            now,
        });
        self.wake_at = plan.wake_at;
        if let Some(p) = &self.pending {
            self.wake(p.next_at);
        }
        self.dispatch(&plan, &observed, ctx);
        self.track_deployment(&plan, now);
        self.last_observed = observed;
        self.publish(Some(&plan));
        self.collect_images(now).await;
    }

    /// Retries storing an offer the store refused, with backoff.
    fn retry_pending(&mut self, now: u64) {
        let Some(p) = self.pending.take_if(|p| p.next_at <= now) else {
            return;
        };
        let (attempts, p_handback) = (p.attempts, p.handback);
        match self.try_accept(p.accepted, p.source, p.handback) {
            Ok(()) => info!("stored the deployment that was waiting"),
            Err(Refusal::Rules(_)) => {}
            Err(Refusal::Store {
                accepted,
                source,
                error,
            }) => {
                let next_at =
                    now + planner::retry_delay(RETRY_BASE_MS, attempts + 1).min(RETRY_CAP_MS);
                debug!(error = %error, "the deployment still cannot be stored");
                if let Some(report) = &mut self.report
                    && report.digest.as_deref() == Some(accepted.digest.as_str())
                {
                    report.reasons = vec![Issue::new(
                        "",
                        format!("waiting to be stored on the device: {error}; retrying"),
                    )];
                }
                self.pending = Some(PendingOffer {
                    accepted: *accepted,
                    source,
                    handback: p_handback,
                    attempts: attempts + 1,
                    next_at,
                });
            }
        }
    }

    /// Notes exits on the monotonic clock: backoff counts from when the agent saw an exit,
    /// never from the engine's timestamps.
    fn see_exits(&mut self, observed: &[Observed], now: u64) {
        let first = std::mem::replace(&mut self.first_look, false);
        let mut seen = BTreeMap::new();
        for c in observed {
            if !matches!(c.state, ContainerState::Exited | ContainerState::Dead) {
                continue;
            }
            let exit = match self.exits.remove(&c.id) {
                Some(e) if e.finished_at == c.finished_at => e,
                // A new exit of a container this agent started (or restarted) since.
                Some(_) => Exit {
                    finished_at: c.finished_at,
                    seen_at: now,
                    before_agent: false,
                },
                None => Exit {
                    finished_at: c.finished_at,
                    seen_at: now,
                    before_agent: first,
                },
            };
            seen.insert(c.id.clone(), exit);
        }
        self.exits = seen;
    }

    /// Finds and verifies images the deployment needs that the agent has not checked yet.
    async fn check_images(&mut self) {
        let Some((stored, _)) = &self.desired else {
            return;
        };
        let wanted: BTreeSet<String> = stored
            .deployment
            .modules
            .values()
            .map(|m| m.image.clone())
            .collect();
        for image in wanted {
            if self.images.contains(&image)
                || self.pulling.contains(&image)
                || self.pull_failures.contains_key(&image)
            {
                continue;
            }
            if let Ok(Some(info)) = self.runtime.image(&image).await {
                match verify_image(&image, &info, self.engine.as_ref()) {
                    Ok(()) => {
                        self.images.insert(image);
                    }
                    Err(message) => {
                        warn!(image, error = %message, "image on the device fails verification");
                        self.pull_failures.insert(
                            image,
                            Failure {
                                attempts: 1,
                                at: self.clock.mono_ms(),
                                message,
                                definitive: true,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Hands the plan's actions to tasks: pulls to the pull pool, each module's container
    /// actions to one task in plan order.
    fn dispatch(&mut self, plan: &Plan, observed: &[Observed], ctx: &Ctx<'_>) {
        let mut per_module: BTreeMap<String, Vec<Action>> = BTreeMap::new();
        for action in &plan.actions {
            match action {
                Action::Pull { module, image } => self.start_pull(module, image, ctx),
                other => per_module
                    .entry(other.module().to_string())
                    .or_default()
                    .push(other.clone()),
            }
        }
        let now = self.clock.mono_ms();
        for (module, actions) in per_module {
            // Whatever failed last time waits for its backoff (starts are held back by the
            // planner already, with the reason; this covers stops and removes).
            if let Some(f) = self.failures.get(&module) {
                let due = f.at + planner::backoff_delay(f.attempts);
                if due > now {
                    self.wake(due);
                    continue;
                }
            }
            self.start_actions(module, actions, observed, None, ctx);
        }
    }

    fn start_pull(&mut self, module: &str, image: &str, ctx: &Ctx<'_>) {
        if !self.pulling.insert(image.to_string()) {
            return;
        }
        let credentials = self.desired.as_ref().and_then(|(s, _)| {
            let registry = crate::manifest::validate::registry_of(image);
            s.deployment.registries.get(&registry).cloned()
        });
        info!(module, image, "pulling");
        let job = PullJob {
            runtime: self.runtime.clone(),
            image: image.to_string(),
            credentials,
            engine: self.engine.clone(),
            disk: self.settings.disk.clone(),
            progress: self.progress.clone(),
        };
        let (slots, tx, shutdown) = (
            self.pull_slots.clone(),
            ctx.pull_tx.clone(),
            ctx.shutdown.clone(),
        );
        ctx.tasks.spawn(async move {
            let image = job.image.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                result = async {
                    // The permit bounds concurrent pulls; the semaphore is never closed.
                    let _permit = slots.acquire().await;
                    job.run().await
                } => {
                    let _ = tx.send(PullDone { image, result }).await;
                }
            }
        });
    }

    /// Starts a task carrying out `actions` for `module`, which is busy until it ends.
    fn start_actions(
        &mut self,
        module: String,
        actions: Vec<Action>,
        observed: &[Observed],
        reply: Option<oneshot::Sender<Result<(), String>>>,
        ctx: &Ctx<'_>,
    ) {
        let mut steps = Vec::with_capacity(actions.len());
        for action in actions {
            match &action {
                Action::Start {
                    id, restart: true, ..
                }
                | Action::Restart { id, .. } => {
                    self.count_restart(&module, observed.iter().find(|o| &o.id == id));
                }
                _ => {}
            }
            let step = match action {
                Action::Create {
                    module: m,
                    name,
                    start,
                } => {
                    let Some((stored, _)) = &self.desired else {
                        continue;
                    };
                    let Some(spec_module) = stored.deployment.modules.get(&m) else {
                        continue;
                    };
                    let mut spec = container_spec(
                        &self.settings.device,
                        &stored.deployment.id,
                        stored.deployment.version,
                        &m,
                        spec_module,
                        &self.settings.module_env.for_module(&m),
                        &self.settings.policy,
                    );
                    spec.name = name;
                    Step::Create(Box::new(spec), start)
                }
                other => Step::Action(other),
            };
            steps.push(step);
        }
        if steps.is_empty() {
            return;
        }
        self.busy.insert(module.clone());
        let job = ActionJob {
            runtime: self.runtime.clone(),
            module,
            steps,
            grace: self.settings.stop_grace,
        };
        let (slots, tx) = (self.action_slots.clone(), ctx.action_tx.clone());
        ctx.tasks.spawn(async move {
            // The permit bounds engine operations at once; the semaphore is never closed.
            let _permit = slots.acquire().await;
            let done = job.run().await;
            if let Some(reply) = reply {
                let _ = reply.send(match &done.error {
                    None => Ok(()),
                    Some(e) => Err(e.message.clone()),
                });
            }
            // The receiver lives as long as the reconciler; after shutdown nobody needs it.
            let _ = tx.send(done).await;
        });
    }

    fn count_restart(&mut self, module: &str, container: Option<&Observed>) {
        let h = self.history.entry(module.to_string()).or_default();
        let failures = container.map_or(h.failures, |c| planner::failures_after(h, c));
        h.failures = failures.saturating_add(1);
        h.restarts = h.restarts.saturating_add(1);
        let h = h.clone();
        if let Err(e) = self.store.set_history(module, &h) {
            self.store_problem("record restart history", &e);
        }
    }

    /// Moves the deployment's status along: applied once converged; failed or rolled back
    /// at once when it cannot be staged or started, or at its deadline when it does not get
    /// healthy in time.
    fn track_deployment(&mut self, plan: &Plan, now: u64) {
        let (Some((stored, _)), Some(report)) = (&self.desired, &self.report) else {
            return;
        };
        let in_force =
            report.version == stored.deployment.version && report.id == stored.deployment.id;
        if !in_force {
            return;
        }
        if plan.converged {
            if matches!(
                report.status,
                DeploymentStatus::Applying | DeploymentStatus::Failed | DeploymentStatus::Received
            ) {
                self.applied(now);
            }
            return;
        }
        if report.status != DeploymentStatus::Applying {
            return;
        }
        let window = stored
            .deployment
            .rollback
            .as_ref()
            .map_or(DEFAULT_HEALTHY_WITHIN, |r| {
                Duration::from_secs(r.healthy_within_secs)
            });
        let deadline = self.applying_since + window.as_millis() as u64;
        let definitive: Vec<Issue> = plan
            .modules
            .iter()
            .filter(|(_, m)| m.definitive)
            .map(|(name, m)| {
                let what = if plan.staged {
                    "cannot start"
                } else {
                    "cannot be staged (nothing running was changed)"
                };
                Issue::new(
                    format!("/modules/{name}"),
                    format!("{what}: {}", m.problem.clone().unwrap_or_default()),
                )
            })
            .collect();
        if !definitive.is_empty() {
            self.fail(definitive, now);
            return;
        }
        if now < deadline {
            self.wake(deadline);
            return;
        }
        let reasons: Vec<Issue> = plan
            .modules
            .iter()
            .filter(|(_, m)| {
                m.problem.is_some()
                    || !matches!(m.status, ModuleStatus::Running | ModuleStatus::Stopped)
            })
            .map(|(name, m)| {
                let why = m
                    .problem
                    .clone()
                    .or_else(|| self.errors.get(name).cloned())
                    .unwrap_or_else(|| format!("{:?}", m.status).to_lowercase());
                Issue::new(
                    format!("/modules/{name}"),
                    format!("not healthy within {} s: {why}", window.as_secs()),
                )
            })
            .collect();
        self.fail(reasons, now);
    }

    fn applied(&mut self, now: u64) {
        let (Some((stored, _)), Some(report)) = (&self.desired, &mut self.report) else {
            return;
        };
        let took = now.saturating_sub(self.applying_since);
        info!(id = %report.id, version = report.version, secs = took as f64 / 1000.0, "deployment applied");
        {
            use std::sync::atomic::Ordering::Relaxed;
            let c = &self.settings.deployments;
            c.applied_total.fetch_add(1, Relaxed);
            c.last_ms.store(took, Relaxed);
            c.sum_ms.fetch_add(took, Relaxed);
        }
        report.status = DeploymentStatus::Applied;
        report.reasons.clear();
        report.updated_at = self.clock.wall_ms() / 1000;
        let (report, stored) = (report.clone(), stored.clone());
        if let Err(e) = self.store.set_report(&report) {
            self.store_problem("record the applied status", &e);
        }
        if let Err(e) = self.store.set_last_good(&stored) {
            self.store_problem("record the last good deployment", &e);
        }
        let modules: BTreeSet<String> = stored.deployment.modules.keys().cloned().collect();
        self.last_good = Some(stored);
        self.history.retain(|k, _| modules.contains(k));
        if let Err(e) = self.store.retain_history(|m| modules.contains(m)) {
            self.store_problem("forget the history of removed modules", &e);
        }
    }

    /// The deployment in force did not make it: back to the last good one when it asks for a
    /// rollback, else reported failed (and still tried).
    fn fail(&mut self, reasons: Vec<Issue>, now: u64) {
        let (Some((stored, _)), Some(report)) = (&self.desired, &mut self.report) else {
            return;
        };
        let rollback = stored
            .deployment
            .rollback
            .as_ref()
            .is_some_and(|r| r.on_failure);
        report.reasons = reasons;
        report.updated_at = self.clock.wall_ms() / 1000;
        match self.last_good.clone() {
            Some(good) if rollback && good.digest != stored.digest => {
                warn!(id = %report.id, version = report.version, to = good.deployment.version, "deployment failed; rolling back");
                report.status = DeploymentStatus::RolledBack;
                let report = report.clone();
                let restored = StoredDeployment {
                    accepted_at: self.clock.wall_ms(),
                    ..good
                };
                let window = BootInstant::now(self.clock.as_ref());
                if let Err(e) = self.store.set_desired(&restored, &report, &window) {
                    self.store_problem("record the rollback", &e);
                }
                self.set_desired(restored);
                self.applying_since = now;
                self.errors.clear();
                self.failures.clear();
                self.wake(now);
            }
            _ => {
                warn!(id = %report.id, version = report.version, "deployment failed");
                report.status = DeploymentStatus::Failed;
                let report = report.clone();
                if let Err(e) = self.store.set_report(&report) {
                    self.store_problem("record the failed status", &e);
                }
            }
        }
    }

    /// Publishes the reported state if it changed.
    fn publish(&self, plan: Option<&Plan>) {
        let last_good = self.last_good.as_ref().map(|g| DeploymentRef {
            id: g.deployment.id.clone(),
            version: g.deployment.version,
        });
        let observed = &self.last_observed;
        let mut modules = BTreeMap::new();
        match plan {
            Some(plan) => {
                for (name, p) in &plan.modules {
                    let desired = self.desired.as_ref();
                    let image = desired
                        .and_then(|(s, _)| s.deployment.modules.get(name))
                        .map(|m| m.image.clone());
                    let hash = desired.and_then(|(_, d)| d.hashes.get(name));
                    // The container the report describes: the desired one, else what serves.
                    let c = observed
                        .iter()
                        .filter(|o| &o.module == name)
                        .max_by_key(|o| {
                            (
                                Some(&o.config_hash) == hash,
                                o.state == ContainerState::Running,
                                o.started_at,
                            )
                        });
                    let h = self.history.get(name).cloned().unwrap_or_default();
                    modules.insert(
                        name.clone(),
                        ModuleReport {
                            status: p.status,
                            image: image
                                .or_else(|| c.map(|c| c.image.clone()))
                                .unwrap_or_default(),
                            image_digest: c.map(|c| c.image_id.clone()).filter(|d| !d.is_empty()),
                            restart_count: h.restarts,
                            exit_code: c.and_then(|c| {
                                (c.state != ContainerState::Running)
                                    .then_some(c.exit_code)
                                    .flatten()
                            }),
                            started_at: c.and_then(|c| c.started_at),
                            last_error: p
                                .problem
                                .clone()
                                .or_else(|| self.errors.get(name).cloned()),
                        },
                    );
                }
            }
            None => modules = self.state.borrow().modules.clone(),
        }
        let conditions = self.conditions(&modules);
        let mut agent =
            AgentFacts::local(self.clock.mono_ms().saturating_sub(self.started_mono) / 1000);
        agent.runtime_version = self.engine.as_ref().map(|e| e.version.clone());
        self.state.send_if_modified(|s| {
            let next = ReportedState {
                device_id: self.settings.device.clone(),
                deployment: self.report.clone(),
                last_rejected: self.last_rejected.clone(),
                last_good: last_good.clone(),
                modules: modules.clone(),
                agent: AgentFacts {
                    uptime_secs: s.agent.uptime_secs,
                    ..agent.clone()
                },
                conditions: conditions.clone(),
            };
            if *s == next {
                // Uptime alone is no reason to wake every reader.
                return false;
            }
            *s = ReportedState {
                agent: agent.clone(),
                ..next
            };
            true
        });
    }

    fn conditions(&self, modules: &BTreeMap<String, ModuleReport>) -> Vec<Condition> {
        let mut out = Vec::new();
        if let Some(recovery) = &self.settings.store_recovery
            && self.desired.is_none()
        {
            out.push(Condition {
                kind: "store-recovered".into(),
                message: recovery.clone(),
            });
        }
        let store = self.store.health();
        if let Some(since) = store.reserve_in_use_since_ms {
            out.push(Condition {
                kind: "store-reserve-used".into(),
                message: format!(
                    "the store's emergency reserve ({} KiB) is not in place since {since} (Unix ms): it was given to a write on a full disk, or the disk has had no room for it",
                    store.reserve_bytes >> 10
                ),
            });
        }
        if self.desired.is_none() && !modules.is_empty() {
            out.push(Condition {
                kind: "no-deployment".into(),
                message: format!(
                    "no deployment is stored on this device: {} module(s) found running are kept as they are (unmanaged) until a deployment arrives",
                    modules.len()
                ),
            });
        }
        for (kind, message) in &self.agent_problems {
            out.push(Condition {
                kind: format!("{kind}-error"),
                message: message.clone(),
            });
        }
        if let Some(rx) = &self.settings.conditions {
            out.extend(rx.borrow().iter().cloned());
        }
        out
    }

    /// Restarts a module's container now (a hub command or `outpost restart`), in a task.
    fn restart_module(
        &mut self,
        name: &str,
        reply: oneshot::Sender<Result<(), String>>,
        ctx: &Ctx<'_>,
    ) {
        if self.busy.contains(name) {
            let _ = reply.send(Err(format!(
                "module `{name}` is being changed right now; try again once it settles"
            )));
            return;
        }
        let observed = self.last_observed.clone();
        let Some(c) = observed
            .iter()
            .filter(|o| o.module == name)
            .max_by_key(|o| (o.state == ContainerState::Running, o.started_at))
        else {
            let _ = reply.send(Err(format!(
                "module `{name}` has no container on this device"
            )));
            return;
        };
        let action = Action::Restart {
            id: c.id.clone(),
            module: name.to_string(),
        };
        self.start_actions(name.to_string(), vec![action], &observed, Some(reply), ctx);
    }

    /// A module's newest log lines, read in a task so a large read never holds the reconciler.
    fn logs(
        &self,
        name: &str,
        tail: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<String, String>>,
        ctx: &Ctx<'_>,
    ) {
        let container = self
            .last_observed
            .iter()
            .filter(|o| o.module == name)
            .max_by_key(|o| (o.state == ContainerState::Running, o.started_at))
            .map_or_else(
                || container_name(&self.settings.device, name),
                |o| o.id.clone(),
            );
        let runtime = self.runtime.clone();
        let secrets = self.secrets_of(name);
        ctx.tasks.spawn(async move {
            let stream = runtime.logs(
                &container,
                LogOptions {
                    tail: Some(tail),
                    ..Default::default()
                },
            );
            let text = read_logs(stream, max_bytes)
                .await
                .map(|text| redact(&text, &secrets));
            let _ = reply.send(text);
        });
    }

    /// What a module's logs must not carry off the device: its environment's values (a
    /// module printing its configuration prints its secrets), its bus password, the
    /// deployment's registry passwords. Values shorter than 4 bytes are left alone (`1`,
    /// `yes`): redacting them would redact everything.
    fn secrets_of(&self, module: &str) -> Vec<String> {
        let mut secrets: Vec<String> = self
            .settings
            .module_env
            .for_module(module)
            .into_iter()
            .filter(|(k, _)| k == crate::bus::env::PASSWORD)
            .map(|(_, v)| v)
            .collect();
        if let Some((stored, _)) = &self.desired {
            if let Some(m) = stored.deployment.modules.get(module) {
                secrets.extend(m.env.values().cloned());
            }
            secrets.extend(
                stored
                    .deployment
                    .registries
                    .values()
                    .map(|r| r.password.expose().to_string()),
            );
        }
        secrets.retain(|s| s.len() >= 4);
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        secrets
    }

    /// Image cleanup: images deployments named that neither the desired deployment, the last
    /// good one, a pull under way nor a container uses, once unused for `image_gc_after` on
    /// the monotonic clock. Images no deployment named (the device's own) are never touched.
    async fn collect_images(&mut self, now: u64) {
        let period = self
            .settings
            .image_gc_after
            .min(Duration::from_secs(60))
            .as_millis()
            .max(1_000) as u64;
        if now < self.next_gc {
            self.wake(self.next_gc);
            return;
        }
        self.next_gc = now + period;
        self.wake(self.next_gc);
        let mut in_use: BTreeSet<&str> = self.pulling.iter().map(String::as_str).collect();
        for d in self
            .desired
            .as_ref()
            .map(|(s, _)| s)
            .into_iter()
            .chain(self.last_good.as_ref())
        {
            in_use.extend(d.deployment.modules.values().map(|m| m.image.as_str()));
        }
        in_use.extend(self.last_observed.iter().map(|o| o.image.as_str()));
        let max_age = self.settings.image_gc_after.as_millis() as u64;
        let mut due = Vec::new();
        for image in &self.managed_images {
            if in_use.contains(image.as_str()) {
                self.unused_since.remove(image);
                continue;
            }
            let since = *self.unused_since.entry(image.clone()).or_insert(now);
            if now.saturating_sub(since) >= max_age {
                due.push(image.clone());
            }
        }
        for image in due {
            match self.runtime.remove_image(&image).await {
                Ok(()) | Err(RuntimeError::NotFound { .. }) => {
                    info!(image, "removed unused image");
                    self.images.remove(&image);
                    self.pulled.remove(&image);
                    self.unused_since.remove(&image);
                    self.managed_images.remove(&image);
                    if let Err(e) = self.store.forget_image(&image) {
                        self.store_problem("forget a removed image", &e);
                    }
                }
                // In use by a container (409) or otherwise busy: try again next time.
                Err(e) => debug!(image, error = %e, "image not removed"),
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Why an offer was not taken.
enum Refusal {
    /// The deployment breaks a rule: refused for good, with the reasons.
    Rules(Vec<Issue>),
    /// The rules allow it but the store could not be read or written.
    Store {
        accepted: Box<Accepted>,
        source: Source,
        error: String,
    },
}

/// What the run loop lends the parts that start tasks.
struct Ctx<'a> {
    tasks: &'a TaskTracker,
    pull_tx: &'a mpsc::Sender<PullDone>,
    action_tx: &'a mpsc::Sender<ActionDone>,
    shutdown: &'a CancellationToken,
}

/// One step of a module's actions.
enum Step {
    /// Create from the spec; and start when the flag says so.
    Create(Box<crate::runtime::ContainerSpec>, bool),
    Action(Action),
}

/// A module's actions, carried out in order in a task of their own.
struct ActionJob<R: Runtime> {
    runtime: Arc<R>,
    module: String,
    steps: Vec<Step>,
    grace: Duration,
}

impl<R: Runtime> ActionJob<R> {
    async fn run(self) -> ActionDone {
        let mut started = false;
        for step in &self.steps {
            match self.step(step).await {
                Ok(s) => started |= s,
                Err(error) => {
                    return ActionDone {
                        module: self.module,
                        started,
                        error: Some(error),
                    };
                }
            }
        }
        ActionDone {
            module: self.module,
            started,
            error: None,
        }
    }

    /// Carries out one step; `Ok(true)` when a container of the module started.
    async fn step(&self, step: &Step) -> Result<bool, ActionError> {
        let (rt, grace, module) = (&self.runtime, self.grace, self.module.as_str());
        let action = match step {
            Step::Create(spec, start) => {
                info!(module, name = %spec.name, image = %spec.image, start, "creating");
                return match rt.create(spec).await {
                    Ok(id) if *start => {
                        rt.start(&id).await.map_err(ActionError::start)?;
                        Ok(true)
                    }
                    Ok(_) => Ok(false),
                    Err(RuntimeError::NotFound { .. }) => Err(ActionError {
                        message: format!(
                            "image {} is no longer on the engine; pulling it again",
                            spec.image
                        ),
                        start: false,
                        image_gone: Some(spec.image.clone()),
                    }),
                    Err(e) => Err(ActionError::start(format!("create failed: {e}"))),
                };
            }
            Step::Action(a) => a,
        };
        match action {
            Action::Remove { id, .. } => {
                info!(module, container = %short(id), "stopping and removing");
                // Stop first: the module gets SIGTERM and its grace period, not a SIGKILL.
                rt.stop(id, grace).await.map_err(ActionError::other)?;
                rt.remove(id).await.map_err(ActionError::other)?;
                Ok(false)
            }
            Action::Stop { id, .. } => {
                info!(module, container = %short(id), "stopping");
                rt.stop(id, grace).await.map_err(ActionError::other)?;
                Ok(false)
            }
            Action::Start { id, restart, .. } => {
                info!(module, container = %short(id), restart, "starting");
                rt.start(id).await.map_err(ActionError::start)?;
                Ok(true)
            }
            Action::Restart { id, .. } => {
                info!(module, container = %short(id), "restarting");
                rt.stop(id, grace).await.map_err(ActionError::other)?;
                rt.start(id).await.map_err(ActionError::start)?;
                Ok(true)
            }
            Action::Replace { old, new, name, .. } => {
                info!(module, from = ?old.iter().map(|o| short(o)).collect::<Vec<_>>(), to = %short(new), "switching");
                for o in old {
                    rt.stop(o, grace).await.map_err(ActionError::other)?;
                }
                if let Err(e) = rt.start(new).await {
                    // The new version cannot start: the old one serves again, and the
                    // deployment hears about it (a start failure).
                    warn!(module, error = %e, "the new container did not start; restarting the old one");
                    if let Some(first) = old.first()
                        && let Err(restore) = rt.start(first).await
                    {
                        warn!(module, error = %restore, "the old container did not start either");
                    }
                    return Err(ActionError::start(format!("start failed: {e}")));
                }
                for o in old {
                    if let Err(e) = rt.remove(o).await {
                        warn!(module, container = %short(o), error = %e, "old container not removed; the next pass retries");
                    }
                }
                if let Err(e) = rt.rename(new, name).await {
                    debug!(module, error = %e, "staged container not renamed yet");
                }
                Ok(true)
            }
            Action::Rename { id, name, .. } => {
                rt.rename(id, name).await.map_err(ActionError::other)?;
                Ok(false)
            }
            Action::Pull { .. } | Action::Create { .. } => Ok(false),
        }
    }
}

/// A pull with what must be checked around it.
struct PullJob<R: Runtime> {
    runtime: Arc<R>,
    image: String,
    credentials: Option<crate::manifest::RegistryCredentials>,
    engine: Option<EngineInfo>,
    disk: crate::config::DiskConfig,
    progress: broadcast::Sender<PullProgress>,
}

impl<R: Runtime> PullJob<R> {
    /// Checks the disk, pulls with progress, then verifies what arrived.
    async fn run(self) -> Result<(), PullError> {
        self.check_disk().await?;
        let (ptx, mut prx) = mpsc::channel::<PullProgress>(32);
        let progress = self.progress.clone();
        let relay = async move {
            while let Some(p) = prx.recv().await {
                let _ = progress.send(p);
            }
        };
        let pull = async {
            let result = self
                .runtime
                .pull(&self.image, self.credentials.as_ref(), Some(&ptx))
                .await;
            drop(ptx); // ends the relay
            result
        };
        let (result, ()) = futures_util::future::join(pull, relay).await;
        result.map_err(|e| {
            let message = e.to_string();
            PullError {
                definitive: is_definitive_pull_error(&message),
                message,
            }
        })?;
        let info = self
            .runtime
            .image(&self.image)
            .await
            .map_err(|e| PullError {
                message: format!("pulled, but cannot inspect {}: {e}", self.image),
                definitive: false,
            })?
            .ok_or_else(|| PullError {
                message: format!("pulled, but {} is not on the engine", self.image),
                definitive: false,
            })?;
        verify_image(&self.image, &info, self.engine.as_ref()).map_err(|message| PullError {
            message,
            definitive: true,
        })
    }

    /// Refuses a pull when the engine's disk is above its high watermark, or would be left
    /// with less than the reserve once the image is there. The image's size comes from the
    /// registry's manifest (compressed); unpacking takes more, so twice that is counted. When
    /// the registry cannot say, the pull goes ahead on the watermark alone (the pull itself
    /// then says what is wrong with the registry).
    async fn check_disk(&self) -> Result<(), PullError> {
        let Some(root) = self.engine.as_ref().and_then(|e| e.root_dir.as_deref()) else {
            return Ok(());
        };
        let Some(usage) = crate::disk::usage(root) else {
            debug!(root = %root.display(), "cannot measure the engine's disk; pulling without the check");
            return Ok(());
        };
        let high = f64::from(self.disk.high_watermark_percent);
        if usage.used_percent() > high {
            return Err(PullError {
                message: format!(
                    "not pulling {}: the engine's disk ({}) is {:.0}% full, above disk.high_watermark_percent = {}",
                    self.image,
                    root.display(),
                    usage.used_percent(),
                    self.disk.high_watermark_percent
                ),
                definitive: true,
            });
        }
        let platform = crate::runtime::registry::Platform::of_this_device();
        let size = match crate::runtime::registry::image_size(
            &self.image,
            self.credentials.as_ref(),
            &platform,
            SIZE_TIMEOUT,
        )
        .await
        {
            Ok(size) => size.compressed_bytes,
            Err(e) => {
                debug!(image = %self.image, error = %e, "the registry did not say how big the image is; pulling on the watermark alone");
                return Ok(());
            }
        };
        let need = size.saturating_mul(2);
        if usage.available_bytes < need.saturating_add(self.disk.pull_reserve_bytes) {
            let mb = |b: u64| b.div_ceil(1 << 20);
            return Err(PullError {
                message: format!(
                    "not pulling {}: it needs about {} MB ({} MB compressed, unpacked) and {} MB must stay free (disk.pull_reserve_mb), but {} has {} MB free",
                    self.image,
                    mb(need),
                    mb(size),
                    mb(self.disk.pull_reserve_bytes),
                    root.display(),
                    mb(usage.available_bytes)
                ),
                definitive: true,
            });
        }
        Ok(())
    }
}

/// Registry answers that retrying cannot change.
fn is_definitive_pull_error(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "manifest unknown",
        "not found",
        "unauthorized",
        "authentication required",
        "denied",
        "no matching manifest",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// The image is for this device's platform, and has the digest its reference pins.
pub fn verify_image(
    reference: &str,
    info: &ImageInfo,
    engine: Option<&EngineInfo>,
) -> Result<(), String> {
    if let Some(engine) = engine
        && !info.architecture.is_empty()
        && !engine.architecture.is_empty()
        && (info.architecture != engine.architecture
            || (!info.os.is_empty() && info.os != engine.os))
    {
        return Err(format!(
            "image {reference} is built for {}/{}; this device is {}/{} (publish an image for this platform, or a multi-platform one)",
            info.os, info.architecture, engine.os, engine.architecture
        ));
    }
    if let Some((_, digest)) = reference.split_once('@')
        && !info
            .digests
            .iter()
            .any(|d| d.ends_with(&format!("@{digest}")))
    {
        return Err(format!(
            "image {reference} on the engine does not carry the digest the deployment pins ({digest})"
        ));
    }
    Ok(())
}

/// `text` with every secret replaced by `[redacted]`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "[redacted]");
        }
    }
    out
}

async fn read_logs(
    stream: impl futures_util::Stream<Item = Result<String, RuntimeError>>,
    max_bytes: usize,
) -> Result<String, String> {
    tokio::pin!(stream);
    let mut out = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        out.push_str(&chunk);
        if out.len() > max_bytes {
            // Keep the newest bytes, cut at a character boundary.
            let mut cut = out.len() - max_bytes;
            while !out.is_char_boundary(cut) {
                cut += 1;
            }
            out.drain(..cut);
        }
    }
    Ok(out)
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

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves when the watched conditions change; never without a watch.
async fn changed(
    rx: &mut Option<watch::Receiver<Vec<Condition>>>,
) -> Result<(), watch::error::RecvError> {
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
