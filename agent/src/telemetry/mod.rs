//! Telemetry: what the device, its modules and the agent report about themselves.

pub mod metrics;
