//! `ApiError`: every failure the HTTP layer can answer, mapped to a status and OpenAI's error body
//! `{"error":{"message","type","param","code"}}` with all four keys present.
//!
//! A client's mistake is never a 5xx: the OpenAI SDKs retry 5xx, multiplying the work.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Seconds a client is told to wait after a 429 for a full queue.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A malformed, mistyped or out-of-range request. `param` names the field.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context of {n_ctx} tokens per sequence")]
    ContextLengthExceeded {
        prompt_tokens: usize,
        max_tokens: u32,
        n_ctx: u32,
    },
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A valid key that lacks a permission.
    #[error("{0}")]
    Forbidden(String),
    /// A request a browser page may not make: an `Origin` or `Host` outside the allowlists.
    #[error("{message}")]
    NotAllowedFrom { message: String, code: &'static str },
    /// The key's own rate (`requests_per_minute`) is spent.
    #[error("Rate limit reached for this API key ({what}); retry after {retry_after} s")]
    RateLimited {
        retry_after: u64,
        what: &'static str,
    },
    #[error("The model `{0}` does not exist")]
    ModelNotFound(String),
    /// A stored object (a response) that does not exist, or not for this key. `param` names the
    /// field that named it, if a field did.
    #[error("{message}")]
    NotFound {
        message: String,
        param: Option<&'static str>,
    },
    #[error("Unknown route {method} {path}")]
    RouteNotFound { method: String, path: String },
    #[error("Method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("The request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within `--body-timeout`.
    #[error("The request body did not arrive within {seconds} s")]
    BodyTimeout { seconds: f64 },
    #[error("The server is busy: the request queue is full; retry after {RETRY_AFTER_SECS} s")]
    QueueFull,
    #[error("Loading model")]
    Loading,
    /// The model exists but is not loaded, and this server does not load on demand.
    #[error("{0}")]
    ModelNotLoaded(String),
    /// The model could not be loaded (a corrupt file, no memory left for it, a timeout).
    #[error("{0}")]
    ModelLoadFailed(String),
    #[error("The model is unavailable: {0}")]
    Unavailable(String),
    /// The sandbox cannot be reached, or the connection broke mid-command.
    #[error("{0}")]
    SandboxUnavailable(String),
    /// Every sandbox slot stayed taken past the queue deadline, or the tenant cap is reached.
    #[error("{0}")]
    SandboxBusy(String),
    /// The audit log cannot be written, so no command runs (fail closed).
    #[error("{0}")]
    AuditUnavailable(String),
    /// The server is at its cap of requests in flight (`--max-in-flight`): shed, retry later.
    #[error(
        "The server is busy: {limit} requests are in flight; retry after {RETRY_AFTER_SECS} s"
    )]
    Overloaded { limit: usize },
    /// The engine failed while this request was pending (a fault on its thread); it is reloading.
    #[error("The engine failed: {0}")]
    EngineFailed(String),
    /// A server fault: the only 5xx that is not about availability.
    #[error("Internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 for a numeric field outside its range: names the field, the limit and the value.
    pub fn out_of_range(param: &str, limit: &str, value: impl std::fmt::Display) -> Self {
        Self::invalid(param, format!("`{param}` must be {limit}; got {value}"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } | Self::ContextLengthExceeded { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::NotAllowedFrom { .. } => StatusCode::FORBIDDEN,
            Self::ModelNotFound(_)
            | Self::ModelNotLoaded(_)
            | Self::RouteNotFound { .. }
            | Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::QueueFull | Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Loading
            | Self::ModelLoadFailed(_)
            | Self::Unavailable(_)
            | Self::SandboxUnavailable(_)
            | Self::SandboxBusy(_)
            | Self::AuditUnavailable(_)
            | Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) | Self::EngineFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code` for this error.
    fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { code, .. } => ("invalid_request_error", *code),
            Self::ContextLengthExceeded { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            Self::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            Self::Forbidden(_) => ("permission_error", Some("insufficient_permissions")),
            Self::NotAllowedFrom { code, .. } => ("permission_error", Some(*code)),
            Self::RateLimited { .. } => ("rate_limit_error", Some("rate_limit_exceeded")),
            Self::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            Self::NotFound { .. } => ("invalid_request_error", Some("not_found")),
            Self::RouteNotFound { .. } => ("invalid_request_error", Some("unknown_url")),
            Self::MethodNotAllowed { .. } => ("invalid_request_error", Some("method_not_allowed")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            Self::BodyTimeout { .. } => ("invalid_request_error", Some("request_timeout")),
            Self::QueueFull => ("rate_limit_error", Some("queue_full")),
            Self::Loading => ("unavailable_error", Some("model_loading")),
            Self::ModelNotLoaded(_) => ("invalid_request_error", Some("model_not_loaded")),
            Self::ModelLoadFailed(_) => ("unavailable_error", Some("model_load_failed")),
            Self::Unavailable(_) => ("unavailable_error", Some("model_unavailable")),
            Self::SandboxUnavailable(_) => ("unavailable_error", Some("sandbox_unavailable")),
            Self::SandboxBusy(_) => ("unavailable_error", Some("sandbox_busy")),
            Self::AuditUnavailable(_) => ("unavailable_error", Some("audit_unavailable")),
            Self::Overloaded { .. } => ("unavailable_error", Some("server_overloaded")),
            Self::EngineFailed(_) => ("server_error", Some("engine_failed")),
            Self::Internal(_) => ("server_error", None),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::ContextLengthExceeded { .. } => Some("messages"),
            Self::ModelNotFound(_) | Self::ModelNotLoaded(_) => Some("model"),
            Self::NotFound { param, .. } => *param,
            _ => None,
        }
    }

    /// The JSON body, also used in-band in an SSE stream.
    pub fn body(&self) -> ErrorBody<'_> {
        let (kind, code) = self.kind();
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param: self.param(),
                code,
            },
        }
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(err: crate::registry::RegistryError) -> Self {
        use crate::registry::RegistryError as E;
        match err {
            E::NotFound(name) => Self::ModelNotFound(name),
            E::Ambiguous(message) => Self::invalid("model", message),
            e @ E::NotLoaded { .. } => Self::ModelNotLoaded(e.to_string()),
            // Any client may be told a load failed; only the logs say where the file is.
            e @ (E::LoadFailed { .. } | E::LoadTimeout { .. }) => {
                Self::ModelLoadFailed(super::redact::paths(&e.to_string()))
            }
            E::Closed => Self::Unavailable("the server is shutting down".into()),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<&'a str>,
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Self::RateLimited { retry_after, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        } else if matches!(
            self,
            Self::QueueFull | Self::Overloaded { .. } | Self::SandboxBusy(_)
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}
