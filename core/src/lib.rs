//! Outpost's core: everything the agent decides, and every format it speaks, with no I/O
//! runtime, container engine or network client in it — so it builds anywhere (the operator's
//! laptop included) and its tests need neither a broker nor an engine.
//!
//! - [`manifest`]: the deployment manifest: types, schema, validation.
//! - [`signing`]: Ed25519 keys and DSSE envelopes around manifests and commands.
//! - [`intake`]: the one path from untrusted bytes to an accepted deployment.
//! - [`binding`]: what binds a signed payload to its device and its time.
//! - [`policy`]: the device's local policy and its rules (facts passed in).
//! - [`container`]: the runtime boundary's vocabulary (observed containers, specs, labels).
//! - [`spec`]: a module's container spec and config hash, from manifest and policy.
//! - [`planner`]: desired state + observed containers → the actions to converge.
//! - [`select`]: which of the deployments aimed at a device applies.
//! - [`state`]: reported state, as the hub and `outpost list` see it.
//! - [`wire`]: topics, presence, commands and telemetry batches on the hub.
//! - [`prometheus`]: the Prometheus text format, for the agent and `outpost-infer`.
//! - [`present`]: what both command lines print alike (issues, tables, validation).
//! - [`time`]: RFC 3339 timestamps.
//! - [`backoff`]: the one retry rule (capped, exponential, jittered).
//! - [`files`]: a new file written whole or not at all (keys).

pub mod backoff;
pub mod binding;
pub mod container;
pub mod files;
pub mod intake;
pub mod manifest;
pub mod planner;
pub mod platform;
pub mod policy;
pub mod present;
pub mod prometheus;
pub mod select;
pub mod signing;
pub mod spec;
pub mod state;
pub mod time;
pub mod version;
pub mod window;
pub mod wire;
