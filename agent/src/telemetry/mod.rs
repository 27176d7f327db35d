//! Telemetry: the outbox that keeps records until the hub acknowledged them, the drain that
//! sends them, and the metrics the agent publishes about the device, its modules and itself.
//!
//! - [`outbox`]: the durable queue (redb, group commit, limits, drops counted).
//! - [`upstream`]: the hub connection that drains the outbox in batches.
//! - [`metrics`]: sampling the device, rendering metrics as JSON (for the hub) and as
//!   Prometheus text, and serving that text on loopback.
//! - [`counters`]: the counters metrics read, owned by the parts that count.
//! - [`health`]: the outbox's health as a condition of the reported state.
//! - [`collector`]: every `interval`, one snapshot: queued to the outbox (stream `metrics`) and
//!   handed to the Prometheus endpoint.

pub mod collector;
pub mod counters;
pub mod health;
pub mod metrics;
pub mod outbox;
pub mod upstream;
