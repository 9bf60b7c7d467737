//! API keys and request ids.
//!
//! Keys: `Authorization: Bearer KEY` on every route but `/health` when keys are configured. The
//! matching key's [`Authenticated`] (its id and whether it may use the sandbox) rides along in the
//! request's extensions. Request ids: every response carries `x-request-id`; handlers read the
//! [`RequestId`] extension.

use axum::extract::{Request, State};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::path::Path;
use std::sync::OnceLock;

use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The per-install secret that key ids are keyed with: set once at start-up from
/// `STATE_DIR/key-id.secret` ([`load_key_id_secret`]); a process that never sets it (tests) draws
/// a random one, so its ids are stable only within the process.
static KEY_ID_SECRET: OnceLock<[u8; 32]> = OnceLock::new();

/// Reads (or creates, 0600) the per-install secret for key ids at `path`, and uses it for every
/// key id this process computes. Call before any id is computed.
pub fn load_key_id_secret(path: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let secret = match std::fs::read(path) {
        Ok(bytes) if bytes.len() == 32 => bytes,
        Ok(_) | Err(_) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let bytes: [u8; 32] = rand::random();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(path)?;
            file.write_all(&bytes)?;
            bytes.to_vec()
        }
    };
    let mut key = [0u8; 32];
    key.copy_from_slice(&secret);
    if KEY_ID_SECRET.set(key).is_err() && KEY_ID_SECRET.get() != Some(&key) {
        tracing::warn!("key ids were computed before the install secret was loaded");
    }
    Ok(())
}

/// `key-` and 12 hex digits of HMAC-SHA256(install secret, key): names a key in logs without
/// allowing an offline guess of a weak key from the log alone.
pub fn key_id(key: &str) -> String {
    keyed_id(KEY_ID_SECRET.get_or_init(rand::random), key)
}

/// [`key_id`] under an explicit `secret` (the bytes of a `key-id.secret` file).
pub fn keyed_id(secret: &[u8], key: &str) -> String {
    use hmac::Mac as _;
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(key.as_bytes());
    let digest = mac.finalize().into_bytes();
    format!("key-{}", &crate::sandbox::image::hex(&digest)[..12])
}

/// One configured API key.
#[derive(Clone)]
pub struct ApiKey {
    secret: String,
    /// May run commands in the sandbox.
    pub sandbox: bool,
    /// Chat requests run the server-side shell loop unless they say `"sandbox": {"shell": false}`.
    pub auto_shell: bool,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in debug output.
        f.debug_struct("ApiKey")
            .field("id", &self.id())
            .field("sandbox", &self.sandbox)
            .field("auto_shell", &self.auto_shell)
            .finish()
    }
}

impl ApiKey {
    pub fn new(secret: impl Into<String>, sandbox: bool) -> Self {
        Self {
            secret: secret.into(),
            sandbox,
            auto_shell: false,
        }
    }

    /// The key's name in logs (see [`key_id`]).
    pub fn id(&self) -> String {
        key_id(&self.secret)
    }

    /// `plain` keys and `sandbox` keys as one list; a key in both may use the sandbox.
    pub fn list(plain: &[String], sandbox: &[String]) -> Vec<Self> {
        Self::list_with_auto_shell(plain, sandbox, &[])
    }

    /// As [`ApiKey::list`], plus `auto_shell` keys: sandbox keys whose chat requests run the
    /// shell loop by default.
    pub fn list_with_auto_shell(
        plain: &[String],
        sandbox: &[String],
        auto_shell: &[String],
    ) -> Vec<Self> {
        let mut keys: Vec<Self> = auto_shell
            .iter()
            .map(|k| Self {
                auto_shell: true,
                ..Self::new(k, true)
            })
            .collect();
        for key in sandbox {
            if !keys.iter().any(|k| &k.secret == key) {
                keys.push(Self::new(key, true));
            }
        }
        for key in plain {
            if !keys.iter().any(|k| &k.secret == key) {
                keys.push(Self::new(key, false));
            }
        }
        keys
    }
}

/// The key a request presented, once it matched.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub key_id: String,
    pub sandbox: bool,
    pub auto_shell: bool,
}

/// This request's id (`req_` and 24 hex digits), also sent back as `x-request-id`.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The key `presented` matches, compared against every key in time independent of where they
/// differ.
pub fn find_key<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
    keys.iter().fold(None, |found, key| {
        let hit = bool::from(key.secret.as_bytes().ct_eq(presented.as_bytes()));
        if hit {
            Some(key)
        } else {
            found
        }
    })
}

pub async fn require_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let keys = &state.config().api_keys;
    let public = match request.uri().path() {
        "/health" => true,
        "/metrics" => state.config().metrics_public,
        // LM Studio's SDK authenticates inside its websocket, with its client passkey.
        path => super::lmstudio::sdk::authenticates_itself(path),
    };
    if keys.is_empty() || public {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::Unauthorized("Missing API key: send `Authorization: Bearer KEY`")
            .into_response();
    };
    match find_key(keys, presented) {
        Some(key) => {
            let authenticated = Authenticated {
                key_id: key.id(),
                sandbox: key.sandbox,
                auto_shell: key.auto_shell,
            };
            request.extensions_mut().insert(authenticated);
            next.run(request).await
        }
        None => ApiError::Unauthorized("Incorrect API key provided").into_response(),
    }
}

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
    fn keys_match_exactly() {
        let keys = ApiKey::list(&["alpha".to_string(), "beta".to_string()], &[]);
        assert_eq!(
            find_key(&keys, "beta").unwrap().id(),
            ApiKey::new("beta", false).id()
        );
        assert!(find_key(&keys, "bet").is_none());
        assert!(find_key(&keys, "betaa").is_none());
        assert!(find_key(&[], "x").is_none());
    }

    #[test]
    fn a_key_in_both_lists_may_use_the_sandbox_and_ids_hide_the_secret() {
        let keys = ApiKey::list(
            &["plain".to_string(), "both".to_string()],
            &["both".to_string()],
        );
        assert_eq!(keys.len(), 2);
        assert!(find_key(&keys, "both").unwrap().sandbox);
        assert!(!find_key(&keys, "plain").unwrap().sandbox);
        let id = &find_key(&keys, "plain").unwrap().id();
        assert!(id.starts_with("key-") && id.len() == 16 && !id.contains("plain"));
        assert!(!format!("{keys:?}").contains("plain"));
        // Keyed: not the plain SHA-256 prefix anyone could compute from a guess.
        use sha2::Digest as _;
        let unkeyed = crate::sandbox::image::hex(&Sha256::digest(b"plain"));
        assert!(!unkeyed.starts_with(&id[4..]));
    }
}
