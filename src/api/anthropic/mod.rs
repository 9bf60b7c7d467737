//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`): what
//! Claude Code and the `anthropic` SDKs speak (`ANTHROPIC_BASE_URL`).
//!
//! A request becomes an OpenAI chat body once (`translate`) and runs through `chat::start_chat_as`
//! like every dialect (`max_tokens` a cap: Claude Code asks for 32,000 whatever the model); its reply stream is shaped into a Message or Anthropic's event sequence
//! (`stream`). Errors are `{"type":"error","error":{"type","message"}}` with Anthropic's types and
//! statuses — those of the layers in front (key, rate, size, load) as well, rewritten by
//! [`errors`]. Keys come as `x-api-key` or `Authorization: Bearer`; `anthropic-version` and
//! `anthropic-beta` are accepted and not needed.

mod error;
mod stream;
mod translate;

pub use error::errors;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde_json::json;

use super::auth::{Authenticated, RequestId};
use super::extract::JsonObject;
use super::state::AppState;
use error::AnthropicError;

/// The Messages routes (keyed by the caller, with `/v1` and without).
pub fn routes() -> Router<AppState> {
    let mut router = Router::new();
    for prefix in ["/v1", ""] {
        router = router
            .route(&format!("{prefix}/messages"), post(messages))
            .route(
                &format!("{prefix}/messages/count_tokens"),
                post(count_tokens),
            );
    }
    router
}

async fn messages(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, AnthropicError> {
    let request = translate::messages(&body, false)?;
    let authenticated = authenticated.map(|Extension(a)| a);
    let started = super::chat::start_chat_as(
        &state,
        &request_id,
        authenticated.as_ref(),
        &request.openai,
        super::chat::Budget::UpTo,
    )
    .await?;
    let keep_alive = state.config().sse_keep_alive;
    let answer = stream::Answer {
        model: request.model,
        stops: request.stops,
        keep_alive,
    };
    Ok(stream::respond(answer, request.stream, started).await)
}

/// `POST /v1/messages/count_tokens`: the input tokens the same request would have, rendered
/// exactly as a real one (its tools included).
async fn count_tokens(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, AnthropicError> {
    let request = translate::messages(&body, true)?;
    let (_, tokens) = super::chat::render_request(&state, &request.openai).await?;
    Ok(Json(json!({"input_tokens": tokens.len()})).into_response())
}
