//! OpenAI's "text or tokens" fields (completions' `prompt`, embeddings' `input`): a string, an
//! array of strings, an array of token ids, or an array of token-id arrays.

use serde_json::Value;

use super::error::ApiError;
use crate::engine::Token;

/// One entry as given: text to tokenize, or tokens.
pub enum Input {
    Text(String),
    Tokens(Vec<Token>),
}

/// Token ids in `0..n_vocab`; a bad one is a 400 naming `param[i]`.
fn token_list(items: &[Value], param: &str, n_vocab: i32) -> Result<Vec<Token>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_i64()
                .filter(|t| (0..i64::from(n_vocab)).contains(t))
                .map(|t| t as Token)
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("{param}[{i}]"),
                        format!(
                            "token ids must be integers between 0 and {}; got {item}",
                            n_vocab - 1
                        ),
                    )
                })
        })
        .collect()
}

/// The entries of field `param`, at most `max_entries` of them when given. The shape of the first
/// array element decides the shape of the rest.
pub fn text_or_tokens(
    value: &Value,
    param: &str,
    n_vocab: i32,
    max_entries: Option<usize>,
) -> Result<Vec<Input>, ApiError> {
    let shape_error = || {
        ApiError::invalid(
            param,
            format!("`{param}` must be a string, an array of strings, an array of token ids, or an array of token-id arrays"),
        )
    };
    let items = match value {
        Value::String(s) => return Ok(vec![Input::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::invalid(
                param,
                format!("`{param}` must not be empty"),
            ))
        }
        Value::Array(items) => items,
        _ => return Err(shape_error()),
    };
    if let Some(max) = max_entries.filter(|&max| items.len() > max) {
        return Err(ApiError::out_of_range(
            param,
            &format!("at most {max} entries"),
            items.len(),
        ));
    }
    match &items[0] {
        Value::String(_) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str()
                    .map(|s| Input::Text(s.to_owned()))
                    .ok_or_else(|| {
                        ApiError::invalid(
                            format!("{param}[{i}]"),
                            "expected a string like the first entry",
                        )
                    })
            })
            .collect(),
        Value::Number(_) => Ok(vec![Input::Tokens(token_list(items, param, n_vocab)?)]),
        Value::Array(_) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = format!("{param}[{i}]");
                let list = item.as_array().ok_or_else(shape_error)?;
                Ok(Input::Tokens(token_list(list, &at, n_vocab)?))
            })
            .collect(),
        _ => Err(shape_error()),
    }
}
