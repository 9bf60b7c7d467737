//! Criterion benches on the default model (run `.ci/setup` first): engine decode tokens/s with no
//! HTTP (1 and 4 sequences), streamed tokens/s through HTTP (1 and 8 streams), and time to first
//! token for a ~500-token prompt, cold and with a shared prefix.
//!
//! `cargo bench --bench throughput`. EOS is banned with a logit bias so every request decodes
//! exactly its token budget.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::StreamExt;
use lm_sandbox::cli::{Cli, Command};
use lm_sandbox::config::ServeConfig;
use lm_sandbox::engine::{
    spawn_llama_engine, EngineHandle, GenerationEvent, GenerationRequest, GpuOffload,
    LlamaEngineConfig, SamplingParams,
};
use lm_sandbox::server::{self, RunningServer};
use serde_json::json;

const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";
/// SmolLM2's `<|endoftext|>` and `<|im_end|>`.
const EOS_TOKENS: [i32; 2] = [0, 2];
const TOKENS: u32 = 64;

fn model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run .ci/setup",
        path.display()
    );
    path
}

fn threads() -> i32 {
    std::thread::available_parallelism().map_or(2, |n| n.get() as i32)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn greedy_without_eos() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        logit_bias: EOS_TOKENS.iter().map(|&t| (t, -100.0)).collect(),
        ..SamplingParams::default()
    }
}

async fn generate(engine: &EngineHandle, prompt: Vec<i32>) -> u32 {
    let mut events = engine
        .submit(GenerationRequest {
            prompt,
            sampling: greedy_without_eos(),
            max_new_tokens: TOKENS,
            stop: Vec::new(),
            special_tokens: false,
            logprobs: None,
            usage: None,
        })
        .expect("queue has room");
    while let Some(event) = events.recv().await {
        match event {
            GenerationEvent::Done { stats, .. } => return stats.generated_tokens,
            GenerationEvent::Failed(message) | GenerationEvent::Rejected(message) => {
                panic!("{message}")
            }
            GenerationEvent::Text(_) | GenerationEvent::Logprobs(_) => {}
        }
    }
    panic!("engine stopped");
}

fn engine_decode(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("engine_decode");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for n_seq in [1u32, 4] {
        let (engine, _thread) = spawn_llama_engine(LlamaEngineConfig {
            model_path: model_path(),
            model_id: MODEL_ID.into(),
            n_ctx: 1024 * n_seq,
            n_seq,
            n_batch: 2048,
            n_threads: threads(),
            max_queue: 16,
            offload: GpuOffload::default(),
        })
        .expect("engine thread");
        rt.block_on(engine.wait_loaded());
        let tokenizer = engine.model_info().expect("model loaded").tokenizer;
        let prompt = tokenizer.tokenize("Once upon a time, in a land far away,", true);
        group.throughput(Throughput::Elements(u64::from(TOKENS * n_seq)));
        group.bench_function(BenchmarkId::new("sequences", n_seq), |b| {
            b.to_async(&rt).iter(|| async {
                let runs = (0..n_seq).map(|_| generate(&engine, prompt.clone()));
                let generated: u32 = futures::future::join_all(runs).await.into_iter().sum();
                assert_eq!(generated, TOKENS * n_seq);
            })
        });
    }
    group.finish();
}

async fn start_server(parallel: u32) -> RunningServer {
    let argv = [
        "lm-sandbox".to_string(),
        "serve".into(),
        "--port".into(),
        "0".into(),
        "-np".into(),
        parallel.to_string(),
        "-c".into(),
        (2048 * parallel).to_string(),
        "-t".into(),
        threads().to_string(),
        "-m".into(),
        model_path().to_string_lossy().into_owned(),
    ];
    let argv = lm_sandbox::cli::normalize_args(argv);
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("flags").command else {
        panic!("not a serve command")
    };
    let server = server::start(&ServeConfig::from_args(*args).expect("config"))
        .await
        .expect("server");
    server.ready().await.expect("model loads");
    server
}

/// One streamed chat completion; returns the number of content chunks.
async fn stream_chat(client: &reqwest::Client, url: &str, content: String) -> u64 {
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": true,
        "logit_bias": {"0": -100, "2": -100},
    });
    let response = client.post(url).json(&body).send().await.expect("request");
    assert_eq!(response.status(), 200);
    let mut chunks = 0;
    let mut bytes = response.bytes_stream();
    while let Some(piece) = bytes.next().await {
        let piece = piece.expect("body");
        chunks += piece
            .windows(b"\"content\":\"".len())
            .filter(|w| *w == b"\"content\":\"")
            .count() as u64;
    }
    chunks
}

fn http_streams(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(start_server(8));
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let mut group = c.benchmark_group("http_streamed");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(12));
    for streams in [1u64, 8] {
        group.throughput(Throughput::Elements(streams * u64::from(TOKENS)));
        group.bench_function(BenchmarkId::new("streams", streams), |b| {
            b.to_async(&rt).iter(|| async {
                let runs = (0..streams).map(|i| stream_chat(&client, &url, format!("Story {i}:")));
                futures::future::join_all(runs).await;
            })
        });
    }
    group.finish();
    rt.block_on(server.shutdown(Duration::from_secs(5)));
}

fn first_token(c: &mut Criterion) {
    let rt = runtime();
    let server = rt.block_on(start_server(1));
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let story =
        "The keeper climbed the spiral stairs to light the lamp and watch the ships. ".repeat(28);
    let nonce = AtomicU64::new(0);
    let mut group = c.benchmark_group("first_token_500");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    let mut bench = |name: &str, shared_prefix: bool| {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_custom(|iters| {
                let (client, url, story, nonce) = (&client, &url, &story, &nonce);
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        // A unique first line defeats the prefix cache; a fixed one hits it.
                        let tag = if shared_prefix {
                            0
                        } else {
                            nonce.fetch_add(1, Ordering::Relaxed) + 1
                        };
                        let body = json!({
                            "model": MODEL_ID,
                            "messages": [{"role": "user", "content": format!("[{tag}] {story}")}],
                            "max_tokens": 1,
                        });
                        let started = Instant::now();
                        let response = client.post(url).json(&body).send().await.expect("request");
                        assert_eq!(response.status(), 200);
                        response.bytes().await.expect("body");
                        total += started.elapsed();
                    }
                    total
                }
            })
        });
    };
    bench("cold", false);
    bench("shared_prefix", true);
    group.finish();
    rt.block_on(server.shutdown(Duration::from_secs(5)));
}

criterion_group!(benches, engine_decode, http_streams, first_token);
criterion_main!(benches);
