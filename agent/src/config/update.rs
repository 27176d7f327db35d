//! `[update]`: how the agent takes an update of itself (docs/operations.md#updating-the-agent).

use std::path::Path;
use std::time::Duration;

use super::raw::RawUpdate;
use super::types::UpdateConfig;
use super::validate::Issues;

pub(super) fn update(u: RawUpdate, base: &Path, issues: &mut Issues) -> UpdateConfig {
    let defaults = UpdateConfig::default();
    let probation_secs = u.probation_secs.unwrap_or(defaults.probation.as_secs());
    if probation_secs > 24 * 3600 {
        issues.push(
            "update.probation_secs",
            format!("{probation_secs} is over 86400 (a day)"),
        );
    }
    let gate_timeout_secs = u
        .gate_timeout_secs
        .unwrap_or(defaults.gate_timeout.as_secs());
    if gate_timeout_secs <= probation_secs || gate_timeout_secs > 7 * 24 * 3600 {
        issues.push(
            "update.gate_timeout_secs",
            format!(
                "{gate_timeout_secs} must be above probation_secs ({probation_secs}) and at most 604800 (a week)"
            ),
        );
    }
    let max_starts = u.max_starts.unwrap_or(defaults.max_starts);
    if !(1..=20).contains(&max_starts) {
        issues.push(
            "update.max_starts",
            format!("{max_starts} is outside 1..=20"),
        );
    }
    let max_mb = u.max_mb.unwrap_or(defaults.max_bytes >> 20);
    if !(1..=4096).contains(&max_mb) {
        issues.push("update.max_mb", format!("{max_mb} is outside 1..=4096"));
    }
    UpdateConfig {
        enabled: u.enabled.unwrap_or(defaults.enabled),
        probation: Duration::from_secs(probation_secs),
        gate_timeout: Duration::from_secs(gate_timeout_secs),
        max_starts,
        max_bytes: max_mb << 20,
        ca_file: u.ca_file.map(|f| issues.file("update.ca_file", &f, base)),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{issues, load};

    #[test]
    fn defaults_are_a_minute_of_probation_within_ten() {
        let c = load("device_id = \"d\"\n", &[]).unwrap();
        assert!(c.update.enabled);
        assert_eq!(c.update.probation.as_secs(), 60);
        assert_eq!(c.update.gate_timeout.as_secs(), 600);
        assert_eq!(c.update.max_starts, 3);
        assert_eq!(c.update.max_bytes, 256 << 20);
    }

    #[test]
    fn mistakes_are_named() {
        let found = issues(load(
            "device_id = \"d\"\n[update]\nprobation_secs = 120\ngate_timeout_secs = 60\n\
             max_starts = 0\nmax_mb = 0\nca_file = \"missing.pem\"\n",
            &[],
        ));
        let keys: Vec<_> = found.iter().map(|i| i.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "update.gate_timeout_secs",
                "update.max_starts",
                "update.max_mb",
                "update.ca_file"
            ],
            "{found:#?}"
        );
    }
}
