//! Shared set-up for the real-model suites: a server on an ephemeral loopback port, serving the
//! default model (fetched by `.ci/setup`).

#![allow(dead_code)]

use std::path::PathBuf;

use clap::Parser;
use lm_sandbox::cli::{Cli, Command};
use lm_sandbox::config::ServeConfig;
use lm_sandbox::server::{self, RunningServer};

pub const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

pub fn model_path() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run .ci/setup first",
        path.display()
    );
    path
}

/// Starts a server on 127.0.0.1:0 with `extra` flags and waits for the model.
pub async fn start(extra: &[&str]) -> RunningServer {
    let model = model_path();
    let mut argv: Vec<String> = ["lm-sandbox", "serve", "--port", "0", "-t", "2", "-m"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.push(model.to_string_lossy().into_owned());
    argv.extend(extra.iter().map(|s| s.to_string()));
    let Command::Serve(args) = Cli::try_parse_from(argv).expect("test flags parse").command else {
        panic!("not a serve command")
    };
    let config = ServeConfig::from_args(*args).expect("test config validates");
    let server = server::start(&config).await.expect("server starts");
    server.ready().await.expect("model loads");
    server
}

/// Runs `lm-sandbox tools parse ARGS` with `stdin` as the model output; its JSON report.
pub fn tools_parse(args: &[&str], stdin: &str) -> serde_json::Value {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args(["tools", "parse"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "tools parse {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
