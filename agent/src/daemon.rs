//! `outpost run`: wires the store, the Docker runtime, the reconciler and the local API
//! together, runs them until a shutdown signal, and stops them within a grace period.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::policy::DeviceFacts;
use crate::reconciler::{Reconciler, Settings};
use crate::runtime::{DockerRuntime, RuntimeError};
use crate::store::{Store, StoreError};

/// How long tasks get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

impl DaemonError {
    /// Whether restarting cannot help (a configuration problem): the binary exits 78 then.
    pub fn is_configuration(&self) -> bool {
        matches!(self, DaemonError::Hub(e) if e.is_configuration())
    }
}

/// Runs the agent until `shutdown` is cancelled.
///
/// Fails at start-up when the store cannot be opened or the engine cannot be reached; once
/// running, failures are retried, not returned.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let store = Store::open(&config.state_dir)?;
    let runtime = Arc::new(DockerRuntime::connect(&config.runtime.docker_socket).await?);
    let settings = Settings {
        device: config.device_id.clone(),
        policy: config.policy.clone(),
        facts: DeviceFacts::detect(),
        stop_grace: config.runtime.stop_grace,
        max_concurrent_pulls: config.runtime.max_concurrent_pulls,
        image_gc_after: config.runtime.image_gc_after,
    };
    let parts = Reconciler::build(settings, runtime.clone(), store)?;
    info!(device = %config.device_id, version = env!("CARGO_PKG_VERSION"), "outpost agent starting");

    let tasks = TaskTracker::new();
    tasks.spawn(parts.reconciler.run(parts.requests, shutdown.clone()));
    let (api_tx, mut api_rx) = tokio::sync::oneshot::channel();
    {
        let (handle, trusted, progress, token) = (
            parts.handle.clone(),
            config.policy.trusted_keys.clone(),
            parts.progress.clone(),
            shutdown.clone(),
        );
        let (socket, device, runtime) = (
            config.api_socket.clone(),
            config.device_id.clone(),
            runtime.clone(),
        );
        tasks.spawn(async move {
            let result = crate::api::serve(
                &socket,
                device,
                handle,
                runtime,
                trusted,
                progress,
                token.clone(),
            )
            .await;
            if let Err(e) = &result {
                error!(error = %e, "local API failed; stopping the agent");
                token.cancel();
            }
            let _ = api_tx.send(result);
        });
    }
    let (hub_tx, mut hub_rx) = tokio::sync::oneshot::channel();
    if config.hub.is_some() {
        let (config, handle, token) = (config.clone(), parts.handle.clone(), shutdown.clone());
        tasks.spawn(async move {
            let result = crate::hub::run(&config, handle, token.child_token()).await;
            if let Err(e) = &result {
                error!(error = %e, "hub link stopped; stopping the agent");
                token.cancel();
            }
            let _ = hub_tx.send(result);
        });
    } else {
        info!("no [hub] configured: local deployments only");
    }
    tasks.close();
    shutdown.cancelled().await;
    info!("shutting down; modules keep running");
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            grace_secs = SHUTDOWN_GRACE.as_secs(),
            "tasks did not finish in time"
        );
    } else {
        info!("stopped cleanly");
    }
    if let Ok(Err(e)) = api_rx.try_recv() {
        return Err(e.into());
    }
    if let Ok(Err(e)) = hub_rx.try_recv() {
        return Err(e.into());
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, then cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    token.cancel();
}
