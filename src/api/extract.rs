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
