//! Planning without a deployment: everything found is kept as it is, restarted by the policy
//! in its labels and in startup order, and nothing is removed.

use std::collections::BTreeMap;

use crate::container::{Observed, labels};
use crate::manifest::RestartPolicy;
use crate::state::ModuleStatus;

use super::restart::keep_alive;
use super::types::{Plan, World};
use super::{Keep, best};

/// No deployment: keep what is there, by the policies in its labels, in startup order.
pub(super) fn unmanaged(world: &World<'_>, by_module: &BTreeMap<&str, Vec<&Observed>>) -> Plan {
    let mut plan = Plan::default();
    let mut groups: BTreeMap<u32, Vec<(&str, &Observed, Keep)>> = BTreeMap::new();
    for (module, cs) in by_module {
        let Some(c) = best(cs.iter().copied()) else {
            continue;
        };
        let keep = Keep {
            policy: c
                .labels
                .get(labels::RESTART_POLICY)
                .and_then(|p| RestartPolicy::from_label(p))
                .unwrap_or(RestartPolicy::OnFailure),
            group: c
                .labels
                .get(labels::STARTUP_ORDER)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
        };
        groups
            .entry(keep.group)
            .or_default()
            .push((module, c, keep));
    }
    let mut lower_up = true;
    for members in groups.values() {
        let mut group_up = true;
        for (module, c, keep) in members {
            if world.busy.contains(*module) {
                plan.set(module, ModuleStatus::Unmanaged, None);
                group_up = false;
                continue;
            }
            let up = keep_alive(world, &mut plan, module, c, *keep, lower_up);
            group_up &= up;
            let problem = plan.modules.get(*module).and_then(|m| m.problem.clone());
            plan.set(
                module,
                ModuleStatus::Unmanaged,
                problem.or_else(|| {
                    Some("no deployment on this device: kept as found until one arrives".into())
                }),
            );
        }
        lower_up &= group_up;
    }
    plan
}
