//! Raw command-line arguments (clap). Flag names follow llama-server's where they overlap; every
//! flag can also come from an `LM_SANDBOX_*` environment variable (a flag wins over the variable).
//! Validation into a typed config is `config.rs`'s job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The default model that `.ci/setup` fetches.
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Parser)]
#[command(name = "lm-sandbox", version, long_version = crate::build_info::LONG_VERSION, about = "A local LLM server: llama.cpp in-process behind an OpenAI-compatible API")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a GGUF model over the OpenAI-compatible HTTP API.
    Serve(Box<ServeArgs>),
    /// List NVIDIA GPUs as NVML reports them (`--json` writes the inventory format `plan --gpus` reads).
    Gpus(GpusArgs),
    /// Show where a model's layers would go, without loading it or creating any CUDA context.
    Plan(PlanArgs),
    /// Manage the hardened container where shell commands run (reached over SSH).
    Sandbox(SandboxArgs),
    /// Tool-call helpers.
    Tools(ToolsArgs),
    /// Model file checks.
    Model(ModelArgs),
    /// List the models the stores hold: folders of GGUF files, Ollama's store, LM Studio's folder.
    Models(ModelsArgs),
    /// A refreshing terminal view of a running server (models, sequences, queue, tokens/s, TTFT,
    /// GPU memory against the plan), from its /metrics, /health and /v1/placement.
    Top(TopArgs),
    /// Serve this machine's devices (its CUDA GPUs, else the CPU) to `serve --rpc` on another
    /// machine, over llama.cpp's RPC protocol. The protocol has no authentication.
    RpcWorker(RpcWorkerArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RpcWorkerArgs {
    /// Address to listen on. Anything but loopback needs --allow-remote.
    #[arg(long, env = "LM_SANDBOX_RPC_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "LM_SANDBOX_RPC_PORT", default_value_t = crate::rpc::DEFAULT_PORT)]
    pub port: u16,
    /// llama.cpp device names to serve (e.g. CUDA0,CUDA1); default: every GPU, else the CPU.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// The memory (MiB) each device reports to the server that plans on it, this worker's own
    /// use subtracted for "free": headroom to keep, or a small device for tests.
    #[arg(long)]
    pub mem: Option<u64>,
    /// llama.cpp's tensor cache: large tensors are kept here by hash, so a reload does not send
    /// them over the network again.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// CPU threads for the CPU device.
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Listen on a non-loopback address. The protocol has no authentication: anyone who reaches
    /// the port can use this machine's devices and memory. Use a private network or an SSH tunnel.
    #[arg(long)]
    pub allow_remote: bool,
}

/// The model stores to read (`serve` and `models`).
#[derive(Debug, Clone, Default, Args)]
pub struct StoreArgs {
    /// A folder of GGUF files (every `*.gguf` below it; split files as one model). Repeatable.
    #[arg(
        long = "models-dir",
        env = "LM_SANDBOX_MODELS_DIR",
        value_delimiter = ','
    )]
    pub models_dirs: Vec<std::path::PathBuf>,
    /// Ollama's store (default `$OLLAMA_MODELS`, else `~/.ollama/models`).
    #[arg(long, num_args = 0..=1)]
    pub ollama_models: Option<Option<std::path::PathBuf>>,
    /// LM Studio's folder (default `~/.lmstudio/models`, then `~/.cache/lm-studio/models`).
    #[arg(long, num_args = 0..=1)]
    pub lmstudio_models: Option<Option<std::path::PathBuf>>,
}

#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    #[command(flatten)]
    pub stores: StoreArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// A key for servers that have keys (/metrics is behind it unless --metrics-public).
    #[arg(long, env = "LM_SANDBOX_TOP_API_KEY")]
    pub api_key: Option<String>,
    /// Seconds between readings.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
}

#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ModelCommand {
    /// Compare llama.cpp's tokenization of a GGUF with Hugging Face's (`tokenizers`), built from
    /// the GGUF's own vocabulary, merges and pre-tokenizer name, or from a tokenizer.json beside
    /// it, over a corpus of hard cases. Exit status 1 when they differ.
    Check(ModelCheckArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ModelCheckArgs {
    /// The GGUF file.
    pub model: std::path::PathBuf,
    /// Texts to compare instead of the built-in corpus, one per line (`\n` and `\t` escapes).
    #[arg(long)]
    pub corpus: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ToolsArgs {
    #[command(subcommand)]
    pub command: ToolsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ToolsCommand {
    /// Read raw model output on stdin; print the OpenAI assistant message (content, reasoning,
    /// tool_calls) it parses to, with the reason when a call does not parse.
    Parse(ToolsParseArgs),
}

/// Which tool-call syntax to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatChoice {
    /// From `--template` (generic without one).
    Auto,
    Hermes,
    /// Qwen's XML calls (`<function=NAME><parameter=KEY>…`).
    QwenXml,
    /// GLM 4.5+ (`<tool_call>NAME<arg_key>…`).
    Glm,
    /// Kimi K2 (`<|tool_calls_section_begin|>…`).
    Kimi,
    /// Llama 4's pythonic calls (`[name(key=value)]`).
    Llama4,
    /// OpenAI's harmony (gpt-oss): `<|channel|>analysis|final|commentary`.
    Harmony,
    /// DeepSeek V3 and later (`<｜tool▁calls▁begin｜>…`).
    Deepseek,
    /// FunctionGemma (`<start_function_call>call:NAME{…}<end_function_call>`).
    FunctionGemma,
    /// Gemma 4 (`<|tool_call>call:NAME{…}<tool_call|>`).
    Gemma4,
    /// Kimi K3 (`<|open|>tools<|sep|><|open|>call tool="NAME"…`).
    KimiK3,
    Llama3,
    Mistral,
    Generic,
}

#[derive(Debug, Clone, Args)]
pub struct ToolsParseArgs {
    #[arg(long, value_enum, default_value = "auto")]
    pub format: FormatChoice,
    /// A Jinja chat template to detect the format from.
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// A JSON file with the request's `tools` array: calls are then checked against them.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// The end of the rendered prompt (e.g. `<|im_start|>assistant\n<think>\n`): when it opens
    /// reasoning, the output is read as starting inside it.
    #[arg(long)]
    pub generation_prompt: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SandboxCommand {
    /// Build the image if missing, generate the keys, start the container, pin its host key.
    Up(SandboxUpArgs),
    /// Stop and remove the container (the keys stay; `--volumes` also drops /workspace).
    Down(SandboxDownArgs),
    /// Show the container's state and run `true` through SSH.
    Status(SandboxStatusArgs),
    /// Run a command in the sandbox: `lm-sandbox sandbox exec -- CMD...` (stdin is passed on when
    /// it is not a terminal; exits with the command's status).
    Exec(SandboxExecArgs),
}

/// Which sandbox: its container name and where its keys and state live.
#[derive(Debug, Clone, Args)]
pub struct SandboxTarget {
    /// Container name (also names the workspace volume, `NAME-workspace`).
    #[arg(
        long = "sandbox-name",
        env = "LM_SANDBOX_SANDBOX_NAME",
        default_value = "lm-sandbox"
    )]
    pub name: String,
    /// Keys and `sandbox.json` live in STATE_DIR/NAME (default: $XDG_STATE_HOME/lm-sandbox or
    /// ~/.local/state/lm-sandbox).
    #[arg(long = "sandbox-state-dir", env = "LM_SANDBOX_SANDBOX_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The Docker CLI.
    #[arg(long, env = "LM_SANDBOX_DOCKER", default_value = "docker")]
    pub docker: String,
}

/// `sandbox up --transport`, as the command line spells it (`sandbox::command` maps it to the
/// sandbox's own type, so this module imports nothing of the sandbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// No network; SSH over `docker exec -i`.
    Exec,
    /// sshd listening on an internal Docker network.
    Tcp,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxUpArgs {
    #[command(flatten)]
    pub target: SandboxTarget,
    /// Memory limit (no swap beyond it).
    #[arg(long, default_value = "1g")]
    pub memory: String,
    /// CPU limit.
    #[arg(long, default_value = "1")]
    pub cpus: String,
    /// Most processes (and threads) at once.
    #[arg(long, default_value_t = 256)]
    pub pids_limit: u32,
    /// Size of /tmp.
    #[arg(long, default_value = "256m")]
    pub tmp_size: String,
    /// `exec`: no network, SSH over `docker exec -i`; `tcp`: sshd on an internal network.
    #[arg(long, value_enum, default_value = "exec")]
    pub transport: TransportArg,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxDownArgs {
    #[command(flatten)]
    pub target: SandboxTarget,
    /// Also remove the /workspace volume.
    #[arg(long)]
    pub volumes: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxStatusArgs {
    #[command(flatten)]
    pub target: SandboxTarget,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxExecArgs {
    #[command(flatten)]
    pub target: SandboxTarget,
    /// Seconds before the command (and everything it started) is killed.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// The command, joined with spaces and run by bash.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GpusArgs {
    /// Print the inventory as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// GGUF model file.
    #[arg(short = 'm', long, env = "LM_SANDBOX_MODEL", default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Total context over all sequences (0: the model's trained context).
    #[arg(short = 'c', long, default_value_t = 4096)]
    pub ctx_size: u32,
    /// Parallel sequences.
    #[arg(long, default_value_t = 4)]
    pub parallel: u32,
    /// KV cache element type.
    #[arg(long, value_enum, default_value = "f16")]
    pub cache_type: CacheType,
    /// Most tokens in one decode, as `serve --batch-size` (the micro-batch is at most 512 of
    /// them, and sizes the compute buffers).
    #[arg(short = 'b', long, default_value_t = 2048)]
    pub batch_size: u32,
    /// Plan for the inventory in this JSON file (from `lm-sandbox gpus --json`) instead of this machine.
    #[arg(long)]
    pub gpus: Option<PathBuf>,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// Plan as if this binary had a CUDA backend (it does with `--features cuda`).
    #[arg(long)]
    pub assume_cuda: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

/// KV cache element types, as llama.cpp names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheType {
    F16,
    Q8_0,
    Q4_0,
}

impl CacheType {
    pub fn bytes_per_element(self) -> f64 {
        match self {
            Self::F16 => 2.0,
            Self::Q8_0 => 34.0 / 32.0,
            Self::Q4_0 => 18.0 / 32.0,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// GGUF model file, loaded at start and kept loaded (repeatable; its file stem is its id).
    /// Without `-m` and without a store, the default model.
    #[arg(
        short = 'm',
        long = "model",
        env = "LM_SANDBOX_MODEL",
        value_delimiter = ','
    )]
    pub models: Vec<PathBuf>,

    /// Another name the first `-m` model answers to (repeatable; the file stem always works).
    #[arg(long = "alias", env = "LM_SANDBOX_ALIAS", value_delimiter = ',')]
    pub aliases: Vec<String>,

    #[command(flatten)]
    pub stores: StoreArgs,

    /// Per-model settings (ctx, parallel, n-gpu-layers, policy, template-file, aliases, system,
    /// defaults; `path` adds a file), TOML: see the README's "Models" section.
    #[arg(long, env = "LM_SANDBOX_MODELS_PRESET")]
    pub models_preset: Option<PathBuf>,

    /// Models loaded at once; loading one more unloads the least recently used.
    #[arg(long, env = "LM_SANDBOX_MODELS_MAX", default_value_t = 3)]
    pub models_max: usize,

    /// Unload a model idle this long (`10m`, `90s`, `1h`; `0`: never). `-m` models stay loaded.
    #[arg(long, env = "LM_SANDBOX_IDLE_UNLOAD", default_value = "10m")]
    pub idle_unload: String,

    /// Do not load a model when a request names it: it must be loaded with `POST /v1/models/load`.
    #[arg(long, env = "LM_SANDBOX_NO_MODELS_AUTOLOAD")]
    pub no_models_autoload: bool,

    /// Seconds a request waits for its model to load.
    #[arg(long, env = "LM_SANDBOX_LOAD_TIMEOUT", default_value_t = 600.0)]
    pub load_timeout: f64,

    /// Seconds an unload waits for the model's requests before failing them.
    #[arg(long, env = "LM_SANDBOX_UNLOAD_TIMEOUT", default_value_t = 30.0)]
    pub unload_timeout: f64,

    /// Address to listen on.
    #[arg(long, env = "LM_SANDBOX_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "LM_SANDBOX_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Also serve on this port (Ollama clients assume 11434); the Ollama routes are always on the
    /// main port too.
    #[arg(long, env = "LM_SANDBOX_OLLAMA_PORT")]
    pub ollama_port: Option<u16>,

    /// Total context in tokens, shared by all parallel sequences (0: the model's trained context).
    #[arg(short = 'c', long, env = "LM_SANDBOX_CTX_SIZE", default_value_t = 4096)]
    pub ctx_size: u32,

    /// Sequences decoded together; each gets ctx-size / parallel tokens. `-np N` works too.
    #[arg(long = "parallel", env = "LM_SANDBOX_PARALLEL", default_value_t = 4)]
    pub parallel: u32,

    /// CPU threads for decoding (default: all available cores).
    #[arg(short = 't', long, env = "LM_SANDBOX_THREADS")]
    pub threads: Option<u32>,

    /// Most tokens per decode step (prompt chunks plus one token per running sequence).
    #[arg(
        short = 'b',
        long,
        env = "LM_SANDBOX_BATCH_SIZE",
        default_value_t = 2048
    )]
    pub batch_size: u32,

    /// Server-wide cap on generated tokens per request (-1: none).
    #[arg(short = 'n', long, env = "LM_SANDBOX_N_PREDICT", default_value_t = -1, allow_negative_numbers = true)]
    pub n_predict: i64,

    /// Require `Authorization: Bearer KEY` (repeatable; comma-separated in the variable).
    #[arg(
        long = "api-key",
        env = "LM_SANDBOX_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Read API keys from FILE, one per line (blank lines and `#` comments skipped), so they do
    /// not show in `ps` (repeatable; adds to `--api-key`).
    #[arg(long = "api-key-file", env = "LM_SANDBOX_API_KEY_FILE")]
    pub api_key_files: Vec<PathBuf>,

    /// Keys with scopes (`inference`, `models`, `sandbox`, `metrics`) and limits: TOML `[[key]]`
    /// tables, or one `KEY scope,scope` per line (repeatable; adds to the other key flags).
    #[arg(long = "keys-file", env = "LM_SANDBOX_KEYS_FILE")]
    pub keys_files: Vec<PathBuf>,

    /// Origins browser pages may call from (`*` wildcards; comma-separated in the variable;
    /// default: the loopback origins and app schemes). `*` allows every origin.
    #[arg(
        long = "allowed-origins",
        env = "LM_SANDBOX_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Host names served besides loopback names and IP addresses (`*` wildcards). Checked while
    /// bound to loopback, or whenever given; `*` turns the check off.
    #[arg(
        long = "allowed-hosts",
        env = "LM_SANDBOX_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,

    /// LM Studio SDK websockets open at once; more upgrades are refused with 503.
    #[arg(long, env = "LM_SANDBOX_MAX_WEBSOCKETS", default_value_t = 64)]
    pub max_websockets: u32,

    /// Responses kept (`store`) for `previous_response_id` and `GET /v1/responses/{id}`, and
    /// their size in all (`k`, `m`, `g`); the least recently used go first.
    #[arg(long, env = "LM_SANDBOX_RESPONSES_MAX", default_value_t = 1024)]
    pub responses_max: u32,
    #[arg(long, env = "LM_SANDBOX_RESPONSES_MAX_BYTES", default_value = "256m")]
    pub responses_max_bytes: String,

    /// Requests handled at once; beyond that, 503 with Retry-After (`/health` is never shed).
    #[arg(long, env = "LM_SANDBOX_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: u32,

    /// Seconds a client gets to send a request's headers.
    #[arg(long, env = "LM_SANDBOX_HEADER_TIMEOUT", default_value_t = 10.0)]
    pub header_timeout: f64,

    /// Seconds a client gets to send a request's whole body.
    #[arg(long, env = "LM_SANDBOX_BODY_TIMEOUT", default_value_t = 30.0)]
    pub body_timeout: f64,

    /// Seconds between SSE keep-alive comments while a stream has nothing to send.
    #[arg(long, env = "LM_SANDBOX_SSE_KEEP_ALIVE", default_value_t = 15.0)]
    pub sse_keep_alive: f64,

    /// Include the git revision and backends in `/health` (off: `/health` says only the status).
    #[arg(long, env = "LM_SANDBOX_HEALTH_BUILD_INFO")]
    pub health_build_info: bool,

    /// Serve Prometheus metrics at `GET /metrics` (behind the API key when keys are set).
    #[arg(long, env = "LM_SANDBOX_METRICS")]
    pub metrics: bool,

    /// `/metrics` needs no API key (for a scraper on a trusted network).
    #[arg(long, env = "LM_SANDBOX_METRICS_PUBLIC", requires = "metrics")]
    pub metrics_public: bool,

    /// A Jinja chat template that replaces the one in the GGUF.
    #[arg(long, env = "LM_SANDBOX_CHAT_TEMPLATE_FILE")]
    pub chat_template_file: Option<PathBuf>,

    /// Requests that may wait for a free sequence; beyond that, 429 with Retry-After.
    #[arg(long, env = "LM_SANDBOX_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: u32,

    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "LM_SANDBOX_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    pub shutdown_timeout: u64,

    #[command(flatten)]
    pub placement: PlacementArgs,

    #[command(flatten)]
    pub sandbox: ServeSandboxArgs,
}

/// `serve`'s sandbox flags: with `--sandbox`, `POST /v1/sandbox/exec` runs commands in the container
/// that `lm-sandbox sandbox up` started.
#[derive(Debug, Clone, Args)]
pub struct ServeSandboxArgs {
    /// Connect to the sandbox and serve `POST /v1/sandbox/exec`.
    #[arg(long, env = "LM_SANDBOX_SANDBOX")]
    pub sandbox: bool,
    #[command(flatten)]
    pub target: SandboxTarget,
    /// API keys allowed to run commands (repeatable; they also work as `--api-key`s). `--sandbox`
    /// needs at least one: there is no unauthenticated path to command execution.
    #[arg(
        long = "sandbox-api-key",
        env = "LM_SANDBOX_SANDBOX_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub sandbox_api_keys: Vec<String>,
    /// Read sandbox keys from FILE, one per line (repeatable; adds to `--sandbox-api-key`).
    #[arg(long = "sandbox-api-key-file", env = "LM_SANDBOX_SANDBOX_API_KEY_FILE")]
    pub sandbox_api_key_files: Vec<PathBuf>,
    /// Sandbox keys whose chat requests run the server-side shell loop by default (for clients,
    /// like LM Studio, that cannot send `"sandbox": {"shell": true}`).
    #[arg(
        long = "sandbox-auto-shell-key",
        env = "LM_SANDBOX_SANDBOX_AUTO_SHELL_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auto_shell_keys: Vec<String>,
    /// The most `sandbox.max_tool_rounds` a chat request may ask for.
    #[arg(
        long = "sandbox-max-tool-rounds",
        env = "LM_SANDBOX_SANDBOX_MAX_TOOL_ROUNDS",
        default_value_t = 16
    )]
    pub max_tool_rounds: u32,
    /// One JSON line per command (default: STATE_DIR/NAME/audit.jsonl).
    #[arg(long = "sandbox-audit-log", env = "LM_SANDBOX_SANDBOX_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Size at which the audit log is rotated (to FILE.1 … FILE.4; the oldest is dropped).
    #[arg(
        long = "sandbox-audit-max",
        env = "LM_SANDBOX_SANDBOX_AUDIT_MAX",
        default_value = "64m"
    )]
    pub audit_max: String,
    /// Seconds a command gets when the request names no `timeout_s`.
    #[arg(
        long = "sandbox-timeout",
        env = "LM_SANDBOX_SANDBOX_TIMEOUT",
        default_value_t = 30.0
    )]
    pub timeout: f64,
    /// Most seconds a request may ask for.
    #[arg(
        long = "sandbox-max-timeout",
        env = "LM_SANDBOX_SANDBOX_MAX_TIMEOUT",
        default_value_t = 300.0
    )]
    pub max_timeout: f64,
    /// Size of each tenant's /workspace (a tmpfs; filling it is a clean "no space left" error),
    /// e.g. `1g`, `512m`.
    #[arg(
        long = "sandbox-disk",
        env = "LM_SANDBOX_SANDBOX_DISK",
        default_value = "1g"
    )]
    pub disk: String,
    /// Most tenant containers (one per API key and session); over the cap, the longest-idle paused
    /// one is removed, or the command gets 503 `sandbox_busy`.
    #[arg(
        long = "sandbox-max-tenants",
        env = "LM_SANDBOX_SANDBOX_MAX_TENANTS",
        default_value_t = 16
    )]
    pub max_tenants: usize,
    /// Sandbox sessions (tenant containers) one key may hold at once, unless its keys-file entry
    /// says `sandbox_sessions`.
    #[arg(
        long = "sandbox-max-sessions",
        env = "LM_SANDBOX_SANDBOX_MAX_SESSIONS",
        default_value_t = 4
    )]
    pub max_sessions: usize,
    /// Seconds without a command after which a tenant's container is paused.
    #[arg(
        long = "sandbox-idle-stop",
        env = "LM_SANDBOX_SANDBOX_IDLE_STOP",
        default_value_t = 600.0
    )]
    pub idle_stop: f64,
    /// Seconds without a command after which a tenant's container and workspace are removed.
    #[arg(
        long = "sandbox-idle-remove",
        env = "LM_SANDBOX_SANDBOX_IDLE_REMOVE",
        default_value_t = 86400.0
    )]
    pub idle_remove: f64,
    /// Seconds a command may wait for a free slot; then 503 `sandbox_busy`.
    #[arg(
        long = "sandbox-queue-timeout",
        env = "LM_SANDBOX_SANDBOX_QUEUE_TIMEOUT",
        default_value_t = 10.0
    )]
    pub queue_timeout: f64,
    /// Commands running at once; more wait their turn.
    #[arg(
        long = "sandbox-concurrency",
        env = "LM_SANDBOX_SANDBOX_CONCURRENCY",
        default_value_t = 16
    )]
    pub concurrency: usize,
    /// Bytes kept of each of stdout and stderr; the rest is counted and dropped, with a marker.
    #[arg(long = "sandbox-output-limit", env = "LM_SANDBOX_SANDBOX_OUTPUT_LIMIT", default_value_t = 1 << 20)]
    pub output_limit: usize,
    /// Seconds to reach the sandbox (retries included) before a request gets 503.
    #[arg(
        long = "sandbox-connect-timeout",
        env = "LM_SANDBOX_SANDBOX_CONNECT_TIMEOUT",
        default_value_t = 5.0
    )]
    pub connect_timeout: f64,
}

/// How layers are placed on GPUs (`lm-sandbox plan` shows the result without loading).
#[derive(Debug, Clone, Args)]
pub struct PlacementArgs {
    #[arg(
        long = "placement-policy",
        env = "LM_SANDBOX_PLACEMENT_POLICY",
        value_enum,
        default_value = "auto"
    )]
    pub policy: crate::gpu::plan::Policy,
    /// Layers to offload (n_layer + 1 includes the output layer; `all`: every layer and the
    /// output layer); default: as many as fit. `-ngl N` works too.
    #[arg(long = "n-gpu-layers", env = "LM_SANDBOX_N_GPU_LAYERS", value_parser = gpu_layers)]
    pub n_gpu_layers: Option<u32>,
    /// Comma-separated proportions, one per used GPU in device order.
    #[arg(long, env = "LM_SANDBOX_TENSOR_SPLIT", value_delimiter = ',')]
    pub tensor_split: Option<Vec<f64>>,
    /// GPU indices (as `lm-sandbox gpus` numbers them) to use, in this order.
    #[arg(long, env = "LM_SANDBOX_DEVICES", value_delimiter = ',')]
    pub devices: Option<Vec<usize>>,
    #[arg(
        long,
        env = "LM_SANDBOX_SPLIT_MODE",
        value_enum,
        default_value = "layer"
    )]
    pub split_mode: crate::gpu::plan::SplitMode,
    /// The GPU for `--split-mode none`.
    #[arg(long, env = "LM_SANDBOX_MAIN_GPU", default_value_t = 0)]
    pub main_gpu: usize,
    /// An `lm-sandbox rpc-worker` (or llama.cpp `rpc-server`) whose devices join the placement,
    /// as HOST:PORT. Repeatable.
    #[arg(long = "rpc", env = "LM_SANDBOX_RPC", value_delimiter = ',')]
    pub rpc: Vec<String>,
    /// Seconds an RPC worker may take to accept or answer any one read or write; past it the
    /// worker is lost and its models' requests fail.
    #[arg(
        long = "rpc-timeout",
        env = "LM_SANDBOX_RPC_TIMEOUT",
        default_value_t = 120.0
    )]
    pub rpc_timeout: f64,
}

/// `--n-gpu-layers`: a count, or llama-server's `all` (any count above the model's layers
/// offloads them all and the output layer).
fn gpu_layers(text: &str) -> Result<u32, String> {
    match text.trim() {
        "all" => Ok(ALL_LAYERS),
        n => n
            .parse::<u32>()
            .map_err(|_| format!("expected a layer count or `all`; got {n:?}")),
    }
}

/// `--n-gpu-layers all`: more layers than any model has.
pub const ALL_LAYERS: u32 = 1 << 20;

/// llama-server spells `--parallel` as `-np` and `--n-gpu-layers` as `-ngl`, which clap cannot
/// take as short flags: rewrite them.
pub fn normalize_args(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let rewrite = |arg: String, short: &str, long: &str| -> Result<String, String> {
        match arg.strip_prefix(short) {
            Some("") => Ok(long.to_owned()),
            Some(rest) if rest.starts_with('=') => Ok(format!("{long}{rest}")),
            _ => Err(arg),
        }
    };
    args.into_iter()
        .map(|arg| {
            rewrite(arg, "-np", "--parallel")
                .or_else(|arg| rewrite(arg, "-ngl", "--n-gpu-layers"))
                .unwrap_or_else(|arg| arg)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> ServeArgs {
        let argv = normalize_args(
            ["lm-sandbox", "serve"]
                .iter()
                .chain(args)
                .map(|s| s.to_string()),
        );
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(args) => *args,
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn llama_server_spellings_parse() {
        let a = serve(&[
            "-m", "x.gguf", "-c", "2048", "-np", "8", "-t", "2", "-b", "512", "-n", "64",
        ]);
        assert_eq!(
            (a.ctx_size, a.parallel, a.threads, a.batch_size, a.n_predict),
            (2048, 8, Some(2), 512, 64)
        );
        assert_eq!(serve(&["-np=3"]).parallel, 3);
        assert_eq!(serve(&["-ngl", "99"]).placement.n_gpu_layers, Some(99));
        let p = serve(&[
            "--tensor-split",
            "3,1",
            "--devices",
            "1,0",
            "--split-mode",
            "none",
            "--main-gpu",
            "1",
        ])
        .placement;
        assert_eq!(
            (p.tensor_split, p.devices, p.main_gpu),
            (Some(vec![3.0, 1.0]), Some(vec![1, 0]), 1)
        );
    }

    #[test]
    fn repeatable_flags_collect() {
        let a = serve(&[
            "--alias",
            "a",
            "--alias",
            "b",
            "--api-key",
            "k1",
            "--api-key",
            "k2",
        ]);
        assert_eq!(a.aliases, vec!["a", "b"]);
        assert_eq!(a.api_keys, vec!["k1", "k2"]);
    }
}
