//! LM Studio's REST API v0 (`/api/v0/*`): apps written for LM Studio's server point at
//! lm-sandbox. The inference routes are OpenAI's shapes plus `stats` (`tokens_per_second`,
//! `time_to_first_token`, `generation_time`, `stop_reason` in LM Studio's words), `model_info`
//! and `runtime`, on the answer or the final streamed chunk; they run the OpenAI handlers' code.
//! The model routes describe the served model from its GGUF header.
//!
//! Must not: answer anything the OpenAI routes would not (one validation, one scheduler path).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::JsonObject;
use super::model_facts::served_facts;
use super::AppState;

/// LM Studio's REST v0 routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v0/models", get(models))
        .route("/api/v0/models/{*id}", get(model))
        .route("/api/v0/chat/completions", post(chat))
        .route("/api/v0/completions", post(completions))
        .route("/api/v0/embeddings", post(super::embeddings::embeddings))
}

/// One model as LM Studio lists it.
async fn model_object(state: &AppState, id: &str) -> Result<Value, ApiError> {
    let facts = served_facts(state).await?;
    let loaded = state.loaded().ok();
    Ok(json!({
        "id": id,
        "object": "model",
        "type": if facts.embedding { "embeddings" } else { "llm" },
        // LM Studio's publisher is its folder; a file given with -m has none.
        "publisher": "local",
        "arch": facts.arch,
        "compatibility_type": "gguf",
        "quantization": facts.quantization,
        "state": if loaded.is_some() { "loaded" } else { "not-loaded" },
        "max_context_length": loaded.map_or(0, |l| l.info.n_ctx_train),
    }))
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut data = Vec::new();
    for id in &state.config().model_ids {
        data.push(model_object(&state, id).await?);
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = state.resolve_model(&id)?;
    Ok(Json(model_object(&state, &id).await?))
}

/// `model_info` and `runtime`, as every v0 answer carries them.
async fn extras(state: &AppState) -> Result<Arc<Map<String, Value>>, ApiError> {
    let facts = served_facts(state).await?;
    let loaded = state.loaded()?;
    let mut extras = Map::new();
    extras.insert(
        "model_info".into(),
        json!({"arch": facts.arch, "quant": facts.quantization, "format": "gguf",
               "context_length": loaded.info.n_ctx_seq}),
    );
    extras.insert(
        "runtime".into(),
        json!({
            "name": format!("lm-sandbox-llama.cpp-{}", crate::build_info::backends().join("-")),
            "version": crate::build_info::VERSION,
            "supported_formats": ["gguf"],
        }),
    );
    Ok(Arc::new(extras))
}

async fn chat(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let authenticated = authenticated.map(|Extension(a)| a);
    let extras = extras(&state).await?;
    super::chat::answer(
        &state,
        &request_id,
        authenticated.as_ref(),
        &body,
        Some(extras),
    )
    .await
}

async fn completions(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let extras = extras(&state).await?;
    super::completions::answer(&state, &body, Some(extras)).await
}
