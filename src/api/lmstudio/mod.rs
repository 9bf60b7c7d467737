//! LM Studio's REST API v0 (`/api/v0/*`) and v1 (`/api/v1/models*`, `/api/v1/chat` in `chat`):
//! apps written for LM Studio's server point at lm-sandbox. The inference routes are OpenAI's shapes plus `stats` (`tokens_per_second`,
//! `time_to_first_token`, `generation_time`, `stop_reason` in LM Studio's words), `model_info`
//! and `runtime`, on the answer or the final streamed chunk; they run the OpenAI handlers' code.
//! The model routes describe the served model from its GGUF header.
//!
//! Must not: answer anything the OpenAI routes would not (one validation, one scheduler path).

mod chat;

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
        .route("/api/v1/chat", post(chat::chat))
        .route("/api/v1/models", get(v1_models))
        .route("/api/v1/models/load", post(v1_load))
        .route("/api/v1/models/unload", post(v1_unload))
        .route("/api/v1/models/download", post(no_downloads))
        .route("/api/v1/models/download/status/{*id}", get(no_downloads))
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

/// `GET /api/v1/models`: the served model with its loaded instance.
async fn v1_models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let facts = served_facts(&state).await?;
    let loaded = state.loaded().ok();
    let id = state
        .config()
        .model_ids
        .first()
        .cloned()
        .unwrap_or_default();
    let instances: Vec<Value> = loaded
        .iter()
        .map(|l| json!({"id": id, "config": {"context_length": l.info.n_ctx_seq}}))
        .collect();
    let tools = loaded
        .as_ref()
        .is_some_and(|l| l.template.source().contains("tools"));
    let params = facts.details["parameter_size"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(str::to_owned);
    let mut model = json!({
        "type": if facts.embedding { "embedding" } else { "llm" },
        "publisher": "local",
        "key": id,
        "display_name": id,
        "quantization": {"name": facts.quantization, "bits_per_weight": bits_per_weight(facts.quantization)},
        "size_bytes": facts.size,
        "params_string": params,
        "loaded_instances": instances,
        "max_context_length": loaded.map_or(0, |l| l.info.n_ctx_train),
        "format": "gguf",
    });
    if !facts.embedding {
        model["architecture"] = json!(facts.arch);
        model["capabilities"] = json!({"vision": false, "trained_for_tool_use": tools});
        model["description"] = Value::Null;
    }
    Ok(Json(json!({"models": [model]})))
}

/// `POST /api/v1/models/load`: the served model is loaded already; a context it cannot give is a
/// 400.
async fn v1_load(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let id = state.resolve_model(name)?;
    let loaded = state.loaded()?;
    let n_ctx_seq = loaded.info.n_ctx_seq;
    if let Some(asked) = body
        .pointer("/config/context_length")
        .and_then(Value::as_u64)
    {
        if asked > u64::from(n_ctx_seq) {
            return Err(ApiError::invalid(
                "config.context_length",
                format!(
                    "`context_length` {asked} is more than this server's {n_ctx_seq} tokens per \
                     sequence, fixed at start (--ctx-size / --parallel)"
                ),
            ));
        }
    }
    Ok(Json(json!({
        "model_instance_id": id,
        "config": {"context_length": n_ctx_seq},
        "load_time_seconds": 0.0,
    })))
}

/// `POST /api/v1/models/unload`: the model given at start stays.
async fn v1_unload() -> ApiError {
    ApiError::InvalidRequest {
        message: "this server keeps the model it was started with loaded and cannot unload it"
            .into(),
        param: Some("instance_id".into()),
        code: Some("unsupported"),
    }
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
