//! What one snapshot holds ([`Snapshot`]): the device's resources, each module's state and use,
//! and the agent's own health. Its `Serialize` form (JSON, camelCase keys) is what the hub
//! gets.

use std::collections::BTreeMap;

use serde::Serialize;

/// The device's resources at one moment.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceMetrics {
    /// Busy share of all CPUs since the previous sample, 0 to 100; `None` on the first sample.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// CPUs online.
    pub cpu_count: usize,
    /// One-minute load average.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load1: Option<f64>,
    pub memory_total_bytes: u64,
    /// Memory available to new work without swapping (`MemAvailable`).
    pub memory_available_bytes: u64,
    /// The directory whose filesystem is measured: the agent's state directory.
    pub disk_path: String,
    pub disk_total_bytes: u64,
    /// Space available to unprivileged users (root's reserve excluded).
    pub disk_available_bytes: u64,
    /// The hottest thermal zone; `None` when the platform exposes none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime_secs: Option<u64>,
}

/// One module's state and resource use.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModuleMetrics {
    /// The module's status as reported (`running`, `exited`, ...).
    pub status: String,
    /// CPU use in percent of one CPU: a module busy on two CPUs shows 200.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Memory in use, page cache that can be reclaimed excluded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// The container's memory limit (the host's memory when it has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit_bytes: Option<u64>,
    /// Restarts by the agent.
    pub restarts: u32,
}

/// The agent's own health: memory, outbox, hub link, local bus and deployments.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentMetrics {
    pub version: String,
    /// Resident memory ([`agent_rss_bytes`]).
    ///
    /// [`agent_rss_bytes`]: super::agent_rss_bytes
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Records waiting in the outbox.
    pub outbox_records: u64,
    /// Bytes waiting in the outbox.
    pub outbox_bytes: u64,
    /// The outbox's size limit.
    pub outbox_max_bytes: u64,
    /// Records put in the outbox since it was created (kept in the outbox file).
    pub enqueued_total: u64,
    /// Records the hub acknowledged since the outbox was created.
    pub delivered_total: u64,
    /// Records dropped since the outbox was created, by reason (see [`DropReason`]).
    ///
    /// [`DropReason`]: crate::telemetry::outbox::DropReason
    pub dropped_total: BTreeMap<String, u64>,
    pub hub_connected: bool,
    pub hub_reconnects_total: u64,
    /// Clients connected to the local bus now.
    pub bus_clients: u64,
    /// Connections, publishes and subscriptions the local bus refused since the agent started.
    pub bus_refused_total: u64,
    /// Messages modules published on the bus since the agent started.
    pub bus_received_total: u64,
    /// Messages routed to a module input that was not connected or could not keep up.
    pub bus_dropped_total: u64,
    /// Deployments applied since the agent started: the count of `deployment_secs_sum`.
    pub deployments_total: u64,
    /// How long the last deployment took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_deployment_secs: Option<f64>,
    /// Time all deployments took, in seconds.
    pub deployment_secs_sum: f64,
}

/// Everything measured at one moment: what goes to the hub and to Prometheus.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub device_id: String,
    /// When the snapshot was taken, in Unix milliseconds.
    pub ts: u64,
    pub device: DeviceMetrics,
    /// By module name.
    pub modules: BTreeMap<String, ModuleMetrics>,
    pub agent: AgentMetrics,
}

/// A snapshot with a bit of everything, for the tests of the JSON, the Prometheus text and the
/// endpoint.
#[cfg(test)]
pub(super) fn example() -> Snapshot {
    let module = |status: &str, cpu, mem| ModuleMetrics {
        status: status.into(),
        cpu_percent: cpu,
        memory_bytes: mem,
        memory_limit_bytes: mem.map(|_| 512 << 20),
        restarts: 2,
    };
    Snapshot {
        device_id: "pump-7".into(),
        ts: 1_795_787_401_000,
        device: DeviceMetrics {
            cpu_percent: Some(12.5),
            cpu_count: 4,
            load1: Some(0.25),
            memory_total_bytes: 4 << 30,
            memory_available_bytes: 3 << 30,
            disk_path: "/var/lib/outpost".into(),
            disk_total_bytes: 32 << 30,
            disk_available_bytes: 20 << 30,
            temperature_celsius: None,
            uptime_secs: Some(3600),
        },
        modules: BTreeMap::from([
            (
                "infer".to_string(),
                module("running", Some(150.0), Some(64 << 20)),
            ),
            ("sensor".to_string(), module("exited", None, None)),
        ]),
        agent: AgentMetrics {
            version: "0.1.0".into(),
            rss_bytes: Some(9 << 20),
            outbox_records: 3,
            outbox_bytes: 900,
            outbox_max_bytes: 64 << 20,
            enqueued_total: 100,
            delivered_total: 97,
            dropped_total: BTreeMap::from([("full".to_string(), 4)]),
            hub_connected: true,
            hub_reconnects_total: 1,
            bus_clients: 2,
            bus_refused_total: 0,
            bus_received_total: 0,
            bus_dropped_total: 0,
            deployments_total: 2,
            last_deployment_secs: Some(4.5),
            deployment_secs_sum: 12.25,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::example as snapshot;

    #[test]
    fn json_for_the_hub() {
        let mut s = snapshot();
        s.device.cpu_percent = None;
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["deviceId"], "pump-7");
        assert_eq!(json["device"]["memoryAvailableBytes"], 3u64 << 30);
        assert!(json["device"].get("cpuPercent").is_none());
        assert!(json["device"].get("temperatureCelsius").is_none());
        assert_eq!(json["modules"]["infer"]["cpuPercent"], 150.0);
        assert!(json["modules"]["sensor"].get("memoryBytes").is_none());
        assert_eq!(json["agent"]["droppedTotal"]["full"], 4);
        assert_eq!(json["agent"]["lastDeploymentSecs"], 4.5);
    }
}
