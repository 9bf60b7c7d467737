//! Who is asking, decided from the request head before anything is spent on it, and request ids.
//!
//! Keys: `Authorization: Bearer KEY` on every keyed route when keys are configured (the router
//! mounts `/health`, a public `/metrics` and LM Studio's SDK sockets, which authenticate inside
//! the socket, outside this layer). The key is checked before the body is read and before an
//! in-flight permit is taken, so a client without a key costs one parsed head: it gets 401 and
//! the connection is closed without reading its body. The matching key's [`Authenticated`] (id,
//! scopes) rides along in the request's extensions; [`require_scope`] guards each route group.
//! Request ids: every response carries `x-request-id`; handlers read the [`RequestId`] extension.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::keys::{ApiKey, Bucket, Scope, Scopes};
use super::state::AppState;

pub use super::keys::{key_id, keyed_id, load_key_id_secret};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// A configured key as the server holds it: the key, its id (computed once) and its request
/// bucket.
pub struct KeyEntry {
    pub key: ApiKey,
    pub id: String,
    requests: Option<Bucket>,
    /// Shared with the engine's usage sinks, which spend from it as sequences end.
    tokens: Option<Arc<Bucket>>,
}

/// The server's keys; empty: no key needed.
pub struct Keys(Vec<Arc<KeyEntry>>);

impl Keys {
    pub fn new(keys: &[ApiKey]) -> Self {
        Self(
            keys.iter()
                .map(|key| {
                    Arc::new(KeyEntry {
                        id: key.id(),
                        requests: key.limits.requests_per_minute.map(Bucket::new),
                        tokens: key
                            .limits
                            .tokens_per_minute
                            .map(|n| Arc::new(Bucket::new(n))),
                        key: key.clone(),
                    })
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Who `presented` is: the keyless caller on a server without keys, the matching key's
    /// caller, or an error for a wrong key. Compared against every key in time independent of
    /// where they differ.
    pub fn authenticate(&self, presented: Option<&str>) -> Result<Authenticated, ApiError> {
        if self.0.is_empty() {
            return Ok(Authenticated::keyless());
        }
        let Some(presented) = presented else {
            return Err(ApiError::Unauthorized(
                "Missing API key: send `Authorization: Bearer KEY`",
            ));
        };
        // Every key is compared, hit or not.
        let found = self.0.iter().fold(None, |found, entry| {
            if entry.key.matches(presented) {
                Some(entry)
            } else {
                found
            }
        });
        match found {
            Some(entry) => Ok(Authenticated::of(entry)),
            None => Err(ApiError::Unauthorized("Incorrect API key provided")),
        }
    }
}

/// The key a request presented, once it matched (or the keyless caller of a server without keys).
#[derive(Clone)]
pub struct Authenticated {
    pub key_id: String,
    pub scopes: Scopes,
    pub auto_shell: bool,
    /// Sandbox sessions the key may hold at once (`None`: the server's default).
    pub sandbox_sessions: Option<usize>,
    entry: Option<Arc<KeyEntry>>,
}

impl std::fmt::Debug for Authenticated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticated")
            .field("key_id", &self.key_id)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl Authenticated {
    /// Anyone, on a server without keys: everything but the sandbox (which needs a key).
    pub fn keyless() -> Self {
        Self {
            key_id: "keyless".into(),
            scopes: Scopes::KEYLESS,
            auto_shell: false,
            sandbox_sessions: None,
            entry: None,
        }
    }

    fn of(entry: &Arc<KeyEntry>) -> Self {
        Self {
            key_id: entry.id.clone(),
            scopes: entry.key.scopes,
            auto_shell: entry.key.auto_shell,
            sandbox_sessions: entry.key.limits.sandbox_sessions,
            entry: Some(Arc::clone(entry)),
        }
    }

    pub fn may(&self, scope: Scope) -> bool {
        self.scopes.contains(scope)
    }

    /// A 403 unless the caller has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.may(scope) {
            return Ok(());
        }
        Err(ApiError::Forbidden(match scope {
            Scope::Sandbox => "This API key may not run commands in the sandbox: it lacks the `sandbox` scope (see --sandbox-api-key, --keys-file)".into(),
            scope => format!(
                "This API key lacks the `{}` scope (see --keys-file)",
                scope.name()
            ),
        }))
    }

    /// Counts one request against the key's rate, and refuses it while the key's tokens are
    /// overspent; a 429 with the wait.
    fn admit(&self, now: Instant) -> Result<(), ApiError> {
        let Some(entry) = &self.entry else {
            return Ok(());
        };
        let limited = |what| {
            move |wait: std::time::Duration| ApiError::RateLimited {
                retry_after: wait.as_secs().max(1),
                what,
            }
        };
        if let Some(tokens) = &entry.tokens {
            tokens.check(now).map_err(limited("tokens per minute"))?;
        }
        if let Some(requests) = &entry.requests {
            requests.take(now).map_err(limited("requests per minute"))?;
        }
        Ok(())
    }

    /// A 403 unless the key may use the model asked for as `requested` (id `id`).
    pub fn require_model(&self, requested: &str, id: &str) -> Result<(), ApiError> {
        match &self.entry {
            Some(entry) if !entry.key.may_use(&[requested, id]) => Err(ApiError::Forbidden(
                format!("This API key may not use the model `{requested}` (see --keys-file)"),
            )),
            _ => Ok(()),
        }
    }

    /// Where the engine reports the tokens a sequence took, for a key with a token rate.
    pub fn usage_sink(&self) -> Option<crate::engine::UsageSink> {
        let tokens = Arc::clone(self.entry.as_ref()?.tokens.as_ref()?);
        Some(crate::engine::UsageSink(Arc::new(move |n| {
            tokens.spend(n, Instant::now());
        })))
    }
}

tokio::task_local! {
    /// The caller of the request being handled: set by [`require_key`] around the handler (and
    /// by the SDK socket around each call), read where a model is acquired and work is submitted.
    static CALLER: Authenticated;
}

/// The caller whose request is being handled, if any (`None` outside a request: the server's own
/// work, tests).
pub fn current_caller() -> Option<Authenticated> {
    CALLER.try_with(Clone::clone).ok()
}

/// Runs `work` as `caller`'s.
pub async fn as_caller<F: std::future::Future>(caller: Authenticated, work: F) -> F::Output {
    CALLER.scope(caller, work).await
}

/// `work` as the current request's caller's, wherever it is later run (a spawned task, which
/// does not inherit the task-local).
pub fn keeping_caller<F: std::future::Future>(
    work: F,
) -> impl std::future::Future<Output = F::Output> {
    let caller = current_caller();
    async move {
        match caller {
            Some(caller) => as_caller(caller, work).await,
            None => work.await,
        }
    }
}

/// The key `headers` carry, if any: `Authorization: Bearer KEY`, or Anthropic's `x-api-key`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// The key layer of every keyed route: authenticates from the head and counts the request against
/// the key's rate. A request that fails gets its answer with `Connection: close`, so its body is
/// never read.
pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let authenticated = state
        .keys()
        .authenticate(bearer(request.headers()))
        .and_then(|a| a.admit(Instant::now()).map(|()| a));
    match authenticated {
        Ok(authenticated) => {
            if let Some(proof) = request.extensions().get::<super::unproven::Proof>() {
                proof.prove();
            }
            request.extensions_mut().insert(authenticated.clone());
            as_caller(authenticated, next.run(request)).await
        }
        Err(err) => {
            if let Some(metrics) = state.metrics() {
                metrics.shed(match err {
                    ApiError::RateLimited { .. } => "rate_limited",
                    _ => "unauthenticated",
                });
            }
            let mut response = err.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response.extensions_mut().insert(ShedCounted);
            response
        }
    }
}

/// Marks an answer whose refusal was already counted in the shed metric.
#[derive(Debug, Clone, Copy)]
pub struct ShedCounted;

/// A route group's scope check, from the head, after [`require_key`].
pub async fn require_scope(State(scope): State<Scope>, request: Request, next: Next) -> Response {
    let checked = match request.extensions().get::<Authenticated>() {
        Some(authenticated) => authenticated.require(scope),
        None => Err(ApiError::Unauthorized(
            "Missing API key: send `Authorization: Bearer KEY`",
        )),
    };
    match checked {
        Ok(()) => next.run(request).await,
        Err(err) => {
            // Its body is never read: the connection cannot carry another request, and says so
            // (a client would otherwise send its next request into a closing connection).
            let mut response = err.into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

/// The connection under a request: a request takes it out of the silent ones (`unproven`), and on
/// a keyed server an answer on a connection that never showed a key closes it (an upgrade
/// excepted: the socket authenticates itself).
pub async fn connection(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let proof = request
        .extensions()
        .get::<super::unproven::Proof>()
        .cloned();
    if let Some(proof) = &proof {
        proof.begin();
    }
    let mut response = next.run(request).await;
    let unproven = proof.is_some_and(|p| !p.proven());
    if unproven
        && !state.keys().is_empty()
        && response.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// This request's id (`req_` and 24 hex digits), also sent back as `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = format!(
        "req_{:012x}{:012x}",
        rand::random::<u64>() >> 16,
        rand::random::<u64>() >> 16
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_without_keys_lets_anyone_in_but_not_into_the_sandbox() {
        let keys = Keys::new(&[]);
        let anyone = keys.authenticate(None).unwrap();
        assert!(anyone.may(Scope::Inference) && anyone.may(Scope::Models));
        assert!(!anyone.may(Scope::Sandbox));
    }

    #[test]
    fn wrong_and_missing_keys_are_401_and_scopes_are_403() {
        let keys = Keys::new(&[ApiKey::scoped("chat", Scopes::of(&[Scope::Inference]))]);
        for presented in [None, Some("chat2"), Some("")] {
            let err = keys.authenticate(presented).unwrap_err();
            assert_eq!(err.status(), 401, "{presented:?}");
        }
        let chat = keys.authenticate(Some("chat")).unwrap();
        assert!(chat.require(Scope::Inference).is_ok());
        let err = chat.require(Scope::Models).unwrap_err();
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains("`models` scope"), "{err}");
    }

    #[test]
    fn a_key_over_its_tokens_waits_and_may_use_only_its_models() {
        let mut key = ApiKey::scoped("k", Scopes::PLAIN);
        key.limits.tokens_per_minute = Some(100);
        key.limits.models = Some(vec!["small-*".into()]);
        let keys = Keys::new(&[key]);
        let caller = keys.authenticate(Some("k")).unwrap();
        assert!(caller.require_model("small-1", "small-1").is_ok());
        assert!(caller.require_model("alias", "small-2").is_ok());
        assert_eq!(
            caller.require_model("big", "big").unwrap_err().status(),
            403
        );
        let now = Instant::now();
        assert!(caller.admit(now).is_ok());
        (caller.usage_sink().unwrap().0)(250);
        match caller.admit(now).unwrap_err() {
            ApiError::RateLimited { retry_after, what } => {
                assert_eq!(what, "tokens per minute");
                assert!((89..=91).contains(&retry_after), "{retry_after}");
            }
            other => panic!("{other:?}"),
        }
        assert!(Authenticated::keyless().usage_sink().is_none());
    }

    #[test]
    fn a_key_over_its_rate_is_429_with_the_wait() {
        let mut key = ApiKey::scoped("k", Scopes::PLAIN);
        key.limits.requests_per_minute = Some(1);
        let keys = Keys::new(&[key]);
        let caller = keys.authenticate(Some("k")).unwrap();
        let now = Instant::now();
        assert!(caller.admit(now).is_ok());
        match caller.admit(now).unwrap_err() {
            ApiError::RateLimited { retry_after, .. } => assert!((59..=60).contains(&retry_after)),
            other => panic!("{other:?}"),
        }
    }
}
