//! `POST /v1/completions`: raw prompts (a string, strings, tokens, or token lists), streamed or not.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, prepare, Prepared, PromptJob};
use super::inputs::{text_or_tokens, Input};
use super::logprobs::CompletionLogprobs;
use super::params::token_budget;
use super::reply::{Replies, ReplyEvent, Timings};
use super::sse::{self, ChunkHeader, ChunkShape};
use super::state::AppState;
use crate::engine::TokenLogprob;

#[derive(Debug, Deserialize)]
struct CompletionFields {
    prompt: Value,
    echo: Option<bool>,
    suffix: Option<String>,
    best_of: Option<i64>,
    logprobs: Option<i64>,
}

pub async fn completions(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    answer(&state, &body, None).await
}

/// A text completion in OpenAI's shapes; `lmstudio` adds LM Studio's REST v0 fields.
pub(super) async fn answer(
    state: &AppState,
    body: &Value,
    lmstudio: Option<Arc<serde_json::Map<String, Value>>>,
) -> Result<Response, ApiError> {
    let state = state.clone();
    let Prepared {
        model,
        loaded,
        served,
        mut options,
        fields,
    } = prepare::<CompletionFields>(&state, body).await?;
    if fields.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` (fill-in-the-middle) is not supported yet",
        ));
    }
    if fields.logprobs.is_some() {
        options.logprobs = Some(super::params::top_logprobs("logprobs", fields.logprobs)?);
    }
    if let Some(best_of) = fields.best_of.filter(|&b| b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            format!("only `best_of` 1 is supported; got {best_of}"),
        ));
    }
    let echo = fields.echo.unwrap_or(false);
    if echo && options.logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` with `logprobs` would need the prompt's log-probabilities, which this server \
             does not compute; drop one of them",
        ));
    }
    let prompts = text_or_tokens(&fields.prompt, "prompt", loaded.info.n_vocab, None)?;
    let mut jobs = Vec::with_capacity(prompts.len());
    let mut echoes = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let (tokens, text) = match prompt {
            Input::Text(text) => (
                super::prompt::tokenize_off_runtime(
                    std::sync::Arc::clone(&loaded),
                    text.clone(),
                    true,
                )
                .await?,
                text,
            ),
            // Echoing a token prompt would need detokenization on this side; say so.
            Input::Tokens(_) if echo => {
                return Err(ApiError::invalid("echo", "`echo` needs a text prompt"));
            }
            Input::Tokens(tokens) => (tokens, String::new()),
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
    let receivers = generate::submit(&served.engine, jobs, &options)?;
    let mut header = ChunkHeader::new(
        &state,
        "cmpl",
        "text_completion",
        model,
        options.include_usage,
    );
    header.lmstudio = lmstudio;
    // Choice `i` belongs to prompt `i / n`.
    let echoes = Echoes {
        texts: Arc::new(echoes),
        n: options.n,
    };
    let wants_logprobs = options.logprobs.is_some();
    let choices = receivers.len();
    let replies = Replies::generation(receivers, None, options.n, options.grammar_param);
    sse::respond(
        replies,
        &options,
        header,
        "text_completion",
        |header| CompletionChunks {
            header,
            echoes: echoes.clone(),
            logprobs: wants_logprobs.then(|| vec![CompletionLogprobs::default(); choices]),
            held: vec![Vec::new(); choices],
        },
        |i, c| {
            let logprobs = if wants_logprobs {
                CompletionLogprobs::default().next(&c.logprobs)
            } else {
                Value::Null
            };
            json!({
                "index": i,
                "text": format!("{}{}", echoes.of(i), c.text()),
                "logprobs": logprobs,
                "finish_reason": c.finish.reason.openai(),
            })
        },
    )
    .await
}

/// The prompt text each choice starts with when `echo` is set (empty otherwise).
#[derive(Clone)]
struct Echoes {
    texts: Arc<Vec<String>>,
    n: u32,
}

impl Echoes {
    fn of(&self, choice: u32) -> &str {
        &self.texts[(choice / self.n) as usize]
    }
}

/// Chunks of a streamed `text_completion`.
struct CompletionChunks {
    header: ChunkHeader,
    echoes: Echoes,
    /// Per choice, when the request asked for log-probabilities.
    logprobs: Option<Vec<CompletionLogprobs>>,
    /// Per choice, log-probabilities whose text has not come yet.
    held: Vec<Vec<TokenLogprob>>,
}

impl CompletionChunks {
    fn text_chunk(&self, index: u32, text: &str) -> Value {
        self.header.chunk(
            json!([{"index": index, "text": text, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    /// The `logprobs` of the chunk carrying `tokens`' text: null unless asked for.
    fn logprobs_of(&mut self, index: u32, tokens: &[TokenLogprob]) -> Value {
        match &mut self.logprobs {
            Some(choices) => choices[index as usize].next(tokens),
            None => Value::Null,
        }
    }
}

impl ChunkShape for CompletionChunks {
    fn opening(&self, index: u32) -> Option<Value> {
        let echo = self.echoes.of(index);
        (!echo.is_empty()).then(|| self.text_chunk(index, echo))
    }

    fn event(&mut self, index: u32, event: ReplyEvent) -> Vec<Value> {
        match event {
            ReplyEvent::Logprobs(tokens) => {
                self.held[index as usize].extend(tokens);
                Vec::new()
            }
            ReplyEvent::Content(text) => {
                let tokens = std::mem::take(&mut self.held[index as usize]);
                let mut chunk = self.text_chunk(index, &text);
                chunk["choices"][0]["logprobs"] = self.logprobs_of(index, &tokens);
                vec![chunk]
            }
            ReplyEvent::Finish(finish) => {
                let tokens = std::mem::take(&mut self.held[index as usize]);
                let logprobs = if tokens.is_empty() {
                    Value::Null
                } else {
                    self.logprobs_of(index, &tokens)
                };
                let mut last = self.header.chunk(
                    json!([{"index": index, "text": "", "logprobs": logprobs,
                            "finish_reason": finish.reason.openai()}]),
                    Some(("timings", json!(Timings::from(&finish.stats)))),
                );
                self.header
                    .add_lmstudio_stats(&mut last, &finish.stats, finish.reason);
                vec![last]
            }
            // A raw completion has no reasoning, calls or executions.
            _ => Vec::new(),
        }
    }

    fn header(&self) -> &ChunkHeader {
        &self.header
    }
}
