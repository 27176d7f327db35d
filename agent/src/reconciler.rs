//! The reconciler: the one task that owns the device's deployment. It takes offers from the
//! hub link and the local API, checks policy and the version rule, stores what it accepts,
//! and then, on every engine event, pull completion, backoff timer or periodic resync, asks the
//! [`planner`](crate::planner) what to do and carries it out through the [`Runtime`].
//!
//! A failed step is logged, shown in the module's status, and retried by a later plan; it never
//! wedges the deployment. A newer deployment replaces the desired state at once, and the next
//! plan works from it (pulls of the old one finish in the background and are simply unused).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::control::{AgentHandle, REQUEST_CAPACITY, Request};
use crate::intake::Accepted;
use crate::manifest::Issue;
use crate::planner::{self, Action, Desired, ModuleHistory, Plan, PullFailure, World};
use crate::policy::{self, DeviceFacts};
use crate::runtime::spec::{config_hash, container_name, container_spec};
use crate::runtime::{ContainerState, LogOptions, Observed, PullProgress, Runtime};
use crate::state::{
    AgentFacts, DeploymentRef, DeploymentReport, DeploymentStatus, ModuleReport, ReportedState,
    Source,
};
use crate::store::{Store, StoreError, StoredDeployment, source_key};

/// How often the engine is listed even without events, to catch anything missed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(30);
/// How long a deployment without a rollback window may take before it is reported failed.
pub const DEFAULT_HEALTHY_WITHIN: Duration = Duration::from_secs(300);
/// Delay before retrying after the engine could not be reached or an action failed.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Settings the reconciler needs from the device configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device: String,
    pub policy: crate::config::PolicyConfig,
    pub facts: DeviceFacts,
    pub stop_grace: Duration,
    pub max_concurrent_pulls: usize,
    /// Images no deployment uses are removed after this long.
    pub image_gc_after: Duration,
    /// What the agent adds to each module's environment (bus address and credentials).
    pub module_env: crate::bus::ModuleEnv,
    /// Where the deployment's routes go when it changes; `None` without a bus.
    pub routes: Option<watch::Sender<Arc<crate::bus::routes::RouteTable>>>,
    /// Deployment durations, for metrics.
    pub deployments: Arc<DeploymentCounters>,
}

/// How long deployments took from acceptance to applied, for metrics.
#[derive(Debug, Default)]
pub struct DeploymentCounters {
    pub applied_total: std::sync::atomic::AtomicU64,
    /// Milliseconds.
    pub last_ms: std::sync::atomic::AtomicU64,
    pub sum_ms: std::sync::atomic::AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The result of a background pull.
struct PullDone {
    image: String,
    result: Result<(), String>,
}

pub struct Reconciler<R: Runtime> {
    settings: Settings,
    runtime: Arc<R>,
    store: Store,
    state: watch::Sender<ReportedState>,
    progress: broadcast::Sender<PullProgress>,
    pull_slots: Arc<Semaphore>,
    desired: Option<(StoredDeployment, Desired)>,
    report: Option<DeploymentReport>,
    last_rejected: Option<DeploymentReport>,
    history: BTreeMap<String, ModuleHistory>,
    images: BTreeSet<String>,
    pulling: BTreeSet<String>,
    pulled: BTreeSet<String>,
    pull_failures: BTreeMap<String, PullFailure>,
    /// The last error carrying out an action, per module, until the module is up again.
    errors: BTreeMap<String, String>,
    applying_since: u64,
    wake_at: Option<u64>,
    started_ms: u64,
    started: Instant,
    runtime_version: Option<String>,
    last_gc: u64,
    /// The last deployment that became healthy, as stored: kept here so that passes and
    /// reports do not read it back from the store each time.
    last_good: Option<StoredDeployment>,
    /// When each image a deployment named was last in use (image cleanup's clock).
    image_used: BTreeMap<String, Instant>,
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
    pub fn build(
        settings: Settings,
        runtime: Arc<R>,
        store: Store,
    ) -> Result<Parts<R>, StoreError> {
        let stored = store.desired()?;
        let history = store.history()?;
        let report = store.report()?;
        let last_good = store.last_good()?;
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
        };
        let (state, state_rx) = watch::channel(initial);
        let (progress, _) = broadcast::channel(256);
        let (requests_tx, requests) = mpsc::channel(REQUEST_CAPACITY);
        let desired = stored.map(|s| {
            let d = desired_of(&s, &settings.module_env);
            (s, d)
        });
        if let (Some(tx), Some((s, _))) = (&settings.routes, &desired) {
            tx.send_replace(Arc::new(crate::bus::routes::RouteTable::new(
                &s.deployment.routes,
            )));
        }
        let reconciler = Reconciler {
            pull_slots: Arc::new(Semaphore::new(settings.max_concurrent_pulls.max(1))),
            settings,
            runtime,
            store,
            state,
            progress: progress.clone(),
            desired,
            report,
            last_rejected: None,
            history,
            images: BTreeSet::new(),
            pulling: BTreeSet::new(),
            pulled: BTreeSet::new(),
            pull_failures: BTreeMap::new(),
            errors: BTreeMap::new(),
            applying_since: now_ms(),
            wake_at: None,
            started_ms: now_ms(),
            started: Instant::now(),
            runtime_version: None,
            last_gc: 0,
            last_good,
            image_used: BTreeMap::new(),
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
        let (event_tx, mut event_rx) = mpsc::channel::<()>(64);
        tasks.spawn(forward_events(
            self.runtime.clone(),
            self.settings.device.clone(),
            event_tx,
            shutdown.clone(),
        ));
        self.runtime_version = self.runtime.info().await.ok().map(|i| i.version);
        let mut resync = tokio::time::interval(RESYNC_EVERY);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut passes_in_a_row = 0;
        loop {
            if passes_in_a_row == 0 {
                let wake = self.wake_at.map(|w| {
                    tokio::time::Instant::now() + Duration::from_millis(w.saturating_sub(now_ms()))
                });
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    Some(req) = requests.recv() => self.handle(req).await,
                    Some(done) = pull_rx.recv() => self.pull_done(done),
                    Some(()) = event_rx.recv() => {
                        // A burst of events needs one pass.
                        while event_rx.try_recv().is_ok() {}
                    }
                    _ = sleep_until(wake) => {}
                    _ = resync.tick() => {}
                }
            }
            let acted = self.pass(&tasks, &pull_tx, &shutdown).await;
            // Act again at once while actions succeed (the next startup group, say); events
            // would trigger it too, this only saves their latency.
            passes_in_a_row = if acted && passes_in_a_row < 20 {
                passes_in_a_row + 1
            } else {
                0
            };
        }
        tasks.close();
        tasks.wait().await;
        info!("reconciler stopped");
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Offer {
                accepted,
                source,
                reply,
            } => {
                let outcome = self.offer(*accepted, source);
                let _ = reply.send(outcome);
            }
            Request::RestartModule { name, reply } => {
                let _ = reply.send(self.restart_module(&name).await);
            }
            Request::Logs {
                name,
                tail,
                max_bytes,
                reply,
            } => {
                let _ = reply.send(self.logs(&name, tail, max_bytes).await);
            }
        }
    }

    fn offer(&mut self, accepted: Accepted, source: Source) -> Result<(), Vec<Issue>> {
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
        // Control handed back to a source whose deployment was overridden (a device's own
        // deployment cleared, so its group's applies again): the same bytes that source had
        // accepted are not a replay. A local deployment is not overridden this way.
        let handed_back = self.desired.as_ref().is_some_and(|(current, _)| {
            current.source != source && current.source != Source::Local
        }) && self
            .store
            .digests()
            .ok()
            .and_then(|digests| digests.get(&source_key(&source)).cloned())
            .is_some_and(|digest| digest == accepted.digest);
        let mut issues = Vec::new();
        match self.store.versions() {
            Ok(versions) => {
                if let Some(last) = versions.get(&source_key(&source))
                    && d.version <= *last
                    && !handed_back
                {
                    issues.push(Issue::new(
                        "/version",
                        format!(
                            "version {} is not newer than {last}, the last accepted from this source; publish a higher version",
                            d.version
                        ),
                    ));
                }
            }
            Err(e) => issues.push(Issue::new("", format!("cannot read the store: {e}"))),
        }
        issues.extend(policy::check(d, &self.settings.policy, self.settings.facts));
        let now = now_ms();
        if !issues.is_empty() {
            warn!(id = %d.id, version = d.version, issues = issues.len(), "deployment rejected");
            self.last_rejected = Some(DeploymentReport {
                id: d.id.clone(),
                version: d.version,
                status: DeploymentStatus::Rejected,
                source,
                reasons: issues.clone(),
                digest: Some(accepted.digest.clone()),
                updated_at: now / 1000,
            });
            self.publish(None, &[]);
            return Err(issues);
        }
        let stored = StoredDeployment {
            deployment: accepted.deployment.clone(),
            source: source.clone(),
            provenance: accepted.provenance.clone(),
            digest: accepted.digest.clone(),
            accepted_at: now,
        };
        let report = DeploymentReport {
            id: d.id.clone(),
            version: d.version,
            status: DeploymentStatus::Applying,
            source,
            reasons: vec![],
            digest: Some(accepted.digest),
            updated_at: now / 1000,
        };
        let window = crate::clock::BootInstant::now(&crate::clock::SystemClock::new());
        if let Err(e) = self.store.accept(&stored, &report, &window) {
            warn!(error = %e, "cannot store the deployment; refusing it");
            return Err(vec![Issue::new(
                "",
                format!("the device could not store the deployment: {e}"),
            )]);
        }
        info!(id = %d.id, version = d.version, modules = d.modules.len(), "deployment accepted");
        // Every image a deployment names is the agent's to clean up once unused.
        if let Err(e) = self
            .store
            .add_images(d.modules.values().map(|m| m.image.as_str()))
        {
            warn!(error = %e, "cannot record image use");
        }
        self.set_desired(stored);
        self.report = Some(report);
        self.applying_since = now;
        self.errors.clear();
        self.wake_at = None;
        self.publish(None, &[]);
        Ok(())
    }

    /// Makes `stored` the deployment to carry out, and its routes the bus's: a route change
    /// applies with the deployment, without restarting modules.
    fn set_desired(&mut self, stored: StoredDeployment) {
        if let Some(tx) = &self.settings.routes {
            tx.send_replace(Arc::new(crate::bus::routes::RouteTable::new(
                &stored.deployment.routes,
            )));
        }
        let desired = desired_of(&stored, &self.settings.module_env);
        self.desired = Some((stored, desired));
    }

    fn pull_done(&mut self, done: PullDone) {
        self.pulling.remove(&done.image);
        match done.result {
            Ok(()) => {
                info!(image = %done.image, "pulled");
                self.pull_failures.remove(&done.image);
                self.images.insert(done.image.clone());
                self.pulled.insert(done.image);
            }
            Err(message) => {
                warn!(image = %done.image, error = %message, "pull failed");
                let attempts = self
                    .pull_failures
                    .get(&done.image)
                    .map_or(0, |f| f.attempts)
                    + 1;
                self.pull_failures.insert(
                    done.image,
                    PullFailure {
                        attempts,
                        at: now_ms(),
                        message,
                    },
                );
            }
        }
    }

    /// One reconciliation pass. Returns whether any action was carried out.
    async fn pass(
        &mut self,
        tasks: &TaskTracker,
        pull_tx: &mpsc::Sender<PullDone>,
        shutdown: &CancellationToken,
    ) -> bool {
        let observed = match self.runtime.list(&self.settings.device).await {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "cannot list containers; retrying");
                self.wake_at = Some(now_ms() + RETRY_AFTER.as_millis() as u64);
                return false;
            }
        };
        if let Some((_, desired)) = &self.desired {
            let wanted: Vec<String> = desired
                .deployment
                .modules
                .values()
                .map(|m| m.image.clone())
                .collect();
            for image in wanted {
                if self.images.contains(&image) || self.pulling.contains(&image) {
                    continue;
                }
                if let Ok(Some(_)) = self.runtime.image(&image).await {
                    self.images.insert(image);
                }
            }
        }
        // Gives the store its emergency reserve back once the disk has room (cheap otherwise).
        if let Err(e) = self.store.maintain() {
            warn!(error = %e, "store upkeep failed");
        }
        let now = now_ms();
        let plan = planner::plan(&World {
            device: &self.settings.device,
            desired: self.desired.as_ref().map(|(_, d)| d),
            observed: &observed,
            images: &self.images,
            pulling: &self.pulling,
            pulled: &self.pulled,
            pull_failures: &self.pull_failures,
            history: &self.history,
            now,
            agent_started: self.started_ms,
        });
        self.wake_at = plan.wake_at;
        let mut acted = false;
        let mut failed = false;
        for action in &plan.actions {
            match self
                .execute(action, &observed, tasks, pull_tx, shutdown)
                .await
            {
                Ok(true) => {
                    acted = true;
                    self.errors.remove(action.module());
                }
                Ok(false) => {}
                Err(message) => {
                    warn!(module = action.module(), error = %message, "action failed; the next pass retries");
                    self.errors.insert(action.module().to_string(), message);
                    failed = true;
                }
            }
        }
        if failed {
            let retry = now_ms() + RETRY_AFTER.as_millis() as u64;
            self.wake_at = Some(self.wake_at.map_or(retry, |w| w.min(retry)));
        }
        self.track_deployment(&plan, now);
        self.publish(Some(&plan), &observed);
        self.collect_images(now).await;
        acted
    }

    /// Image cleanup: images that deployments used, that neither the desired nor the last good
    /// deployment uses now, and that have not been used for `image_gc_after`, are removed.
    /// Images the agent never pulled for a deployment are not its business and stay.
    async fn collect_images(&mut self, now: u64) {
        let period = self
            .settings
            .image_gc_after
            .min(Duration::from_secs(60))
            .as_millis() as u64;
        let due = self.last_gc + period.max(1_000);
        if now < due {
            self.wake_at = Some(self.wake_at.map_or(due, |w| w.min(due)));
            return;
        }
        self.last_gc = now;
        let mut in_use: BTreeSet<String> = BTreeSet::new();
        if let Some((stored, _)) = &self.desired {
            in_use.extend(stored.deployment.modules.values().map(|m| m.image.clone()));
        }
        if let Some(good) = &self.last_good {
            in_use.extend(good.deployment.modules.values().map(|m| m.image.clone()));
        }
        // When each image was last in use is kept here (monotonic), not in the store: writing
        // it every minute wore the flash for nothing.
        let now_mono = Instant::now();
        for image in &in_use {
            self.image_used.insert(image.clone(), now_mono);
        }
        if let Err(e) = self.store.add_images(&in_use) {
            warn!(error = %e, "cannot record image use");
            return;
        }
        let known = match self.store.images() {
            Ok(known) => known,
            Err(e) => {
                warn!(error = %e, "cannot read the images deployments named");
                return;
            }
        };
        for image in known {
            // Not seen in use by this agent process: counted from its start (the safe side).
            let last_used = *self.image_used.entry(image.clone()).or_insert(self.started);
            if in_use.contains(&image)
                || now_mono.duration_since(last_used) < self.settings.image_gc_after
            {
                continue;
            }
            match self.runtime.remove_image(&image).await {
                Ok(()) | Err(crate::runtime::RuntimeError::NotFound { .. }) => {
                    info!(image, "removed unused image");
                    self.images.remove(&image);
                    self.pulled.remove(&image);
                    self.image_used.remove(&image);
                    if let Err(e) = self.store.forget_image(&image) {
                        warn!(image, error = %e, "cannot forget a removed image");
                    }
                }
                // In use by a container (409) or otherwise busy: try again next time.
                Err(e) => debug!(image, error = %e, "image not removed"),
            }
        }
        let next = now + period.max(1_000);
        self.wake_at = Some(self.wake_at.map_or(next, |w| w.min(next)));
    }

    /// Carries out one action; `Ok(false)` when it only started something in the background.
    async fn execute(
        &mut self,
        action: &Action,
        observed: &[Observed],
        tasks: &TaskTracker,
        pull_tx: &mpsc::Sender<PullDone>,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        let grace = self.settings.stop_grace;
        match action {
            Action::Remove { id, module } => {
                info!(module, container = %short(id), "removing container");
                // Stop first: the module gets SIGTERM and its grace period, not a SIGKILL.
                self.runtime
                    .stop(id, grace)
                    .await
                    .map_err(|e| e.to_string())?;
                self.runtime.remove(id).await.map_err(|e| e.to_string())?;
            }
            Action::Stop { id, module } => {
                info!(module, container = %short(id), "stopping");
                self.runtime
                    .stop(id, grace)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Action::Pull { module, image } => {
                self.pulling.insert(image.clone());
                let credentials = self.desired.as_ref().and_then(|(s, _)| {
                    let registry = crate::manifest::validate::registry_of(image);
                    s.deployment.registries.get(&registry).cloned()
                });
                info!(module, image, "pulling");
                let (runtime, slots, tx, progress) = (
                    self.runtime.clone(),
                    self.pull_slots.clone(),
                    pull_tx.clone(),
                    self.progress.clone(),
                );
                let (image, shutdown) = (image.clone(), shutdown.clone());
                tasks.spawn(async move {
                    let (ptx, mut prx) = mpsc::channel::<PullProgress>(32);
                    let relay = async move {
                        while let Some(p) = prx.recv().await {
                            let _ = progress.send(p);
                        }
                    };
                    let image_ref = image.clone();
                    let pull_then_close = async move {
                        // The permit bounds concurrent pulls; the semaphore is never closed.
                        let _permit = slots.acquire().await;
                        let result = runtime
                            .pull(&image_ref, credentials.as_ref(), Some(&ptx))
                            .await
                            .map_err(|e| e.to_string());
                        drop(ptx); // ends the relay
                        result
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        (result, ()) = futures_util::future::join(pull_then_close, relay) => {
                            let _ = tx.send(PullDone { image, result }).await;
                        }
                    }
                });
                return Ok(false);
            }
            Action::Create { module } => {
                let Some((stored, _)) = &self.desired else {
                    return Ok(false);
                };
                let Some(m) = stored.deployment.modules.get(module) else {
                    return Ok(false);
                };
                let spec = container_spec(
                    &self.settings.device,
                    &stored.deployment.id,
                    stored.deployment.version,
                    module,
                    m,
                    &self.settings.module_env.for_module(module),
                );
                info!(module, image = %m.image, "creating and starting");
                let id = match self.runtime.create(&spec).await {
                    Ok(id) => id,
                    Err(crate::runtime::RuntimeError::Engine { message, .. })
                        if message.starts_with("409") =>
                    {
                        // A container of that name survived (an interrupted replace): remove it;
                        // the next pass creates ours.
                        self.runtime
                            .remove(&spec.name)
                            .await
                            .map_err(|e| e.to_string())?;
                        return Ok(true);
                    }
                    Err(crate::runtime::RuntimeError::NotFound { .. }) => {
                        // The image went away behind the agent's back (a prune): pull it again.
                        self.images.remove(&m.image);
                        self.pulled.remove(&m.image);
                        return Err(format!(
                            "image {} is no longer on the engine; pulling it again",
                            m.image
                        ));
                    }
                    Err(e) => return Err(e.to_string()),
                };
                self.runtime.start(&id).await.map_err(|e| e.to_string())?;
            }
            Action::Start {
                id,
                module,
                restart,
            } => {
                if *restart {
                    self.count_restart(module, observed.iter().find(|o| &o.id == id));
                }
                info!(module, container = %short(id), restart, "starting");
                self.runtime.start(id).await.map_err(|e| e.to_string())?;
            }
            Action::Restart { id, module } => {
                self.count_restart(module, observed.iter().find(|o| &o.id == id));
                info!(module, container = %short(id), "restarting (unhealthy)");
                self.runtime
                    .stop(id, grace)
                    .await
                    .map_err(|e| e.to_string())?;
                self.runtime.start(id).await.map_err(|e| e.to_string())?;
            }
        }
        Ok(true)
    }

    fn count_restart(&mut self, module: &str, container: Option<&Observed>) {
        let h = self.history.entry(module.to_string()).or_default();
        let failures = container.map_or(h.failures, |c| planner::failures_after(h, c));
        h.failures = failures.saturating_add(1);
        h.restarts = h.restarts.saturating_add(1);
        if let Err(e) = self.store.set_history(module, h) {
            warn!(module, error = %e, "cannot store restart history");
        }
    }

    /// Moves the deployment's status along: applied once converged, failed or rolled back when
    /// it does not get there in time.
    fn track_deployment(&mut self, plan: &Plan, now: u64) {
        let (Some((stored, _)), Some(report)) = (&self.desired, &mut self.report) else {
            return;
        };
        let in_force =
            report.version == stored.deployment.version && report.id == stored.deployment.id;
        if plan.converged {
            if in_force
                && matches!(
                    report.status,
                    DeploymentStatus::Applying
                        | DeploymentStatus::Failed
                        | DeploymentStatus::Received
                )
            {
                info!(id = %report.id, version = report.version, secs = (now - self.applying_since) as f64 / 1000.0, "deployment applied");
                {
                    use std::sync::atomic::Ordering::Relaxed;
                    let took = now.saturating_sub(self.applying_since);
                    let c = &self.settings.deployments;
                    c.applied_total.fetch_add(1, Relaxed);
                    c.last_ms.store(took, Relaxed);
                    c.sum_ms.fetch_add(took, Relaxed);
                }
                report.status = DeploymentStatus::Applied;
                report.reasons.clear();
                report.updated_at = now / 1000;
                let _ = self.store.set_report(report);
                if let Err(e) = self.store.set_last_good(stored) {
                    warn!(error = %e, "cannot store the last good deployment");
                }
                self.last_good = Some(stored.clone());
                let modules: BTreeSet<&String> = stored.deployment.modules.keys().collect();
                self.history.retain(|k, _| modules.contains(k));
                let _ = self
                    .store
                    .retain_history(|m| modules.iter().any(|k| k.as_str() == m));
            }
            return;
        }
        if !in_force || report.status != DeploymentStatus::Applying {
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
        if now < deadline {
            self.wake_at = Some(self.wake_at.map_or(deadline, |w| w.min(deadline)));
            return;
        }
        let reasons: Vec<Issue> = plan
            .modules
            .iter()
            .filter(|(_, m)| {
                m.problem.is_some()
                    || !matches!(
                        m.status,
                        crate::state::ModuleStatus::Running | crate::state::ModuleStatus::Stopped
                    )
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
        let rollback = stored
            .deployment
            .rollback
            .as_ref()
            .is_some_and(|r| r.on_failure);
        match self.last_good.clone() {
            Some(good) if rollback && good.digest != stored.digest => {
                warn!(id = %report.id, version = report.version, to = good.deployment.version, "deployment did not become healthy; rolling back");
                report.status = DeploymentStatus::RolledBack;
                report.reasons = reasons;
                report.updated_at = now / 1000;
                let restored = StoredDeployment {
                    accepted_at: now,
                    ..good
                };
                let window = crate::clock::BootInstant::now(&crate::clock::SystemClock::new());
                if let Err(e) = self.store.set_desired(&restored, report, &window) {
                    warn!(error = %e, "cannot store the rollback");
                }
                self.set_desired(restored);
                self.applying_since = now;
                self.errors.clear();
            }
            _ => {
                warn!(id = %report.id, version = report.version, "deployment did not become healthy in time");
                report.status = DeploymentStatus::Failed;
                report.reasons = reasons;
                report.updated_at = now / 1000;
                let _ = self.store.set_report(report);
            }
        }
    }

    /// Publishes the reported state if it changed.
    fn publish(&self, plan: Option<&Plan>, observed: &[Observed]) {
        let last_good = self.last_good.as_ref().map(|g| DeploymentRef {
            id: g.deployment.id.clone(),
            version: g.deployment.version,
        });
        let mut modules = BTreeMap::new();
        if let (Some((stored, desired)), Some(plan)) = (&self.desired, plan) {
            for (name, m) in &stored.deployment.modules {
                let Some(p) = plan.modules.get(name) else {
                    continue;
                };
                let c = observed
                    .iter()
                    .filter(|o| {
                        &o.module == name && desired.hashes.get(name) == Some(&o.config_hash)
                    })
                    .max_by_key(|o| o.state == ContainerState::Running);
                let h = self.history.get(name).cloned().unwrap_or_default();
                modules.insert(
                    name.clone(),
                    ModuleReport {
                        status: p.status,
                        image: m.image.clone(),
                        image_digest: c.map(|c| c.image_id.clone()).filter(|d| !d.is_empty()),
                        restart_count: h.restarts,
                        exit_code: c.and_then(|c| {
                            (c.state != ContainerState::Running)
                                .then_some(c.exit_code)
                                .flatten()
                        }),
                        started_at: c.and_then(|c| c.started_at),
                        last_error: p.problem.clone().or_else(|| self.errors.get(name).cloned()),
                    },
                );
            }
        } else {
            modules = self.state.borrow().modules.clone();
        }
        let mut agent = AgentFacts::local(self.started.elapsed().as_secs());
        agent.runtime_version = self.runtime_version.clone();
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

    async fn restart_module(&mut self, name: &str) -> Result<(), String> {
        let observed = self
            .runtime
            .list(&self.settings.device)
            .await
            .map_err(|e| e.to_string())?;
        let c = observed
            .iter()
            .find(|o| o.module == name)
            .ok_or_else(|| format!("module `{name}` has no container on this device"))?;
        let h = self.history.entry(name.to_string()).or_default();
        h.restarts = h.restarts.saturating_add(1);
        let _ = self.store.set_history(name, h);
        self.runtime
            .stop(&c.id, self.settings.stop_grace)
            .await
            .map_err(|e| e.to_string())?;
        self.runtime.start(&c.id).await.map_err(|e| e.to_string())
    }

    async fn logs(&self, name: &str, tail: usize, max_bytes: usize) -> Result<String, String> {
        let container = container_name(&self.settings.device, name);
        let stream = self.runtime.logs(
            &container,
            LogOptions {
                tail: Some(tail),
                ..Default::default()
            },
        );
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
}

/// The desired deployment with its config hashes.
pub fn desired_of(stored: &StoredDeployment, env: &crate::bus::ModuleEnv) -> Desired {
    let hashes = stored
        .deployment
        .modules
        .iter()
        .map(|(name, m)| (name.clone(), config_hash(m, &env.for_module(name))))
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

/// Turns the engine's event stream into "something changed" signals, reconnecting when it
/// breaks.
async fn forward_events<R: Runtime>(
    runtime: Arc<R>,
    device: String,
    tx: mpsc::Sender<()>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = runtime.events(&device);
        tokio::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                item = stream.next() => match item {
                    Some(Ok(event)) => {
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
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}
