//! Reported state and presence, both retained so that anyone subscribing later (the
//! operator's `outpost-ctl status`) sees the latest.
//!
//! State is published when the agent's state changes, when the hub link records a refusal,
//! and after every reconnect; at most once per [`DEBOUNCE`] (the first change after a quiet
//! spell at once, later ones of a burst gathered), and an unchanged state is not sent twice on
//! the same connection (a change of `agent.uptimeSecs` alone does not count as a change). Presence says `{"online": true, ...}` after each
//! connect; the last will, registered with the broker at connect, says `{"online": false}`.

use std::time::Duration;

use rumqttc::{AsyncClient, LastWill, QoS};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::topics::Topics;
use crate::state::{DeploymentReport, ReportedState};
pub use outpost_core::wire::presence::{Presence, presence};

/// The shortest time between two state publications: changes within it are gathered.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The will the broker publishes when the device disappears without saying goodbye.
pub fn last_will(topics: &Topics) -> LastWill {
    LastWill::new(
        topics.presence(),
        br#"{"online":false}"#.to_vec(),
        QoS::AtLeastOnce,
        true,
    )
}

/// The agent's state with the hub link's own last refusal, whichever refusal is newer.
pub fn merged(state: &ReportedState, rejected: Option<&DeploymentReport>) -> ReportedState {
    let mut out = state.clone();
    if let Some(r) = rejected
        && out
            .last_rejected
            .as_ref()
            .is_none_or(|mine| r.updated_at >= mine.updated_at)
    {
        out.last_rejected = Some(r.clone());
    }
    out
}

pub struct Context {
    pub client: AsyncClient,
    pub topics: Topics,
    pub state: watch::Receiver<ReportedState>,
    pub rejected: watch::Receiver<Option<DeploymentReport>>,
    /// 0 while disconnected, else the connection's number.
    pub session: watch::Receiver<u64>,
}

/// Runs until `stop` is cancelled.
pub async fn run(mut ctx: Context, stop: CancellationToken) {
    // The session and the state (without uptime) last published.
    let mut last: Option<(u64, Vec<u8>)> = None;
    let mut published_at: Option<tokio::time::Instant> = None;
    let mut agent_alive = true;
    let mut link_alive = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = ctx.state.changed(), if agent_alive => agent_alive = r.is_ok(),
            r = ctx.rejected.changed(), if link_alive => link_alive = r.is_ok(),
            r = ctx.session.changed() => if r.is_err() { return },
        }
        // Rate limit rather than plain debounce: the first change after a quiet spell goes
        // out at once (a deployment's `applied` should not wait), the rest of a burst is
        // gathered until DEBOUNCE has passed since the last publication.
        if let Some(at) = published_at {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(at + DEBOUNCE) => {}
            }
        }
        let session = *ctx.session.borrow_and_update();
        if session == 0 {
            continue;
        }
        let state = merged(
            &ctx.state.borrow_and_update(),
            ctx.rejected.borrow_and_update().as_ref(),
        );
        let bytes = match serde_json::to_vec(&state) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reported state does not serialize");
                continue;
            }
        };
        // A change of the uptime alone is not news: an agent that refreshes it every second
        // would otherwise have its state republished ten times a second.
        let key = {
            let mut without_uptime = state.clone();
            without_uptime.agent.uptime_secs = 0;
            serde_json::to_vec(&without_uptime).unwrap_or_else(|_| bytes.clone())
        };
        if last
            .as_ref()
            .is_some_and(|(s, k)| *s == session && *k == key)
        {
            continue;
        }
        let published = tokio::select! {
            _ = stop.cancelled() => return,
            r = ctx.client.publish(ctx.topics.state(), QoS::AtLeastOnce, true, bytes.clone()) => r,
        };
        match published {
            Ok(()) => {
                tracing::debug!(session, bytes = bytes.len(), "state published");
                last = Some((session, key));
                published_at = Some(tokio::time::Instant::now());
            }
            Err(e) => {
                tracing::warn!(error = %e, "the MQTT client is gone; reporting stops");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AgentFacts, DeploymentStatus, Source};

    fn report(updated_at: u64) -> DeploymentReport {
        DeploymentReport {
            id: "d".into(),
            version: 1,
            status: DeploymentStatus::Rejected,
            source: Source::Device,
            reasons: vec![],
            digest: None,
            updated_at,
            waiting: None,
        }
    }

    #[test]
    fn the_newer_refusal_is_reported() {
        let mut state = ReportedState {
            device_id: "a".into(),
            deployment: None,
            last_rejected: Some(report(10)),
            last_good: None,
            modules: Default::default(),
            agent: AgentFacts::local(0),
            conditions: vec![],
        };
        assert_eq!(
            merged(&state, Some(&report(5))).last_rejected,
            Some(report(10))
        );
        assert_eq!(
            merged(&state, Some(&report(11))).last_rejected,
            Some(report(11))
        );
        state.last_rejected = None;
        assert_eq!(
            merged(&state, Some(&report(1))).last_rejected,
            Some(report(1))
        );
    }

    #[test]
    fn presence_says_online_and_groups() {
        let p: Presence = serde_json::from_slice(&presence(true, &["g".into()])).unwrap();
        assert!(p.online);
        assert_eq!(p.groups, ["g"]);
    }
}
