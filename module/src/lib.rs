//! `outpost-infer`: on-device ONNX inference with tract, served over HTTP (Open Inference
//! Protocol v2 and Azure ML's `/score`), over the local MQTT bus, and in batch over a folder.
//!
//! # Layout
//!
//! - [`model`]: loading a model into an optimized plan, its metadata, checking requests
//!   against it, running it; the [`model::ModelSlot`] that swaps a reloaded model in.
//! - [`tensor`]: the protocol's JSON tensors and datatypes ⇄ tract tensors.
//! - [`npy`]: the `.npy` format (batch inputs and outputs, test references).
//! - [`engine`]: the path every request takes (check, run within the worker limit, answer).
//! - [`http`], [`bus`], [`batch`]: the three ways requests arrive.
//! - [`metrics`]: counters and histograms in the Prometheus text format.
//!
//! [`serve`] puts the long-running parts together; the binary (`main.rs`) only parses the
//! command line, sets up logging and maps results to exit codes.

pub mod batch;
pub mod bus;
pub mod engine;
pub mod http;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod plans;
pub mod tensor;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::model::{LoadOptions, ModelSlot};

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// Served model name; defaults to the file stem.
    pub name: String,
    pub listen: SocketAddr,
    pub load: LoadOptions,
    /// How often the model file is checked for replacement; `None` turns reloading off.
    pub reload_interval: Option<Duration>,
    pub limits: http::HttpLimits,
    /// Inferences running at once.
    pub workers: usize,
    pub bus: Option<bus::BusConfig>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// A server bound to its port, not yet serving: tests read [`Server::local_addr`] first.
pub struct Server {
    config: ServeConfig,
    listener: TcpListener,
    engine: Arc<Engine>,
}

impl Server {
    /// Binds the listener. The model is not loaded yet: that happens in [`Server::run`], so
    /// the health endpoints answer while a large model loads.
    pub async fn bind(config: ServeConfig) -> Result<Server, ServeError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|error| ServeError::Bind {
                    addr: config.listen,
                    error,
                })?;
        let metrics = Arc::new(Metrics::default());
        let slot = Arc::new(ModelSlot::new(
            config.name.clone(),
            config.model.clone(),
            config.load.clone(),
            metrics.clone(),
        ));
        let engine = Arc::new(Engine::new(slot, metrics, config.workers));
        Ok(Server {
            config,
            listener,
            engine,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Serves until `shutdown`, then waits for every task (HTTP requests in flight, bus
    /// workers, the reload watcher) to finish.
    ///
    /// A model that fails to load does not stop the server: it stays up, not ready, and says
    /// why on `/v2/health/ready`; replacing the file loads it.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let Server {
            config,
            listener,
            engine,
        } = self;
        let tracker = TaskTracker::new();
        tracing::info!(addr = %listener.local_addr().map_err(ServeError::Http)?, model = %config.model.display(), name = %config.name, "serving");

        let slot = engine.slot.clone();
        let interval = config.reload_interval;
        let token = shutdown.clone();
        tracker.spawn(async move {
            let first = slot.clone();
            // Loading is CPU-bound for hundreds of milliseconds: a blocking thread.
            let _ = tokio::task::spawn_blocking(move || first.load_now()).await;
            if let Some(interval) = interval {
                slot.watch(interval, token).await;
            }
        });
        if let Some(bus) = config.bus.clone() {
            tracker.spawn(bus::run(engine.clone(), bus, shutdown.clone()));
        }
        let router = http::router(engine, config.limits.clone());
        let result = http::serve(listener, router, &config.limits, shutdown.clone()).await;
        // The HTTP server only returns early on an I/O error: stop the rest too.
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        result.map_err(ServeError::Http)
    }
}

/// Binds and serves until `shutdown`.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ServeError> {
    Server::bind(config).await?.run(shutdown).await
}
