//! What a web page may ask of the server. A browser attaches `Origin` to every cross-origin
//! request and websocket handshake, and a page that rebinds its own domain to 127.0.0.1 (DNS
//! rebinding) sends its domain as `Host`. So, from the head, before anything else:
//! - `Host`: while bound to a loopback address (or given `--allowed-hosts`), only loopback names,
//!   IP literals and `--allowed-hosts` are served; others are 403 `host_not_allowed`. An IP
//!   literal cannot be rebound (a page that reaches it has it as its own origin), so any is fine,
//!   as in Ollama's check.
//! - `Origin`: a request that carries one is served only when it is in `--allowed-origins`
//!   (default: the loopback origins and desktop-app schemes, as Ollama's default) or is the
//!   server's own origin under an allowed `Host`; others, websocket upgrades included, are 403
//!   `origin_not_allowed`. `Origin: null` (sandboxed frames, local files) is refused. A request
//!   without `Origin` is not from a page (browsers always send it cross-origin) and is served.
//!
//! CORS headers (by `tower-http`, inside this guard) go only to origins this guard let through.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::keys::glob;
use super::state::AppState;

/// The origins a browser page may call from by default (`--allowed-origins` replaces them).
pub const DEFAULT_ORIGINS: &[&str] = &[
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]",
    "https://[::1]",
    "http://[::1]:*",
    "https://[::1]:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
];

/// The `Origin` and `Host` rules.
#[derive(Debug, Clone, PartialEq)]
pub struct BrowserPolicy {
    /// Origin patterns (`*` matches any run of characters); `["*"]` allows every origin.
    pub origins: Vec<String>,
    /// Host names served beside loopback names and IP literals (`*` as a wildcard); `None`: any
    /// `Host` (a server bound to a non-loopback address without `--allowed-hosts`).
    pub hosts: Option<Vec<String>>,
}

impl Default for BrowserPolicy {
    /// A loopback server's: the default origins, loopback hosts only.
    fn default() -> Self {
        Self {
            origins: DEFAULT_ORIGINS.iter().map(|s| (*s).to_owned()).collect(),
            hosts: Some(Vec::new()),
        }
    }
}

impl BrowserPolicy {
    /// The policy of a server bound to `bind` with these flags (empty: the defaults). The `Host`
    /// check is on while bound to loopback or when `--allowed-hosts` names hosts; `*` turns it
    /// off.
    pub fn for_bind(bind: &str, origins: &[String], hosts: &[String]) -> Self {
        let loopback = is_loopback_name(bind.trim_start_matches('[').trim_end_matches(']'));
        let hosts = if hosts.iter().any(|h| h == "*") {
            None
        } else if loopback || !hosts.is_empty() {
            Some(hosts.iter().map(|h| h.to_ascii_lowercase()).collect())
        } else {
            None
        };
        Self {
            origins: if origins.is_empty() {
                Self::default().origins
            } else {
                origins.to_vec()
            },
            hosts,
        }
    }

    /// Whether `host` (a `Host` header's value) may be served.
    pub fn host_allowed(&self, host: &str) -> bool {
        match &self.hosts {
            None => true,
            Some(extra) => self.host_named(host, extra),
        }
    }

    /// Whether `host` is a loopback name, an IP literal or one of `extra`.
    fn host_named(&self, host: &str, extra: &[String]) -> bool {
        let name = host_name(host).to_ascii_lowercase();
        is_loopback_name(&name)
            || name.parse::<std::net::IpAddr>().is_ok()
            || extra.iter().any(|pattern| glob(pattern, &name))
    }

    /// Whether a request with `origin` (an `Origin` header's value) to `host` may be served.
    pub fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(origin) = parse_origin(origin) else {
            return false;
        };
        if self.origins.iter().any(|pattern| glob(pattern, &origin)) {
            return true;
        }
        // The server's own page: same authority as `Host`, under a host a rebinding page cannot
        // name.
        host.is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
                && self.host_named(host, self.hosts.as_deref().unwrap_or_default())
        })
    }

    /// 403 for a `Host` or `Origin` outside the rules; `Ok` otherwise.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers.get(header::HOST).map(|h| h.to_str());
        let host = match host {
            None => None,
            Some(Ok(host)) => Some(host),
            Some(Err(_)) => return Err(not_allowed_host("(not text)")),
        };
        if let Some(host) = host {
            if !self.host_allowed(host) {
                return Err(not_allowed_host(host));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("(not text)");
            if !self.origin_allowed(origin, host) {
                return Err(ApiError::NotAllowedFrom {
                    message: format!(
                        "Requests from the origin {origin:?} are not allowed (see --allowed-origins)"
                    ),
                    code: "origin_not_allowed",
                });
            }
        }
        Ok(())
    }
}

fn not_allowed_host(host: &str) -> ApiError {
    ApiError::NotAllowedFrom {
        message: format!(
            "The host {host:?} is not served (a loopback server answers to localhost, IP \
             addresses and --allowed-hosts)"
        ),
        code: "host_not_allowed",
    }
}

/// `host` without its port (`[::1]:8080` → `[::1]`, `localhost:8080` → `localhost`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(host, |(name, _)| name);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `scheme://host[:port]` lower-cased, or `None` for anything else (`null`, paths, user info,
/// a non-numeric port).
fn parse_origin(origin: &str) -> Option<String> {
    let (scheme, authority) = origin.split_once("://")?;
    let scheme_ok = !scheme.is_empty()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    let authority_ok = !authority.contains(['/', '@', '?', '#', ' '])
        && match authority.rsplit_once(':') {
            Some((_, port)) if !authority.ends_with(']') => {
                !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())
            }
            _ => true,
        };
    (scheme_ok && authority_ok).then(|| origin.to_ascii_lowercase())
}

/// The guard, outermost but for request ids and metrics.
pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state.config().browser.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(err) => {
            tracing::warn!(%err, "refused a browser request");
            err.into_response()
        }
    }
}

/// CORS headers for the origins [`guard`] let through (it refuses the rest first), preflights
/// answered here without a key (browsers send none on a preflight).
pub fn cors() -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method};
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers(AllowHeaders::mirror_request())
        .expose_headers([
            HeaderName::from_static("x-request-id"),
            HeaderName::from_static("x-lm-sandbox-warning"),
            header::RETRY_AFTER,
        ])
        .allow_private_network(true)
        .max_age(std::time::Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(host) = host {
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        }
        if let Some(origin) = origin {
            headers.insert(header::ORIGIN, HeaderValue::from_str(origin).unwrap());
        }
        headers
    }

    fn code(result: Result<(), ApiError>) -> Option<&'static str> {
        match result {
            Ok(()) => None,
            Err(ApiError::NotAllowedFrom { code, .. }) => Some(code),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_loopback_server_refuses_rebound_hosts_and_foreign_origins() {
        let policy = BrowserPolicy::for_bind("127.0.0.1", &[], &[]);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "localhost",
            "[::1]:8080",
            "app.localhost:1",
            "192.168.1.5:8080",
            "LOCALHOST:8080",
        ] {
            assert_eq!(
                code(policy.check(&headers(Some(host), None))),
                None,
                "{host}"
            );
        }
        for host in [
            "evil.example:8080",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8080",
        ] {
            assert_eq!(
                code(policy.check(&headers(Some(host), None))),
                Some("host_not_allowed"),
                "{host}"
            );
        }
        for origin in [
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "https://localhost",
            "app://obsidian.md",
            "vscode-webview://abc",
            "http://[::1]:5173",
        ] {
            assert_eq!(
                code(policy.check(&headers(Some("127.0.0.1:8080"), Some(origin)))),
                None,
                "{origin}"
            );
        }
        for origin in [
            "https://evil.example",
            "null",
            "http://localhost.evil.example",
            "http://localhost:80.evil.example",
            "http://localhost:8080/path",
            "http://user@localhost:8080",
            "",
        ] {
            assert_eq!(
                code(policy.check(&headers(Some("127.0.0.1:8080"), Some(origin)))),
                Some("origin_not_allowed"),
                "{origin:?}"
            );
        }
        // No headers at all (not a browser, not HTTP/1.1's usual): served.
        assert_eq!(code(policy.check(&headers(None, None))), None);
    }

    #[test]
    fn allowlists_extend_the_defaults_and_star_turns_them_off() {
        let policy = BrowserPolicy::for_bind(
            "127.0.0.1",
            &["https://chat.example.org".into()],
            &["box.lan".into(), "*.internal".into()],
        );
        assert!(policy.host_allowed("box.lan:8080") && policy.host_allowed("a.internal"));
        assert!(!policy.host_allowed("evil.example"));
        assert!(policy.origin_allowed("https://chat.example.org", Some("box.lan:8080")));
        // Replaced, not added: the loopback origins are gone unless listed again...
        assert!(!policy.origin_allowed("http://localhost:3000", Some("box.lan:8080")));
        // ...but the server's own page under an allowed host is always served.
        assert!(policy.origin_allowed("http://box.lan:8080", Some("box.lan:8080")));
        assert!(!policy.origin_allowed("http://box.lan:8080", Some("box.lan:9090")));
        let open = BrowserPolicy::for_bind("127.0.0.1", &["*".into()], &["*".into()]);
        assert!(open.host_allowed("evil.example"));
        assert!(open.origin_allowed("https://evil.example", Some("evil.example")));
        assert!(!open.origin_allowed("null", None));
    }

    #[test]
    fn a_server_on_all_interfaces_checks_hosts_only_when_told() {
        let lan = BrowserPolicy::for_bind("0.0.0.0", &[], &[]);
        assert!(lan.host_allowed("mybox.example:8080"));
        // Its own page under a name is not same-origin enough without --allowed-hosts.
        assert!(!lan.origin_allowed("http://mybox.example:8080", Some("mybox.example:8080")));
        assert!(lan.origin_allowed("http://192.168.1.5:8080", Some("192.168.1.5:8080")));
        let named = BrowserPolicy::for_bind("0.0.0.0", &[], &["mybox.example".into()]);
        assert!(!named.host_allowed("evil.example"));
        assert!(named.origin_allowed("http://mybox.example:8080", Some("mybox.example:8080")));
        assert!(BrowserPolicy::for_bind("::1", &[], &[]).hosts.is_some());
        assert!(BrowserPolicy::for_bind("localhost", &[], &[])
            .hosts
            .is_some());
    }
}
