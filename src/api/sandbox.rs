//! `POST /v1/sandbox/exec`: run one shell command in the sandbox.
//!
//! The route exists only when the server runs with `--sandbox`, and only a key allowed to use the
//! sandbox may call it (the server refuses to start `--sandbox` without such a key). A command that
//! fails or times out is a 200 carrying that result; bad input is a 400; a sandbox that cannot be
//! reached within the connect timeout is a 503.

use std::time::Duration;

use axum::extract::State;
use axum::{Extension, Json};
use serde::Deserialize;

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::{parse, JsonObject};
use super::keys::Scope;
use super::state::AppState;
use crate::sandbox::{
    validate_command, validate_session, Caller, ExecOutput, ExecRequest, SandboxError,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: String,
    timeout_s: Option<f64>,
    stdin: Option<String>,
    /// A tenant of its own within the key (default: the key's one tenant).
    session: Option<String>,
}

pub async fn exec(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Json<ExecOutput>, ApiError> {
    let Some(sandbox) = state.sandbox() else {
        // The route is only mounted with a sandbox; answer as if it were not there.
        return Err(ApiError::RouteNotFound {
            method: "POST".into(),
            path: "/v1/sandbox/exec".into(),
        });
    };
    let Some(Extension(key)) = authenticated else {
        return Err(ApiError::Unauthorized(
            "Missing API key: the sandbox always needs `Authorization: Bearer KEY`",
        ));
    };
    key.require(Scope::Sandbox)?;
    let body: ExecBody = parse(&body)?;
    validate_command(&body.command).map_err(|e| ApiError::invalid("command", e.to_string()))?;
    let limits = sandbox.limits();
    let timeout = match body.timeout_s {
        None => limits.default_timeout,
        Some(t) if t.is_finite() && t > 0.0 && t <= limits.max_timeout.as_secs_f64() => {
            Duration::from_secs_f64(t)
        }
        Some(t) => {
            return Err(ApiError::out_of_range(
                "timeout_s",
                &format!(
                    "greater than 0 and at most {}",
                    limits.max_timeout.as_secs_f64()
                ),
                t,
            ))
        }
    };
    let request = ExecRequest {
        command: body.command,
        timeout,
        stdin: body.stdin.map(String::into_bytes),
        cancel: None,
        live: None,
    };
    if let Some(session) = &body.session {
        validate_session(session).map_err(|e| ApiError::invalid("session", e))?;
    }
    let caller = Caller {
        request_id,
        key_id: Some(key.key_id),
        session: body.session,
        max_sessions: key.sandbox_sessions,
    };
    match sandbox.run(request, &caller).await {
        Ok(out) => Ok(Json(out)),
        Err(SandboxError::InvalidCommand(message)) => Err(ApiError::invalid("command", message)),
        Err(e @ SandboxError::Busy(_)) => Err(ApiError::SandboxBusy(e.to_string())),
        Err(e @ SandboxError::AuditFailed(_)) => Err(ApiError::AuditUnavailable(e.to_string())),
        Err(e) => Err(ApiError::SandboxUnavailable(e.to_string())),
    }
}
