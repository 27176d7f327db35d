//! `rollout status`: the rollouts on the hub, or one rollout as a table per wave (live with
//! `--watch`), from the records retained on the broker.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::plan::{Record, Status};
use super::run::STALE_AFTER_SECS;
use super::store;
use crate::EXIT_REFUSED;
use crate::hub::Operator;

fn at(record: &Record, secs: Option<u64>) -> String {
    match secs {
        Some(s) => format!("+{} s", s.saturating_sub(record.created_at)),
        None => "-".into(),
    }
}

/// The rollout as text: a heading, one row per wave, and the failures.
pub fn table(record: &Record, devices: bool, now: u64) -> String {
    let mut out = String::new();
    let p = &record.policy;
    let wave = if record.status.is_final() {
        String::new()
    } else {
        format!(
            ", wave {} of {}",
            record
                .current_wave
                .min(record.waves.len().saturating_sub(1)),
            record.waves.len()
        )
    };
    let _ = writeln!(
        out,
        "rollout {}: {} v{} — {}{wave}",
        record.id,
        record.deployment,
        record.version,
        record.status.name()
    );
    if let Some(reason) = &record.reason {
        let _ = writeln!(out, "  {reason}");
    }
    if let Some(o) = &record.owner {
        let age = now.saturating_sub(o.heartbeat_at);
        let live = matches!(record.status, Status::Running | Status::Reverting);
        let _ = writeln!(
            out,
            "  runner {}:{}, heartbeat {age} s ago{}",
            o.host,
            o.pid,
            if live && age >= STALE_AFTER_SECS {
                " (stale: `outpost-ctl rollout resume` takes over)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "  canary {}, then {} growing ×{}{}; {}",
        p.canary,
        p.wave_size,
        p.growth,
        if p.max_wave > 0 {
            format!(" up to {}", p.max_wave)
        } else {
            String::new()
        },
        p.summary()
    );
    let _ = writeln!(
        out,
        "{:<5} {:>7} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9}",
        "WAVE",
        "DEVICES",
        "APPLIED",
        "FAILED",
        "IN FLIGHT",
        "PENDING",
        "REVERTED",
        "STARTED",
        "FINISHED"
    );
    for (i, w) in record.waves.iter().enumerate() {
        let t = record.tally(Some(i));
        let _ = writeln!(
            out,
            "{:<5} {:>7} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9} {:>9}",
            i,
            t.total,
            t.applied,
            t.failed,
            t.in_flight,
            t.pending,
            t.reverted,
            at(record, w.started_at),
            at(record, w.finished_at)
        );
    }
    let t = record.tally(None);
    let _ = writeln!(
        out,
        "{:<5} {:>7} {:>8} {:>7} {:>9} {:>8} {:>9}",
        "all", t.total, t.applied, t.failed, t.in_flight, t.pending, t.reverted
    );
    let failed: Vec<_> = record
        .devices
        .iter()
        .filter(|(_, d)| d.status.is_failure() || d.status.name() == "revert-failed")
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "failures:");
        for (name, d) in failed.iter().take(20) {
            let _ = writeln!(
                out,
                "  {name} (wave {}): {}{}",
                d.wave,
                d.status.name(),
                d.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        if failed.len() > 20 {
            let _ = writeln!(out, "  ... and {} more", failed.len() - 20);
        }
    }
    if devices {
        let _ = writeln!(
            out,
            "{:<32} {:>4}  {:<13} {:>9}  REASON",
            "DEVICE", "WAVE", "STATUS", "SETTLED"
        );
        for (name, d) in &record.devices {
            let _ = writeln!(
                out,
                "{:<32} {:>4}  {:<13} {:>9}  {}",
                name,
                d.wave,
                d.status.name(),
                at(record, d.settled_at),
                d.reason.as_deref().unwrap_or("")
            );
        }
    }
    out
}

/// Every rollout on the hub, one line each.
pub async fn list(mut op: Operator, json: bool) -> Result<u8> {
    let prefix = op.prefix().to_string();
    let messages = op
        .snapshot(
            &[format!("{prefix}/_rollouts/+/state")],
            Duration::from_secs(30),
        )
        .await?;
    let records: Vec<Record> = messages
        .iter()
        .filter(|m| !m.payload.is_empty())
        .filter_map(|m| store::parse_record(m).ok())
        .collect();
    if json {
        println!("{}", serde_json::to_string(&records)?);
        return Ok(0);
    }
    if records.is_empty() {
        println!("no rollouts on this hub");
        return Ok(0);
    }
    println!(
        "{:<28} {:<24} {:<10} {:>6} {:>8} {:>7} {:>8}",
        "ROLLOUT", "DEPLOYMENT", "STATUS", "WAVE", "DEVICES", "APPLIED", "FAILED"
    );
    for r in &records {
        let t = r.tally(None);
        println!(
            "{:<28} {:<24} {:<10} {:>6} {:>8} {:>7} {:>8}",
            r.id,
            format!("{} v{}", r.deployment, r.version),
            r.status.name(),
            format!("{}/{}", r.current_wave.min(r.waves.len()), r.waves.len()),
            t.total,
            t.applied,
            t.failed
        );
    }
    Ok(0)
}

/// One rollout's table; with `watch`, again on every change until it ends.
pub async fn status(
    mut op: Operator,
    id: &str,
    watch: bool,
    devices: bool,
    json: bool,
    stop: CancellationToken,
) -> Result<u8> {
    let prefix = op.prefix().to_string();
    let topic = store::state_topic(&prefix, id);
    let messages = op
        .snapshot(std::slice::from_ref(&topic), Duration::from_secs(30))
        .await?;
    let Some(m) = messages
        .iter()
        .rev()
        .find(|m| m.topic == topic && !m.payload.is_empty())
    else {
        eprintln!("no rollout {id} on this hub; `outpost-ctl rollout status` lists them");
        return Ok(EXIT_REFUSED);
    };
    let mut record = store::parse_record(m)?;
    let show = |r: &Record| {
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        } else {
            print!("{}", table(r, devices, outpost_core::time::unix_now()));
        }
    };
    show(&record);
    if !watch {
        return Ok(if record.status == Status::Completed {
            0
        } else if record.status.is_final() {
            EXIT_REFUSED
        } else {
            0
        });
    }
    while !record.status.is_final() {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let m = tokio::select! {
            _ = stop.cancelled() => return Ok(0),
            m = op.recv_until(deadline) => m?,
        };
        let Some(m) = m else { continue };
        if m.topic != topic || m.payload.is_empty() {
            continue;
        }
        let Ok(next) = store::parse_record(&m) else {
            continue;
        };
        // The heartbeat alone is not a change worth printing.
        let quiet = |r: &Record| Record {
            owner: None,
            updated_at: 0,
            ..r.clone()
        };
        if quiet(&next) != quiet(&record) {
            record = next;
            if !json {
                println!();
            }
            show(&record);
        }
    }
    Ok(if record.status == Status::Completed {
        0
    } else {
        EXIT_REFUSED
    })
}
