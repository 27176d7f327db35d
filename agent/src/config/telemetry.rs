//! `[telemetry]`: how often the agent reports, the outbox's bounds, and the loopback-only
//! metrics endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use super::TelemetryConfig;
use super::raw::RawTelemetry;
use super::validate::Issues;

pub(super) fn telemetry(t: RawTelemetry, issues: &mut Issues) -> TelemetryConfig {
    let interval_secs = t.interval_secs.unwrap_or(60);
    if interval_secs == 0 {
        issues.push("telemetry.interval_secs", "must be at least 1");
    }
    let metrics_listen = t
        .metrics_listen
        .and_then(|m| match m.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(addr),
            Ok(_) => {
                issues.push(
                    "telemetry.metrics_listen",
                    format!("`{m}` is not a loopback address; metrics are served on loopback only"),
                );
                None
            }
            Err(_) => {
                issues.push(
                    "telemetry.metrics_listen",
                    format!("`{m}` is not an address:port"),
                );
                None
            }
        });
    let outbox_max_bytes = t.outbox_max_bytes.unwrap_or(64 * 1024 * 1024);
    if outbox_max_bytes < 64 * 1024 {
        issues.push(
            "telemetry.outbox_max_bytes",
            format!("{outbox_max_bytes} is below the minimum of 65536 (64 KiB)"),
        );
    }
    let outbox_max_age_secs = t.outbox_max_age_secs.unwrap_or(7 * 24 * 3600);
    if outbox_max_age_secs < 60 {
        issues.push(
            "telemetry.outbox_max_age_secs",
            format!("{outbox_max_age_secs} is below the minimum of 60"),
        );
    }
    TelemetryConfig {
        interval: Duration::from_secs(interval_secs),
        outbox_max_bytes,
        outbox_max_age: Duration::from_secs(outbox_max_age_secs),
        metrics_listen,
    }
}
