//! `POST /v1/embeddings`: OpenAI's embeddings over the model's embedding context.
//!
//! `input` is a string, strings, token ids or lists of token ids; every input must fit the
//! embedding context (a 400 `context_length_exceeded` otherwise, never silent truncation). The
//! engine returns pooled vectors; this file truncates them to `dimensions`, L2-normalises them and
//! encodes them as floats or base64 (little-endian f32, as the OpenAI SDKs decode it).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{parse, JsonObject};
use super::inputs::{text_or_tokens, Input};
use super::state::AppState;
use crate::engine::SubmitError;

/// OpenAI's limit on inputs per request.
pub const MAX_INPUTS: usize = 2048;

/// Most numbers one answer may carry (inputs × dimensions): 2,048 inputs of a 1,024-wide model,
/// 512 of a 4,096-wide one. Each is ~20 bytes of JSON, so one small request cannot ask for
/// gigabytes.
pub const MAX_EMBEDDING_VALUES: usize = 1 << 21;

#[derive(Debug, Deserialize)]
struct EmbeddingFields {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

/// A 400 naming `input` when `inputs` vectors of `width` numbers exceed [`MAX_EMBEDDING_VALUES`].
fn check_answer_size(inputs: usize, width: usize) -> Result<(), ApiError> {
    if inputs.saturating_mul(width) <= MAX_EMBEDDING_VALUES {
        return Ok(());
    }
    Err(ApiError::invalid(
        "input",
        format!(
            "{inputs} inputs of {width} dimensions is more than the limit of \
             {MAX_EMBEDDING_VALUES} numbers per request: send at most {} inputs, or fewer \
             `dimensions`",
            MAX_EMBEDDING_VALUES / width.max(1)
        ),
    ))
}

/// Truncates to `dimensions` (when given) and scales to unit L2 length (a zero vector stays zero).
pub fn finish_vector(mut v: Vec<f32>, dimensions: Option<usize>) -> Vec<f32> {
    if let Some(d) = dimensions {
        v.truncate(d);
    }
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    v
}

/// Little-endian f32 bytes, base64: what the OpenAI SDKs decode.
pub fn base64_vector(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Finished vectors (truncated, normalised) of an embeddings request.
pub struct Embedded {
    pub model: String,
    pub data: Vec<Vec<f32>>,
    pub prompt_tokens: usize,
    pub base64: bool,
}

pub async fn embeddings(
    State(state): State<AppState>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let Embedded {
        model,
        data,
        prompt_tokens,
        base64,
    } = run(&state, &body).await?;
    let data: Vec<Value> = data
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                json!(base64_vector(&v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }))
    .into_response())
}

/// Validates an OpenAI embeddings body, runs it, and finishes the vectors (shared with Ollama's
/// `/api/embed`).
pub(super) async fn run(state: &AppState, body: &Value) -> Result<Embedded, ApiError> {
    let fields: EmbeddingFields = parse(body)?;
    let served = state.model(&fields.model).await?;
    let model = served.name.clone();
    let loaded = &served.loaded;
    let info = &loaded.info;
    let base64 = match fields.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`; got {other:?}"),
            ))
        }
    };
    let dimensions = match fields.dimensions {
        None => None,
        Some(d) if (1..=i64::from(info.n_embd)).contains(&d) => Some(d as usize),
        Some(d) => {
            return Err(ApiError::out_of_range(
                "dimensions",
                &format!("between 1 and the model's {}", info.n_embd),
                d,
            ))
        }
    };
    let given = text_or_tokens(&fields.input, "input", info.n_vocab, Some(MAX_INPUTS))?;
    check_answer_size(given.len(), dimensions.unwrap_or(info.n_embd as usize))?;
    let texts: Vec<Option<String>> = given
        .iter()
        .map(|i| match i {
            Input::Text(t) => Some(t.clone()),
            Input::Tokens(_) => None,
        })
        .collect();
    // Tokenizing many long inputs takes a while: on the blocking pool, all at once.
    let tokenizer = std::sync::Arc::clone(&info.tokenizer);
    let tokenized = tokio::task::spawn_blocking(move || {
        texts
            .into_iter()
            .map(|t| t.map(|t| tokenizer.tokenize(&t, true)))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the tokenizer task failed: {e}")))?;
    let mut token_lists = Vec::with_capacity(given.len());
    for (i, (input, tokens)) in given.into_iter().zip(tokenized).enumerate() {
        let tokens = match input {
            Input::Tokens(t) => t,
            Input::Text(_) => tokens.unwrap_or_default(),
        };
        let param = if fields.input.is_string() {
            "input".to_owned()
        } else {
            format!("input[{i}]")
        };
        if tokens.is_empty() {
            return Err(ApiError::invalid(param, "an input must not be empty"));
        }
        if tokens.len() > info.n_ctx_embed as usize {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "{param} has {} tokens, more than the embedding context of {} tokens; \
                     shorten or split it",
                    tokens.len(),
                    info.n_ctx_embed
                ),
                param: Some(param),
                code: Some("context_length_exceeded"),
            });
        }
        token_lists.push(tokens);
    }
    let prompt_tokens: usize = token_lists.iter().map(Vec::len).sum();
    let reply = served.engine.embed(token_lists).map_err(|err| match err {
        SubmitError::QueueFull => ApiError::QueueFull,
        SubmitError::Unavailable => ApiError::Unavailable(err.to_string()),
    })?;
    let vectors = reply
        .await
        .map_err(|_| {
            ApiError::EngineFailed("the engine stopped before the embeddings were made".into())
        })?
        .map_err(ApiError::EngineFailed)?;
    Ok(Embedded {
        model,
        data: vectors
            .into_iter()
            .map(|v| finish_vector(v, dimensions))
            .collect(),
        prompt_tokens,
        base64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_times_width_is_bounded() {
        assert!(check_answer_size(MAX_INPUTS, 1024).is_ok());
        assert!(check_answer_size(512, 4096).is_ok());
        let err = check_answer_size(MAX_INPUTS, 4096).unwrap_err();
        assert!(err.to_string().contains("at most 512 inputs"), "{err}");
        assert!(matches!(err, ApiError::InvalidRequest { param: Some(p), .. } if p == "input"));
    }

    #[test]
    fn vectors_are_truncated_then_unit_length() {
        let v = finish_vector(vec![3.0, 4.0, 12.0], Some(2));
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(finish_vector(vec![0.0, 0.0], None), vec![0.0, 0.0]);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_vector(&[1.0]), "AACAPw==");
    }
}
