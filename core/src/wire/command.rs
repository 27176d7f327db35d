//! Commands from the hub to one device: `{prefix}/{device}/commands/{name}` carrying a request
//! (`{"id", "args"}`), or on a device that trusts keys a DSSE envelope of a [`SignedCommand`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a signed command says (the envelope's payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedCommand {
    pub command: String,
    pub device: String,
    pub id: String,
    pub expires_at: String,
    #[serde(default)]
    pub args: Value,
}

/// A command as the device reads it: the request id to answer on and its arguments.
#[derive(Debug, Deserialize)]
pub struct CommandRequest {
    pub id: String,
    #[serde(default)]
    pub args: Value,
}
