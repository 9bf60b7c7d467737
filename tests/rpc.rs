//! llama.cpp's RPC workers as placement devices: two real `lm-sandbox rpc-worker` processes on
//! loopback, each backed by the CPU and reporting a chosen memory size, make a real, unequal,
//! two-device split. The split must be the plan's (read back from llama.cpp's load), the output
//! token-for-token the single-device run's, the measured use within 5 % of the plan; a worker
//! killed mid-generation fails that model's request and leaves the server (and its other models)
//! serving; a worker that hangs (behind a proxy that stops passing its answers) fails its model's
//! request within `--rpc-timeout`, naming it.

use std::net::TcpListener;
use std::process::Command;
#[cfg(feature = "real-model")]
use std::process::{Child, Stdio};
#[cfg(feature = "real-model")]
use std::time::{Duration, Instant};

#[cfg(feature = "real-model")]
mod common;

const BIN: &str = env!("CARGO_BIN_EXE_lm-sandbox");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An `rpc-worker` child process, killed when dropped.
#[cfg(feature = "real-model")]
struct Worker {
    child: Child,
    endpoint: String,
}

#[cfg(feature = "real-model")]
impl Worker {
    /// Starts a worker reporting `mem_mib` and waits until it answers a handshake.
    fn start(mem_mib: u64) -> Self {
        let port = free_port();
        let child = Command::new(BIN)
            .args(["rpc-worker", "--port", &port.to_string(), "-t", "1"])
            .args(["--mem", &mem_mib.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rpc-worker starts");
        let endpoint = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while lm_sandbox::rpc::probe(&endpoint).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the worker on {endpoint} never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, endpoint }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(feature = "real-model")]
impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the binary with `args`, which must fail; its stderr.
fn failure(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_worker_refuses_a_public_address_without_allow_remote() {
    let err = failure(&["rpc-worker", "--host", "0.0.0.0", "--port", "1"]);
    assert!(
        err.contains("--allow-remote")
            && err.contains("no authentication")
            && err.contains("ssh -N -L"),
        "{err}"
    );
}

#[test]
fn an_unreachable_worker_stops_serve_with_its_name() {
    let endpoint = format!("127.0.0.1:{}", free_port());
    let err = failure(&["serve", "--port", "0", "--rpc", &endpoint]);
    assert!(
        err.contains(&endpoint) && err.contains("unreachable"),
        "{err}"
    );
}

#[cfg(feature = "real-model")]
mod real {
    use super::*;

    use futures::StreamExt;
    use serde_json::{json, Value};

    /// llama.cpp's device list is process-wide and not thread-safe while devices are being
    /// registered, which each server with `--rpc` does as it starts: a real deployment starts one
    /// server per process, so these tests take turns.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// `/v1/placement` once the 2-second poller has read the workers' use after loading (a
    /// reading taken while the load was still allocating stays until the next one).
    async fn placement_measured(base: &str) -> Value {
        let started = Instant::now();
        loop {
            let placement = get(base, "/v1/placement").await;
            let measured = placement["models"][0]["measured"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let settled = |m: &Value| m["used"].as_u64() > Some(0) && m["used"] == m["allocated"];
            if !measured.is_empty() && measured.iter().all(settled) {
                return placement;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{placement:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // Sized with `lm-sandbox plan --rpc … -ngl all -c 1024 --parallel 1 -b 64`: the default model
    // with every layer, the output layer and their buffers needs about 130 MiB; neither worker
    // alone holds it, both together do.
    const MEM_A: u64 = 90;
    const MEM_B: u64 = 70;
    const FLAGS: [&str; 8] = [
        "--n-gpu-layers",
        "all",
        "--ctx-size",
        "1024",
        "--parallel",
        "1",
        "-b",
        "64",
    ];

    async fn get(base: &str, path: &str) -> Value {
        reqwest::get(format!("{base}{path}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn chat(base: &str, model: &str, prompt: &str, max_tokens: u32) -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(
                &json!({"model": model, "max_tokens": max_tokens, "temperature": 0,
                          "messages": [{"role": "user", "content": prompt}]}),
            )
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Streams a long story from the default model, calling `at_first_content` once the first
    /// content arrives; the whole stream's text, which must end within 120 s.
    async fn long_story(base: &str, mut at_first_content: impl FnMut()) -> String {
        let response = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&json!({"model": common::MODEL_ID, "max_tokens": 900, "temperature": 0,
                          "stream": true,
                          "messages": [{"role": "user", "content": "Write a long story about a dragon."}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let mut body = response.bytes_stream();
        let mut seen = String::new();
        let mut called = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        while let Some(chunk) = tokio::time::timeout_at(deadline.into(), body.next())
            .await
            .expect("the stream ends")
        {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if !called && seen.contains("\"content\"") {
                at_first_content();
                called = true;
            }
        }
        seen
    }

    /// `/health` once it says 503 (the engine thread marks itself failed just after it sent the
    /// stream its error), within 5 s.
    async fn failed_health(base: &str) -> Value {
        let started = Instant::now();
        loop {
            let response = reqwest::get(format!("{base}/health")).await.unwrap();
            let status = response.status().as_u16();
            let health: Value = response.json().await.unwrap();
            if status == 503 || started.elapsed() > Duration::from_secs(5) {
                assert_eq!(status, 503, "{health}");
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn text(reply: &Value) -> String {
        reply["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_workers_split_the_model_as_planned_and_as_the_cpu_would() {
        let _turn = ONE_AT_A_TIME.lock().await;
        let a = Worker::start(MEM_A);
        let b = Worker::start(MEM_B);
        let mut flags = vec!["--rpc", &a.endpoint, "--rpc", &b.endpoint];
        flags.extend(FLAGS);
        let server = common::start(&flags).await;
        let base = format!("http://{}", server.addr);

        let placement = placement_measured(&base).await;
        let model = &placement["models"][0];
        let devices = model["plan"]["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 2, "{model:#}");
        let counts: Vec<u64> = devices
            .iter()
            .map(|d| d["end_layer"].as_u64().unwrap() - d["first_layer"].as_u64().unwrap())
            .collect();
        assert_ne!(counts[0], counts[1], "an unequal split: {counts:?}");
        assert_eq!(
            counts.iter().sum::<u64>(),
            30,
            "every layer offloaded: {model:#}"
        );
        assert_eq!(model["plan"]["n_gpu_layers"], 31, "the output layer too");
        for d in devices {
            assert!(d["pci_bus_id"].as_str().unwrap().starts_with("rpc:"), "{d}");
        }
        // llama.cpp put the layers where the plan did.
        let layers = model["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "{model:#}");
        for l in layers {
            assert_eq!(l["planned"], l["loaded"], "{layers:?}");
        }
        // The relay's measure of what each worker allocated, within 5 % of the plan.
        for m in model["measured"].as_array().unwrap() {
            let off = m["allocated_difference_percent"].as_f64().unwrap();
            assert!(off.abs() <= 5.0, "{m}");
            let used = m["difference_percent"].as_f64().unwrap();
            assert!(used.abs() <= 5.0, "{m}");
        }

        let prompt = "Name three colors and one animal.";
        let (status, split) = chat(&base, common::MODEL_ID, prompt, 48).await;
        assert_eq!(status, 200, "{split}");
        server.shutdown(Duration::from_secs(5)).await;

        // The same request on the CPU alone: greedy output, token for token.
        let cpu = common::start(&FLAGS[2..]).await;
        let cpu_base = format!("http://{}", cpu.addr);
        let (status, alone) = chat(&cpu_base, common::MODEL_ID, prompt, 48).await;
        assert_eq!(status, 200);
        assert_eq!(text(&split), text(&alone));
        assert_eq!(split["usage"], alone["usage"]);
        assert!(!text(&split).is_empty());
        cpu.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_killed_mid_generation_fails_that_model_only() {
        let _turn = ONE_AT_A_TIME.lock().await;
        let a = Worker::start(MEM_A);
        let mut b = Worker::start(MEM_B);
        // A second model (the same file under another name) kept on the CPU by its preset.
        let root = std::env::temp_dir().join(format!("lmsbx-rpc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("models")).unwrap();
        std::os::unix::fs::symlink(common::model_path(), root.join("models/other.gguf")).unwrap();
        std::fs::write(
            root.join("presets.toml"),
            "[models.other]\nn-gpu-layers = 0\n",
        )
        .unwrap();
        let (dir, preset) = (
            root.join("models").to_string_lossy().into_owned(),
            root.join("presets.toml").to_string_lossy().into_owned(),
        );
        let mut flags = vec!["--rpc", &a.endpoint, "--rpc", &b.endpoint];
        flags.extend(FLAGS);
        flags.extend(["--models-dir", &dir, "--models-preset", &preset]);
        let server = common::start(&flags).await;
        let base = format!("http://{}", server.addr);
        let (status, _) = chat(&base, "other", "Say hi.", 4).await;
        assert_eq!(status, 200);

        let mut killed = false;
        let seen = long_story(&base, || {
            b.kill();
            killed = true;
        })
        .await;
        assert!(killed, "the stream ended before any content: {seen}");
        assert!(
            seen.contains("\"error\"") && seen.contains(&b.endpoint) && seen.contains("gone"),
            "the stream ends with an error naming the worker: {}",
            &seen[seen.len().saturating_sub(800)..]
        );

        // The server is up; /health reports the default (RPC) model failed, naming the worker.
        let health = failed_health(&base).await;
        assert_eq!(health["status"], "failed", "{health}");
        assert!(
            health["reason"].as_str().unwrap().contains(&b.endpoint),
            "{health}"
        );
        // Its requests are refused with that reason, and the other model keeps serving.
        let (status, refused) = chat(&base, common::MODEL_ID, "Say hi.", 4).await;
        assert!(status >= 500, "{status} {refused}");
        let (status, reply) = chat(&base, "other", "Say hi.", 8).await;
        assert_eq!(status, 200, "{reply}");
        assert!(!text(&reply).is_empty());
        server.shutdown(Duration::from_secs(5)).await;
        let _ = std::fs::remove_dir_all(&root);
    }

    /// A TCP proxy in front of `worker` that forwards both ways until `hang` is set; then it keeps
    /// every connection open and passes nothing back: a worker that hangs. Returns its endpoint.
    fn hanging_proxy(worker: &str, hang: std::sync::Arc<std::sync::atomic::AtomicBool>) -> String {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = listener.local_addr().unwrap().to_string();
        let worker = worker.to_owned();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(upstream) = std::net::TcpStream::connect(&worker) else {
                    continue;
                };
                let pipe = |mut from: std::net::TcpStream,
                            mut to: std::net::TcpStream,
                            hang: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>| {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 1 << 16];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => {
                                    // One side hung up: so does the other (a worker serves one
                                    // client at a time).
                                    let _ = to.shutdown(std::net::Shutdown::Both);
                                    return;
                                }
                                Ok(n) => n,
                            };
                            while hang.as_ref().is_some_and(|h| h.load(Ordering::SeqCst)) {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    });
                };
                pipe(
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    None,
                );
                pipe(upstream, client, Some(std::sync::Arc::clone(&hang)));
            }
        });
        endpoint
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_worker_fails_its_model_within_the_rpc_timeout() {
        let _turn = ONE_AT_A_TIME.lock().await;
        let a = Worker::start(MEM_A);
        let b = Worker::start(MEM_B);
        let hang = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hung = hanging_proxy(&b.endpoint, std::sync::Arc::clone(&hang));
        let mut flags = vec!["--rpc", &a.endpoint, "--rpc", &hung, "--rpc-timeout", "3"];
        flags.extend(FLAGS);
        let server = common::start(&flags).await;
        let base = format!("http://{}", server.addr);
        let mut hung_at = None;
        let seen = long_story(&base, || {
            hang.store(true, std::sync::atomic::Ordering::SeqCst);
            hung_at = Some(Instant::now());
        })
        .await;
        let waited = hung_at
            .expect("the stream ended before any content")
            .elapsed();
        assert!(
            seen.contains("\"error\"") && seen.contains(&hung) && seen.contains("--rpc-timeout"),
            "the stream ends with an error naming the worker and the deadline: {}",
            &seen[seen.len().saturating_sub(800)..]
        );
        // Within the deadline and a step or two of slack, not forever.
        assert!(waited < Duration::from_secs(60), "{waited:?}");
        // The server is up and says which worker.
        let health = failed_health(&base).await;
        assert!(
            health["reason"].as_str().unwrap().contains(&hung),
            "{health}"
        );
        let models = get(&base, "/v1/models").await;
        assert!(models["data"].is_array(), "{models}");
        drop(a);
        server.shutdown(Duration::from_secs(5)).await;
    }
}
