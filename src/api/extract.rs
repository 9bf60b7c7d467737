//! Request body parsing that turns every client mistake into a 400 naming the field.
//!
//! Bodies are read once into a `serde_json::Value`; each request type is then deserialized from it
//! with `serde_path_to_error`, so a wrong type says which field (`messages[2].content`) it was.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// Largest request body accepted; a larger one is a 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Deepest nesting of arrays and objects a body may have (tool schemas nest a dozen deep).
pub const MAX_JSON_DEPTH: usize = 64;

/// Most values (array elements and object members) a body may hold: a million token ids or
/// embedding inputs. A parsed value costs tens of bytes per element whatever its text costs, so a
/// 16 MiB body of `[0,0,…]` would otherwise become hundreds of megabytes.
pub const MAX_JSON_ELEMENTS: usize = 1 << 20;

/// Refuses JSON text nested deeper than [`MAX_JSON_DEPTH`] or holding more than
/// [`MAX_JSON_ELEMENTS`] values, by a scan of its bytes before anything is parsed.
pub fn check_json_shape(bytes: &[u8]) -> Result<(), ApiError> {
    let (mut depth, mut elements, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                elements += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(ApiError::invalid(
                        "body",
                        format!("the body nests deeper than the limit of {MAX_JSON_DEPTH}"),
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => elements += 1,
            _ => continue,
        }
        if elements > MAX_JSON_ELEMENTS {
            return Err(ApiError::invalid(
                "body",
                format!("the body holds more than the limit of {MAX_JSON_ELEMENTS} values"),
            ));
        }
    }
    Ok(())
}

/// A request body that is a JSON object.
pub struct JsonObject(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                }
            } else {
                ApiError::invalid("body", format!("cannot read the request body: {rejection}"))
            }
        })?;
        check_json_shape(&bytes)?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidRequest {
                message: format!("The request body is not valid JSON: {e}"),
                param: None,
                code: Some("invalid_json"),
            })?;
        if !value.is_object() {
            return Err(ApiError::InvalidRequest {
                message: "The request body must be a JSON object".into(),
                param: None,
                code: Some("invalid_json"),
            });
        }
        Ok(Self(value))
    }
}

/// Deserializes `T` from `body`, naming the offending field on failure.
pub fn parse<T: DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        if path == "." {
            // A missing field at the top level: serde names it in the message.
            let param = inner
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_owned);
            ApiError::InvalidRequest {
                message: format!("Invalid request: {inner}"),
                param,
                code: None,
            }
        } else {
            ApiError::InvalidRequest {
                message: format!("Invalid value for `{path}`: {inner}"),
                param: Some(path),
                code: None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_or_wide_bodies_are_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        let err = check_json_shape(deep.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("limit of 64"), "{err}");
        assert!(
            check_json_shape(format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes()).is_ok()
        );
        let wide = format!("[{}0]", "0,".repeat(MAX_JSON_ELEMENTS));
        let err = check_json_shape(wide.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("values"), "{err}");
        // Brackets and commas inside strings are text, escaped quotes included.
        let text = format!(
            "{{\"a\": \"{}\\\"{}\"}}",
            "[".repeat(100),
            ",".repeat(MAX_JSON_ELEMENTS + 5)
        );
        assert!(check_json_shape(text.as_bytes()).is_ok(), "{}", &text[..40]);
    }
}
