//! Telemetry as the hub receives it: batches of records on `{prefix}/{device}/telemetry/{stream}`,
//! each record with an id unique per device (redeliveries repeat ids; [`dedup`] drops them).

use std::collections::BTreeMap;

/// The stream the agent's own metrics go to.
pub const METRICS_STREAM: &str = "metrics";

/// A batch as the hub reads it (for the operator's side and tests).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReceivedBatch {
    pub stream: String,
    pub records: Vec<ReceivedRecord>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct ReceivedRecord {
    pub id: u64,
    pub ts: u64,
    pub topic: String,
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    #[serde(default, rename = "bodyBase64")]
    pub body_base64: Option<String>,
}

/// Per stream, the records with ids already seen removed: what a hub-side consumer does
/// after a redelivery.
pub fn dedup(
    batches: impl IntoIterator<Item = ReceivedBatch>,
) -> BTreeMap<String, Vec<ReceivedRecord>> {
    let mut seen = std::collections::HashSet::new();
    let mut out: BTreeMap<String, Vec<ReceivedRecord>> = BTreeMap::new();
    for b in batches {
        for r in b.records {
            if seen.insert(r.id) {
                out.entry(b.stream.clone()).or_default().push(r);
            }
        }
    }
    out
}
