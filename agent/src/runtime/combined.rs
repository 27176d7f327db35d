//! The runtime the agent runs with: the Docker engine when the device has one
//! (`runtime.kind = "docker"`), and the process runtime always; each call goes to the one that
//! owns the container (by id), the image (an absolute path is an executable) or the spec (its
//! runtime label). The reconciler sees one runtime and one list.

use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use super::process::{ID_PREFIX, ProcessRuntime};
use super::{
    ContainerSpec, ContainerUsage, DockerRuntime, EngineInfo, ImageInfo, LogOptions, Observed,
    PullProgress, Runtime, RuntimeError, RuntimeEvent, labels,
};
use crate::manifest::RegistryCredentials;

pub struct Combined {
    pub docker: Option<DockerRuntime>,
    pub process: ProcessRuntime,
}

/// Executables are named by absolute path; images never start with `/`.
fn is_executable(image: &str) -> bool {
    image.starts_with('/')
}

fn no_engine(op: &'static str, target: &str) -> RuntimeError {
    RuntimeError::Engine {
        op,
        target: target.to_string(),
        message: "this device has no container engine (runtime.kind = \"process\")".to_string(),
    }
}

impl Combined {
    fn docker(&self, op: &'static str, target: &str) -> Result<&DockerRuntime, RuntimeError> {
        self.docker.as_ref().ok_or_else(|| no_engine(op, target))
    }

    /// The process record `id` names (its id, or a process module's container name); `None`
    /// for a container's.
    fn process_id(&self, id: &str) -> Option<String> {
        if id.starts_with(ID_PREFIX) {
            return Some(id.to_string());
        }
        // Only a container name of ours (`outpost.DEVICE.MODULE`, as the local API asks for
        // logs) is looked up among the records: an engine's id never is, so the engine's
        // calls cost no reading of the process folders.
        if !id.starts_with("outpost.") {
            return None;
        }
        self.process.id_by_name(id)
    }
}

impl Runtime for Combined {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        match &self.docker {
            Some(d) => d.info().await,
            None => self.process.info().await,
        }
    }

    async fn image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        if is_executable(image) {
            return self.process.image(image).await;
        }
        self.docker("inspect", image)?.image(image).await
    }

    async fn pull(
        &self,
        image: &str,
        platform: &super::registry::Platform,
        credentials: Option<&RegistryCredentials>,
        progress: Option<&mpsc::Sender<PullProgress>>,
    ) -> Result<(), RuntimeError> {
        if is_executable(image) {
            return self
                .process
                .pull(image, platform, credentials, progress)
                .await;
        }
        self.docker("pull", image)?
            .pull(image, platform, credentials, progress)
            .await
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        if spec.labels.get(labels::RUNTIME).map(String::as_str) == Some("process") {
            return self.process.create(spec).await;
        }
        self.docker("create", &spec.name)?.create(spec).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(id) = self.process_id(id) {
            return self.process.start(&id).await;
        }
        self.docker("start", id)?.start(id).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        if let Some(id) = self.process_id(id) {
            return self.process.stop(&id, grace).await;
        }
        self.docker("stop", id)?.stop(id, grace).await
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        if let Some(id) = self.process_id(id) {
            return self.process.remove(&id).await;
        }
        self.docker("remove", id)?.remove(id).await
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        if let Some(id) = self.process_id(id) {
            return self.process.rename(&id, name).await;
        }
        self.docker("rename", id)?.rename(id, name).await
    }

    async fn list(&self, device: &str) -> Result<Vec<Observed>, RuntimeError> {
        let mut all = self.process.list(device).await?;
        if let Some(d) = &self.docker {
            all.extend(d.list(device).await?);
        }
        Ok(all)
    }

    fn events(
        &self,
        device: &str,
    ) -> impl Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static {
        let processes = self.process.events(device).boxed();
        match &self.docker {
            Some(d) => futures_util::stream::select(processes, d.events(device).boxed()).boxed(),
            None => processes,
        }
    }

    fn logs(
        &self,
        id: &str,
        options: LogOptions,
    ) -> impl Stream<Item = Result<String, RuntimeError>> + Send + 'static {
        if let Some(id) = self.process_id(id) {
            return self.process.logs(&id, options).boxed();
        }
        match &self.docker {
            Some(d) => d.logs(id, options).boxed(),
            None => futures_util::stream::iter([Err(no_engine("logs", id))]).boxed(),
        }
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        match &self.docker {
            Some(d) => d.images().await,
            None => Ok(Vec::new()),
        }
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        if is_executable(id) {
            return Ok(());
        }
        self.docker("remove image", id)?.remove_image(id).await
    }

    async fn usage(&self, id: &str) -> Result<ContainerUsage, RuntimeError> {
        if let Some(id) = self.process_id(id) {
            return self.process.usage(&id).await;
        }
        self.docker("stats", id)?.usage(id).await
    }

    async fn bridge_gateway(&self) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        match &self.docker {
            Some(d) => d.bridge_gateway().await,
            None => Ok(None),
        }
    }
}
