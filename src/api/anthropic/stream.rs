//! A reply stream as an Anthropic Message, or as its events: `message_start`, `ping`, then per
//! content block (`thinking`, `text`, `tool_use`) `content_block_start`, deltas
//! (`thinking_delta` and `signature_delta`, `text_delta`, `input_json_delta`) and
//! `content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`. A failure
//! after the start is an `error` event. Each shell-loop execution is a `sandbox_execution_started`
//! and a `sandbox_execution` event, which Anthropic's SDKs skip.

use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::super::chat::StartedChat;
use super::super::reply::{Collected, Finish, Reason, Replies, ReplyEvent};
use super::error::{error_body, kind, AnthropicError};
use crate::tools::AssistantMessage;

/// Thinking blocks carry a `signature`; this server does not sign its reasoning (and ignores the
/// thinking blocks a client sends back), so it is empty.
const SIGNATURE: &str = "";

fn message_id() -> String {
    super::super::generate::response_id("msg").replacen('-', "_", 1)
}

/// Anthropic's usage: `input_tokens` are those not read from the cache.
fn usage(finish: &Finish) -> Value {
    let usage = &finish.usage;
    let cached = usage.prompt_tokens_details.cached_tokens;
    json!({
        "input_tokens": usage.prompt_tokens - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": usage.completion_tokens,
    })
}

/// The content blocks of a whole reply.
fn content(message: &AssistantMessage) -> Vec<Value> {
    let mut blocks = Vec::new();
    if let Some(reasoning) = message.reasoning.as_deref().filter(|r| !r.is_empty()) {
        blocks.push(json!({"type": "thinking", "thinking": reasoning, "signature": SIGNATURE}));
    }
    let text = message.content.as_deref().unwrap_or("");
    if !text.is_empty() || message.tool_calls.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in &message.tool_calls {
        blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.name,
                           "input": call.arguments}));
    }
    blocks
}

/// What the answer to one request repeats.
pub struct Answer {
    pub model: String,
    /// The request's `stop_sequences`: `stop_sequence` names the one that matched.
    pub stops: Vec<String>,
    pub keep_alive: std::time::Duration,
}

impl Answer {
    fn stop_sequence(&self, reason: Reason) -> Value {
        match reason {
            Reason::StopSequence(which) => json!(self.stops.get(which)),
            _ => Value::Null,
        }
    }
}

fn message(id: &str, answer: &Answer, done: &Collected, shell: bool) -> Value {
    let mut out = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": content(&done.message),
        "stop_reason": done.finish.reason.anthropic(),
        "stop_sequence": answer.stop_sequence(done.finish.reason),
        "usage": usage(&done.finish),
    });
    if shell {
        out["sandbox_executions"] = json!(done.executions);
    }
    out
}

/// The Message, or its events.
pub async fn respond(answer: Answer, stream: bool, started: StartedChat) -> Response {
    let id = message_id();
    let model = &answer.model;
    if stream {
        let (tx, rx) = mpsc::channel::<Event>(64);
        let keep_alive = answer.keep_alive;
        let opening = json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": started.prompt_tokens, "output_tokens": 0},
            },
        });
        tokio::spawn(forward(opening, answer, started.replies, tx));
        return super::super::sse::body(rx, keep_alive);
    }
    match started.replies.collect().await {
        Ok(done) => Json(message(&id, &answer, &done[0], started.shell)).into_response(),
        Err(e) => AnthropicError(e).into_response(),
    }
}

fn event(kind: &str, data: Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}

/// The content block open in the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Block {
    Thinking,
    Text,
    ToolUse,
}

/// Numbers and opens and closes content blocks as the reply goes.
#[derive(Default)]
struct Blocks {
    open: Option<Block>,
    /// Blocks started so far.
    started: u32,
}

impl Blocks {
    /// The events that close the open block.
    fn close(&mut self) -> Vec<Event> {
        let Some(open) = self.open.take() else {
            return Vec::new();
        };
        let index = self.started - 1;
        let mut out = Vec::new();
        if open == Block::Thinking {
            out.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                       "delta": {"type": "signature_delta", "signature": SIGNATURE}}),
            ));
        }
        out.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
        out
    }

    /// The events that make `block` (described by `start`) the open block, closing another.
    fn open(&mut self, block: Block, start: Value) -> Vec<Event> {
        if self.open == Some(block) && block != Block::ToolUse {
            return Vec::new();
        }
        let mut out = self.close();
        out.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": self.started, "content_block": start}),
        ));
        self.open = Some(block);
        self.started += 1;
        out
    }

    fn delta(&self, delta: Value) -> Event {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": self.started - 1, "delta": delta}),
        )
    }
}

async fn forward(opening: Value, answer: Answer, mut replies: Replies, tx: mpsc::Sender<Event>) {
    let send_all = |events: Vec<Event>| {
        let tx = tx.clone();
        async move {
            for event in events {
                if tx.send(event).await.is_err() {
                    return false;
                }
            }
            true
        }
    };
    let ping = event("ping", json!({"type": "ping"}));
    if !send_all(vec![event("message_start", opening), ping]).await {
        return;
    }
    let mut blocks = Blocks::default();
    loop {
        let next = tokio::select! {
            // The client hung up: dropping the reply cancels the generation.
            _ = tx.closed() => return,
            next = replies.next() => next,
        };
        let events = match next {
            None => return,
            Some((_, ReplyEvent::Reasoning(text))) => {
                let start = json!({"type": "thinking", "thinking": "", "signature": ""});
                let mut out = blocks.open(Block::Thinking, start);
                out.push(blocks.delta(json!({"type": "thinking_delta", "thinking": text})));
                out
            }
            Some((_, ReplyEvent::Content(text))) => {
                let mut out = blocks.open(Block::Text, json!({"type": "text", "text": ""}));
                out.push(blocks.delta(json!({"type": "text_delta", "text": text})));
                out
            }
            Some((_, ReplyEvent::ToolCallStarted { id, name, .. })) => blocks.open(
                Block::ToolUse,
                json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
            ),
            Some((_, ReplyEvent::ToolCallArguments { delta, .. })) => {
                vec![blocks.delta(json!({"type": "input_json_delta", "partial_json": delta}))]
            }
            Some((_, ReplyEvent::ToolCallDone(_))) => blocks.close(),
            Some((_, ReplyEvent::ExecutionStarted { round, call })) => {
                let started = json!({"round": round, "call_id": call.id,
                                     "command": call.arguments["command"]});
                vec![event("sandbox_execution_started", started)]
            }
            Some((_, ReplyEvent::ExecutionFinished(record))) => {
                vec![event("sandbox_execution", record)]
            }
            Some((_, ReplyEvent::Finish(finish))) => {
                let mut out = blocks.close();
                if blocks.started == 0 {
                    // A reply with nothing in it still has its (empty) text block.
                    out.extend(blocks.open(Block::Text, json!({"type": "text", "text": ""})));
                    out.extend(blocks.close());
                }
                out.push(event(
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": finish.reason.anthropic(),
                                     "stop_sequence": answer.stop_sequence(finish.reason)},
                           "usage": usage(&finish)}),
                ));
                out.push(event("message_stop", json!({"type": "message_stop"})));
                let _ = send_all(out).await;
                return;
            }
            Some((_, ReplyEvent::Error(error))) => {
                let message = error.to_string();
                let code = error.body().error.code;
                let (_, kind) = kind(error.status(), code);
                let _ = send_all(vec![event("error", error_body(kind, &message))]).await;
                return;
            }
            Some(_) => continue,
        };
        if !send_all(events).await {
            return;
        }
    }
}
