//! Planning against a deployment: the desired modules against the containers found, staged
//! (images pulled and verified, new containers created) while the old ones keep running, then
//! switched group by group in startup order, leaving modules first.

use std::collections::{BTreeMap, BTreeSet};

use crate::container::{ContainerState, Health, Observed, labels};
use crate::manifest::{DesiredStatus, Module, PullPolicy, RestartPolicy};
use crate::spec::container_name;
use crate::state::ModuleStatus;

use super::restart::{PULL_RETRY_BASE_MS, keep_alive, retry_delay, start_backoff};
use super::types::{Action, ArtifactWait, Desired, Held, ModulePlan, Plan, World};
use super::{Keep, best, group_label, is_exited, is_up};

/// What the planner knows of one desired module's containers.
struct Containers<'a> {
    /// The container made from the desired config (up first).
    new: Option<&'a Observed>,
    /// Every other container of the module: older configs, duplicates.
    old: Vec<&'a Observed>,
}

pub(super) fn managed(
    world: &World<'_>,
    d: &Desired,
    by_module: &BTreeMap<&str, Vec<&Observed>>,
) -> Plan {
    let mut plan = Plan::default();
    let modules = &d.deployment.modules;

    let mut split: BTreeMap<&str, Containers<'_>> = BTreeMap::new();
    let mut leaving: Vec<&Observed> = Vec::new();
    for (module, cs) in by_module {
        match d
            .hashes
            .get(*module)
            .filter(|_| modules.contains_key(*module))
        {
            Some(hash) => {
                let new = best(cs.iter().copied().filter(|c| &c.config_hash == hash));
                let old = cs
                    .iter()
                    .copied()
                    .filter(|c| new.is_none_or(|n| n.id != c.id))
                    .collect();
                split.insert(module, Containers { new, old });
            }
            None => leaving.extend(cs.iter().copied()),
        }
    }
    let taken: BTreeSet<&str> = world.observed.iter().map(|o| o.name.as_str()).collect();

    // Staging: every running module needs its image, verified, its artifacts, verified, and
    // then a created container. A module whose container already matches still waits for its
    // artifacts: a new digest is part of the deployment being staged.
    let mut images_ready = true;
    for (name, m) in modules {
        if m.status != DesiredStatus::Running {
            continue;
        }
        let has_new = split.get(name.as_str()).is_some_and(|c| c.new.is_some());
        if !has_new && !image_ready(world, &mut plan, name, m) {
            images_ready = false;
        }
        if !artifacts_ready(world, &mut plan, name) {
            images_ready = false;
        }
    }
    // Nothing of this device runs yet: there is nothing to switch, so the first startup group
    // starts as it is created instead of waiting for the whole deployment to be created.
    let fresh = by_module.is_empty();
    let first_group = modules
        .values()
        .filter(|m| m.status == DesiredStatus::Running)
        .map(|m| m.startup_order)
        .min();
    let mut created = true;
    if images_ready {
        for (name, m) in modules {
            if m.status != DesiredStatus::Running {
                continue;
            }
            let cs = split.get(name.as_str());
            if cs.is_some_and(|c| c.new.is_some()) {
                continue;
            }
            created = false;
            if world.busy.contains(name) {
                continue;
            }
            if let Some(wait) = start_backoff(world, &mut plan, name) {
                plan.wake(wait);
                continue;
            }
            // The module's name may still be held by its old container: stage beside it.
            let base = container_name(world.device, name);
            let free = std::iter::once(base.clone())
                .chain((1..=3).map(|i| format!("{base}.{i}")))
                .find(|n| !taken.contains(n.as_str()));
            match free {
                Some(container) => plan.actions.push(Action::Create {
                    module: name.clone(),
                    name: container,
                    start: fresh && Some(m.startup_order) == first_group,
                }),
                None => {
                    // Every staging name is held by debris of earlier attempts: clear it.
                    for c in cs.map_or(&[][..], |c| &c.old[..]) {
                        if !is_up(c) && c.name != base {
                            plan.actions.push(Action::Remove {
                                id: c.id.clone(),
                                module: name.clone(),
                            });
                        }
                    }
                }
            }
            if !world.start_failures.contains_key(name) {
                plan.set(name, ModuleStatus::Staged, None);
            }
        }
    }
    plan.staged = images_ready && created;

    // What the switch would change of what runs: an update lock protects a module whose
    // running container it would replace, stop or remove; a window holds any switch with
    // work to do (a new module to start too). Nothing of the device running yet: nothing to
    // disturb, so neither holds.
    for c in leaving.iter().filter(|c| is_up(c)) {
        plan.changing.insert(c.module.clone());
    }
    let mut switch_work = !leaving.is_empty();
    for (name, m) in modules {
        let cs = split.get(name.as_str());
        let up = |c: &&Observed| is_up(c);
        match m.status {
            DesiredStatus::Running => {
                let old_up = cs.is_some_and(|c| c.old.iter().any(up));
                if old_up {
                    plan.changing.insert(name.clone());
                }
                switch_work |= cs.is_none_or(|c| {
                    !c.old.is_empty() || c.new.is_none_or(|n| n.state == ContainerState::Created)
                });
            }
            DesiredStatus::Stopped => {
                if cs.is_some_and(|c| c.new.iter().chain(c.old.iter()).any(up)) {
                    plan.changing.insert(name.clone());
                    switch_work = true;
                }
            }
        }
    }
    if let Some(hold) = world.hold {
        for name in hold.relinks {
            let up = split
                .get(name.as_str())
                .is_some_and(|c| c.new.iter().chain(c.old.iter()).any(|c| is_up(c)));
            if modules.contains_key(name) && up {
                plan.changing.insert(name.clone());
                switch_work = true;
            }
        }
    }
    let held = match world.hold {
        Some(hold) if !fresh && switch_work => {
            if hold.window_closed {
                Some(Held::Window)
            } else {
                let locks: Vec<String> = plan.changing.intersection(hold.locked).cloned().collect();
                (!locks.is_empty()).then_some(Held::Locks(locks))
            }
        }
        _ => None,
    };
    if held.is_some() {
        // Not switched, so not staged either: artifacts keep their old links.
        plan.staged = false;
        plan.held = held;
    }

    if !plan.staged {
        // Until the whole deployment is ready, what runs keeps running as it was (in startup
        // order after a reboot).
        let mut groups: BTreeMap<u32, Vec<(&String, &Module)>> = BTreeMap::new();
        for (name, m) in modules {
            groups.entry(m.startup_order).or_default().push((name, m));
        }
        let mut lower_up = true;
        for members in groups.values() {
            let mut group_up = true;
            for (name, m) in members {
                let serving = split.get(name.as_str()).and_then(|cs| {
                    if cs.old.is_empty() {
                        cs.new
                    } else {
                        best(cs.old.iter().copied())
                    }
                });
                if world.busy.contains(*name) {
                    group_up &= serving.is_none();
                } else if let Some(c) = serving
                    && (is_up(c) || is_exited(c))
                {
                    let before = plan.modules.get(*name).cloned();
                    group_up &= keep_alive(
                        world,
                        &mut plan,
                        name,
                        c,
                        Keep {
                            policy: m.restart_policy,
                            group: m.startup_order,
                        },
                        lower_up,
                    );
                    // The status says where the update stands, not the old container's state.
                    if let Some(before) = before {
                        plan.modules.insert(name.to_string(), before);
                    }
                }
                if !plan.modules.contains_key(*name) {
                    plan.set(name, ModuleStatus::Staged, None);
                }
            }
            lower_up &= group_up;
        }
        for c in &leaving {
            if !world.busy.contains(&c.module) && (is_up(c) || is_exited(c)) {
                let keep = Keep {
                    policy: c
                        .labels
                        .get(labels::RESTART_POLICY)
                        .and_then(|p| RestartPolicy::from_label(p))
                        .unwrap_or(RestartPolicy::OnFailure),
                    group: group_label(c),
                };
                let mut scratch = Plan::default();
                keep_alive(world, &mut scratch, &c.module, c, keep, true);
                plan.actions.extend(scratch.actions);
                if let Some(w) = scratch.wake_at {
                    plan.wake(w);
                }
            }
        }
        for (name, m) in modules {
            if m.status == DesiredStatus::Stopped {
                plan.set(name, ModuleStatus::Staged, None);
            }
        }
        if plan.held.is_some() {
            // Held: a module whose new container waits beside the old one is staged, not
            // the old one's status.
            for (name, cs) in &split {
                let waits = cs.new.is_some() && !cs.old.is_empty();
                if waits && plan.modules.get(*name).is_none_or(|p| p.problem.is_none()) {
                    plan.set(name, ModuleStatus::Staged, None);
                }
            }
        }
        return plan;
    }

    // The switch. First, modules leaving the deployment, highest startup group first.
    if let Some(top) = leaving.iter().map(|c| group_label(c)).max() {
        let busy_leaving = leaving.iter().any(|c| world.busy.contains(&c.module));
        if !busy_leaving {
            for c in leaving.iter().filter(|c| group_label(c) == top) {
                if !plan
                    .actions
                    .iter()
                    .any(|a| matches!(a, Action::Remove { module, .. } if module == &c.module))
                {
                    for same in leaving.iter().filter(|o| o.module == c.module) {
                        plan.actions.push(Action::Remove {
                            id: same.id.clone(),
                            module: same.module.clone(),
                        });
                    }
                }
            }
        }
        for name in modules.keys() {
            plan.modules.entry(name.clone()).or_insert(ModulePlan {
                status: ModuleStatus::Staged,
                problem: None,
                definitive: false,
            });
        }
        return plan;
    }

    // Then the desired modules, group by group from the lowest.
    let mut groups: BTreeMap<u32, Vec<(&String, &Module)>> = BTreeMap::new();
    for (name, m) in modules {
        groups.entry(m.startup_order).or_default().push((name, m));
    }
    let mut lower_up = true;
    for members in groups.values() {
        let mut group_up = true;
        for (name, m) in members {
            let empty = Containers {
                new: None,
                old: Vec::new(),
            };
            let cs = split.get(name.as_str()).unwrap_or(&empty);
            if world.busy.contains(*name) {
                plan.modules.entry(name.to_string()).or_insert(ModulePlan {
                    status: ModuleStatus::Staged,
                    problem: None,
                    definitive: false,
                });
                group_up = false;
                continue;
            }
            let up = switch_module(world, &mut plan, name, m, cs, lower_up);
            group_up &= up || m.status == DesiredStatus::Stopped;
        }
        lower_up &= group_up;
    }

    plan.converged = plan.actions.is_empty()
        && plan.wake_at.is_none()
        && world.busy.is_empty()
        && modules.iter().all(|(name, m)| {
            let cs = split.get(name.as_str());
            let new = cs.and_then(|c| c.new);
            let old_gone = cs.is_none_or(|c| c.old.is_empty());
            old_gone
                && match (m.status, new) {
                    // With a health check, only `healthy` counts: `starting` is not there yet.
                    (DesiredStatus::Running, Some(c)) => {
                        c.state == ContainerState::Running
                            && matches!(c.health, Health::None | Health::Healthy)
                    }
                    (DesiredStatus::Running, None) => false,
                    (DesiredStatus::Stopped, c) => c.is_none_or(|c| !is_up(c)),
                }
        });
    plan
}

/// Whether the module's image is on the device and verified; if not, plans its pull (or
/// reports why not). Pulls are not gated by startup order: images arrive early.
fn image_ready(world: &World<'_>, plan: &mut Plan, name: &str, m: &Module) -> bool {
    // `always` wants a pull by this agent before each new container.
    let fresh_enough = m.image_pull_policy != PullPolicy::Always || world.pulled.contains(&m.image);
    if world.images.contains(&m.image) && fresh_enough {
        return true;
    }
    if world.pulling.contains(&m.image) {
        let problem = world.pull_failures.get(&m.image).map(|f| f.message.clone());
        plan.set(name, ModuleStatus::Pulling, problem);
        return false;
    }
    if let Some(f) = world.pull_failures.get(&m.image) {
        let retry_at = f.at + retry_delay(PULL_RETRY_BASE_MS, f.attempts);
        if retry_at > world.now {
            plan.wake(retry_at);
            plan.fail(
                name,
                format!(
                    "{} (attempt {}, retrying in {} s)",
                    f.message,
                    f.attempts,
                    retry_at.saturating_sub(world.now).div_ceil(1000)
                ),
                f.definitive,
            );
            return false;
        }
    }
    if m.image_pull_policy == PullPolicy::Never {
        plan.fail(
            name,
            format!(
                "image {} is not on the device and the pull policy is `never`",
                m.image
            ),
            true,
        );
        return false;
    }
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
    false
}

/// Whether the module's artifacts are all fetched and verified; if not, says so in the plan
/// (a failure wins over a pull under way; a pull failure already reported wins over a fetch).
/// The agent fetches them on its own and wakes the planner when one lands.
fn artifacts_ready(world: &World<'_>, plan: &mut Plan, name: &str) -> bool {
    let Some(wait) = world.artifacts.get(name) else {
        return true;
    };
    let failed_already = plan
        .modules
        .get(name)
        .is_some_and(|p| p.status == ModuleStatus::Failed);
    match wait {
        ArtifactWait::Fetching { problem } => {
            if !failed_already {
                let problem = plan
                    .modules
                    .get(name)
                    .and_then(|p| p.problem.clone())
                    .or_else(|| problem.clone());
                plan.set(name, ModuleStatus::Pulling, problem);
            }
        }
        ArtifactWait::Failed {
            message,
            definitive,
        } => {
            if !(failed_already && plan.modules.get(name).is_some_and(|p| p.definitive)) {
                plan.fail(name, message.clone(), *definitive);
            }
        }
    }
    false
}

/// Plans one desired module at switch time; returns whether it is up (what later startup
/// groups wait for).
fn switch_module(
    world: &World<'_>,
    plan: &mut Plan,
    name: &str,
    m: &Module,
    cs: &Containers<'_>,
    may_start: bool,
) -> bool {
    let base = container_name(world.device, name);
    if m.status == DesiredStatus::Stopped {
        for c in &cs.old {
            plan.actions.push(Action::Remove {
                id: c.id.clone(),
                module: name.to_string(),
            });
        }
        if let Some(c) = cs.new {
            if is_up(c) {
                plan.actions.push(Action::Stop {
                    id: c.id.clone(),
                    module: name.to_string(),
                });
            }
            rename_home(world, plan, name, c, &base);
        }
        plan.set(name, ModuleStatus::Stopped, None);
        return false;
    }
    let Some(new) = cs.new else {
        // Staged means every running module has its container; it went away since.
        plan.set(name, ModuleStatus::Staged, None);
        return false;
    };
    if !cs.old.is_empty() {
        if !may_start {
            plan.set(name, ModuleStatus::Staged, None);
            return false;
        }
        if let Some(wait) = start_backoff(world, plan, name) {
            plan.wake(wait);
            return false;
        }
        let mut old: Vec<&Observed> = cs.old.clone();
        // The one that served goes first: it is the one restored if the new one cannot start.
        old.sort_by_key(|c| std::cmp::Reverse((is_up(c), c.started_at)));
        plan.actions.push(Action::Replace {
            module: name.to_string(),
            old: old.iter().map(|c| c.id.clone()).collect(),
            new: new.id.clone(),
            name: base,
        });
        plan.set(name, ModuleStatus::Staged, None);
        return false;
    }
    rename_home(world, plan, name, new, &base);
    keep_alive(
        world,
        plan,
        name,
        new,
        Keep {
            policy: m.restart_policy,
            group: m.startup_order,
        },
        may_start,
    )
}

/// Gives a module's only container the module's name when it has another (a staged name
/// left by an interrupted switch) and the name is free.
fn rename_home(world: &World<'_>, plan: &mut Plan, name: &str, c: &Observed, base: &str) {
    if c.name != base && !world.observed.iter().any(|o| o.name == base) {
        plan.actions.push(Action::Rename {
            id: c.id.clone(),
            module: name.to_string(),
            name: base.to_string(),
        });
    }
}
