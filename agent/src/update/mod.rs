//! The agent's updates of itself: A/B slots in the state directory, a health gate, and a
//! rollback that does not depend on the new build behaving (docs/operations.md#updating-the-agent).
//!
//! - `record`: `agent/update.json`, the commit point of every step, and the slots' paths.
//! - `launch`: the launcher in the installed binary — runs the active slot, supervises a
//!   build on trial, rolls it back.
//! - `updater`: in the running agent, a deployment's `agent` section fetched, verified,
//!   self-tested, put in the free slot, then the hand-over.
//! - `gate`: in an agent on trial, the health gate (hub, a reconcile pass, time), then the
//!   commit.
//!
//! The download itself is [`crate::fetch`]'s.

pub mod gate;
pub mod launch;
pub mod record;
pub mod updater;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::state::AgentUpdate;
pub use launch::Role;
pub use record::Slot;

/// The agent's part of the reported state: where it runs from, and its update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub slot: Slot,
    pub update: Option<AgentUpdate>,
}

/// Ends the agent so that another binary takes over: the shutdown, with a flag saying why.
#[derive(Debug, Clone)]
pub struct Handover {
    requested: Arc<AtomicBool>,
    shutdown: CancellationToken,
}

impl Handover {
    pub fn new(shutdown: CancellationToken) -> Handover {
        Handover {
            requested: Arc::default(),
            shutdown,
        }
    }

    /// Stops the agent (modules keep running) for the hand-over.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}
