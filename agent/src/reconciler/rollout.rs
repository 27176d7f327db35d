//! Rollout and rollback: the deployment in force moves from applying to applied once the
//! plan converges, or, when a module cannot be staged or started or the health window runs
//! out, to failed, or back to the last good deployment when it asks for a rollback.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::{info, warn};

use super::{DEFAULT_HEALTHY_WITHIN, Reconciler};
use crate::clock::BootInstant;
use crate::manifest::Issue;
use crate::planner::Plan;
use crate::runtime::Runtime;
use crate::state::{DeploymentStatus, ModuleStatus};
use crate::store::StoredDeployment;

impl<R: Runtime> Reconciler<R> {
    /// Moves the deployment's status along: applied once converged; failed or rolled back
    /// at once when it cannot be staged or started, or at its deadline when it does not get
    /// healthy in time.
    pub(super) fn track_deployment(&mut self, plan: &Plan, now: u64) {
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
                DeploymentStatus::Applying
                    | DeploymentStatus::Failed
                    | DeploymentStatus::Received
                    | DeploymentStatus::Waiting
            ) {
                self.applied(now);
            }
            return;
        }
        // A waiting deployment's rollback window has not started; a definitive staging
        // failure still fails it.
        let waiting = report.status == DeploymentStatus::Waiting;
        if report.status != DeploymentStatus::Applying && !waiting {
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
        if waiting {
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
        report.waiting = None;
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
        report.waiting = None;
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
                // A rollback is never held by a window or a lock.
                self.gate = Some(crate::store::SwitchGate {
                    digest: restored.digest.clone(),
                    passed: true,
                    lock_since: None,
                });
                self.lock_since = None;
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
}
