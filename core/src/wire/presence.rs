//! The presence payload, retained on `{prefix}/{device}/presence`: online after each connect,
//! offline as the device's last will.

use serde::{Deserialize, Serialize};

/// The presence payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    pub online: bool,
    /// Unix seconds when this was said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The groups whose deployments the device follows: `outpost-ctl status --group` counts
    /// members from this.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// What the device says on its presence topic after connecting (`online`) and as its last
/// will (`{"online": false}`).
pub fn presence(online: bool, groups: &[String]) -> Vec<u8> {
    let p = Presence {
        online,
        since: Some(crate::time::unix_now()),
        agent_version: Some(crate::version::current().to_string()),
        groups: groups.to_vec(),
    };
    // Serializing a struct of strings, numbers and bools cannot fail.
    serde_json::to_vec(&p).unwrap_or_default()
}
