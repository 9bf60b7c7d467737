//! The server against an attacker without a key and against web pages, over real sockets with the
//! fake engine: a slow-body flood while a keyed client is served, foreign `Origin`s and rebinding
//! `Host`s, CORS, websocket floods and oversized first messages (memory bounded), the scope
//! matrix, per-key rates, and metric labels no client can grow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use lm_sandbox::api::keys::parse_keys_file;
use lm_sandbox::api::{router, ApiConfig, AppState};
use lm_sandbox::engine::fake::FakeRunner;
use lm_sandbox::engine::WorkerConfig;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const MODEL: &str = "fake-model";

/// One key per scope, one with everything, one with a rate.
const KEYS: &str = r#"
[[key]]
key = "sk-chat"
scopes = ["inference"]

[[key]]
key = "sk-admin"
scopes = ["inference", "models"]

[[key]]
key = "sk-scrape"
scopes = ["metrics"]

[[key]]
key = "sk-slow"
scopes = ["inference"]
requests_per_minute = 2

[[key]]
key = "sk-narrow"
scopes = ["inference"]
models = ["other-*"]

[[key]]
key = "sk-thrifty"
scopes = ["inference"]
tokens_per_minute = 10
"#;

struct Server {
    url: String,
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

/// A minimal GGUF v3 header (no tensors) for `/api/show` to read.
fn tiny_gguf(dir: &std::path::Path) -> std::path::PathBuf {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    let key = "general.architecture";
    bytes.extend((key.len() as u64).to_le_bytes());
    bytes.extend(key.as_bytes());
    bytes.extend(8u32.to_le_bytes());
    bytes.extend(5u64.to_le_bytes());
    bytes.extend(b"llama");
    bytes.resize(bytes.len().div_ceil(32) * 32, 0);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, bytes).unwrap();
    path
}

async fn serve(api: ApiConfig) -> Server {
    serve_with(api, 512).await
}

async fn serve_with(api: ApiConfig, n_ctx_seq: u32) -> Server {
    serve_full(api, n_ctx_seq, Duration::from_secs(2)).await
}

async fn serve_full(api: ApiConfig, n_ctx_seq: u32, header_timeout: Duration) -> Server {
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 2,
        n_batch: 256,
        n_ctx_seq,
        max_queue: 8,
    });
    let app = router(AppState::new(
        engine,
        ApiConfig {
            model_ids: vec![MODEL.into()],
            ..api
        },
    ));
    serve_app(app, header_timeout).await
}

/// `app` on a loopback port, with the server's own connection loop.
async fn serve_app(app: axum::Router, header_timeout: Duration) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(lm_sandbox::server::serve_connections(
        listener,
        app,
        header_timeout,
        stopped,
    ));
    Server {
        url: format!("http://{addr}"),
        addr,
        _stop: stop,
    }
}

fn keyed() -> ApiConfig {
    ApiConfig {
        api_keys: parse_keys_file(KEYS).unwrap(),
        metrics: true,
        ..ApiConfig::default()
    }
}

/// Writes `request` and reads until the server closes the connection or `within` passes (`None`).
async fn raw(addr: std::net::SocketAddr, request: &[u8], within: Duration) -> Option<String> {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    read_until_closed(&mut socket, within).await
}

async fn read_until_closed(socket: &mut TcpStream, within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn request(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut builder = reqwest::Client::new().request(method, format!("{}{path}", server.url));
    if let Some(key) = key {
        builder = builder.bearer_auth(key);
    }
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4})
}

/// This process's resident memory now and at its peak, in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test]
async fn a_slow_body_flood_without_a_key_never_holds_a_permit() {
    let server = serve(ApiConfig {
        // Few permits and a long body deadline: before, 8 slow bodies held the server for 30 s.
        max_in_flight: 8,
        body_timeout: Duration::from_secs(30),
        ..keyed()
    })
    .await;
    let head = b"POST /v1/models/load HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    // One slow body: 401 at once, and the connection closed without waiting for the body.
    let started = Instant::now();
    let answer = raw(server.addr, head, Duration::from_secs(5))
        .await
        .expect("closed at once");
    assert_eq!(status_of(&answer), 401, "{answer}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"));
    assert!(started.elapsed() < Duration::from_secs(2));

    // 300 of them, reconnecting, while a keyed client asks 60 times.
    let flooding = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut attackers = Vec::new();
    for _ in 0..300 {
        let (addr, flooding) = (server.addr, Arc::clone(&flooding));
        attackers.push(tokio::spawn(async move {
            let mut refused = 0u32;
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                match raw(addr, head, Duration::from_secs(10)).await {
                    Some(answer) if status_of(&answer) == 401 => refused += 1,
                    other => panic!("a slow body was not refused at once: {other:?}"),
                }
            }
            refused
        }));
    }
    let mut latencies = Vec::new();
    for _ in 0..60 {
        let asked = Instant::now();
        let (status, body) = request(
            &server,
            reqwest::Method::GET,
            "/v1/models",
            Some("sk-chat"),
            None,
        )
        .await;
        latencies.push(asked.elapsed());
        assert_eq!(status, 200, "{body}");
    }
    flooding.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut refused = 0;
    for attacker in attackers {
        refused += attacker.await.unwrap();
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    let median = latencies[latencies.len() / 2];
    println!(
        "slow-body flood: {refused} refused; keyed GET /v1/models median {median:?}, p99 {p99:?}"
    );
    assert!(refused >= 300, "the flood ran ({refused})");
    // Before, the flood held every permit until its 30 s body deadline.
    assert!(p99 < Duration::from_secs(5), "p99 {p99:?}");
    // Nothing was shed: no permit was ever taken by the flood.
    let text = scrape(&server, "sk-scrape").await;
    let text = text.as_str();
    assert!(!text.contains("reason=\"overloaded\""), "{text}");
    assert!(text.contains("reason=\"unauthenticated\""), "{text}");
}

#[tokio::test]
async fn foreign_origins_and_rebinding_hosts_are_refused_and_loopback_pages_get_cors() {
    let server = serve(ApiConfig::default()).await;
    // A page on another site POSTs text/plain (no preflight) to unload the model: refused.
    let unload = format!(
        "POST /v1/models/unload HTTP/1.1\r\nHost: {}\r\nOrigin: https://evil.example\r\n\
         Content-Type: text/plain\r\nContent-Length: 24\r\nConnection: close\r\n\r\n\
         {{\"model\":\"fake-model\"}}",
        server.addr
    );
    let answer = raw(server.addr, unload.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status_of(&answer), 403, "{answer}");
    assert!(answer.contains("origin_not_allowed"), "{answer}");
    // DNS rebinding: the page's own domain as Host.
    let rebound = "GET /v1/models HTTP/1.1\r\nHost: evil.example:8080\r\nConnection: close\r\n\r\n";
    let answer = raw(server.addr, rebound.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status_of(&answer), 403, "{answer}");
    assert!(answer.contains("host_not_allowed"), "{answer}");
    // Preflights: a foreign one is refused, a loopback page's is answered without a key.
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/chat/completions", server.url),
            )
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "content-type,authorization",
            )
            .send()
    };
    assert_eq!(
        preflight("https://evil.example").await.unwrap().status(),
        403
    );
    let ok = preflight("http://localhost:3000").await.unwrap();
    assert!(ok.status().is_success(), "{}", ok.status());
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let allowed_headers = ok.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed_headers.contains("authorization"),
        "{allowed_headers}"
    );
    // The request itself from that page: served, with the CORS header; none without Origin.
    let answer = client
        .post(format!("{}/v1/chat/completions", server.url))
        .header("Origin", "http://localhost:3000")
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    let plain = client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert!(plain.headers().get("access-control-allow-origin").is_none());
    // /health is behind the same guard.
    let health = "GET /health HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n";
    let answer = raw(server.addr, health.as_bytes(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(status_of(&answer), 403, "{answer}");
}

/// Opens an SDK websocket with `origin` (if any); the handshake's status on refusal.
async fn sdk_socket(
    server: &Server,
    origin: Option<&str>,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>, u16> {
    let mut request = format!("ws://{}/llm", server.addr)
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(other) => panic!("{other}"),
    }
}

/// The SDK's first message and the server's answer to it (`None`: the socket was closed).
async fn authenticate(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    passkey: &str,
) -> Option<Value> {
    let hello = json!({"authVersion": 1, "clientIdentifier": "test", "clientPasskey": passkey});
    socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .ok()?;
    next_json(socket).await
}

async fn next_json(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => return serde_json::from_str(&text).ok(),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("no answer within 10 s"),
        }
    }
}

#[tokio::test]
async fn sdk_websockets_check_origins_passkeys_and_scopes() {
    let server = serve(keyed()).await;
    assert_eq!(
        sdk_socket(&server, Some("https://evil.example"))
            .await
            .err(),
        Some(403)
    );
    // A desktop app's origin and no origin (the Python SDK) are served.
    let mut socket = sdk_socket(&server, Some("app://lmstudio")).await.unwrap();
    let answer = authenticate(&mut socket, "wrong").await.unwrap();
    assert_eq!(answer["success"], false, "{answer}");
    let mut socket = sdk_socket(&server, None).await.unwrap();
    assert_eq!(
        authenticate(&mut socket, "sk-chat").await.unwrap()["success"],
        true
    );
    // An inference key may list but not unload.
    let call = |id: u64, endpoint: &str| {
        json!({"type": "rpcCall", "callId": id, "endpoint": endpoint,
               "parameter": {"identifier": MODEL}})
    };
    socket
        .send(Message::Text(call(1, "unloadModel").to_string().into()))
        .await
        .unwrap();
    let answer = next_json(&mut socket).await.unwrap();
    assert_eq!(answer["type"], "rpcError", "{answer}");
    assert!(
        answer["error"]["title"]
            .as_str()
            .unwrap()
            .contains("`models` scope"),
        "{answer}"
    );
    socket
        .send(Message::Text(call(2, "getLoadConfig").to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "rpcResult");
}

/// A websocket handshake by hand, for writing frames the client never holds in memory.
async fn raw_upgrade(addr: std::net::SocketAddr) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /llm HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    socket
}

#[tokio::test]
async fn unauthenticated_websockets_cost_a_bounded_amount() {
    let server = serve(keyed()).await;
    let (rss_before, _) = rss_kib();
    // 16 first messages of 16 MiB, streamed as one frame each (the client holds none of it):
    // each socket is closed once 64 KiB have arrived.
    let mut floods = Vec::new();
    for _ in 0..16 {
        let addr = server.addr;
        floods.push(tokio::spawn(async move {
            let mut socket = raw_upgrade(addr).await;
            // FIN + text, masked, 64-bit length.
            let mut head = vec![0x81u8, 0xFF];
            head.extend_from_slice(&(16u64 << 20).to_be_bytes());
            head.extend_from_slice(&[0, 0, 0, 0]);
            socket.write_all(&head).await.unwrap();
            let chunk = vec![b'x'; 64 << 10];
            let mut sent = 0usize;
            while sent < 16 << 20 {
                if socket.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len();
            }
            sent
        }));
    }
    for flood in floods {
        let sent = flood.await.unwrap();
        assert!(
            sent < 16 << 20,
            "the server read a whole 16 MiB first message"
        );
    }
    // 1,000 held sockets that never say a word: all but the newest few are closed.
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(sdk_socket(&server, None).await.unwrap());
    }
    let (_, peak) = rss_kib();
    let grown_mib = peak.saturating_sub(rss_before) / 1024;
    println!(
        "peak RSS grew {grown_mib} MiB (server and client in this process): 16 x 16 MiB first \
         messages, 1000 held sockets"
    );
    // 16 buffered messages alone would be 256 MiB.
    assert!(grown_mib < 64, "grew {grown_mib} MiB");
    let mut closed = 0;
    for socket in held.iter_mut().take(900) {
        if next_json(socket).await.is_none() {
            closed += 1;
        }
    }
    assert_eq!(closed, 900, "the oldest waiting sockets were closed");
    // A real client still gets in at once, and may send large messages once it is in.
    let mut socket = sdk_socket(&server, None).await.unwrap();
    assert_eq!(
        authenticate(&mut socket, "sk-chat").await.unwrap()["success"],
        true
    );
    let call = json!({"type": "rpcCall", "callId": 1, "endpoint": "getLoadConfig",
                      "parameter": {"padding": "x".repeat(1 << 20)}});
    socket
        .send(Message::Text(call.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "rpcResult");
}

#[tokio::test]
async fn the_scope_matrix() {
    let server = serve(keyed()).await;
    use reqwest::Method;
    let load = json!({"model": MODEL});
    // (method, path, body, scope it needs)
    let routes: Vec<(Method, &str, Option<Value>, &str)> = vec![
        (Method::GET, "/v1/models", None, "inference"),
        (
            Method::POST,
            "/v1/chat/completions",
            Some(chat("hi")),
            "inference",
        ),
        (
            Method::POST,
            "/tokenize",
            Some(json!({"content": "hi"})),
            "inference",
        ),
        (Method::GET, "/api/tags", None, "inference"),
        (Method::GET, "/api/v0/models", None, "inference"),
        (
            Method::POST,
            "/v1/models/load",
            Some(load.clone()),
            "models",
        ),
        (Method::POST, "/v1/models/rescan", None, "models"),
        (
            Method::POST,
            "/api/v1/models/load",
            Some(load.clone()),
            "models",
        ),
        (Method::GET, "/metrics", None, "metrics"),
    ];
    let keys = [
        ("sk-chat", vec!["inference"]),
        ("sk-admin", vec!["inference", "models"]),
        ("sk-scrape", vec!["metrics"]),
    ];
    for (method, path, body, scope) in &routes {
        let (status, answer) = request(&server, method.clone(), path, None, body.clone()).await;
        assert_eq!(status, 401, "{path} without a key: {answer}");
        for (key, scopes) in &keys {
            let (status, answer) =
                request(&server, method.clone(), path, Some(key), body.clone()).await;
            if scopes.contains(scope) {
                assert!(
                    status != 401 && status != 403,
                    "{key} {path}: {status} {answer}"
                );
            } else {
                assert_eq!(status, 403, "{key} {path}: {answer}");
                assert_eq!(answer["error"]["code"], "insufficient_permissions");
            }
        }
    }
    // A refusal for scope leaves the body unread, so it closes the connection and says so: a
    // client's next request on it (here a plain one) is never sent into a closing connection.
    let client = reqwest::Client::new();
    for round in 0..10 {
        let refused = client
            .post(format!("{}/v1/models/load", server.url))
            .bearer_auth("sk-chat")
            .json(&json!({"model": "x".repeat(4096)}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403);
        assert_eq!(refused.headers()["connection"], "close", "round {round}");
        let next = client
            .get(format!("{}/health", server.url))
            .send()
            .await
            .unwrap_or_else(|e| panic!("round {round}: the next request failed: {e}"));
        assert_eq!(next.status(), 200);
    }
    // Ollama's unload (keep_alive 0) needs `models` too (a reload for a larger `num_ctx` is
    // checked on the real model, `tests/many_models.rs`).
    let unload = json!({"model": MODEL, "keep_alive": 0});
    let (status, answer) = request(
        &server,
        Method::POST,
        "/api/generate",
        Some("sk-chat"),
        Some(unload.clone()),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = request(
        &server,
        Method::POST,
        "/api/chat",
        Some("sk-chat"),
        Some(unload),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    // The sandbox route is not there without --sandbox, for anyone.
    let (status, _) = request(
        &server,
        Method::POST,
        "/v1/sandbox/exec",
        Some("sk-admin"),
        Some(json!({"command": "id"})),
    )
    .await;
    assert_eq!(status, 404);
}

/// `GET /metrics` with `key`: the exposition text.
async fn scrape(server: &Server, key: &str) -> String {
    let (_, metrics) = request(server, reqwest::Method::GET, "/metrics", Some(key), None).await;
    metrics.as_str().unwrap().to_owned()
}

/// `GET /v1/models` with `key`, which must be a 429: its `Retry-After` and body.
async fn rate_limited(server: &Server, key: &str) -> (u64, Value) {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/models", server.url))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let wait = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (wait, response.json().await.unwrap())
}

#[tokio::test]
async fn a_key_over_its_rate_gets_429_with_retry_after() {
    let server = serve(keyed()).await;
    for _ in 0..2 {
        let (status, _) = request(
            &server,
            reqwest::Method::GET,
            "/v1/models",
            Some("sk-slow"),
            None,
        )
        .await;
        assert_eq!(status, 200);
    }
    let (wait, body) = rate_limited(&server, "sk-slow").await;
    assert!((20..=31).contains(&wait), "{wait}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // Other keys are not affected.
    let (status, _) = request(
        &server,
        reqwest::Method::GET,
        "/v1/models",
        Some("sk-chat"),
        None,
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn metric_labels_come_from_a_fixed_set() {
    let server = serve(ApiConfig {
        metrics: true,
        ..ApiConfig::default()
    })
    .await;
    for method in ["FOO", "BAR", "PROPFIND"] {
        let request =
            format!("{method} /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let answer = raw(server.addr, request.as_bytes(), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(status_of(&answer), 405, "{answer}");
    }
    let (_, text) = request(&server, reqwest::Method::GET, "/metrics", None, None).await;
    let text = text.as_str().unwrap();
    assert!(text.contains("method=\"other\""), "{text}");
    for method in ["FOO", "BAR", "PROPFIND"] {
        assert!(!text.contains(method), "{method} became a label");
    }
}

#[tokio::test]
async fn clients_without_the_models_scope_never_see_host_paths() {
    let dir = std::env::temp_dir().join(format!("lmsbx-secret-dir-{}", std::process::id()));
    let server = serve(ApiConfig {
        model_path: Some(tiny_gguf(&dir)),
        ..keyed()
    })
    .await;
    let show = json!({"model": MODEL});
    let secret = dir.display().to_string();
    let (status, chat) = request(
        &server,
        reqwest::Method::POST,
        "/api/show",
        Some("sk-chat"),
        Some(show.clone()),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let modelfile = chat["modelfile"].as_str().unwrap();
    assert!(modelfile.contains("FROM tiny.gguf"), "{modelfile}");
    assert!(!chat.to_string().contains(&secret), "{chat}");
    let (_, admin) = request(
        &server,
        reqwest::Method::POST,
        "/api/show",
        Some("sk-admin"),
        Some(show),
    )
    .await;
    assert!(admin["modelfile"].as_str().unwrap().contains(&secret));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn answers_whose_size_the_client_controls_have_budgets() {
    let server = serve_with(ApiConfig::default(), 16384).await;
    use reqwest::Method;
    // Token pieces: one object per token.
    let content = "字".repeat(100_000); // 300,000 bytes: a token per byte for the fake model
    let (status, answer) = request(
        &server,
        Method::POST,
        "/tokenize",
        None,
        Some(json!({"content": content, "with_pieces": true})),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "with_pieces");
    assert!(answer.to_string().contains("262144"), "{answer}");
    let (status, answer) = request(
        &server,
        Method::POST,
        "/tokenize",
        None,
        Some(json!({"content": content})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["tokens"].as_array().unwrap().len(), 300_000);
    // Log-probabilities × choices × tokens.
    let mut body = chat("hi");
    body["n"] = json!(8);
    body["max_tokens"] = json!(16000);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(20);
    let (status, answer) = request(
        &server,
        Method::POST,
        "/v1/chat/completions",
        None,
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["param"], "logprobs");
    body["max_tokens"] = json!(4);
    let (status, answer) = request(
        &server,
        Method::POST,
        "/v1/chat/completions",
        None,
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Bodies that would parse into values many times their size.
    let deep = format!("{{\"model\": {}{}}}", "[".repeat(1000), "]".repeat(1000));
    let wide = format!(
        "{{\"model\": \"{MODEL}\", \"input\": [{}0]}}",
        "0,".repeat(2_000_000)
    );
    for (path, body) in [("/v1/chat/completions", deep), ("/v1/embeddings", wide)] {
        let response = reqwest::Client::new()
            .post(format!("{}{path}", server.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["param"], "body", "{answer}");
        assert!(answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"));
    }
}

#[tokio::test]
async fn connections_without_a_key_have_a_cap_of_their_own() {
    use lm_sandbox::server::MAX_UNPROVEN_CONNECTIONS;
    // A long header deadline: only the cap can close these.
    let server = serve_full(keyed(), 512, Duration::from_secs(60)).await;
    let extra = 100;
    let mut silent = Vec::new();
    for _ in 0..MAX_UNPROVEN_CONNECTIONS + extra {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // A keyed client still gets in (its connection pushes out the oldest silent one).
    let (status, _) = request(
        &server,
        reqwest::Method::GET,
        "/v1/models",
        Some("sk-chat"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    // The oldest `extra` (and one more, for the keyed client) were closed long before their
    // header deadline; the newest are still open.
    for (i, socket) in silent.iter_mut().enumerate().take(extra + 1) {
        assert_eq!(
            read_until_closed(socket, Duration::from_secs(10))
                .await
                .as_deref(),
            Some(""),
            "silent connection {i} is still open"
        );
    }
    // A keyless request on a keyed server (here /health) gets its answer and the connection
    // closes: it cannot sit idle outside the cap.
    let health = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let answer = raw(server.addr, health.as_bytes(), Duration::from_secs(10))
        .await
        .expect("closed after one answer");
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let newest = silent.last_mut().unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), newest.read(&mut byte))
            .await
            .is_err(),
        "the newest silent connection was closed"
    );
}

#[tokio::test]
async fn a_key_uses_only_its_models_and_its_tokens() {
    let server = serve(keyed()).await;
    use reqwest::Method;
    let (status, answer) = request(
        &server,
        Method::POST,
        "/v1/chat/completions",
        Some("sk-narrow"),
        Some(chat("hi")),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer.to_string().contains("may not use the model"),
        "{answer}"
    );
    // Listings show a key only its models.
    for (path, key, field, count) in [
        ("/v1/models", "sk-narrow", "data", 0),
        ("/v1/models", "sk-chat", "data", 1),
        ("/api/tags", "sk-narrow", "models", 0),
    ] {
        let (status, list) = request(&server, Method::GET, path, Some(key), None).await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(
            list[field].as_array().unwrap().len(),
            count,
            "{path} {key}: {list}"
        );
    }
    // The token rate is charged as each answer ends: the first (~25 tokens) overspends 10 a
    // minute, so the next request waits.
    let (status, answer) = request(
        &server,
        Method::POST,
        "/v1/chat/completions",
        Some("sk-thrifty"),
        Some(chat("hi")),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (wait, body) = rate_limited(&server, "sk-thrifty").await;
    assert!(wait >= 60, "{wait}");
    assert!(body.to_string().contains("tokens per minute"), "{body}");
}

/// A sandbox executor that runs nothing: it takes its "slot", calls the start hook, and answers.
struct NoopExecutor;

impl lm_sandbox::sandbox::Executor for NoopExecutor {
    fn exec(
        &self,
        _caller: &lm_sandbox::sandbox::Caller,
        _request: lm_sandbox::sandbox::ExecRequest,
        start: lm_sandbox::sandbox::StartHook,
    ) -> lm_sandbox::sandbox::ExecFuture<'_> {
        Box::pin(async move {
            start().await?;
            Ok(lm_sandbox::sandbox::ExecOutput {
                stdout: String::new(),
                stderr: String::new(),
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                truncated: false,
                cancelled: false,
                duration_ms: 0,
                stdout_bytes: 0,
                stderr_bytes: 0,
            })
        })
    }
}

#[tokio::test]
async fn a_full_disk_refuses_commands_and_counts_them() {
    // /dev/full: every write is "No space left on device".
    let sandbox = lm_sandbox::sandbox::Sandbox::new(
        Arc::new(NoopExecutor),
        lm_sandbox::sandbox::AuditLog::open(std::path::Path::new("/dev/full"))
            .await
            .unwrap(),
        lm_sandbox::sandbox::SandboxLimits::default(),
    );
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let app = router(AppState::from_parts(
        engine,
        ApiConfig {
            model_ids: vec![MODEL.into()],
            api_keys: parse_keys_file("sk-run inference,sandbox,metrics\n").unwrap(),
            metrics: true,
            ..ApiConfig::default()
        },
        None,
        Some(sandbox),
    ));
    let server = serve_app(app, Duration::from_secs(2)).await;
    let (status, answer) = request(
        &server,
        reqwest::Method::POST,
        "/v1/sandbox/exec",
        Some("sk-run"),
        Some(json!({"command": "true"})),
    )
    .await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"]["code"], "audit_unavailable");
    let text = scrape(&server, "sk-run").await;
    let text = text.as_str();
    assert!(
        text.lines()
            .any(|l| l.starts_with("lmsandbox_sandbox_commands_total")
                && l.contains("outcome=\"audit_failed\"")
                && l.ends_with(" 1")),
        "{text}"
    );
}
