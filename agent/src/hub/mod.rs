//! The hub link: deployments in, state and presence out, over MQTT (rumqttc) with TLS (rustls).
//!
//! # Layout
//!
//! - [`topics`]: topic names, shared with the operator's side.
//! - [`tls`]: the crypto provider, the client TLS configuration, handshake errors explained.
//! - [`link`]: connection options and the one task that owns the MQTT event loop (reconnect
//!   with capped, jittered backoff; resubscribe and report again after each reconnect).
//! - [`deployments`]: retained deployment messages → [`crate::intake`] → [`select`] →
//!   [`AgentHandle::offer`]; refusals are reported in the state's `lastRejected`.
//! - [`select`]: the pure precedence rule between the device's and its groups' deployments.
//! - [`report`]: reported state (retained, debounced) and presence (retained, last will).
//! - [`commands`]: `restart-module`, `logs`, `ping`, `state`, `support-bundle` (in chunks),
//!   answered on the responses topic.
//! - [`operator`]: the operator's side (`outpost-ctl deploy | status | watch | cmd`).
//!
//! The tasks talk through bounded channels and `watch`es, each is owned by a
//! [`TaskTracker`] and stopped by the [`CancellationToken`] handed to [`run`].

pub mod commands;
pub mod deployments;
pub mod link;
pub mod report;
pub use outpost_core::select;
pub use outpost_core::wire::topics;
pub use outpost_mqtt::tls;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::AgentHandle;

pub use tls::install_crypto_provider;

/// How long the link's tasks get to finish after shutdown is asked for (the offline presence
/// and the disconnect are sent in that time): a share of the agent's own grace.
pub const LINK_GRACE: Duration = Duration::from_secs(3);

pub use outpost_mqtt::HubError;

/// Runs the device side of the hub link until `shutdown` is cancelled.
///
/// Connects to `config.hub`, follows the device's and its groups' retained deployments
/// (handing accepted ones to `handle`), publishes the reported state and presence, and
/// answers commands. Network failures are retried with capped, jittered backoff forever.
///
/// Fails when the configuration has no hub, a TLS or password file cannot be used, or the
/// very first connection is refused for a reason retrying cannot fix (untrusted server
/// certificate, refused client certificate, bad credentials): see
/// [`HubError::is_configuration`].
pub async fn run(
    config: &Config,
    handle: AgentHandle,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    run_with(config, handle, shutdown, watch::channel(0u64).0).await
}

/// [`run`], telling `session` the link's session number (0 while disconnected), which the
/// telemetry drain watches to reconnect the moment the hub is back.
pub async fn run_with(
    config: &Config,
    handle: AgentHandle,
    shutdown: CancellationToken,
    session_tx: watch::Sender<u64>,
) -> Result<(), HubError> {
    let hub = config.hub.as_ref().ok_or(HubError::NotConfigured)?;
    let topics = topics::Topics::new(&hub.topic_prefix, &config.device_id);
    let settings = link::settings(hub, &config.device_id)?;
    let (client, eventloop) = link::client(&settings, Some(report::last_will(&topics)))?;

    let tracker = TaskTracker::new();
    // The link's own token: cancelled by the caller, or by the link itself when it gives up.
    let stop = shutdown.child_token();
    let session_rx = session_tx.subscribe();
    let inbox = deployments::Inbox::new();
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(commands::QUEUE);
    let (rejected_tx, rejected_rx) = watch::channel(None);

    tracker.spawn(deployments::run(
        deployments::Context {
            inbox: inbox.clone(),
            handle: handle.clone(),
            trusted: config.policy.trusted_keys.clone(),
            groups: hub.groups.clone(),
            device: config.device_id.clone(),
            rejected: rejected_tx,
        },
        stop.clone(),
    ));
    tracker.spawn(report::run(
        report::Context {
            client: client.clone(),
            topics: topics.clone(),
            state: handle.state.clone(),
            rejected: rejected_rx.clone(),
            session: session_rx.clone(),
        },
        stop.clone(),
    ));
    tracker.spawn(commands::run(
        commands::Context {
            client: client.clone(),
            topics: topics.clone(),
            handle: handle.clone(),
            rejected: rejected_rx,
            trusted: config.policy.trusted_keys.clone(),
            config: std::sync::Arc::new(config.clone()),
        },
        commands_rx,
        stop.clone(),
    ));
    tracker.spawn(link::subscriber(
        client.clone(),
        topics.clone(),
        hub.groups.clone(),
        session_rx,
        stop.clone(),
    ));
    tracker.close();

    let result = link::drive(
        eventloop,
        client,
        link::Routes {
            topics,
            groups: hub.groups.clone(),
            inbox,
            commands: commands_tx,
            session: session_tx,
        },
        &settings,
        stop.clone(),
    )
    .await;
    stop.cancel();
    if tokio::time::timeout(LINK_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?LINK_GRACE, "hub link tasks did not stop in time");
    } else {
        tracing::debug!("hub link stopped");
    }
    result
}

pub use outpost_core::time::unix_now;
