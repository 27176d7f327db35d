//! Offers: whether a deployment from the hub link or the local API is taken. The binding,
//! the version rule (one floor for the device, whatever the source), the policy and the
//! device's requirements decide; an offer the rules allow but the store cannot yet hold is
//! kept and retried with backoff.

use tracing::{debug, info, warn};

use super::{RETRY_BASE_MS, RETRY_CAP_MS, Reconciler};
use crate::clock::BootInstant;
use crate::intake::Accepted;
use crate::manifest::Issue;
use crate::planner;
use crate::policy;
use crate::runtime::Runtime;
use crate::state::{DeploymentReport, DeploymentStatus, Source};
use crate::store::{StoreError, StoredDeployment, source_key};

/// An offer accepted by the rules but not yet stored (the store failed): kept and retried.
pub(super) struct PendingOffer {
    accepted: Accepted,
    source: Source,
    handback: bool,
    attempts: u32,
    pub(super) next_at: u64,
}

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

impl<R: Runtime> Reconciler<R> {
    pub(super) fn offer(
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
                    waiting: None,
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
                waiting: None,
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
            waiting: None,
        };
        let window = BootInstant::now(self.clock.as_ref());
        if let Err(e) = self.store.accept(&stored, &report, &window) {
            return Err(store_failed(accepted, source, e));
        }
        info!(id = %d.id, version = d.version, modules = d.modules.len(), "deployment accepted");
        self.pending = None;
        // Windows and locks may hold its switch (hold.rs); the store holds the same gate.
        self.gate = Some(crate::store::SwitchGate {
            digest: accepted.digest.clone(),
            passed: false,
            lock_since: None,
        });
        self.lock_since = None;
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

    /// Retries storing an offer the store refused, with backoff.
    pub(super) fn retry_pending(&mut self, now: u64) {
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
}
