//! lm-sandbox: a local LLM server that embeds llama.cpp and speaks OpenAI's HTTP API.
//!
//! # Layout
//! - [`cli`]: raw command-line arguments (clap), llama-server's flag names.
//! - [`config`]: the arguments validated into a typed [`config::ServeConfig`].
//! - [`engine`]: one thread per model owning llama.cpp; the scheduler (continuous batching), the
//!   admission queue, detokenization and stop strings; [`engine::EngineHandle`] is its front.
//! - [`template`]: chat templates rendered with Hugging Face's Jinja semantics.
//! - [`tools`]: tool calls and structured output: request checks, the generic tool prompt,
//!   JSON-schema grammars, and parsing model output into `tool_calls`.
//! - [`api`]: the axum router: OpenAI, Ollama and LM Studio routes, validation, errors, SSE and
//!   NDJSON, scoped API keys, the browser guard, embeddings, `/metrics`.
//! - [`gpu`]: the NVML inventory, model facts from GGUF headers, and the placement planner.
//! - [`sandbox`]: the hardened container commands run in, reached over SSH (russh); its image,
//!   profile, keys, executor and audit log.
//! - [`server`]: binding, serving and graceful shutdown.
//! - [`build_info`]: version, git revision and backends recorded at build time.
//! - [`metrics`]: the Prometheus registry of one server, and the reader of its text.
//! - [`fidelity`]: `model check`, llama.cpp's tokenizer against Hugging Face's.
//! - [`top`]: `lm-sandbox top`, a terminal view of a running server.
//! - [`rpc`]: llama.cpp's RPC workers: the relay each one is reached through, its measured use.
//! - [`store`]: the model stores people have (folders, Ollama's, LM Studio's) and `models`.
//!
//! See ARCHITECTURE.md for the invariants that hold these together.

pub mod api;
pub mod build_info;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fidelity;
pub mod gpu;
pub mod metrics;
pub mod registry;
pub mod rpc;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod template;
pub mod tools;
pub mod top;
