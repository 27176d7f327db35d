//! Keeping a module's container alive: its restart policy, the backoff between restarts and
//! failed starts (on the monotonic clock), and when a run counts as healthy.

use crate::container::{ContainerState, Health, Observed};
use crate::manifest::RestartPolicy;
use crate::state::ModuleStatus;

use super::Keep;
use super::types::{Action, ModuleHistory, Plan, World};

/// Restart backoff cap.
pub const BACKOFF_CAP_MS: u64 = 300_000;
/// A run at least this long resets the backoff: the module was healthy, the next failure is new.
pub const HEALTHY_RUN_MS: u64 = 60_000;
/// Consecutive failures after which a module is reported as crash-looping.
pub const CRASH_LOOP_AFTER: u32 = 5;
/// First retry of a failed pull, doubling to the same cap as restarts.
pub const PULL_RETRY_BASE_MS: u64 = 2_000;

/// Delay before the next restart after `failures` consecutive short runs: 0 (the first restart
/// is immediate), then 1 s, 2 s, 4 s, … capped at 5 minutes.
pub fn backoff_delay(failures: u32) -> u64 {
    match failures {
        0 => 0,
        n => crate::backoff::exponential_ms(1_000, n, BACKOFF_CAP_MS),
    }
}

/// Delay before retrying something that failed `attempts` times, starting at `base`.
pub fn retry_delay(base: u64, attempts: u32) -> u64 {
    crate::backoff::exponential_ms(base, attempts, BACKOFF_CAP_MS)
}

/// The wait before the next create or start of a module that failed to start; reports it.
pub(super) fn start_backoff(world: &World<'_>, plan: &mut Plan, name: &str) -> Option<u64> {
    let f = world.start_failures.get(name)?;
    let due = f.at + backoff_delay(f.attempts);
    let problem = format!(
        "{}: {} attempt{} in a row; the engine said: {}",
        if f.definitive {
            "start-failing"
        } else {
            "failing"
        },
        f.attempts,
        if f.attempts == 1 { "" } else { "s" },
        f.message
    );
    if due > world.now {
        plan.fail(name, problem, f.definitive);
        return Some(due);
    }
    plan.fail(name, problem, f.definitive);
    None
}

/// Keeps one container going by its policy: starts it when created (in startup order),
/// restarts it after its backoff when it exited, restarts it when unhealthy under
/// `on-unhealthy`. Returns whether it is up (or done by its policy).
pub(super) fn keep_alive(
    world: &World<'_>,
    plan: &mut Plan,
    name: &str,
    c: &Observed,
    keep: Keep,
    may_start: bool,
) -> bool {
    let history = world.history.get(name).cloned().unwrap_or_default();
    match c.state {
        ContainerState::Running => {
            if c.health == Health::Unhealthy && keep.policy == RestartPolicy::OnUnhealthy {
                restart_after_backoff(world, plan, name, c, &history, true);
                return false;
            }
            let health = match c.health {
                Health::Unhealthy => Some("its health check reports unhealthy".to_string()),
                Health::Starting => Some("its health check has not passed yet".to_string()),
                Health::None | Health::Healthy => None,
            };
            plan.set(name, ModuleStatus::Running, health);
            // Running is what the next group waits for; health is what `applied` waits for.
            // (An unhealthy module under `always` must not hold back later groups forever.)
            true
        }
        ContainerState::Restarting => {
            plan.set(name, ModuleStatus::Running, None);
            true
        }
        ContainerState::Created => {
            if !may_start {
                plan.set(name, ModuleStatus::Created, None);
                return false;
            }
            if let Some(wait) = start_backoff(world, plan, name) {
                plan.wake(wait);
                return false;
            }
            plan.actions.push(Action::Start {
                id: c.id.clone(),
                module: name.to_string(),
                restart: false,
            });
            if !world.start_failures.contains_key(name) {
                plan.set(name, ModuleStatus::Created, None);
            }
            false
        }
        ContainerState::Exited | ContainerState::Dead => {
            let exit = world.exits.get(&c.id);
            if exit.is_some_and(|e| e.before_agent) {
                // Stopped by a reboot or while the agent was away: bring it back as it was,
                // in startup order, without counting a restart.
                if may_start {
                    plan.actions.push(Action::Start {
                        id: c.id.clone(),
                        module: name.to_string(),
                        restart: false,
                    });
                }
                plan.set(name, ModuleStatus::Created, None);
                return false;
            }
            let failed = c.exit_code.is_some_and(|code| code != 0) || c.oom_killed;
            let by_policy = match keep.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure | RestartPolicy::OnUnhealthy => failed,
                RestartPolicy::Never => false,
            };
            if by_policy {
                restart_after_backoff(world, plan, name, c, &history, false);
                false
            } else {
                plan.set(name, ModuleStatus::Exited, None);
                // It ran and, by its policy, is done: later groups must not wait for it
                // forever (found by the simulation below).
                true
            }
        }
        ContainerState::Paused | ContainerState::Removing | ContainerState::Unknown => {
            plan.set(name, ModuleStatus::Unknown, None);
            false
        }
    }
}

/// Consecutive failures that count for the backoff of a container that just ended a run.
/// The run's length is the engine's `FinishedAt − StartedAt`: both from one clock, read within
/// one run, so a wrong clock shifts both.
pub fn failures_after(history: &ModuleHistory, c: &Observed) -> u32 {
    let ran_ms = match (c.started_at, c.finished_at) {
        (Some(s), Some(f)) if f >= s => (f - s) * 1000,
        _ => 0,
    };
    if ran_ms >= HEALTHY_RUN_MS {
        0
    } else {
        history.failures
    }
}

fn restart_after_backoff(
    world: &World<'_>,
    plan: &mut Plan,
    name: &str,
    c: &Observed,
    history: &ModuleHistory,
    running: bool,
) {
    let failures = failures_after(history, c);
    // From when this agent saw the exit (monotonic), never from the engine's wall clock.
    let since = if running {
        world.now
    } else {
        world.exits.get(&c.id).map_or(world.now, |e| e.seen_at)
    };
    let due = since + backoff_delay(failures);
    let problem = (failures >= CRASH_LOOP_AFTER).then(|| {
        format!(
            "crash-looping: {failures} short runs in a row (last exit code {}); retried every {} s at most",
            c.exit_code.map_or("none".to_string(), |e| e.to_string()),
            backoff_delay(failures).div_ceil(1000)
        )
    });
    if due > world.now {
        plan.wake(due);
        plan.set(name, ModuleStatus::Backoff, problem);
        return;
    }
    plan.actions.push(if running {
        Action::Restart {
            id: c.id.clone(),
            module: name.to_string(),
        }
    } else {
        Action::Start {
            id: c.id.clone(),
            module: name.to_string(),
            restart: true,
        }
    });
    plan.set(name, ModuleStatus::Backoff, problem);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let delays: Vec<u64> = (0..12).map(backoff_delay).collect();
        assert_eq!(
            delays,
            [
                0, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000
            ]
        );
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_CAP_MS);
        assert_eq!(retry_delay(2_000, 1), 2_000);
        assert_eq!(retry_delay(2_000, 3), 8_000);
        assert_eq!(retry_delay(2_000, 400), BACKOFF_CAP_MS);
    }
}
