//! The outbox's health as a condition of the reported state (`outbox-degraded`), so the
//! operator sees a device whose telemetry cannot be stored.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::outbox::{Outbox, OutboxHealth};
use crate::state::Condition;

/// How often the outbox's health is looked at for the reported state.
const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// The outbox's health as a condition of the reported state (`outbox-degraded`), kept current
/// by a task of its own.
pub fn watch_outbox(
    outbox: &Outbox,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> watch::Receiver<Vec<Condition>> {
    let (tx, rx) = watch::channel(Vec::new());
    let (outbox, shutdown) = (outbox.clone(), shutdown.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = match outbox.health() {
                OutboxHealth::Ok => Vec::new(),
                OutboxHealth::Degraded { reason, .. } => {
                    vec![Condition {
                        kind: "outbox-degraded".into(),
                        message: format!("telemetry outbox: {reason}"),
                    }]
                }
            };
            tx.send_if_modified(|c| {
                let changed = *c != now;
                *c = now.clone();
                changed
            });
        }
    });
    rx
}
