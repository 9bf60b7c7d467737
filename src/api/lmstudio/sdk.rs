//! The protocol of LM Studio's SDKs (`lmstudio` on PyPI, `@lmstudio/sdk`) above its transport
//! (`socket`: the websocket per namespace, the first message that authenticates, caps). The
//! client sends
//! `rpcCall {endpoint, callId, parameter}` (answered `rpcResult` or `rpcError`) and
//! `channelCreate {endpoint, channelId, creationParameter}` (answered with `channelSend`
//! messages, then `channelClose` or `channelError`); `channelSend {message: {type: "cancel"}}`
//! stops a channel.
//!
//! Every call runs through the same registry, templates, validation and engines as the HTTP
//! dialects: a prediction (`predict`) becomes an OpenAI chat body (or a raw completion) and is
//! started by `chat::start_chat` / `chat::start_raw`; `protocol` has the model records and errors.

use std::sync::Arc;

use serde_json::{json, Value};

use super::super::auth::Authenticated;
use super::super::error::ApiError;
use super::super::keys::Scope;
use super::super::state::AppState;
use super::predict::{history_messages, predict};
use super::protocol::{api_error, error, load, loaded_info, model_info, model_name, Channel};
use crate::registry::State as ModelState;

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
