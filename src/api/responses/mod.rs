//! OpenAI's Responses API: `POST /v1/responses` (what Codex CLI speaks), `GET` and `DELETE
//! /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `POST /v1/responses/input_tokens`.
//!
//! A request becomes an OpenAI chat body once (`translate`) and runs through `chat::start_chat`;
//! its reply stream is shaped into output items (`stream::Output`), streamed as Responses events
//! or answered whole. With `store` (the default) the response, its input items and the
//! conversation are kept (`store`), per key, so `previous_response_id` continues it server-side
//! (the same rendered prefix, so the engine's prefix cache reuses its tokens).

mod store;
mod stream;
mod translate;

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderValue;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

pub use store::{ResponseStore, Stored};

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::JsonObject;
use super::reply::{Finish, Reason, Replies, ReplyEvent};
use super::state::AppState;
use stream::Output;
use translate::Translated;

pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for prefix in ["/v1", ""] {
        router = router
            .route(&format!("{prefix}/responses"), post(create))
            .route(
                &format!("{prefix}/responses/input_tokens"),
                post(input_tokens),
            )
            .route(
                &format!("{prefix}/responses/{{id}}"),
                get(retrieve).delete(delete),
            )
            .route(
                &format!("{prefix}/responses/{{id}}/input_items"),
                get(input_items),
            );
    }
    router
}

fn owner(authenticated: &Option<Extension<Authenticated>>) -> Option<String> {
    authenticated.as_ref().map(|Extension(a)| a.key_id.clone())
}

fn not_found(id: &str, param: Option<&'static str>) -> ApiError {
    ApiError::NotFound {
        message: format!("No response found with id '{id}'"),
        param,
    }
}

/// The conversation a request continues (its previous response's, if any) with its own input,
/// and the chat body that runs it.
fn conversation(
    state: &AppState,
    request: &Translated,
    owner: Option<&str>,
) -> Result<(Vec<Value>, Value), ApiError> {
    let mut messages = match &request.previous {
        Some(id) => {
            let previous = state
                .responses()
                .get(id, owner)
                .ok_or_else(|| not_found(id, Some("previous_response_id")))?;
            previous.conversation.clone()
        }
        None => Vec::new(),
    };
    messages.extend(request.messages.iter().cloned());
    if messages.is_empty() {
        return Err(ApiError::invalid("input", "`input` must not be empty"));
    }
    let mut chat = Vec::with_capacity(messages.len() + 1);
    if let Some(instructions) = &request.instructions {
        chat.push(json!({"role": "system", "content": instructions}));
    }
    chat.extend(messages.iter().cloned());
    let mut body = request.openai.clone();
    body.insert("messages".into(), Value::Array(chat));
    Ok((messages, Value::Object(body)))
}

/// What a response object repeats: its id, time, model and the request's settings.
struct Meta {
    id: String,
    created_at: u64,
    model: String,
    echo: Map<String, Value>,
    store: bool,
}

impl Meta {
    /// The response object in `status`, with `output`, `usage` and `error` where known.
    fn object(&self, status: &str, output: &[Value], finish: Option<&Finish>) -> Value {
        let or = |field: &str, default: Value| match self.echo.get(field) {
            Some(Value::Null) | None => default,
            Some(value) => value.clone(),
        };
        let mut out = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": or("instructions", Value::Null),
            "max_output_tokens": or("max_output_tokens", Value::Null),
            "model": self.model,
            "output": output,
            "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
            "previous_response_id": or("previous_response_id", Value::Null),
            "reasoning": or("reasoning", json!({"effort": null, "summary": null})),
            "store": self.store,
            "temperature": or("temperature", json!(1.0)),
            "text": or("text", json!({"format": {"type": "text"}})),
            "tool_choice": or("tool_choice", json!("auto")),
            "tools": or("tools", json!([])),
            "top_p": or("top_p", json!(1.0)),
            "truncation": or("truncation", json!("disabled")),
            "usage": null,
            "user": or("user", Value::Null),
            "metadata": or("metadata", json!({})),
        });
        if let Some(finish) = finish {
            let usage = &finish.usage;
            out["usage"] = json!({
                "input_tokens": usage.prompt_tokens,
                "input_tokens_details": {"cached_tokens": usage.prompt_tokens_details.cached_tokens},
                "output_tokens": usage.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.total_tokens,
            });
            if finish.reason == Reason::Length {
                out["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
        }
        out
    }
}

/// Everything a finished response keeps.
struct Keep {
    owner: Option<String>,
    items: Vec<Value>,
    conversation: Vec<Value>,
}

async fn create(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let request = translate::request(&body)?;
    let owner = owner(&authenticated);
    let (conversation, chat) = conversation(&state, &request, owner.as_deref())?;
    let authenticated = authenticated.map(|Extension(a)| a);
    let started = super::chat::start_chat_as(
        &state,
        &request_id,
        authenticated.as_ref(),
        &chat,
        super::chat::Budget::UpTo,
    )
    .await?;
    let meta = Meta {
        id: super::generate::response_id("resp").replacen('-', "_", 1),
        created_at: super::generate::unix_now(),
        model: started.model.clone(),
        echo: request.echo.clone(),
        store: request.store,
    };
    let keep = request.store.then(|| Keep {
        owner,
        items: request.items.clone(),
        conversation,
    });
    let mut response = if request.stream {
        let (tx, rx) = mpsc::channel::<Event>(64);
        let keep_alive = state.config().sse_keep_alive;
        tokio::spawn(forward(state, meta, started.replies, keep, tx));
        super::sse::body(rx, keep_alive)
    } else {
        let mut output = Output::default();
        let mut replies = started.replies;
        let finish = loop {
            match replies.next().await {
                Some((_, ReplyEvent::Finish(finish))) => break finish,
                Some((_, ReplyEvent::Error(error))) => return Err(error),
                Some((_, event)) => {
                    output.event(event);
                }
                None => {
                    let stopped = super::reply::ENGINE_STOPPED.to_owned();
                    return Err(ApiError::EngineFailed(stopped));
                }
            }
        };
        output.event(ReplyEvent::Finish(finish));
        let object = finished(&state, &meta, &output, &finish, keep);
        Json(object).into_response()
    };
    if !request.skipped_tools.is_empty() {
        let warning = format!(
            "tools of type {} are skipped: this server runs function tools",
            request.skipped_tools.join(", ")
        );
        tracing::warn!(%warning, "responses request");
        if let Ok(value) = HeaderValue::from_str(&warning) {
            response.headers_mut().insert("x-lm-sandbox-warning", value);
        }
    }
    Ok(response)
}

/// The finished response object, kept when the request asked.
fn finished(
    state: &AppState,
    meta: &Meta,
    output: &Output,
    finish: &Finish,
    keep: Option<Keep>,
) -> Value {
    let status = if finish.reason == Reason::Length {
        "incomplete"
    } else {
        "completed"
    };
    let mut object = meta.object(status, &output.items, Some(finish));
    if !output.executions.is_empty() {
        object["sandbox_executions"] = json!(output.executions);
    }
    if let Some(keep) = keep {
        let mut conversation = keep.conversation;
        conversation.push(output.turn());
        state.responses().put(
            meta.id.clone(),
            Stored {
                owner: keep.owner,
                response: object.clone(),
                input_items: keep.items,
                conversation,
            },
        );
    }
    object
}

/// Streams the response's events, each with its `sequence_number`.
async fn forward(
    state: AppState,
    meta: Meta,
    mut replies: Replies,
    mut keep: Option<Keep>,
    tx: mpsc::Sender<Event>,
) {
    let mut sequence = 0u64;
    let mut stamp = |mut event: Value| {
        event["sequence_number"] = json!(sequence);
        sequence += 1;
        let kind = event["type"].as_str().unwrap_or("").to_owned();
        Event::default().event(kind).data(event.to_string())
    };
    let opening = meta.object("in_progress", &[], None);
    let created = stamp(json!({"type": "response.created", "response": opening}));
    let progress = stamp(json!({"type": "response.in_progress", "response": opening}));
    for event in [created, progress] {
        if tx.send(event).await.is_err() {
            return;
        }
    }
    let mut output = Output::default();
    loop {
        let next = tokio::select! {
            // The client hung up: dropping the reply cancels the generation.
            _ = tx.closed() => return,
            next = replies.next() => next,
        };
        let (events, last) = match next {
            None => return,
            Some((_, ReplyEvent::Finish(finish))) => {
                let mut events = output.event(ReplyEvent::Finish(finish));
                let object = finished(&state, &meta, &output, &finish, keep.take());
                let kind = if object["status"] == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(json!({"type": kind, "response": object}));
                (events, true)
            }
            Some((_, ReplyEvent::Error(error))) => {
                let message = error.to_string();
                let mut events = output.event(ReplyEvent::Error(error));
                let mut object = meta.object("failed", &output.items, None);
                object["error"] = json!({"code": "server_error", "message": message});
                events.push(json!({"type": "response.failed", "response": object}));
                (events, true)
            }
            Some((_, event)) => (output.event(event), false),
        };
        for event in events {
            if tx.send(stamp(event)).await.is_err() {
                return;
            }
        }
        if last {
            return;
        }
    }
}

async fn retrieve(
    State(state): State<AppState>,
    authenticated: Option<Extension<Authenticated>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = state
        .responses()
        .get(&id, owner(&authenticated).as_deref())
        .ok_or_else(|| not_found(&id, None))?;
    Ok(Json(stored.response.clone()).into_response())
}

async fn delete(
    State(state): State<AppState>,
    authenticated: Option<Extension<Authenticated>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !state
        .responses()
        .delete(&id, owner(&authenticated).as_deref())
    {
        return Err(not_found(&id, None));
    }
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

/// `input_items`' paging: `order` (`desc` by default, as OpenAI), `limit` (1–100, 20), `after`.
#[derive(Debug, Deserialize)]
struct Paging {
    order: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn input_items(
    State(state): State<AppState>,
    authenticated: Option<Extension<Authenticated>>,
    Path(id): Path<String>,
    Query(paging): Query<Paging>,
) -> Result<Response, ApiError> {
    let stored: Arc<Stored> = state
        .responses()
        .get(&id, owner(&authenticated).as_deref())
        .ok_or_else(|| not_found(&id, None))?;
    let limit = paging.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::out_of_range("limit", "between 1 and 100", limit));
    }
    let mut items: Vec<&Value> = stored.input_items.iter().collect();
    match paging.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(other) => {
            return Err(ApiError::invalid(
                "order",
                format!("`order` must be asc or desc; got {other:?}"),
            ))
        }
    }
    if let Some(after) = &paging.after {
        let at = items
            .iter()
            .position(|item| item["id"] == after.as_str())
            .ok_or_else(|| ApiError::invalid("after", format!("no input item {after}")))?;
        items.drain(..=at);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(json!({
        "object": "list",
        "data": items,
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
    }))
    .into_response())
}

/// `POST /v1/responses/input_tokens`: the input tokens the same request would have.
async fn input_tokens(
    State(state): State<AppState>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let request = translate::request(&body)?;
    let (_, chat) = conversation(&state, &request, owner(&authenticated).as_deref())?;
    let (_, tokens) = super::chat::render_request(&state, &chat).await?;
    Ok(
        Json(json!({"object": "response.input_tokens", "input_tokens": tokens.len()}))
            .into_response(),
    )
}
