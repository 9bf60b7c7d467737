//! LM Studio's REST API v0 (`/api/v0/*`) and v1 (`/api/v1/models*`, `/api/v1/chat` in `chat`):
//! apps written for LM Studio's server point at lm-sandbox. The inference routes are OpenAI's shapes plus `stats` (`tokens_per_second`,
//! `time_to_first_token`, `generation_time`, `stop_reason` in LM Studio's words), `model_info`
//! and `runtime`, on the answer or the final streamed chunk; they run the OpenAI handlers' code.
//! The model routes describe the served model from its GGUF header.
//!
//! Must not: answer anything the OpenAI routes would not (one validation, one scheduler path).

mod chat;
mod predict;
mod protocol;
mod sdk;
mod socket;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Map, Value};

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::JsonObject;
use super::model_facts::{model_facts, Facts};
use super::state::AppState;
use crate::registry::{ModelCard, ModelStatus};

/// LM Studio's REST routes that need the `inference` scope.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v0/models", get(models))
        .route("/api/v0/models/{*id}", get(model))
        .route("/api/v0/chat/completions", post(chat))
        .route("/api/v0/completions", post(completions))
        .route("/api/v0/embeddings", post(super::embeddings::embeddings))
        .route("/api/v1/chat", post(chat::chat))
        .route("/api/v1/models", get(v1_models))
        .route("/api/v1/models/download", post(no_downloads))
        .route("/api/v1/models/download/status/{*id}", get(no_downloads))
}

/// LM Studio's REST routes that need the `models` scope.
pub fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/models/load", post(v1_load))
        .route("/api/v1/models/unload", post(v1_unload))
}

/// LM Studio's SDK: the greeting and its websockets, which authenticate inside the socket.
pub fn sdk_routes() -> Router<AppState> {
    socket::routes()
}

/// Bits per weight of a quantization name (`Q4_K_M` → 4, `F16` → 16, `BF16` → 16).
fn bits_per_weight(quantization: &str) -> Option<u32> {
    let digits: String = quantization
        .trim_start_matches("BF")
        .trim_start_matches("IQ")
        .trim_start_matches(['Q', 'F', 'T'])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The trained context the header declares (`ARCH.context_length`).
fn trained_context(facts: &Facts) -> u64 {
    facts.model_info[format!("{}.context_length", facts.arch)]
        .as_u64()
        .unwrap_or(0)
}

/// The trained context: the header's, else the loaded engine's.
fn context_length(facts: &Facts, status: &ModelStatus) -> u64 {
    match trained_context(facts) {
        0 => status
            .running
            .as_ref()
            .and_then(|r| r.engine.model_info())
            .map_or(0, |i| u64::from(i.n_ctx_train)),
        n => n,
    }
}

/// LM Studio's publisher: the folder above the model in its store, else `local`.
fn publisher(card: &ModelCard) -> &str {
    match card.found.source {
        crate::store::Source::LmStudio => card.id().split('/').next().unwrap_or("local"),
        _ => "local",
    }
}

/// `GET /api/v1/models`: every model, with its loaded instance when it has one.
async fn v1_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut models = Vec::new();
    for status in state.listed_models() {
        let card = &status.card;
        let facts = model_facts(&state, card).await?;
        let id = card.id();
        let info = status.running.as_ref().and_then(|r| r.engine.model_info());
        let instances: Vec<Value> = info
            .iter()
            .map(|i| json!({"id": id, "config": {"context_length": i.n_ctx_seq}}))
            .collect();
        let template = state
            .config()
            .chat_template
            .as_deref()
            .or(facts.template())
            .unwrap_or("");
        let params = facts.details["parameter_size"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(str::to_owned);
        let mut model = json!({
            "type": if facts.embedding { "embedding" } else { "llm" },
            "publisher": publisher(card),
            "key": id,
            "display_name": id,
            "quantization": {"name": facts.quantization, "bits_per_weight": bits_per_weight(facts.quantization)},
            "size_bytes": facts.size,
            "params_string": params,
            "loaded_instances": instances,
            "max_context_length": context_length(&facts, &status),
            "format": "gguf",
        });
        if !facts.embedding {
            model["architecture"] = json!(facts.arch);
            model["capabilities"] = json!({
                "vision": false,
                "trained_for_tool_use": template.contains("tools"),
                "reasoning": template.contains("think"),
            });
            model["description"] = Value::Null;
        }
        models.push(model);
    }
    Ok(Json(json!({"models": models})))
}

/// `POST /api/v1/models/load`: loads the model (waiting for it); a context it cannot give is a
/// 400.
async fn v1_load(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    tracing::info!(key = %caller.key_id, model = name, "load (LM Studio REST)");
    let started = std::time::Instant::now();
    let id = state.registry().load(name).await?;
    let served = state.model(&id).await?;
    let n_ctx_seq = served.loaded.info.n_ctx_seq;
    if let Some(asked) = body
        .pointer("/config/context_length")
        .and_then(Value::as_u64)
    {
        if asked > u64::from(n_ctx_seq) {
            return Err(ApiError::invalid(
                "config.context_length",
                format!(
                    "`context_length` {asked} is more than this server's {n_ctx_seq} tokens per \
                     sequence (--ctx-size / --parallel)"
                ),
            ));
        }
    }
    Ok(Json(json!({
        "type": "llm",
        "instance_id": id,
        "model_instance_id": id,
        "config": {"context_length": n_ctx_seq},
        "load_time_seconds": started.elapsed().as_secs_f64(),
        "status": "loaded",
    })))
}

/// `POST /api/v1/models/unload {"instance_id"}`: waits for the model's requests, then frees it.
async fn v1_unload(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let name = body
        .get("instance_id")
        .or_else(|| body.get("model"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("instance_id", "`instance_id` is required"))?;
    tracing::info!(key = %caller.key_id, model = name, "unload (LM Studio REST)");
    let id = state.registry().unload(name).await?;
    state.forget_unloaded();
    Ok(Json(json!({"instance_id": id})))
}

async fn no_downloads() -> ApiError {
    ApiError::InvalidRequest {
        message:
            "lm-sandbox does not download models; start it with `lm-sandbox serve -m FILE.gguf` \
                  for a file you have"
                .into(),
        param: None,
        code: Some("unsupported"),
    }
}

/// One model as LM Studio lists it.
pub use chat::Threads;
pub use socket::MAX_UNAUTHENTICATED;

async fn model_object(
    state: &AppState,
    status: &ModelStatus,
    name: &str,
) -> Result<Value, ApiError> {
    let facts = model_facts(state, &status.card).await?;
    let loaded = status.running.is_some() && status.state == crate::registry::State::Loaded;
    Ok(json!({
        "id": name,
        "object": "model",
        "type": if facts.embedding { "embeddings" } else { "llm" },
        "publisher": publisher(&status.card),
        "arch": facts.arch,
        "compatibility_type": "gguf",
        "quantization": facts.quantization,
        "state": if loaded { "loaded" } else { "not-loaded" },
        "max_context_length": context_length(&facts, status),
    }))
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut data = Vec::new();
    for status in state.listed_models() {
        for name in
            std::iter::once(status.card.id()).chain(status.card.aliases.iter().map(String::as_str))
        {
            data.push(model_object(&state, &status, name).await?);
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let status = state.registry().status(&id)?;
    Ok(Json(model_object(&state, &status, &id).await?))
}

/// `model_info` and `runtime`, as every v0 answer carries them (for the model `body` names).
async fn extras(state: &AppState, body: &Value) -> Result<Arc<Map<String, Value>>, ApiError> {
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let served = state.model(name).await?;
    let facts = model_facts(state, &served.card).await?;
    let mut extras = Map::new();
    extras.insert(
        "model_info".into(),
        json!({"arch": facts.arch, "quant": facts.quantization, "format": "gguf",
               "context_length": served.loaded.info.n_ctx_seq}),
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
    let extras = extras(&state, &body).await?;
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
    let extras = extras(&state, &body).await?;
    super::completions::answer(&state, &body, Some(extras)).await
}
