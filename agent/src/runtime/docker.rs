//! The Docker implementation of [`Runtime`], over the engine's Unix socket with bollard.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::auth::DockerCredentials;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerStatsResponse, DeviceMapping,
    HealthStatusEnum, HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder, StartContainerOptions,
    StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::{Stream, StreamExt as _};
use tokio::sync::mpsc;

use super::{
    ContainerSpec, ContainerState, ContainerUsage, EngineInfo, Health, ImageInfo, LogOptions,
    Observed, PullProgress, Runtime, RuntimeError, RuntimeEvent, labels,
};
use crate::manifest::{ImageRef, RegistryCredentials};

/// Docker Engine API version spoken when the engine does not say (Debian 12's Docker 20.10).
const FALLBACK_API: bollard::ClientVersion = bollard::ClientVersion {
    major_version: 1,
    minor_version: 41,
};

/// Containers inspected at once when listing.
const INSPECT_AT_ONCE: usize = 8;

/// Request timeout for engine calls, in seconds; pulls stream and are not bound by it.
const TIMEOUT_SECS: u64 = 120;

#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

/// The configured IPv4 gateway, or else the first address of the subnet (Docker's choice
/// when it does not list one).
fn gateway_of(gateway: Option<&str>, subnet: Option<&str>) -> Option<std::net::IpAddr> {
    if let Some(ip) = gateway.and_then(|g| g.parse::<std::net::Ipv4Addr>().ok()) {
        return Some(ip.into());
    }
    let (net, len) = subnet?.split_once('/')?;
    let net: std::net::Ipv4Addr = net.parse().ok()?;
    let len: u32 = len.parse().ok().filter(|l| *l <= 30)?;
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    Some(std::net::Ipv4Addr::from((u32::from(net) & mask) + 1).into())
}

impl DockerRuntime {
    /// Connects to the engine's socket and agrees on an API version.
    ///
    /// Fails when the socket does not exist or the engine does not answer.
    pub async fn connect(socket: &std::path::Path) -> Result<DockerRuntime, RuntimeError> {
        let path = socket.display().to_string();
        let connect_err = |source: bollard::errors::Error| RuntimeError::Connect {
            socket: path.clone(),
            source: Box::new(source),
        };
        let docker =
            Docker::connect_with_unix(&path, TIMEOUT_SECS, &FALLBACK_API).map_err(connect_err)?;
        let docker = docker.negotiate_version().await.map_err(connect_err)?;
        Ok(DockerRuntime { docker })
    }

    /// The bollard client, for what the [`Runtime`] trait does not ask (`check`'s and the
    /// support bundle's engine facts).
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    async fn observe(&self, id: &str) -> Result<Option<Observed>, RuntimeError> {
        let info = match self.docker.inspect_container(id, None).await {
            Ok(info) => info,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(engine("inspect", id, e)),
        };
        let config = info.config.unwrap_or_default();
        let labels: BTreeMap<String, String> =
            config.labels.unwrap_or_default().into_iter().collect();
        let state = info.state.unwrap_or_default();
        let health = match state.health.and_then(|h| h.status) {
            Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
            Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
            Some(HealthStatusEnum::STARTING) => Health::Starting,
            _ => Health::None,
        };
        Ok(Some(Observed {
            id: info.id.unwrap_or_else(|| id.to_string()),
            name: info
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
            module: labels.get(labels::MODULE).cloned().unwrap_or_default(),
            config_hash: labels.get(labels::CONFIG_HASH).cloned().unwrap_or_default(),
            state: match state.status {
                Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
                Some(ContainerStateStatusEnum::RUNNING) => ContainerState::Running,
                Some(ContainerStateStatusEnum::RESTARTING) => ContainerState::Restarting,
                Some(ContainerStateStatusEnum::PAUSED) => ContainerState::Paused,
                Some(ContainerStateStatusEnum::EXITED) => ContainerState::Exited,
                Some(ContainerStateStatusEnum::DEAD) => ContainerState::Dead,
                Some(ContainerStateStatusEnum::REMOVING) => ContainerState::Removing,
                _ => ContainerState::Unknown,
            },
            health,
            exit_code: state.exit_code,
            oom_killed: state.oom_killed.unwrap_or(false),
            started_at: state.started_at.as_deref().and_then(parse_rfc3339),
            finished_at: state.finished_at.as_deref().and_then(parse_rfc3339),
            image: config.image.unwrap_or_default(),
            image_id: info.image.unwrap_or_default(),
            labels,
        }))
    }
}

fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn message_of(e: &BollardError) -> String {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => {
            format!("{status_code} {message}")
        }
        other => other.to_string(),
    }
}

fn engine(op: &'static str, target: &str, e: BollardError) -> RuntimeError {
    if status_of(&e) == Some(404) {
        return RuntimeError::NotFound {
            what: target.to_string(),
        };
    }
    RuntimeError::Engine {
        op,
        target: target.to_string(),
        message: message_of(&e),
    }
}

/// CPU and memory use from one stats sample, computed as `docker stats` does.
///
/// CPU: the container's CPU time over the host's between the sample's two readings, times the
/// CPUs online, in percent (so up to 100 per CPU); `None` without a previous reading or when no
/// host time passed. Memory: usage minus the inactive page cache the kernel can reclaim
/// (`inactive_file` on cgroup v2, `total_inactive_file` or else `cache` on v1).
fn usage_of(stats: &ContainerStatsResponse) -> ContainerUsage {
    let memory = stats.memory_stats.as_ref();
    let memory_bytes = memory.and_then(|m| {
        let usage = m.usage?;
        let cache = m.stats.as_ref().and_then(|s| {
            ["total_inactive_file", "inactive_file", "cache"]
                .iter()
                .find_map(|key| s.get(*key).copied())
        });
        // As `docker stats`: a cache figure larger than the usage is not subtracted.
        Some(match cache {
            Some(cache) if cache < usage => usage - cache,
            _ => usage,
        })
    });
    ContainerUsage {
        cpu_percent: cpu_percent_of(stats),
        memory_bytes,
        memory_limit_bytes: memory.and_then(|m| m.limit).filter(|l| *l > 0),
    }
}

/// See [`usage_of`].
fn cpu_percent_of(stats: &ContainerStatsResponse) -> Option<f64> {
    let now = stats.cpu_stats.as_ref()?;
    let prev = stats.precpu_stats.as_ref()?;
    let cpu_now = now.cpu_usage.as_ref()?.total_usage?;
    let cpu_prev = prev.cpu_usage.as_ref()?.total_usage?;
    let system_now = now.system_cpu_usage?;
    // 0 or missing: there was no previous reading (one-shot, or a container just started).
    let system_prev = prev.system_cpu_usage.filter(|t| *t > 0)?;
    let cpu_delta = cpu_now.checked_sub(cpu_prev)?;
    let system_delta = system_now.checked_sub(system_prev).filter(|d| *d > 0)?;
    let cpus = now
        .online_cpus
        .filter(|n| *n > 0)
        .map(u64::from)
        .or_else(|| {
            let per_cpu = now.cpu_usage.as_ref()?.percpu_usage.as_ref()?.len();
            u64::try_from(per_cpu).ok().filter(|n| *n > 0)
        })
        .unwrap_or(1);
    Some(cpu_delta as f64 / system_delta as f64 * cpus as f64 * 100.0)
}

fn outpost_filter(device: &str) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_string(),
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={device}", labels::DEVICE),
        ],
    )])
}

impl Runtime for DockerRuntime {
    async fn bridge_gateway(&self) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        let network = match self.docker.inspect_network("bridge", None).await {
            Ok(n) => n,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(engine("inspect network", "bridge", e)),
        };
        Ok(network
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .find_map(|c| gateway_of(c.gateway.as_deref(), c.subnet.as_deref())))
    }

    async fn usage(&self, container_id: &str) -> Result<ContainerUsage, RuntimeError> {
        // Not one-shot: one-shot answers at once but leaves the previous CPU reading empty.
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(false)
            .build();
        let mut stats = std::pin::pin!(self.docker.stats(container_id, Some(options)));
        match stats.next().await {
            Some(Ok(sample)) => Ok(usage_of(&sample)),
            Some(Err(e)) => Err(engine("stats", container_id, e)),
            None => Err(RuntimeError::Engine {
                op: "stats",
                target: container_id.to_string(),
                message: "the engine sent no sample".into(),
            }),
        }
    }

    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| engine("version", "engine", e))?;
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| engine("info", "engine", e))?;
        Ok(EngineInfo {
            version: format!(
                "docker {} (API {})",
                v.version.unwrap_or_default(),
                v.api_version.unwrap_or_default()
            ),
            os: v.os.unwrap_or_else(|| "linux".into()),
            architecture: v.arch.unwrap_or_default(),
            root_dir: info.docker_root_dir.map(std::path::PathBuf::from),
        })
    }

    async fn image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(ImageInfo {
                id: i.id.unwrap_or_default(),
                tags: i.repo_tags.unwrap_or_default(),
                digests: i.repo_digests.unwrap_or_default(),
                created: i.created.as_deref().and_then(parse_rfc3339).unwrap_or(0) as i64,
                os: i.os.unwrap_or_default(),
                architecture: i.architecture.unwrap_or_default(),
                variant: i.variant.filter(|v| !v.is_empty()),
            })),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(engine("inspect image", image, e)),
        }
    }

    async fn pull(
        &self,
        image: &str,
        platform: &super::registry::Platform,
        credentials: Option<&RegistryCredentials>,
        progress: Option<&mpsc::Sender<PullProgress>>,
    ) -> Result<(), RuntimeError> {
        let pull_err = |message: String| RuntimeError::Pull {
            image: image.to_string(),
            message,
        };
        let reference = ImageRef::parse(image).map_err(pull_err)?;
        // The tag (or digest) is always named: without it the engine would pull every tag.
        let (from, tag) = match (&reference.digest, &reference.tag) {
            (Some(digest), _) => (
                image.split('@').next().unwrap_or(image).to_string(),
                digest.clone(),
            ),
            (None, Some(tag)) => (
                image[..image.len() - tag.len() - 1].to_string(),
                tag.clone(),
            ),
            (None, None) => return Err(pull_err("the reference has no tag or digest".into())),
        };
        let from = match &reference.digest {
            // A digest is passed as `repo@sha256:...` in fromImage with an empty tag.
            Some(_) => image.to_string(),
            None => from,
        };
        // The platform goes with every pull: of a multi-platform image the engine pulls that
        // variant (an API 1.32 parameter; older engines pull their own).
        let platform = platform.to_string();
        let options = if reference.digest.is_some() {
            CreateImageOptionsBuilder::default()
                .from_image(&from)
                .platform(&platform)
                .build()
        } else {
            CreateImageOptionsBuilder::default()
                .from_image(&from)
                .tag(&tag)
                .platform(&platform)
                .build()
        };
        let auth = credentials.map(|c| DockerCredentials {
            username: Some(c.username.clone()),
            password: Some(c.password.expose().to_string()),
            serveraddress: Some(reference.registry.clone()),
            ..Default::default()
        });
        let mut stream = self.docker.create_image(Some(options), None, auth);
        let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| pull_err(pull_message(&e)))?;
            if let Some(detail) = info.error_detail {
                return Err(pull_err(
                    detail.message.unwrap_or_else(|| "unknown error".into()),
                ));
            }
            if let (Some(id), Some(detail)) = (&info.id, &info.progress_detail) {
                let current = detail.current.unwrap_or(0).max(0) as u64;
                let total = detail.total.unwrap_or(0).max(0) as u64;
                layers.insert(id.clone(), (current, total));
            }
            if let Some(tx) = progress {
                let (current, total) = layers
                    .values()
                    .fold((0, 0), |(c, t), (lc, lt)| (c + lc, t + lt));
                // Progress is advisory: a slow reader loses updates, never stalls the pull.
                let _ = tx.try_send(PullProgress {
                    image: image.to_string(),
                    status: info.status.clone().unwrap_or_default(),
                    current_bytes: current,
                    total_bytes: total,
                });
            }
        }
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let port_bindings = (!spec.port_bindings.is_empty()).then(|| {
            spec.port_bindings
                .iter()
                .map(|(port, bindings)| {
                    let port = if port.contains('/') {
                        port.clone()
                    } else {
                        format!("{port}/tcp")
                    };
                    let b = bindings
                        .iter()
                        .map(|(ip, host_port)| PortBinding {
                            host_ip: ip.clone(),
                            host_port: Some(host_port.clone()),
                        })
                        .collect();
                    (port, Some(b))
                })
                .collect::<HashMap<_, _>>()
        });
        let exposed: Option<Vec<String>> =
            port_bindings.as_ref().map(|p| p.keys().cloned().collect());
        let host_config = HostConfig {
            binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
            port_bindings,
            privileged: Some(spec.privileged),
            network_mode: spec.network_mode.clone(),
            devices: (!spec.devices.is_empty()).then(|| {
                spec.devices
                    .iter()
                    .map(|(host, inside, perms)| DeviceMapping {
                        path_on_host: Some(host.clone()),
                        path_in_container: Some(inside.clone()),
                        cgroup_permissions: Some(perms.clone()),
                    })
                    .collect()
            }),
            cap_add: (!spec.cap_add.is_empty()).then(|| spec.cap_add.clone()),
            cap_drop: (!spec.cap_drop.is_empty()).then(|| spec.cap_drop.clone()),
            readonly_rootfs: Some(spec.readonly_rootfs),
            extra_hosts: (!spec.extra_hosts.is_empty()).then(|| spec.extra_hosts.clone()),
            memory: spec.memory_bytes,
            // Equal to memory: no swap on top of the limit.
            memory_swap: spec.memory_bytes,
            nano_cpus: spec.nano_cpus,
            pids_limit: spec.pids_limit,
            security_opt: (!spec.security_opt.is_empty()).then(|| spec.security_opt.clone()),
            // The agent restarts modules itself, with its own backoff and reporting.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(HashMap::from([
                    ("max-size".to_string(), spec.log_max_size.clone()),
                    ("max-file".to_string(), spec.log_max_files.to_string()),
                ])),
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            cmd: spec.cmd.clone(),
            entrypoint: spec.entrypoint.clone(),
            user: spec.user.clone(),
            working_dir: spec.working_dir.clone(),
            exposed_ports: exposed,
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| engine("create", &spec.name, e))?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        match self
            .docker
            .start_container(id, None::<StartContainerOptions>)
            .await
        {
            // 304: already running.
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            other => other.map_err(|e| engine("start", id, e)),
        }
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptionsBuilder::default()
            .t(grace.as_secs().min(i32::MAX as u64) as i32)
            .build();
        match self.docker.stop_container(id, Some(options)).await {
            // 304: already stopped.
            Err(e) if status_of(&e) == Some(304) => Ok(()),
            other => other.map_err(|e| engine("stop", id, e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            other => other.map_err(|e| engine("remove", id, e)),
        }
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        let options = bollard::query_parameters::RenameContainerOptionsBuilder::default()
            .name(name)
            .build();
        self.docker
            .rename_container(id, options)
            .await
            .map_err(|e| engine("rename", id, e))
    }

    async fn list(&self, device: &str) -> Result<Vec<Observed>, RuntimeError> {
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&outpost_filter(device))
            .build();
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| engine("list", "containers", e))?;
        // Inspected a few at a time: a pass over ten containers costs one round trip, not ten.
        let inspected: Vec<Result<Option<Observed>, RuntimeError>> =
            futures_util::stream::iter(summaries.into_iter().filter_map(|s| s.id))
                .map(|id| async move { self.observe(&id).await })
                .buffered(INSPECT_AT_ONCE)
                .collect()
                .await;
        let mut observed = Vec::with_capacity(inspected.len());
        for o in inspected {
            // A container removed between list and inspect is simply gone.
            if let Some(o) = o? {
                observed.push(o);
            }
        }
        Ok(observed)
    }

    fn events(
        &self,
        device: &str,
    ) -> impl Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static {
        let mut filters = outpost_filter(device);
        filters.insert("type".into(), vec!["container".into()]);
        let options = EventsOptionsBuilder::default().filters(&filters).build();
        self.docker.events(Some(options)).map(|item| {
            let event = item.map_err(|e| engine("events", "engine", e))?;
            let actor = event.actor.unwrap_or_default();
            let attributes = actor.attributes.unwrap_or_default();
            Ok(RuntimeEvent {
                container_id: actor.id.unwrap_or_default(),
                module: attributes.get(labels::MODULE).cloned(),
                action: event.action.unwrap_or_default(),
            })
        })
    }

    fn logs(
        &self,
        id: &str,
        options: LogOptions,
    ) -> impl Stream<Item = Result<String, RuntimeError>> + Send + 'static {
        let tail = options
            .tail
            .map_or_else(|| "all".to_string(), |t| t.to_string());
        let mut builder = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .follow(options.follow)
            .timestamps(options.timestamps)
            .tail(&tail);
        if let Some(since) = options.since {
            builder = builder.since(since.clamp(0, i32::MAX as i64) as i32);
        }
        let id = id.to_string();
        self.docker
            .logs(&id, Some(builder.build()))
            .map(move |item| {
                item.map(|chunk| chunk.to_string())
                    .map_err(|e| engine("logs", &id, e))
            })
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        let options = ListImagesOptionsBuilder::default().build();
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|e| engine("list", "images", e))?;
        Ok(images
            .into_iter()
            .map(|i| ImageInfo {
                id: i.id,
                tags: i.repo_tags,
                digests: i.repo_digests,
                created: i.created,
                os: String::new(),
                architecture: String::new(),
                variant: None,
            })
            .collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveImageOptionsBuilder::default().build();
        self.docker
            .remove_image(id, Some(options), None)
            .await
            .map(|_| ())
            .map_err(|e| engine("remove image", id, e))
    }
}

/// A pull error as an operator can act on it.
fn pull_message(e: &BollardError) -> String {
    let text = message_of(e);
    if text.contains("unauthorized") || text.contains("authentication required") {
        format!("{text} (check the registry's username and password in the manifest)")
    } else if text.contains("manifest unknown") || text.contains("not found") {
        format!("{text} (the registry has no such image or tag)")
    } else {
        text
    }
}

pub use crate::clock::parse_rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    use bollard::models::{ContainerCpuStats, ContainerCpuUsage, ContainerMemoryStats};

    fn cpu(total: u64, system: u64, online: Option<u32>) -> ContainerCpuStats {
        ContainerCpuStats {
            cpu_usage: Some(ContainerCpuUsage {
                total_usage: Some(total),
                percpu_usage: Some(vec![total / 2, total / 2]),
                ..Default::default()
            }),
            system_cpu_usage: Some(system),
            online_cpus: online,
            ..Default::default()
        }
    }

    fn memory(usage: u64, stats: &[(&str, u64)]) -> ContainerMemoryStats {
        ContainerMemoryStats {
            usage: Some(usage),
            limit: Some(1 << 30),
            stats: Some(stats.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            ..Default::default()
        }
    }

    #[test]
    fn usage_from_stats() {
        // cgroup v2, four CPUs: 0.5 s of container CPU in 4 s of host CPU time.
        let stats = ContainerStatsResponse {
            cpu_stats: Some(cpu(2_500_000_000, 104_000_000_000, Some(4))),
            precpu_stats: Some(cpu(2_000_000_000, 100_000_000_000, Some(4))),
            memory_stats: Some(memory(
                100 << 20,
                &[("anon", 60 << 20), ("inactive_file", 30 << 20)],
            )),
            ..Default::default()
        };
        assert_eq!(
            usage_of(&stats),
            ContainerUsage {
                cpu_percent: Some(50.0),
                memory_bytes: Some(70 << 20),
                memory_limit_bytes: Some(1 << 30),
            }
        );
    }

    #[test]
    fn usage_from_cgroup_v1_stats() {
        // No online_cpus (old engines): the per-CPU list counts them.
        let stats = ContainerStatsResponse {
            cpu_stats: Some(cpu(1_100, 2_000, None)),
            precpu_stats: Some(cpu(1_000, 1_000, None)),
            memory_stats: Some(memory(
                100,
                &[
                    ("inactive_file", 5),
                    ("total_inactive_file", 40),
                    ("cache", 60),
                ],
            )),
            ..Default::default()
        };
        let usage = usage_of(&stats);
        assert_eq!(usage.cpu_percent, Some(20.0));
        assert_eq!(usage.memory_bytes, Some(60));

        let only_cache = ContainerStatsResponse {
            memory_stats: Some(memory(100, &[("cache", 60)])),
            ..Default::default()
        };
        assert_eq!(usage_of(&only_cache).memory_bytes, Some(40));
        let cache_too_large = ContainerStatsResponse {
            memory_stats: Some(memory(100, &[("inactive_file", 160)])),
            ..Default::default()
        };
        assert_eq!(usage_of(&cache_too_large).memory_bytes, Some(100));
    }

    #[test]
    fn usage_without_readings() {
        // A stopped container: the engine sends an empty sample.
        assert_eq!(
            usage_of(&ContainerStatsResponse::default()),
            ContainerUsage::default()
        );
        // One-shot: no previous reading, so no CPU figure rather than the average since boot.
        let one_shot = ContainerStatsResponse {
            cpu_stats: Some(cpu(5_000, 9_000, Some(2))),
            precpu_stats: Some(ContainerCpuStats::default()),
            ..Default::default()
        };
        assert_eq!(usage_of(&one_shot).cpu_percent, None);
        // Counters that went backwards, and no host time passing.
        let backwards = ContainerStatsResponse {
            cpu_stats: Some(cpu(1_000, 9_000, Some(2))),
            precpu_stats: Some(cpu(5_000, 8_000, Some(2))),
            ..Default::default()
        };
        assert_eq!(usage_of(&backwards).cpu_percent, None);
        let still = ContainerStatsResponse {
            cpu_stats: Some(cpu(5_000, 8_000, Some(2))),
            precpu_stats: Some(cpu(5_000, 8_000, Some(2))),
            ..Default::default()
        };
        assert_eq!(usage_of(&still).cpu_percent, None);
    }

    #[test]
    fn bridge_gateway_from_ipam() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert_eq!(
            gateway_of(Some("10.1.0.254"), Some("10.1.0.0/24")),
            ip("10.1.0.254")
        );
        assert_eq!(gateway_of(None, Some("172.17.0.0/16")), ip("172.17.0.1"));
        assert_eq!(gateway_of(None, Some("fd00::/64")), None);
        assert_eq!(gateway_of(None, None), None);
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-11-27T13:50:01.123456789Z"),
            Some(1_795_787_401)
        );
        assert_eq!(
            parse_rfc3339("2026-11-27T14:50:01+01:00"),
            Some(1_795_787_401)
        );
        assert_eq!(parse_rfc3339("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("garbage"), None);
    }
}
