//! `predict`: an SDK prediction (a chat, or with `completeModeFormatting` a raw completion) as an
//! OpenAI chat body started by `chat::start_chat` / `start_raw`, its reply stream sent back as
//! `fragment`s, tool-call events and `success` with the stats.

use std::time::Instant;

use serde_json::{json, Map, Value};

use super::super::chat::{start_chat, start_raw};
use super::super::reply::{ReplyEvent, ENGINE_STOPPED};
use super::super::state::AppState;
use super::protocol::{api_error, error, loaded_info, model_name, Channel};

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
pub fn history_messages(history: &Value) -> Result<Vec<Value>, Value> {
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
pub async fn predict(state: &AppState, parameter: &Value, channel: &Channel) -> Result<(), Value> {
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
