//! The server under hostile clients and a failing engine, over real sockets with the fake engine:
//! an engine panic (500 `engine_failed`, `/health` 503 with the reason, reload, 200 again), the
//! in-flight cap (503 + Retry-After, counted), slow-loris headers and bodies, SSE keep-alive.

use std::time::{Duration, Instant};

use lm_sandbox::api::{router, ApiConfig, AppState};
use lm_sandbox::engine::fake::{FakeRunner, FAKE_PANIC_PROMPT};
use lm_sandbox::engine::{RestartPolicy, WorkerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const MODEL: &str = "fake-model";

struct Server {
    url: String,
    addr: std::net::SocketAddr,
    _stop: watch::Sender<bool>,
}

fn worker() -> WorkerConfig {
    WorkerConfig {
        n_seq: 2,
        n_batch: 256,
        n_ctx_seq: 512,
        max_queue: 8,
    }
}

async fn serve(runner: FakeRunner, policy: RestartPolicy, api: ApiConfig) -> Server {
    let engine = runner.spawn_with_policy(worker(), policy);
    let app = router(AppState::new(
        engine,
        ApiConfig {
            model_ids: vec![MODEL.into()],
            ..api
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(lm_sandbox::server::serve_connections(
        listener,
        app,
        Duration::from_millis(500),
        stopped,
    ));
    Server {
        url: format!("http://{addr}"),
        addr,
        _stop: stop,
    }
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

async fn post(server: &Server, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn health(server: &Server) -> (u16, Value) {
    let response = reqwest::get(format!("{}/health", server.url))
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn an_engine_panic_is_a_500_then_health_503_then_a_reload() {
    let policy = RestartPolicy {
        max_restarts: 3,
        backoff: Duration::from_millis(400),
        healthy_after: Duration::from_secs(60),
    };
    let server = serve(
        FakeRunner::new(Duration::ZERO),
        policy,
        ApiConfig::default(),
    )
    .await;
    assert_eq!(health(&server).await.0, 200);
    let (status, body) = post(&server, &chat(FAKE_PANIC_PROMPT)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "engine_failed", "{body}");
    // While it reloads, the health check says so, with the reason, and requests get 503.
    let (status, body) = health(&server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failed");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("injected engine fault"),
        "{body}"
    );
    assert_eq!(post(&server, &chat("hi")).await.0, 503);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&server).await.0 != 200 {
        assert!(Instant::now() < deadline, "the engine did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = post(&server, &chat("hi")).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_engine_that_keeps_failing_stays_failed() {
    let policy = RestartPolicy {
        max_restarts: 1,
        backoff: Duration::from_millis(50),
        healthy_after: Duration::from_secs(60),
    };
    let server = serve(
        FakeRunner::new(Duration::ZERO),
        policy,
        ApiConfig::default(),
    )
    .await;
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while health(&server).await.0 != 200 {
            assert!(Instant::now() < deadline, "the engine did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(post(&server, &chat(FAKE_PANIC_PROMPT)).await.0, 500);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = health(&server).await;
    assert_eq!(status, 503);
    assert!(
        body["reason"].as_str().unwrap().contains("not restarting"),
        "{body}"
    );
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_are_shed_with_retry_after() {
    let api = ApiConfig {
        max_in_flight: 2,
        ..ApiConfig::default()
    };
    // Slow decoding keeps the first two streams in flight.
    let server = serve(
        FakeRunner::new(Duration::from_millis(30)),
        RestartPolicy::default(),
        api,
    )
    .await;
    let mut body = chat(&"long prompt ".repeat(10));
    body["stream"] = json!(true);
    let client = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = client
            .post(format!("{}/v1/chat/completions", server.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    let response = client
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&chat("one more"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "server_overloaded");
    // The health check is never shed, and counts what was.
    let (status, health) = health(&server).await;
    assert_eq!(status, 200);
    assert_eq!(health["requests"]["shed"], 1, "{health}");
    assert_eq!(health["requests"]["in_flight"], 2, "{health}");
    assert!(health.get("build").is_none(), "no git revision by default");
    // Finishing the streams frees their permits.
    for stream in streams {
        let _ = stream.text().await.unwrap();
    }
    assert_eq!(post(&server, &chat("now")).await.0, 200);
}

/// Reads until the server closes the connection (or `limit` passes); returns what it sent.
async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&out).into_owned()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_slow_loris_cannot_hold_a_connection() {
    let server = serve(
        FakeRunner::new(Duration::ZERO),
        RestartPolicy::default(),
        ApiConfig {
            body_timeout: Duration::from_millis(500),
            ..ApiConfig::default()
        },
    )
    .await;
    // Headers that never end: the connection is closed at the header deadline (500 ms here).
    let started = Instant::now();
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = socket.write_all(b"X-Slow: 1\r\n").await;
    }
    let answer = read_until_closed(&mut socket, Duration::from_secs(5)).await;
    assert!(answer.is_some(), "the connection was held open");
    assert!(started.elapsed() < Duration::from_secs(3));
    // A connection that never sends a byte is closed at the same deadline.
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    assert!(read_until_closed(&mut silent, Duration::from_secs(5))
        .await
        .is_some());
    assert!(started.elapsed() < Duration::from_secs(3));
    // A body that trickles: 408 at the body deadline.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"model\"",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut socket, Duration::from_secs(5))
        .await
        .expect("answered in time");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Meanwhile the server serves others.
    assert_eq!(post(&server, &chat("hi")).await.0, 200);
}

#[tokio::test]
async fn a_waiting_stream_gets_keep_alive_comments() {
    let server = serve(
        // Each decode step takes 250 ms: the stream waits between chunks.
        FakeRunner::new(Duration::from_millis(250)),
        RestartPolicy::default(),
        ApiConfig {
            sse_keep_alive: Duration::from_millis(50),
            ..ApiConfig::default()
        },
    )
    .await;
    let mut body = chat("ab");
    body["stream"] = json!(true);
    let text = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", server.url))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.lines().any(|l| l.starts_with(':')),
        "no keep-alive comment: {text}"
    );
    assert!(text.contains("[DONE]"));
}
