//! What LM Studio's SDK protocol says about models, and how it fails: error details, a channel's
//! outgoing side, which model a call names, the model records (`LlmInstanceInfo`…), and loading.

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::error::ApiError;
use super::super::model_facts::model_facts;
use super::super::state::AppState;
use crate::registry::{ModelStatus, State as ModelState};

/// LM Studio's error details (`SerializedLMSExtendedError`).
pub fn error(title: impl Into<String>, code: Option<&str>) -> Value {
    let mut error = json!({"title": title.into()});
    if let Some(code) = code {
        error["displayData"] = json!({"code": code});
    }
    error
}

pub fn api_error(e: &ApiError) -> Value {
    let code = match e {
        ApiError::ModelNotFound(_) => Some("generic.noModelMatchingQuery"),
        _ => None,
    };
    error(e.to_string(), code)
}

/// A channel's outgoing side.
pub struct Channel {
    id: u64,
    out: mpsc::Sender<Value>,
}

impl Channel {
    pub fn new(id: u64, out: mpsc::Sender<Value>) -> Self {
        Self { id, out }
    }

    pub async fn send(&self, message: Value) -> bool {
        self.out
            .send(json!({"type": "channelSend", "channelId": self.id, "message": message}))
            .await
            .is_ok()
    }

    pub async fn close(&self) {
        let _ = self
            .out
            .send(json!({"type": "channelClose", "channelId": self.id}))
            .await;
    }

    pub async fn fail(&self, error: Value) {
        let _ = self
            .out
            .send(json!({"type": "channelError", "channelId": self.id, "error": error}))
            .await;
    }
}

/// The model a specifier names: `{type: "query", query: {identifier | modelKey}}`,
/// `{type: "instanceReference", instanceReference}`, or (load channels) a `modelKey`.
fn specified(parameter: &Value) -> Option<String> {
    let spec = parameter
        .get("specifier")
        .or_else(|| parameter.get("modelSpecifier"))
        .unwrap_or(parameter);
    let text = |v: &Value| v.as_str().map(str::to_owned);
    text(&spec["instanceReference"])
        .or_else(|| text(&spec["query"]["identifier"]))
        .or_else(|| text(&spec["query"]["modelKey"]))
        .or_else(|| text(&spec["query"]["path"]))
        .or_else(|| text(&spec["modelKey"]))
        .or_else(|| text(&spec["identifier"]))
}

/// The model a call names, or for an empty query the first loaded model of the namespace's kind.
pub async fn model_name(
    state: &AppState,
    namespace: &str,
    parameter: &Value,
) -> Result<String, Value> {
    if let Some(name) = specified(parameter) {
        return Ok(name);
    }
    for status in state.listed_models() {
        if status.state == ModelState::Loaded && kind_of(state, &status).await == namespace {
            return Ok(status.card.id().to_owned());
        }
    }
    Err(error(
        "no model is loaded",
        Some("generic.noModelMatchingQuery"),
    ))
}

/// `llm` or `embedding`, as LM Studio types a model (a GGUF that declares pooling embeds).
async fn kind_of(state: &AppState, status: &ModelStatus) -> &'static str {
    match model_facts(state, &status.card).await {
        Ok(facts) if facts.embedding => "embedding",
        _ => "llm",
    }
}

/// `LlmInstanceInfo` / `EmbeddingInstanceInfo` (or, `loaded` false, `LlmInfo` for a download
/// listing) of one model.
pub async fn model_info(
    state: &AppState,
    status: &ModelStatus,
    loaded: bool,
) -> Result<Value, Value> {
    let card = &status.card;
    let facts = model_facts(state, card).await.map_err(|e| api_error(&e))?;
    let kind = if facts.embedding { "embedding" } else { "llm" };
    let trained = facts.model_info[format!("{}.context_length", facts.arch)]
        .as_u64()
        .unwrap_or(0);
    let template = card
        .preset
        .template
        .as_deref()
        .or(state.config().chat_template.as_deref())
        .or(facts.template())
        .unwrap_or("");
    let mut info = json!({
        "type": kind,
        "modelKey": card.id(),
        "format": "gguf",
        "displayName": card.id(),
        "path": super::super::redact::file_name(&card.found.path),
        "sizeBytes": facts.size,
        "architecture": facts.arch,
        "maxContextLength": trained,
    });
    let params = facts.details["parameter_size"].as_str().unwrap_or("");
    if !params.is_empty() {
        info["paramsString"] = json!(params);
    }
    if kind == "llm" {
        info["vision"] = json!(false);
        info["trainedForToolUse"] = json!(template.contains("tools"));
    }
    if loaded {
        let context = status
            .running
            .as_ref()
            .and_then(|r| r.engine.model_info())
            .map_or(trained, |i| u64::from(i.n_ctx_seq));
        info["identifier"] = json!(card.id());
        info["instanceReference"] = json!(card.id());
        info["contextLength"] = json!(context);
    }
    Ok(info)
}

pub async fn loaded_info(state: &AppState, id: &str) -> Result<Value, Value> {
    let status = state
        .registry()
        .status(id)
        .map_err(|e| api_error(&ApiError::from(e)))?;
    model_info(state, &status, true).await
}

/// `getOrLoad` and `loadModel`: the registry loads it (or it is loaded already).
pub async fn load(
    state: &AppState,
    namespace: &str,
    endpoint: &str,
    parameter: &Value,
    channel: &Channel,
) -> Result<(), Value> {
    let name = model_name(state, namespace, parameter).await?;
    let id = state
        .registry()
        .resolve(&name)
        .map_err(|e| api_error(&ApiError::from(e)))?;
    let already = state
        .registry()
        .status(&id)
        .is_ok_and(|s| s.state == ModelState::Loaded);
    if !already {
        channel.send(json!({"type": "startLoading"})).await;
        state
            .registry()
            .load(&id)
            .await
            .map_err(|e| api_error(&ApiError::from(e)))?;
        channel
            .send(json!({"type": "loadProgress", "progress": 1.0}))
            .await;
    }
    let info = loaded_info(state, &id).await?;
    let kind = match (already, endpoint) {
        (true, "getOrLoad") => "alreadyLoaded",
        (false, "getOrLoad") => "loadSuccess",
        _ => "success",
    };
    channel.send(json!({"type": kind, "info": info})).await;
    Ok(())
}
