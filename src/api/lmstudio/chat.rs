//! LM Studio's REST v1 chat (`POST /api/v1/chat`): one `input` (and a `system_prompt`) into a
//! reply `output`, with `stats`, threads kept by the server (`store`, `thread_id`), and, when
//! streaming, LM Studio's named SSE events (`chat.start`, `prompt_processing.*`, `message.*`,
//! `error`, `chat.end` with the whole result).
//!
//! The request becomes an OpenAI chat body once and runs through `chat::start_chat`, like every
//! other dialect. Threads live in memory, at most [`MAX_THREADS`] (the least recently used goes),
//! and are lost on restart.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::super::auth::{Authenticated, RequestId};
use super::super::chat::start_chat;
use super::super::error::ApiError;
use super::super::extract::JsonObject;
use super::super::reply::{Replies, ReplyEvent, Timings};
use super::super::state::{AppState, Served};
use crate::engine::GenerationStats;

/// Threads kept at once; one more evicts the least recently used.
pub const MAX_THREADS: usize = 256;

/// The conversations `store: true` keeps: thread id → messages (OpenAI's shape), with a use
/// counter for eviction.
#[derive(Default)]
pub struct Threads {
    // A std Mutex: held only to clone or extend a message list, never across an await.
    inner: Mutex<ThreadMap>,
}

/// Thread id → (last use, messages), and the use clock.
type ThreadMap = (HashMap<String, (u64, Vec<Value>)>, u64);

impl Threads {
    fn get(&self, id: &str) -> Option<Vec<Value>> {
        let mut guard = self.inner.lock().expect("threads");
        let (map, clock) = &mut *guard;
        *clock += 1;
        let now = *clock;
        map.get_mut(id).map(|(used, messages)| {
            *used = now;
            messages.clone()
        })
    }

    fn put(&self, id: String, messages: Vec<Value>) {
        let mut guard = self.inner.lock().expect("threads");
        let (map, clock) = &mut *guard;
        *clock += 1;
        if !map.contains_key(&id) && map.len() >= MAX_THREADS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(id, (*clock, messages));
    }
}

fn thread_id() -> String {
    format!(
        "thread_{:016x}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The request in OpenAI's fields, the thread's history, and where to keep the result.
struct Translated {
    openai: Value,
    messages: Vec<Value>,
    thread: Option<String>,
    stream: bool,
    model: String,
}

fn translate(state: &AppState, served: &Served, body: &Value) -> Result<Translated, ApiError> {
    let model = served.name.clone();
    let input = body
        .get("input")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("input", "`input` must be a string"))?;
    if body
        .get("integrations")
        .and_then(Value::as_array)
        .is_some_and(|i| !i.is_empty())
    {
        return Err(ApiError::invalid(
            "integrations",
            "plugins and MCP servers are not supported: use tools through /v1/chat/completions, or the server-side shell",
        ));
    }
    let loaded = &served.loaded;
    if let Some(asked) = body.get("context_length").and_then(Value::as_u64) {
        if asked > u64::from(loaded.info.n_ctx_seq) {
            return Err(ApiError::invalid(
                "context_length",
                format!(
                    "`context_length` {asked} is more than this server's {} tokens per sequence",
                    loaded.info.n_ctx_seq
                ),
            ));
        }
    }
    // LM Studio's `reasoning` setting, as the template's variables: `enable_thinking` (Qwen,
    // SmolLM3, GLM) and `reasoning_effort` (gpt-oss).
    let mut template_kwargs = Map::new();
    let mut reasoning_effort = None;
    match body.get("reasoning") {
        None | Some(Value::Null) => {}
        Some(Value::String(setting)) => {
            let known = ["off", "on", "low", "medium", "high"];
            if !known.contains(&setting.as_str()) {
                return Err(ApiError::invalid(
                    "reasoning",
                    format!("`reasoning` must be off, on, low, medium or high; got {setting:?}"),
                ));
            }
            let thinks = loaded.template.source().contains("think")
                || loaded.template.source().contains("reasoning_effort");
            if setting != "off" && !thinks {
                return Err(ApiError::invalid(
                    "reasoning",
                    format!("this model does not support the reasoning setting \"{setting}\""),
                ));
            }
            template_kwargs.insert("enable_thinking".into(), json!(setting != "off"));
            if ["low", "medium", "high"].contains(&setting.as_str()) {
                reasoning_effort = Some(setting.clone());
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "reasoning",
                "`reasoning` must be a string",
            ))
        }
    }
    let store = body.get("store").and_then(Value::as_bool).unwrap_or(true);
    let mut messages = match body.get("thread_id").and_then(Value::as_str) {
        Some(id) => state.lmstudio_threads().get(id).ok_or_else(|| {
            ApiError::invalid("thread_id", format!("no thread {id} on this server"))
        })?,
        None => Vec::new(),
    };
    if let Some(system) = body.get("system_prompt").and_then(Value::as_str) {
        messages.retain(|m| m["role"] != "system");
        messages.insert(0, json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": input}));
    let mut openai = Map::new();
    openai.insert("model".into(), json!(model));
    openai.insert("messages".into(), Value::Array(messages.clone()));
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repeat_penalty"),
        ("max_output_tokens", "max_tokens"),
    ] {
        if let Some(value) = body.get(from).filter(|v| !v.is_null()) {
            openai.insert(to.into(), value.clone());
        }
    }
    if !template_kwargs.is_empty() {
        openai.insert(
            "chat_template_kwargs".into(),
            Value::Object(template_kwargs),
        );
    }
    if let Some(effort) = reasoning_effort {
        openai.insert("reasoning_effort".into(), json!(effort));
    }
    let thread = store.then(|| {
        body.get("thread_id")
            .and_then(Value::as_str)
            .map_or_else(thread_id, str::to_owned)
    });
    Ok(Translated {
        openai: Value::Object(openai),
        messages,
        thread,
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        model,
    })
}

/// The final result, as `chat.end` and the non-streamed body carry it: the reasoning and the
/// message as output items.
fn result(model: &str, reply: &Said, stats: &GenerationStats, thread: Option<&str>) -> Value {
    let timings = Timings::from(stats);
    let mut output = Vec::new();
    if !reply.reasoning.is_empty() {
        output.push(json!({"type": "reasoning", "content": reply.reasoning}));
    }
    output.push(json!({"type": "message", "content": reply.content}));
    let mut out = json!({
        "model_instance_id": model,
        "output": output,
        "stats": {
            "input_tokens": stats.prompt_tokens,
            "total_output_tokens": stats.generated_tokens,
            "reasoning_output_tokens": 0,
            "tokens_per_second": timings.predicted_per_second,
            "time_to_first_token_seconds": (stats.queue_ms + stats.prompt_ms) / 1e3,
        },
    });
    if let Some(thread) = thread {
        out["thread_id"] = json!(thread);
    }
    out
}

/// What the model said: its reasoning and its message.
#[derive(Default)]
struct Said {
    reasoning: String,
    content: String,
}

/// Keeps the thread: the reply's message, never its reasoning.
fn keep(state: &AppState, request: &Translated, content: &str) {
    if let Some(thread) = &request.thread {
        let mut messages = request.messages.clone();
        messages.push(json!({"role": "assistant", "content": content}));
        state.lmstudio_threads().put(thread.clone(), messages);
    }
}

pub async fn chat(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let name = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?;
    let served = state.model(name).await?;
    let request = translate(&state, &served, &body)?;
    let authenticated = authenticated.map(|Extension(a)| a);
    let started = start_chat(&state, &request_id, authenticated.as_ref(), &request.openai).await?;
    if started.shell {
        return Err(ApiError::invalid(
            "sandbox",
            "the server-side shell loop is not available through /api/v1/chat; use /api/v0/chat/completions",
        ));
    }
    if !request.stream {
        let done = started.replies.collect().await?;
        let reply = Said {
            reasoning: done[0].message.reasoning.clone().unwrap_or_default(),
            content: done[0].text().to_owned(),
        };
        keep(&state, &request, &reply.content);
        return Ok(Json(result(
            &request.model,
            &reply,
            &done[0].finish.stats,
            request.thread.as_deref(),
        ))
        .into_response());
    }
    let (tx, rx) = mpsc::channel::<Event>(64);
    let keep_alive = state.config().sse_keep_alive;
    tokio::spawn(forward(state, request, started.replies, tx));
    Ok(super::super::sse::body(rx, keep_alive))
}

fn named(kind: &str, mut data: Value) -> Event {
    data["type"] = json!(kind);
    Event::default().event(kind).data(data.to_string())
}

/// Which part of the reply the stream is in: LM Studio opens and closes each.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Prompt,
    Reasoning,
    Message,
}

async fn forward(
    state: AppState,
    request: Translated,
    mut replies: Replies,
    tx: mpsc::Sender<Event>,
) {
    let send = |event: Event| {
        let tx = tx.clone();
        async move { tx.send(event).await.is_ok() }
    };
    if !send(named(
        "chat.start",
        json!({"model_instance_id": request.model}),
    ))
    .await
        || !send(named("prompt_processing.start", json!({}))).await
    {
        return;
    }
    let mut said = Said::default();
    let mut part = Part::Prompt;
    let began = Instant::now();
    // The events that close `part` and open `next`.
    let switch = |part: Part, next: Part| {
        let mut out = Vec::new();
        if part != next {
            out.push(match part {
                Part::Prompt => named("prompt_processing.end", json!({})),
                Part::Reasoning => named("reasoning.end", json!({})),
                Part::Message => named("message.end", json!({})),
            });
            match next {
                Part::Reasoning => out.push(named("reasoning.start", json!({}))),
                Part::Message => out.push(named("message.start", json!({}))),
                Part::Prompt => {}
            }
        }
        out
    };
    loop {
        let next = tokio::select! {
            // The client hung up: dropping the reply cancels the sequence.
            _ = tx.closed() => return,
            next = replies.next() => next,
        };
        let (events, next_part) = match next {
            Some((_, ReplyEvent::Reasoning(piece))) => {
                said.reasoning.push_str(&piece);
                let delta = named("reasoning.delta", json!({"content": piece}));
                (vec![delta], Part::Reasoning)
            }
            Some((_, ReplyEvent::Content(piece))) => {
                said.content.push_str(&piece);
                let delta = named("message.delta", json!({"content": piece}));
                (vec![delta], Part::Message)
            }
            Some((_, ReplyEvent::Finish(finish))) => {
                let mut events = switch(part, Part::Message);
                keep(&state, &request, &said.content);
                let thread = request.thread.as_deref();
                let result = result(&request.model, &said, &finish.stats, thread);
                events.push(named("message.end", json!({})));
                events.push(named("chat.end", json!({"result": result})));
                for event in events {
                    if !send(event).await {
                        return;
                    }
                }
                return;
            }
            Some((_, ReplyEvent::Error(error))) => {
                let kind = match error {
                    ApiError::InvalidRequest { .. } => "invalid_request",
                    _ => "internal_error",
                };
                let message = error.to_string();
                let _ = send(named(
                    "error",
                    json!({"error": {"type": kind, "message": message}}),
                ))
                .await;
                // The result of what was generated, as LM Studio still sends it.
                let stats = GenerationStats {
                    generation_ms: began.elapsed().as_secs_f64() * 1e3,
                    ..GenerationStats::default()
                };
                let result = result(&request.model, &said, &stats, None);
                let _ = send(named("chat.end", json!({"result": result}))).await;
                return;
            }
            None => return,
            Some(_) => continue,
        };
        let mut out = switch(part, next_part);
        part = next_part;
        out.extend(events);
        for event in out {
            if !send(event).await {
                return;
            }
        }
    }
}
