//! What travels between a device and the hub, as both sides read it: topic names, presence,
//! commands, files sent in chunks, telemetry batches and provisioning. Reported state is
//! [`crate::state`].

pub mod bundle;
pub mod command;
pub mod presence;
pub mod provisioning;
pub mod telemetry;
pub mod topics;
