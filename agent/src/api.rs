//! The local API: a Unix socket (owner-only) through which `outpost deploy --local`,
//! `outpost list` and `outpost logs` reach the running agent without a hub.
//!
//! The protocol is JSON lines: the client writes one request line; the agent answers with one
//! or more event lines and closes. Small, dependency-free and easy to use from a shell
//! (`socat - UNIX-CONNECT:/run/outpost/api.sock`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::control::AgentHandle;
use crate::intake;
use crate::manifest::Issue;
use crate::runtime::spec::container_name;
use crate::runtime::{LogOptions, PullProgress, Runtime};
use crate::signing::TrustedKeys;
use crate::state::{DeploymentStatus, ReportedState, Source};

/// Largest request line: a manifest in a signed envelope fits with room to spare.
pub const MAX_REQUEST_BYTES: u64 = 1024 * 1024;
/// The longest a `deploy` request may wait for its outcome (a day).
pub const MAX_WAIT_SECS: u64 = 24 * 3600;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum ApiRequest {
    State,
    Deploy {
        /// The manifest or envelope text.
        manifest: String,
        /// How long to stream progress before answering `timeout`.
        #[serde(default = "default_wait")]
        wait_secs: u64,
    },
    Logs {
        module: String,
        #[serde(default)]
        tail: Option<usize>,
        #[serde(default)]
        follow: bool,
        #[serde(default)]
        since: Option<i64>,
    },
    Restart {
        module: String,
    },
    /// Take the module's update lock: a new deployment that would replace, stop or remove it
    /// waits until `unlock` or the deployment's lock deadline.
    Lock {
        module: String,
    },
    /// Release the module's update lock.
    Unlock {
        module: String,
    },
}

fn default_wait() -> u64 {
    300
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ApiEvent {
    State {
        state: Box<ReportedState>,
    },
    Rejected {
        issues: Vec<Issue>,
    },
    Accepted {
        id: String,
        version: u64,
    },
    Progress {
        image: String,
        status: String,
        current: u64,
        total: u64,
    },
    /// The deployment waits for an update window or lock (`deploy`, once per change).
    Waiting {
        message: String,
    },
    /// The deployment reached a final status (applied, failed, rolled-back) or the wait ended.
    Done {
        status: String,
        reasons: Vec<Issue>,
    },
    Log {
        text: String,
    },
    Ok,
    Error {
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the API until `shutdown`.
pub async fn serve<R: Runtime>(
    path: &Path,
    device: String,
    handle: AgentHandle,
    runtime: Arc<R>,
    trusted: TrustedKeys,
    progress: broadcast::Sender<PullProgress>,
    shutdown: CancellationToken,
) -> Result<(), ApiError> {
    let bind_err = |source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    // A socket left by a killed agent would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
    }
    info!(socket = %path.display(), "local API listening");
    let tasks = TaskTracker::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let ctx = Arc::new(Ctx {
        device,
        handle,
        runtime,
        trusted,
        progress,
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    warn!("local API busy; connection refused");
                    continue;
                };
                let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
                tasks.spawn(async move {
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        r = ctx.connection(stream) => if let Err(e) = r { warn!(error = %e, "local API connection failed") },
                    }
                    drop(permit);
                });
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    let _ = std::fs::remove_file(path);
    Ok(())
}

struct Ctx<R> {
    device: String,
    handle: AgentHandle,
    runtime: Arc<R>,
    trusted: TrustedKeys,
    progress: broadcast::Sender<PullProgress>,
}

/// Most log lines a `logs` request may ask for.
pub const MAX_TAIL: usize = 100_000;

/// Reads one request line: JSON of [`ApiRequest`] with names and numbers in range, so nothing
/// unchecked reaches the engine's API (a module name becomes part of a URL path there).
pub fn parse_request(line: &str) -> Result<ApiRequest, String> {
    let request: ApiRequest =
        serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let module_ok = |m: &str| {
        crate::manifest::validate::is_module_name(m)
            .then_some(())
            .ok_or_else(|| format!("bad request: `{m}` is not a module name"))
    };
    match &request {
        ApiRequest::Logs {
            module,
            tail,
            since,
            ..
        } => {
            module_ok(module)?;
            if tail.is_some_and(|t| t > MAX_TAIL) {
                return Err(format!("bad request: `tail` is over {MAX_TAIL}"));
            }
            if since.is_some_and(|s| s < 0) {
                return Err("bad request: `since` is negative".into());
            }
        }
        ApiRequest::Restart { module }
        | ApiRequest::Lock { module }
        | ApiRequest::Unlock { module } => module_ok(module)?,
        ApiRequest::State | ApiRequest::Deploy { .. } => {}
    }
    Ok(request)
}

/// Which of lock and unlock a request is, once its fields are moved out.
enum RequestKind {
    Lock,
    Other,
}

async fn send(stream: &mut UnixStream, event: &ApiEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

impl<R: Runtime> Ctx<R> {
    async fn connection(&self, mut stream: UnixStream) -> std::io::Result<()> {
        let mut line = String::new();
        {
            let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST_BYTES));
            reader.read_line(&mut line).await?;
        }
        let request = match parse_request(&line) {
            Ok(r) => r,
            Err(message) => {
                return send(&mut stream, &ApiEvent::Error { message }).await;
            }
        };
        let request_kind = match request {
            ApiRequest::Lock { .. } => RequestKind::Lock,
            _ => RequestKind::Other,
        };
        match request {
            ApiRequest::State => {
                let state = self.handle.state.borrow().clone();
                send(
                    &mut stream,
                    &ApiEvent::State {
                        state: Box::new(state),
                    },
                )
                .await
            }
            ApiRequest::Deploy {
                manifest,
                wait_secs,
            } => self.deploy(&mut stream, manifest, wait_secs).await,
            ApiRequest::Logs {
                module,
                tail,
                follow,
                since,
            } => {
                // The module's secrets are taken out of what it printed, as for the hub's
                // `logs` command. Whole lines are redacted and sent, so a secret the engine
                // splits across two frames is still found.
                let secrets = match self.handle.secrets(&module).await {
                    Ok(secrets) => secrets,
                    Err(e) => {
                        let message = e.to_string();
                        return send(&mut stream, &ApiEvent::Error { message }).await;
                    }
                };
                let logs = self.runtime.logs(
                    &container_name(&self.device, &module),
                    LogOptions {
                        tail,
                        follow,
                        since,
                        timestamps: false,
                    },
                );
                tokio::pin!(logs);
                let mut pending = String::new();
                while let Some(chunk) = logs.next().await {
                    match chunk {
                        Ok(text) => {
                            pending.push_str(&text);
                            let Some(end) = pending.rfind('\n') else {
                                continue;
                            };
                            let rest = pending.split_off(end + 1);
                            let text = crate::reconciler::redact(&pending, &secrets);
                            pending = rest;
                            send(&mut stream, &ApiEvent::Log { text }).await?;
                        }
                        Err(e) => {
                            return send(
                                &mut stream,
                                &ApiEvent::Error {
                                    message: e.to_string(),
                                },
                            )
                            .await;
                        }
                    }
                }
                if !pending.is_empty() {
                    let text = crate::reconciler::redact(&pending, &secrets);
                    send(&mut stream, &ApiEvent::Log { text }).await?;
                }
                send(&mut stream, &ApiEvent::Ok).await
            }
            ApiRequest::Restart { module } => {
                let event = match self.handle.restart_module(&module).await {
                    Ok(Ok(())) => ApiEvent::Ok,
                    Ok(Err(message)) => ApiEvent::Error { message },
                    Err(e) => ApiEvent::Error {
                        message: e.to_string(),
                    },
                };
                send(&mut stream, &event).await
            }
            ApiRequest::Lock { module } | ApiRequest::Unlock { module } => {
                let hold = matches!(request_kind, RequestKind::Lock);
                let event = match self.handle.lock(&module, hold, "api").await {
                    Ok(Ok(_)) => ApiEvent::Ok,
                    Ok(Err(message)) => ApiEvent::Error { message },
                    Err(e) => ApiEvent::Error {
                        message: e.to_string(),
                    },
                };
                send(&mut stream, &event).await
            }
        }
    }

    async fn deploy(
        &self,
        stream: &mut UnixStream,
        manifest: String,
        wait_secs: u64,
    ) -> std::io::Result<()> {
        let accepted = match intake::intake(manifest.as_bytes(), &self.trusted) {
            Ok(a) => a,
            Err(e) => return send(stream, &ApiEvent::Rejected { issues: e.issues() }).await,
        };
        let (id, version) = (accepted.deployment.id.clone(), accepted.deployment.version);
        let mut progress = self.progress.subscribe();
        let mut state = self.handle.state.clone();
        match self.handle.offer(accepted, Source::Local).await {
            Ok(Ok(())) => {
                send(
                    stream,
                    &ApiEvent::Accepted {
                        id: id.clone(),
                        version,
                    },
                )
                .await?
            }
            Ok(Err(issues)) => return send(stream, &ApiEvent::Rejected { issues }).await,
            Err(e) => {
                return send(
                    stream,
                    &ApiEvent::Error {
                        message: e.to_string(),
                    },
                )
                .await;
            }
        }
        // Untrusted input: a wait near u64::MAX would overflow the instant (a panic).
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
        let mut told: Option<String> = None;
        loop {
            let (status, reasons, waiting) = {
                let s = state.borrow_and_update();
                match &s.deployment {
                    Some(d) if d.id == id && d.version == version => (
                        Some(d.status),
                        d.reasons.clone(),
                        d.waiting.as_ref().map(|w| w.message.clone()),
                    ),
                    _ => (None, vec![], None),
                }
            };
            // A waiting deployment is not done: say why once, and keep waiting.
            if let Some(message) = waiting
                && status == Some(DeploymentStatus::Waiting)
                && told.as_ref() != Some(&message)
            {
                told = Some(message.clone());
                send(stream, &ApiEvent::Waiting { message }).await?;
            }
            if let Some(status) = status
                && matches!(
                    status,
                    DeploymentStatus::Applied
                        | DeploymentStatus::Failed
                        | DeploymentStatus::RolledBack
                )
            {
                let status = serde_json::to_value(status)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                return send(stream, &ApiEvent::Done { status, reasons }).await;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return send(stream, &ApiEvent::Done { status: "timeout".into(), reasons: vec![] }).await;
                }
                changed = state.changed() => if changed.is_err() {
                    return send(stream, &ApiEvent::Error { message: "the agent is shutting down".into() }).await;
                },
                p = progress.recv() => if let Ok(p) = p {
                    send(stream, &ApiEvent::Progress { image: p.image, status: p.status, current: p.current_bytes, total: p.total_bytes }).await?;
                },
            }
        }
    }
}

/// The running agent's reported state, or `None` when no agent answers on `path` within
/// `within` (not running, or not ours to reach): how `check` and the support bundle tell
/// whether the agent runs.
pub async fn running_state(path: &Path, within: Duration) -> Option<ReportedState> {
    let mut state = None;
    let asked = call(path, &ApiRequest::State, |event| {
        if let ApiEvent::State { state: s } = event {
            state = Some(*s);
        }
    });
    match tokio::time::timeout(within, asked).await {
        Ok(Ok(())) => state,
        _ => None,
    }
}

/// The client side, for the CLI: sends one request and hands each event to `on_event`.
pub async fn call(
    path: &Path,
    request: &ApiRequest,
    mut on_event: impl FnMut(ApiEvent),
) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot reach the agent at {}: {e} (is `outpost run` running, and are you its user?)", path.display()),
        )
    })?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut lines = BufReader::new(stream).lines();
    while let Some(line) = lines.next_line().await? {
        match serde_json::from_str::<ApiEvent>(&line) {
            Ok(event) => on_event(event),
            Err(e) => {
                return Err(std::io::Error::other(format!(
                    "bad answer from the agent: {e}"
                )));
            }
        }
    }
    Ok(())
}
