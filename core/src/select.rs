//! Which deployment is in force when a device follows its own topic and its groups' topics.
//!
//! A pure function, so the precedence rules are tested case by case:
//!
//! 1. the device's own deployment wins over any group's;
//! 2. between groups, the manifest's `priority` decides (higher wins);
//! 3. on equal priority, the group listed first in `hub.groups` wins, so the result never
//!    depends on the order messages happened to arrive in.
//!
//! Only deployments that passed intake are candidates: a refused message from a source leaves
//! that source's previous accepted deployment in place ("a refused deployment changes nothing").

use crate::state::Source;

/// One accepted deployment from one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub source: Source,
    pub priority: u32,
}

/// Returns the index of the candidate in force, `None` when there is none.
///
/// `groups` is the device's configured group list, in precedence order for ties. A group
/// candidate whose group is not configured (the device is no longer a member) never wins.
pub fn select(candidates: &[Candidate], groups: &[String]) -> Option<usize> {
    if let Some(i) = candidates.iter().position(|c| c.source == Source::Device) {
        return Some(i);
    }
    candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.source {
            Source::Group { name } => groups
                .iter()
                .position(|g| g == name)
                .map(|rank| (i, c.priority, rank)),
            _ => None,
        })
        // Highest priority first; on a tie the lower rank (listed earlier) wins.
        .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
        .map(|(i, _, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, priority: u32) -> Candidate {
        Candidate {
            source: Source::Group { name: name.into() },
            priority,
        }
    }

    fn groups(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn nothing_to_choose_from() {
        assert_eq!(select(&[], &groups(&["a"])), None);
    }

    #[test]
    fn the_device_wins_over_any_group() {
        let c = [
            group("a", 1000),
            Candidate {
                source: Source::Device,
                priority: 0,
            },
        ];
        assert_eq!(select(&c, &groups(&["a"])), Some(1));
    }

    #[test]
    fn the_higher_priority_group_wins() {
        let c = [group("a", 1), group("b", 5), group("c", 3)];
        assert_eq!(select(&c, &groups(&["a", "b", "c"])), Some(1));
    }

    #[test]
    fn a_tie_goes_to_the_group_listed_first() {
        let c = [group("b", 5), group("a", 5)];
        assert_eq!(select(&c, &groups(&["a", "b"])), Some(1));
        assert_eq!(select(&c, &groups(&["b", "a"])), Some(0));
    }

    #[test]
    fn a_group_the_device_is_not_in_never_wins() {
        let c = [group("x", 9), group("a", 0)];
        assert_eq!(select(&c, &groups(&["a"])), Some(1));
        assert_eq!(select(&[group("x", 9)], &groups(&["a"])), None);
    }

    #[test]
    fn local_deployments_are_not_hub_candidates() {
        let c = [Candidate {
            source: Source::Local,
            priority: 0,
        }];
        assert_eq!(select(&c, &[]), None);
    }
}
