//! `POST /v1/chat/completions`: messages through the model's chat template, streamed or not.

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, finish_reason, prepare, Prepared, PromptJob, Timings};
use super::params::token_budget;
use super::sse::{ChunkHeader, ChunkShape};
use super::AppState;
use crate::engine::GenerationStats;
use crate::template::{RenderContext, TemplateError};

/// Chat-only request fields.
#[derive(Debug, Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
    tools: Option<Value>,
    response_format: Option<Value>,
    logprobs: Option<bool>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

impl Role {
    /// The role name templates know. `developer` is OpenAI's newer name for `system`.
    fn template_name(self) -> &'static str {
        match self {
            Self::System | Self::Developer => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
            Self::Function => "function",
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: Role,
    #[serde(default)]
    content: Option<Value>,
    name: Option<String>,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
}

/// Flattens `content` (a string or an array of parts) to text, naming the field on errors.
fn content_text(content: &Value, at: usize) -> Result<String, ApiError> {
    let param = format!("messages[{at}].content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                let text = match kind {
                    "text" => part.get("text"),
                    "refusal" => part.get("refusal"),
                    "" => {
                        return Err(ApiError::invalid(
                            format!("{param}[{j}].type"),
                            "every content part needs a `type`",
                        ))
                    }
                    other => {
                        return Err(ApiError::invalid(
                            format!("{param}[{j}].type"),
                            format!("content parts of type `{other}` are not supported: this model takes text only"),
                        ))
                    }
                };
                let text = text.and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(
                        format!("{param}[{j}].{kind}"),
                        format!("a `{kind}` content part needs a string `{kind}`"),
                    )
                })?;
                texts.push(text);
            }
            Ok(texts.join("\n"))
        }
        _ => Err(ApiError::invalid(
            param,
            "`content` must be a string or an array of content parts",
        )),
    }
}

/// The message as the template sees it (Hugging Face's shape).
fn template_message(message: &ChatMessage, at: usize) -> Result<Value, ApiError> {
    let mut out = Map::new();
    out.insert("role".into(), json!(message.role.template_name()));
    let content = match &message.content {
        None | Some(Value::Null) => {
            let may_be_empty = message.role == Role::Assistant && message.tool_calls.is_some();
            if !may_be_empty {
                return Err(ApiError::invalid(
                    format!("messages[{at}].content"),
                    format!(
                        "messages[{at}] ({}) needs `content`",
                        message.role.template_name()
                    ),
                ));
            }
            Value::Null
        }
        Some(content) => Value::String(content_text(content, at)?),
    };
    out.insert("content".into(), content);
    if let Some(name) = &message.name {
        out.insert("name".into(), json!(name));
    }
    if let Some(calls) = &message.tool_calls {
        // Templates index `tool_call.function.arguments` as a mapping; OpenAI sends a JSON string.
        let calls: Vec<Value> = calls
            .iter()
            .map(|call| {
                let mut call = call.clone();
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                        *args = parsed;
                    }
                }
                call
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    Ok(Value::Object(out))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let Prepared {
        model,
        loaded,
        options,
        fields: chat,
    } = prepare::<ChatFields>(&state, &body)?;
    if chat.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    if chat.logprobs == Some(true) {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` is not supported yet",
        ));
    }
    if let Some(format) = &chat.response_format {
        let kind = format.get("type").and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                format!("response_format type {kind:?} is not supported yet; only \"text\""),
            ));
        }
    }
    let messages = chat
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| template_message(m, i))
        .collect::<Result<Vec<_>, _>>()?;
    let prompt = loaded
        .template
        .render(&RenderContext {
            messages,
            tools: chat.tools.filter(|t| !t.is_null()),
            add_generation_prompt: true,
            bos_token: loaded.info.bos_token.clone(),
            eos_token: loaded.info.eos_token.clone(),
        })
        .map_err(|err| match err {
            TemplateError::Render(message) => ApiError::invalid("messages", message),
            TemplateError::Syntax(message) => ApiError::Internal(message),
        })?;
    let bos = &loaded.info.bos_token;
    let add_bos = bos.is_empty() || !prompt.starts_with(bos.as_str());
    // Tokenizing on the runtime is fine: it takes microseconds per kilobyte of prompt.
    let tokens = loaded.info.tokenizer.tokenize(&prompt, add_bos);
    let max_new_tokens = token_budget(
        tokens.len(),
        options.max_tokens,
        loaded.info.n_ctx_seq,
        state.config().n_predict,
    )?;
    let job = PromptJob {
        tokens,
        max_new_tokens,
    };
    let receivers = generate::submit(&state.engine(), vec![job], &options)?;
    let header = ChunkHeader::new(
        &state,
        "chatcmpl",
        "chat.completion.chunk",
        model,
        options.include_usage,
    );
    generate::respond(
        receivers,
        &options,
        header,
        "chat.completion",
        |header| ChatChunks { header },
        |i, c| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text, "refusal": null},
                "logprobs": null,
                "finish_reason": c.reason.map(finish_reason),
            })
        },
    )
    .await
}

/// Chunks of `chat.completion.chunk`.
struct ChatChunks {
    header: ChunkHeader,
}

impl ChunkShape for ChatChunks {
    fn opening(&self, index: u32) -> Option<Value> {
        Some(self.header.chunk(
            json!([{"index": index, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
            None,
        ))
    }

    fn text(&self, index: u32, text: &str) -> Value {
        self.header.chunk(
            json!([{"index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    fn finish(&self, index: u32, reason: &'static str, stats: &GenerationStats) -> Value {
        self.header.chunk(
            json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": reason}]),
            Some(("timings", json!(Timings::from(stats)))),
        )
    }

    fn header(&self) -> &ChunkHeader {
        &self.header
    }
}
