//! Anthropic's error shape, `{"type":"error","error":{"type","message"}}`, and its statuses: for
//! the handlers' errors ([`AnthropicError`]) and for those the layers in front answer
//! ([`errors`]).

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::super::error::ApiError;

/// An [`ApiError`] in Anthropic's shape.
pub struct AnthropicError(pub ApiError);

impl From<ApiError> for AnthropicError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

/// Anthropic's status and error type for an answer with `status` (and OpenAI's `code`).
pub fn kind(status: StatusCode, code: Option<&str>) -> (StatusCode, &'static str) {
    // 529: Anthropic's "overloaded", which its SDKs retry.
    let overloaded = StatusCode::from_u16(529).expect("529 is a valid status");
    match status.as_u16() {
        400 | 408 | 405 => (status, "invalid_request_error"),
        401 => (status, "authentication_error"),
        403 => (status, "permission_error"),
        404 => (status, "not_found_error"),
        413 => (status, "request_too_large"),
        429 if code == Some("queue_full") => (overloaded, "overloaded_error"),
        429 => (status, "rate_limit_error"),
        503 => (overloaded, "overloaded_error"),
        _ => (status, "api_error"),
    }
}

/// Anthropic's error object.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Marks an answer already in Anthropic's shape.
#[derive(Clone, Copy)]
struct Shaped;

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        // As Anthropic words its own: the field first.
        let message = match &self.0 {
            ApiError::InvalidRequest {
                message,
                param: Some(param),
                ..
            } => format!("{param}: {message}"),
            other => other.to_string(),
        };
        let openai = self.0.body();
        let code = openai.error.code;
        // The OpenAI response carries the status and headers (Retry-After) to keep.
        let plain = self.0.clone().into_response();
        let (status, kind) = kind(plain.status(), code);
        let mut out = (status, Json(error_body(kind, &message))).into_response();
        for (name, value) in plain.headers() {
            if name != axum::http::header::CONTENT_TYPE
                && name != axum::http::header::CONTENT_LENGTH
            {
                out.headers_mut().insert(name.clone(), value.clone());
            }
        }
        out.extensions_mut().insert(Shaped);
        out
    }
}

/// The outer layer of the Messages routes: an error answered by a layer in front of the handler
/// (a missing key, a spent rate, an oversized body, a server at its cap) in Anthropic's shape.
pub async fn errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<Shaped>().is_some()
    {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error bodies are small; one that is not is passed on as it is.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (status, "").into_response();
    };
    let openai: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let message = openai
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error"))
        .to_owned();
    let code = openai.pointer("/error/code").and_then(Value::as_str);
    let (status, kind) = kind(status, code);
    let body = serde_json::to_vec(&error_body(kind, &message)).unwrap_or_default();
    parts.status = status;
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}
