//! Starting the local bus as the configuration says: off, the embedded broker (on the engine's
//! bridge gateway by default), or a router that is a client of the device's own broker.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::broker::BusCounters;
use super::routes::RouteTable;
use super::{BusError, BusSecret, ModuleEnv};
use crate::config::{BusConfig, Config};
use crate::runtime::{Runtime, RuntimeError};
use crate::telemetry::outbox::Outbox;

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// What the bus takes from the reconciler: the deployment's routes, and a way to reach it for
/// modules' update locks (set once it is built).
pub struct FromReconciler {
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub locks: super::LockHandle,
}

/// Starts the embedded bus (unless it is off or an external broker is configured) and says
/// what modules are told about it.
pub async fn start<R: Runtime>(
    config: &Config,
    runtime: &R,
    reconciler: FromReconciler,
    outbox: &Outbox,
    counters: &Arc<BusCounters>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<ModuleEnv, StartError> {
    if !config.bus.enabled {
        info!("local bus off ([bus] enabled = false)");
        let _ = reconciler;
        return Ok(ModuleEnv::default());
    }
    if let Some(url) = &config.bus.external_url {
        // Modules are told where the device's broker is; its own configuration holds their
        // credentials and topic rules. The agent routes as a client of it.
        let credentials = match &config.bus.external_credentials {
            Some((user, file)) => Some((
                user.clone(),
                outpost_mqtt::Password::read(file)
                    .map_err(|e| BusError::Password(e.to_string()))?,
            )),
            None => None,
        };
        tasks.spawn(super::router::run(
            super::router::Context {
                url: url.clone(),
                credentials,
                client_id: format!("{}-router", config.device_id),
                routes: reconciler.routes,
                outbox: outbox.clone(),
                counters: counters.clone(),
            },
            shutdown.clone(),
        ));
        return Ok(ModuleEnv::external(url.to_string()));
    }
    let addr = match config.bus.listen {
        Some(addr) => addr,
        None => match runtime.bridge_gateway().await? {
            Some(ip) => std::net::SocketAddr::new(ip, BusConfig::DEFAULT_PORT),
            None => {
                // Process modules reach loopback; containers on a bridge network do not.
                if config.runtime.kind == crate::manifest::RuntimeKind::Docker {
                    warn!(
                        "no Docker bridge network found: the local bus listens on loopback, which modules on a bridge network cannot reach; set bus.listen"
                    );
                }
                std::net::SocketAddr::from(([127, 0, 0, 1], BusConfig::DEFAULT_PORT))
            }
        },
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BusError::Listen { addr, source })?;
    let secret = BusSecret::load_or_create(&config.state_dir)?;
    tasks.spawn(super::broker::serve(
        listener,
        secret.clone(),
        reconciler.routes,
        outbox.clone(),
        counters.clone(),
        reconciler.locks,
        shutdown.clone(),
    ));
    Ok(ModuleEnv::embedded(format!("mqtt://{addr}"), secret))
}
