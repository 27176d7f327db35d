//! Outpost, the IoT Edge deployment agent.
//!
//! # Layout
//!
//! - [`manifest`]: the deployment manifest: types, schema, validation.
//! - [`signing`]: Ed25519 keys and DSSE envelopes around manifests.
//! - [`intake`]: the one path from untrusted bytes to an accepted deployment.
//! - [`state`]: reported state, as the hub and `outpost list` see it.
//! - [`control`]: the handle through which the hub link and local API reach the reconciler.
//! - [`hub`]: the hub link (MQTT with TLS: deployments in, state and presence out, commands)
//!   and the operator's side of it.
//! - [`config`]: the device configuration, read raw and validated.
//! - [`logging`]: tracing set-up (human or JSON).
//! - [`cli`]: the `outpost` command line (the binary only calls [`cli::main`]).

pub mod api;
pub mod binding;
pub mod bus;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod disk;
pub mod fsutil;
pub mod hub;
pub mod intake;
pub mod logging;
pub mod manifest;
pub mod planner;
pub mod policy;
pub mod reconciler;
pub mod runtime;
pub mod signing;
pub mod state;
pub mod store;
pub mod telemetry;
