//! `/api/tags`, `/api/show`, `/api/ps` and `/api/pull`: the served model as Ollama describes one,
//! read from its GGUF header (no weights).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::super::error::ApiError;
use super::super::extract::JsonObject;
use super::super::model_facts::served_facts;
use super::super::AppState;
use super::OllamaError;

/// Ollama's names for the served model: every id with `:latest`.
fn names(state: &AppState) -> Vec<String> {
    state
        .config()
        .model_ids
        .iter()
        .map(|id| format!("{id}:latest"))
        .collect()
}

pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let facts = served_facts(&state).await?;
    let models: Vec<Value> = names(&state)
        .into_iter()
        .map(|name| {
            json!({"name": name, "model": name, "modified_at": facts.modified_at,
                   "size": facts.size, "digest": facts.digest, "details": facts.details})
        })
        .collect();
    Ok(Json(json!({"models": models})))
}

pub async fn show(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, OllamaError> {
    let name = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let id = super::translate::resolve(&state, name)?;
    let facts = served_facts(&state).await?;
    let loaded = state.loaded()?;
    let template = loaded.template.source().to_owned();
    let mut capabilities = vec!["completion"];
    if template.contains("tools") {
        capabilities.push("tools");
    }
    if template.contains("think") {
        capabilities.push("thinking");
    }
    if facts.embedding {
        capabilities.push("embedding");
    }
    Ok(Json(json!({
        "modelfile": format!("# served by lm-sandbox from its GGUF file\nFROM {id}\n"),
        "parameters": "",
        "template": template,
        "details": facts.details,
        "model_info": facts.model_info,
        "capabilities": capabilities,
        "modified_at": facts.modified_at,
    })))
}

pub async fn ps(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let Ok(loaded) = state.loaded() else {
        return Ok(Json(json!({"models": []})));
    };
    let facts = served_facts(&state).await?;
    let vram: u64 = loaded.info.device_memory.iter().map(|(_, b)| b).sum();
    let models: Vec<Value> = names(&state)
        .into_iter()
        .take(1)
        .map(|name| {
            json!({"name": name, "model": name, "size": facts.size + vram,
                   "digest": facts.digest, "details": facts.details,
                   // Loaded until the server stops: no idle unload yet.
                   "expires_at": "2318-01-01T00:00:00Z",
                   "size_vram": vram, "context_length": loaded.info.n_ctx_seq})
        })
        .collect();
    Ok(Json(json!({"models": models})))
}

/// A model that is present answers success (as Ollama does when it has nothing to fetch);
/// anything else says that this server does not download.
pub async fn pull(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, OllamaError> {
    let name = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let present = super::translate::resolve(&state, name).is_ok();
    if !present {
        return Err(OllamaError(ApiError::InvalidRequest {
            message: format!(
                "pull {name}: lm-sandbox does not download models; start it with \
                 `lm-sandbox serve -m FILE.gguf` for a file you have"
            ),
            param: Some("model".into()),
            code: Some("unsupported"),
        }));
    }
    let success = json!({"status": "success"});
    if body.get("stream").and_then(Value::as_bool) == Some(false) {
        return Ok(Json(success).into_response());
    }
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        format!("{success}\n"),
    )
        .into_response())
}
