//! The protocol of LM Studio's SDKs (`lmstudio` on PyPI, `@lmstudio/sdk`) above its transport
//! (`socket`: the websocket per namespace, the first message that authenticates, caps). The
//! client sends
//! `rpcCall {endpoint, callId, parameter}` (answered `rpcResult` or `rpcError`) and
//! `channelCreate {endpoint, channelId, creationParameter}` (answered with `channelSend`
//! messages, then `channelClose` or `channelError`); `channelSend {message: {type: "cancel"}}`
//! stops a channel.
//!
//! Every call runs through the same registry, templates, validation and engines as the HTTP
//! dialects: a prediction becomes an OpenAI chat body (or a raw completion) and is started by
//! `chat::start_chat` / `chat::start_raw`.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::super::auth::Authenticated;
use super::super::chat::{start_chat, start_raw};
use super::super::error::ApiError;
use super::super::keys::Scope;
use super::super::model_facts::model_facts;
use super::super::reply::{ReplyEvent, ENGINE_STOPPED};
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

fn api_error(e: &ApiError) -> Value {
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

    async fn send(&self, message: Value) -> bool {
        self.out
            .send(json!({"type": "channelSend", "channelId": self.id, "message": message}))
            .await
            .is_ok()
    }

    async fn close(&self) {
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

/// A channel, from `channelCreate` to its last message. Loading by name (`loadModel`) needs the
/// `models` scope; everything else `inference`.
pub async fn run_channel(
    state: AppState,
    caller: Authenticated,
    namespace: String,
    endpoint: String,
    parameter: Value,
    channel: Channel,
) {
    let scope = match endpoint.as_str() {
        "loadModel" => Scope::Models,
        _ => Scope::Inference,
    };
    if let Err(e) = caller.require(scope) {
        channel.fail(api_error(&e)).await;
        return;
    }
    let result = match endpoint.as_str() {
        "getOrLoad" | "loadModel" => {
            load(&state, &namespace, &endpoint, &parameter, &channel).await
        }
        "predict" if namespace == "llm" => predict(&state, &parameter, &channel).await,
        other => Err(error(
            format!("lm-sandbox does not offer the {namespace} channel `{other}`"),
            None,
        )),
    };
    match result {
        Ok(()) => channel.close().await,
        Err(error) => channel.fail(error).await,
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
async fn model_name(state: &AppState, namespace: &str, parameter: &Value) -> Result<String, Value> {
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
async fn model_info(state: &AppState, status: &ModelStatus, loaded: bool) -> Result<Value, Value> {
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

async fn loaded_info(state: &AppState, id: &str) -> Result<Value, Value> {
    let status = state
        .registry()
        .status(id)
        .map_err(|e| api_error(&ApiError::from(e)))?;
    model_info(state, &status, true).await
}

/// `getOrLoad` and `loadModel`: the registry loads it (or it is loaded already).
async fn load(
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

/// The value of `key` in a KV config stack (`{layers: [{config: {fields: [{key, value}]}}]}`),
/// later layers winning.
fn stack_value<'v>(stack: &'v Value, key: &str) -> Option<&'v Value> {
    stack["layers"]
        .as_array()?
        .iter()
        .rev()
        .flat_map(|layer| layer["config"]["fields"].as_array().into_iter().flatten())
        .find(|field| field["key"] == key)
        .map(|field| &field["value"])
}

/// The chat history's messages as OpenAI's: text parts joined, an assistant's
/// `toolCallRequest` parts as `tool_calls`, `toolCallResult` parts as `role: tool` messages;
/// files refused.
fn history_messages(history: &Value) -> Result<Vec<Value>, Value> {
    let mut messages = Vec::new();
    for message in history["messages"].as_array().into_iter().flatten() {
        let role = message["role"].as_str().unwrap_or("user");
        let mut text = String::new();
        let mut calls = Vec::new();
        for part in message["content"].as_array().into_iter().flatten() {
            match part["type"].as_str() {
                Some("text") => text.push_str(part["text"].as_str().unwrap_or("")),
                Some("toolCallRequest") => {
                    let request = &part["toolCallRequest"];
                    let id = request["id"]
                        .as_str()
                        .map_or_else(|| format!("call_{}", calls.len()), str::to_owned);
                    calls.push(json!({"id": id, "type": "function", "function": {
                        "name": request["name"],
                        "arguments": request.get("arguments").unwrap_or(&json!({})).to_string(),
                    }}));
                }
                Some("toolCallResult") => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": part["toolCallId"].as_str().unwrap_or(""),
                    "content": part["content"].as_str().unwrap_or(""),
                })),
                Some("file") => {
                    return Err(error(
                        "this server's models take text only: files and images are not supported",
                        None,
                    ))
                }
                _ => {}
            }
        }
        if role == "tool" {
            continue;
        }
        let mut out = json!({"role": role, "content": text});
        if !calls.is_empty() {
            out["tool_calls"] = Value::Array(calls);
        }
        messages.push(out);
    }
    Ok(messages)
}

/// `llm.prediction.tools` (`{type: "toolArray", tools, force}`) as OpenAI's `tools` and
/// `tool_choice`.
fn tools(stack: &Value, body: &mut Map<String, Value>) {
    let Some(setting) = stack_value(stack, "llm.prediction.tools") else {
        return;
    };
    let Some(list) = setting["tools"].as_array().filter(|t| !t.is_empty()) else {
        return;
    };
    body.insert("tools".into(), Value::Array(list.clone()));
    if setting["force"] == true {
        body.insert("tool_choice".into(), json!("required"));
    }
}

/// The prediction settings of a config stack as OpenAI request fields.
fn sampling(stack: &Value, body: &mut Map<String, Value>) {
    let key = |name: &str| stack_value(stack, &format!("llm.prediction.{name}"));
    if let Some(t) = key("temperature").filter(|v| v.is_number()) {
        body.insert("temperature".into(), t.clone());
    }
    if let Some(max) = key("maxPredictedTokens") {
        if max["checked"] == true {
            if let Some(n) = max["value"].as_u64().filter(|&n| n > 0) {
                body.insert("max_tokens".into(), json!(n));
            }
        }
    }
    if let Some(stops) = key("stopStrings").filter(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    {
        body.insert("stop".into(), stops.clone());
    }
    if let Some(k) = key("topKSampling").filter(|v| v.is_number()) {
        body.insert("top_k".into(), k.clone());
    }
    for (name, field) in [
        ("topPSampling", "top_p"),
        ("minPSampling", "min_p"),
        ("repeatPenalty", "repeat_penalty"),
    ] {
        if let Some(v) = key(name) {
            if v["checked"] == true && v["value"].is_number() {
                body.insert(field.into(), v["value"].clone());
            }
        }
    }
    if let Some(seed) = key("seed") {
        if seed["checked"] == true && seed["value"].is_number() {
            body.insert("seed".into(), seed["value"].clone());
        }
    }
    if let Some(structured) = key("structured") {
        match structured["type"].as_str() {
            Some("json") if structured.get("jsonSchema").is_some() => {
                body.insert(
                    "response_format".into(),
                    json!({"type": "json_schema",
                           "json_schema": {"name": "response", "schema": structured["jsonSchema"]}}),
                );
            }
            Some("json") => {
                body.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("gbnf") => {
                if let Some(grammar) = structured["gbnfGrammar"].as_str() {
                    body.insert("grammar".into(), json!(grammar));
                }
            }
            _ => {}
        }
    }
}

/// Whether the stack asks for a text completion: the SDK's `complete()` sends a prompt template
/// that writes the messages' contents as they are.
fn completion_mode(stack: &Value) -> bool {
    stack["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|layer| layer["layerName"] == "completeModeFormatting")
}

/// `predict`: a chat response (or a completion), streamed as `fragment`s, then `success` with the
/// stats and the model's info.
async fn predict(state: &AppState, parameter: &Value, channel: &Channel) -> Result<(), Value> {
    let name = model_name(state, "llm", parameter).await?;
    let stack = &parameter["predictionConfigStack"];
    let messages = history_messages(&parameter["history"])?;
    let mut body = Map::new();
    body.insert("model".into(), json!(name));
    sampling(stack, &mut body);
    tools(stack, &mut body);
    let began = Instant::now();
    let started = if completion_mode(stack) {
        let prompt: String = messages
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect();
        start_raw(state, &Value::Object(body), &prompt)
            .await
            .map_err(|e| api_error(&e))?
    } else {
        body.insert("messages".into(), Value::Array(messages));
        start_chat(state, "lmstudio-sdk", None, &Value::Object(body))
            .await
            .map_err(|e| api_error(&e))?
    };
    let mut replies = started.replies;
    let mut first_token = None;
    let fragment = |content: String, tokens: u32, reasoning: &str| {
        json!({"type": "fragment", "fragment": {"content": content, "tokensCount": tokens,
               "containsDrafted": false, "reasoningType": reasoning}})
    };
    loop {
        let Some((_, event)) = replies.next().await else {
            return Err(error(ENGINE_STOPPED, None));
        };
        let message = match event {
            ReplyEvent::Reasoning(text) => {
                first_token.get_or_insert_with(|| began.elapsed());
                fragment(text, 1, "reasoning")
            }
            ReplyEvent::Content(text) => {
                first_token.get_or_insert_with(|| began.elapsed());
                fragment(text, 1, "none")
            }
            // Calls, as LM Studio reports them: the SDK runs the tools (`act`).
            ReplyEvent::ToolCallStarted { name, .. } => {
                if !channel
                    .send(json!({"type": "toolCallGenerationStart"}))
                    .await
                {
                    return Ok(());
                }
                json!({"type": "toolCallGenerationNameReceived", "name": name})
            }
            ReplyEvent::ToolCallDone(call) => {
                json!({"type": "toolCallGenerationEnd", "toolCallRequest": {
                    "type": "function", "id": call.id, "name": call.name,
                    "arguments": call.arguments}})
            }
            ReplyEvent::Finish(finish) => {
                let stats = &finish.stats;
                let seconds = stats.generation_ms / 1e3;
                let stats = json!({
                    "stopReason": finish.reason.lmstudio(),
                    "tokensPerSecond": if seconds > 0.0 { f64::from(stats.generated_tokens) / seconds } else { 0.0 },
                    "numGpuLayers": 0,
                    "timeToFirstTokenSec": first_token.unwrap_or_default().as_secs_f64(),
                    "promptTokensCount": stats.prompt_tokens,
                    "predictedTokensCount": stats.generated_tokens,
                    "totalTokensCount": stats.prompt_tokens + stats.generated_tokens,
                });
                let info = loaded_info(state, &started.model).await?;
                channel
                    .send(json!({"type": "success", "stats": stats, "modelInfo": info,
                                 "loadModelConfig": {"fields": []},
                                 "predictionConfig": {"fields": []}}))
                    .await;
                return Ok(());
            }
            ReplyEvent::Error(e) => return Err(error(e.to_string(), None)),
            _ => continue,
        };
        if !channel.send(message).await {
            return Ok(());
        }
    }
}

/// One RPC; `Value::Null` is a void result. `unloadModel` needs the `models` scope, the rest
/// `inference`.
pub async fn rpc(
    state: &AppState,
    caller: &Authenticated,
    namespace: &str,
    endpoint: &str,
    parameter: &Value,
) -> Result<Value, Value> {
    let scope = match endpoint {
        "unloadModel" => Scope::Models,
        _ => Scope::Inference,
    };
    caller.require(scope).map_err(|e| api_error(&e))?;
    match (namespace, endpoint) {
        ("system", "listDownloadedModels") => {
            let mut models = Vec::new();
            for status in state.listed_models() {
                models.push(model_info(state, &status, false).await?);
            }
            Ok(Value::Array(models))
        }
        ("system", "version") => Ok(json!({"version": crate::build_info::VERSION, "build": 0})),
        ("llm" | "embedding", "listLoaded") => {
            let mut models = Vec::new();
            for status in state.listed_models() {
                if status.state != ModelState::Loaded {
                    continue;
                }
                let info = model_info(state, &status, true).await?;
                if info["type"] == namespace {
                    models.push(info);
                }
            }
            Ok(Value::Array(models))
        }
        ("llm" | "embedding", "getModelInfo") => {
            let name = model_name(state, namespace, parameter).await?;
            let served = state.model(&name).await.map_err(|e| api_error(&e))?;
            loaded_info(state, served.id()).await
        }
        ("llm" | "embedding", "getLoadConfig") => Ok(json!({"fields": []})),
        ("llm" | "embedding", "tokenize" | "countTokens") => {
            let name = model_name(state, namespace, parameter).await?;
            let served = state.model(&name).await.map_err(|e| api_error(&e))?;
            let text = parameter["inputString"].as_str().unwrap_or("").to_owned();
            let tokens = super::super::prompt::tokenize_off_runtime(
                Arc::clone(&served.loaded),
                text,
                false,
            )
            .await
            .map_err(|e| api_error(&e))?;
            Ok(if endpoint == "tokenize" {
                json!({"tokens": tokens})
            } else {
                json!({"tokenCount": tokens.len()})
            })
        }
        ("llm", "applyPromptTemplate") => {
            let name = model_name(state, namespace, parameter).await?;
            let messages = history_messages(&parameter["history"])?;
            let body = json!({"model": name, "messages": messages});
            let (formatted, _) = super::super::chat::render_request(state, &body)
                .await
                .map_err(|e| api_error(&e))?;
            Ok(json!({"formatted": formatted}))
        }
        ("embedding", "embedString") => {
            let name = model_name(state, namespace, parameter).await?;
            let body = json!({"model": name, "input": parameter["inputString"]});
            let out = super::super::embeddings::run(state, &body)
                .await
                .map_err(|e| api_error(&e))?;
            let embedding = out.data.into_iter().next().map(Value::from).unwrap_or(json!([]));
            Ok(json!({"embedding": embedding}))
        }
        ("llm" | "embedding", "unloadModel") => {
            let name = parameter["identifier"].as_str().unwrap_or_default();
            tracing::info!(key = %caller.key_id, model = name, "unload (LM Studio SDK)");
            state
                .registry()
                .unload(name)
                .await
                .map_err(|e| api_error(&ApiError::from(e)))?;
            state.forget_unloaded();
            Ok(Value::Null)
        }
        (_, other) => Err(error(
            format!("lm-sandbox does not offer the {namespace} call `{other}` (it does not download, upload or search models)"),
            None,
        )),
    }
}
