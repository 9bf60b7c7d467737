//! The dialects' own official client libraries (pinned in `tests/clients/requirements.txt`,
//! installed into `target/clients-venv` by `.ci/setup`) against the real binary's server on the
//! default model. Needs `--features real-model`.

#![cfg(feature = "real-model")]

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Runs `tests/clients/SCRIPT` with the venv's Python against a server started with `extra` (at
/// its `--ollama-port` address when it has one).
async fn run_client(script: &str, extra: &[&str]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/clients-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/setup (it runs .ci/clients-venv)",
        python.display()
    );
    let server = common::start(extra).await;
    let base = format!("http://{}", server.ollama_addr.unwrap_or(server.addr));
    let script = root.join("tests/clients").join(script);
    // The script gets the server's API key, when it has one.
    let key = extra
        .iter()
        .position(|a| *a == "--api-key")
        .map(|i| extra[i + 1].to_owned());
    // The client blocks; the server runs on this runtime's other threads meanwhile.
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .arg(common::MODEL_ID)
            .args(key)
            .output()
            .expect("the client script runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "client script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    println!("{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_reads_embeddings_logprobs_and_metrics() {
    run_client("openai_sdk.py", &["--parallel", "2", "--metrics"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ollama_python_library_lists_shows_chats_generates_and_embeds() {
    // Through the second port Ollama clients assume (here a free one).
    run_client(
        "ollama_client.py",
        &["--parallel", "2", "--ollama-port", "0"],
    )
    .await;
}

/// Forces a tool call on a user turn with tools, so `act()` (which cannot ask for it) calls one.
const PRESET: &str = "tests/clients/lmstudio-preset.toml";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_studios_python_sdk_speaks_its_websocket_protocol() {
    run_client(
        "lmstudio_client.py",
        &["--parallel", "2", "--metrics", "--models-preset", PRESET],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lm_studios_python_sdk_authenticates_with_the_api_key_as_passkey() {
    run_client(
        "lmstudio_client.py",
        &[
            "--parallel",
            "2",
            "--metrics",
            "--models-preset",
            PRESET,
            "--api-key",
            "sdk-secret",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropics_python_sdk_speaks_messages() {
    // Keyed: the SDK sends the key as `x-api-key`.
    run_client(
        "anthropic_client.py",
        &["--parallel", "2", "--api-key", "sk-anthropic-test"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_speaks_responses() {
    run_client("openai_responses.py", &["--parallel", "2"]).await;
}
