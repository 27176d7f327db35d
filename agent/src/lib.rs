//! Outpost, the IoT Edge deployment agent.
//!
//! # Layout
//!
//! - [`manifest`], [`signing`], [`intake`], [`binding`], [`policy`], [`planner`], [`state`]:
//!   the pure core, re-exported from `outpost-core` (see its documentation).
//! - [`control`]: the handle through which the hub link and local API reach the reconciler.
//! - [`hub`]: the hub link (MQTT with TLS: deployments in, state and presence out, commands)
//!   and the operator's side of it.
//! - [`config`]: the device configuration, read raw and validated.
//! - [`provision`]: first boot by claim and certificate renewal (the device's own identity).
//! - [`logging`]: tracing set-up (human or JSON).
//! - [`check`]: `outpost check`, one finding per check with its fix.
//! - [`support`]: `outpost support-bundle` and the hub's `support-bundle` command.
//! - [`update`]: the agent's updates of itself (slots, launcher, health gate, rollback), with
//!   [`fetch`] for the download.
//! - [`artifacts`]: the files deployments pin by digest for their modules (models): fetched
//!   with [`fetch`], stored once by digest, linked into each module's folder.
//! - [`cli`]: the `outpost` command line (the binary only calls [`cli::main`]).

pub mod api;
pub mod artifacts;
pub use outpost_core::{binding, intake, manifest, planner, policy, signing, state};
pub mod bus;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod disk;
pub mod fetch;
pub mod fsutil;
pub mod hub;
pub mod logging;
pub mod provision;
pub mod reconciler;
pub mod runtime;
pub mod store;
pub mod support;
pub mod telemetry;
pub mod update;
