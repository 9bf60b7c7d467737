//! Ollama's answer shapes: NDJSON lines while streaming (the default), or one object, each ending
//! with `done: true`, `done_reason` and the measured durations in nanoseconds.

use std::convert::Infallible;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::super::chat::StartedChat;
use super::super::error::ApiError;
use super::super::generate::{self, merged};
use super::super::shell_loop::{append_note, LoopEvent, LoopRun, LOOP_EVENTS};
use super::OllamaError;
use crate::engine::{FinishReason, GenerationEvent, GenerationStats};
use crate::tools::stream::ToolStream;
use crate::tools::{AssistantMessage, ToolRequest};

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
fn done(mut out: Value, reason: &str, stats: &GenerationStats, started: Began) -> Value {
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

fn reason_word(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopString => "stop",
        FinishReason::Length => "length",
    }
}

/// Ollama's calls: `{"function": {"name", "arguments": {object}}}`.
fn calls(message: &AssistantMessage) -> Vec<Value> {
    message
        .tool_calls
        .iter()
        .map(|c| {
            let arguments: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({"function": {"name": c.name, "arguments": arguments}})
        })
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

/// Streams (NDJSON) or collects the generation of `chat`.
pub async fn respond(
    kind: Kind,
    model: String,
    stream: bool,
    chat: StartedChat,
    started: Began,
) -> Response {
    let StartedChat {
        options,
        tools,
        receivers,
        ..
    } = chat;
    if stream {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        tokio::spawn(forward(
            kind,
            model,
            tools,
            receivers,
            options.grammar_param,
            started,
            tx,
        ));
        return (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(ReceiverStream::new(rx)),
        )
            .into_response();
    }
    let done_choices = match generate::collect(receivers, options.grammar_param).await {
        Ok(done) => done,
        Err(e) => return OllamaError(e).into_response(),
    };
    let c = &done_choices[0];
    let reason = c.reason.map_or("stop", reason_word);
    let (text, thinking, tool_calls) = match &tools {
        None => (c.text.clone(), None, Vec::new()),
        Some(tools) => {
            let (message, _) = tools.finish(&c.text, c.reason == Some(FinishReason::Length));
            let calls = calls(&message);
            (
                message.content.clone().unwrap_or_default(),
                message.reasoning.clone(),
                calls,
            )
        }
    };
    let out = chunk(kind, &model, &text, thinking.as_deref(), &tool_calls);
    axum::Json(done(out, reason, &c.stats, started)).into_response()
}

/// The content and reasoning of OpenAI-shaped deltas (what `ToolStream` and the shell loop
/// settle), as Ollama's `content` and `thinking`.
fn text_of(deltas: &[Value]) -> (String, Option<String>) {
    let content: String = deltas
        .iter()
        .filter_map(|d| d["content"].as_str())
        .collect();
    let thinking: String = deltas
        .iter()
        .filter_map(|d| d["reasoning_content"].as_str())
        .collect();
    (content, (!thinking.is_empty()).then_some(thinking))
}

fn line(value: &Value) -> Result<Bytes, Infallible> {
    let mut text = value.to_string();
    text.push('\n');
    Ok(Bytes::from(text))
}

/// Forwards engine events as NDJSON lines until the final one; returning drops the receivers,
/// which cancels the sequence when the client has gone.
async fn forward(
    kind: Kind,
    model: String,
    tools: Option<std::sync::Arc<ToolRequest>>,
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
    grammar_param: &'static str,
    started: Began,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
) {
    let mut events = merged(receivers);
    let mut tool_stream = ToolStream::new();
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = events.next() => next,
        };
        let lines: Vec<Value> = match next {
            None => {
                let error = ApiError::EngineFailed(generate::ENGINE_STOPPED.into());
                let _ = tx.send(line(&json!({"error": error.to_string()}))).await;
                return;
            }
            Some((_, GenerationEvent::Logprobs(_))) => continue,
            Some((_, GenerationEvent::Text(text))) => match &tools {
                None => vec![chunk(kind, &model, &text, None, &[])],
                Some(tools) => {
                    let (content, thinking) = text_of(&tool_stream.push(&text, tools));
                    if content.is_empty() && thinking.is_none() {
                        continue;
                    }
                    vec![chunk(kind, &model, &content, thinking.as_deref(), &[])]
                }
            },
            Some((_, GenerationEvent::Done { reason, stats })) => {
                let mut lines = Vec::new();
                if let Some(tools) = &tools {
                    let truncated = reason == FinishReason::Length;
                    let (deltas, message, _) = tool_stream.finish(tools, truncated);
                    let (content, thinking) = text_of(&deltas);
                    let calls = calls(&message);
                    if !content.is_empty() || thinking.is_some() || !calls.is_empty() {
                        lines.push(chunk(kind, &model, &content, thinking.as_deref(), &calls));
                    }
                }
                let last = chunk(kind, &model, "", None, &[]);
                lines.push(done(last, reason_word(reason), &stats, started));
                for l in &lines {
                    if tx.send(line(l)).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Some((_, GenerationEvent::Rejected(message))) => {
                let error = ApiError::invalid(grammar_param, message);
                let _ = tx.send(line(&json!({"error": error.to_string()}))).await;
                return;
            }
            Some((_, GenerationEvent::Failed(message))) => {
                let error = ApiError::EngineFailed(message);
                tracing::error!(%error, "generation failed mid-stream");
                let _ = tx.send(line(&json!({"error": error.to_string()}))).await;
                return;
            }
        };
        for l in &lines {
            if tx.send(line(l)).await.is_err() {
                return;
            }
        }
    }
}

/// Ollama's `done_reason` for the loop's OpenAI finish reason.
fn loop_reason(reason: &str) -> &'static str {
    if reason == "length" {
        "length"
    } else {
        "stop"
    }
}

/// The server-side shell loop through `/api/chat`: NDJSON lines (each command the loop ran as a
/// line with `sandbox_execution`), or one object with `sandbox_executions`.
pub async fn respond_loop(model: String, stream: bool, run: LoopRun, started: Began) -> Response {
    let (tx, rx) = mpsc::channel::<LoopEvent>(LOOP_EVENTS);
    if stream {
        let (out, body) = mpsc::channel::<Result<Bytes, Infallible>>(64);
        run.drive_with(true, async {}, tx).await;
        tokio::spawn(loop_lines(model, rx, out, started));
        return (
            [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
            Body::from_stream(ReceiverStream::new(body)),
        )
            .into_response();
    }
    run.drive_with(false, loop_object(model, rx, started), tx)
        .await
}

async fn loop_object(
    model: String,
    mut events: mpsc::Receiver<LoopEvent>,
    started: Began,
) -> Response {
    let mut executions = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            LoopEvent::Deltas(_) => {}
            LoopEvent::Execution(record) => executions.push(record),
            LoopEvent::Failed(error) => return OllamaError(error).into_response(),
            LoopEvent::Finished {
                message,
                reason,
                note,
                stats,
                ..
            } => {
                let content = match note {
                    Some(note) => append_note(message.content.clone(), &note),
                    None => message.content.clone(),
                };
                let out = chunk(
                    Kind::Chat,
                    &model,
                    content.as_deref().unwrap_or(""),
                    message.reasoning.as_deref(),
                    &calls(&message),
                );
                let mut out = done(out, loop_reason(reason), &stats, started);
                out["sandbox_executions"] = Value::Array(executions);
                return axum::Json(out).into_response();
            }
        }
    }
    OllamaError(ApiError::EngineFailed(generate::ENGINE_STOPPED.into())).into_response()
}

async fn loop_lines(
    model: String,
    mut events: mpsc::Receiver<LoopEvent>,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    started: Began,
) {
    loop {
        let next = tokio::select! {
            // The client hung up: returning drops `events`, which stops the loop.
            _ = tx.closed() => return,
            next = events.recv() => next,
        };
        let lines = match next {
            None => {
                let error = ApiError::EngineFailed(generate::ENGINE_STOPPED.into());
                vec![json!({"error": error.to_string()})]
            }
            Some(LoopEvent::Deltas(deltas)) => {
                let (content, thinking) = text_of(&deltas);
                if content.is_empty() && thinking.is_none() {
                    continue;
                }
                vec![chunk(
                    Kind::Chat,
                    &model,
                    &content,
                    thinking.as_deref(),
                    &[],
                )]
            }
            Some(LoopEvent::Execution(record)) => {
                let mut line = chunk(Kind::Chat, &model, "", None, &[]);
                line["sandbox_execution"] = record;
                vec![line]
            }
            Some(LoopEvent::Failed(error)) => vec![json!({"error": error.to_string()})],
            Some(LoopEvent::Finished {
                message,
                reason,
                note,
                stats,
                ..
            }) => {
                let mut lines = Vec::new();
                let calls = calls(&message);
                let note = note.map(|note| {
                    let content_sent = message
                        .content
                        .as_deref()
                        .is_some_and(|c| !c.trim().is_empty());
                    if content_sent {
                        format!("\n{note}")
                    } else {
                        note
                    }
                });
                if !calls.is_empty() || note.is_some() {
                    let text = note.unwrap_or_default();
                    lines.push(chunk(Kind::Chat, &model, &text, None, &calls));
                }
                let last = chunk(Kind::Chat, &model, "", None, &[]);
                lines.push(done(last, loop_reason(reason), &stats, started));
                lines
            }
        };
        let end = lines
            .last()
            .is_some_and(|l| l["done"] == true || l.get("error").is_some());
        for l in &lines {
            if tx.send(line(l)).await.is_err() {
                return;
            }
        }
        if end {
            return;
        }
    }
}
