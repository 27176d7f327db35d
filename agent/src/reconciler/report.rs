//! Reporting: the reported state (deployment, modules, conditions) published on a `watch`
//! when it changes, and module logs read for the local API and the hub with the module's
//! secrets redacted.

use std::collections::BTreeMap;

use futures_util::StreamExt as _;
use tokio::sync::oneshot;

use super::{Ctx, Reconciler};
use crate::planner::Plan;
use crate::runtime::spec::container_name;
use crate::runtime::{ContainerState, LogOptions, Runtime, RuntimeError};
use crate::state::{AgentFacts, Condition, DeploymentRef, ModuleReport, ReportedState};

/// What a module killed by the kernel for its memory limit reports: the exit code alone
/// (137) does not tell it from a `kill -9`.
const OOM_KILLED: &str = "ended by the kernel: out of memory (past its memory limit)";

impl<R: Runtime> Reconciler<R> {
    /// Publishes the reported state if it changed.
    pub(super) fn publish(&self, plan: Option<&Plan>) {
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
                            platform: c
                                .and_then(|c| self.image_platforms.get(&c.image_id).cloned()),
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
                                .or_else(|| self.errors.get(name).cloned())
                                .or_else(|| {
                                    c.filter(|c| c.oom_killed && c.state != ContainerState::Running)
                                        .map(|_| OOM_KILLED.to_string())
                                }),
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
        if let Some(rx) = &self.settings.agent_status {
            let status = rx.borrow();
            agent.slot = Some(status.slot.name().to_string());
            agent.update = status.update.clone();
        }
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
        let locked = self.locked_modules();
        if !locked.is_empty() {
            out.push(Condition {
                kind: "update-locks".into(),
                message: format!(
                    "modules holding their update lock (a deployment that would replace them waits): {}",
                    locked.join(", ")
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

    /// A module's newest log lines, read in a task so a large read never holds the reconciler.
    pub(super) fn logs(
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
    pub(super) fn secrets_of(&self, module: &str) -> Vec<String> {
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
