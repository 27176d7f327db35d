//! The Triton endpoints `tritonclient` offers beside the protocol's core: the model
//! configuration, inference statistics and the repository index, answered from what this
//! server knows; loading and unloading models over HTTP refused with a JSON error that says
//! why (the served model is the file the module was started with, reloaded when it changes).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Shared, error, infer_error, reject_model, reject_version};
use crate::model::TensorSpec;

/// Triton's `data_type` names are the protocol's with a `TYPE_` prefix.
fn config_tensor(spec: &TensorSpec) -> Value {
    json!({
        "name": spec.name,
        "data_type": format!("TYPE_{}", spec.datatype.oip_name()),
        "dims": spec.oip_shape(),
    })
}

/// `GET /v2/models/{name}/config`: Triton's model configuration. `max_batch_size` is 0 (the
/// batch dimension, when there is one, is part of `dims`, -1 where symbolic).
pub(super) async fn config(State(state): Shared, Path(name): Path<String>) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    match state.engine.slot.require() {
        Ok(m) => axum::Json(json!({
            "name": state.engine.slot.name,
            "platform": "onnx",
            "backend": "tract",
            "max_batch_size": 0,
            "input": m.inputs.iter().map(config_tensor).collect::<Vec<_>>(),
            "output": m.outputs.iter().map(config_tensor).collect::<Vec<_>>(),
            "instance_group": [{ "kind": "KIND_CPU", "count": state.engine.workers() }],
            "parameters": {
                "plans_made": { "string_value": m.plans.made().to_string() },
            },
        }))
        .into_response(),
        Err(e) => infer_error(&e),
    }
}

pub(super) async fn config_versioned(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Some(r) = reject_version(&state, &version) {
        return r;
    }
    config(State(state), Path(name)).await
}

fn duration(count: u64, ns: u64) -> Value {
    json!({ "count": count, "ns": ns })
}

/// Triton's statistics document for the served model: requests from every entry point
/// (HTTP, `/score`, the bus, batch), succeeded and failed, with their time from receipt to
/// answer.
fn statistics(state: &super::AppState) -> Value {
    let t = state.engine.metrics.totals();
    let version = state
        .engine
        .slot
        .current()
        .map_or(String::new(), |m| m.version.to_string());
    json!({
        "model_stats": [{
            "name": state.engine.slot.name,
            "version": version,
            "last_inference": t.last_ms,
            "inference_count": t.ok,
            "execution_count": t.ok,
            "inference_stats": {
                "success": duration(t.ok, t.ok_nanos),
                "fail": duration(t.failed, t.failed_nanos),
            },
        }]
    })
}

/// `GET /v2/models/stats`: every model's statistics (this server has one).
pub(super) async fn all_stats(State(state): Shared) -> Response {
    axum::Json(statistics(&state)).into_response()
}

pub(super) async fn stats(State(state): Shared, Path(name): Path<String>) -> Response {
    if let Some(r) = reject_model(&state, &name) {
        return r;
    }
    axum::Json(statistics(&state)).into_response()
}

pub(super) async fn stats_versioned(
    State(state): Shared,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Some(r) = reject_version(&state, &version) {
        return r;
    }
    stats(State(state), Path(name)).await
}

/// `POST /v2/repository/index`: the served model, `READY` or `UNAVAILABLE` with the reason.
pub(super) async fn index(State(state): Shared) -> Response {
    let slot = &state.engine.slot;
    let entry = match slot.current() {
        Some(m) => json!({ "name": slot.name, "version": m.version.to_string(), "state": "READY" }),
        None => json!({
            "name": slot.name,
            "state": "UNAVAILABLE",
            "reason": slot.last_error().unwrap_or_else(|| "still loading".into()),
        }),
    };
    axum::Json(json!([entry])).into_response()
}

/// `POST /v2/repository/models/{name}/load|unload`: refused.
pub(super) async fn refuse_repository_change(
    Path((name, action)): Path<(String, String)>,
) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!(
            "cannot {action} '{name}' over HTTP: this server serves the model file it was started with, and reloads it when the file changes"
        ),
    )
}
