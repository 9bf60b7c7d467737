//! `/api/tags`, `/api/show`, `/api/ps` and `/api/pull`: the served model as Ollama describes one,
//! read from its GGUF header (no weights).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::super::auth::Authenticated;
use super::super::error::ApiError;
use super::super::extract::JsonObject;
use super::super::keys::Scope;
use super::super::model_facts::model_facts;
use super::super::state::AppState;
use super::OllamaError;

/// Ollama's name for a model: its id, with `:latest` when it has no tag.
fn ollama_name(id: &str) -> String {
    if id.rsplit('/').next().is_some_and(|last| last.contains(':')) {
        id.to_owned()
    } else {
        format!("{id}:latest")
    }
}

/// Every model the registry knows, loaded or not.
pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let mut models = Vec::new();
    for status in state.listed_models() {
        let Ok(facts) = model_facts(&state, &status.card).await else {
            continue;
        };
        for id in
            std::iter::once(status.card.id()).chain(status.card.aliases.iter().map(String::as_str))
        {
            let name = ollama_name(id);
            models.push(
                json!({"name": name, "model": name, "modified_at": facts.modified_at,
                   "size": facts.size, "digest": facts.digest, "details": facts.details}),
            );
        }
    }
    Ok(Json(json!({"models": models})))
}

/// Ollama's `parameters` text: the store's defaults, one `key value` per line.
fn parameters(params: &serde_json::Map<String, Value>) -> String {
    let mut lines = Vec::new();
    for (key, value) in params {
        let values = match value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for value in values {
            let text = match value {
                Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            lines.push(format!("{key:<30} {text}"));
        }
    }
    lines.join("\n")
}

pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, OllamaError> {
    let name = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let status = state.registry().status(name).map_err(ApiError::from)?;
    let card = &status.card;
    let facts = model_facts(&state, card).await?;
    let template = card
        .preset
        .template
        .clone()
        .or_else(|| state.config().chat_template.clone())
        .or_else(|| facts.template().map(str::to_owned))
        .unwrap_or_else(|| crate::template::CHATML.to_owned());
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
    let mut shown = json!({
        "modelfile": format!(
            "# served by lm-sandbox from its GGUF file; the template is the GGUF's own Jinja \
             template (an Ollama Go template layer is not executed)\nFROM {}\n",
            // The host path only for the operator's keys.
            if caller.may(Scope::Models) {
                card.found.path.display().to_string()
            } else {
                super::super::redact::file_name(&card.found.path)
            }
        ),
        "parameters": parameters(&card.found.params),
        "template": template,
        "details": facts.details,
        "model_info": facts.model_info,
        "capabilities": capabilities,
        "modified_at": facts.modified_at,
    });
    if let Some(system) = &card.found.system {
        shown["system"] = json!(system);
    }
    Ok(Json(shown))
}

/// The loaded models, with when each will be unloaded.
pub async fn ps(State(state): State<AppState>) -> Result<Json<Value>, OllamaError> {
    let mut models = Vec::new();
    for status in state.listed_models() {
        let Some(running) = &status.running else {
            continue;
        };
        let Some(info) = running.engine.model_info() else {
            continue;
        };
        let facts = model_facts(&state, &status.card).await?;
        let vram: u64 = info.device_memory.iter().map(|(_, b)| b).sum();
        let expires: chrono::DateTime<chrono::Utc> = status
            .expires_at
            .map(Into::into)
            // Never for idleness: Ollama's "forever" is a far date.
            .unwrap_or_else(|| {
                chrono::DateTime::parse_from_rfc3339("2318-01-01T00:00:00Z")
                    .map(Into::into)
                    .unwrap_or_else(|_| chrono::Utc::now())
            });
        let name = ollama_name(status.card.id());
        models.push(
            json!({"name": name, "model": name, "size": facts.size + vram,
               "digest": facts.digest, "details": facts.details,
               "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
               "size_vram": vram, "context_length": info.n_ctx_seq}),
        );
    }
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
    let present = state.registry().resolve(name).is_ok();
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
