//! Telemetry: the outbox that keeps records until the hub acknowledged them, the drain that
//! sends them, and the metrics the agent publishes about the device, its modules and itself.
//!
//! - [`outbox`]: the durable queue (redb, group commit, limits, drops counted).
//! - [`upstream`]: the hub connection that drains the outbox in batches.

pub mod outbox;
pub mod upstream;
