//! Ollama's API (`/api/*`, `GET /`): what Open WebUI, Continue and the `ollama` libraries speak.
//!
//! Requests are translated into the OpenAI chat/completion fields once (`translate`), validated
//! and run by the same code as the OpenAI routes (`chat::start_chat`, `generate::submit`), and
//! their events shaped into Ollama's NDJSON stream or single object (`stream`). Errors are
//! `{"error": "…"}` with the status the OpenAI routes would use, before output, and a final
//! `{"error": …}` line after it. Model facts (`/api/tags`, `/api/show`, `/api/ps`) come from the
//! GGUF header (`models`).
//!
//! Must not: run anything the OpenAI routes do not (one validation, one scheduler path).

mod models;
mod stream;
mod translate;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde_json::{json, Value};

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::JsonObject;
use super::keys::Scope;
use super::state::AppState;

/// The Ollama API version this server answers as (`GET /api/version`): the API surface it
/// implements, not a build of Ollama.
pub const OLLAMA_VERSION: &str = "0.12.6";

/// An [`ApiError`] in Ollama's shape: `{"error": "…"}` with the same status.
pub struct OllamaError(pub ApiError);

impl From<ApiError> for OllamaError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        let message = self.0.to_string();
        // The OpenAI response carries the status and headers (Retry-After) to keep.
        let openai = self.0.into_response();
        let mut out = (openai.status(), Json(json!({"error": message}))).into_response();
        for (name, value) in openai.headers() {
            if name != axum::http::header::CONTENT_TYPE
                && name != axum::http::header::CONTENT_LENGTH
            {
                out.headers_mut().insert(name.clone(), value.clone());
            }
        }
        out
    }
}

/// Ollama's routes, merged into the main router (and served alone on `--ollama-port`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(root).head(root))
        .route("/api/version", get(version))
        .route("/api/tags", get(models::tags))
        .route("/api/show", post(models::show))
        .route("/api/ps", get(models::ps))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embeddings_legacy))
        .route("/api/pull", post(models::pull))
        .route("/api/push", post(not_here))
        .route("/api/create", post(not_here))
        .route("/api/copy", post(not_here))
        .route("/api/delete", delete(not_here))
}

async fn root() -> &'static str {
    "Ollama is running"
}

async fn version() -> Json<Value> {
    Json(json!({"version": OLLAMA_VERSION}))
}

/// Model management this server does not do.
async fn not_here(uri: axum::http::Uri) -> OllamaError {
    OllamaError(ApiError::InvalidRequest {
        message: format!(
            "{} is not supported: lm-sandbox serves the GGUF files it was started with and never \
             creates, copies, deletes or uploads models (add one with `lm-sandbox serve -m FILE`)",
            uri.path()
        ),
        param: None,
        code: Some("unsupported"),
    })
}

async fn chat(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, OllamaError> {
    let caller = authenticated
        .as_ref()
        .map_or_else(Authenticated::keyless, |Extension(a)| a.clone());
    let (name, keep) = translate::target(&body)?;
    if translate::unload_only(&body, "messages") {
        return unload(&state, &caller, &name, "chat").await;
    }
    let at = std::time::Instant::now();
    let num_ctx = translate::num_ctx(&body)?;
    let served = with_context(&state, &caller, &name, keep, num_ctx).await?;
    let started = stream::Began::new(at, std::time::Instant::now());
    let request = translate::chat(&served, &body)?;
    if let Some(done) = request.load_only {
        return Ok(stream::load_answer(&request.model, done, "chat"));
    }
    let authenticated = authenticated.map(|Extension(a)| a);
    let chat =
        super::chat::start_chat(&state, &request_id, authenticated.as_ref(), &request.openai)
            .await?;
    Ok(stream::respond(
        stream::Kind::Chat,
        request.model,
        request.stream,
        chat,
        started,
    )
    .await)
}

async fn generate(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, OllamaError> {
    let caller = authenticated.map_or_else(Authenticated::keyless, |Extension(a)| a);
    let (name, keep) = translate::target(&body)?;
    if translate::unload_only(&body, "prompt") {
        return unload(&state, &caller, &name, "generate").await;
    }
    let at = std::time::Instant::now();
    let num_ctx = translate::num_ctx(&body)?;
    let served = with_context(&state, &caller, &name, keep, num_ctx).await?;
    let started = stream::Began::new(at, std::time::Instant::now());
    let request = translate::generate(&served, &body)?;
    if let Some(done) = request.load_only {
        return Ok(stream::load_answer(&request.model, done, "generate"));
    }
    let chat = translate::start_generate(&state, &request_id, &request).await?;
    Ok(stream::respond(
        stream::Kind::Generate,
        request.model,
        request.stream,
        chat,
        started,
    )
    .await)
}

/// The model, loaded with at least `num_ctx` tokens per sequence (up to its trained context):
/// reloaded with a larger context when it has less, as Ollama does. A reload takes the `models`
/// scope (it stops every other client's requests on that model).
async fn with_context(
    state: &AppState,
    caller: &Authenticated,
    name: &str,
    keep: Option<crate::registry::KeepAlive>,
    num_ctx: Option<u32>,
) -> Result<super::state::Served, ApiError> {
    let served = state.model_keep(name, keep).await?;
    let Some(asked) = num_ctx else {
        return Ok(served);
    };
    let info = &served.loaded.info;
    let want = asked.min(info.n_ctx_train.max(info.n_ctx_seq));
    if want <= info.n_ctx_seq {
        return Ok(served);
    }
    if !caller.may(Scope::Models) {
        return Err(ApiError::Forbidden(format!(
            "`options.num_ctx` {asked} would reload the model (it serves {} tokens per sequence): \
             this API key lacks the `models` scope",
            info.n_ctx_seq
        )));
    }
    tracing::info!(
        key = %caller.key_id,
        model = served.id(),
        num_ctx = asked,
        n_ctx_seq = info.n_ctx_seq,
        "reloading with a larger context"
    );
    let id = served.id().to_owned();
    drop(served);
    state.registry().grow_context(&id, want).await?;
    state.forget_unloaded();
    state.model_keep(name, keep).await
}

/// `keep_alive: 0` with nothing to generate: the model is unloaded (Ollama's way to free it),
/// with the `models` scope.
async fn unload(
    state: &AppState,
    caller: &Authenticated,
    name: &str,
    kind: &str,
) -> Result<Response, OllamaError> {
    caller.require(Scope::Models)?;
    tracing::info!(key = %caller.key_id, model = name, "unload (Ollama keep_alive 0)");
    state
        .registry()
        .unload(name)
        .await
        .map_err(ApiError::from)?;
    state.forget_unloaded();
    Ok(stream::load_answer(name, "unload", kind))
}

/// `POST /api/embed`: `input` a string or strings; `truncate` (default true) is refused when it
/// would be needed — inputs are never silently cut.
async fn embed(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, OllamaError> {
    let started = std::time::Instant::now();
    let (model, openai) = translate::embed(&body, "input")?;
    let out = super::embeddings::run(&state, &openai).await?;
    let vectors: Vec<Value> = out.data.into_iter().map(Value::from).collect();
    Ok(Json(json!({
        "model": model,
        "embeddings": vectors,
        "total_duration": started.elapsed().as_nanos() as u64,
        "load_duration": 0,
        "prompt_eval_count": out.prompt_tokens,
    }))
    .into_response())
}

/// The legacy `POST /api/embeddings`: one `prompt`, one `embedding`.
async fn embeddings_legacy(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, OllamaError> {
    let (_, openai) = translate::embed(&body, "prompt")?;
    let out = super::embeddings::run(&state, &openai).await?;
    let first = out.data.into_iter().next().unwrap_or_default();
    Ok(Json(json!({"embedding": first})).into_response())
}
