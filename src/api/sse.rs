//! Server-sent events for streamed completions: OpenAI's framing, the usage chunk, `[DONE]`, and
//! cancellation when the client goes away.
//!
//! A task forwards engine events into the response body through a bounded channel. It watches the
//! channel's closing (the client hung up) while it waits, and returning drops the engine receivers,
//! which cancels the sequences within one decode step, queued or running.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::generate::{merged, Usage};
use super::params::GenerationOptions;
use crate::engine::{FinishReason, GenerationEvent, GenerationStats, TokenLogprob};

/// The fields every chunk of one response repeats.
pub struct ChunkHeader {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub fingerprint: String,
    /// OpenAI sends `"usage": null` on every chunk but the last when usage was asked for.
    pub include_usage: bool,
    /// Interval of keep-alive comments while the stream has nothing to send.
    pub keep_alive: std::time::Duration,
    /// LM Studio's REST v0: fields its answers add to OpenAI's (`model_info`, `runtime`), and a
    /// `stats` object on the final chunk or object.
    pub lmstudio: Option<std::sync::Arc<serde_json::Map<String, Value>>>,
}

impl ChunkHeader {
    /// A fresh id with `id_prefix` (`chatcmpl`, `cmpl`), stamped now.
    pub fn new(
        state: &super::AppState,
        id_prefix: &str,
        object: &'static str,
        model: String,
        include_usage: bool,
    ) -> Self {
        Self {
            id: super::generate::response_id(id_prefix),
            object,
            created: super::generate::unix_now(),
            model,
            fingerprint: state.config().system_fingerprint(),
            include_usage,
            keep_alive: state.config().sse_keep_alive,
            lmstudio: None,
        }
    }

    /// With LM Studio's REST v0 fields: adds `stats` for a choice that finished for `reason`
    /// (with `tool_calls` when its text parsed into calls), and the extra fields, to `out`.
    pub fn add_lmstudio_stats(
        &self,
        out: &mut Value,
        stats: &GenerationStats,
        reason: FinishReason,
        tool_calls: bool,
    ) {
        let Some(extras) = &self.lmstudio else {
            return;
        };
        let stop_reason = match reason {
            _ if tool_calls => "toolCalls",
            FinishReason::Length => "maxPredictedTokensReached",
            FinishReason::StopString => "stopStringFound",
            FinishReason::Stop => "eosFound",
        };
        let timings = super::generate::Timings::from(stats);
        out["stats"] = serde_json::json!({
            "tokens_per_second": timings.predicted_per_second,
            "time_to_first_token": (stats.queue_ms + stats.prompt_ms) / 1e3,
            "generation_time": stats.generation_ms / 1e3,
            "stop_reason": stop_reason,
        });
        for (key, value) in extras.iter() {
            out[key] = value.clone();
        }
    }

    /// A header for `chat.completion.chunk`s.
    pub fn chat(state: &super::AppState, model: String, include_usage: bool) -> Self {
        Self::new(
            state,
            "chatcmpl",
            "chat.completion.chunk",
            model,
            include_usage,
        )
    }

    /// One chunk with `choices`, plus an optional extra top-level field.
    pub fn chunk(&self, choices: Value, extra: Option<(&str, Value)>) -> Value {
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        if let Some((key, value)) = extra {
            chunk[key] = value;
        }
        chunk
    }
}

/// How one endpoint shapes its chunks.
pub trait ChunkShape: Send + 'static {
    /// A chunk sent for each choice before any text (chat: the role delta).
    fn opening(&self, index: u32) -> Option<Value>;
    /// Chunks for a piece of generated text (none while text is held back), with the
    /// log-probabilities of its tokens (empty unless the request asked for them).
    fn text(&mut self, index: u32, text: &str, logprobs: Vec<TokenLogprob>) -> Vec<Value>;
    /// The choice's last chunks, the one with `finish_reason` at the end; `logprobs` are those of
    /// tokens no text was sent for.
    fn finish(
        &mut self,
        index: u32,
        reason: FinishReason,
        stats: &GenerationStats,
        logprobs: Vec<TokenLogprob>,
    ) -> Vec<Value>;
    fn header(&self) -> &ChunkHeader;

    /// The final chunk with empty `choices` (sent when `stream_options.include_usage`).
    fn usage(&self, usage: Usage) -> Value {
        self.header().chunk(
            Value::Array(Vec::new()),
            Some(("usage", serde_json::json!(usage))),
        )
    }
}

/// Frames of the SSE body; a small buffer is enough since the task waits when it is full.
const SSE_BUFFER: usize = 64;

/// Streams `receivers` (choice `i` is receiver `i`; `n` choices per prompt) as an SSE response.
pub fn stream_response<S: ChunkShape>(
    shape: S,
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
    options: &GenerationOptions,
) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(SSE_BUFFER);
    let keep_alive = shape.header().keep_alive;
    let ends = Ends {
        n: options.n,
        include_usage: options.include_usage,
        grammar_param: options.grammar_param,
    };
    tokio::spawn(forward(shape, receivers, ends, tx));
    body(rx, keep_alive)
}

/// The SSE response over the events a task sends to `rx`, with a keep-alive comment every
/// `keep_alive` while nothing else is sent (a long prompt, a shell round): proxies and clients
/// with idle timeouts do not take a waiting stream for a dead one.
pub fn body(rx: mpsc::Receiver<Event>, keep_alive: std::time::Duration) -> Response {
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(keep_alive))
        .into_response()
}

fn json_event(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

/// What `forward` needs of the request's options.
struct Ends {
    /// Choices per prompt.
    n: u32,
    include_usage: bool,
    grammar_param: &'static str,
}

async fn forward<S: ChunkShape>(
    mut shape: S,
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
    ends: Ends,
    tx: mpsc::Sender<Event>,
) {
    let Ends {
        n,
        include_usage,
        grammar_param,
    } = ends;
    let choices = receivers.len();
    for index in 0..choices as u32 {
        if let Some(chunk) = shape.opening(index) {
            if tx.send(json_event(&chunk)).await.is_err() {
                return;
            }
        }
    }
    let mut events = merged(receivers);
    let mut usage = Usage::default();
    let mut finished = 0;
    // Each choice's log-probabilities, until the text they belong to arrives.
    let mut logprobs: Vec<Vec<TokenLogprob>> = vec![Vec::new(); choices];
    loop {
        let next = tokio::select! {
            // The client hung up: dropping `events` cancels every sequence.
            _ = tx.closed() => return,
            next = events.next() => next,
        };
        let chunks = match next {
            None => break,
            Some((index, GenerationEvent::Logprobs(tokens))) => {
                logprobs[index as usize].extend(tokens);
                continue;
            }
            Some((index, GenerationEvent::Text(text))) => {
                let tokens = std::mem::take(&mut logprobs[index as usize]);
                shape.text(index, &text, tokens)
            }
            Some((index, GenerationEvent::Done { reason, stats })) => {
                usage.add(&stats, index % n == 0);
                finished += 1;
                let tokens = std::mem::take(&mut logprobs[index as usize]);
                shape.finish(index, reason, &stats, tokens)
            }
            Some((_, GenerationEvent::Rejected(message))) => {
                // The client's mistake, in-band: the stream has begun.
                let _ = tx
                    .send(error_event(&ApiError::invalid(grammar_param, message)))
                    .await;
                return;
            }
            Some((_, GenerationEvent::Failed(message))) => {
                let error = ApiError::EngineFailed(message);
                tracing::error!(%error, "generation failed mid-stream");
                // Ignored send error: the stream ends here either way.
                let _ = tx.send(error_event(&error)).await;
                return;
            }
        };
        for chunk in chunks {
            if tx.send(json_event(&chunk)).await.is_err() {
                return;
            }
        }
    }
    if finished < choices {
        let error = ApiError::EngineFailed(super::generate::ENGINE_STOPPED.into());
        let _ = tx.send(error_event(&error)).await;
        return;
    }
    if include_usage && tx.send(json_event(&shape.usage(usage))).await.is_err() {
        return;
    }
    let _ = tx.send(Event::default().data("[DONE]")).await;
}

/// An error after the stream began: one in-band event, then the end.
pub(super) fn error_event(error: &ApiError) -> Event {
    Event::default().data(serde_json::to_string(&error.body()).unwrap_or_default())
}
