//! The agent's counters that metrics read, each owned (and incremented) by the part that
//! counts: the reconciler its deployments, the drain its link, the bus its messages.

use std::sync::Arc;

use crate::bus::broker::BusCounters;
use crate::reconciler::DeploymentCounters;
use crate::telemetry::upstream::LinkCounters;

/// The agent's counters that metrics read, each owned by the part that counts.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub deployments: Arc<DeploymentCounters>,
    pub upstream: Arc<LinkCounters>,
    pub bus: Arc<BusCounters>,
}
