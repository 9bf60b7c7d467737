//! The router through `oneshot` against the fake engine: every error status and body, SSE framing,
//! `[DONE]`, the usage chunk, 429, cancellation. No model, no sockets.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use lm_sandbox::api::{router, ApiConfig, ApiKey, AppState, MAX_BODY_BYTES};
use lm_sandbox::engine::fake::{FakeLog, FakeRunner};
use lm_sandbox::engine::{EngineHandle, EngineState, WorkerConfig};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;

const MODEL: &str = "fake-model";

struct Harness {
    app: Router,
    log: Arc<Mutex<FakeLog>>,
}

fn api_config(keys: &[&str]) -> ApiConfig {
    ApiConfig {
        model_ids: vec![MODEL.into(), "alias".into()],
        api_keys: keys.iter().map(|k| ApiKey::new(*k, false)).collect(),
        n_predict: None,
        chat_template: None,
        created: 1_700_000_000,
        max_tool_rounds: 16,
        ..ApiConfig::default()
    }
}

fn harness_with(config: WorkerConfig, delay: Duration, keys: &[&str]) -> Harness {
    harness_with_api(config, delay, api_config(keys))
}

fn harness_with_api(config: WorkerConfig, delay: Duration, api: ApiConfig) -> Harness {
    let runner = FakeRunner::new(delay);
    let log = Arc::clone(&runner.log);
    let engine = runner.spawn(config);
    Harness {
        app: router(AppState::new(engine, api)),
        log,
    }
}

fn harness() -> Harness {
    harness_with(
        WorkerConfig {
            n_seq: 4,
            n_batch: 512,
            n_ctx_seq: 512,
            max_queue: 8,
        },
        Duration::ZERO,
        &[],
    )
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn send(app: &Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn send_json(app: &Router, request: Request<Body>) -> (StatusCode, Value) {
    let (status, _, body) = send(app, request).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}")),
    )
}

/// Asserts OpenAI's error shape: all four keys present, and returns the error object.
fn error_of(body: &Value) -> &Value {
    let error = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(error.get(key).is_some(), "error lacks `{key}`: {body}");
    }
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    error
}

fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

/// The fake template renders `<|user|>hi\n<|assistant|>` and the echo model repeats it.
fn echoed(content: &str) -> String {
    format!("<|user|>{content}\n<|assistant|>")
}

#[tokio::test]
async fn chat_completion_has_openai_shape_and_usage() {
    let h = harness();
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("hi"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], echoed("hi"));
    assert_eq!(choice["finish_reason"], "stop");
    let prompt_len = echoed("hi").len() as u64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(
        body["usage"]["completion_tokens"],
        prompt_len + 1,
        "echo plus EOS"
    );
    assert_eq!(body["usage"]["total_tokens"], 2 * prompt_len + 1);
}

#[tokio::test]
async fn routes_answer_without_the_v1_prefix_and_to_aliases() {
    let h = harness();
    let mut body = chat("x");
    body["model"] = json!("alias");
    let (status, resp) = send_json(&h.app, post("/chat/completions", body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp["model"], "alias");
    let (status, models) =
        send_json(&h.app, Request::get("/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "alias"]);
    let (status, model) = send_json(
        &h.app,
        Request::get("/v1/models/alias")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, model["id"].clone(), model["object"].clone()),
        (StatusCode::OK, json!("alias"), json!("model"))
    );
}

#[tokio::test]
async fn every_client_mistake_is_a_4xx_with_an_openai_error_body() {
    let h = harness();
    // (request, status, expected `param`, expected `code`)
    type Case = (
        Request<Body>,
        StatusCode,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            Request::post("/v1/chat/completions")
                .body(Body::from("{not json"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            Request::post("/v1/chat/completions")
                .body(Body::from("[1,2]"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            post("/v1/chat/completions", json!({"model": MODEL})),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post("/v1/chat/completions", json!({"messages": []})),
            StatusCode::BAD_REQUEST,
            Some("model"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": []}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": "hi"}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user"}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].content"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].content[0].type"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "warm"}),
            ),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            ),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
            ),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            post("/v1/completions", json!({"model": MODEL, "prompt": 5})),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            None,
        ),
        (
            post(
                "/v1/completions",
                json!({"model": MODEL, "prompt": [1, 99999]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("prompt[1]"),
            None,
        ),
        (
            post("/v1/completions", json!({"model": MODEL, "prompt": []})),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            None,
        ),
        (
            Request::get("/v1/nope").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            None,
            Some("unknown_url"),
        ),
        (
            Request::get("/v1/models/gpt-4")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            Request::get("/v1/chat/completions")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            Some("method_not_allowed"),
        ),
    ];
    for (request, want_status, want_param, want_code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, body) = send_json(&h.app, request).await;
        assert_eq!(status, want_status, "{what}: {body}");
        let error = error_of(&body);
        if let Some(param) = want_param {
            assert_eq!(error["param"], param, "{what}: {body}");
        }
        if let Some(code) = want_code {
            assert_eq!(error["code"], code, "{what}: {body}");
        }
    }
}

#[tokio::test]
async fn an_out_of_range_value_names_the_field_the_limit_and_the_value() {
    let h = harness();
    let mut body = chat("x");
    body["top_p"] = json!(1.7);
    let (status, resp) = send_json(&h.app, post("/v1/chat/completions", body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = error_of(&resp);
    assert_eq!(error["param"], "top_p");
    assert_eq!(error["type"], "invalid_request_error");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("top_p") && message.contains("between 0 and 1") && message.contains("1.7"),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let h = harness();
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat(&big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&body)["code"], "request_too_large");
}

#[tokio::test]
async fn a_prompt_that_cannot_fit_the_context_is_400_context_length_exceeded() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 64,
            max_queue: 1,
        },
        Duration::ZERO,
        &[],
    );
    let (status, body) =
        send_json(&h.app, post("/v1/chat/completions", chat(&"y".repeat(100)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
    // Fits alone, but not with the tokens asked for; streaming gets the same 400, before any byte.
    let mut request = chat("short");
    request["max_tokens"] = json!(60);
    request["stream"] = json!(true);
    let (status, headers, text) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
    assert!(
        h.log.lock().unwrap().begun.is_empty(),
        "nothing reached the engine"
    );
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 256,
            max_queue: 1,
        },
        Duration::ZERO,
        &["sk-one", "sk-two"],
    );
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    let wrong = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-three")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send_json(&h.app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let unknown_route = Request::get("/v1/secret").body(Body::empty()).unwrap();
    assert_eq!(
        send_json(&h.app, unknown_route).await.0,
        StatusCode::UNAUTHORIZED,
        "no route probing without a key"
    );
    let right = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-two")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send_json(&h.app, right).await.0, StatusCode::OK);
    let health = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(send_json(&h.app, health).await.0, StatusCode::OK);
}

#[tokio::test]
async fn while_loading_health_and_inference_are_503() {
    let (commands, _keep) = mpsc::channel(1);
    let (_state_tx, state_rx) = watch::channel(EngineState::Loading);
    let app = router(AppState::new(
        EngineHandle::new(commands, state_rx),
        api_config(&[]),
    ));
    let (status, body) =
        send_json(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["code"], "model_loading");
    let (status, body) = send_json(&app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["type"], "unavailable_error");
}

/// Splits an SSE body into its `data:` payloads.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad frame {frame:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn streamed_chat_frames_follow_openai_and_match_the_unstreamed_text() {
    let h = harness();
    let mut request = chat("héllo 🦀");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let frames = sse_data(&body);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, echoed("héllo 🦀"));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["usage"], Value::Null);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        echoed("héllo 🦀").len() as u64
    );
    // No chunk but the last carries usage; no text chunk carries a finish_reason.
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("héllo 🦀"))).await;
    assert_eq!(plain["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn stop_strings_cut_streamed_and_unstreamed_text_alike() {
    let h = harness();
    let mut request = chat("one STOP two");
    request["stop"] = json!(["STOP", "never"]);
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(plain["choices"][0]["message"]["content"], "<|user|>one ");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    request["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/v1/chat/completions", request)).await;
    let streamed: String = sse_data(&body)
        .iter()
        .filter(|f| *f != "[DONE]")
        .filter_map(|f| {
            serde_json::from_str::<Value>(f).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, "<|user|>one ");
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let h = harness();
    let mut request = chat("abcdef");
    request["max_completion_tokens"] = json!(4);
    let (_, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(body["choices"][0]["message"]["content"], "<|us");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

/// The `text` of every choice of a completion, in order.
fn choice_texts(body: &Value) -> Vec<&str> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn completions_take_strings_batches_and_tokens() {
    let h = harness();
    let (status, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "abc", "max_tokens": 10}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "abc");
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["ab", "xyz"], "max_tokens": 10}),
        ),
    )
    .await;
    let texts = choice_texts(&body);
    assert_eq!(texts, vec!["ab", "xyz"]);
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [104, 105], "max_tokens": 10}),
        ),
    )
    .await;
    assert_eq!(body["choices"][0]["text"], "hi");
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "ab", "echo": true, "n": 2}),
        ),
    )
    .await;
    let texts = choice_texts(&body);
    assert_eq!(texts, vec!["abab", "abab"]);
    assert_eq!(
        body["usage"]["prompt_tokens"], 2,
        "the prompt counts once for n choices"
    );
    // Completions default to 16 tokens, as OpenAI's do.
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x".repeat(40)}),
        ),
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streamed_completions_end_with_done() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": ["ab", "cd"], "stream": true, "max_tokens": 10});
    let (_, _, body) = send(&h.app, post("/v1/completions", request)).await;
    let frames = sse_data(&body);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let mut texts = [String::new(), String::new()];
    let mut finished = 0;
    for frame in &frames[..frames.len() - 1] {
        let chunk: Value = serde_json::from_str(frame).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        let choice = &chunk["choices"][0];
        texts[choice["index"].as_u64().unwrap() as usize] += choice["text"].as_str().unwrap();
        finished += usize::from(choice["finish_reason"].is_string());
    }
    assert_eq!(texts, ["ab".to_string(), "cd".to_string()]);
    assert_eq!(finished, 2);
}

async fn wait_for(log: &Arc<Mutex<FakeLog>>, what: &str, done: impl Fn(&FakeLog) -> bool) {
    for _ in 0..500 {
        if done(&log.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_full_queue_is_429_with_retry_after() {
    let mut api = api_config(&[]);
    api.metrics = true;
    let h = harness_with_api(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 4096,
            max_queue: 1,
        },
        Duration::from_millis(20),
        api,
    );
    let long = chat(&"z".repeat(300));
    let spawn_send = |body: Value| {
        let app = h.app.clone();
        tokio::spawn(async move { send(&app, post("/v1/chat/completions", body)).await })
    };
    let running = spawn_send(long.clone());
    wait_for(&h.log, "the first request to start", |l| l.begun.len() == 1).await;
    let queued = spawn_send(long.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, headers, body) = send(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_of(&body)["code"], "queue_full");
    // Counted as shed, and visible while the queue is full.
    let (_, _, text) = send(
        &h.app,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let queue_full = [("reason", "queue_full")];
    assert_eq!(
        sample(&text, "lmsandbox_requests_shed_total", &queue_full),
        1.0
    );
    let model = [("model", MODEL)];
    assert_eq!(sample(&text, "llamacpp:requests_processing", &model), 1.0);
    assert_eq!(sample(&text, "llamacpp:requests_deferred", &model), 1.0);
    running.abort();
    queued.abort();
}

#[tokio::test]
async fn a_dropped_stream_cancels_its_sequence_and_a_queued_request_starts() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 4096,
            max_queue: 4,
        },
        Duration::from_millis(5),
        &[],
    );
    let mut request = chat(&"w".repeat(1000));
    request["stream"] = json!(true);
    let response = h
        .app
        .clone()
        .oneshot(post("/v1/chat/completions", request))
        .await
        .unwrap();
    let mut body = response.into_body();
    // Read a few frames, then hang up.
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    let queued = tokio::spawn({
        let app = h.app.clone();
        async move { send_json(&app, post("/v1/chat/completions", chat("next"))).await }
    });
    drop(body);
    wait_for(&h.log, "the dropped stream's sequence to end", |l| {
        l.ended.contains(&0)
    })
    .await;
    let (status, resp) = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp["choices"][0]["message"]["content"], echoed("next"));
    // The cancelled sequence decoded far fewer than its 1000+ tokens.
    let decoded_for_first: usize = h
        .log
        .lock()
        .unwrap()
        .batches
        .iter()
        .flatten()
        .filter(|e| e.pos > 1100)
        .count();
    assert_eq!(decoded_for_first, 0);
}

#[tokio::test]
async fn unsupported_features_are_refused_clearly_not_ignored() {
    let h = harness();
    for (field, value, param) in [
        ("top_logprobs", json!(3), "top_logprobs"),
        ("top_logprobs", json!(21), "top_logprobs"),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}),
            "response_format.json_schema.schema",
        ),
        (
            "response_format",
            json!({"type": "yaml"}),
            "response_format.type",
        ),
    ] {
        let mut request = chat("x");
        request[field] = value;
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
    let mut request = chat("x");
    request["response_format"] = json!({"type": "text"});
    assert_eq!(
        send_json(&h.app, post("/v1/chat/completions", request))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn content_parts_and_developer_messages_render() {
    let h = harness();
    let request = json!({"model": MODEL, "messages": [
        {"role": "developer", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ], "max_tokens": 100});
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "<|system|>be nice\n<|user|>a\nb\n<|assistant|>"
    );
}

#[tokio::test]
async fn a_repeated_prompt_reports_cached_tokens_in_usage_and_timings() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 512,
            n_ctx_seq: 512,
            max_queue: 1,
        },
        Duration::ZERO,
        &[],
    );
    let (_, cold) = send_json(&h.app, post("/v1/chat/completions", chat("same"))).await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, warm) = send_json(&h.app, post("/v1/chat/completions", chat("same"))).await;
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    // All of it: the cells, and the logits kept after its last token (nothing is decoded again).
    assert_eq!(
        warm["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt
    );
    assert_eq!(warm["timings"]["cache_n"], prompt);
    assert_eq!(warm["timings"]["prompt_n"], 0);
    assert_eq!(warm["timings"]["prompt_per_second"], 0.0);
    assert_eq!(cold["choices"][0]["message"], warm["choices"][0]["message"]);
}

const GIB: u64 = 1 << 30;

/// A one-GPU inventory and the plan for a small fake model on it.
fn fake_placement() -> (
    lm_sandbox::gpu::placement::Placement,
    lm_sandbox::gpu::inventory::Inventory,
) {
    use lm_sandbox::gpu::gguf::ModelFacts;
    use lm_sandbox::gpu::inventory::{Gpu, Inventory};
    use lm_sandbox::gpu::placement::{ModelSummary, Placement};
    use lm_sandbox::gpu::plan::{plan, PlanConfig};
    let facts = ModelFacts {
        architecture: "llama".into(),
        n_layer: 4,
        n_ctx_train: 4096,
        n_embd: 512,
        n_head: 8,
        n_vocab: 1000,
        n_head_kv: vec![2; 4],
        key_length: 64,
        value_length: 64,
        sliding_window: None,
        swa_layers: Vec::new(),
        layer_bytes: vec![10_000_000; 4],
        output_bytes: 1_000_000,
        embedding_bytes: 1_000_000,
        file_bytes: 42_000_000,
    };
    let gpu = Gpu {
        name: "Fake GPU".into(),
        uuid: "GPU-fake".into(),
        pci_bus_id: "00000000:01:00.0".into(),
        memory_total: 8 * GIB,
        memory_free: 8 * GIB,
        memory_used: 0,
        compute_capability: [8, 6],
        utilization_percent: Some(0),
        temperature_celsius: Some(61),
        power_watts: Some(87.5),
        display_attached: false,
        other_process_memory: 0,
        remote: None,
    };
    let inventory = Inventory {
        gpus: vec![gpu],
        ram_available: 16 * GIB,
        driver_version: None,
        unavailable: None,
    };
    let placed = plan(&facts, &inventory, &PlanConfig::default()).unwrap();
    let placement = Placement {
        model: ModelSummary {
            architecture: "llama".into(),
            n_layer: 4,
            n_ctx_train: 4096,
            file_bytes: 42_000_000,
            n_ctx: 4096,
            n_seq: 1,
        },
        plan: placed,
    };
    (placement, inventory)
}

#[tokio::test]
async fn placement_shows_the_plan_and_live_gpu_memory() {
    let (placement, inventory) = fake_placement();
    let (gpus_tx, gpus_rx) = watch::channel(inventory.clone());
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let app = router(AppState::with_placement(
        engine,
        api_config(&[]),
        placement,
        gpus_rx,
    ));
    let get = || Request::get("/v1/placement").body(Body::empty()).unwrap();
    let (status, body) = send_json(&app, get()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["plan"]["n_gpu_layers"], 5);
    assert_eq!(body["plan"]["devices"][0]["pci_bus_id"], "00000000:01:00.0");
    assert_eq!(body["gpus"]["gpus"][0]["memory_free"], 8 * GIB);
    assert_eq!(body["measured"][0]["used"], 0, "nothing loaded yet: {body}");
    let planned = body["plan"]["devices"][0]["total"].as_u64().unwrap();
    assert_eq!(body["measured"][0]["planned"], planned);
    // A new NVML reading shows up at once, and what the load took is measured against the plan.
    let mut later = inventory;
    later.gpus[0].memory_free = 8 * GIB - planned - planned / 10;
    gpus_tx.send_replace(later.clone());
    let (_, body) = send_json(&app, get()).await;
    assert_eq!(
        body["gpus"]["gpus"][0]["memory_free"],
        later.gpus[0].memory_free
    );
    assert_eq!(body["measured"][0]["used"], planned + planned / 10);
    assert_eq!(body["measured"][0]["difference_percent"], 10.0);
}

/// A sandbox executor that answers from a script: no container.
struct ScriptedExecutor;

impl lm_sandbox::sandbox::Executor for ScriptedExecutor {
    fn exec(
        &self,
        _caller: &lm_sandbox::sandbox::Caller,
        request: lm_sandbox::sandbox::ExecRequest,
        start: lm_sandbox::sandbox::StartHook,
    ) -> lm_sandbox::sandbox::ExecFuture<'_> {
        Box::pin(async move {
            if request.command == "busy" {
                // Refused before it holds a slot: no `start` line.
                return Err(lm_sandbox::sandbox::SandboxError::Busy(
                    "all slots stayed taken".into(),
                ));
            }
            start().await?;
            match request.command.as_str() {
                "down" => Err(lm_sandbox::sandbox::SandboxError::Unavailable(
                    "no route to the sandbox".into(),
                )),
                "busy" => Err(lm_sandbox::sandbox::SandboxError::Busy(
                    "all slots stayed taken".into(),
                )),
                command => Ok(lm_sandbox::sandbox::ExecOutput {
                    stdout: format!("ran {command}"),
                    stderr: String::new(),
                    exit_code: Some(0),
                    signal: None,
                    timed_out: false,
                    truncated: false,
                    duration_ms: 1,
                    stdout_bytes: 4 + command.len() as u64,
                    stderr_bytes: 0,
                }),
            }
        })
    }
}

#[tokio::test]
async fn the_sandbox_route_exists_only_with_a_sandbox_and_maps_its_errors() {
    let without = harness();
    let (status, body) = send_json(
        &without.app,
        post("/v1/sandbox/exec", json!({"command": "id"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-fake-audit-{}.jsonl",
        std::process::id()
    ));
    let sandbox = lm_sandbox::sandbox::Sandbox::new(
        Arc::new(ScriptedExecutor),
        lm_sandbox::sandbox::AuditLog::open(&audit).await.unwrap(),
        lm_sandbox::sandbox::SandboxLimits::default(),
    );
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let mut config = api_config(&[]);
    config.api_keys = ApiKey::list(&["plain".into()], &["runner".into()]);
    config.metrics = true;
    let direct = sandbox.clone();
    let app = router(AppState::from_parts(engine, config, None, Some(sandbox)));
    let with_key = |key: &str, body: Value| {
        let mut request = post("/sandbox/exec", body);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        request
    };
    let (status, headers, body) = send(&app, with_key("runner", json!({"command": "id"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let (status, body) = send_json(&app, with_key("runner", json!({"command": "down"}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["code"], "sandbox_unavailable");
    let (status, body) = send_json(&app, with_key("plain", json!({"command": "id"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_of(&body)["code"], "insufficient_permissions");
    let (status, body) = send_json(&app, with_key("runner", json!({"command": "a\u{0}b"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "command");
    let (status, headers, body) = send(&app, with_key("runner", json!({"command": "busy"}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(body.contains("\"sandbox_busy\""), "{body}");
    let bad_session = json!({"command": "id", "session": "../../etc"});
    let (status, body) = send_json(&app, with_key("runner", bad_session)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "session");
    // A command the shell loop would send unchecked is refused before the log is touched.
    let caller = lm_sandbox::sandbox::Caller {
        request_id: "req_direct".into(),
        key_id: Some("key-x".into()),
        session: None,
        max_sessions: None,
    };
    let long = lm_sandbox::sandbox::ExecRequest {
        command: "x".repeat(lm_sandbox::sandbox::MAX_COMMAND_BYTES + 1),
        timeout: Duration::from_secs(1),
        stdin: None,
    };
    assert!(matches!(
        direct.run(long, &caller).await,
        Err(lm_sandbox::sandbox::SandboxError::InvalidCommand(_))
    ));
    let lines = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<(String, String)> = lines
        .lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).unwrap();
            (
                line["event"].as_str().unwrap().to_owned(),
                line["command"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("start", "id"),
        ("end", "id"),
        ("start", "down"),
        ("end", "down"),
    ];
    assert_eq!(
        events,
        expected.map(|(e, c)| (e.to_owned(), c.to_owned())),
        "a start and an end line for each command that was sent; none for one refused as busy \
         (no slot) or invalid: {lines}"
    );
    std::fs::remove_file(&audit).unwrap();
    // The metrics count each command by outcome, from the same end-of-command task.
    let mut scrape = Request::get("/metrics").body(Body::empty()).unwrap();
    scrape
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer plain".parse().unwrap());
    let (status, _, text) = send(&app, scrape).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    for (outcome, count) in [("ok", 1.0), ("error", 1.0), ("busy", 1.0)] {
        let labels = [("outcome", outcome)];
        assert_eq!(
            sample(&text, "lmsandbox_sandbox_commands_total", &labels),
            count
        );
        let name = "lmsandbox_sandbox_command_duration_seconds_count";
        assert_eq!(sample(&text, name, &labels), count);
    }
}

// ---- Tool calls, scripted: a template that renders only the last message, so the echo model
// "generates" exactly that text. ----

fn scripted_harness() -> Harness {
    let runner = FakeRunner::new(Duration::ZERO);
    let log = Arc::clone(&runner.log);
    let engine = runner.spawn(WorkerConfig {
        n_seq: 4,
        n_batch: 512,
        n_ctx_seq: 2048,
        max_queue: 8,
    });
    let mut config = api_config(&[]);
    config.chat_template = Some("{{ messages[-1].content }}".into());
    Harness {
        app: router(AppState::new(engine, config)),
        log,
    }
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

fn tool_request(script: &str, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": script}],
           "tools": weather_tools(), "stream": stream})
}

/// The message a client assembles from the stream's deltas, and the last finish_reason.
fn assemble(sse_body: &str) -> (Value, Value) {
    let mut content: Option<String> = None;
    let mut calls: Vec<Value> = Vec::new();
    let mut reason = Value::Null;
    for line in sse_body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        let choice = &chunk["choices"][0];
        if !choice["finish_reason"].is_null() {
            reason = choice["finish_reason"].clone();
        }
        let delta = &choice["delta"];
        if let Some(c) = delta["content"].as_str() {
            content.get_or_insert_with(String::new).push_str(c);
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = call["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                assert_eq!(call["type"], "function");
                calls.push(json!({"id": call["id"], "type": "function",
                                  "function": {"name": call["function"]["name"], "arguments": ""}}));
            }
            let piece = call["function"]["arguments"].as_str().unwrap_or("");
            let args = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_owned()
                + piece;
            calls[i]["function"]["arguments"] = json!(args);
        }
    }
    let content = content.filter(|c| !c.is_empty());
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    (message, reason)
}

fn without_ids(mut message: Value) -> Value {
    for call in message["tool_calls"].as_array_mut().into_iter().flatten() {
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        call["id"] = Value::Null;
    }
    message.as_object_mut().unwrap().remove("refusal");
    message
}

#[tokio::test]
async fn scripted_tool_calls_stream_and_answer_alike() {
    let h = scripted_harness();
    let scripts = [
        ("Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich \\\"old town\\\"\"}}\n</tool_call>", "tool_calls"),
        ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"B\"}}</tool_call>", "tool_calls"),
        ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"town\": \"A\"}}</tool_call>", "stop"),
        ("<tool_call>{\"name\": \"get_weather\", \"argu", "stop"),
        ("No tool needed: it is sunny.", "stop"),
    ];
    for (script, expected_reason) in scripts {
        let (status, body) = send_json(
            &h.app,
            post("/v1/chat/completions", tool_request(script, false)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], expected_reason, "{script}: {body}");
        let message = choice["message"].clone();
        if expected_reason == "tool_calls" {
            for call in message["tool_calls"].as_array().unwrap() {
                let args: Value =
                    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                assert!(args["city"].is_string(), "{args}");
            }
        } else {
            assert_eq!(
                message["content"], script,
                "unparsable calls come back whole as content"
            );
            assert!(message.get("tool_calls").is_none());
        }
        let (status, _, sse) = send(
            &h.app,
            post("/v1/chat/completions", tool_request(script, true)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (streamed, reason) = assemble(&sse);
        assert_eq!(reason, expected_reason, "{script}");
        if expected_reason == "tool_calls" {
            let content = streamed["content"].as_str().unwrap_or("");
            assert!(
                !content.contains("<tool_call>"),
                "markup leaked into content: {content}"
            );
        }
        assert_eq!(without_ids(streamed), without_ids(message), "{script}");
    }
}

#[tokio::test]
async fn a_call_cut_off_by_max_tokens_finishes_with_length() {
    let h = scripted_harness();
    let mut request = tool_request(
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>",
        false,
    );
    request["max_tokens"] = json!(20);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn tool_mistakes_are_400s_naming_the_field() {
    let h = scripted_harness();
    let cases = [
        (json!({"tools": "x"}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "other"}}}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x"}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ];
    for (extra, param) in cases {
        let mut request = chat("x");
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(error_of(&body)["param"], param, "{extra}: {body}");
    }
}

// ---- The server-side shell loop, with the echo model and a scripted sandbox ----

const FIRST_USER: &str =
    "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% break %}{% endif %}{% endfor %}";
const LAST_MESSAGE: &str = "{{ messages[-1].content }}";

async fn loop_harness(template: &str, audit: &std::path::Path) -> Router {
    let sandbox = lm_sandbox::sandbox::Sandbox::new(
        Arc::new(ScriptedExecutor),
        lm_sandbox::sandbox::AuditLog::open(audit).await.unwrap(),
        lm_sandbox::sandbox::SandboxLimits::default(),
    );
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 2,
        n_batch: 512,
        n_ctx_seq: 4096,
        max_queue: 8,
    });
    let mut config = api_config(&[]);
    config.chat_template = Some(template.into());
    // LM Studio's routes describe the model from its header.
    config.model_path = Some(tiny_gguf());
    config.api_keys =
        ApiKey::list_with_auto_shell(&["plain".into()], &["runner".into()], &["studio".into()]);
    router(AppState::from_parts(engine, config, None, Some(sandbox)))
}

fn keyed(key: &str, body: Value) -> Request<Body> {
    let mut request = post("/v1/chat/completions", body);
    request.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    request
}

const SHELL_CALL: &str =
    "<tool_call>{\"name\": \"shell\", \"arguments\": {\"command\": \"echo hi\"}}</tool_call>";

#[tokio::test]
async fn the_shell_loop_runs_calls_feeds_results_back_and_answers() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-loop-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                      "sandbox": {"shell": true}});
    let (status, headers, text) = send(&app, keyed("runner", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let response: Value = serde_json::from_str(&text).unwrap();
    let executions = response["sandbox_executions"].as_array().unwrap();
    assert_eq!(executions.len(), 1, "{response}");
    assert_eq!(executions[0]["command"], "echo hi");
    assert_eq!(executions[0]["result"]["stdout"], "ran echo hi");
    let choice = &response["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    // The second round echoed the tool result the first round's call produced.
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("<tool_response>") && content.contains("ran echo hi"),
        "{content}"
    );
    assert!(
        choice["message"].get("tool_calls").is_none(),
        "shell calls are the server's"
    );
    let prompt_tokens = response["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > SHELL_CALL.len() as u64,
        "usage sums both rounds: {prompt_tokens}"
    );
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains(&request_id) && log.contains("echo hi"),
        "{log}"
    );

    // Streamed: an execution chunk OpenAI SDKs can ignore, then the same answer.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, sse) = send(&app, keyed("runner", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let executions: Vec<Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|c| c.get("sandbox_execution").is_some())
        .collect();
    assert_eq!(executions.len(), 1);
    assert_eq!(executions[0]["choices"][0]["delta"], json!({}));
    let (message, reason) = assemble(&sse);
    assert_eq!(reason, "stop");
    assert_eq!(message["content"].as_str().unwrap(), content);
    let usage_chunk = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["usage"].is_object())
        .unwrap();
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap(),
        prompt_tokens
    );
    std::fs::remove_file(&audit).unwrap();
}

#[tokio::test]
async fn the_shell_loop_stops_at_max_tool_rounds_and_says_so() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-loop-bound-{}.jsonl",
        std::process::id()
    ));
    // The echo model repeats the first user message every round: a call, forever.
    let app = loop_harness(FIRST_USER, &audit).await;
    for stream in [false, true] {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                          "sandbox": {"shell": true, "max_tool_rounds": 3}, "stream": stream});
        let (status, _, text) = send(&app, keyed("runner", body)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let (content, executions) = if stream {
            let count = text.matches("sandbox_execution").count();
            (
                assemble(&text).0["content"].as_str().unwrap().to_owned(),
                count,
            )
        } else {
            let response: Value = serde_json::from_str(&text).unwrap();
            (
                response["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                response["sandbox_executions"].as_array().unwrap().len(),
            )
        };
        assert_eq!(executions, 3);
        assert!(content.contains("stopped after 3 round(s)"), "{content}");
    }
    let (status, body) = send_json(
        &app,
        keyed(
            "runner",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "sandbox": {"shell": true, "max_tool_rounds": 17}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "sandbox.max_tool_rounds");
    std::fs::remove_file(&audit).unwrap();
}

#[tokio::test]
async fn only_sandbox_keys_get_the_loop_and_auto_shell_keys_get_it_unasked() {
    let audit =
        std::env::temp_dir().join(format!("lm-sandbox-loop-keys-{}.jsonl", std::process::id()));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let asked = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                       "sandbox": {"shell": true}});
    let (status, body) = send_json(&app, keyed("plain", asked)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A client that cannot send extra fields (LM Studio): its key turns the loop on.
    let unasked = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}]});
    let (status, body) = send_json(&app, keyed("studio", unasked.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox_executions"].as_array().unwrap().len(), 1);
    // The same through LM Studio's REST v0.
    let mut v0 = keyed("studio", unasked.clone());
    *v0.uri_mut() = "/api/v0/chat/completions".parse().unwrap();
    let (status, body) = send_json(&app, v0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["sandbox_executions"].as_array().unwrap().len(),
        1,
        "{body}"
    );
    // Other keys keep plain OpenAI behaviour: no tools, no execution.
    let (status, body) = send_json(&app, keyed("runner", unasked)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("sandbox_executions").is_none());
    assert_eq!(body["choices"][0]["message"]["content"], SHELL_CALL);

    // A client tool keeps the normal behaviour: returned to the client, not run.
    let client_tool = json!({"model": MODEL,
        "messages": [{"role": "user", "content": "<tool_call>{\"name\": \"lookup\", \"arguments\": {\"q\": \"x\"}}</tool_call>"}],
        "tools": [{"type": "function", "function": {"name": "lookup",
                   "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
        "sandbox": {"shell": true}});
    let (status, body) = send_json(&app, keyed("runner", client_tool)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
    assert!(body["sandbox_executions"].as_array().unwrap().is_empty());
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn a_grammar_the_engine_refuses_is_a_400_not_a_500() {
    let h = harness();
    let mut request = chat("x");
    request["grammar"] = json!(lm_sandbox::engine::fake::FAKE_INVALID_GRAMMAR);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["param"], "grammar");
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sse.contains("\"param\":\"grammar\""),
        "an in-band error: {sse}"
    );
    request["stream"] = json!(false);
    request["response_format"] = json!({"type": "json_object"});
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "grammar");
}

#[tokio::test]
async fn a_grammar_that_cannot_work_is_a_400_before_any_stream() {
    let h = harness();
    for grammar in [
        r"root ::= [^\x00-\U0010FFFF]",
        r#"root ::= "a"{5,2}"#,
        "root ::= (",
    ] {
        for stream in [false, true] {
            let mut request = chat("x");
            request["grammar"] = json!(grammar);
            request["stream"] = json!(stream);
            let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{grammar}: {body}");
            assert_eq!(error_of(&body)["param"], "grammar");
        }
    }
}

#[tokio::test]
async fn a_grammar_that_dead_ends_midway_ends_that_request_only() {
    let h = harness();
    let mut request = chat("hello there");
    request["grammar"] = json!(lm_sandbox::engine::fake::FAKE_DEAD_END_GRAMMAR);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["param"], "grammar");
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(sse.contains("\"param\":\"grammar\""), "in-band: {sse}");
    assert!(!sse.contains("[DONE]"), "{sse}");
    // The engine goes on.
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("ok"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn tokenize_detokenize_apply_template_and_input_tokens_in_llama_servers_shapes() {
    let h = harness();
    let (status, body) = send_json(&h.app, post("/tokenize", json!({"content": "hé"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"tokens": [104, 195, 169]}));
    // Pieces: text when a token is whole UTF-8, its bytes when it is part of a character.
    let (_, body) = send_json(
        &h.app,
        post("/tokenize", json!({"content": "hé", "with_pieces": true})),
    )
    .await;
    assert_eq!(
        body,
        json!({"tokens": [{"id": 104, "piece": "h"}, {"id": 195, "piece": [195]},
                          {"id": 169, "piece": [169]}]})
    );
    let (_, body) = send_json(
        &h.app,
        post("/detokenize", json!({"tokens": [104, 195, 169]})),
    )
    .await;
    assert_eq!(body, json!({"content": "hé"}));
    let (status, body) =
        send_json(&h.app, post("/detokenize", json!({"tokens": [1, 99999]}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "tokens[1]");
    let (status, body) = send_json(
        &h.app,
        post("/tokenize", json!({"content": "x", "model": "nope"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The prompt a chat request renders to, and its length, without running it (no `model`
    // needed).
    let request = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send_json(&h.app, post("/apply-template", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["prompt"], echoed("hi"));
    let (_, body) = send_json(
        &h.app,
        post("/v1/chat/completions/input_tokens", request.clone()),
    )
    .await;
    assert_eq!(body["object"], "chat.completion.input_tokens");
    assert_eq!(body["input_tokens"], echoed("hi").len());
    assert!(
        h.log.lock().unwrap().batches.is_empty(),
        "nothing was decoded"
    );
    let (status, body) = send_json(&h.app, post("/apply-template", json!({"messages": []}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "messages");
}

/// The JSON chunks of an SSE body, `[DONE]` left out.
fn sse_chunks(body: &str) -> Vec<Value> {
    sse_data(body)
        .iter()
        .filter(|f| f.as_str() != "[DONE]")
        .map(|f| serde_json::from_str(f).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_logprobs_stream_and_answer_alike_and_follow_the_distribution() {
    let h = harness();
    let mut request = chat("héllo");
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(2);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(choice["logprobs"]["refusal"], Value::Null);
    // One entry per generated token but EOS; their bytes are the message.
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|t| t["bytes"].as_array().unwrap().clone())
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), echoed("héllo"));
    assert_eq!(
        content.len() as u64 + 1,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // The fake's logits: the echoed token 2, the next byte 1, 255 others 0.
    let expected = 2.0 - (2f64.exp() + 1f64.exp() + 255.0).ln();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!((lp - expected).abs() < 1e-4, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0]["bytes"], t["bytes"],
            "the chosen token is the likeliest"
        );
        assert!(top[1]["logprob"].as_f64().unwrap() < lp);
    }
    // Streamed: the chunks' logprobs add up to the same list.
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    let streamed: Vec<Value> = sse_chunks(&sse)
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&streamed, content);
    // Not asked for: null, and nothing computed.
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test]
async fn completion_logprobs_have_tokens_offsets_and_top_maps() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": "aé", "logprobs": 1, "max_tokens": 8});
    let (status, body) = send_json(&h.app, post("/v1/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    // "a", then "é" split over two byte tokens.
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 1);
    assert_eq!(lp["tokens"][0], "a");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/v1/completions", streamed)).await;
    let offsets: Vec<Value> = sse_chunks(&sse)
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(Value::Array(offsets), lp["text_offset"]);
    for (field, value, param) in [
        ("logprobs", json!(21), "logprobs"),
        ("echo", json!(true), "echo"),
    ] {
        let mut bad = request.clone();
        bad[field] = value;
        let (status, body) = send_json(&h.app, post("/v1/completions", bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
}

#[tokio::test]
async fn embeddings_take_every_input_shape_and_encode_floats_and_base64() {
    let h = harness();
    let body = json!({"model": MODEL, "input": ["abc", "abd", "abc"]});
    let (status, resp) = send_json(&h.app, post("/v1/embeddings", body)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["object"], "list");
    assert_eq!(resp["model"], MODEL);
    assert_eq!(resp["usage"]["prompt_tokens"], 9);
    let data = resp["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let vector = |i: usize| -> Vec<f64> {
        data[i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let norm: f64 = vector(0).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5, "L2-normalised: {norm}");
    assert_eq!(vector(0), vector(2));
    assert_ne!(vector(0), vector(1));
    // Token ids embed like the text they spell; base64 holds the same little-endian floats.
    let tokens = json!({"model": MODEL, "input": [[97, 98, 99]], "encoding_format": "base64", "dimensions": 4});
    let (status, resp) = send_json(&h.app, post("/v1/embeddings", tokens)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats.len(), 4);
    let norm: f32 = floats.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5);
    let first4: Vec<f64> = vector(0)[..4].to_vec();
    let renorm: f64 = first4.iter().map(|x| x * x).sum::<f64>().sqrt();
    for (a, b) in floats.iter().zip(&first4) {
        assert!((f64::from(*a) - b / renorm).abs() < 1e-5);
    }
    for (input, extra, param, code) in [
        (json!([]), json!({}), "input", None),
        (json!(""), json!({}), "input", None),
        (json!(["a", 1]), json!({}), "input[1]", None),
        (json!([[1, 999]]), json!({}), "input[0][1]", None),
        (
            json!("x".repeat(600)),
            json!({}),
            "input",
            Some("context_length_exceeded"),
        ),
        (json!("x"), json!({"dimensions": 9}), "dimensions", None),
        (
            json!("x"),
            json!({"encoding_format": "int8"}),
            "encoding_format",
            None,
        ),
    ] {
        let mut body = json!({"model": MODEL, "input": input});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, resp) = send_json(&h.app, post("/v1/embeddings", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        let error = error_of(&resp);
        assert_eq!(error["param"], param, "{resp}");
        if let Some(code) = code {
            assert_eq!(error["code"], code);
        }
    }
    let (status, _) = send_json(
        &h.app,
        post("/v1/embeddings", json!({"model": "nope", "input": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The value of the sample `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    lm_sandbox::metrics::read_samples(text)
        .into_iter()
        .find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
        .map(|s| s.value)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in\n{text}"))
}

/// A fake-engine server with `--metrics`, the fixture GPU and its plan, and `keys`.
fn metrics_app(keys: &[&str]) -> Router {
    let (placement, inventory) = fake_placement();
    // The GPU reading stays as it was: its sender may go.
    let (_, gpus_rx) = watch::channel(inventory);
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 2,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 4,
    });
    let mut config = api_config(keys);
    config.metrics = true;
    router(AppState::with_placement(engine, config, placement, gpus_rx))
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_gpus_in_prometheus_text() {
    let app = metrics_app(&["k"]);
    // Behind the key unless --metrics-public.
    let (status, _, _) = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let keyed = |mut r: Request<Body>| {
        r.headers_mut()
            .insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        r
    };
    let scrape_keyed = || async {
        let (status, headers, body) = send(
            &app,
            keyed(Request::get("/metrics").body(Body::empty()).unwrap()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert!(body.ends_with("# EOF\n"), "{body}");
        body
    };
    let model = [("model", MODEL)];
    let before = scrape_keyed().await;
    assert_eq!(sample(&before, "llamacpp:requests_processing", &model), 0.0);
    assert_eq!(sample(&before, "llamacpp:kv_cache_tokens", &model), 0.0);
    // GPU gauges from the inventory, labelled by bus id and name.
    let gpu = [("pci_bus_id", "00000000:01:00.0"), ("name", "Fake GPU")];
    assert_eq!(
        sample(&before, "lmsandbox_gpu_memory_total_bytes", &gpu),
        (8 * GIB) as f64
    );
    assert_eq!(
        sample(&before, "lmsandbox_gpu_temperature_celsius", &gpu),
        61.0
    );
    assert_eq!(sample(&before, "lmsandbox_gpu_power_watts", &gpu), 87.5);

    let (status, body) = send_json(&app, keyed(post("/v1/chat/completions", chat("hi")))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_f64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_f64().unwrap();
    let after = scrape_keyed().await;
    assert_eq!(
        sample(&after, "llamacpp:prompt_tokens_total", &model),
        prompt
    );
    assert_eq!(
        sample(&after, "llamacpp:tokens_predicted_total", &model),
        completion
    );
    assert!(sample(&after, "llamacpp:n_decode_total", &model) >= completion);
    // The engine's time, by the kind of step: the prompt's step, then one per further token.
    let busy = |text: &str, step| {
        sample(
            text,
            "lmsandbox_engine_busy_seconds_total",
            &[("model", MODEL), ("step", step)],
        )
    };
    assert_eq!(busy(&before, "prefill"), 0.0);
    assert_eq!(busy(&before, "decode"), 0.0);
    assert!(completion >= 2.0, "{body}");
    assert!(busy(&after, "prefill") > 0.0);
    assert!(busy(&after, "decode") > 0.0);
    assert!(
        sample(&after, "llamacpp:kv_cache_tokens", &model) > 0.0,
        "the prefix cache holds it"
    );
    let route = [("route", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(
        sample(&after, "lmsandbox_request_duration_seconds_count", &route),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "lmsandbox_time_to_first_token_seconds_count",
            &model
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "lmsandbox_completion_tokens_sum", &model),
        completion
    );
    // Histogram buckets are cumulative: monotone in `le`, ending at the count.
    for name in [
        "lmsandbox_time_to_first_token_seconds",
        "lmsandbox_time_per_output_token_seconds",
        "lmsandbox_prompt_tokens",
    ] {
        let buckets: Vec<(f64, f64)> = lm_sandbox::metrics::read_samples(&after)
            .into_iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .map(|s| {
                let le = s.label("le").unwrap();
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    s.value,
                )
            })
            .collect();
        assert!(buckets.len() > 10, "{name}");
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}"
        );
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1.0), "{name}");
    }
    // A second identical request is a prefix-cache hit.
    send_json(&app, keyed(post("/v1/chat/completions", chat("hi")))).await;
    let again = scrape_keyed().await;
    assert_eq!(
        sample(&again, "lmsandbox_prefix_cache_hits_total", &model),
        1.0
    );
    // --metrics-public: no key needed; the text ends with OpenMetrics' EOF.
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let mut config = api_config(&["k"]);
    config.metrics = true;
    config.metrics_public = true;
    let public = router(AppState::new(engine, config));
    let (status, _, body) = send(
        &public,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Without --metrics there is no route.
    let (status, _, _) = send(
        &harness().app,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn top_renders_a_live_servers_models_rates_and_gpus() {
    use lm_sandbox::top::{render, Snapshot, View};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    let app = metrics_app(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let before = Snapshot::fetch(&client, &url, None).await.unwrap();
    for _ in 0..3 {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("hello there"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let now = Snapshot::fetch(&client, &url, None).await.unwrap();
    let view = View::new(&url, &now, Some(&before));
    let model = &view.models[0];
    assert_eq!(model.id, MODEL);
    assert_eq!(model.state, "ready");
    assert_eq!(model.active, Some(0.0));
    assert!(model.tokens_per_second.unwrap() > 0.0, "{model:?}");
    assert!(model.ttft_p50.is_some() && model.ttft_p95 >= model.ttft_p50);
    assert_eq!(view.gpus[0].name, "Fake GPU");
    assert!(view.gpus[0].planned.unwrap() > 0);

    let mut terminal = Terminal::new(TestBackend::new(110, 14)).unwrap();
    terminal.draw(|frame| render(frame, &view)).unwrap();
    let screen: String = terminal
        .backend()
        .buffer()
        .content()
        .chunks(110)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
        .collect();
    for expected in [
        "lm-sandbox top",
        "Models",
        MODEL,
        "ready",
        "TTFT p95",
        "Fake GPU",
        "00000000:01:00.0",
        "0 MiB / 8192 MiB",
        "requests in flight",
    ] {
        assert!(
            screen.contains(expected),
            "{expected:?} missing from\n{screen}"
        );
    }
    // The tokens/s cell shows a number, not a dash.
    let row = screen.lines().find(|l| l.contains(MODEL)).unwrap();
    assert!(!row.contains('—'), "{row}");
}

// ---- Ollama's API against the fake engine ----

/// A minimal GGUF v3 header (no tensors): what `/api/tags` and `/api/show` read.
fn tiny_gguf() -> std::path::PathBuf {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes()); // tensors
    bytes.extend(3u64.to_le_bytes()); // key/values
    let key = |bytes: &mut Vec<u8>, k: &str| {
        bytes.extend((k.len() as u64).to_le_bytes());
        bytes.extend(k.as_bytes());
    };
    let string = |bytes: &mut Vec<u8>, s: &str| {
        bytes.extend(8u32.to_le_bytes());
        bytes.extend((s.len() as u64).to_le_bytes());
        bytes.extend(s.as_bytes());
    };
    key(&mut bytes, "general.architecture");
    string(&mut bytes, "llama");
    key(&mut bytes, "general.size_label");
    string(&mut bytes, "135M");
    key(&mut bytes, "general.file_type");
    bytes.extend(4u32.to_le_bytes());
    bytes.extend(3u32.to_le_bytes());
    // Tensor data starts at the next 32-byte boundary, which the file must reach.
    bytes.resize(bytes.len().div_ceil(32) * 32, 0);
    // Written once per process: tests run in parallel, and a rewrite would race their reads.
    static PATH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("lmsbx-tiny-{}.gguf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    })
    .clone()
}

fn ollama_harness(template: Option<&str>) -> Harness {
    let runner = FakeRunner::new(Duration::ZERO);
    let log = Arc::clone(&runner.log);
    let engine = runner.spawn(WorkerConfig {
        n_seq: 4,
        n_batch: 512,
        n_ctx_seq: 2048,
        max_queue: 8,
    });
    let mut config = api_config(&[]);
    config.model_path = Some(tiny_gguf());
    config.chat_template = template.map(str::to_owned);
    Harness {
        app: router(AppState::new(engine, config)),
        log,
    }
}

/// The JSON lines of an NDJSON body.
fn ndjson(body: &str) -> Vec<Value> {
    body.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

#[tokio::test]
async fn ollama_chat_and_generate_stream_ndjson_and_answer_alike() {
    let h = ollama_harness(None);
    let chat = json!({"model": format!("{MODEL}:latest"), "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, body) = send(&h.app, post("/api/chat", chat.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines = ndjson(&body);
    let (last, rest) = lines.split_last().unwrap();
    assert!(rest
        .iter()
        .all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    assert!(rest
        .iter()
        .all(|l| l["created_at"].as_str().unwrap().ends_with('Z')));
    let text: String = rest
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, echoed("hi"));
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["model"], format!("{MODEL}:latest"));
    assert_eq!(last["prompt_eval_count"], echoed("hi").len());
    assert_eq!(last["eval_count"], echoed("hi").len() + 1, "echo plus EOS");
    for field in [
        "total_duration",
        "prompt_eval_duration",
        "eval_duration",
        "load_duration",
    ] {
        assert!(last[field].is_u64(), "{field}: {last}");
    }
    let mut unstreamed = chat.clone();
    unstreamed["stream"] = json!(false);
    let (status, one) = send_json(&h.app, post("/api/chat", unstreamed)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["message"]["content"], text.as_str());
    assert_eq!(one["done"], true);

    // num_predict caps the output: done_reason length.
    let capped =
        json!({"model": MODEL, "prompt": "hello", "stream": false, "options": {"num_predict": 3}});
    let (_, one) = send_json(&h.app, post("/api/generate", capped)).await;
    assert_eq!(one["done_reason"], "length");
    assert_eq!(one["eval_count"], 3);
    // raw: the prompt itself, no template.
    let raw = json!({"model": MODEL, "prompt": "plain", "raw": true});
    let (_, _, body) = send(&h.app, post("/api/generate", raw)).await;
    let lines = ndjson(&body);
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, "plain");
    // system and prompt go through the template.
    let templated = json!({"model": MODEL, "prompt": "p", "system": "s", "stream": false});
    let (_, one) = send_json(&h.app, post("/api/generate", templated)).await;
    assert_eq!(one["response"], "<|system|>s\n<|user|>p\n<|assistant|>");
}

#[tokio::test]
async fn ollama_errors_are_json_with_a_status_and_a_final_line_mid_stream() {
    let h = ollama_harness(None);
    for (path, body, status, words) in [
        (
            "/api/chat",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "does not exist",
        ),
        ("/api/chat", json!({"messages": []}), 400, "model"),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"temperature": 9}}),
            400,
            "temperature",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"bogus": 1}}),
            400,
            "bogus",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}),
            400,
            "keep_alive",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "images": ["aGk="]}),
            400,
            "text only",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "", "keep_alive": "soon"}),
            400,
            "keep_alive",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}),
            400,
            "Jinja",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "suffix": "y"}),
            400,
            "fill-in-the-middle",
        ),
        (
            "/api/pull",
            json!({"model": "llama3.2"}),
            400,
            "does not download",
        ),
        (
            "/api/copy",
            json!({"source": MODEL, "destination": "x"}),
            400,
            "not supported",
        ),
    ] {
        let (got, resp) = send_json(&h.app, post(path, body.clone())).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {resp}");
        let error = resp["error"].as_str().unwrap_or_else(|| panic!("{resp}"));
        assert!(error.contains(words), "{path}: {error}");
    }
    // An engine fault after the stream began: the last line is the error.
    let panic =
        json!({"model": MODEL, "prompt": lm_sandbox::engine::fake::FAKE_PANIC_PROMPT, "raw": true});
    let (status, _, body) = send(&h.app, post("/api/generate", panic)).await;
    assert_eq!(status, StatusCode::OK);
    let lines = ndjson(&body);
    assert!(lines.last().unwrap()["error"].as_str().is_some(), "{body}");
    // `keep_alive: 0` with no prompt unloads the model (this fake server cannot load it again).
    let unload = json!({"model": MODEL, "prompt": "", "keep_alive": 0, "stream": false});
    let (status, resp) = send_json(&h.app, post("/api/generate", unload)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["done_reason"], "unload");
    let (_, ps) = send_json(&h.app, Request::get("/api/ps").body(Body::empty()).unwrap()).await;
    assert_eq!(ps["models"], json!([]), "{ps}");
}

#[tokio::test]
async fn ollama_tool_calls_carry_object_arguments_streamed_and_not() {
    let h = ollama_harness(Some("{{ messages[-1].content }}"));
    let call = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": call}],
                          "tools": weather_tools(), "stream": false});
    let (status, one) = send_json(&h.app, post("/api/chat", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let calls = &one["message"]["tool_calls"];
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Paris"}));
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/api/chat", streamed)).await;
    let lines = ndjson(&body);
    let with_calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"]["tool_calls"].is_array())
        .collect();
    assert_eq!(with_calls.len(), 1, "{body}");
    assert_eq!(with_calls[0]["message"]["tool_calls"], *calls);
    assert_eq!(lines.last().unwrap()["done"], true);
    // A tool result comes back as role tool with tool_name, and a call in history with object
    // arguments: the request renders.
    let history = json!({"model": MODEL, "stream": false, "tools": weather_tools(), "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]});
    let (status, one) = send_json(&h.app, post("/api/chat", history)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
}

#[tokio::test]
async fn open_webui_and_continue_connection_sequences() {
    let h = ollama_harness(None);
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    // Open WebUI: version, tags, ps, then loads with an empty prompt.
    let (status, _, body) = send(&h.app, get("/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "Ollama is running")
    );
    let (_, version) = send_json(&h.app, get("/api/version")).await;
    assert!(version["version"].as_str().is_some());
    let (status, tags) = send_json(&h.app, get("/api/tags")).await;
    assert_eq!(status, StatusCode::OK, "{tags}");
    let first = &tags["models"][0];
    assert_eq!(first["name"], format!("{MODEL}:latest"));
    assert_eq!(first["details"]["format"], "gguf");
    assert_eq!(first["details"]["family"], "llama");
    assert_eq!(first["details"]["parameter_size"], "135M");
    assert_eq!(first["details"]["quantization_level"], "Q4_1");
    assert_eq!(first["digest"].as_str().unwrap().len(), 64);
    assert_eq!(
        tags["models"].as_array().unwrap().len(),
        2,
        "the id and the alias"
    );
    let (_, ps) = send_json(&h.app, Request::get("/api/ps").body(Body::empty()).unwrap()).await;
    assert_eq!(ps["models"][0]["context_length"], 2048);
    assert_eq!(ps["models"][0]["size_vram"], 0);
    let load = json!({"model": MODEL, "prompt": "", "keep_alive": "5m"});
    let (status, loaded) = send_json(&h.app, post("/api/generate", load)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (loaded["done"].clone(), loaded["done_reason"].clone()),
        (json!(true), json!("load"))
    );
    // Continue: show, then chat with keep_alive.
    let (status, show) = send_json(&h.app, post("/api/show", json!({"model": MODEL}))).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert!(show["template"].as_str().unwrap().contains("messages"));
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "keep_alive": 1800, "stream": false,
                       "options": {"num_ctx": 2048, "num_predict": 4}});
    let (status, one) = send_json(&h.app, post("/api/chat", chat)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["eval_count"], 4);
}

#[tokio::test]
async fn the_shell_loop_answers_ollama_chat_for_auto_shell_keys_streamed_and_not() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-ollama-loop-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let ollama = |key: &str, body: Value| {
        let mut request = post("/api/chat", body);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        request
    };
    // An auto-shell key gets the loop unasked, as on the OpenAI route.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}], "stream": false});
    let (status, one) = send_json(&app, ollama("studio", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let executions = one["sandbox_executions"].as_array().unwrap();
    assert_eq!(executions[0]["command"], "echo hi");
    assert_eq!(executions[0]["result"]["stdout"], "ran echo hi");
    assert_eq!(one["done"], true);
    assert_eq!(one["done_reason"], "stop");
    let content = one["message"]["content"].as_str().unwrap();
    assert!(content.contains("ran echo hi"), "{content}");
    assert!(
        one["message"].get("tool_calls").is_none(),
        "shell calls are the server's"
    );
    // Streamed: the execution is a line of its own, then the answer, then done.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, _, text) = send(&app, ollama("studio", streamed)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let lines = ndjson(&text);
    let executed: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("sandbox_execution").is_some())
        .collect();
    assert_eq!(executed.len(), 1, "{text}");
    let answer: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert!(answer.contains("ran echo hi"), "{answer}");
    assert_eq!(lines.last().unwrap()["done"], true);
    // A key without the sandbox permission asking for it: 403 in Ollama's shape.
    let mut asked = body;
    asked["sandbox"] = json!({"shell": true});
    let (status, error) = send_json(&app, ollama("plain", asked)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    assert!(error["error"].as_str().unwrap().contains("sandbox"));
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn lmstudio_rest_v0_models_and_answers_with_stats() {
    let h = ollama_harness(None);
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (status, list) = send_json(&h.app, get("/api/v0/models")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let first = &list["data"][0];
    assert_eq!(first["id"], MODEL);
    assert_eq!(first["object"], "model");
    assert_eq!(first["type"], "llm");
    assert_eq!(first["arch"], "llama");
    assert_eq!(first["compatibility_type"], "gguf");
    assert_eq!(first["quantization"], "Q4_1");
    assert_eq!(first["state"], "loaded");
    assert_eq!(first["max_context_length"], 2048);
    let (status, one) = send_json(&h.app, get("/api/v0/models/alias")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["id"], "alias");
    let (status, _) = send_json(&h.app, get("/api/v0/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let check_extras = |v: &Value, reason: &str| {
        assert_eq!(v["stats"]["stop_reason"], reason, "{v}");
        assert!(v["stats"]["tokens_per_second"].is_number());
        assert!(v["stats"]["time_to_first_token"].as_f64().unwrap() >= 0.0);
        assert!(v["stats"]["generation_time"].is_number());
        assert_eq!(v["model_info"]["arch"], "llama");
        assert_eq!(v["model_info"]["quant"], "Q4_1");
        assert_eq!(v["model_info"]["format"], "gguf");
        assert_eq!(v["model_info"]["context_length"], 2048);
        assert_eq!(v["runtime"]["supported_formats"], json!(["gguf"]));
    };
    let (status, answer) = send_json(&h.app, post("/api/v0/chat/completions", chat("hi"))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], echoed("hi"));
    check_extras(&answer, "eosFound");
    let mut streamed = chat("hi");
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/api/v0/chat/completions", streamed)).await;
    let chunks = sse_chunks(&sse);
    let last = chunks
        .iter()
        .rev()
        .find(|c| c.get("stats").is_some())
        .unwrap();
    check_extras(last, "eosFound");
    assert_eq!(
        chunks.iter().filter(|c| c.get("stats").is_some()).count(),
        1
    );
    let capped = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
    let (_, text) = send_json(&h.app, post("/api/v0/completions", capped)).await;
    assert_eq!(text["choices"][0]["text"], "he");
    check_extras(&text, "maxPredictedTokensReached");
    let stopped = json!({"model": MODEL, "prompt": "hello", "stop": ["ll"]});
    let (_, text) = send_json(&h.app, post("/api/v0/completions", stopped)).await;
    assert_eq!(text["choices"][0]["text"], "he");
    assert_eq!(text["choices"][0]["finish_reason"], "stop");
    check_extras(&text, "stopStringFound");
    let (status, embedded) = send_json(
        &h.app,
        post("/api/v0/embeddings", json!({"model": MODEL, "input": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(embedded["object"], "list");
    // The OpenAI routes are unchanged: no LM Studio fields.
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("hi"))).await;
    assert!(plain.get("stats").is_none() && plain.get("runtime").is_none());
}

#[tokio::test]
async fn lmstudio_rest_v1_model_routes() {
    let h = ollama_harness(None);
    let (status, list) = send_json(
        &h.app,
        Request::get("/api/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let model = &list["models"][0];
    assert_eq!(model["type"], "llm");
    assert_eq!(model["key"], MODEL);
    assert_eq!(model["architecture"], "llama");
    assert_eq!(
        model["quantization"],
        json!({"name": "Q4_1", "bits_per_weight": 4})
    );
    assert_eq!(model["params_string"], "135M");
    assert_eq!(model["format"], "gguf");
    assert!(model["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        model["loaded_instances"][0]["config"]["context_length"],
        2048
    );
    assert_eq!(model["capabilities"]["trained_for_tool_use"], false);
    let (status, loaded) = send_json(
        &h.app,
        post(
            "/api/v1/models/load",
            json!({"model": MODEL, "config": {"context_length": 1024}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{loaded}");
    assert_eq!(loaded["model_instance_id"], MODEL);
    assert_eq!(loaded["config"]["context_length"], 2048);
    for (path, body, status, param) in [
        (
            "/api/v1/models/load",
            json!({"model": MODEL, "config": {"context_length": 1_000_000}}),
            StatusCode::BAD_REQUEST,
            "config.context_length",
        ),
        (
            "/api/v1/models/load",
            json!({"model": "nope"}),
            StatusCode::NOT_FOUND,
            "model",
        ),
        (
            "/api/v1/models/unload",
            json!({}),
            StatusCode::BAD_REQUEST,
            "instance_id",
        ),
    ] {
        let (got, resp) = send_json(&h.app, post(path, body)).await;
        assert_eq!(got, status, "{path}: {resp}");
        assert_eq!(error_of(&resp)["param"], param, "{resp}");
    }
    let (status, resp) = send_json(
        &h.app,
        post("/api/v1/models/download", json!({"model": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&resp)["message"]
        .as_str()
        .unwrap()
        .contains("does not download"));
    // Unloading frees the model: no loaded instance is left.
    let (status, resp) = send_json(
        &h.app,
        post("/api/v1/models/unload", json!({"instance_id": MODEL})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["instance_id"], MODEL);
    let (_, models) = send_json(
        &h.app,
        Request::get("/api/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        models["models"][0]["loaded_instances"],
        json!([]),
        "{models}"
    );
}

/// `(event name, data)` of every frame of a named-event SSE body.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|f| !f.trim().is_empty() && !f.starts_with(':'))
        .map(|frame| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn lmstudio_v1_chat_answers_keeps_threads_and_streams_named_events() {
    let h = ollama_harness(None);
    let (status, one) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "hi", "system_prompt": "s"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["model_instance_id"], MODEL);
    let first = "<|system|>s\n<|user|>hi\n<|assistant|>";
    assert_eq!(
        one["output"],
        json!([{"type": "message", "content": first}])
    );
    assert_eq!(one["stats"]["input_tokens"], first.len());
    assert!(one["stats"]["tokens_per_second"].is_number());
    let thread = one["thread_id"].as_str().unwrap().to_owned();
    assert!(thread.starts_with("thread_"));
    // The thread continues: the template sees the earlier turns.
    let (_, two) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "more", "thread_id": thread, "stream": false}),
        ),
    )
    .await;
    let content = two["output"][0]["content"].as_str().unwrap();
    assert!(
        content.starts_with(&format!(
            "<|system|>s\n<|user|>hi\n<|assistant|>{first}\n<|user|>more"
        )),
        "{content}"
    );
    assert_eq!(two["thread_id"], thread.as_str());
    // store: false keeps nothing and says no thread.
    let (_, three) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "x", "store": false}),
        ),
    )
    .await;
    assert!(three.get("thread_id").is_none());
    // Streamed: LM Studio's named events, chat.end with the same result.
    let (status, headers, body) = send(
        &h.app,
        post("/api/v1/chat", json!({"model": MODEL, "input": "hi", "system_prompt": "s", "stream": true, "store": false})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = named_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "chat.start",
            "prompt_processing.start",
            "prompt_processing.end",
            "message.start"
        ]
    );
    assert_eq!(&names[names.len() - 2..], ["message.end", "chat.end"]);
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "message.delta")
        .map(|(_, d)| d["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, first);
    assert_eq!(
        events.last().unwrap().1["result"]["output"][0]["content"],
        first
    );
    for (body, param) in [
        (json!({"model": MODEL}), "input"),
        (
            json!({"model": MODEL, "input": "x", "thread_id": "thread_nope"}),
            "thread_id",
        ),
        (
            json!({"model": MODEL, "input": "x", "integrations": ["mcp/playwright"]}),
            "integrations",
        ),
        (
            json!({"model": MODEL, "input": "x", "reasoning": "high"}),
            "reasoning",
        ),
        (
            json!({"model": MODEL, "input": "x", "context_length": 999_999}),
            "context_length",
        ),
    ] {
        let (status, resp) = send_json(&h.app, post("/api/v1/chat", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        assert_eq!(error_of(&resp)["param"], param);
    }
}

#[tokio::test]
async fn reasoning_is_parsed_out_without_tools_when_the_template_knows_it() {
    // The echo model repeats the last message; the template mentions `<think>`.
    let h = ollama_harness(Some("{# <think> #}{{ messages[-1].content }}"));
    let said = "<think>pondering</think>The answer.";
    let chat = json!({"model": MODEL, "stream": false,
                      "messages": [{"role": "user", "content": said}]});
    let (status, one) = send_json(&h.app, post("/api/chat", chat.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["message"]["thinking"], "pondering", "{one}");
    assert_eq!(one["message"]["content"], "The answer.");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/api/chat", streamed)).await;
    let lines = ndjson(&body);
    let thinking: String = lines
        .iter()
        .filter_map(|l| l["message"]["thinking"].as_str())
        .collect();
    let content: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(
        (thinking.as_str(), content.as_str()),
        ("pondering", "The answer."),
        "{body}"
    );
    // OpenAI's dialect: `reasoning_content`, never in `content`.
    let (status, openai) = send_json(&h.app, post("/v1/chat/completions", chat)).await;
    assert_eq!(status, StatusCode::OK, "{openai}");
    let message = &openai["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "pondering", "{openai}");
    assert_eq!(message["content"], "The answer.");
    // Without reasoning in the template, the text is the text.
    let plain = ollama_harness(Some("{{ messages[-1].content }}"));
    let chat = json!({"model": MODEL, "stream": false,
                      "messages": [{"role": "user", "content": said}]});
    let (_, one) = send_json(&plain.app, post("/api/chat", chat)).await;
    assert_eq!(one["message"]["content"], said);
}

#[tokio::test]
async fn ollama_accepts_tool_choice_to_force_a_call() {
    let h = ollama_harness(Some("{{ messages[-1].content }}"));
    let call = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;
    for request in [
        json!({"model": MODEL, "stream": false, "tools": weather_tools(), "tool_choice": "required",
               "messages": [{"role": "user", "content": call}]}),
        json!({"model": MODEL, "stream": false, "tools": weather_tools(),
               "options": {"tool_choice": "required"},
               "messages": [{"role": "user", "content": call}]}),
    ] {
        let (status, one) = send_json(&h.app, post("/api/chat", request)).await;
        assert_eq!(status, StatusCode::OK, "{one}");
        assert_eq!(
            one["message"]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
    }
    // A forced call with no tools is the same 400 as in OpenAI's dialect.
    let bad = json!({"model": MODEL, "stream": false, "tool_choice": "required",
                     "messages": [{"role": "user", "content": "x"}]});
    let (status, resp) = send_json(&h.app, post("/api/chat", bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
}

#[tokio::test]
async fn reasoning_effort_and_template_kwargs_reach_the_template() {
    // The echo model repeats the prompt: the rendered variables come back as the answer
    // (booleans as Python writes them, as Hugging Face templates expect).
    let h = ollama_harness(Some(
        "{# <think> #}{{ reasoning_effort | default('none') }}|{{ enable_thinking | default('unset') }}|{{ messages[-1].content }}",
    ));
    let ask = |extra: Value| {
        let mut body = json!({"model": MODEL, "max_tokens": 32,
                              "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, body) = send_json(
        &h.app,
        post(
            "/v1/chat/completions",
            ask(json!({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": false}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "high|False|hi");
    for (bad, param) in [
        (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
        ),
    ] {
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", ask(bad))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
    // Ollama's `think`: a level is the effort, and thinking is switched on or off.
    let ollama = json!({"model": MODEL, "stream": false, "think": "low",
                        "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send_json(&h.app, post("/api/chat", ollama)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"]["content"], "low|True|hi");
    let off = json!({"model": MODEL, "stream": false, "think": false,
                     "messages": [{"role": "user", "content": "hi"}]});
    let (_, body) = send_json(&h.app, post("/api/chat", off)).await;
    assert_eq!(body["message"]["content"], "none|False|hi");
}

/// DeepSeek V3.1's published template lists no tools but renders calls in its own syntax: the
/// prompt gets the tool section its model card gives (not the generic format, whose `<tool_call>`
/// syntax its parser would not read), and earlier calls stay in DeepSeek's syntax.
#[tokio::test]
async fn a_template_with_its_own_call_syntax_but_no_tool_list_gets_its_model_cards_section() {
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/templates/deepseek-ai-DeepSeek-V3.1.jinja"),
    )
    .unwrap();
    let h = ollama_harness(Some(&template));
    let request = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18"},
            {"role": "user", "content": "And Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]});
    let (status, body) = send_json(&h.app, post("/apply-template", request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let prompt = body["prompt"].as_str().unwrap();
    assert!(prompt.starts_with("## Tools\nYou have access to the following tools:\n\n### get_weather\nDescription: Current weather"), "{prompt}");
    assert!(
        prompt.contains("<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}"),
        "{prompt}"
    );
    assert!(!prompt.contains("<tool_call>"), "{prompt}");
}
