//! The control plane's contract: how the hub link and the local API talk to the reconciler.
//!
//! Requests go through one bounded channel to the task that owns the deployment; the reported
//! state comes back through a `watch`, so readers always see the latest state and never queue
//! behind it. This keeps the hub link and the reconciler independent: either can be tested
//! against the real other through this handle.

use tokio::sync::{mpsc, oneshot, watch};

use crate::intake::Accepted;
use crate::manifest::Issue;
use crate::state::{ReportedState, Source};

/// Capacity of the request channel: senders wait (push back) beyond it.
pub const REQUEST_CAPACITY: usize = 16;

#[derive(Debug)]
pub enum Request {
    /// A deployment that passed intake. The reply comes once it is stored (then applying
    /// goes on in the background and shows in the state) or refused with the reasons; a
    /// refused deployment changes nothing.
    Offer {
        accepted: Box<Accepted>,
        source: Source,
        /// The offer follows the withdrawal of the source that overrode this one (a signed
        /// withdrawal on a device that trusts keys): control goes back to what this source had
        /// accepted, even though it is below the device's version floor.
        handback: bool,
        reply: oneshot::Sender<Result<(), Vec<Issue>>>,
    },
    /// Restart one module's container now (a hub command or `outpost restart`).
    RestartModule {
        name: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// The last `tail` lines of a module's logs, at most `max_bytes`.
    Logs {
        name: String,
        tail: usize,
        max_bytes: usize,
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// What a module's log output must not carry out of the agent (its environment's values,
    /// its bus password, the deployment's registry passwords): for `outpost logs`, which
    /// streams from the engine itself.
    Secrets {
        name: String,
        reply: oneshot::Sender<Vec<String>>,
    },
    /// Take (`hold`) or release a module's update lock (docs/reconciler.md#update-windows-and-locks).
    /// The reply says whether anything changed, or why it cannot be done.
    Lock {
        module: String,
        hold: bool,
        /// Who asks: `api` or `bus`, for the record and the log.
        via: &'static str,
        reply: oneshot::Sender<Result<bool, String>>,
    },
}

/// What a client of the agent holds: a way to ask, and the latest state.
#[derive(Debug, Clone)]
pub struct AgentHandle {
    pub requests: mpsc::Sender<Request>,
    pub state: watch::Receiver<ReportedState>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the agent is shutting down")]
    Closed,
}

impl AgentHandle {
    /// Offers a deployment and waits until it is stored or refused.
    pub async fn offer(
        &self,
        accepted: Accepted,
        source: Source,
    ) -> Result<Result<(), Vec<Issue>>, ControlError> {
        self.offer_with(accepted, source, false).await
    }

    /// Offers what `source` had accepted before another source overrode it, after that
    /// source's deployment was withdrawn (see [`Request::Offer`]).
    pub async fn offer_after_withdrawal(
        &self,
        accepted: Accepted,
        source: Source,
    ) -> Result<Result<(), Vec<Issue>>, ControlError> {
        self.offer_with(accepted, source, true).await
    }

    /// Offers a deployment; `handback` as in [`Request::Offer`].
    pub async fn offer_with(
        &self,
        accepted: Accepted,
        source: Source,
        handback: bool,
    ) -> Result<Result<(), Vec<Issue>>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Offer {
                accepted: Box::new(accepted),
                source,
                handback,
                reply,
            })
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)
    }

    pub async fn restart_module(&self, name: &str) -> Result<Result<(), String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::RestartModule {
                name: name.to_string(),
                reply,
            })
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)
    }

    pub async fn logs(
        &self,
        name: &str,
        tail: usize,
        max_bytes: usize,
    ) -> Result<Result<String, String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Logs {
                name: name.to_string(),
                tail,
                max_bytes,
                reply,
            })
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)
    }

    /// Takes (`hold`) or releases `module`'s update lock; `Ok(Ok(changed))`.
    pub async fn lock(
        &self,
        module: &str,
        hold: bool,
        via: &'static str,
    ) -> Result<Result<bool, String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Lock {
                module: module.to_string(),
                hold,
                via,
                reply,
            })
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)
    }

    pub async fn secrets(&self, name: &str) -> Result<Vec<String>, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.requests
            .send(Request::Secrets {
                name: name.to_string(),
                reply,
            })
            .await
            .map_err(|_| ControlError::Closed)?;
        rx.await.map_err(|_| ControlError::Closed)
    }
}
