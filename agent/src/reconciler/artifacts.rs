//! The modules' artifacts in a pass: before planning, the store says what each module still
//! waits for (and starts the fetches missing), which the planner stages like a missing image;
//! after planning, each module's folder of links is brought in line, swapping a new digest in
//! only once the whole deployment is staged; after the deployment moves on, what neither the
//! desired nor the last good deployment names is collected.

use std::collections::BTreeMap;

use tracing::warn;

use super::Reconciler;
use crate::planner::{ArtifactWait, ModulePlan, Plan};
use crate::runtime::Runtime;
use crate::state::ModuleStatus;

/// The deployments artifacts were collected for: the desired one and the last good one, by
/// id and version.
pub(super) type Kept = (Option<(String, u64)>, Option<(String, u64)>);

/// How soon a link that could not be made is tried again.
const LINK_RETRY_MS: u64 = 5_000;

impl<R: Runtime> Reconciler<R> {
    /// Where the desired deployment's artifacts stand, per module, for the planner.
    pub(super) fn check_artifacts(&mut self) {
        self.artifact_waits.clear();
        self.fetch_waiting.clear();
        let Some((stored, _)) = &self.desired else {
            return;
        };
        let d = &stored.deployment;
        let mut waits = match &self.settings.artifacts {
            Some(store) => store.ensure(d),
            None => d
                .modules
                .iter()
                .filter(|(_, m)| !m.artifacts.is_empty())
                .map(|(name, _)| {
                    (
                        name.clone(),
                        ArtifactWait::Failed {
                            message: "this agent runs without an artifact store".into(),
                            definitive: true,
                        },
                    )
                })
                .collect(),
        };
        self.fetch_waiting = waits.keys().cloned().collect();
        for (module, error) in &self.link_errors {
            waits
                .entry(module.clone())
                .or_insert_with(|| ArtifactWait::Failed {
                    message: error.clone(),
                    definitive: false,
                });
        }
        self.artifact_waits = waits;
    }

    /// Brings every desired module's folder of links in line with the deployment: names not
    /// linked yet at once, new digests (and names dropped) only when `plan.staged`. A module
    /// still waiting for an artifact keeps its folder as it is. A link that cannot be made
    /// fails the module in this plan (retried shortly) rather than letting it converge.
    pub(super) fn link_artifacts(&mut self, plan: &mut Plan) {
        let (Some(store), Some((stored, _))) = (&self.settings.artifacts, &self.desired) else {
            return;
        };
        let mut errors = BTreeMap::new();
        for module in stored.deployment.modules.keys() {
            if self.fetch_waiting.contains(module) {
                continue;
            }
            if let Err(e) = store.link(module, &stored.deployment, plan.staged) {
                warn!(module, error = %e, "cannot link the module's artifacts; retrying");
                let message = format!("cannot link its artifacts: {e}");
                plan.modules.insert(
                    module.clone(),
                    ModulePlan {
                        status: ModuleStatus::Failed,
                        problem: Some(message.clone()),
                        definitive: false,
                    },
                );
                plan.converged = false;
                errors.insert(module.clone(), message);
            }
        }
        if !errors.is_empty() {
            self.wake(self.clock.mono_ms() + LINK_RETRY_MS);
        }
        self.link_errors = errors;
    }

    /// Removes the artifacts neither the desired nor the last good deployment names, when
    /// either changed since the last time (or image cleanup is due). Without a deployment
    /// nothing is removed, as with containers.
    pub(super) fn collect_artifacts(&mut self) {
        let (Some(store), Some((desired, _))) = (&self.settings.artifacts, &self.desired) else {
            return;
        };
        let key = (
            Some((desired.deployment.id.clone(), desired.deployment.version)),
            self.last_good
                .as_ref()
                .map(|g| (g.deployment.id.clone(), g.deployment.version)),
        );
        if self.artifacts_collected_for.as_ref() == Some(&key) {
            return;
        }
        let keep = std::iter::once(&desired.deployment)
            .chain(self.last_good.as_ref().map(|g| &g.deployment));
        match store.collect(keep) {
            Ok(_) => self.artifacts_collected_for = Some(key),
            Err(e) => warn!(error = %e, "cannot clean up artifacts"),
        }
    }
}
