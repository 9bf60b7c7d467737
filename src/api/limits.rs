//! What one client can hold of the server: a cap on requests in flight (more are shed at once with
//! 503 and `Retry-After`, and counted), and a deadline for a request's whole body, so a client that
//! trickles bytes cannot keep a request, and its permit, forever. The header deadline is the
//! connection's (`server.rs`); this is the body's.
//!
//! A permit is held until the response is sent: for a stream, until its last byte (or until the
//! client goes away and the body is dropped).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body::Body as _;
use tokio::sync::OwnedSemaphorePermit;

use super::error::ApiError;
use super::extract::MAX_BODY_BYTES;
use super::state::AppState;

/// Paths never shed: a monitor must be able to see an overloaded server.
const NEVER_SHED: &[&str] = &["/health", "/metrics"];

/// The middleware: permit, body within its deadline, then the handler.
pub async fn bound(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if NEVER_SHED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let Some(permit) = state.try_begin_request() else {
        let limit = state.config().max_in_flight;
        tracing::warn!(limit, "shed a request: too many in flight");
        if let Some(metrics) = state.metrics() {
            metrics.shed("overloaded");
        }
        return ApiError::Overloaded { limit }.into_response();
    };
    let (parts, body) = request.into_parts();
    let deadline = state.config().body_timeout;
    let bytes =
        match tokio::time::timeout(deadline, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
            Err(_) => {
                return ApiError::BodyTimeout {
                    seconds: deadline.as_secs_f64(),
                }
                .into_response()
            }
            Ok(Err(err)) if is_length_limit(&err) => {
                return ApiError::PayloadTooLarge {
                    limit: MAX_BODY_BYTES,
                }
                .into_response()
            }
            Ok(Err(err)) => {
                return ApiError::invalid("body", format!("cannot read the request body: {err}"))
                    .into_response()
            }
            Ok(Ok(bytes)) => bytes,
        };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    hold_until_sent(response, permit)
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A body already in memory releases the permit now; a stream carries it to its end.
fn hold_until_sent(response: Response, permit: OwnedSemaphorePermit) -> Response {
    if response.body().size_hint().exact().is_some() {
        return response;
    }
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        // Moved in, so the permit lives exactly as long as the stream.
        let _held = &permit;
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}
