//! Every `interval`: one [`Snapshot`] of the device, its modules and the agent. It is queued in
//! the outbox (stream `metrics`, least important, so it is the first dropped when the outbox is
//! full) for `{prefix}/{device}/telemetry/metrics`, and rendered for the Prometheus endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::counters::Counters;
use super::metrics::{
    AgentMetrics, DeviceSampler, ModuleMetrics, Snapshot, agent_rss_bytes, render_prometheus,
};
use super::outbox::{NewRecord, Outbox};
use crate::runtime::Runtime;
use crate::state::ReportedState;

/// The outbox stream metrics go to.
pub const STREAM: &str = outpost_core::wire::telemetry::METRICS_STREAM;
/// The least important: metrics are the first dropped when the outbox is full.
pub const PRIORITY: u8 = 9;
/// How long the engine gets for the modules' usage.
const USAGE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Context<R> {
    pub device_id: String,
    pub interval: Duration,
    pub sampler: DeviceSampler,
    pub runtime: Arc<R>,
    pub state: watch::Receiver<ReportedState>,
    pub outbox: Outbox,
    /// Whether snapshots go to the hub (through the outbox); without a hub they would only
    /// fill the outbox.
    pub upstream: bool,
    pub counters: Counters,
    /// Where the Prometheus text goes; `None` until the first snapshot.
    pub prometheus: watch::Sender<Option<Arc<String>>>,
}

/// Runs until `stop` is cancelled.
pub async fn run<R: Runtime>(mut ctx: Context<R>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = tokio::select! {
            _ = stop.cancelled() => return,
            s = snapshot(&mut ctx) => s,
        };
        ctx.prometheus
            .send_replace(Some(Arc::new(render_prometheus(&snapshot))));
        if !ctx.upstream {
            continue;
        }
        let payload = match serde_json::to_vec(&snapshot) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode metrics");
                continue;
            }
        };
        let record = NewRecord {
            stream: STREAM.into(),
            priority: PRIORITY,
            // Not a bus topic: the agent's own.
            topic: "$agent/metrics".into(),
            payload,
        };
        if let Err(e) = ctx.outbox.enqueue(record).await {
            tracing::warn!(error = %e, "metrics not queued");
        }
    }
}

async fn snapshot<R: Runtime>(ctx: &mut Context<R>) -> Snapshot {
    let device = ctx.sampler.sample();
    let state = ctx.state.borrow().clone();
    let mut modules: BTreeMap<String, ModuleMetrics> = state
        .modules
        .iter()
        .map(|(name, m)| {
            let status = serde_json::to_value(m.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            (
                name.clone(),
                ModuleMetrics {
                    status,
                    restarts: m.restart_count,
                    ..ModuleMetrics::default()
                },
            )
        })
        .collect();
    // The engine measures each container over about a second: ask for all at once.
    if let Ok(containers) = ctx.runtime.list(&ctx.device_id).await {
        let runtime = &ctx.runtime;
        let usage = futures_util::future::join_all(
            containers
                .iter()
                .filter(|c| c.state == crate::runtime::ContainerState::Running)
                .map(|c| async move {
                    let u = tokio::time::timeout(USAGE_TIMEOUT, runtime.usage(&c.id)).await;
                    (c.module.clone(), u)
                }),
        )
        .await;
        for (module, u) in usage {
            if let (Some(m), Ok(Ok(u))) = (modules.get_mut(&module), u) {
                m.cpu_percent = u.cpu_percent;
                m.memory_bytes = u.memory_bytes;
                m.memory_limit_bytes = u.memory_limit_bytes;
            }
        }
    }
    let outbox = ctx.outbox.stats();
    let c = &ctx.counters;
    let applied = c.deployments.applied_total.load(Relaxed);
    let agent = AgentMetrics {
        version: outpost_core::version::current().to_string(),
        rss_bytes: agent_rss_bytes(),
        outbox_records: outbox.records,
        outbox_bytes: outbox.bytes,
        outbox_max_bytes: outbox.max_bytes,
        enqueued_total: outbox.enqueued_total,
        delivered_total: outbox.delivered_total,
        dropped_total: outbox.dropped_total,
        hub_connected: c.upstream.connected.load(Relaxed),
        hub_reconnects_total: c.upstream.reconnects.load(Relaxed),
        bus_clients: c.bus.clients.load(Relaxed),
        bus_refused_total: c.bus.refused.load(Relaxed),
        bus_received_total: c.bus.received.load(Relaxed),
        bus_dropped_total: c.bus.dropped.load(Relaxed),
        deployments_total: applied,
        last_deployment_secs: (applied > 0)
            .then(|| c.deployments.last_ms.load(Relaxed) as f64 / 1000.0),
        deployment_secs_sum: c.deployments.sum_ms.load(Relaxed) as f64 / 1000.0,
    };
    Snapshot {
        device_id: ctx.device_id.clone(),
        ts: crate::clock::wall_now_ms(),
        device,
        modules,
        agent,
    }
}
