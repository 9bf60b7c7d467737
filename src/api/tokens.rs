//! llama-server's token and template routes: `POST /tokenize`, `POST /detokenize`,
//! `POST /apply-template`, and the token count of a chat request without running it,
//! `POST /v1/chat/completions/input_tokens`. Tokenizing runs on the blocking pool.

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{parse, JsonObject};
use super::prompt::tokenize_off_runtime;
use super::state::AppState;
use crate::engine::Token;

/// Most tokens `/tokenize` returns with their pieces (each piece is an object of its own); token
/// ids alone are 4 bytes each and bounded by the body.
pub const MAX_PIECES: usize = 1 << 18;

#[derive(Debug, Deserialize)]
struct TokenizeBody {
    content: String,
    /// Add BOS (and the like) as the model wants (llama-server's default: no).
    #[serde(default)]
    add_special: bool,
    /// Each token with its text: a string, or its bytes when they are not valid UTF-8 alone.
    #[serde(default)]
    with_pieces: bool,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DetokenizeBody {
    tokens: Vec<i64>,
    model: Option<String>,
}

pub async fn tokenize(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let body: TokenizeBody = parse(&body)?;
    let loaded = state.model_or_default(body.model.as_deref()).await?.loaded;
    let tokens = tokenize_off_runtime(loaded.clone(), body.content, body.add_special).await?;
    if !body.with_pieces {
        return Ok(Json(json!({ "tokens": tokens })));
    }
    if tokens.len() > MAX_PIECES {
        return Err(ApiError::invalid(
            "with_pieces",
            format!(
                "{} tokens is more than the limit of {MAX_PIECES} with `with_pieces`; \
                 tokenize less text at a time",
                tokens.len()
            ),
        ));
    }
    let pieces = tokio::task::spawn_blocking(move || {
        tokens
            .iter()
            .map(|&id| {
                let piece = match String::from_utf8(loaded.info.tokenizer.piece(id)) {
                    Ok(text) => json!(text),
                    Err(e) => json!(e.into_bytes()),
                };
                json!({"id": id, "piece": piece})
            })
            .collect::<Vec<Value>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the tokenizer task failed: {e}")))?;
    Ok(Json(json!({ "tokens": pieces })))
}

pub async fn detokenize(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let body: DetokenizeBody = parse(&body)?;
    let loaded = state.model_or_default(body.model.as_deref()).await?.loaded;
    let n_vocab = i64::from(loaded.info.n_vocab);
    let tokens: Vec<Token> = body
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if (0..n_vocab).contains(&t) {
                Ok(t as Token)
            } else {
                Err(ApiError::invalid(
                    format!("tokens[{i}]"),
                    format!("token ids must be between 0 and {}; got {t}", n_vocab - 1),
                ))
            }
        })
        .collect::<Result<_, _>>()?;
    let content = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        for t in tokens {
            bytes.extend(loaded.info.tokenizer.piece(t));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the tokenizer task failed: {e}")))?;
    Ok(Json(json!({ "content": content })))
}

/// The prompt a chat request renders to (llama-server's `/apply-template`).
pub async fn apply_template(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let (prompt, _) = super::chat::render_request(&state, &body).await?;
    Ok(Json(json!({ "prompt": prompt })))
}

/// How many prompt tokens a chat request would take, without running it.
pub async fn input_tokens(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let (_, tokens) = super::chat::render_request(&state, &body).await?;
    Ok(Json(json!({
        "object": "chat.completion.input_tokens",
        "input_tokens": tokens.len(),
    })))
}
