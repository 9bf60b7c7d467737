//! The router through `oneshot` against the fake engine: every error status and body, SSE framing,
//! `[DONE]`, the usage chunk, 429, cancellation. No model, no sockets. The shared harness is here;
//! the tests are one file per surface.

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

mod anthropic;
mod dialects;
mod lmstudio;
mod mcp;
mod observability;
mod ollama;
mod openai;
mod outputs;
mod responses;
mod shell;
mod tools;

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

/// The `text` of every choice of a completion, in order.
fn choice_texts(body: &Value) -> Vec<&str> {
    body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect()
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
                    cancelled: false,
                    duration_ms: 1,
                    stdout_bytes: 4 + command.len() as u64,
                    stderr_bytes: 0,
                }),
            }
        })
    }
}

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

/// The JSON chunks of an SSE body, `[DONE]` left out.
fn sse_chunks(body: &str) -> Vec<Value> {
    sse_data(body)
        .iter()
        .filter(|f| f.as_str() != "[DONE]")
        .map(|f| serde_json::from_str(f).unwrap())
        .collect()
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
