//! `outpost run`: wires the store, the Docker runtime, the reconciler and the local API
//! together, runs them until a shutdown signal, and stops them within a grace period.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use tokio::sync::watch;

use crate::bus::routes::RouteTable;
use crate::config::Config;
use crate::reconciler::{Reconciler, Settings};
use crate::runtime::{DockerRuntime, RuntimeError};
use crate::store::{Store, StoreError};
use crate::telemetry::outbox::{Limits, Outbox};
use crate::telemetry::upstream;

/// How long tasks get to finish after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
// The hub link stops within its own share of the agent's grace.
const _: () = assert!(crate::hub::LINK_GRACE.as_secs() < SHUTDOWN_GRACE.as_secs());

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
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    BusStart(#[from] crate::bus::start::StartError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Outbox(#[from] crate::telemetry::outbox::OutboxError),
    #[error(transparent)]
    Provision(#[from] crate::provision::ProvisionError),
}

impl DaemonError {
    /// Whether restarting cannot help (a configuration problem): the binary exits 78 then.
    pub fn is_configuration(&self) -> bool {
        matches!(self, DaemonError::Hub(e) if e.is_configuration())
            // A damaged identity needs a person: restarting would only fail again.
            || matches!(
                self,
                DaemonError::Provision(crate::provision::ProvisionError::Identity { .. })
            )
    }
}

/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Told to (a signal, or the token cancelled).
    Stopped,
    /// An update of the agent is staged (or, on trial, committed): the launcher takes over.
    Handover,
}

/// Runs the agent until `shutdown` is cancelled, in `role` (which binary it is, whether on
/// trial: [`crate::update::launch`]).
///
/// Fails at start-up when the store cannot be opened or the engine cannot be reached; once
/// running, failures are retried, not returned.
pub async fn run(
    config: Config,
    role: crate::update::Role,
    shutdown: CancellationToken,
) -> Result<Exit, DaemonError> {
    let handover = crate::update::Handover::new(shutdown.clone());
    run_until(config, role, handover.clone(), shutdown).await?;
    Ok(if handover.is_requested() {
        Exit::Handover
    } else {
        Exit::Stopped
    })
}

async fn run_until(
    config: Config,
    role: crate::update::Role,
    handover: crate::update::Handover,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    // First boot by claim: nothing else starts before the device knows who it is.
    let (config, renewal) = match (&config.provisioning, &config.hub) {
        (Some(p), Some(hub)) => {
            let files = crate::provision::IdentityFiles::new(&config.state_dir);
            let Some(identity) = crate::provision::claim::ensure(p, hub, &files, &shutdown).await?
            else {
                return Ok(());
            };
            let applied = crate::provision::apply(config.clone(), &identity, &files);
            let renewal = crate::provision::renew::Context {
                provisioning: p.clone(),
                hub: applied.hub.clone().unwrap_or_else(|| hub.clone()),
                files,
                identity,
            };
            (applied, Some(renewal))
        }
        _ => (config, None),
    };
    let (store, recovery) = Store::open(&config.state_dir, config.disk.store_reserve_bytes)?;
    if let Some(r) = &recovery {
        warn!(moved_to = %r.moved_to.display(), reason = %r.reason,
            "the store was damaged and has been replaced by an empty one");
    }
    // The engine when the device has one; the process runtime always (process modules run
    // as the policy allows them).
    let docker = match config.runtime.kind {
        crate::manifest::RuntimeKind::Docker => {
            Some(DockerRuntime::connect(&config.runtime.docker_socket).await?)
        }
        crate::manifest::RuntimeKind::Process => {
            info!("no container engine (runtime.kind = \"process\"): process modules only");
            None
        }
    };
    let process = crate::runtime::process::ProcessRuntime::new(&config.state_dir).map_err(|e| {
        RuntimeError::Engine {
            op: "prepare",
            target: config.state_dir.join("processes").display().to_string(),
            message: e.to_string(),
        }
    })?;
    // Process modules' cgroups, where the kernel offers cgroup v2; found once, before any
    // module starts. A device whose policy runs no executables is left alone.
    let process = if !config.runs_process_modules() {
        process
    } else {
        let process = process.with_user(process_user(&config)?);
        match crate::runtime::process::cgroup::prepare(&config.runtime.process_cgroup) {
            Ok(placement) => {
                info!(limits = %placement.describe(), "process modules' limits");
                process.with_cgroups(Some(placement))
            }
            Err(why) => {
                info!(%why, "process modules' limits: setrlimit only (memory), no cgroup v2");
                process
            }
        }
    };
    let runtime = Arc::new(crate::runtime::combined::Combined { docker, process });
    let clock: crate::clock::SharedClock = Arc::new(crate::clock::SystemClock::new());
    let (outbox, outbox_writer) = Outbox::open(
        &config.state_dir,
        Limits {
            max_bytes: config.telemetry.outbox_max_bytes,
            max_age: config.telemetry.outbox_max_age,
            disk_high_percent: config.disk.high_watermark_percent,
        },
        clock,
    )?;
    let tasks = TaskTracker::new();
    tasks.spawn(outbox_writer.run(shutdown.clone()));
    let counters = crate::telemetry::counters::Counters::default();
    // The stored deployment's routes from the first moment the bus accepts a message: an
    // empty table would acknowledge what arrives before the reconciler starts, and route it
    // nowhere.
    // A deployment waiting for its window or a lock has not switched: the one before it
    // routes until then.
    let desired = store.desired()?;
    let waiting = match (&desired, store.gate()?) {
        (Some(d), Some(g)) => g.digest == d.digest && !g.passed,
        _ => false,
    };
    let in_force = if waiting { store.last_good()? } else { desired };
    let stored_routes = in_force
        .map(|d| RouteTable::for_deployment(&d.deployment))
        .unwrap_or_default();
    let locks = crate::bus::LockHandle::default();
    let (routes_tx, routes_rx) = watch::channel(Arc::new(stored_routes));
    let module_env = crate::bus::start::start(
        &config,
        runtime.as_ref(),
        crate::bus::start::FromReconciler {
            routes: routes_rx,
            locks: locks.clone(),
        },
        &outbox,
        &counters.bus,
        &tasks,
        &shutdown,
    )
    .await?;
    let (agent_spec_tx, agent_spec_rx) = watch::channel(None);
    let (passes_tx, passes_rx) = watch::channel(0u64);
    let (agent_status_tx, agent_status_rx) = watch::channel(crate::update::AgentStatus {
        slot: role.slot,
        update: None,
    });
    let system_clock: crate::clock::SharedClock = Arc::new(crate::clock::SystemClock::new());
    let after_reboot = crate::clock::note_boot(&config.state_dir, system_clock.as_ref());
    if after_reboot {
        info!(
            "first start in this boot: modules found ended come back, whatever their restart policy"
        );
    } else {
        info!(
            "restarted in the same boot: modules that ended meanwhile follow their restart policy"
        );
    }
    let settings = Settings {
        device: config.device_id.clone(),
        policy: config.policy.clone(),
        facts: crate::policy::DeviceFacts {
            engine: config.runtime.kind == crate::manifest::RuntimeKind::Docker,
            ..crate::telemetry::metrics::device_facts()
        },
        stop_grace: config.runtime.stop_grace,
        max_concurrent_pulls: config.runtime.max_concurrent_pulls,
        max_parallel_actions: config.runtime.max_parallel_actions,
        image_gc_after: config.runtime.image_gc_after,
        disk: config.disk.clone(),
        module_env,
        routes: config.bus.enabled.then_some(routes_tx),
        deployments: counters.deployments.clone(),
        clock: system_clock.clone(),
        conditions: Some(crate::telemetry::health::watch_outbox(
            &outbox, &tasks, &shutdown,
        )),
        store_recovery: recovery.map(|r| {
            format!(
                "the store was damaged ({}) and was moved to {}; the device started with an empty store",
                r.reason,
                r.moved_to.display()
            )
        }),
        agent_spec: Some(agent_spec_tx),
        passes: Some(passes_tx),
        agent_status: Some(agent_status_rx),
        artifacts: Some(crate::artifacts::Artifacts::new(
            &config.state_dir,
            crate::fetch::Fetcher::new(config.update.ca_file.as_deref(), config.disk.pull_reserve_bytes),
            config.runtime.max_concurrent_pulls,
        )),
        maintenance: config.maintenance.clone(),
        locks_dir: Some(config.state_dir.join("locks")),
        after_reboot,
    };
    let parts = Reconciler::build(settings, runtime.clone(), store)?;
    let _ = locks.set(parts.handle.clone());
    info!(device = %config.device_id, version = outpost_core::version::current(),
        slot = role.slot.name(), on_trial = role.trial, "outpost agent starting");

    let (prometheus_tx, prometheus_rx) = watch::channel(None);
    if let Some(addr) = config.telemetry.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics { addr, source })?;
        info!(%addr, "metrics served at http://{addr}/metrics");
        tasks.spawn(crate::telemetry::metrics::serve_prometheus(
            listener,
            prometheus_rx,
            shutdown.clone(),
        ));
    }
    tasks.spawn(crate::telemetry::collector::run(
        crate::telemetry::collector::Context {
            device_id: config.device_id.clone(),
            interval: config.telemetry.interval,
            sampler: crate::telemetry::metrics::DeviceSampler::new(&config.state_dir),
            runtime: runtime.clone(),
            state: parts.handle.state.clone(),
            outbox: outbox.clone(),
            upstream: config.hub.is_some(),
            counters: counters.clone(),
            prometheus: prometheus_tx,
        },
        shutdown.clone(),
    ));
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
    let (session_tx, session_rx) = watch::channel(0u64);
    let update_paths = crate::update::record::Paths::new(&config.state_dir);
    if role.trial {
        tasks.spawn(crate::update::gate::run(
            crate::update::gate::Context {
                paths: update_paths,
                slot: role.slot,
                version: outpost_core::version::current().to_string(),
                probation: config.update.probation,
                hub: config.hub.is_some().then(|| session_rx.clone()),
                passes: passes_rx,
                status: agent_status_tx,
                handover,
            },
            shutdown.clone(),
        ));
    } else {
        tasks.spawn(crate::update::updater::run(
            crate::update::updater::Context {
                paths: update_paths,
                slot: role.slot,
                platform: outpost_core::platform::Platform::of_this_build().to_string(),
                config: config.update.clone(),
                reserve: config.disk.pull_reserve_bytes,
                spec: agent_spec_rx,
                status: agent_status_tx,
                handover,
                state: parts.handle.state.clone(),
            },
            shutdown.clone(),
        ));
    }
    if let Some(hub) = &config.hub {
        let mut settings = crate::hub::link::settings(hub, &config.device_id)?;
        settings.client_id = format!("{}-telemetry", config.device_id);
        tasks.spawn(upstream::run(
            upstream::Context {
                settings,
                topics: crate::hub::topics::Topics::new(&hub.topic_prefix, &config.device_id),
                outbox: outbox.clone(),
                link_session: session_rx,
                counters: counters.upstream.clone(),
            },
            shutdown.clone(),
        ));
        let (config, handle, token) = (config.clone(), parts.handle.clone(), shutdown.clone());
        tasks.spawn(async move {
            let result =
                crate::hub::run_with(&config, handle, token.child_token(), session_tx).await;
            if let Err(e) = &result {
                error!(error = %e, "hub link stopped; stopping the agent");
                token.cancel();
            }
            let _ = hub_tx.send(result);
        });
    } else {
        info!("no [hub] configured: local deployments only");
    }
    if let Some(renewal) = renewal {
        tasks.spawn(crate::provision::renew::run(renewal, shutdown.clone()));
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

/// The user process modules run as (`runtime.process_user`), said once at start-up. A module
/// of another user must pass through the state folder to its working folder and artifacts:
/// the folder gets the "others may pass" bit (never "may list"; what is inside stays private
/// where it is not the modules' to read).
fn process_user(
    config: &Config,
) -> Result<Option<crate::runtime::process::user::RunAs>, DaemonError> {
    use crate::runtime::process::user;
    let run_as =
        user::resolve_here(&config.runtime.process_user).map_err(|why| RuntimeError::Engine {
            op: "prepare",
            target: "runtime.process_user".into(),
            message: why,
        })?;
    match run_as {
        Some(who) => {
            use std::os::unix::fs::PermissionsExt as _;
            let dir = &config.state_dir;
            let mode = std::fs::metadata(dir)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o700);
            if mode & 0o001 == 0 {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))
                    .map_err(|e| RuntimeError::Engine {
                        op: "prepare",
                        target: dir.display().to_string(),
                        message: format!("cannot let process modules pass through it: {e}"),
                    })?;
            }
            info!(
                uid = who.uid,
                gid = who.gid,
                "process modules run as uid {}, gid {} (runtime.process_user)",
                who.uid,
                who.gid
            );
        }
        None if user::agent_uid() == 0 => {
            warn!(
                "process modules run as root, as runtime.process_user asks: they can do anything on the device"
            );
        }
        None => info!("process modules run as the agent's user"),
    }
    Ok(run_as)
}
