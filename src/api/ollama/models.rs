//! `/api/tags`, `/api/show`, `/api/ps` and `/api/pull`: the served model as Ollama describes one,
//! read from its GGUF header (no weights).

use std::path::Path;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::super::error::ApiError;
use super::super::extract::JsonObject;
use super::super::AppState;
use super::OllamaError;
use crate::gpu::gguf::MetaValue;

/// llama.cpp's `general.file_type` numbers, as Ollama names them.
fn file_type(n: i64) -> &'static str {
    match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4",
        _ => "unknown",
    }
}

/// What Ollama says of a model, from the file and its header.
struct Facts {
    size: u64,
    modified_at: String,
    digest: String,
    details: Value,
    model_info: Value,
    /// The GGUF declares a pooling type: an embedding model.
    embedding: bool,
}

fn facts(path: &Path) -> Result<Facts, ApiError> {
    let header = crate::gpu::gguf::read_header(path)
        .map_err(|e| ApiError::Internal(format!("reading the model's header: {e}")))?;
    let meta = std::fs::metadata(path)
        .map_err(|e| ApiError::Internal(format!("reading the model file: {e}")))?;
    let modified: chrono::DateTime<chrono::Utc> = meta
        .modified()
        .map(Into::into)
        .unwrap_or_else(|_| chrono::Utc::now());
    let text = |key: &str| match header.metadata.get(key) {
        Some(MetaValue::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let arch = text("general.architecture").unwrap_or_else(|| "unknown".into());
    let quantization = match header.metadata.get("general.file_type") {
        Some(MetaValue::Int(n)) => file_type(*n),
        _ => "unknown",
    };
    let mut info = Map::new();
    let mut keys: Vec<&String> = header.metadata.keys().collect();
    keys.sort();
    for key in keys {
        let value = match &header.metadata[key] {
            MetaValue::Int(i) => json!(i),
            MetaValue::Float(f) => json!(f),
            MetaValue::Bool(b) => json!(b),
            MetaValue::Str(s) => json!(s),
            // Ollama elides arrays (the vocabulary, merges) unless asked for verbose output.
            MetaValue::Array { .. } | MetaValue::Strings(_) => Value::Null,
        };
        info.insert(key.clone(), value);
    }
    // An identity for this file (path, size, time), not a hash of its bytes: hashing a large
    // model on every listing would take minutes.
    let identity = format!(
        "{}:{}:{}",
        path.display(),
        meta.len(),
        modified.timestamp_nanos_opt().unwrap_or_default()
    );
    Ok(Facts {
        size: meta.len(),
        modified_at: modified.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
        digest: format!("{:x}", Sha256::digest(identity.as_bytes())),
        details: json!({
            "parent_model": "",
            "format": "gguf",
            "family": arch,
            "families": [arch],
            "parameter_size": text("general.size_label").unwrap_or_default(),
            "quantization_level": quantization,
        }),
        embedding: header
            .metadata
            .contains_key(&format!("{arch}.pooling_type")),
        model_info: Value::Object(info),
    })
}

async fn served_facts(state: &AppState) -> Result<Facts, ApiError> {
    let path = state
        .config()
        .model_path
        .clone()
        .ok_or_else(|| ApiError::Internal("no model file is known to this server".into()))?;
    tokio::task::spawn_blocking(move || facts(&path))
        .await
        .map_err(|e| ApiError::Internal(format!("the header task failed: {e}")))?
}

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
