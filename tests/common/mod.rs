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
