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
use futures::StreamExt;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use super::super::auth::{Authenticated, RequestId};
use super::super::chat::{start_chat, ChatStart, StartedChat};
use super::super::error::ApiError;
use super::super::extract::JsonObject;
use super::super::generate::{self, merged};
use super::super::{AppState, Served};
use crate::engine::{GenerationEvent, GenerationStats};

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
    match body.get("reasoning").and_then(Value::as_str) {
        None | Some("off") => {}
        Some(_) if loaded.template.source().contains("think") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "reasoning",
                format!("this model does not support the reasoning setting \"{other}\""),
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

/// The final result, as `chat.end` and the non-streamed body carry it.
fn result(model: &str, text: &str, stats: &GenerationStats, thread: Option<&str>) -> Value {
    let timings = generate::Timings::from(stats);
    let mut out = json!({
        "model_instance_id": model,
        "output": [{"type": "message", "content": text}],
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

fn keep(state: &AppState, request: &Translated, text: &str) {
    if let Some(thread) = &request.thread {
        let mut messages = request.messages.clone();
        messages.push(json!({"role": "assistant", "content": text}));
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
    let StartedChat {
        options, receivers, ..
    } = match start_chat(&state, &request_id, authenticated.as_ref(), &request.openai).await? {
        ChatStart::Generation(started) => started,
        ChatStart::Loop(..) => {
            return Err(ApiError::invalid(
                "sandbox",
                "the server-side shell loop is not available through /api/v1/chat; use /api/v0/chat/completions",
            ))
        }
    };
    if !request.stream {
        let done = generate::collect(receivers, options.grammar_param).await?;
        let text = &done[0].text;
        keep(&state, &request, text);
        return Ok(Json(result(
            &request.model,
            text,
            &done[0].stats,
            request.thread.as_deref(),
        ))
        .into_response());
    }
    let (tx, rx) = mpsc::channel::<Event>(64);
    let keep_alive = state.config().sse_keep_alive;
    tokio::spawn(forward(
        state,
        request,
        receivers,
        options.grammar_param,
        tx,
    ));
    Ok(super::super::sse::body(rx, keep_alive))
}

fn named(kind: &str, mut data: Value) -> Event {
    data["type"] = json!(kind);
    Event::default().event(kind).data(data.to_string())
}

async fn forward(
    state: AppState,
    request: Translated,
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
    grammar_param: &'static str,
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
    let mut events = merged(receivers);
    let mut text = String::new();
    let mut started = false;
    let began = Instant::now();
    loop {
        let next = tokio::select! {
            // The client hung up: dropping `events` cancels the sequence.
            _ = tx.closed() => return,
            next = events.next() => next,
        };
        match next {
            Some((_, GenerationEvent::Logprobs(_))) => {}
            Some((_, GenerationEvent::Text(piece))) => {
                if !started {
                    started = true;
                    if !send(named("prompt_processing.end", json!({}))).await
                        || !send(named("message.start", json!({}))).await
                    {
                        return;
                    }
                }
                text.push_str(&piece);
                if !send(named("message.delta", json!({"content": piece}))).await {
                    return;
                }
            }
            Some((_, GenerationEvent::Done { stats, .. })) => {
                if !started {
                    let _ = send(named("prompt_processing.end", json!({}))).await;
                    let _ = send(named("message.start", json!({}))).await;
                }
                keep(&state, &request, &text);
                let result = result(&request.model, &text, &stats, request.thread.as_deref());
                let _ = send(named("message.end", json!({}))).await;
                let _ = send(named("chat.end", json!({"result": result}))).await;
                return;
            }
            other => {
                let (kind, message) = match other {
                    Some((_, GenerationEvent::Rejected(m))) => (
                        "invalid_request",
                        ApiError::invalid(grammar_param, m).to_string(),
                    ),
                    Some((_, GenerationEvent::Failed(m))) => {
                        ("internal_error", ApiError::EngineFailed(m).to_string())
                    }
                    _ => ("internal_error", generate::ENGINE_STOPPED.to_owned()),
                };
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
                let result = result(&request.model, &text, &stats, None);
                let _ = send(named("chat.end", json!({"result": result}))).await;
                return;
            }
        }
    }
}
