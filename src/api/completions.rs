//! `POST /v1/completions`: raw prompts (a string, strings, tokens, or token lists), streamed or not.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{parse, JsonObject};
use super::generate::{
    self, collect, finish_reason, response_id, unix_now, PromptJob, Timings, Usage,
};
use super::params::{token_budget, CommonFields};
use super::sse::{self, ChunkHeader, ChunkShape};
use super::AppState;
use crate::engine::{GenerationStats, Token};

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: Value,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
    logprobs: Option<i64>,
}

/// A prompt as given: text to tokenize, or tokens.
enum Prompt {
    Text(String),
    Tokens(Vec<Token>),
}

fn token_list(items: &[Value], param: &str, n_vocab: i32) -> Result<Vec<Token>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_i64()
                .filter(|t| (0..i64::from(n_vocab)).contains(t))
                .map(|t| t as Token)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("{param}[{i}]"),
                        format!(
                            "token ids must be integers between 0 and {}; got {item}",
                            n_vocab - 1
                        ),
                    )
                })
        })
        .collect()
}

fn prompts(value: &Value, n_vocab: i32) -> Result<Vec<Prompt>, ApiError> {
    let shape_error = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, an array of strings, an array of token ids, or an array of token-id arrays",
        )
    };
    match value {
        Value::String(s) => Ok(vec![Prompt::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid("prompt", "`prompt` must not be empty"))
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.as_str()
                        .map(|s| Prompt::Text(s.to_owned()))
                        .ok_or_else(|| {
                            ApiError::invalid(
                                format!("prompt[{i}]"),
                                "expected a string like the first entry",
                            )
                        })
                })
                .collect(),
            Value::Number(_) => Ok(vec![Prompt::Tokens(token_list(items, "prompt", n_vocab)?)]),
            Value::Array(_) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let param = format!("prompt[{i}]");
                    let list = item.as_array().ok_or_else(shape_error)?;
                    Ok(Prompt::Tokens(token_list(list, &param, n_vocab)?))
                })
                .collect(),
            _ => Err(shape_error()),
        },
        _ => Err(shape_error()),
    }
}

pub async fn completions(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let common: CommonFields = parse(&body)?;
    let fields: CompletionFields = parse(&body)?;
    let model = state.resolve_model(&common.model)?;
    let loaded = state.loaded()?;
    let options = common.validate(loaded.info.n_vocab)?;
    if fields.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported yet",
        ));
    }
    if fields.logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` is not supported yet",
        ));
    }
    if let Some(best_of) = fields.best_of.filter(|&b| b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            format!("only `best_of` 1 is supported; got {best_of}"),
        ));
    }
    let echo = fields.echo.unwrap_or(false);
    let prompts = prompts(&fields.prompt, loaded.info.n_vocab)?;
    let mut jobs = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let (tokens, text) = match prompt {
            Prompt::Text(text) => (loaded.info.tokenizer.tokenize(&text, true), text),
            // Echoing a token prompt would need detokenization on this side; say so.
            Prompt::Tokens(_) if echo => {
                return Err(ApiError::invalid("echo", "`echo` needs a text prompt"));
            }
            Prompt::Tokens(tokens) => (tokens, String::new()),
        };
        if tokens.is_empty() {
            return Err(ApiError::invalid(
                format!("prompt[{i}]"),
                "the prompt is empty",
            ));
        }
        let max_new_tokens = token_budget(
            tokens.len(),
            options.max_tokens.or(Some(16)),
            loaded.info.n_ctx_seq,
            state.config().n_predict,
        )?;
        jobs.push(PromptJob {
            tokens,
            max_new_tokens,
        });
        echoes.push(if echo { text } else { String::new() });
    }
    let n = options.n;
    let receivers = generate::submit(&state.engine(), jobs, &options)?;
    // Choice `i` belongs to prompt `i / n`.
    let echo_of = move |choice: u32| echoes[(choice / n) as usize].clone();
    let id = response_id("cmpl");
    let created = unix_now();
    let fingerprint = state.config().system_fingerprint();
    if options.stream {
        let shape = CompletionChunks {
            header: ChunkHeader {
                id,
                object: "text_completion",
                created,
                model,
                fingerprint,
                include_usage: options.include_usage,
            },
            echo: Box::new(echo_of),
        };
        return Ok(sse::stream_response(
            shape,
            receivers,
            n,
            options.include_usage,
        ));
    }
    let done = collect(receivers).await?;
    let mut usage = Usage::default();
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            usage.add(&c.stats, i as u32 % n == 0);
            json!({
                "index": i,
                "text": echo_of(i as u32) + &c.text,
                "logprobs": null,
                "finish_reason": c.reason.map(finish_reason),
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage,
        "timings": Timings::from(&done[0].stats),
    }))
    .into_response())
}

/// Chunks of a streamed `text_completion`.
struct CompletionChunks {
    header: ChunkHeader,
    echo: Box<dyn Fn(u32) -> String + Send>,
}

impl ChunkShape for CompletionChunks {
    fn opening(&self, index: u32) -> Option<Value> {
        let echo = (self.echo)(index);
        (!echo.is_empty()).then(|| self.text(index, &echo))
    }

    fn text(&self, index: u32, text: &str) -> Value {
        self.header.chunk(
            json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    fn finish(&self, index: u32, reason: &'static str, stats: &GenerationStats) -> Value {
        self.header.chunk(
            json!([{"index": index, "text": "", "logprobs": null, "finish_reason": reason}]),
            Some(("timings", json!(Timings::from(stats)))),
        )
    }

    fn usage(&self, usage: Usage) -> Value {
        self.header.chunk(json!([]), Some(("usage", json!(usage))))
    }
}
