//! Many models on the real default model, exposed three ways (a `-m` file, a synthetic Ollama
//! store, a synthetic LM Studio folder) plus a folder with a truncated GGUF: two loaded at once
//! with `--models-max 2`, a third request unloads the least recently used, explicit load and
//! unload, idle unload, a load failure answered with its reason while the others keep serving,
//! two models streaming at once, Ollama's `keep_alive: 0`, and a rescan. And on a keyed server: a
//! reload for a larger `num_ctx` needs the `models` scope, and a sparse file in the models folder
//! that claims 1 TiB of tensor entries costs nothing to list.

#![cfg(feature = "real-model")]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lm_sandbox::cli::{Cli, Command};
use lm_sandbox::config::ServeConfig;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use common::MODEL_ID;

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const OLLAMA: &str = "smollm2:135m";
const LMSTUDIO: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";

fn link(model: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(model, to).unwrap();
}

/// An Ollama blob holding `text`, named by its digest; returns the digest.
fn blob(root: &Path, text: &str) -> String {
    let hex = format!("{:x}", Sha256::digest(text.as_bytes()));
    let path = root.join(format!("blobs/sha256-{hex}"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    format!("sha256:{hex}")
}

/// The stores under `root`: `dir/` (a truncated GGUF), `ollama/`, `lms/`.
fn stores(root: &Path) {
    let model = common::model_path();
    let _ = std::fs::remove_dir_all(root);
    // A truncated copy: its header promises tensors the file does not hold.
    let bytes = std::fs::read(&model).unwrap();
    std::fs::create_dir_all(root.join("dir")).unwrap();
    std::fs::write(root.join("dir/broken.gguf"), &bytes[..bytes.len() / 3]).unwrap();
    link(
        &model,
        &root.join("lms/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"),
    );
    let ollama = root.join("ollama");
    link(&model, &ollama.join(format!("blobs/sha256-{SHA}")));
    let params = blob(&ollama, r#"{"temperature": 0, "num_predict": 8}"#);
    let system = blob(&ollama, "You are a terse assistant.");
    let manifest = json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{SHA}")},
        {"mediaType": "application/vnd.ollama.image.params", "digest": params},
        {"mediaType": "application/vnd.ollama.image.system", "digest": system}]});
    let path = ollama.join("manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, manifest.to_string()).unwrap();
    // A preset for the LM Studio model: its own context, an alias, defaults.
    std::fs::write(
        root.join("presets.toml"),
        format!(
            "[models.\"{LMSTUDIO}\"]\nctx = 1024\nparallel = 1\naliases = [\"lms\"]\n\
             [models.\"{LMSTUDIO}\".defaults]\nnum_predict = 2\n"
        ),
    )
    .unwrap();
}

async fn start(root: &Path) -> lm_sandbox::server::RunningServer {
    let path = |p: &str| root.join(p).to_string_lossy().into_owned();
    serve(&[
        "--ctx-size",
        "2048",
        "--models-max",
        "2",
        "--idle-unload",
        "3s",
        "--models-dir",
        &path("dir"),
        "--ollama-models",
        &path("ollama"),
        "--lmstudio-models",
        &path("lms"),
        "--models-preset",
        &path("presets.toml"),
    ])
    .await
}

/// `serve` of the default model on a free port, 2 threads, 2 sequences, and `flags`, once it is
/// ready.
async fn serve(flags: &[&str]) -> lm_sandbox::server::RunningServer {
    let model = common::model_path();
    let argv: Vec<String> = [
        "lm-sandbox",
        "serve",
        "--port",
        "0",
        "-t",
        "2",
        "--parallel",
        "2",
    ]
    .into_iter()
    .chain(["-m", model.to_str().unwrap()])
    .chain(flags.iter().copied())
    .map(str::to_owned)
    .collect();
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
        panic!("not serve")
    };
    let config = ServeConfig::from_args(*args).unwrap();
    let server = lm_sandbox::server::start(&config).await.unwrap();
    server.ready().await.unwrap();
    server
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Every model's state.
    async fn states(&self) -> Vec<(String, String)> {
        let list = self.get("/v1/models").await;
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m.get("alias_of").is_none())
            .map(|m| {
                (
                    m["id"].as_str().unwrap().to_owned(),
                    m["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    async fn state(&self, id: &str) -> String {
        self.states()
            .await
            .into_iter()
            .find(|(i, _)| i == id)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("{id} not listed"))
    }

    async fn chat(&self, model: &str) -> (u16, Value) {
        self.post(
            "/v1/chat/completions",
            json!({"model": model, "max_tokens": 4, "temperature": 0,
                   "messages": [{"role": "user", "content": "Say hi."}]}),
        )
        .await
    }

    /// Streams a chat; returns the time to the first content and the text.
    async fn stream(&self, model: &str) -> (Duration, String) {
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .json(
                &json!({"model": model, "max_tokens": 16, "temperature": 0, "stream": true,
                           "messages": [{"role": "user", "content": "Count to five."}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{model}");
        let mut first = None;
        let mut text = String::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = String::from_utf8_lossy(&chunk.unwrap()).into_owned();
            for line in chunk.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    continue;
                }
                let event: Value = serde_json::from_str(data).unwrap();
                if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
                    first.get_or_insert_with(|| started.elapsed());
                    text.push_str(piece);
                }
            }
        }
        (first.unwrap_or_else(|| started.elapsed()), text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_from_three_stores_load_on_demand_unload_and_fail_alone() {
    let root: PathBuf = std::env::temp_dir().join(format!("lmsbx-many-{}", std::process::id()));
    stores(&root);
    let server = start(&root).await;
    let c = Client {
        http: reqwest::Client::new(),
        base: format!("http://{}", server.addr),
    };
    // Every model is listed with its state; only the -m model is loaded.
    let states = c.states().await;
    assert_eq!(
        states,
        [
            (MODEL_ID.to_owned(), "loaded".to_owned()),
            ("broken".to_owned(), "unloaded".to_owned()),
            (OLLAMA.to_owned(), "unloaded".to_owned()),
            (LMSTUDIO.to_owned(), "unloaded".to_owned()),
        ],
        "{states:?}"
    );
    let listed = c.get("/v1/models").await;
    let default = &listed["data"][0];
    let load_ms = default["load_ms"].as_u64().unwrap();
    eprintln!("figure: the default model loaded in {load_ms} ms");

    // A request for an unloaded model loads it; the time to the first token includes the load.
    let (ttft_cold, text) = c.stream(OLLAMA).await;
    assert!(!text.is_empty());
    let (ttft_warm, _) = c.stream(OLLAMA).await;
    eprintln!(
        "figure: time to first token with the load {} ms; loaded {} ms",
        ttft_cold.as_millis(),
        ttft_warm.as_millis()
    );
    assert_eq!(c.state(OLLAMA).await, "loaded");

    // Two models stream at once.
    let (a, b) = tokio::join!(c.stream(MODEL_ID), c.stream(OLLAMA));
    assert!(!a.1.is_empty() && !b.1.is_empty());

    // `--models-max 2`: a third model unloads the least recently used (the Ollama one, since the
    // -m model is used last).
    assert_eq!(c.chat(MODEL_ID).await.0, 200);
    let (status, body) = c.chat(LMSTUDIO).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.state(OLLAMA).await, "unloaded");
    assert_eq!(c.state(LMSTUDIO).await, "loaded");
    assert_eq!(c.state(MODEL_ID).await, "loaded");
    // Its preset: the alias answers, the context is its own, num_predict is its default.
    let listed = c.get("/v1/models").await;
    let lms = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == LMSTUDIO)
        .unwrap()
        .clone();
    assert_eq!(lms["aliases"], json!(["lms"]), "{lms}");
    assert_eq!(lms["meta"]["n_ctx_seq"], 1024, "{lms}");
    let (status, body) = c
        .post(
            "/v1/chat/completions",
            json!({"model": "lms", "messages": [{"role": "user", "content": "Tell a story."}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");

    // Ollama's /api/ps shows both loaded models and when each expires; its store's params and
    // system prompt are the model's defaults, shown by /api/show.
    let ps = c.get("/api/ps").await;
    assert_eq!(ps["models"].as_array().unwrap().len(), 2, "{ps}");
    let (_, show) = c.post("/api/show", json!({"model": OLLAMA})).await;
    assert_eq!(show["system"], "You are a terse assistant.", "{show}");
    assert!(show["parameters"].as_str().unwrap().contains("num_predict"));

    // Explicit unload and load (llama-server's router shapes).
    let (status, body) = c
        .post("/v1/models/unload", json!({"model": LMSTUDIO}))
        .await;
    assert_eq!((status, &body["success"]), (200, &json!(true)), "{body}");
    assert_eq!(c.state(LMSTUDIO).await, "unloaded");
    let (status, body) = c.post("/v1/models/load", json!({"model": OLLAMA})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.state(OLLAMA).await, "loaded");
    // The store's num_predict (8) is the default: an Ollama request without options stops there.
    let (status, body) = c
        .post(
            "/api/generate",
            json!({"model": OLLAMA, "prompt": "Write a long story.", "stream": false}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["eval_count"].as_u64().unwrap() <= 8, "{body}");

    // Idle unload (--idle-unload 3s): the Ollama model goes, the -m model stays.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.state(OLLAMA).await == "loaded" {
        assert!(Instant::now() < deadline, "not unloaded when idle");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(c.state(MODEL_ID).await, "loaded");

    // A model that cannot load fails with the reason; the others keep serving.
    let (status, body) = c.chat("broken").await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("broken") && message.contains("failed to load"),
        "{message}"
    );
    let listed = c.get("/v1/models").await;
    let broken = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "broken")
        .unwrap()
        .clone();
    assert_eq!(broken["state"], "failed");
    assert!(broken["failure"].as_str().is_some(), "{broken}");
    assert_eq!(c.chat(MODEL_ID).await.0, 200);

    // Ollama's load_duration is the wait for the load (the model was unloaded when idle) ...
    let (status, body) = c
        .post(
            "/api/chat",
            json!({"model": OLLAMA, "stream": false, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["load_duration"].as_u64().unwrap() > 1_000_000,
        "{body}"
    );
    // ... and keep_alive 0 with no prompt unloads.
    let (status, body) = c
        .post(
            "/api/generate",
            json!({"model": OLLAMA, "keep_alive": 0, "stream": false}),
        )
        .await;
    assert_eq!(
        (status, &body["done_reason"]),
        (200, &json!("unload")),
        "{body}"
    );
    assert_eq!(c.state(OLLAMA).await, "unloaded");

    // A rescan finds a model added since start, and SIGHUP rescans too.
    link(&common::model_path(), &root.join("dir/added.gguf"));
    let (status, body) = c.post("/v1/models/rescan", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(body["added"], json!(["added"]), "{body}");
    assert_eq!(c.state("added").await, "unloaded");
    link(&common::model_path(), &root.join("dir/hangup.gguf"));
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.states().await.iter().any(|(id, _)| id == "hangup") {
        assert!(Instant::now() < deadline, "SIGHUP did not rescan");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(server.shutdown(Duration::from_secs(10)).await);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A keyed server over the default model and a folder holding a sparse file that claims 1 TiB of
/// tensor entries.
async fn start_keyed(root: &Path) -> lm_sandbox::server::RunningServer {
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root.join("dir")).unwrap();
    let sparse = root.join("dir/sparse.gguf");
    let mut header = b"GGUF".to_vec();
    header.extend(3u32.to_le_bytes());
    header.extend((40u64 << 30).to_le_bytes());
    header.extend(0u64.to_le_bytes());
    std::fs::write(&sparse, header).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&sparse)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    std::fs::write(
        root.join("keys.txt"),
        "sk-chat inference\nsk-admin inference,models\n",
    )
    .unwrap();
    let path = |p: &str| root.join(p).to_string_lossy().into_owned();
    serve(&[
        "--ctx-size",
        "1024",
        "--models-dir",
        &path("dir"),
        "--keys-file",
        &path("keys.txt"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_for_more_context_needs_the_models_scope_and_a_sparse_file_costs_nothing() {
    let root = std::env::temp_dir().join(format!("lmsbx-keyed-{}", std::process::id()));
    let server = start_keyed(&root).await;
    let base = format!("http://{}", server.addr);
    let http = reqwest::Client::new();
    let n_ctx_seq = |models: &Value| {
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == MODEL_ID)
            .and_then(|m| m["meta"]["n_ctx_seq"].as_u64())
    };
    let list = |key: &'static str| {
        http.get(format!("{base}/v1/models"))
            .bearer_auth(key)
            .send()
    };
    let before: Value = list("sk-chat").await.unwrap().json().await.unwrap();
    assert_eq!(n_ctx_seq(&before), Some(512), "{before}");
    // The sparse file is listed as a model without its 1 TiB claim costing anything.
    let started = Instant::now();
    let tags = http
        .get(format!("{base}/api/tags"))
        .bearer_auth("sk-chat")
        .send()
        .await
        .unwrap();
    assert_eq!(tags.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(30));
    let grow = json!({"model": MODEL_ID, "prompt": "Hi", "stream": false,
                      "options": {"num_ctx": 1024, "num_predict": 2}});
    let refused = http
        .post(format!("{base}/api/generate"))
        .bearer_auth("sk-chat")
        .json(&grow)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert!(body.to_string().contains("num_ctx"), "{body}");
    let after: Value = list("sk-chat").await.unwrap().json().await.unwrap();
    assert_eq!(n_ctx_seq(&after), Some(512), "not reloaded");
    let grown = http
        .post(format!("{base}/api/generate"))
        .bearer_auth("sk-admin")
        .json(&grow)
        .send()
        .await
        .unwrap();
    assert_eq!(grown.status(), 200);
    let after: Value = list("sk-admin").await.unwrap().json().await.unwrap();
    assert_eq!(n_ctx_seq(&after), Some(1024), "{after}");
    server.shutdown(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&root);
}
