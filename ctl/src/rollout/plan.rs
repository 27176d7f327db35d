//! A rollout's record and the pure rules over it: how devices are cut into waves, what a
//! device's report means for the rollout, and when the failures are enough to abort.
//!
//! The record is what is retained on the broker (`{prefix}/_rollouts/{id}/state`), so any
//! operator's machine can watch, resume or cancel the rollout; nothing here does I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hub::Progress;

/// How devices are sent the deployment, and when the rollout gives up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Devices of the first wave; the rollout goes on only once they all applied.
    pub canary: usize,
    /// Devices of the second wave (default: twice the canary).
    pub wave_size: usize,
    /// Each later wave is this many times the one before (1 = a fixed rate).
    pub growth: f64,
    /// No wave is larger than this (0 = no cap).
    pub max_wave: usize,
    /// How many failures are tolerated before the rollout aborts.
    pub max_failures: Threshold,
    /// Failures are judged only once this many devices have a final answer.
    pub min_devices: usize,
    /// An online device that has not settled this long after it was sent the deployment counts
    /// as failed (`silent`).
    pub device_timeout_secs: u64,
    /// After a wave has applied, how long it is watched (a device may still roll back) before
    /// the next wave is sent.
    pub bake_secs: u64,
    /// On abort, send every device that was sent the deployment its previous one again.
    pub revert_on_abort: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            canary: 1,
            wave_size: 2,
            growth: 2.0,
            max_wave: 0,
            max_failures: Threshold::Count(0),
            min_devices: 1,
            device_timeout_secs: 600,
            bake_secs: 0,
            revert_on_abort: false,
        }
    }
}

impl Policy {
    /// The abort rule, timeout, bake and revert in words (the start line and the status table).
    pub fn summary(&self) -> String {
        format!(
            "abort after more than {} failures (judged from {} settled); device timeout {} s{}{}",
            self.max_failures,
            self.min_devices,
            self.device_timeout_secs,
            if self.bake_secs > 0 {
                format!("; each wave watched {} s", self.bake_secs)
            } else {
                String::new()
            },
            if self.revert_on_abort {
                "; reverts on abort"
            } else {
                ""
            }
        )
    }
}

/// A failure budget: a number of devices, or a share of those that have settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Threshold {
    Count(usize),
    Percent(u8),
}

impl std::str::FromStr for Threshold {
    type Err = String;

    /// `0`, `3`, `10%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(Threshold::Percent(p)),
                _ => Err(format!("`{s}` is not a percentage from 0% to 100%")),
            };
        }
        s.parse::<usize>()
            .map(Threshold::Count)
            .map_err(|_| format!("`{s}` is neither a count (3) nor a percentage (10%)"))
    }
}

impl std::fmt::Display for Threshold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Threshold::Count(n) => write!(f, "{n}"),
            Threshold::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Cuts `devices` (in the order given: online devices first) into waves: the canary, then
/// `wave_size`, growing by `growth`, capped at `max_wave`.
pub fn waves(devices: &[String], policy: &Policy) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = devices;
    let mut size = policy.canary.max(1) as f64;
    let mut next = policy.wave_size.max(1) as f64;
    while !rest.is_empty() {
        let mut n = size.round().max(1.0) as usize;
        if policy.max_wave > 0 {
            n = n.min(policy.max_wave);
        }
        let (wave, tail) = rest.split_at(n.min(rest.len()));
        out.push(wave.to_vec());
        rest = tail;
        size = next;
        next = (next * policy.growth.max(1.0)).min(1e9);
    }
    out
}

/// Where the rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Waves are being sent (see `owner` for who runs it).
    Running,
    /// Its runner was stopped (Ctrl-C); `resume` goes on.
    Paused,
    /// Every wave was sent and settled.
    Completed,
    /// The failure budget was spent; no further wave is sent.
    Aborted,
    /// An operator cancelled it; no further wave is sent.
    Cancelled,
    /// After an abort or cancel, the devices that had been sent the deployment are being sent
    /// their previous one.
    Reverting,
    /// The revert is done.
    Reverted,
}

impl Status {
    /// Nothing more is sent unless an operator asks (revert).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Completed | Status::Aborted | Status::Cancelled | Status::Reverted
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Completed => "completed",
            Status::Aborted => "aborted",
            Status::Cancelled => "cancelled",
            Status::Reverting => "reverting",
            Status::Reverted => "reverted",
        }
    }
}

/// Where one device stands in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceStatus {
    /// Its wave has not been sent.
    Pending,
    /// Sent; no final answer yet (it may be offline: it gets the retained deployment when it
    /// connects).
    Sent,
    /// Reported the deployment applied: every module in its desired state.
    Applied,
    Failed,
    RolledBack,
    Rejected,
    /// Online, but no final answer within the device timeout.
    Silent,
    /// Being sent its previous deployment.
    Reverting,
    /// Applied its previous deployment again (or, when it had none of its own, withdrew this
    /// one).
    Reverted,
    /// The revert was not applied (failed, rejected or silent).
    RevertFailed,
}

impl DeviceStatus {
    /// Counts against the failure budget.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            DeviceStatus::Failed
                | DeviceStatus::RolledBack
                | DeviceStatus::Rejected
                | DeviceStatus::Silent
        )
    }

    /// Has a final answer about the rollout's deployment.
    pub fn is_settled(self) -> bool {
        self == DeviceStatus::Applied || self.is_failure()
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceStatus::Pending => "pending",
            DeviceStatus::Sent => "sent",
            DeviceStatus::Applied => "applied",
            DeviceStatus::Failed => "failed",
            DeviceStatus::RolledBack => "rolled-back",
            DeviceStatus::Rejected => "rejected",
            DeviceStatus::Silent => "silent",
            DeviceStatus::Reverting => "reverting",
            DeviceStatus::Reverted => "reverted",
            DeviceStatus::RevertFailed => "revert-failed",
        }
    }
}

/// One device of the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub wave: usize,
    pub status: DeviceStatus,
    /// SHA-256 of the manifest this device was sent (each is bound to its device, so each
    /// differs): its reported state is matched by it.
    pub digest: String,
    /// SHA-256 of the manifest its revert sends, when the revert is a deployment (not a
    /// withdrawal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_digest: Option<String>,
    /// Unix seconds (the operator's clock), for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<u64>,
    /// What the device said when it failed (`/path: message`), or why it is silent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One wave's times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Wave {
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
}

/// Who runs the rollout now: a runner writes a heartbeat; another one takes over only when it
/// is stale (or with `--force`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Owner {
    /// A random id per runner process.
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub heartbeat_at: u64,
}

/// The rollout, as retained on the broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    /// The deployment's id and version.
    pub deployment: String,
    pub version: u64,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub policy: Policy,
    pub created_at: u64,
    pub updated_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    /// The wave being sent or watched.
    pub current_wave: usize,
    pub waves: Vec<Wave>,
    pub devices: BTreeMap<String, DeviceRecord>,
}

/// Counts of a set of devices by what they did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub total: usize,
    pub pending: usize,
    pub in_flight: usize,
    pub applied: usize,
    pub failed: usize,
    pub reverted: usize,
}

impl Record {
    /// The tally of `wave`, or of every device with `None`.
    pub fn tally(&self, wave: Option<usize>) -> Tally {
        let mut t = Tally::default();
        for d in self
            .devices
            .values()
            .filter(|d| wave.is_none_or(|w| d.wave == w))
        {
            t.total += 1;
            match d.status {
                DeviceStatus::Pending => t.pending += 1,
                DeviceStatus::Sent => t.in_flight += 1,
                DeviceStatus::Applied => t.applied += 1,
                s if s.is_failure() => t.failed += 1,
                DeviceStatus::Reverting => t.in_flight += 1,
                _ => t.reverted += 1,
            }
        }
        t
    }

    /// Why the rollout must abort, when the failures exceed the budget.
    pub fn abort_reason(&self) -> Option<String> {
        let settled = self
            .devices
            .values()
            .filter(|d| d.status.is_settled())
            .count();
        let failed: Vec<&String> = self
            .devices
            .iter()
            .filter(|(_, d)| d.status.is_failure())
            .map(|(name, _)| name)
            .collect();
        if failed.is_empty() || settled < self.policy.min_devices.max(1) {
            return None;
        }
        let over = match self.policy.max_failures {
            Threshold::Count(n) => failed.len() > n,
            Threshold::Percent(p) => failed.len() * 100 > usize::from(p) * settled,
        };
        over.then(|| {
            let names: Vec<&str> = failed.iter().take(5).map(|s| s.as_str()).collect();
            format!(
                "{} of {settled} settled devices failed ({}{}), over the budget of {}",
                failed.len(),
                names.join(", "),
                if failed.len() > 5 { ", ..." } else { "" },
                self.policy.max_failures
            )
        })
    }

    /// Every device of `wave` has settled, or is offline (`offline` says which are).
    pub fn wave_settled(&self, wave: usize, offline: impl Fn(&str) -> bool) -> bool {
        self.devices
            .iter()
            .filter(|(_, d)| d.wave == wave)
            .all(|(name, d)| {
                d.status.is_settled() || (d.status == DeviceStatus::Sent && offline(name))
            })
    }
}

/// What a device's report means for its record: the new status and the reason, or `None`
/// when nothing changes. Only reports about the device's own digest count; a device that
/// settled may still change (an applied deployment rolled back by the device's health window).
pub fn judge(record: &DeviceRecord, progress: &Progress) -> Option<(DeviceStatus, Option<String>)> {
    use DeviceStatus::*;
    let reverting = matches!(record.status, Reverting | Reverted | RevertFailed);
    if reverting || record.status == Pending {
        return None;
    }
    let next = match progress {
        Progress::Applied => (Applied, None),
        Progress::Failed(s, reasons) => (
            if *s == outpost_core::state::DeploymentStatus::RolledBack {
                RolledBack
            } else {
                Failed
            },
            Some(reasons_text(reasons)),
        ),
        Progress::Rejected(reasons) => (Rejected, Some(reasons_text(reasons))),
        // Received, applying, waiting for a window or a lock: not settled. A silent device
        // that speaks up again is judged by what it says.
        _ => return None,
    };
    (next.0 != record.status || next.1 != record.reason).then_some(next)
}

/// The revert's counterpart of [`judge`].
pub fn judge_revert(progress: &Progress) -> Option<(DeviceStatus, Option<String>)> {
    match progress {
        Progress::Applied => Some((DeviceStatus::Reverted, None)),
        Progress::Failed(_, reasons) | Progress::Rejected(reasons) => {
            Some((DeviceStatus::RevertFailed, Some(reasons_text(reasons))))
        }
        _ => None,
    }
}

fn reasons_text(reasons: &[outpost_core::manifest::Issue]) -> String {
    if reasons.is_empty() {
        return "no reason given".into();
    }
    reasons
        .iter()
        .map(|r| {
            if r.path.is_empty() {
                r.message.clone()
            } else {
                format!("{}: {}", r.path, r.message)
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_core::manifest::Issue;
    use outpost_core::state::DeploymentStatus;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i:02}")).collect()
    }

    fn sizes(w: &[Vec<String>]) -> Vec<usize> {
        w.iter().map(Vec::len).collect()
    }

    #[test]
    fn a_canary_then_growing_waves() {
        let p = Policy {
            canary: 2,
            wave_size: 4,
            growth: 2.0,
            ..Policy::default()
        };
        assert_eq!(sizes(&waves(&names(20), &p)), vec![2, 4, 8, 6]);
        let fixed = Policy {
            canary: 1,
            wave_size: 5,
            growth: 1.0,
            ..Policy::default()
        };
        assert_eq!(sizes(&waves(&names(12), &fixed)), vec![1, 5, 5, 1]);
        let capped = Policy {
            max_wave: 3,
            ..p.clone()
        };
        assert_eq!(sizes(&waves(&names(10), &capped)), vec![2, 3, 3, 2]);
        assert!(waves(&[], &p).is_empty());
    }

    proptest::proptest! {
        /// Every device is in exactly one wave, in the order given, and no wave is empty.
        #[test]
        fn waves_cover_every_device_once(n in 0usize..300, canary in 0usize..10,
                                         size in 0usize..50, growth in 0.5f64..4.0, cap in 0usize..20) {
            let devices = names(n);
            let p = Policy { canary, wave_size: size, growth, max_wave: cap, ..Policy::default() };
            let w = waves(&devices, &p);
            proptest::prop_assert_eq!(w.concat(), devices);
            proptest::prop_assert!(w.iter().all(|w| !w.is_empty()));
            if cap > 0 {
                proptest::prop_assert!(w.iter().all(|w| w.len() <= cap));
            }
        }
    }

    fn record(statuses: &[DeviceStatus], policy: Policy) -> Record {
        Record {
            id: "r".into(),
            deployment: "x".into(),
            version: 2,
            status: Status::Running,
            reason: None,
            policy,
            created_at: 0,
            updated_at: 0,
            owner: None,
            current_wave: 0,
            waves: vec![],
            devices: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    (
                        format!("d{i}"),
                        DeviceRecord {
                            wave: 0,
                            status: *s,
                            digest: "x".into(),
                            revert_digest: None,
                            sent_at: None,
                            settled_at: None,
                            reason: None,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn the_failure_budget() {
        use DeviceStatus::*;
        // The default: the first failure aborts.
        let r = record(&[Applied, Failed, Sent], Policy::default());
        assert!(
            r.abort_reason()
                .unwrap()
                .contains("1 of 2 settled devices failed (d1)")
        );
        assert_eq!(
            record(&[Applied, Sent], Policy::default()).abort_reason(),
            None
        );
        // A count: more than N.
        let two = Policy {
            max_failures: Threshold::Count(2),
            ..Policy::default()
        };
        assert_eq!(
            record(&[Failed, Silent, Applied], two.clone()).abort_reason(),
            None
        );
        assert!(
            record(&[Failed, Silent, Rejected], two)
                .abort_reason()
                .is_some()
        );
        // A share, judged only after min_devices settled.
        let share = Policy {
            max_failures: Threshold::Percent(25),
            min_devices: 4,
            ..Policy::default()
        };
        assert_eq!(
            record(&[Failed, Applied, Sent, Sent], share.clone()).abort_reason(),
            None
        );
        assert_eq!(
            record(&[Failed, Applied, Applied, Applied], share.clone()).abort_reason(),
            None,
            "25% is within a 25% budget"
        );
        assert!(
            record(&[Failed, RolledBack, Applied, Applied], share)
                .abort_reason()
                .is_some()
        );
    }

    #[test]
    fn reports_are_judged_by_what_they_settle() {
        let sent = record(&[DeviceStatus::Sent], Policy::default()).devices["d0"].clone();
        assert_eq!(
            judge(&sent, &Progress::Applied),
            Some((DeviceStatus::Applied, None))
        );
        assert_eq!(
            judge(&sent, &Progress::InProgress(DeploymentStatus::Applying)),
            None
        );
        let reasons = vec![Issue::new("/modules/app", "not allowed")];
        assert_eq!(
            judge(&sent, &Progress::Rejected(reasons)),
            Some((
                DeviceStatus::Rejected,
                Some("/modules/app: not allowed".into())
            ))
        );
        // An applied device whose health window rolls it back counts as failed after all.
        let applied = DeviceRecord {
            status: DeviceStatus::Applied,
            ..sent.clone()
        };
        assert_eq!(
            judge(
                &applied,
                &Progress::Failed(DeploymentStatus::RolledBack, vec![])
            ),
            Some((DeviceStatus::RolledBack, Some("no reason given".into())))
        );
        assert_eq!(judge(&applied, &Progress::Applied), None);
        // Pending devices were never sent anything: a report is not about this rollout.
        let pending = DeviceRecord {
            status: DeviceStatus::Pending,
            ..sent
        };
        assert_eq!(judge(&pending, &Progress::Applied), None);
    }

    #[test]
    fn thresholds_parse() {
        assert_eq!("0".parse::<Threshold>(), Ok(Threshold::Count(0)));
        assert_eq!("10%".parse::<Threshold>(), Ok(Threshold::Percent(10)));
        assert!("101%".parse::<Threshold>().is_err());
        assert!("many".parse::<Threshold>().is_err());
    }
}
