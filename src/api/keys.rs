//! API keys: what each may do (its scopes), which models it may use, how fast it may ask (requests
//! and tokens per minute), its sandbox sessions, and its id in logs. Read from
//! `--api-key` / `--sandbox-api-key` flags or a `--keys-file`; nothing here knows HTTP.
//!
//! Scopes: `inference` (chat, completions, embeddings, tokenize, model lists), `models` (load,
//! unload, rescan, and the Ollama options that force a reload or unload), `sandbox` (commands in
//! the sandbox, the shell loop) and `metrics` (`GET /metrics`). A `--api-key` has `inference`,
//! `models` and `metrics` (what every key could do before scopes existed); a `--sandbox-api-key`
//! adds `sandbox`. A keys file states each key's scopes.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Inference,
    Models,
    Sandbox,
    Metrics,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Self::Inference, Self::Models, Self::Sandbox, Self::Metrics];

    pub fn name(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Models => "models",
            Self::Sandbox => "sandbox",
            Self::Metrics => "metrics",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`Scope`]s.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Scopes(u8);

impl Scopes {
    /// A `--api-key`'s scopes.
    pub const PLAIN: Scopes = Scopes(0b1011);
    /// A `--sandbox-api-key`'s scopes.
    pub const SANDBOX: Scopes = Scopes(0b1111);
    /// What a server without keys lets anyone do: everything but the sandbox (which always needs
    /// a key).
    pub const KEYLESS: Scopes = Scopes::PLAIN;

    pub fn of(scopes: &[Scope]) -> Self {
        Self(scopes.iter().fold(0, |bits, s| bits | s.bit()))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The scope named `name`, or an error listing the names.
    pub fn parse_one(name: &str) -> Result<Scope, String> {
        Scope::ALL
            .into_iter()
            .find(|s| s.name() == name.trim())
            .ok_or_else(|| {
                format!("unknown scope {name:?}: one of inference, models, sandbox, metrics")
            })
    }
}

impl std::fmt::Debug for Scopes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Scope::ALL
            .into_iter()
            .filter(|s| self.contains(*s))
            .map(Scope::name)
            .collect();
        write!(f, "{}", names.join(","))
    }
}

/// The per-install secret that key ids are keyed with: set once at start-up from
/// `STATE_DIR/key-id.secret` ([`load_key_id_secret`]); a process that never sets it (tests) draws
/// a random one, so its ids are stable only within the process.
static KEY_ID_SECRET: OnceLock<[u8; 32]> = OnceLock::new();

/// Reads (or creates, 0600) the per-install secret for key ids at `path`, and uses it for every
/// key id this process computes. Call before any id is computed.
pub fn load_key_id_secret(path: &std::path::Path) -> std::io::Result<()> {
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

/// Per-key limits beyond its scopes (a keys file's optional fields).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyLimits {
    /// Model ids or names the key may use (`*` wildcards); `None`: every model.
    pub models: Option<Vec<String>>,
    /// Prompt plus generated tokens per minute, charged as each sequence ends; `None`: unlimited.
    pub tokens_per_minute: Option<u32>,
    /// Requests per minute (a token bucket with a minute's burst); `None`: unlimited.
    pub requests_per_minute: Option<u32>,
    /// Sandbox sessions (tenants) the key may hold at once; `None`: the server's default.
    pub sandbox_sessions: Option<usize>,
}

/// One configured API key.
#[derive(Clone)]
pub struct ApiKey {
    secret: String,
    pub scopes: Scopes,
    /// Chat requests run the server-side shell loop unless they say `"sandbox": {"shell": false}`.
    pub auto_shell: bool,
    pub limits: KeyLimits,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret, not even in debug output.
        f.debug_struct("ApiKey")
            .field("id", &self.id())
            .field("scopes", &self.scopes)
            .field("auto_shell", &self.auto_shell)
            .field("limits", &self.limits)
            .finish()
    }
}

impl ApiKey {
    /// A flag's key: `sandbox` says whether it came from `--sandbox-api-key`.
    pub fn new(secret: impl Into<String>, sandbox: bool) -> Self {
        Self::scoped(
            secret,
            if sandbox {
                Scopes::SANDBOX
            } else {
                Scopes::PLAIN
            },
        )
    }

    /// A key with exactly `scopes`.
    pub fn scoped(secret: impl Into<String>, scopes: Scopes) -> Self {
        Self {
            secret: secret.into(),
            scopes,
            auto_shell: false,
            limits: KeyLimits::default(),
        }
    }

    /// Whether the key may use a model known by any of `names` (the name asked for, its id).
    pub fn may_use(&self, names: &[&str]) -> bool {
        match &self.limits.models {
            None => true,
            Some(patterns) => patterns
                .iter()
                .any(|p| names.iter().any(|name| glob(p, name))),
        }
    }

    /// Whether two entries name the same key.
    pub fn same_secret(&self, other: &ApiKey) -> bool {
        self.matches(&other.secret)
    }

    /// Whether `presented` is this key, in time independent of where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        bool::from(self.secret.as_bytes().ct_eq(presented.as_bytes()))
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

/// `pattern` with `*` for any run of characters, matched against the whole of `text`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == text;
    };
    let Some(mut text) = text.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        match text.find(part) {
            Some(at) => text = &text[at + part.len()..],
            None => return false,
        }
    }
    text.len() >= last.len() && text.ends_with(last)
}

/// One entry of a TOML keys file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKey {
    key: String,
    scopes: Vec<String>,
    #[serde(default)]
    models: Option<Vec<String>>,
    #[serde(default)]
    requests_per_minute: Option<u32>,
    #[serde(default)]
    tokens_per_minute: Option<u32>,
    #[serde(default)]
    sandbox_sessions: Option<usize>,
    #[serde(default)]
    auto_shell: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeys {
    #[serde(default, rename = "key")]
    keys: Vec<FileKey>,
}

/// Parses a keys file: TOML (`[[key]]` tables with `key`, `scopes` and optional `models`,
/// `requests_per_minute`, `tokens_per_minute`, `sandbox_sessions`, `auto_shell`), or one key per
/// line followed by its comma-separated scopes (`sk-abc inference,models`; blank lines and `#`
/// comments skipped). An error names the line or field.
pub fn parse_keys_file(text: &str) -> Result<Vec<ApiKey>, String> {
    let toml_like = text
        .lines()
        .map(str::trim)
        .any(|l| l.starts_with("[[key]]"));
    let keys = if toml_like {
        let file: FileKeys = toml::from_str(text).map_err(|e| e.to_string())?;
        file.keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| {
                let scopes = k
                    .scopes
                    .iter()
                    .map(|s| Scopes::parse_one(s))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("key {}: {e}", i + 1))?;
                if k.key.trim().is_empty() || k.key.chars().any(char::is_whitespace) {
                    return Err(format!("key {}: `key` must be non-empty, no spaces", i + 1));
                }
                if k.auto_shell && !scopes.contains(&Scope::Sandbox) {
                    return Err(format!(
                        "key {}: `auto_shell` needs the `sandbox` scope",
                        i + 1
                    ));
                }
                for (field, value) in [
                    ("requests_per_minute", k.requests_per_minute),
                    ("tokens_per_minute", k.tokens_per_minute),
                ] {
                    if value == Some(0) {
                        return Err(format!("key {}: `{field}` must be at least 1", i + 1));
                    }
                }
                if k.models.as_ref().is_some_and(Vec::is_empty) {
                    return Err(format!(
                        "key {}: `models` must name at least one model (leave it out for all)",
                        i + 1
                    ));
                }
                if k.sandbox_sessions == Some(0) {
                    return Err(format!(
                        "key {}: `sandbox_sessions` must be at least 1",
                        i + 1
                    ));
                }
                Ok(ApiKey {
                    secret: k.key,
                    scopes: Scopes::of(&scopes),
                    auto_shell: k.auto_shell,
                    limits: KeyLimits {
                        models: k.models,
                        requests_per_minute: k.requests_per_minute,
                        tokens_per_minute: k.tokens_per_minute,
                        sandbox_sessions: k.sandbox_sessions,
                    },
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (secret, scopes) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("line {}: a key, a space, then its scopes", n + 1))?;
            let scopes = scopes
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(Scopes::parse_one)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("line {}: {e}", n + 1))?;
            keys.push(ApiKey::scoped(secret, Scopes::of(&scopes)));
        }
        keys
    };
    if keys.is_empty() {
        return Err("holds no key".into());
    }
    for (i, key) in keys.iter().enumerate() {
        if keys[..i].iter().any(|k| k.secret == key.secret) {
            return Err(format!("a key appears twice (the {}th)", i + 1));
        }
    }
    Ok(keys)
}

/// A token bucket: `per_minute` units a minute, a burst of one minute's worth. A std Mutex: held
/// only to update two numbers, never across an await.
#[derive(Debug)]
pub struct Bucket {
    per_minute: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute);
        Self {
            per_minute,
            state: Mutex::new((per_minute, Instant::now())),
        }
    }

    fn refill(&self, state: &mut (f64, Instant), now: Instant) {
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.per_minute / 60.0).min(self.per_minute);
        state.1 = now;
    }

    /// Takes one unit, or says how long until one is there.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("token bucket");
        self.refill(&mut state, now);
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            Ok(())
        } else {
            Err(self.wait(state.0))
        }
    }

    /// Whether the bucket holds anything (a spender may overdraw it), else how long until it does.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("token bucket");
        self.refill(&mut state, now);
        if state.0 > 0.0 {
            Ok(())
        } else {
            Err(self.wait(state.0))
        }
    }

    /// Spends `units` after the fact (the tokens a sequence took); the bucket may go negative, so
    /// the next request waits until the overdraft is paid back.
    pub fn spend(&self, units: u64, now: Instant) {
        let mut state = self.state.lock().expect("token bucket");
        self.refill(&mut state, now);
        state.0 -= units as f64;
    }

    fn wait(&self, level: f64) -> Duration {
        Duration::from_secs_f64((1.0 - level).max(0.0) * 60.0 / self.per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find_key<'a>(keys: &'a [ApiKey], presented: &str) -> Option<&'a ApiKey> {
        keys.iter().find(|k| k.matches(presented))
    }

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
        assert!(find_key(&keys, "both")
            .unwrap()
            .scopes
            .contains(Scope::Sandbox));
        assert!(!find_key(&keys, "plain")
            .unwrap()
            .scopes
            .contains(Scope::Sandbox));
        let id = &find_key(&keys, "plain").unwrap().id();
        assert!(id.starts_with("key-") && id.len() == 16 && !id.contains("plain"));
        assert!(!format!("{keys:?}").contains("plain"));
        // Keyed: not the plain SHA-256 prefix anyone could compute from a guess.
        use sha2::Digest as _;
        let unkeyed = crate::sandbox::image::hex(&Sha256::digest(b"plain"));
        assert!(!unkeyed.starts_with(&id[4..]));
    }

    #[test]
    fn flag_keys_map_to_documented_scopes() {
        let plain = ApiKey::new("p", false).scopes;
        assert!(plain.contains(Scope::Inference) && plain.contains(Scope::Models));
        assert!(plain.contains(Scope::Metrics) && !plain.contains(Scope::Sandbox));
        assert!(ApiKey::new("s", true).scopes.contains(Scope::Sandbox));
        assert_eq!(
            format!("{:?}", Scopes::SANDBOX),
            "inference,models,sandbox,metrics"
        );
    }

    #[test]
    fn keys_files_in_both_forms() {
        let keys = parse_keys_file(
            "# a comment\n\nsk-chat inference\nsk-admin inference,models,metrics\n",
        )
        .unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].scopes, Scopes::of(&[Scope::Inference]));
        assert!(keys[1].scopes.contains(Scope::Models));
        let keys = parse_keys_file(
            r#"
[[key]]
key = "sk-one"
scopes = ["inference", "sandbox"]
models = ["smollm*"]
requests_per_minute = 30
tokens_per_minute = 1000
sandbox_sessions = 2
auto_shell = true

[[key]]
key = "sk-two"
scopes = ["metrics"]
"#,
        )
        .unwrap();
        assert_eq!(keys[0].limits.requests_per_minute, Some(30));
        assert_eq!(keys[0].limits.sandbox_sessions, Some(2));
        assert!(keys[0].auto_shell);
        assert_eq!(keys[0].limits.tokens_per_minute, Some(1000));
        assert!(keys[0].may_use(&["smollm2-135m"]) && !keys[0].may_use(&["gemma"]));
        assert!(keys[1].may_use(&["anything"]));
        for (text, says) in [
            ("sk-a inference,root\n", "unknown scope \"root\""),
            ("sk-a\n", "line 1"),
            ("", "holds no key"),
            ("a inference\na models\n", "twice"),
            (
                "[[key]]\nkey = \"a\"\nscopes = [\"inference\"]\nauto_shell = true\n",
                "needs the `sandbox` scope",
            ),
            (
                "[[key]]\nkey = \"a\"\nscopes = []\nrequests_per_minute = 0\n",
                "at least 1",
            ),
            ("[[key]]\nkey = \"a\"\nscope = []\n", "unknown field"),
        ] {
            let err = parse_keys_file(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn globs() {
        assert!(glob("*", "x"));
        assert!(glob("http://localhost:*", "http://localhost:8080"));
        assert!(!glob("http://localhost:*", "http://localhost"));
        assert!(glob("a*b*c", "aXXbYYc") && !glob("a*b*c", "aXXbYY"));
        assert!(glob("exact", "exact") && !glob("exact", "exact2"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn buckets_refill_over_a_minute_and_say_how_long_to_wait() {
        let start = Instant::now();
        let bucket = Bucket::new(2);
        assert!(bucket.take(start).is_ok());
        assert!(bucket.take(start).is_ok());
        let wait = bucket.take(start).unwrap_err();
        assert!((29.0..=30.5).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(bucket.take(start + Duration::from_secs(31)).is_ok());
        let tokens = Bucket::new(60);
        tokens.spend(120, start);
        let wait = tokens.check(start).unwrap_err();
        assert!((60.0..=62.0).contains(&wait.as_secs_f64()), "{wait:?}");
        assert!(tokens.check(start + Duration::from_secs(62)).is_ok());
    }
}
