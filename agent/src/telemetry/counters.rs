//! The agent's counters that metrics read, each owned (and incremented) by the part that
//! counts: the reconciler its deployments, the drain its link, the bus its messages. The
//! types live here, below the parts that count, so telemetry depends on none of them.

use std::sync::Arc;

use std::sync::atomic::AtomicU64;

use crate::telemetry::upstream::LinkCounters;

/// The agent's counters that metrics read, each owned by the part that counts.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub deployments: Arc<DeploymentCounters>,
    pub upstream: Arc<LinkCounters>,
    pub bus: Arc<BusCounters>,
}

/// How long deployments took from acceptance to applied, for metrics.
#[derive(Debug, Default)]
pub struct DeploymentCounters {
    pub applied_total: std::sync::atomic::AtomicU64,
    /// Milliseconds.
    pub last_ms: std::sync::atomic::AtomicU64,
    pub sum_ms: std::sync::atomic::AtomicU64,
}

/// The local bus's counters.
#[derive(Debug, Default)]
pub struct BusCounters {
    pub clients: AtomicU64,
    /// Connections refused (credentials) or closed for a publish outside the module's topics,
    /// and refused subscriptions.
    pub refused: AtomicU64,
    /// Messages routed to a module input that was not connected or could not keep up.
    pub dropped: AtomicU64,
    pub received: AtomicU64,
    /// Publishes routed upstream that the outbox could not store (a QoS 1 one is then not
    /// acknowledged and its connection closed).
    pub unstored: AtomicU64,
}
