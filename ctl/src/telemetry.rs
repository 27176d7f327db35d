//! `telemetry`: a device's telemetry as it arrives, duplicates (by record id) left out, the
//! agent's metrics as one summary line per snapshot.

use std::time::Duration;

use anyhow::{Result, bail};
use outpost_core::wire::topics::{self, is_level};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::hub::Operator;

pub(crate) async fn telemetry(
    mut op: Operator,
    device: &str,
    stream: Option<&str>,
    count: Option<usize>,
    json_out: bool,
) -> Result<u8> {
    if !is_level(device) || stream.is_some_and(|s| !is_level(s)) {
        bail!("--device and --stream must be one topic level each (no `/`, `+` or `#`)");
    }
    let prefix = op.prefix().to_string();
    let leaf = format!("telemetry/{}", stream.unwrap_or("+"));
    op.subscribe(&[topics::device_topic(&prefix, device, &leaf)])
        .await?;
    let mut seen = std::collections::HashSet::new();
    let mut printed = 0usize;
    let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(0),
            m = op.recv_until(far) => m?,
        };
        let Some(m) = message else { continue };
        let batch: outpost_core::wire::telemetry::ReceivedBatch =
            match serde_json::from_slice(&m.payload) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("{}: not a telemetry batch ({e}); skipped", m.topic);
                    continue;
                }
            };
        for r in batch.records {
            if !seen.insert(r.id) {
                continue;
            }
            if json_out {
                println!(
                    "{}",
                    json!({"stream": batch.stream, "id": r.id, "ts": r.ts, "topic": r.topic,
                           "body": r.body, "bodyBase64": r.body_base64})
                );
            } else if batch.stream == outpost_core::wire::telemetry::METRICS_STREAM
                && let Some(body) = &r.body
            {
                println!("{}", metrics_line(body));
            } else {
                let body = match (&r.body, &r.body_base64) {
                    (Some(b), _) => b.to_string(),
                    (None, Some(b64)) => format!("base64:{b64}"),
                    (None, None) => String::new(),
                };
                println!("{} #{} {} {body}", batch.stream, r.id, r.topic);
            }
            printed += 1;
            if count.is_some_and(|c| printed >= c) {
                return Ok(0);
            }
        }
    }
}

/// One metrics snapshot as a line an operator reads at a glance.
fn metrics_line(m: &Value) -> String {
    let gib = |v: &Value| v.as_f64().map(|b| b / (1u64 << 30) as f64);
    let d = &m["device"];
    let a = &m["agent"];
    let mut parts = Vec::new();
    if let Some(cpu) = d["cpuPercent"].as_f64() {
        parts.push(format!("cpu {cpu:.0}%"));
    }
    if let (Some(avail), Some(total)) =
        (gib(&d["memoryAvailableBytes"]), gib(&d["memoryTotalBytes"]))
    {
        parts.push(format!("mem {:.1}/{total:.1} GiB used", total - avail));
    }
    if let (Some(avail), Some(total)) = (gib(&d["diskAvailableBytes"]), gib(&d["diskTotalBytes"])) {
        parts.push(format!("disk {avail:.1} GiB free of {total:.1}"));
    }
    if let Some(t) = d["temperatureCelsius"].as_f64() {
        parts.push(format!("{t:.0}°C"));
    }
    let dropped: u64 = a["droppedTotal"]
        .as_object()
        .map(|o| o.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    parts.push(format!(
        "outbox {} records, {dropped} dropped",
        a["outboxRecords"].as_u64().unwrap_or(0)
    ));
    let modules: Vec<String> = m["modules"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(name, v)| {
                    let mut s = format!("{name} {}", v["status"].as_str().unwrap_or("?"));
                    if let Some(cpu) = v["cpuPercent"].as_f64() {
                        s.push_str(&format!(" {cpu:.0}%"));
                    }
                    if let Some(mem) = v["memoryBytes"].as_f64() {
                        s.push_str(&format!(" {:.0} MiB", mem / (1u64 << 20) as f64));
                    }
                    s
                })
                .collect()
        })
        .unwrap_or_default();
    if !modules.is_empty() {
        parts.push(format!("modules: {}", modules.join(", ")));
    }
    format!(
        "{} metrics: {}",
        m["deviceId"].as_str().unwrap_or("?"),
        parts.join(" · ")
    )
}
