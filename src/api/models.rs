//! `GET /v1/models`, `GET /v1/models/{id}`, and `GET /health`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::build_info;
use crate::engine::EngineState;

fn model_object(state: &AppState, id: &str) -> Value {
    let mut object = json!({
        "id": id,
        "object": "model",
        "created": state.config().created,
        "owned_by": "lm-sandbox",
    });
    if let Some(info) = state.engine().model_info() {
        object["meta"] = json!({
            "n_ctx_train": info.n_ctx_train,
            "n_ctx_seq": info.n_ctx_seq,
            "n_vocab": info.n_vocab,
            "n_embd": info.n_embd,
            "n_ctx_embed": info.n_ctx_embed,
            "pooling": info.pooling,
        });
    }
    object
}

pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .config()
        .model_ids
        .iter()
        .map(|id| model_object(&state, id))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = state.resolve_model(&id)?;
    Ok(Json(model_object(&state, &id)))
}

/// `GET /metrics` (with `--metrics`): Prometheus's text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(metrics) = state.metrics() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let engine = state.engine();
    let model = state
        .config()
        .model_ids
        .first()
        .cloned()
        .unwrap_or_default();
    let reading = crate::metrics::EngineReading {
        model: &model,
        live: engine.live(),
        queued: engine.queued(),
    };
    let gpus = state.placement().map(|p| p.gpus.borrow().clone());
    let text = metrics.encode(&[reading], gpus.as_ref());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

/// Records every request's route, status and time to its response head (with `--metrics`), and
/// counts 429s as shed.
pub async fn track(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(metrics) = state.metrics().cloned() else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS {
        metrics.shed("queue_full");
    }
    metrics.observe_request(&route, &method, status.as_u16(), started.elapsed());
    response
}

/// 200 when the model is ready, 503 while it loads, after it failed and while it reloads after a
/// fault (with the reason). Never needs a key, and never shed. The build (version, git revision,
/// backends) only with `--health-build-info`.
pub async fn health(State(state): State<AppState>) -> Response {
    let (in_flight, shed) = state.request_counts();
    let (status, mut body) = match state.engine().state() {
        EngineState::Ready(_) => (StatusCode::OK, json!({"status": "ok"})),
        EngineState::Loading => {
            let mut body = serde_json::to_value(ApiError::Loading.body()).unwrap_or_default();
            body["status"] = json!("loading");
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        EngineState::Failed(reason) => {
            let mut body = serde_json::to_value(ApiError::Unavailable(reason.clone()).body())
                .unwrap_or_default();
            body["status"] = json!("failed");
            body["reason"] = json!(reason);
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        EngineState::Stopped => {
            let mut body =
                serde_json::to_value(ApiError::Unavailable("the engine has stopped".into()).body())
                    .unwrap_or_default();
            body["status"] = json!("stopped");
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    };
    body["requests"] = json!({"in_flight": in_flight, "shed": shed});
    if state.config().health_build_info {
        body["build"] = json!({
            "version": build_info::VERSION,
            "git_revision": build_info::GIT_REVISION,
            "backends": build_info::backends(),
        });
    }
    (status, Json(body)).into_response()
}

/// The placement plan decided at start-up and the GPUs' live memory.
pub async fn placement(State(state): State<AppState>) -> Json<Value> {
    match state.placement() {
        Some(view) => {
            let gpus = view.gpus.borrow().clone();
            let allocated = state
                .loaded()
                .ok()
                .map(|l| l.info.device_memory.clone())
                .unwrap_or_default();
            let measured = crate::gpu::placement::measure(
                &view.placement.plan,
                &view.before,
                &gpus,
                &allocated,
            );
            Json(json!({
                "model": view.placement.model,
                "plan": view.placement.plan,
                "gpus": gpus,
                "measured": measured,
            }))
        }
        None => Json(json!({"model": null, "plan": null, "gpus": null, "measured": null})),
    }
}
