//! OpenAI's answers over a reply stream: one JSON object, or server-sent events with OpenAI's
//! framing, the usage chunk, `[DONE]`, and cancellation when the client goes away.
//!
//! A task forwards reply events into the response body through a bounded channel. It watches the
//! channel's closing (the client hung up) while it waits, and returning drops the reply, which
//! cancels the sequences within one decode step, queued or running.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::params::GenerationOptions;
use super::reply::{total_usage, Collected, Reason, Replies, ReplyEvent, Timings, Usage};
use crate::engine::GenerationStats;

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
    /// The reply is the server-side shell loop's: the JSON answer lists `sandbox_executions`.
    pub shell: bool,
}

impl ChunkHeader {
    /// A fresh id with `id_prefix` (`chatcmpl`, `cmpl`), stamped now.
    pub fn new(
        state: &super::state::AppState,
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
            shell: false,
        }
    }

    /// With LM Studio's REST v0 fields: adds `stats` for a choice that finished for `reason`,
    /// and the extra fields, to `out`.
    pub fn add_lmstudio_stats(&self, out: &mut Value, stats: &GenerationStats, reason: Reason) {
        let Some(extras) = &self.lmstudio else {
            return;
        };
        let timings = Timings::from(stats);
        out["stats"] = json!({
            "tokens_per_second": timings.predicted_per_second,
            "time_to_first_token": (stats.queue_ms + stats.prompt_ms) / 1e3,
            "generation_time": stats.generation_ms / 1e3,
            "stop_reason": reason.lmstudio(),
        });
        for (key, value) in extras.iter() {
            out[key] = value.clone();
        }
    }

    /// A header for `chat.completion.chunk`s.
    pub fn chat(state: &super::state::AppState, model: String, include_usage: bool) -> Self {
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
    /// Chunks for one event of choice `index` (none while it is held back); the choice's last
    /// chunk, with `finish_reason`, answers its `Finish`. Never given `Error`.
    fn event(&mut self, index: u32, event: ReplyEvent) -> Vec<Value>;
    fn header(&self) -> &ChunkHeader;

    /// The final chunk with empty `choices` (sent when `stream_options.include_usage`).
    fn usage(&self, usage: Usage) -> Value {
        self.header()
            .chunk(Value::Array(Vec::new()), Some(("usage", json!(usage))))
    }
}

/// Streams the reply as SSE, or waits for it and answers one JSON object: `object` with the
/// choices `choice` builds, the usage, choice 0's timings, and the shell loop's executions.
pub async fn respond<S: ChunkShape>(
    replies: Replies,
    options: &GenerationOptions,
    header: ChunkHeader,
    object: &'static str,
    stream_shape: impl FnOnce(ChunkHeader) -> S,
    choice: impl Fn(u32, &Collected) -> Value,
) -> Result<Response, ApiError> {
    if options.stream {
        let shape = stream_shape(header);
        return Ok(stream_response(shape, replies, options.include_usage));
    }
    let done = replies.collect().await?;
    let choices: Vec<Value> = (0u32..).zip(&done).map(|(i, c)| choice(i, c)).collect();
    let first = &done[0];
    let mut out = json!({
        "id": header.id,
        "object": object,
        "created": header.created,
        "model": header.model,
        "system_fingerprint": header.fingerprint,
        "choices": choices,
        "usage": total_usage(&done),
        "timings": Timings::from(&first.finish.stats),
    });
    if header.shell {
        out["sandbox_executions"] = json!(first.executions);
    }
    header.add_lmstudio_stats(&mut out, &first.finish.stats, first.finish.reason);
    Ok(axum::Json(out).into_response())
}

/// Frames of the SSE body; a small buffer is enough since the task waits when it is full.
const SSE_BUFFER: usize = 64;

/// Streams `replies` as an SSE response.
pub fn stream_response<S: ChunkShape>(shape: S, replies: Replies, include_usage: bool) -> Response {
    let (tx, rx) = mpsc::channel::<Event>(SSE_BUFFER);
    let keep_alive = shape.header().keep_alive;
    tokio::spawn(forward(shape, replies, include_usage, tx));
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

async fn forward<S: ChunkShape>(
    mut shape: S,
    mut replies: Replies,
    include_usage: bool,
    tx: mpsc::Sender<Event>,
) {
    for index in 0..replies.choices {
        if let Some(chunk) = shape.opening(index) {
            if tx.send(json_event(&chunk)).await.is_err() {
                return;
            }
        }
    }
    let mut usage = Usage::default();
    loop {
        let next = tokio::select! {
            // The client hung up: dropping the reply cancels every sequence.
            _ = tx.closed() => return,
            next = replies.next() => next,
        };
        let chunks = match next {
            None => break,
            Some((_, ReplyEvent::Error(error))) => {
                // In-band: the stream has begun.
                let _ = tx.send(error_event(&error)).await;
                return;
            }
            Some((index, event)) => {
                if let ReplyEvent::Finish(finish) = &event {
                    usage = usage + finish.usage;
                }
                shape.event(index, event)
            }
        };
        for chunk in chunks {
            if tx.send(json_event(&chunk)).await.is_err() {
                return;
            }
        }
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
