//! Update windows and update locks: what may hold back the switch of a deployment that was
//! accepted but has not begun switching (docs/reconciler.md#update-windows-and-locks).
//!
//! The gate ([`SwitchGate`], stored) says whether the desired deployment's switch has begun;
//! once it has, nothing holds it again, so a switch is never stopped halfway. Before that,
//! each pass asks: is the device inside an update window (wall clock, local time), unless the
//! deployment is `urgent`; and does a module the switch would replace, stop or remove hold its
//! lock, unless the lock's deadline (monotonic, from when a lock first held this deployment)
//! has passed. The planner keeps what runs as it is while either holds, and staging (pulls,
//! created containers) goes on.
//!
//! Locks are the reconciler's alone, like everything it owns: taken and released through
//! [`Request::Lock`](crate::control::Request::Lock) (the local API, the local bus), kept in
//! `{state_dir}/locks/{module}.json` so an agent restart keeps them, and dropped when the
//! switch replaces or removes the module that held one (the process that took it is gone).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Reconciler;
use crate::clock::BootInstant;
use crate::planner::{Held, Plan};
use crate::runtime::Runtime;
use crate::state::{DeploymentStatus, WaitReason, Waiting};
use crate::store::SwitchGate;
use outpost_core::window::Openness;

/// The longest the reconciler waits before judging a closed window again: the wall clock
/// may be set or jump meanwhile, so the opening is never slept towards as one long wait.
const WINDOW_RECHECK_MS: u64 = 60_000;

/// One module's update lock, as kept in its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleLock {
    /// Unix milliseconds by the wall clock when it was taken, for people.
    pub since_ms: u64,
    /// Who took it: `api` or `bus`.
    pub via: String,
}

/// What holds the switch this pass, as the planner is told it.
pub(super) struct HoldNow {
    pub(super) window_closed: bool,
    /// When the window opens (Unix seconds), when the clock allows saying it.
    opens_at: Option<u64>,
    pub(super) locked: BTreeSet<String>,
    /// When to judge a closed window again (monotonic ms).
    pub(super) recheck_at: Option<u64>,
}

impl<R: Runtime> Reconciler<R> {
    /// What may hold the desired deployment's switch now; `None` once it has begun (or without
    /// a deployment). Arranges the next pass so an opening window or a lock's deadline is seen.
    pub(super) fn hold_now(&self, now: u64) -> Option<HoldNow> {
        let (stored, _) = self.desired.as_ref()?;
        if self.gate.as_ref().is_none_or(|g| g.passed) {
            return None;
        }
        let d = &stored.deployment;
        let maintenance = &self.settings.maintenance;
        let mut recheck_at = None;
        let (window_closed, opens_at) = if d.urgent || maintenance.windows.always_open() {
            (false, None)
        } else if !self.clock.wall_is_plausible() {
            // A clock that was never set (1970 after a boot without RTC or network time)
            // cannot say whether a window is open: closed until it is set.
            recheck_at = Some(now + WINDOW_RECHECK_MS);
            (true, None)
        } else {
            let wall_ms = self.clock.wall_ms();
            let at = jiff::Timestamp::from_millisecond(i64::try_from(wall_ms).unwrap_or(i64::MAX))
                .unwrap_or(jiff::Timestamp::MAX);
            match maintenance.windows.at(at, &maintenance.zone()) {
                Openness::Open { .. } => (false, None),
                Openness::Closed { opens_at } => {
                    let opens_ms = u64::try_from(opens_at.as_millisecond()).unwrap_or(0);
                    let wait = opens_ms.saturating_sub(wall_ms).clamp(1, WINDOW_RECHECK_MS);
                    recheck_at = Some(now + wait);
                    (true, u64::try_from(opens_at.as_second()).ok())
                }
            }
        };
        let deadline = d.update_lock_deadline();
        let expired = self
            .lock_since
            .is_some_and(|since| now >= since + deadline.as_millis() as u64);
        let locked = if expired {
            BTreeSet::new()
        } else {
            self.locks.keys().cloned().collect()
        };
        Some(HoldNow {
            window_closed,
            opens_at,
            locked,
            recheck_at,
        })
    }

    /// After planning with `hold`: reports the deployment waiting (and why), starts a lock's
    /// deadline, or, when nothing held a switch that is under way, passes the gate: the
    /// deployment's routes and agent take effect, and the locks of the modules it replaces are
    /// dropped. Leaving a wait starts the rollback window.
    pub(super) fn after_hold(&mut self, plan: &Plan, hold: Option<&HoldNow>, now: u64) {
        let Some(hold) = hold else {
            return;
        };
        let waiting = match &plan.held {
            Some(Held::Window) => Some(Waiting {
                reason: WaitReason::UpdateWindow,
                message: match hold.opens_at {
                    Some(at) => format!(
                        "waiting for the update window (opens at {})",
                        self.local_time(at)
                    ),
                    None => "waiting for the update window: the device's clock is not set, so no window can be judged".into(),
                },
                opens_at: hold.opens_at,
                modules: Vec::new(),
                deadline: None,
            }),
            Some(Held::Locks(modules)) => {
                let since = match self.lock_since {
                    Some(s) => s,
                    None => {
                        self.lock_since = Some(now);
                        self.save_gate(Some(BootInstant::now(self.clock.as_ref())));
                        now
                    }
                };
                let deadline_ms = self.desired.as_ref().map_or(0, |(s, _)| {
                    since + s.deployment.update_lock_deadline().as_millis() as u64
                });
                self.wake(deadline_ms);
                let deadline = self.wall_secs() + deadline_ms.saturating_sub(now).div_ceil(1000);
                Some(Waiting {
                    reason: WaitReason::UpdateLock,
                    message: format!(
                        "waiting for the update lock of {} (released, or until {})",
                        modules
                            .iter()
                            .map(|m| format!("`{m}`"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        self.local_time(deadline)
                    ),
                    opens_at: None,
                    modules: modules.clone(),
                    deadline: Some(deadline),
                })
            }
            None => None,
        };
        match waiting {
            Some(w) => self.set_waiting(Some(w)),
            None => {
                if self.report_status() == Some(DeploymentStatus::Waiting) {
                    // Left the wait: the rollback window starts now, not at acceptance.
                    self.set_waiting(None);
                }
                // A first deployment creates its containers started (nothing runs that it
                // would switch): its switch is this pass, so its routes must be in place
                // before the first module starts publishing.
                let starts_now = plan
                    .actions
                    .iter()
                    .any(|a| matches!(a, crate::planner::Action::Create { start: true, .. }));
                if plan.staged || plan.converged || starts_now {
                    self.pass_gate(plan);
                }
            }
        }
    }

    /// The switch begins: never held again, even by an agent restarted halfway.
    fn pass_gate(&mut self, plan: &Plan) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        gate.passed = true;
        self.save_gate(None);
        info!(modules = ?plan.changing, "switch begins");
        for module in &plan.changing {
            if self.locks.contains_key(module) {
                warn!(
                    module,
                    "update lock dropped: its deadline passed and the module is replaced"
                );
                self.remove_lock(module);
            }
        }
        self.lock_since = None;
        if let Some((stored, _)) = &self.desired {
            let stored = stored.clone();
            self.switch_extras(&stored);
        }
    }

    fn report_status(&self) -> Option<DeploymentStatus> {
        let (stored, _) = self.desired.as_ref()?;
        self.report
            .as_ref()
            .filter(|r| r.id == stored.deployment.id && r.version == stored.deployment.version)
            .map(|r| r.status)
    }

    /// Moves the report to `waiting` (with why) or back to `applying`; stored when it changes.
    fn set_waiting(&mut self, waiting: Option<Waiting>) {
        if !matches!(
            self.report_status(),
            Some(DeploymentStatus::Applying | DeploymentStatus::Waiting)
        ) {
            return;
        }
        let now = self.clock.mono_ms();
        let wall = self.wall_secs();
        let Some(report) = self.report.as_mut() else {
            return;
        };
        let status = if waiting.is_some() {
            DeploymentStatus::Waiting
        } else {
            DeploymentStatus::Applying
        };
        // The deadline in wall seconds moves with the wall clock: not a change by itself.
        let same = report.status == status
            && report
                .waiting
                .as_ref()
                .map(|w| (w.reason, &w.modules, w.opens_at))
                == waiting.as_ref().map(|w| (w.reason, &w.modules, w.opens_at));
        if same {
            report.waiting = waiting;
            return;
        }
        info!(id = %report.id, version = report.version, status = ?status, why = ?waiting.as_ref().map(|w| &w.message), "deployment waits");
        report.status = status;
        report.waiting = waiting;
        report.updated_at = wall;
        let report = report.clone();
        if let Err(e) = self.store.set_report(&report) {
            self.store_problem("record the waiting status", &e);
        }
        if status == DeploymentStatus::Applying {
            // The wait is over: the rollback window starts now, not at acceptance (a
            // deployment that waited a night is not judged unhealthy at once), and a
            // restarted agent keeps it.
            self.applying_since = now;
            let window = BootInstant::now(self.clock.as_ref());
            if let Err(e) = self.store.set_window(&window) {
                self.store_problem("record when the wait ended", &e);
            }
        }
    }

    fn save_gate(&mut self, lock_since: Option<BootInstant>) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        gate.lock_since = lock_since;
        let gate = gate.clone();
        if let Err(e) = self.store.set_gate(&gate) {
            self.store_problem("record the deployment's gate", &e);
        }
    }

    /// `unix_secs` in the device's zone, for messages.
    fn local_time(&self, unix_secs: u64) -> String {
        jiff::Timestamp::from_second(i64::try_from(unix_secs).unwrap_or(i64::MAX))
            .map(|t| {
                t.to_zoned_datetime(self.settings.maintenance.zone())
                    .strftime("%Y-%m-%d %H:%M:%S %Z")
                    .to_string()
            })
            .unwrap_or_else(|_| unix_secs.to_string())
    }

    /// Takes (`hold`) or releases a module's update lock. A module of the desired deployment
    /// or one running may be locked; releasing a lock not held is fine.
    pub(super) fn lock(&mut self, module: &str, hold: bool, via: &str) -> Result<bool, String> {
        if hold {
            let known = self
                .desired
                .as_ref()
                .is_some_and(|(s, _)| s.deployment.modules.contains_key(module))
                || self.last_observed.iter().any(|o| o.module == module);
            if !known {
                return Err(format!("no module `{module}` on this device"));
            }
            if self.locks.contains_key(module) {
                return Ok(false);
            }
            let lock = ModuleLock {
                since_ms: self.clock.wall_ms(),
                via: via.to_string(),
            };
            if let Some(dir) = &self.settings.locks_dir
                && let Err(e) = write_lock(dir, module, &lock)
            {
                return Err(format!("cannot record the lock: {e}"));
            }
            info!(module, via, "update lock taken");
            self.locks.insert(module.to_string(), lock);
            Ok(true)
        } else {
            if !self.locks.contains_key(module) {
                return Ok(false);
            }
            info!(module, via, "update lock released");
            self.remove_lock(module);
            Ok(true)
        }
    }

    fn remove_lock(&mut self, module: &str) {
        self.locks.remove(module);
        if let Some(dir) = &self.settings.locks_dir {
            let path = dir.join(format!("{module}.json"));
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(module, error = %e, "cannot remove the lock file");
            }
        }
    }

    /// The module locks held, for the reported state.
    pub(super) fn locked_modules(&self) -> Vec<String> {
        self.locks.keys().cloned().collect()
    }
}

/// The gate of `digest` as stored, or a passed one (an agent before gates, or a stored gate
/// of another deployment: never hold what may already be switching).
pub(super) fn gate_of(stored: Option<SwitchGate>, digest: &str) -> SwitchGate {
    stored
        .filter(|g| g.digest == digest)
        .unwrap_or_else(|| SwitchGate {
            digest: digest.to_string(),
            passed: true,
            lock_since: None,
        })
}

/// The locks kept in `dir`; a file that does not decode is skipped with a warning (a lock
/// that cannot be read holds nothing).
pub(super) fn read_locks(dir: &Path) -> BTreeMap<String, ModuleLock> {
    let mut locks = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return locks;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(module) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<ModuleLock>(&b).map_err(|e| e.to_string()))
        {
            Ok(lock) => {
                locks.insert(module.to_string(), lock);
            }
            Err(e) => warn!(path = %path.display(), error = %e, "update lock file ignored"),
        }
    }
    locks
}

fn write_lock(dir: &Path, module: &str, lock: &ModuleLock) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let bytes = serde_json::to_vec(lock).map_err(std::io::Error::other)?;
    crate::fsutil::write_atomic(&dir.join(format!("{module}.json")), &bytes, 0o600)
}
