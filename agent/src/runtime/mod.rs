//! The container runtime boundary: what the executor needs from an engine, and the Docker
//! implementation of it. Only containers labelled as Outpost's for this device are ever listed,
//! so nothing the agent did not create can reach the planner.

pub mod combined;
pub mod docker;
pub mod fake;
pub mod process;
pub mod registry;
/// How a module's spec is built from the manifest and the policy (pure: in the core crate).
pub use outpost_core::spec;

use std::future::Future;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::mpsc;

use crate::manifest::RegistryCredentials;

pub use docker::DockerRuntime;
pub use outpost_core::container::*;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot reach the Docker engine at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("pull of {image} failed: {message}")]
    Pull { image: String, message: String },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{op} {target}: {message}")]
    Engine {
        op: &'static str,
        target: String,
        message: String,
    },
}

/// A container engine, as the executor uses it.
pub trait Runtime: Send + Sync + 'static {
    /// The engine's version, platform and data folder.
    fn info(&self) -> impl Future<Output = Result<EngineInfo, RuntimeError>> + Send;
    /// The image if the engine has it.
    fn image(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<ImageInfo>, RuntimeError>> + Send;
    /// Pulls an image for `platform` (of a multi-platform image, that platform's variant),
    /// sending progress as it goes (dropped when the receiver lags).
    fn pull(
        &self,
        image: &str,
        platform: &registry::Platform,
        credentials: Option<&RegistryCredentials>,
        progress: Option<&mpsc::Sender<PullProgress>>,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// SIGTERM, then SIGKILL after `grace`.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a container (forcing, so a running one goes too).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Renames a container (a staged container takes its module's name after the switch).
    fn rename(&self, id: &str, name: &str)
    -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every container labelled as Outpost's for `device`, running or not.
    fn list(
        &self,
        device: &str,
    ) -> impl Future<Output = Result<Vec<Observed>, RuntimeError>> + Send;
    /// Events of Outpost's containers for `device`, from now on.
    fn events(
        &self,
        device: &str,
    ) -> impl Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static;
    /// A container's log lines (stdout and stderr).
    fn logs(
        &self,
        id: &str,
        options: LogOptions,
    ) -> impl Stream<Item = Result<String, RuntimeError>> + Send + 'static;
    fn images(&self) -> impl Future<Output = Result<Vec<ImageInfo>, RuntimeError>> + Send;
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// A container's CPU and memory use now, for telemetry (may take about a second: CPU use
    /// is measured between two readings). A container that is not running gives a sample
    /// with nothing in it.
    fn usage(&self, id: &str) -> impl Future<Output = Result<ContainerUsage, RuntimeError>> + Send;
    /// The host's address as containers on the engine's default network see it (where the
    /// local bus listens by default); `None` when there is no such network. Fails when the
    /// engine does not answer: falling back to another address then would change every
    /// module's bus address (and so recreate them) over a passing error.
    fn bridge_gateway(
        &self,
    ) -> impl Future<Output = Result<Option<std::net::IpAddr>, RuntimeError>> + Send;
}
