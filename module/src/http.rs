//! The HTTP surface: Open Inference Protocol v2, Azure ML's `/score`, and `/metrics`.
//!
//! Owns the routes, the mapping of errors to status codes (the client's fault is 400 with a
//! message naming the problem, never a dropped connection), the body size limit and the bound
//! on requests in flight (beyond it, 503 at once rather than an unbounded queue).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::metrics::Source;
use crate::model::InferError;
use crate::tensor::{FlatData, InferRequest};

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body accepted, in bytes; larger is a 400.
    pub max_body_bytes: usize,
    /// Inference requests in flight (waiting or running); more get 503.
    pub max_in_flight: usize,
}

struct AppState {
    engine: Arc<Engine>,
    limits: HttpLimits,
    in_flight: Arc<Semaphore>,
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
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
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

fn body_error(state: &AppState, source: Source, rejection: BytesRejection) -> Response {
    let status = rejection.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!(
            "request body is larger than the limit of {} bytes",
            state.limits.max_body_bytes
        )
    } else {
        format!("cannot read the request body: {}", rejection.body_text())
    };
    state
        .engine
        .metrics
        .observe(source, std::time::Duration::ZERO, false);
    error(StatusCode::BAD_REQUEST, message)
}

fn busy(state: &AppState) -> Response {
    state.engine.metrics.busy();
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many requests in flight; try again",
    )
}

fn bad_json(state: &AppState, source: Source, e: serde_json::Error) -> Response {
    state
        .engine
        .metrics
        .observe(source, std::time::Duration::ZERO, false);
    error(
        StatusCode::BAD_REQUEST,
        format!("invalid JSON request: {e}"),
    )
}

async fn infer(
    State(state): Shared,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_error(&state, Source::V2, rejection),
    };
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return busy(&state);
    };
    let request: InferRequest = match serde_json::from_slice(&body) {
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
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(r) = reject_version(&state, &version) {
        return r;
    }
    infer(State(state), Path(name), body).await
}

#[derive(serde::Deserialize)]
struct ScoreRequest {
    data: FlatData,
}

async fn score(State(state): Shared, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return body_error(&state, Source::Score, rejection),
    };
    let Ok(_permit) = state.in_flight.clone().try_acquire_owned() else {
        return busy(&state);
    };
    let started = Instant::now();
    let request: ScoreRequest = match serde_json::from_slice(&body) {
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
