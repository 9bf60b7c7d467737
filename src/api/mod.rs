//! The HTTP layer: OpenAI-compatible and Ollama routes over an [`EngineHandle`].
//!
//! Owns: routing, request parsing and validation, OpenAI's response and error shapes, SSE, API keys.
//! Must not: touch llama.cpp or block the runtime; it talks to the engine only through its handle
//! (bounded `try_send` in, a per-request event channel out).
//!
//! Every route answers with and without the `/v1` prefix, as llama-server does.

mod anthropic;
pub mod auth;
mod chat;
mod completions;
mod embeddings;
pub mod error;
mod extract;
mod generate;
mod inputs;
pub mod keys;
mod limits;
mod lmstudio;
mod logprobs;
mod mcp;
mod model_facts;
mod models;
mod ollama;
pub mod origin;
mod params;
mod prompt;
mod redact;
mod reply;
mod responses;
mod sandbox;
mod shell_loop;
mod sse;
mod state;
mod tokens;
pub mod unproven;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;

pub use error::ApiError;
pub use extract::MAX_BODY_BYTES;
pub use keys::{ApiKey, Scope, Scopes};
pub use origin::BrowserPolicy;
pub use state::{ApiConfig, AppState, Loaded, PlacementView, Served};

/// `err`, or 401 first on a keyed server when the key is wrong: no route probing without a key.
fn unless_unauthorized(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    err: ApiError,
) -> ApiError {
    match state.keys().authenticate(auth::bearer(headers)) {
        Ok(_) => err,
        Err(unauthorized) => unauthorized,
    }
}

async fn route_not_found(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    method: Method,
    uri: Uri,
) -> ApiError {
    let path = uri.path().to_owned();
    let method = method.to_string();
    unless_unauthorized(&state, &headers, ApiError::RouteNotFound { method, path })
}

async fn method_not_allowed(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    method: Method,
    uri: Uri,
) -> ApiError {
    let path = uri.path().to_owned();
    let method = method.to_string();
    unless_unauthorized(
        &state,
        &headers,
        ApiError::MethodNotAllowed { method, path },
    )
}

/// Routes that need a key with `scope` (when the server has keys): the key and scope are checked
/// from the head, then an in-flight permit is taken and the body read (`limits::bound`), then the
/// handler runs. Layers added later wrap earlier ones, so they run in the reverse order here.
fn keyed(routes: Router<AppState>, scope: Scope, state: &AppState) -> Router<AppState> {
    routes
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::bound,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            scope,
            auth::require_scope,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ))
}

/// The whole HTTP surface. Outermost first: metrics, request id, the browser guard (`Host`,
/// `Origin`), CORS, then per route group the key, its scope, the in-flight permit and body
/// deadline, and the handler. `/health`, a public `/metrics` and LM Studio's SDK sockets (which
/// authenticate inside the socket) have no key layer.
pub fn router(state: AppState) -> Router {
    let mut inference = Router::new()
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/apply-template", post(tokens::apply_template));
    let mut admin = Router::new();
    let mut sandbox = None;
    for prefix in ["/v1", ""] {
        inference = inference
            .route(
                &format!("{prefix}/chat/completions"),
                post(chat::chat_completions),
            )
            .route(
                &format!("{prefix}/chat/completions/input_tokens"),
                post(tokens::input_tokens),
            )
            .route(
                &format!("{prefix}/completions"),
                post(completions::completions),
            )
            .route(
                &format!("{prefix}/embeddings"),
                post(embeddings::embeddings),
            )
            .route(&format!("{prefix}/models"), get(models::list))
            .route(&format!("{prefix}/models/{{*id}}"), get(models::get))
            .route(&format!("{prefix}/placement"), get(models::placement));
        admin = admin
            .route(&format!("{prefix}/models/load"), post(models::load))
            .route(&format!("{prefix}/models/unload"), post(models::unload))
            .route(&format!("{prefix}/models/rescan"), post(models::rescan));
        if state.sandbox().is_some() {
            sandbox = Some(
                sandbox
                    .unwrap_or_else(Router::new)
                    .route(&format!("{prefix}/sandbox/exec"), post(sandbox::exec)),
            );
        }
    }
    let inference = inference
        .merge(ollama::routes())
        .merge(lmstudio::routes())
        .merge(responses::routes());
    let admin = admin.merge(lmstudio::admin_routes());
    let mut open = Router::new().route("/health", get(models::health));
    let messages = keyed(anthropic::routes(), Scope::Inference, &state)
        .layer(axum::middleware::from_fn(anthropic::errors));
    let mut router = Router::new()
        .merge(keyed(inference, Scope::Inference, &state))
        .merge(messages)
        .merge(keyed(admin, Scope::Models, &state));
    if let Some(mut sandbox) = sandbox {
        if let Some(tools) = state.sandbox() {
            let service = mcp::service(tools.clone(), state.config().sse_keep_alive);
            sandbox = sandbox.route_service("/mcp", service);
        }
        router = router.merge(keyed(sandbox, Scope::Sandbox, &state));
    }
    if state.config().metrics {
        let metrics = Router::new().route("/metrics", get(models::metrics));
        if state.config().metrics_public {
            open = open.merge(metrics);
        } else {
            router = router.merge(keyed(metrics, Scope::Metrics, &state));
        }
    }
    let sdk = lmstudio::sdk_routes().layer(axum::middleware::from_fn_with_state(
        state.clone(),
        limits::bound,
    ));
    router
        .merge(open)
        .merge(sdk)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(origin::cors())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            origin::guard,
        ))
        .layer(axum::middleware::from_fn(auth::request_id))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::connection,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            models::track,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
