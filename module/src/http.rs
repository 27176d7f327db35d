//! The HTTP surface: Open Inference Protocol v2, Azure ML's `/score`, and `/metrics`.
//!
//! Owns the routes, the mapping of errors to status codes (the client's fault is 400 with a
//! message naming the problem, never a dropped connection), the connection loop with its
//! header and body read timeouts, and the bounds on what requests may hold: a body size limit,
//! a count of requests in flight and a budget of body bytes in flight (beyond either, 503 with
//! `Retry-After` at once rather than an unbounded queue).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;
use crate::metrics::Source;
use crate::model::InferError;
use crate::tensor::{parse_infer_request, parse_score_request};

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body accepted, in bytes; larger is a 400.
    pub max_body_bytes: usize,
    /// Inference requests in flight (waiting or running); more get 503.
    pub max_in_flight: usize,
    /// Request body bytes held at once by all requests in flight; a request that would go
    /// beyond it gets 503. The count alone lets 256 × 16 MiB bodies be buffered at once.
    /// Must be at least `max_body_bytes`, or the largest bodies could never be accepted.
    pub max_bytes_in_flight: usize,
    /// Time a connection has to send a request's headers (and an idle keep-alive connection
    /// to start its next request) before it is closed: slow-header (slowloris) clients.
    pub header_timeout: Duration,
    /// Time a request has to send its whole body once its headers are in; then 408 and the
    /// connection is closed.
    pub body_timeout: Duration,
}

impl Default for HttpLimits {
    /// The command line's defaults.
    fn default() -> Self {
        HttpLimits {
            max_body_bytes: 16 << 20,
            max_in_flight: 256,
            max_bytes_in_flight: 64 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
        }
    }
}

struct AppState {
    engine: Arc<Engine>,
    limits: HttpLimits,
    in_flight: Arc<Semaphore>,
    /// One permit per body byte held by a request in flight.
    body_bytes: Arc<Semaphore>,
}

type Shared = State<Arc<AppState>>;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

fn infer_error(e: &InferError) -> Response {
    let status = match e {
        _ if e.is_client_error() => StatusCode::BAD_REQUEST,
        InferError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string())
}

/// Builds the router. Public so tests can serve it on a listener of their own.
pub fn router(engine: Arc<Engine>, limits: HttpLimits) -> Router {
    let state = Arc::new(AppState {
        engine,
        in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
        body_bytes: Arc::new(Semaphore::new(
            limits.max_bytes_in_flight.min(Semaphore::MAX_PERMITS),
        )),
        limits: limits.clone(),
    });
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_versioned),
        )
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_versioned),
        )
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_versioned),
        )
        .route("/score", post(score))
        .route("/metrics", get(metrics))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish.
///
/// Our own accept loop rather than `axum::serve`, which cannot set hyper's header read
/// timeout: every connection gets `limits.header_timeout` to send each request's headers
/// (hyper closes it otherwise, which also ends idle keep-alive connections). Body timeouts
/// are per request, in the handlers that read bodies.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        // Small answers go out at once rather than waiting for Nagle's delayed ACK.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let header_timeout = limits.header_timeout;
        let token = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = token.cancelled() => {
                    // Finish the request in hand, take no new one.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors of one connection, not of the listener: accept the next one at once.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "outpost-infer",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

fn readiness(state: &AppState) -> Response {
    let slot = &state.engine.slot;
    match slot.current() {
        Some(model) => axum::Json(json!({
            "ready": true,
            "model_version": model.version.to_string(),
            "last_reload_error": slot.last_error(),
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({
                "ready": false,
                "error": slot.last_error().unwrap_or_else(|| "still loading".into()),
            })),
        )
            .into_response(),
    }
}

async fn ready(State(state): Shared) -> Response {
    readiness(&state)
}

/// The 404 for a name other than the served model's, or `None` when the name is right.
fn reject_model(state: &AppState, name: &str) -> Option<Response> {
    if name == state.engine.slot.name {
        None
    } else {
        Some(error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model '{name}'; this server serves '{}'",
                state.engine.slot.name
            ),
        ))
    }
}

/// The 404 for a version other than the one in service, or `None`.
fn reject_version(state: &AppState, version: &str) -> Option<Response> {
    match state.engine.slot.current() {
        Some(m) if m.version.to_string() == version => None,
        Some(m) => Some(error(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model version '{version}'; the version in service is '{}'",
                m.version
            ),
        )),
        None => None,
    }
}

async fn model_ready(State(state): Shared, Path(name): Path<String>) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    readiness(&state)
}

async fn model_ready_versioned(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Some(r) = reject_model(&state, &name).or_else(|| reject_version(&state, &version)) {
        return r;
    }
    readiness(&state)
}

async fn model_metadata(State(state): Shared, Path(name): Path<String>) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    match state.engine.slot.require() {
        Ok(m) => axum::Json(json!({
            "name": state.engine.slot.name,
            "versions": [m.version.to_string()],
            "platform": "onnx_onnxv1",
            "inputs": m.metadata_inputs(),
            "outputs": m.metadata_outputs(),
            "parameters": {
                "load_time_ms": m.load_time.as_secs_f64() * 1e3,
                "path": m.path.display().to_string(),
            },
        }))
        .into_response(),
        Err(e) => infer_error(&e),
    }
}

async fn model_metadata_versioned(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Some(r) = reject_version(&state, &version) {
        return r;
    }
    model_metadata(State(state), Path(name)).await
}

/// Why a request body was not read whole.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("too many request bytes in flight; try again")]
    Busy,
    #[error("the request body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("cannot read the request body: {0}")]
    Read(String),
}

/// A body read whole, and the share of the byte budget it holds until it is dropped (after
/// the answer is built).
struct Budgeted {
    bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Reads a request body within the size limit, the byte budget and the body timeout.
///
/// With a `Content-Length`, its whole size is taken from the budget before a byte is read, so
/// a refused body is never buffered; a chunked body takes its share chunk by chunk.
async fn read_body(state: &AppState, request: Request) -> Result<Budgeted, BodyError> {
    let max = state.limits.max_body_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut permit = None;
    if let Some(len) = declared {
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= max)
            .ok_or(BodyError::TooLarge(max))?;
        permit = take(&state.body_bytes, len, None)?;
    }
    let reserved = declared.is_some();
    let read = async move {
        let mut body: Body = request.into_body();
        let mut buf = Vec::with_capacity(if reserved { permit_len(&permit) } else { 0 });
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > max {
                return Err(BodyError::TooLarge(max));
            }
            if !reserved {
                permit = take(&state.body_bytes, data.len(), permit)?;
            }
            buf.extend_from_slice(&data);
        }
        Ok(Budgeted {
            bytes: Bytes::from(buf),
            _permit: permit,
        })
    };
    tokio::time::timeout(state.limits.body_timeout, read)
        .await
        .map_err(|_| BodyError::Timeout(state.limits.body_timeout))?
}

fn permit_len(p: &Option<OwnedSemaphorePermit>) -> usize {
    p.as_ref().map_or(0, |p| p.num_permits())
}

/// Takes `n` more bytes from the budget, at once or not at all (503: never wait holding a
/// share, which is how a budget deadlocks).
fn take(
    budget: &Arc<Semaphore>,
    n: usize,
    held: Option<OwnedSemaphorePermit>,
) -> Result<Option<OwnedSemaphorePermit>, BodyError> {
    if n == 0 {
        return Ok(held);
    }
    let n = u32::try_from(n).map_err(|_| BodyError::Busy)?;
    let more = budget
        .clone()
        .try_acquire_many_owned(n)
        .map_err(|_| BodyError::Busy)?;
    Ok(Some(match held {
        Some(mut p) => {
            p.merge(more);
            p
        }
        None => more,
    }))
}

/// The answer for a body not read: 400, 503 with `Retry-After`, or 408 closing the
/// connection (the rest of a late body may still be on its way).
fn body_error(state: &AppState, source: Source, e: BodyError) -> Response {
    match e {
        BodyError::Busy => busy(state, e.to_string()),
        BodyError::Timeout(_) => {
            count_error(state, source);
            let mut r = error(StatusCode::REQUEST_TIMEOUT, e.to_string());
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            r
        }
        BodyError::TooLarge(_) | BodyError::Read(_) => {
            count_error(state, source);
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
    }
}

fn count_error(state: &AppState, source: Source) {
    state
        .engine
        .metrics
        .observe(source, std::time::Duration::ZERO, false);
}

/// 503 for a request refused for lack of room; `Retry-After` says when to try again.
fn busy(state: &AppState, message: impl Into<String>) -> Response {
    state.engine.metrics.busy();
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn bad_json(state: &AppState, source: Source, e: serde_json::Error) -> Response {
    count_error(state, source);
    error(
        StatusCode::BAD_REQUEST,
        format!("invalid JSON request: {e}"),
    )
}

async fn infer(State(state): Shared, Path(name): Path<String>, request: Request) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    // The count first: a request waiting for its body is in flight too.
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return busy(&state, "too many requests in flight; try again");
    };
    let body = match read_body(&state, request).await {
        Ok(b) => b,
        Err(e) => return body_error(&state, Source::V2, e),
    };
    let request = match parse_infer_request(&body.bytes) {
        Ok(r) => r,
        Err(e) => return bad_json(&state, Source::V2, e),
    };
    match state.engine.infer(request, Source::V2).await {
        Ok(response) => axum::Json(response).into_response(),
        Err(e) => infer_error(&e),
    }
}

async fn infer_versioned(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
    request: Request,
) -> Response {
    if let Some(r) = reject_version(&state, &version) {
        return r;
    }
    infer(State(state), Path(name), request).await
}

async fn score(State(state): Shared, request: Request) -> Response {
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return busy(&state, "too many requests in flight; try again");
    };
    let body = match read_body(&state, request).await {
        Ok(b) => b,
        Err(e) => return body_error(&state, Source::Score, e),
    };
    let started = Instant::now();
    let request = match parse_score_request(&body.bytes) {
        Ok(r) => r,
        Err(e) => return bad_json(&state, Source::Score, e),
    };
    match state.engine.score(request.data, Source::Score).await {
        Ok(result) => {
            tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "score");
            axum::Json(json!({ "result": result })).into_response()
        }
        Err(e) => infer_error(&e),
    }
}

async fn metrics(State(state): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.engine.metrics.render(&state.engine.slot.name),
    )
        .into_response()
}
