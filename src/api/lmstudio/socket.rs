//! The transport of LM Studio's SDK protocol: `GET /lmstudio-greeting`, the websocket upgrade
//! of each namespace (`/llm`, `/embedding`, `/system`, …), the first message that authenticates,
//! and the calls and channels of an authenticated socket (their meaning is `sdk`'s).
//!
//! What a socket may hold, since the SDK authenticates only inside the socket:
//! - Every socket holds one of `--max-websockets` permits for its life. At most
//!   [`MAX_UNAUTHENTICATED`] of them may be waiting for their first message; a new one beyond that
//!   closes the oldest waiting one (a real client sends its passkey at once, so it is never the
//!   oldest for long).
//! - Before the passkey, the socket reads at most [`FIRST_MESSAGE_BYTES`] (the bytes are counted
//!   under the websocket parser, so a larger first message is never buffered) within
//!   [`FIRST_MESSAGE_DEADLINE`]; then the socket is closed.
//! - After it, messages up to [`MAX_MESSAGE_BYTES`]; at most [`MAX_CALLS`] calls and
//!   [`MAX_CHANNELS`] channels at once (more are answered with `rpcError` / `channelError`); a
//!   `channelCreate` that reuses an open channel's id ends the earlier channel first.
//! - Every call and channel is a task of the socket's `JoinSet`s: the socket closing aborts them,
//!   which drops their event receivers and so cancels their generations (invariant 6).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::super::auth::Authenticated;
use super::super::error::ApiError;
use super::super::extract::check_json_shape;
use super::super::state::AppState;
use super::protocol::{error, Channel};
use super::sdk::{rpc, run_channel};

/// The namespaces the SDK opens a websocket for.
const NAMESPACES: [&str; 6] = [
    "llm",
    "embedding",
    "system",
    "files",
    "repository",
    "diagnostics",
];

/// Largest message an authenticated client may send (a long chat history).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Bytes a socket may send before its passkey was accepted (the first message and its framing).
pub const FIRST_MESSAGE_BYTES: usize = 64 * 1024;

/// Time a socket gets to send its first message.
pub const FIRST_MESSAGE_DEADLINE: Duration = Duration::from_secs(10);

/// Sockets waiting for their first message at once.
pub const MAX_UNAUTHENTICATED: usize = 16;

/// Calls (`rpcCall`) one socket may have running at once.
pub const MAX_CALLS: usize = 32;

/// Channels (`channelCreate`) one socket may have open at once.
pub const MAX_CHANNELS: usize = 16;

/// Messages queued for one socket's writer.
const OUTBOX: usize = 256;

/// The parser's read buffer: small, so an idle socket costs little.
const READ_BUFFER_BYTES: usize = 8 * 1024;

pub fn routes() -> Router<AppState> {
    let mut router = Router::new().route("/lmstudio-greeting", get(greeting));
    for namespace in NAMESPACES {
        router = router.route(&format!("/{namespace}"), get(upgrade));
    }
    router
}

async fn greeting() -> Json<Value> {
    Json(json!({"lmstudio": true}))
}

/// The websocket handshake (RFC 6455), by hand so that the stream under the parser can be
/// metered before the passkey (axum's upgrade fixes one message size for the socket's life).
async fn upgrade(State(state): State<AppState>, request: Request) -> Response {
    let namespace = request.uri().path().trim_start_matches('/').to_owned();
    let Some(accept) = handshake_accept(request.headers()) else {
        return ApiError::invalid(
            "upgrade",
            "this path takes a websocket upgrade (LM Studio's SDK protocol)",
        )
        .into_response();
    };
    let Some(permit) = state.try_open_websocket() else {
        let limit = state.config().max_websockets;
        tracing::warn!(limit, "refused a websocket: too many open");
        if let Some(metrics) = state.metrics() {
            metrics.shed("websockets");
        }
        return ApiError::Unavailable(format!(
            "{limit} websockets are open (--max-websockets); retry later"
        ))
        .into_response();
    };
    let upgraded = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgraded.await else {
            return;
        };
        serve(state, namespace, TokioIo::new(upgraded), permit).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `Sec-WebSocket-Accept` for a valid upgrade request, or `None`.
fn handshake_accept(headers: &HeaderMap) -> Option<HeaderValue> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has(header::CONNECTION, "upgrade")
        || !has(header::UPGRADE, "websocket")
        || headers.get(header::SEC_WEBSOCKET_VERSION)? != "13"
    {
        return None;
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    HeaderValue::from_str(&accept).ok()
}

/// A stream that errors once more than its budget was read; the budget is lifted
/// (`usize::MAX`) once the socket authenticated.
struct Metered<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let budget = self.budget.load(Ordering::Acquire);
        if budget == 0 {
            return Poll::Ready(Err(std::io::Error::other(
                "the first message is over its size limit",
            )));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if budget != usize::MAX {
            let read = buf.filled().len() - before;
            // Ignored result: lifted meanwhile (`usize::MAX`) is left as it is.
            let _ = self
                .budget
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                    (b != usize::MAX).then(|| b.saturating_sub(read))
                });
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The text of a data message; `None` for control frames.
fn text_of(message: Message) -> Option<Result<String, ()>> {
    match message {
        Message::Text(text) => Some(Ok(text.to_string())),
        Message::Binary(bytes) => Some(Ok(String::from_utf8_lossy(&bytes).into_owned())),
        Message::Close(_) => Some(Err(())),
        _ => None,
    }
}

/// One socket: authenticate, then serve calls and channels until the client goes.
async fn serve<S>(state: AppState, namespace: String, io: S, _permit: OwnedSemaphorePermit)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let budget = Arc::new(AtomicUsize::new(FIRST_MESSAGE_BYTES));
    let metered = Metered {
        inner: io,
        budget: Arc::clone(&budget),
    };
    let mut config = WebSocketConfig::default();
    config.read_buffer_size = READ_BUFFER_BYTES;
    config.max_message_size = Some(MAX_MESSAGE_BYTES);
    config.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let socket = WebSocketStream::from_raw_socket(metered, Role::Server, Some(config)).await;
    let (mut sink, mut stream) = socket.split();
    let (out, mut outbox) = mpsc::channel::<Value>(OUTBOX);
    let writer = tokio::spawn(async move {
        while let Some(message) = outbox.recv().await {
            if sink
                .send(Message::Text(message.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = sink.close().await;
    });

    // The first message, within its deadline and size, unless a newer socket needs the room.
    let (ticket, evicted) = state.waiting_sockets().enter();
    let evicted = async {
        // `Err`: the ticket left the queue, which only happens below.
        if evicted.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let first = async {
        loop {
            match stream.next().await {
                Some(Ok(message)) => match text_of(message) {
                    Some(Ok(text)) => return Some(text),
                    Some(Err(())) => return None,
                    None => continue,
                },
                _ => return None,
            }
        }
    };
    let first = tokio::select! {
        first = tokio::time::timeout(FIRST_MESSAGE_DEADLINE, first) => first.ok().flatten(),
        _ = evicted => None,
    };
    // It has spoken (or is gone): no longer among the waiting.
    drop(ticket);
    let caller = match first.as_deref().map(|text| check_auth(&state, text)) {
        Some(Ok(caller)) => {
            budget.store(usize::MAX, Ordering::Release);
            let _ = out.send(json!({"success": true})).await;
            caller
        }
        Some(Err(reason)) => {
            let _ = out
                .send(json!({"success": false, "error": error(reason, None)}))
                .await;
            drop(out);
            let _ = writer.await;
            return;
        }
        None => {
            drop(out);
            writer.abort();
            return;
        }
    };

    let mut calls: JoinSet<()> = JoinSet::new();
    let mut channels: JoinSet<()> = JoinSet::new();
    let mut open: HashMap<u64, AbortHandle> = HashMap::new();
    loop {
        let message = tokio::select! {
            message = stream.next() => message,
            Some(_) = calls.join_next(), if !calls.is_empty() => continue,
            Some(_) = channels.join_next(), if !channels.is_empty() => {
                open.retain(|_, task| !task.is_finished());
                continue;
            }
        };
        let text = match message {
            Some(Ok(message)) => match text_of(message) {
                Some(Ok(text)) => text,
                Some(Err(())) => break,
                None => continue,
            },
            _ => break,
        };
        if let Err(e) = check_json_shape(text.as_bytes()) {
            let warning = json!({"type": "communicationWarning", "warning": e.to_string()});
            let _ = out.send(warning).await;
            continue;
        }
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            let warning =
                json!({"type": "communicationWarning", "warning": "a message that is not JSON"});
            let _ = out.send(warning).await;
            continue;
        };
        match message["type"].as_str() {
            Some("rpcCall") => {
                let call_id = message["callId"].clone();
                if calls.len() >= MAX_CALLS {
                    let error = error(
                        format!("{MAX_CALLS} calls are running on this socket; wait for one"),
                        None,
                    );
                    let _ = out
                        .send(json!({"type": "rpcError", "callId": call_id, "error": error}))
                        .await;
                    continue;
                }
                let (state, out, namespace, caller) = (
                    state.clone(),
                    out.clone(),
                    namespace.clone(),
                    caller.clone(),
                );
                let scope = caller.clone();
                calls.spawn(super::super::auth::as_caller(scope, async move {
                    let endpoint = message["endpoint"].as_str().unwrap_or_default();
                    let parameter = message.get("parameter").unwrap_or(&Value::Null);
                    let reply = match rpc(&state, &caller, &namespace, endpoint, parameter).await {
                        Ok(Value::Null) => json!({"type": "rpcResult", "callId": call_id}),
                        Ok(result) => {
                            json!({"type": "rpcResult", "callId": call_id, "result": result})
                        }
                        Err(error) => {
                            json!({"type": "rpcError", "callId": call_id, "error": error})
                        }
                    };
                    let _ = out.send(reply).await;
                }));
            }
            Some("channelCreate") => {
                let Some(id) = message["channelId"].as_u64() else {
                    continue;
                };
                open.retain(|_, task| !task.is_finished());
                // A reused id ends the earlier channel: no generation outlives its channel.
                if let Some(earlier) = open.remove(&id) {
                    earlier.abort();
                }
                let channel = Channel::new(id, out.clone());
                if open.len() >= MAX_CHANNELS {
                    let error = error(
                        format!("{MAX_CHANNELS} channels are open on this socket; close one"),
                        None,
                    );
                    channel.fail(error).await;
                    continue;
                }
                let endpoint = message["endpoint"].as_str().unwrap_or_default().to_owned();
                let parameter = message
                    .get("creationParameter")
                    .cloned()
                    .unwrap_or(Value::Null);
                let task = channels.spawn(super::super::auth::as_caller(
                    caller.clone(),
                    run_channel(
                        state.clone(),
                        caller.clone(),
                        namespace.clone(),
                        endpoint,
                        parameter,
                        channel,
                    ),
                ));
                open.insert(id, task);
            }
            Some("channelSend") => {
                // The only message a client sends on a channel is `cancel`: stopping the task
                // drops its receivers, which cancels the generation.
                let id = message["channelId"].as_u64().unwrap_or_default();
                if message["message"]["type"] == "cancel" {
                    if let Some(task) = open.remove(&id) {
                        task.abort();
                        let _ = out
                            .send(json!({"type": "channelClose", "channelId": id}))
                            .await;
                    }
                }
            }
            _ => {
                let warning = json!({"type": "communicationWarning",
                                     "warning": format!("unknown message type {}", message["type"])});
                let _ = out.send(warning).await;
            }
        }
    }
    // The client is gone: its calls and channels (and their generations) end with it.
    calls.abort_all();
    channels.abort_all();
    drop(out);
    let _ = writer.await;
}

/// The first message: `{authVersion, clientIdentifier, clientPasskey}`; with keys set, the passkey
/// must be one of them.
fn check_auth(state: &AppState, text: &str) -> Result<Authenticated, String> {
    let message: Value = serde_json::from_str(text)
        .map_err(|_| "the first message must be JSON: {clientIdentifier, clientPasskey}")?;
    let identifier = message["clientIdentifier"].as_str();
    let passkey = message["clientPasskey"].as_str();
    let (Some(_), Some(passkey)) = (identifier, passkey) else {
        return Err(
            "the first message must authenticate: {clientIdentifier, clientPasskey}".into(),
        );
    };
    state
        .keys()
        .authenticate(Some(passkey))
        .map_err(|_| "Incorrect API key provided (pass it as the client passkey)".into())
}
