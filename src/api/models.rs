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

/// 200 when the model is ready, 503 while it loads or after it failed. Never needs a key.
pub async fn health(State(state): State<AppState>) -> Response {
    let build = json!({
        "version": build_info::VERSION,
        "git_revision": build_info::GIT_REVISION,
        "backends": build_info::backends(),
    });
    match state.engine().state() {
        EngineState::Ready(_) => (
            StatusCode::OK,
            Json(json!({"status": "ok", "build": build})),
        )
            .into_response(),
        EngineState::Loading => {
            let mut body = serde_json::to_value(ApiError::Loading.body()).unwrap_or_default();
            body["status"] = json!("loading");
            body["build"] = build;
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
        EngineState::Failed(reason) => ApiError::Unavailable(reason).into_response(),
        EngineState::Stopped => {
            ApiError::Unavailable("the engine has stopped".into()).into_response()
        }
    }
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
