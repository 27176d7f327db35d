//! Metrics: sampling the device ([`DeviceSampler`]: CPU, memory, disk, temperature, load and
//! uptime from `/proc`, `/sys` and `statvfs`), rendering a [`Snapshot`] for the hub (its
//! `Serialize` form, JSON with camelCase keys) and as Prometheus text ([`render_prometheus`]),
//! and serving that text on loopback ([`serve_prometheus`]).
//!
//! Sampling never fails: a file the platform does not have, or one that cannot be read or
//! parsed, gives `None` (or 0 for sizes), so a board without thermal zones or with an unusual
//! kernel still reports everything else.
//!
//! Layout: `procfs.rs` reads `/proc`; `sampler.rs` samples the device (`/proc` through it,
//! `/sys` and `statvfs`); `snapshot.rs` holds what one sample of everything is; `prometheus.rs`
//! renders it as Prometheus text; `endpoint.rs` serves that text over HTTP.

mod endpoint;
mod procfs;
mod prometheus;
mod sampler;
mod snapshot;

pub use endpoint::serve_prometheus;
pub use procfs::{agent_rss_bytes, device_facts};
pub use prometheus::render_prometheus;
pub use sampler::DeviceSampler;
pub use snapshot::{AgentMetrics, DeviceMetrics, ModuleMetrics, Snapshot};
