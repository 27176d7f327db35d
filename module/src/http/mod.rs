//! The HTTP surface: Open Inference Protocol v2 (with the binary tensor data extension and
//! the Triton endpoints `tritonclient` calls), Azure ML's `/score`, and `/metrics`.
//!
//! Owns the routes, the mapping of errors to status codes (the client's fault is 400 with a
//! JSON body naming the problem, never a dropped connection or an empty body), the connection
//! loop with its header and body read timeouts, and the bounds on what requests may hold: a
//! body size limit, a count of requests in flight and a budget of body bytes in flight (beyond
//! either, 503 with `Retry-After` at once rather than an unbounded queue).
//!
//! Layout: `body` (reading, limits, decompression), `triton` (model configuration,
//! statistics, repository index).

mod body;
mod triton;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;
use crate::metrics::Source;
use crate::model::InferError;
use crate::tensor::binary::{self, BinaryOutputs};
use crate::tensor::{
    DataType, InferResponse, TensorError, parse_infer_request, parse_score_request,
};
use body::{body_error, read_body};

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

/// The extensions of the protocol this server implements (server metadata lists them).
const EXTENSIONS: [&str; 3] = ["binary_tensor_data", "model_configuration", "statistics"];

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
        .route("/v2/models/{name}/config", get(triton::config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(triton::config_versioned),
        )
        .route("/v2/models/stats", get(triton::all_stats))
        .route("/v2/models/{name}/stats", get(triton::stats))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(triton::stats_versioned),
        )
        .route("/v2/repository/index", post(triton::index))
        .route(
            "/v2/repository/models/{name}/{action}",
            post(triton::refuse_repository_change),
        )
        .route("/score", post(score))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
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

/// 404 for a path no route has, naming the protocol extension when it is one this server
/// does not implement (what `tritonclient`'s other calls reach).
async fn no_route(uri: Uri) -> Response {
    let path = uri.path();
    let extension = [
        ("/v2/systemsharedmemory", "system shared memory"),
        ("/v2/cudasharedmemory", "CUDA shared memory"),
        ("/v2/trace", "trace"),
        ("/v2/logging", "logging"),
    ]
    .into_iter()
    .find(|(prefix, _)| path.starts_with(prefix));
    match extension {
        Some((_, name)) => error(
            StatusCode::NOT_FOUND,
            format!("the {name} extension is not supported; this server implements {EXTENSIONS:?}"),
        ),
        None => error(StatusCode::NOT_FOUND, format!("no such route: {path}")),
    }
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {} (inference is POST, metadata and health are GET)",
            uri.path()
        ),
    )
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "outpost-infer",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
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
    let header_length = request
        .headers()
        .get(binary::HEADER_LENGTH)
        .map(|v| v.to_str().unwrap_or("(not text)").to_string());
    let body = match read_body(&state, request).await {
        Ok(b) => b,
        Err(e) => return body_error(&state, Source::V2, e),
    };
    let (json, raw) = match &header_length {
        Some(length) => match binary::split(&body.bytes, length) {
            Ok(parts) => parts,
            Err(e) => return tensor_error(&state, e),
        },
        None => (body.bytes.clone(), Bytes::new()),
    };
    let mut request = match parse_infer_request(&json) {
        Ok(r) => r,
        Err(e) => return bad_json(&state, Source::V2, e),
    };
    let attached = match header_length {
        Some(_) => binary::attach(&mut request, raw),
        None => binary::refuse_binary_without_header(&request),
    };
    if let Err(e) = attached {
        return tensor_error(&state, e);
    }
    if let Some(e) = unsupported_parameters(&request) {
        return tensor_error(&state, e);
    }
    let binary_outputs = BinaryOutputs::of(&request);
    match state.engine.infer(request, Source::V2).await {
        Ok(response) if binary_outputs.any() => binary_response(response, &binary_outputs),
        Ok(response) => axum::Json(response).into_response(),
        Err(e) => infer_error(&e),
    }
}

/// Refuses what would change the answer's meaning if ignored: Triton's classification
/// extension (top-k classes instead of the tensor).
fn unsupported_parameters(request: &crate::tensor::InferRequest) -> Option<TensorError> {
    request
        .outputs
        .iter()
        .flatten()
        .enumerate()
        .find(|(_, o)| {
            o.parameters
                .as_ref()
                .is_some_and(|p| p.get("classification").is_some())
        })
        .map(|(i, _)| TensorError::Unsupported {
            field: format!("outputs[{i}].parameters.classification"),
            reason: "the classification extension is not supported; ask for the output tensor"
                .into(),
        })
}

fn tensor_error(state: &AppState, e: TensorError) -> Response {
    count_error(state, Source::V2);
    error(StatusCode::BAD_REQUEST, e.to_string())
}

/// The answer with the outputs asked for as binary data after the JSON header.
fn binary_response(mut response: InferResponse, binary: &BinaryOutputs) -> Response {
    let mut tail = Vec::new();
    for output in &mut response.outputs {
        if !binary.wants(&output.name) {
            continue;
        }
        let (Some(data), Some(dt)) = (output.data.take(), DataType::from_oip(output.datatype))
        else {
            continue;
        };
        let bytes = binary::output_bytes(dt, &data);
        output.parameters = Some(json!({ "binary_data_size": bytes.len() }));
        tail.extend_from_slice(&bytes);
    }
    let header = match serde_json::to_vec(&response) {
        Ok(h) => h,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let length = header.len();
    let mut body = header;
    body.extend_from_slice(&tail);
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(binary::HEADER_LENGTH),
                HeaderValue::from(length),
            ),
        ],
        body,
    )
        .into_response()
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
    if let (Some(named), Some(model)) = (&request.input, state.engine.slot.current()) {
        let inputs: Vec<&str> = model.inputs.iter().map(|s| s.name.as_str()).collect();
        if !inputs.contains(&named.as_str()) {
            count_error(&state, Source::Score);
            return error(
                StatusCode::BAD_REQUEST,
                format!("input_data: unknown input '{named}'; the model's inputs are {inputs:?}"),
            );
        }
    }
    match state.engine.score(request.data, Source::Score).await {
        Ok(result) => {
            tracing::trace!(elapsed_us = started.elapsed().as_micros() as u64, "score");
            if request.azure_ml {
                axum::Json(result).into_response()
            } else {
                axum::Json(json!({ "result": result })).into_response()
            }
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
