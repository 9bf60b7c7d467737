//! Ollama's answer shapes: NDJSON lines while streaming (the default), or one object, each ending
//! with `done: true`, `done_reason` and the measured durations in nanoseconds.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::super::chat::StartedChat;
use super::super::reply::{Replies, ReplyEvent};
use super::OllamaError;
use crate::engine::GenerationStats;
use crate::tools::ToolCall;

/// Which route: chat answers in `message`, generate in `response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Generate,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// A line or object with `text`, `thinking` and `tool_calls` in the route's place.
fn chunk(kind: Kind, model: &str, text: &str, thinking: Option<&str>, calls: &[Value]) -> Value {
    let mut out = json!({"model": model, "created_at": now()});
    match kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if let Some(thinking) = thinking {
                message["thinking"] = json!(thinking);
            }
            if !calls.is_empty() {
                message["tool_calls"] = Value::Array(calls.to_vec());
            }
            out["message"] = message;
        }
        Kind::Generate => {
            out["response"] = json!(text);
            if let Some(thinking) = thinking {
                out["thinking"] = json!(thinking);
            }
        }
    }
    out["done"] = json!(false);
    out
}

/// When a request began, and how long it waited for its model to load.
#[derive(Debug, Clone, Copy)]
pub struct Began {
    pub at: Instant,
    pub load: std::time::Duration,
}

impl Began {
    /// A request that began at `at` and had its model at `loaded`.
    pub fn new(at: Instant, loaded: Instant) -> Self {
        Self {
            at,
            load: loaded.saturating_duration_since(at),
        }
    }
}

/// The final fields: `done`, `done_reason`, and Ollama's durations (ns), measured.
fn done_fields(mut out: Value, reason: &str, stats: &GenerationStats, started: Began) -> Value {
    let ns = |ms: f64| (ms * 1e6) as u64;
    out["done"] = json!(true);
    out["done_reason"] = json!(reason);
    out["total_duration"] = json!(started.at.elapsed().as_nanos() as u64);
    out["load_duration"] = json!(started.load.as_nanos() as u64);
    out["prompt_eval_count"] = json!(stats.prompt_tokens);
    out["prompt_eval_duration"] = json!(ns(stats.queue_ms + stats.prompt_ms));
    out["eval_count"] = json!(stats.generated_tokens);
    out["eval_duration"] = json!(ns(stats.generation_ms));
    out
}

/// Ollama's calls: `{"function": {"name", "arguments": {object}}}`.
fn calls(calls: &[ToolCall]) -> Vec<Value> {
    calls
        .iter()
        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

/// The answer to an empty prompt: the model is loaded.
pub fn load_answer(model: &str, reason: &'static str, route: &str) -> Response {
    let kind = if route == "chat" {
        Kind::Chat
    } else {
        Kind::Generate
    };
    let mut out = chunk(kind, model, "", None, &[]);
    out["done"] = json!(true);
    out["done_reason"] = json!(reason);
    axum::Json(out).into_response()
}

/// Streams (NDJSON) or collects the reply of `chat` (a generation or the shell loop). Every
/// command the loop ran is a line with `sandbox_execution`, or listed in `sandbox_executions`.
pub async fn respond(
    kind: Kind,
    model: String,
    stream: bool,
    chat: StartedChat,
    started: Began,
) -> Response {
    if stream {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        tokio::spawn(forward(kind, model, chat.replies, started, tx));
        return (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(ReceiverStream::new(rx)),
        )
            .into_response();
    }
    let done = match chat.replies.collect().await {
        Ok(done) => done,
        Err(e) => return OllamaError(e).into_response(),
    };
    let c = &done[0];
    let message = &c.message;
    let out = chunk(
        kind,
        &model,
        c.text(),
        message.reasoning.as_deref(),
        &calls(&message.tool_calls),
    );
    let mut out = done_fields(out, c.finish.reason.ollama(), &c.finish.stats, started);
    if chat.shell {
        out["sandbox_executions"] = json!(c.executions);
    }
    axum::Json(out).into_response()
}

fn line(value: &Value) -> Result<Bytes, Infallible> {
    let mut text = value.to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// Forwards reply events as NDJSON lines until the final one; returning drops the reply, which
/// cancels the sequence (or the loop) when the client has gone.
async fn forward(
    kind: Kind,
    model: String,
    mut replies: Replies,
    started: Began,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let mut tool_calls = Vec::new();
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = replies.next() => next,
        };
        let (out, end) = match next {
            None => return,
            Some((_, ReplyEvent::Content(text))) => (chunk(kind, &model, &text, None, &[]), false),
            Some((_, ReplyEvent::Reasoning(text))) => {
                (chunk(kind, &model, "", Some(&text), &[]), false)
            }
            Some((_, ReplyEvent::ToolCallDone(call))) => {
                tool_calls.push(call);
                continue;
            }
            Some((_, ReplyEvent::ExecutionFinished(record))) => {
                let mut out = chunk(kind, &model, "", None, &[]);
                out["sandbox_execution"] = record;
                (out, false)
            }
            Some((_, ReplyEvent::Finish(finish))) => {
                if !tool_calls.is_empty() {
                    let out = chunk(kind, &model, "", None, &calls(&tool_calls));
                    if tx.send(line(&out)).await.is_err() {
                        return;
                    }
                }
                let last = chunk(kind, &model, "", None, &[]);
                let reason = finish.reason.ollama();
                (done_fields(last, reason, &finish.stats, started), true)
            }
            Some((_, ReplyEvent::Error(error))) => (json!({"error": error.to_string()}), true),
            Some(_) => continue,
        };
        if tx.send(line(&out)).await.is_err() || end {
            return;
        }
    }
}
