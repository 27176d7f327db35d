//! The health gate of an agent on trial: it is kept only once it has connected to the hub
//! (when one is configured), completed a reconcile pass (it reached the engine and its
//! modules), and run for `update.probation_secs`. Then it commits itself in the update record
//! and exits; its launcher starts it again as the device's agent. Until then it writes what it
//! still waits for to `agent/probation.json`, so that the launcher can say why, if the time
//! runs out.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::record::{Paths, Slot};
use super::{AgentStatus, Handover};
use crate::state::{AgentUpdate, UpdatePhase};

/// What the gate still waits for, as written to `probation.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probation {
    pub waiting_for: Vec<String>,
}

pub struct Context {
    pub paths: Paths,
    pub slot: Slot,
    pub version: String,
    pub probation: Duration,
    /// The hub link's session (0 while not connected); `None` without a hub.
    pub hub: Option<watch::Receiver<u64>>,
    /// Reconcile passes that reached the engine.
    pub passes: watch::Receiver<u64>,
    pub status: watch::Sender<AgentStatus>,
    pub handover: Handover,
}

/// What is missing, from what was seen so far; `probation` while it has not run long enough.
pub fn waiting_for(hub: Option<bool>, passed: bool, probation: Option<Duration>) -> Vec<String> {
    let mut w = Vec::new();
    if hub == Some(false) {
        w.push("a connection to the hub".to_string());
    }
    if !passed {
        w.push("a completed reconcile pass (the engine and the modules)".to_string());
    }
    if let Some(p) = probation {
        w.push(format!("its probation time ({} s of running)", p.as_secs()));
    }
    w
}

/// Runs the gate until it passes (then commits and hands over) or the agent stops.
pub async fn run(mut ctx: Context, shutdown: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut connected = ctx.hub.as_ref().map(|_| false);
    let mut passed = false;
    let mut written: Option<Probation> = None;
    loop {
        if let Some(rx) = &ctx.hub
            && *rx.borrow() != 0
        {
            connected = Some(true);
        }
        passed |= *ctx.passes.borrow() > 0;
        let left = ctx.probation.saturating_sub(started.elapsed());
        let waiting = waiting_for(
            connected,
            passed,
            (!left.is_zero()).then_some(ctx.probation),
        );
        if waiting.is_empty() {
            commit(&ctx);
            return;
        }
        let p = Probation {
            waiting_for: waiting.clone(),
        };
        if written.as_ref() != Some(&p) {
            let bytes = serde_json::to_vec(&p).unwrap_or_default();
            if let Err(e) = crate::fsutil::write_atomic(&ctx.paths.probation(), &bytes, 0o600) {
                error!(error = %e, "cannot write the probation file");
            }
            ctx.status.send_replace(AgentStatus {
                slot: ctx.slot,
                update: Some(AgentUpdate {
                    version: ctx.version.clone(),
                    phase: UpdatePhase::Probation,
                    reason: Some(format!("waiting for {}", waiting.join(", "))),
                    downloaded_bytes: None,
                    total_bytes: None,
                }),
            });
            written = Some(p);
        }
        let hub_changed = async {
            match ctx.hub.as_mut() {
                Some(rx) if connected == Some(false) => rx.changed().await.is_ok(),
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hub_changed => {}
            Ok(()) = ctx.passes.changed(), if !passed => {}
            _ = tokio::time::sleep(left), if !left.is_zero() => {}
        }
    }
}

fn commit(ctx: &Context) {
    let mut record = match ctx.paths.read() {
        Ok(Some(r)) => r,
        other => {
            error!(?other, "the update record is gone; the launcher decides");
            ctx.handover.request();
            return;
        }
    };
    if record
        .trial
        .as_ref()
        .is_none_or(|t| t.build.slot != ctx.slot || t.build.version != ctx.version)
    {
        error!("this agent is no longer the one on trial; the launcher decides");
        ctx.handover.request();
        return;
    }
    record.commit(outpost_core::time::unix_now());
    if let Err(e) = ctx.paths.write(&record) {
        // Not committed: the launcher will time the trial out, and roll back.
        error!(error = %e, "cannot commit the new agent");
        return;
    }
    let _ = std::fs::remove_file(ctx.paths.probation());
    info!(version = %ctx.version, slot = ctx.slot.name(),
        "the new agent passed its health gate and is committed; handing over to run it for good");
    ctx.status.send_replace(AgentStatus {
        slot: ctx.slot,
        update: Some(AgentUpdate {
            version: ctx.version.clone(),
            phase: UpdatePhase::Committed,
            reason: None,
            downloaded_bytes: None,
            total_bytes: None,
        }),
    });
    ctx.handover.request();
}

/// What the agent on trial was still waiting for, from its probation file, for the launcher's
/// rollback reason.
pub fn what_it_lacked(path: &Path) -> String {
    match std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Probation>(&b).ok())
    {
        Some(p) if !p.waiting_for.is_empty() => {
            format!("it was still waiting for {}", p.waiting_for.join(", "))
        }
        Some(_) => "it met every condition but did not commit".to_string(),
        None => "it never reported on its gate (stuck before it started)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_names_what_it_waits_for() {
        assert_eq!(
            waiting_for(Some(false), false, Some(Duration::from_secs(30))),
            [
                "a connection to the hub",
                "a completed reconcile pass (the engine and the modules)",
                "its probation time (30 s of running)"
            ]
        );
        assert!(waiting_for(Some(true), true, None).is_empty());
        assert!(
            waiting_for(None, true, None).is_empty(),
            "no hub, nothing to wait for there"
        );
    }

    #[test]
    fn the_launcher_reads_what_was_lacking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probation.json");
        assert!(what_it_lacked(&path).contains("never reported"));
        let p = Probation {
            waiting_for: vec!["a connection to the hub".into()],
        };
        std::fs::write(&path, serde_json::to_vec(&p).unwrap()).unwrap();
        assert_eq!(
            what_it_lacked(&path),
            "it was still waiting for a connection to the hub"
        );
    }
}
