//! An in-memory container engine for tests of the reconciler and of the hub link against the
//! real reconciler, and for simulations. It is a **fake**, named as such: it exists because a
//! unit test cannot make the real engine lose its clock, fail a start on demand or take ten
//! seconds to stop a module under paused time. The end-to-end tests use the real engine.
//!
//! It behaves like Docker where the reconciler depends on it: container names are unique
//! (`409`), unknown containers and images are `404`, images must be pulled from its "registry"
//! before a container is created from them, a stop waits for the grace period when the module
//! ignores SIGTERM (then kills it: exit 137), and `create`/`start`/`die`/`destroy` events are
//! sent. Time is tokio's, so tests with paused time run minutes of backoff in milliseconds;
//! timestamps come from the [`Clock`] it is given (a device's engine shares the device's wall
//! clock).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use tokio::sync::{broadcast, mpsc};

use super::{
    ContainerSpec, ContainerState, ContainerUsage, EngineInfo, Health, ImageInfo, LogOptions,
    Observed, PullProgress, Runtime, RuntimeError, RuntimeEvent, labels,
};
use crate::clock::SharedClock;
use crate::manifest::RegistryCredentials;
use crate::runtime::registry::Platform;

/// How a module's process behaves in the fake engine.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// PID 1 without a SIGTERM handler: a stop takes the whole grace period, then a kill.
    pub ignores_sigterm: bool,
    /// Exit on its own this long after each start, with this code.
    pub exit_after: Option<(Duration, i64)>,
}

#[derive(Debug, Clone)]
struct Container {
    observed: Observed,
    spec: ContainerSpec,
    /// Bumped on every start and stop, so a pending timed exit of an earlier run is ignored.
    run: u64,
}

#[derive(Debug, Default)]
struct Inner {
    containers: BTreeMap<String, Container>,
    /// Images on the engine.
    images: BTreeMap<String, ImageInfo>,
    /// Images the registry has (what a pull can fetch).
    registry: BTreeMap<String, Vec<ImageInfo>>,
    /// (image, platform) of every pull that found its image.
    pulled_platforms: Vec<(String, String)>,
    behaviours: BTreeMap<String, Behaviour>,
    /// Module → the engine's message for every start of it, until cleared.
    start_failures: BTreeMap<String, String>,
    /// Image → how long a pull of it takes.
    pull_delays: BTreeMap<String, Duration>,
    logs: BTreeMap<String, Vec<String>>,
    /// Every image can be pulled (tests about something else than images).
    any_image: bool,
    next_id: u64,
    /// Every call that changed something, in order (`create app`, `stop app`, ...).
    calls: Vec<String>,
    engine_down: bool,
}

/// The fake engine. Cheap to clone; clones share the engine.
#[derive(Debug, Clone)]
pub struct FakeRuntime {
    inner: Arc<Mutex<Inner>>,
    events: broadcast::Sender<RuntimeEvent>,
    clock: SharedClock,
    architecture: String,
}

fn image_info(reference: &str, architecture: &str) -> ImageInfo {
    // One id per reference and platform, as the engine's ids differ per platform.
    let id = reference.len() * 100 + architecture.len();
    ImageInfo {
        id: format!("sha256:{id:0>64}"),
        tags: vec![reference.to_string()],
        digests: Vec::new(),
        created: 0,
        os: "linux".into(),
        architecture: architecture.into(),
        variant: None,
    }
}

impl FakeRuntime {
    /// An engine for this device's platform with nothing on it and an empty registry.
    pub fn new(clock: SharedClock) -> FakeRuntime {
        let (events, _) = broadcast::channel(1024);
        FakeRuntime {
            inner: Arc::new(Mutex::new(Inner::default())),
            events,
            clock,
            architecture: super::go_arch().to_string(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock has failed already; the state is still
        // what it was, so go on rather than cascade the poison.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `reference` available to pull.
    pub fn publish_image(&self, reference: &str) {
        let info = image_info(reference, &self.architecture);
        self.lock()
            .registry
            .insert(reference.to_string(), vec![info]);
    }

    /// Lets every image be pulled, as if the registry had them all.
    pub fn serve_any_image(&self) {
        self.lock().any_image = true;
    }

    /// Makes `reference` available to pull for another platform too: with several, the
    /// reference is a multi-platform image and a pull picks the wanted one; with one, it is a
    /// single-platform image, pulled whatever the platform asked (as Docker does).
    pub fn publish_image_for(&self, reference: &str, architecture: &str) {
        let info = image_info(reference, architecture);
        self.lock()
            .registry
            .entry(reference.to_string())
            .or_default()
            .push(info);
    }

    /// Puts `reference` on the engine as if pulled long ago.
    pub fn load_image(&self, reference: &str) {
        let info = image_info(reference, &self.architecture);
        let mut inner = self.lock();
        inner
            .registry
            .insert(reference.to_string(), vec![info.clone()]);
        inner.images.insert(reference.to_string(), info);
    }

    pub fn set_behaviour(&self, module: &str, behaviour: Behaviour) {
        self.lock().behaviours.insert(module.to_string(), behaviour);
    }

    /// Every start of `module` fails with `message` until [`FakeRuntime::clear_start_failure`].
    pub fn fail_starts(&self, module: &str, message: &str) {
        self.lock()
            .start_failures
            .insert(module.to_string(), message.to_string());
    }

    pub fn clear_start_failure(&self, module: &str) {
        self.lock().start_failures.remove(module);
    }

    /// Pulls of `reference` take `delay`.
    pub fn slow_pull(&self, reference: &str, delay: Duration) {
        self.lock().pull_delays.insert(reference.to_string(), delay);
    }

    /// While down, every call fails as if the engine's socket did not answer.
    pub fn set_engine_down(&self, down: bool) {
        self.lock().engine_down = down;
    }

    /// A line the module's process prints.
    pub fn print(&self, module: &str, line: &str) {
        self.lock()
            .logs
            .entry(module.to_string())
            .or_default()
            .push(line.to_string());
    }

    /// The platform each successful pull asked for, in order.
    pub fn pulled_platforms(&self) -> Vec<(String, String)> {
        self.lock().pulled_platforms.clone()
    }

    /// Every call that changed the engine, in order: `pull IMAGE`, `create NAME`, `start NAME`,
    /// `stop NAME`, `remove NAME`, `rename OLD NEW`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    pub fn has_image(&self, reference: &str) -> bool {
        self.lock().images.contains_key(reference)
    }

    /// The device's containers as the engine has them.
    pub fn containers(&self) -> Vec<Observed> {
        self.lock()
            .containers
            .values()
            .map(|c| c.observed.clone())
            .collect()
    }

    /// Kills a running container as a crash would (exit `code`).
    pub fn crash(&self, name_or_id: &str, code: i64) {
        let wall = self.clock.wall_ms() / 1000;
        let mut inner = self.lock();
        if let Some(id) = find(&inner, name_or_id) {
            let c = inner.containers.get_mut(&id).expect("found just now");
            exit(c, code, wall);
            let event = event_of(c, "die");
            drop(inner);
            let _ = self.events.send(event);
        }
    }

    fn check_up(&self) -> Result<(), RuntimeError> {
        if self.lock().engine_down {
            return Err(RuntimeError::Engine {
                op: "connect",
                target: "engine".into(),
                message: "the engine does not answer (fake engine down)".into(),
            });
        }
        Ok(())
    }

    /// Schedules the module's own exit for the run that just started.
    fn schedule_exit(&self, id: &str) {
        let (after, code, run) = {
            let inner = self.lock();
            let Some(c) = inner.containers.get(id) else {
                return;
            };
            let Some((after, code)) = inner
                .behaviours
                .get(&c.observed.module)
                .and_then(|b| b.exit_after)
            else {
                return;
            };
            (after, code, c.run)
        };
        let this = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let wall = this.clock.wall_ms() / 1000;
            let mut inner = this.lock();
            let Some(c) = inner.containers.get_mut(&id) else {
                return;
            };
            if c.run != run || c.observed.state != ContainerState::Running {
                return;
            }
            exit(c, code, wall);
            let event = event_of(c, "die");
            drop(inner);
            let _ = this.events.send(event);
        });
    }
}

fn find(inner: &Inner, name_or_id: &str) -> Option<String> {
    inner
        .containers
        .values()
        .find(|c| c.observed.id == name_or_id || c.observed.name == name_or_id)
        .map(|c| c.observed.id.clone())
}

fn exit(c: &mut Container, code: i64, wall_secs: u64) {
    c.observed.state = ContainerState::Exited;
    c.observed.exit_code = Some(code);
    c.observed.finished_at = Some(wall_secs);
    c.observed.health = Health::None;
    c.run += 1;
}

fn event_of(c: &Container, action: &str) -> RuntimeEvent {
    RuntimeEvent {
        container_id: c.observed.id.clone(),
        module: Some(c.observed.module.clone()),
        action: action.to_string(),
    }
}

fn not_found(what: &str) -> RuntimeError {
    RuntimeError::NotFound {
        what: what.to_string(),
    }
}

impl Runtime for FakeRuntime {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        self.check_up()?;
        Ok(EngineInfo {
            version: "fake 1.0".into(),
            os: "linux".into(),
            architecture: self.architecture.clone(),
            root_dir: None,
        })
    }

    async fn image(&self, image: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        self.check_up()?;
        Ok(self.lock().images.get(image).cloned())
    }

    async fn pull(
        &self,
        image: &str,
        platform: &Platform,
        _credentials: Option<&RegistryCredentials>,
        progress: Option<&mpsc::Sender<PullProgress>>,
    ) -> Result<(), RuntimeError> {
        self.check_up()?;
        let delay = self.lock().pull_delays.get(image).copied();
        if let Some(tx) = progress {
            let _ = tx.try_send(PullProgress {
                image: image.to_string(),
                status: "Downloading".into(),
                current_bytes: 0,
                total_bytes: 1,
            });
        }
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut inner = self.lock();
        inner.calls.push(format!("pull {image}"));
        if inner.any_image && !inner.registry.contains_key(image) {
            let info = image_info(image, &self.architecture);
            inner.registry.insert(image.to_string(), vec![info]);
        }
        let Some(offered) = inner.registry.get(image).cloned() else {
            return Err(RuntimeError::Pull {
                image: image.to_string(),
                message: "404 manifest unknown (the registry has no such image or tag)".into(),
            });
        };
        let chosen = match &offered[..] {
            [only] => Some(only.clone()),
            _ => offered
                .iter()
                .find(|i| platform.runs(&i.os, &i.architecture, i.variant.as_deref()))
                .cloned(),
        };
        match chosen {
            Some(info) => {
                inner
                    .pulled_platforms
                    .push((image.to_string(), platform.to_string()));
                inner.images.insert(image.to_string(), info);
                Ok(())
            }
            None => Err(RuntimeError::Pull {
                image: image.to_string(),
                message: format!(
                    "no matching manifest for {platform} in the manifest list entries"
                ),
            }),
        }
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.check_up()?;
        let mut inner = self.lock();
        if inner
            .containers
            .values()
            .any(|c| c.observed.name == spec.name)
        {
            return Err(RuntimeError::Engine {
                op: "create",
                target: spec.name.clone(),
                message: format!(
                    "409 Conflict. The container name \"/{}\" is already in use",
                    spec.name
                ),
            });
        }
        let Some(image) = inner.images.get(&spec.image).cloned() else {
            return Err(not_found(&spec.image));
        };
        inner.next_id += 1;
        let id = format!("{:0>64x}", inner.next_id);
        let observed = Observed {
            id: id.clone(),
            name: spec.name.clone(),
            module: spec.labels.get(labels::MODULE).cloned().unwrap_or_default(),
            config_hash: spec
                .labels
                .get(labels::CONFIG_HASH)
                .cloned()
                .unwrap_or_default(),
            state: ContainerState::Created,
            health: Health::None,
            exit_code: None,
            oom_killed: false,
            started_at: None,
            finished_at: None,
            image: spec.image.clone(),
            image_id: image.id,
            labels: spec.labels.clone(),
        };
        inner.calls.push(format!("create {}", spec.name));
        let container = Container {
            observed,
            spec: spec.clone(),
            run: 0,
        };
        let event = event_of(&container, "create");
        inner.containers.insert(id.clone(), container);
        drop(inner);
        let _ = self.events.send(event);
        Ok(id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let wall = self.clock.wall_ms() / 1000;
        let mut inner = self.lock();
        let key = find(&inner, id).ok_or_else(|| not_found(id))?;
        let module = inner.containers[&key].observed.module.clone();
        let name = inner.containers[&key].observed.name.clone();
        if let Some(message) = inner.start_failures.get(&module).cloned() {
            inner.calls.push(format!("start {name} (failed)"));
            return Err(RuntimeError::Engine {
                op: "start",
                target: id.to_string(),
                message,
            });
        }
        let c = inner.containers.get_mut(&key).expect("found just now");
        if c.observed.state == ContainerState::Running {
            return Ok(());
        }
        c.observed.state = ContainerState::Running;
        c.observed.started_at = Some(wall);
        c.observed.exit_code = None;
        c.run += 1;
        let event = event_of(c, "start");
        inner.calls.push(format!("start {name}"));
        drop(inner);
        let _ = self.events.send(event);
        self.schedule_exit(&key);
        Ok(())
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.check_up()?;
        let (key, ignores, run) = {
            let mut inner = self.lock();
            let key = find(&inner, id).ok_or_else(|| not_found(id))?;
            let c = &inner.containers[&key];
            if c.observed.state != ContainerState::Running {
                return Ok(());
            }
            let ignores = inner
                .behaviours
                .get(&c.observed.module)
                .is_some_and(|b| b.ignores_sigterm);
            let (name, run) = (c.observed.name.clone(), c.run);
            inner.calls.push(format!("stop {name}"));
            (key, ignores, run)
        };
        // The process gets SIGTERM: a handler exits at once, none means the grace period.
        let (wait, code) = if ignores {
            (grace, 137)
        } else {
            (Duration::from_millis(10), 0)
        };
        tokio::time::sleep(wait).await;
        let wall = self.clock.wall_ms() / 1000;
        let mut inner = self.lock();
        if let Some(c) = inner.containers.get_mut(&key)
            && c.run == run
            && c.observed.state == ContainerState::Running
        {
            exit(c, code, wall);
            let event = event_of(c, "die");
            drop(inner);
            let _ = self.events.send(event);
        }
        Ok(())
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let mut inner = self.lock();
        let Some(key) = find(&inner, id) else {
            return Ok(());
        };
        let c = inner.containers.remove(&key).expect("found just now");
        inner.calls.push(format!("remove {}", c.observed.name));
        drop(inner);
        let _ = self.events.send(event_of(&c, "destroy"));
        Ok(())
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let mut inner = self.lock();
        if inner.containers.values().any(|c| c.observed.name == name) {
            return Err(RuntimeError::Engine {
                op: "rename",
                target: id.to_string(),
                message: format!("409 Conflict. The container name \"/{name}\" is already in use"),
            });
        }
        let key = find(&inner, id).ok_or_else(|| not_found(id))?;
        let c = inner.containers.get_mut(&key).expect("found just now");
        let old = std::mem::replace(&mut c.observed.name, name.to_string());
        c.spec.name = name.to_string();
        inner.calls.push(format!("rename {old} {name}"));
        Ok(())
    }

    async fn list(&self, device: &str) -> Result<Vec<Observed>, RuntimeError> {
        self.check_up()?;
        Ok(self
            .lock()
            .containers
            .values()
            .filter(|c| {
                c.observed.labels.get(labels::MANAGED).map(String::as_str) == Some("true")
                    && c.observed.labels.get(labels::DEVICE).map(String::as_str) == Some(device)
            })
            .map(|c| c.observed.clone())
            .collect())
    }

    fn events(
        &self,
        _device: &str,
    ) -> impl Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send + 'static {
        let rx = self.events.subscribe();
        futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((Ok(event), rx)),
                    // A slow reader missed events: the reconciler's resync covers it.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    fn logs(
        &self,
        id: &str,
        options: LogOptions,
    ) -> impl Stream<Item = Result<String, RuntimeError>> + Send + 'static {
        let inner = self.lock();
        let result = match find(&inner, id) {
            Some(key) => {
                let module = &inner.containers[&key].observed.module;
                let lines = inner.logs.get(module).cloned().unwrap_or_default();
                let skip = options.tail.map_or(0, |t| lines.len().saturating_sub(t));
                Ok(lines
                    .into_iter()
                    .skip(skip)
                    .map(|l| Ok(format!("{l}\n")))
                    .collect::<Vec<_>>())
            }
            None => Err(not_found(id)),
        };
        drop(inner);
        match result {
            Ok(lines) => futures_util::stream::iter(lines).left_stream(),
            Err(e) => futures_util::stream::iter([Err(e)]).right_stream(),
        }
    }

    async fn images(&self) -> Result<Vec<ImageInfo>, RuntimeError> {
        self.check_up()?;
        Ok(self.lock().images.values().cloned().collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let mut inner = self.lock();
        let in_use = inner.containers.values().any(|c| c.spec.image == id);
        if in_use {
            return Err(RuntimeError::Engine {
                op: "remove image",
                target: id.to_string(),
                message: "409 conflict: image is being used by a container".into(),
            });
        }
        inner.calls.push(format!("remove image {id}"));
        match inner.images.remove(id) {
            Some(_) => Ok(()),
            None => Err(not_found(id)),
        }
    }

    async fn usage(&self, id: &str) -> Result<ContainerUsage, RuntimeError> {
        self.check_up()?;
        let inner = self.lock();
        match inner.containers.get(id) {
            Some(_) => Ok(ContainerUsage::default()),
            None => Err(not_found(id)),
        }
    }

    async fn bridge_gateway(&self) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        self.check_up()?;
        // The fake engine has no networks: the bus falls back to loopback.
        Ok(None)
    }
}
