//! The planner: a pure function from what should be (the desired deployment), what is (the
//! engine's containers, the images present, pulls under way), what happened (restart history)
//! and the time, to the ordered actions that move the device toward the desired state.
//!
//! It does no I/O, so every rule is tested case by case and by simulation. Rules:
//! - only containers labelled as Outpost's for this device are considered; others do not exist;
//! - containers of modules no longer desired are removed; duplicates of a module are removed;
//! - a container whose config hash differs from its module's is replaced (only that module);
//! - modules start by `startupOrder` groups: a group starts when every lower group's modules
//!   are running (or have run and, by their restart policy, stay exited);
//! - desired `stopped` stops a running container;
//! - exited containers restart by their policy after the backoff of [`backoff_delay`]; the
//!   planner never gives up: a crash-looping module keeps being retried at the capped interval;
//! - missing images are pulled (all at once; the executor bounds concurrency) and a pull never
//!   holds back a restart of another module.

use std::collections::{BTreeMap, BTreeSet};

use crate::manifest::{Deployment, DesiredStatus, Module, PullPolicy, RestartPolicy};
use crate::runtime::{ContainerState, Health, Observed, labels};
use crate::state::ModuleStatus;

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
        n => 1_000u64
            .saturating_mul(1u64 << (n - 1).min(20))
            .min(BACKOFF_CAP_MS),
    }
}

/// What the agent remembers of a module between passes (kept in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModuleHistory {
    /// Consecutive short runs that ended in an exit the policy restarts.
    pub failures: u32,
    /// Restarts the agent has made, for reporting.
    pub restarts: u32,
}

/// A pull that failed, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullFailure {
    pub attempts: u32,
    /// Unix milliseconds.
    pub at: u64,
    pub message: String,
}

/// The desired deployment with each module's config hash computed.
#[derive(Debug, Clone)]
pub struct Desired {
    pub deployment: Deployment,
    pub hashes: BTreeMap<String, String>,
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct World<'a> {
    pub device: &'a str,
    pub desired: Option<&'a Desired>,
    pub observed: &'a [Observed],
    /// Image references present on the engine.
    pub images: &'a BTreeSet<String>,
    pub pulling: &'a BTreeSet<String>,
    /// Images pulled by this agent since it started (for the `always` pull policy).
    pub pulled: &'a BTreeSet<String>,
    pub pull_failures: &'a BTreeMap<String, PullFailure>,
    pub history: &'a BTreeMap<String, ModuleHistory>,
    /// Unix milliseconds.
    pub now: u64,
    /// Unix milliseconds when this agent process started: containers that exited before it
    /// (a reboot, the agent's own restart) are started again whatever their policy.
    pub agent_started: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop (if running) and remove a container.
    Remove {
        id: String,
        module: String,
    },
    Stop {
        id: String,
        module: String,
    },
    Pull {
        module: String,
        image: String,
    },
    /// Create the module's container from the desired deployment, and start it.
    Create {
        module: String,
    },
    /// Start an existing container. `restart` counts it against the module's backoff.
    Start {
        id: String,
        module: String,
        restart: bool,
    },
    /// Stop and start a running container (unhealthy under `on-unhealthy`).
    Restart {
        id: String,
        module: String,
    },
}

impl Action {
    pub fn module(&self) -> &str {
        match self {
            Action::Remove { module, .. }
            | Action::Stop { module, .. }
            | Action::Pull { module, .. }
            | Action::Create { module }
            | Action::Start { module, .. }
            | Action::Restart { module, .. } => module,
        }
    }
}

/// How one module stands after this pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModulePlan {
    pub status: ModuleStatus,
    /// Set when the module cannot be brought up or keeps failing.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// The earliest time (Unix ms) a new pass is due even without events (backoffs).
    pub wake_at: Option<u64>,
    pub modules: BTreeMap<String, ModulePlan>,
    /// Every module is in its desired status and nothing is left to do.
    pub converged: bool,
}

impl Plan {
    fn wake(&mut self, at: u64) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
    fn set(&mut self, module: &str, status: ModuleStatus, problem: Option<String>) {
        self.modules
            .insert(module.to_string(), ModulePlan { status, problem });
    }
}

fn is_ours(o: &Observed, device: &str) -> bool {
    o.labels.get(labels::MANAGED).is_some_and(|v| v == "true")
        && o.labels.get(labels::DEVICE).is_some_and(|d| d == device)
        && !o.module.is_empty()
}

fn is_up(o: &Observed) -> bool {
    matches!(
        o.state,
        ContainerState::Running | ContainerState::Restarting
    )
}

/// Computes the next actions. Pure: same world, same plan.
pub fn plan(world: &World<'_>) -> Plan {
    let mut plan = Plan::default();
    let empty = BTreeMap::new();
    let modules = world.desired.map_or(&empty, |d| &d.deployment.modules);

    // Containers by module, only ours.
    let mut by_module: BTreeMap<&str, Vec<&Observed>> = BTreeMap::new();
    for o in world.observed.iter().filter(|o| is_ours(o, world.device)) {
        by_module.entry(o.module.as_str()).or_default().push(o);
    }

    // Keep at most one container per desired module: the one matching its hash, running first.
    let mut kept: BTreeMap<&str, &Observed> = BTreeMap::new();
    for (module, containers) in &by_module {
        let hash = world.desired.and_then(|d| d.hashes.get(*module));
        let keep = hash.and_then(|h| {
            containers
                .iter()
                .filter(|c| &c.config_hash == h)
                .max_by_key(|c| (is_up(c), c.started_at, c.id.as_str()))
        });
        for c in containers {
            if keep.is_some_and(|k| k.id == c.id) {
                continue;
            }
            plan.actions.push(Action::Remove {
                id: c.id.clone(),
                module: module.to_string(),
            });
        }
        if let Some(k) = keep {
            kept.insert(module, k);
        }
    }

    // Startup groups, lowest first.
    let mut groups: BTreeMap<u32, Vec<(&String, &Module)>> = BTreeMap::new();
    for (name, m) in modules {
        groups.entry(m.startup_order).or_default().push((name, m));
    }
    let mut lower_groups_up = true;
    for members in groups.values() {
        let mut group_up = true;
        for (name, m) in members {
            let up = module_pass(
                world,
                &mut plan,
                name,
                m,
                kept.get(name.as_str()).copied(),
                lower_groups_up,
            );
            group_up &= up || m.status == DesiredStatus::Stopped;
        }
        lower_groups_up &= group_up;
    }

    plan.converged = plan.actions.is_empty()
        && plan.wake_at.is_none()
        && modules
            .iter()
            .all(|(name, m)| match (m.status, kept.get(name.as_str())) {
                // With a health check, only `healthy` counts: `starting` is not there yet.
                (DesiredStatus::Running, Some(c)) => {
                    c.state == ContainerState::Running
                        && matches!(c.health, Health::None | Health::Healthy)
                }
                (DesiredStatus::Running, None) => false,
                (DesiredStatus::Stopped, c) => c.is_none_or(|c| !is_up(c)),
            });
    plan
}

/// Plans one module; returns whether it is running (what later startup groups wait for).
fn module_pass(
    world: &World<'_>,
    plan: &mut Plan,
    name: &str,
    m: &Module,
    container: Option<&Observed>,
    may_start: bool,
) -> bool {
    let history = world.history.get(name).cloned().unwrap_or_default();
    if m.status == DesiredStatus::Stopped {
        if let Some(c) = container
            && is_up(c)
        {
            plan.actions.push(Action::Stop {
                id: c.id.clone(),
                module: name.to_string(),
            });
        }
        plan.set(name, ModuleStatus::Stopped, None);
        return false;
    }

    let Some(c) = container else {
        // No container: it needs its image, then a create.
        // `always` wants a pull by this agent before each new container.
        let fresh_enough =
            m.image_pull_policy != PullPolicy::Always || world.pulled.contains(&m.image);
        let present = world.images.contains(&m.image) && fresh_enough;
        if present {
            if may_start {
                plan.actions.push(Action::Create {
                    module: name.to_string(),
                });
            }
            plan.set(name, ModuleStatus::Created, None);
            return false;
        }
        if m.image_pull_policy == PullPolicy::Never {
            plan.set(
                name,
                ModuleStatus::Failed,
                Some(format!(
                    "image {} is not on the device and the pull policy is `never`",
                    m.image
                )),
            );
            return false;
        }
        if world.pulling.contains(&m.image) {
            plan.set(name, ModuleStatus::Pulling, None);
            return false;
        }
        if let Some(f) = world.pull_failures.get(&m.image) {
            let retry_at = f.at
                + PULL_RETRY_BASE_MS
                    .saturating_mul(1 << f.attempts.saturating_sub(1).min(20))
                    .min(BACKOFF_CAP_MS);
            if retry_at > world.now {
                plan.wake(retry_at);
                plan.set(
                    name,
                    ModuleStatus::Failed,
                    Some(format!(
                        "{} (attempt {}, retrying in {} s)",
                        f.message,
                        f.attempts,
                        (retry_at - world.now).div_ceil(1000)
                    )),
                );
                return false;
            }
        }
        // Pulls are not gated by startup order: images arrive early, starts stay in order.
        if !plan
            .actions
            .iter()
            .any(|a| matches!(a, Action::Pull { image, .. } if image == &m.image))
        {
            plan.actions.push(Action::Pull {
                module: name.to_string(),
                image: m.image.clone(),
            });
        }
        plan.set(name, ModuleStatus::Pulling, None);
        return false;
    };

    match c.state {
        ContainerState::Running => {
            if c.health == Health::Unhealthy && m.restart_policy == RestartPolicy::OnUnhealthy {
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
            if may_start {
                plan.actions.push(Action::Start {
                    id: c.id.clone(),
                    module: name.to_string(),
                    restart: false,
                });
            }
            plan.set(name, ModuleStatus::Created, None);
            false
        }
        ContainerState::Exited | ContainerState::Dead => {
            let failed = c.exit_code.is_some_and(|code| code != 0) || c.oom_killed;
            let exited_before_agent = c.finished_at.is_none_or(|f| f * 1000 < world.agent_started);
            let by_policy = match m.restart_policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure | RestartPolicy::OnUnhealthy => failed,
                RestartPolicy::Never => false,
            };
            if exited_before_agent && may_start {
                // Stopped by a reboot or while the agent was away: bring it back as it was.
                plan.actions.push(Action::Start {
                    id: c.id.clone(),
                    module: name.to_string(),
                    restart: false,
                });
                plan.set(name, ModuleStatus::Created, None);
            } else if by_policy {
                restart_after_backoff(world, plan, name, c, &history, false);
            } else {
                plan.set(name, ModuleStatus::Exited, None);
                // It ran and, by its policy, is done: later groups must not wait for it
                // forever (found by the simulation below).
                return true;
            }
            false
        }
        ContainerState::Paused | ContainerState::Removing | ContainerState::Unknown => {
            plan.set(name, ModuleStatus::Unknown, None);
            false
        }
    }
}

/// Consecutive failures that count for the backoff of a container that just ended a run.
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
    let since = c.finished_at.map_or(world.now, |f| f * 1000);
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
    use crate::runtime::spec::config_hash;
    use proptest::prelude::*;

    const DEV: &str = "dev1";
    const T0: u64 = 1_800_000_000_000;

    fn desired(json: &str) -> Desired {
        let deployment: Deployment = serde_json::from_str(json).unwrap();
        let hashes = deployment
            .modules
            .iter()
            .map(|(n, m)| (n.clone(), config_hash(m, &BTreeMap::new())))
            .collect();
        Desired { deployment, hashes }
    }

    fn three() -> Desired {
        desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{
            "db":{"image":"r.io/db:1","startupOrder":0},
            "api":{"image":"r.io/api:1","startupOrder":10},
            "ui":{"image":"r.io/ui:1","startupOrder":20}}}"#,
        )
    }

    fn container(d: &Desired, module: &str, state: ContainerState) -> Observed {
        let mut labels = BTreeMap::new();
        labels.insert(labels::MANAGED.to_string(), "true".to_string());
        labels.insert(labels::DEVICE.to_string(), DEV.to_string());
        labels.insert(labels::MODULE.to_string(), module.to_string());
        Observed {
            id: format!("id-{module}"),
            name: format!("outpost.{DEV}.{module}"),
            module: module.to_string(),
            config_hash: d.hashes.get(module).cloned().unwrap_or_default(),
            state,
            health: Health::None,
            exit_code: None,
            oom_killed: false,
            started_at: Some(T0 / 1000 - 100),
            finished_at: None,
            image: String::new(),
            image_id: String::new(),
            labels,
        }
    }

    fn exited(d: &Desired, module: &str, code: i64, ran_secs: u64, ago_ms: u64) -> Observed {
        let mut c = container(d, module, ContainerState::Exited);
        let finished = (T0 - ago_ms) / 1000;
        c.exit_code = Some(code);
        c.finished_at = Some(finished);
        c.started_at = Some(finished - ran_secs);
        c
    }

    struct Fixture {
        images: BTreeSet<String>,
        none: BTreeSet<String>,
        failures: BTreeMap<String, PullFailure>,
        history: BTreeMap<String, ModuleHistory>,
    }

    impl Fixture {
        fn new(d: &Desired) -> Fixture {
            Fixture {
                images: d
                    .deployment
                    .modules
                    .values()
                    .map(|m| m.image.clone())
                    .collect(),
                none: BTreeSet::new(),
                failures: BTreeMap::new(),
                history: BTreeMap::new(),
            }
        }
        fn world<'a>(&'a self, d: Option<&'a Desired>, observed: &'a [Observed]) -> World<'a> {
            World {
                device: DEV,
                desired: d,
                observed,
                images: &self.images,
                pulling: &self.none,
                pulled: &self.none,
                pull_failures: &self.failures,
                history: &self.history,
                now: T0,
                agent_started: T0 - 3_600_000,
            }
        }
    }

    #[test]
    fn groups_start_in_order() {
        let d = three();
        let f = Fixture::new(&d);
        let p = plan(&f.world(Some(&d), &[]));
        assert_eq!(
            p.actions,
            [Action::Create {
                module: "db".into()
            }]
        );
        let observed = [container(&d, "db", ContainerState::Running)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [Action::Create {
                module: "api".into()
            }]
        );
        let observed = [
            container(&d, "db", ContainerState::Running),
            container(&d, "api", ContainerState::Running),
            container(&d, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.is_empty() && p.converged);
    }

    #[test]
    fn a_changed_module_is_replaced_and_only_it() {
        let d = three();
        let f = Fixture::new(&d);
        let mut api = container(&d, "api", ContainerState::Running);
        api.config_hash = "old".into();
        let observed = [
            container(&d, "db", ContainerState::Running),
            api,
            container(&d, "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [
                Action::Remove {
                    id: "id-api".into(),
                    module: "api".into()
                },
                Action::Create {
                    module: "api".into()
                }
            ]
        );
    }

    #[test]
    fn undesired_modules_are_removed_and_stopped_ones_stopped() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":2,"modules":{
            "db":{"image":"r.io/db:1","status":"stopped"}}}"#,
        );
        let f = Fixture::new(&d);
        let observed = [
            container(&d, "db", ContainerState::Running),
            container(&three(), "ui", ContainerState::Running),
        ];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [
                Action::Remove {
                    id: "id-ui".into(),
                    module: "ui".into()
                },
                Action::Stop {
                    id: "id-db".into(),
                    module: "db".into()
                }
            ]
        );
    }

    #[test]
    fn foreign_containers_are_invisible() {
        let d = three();
        let f = Fixture::new(&d);
        let mut other = container(&d, "db", ContainerState::Exited);
        other
            .labels
            .insert(labels::DEVICE.into(), "someone-else".into());
        let mut unlabelled = container(&d, "x", ContainerState::Running);
        unlabelled.labels.clear();
        let observed = [other, unlabelled];
        let p = plan(&f.world(None, &observed));
        assert!(p.actions.is_empty());
    }

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
    }

    #[test]
    fn a_crash_is_restarted_after_its_backoff_and_never_given_up() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        // First exit: immediate restart.
        let observed = [exited(&d, "a", 1, 2, 0)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-a".into(),
                module: "a".into(),
                restart: true
            }]
        );
        // After 3 short runs: 4 s backoff from the exit.
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 3,
                restarts: 3,
            },
        );
        let observed = [exited(&d, "a", 1, 2, 1_000)];
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(T0 - 1_000 + 4_000));
        assert_eq!(p.modules["a"].status, ModuleStatus::Backoff);
        // Crash-looping for hours: still retried at the cap, and reported.
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 500,
                restarts: 500,
            },
        );
        let observed = [exited(&d, "a", 1, 2, BACKOFF_CAP_MS)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1);
        assert!(
            p.modules["a"]
                .problem
                .as_deref()
                .unwrap()
                .contains("crash-looping")
        );
    }

    #[test]
    fn a_healthy_run_resets_the_backoff() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.history.insert(
            "a".into(),
            ModuleHistory {
                failures: 8,
                restarts: 8,
            },
        );
        let observed = [exited(&d, "a", 1, 3_600, 0)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(p.actions.len(), 1, "a run of an hour restarts at once");
    }

    #[test]
    fn restart_policies() {
        for (policy, code, restarts) in [
            ("always", 0, true),
            ("always", 3, true),
            ("on-failure", 0, false),
            ("on-failure", 3, true),
            ("on-unhealthy", 3, true),
            ("never", 3, false),
            ("never", 0, false),
        ] {
            let d = desired(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{"a":{{"image":"r.io/a:1","restartPolicy":"{policy}"}}}}}}"#
            ));
            let f = Fixture::new(&d);
            let observed = [exited(&d, "a", code, 2, 0)];
            let p = plan(&f.world(Some(&d), &observed));
            assert_eq!(!p.actions.is_empty(), restarts, "{policy} exit {code}");
            if !restarts {
                assert_eq!(p.modules["a"].status, ModuleStatus::Exited);
            }
        }
    }

    #[test]
    fn containers_stopped_before_the_agent_started_come_back() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1","restartPolicy":"never"}}}"#,
        );
        let f = Fixture::new(&d);
        // Exited two hours ago, before this agent process (started an hour ago): a reboot.
        let observed = [exited(&d, "a", 0, 500, 7_200_000)];
        let p = plan(&f.world(Some(&d), &observed));
        assert_eq!(
            p.actions,
            [Action::Start {
                id: "id-a".into(),
                module: "a".into(),
                restart: false
            }]
        );
    }

    #[test]
    fn unhealthy_restarts_only_under_on_unhealthy() {
        for (policy, restarts) in [("on-unhealthy", true), ("always", false)] {
            let d = desired(&format!(
                r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{"a":{{"image":"r.io/a:1","restartPolicy":"{policy}"}}}}}}"#
            ));
            let f = Fixture::new(&d);
            let mut c = container(&d, "a", ContainerState::Running);
            c.health = Health::Unhealthy;
            let observed = [c];
            let p = plan(&f.world(Some(&d), &observed));
            assert_eq!(
                p.actions
                    .iter()
                    .any(|a| matches!(a, Action::Restart { .. })),
                restarts,
                "{policy}"
            );
            assert!(!p.converged);
        }
    }

    #[test]
    fn pulls_never_hold_back_other_restarts() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{
            "a":{"image":"r.io/a:1"},"b":{"image":"r.io/b:2"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.images.remove("r.io/b:2");
        let observed = [exited(&d, "a", 1, 2, 0)];
        let p = plan(&f.world(Some(&d), &observed));
        assert!(p.actions.contains(&Action::Pull {
            module: "b".into(),
            image: "r.io/b:2".into()
        }));
        assert!(p.actions.contains(&Action::Start {
            id: "id-a".into(),
            module: "a".into(),
            restart: true
        }));
        // While b's pull runs, a's restart is still planned and b shows as pulling.
        let pulling: BTreeSet<String> = ["r.io/b:2".to_string()].into();
        let mut w = f.world(Some(&d), &observed);
        w.pulling = &pulling;
        let p = plan(&w);
        assert_eq!(p.actions.len(), 1);
        assert_eq!(p.modules["b"].status, ModuleStatus::Pulling);
    }

    #[test]
    fn a_failed_pull_waits_and_says_why() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.images.clear();
        f.failures.insert(
            "r.io/a:1".into(),
            PullFailure {
                attempts: 2,
                at: T0 - 1_000,
                message: "pull of r.io/a:1 failed: 401".into(),
            },
        );
        let p = plan(&f.world(Some(&d), &[]));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(T0 - 1_000 + 4_000));
        assert_eq!(p.modules["a"].status, ModuleStatus::Failed);
        assert!(p.modules["a"].problem.as_deref().unwrap().contains("401"));
    }

    #[test]
    fn pull_policy_never_reports_a_missing_image() {
        let d = desired(
            r#"{"schemaVersion":"1.0","id":"d","version":1,"modules":{"a":{"image":"r.io/a:1","imagePullPolicy":"never"}}}"#,
        );
        let mut f = Fixture::new(&d);
        f.images.clear();
        let p = plan(&f.world(Some(&d), &[]));
        assert!(p.actions.is_empty());
        assert_eq!(p.modules["a"].status, ModuleStatus::Failed);
    }

    // ----- simulation -----

    /// A simulated engine: carries out actions the way Docker would.
    struct Engine {
        containers: Vec<Observed>,
        images: BTreeSet<String>,
        next_id: u32,
        touched_foreign: bool,
    }

    impl Engine {
        fn apply(&mut self, d: &Desired, action: &Action, now: u64) {
            let foreign =
                |c: &Observed| c.labels.get(labels::DEVICE).map(String::as_str) != Some(DEV);
            let find = |cs: &mut Vec<Observed>, id: &str| cs.iter().position(|c| c.id == id);
            match action {
                Action::Remove { id, .. }
                | Action::Stop { id, .. }
                | Action::Start { id, .. }
                | Action::Restart { id, .. } => {
                    let Some(i) = find(&mut self.containers, id) else {
                        panic!("unknown container {id}")
                    };
                    if foreign(&self.containers[i]) {
                        self.touched_foreign = true;
                    }
                    match action {
                        Action::Remove { .. } => {
                            self.containers.remove(i);
                        }
                        Action::Stop { .. } => {
                            let c = &mut self.containers[i];
                            c.state = ContainerState::Exited;
                            c.exit_code = Some(0);
                            c.finished_at = Some(now / 1000);
                        }
                        _ => {
                            let c = &mut self.containers[i];
                            c.state = ContainerState::Running;
                            c.health = Health::None;
                            c.started_at = Some(now / 1000);
                        }
                    }
                }
                Action::Pull { image, .. } => {
                    self.images.insert(image.clone());
                }
                Action::Create { module } => {
                    assert!(
                        !self
                            .containers
                            .iter()
                            .any(|c| c.name == format!("outpost.{DEV}.{module}")),
                        "name conflict creating {module}"
                    );
                    self.next_id += 1;
                    let mut c = container(d, module, ContainerState::Running);
                    c.id = format!("new-{}", self.next_id);
                    c.started_at = Some(now / 1000);
                    self.containers.push(c);
                }
            }
        }
    }

    fn arb_state() -> impl Strategy<Value = (ContainerState, Option<i64>, Health)> {
        prop_oneof![
            Just((ContainerState::Running, None, Health::None)),
            Just((ContainerState::Running, None, Health::Unhealthy)),
            Just((ContainerState::Created, None, Health::None)),
            (0i64..3).prop_map(|c| (ContainerState::Exited, Some(c), Health::None)),
            Just((ContainerState::Dead, Some(137), Health::None)),
        ]
    }

    fn arb_world() -> impl Strategy<Value = (Desired, Vec<Observed>, BTreeSet<String>)> {
        let module = (
            0u32..3,
            prop_oneof![
                Just("always"),
                Just("on-failure"),
                Just("on-unhealthy"),
                Just("never")
            ],
            prop_oneof![Just("running"), Just("stopped")],
            0u8..2,
        );
        (
            proptest::collection::btree_map("[a-e]", module, 0..5),
            proptest::collection::vec(("[a-g]", arb_state(), any::<bool>(), any::<bool>(), any::<bool>()), 0..8),
            any::<bool>(),
        )
            .prop_map(|(modules, containers, images_present)| {
                let body: Vec<String> = modules
                    .iter()
                    .map(|(n, (order, policy, status, tag))| {
                        format!(
                            r#""{n}":{{"image":"r.io/{n}:{tag}","startupOrder":{order},"restartPolicy":"{policy}","status":"{status}"}}"#
                        )
                    })
                    .collect();
                let d = desired(&format!(
                    r#"{{"schemaVersion":"1.0","id":"d","version":1,"modules":{{{}}}}}"#,
                    body.join(",")
                ));
                let observed = containers
                    .into_iter()
                    .enumerate()
                    .map(|(i, (module, (state, code, health), stale, foreign, old))| {
                        let mut c = container(&d, &module, state);
                        c.id = format!("c{i}");
                        c.name = format!("outpost.{DEV}.{module}.{i}");
                        c.exit_code = code;
                        c.health = health;
                        if code.is_some() {
                            c.finished_at = Some(if old { T0 / 1000 - 7_200 } else { T0 / 1000 - 1 });
                            c.started_at = Some(c.finished_at.unwrap() - 1);
                        }
                        if stale {
                            c.config_hash = "stale".into();
                        }
                        if foreign {
                            c.labels.insert(labels::DEVICE.into(), "other".into());
                        }
                        c
                    })
                    .collect();
                let images = if images_present {
                    d.deployment.modules.values().map(|m| m.image.clone()).collect()
                } else {
                    BTreeSet::new()
                };
                (d, observed, images)
            })
    }

    proptest! {
        /// Applying plans to a simulated engine converges to the desired state within a bounded
        /// number of passes, never touches another device's container, and never creates a
        /// container whose name is taken.
        #[test]
        fn plans_converge_on_a_simulated_engine((d, observed, images) in arb_world()) {
            let mut engine = Engine { containers: observed, images, next_id: 0, touched_foreign: false };
            // The simulated containers all started fine: exits under `never`/`on-failure` stay.
            let history = BTreeMap::new();
            let (none, failures) = (BTreeSet::new(), BTreeMap::new());
            let mut now = T0;
            let mut converged = false;
            for _ in 0..40 {
                let world = World {
                    device: DEV, desired: Some(&d), observed: &engine.containers, images: &engine.images,
                    pulling: &none, pulled: &none, pull_failures: &failures, history: &history,
                    now, agent_started: T0 - 3_600_000,
                };
                let p = plan(&world);
                if p.actions.is_empty() && p.wake_at.is_none() {
                    converged = true;
                    break;
                }
                for a in &p.actions {
                    engine.apply(&d, a, now);
                }
                now = p.wake_at.map_or(now + 1_000, |w| w.max(now + 1_000));
            }
            prop_assert!(converged, "no convergence: {:?}", engine.containers);
            prop_assert!(!engine.touched_foreign);
            // The end state is the desired one.
            let ours: Vec<&Observed> = engine.containers.iter().filter(|c| c.labels.get(labels::DEVICE).map(String::as_str) == Some(DEV)).collect();
            for (name, m) in &d.deployment.modules {
                let mine: Vec<_> = ours.iter().filter(|c| &c.module == name).collect();
                prop_assert!(mine.len() <= 1, "duplicates of {}", name);
                if let Some(c) = mine.first() {
                    prop_assert_eq!(&c.config_hash, &d.hashes[name]);
                }
                if m.status == DesiredStatus::Running && m.restart_policy == RestartPolicy::Always {
                    prop_assert!(mine.first().is_some_and(|c| c.state == ContainerState::Running), "{} is not running", name);
                }
                if m.status == DesiredStatus::Stopped {
                    prop_assert!(mine.first().is_none_or(|c| !is_up(c)));
                }
            }
            prop_assert!(ours.iter().all(|c| d.deployment.modules.contains_key(&c.module)), "leftover containers");
        }
    }
}
