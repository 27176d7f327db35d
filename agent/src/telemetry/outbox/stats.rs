//! What the outbox reports about itself: counters for metrics ([`OutboxStats`], with drops by
//! [`DropReason`]) and its health for the reported state.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::commit::DISK_HIGH_FLOOR;
use super::{Outbox, OutboxError, OutboxHealth};

/// Why records were dropped; each has its own counter, stored in the file under
/// [`DropReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Room was made under the byte limit.
    Full,
    /// Older than the age limit.
    Expired,
    /// Larger than a record may be.
    TooLarge,
    /// Room was made while the disk was above its high watermark.
    Disk,
}

impl DropReason {
    /// Every reason, in the order of the arrays that hold one count per reason.
    pub const ALL: [DropReason; 4] = [
        DropReason::Full,
        DropReason::Expired,
        DropReason::TooLarge,
        DropReason::Disk,
    ];

    /// The name in metrics (`reason` label, `droppedTotal` key) and in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Full => "full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too-large",
            DropReason::Disk => "disk",
        }
    }

    /// Its place in [`DropReason::ALL`], and so in arrays of one count per reason.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub enqueued_total: u64,
    pub delivered_total: u64,
    pub dropped_total: BTreeMap<String, u64>,
}

impl Outbox {
    pub fn stats(&self) -> OutboxStats {
        let streams = self.shared.streams();
        OutboxStats {
            records: streams.values().map(|s| s.records).sum(),
            bytes: streams.values().map(|s| s.bytes).sum(),
            max_bytes: self.shared.limits.max_bytes,
            enqueued_total: self.shared.enqueued.load(Ordering::Relaxed),
            delivered_total: self.shared.delivered.load(Ordering::Relaxed),
            dropped_total: DropReason::ALL
                .iter()
                .zip(&self.shared.dropped)
                .map(|(r, c)| (r.as_str().to_string(), c.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// The error every enqueue gets at once now, while the file is being reopened after an
    /// I/O error; `None` when records are accepted (they may still be refused one by one for
    /// room).
    pub fn refusing(&self) -> Option<OutboxError> {
        self.shared.refusal()
    }

    /// `Ok`, or what is wrong and since when: the file closed after an I/O error (records are
    /// refused), else the disk above its watermark (records make room or are refused).
    pub fn health(&self) -> OutboxHealth {
        let c = self.shared.condition();
        if let Some((e, since)) = &c.down {
            let reason = match e {
                OutboxError::NoSpace { .. } => "no space left on device".to_string(),
                e => e.to_string(),
            };
            return OutboxHealth::Degraded {
                reason,
                since_wall_ms: *since,
            };
        }
        if let Some((used, since)) = c.disk_high {
            return OutboxHealth::Degraded {
                reason: format!(
                    "disk {used}% full, above the {}% high watermark: the outbox stops growing (it keeps taking records up to {} KiB)",
                    self.shared.limits.disk_high_percent,
                    self.shared.limits.max_bytes.min(DISK_HIGH_FLOOR) / 1024
                ),
                since_wall_ms: since,
            };
        }
        OutboxHealth::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_keep_their_names_and_places() {
        let names = DropReason::ALL.map(DropReason::as_str);
        assert_eq!(names, ["full", "expired", "too-large", "disk"]);
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }
}
