//! The configuration as the bundle shows it: every setting the agent runs with, files by their
//! paths only. The contents of the password files and keys are never read into it; the file
//! itself is not copied either, since a comment in it could hold anything.

use serde_json::{Value, json};

use crate::config::Config;

fn path(p: &std::path::Path) -> Value {
    Value::String(p.display().to_string())
}

/// The effective configuration (file and `OUTPOST__*` variables, validated) as JSON.
pub fn config_json(c: &Config) -> Value {
    let hub = c.hub.as_ref().map(|h| {
        json!({
            "url": h.url.to_string(),
            "failoverUrls": h.failover.iter().map(|(host, port)| format!("{host}:{port}")).collect::<Vec<_>>(),
            "tls": h.tls,
            "caFile": h.ca_file.as_deref().map(path),
            "certFile": h.client_auth.as_ref().map(|(cert, _)| path(cert)),
            "keyFile": h.client_auth.as_ref().map(|(_, key)| path(key)),
            "username": h.credentials.as_ref().map(|(user, _)| user.clone()),
            "passwordFile": h.credentials.as_ref().map(|(_, file)| path(file)),
            "topicPrefix": h.topic_prefix,
            "groups": h.groups,
            "keepAliveSecs": h.keep_alive.as_secs(),
            "reconnectMaxSecs": h.reconnect_max.as_secs(),
        })
    });
    let p = &c.policy;
    json!({
        "source": path(&c.source),
        "deviceId": c.device_id,
        "stateDir": path(&c.state_dir),
        "logLevel": c.log_level,
        "hub": hub,
        "runtime": {
            "dockerSocket": path(&c.runtime.docker_socket),
            "stopGraceSecs": c.runtime.stop_grace.as_secs(),
            "maxConcurrentPulls": c.runtime.max_concurrent_pulls,
            "maxParallelActions": c.runtime.max_parallel_actions,
            "imageGcAfterSecs": c.runtime.image_gc_after.as_secs(),
        },
        "disk": {
            "highWatermarkPercent": c.disk.high_watermark_percent,
            "pullReserveBytes": c.disk.pull_reserve_bytes,
            "storeReserveBytes": c.disk.store_reserve_bytes,
        },
        "policy": {
            "trustedKeyFiles": p.trusted_key_files.iter().map(|f| path(f)).collect::<Vec<_>>(),
            "trustedKeyIds": p.trusted_keys.ids(),
            "allowedRegistries": p.allowed_registries,
            "allowPrivileged": p.allow_privileged,
            "allowHostNetwork": p.allow_host_network,
            "allowedHostPaths": p.allowed_host_paths.iter().map(|f| path(f)).collect::<Vec<_>>(),
            "writableHostPaths": p.writable_host_paths.iter().map(|f| path(f)).collect::<Vec<_>>(),
            "allowedCapabilities": p.allowed_capabilities,
            "allowedDevices": p.allowed_devices.iter().map(|f| path(f)).collect::<Vec<_>>(),
            "allowedVolumes": p.allowed_volumes,
            "allowedHostPorts": p.allowed_host_ports.iter().map(|(lo, hi)| format!("{lo}-{hi}")).collect::<Vec<_>>(),
            "allowedHostIps": p.allowed_host_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "defaultMemoryMb": p.default_memory_mb,
            "maxMemoryMb": p.max_memory_mb,
            "defaultPidsLimit": p.default_pids_limit,
            "maxPidsLimit": p.max_pids_limit,
            "allowImageTags": p.allow_image_tags,
        },
        "apiSocket": path(&c.api_socket),
        "bus": {
            "enabled": c.bus.enabled,
            "listen": c.bus.listen.map(|a| a.to_string()),
            "externalUrl": c.bus.external_url.as_ref().map(ToString::to_string),
            "username": c.bus.external_credentials.as_ref().map(|(u, _)| u.clone()),
            "passwordFile": c.bus.external_credentials.as_ref().map(|(_, f)| path(f)),
        },
        "telemetry": {
            "intervalSecs": c.telemetry.interval.as_secs(),
            "outboxMaxBytes": c.telemetry.outbox_max_bytes,
            "outboxMaxAgeSecs": c.telemetry.outbox_max_age.as_secs(),
            "metricsListen": c.telemetry.metrics_listen.map(|a| a.to_string()),
        },
    })
}
