//! `status` and `watch`: the fleet as its devices' retained state and presence say, once as a
//! table (or per group, how far its deployment got), or change by change.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use outpost_core::state::ReportedState;
use outpost_core::wire::topics::{self, is_level};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::EXIT_REFUSED;
use crate::deploy::reasons;
use crate::hub::{
    DeviceView, Message, Operator, Progress, describe_deployment, fold, group_summary, source_name,
    status_name,
};

async fn fleet(op: &mut Operator, device: Option<&str>) -> Result<BTreeMap<String, DeviceView>> {
    let prefix = op.prefix().to_string();
    let who = device.unwrap_or("+");
    if device.is_some_and(|d| !is_level(d)) {
        bail!("--device `{who}` is not a valid device id");
    }
    let messages: Vec<Message> = op
        .snapshot(
            &[
                topics::device_topic(&prefix, who, "state"),
                topics::device_topic(&prefix, who, "presence"),
            ],
            Duration::from_secs(10),
        )
        .await?;
    let mut views = BTreeMap::new();
    fold(&prefix, &messages, &mut views);
    Ok(views)
}

fn row(v: &DeviceView) -> Value {
    let s = v.state.as_ref();
    let d = s.and_then(|s| s.deployment.as_ref());
    json!({
        "device": v.device,
        "online": v.online(),
        "groups": v.presence.as_ref().map(|p| p.groups.clone()).unwrap_or_default(),
        "deployment": d.map(|d| json!({"id": d.id, "version": d.version, "status": status_name(d.status), "source": source_name(&d.source), "waiting": d.waiting})),
        "modules": s.map(|s| s.modules.len()),
        "running": s.map(|s| s.modules.values().filter(|m| m.status == outpost_core::state::ModuleStatus::Running).count()),
        "lastRejected": s.and_then(|s| s.last_rejected.as_ref()).map(|r| json!({"id": r.id, "version": r.version, "reasons": r.reasons})),
        "agent": s.map(|s| json!({"version": s.agent.version, "slot": s.agent.slot, "update": s.agent.update})),
        "unreadable": v.unreadable,
    })
}

/// The deployment's status; a waiting one says for what (`waiting:window`, `waiting:lock`).
fn status_cell(d: &outpost_core::state::DeploymentReport) -> String {
    use outpost_core::state::WaitReason;
    match d.waiting.as_ref().map(|w| w.reason) {
        Some(WaitReason::UpdateWindow) => "waiting:window".into(),
        Some(WaitReason::UpdateLock) => "waiting:lock".into(),
        None => status_name(d.status),
    }
}

/// `0.2.0`, or `0.1.0 → 0.2.0 downloading 42%` while an update is under way, `0.1.0 (0.2.0
/// rolled-back)` after one that did not take.
fn agent_cell(agent: &outpost_core::state::AgentFacts) -> String {
    use outpost_core::state::UpdatePhase::*;
    let Some(u) = &agent.update else {
        return agent.version.clone();
    };
    let phase = serde_json::to_value(u.phase)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    match u.phase {
        Committed if u.version == agent.version => agent.version.clone(),
        Downloading => {
            let pct = match (u.downloaded_bytes, u.total_bytes) {
                (Some(d), Some(t)) if t > 0 => format!(" {}%", d * 100 / t),
                _ => String::new(),
            };
            format!("{} → {} {phase}{pct}", agent.version, u.version)
        }
        Verifying | Switching | Probation => format!("{} → {} {phase}", agent.version, u.version),
        _ => format!("{} ({} {phase})", agent.version, u.version),
    }
}

pub(crate) async fn status(mut op: Operator, device: Option<&str>, json_out: bool) -> Result<u8> {
    let views = fleet(&mut op, device).await?;
    if json_out {
        let rows: Vec<Value> = views.values().map(row).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if views.is_empty() {
        println!("no device has reported to this hub");
        return Ok(if device.is_some() { EXIT_REFUSED } else { 0 });
    }
    println!(
        "{:<24} {:<8} {:<28} {:<14} {:<14} {:<8} {:<24} LAST REJECTED",
        "DEVICE", "ONLINE", "DEPLOYMENT", "STATUS", "SOURCE", "MODULES", "AGENT"
    );
    for v in views.values() {
        let s = v.state.as_ref();
        let d = s.and_then(|s| s.deployment.as_ref());
        let online = match v.online() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let modules = s
            .map(|s| {
                format!(
                    "{}/{}",
                    s.modules
                        .values()
                        .filter(|m| m.status == outpost_core::state::ModuleStatus::Running)
                        .count(),
                    s.modules.len()
                )
            })
            .unwrap_or_else(|| "-".into());
        let rejected = s
            .and_then(|s| s.last_rejected.as_ref())
            .map(|r| {
                format!(
                    "{} v{}: {}",
                    r.id,
                    r.version,
                    r.reasons.first().map(|i| i.to_string()).unwrap_or_default()
                )
            })
            .or_else(|| v.unreadable.clone())
            .unwrap_or_default();
        let agent = s
            .map(|s| agent_cell(&s.agent))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<8} {:<28} {:<14} {:<14} {:<8} {:<24} {}",
            v.device,
            online,
            d.map(|d| format!("{} v{}", d.id, d.version))
                .unwrap_or_else(|| "-".into()),
            d.map(status_cell).unwrap_or_else(|| "-".into()),
            d.map(|d| source_name(&d.source))
                .unwrap_or_else(|| "-".into()),
            modules,
            agent,
            rejected
        );
    }
    Ok(0)
}

pub(crate) async fn group_status(mut op: Operator, group: &str, json_out: bool) -> Result<u8> {
    if !is_level(group) {
        bail!("--group `{group}` is not a valid group name");
    }
    let prefix = op.prefix().to_string();
    let deployment_msgs = op
        .snapshot(
            &[topics::group_deployment(&prefix, group)],
            Duration::from_secs(10),
        )
        .await?;
    let deployment = deployment_msgs
        .last()
        .and_then(|m| describe_deployment(&m.payload));
    let views = fleet(&mut op, None).await?;
    let summary = group_summary(group, deployment.clone(), &views);
    let applied = summary.count(|p| *p == Progress::Applied);
    let failed = summary.count(|p| matches!(p, Progress::Failed(..) | Progress::Rejected(_)));
    let overridden = summary.count(|p| matches!(p, Progress::Overridden(_)));
    let pending = summary.count(|p| !p.is_final());
    let offline = summary.offline();
    if json_out {
        let members: Vec<Value> = summary
            .members
            .iter()
            .map(|(d, online, p)| json!({"device": d, "online": online, "progress": p.label(), "reasons": reasons(p)}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "group": group,
                "deployment": deployment.as_ref().map(|(id, v, digest)| json!({"id": id, "version": v, "digest": digest})),
                "devices": summary.members.len(),
                "applied": applied, "failed": failed, "overridden": overridden, "pending": pending, "offline": offline,
                "members": members,
            }))?
        );
        return Ok(0);
    }
    match &deployment {
        Some((id, v, _)) => println!("group {group}: deployment {id} v{v}"),
        None => println!("group {group}: no deployment published"),
    }
    println!(
        "{} devices: {applied} applied, {failed} failed, {overridden} overridden, {pending} pending, {offline} offline",
        summary.members.len()
    );
    for (d, online, p) in &summary.members {
        println!(
            "  {d:<24} {:<8} {}",
            if *online == Some(true) {
                "online"
            } else {
                "offline"
            },
            p.label()
        );
    }
    Ok(0)
}

pub(crate) async fn watch(
    mut op: Operator,
    device: Option<&str>,
    count: Option<usize>,
    json_out: bool,
) -> Result<u8> {
    let prefix = op.prefix().to_string();
    let who = device.unwrap_or("+");
    op.subscribe(&[
        topics::device_topic(&prefix, who, "state"),
        topics::device_topic(&prefix, who, "presence"),
    ])
    .await?;
    let mut views = BTreeMap::new();
    let mut printed = 0usize;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            m = op.recv_until(far) => m?,
        };
        let Some(m) = message else { continue };
        fold(&prefix, std::slice::from_ref(&m), &mut views);
        let Some(device) = topics::device_of(&prefix, &m.topic, "state")
            .or_else(|| topics::device_of(&prefix, &m.topic, "presence"))
        else {
            continue;
        };
        let Some(v) = views.get(device) else { continue };
        if json_out {
            println!(
                "{}",
                json!({"topic": m.topic, "retained": m.retain, "device": row(v)})
            );
        } else {
            let summary = v
                .state
                .as_ref()
                .and_then(|s: &ReportedState| s.deployment.as_ref())
                .map(|d| {
                    format!(
                        "{} v{} {} ({})",
                        d.id,
                        d.version,
                        status_name(d.status),
                        source_name(&d.source)
                    )
                })
                .unwrap_or_else(|| "no deployment".into());
            let online = match v.online() {
                Some(true) => "online",
                Some(false) => "offline",
                None => "presence unknown",
            };
            println!(
                "{device}: {online}, {summary}{}",
                if m.retain { " [retained]" } else { "" }
            );
        }
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_core::state::{DeploymentReport, DeploymentStatus, Source, WaitReason, Waiting};

    #[test]
    fn a_waiting_deployment_says_for_what_in_the_table() {
        let mut d = DeploymentReport {
            id: "x".into(),
            version: 2,
            status: DeploymentStatus::Waiting,
            source: Source::Device,
            reasons: vec![],
            digest: None,
            updated_at: 0,
            waiting: Some(Waiting {
                reason: WaitReason::UpdateLock,
                opens_at: None,
                modules: vec!["app".into()],
                deadline: Some(1),
                message: "waiting for the update lock of `app`".into(),
            }),
        };
        assert_eq!(status_cell(&d), "waiting:lock");
        d.waiting.as_mut().unwrap().reason = WaitReason::UpdateWindow;
        assert_eq!(status_cell(&d), "waiting:window");
        d.waiting = None;
        d.status = DeploymentStatus::Applied;
        assert_eq!(status_cell(&d), "applied");
    }
}
