//! The sandbox as an MCP server at `/mcp` (MCP's streamable HTTP transport, served by the
//! official Rust SDK, `rmcp`): the tools `shell`, `read_file`, `write_file` and `list_dir`, each
//! call one audited sandbox command in the caller's tenant.
//!
//! Mounted only with `serve --sandbox`, behind the key and the `sandbox` scope like
//! `/v1/sandbox/exec` (401/403 before any work). The tenant is the key, and the
//! `x-sandbox-session` header names a session within it (the exec route's `session` rules). The
//! audit's lines carry the HTTP request's id and the MCP session id. `Host` and `Origin` are
//! checked by the router's guard in front (`origin`), so rmcp's own host check is off.

mod tools;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
    ServerConfig, Tool, ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use serde_json::{json, Value};

use super::auth::{Authenticated, RequestId};
use super::keys::Scope;
use crate::sandbox::{validate_session, Caller, Sandbox, SandboxError};

/// The header that names a tenant session within the key.
pub const SESSION_HEADER: &str = "x-sandbox-session";
/// How often a running command reports progress (its output since the last report) to a client
/// that asked for it.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The `/mcp` service over `sandbox`.
pub fn service(
    sandbox: Sandbox,
    keep_alive: Duration,
) -> StreamableHttpService<SandboxServer, LocalSessionManager> {
    let config = StreamableHttpServerConfig::default()
        .with_sse_keep_alive(Some(keep_alive))
        .disable_allowed_hosts();
    StreamableHttpService::new(
        move || {
            Ok(SandboxServer {
                sandbox: sandbox.clone(),
            })
        },
        Arc::new(LocalSessionManager::default()),
        config,
    )
}

/// One MCP session's server.
#[derive(Clone)]
pub struct SandboxServer {
    sandbox: Sandbox,
}

fn tool_error(argument: &str, message: &str) -> CallToolResponse {
    let mut result = CallToolResult::structured_error(json!({
        "error": message, "argument": argument,
    }));
    result.content = vec![ContentBlock::text(format!("{argument}: {message}"))];
    result.into()
}

/// Who is calling, from the HTTP request the call came in: the key (the route's layers put it
/// there), the request id, the MCP session and the tenant session the headers name.
/// A refusal: the argument (or header) at fault, and why.
type Refusal = (&'static str, String);

fn caller(context: &RequestContext<RoleServer>) -> Result<Caller, Refusal> {
    let Some(parts) = context.extensions.get::<axum::http::request::Parts>() else {
        return Err(("request", "the call did not come over HTTP".into()));
    };
    let Some(key) = parts.extensions.get::<Authenticated>() else {
        let why = "the sandbox needs a key with the sandbox permission";
        return Err(("key", why.into()));
    };
    if let Err(e) = key.require(Scope::Sandbox) {
        return Err(("key", e.to_string()));
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let session = header(SESSION_HEADER);
    if let Some(session) = &session {
        if let Err(e) = validate_session(session) {
            return Err((SESSION_HEADER, e));
        }
    }
    let request_id = parts
        .extensions
        .get::<RequestId>()
        .map(|RequestId(id)| id.clone())
        .unwrap_or_default();
    // The audit line's request id says which MCP session and call it was.
    let request_id = match header("mcp-session-id") {
        Some(mcp) => format!("{request_id} mcp:{mcp}:{}", context.id),
        None => format!("{request_id} mcp::{}", context.id),
    };
    Ok(Caller {
        request_id,
        key_id: Some(key.key_id.clone()),
        session,
        max_sessions: key.sandbox_sessions,
    })
}

impl ServerHandler for SandboxServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "lm-sandbox",
                crate::build_info::VERSION,
            ))
            .with_instructions(
                "Tools that run in an isolated Linux sandbox (no network; /workspace persists \
                 between calls for your key). Use `shell` for commands, `read_file`, \
                 `write_file` and `list_dir` for files in /workspace.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tools = tools::definitions(self.sandbox.limits())
            .into_iter()
            .map(|def| {
                let schema = match def.schema {
                    Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                };
                let annotations = ToolAnnotations::with_title(def.title)
                    .read_only(def.read_only)
                    .destructive(!def.read_only)
                    .idempotent(def.read_only)
                    .open_world(false);
                Tool::new(def.name, def.description, Arc::new(schema))
                    .with_title(def.title)
                    .with_annotations(annotations)
            })
            .collect();
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let name = request.name.to_string();
        let args = request.arguments.clone().unwrap_or_default();
        let planned = match tools::plan(&name, &args, self.sandbox.limits()) {
            Ok(planned) => planned,
            Err(bad) if bad.argument == "name" => {
                return Err(McpError::invalid_params(
                    bad.message,
                    Some(json!({"argument": "name"})),
                ))
            }
            Err(bad) => return Ok(tool_error(&bad.argument, &bad.message)),
        };
        let caller = match caller(&context) {
            Ok(caller) => caller,
            Err((argument, why)) => return Ok(tool_error(argument, &why)),
        };
        let mut request = planned.request;
        // `notifications/cancelled` (or the client going away) stops the command; its audit
        // `end` line says `cancelled`.
        request.cancel = Some(context.ct.clone());
        let progress = context.meta.get_progress_token();
        let live = progress
            .as_ref()
            .map(|_| Arc::new(crate::sandbox::output::LiveOutput::default()));
        request.live = live.clone();
        let run = self.sandbox.run(request, &caller);
        tokio::pin!(run);
        let began = Instant::now();
        let mut ticks =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let result = loop {
            tokio::select! {
                result = &mut run => break result,

                _ = ticks.tick(), if progress.is_some() => {
                    let token = progress.clone().expect("checked");
                    let elapsed = began.elapsed().as_secs_f64();
                    // The output since the last notification, or how long it has run.
                    let (new, _) = live.as_ref().map(|l| l.take()).unwrap_or_default();
                    let message = if new.is_empty() {
                        format!("running for {elapsed:.0} s")
                    } else {
                        new
                    };
                    let param = ProgressNotificationParam::new(token, elapsed).with_message(message);
                    // Ignored error: a client that stopped listening still gets its answer.
                    let _ = context.peer.notify_progress(param).await;
                }
            }
        };
        let out = match result {
            Ok(out) => out,
            Err(SandboxError::InvalidCommand(message)) => {
                return Ok(tool_error("command", &message))
            }
            Err(e) => {
                // The sandbox itself failed (busy, unreachable, audit): the call's error, not
                // the protocol's.
                let mut result = CallToolResult::error(vec![ContentBlock::text(e.to_string())]);
                result.structured_content = Some(json!({"error": e.to_string()}));
                return Ok(result.into());
            }
        };
        let (structured, is_error) = tools::result(&planned.kind, &out);
        let text = tools::text(&planned.kind, &structured);
        let mut result = if is_error {
            CallToolResult::structured_error(structured)
        } else {
            CallToolResult::structured(structured)
        };
        result.content = vec![ContentBlock::text(text)];
        Ok(result.into())
    }
}
