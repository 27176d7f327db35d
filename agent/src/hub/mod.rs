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
//! - [`commands`]: `restart-module`, `logs`, `ping`, `state`, answered on the responses topic.
//! - [`operator`]: the operator's side (`outpost hub deploy | status | watch | cmd`).
//!
//! The tasks talk through bounded channels and `watch`es, each is owned by a
//! [`TaskTracker`] and stopped by the [`CancellationToken`] handed to [`run`].

pub mod commands;
pub mod deployments;
pub mod link;
pub mod operator;
pub mod report;
pub mod select;
pub mod tls;
pub mod topics;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::control::AgentHandle;

pub use tls::install_crypto_provider;

/// How long the tasks get to finish after shutdown is asked for (the offline presence and
/// the disconnect are sent in that time).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the hub link (or an operator's connection) failed.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("the device configuration has no [hub] section")]
    NotConfigured,
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{path} holds no private key (PEM: PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("no system root certificates found; set hub.ca_file (or --ca)")]
    NoSystemRoots,
    #[error("the password file {path} is empty")]
    EmptyPassword { path: PathBuf },
    #[error("TLS set-up failed: {0}")]
    TlsSetup(String),
    #[error("server certificate is not signed by {trust} ({detail})")]
    UntrustedServer { trust: String, detail: String },
    #[error(
        "server certificate is not valid for host `{host}` ({detail}); the URL's host must be in its subject alternative names"
    )]
    ServerName { host: String, detail: String },
    #[error("server certificate is expired or not yet valid ({detail}); check the clocks")]
    ServerCertificateTime { detail: String },
    #[error("broker refused the client certificate ({detail}){}", if *.had_certificate { "" } else { "; it requires one: set hub.cert_file and hub.key_file (or --cert and --key)" })]
    ClientCertificateRefused {
        detail: String,
        had_certificate: bool,
    },
    #[error("TLS error: {0}")]
    Tls(String),
    #[error("broker refused the connection: {0}")]
    Refused(String),
    #[error("cannot reach the broker at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("timed out after {0:?} waiting for the broker")]
    Timeout(Duration),
    #[error("the MQTT client stopped: {0}")]
    Client(String),
}

impl HubError {
    /// Errors that retrying cannot fix without someone changing a file or the broker:
    /// the device gives up on them at start-up (a misconfiguration should be seen, not
    /// retried silently), but keeps retrying them once it was connected (certificates get
    /// rotated on brokers).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            HubError::NotConfigured
                | HubError::ReadFile { .. }
                | HubError::NoCertificate { .. }
                | HubError::NoKey { .. }
                | HubError::NoSystemRoots
                | HubError::EmptyPassword { .. }
                | HubError::TlsSetup(_)
                | HubError::UntrustedServer { .. }
                | HubError::ServerName { .. }
                | HubError::ClientCertificateRefused { .. }
                | HubError::Refused(_)
        )
    }
}

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
    let settings = link::Settings::from_hub_config(hub, &config.device_id)?;
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
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?SHUTDOWN_GRACE, "hub link tasks did not stop in time");
    } else {
        tracing::debug!("hub link stopped");
    }
    result
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
