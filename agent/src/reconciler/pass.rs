//! One reconciliation pass: list the module containers (with a time limit), note exits,
//! check the images and artifacts, judge update windows and locks, ask the planner, link the artifacts, hand the actions out, move the deployment along,
//! publish the state and clean up images. The run loop calls it after each batch of news.

use std::collections::BTreeMap;
use std::time::Duration;

use tracing::warn;

use super::{Ctx, RETRY_BASE_MS, RETRY_CAP_MS, Reconciler};
use crate::planner::{self, Exit, World};
use crate::runtime::{ContainerState, Observed, Runtime};

/// The longest a container listing may take before the pass gives up and retries.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);

impl<R: Runtime> Reconciler<R> {
    /// One reconciliation pass: list, plan, hand the actions out, track the deployment.
    pub(super) async fn pass(&mut self, ctx: &Ctx<'_>) {
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
        self.check_artifacts();
        let hold = self.hold_now(now);
        // Only a held switch asks which modules' links it would swap.
        let relinks = match (&hold, &self.settings.artifacts, &self.desired) {
            (Some(_), Some(store), Some((stored, _))) => store.pending_swaps(&stored.deployment),
            _ => Default::default(),
        };
        let mut plan = planner::plan(&World {
            device: &self.settings.device,
            desired: self.desired.as_ref().map(|(_, d)| d),
            observed: &observed,
            images: &self.images,
            pulling: &self.pulling,
            pulled: &self.pulled,
            pull_failures: &self.pull_failures,
            artifacts: &self.artifact_waits,
            start_failures: &self.failures,
            history: &self.history,
            exits: &self.exits,
            busy: &self.busy,
            now,
            hold: hold.as_ref().map(|h| planner::Hold {
                window_closed: h.window_closed,
                locked: &h.locked,
                relinks: &relinks,
            }),
        });
        self.wake_at = plan.wake_at;
        // A closed window is judged again soon, whatever the wall clock does meanwhile.
        if let Some(at) = hold.as_ref().and_then(|h| h.recheck_at) {
            self.wake(at);
        }
        if let Some(p) = &self.pending {
            self.wake(p.next_at);
        }
        self.after_hold(&plan, hold.as_ref(), now);
        // Before any container is created: a new module's folder must hold its links.
        self.link_artifacts(&mut plan);
        self.dispatch(&plan, &observed, ctx);
        self.track_deployment(&plan, now);
        self.last_observed = observed;
        self.publish(Some(&plan));
        // A pass that reached the engine and handed out its plan: what an agent on trial
        // must have done once.
        if let Some(passes) = &self.settings.passes {
            passes.send_modify(|n| *n += 1);
        }
        self.collect_images(now).await;
        self.collect_artifacts();
    }

    /// Notes exits on the monotonic clock: backoff counts from when the agent saw an exit,
    /// never from the engine's timestamps.
    fn see_exits(&mut self, observed: &[Observed], now: u64) {
        // Exits found at the first look count as the reboot's only after one.
        let first = std::mem::replace(&mut self.first_look, false) && self.settings.after_reboot;
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
}
