//! Carrying out a plan: each module's container actions (create, start, stop, remove,
//! restart, switch, rename) run in order in a task of their own, bounded by the action
//! semaphore, with the module busy until they end; failures are counted for backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{Ctx, Reconciler};
use crate::planner::{self, Action, Failure, Plan};
use crate::runtime::spec::container_spec;
use crate::runtime::{ContainerState, Observed, Runtime, RuntimeError};

/// The result of one module's actions, carried out in a task of their own.
pub(super) struct ActionDone {
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

impl<R: Runtime> Reconciler<R> {
    pub(super) fn action_done(&mut self, done: ActionDone) {
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
                    self.verified.remove(image);
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

    /// Hands the plan's actions to tasks: pulls to the pull pool, each module's container
    /// actions to one task in plan order.
    pub(super) fn dispatch(&mut self, plan: &Plan, observed: &[Observed], ctx: &Ctx<'_>) {
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
                    if !spec_module.artifacts.is_empty()
                        && let Some(store) = &self.settings.artifacts
                    {
                        let dir = store.module_dir(&m);
                        if spec_module.runtime == crate::manifest::RuntimeKind::Process {
                            // A process reads the folder where it is, on the host.
                            let var = crate::runtime::spec::ARTIFACTS_ENV;
                            spec.env.retain(|e| !e.starts_with(&format!("{var}=")));
                            spec.env.push(format!("{var}={}", dir.display()));
                        } else {
                            // The folder, not each file: a swapped link shows through a folder
                            // bind, while a file bind would keep the old inode.
                            spec.binds.push(format!(
                                "{}:{}:ro",
                                dir.display(),
                                crate::runtime::spec::ARTIFACTS_MOUNT
                            ));
                        }
                    }
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

    /// Restarts a module's container now (a hub command or `outpost restart`), in a task.
    pub(super) fn restart_module(
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

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
