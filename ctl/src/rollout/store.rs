//! Where a rollout lives on the broker: retained messages under the operator's topics
//! `{prefix}/_rollouts/{id}/...` (device ids starting with `_` are reserved, so these never
//! collide with a device; devices are not given access to them).
//!
//! | topic | payload |
//! |---|---|
//! | `{prefix}/_rollouts/{id}/state` | the [`Record`] |
//! | `{prefix}/_rollouts/{id}/devices/{device}` | the [`Staged`] messages of one device |
//! | `{prefix}/_rollouts/{id}/control` | `{"cancel": true, "at": SECS}` from `rollout cancel` |

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::plan::Record;
use super::stage::Staged;
use crate::hub::{Message, Operator};

/// The retained record must fit in one MQTT packet (the client sends at most 1 MiB).
pub const MAX_RECORD_BYTES: usize = outpost_mqtt::MAX_OUTGOING_PACKET - 4096;

pub fn root(prefix: &str, id: &str) -> String {
    format!("{prefix}/_rollouts/{id}")
}

pub fn state_topic(prefix: &str, id: &str) -> String {
    format!("{}/state", root(prefix, id))
}

pub fn control_topic(prefix: &str, id: &str) -> String {
    format!("{}/control", root(prefix, id))
}

pub fn device_topic(prefix: &str, id: &str, device: &str) -> String {
    format!("{}/devices/{device}", root(prefix, id))
}

/// A request to the rollout's runner, from any operator's machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Control {
    #[serde(default)]
    pub cancel: bool,
    #[serde(default)]
    pub at: u64,
}

/// Everything retained about one rollout.
pub struct Stored {
    pub record: Record,
    pub staged: BTreeMap<String, Staged>,
    pub control: Control,
    /// Every topic holding a retained message of it (for `forget`).
    pub topics: Vec<String>,
}

/// Reads a rollout's retained messages; `None` when there is no record.
pub async fn load(op: &mut Operator, id: &str) -> Result<Option<Stored>> {
    let prefix = op.prefix().to_string();
    let messages = op
        .snapshot(
            &[format!("{}/#", root(&prefix, id))],
            Duration::from_secs(30),
        )
        .await?;
    let mut record = None;
    let mut staged = BTreeMap::new();
    let mut control = Control::default();
    let mut topics = Vec::new();
    let devices = format!("{}/devices/", root(&prefix, id));
    for m in messages
        .iter()
        .filter(|m| m.retain && !m.payload.is_empty())
    {
        topics.push(m.topic.clone());
        if m.topic == state_topic(&prefix, id) {
            record = Some(parse_record(m)?);
        } else if m.topic == control_topic(&prefix, id) {
            control = serde_json::from_slice(&m.payload).unwrap_or_default();
        } else if let Some(device) = m.topic.strip_prefix(&devices) {
            let s: Staged = serde_json::from_slice(&m.payload)
                .with_context(|| format!("{}: not a rollout's device message", m.topic))?;
            staged.insert(device.to_string(), s);
        }
    }
    Ok(record.map(|record| Stored {
        record,
        staged,
        control,
        topics,
    }))
}

pub fn parse_record(m: &Message) -> Result<Record> {
    serde_json::from_slice(&m.payload).with_context(|| format!("{}: not a rollout record", m.topic))
}

/// The record as published; refused when it would not fit in one message.
pub fn encode(record: &Record) -> Result<Vec<u8>> {
    let bytes = serde_json::to_vec(record)?;
    if bytes.len() > MAX_RECORD_BYTES {
        bail!(
            "the rollout's record is {} bytes, over the {MAX_RECORD_BYTES} that fit in one message: \
             split the devices into several rollouts",
            bytes.len()
        );
    }
    Ok(bytes)
}
