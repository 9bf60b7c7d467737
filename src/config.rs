//! Validated configuration: [`ServeArgs`] checked once into [`ServeConfig`]. Every error names the
//! flag it is about; defaults live in `cli.rs` only.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::{ApiConfig, ApiKey, BrowserPolicy, Scope};
use crate::cli::{PlacementArgs, ServeArgs, ServeSandboxArgs};
use crate::engine::{GpuOffload, LlamaEngineConfig};
use crate::gpu::plan::PlanConfig;
use crate::registry::RegistryConfig;
use crate::sandbox::container::{resolve_state_dir, sandbox_dir};
use crate::sandbox::SandboxLimits;
use crate::store::Sources;
use crate::template::ChatTemplate;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--model {path}: {reason} (run .ci/setup to fetch the default model)")]
    Model { path: PathBuf, reason: String },
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("--chat-template-file {path}: {reason}")]
    ChatTemplate { path: PathBuf, reason: String },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        message: message.into(),
    }
}

/// Bounds on the HTTP side.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub header_timeout: Duration,
}

/// Keys from `--api-key-file`-style files: one per line, blank lines and `#` comments skipped.
/// A file of secrets, with a warning when other users may read it.
fn read_secret_file(flag: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(flag, format!("{}: {e}", path.display())))?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "{flag}: the key file is readable by other users; chmod 600 it"
            );
        }
    }
    Ok(text)
}

fn read_key_files(flag: &'static str, paths: &[PathBuf]) -> Result<Vec<String>, ConfigError> {
    let mut keys = Vec::new();
    for path in paths {
        let text = read_secret_file(flag, path)?;
        let before = keys.len();
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
        if keys.len() == before {
            return Err(invalid(flag, format!("{} holds no key", path.display())));
        }
    }
    Ok(keys)
}

/// The user's placement flags as the planner takes them (context and build facts are set where
/// the plan is made).
pub fn plan_config(args: &PlacementArgs) -> PlanConfig {
    PlanConfig {
        policy: args.policy,
        n_gpu_layers: args.n_gpu_layers,
        devices: args.devices.clone(),
        tensor_split: args.tensor_split.clone(),
        split_mode: args.split_mode,
        main_gpu: args.main_gpu,
        ..PlanConfig::default()
    }
}

/// A duration as `--idle-unload` takes it: `10m`, `90s`, `1h`, `1h30m`, or bare seconds; `0` is
/// `None` (never).
pub fn idle_duration(flag: &'static str, text: &str) -> Result<Option<Duration>, ConfigError> {
    let bad = || {
        invalid(
            flag,
            format!("must be a duration such as 10m, 90s, 1h30m or 0 (never); got {text:?}"),
        )
    };
    let text = text.trim();
    let seconds = match text.parse::<f64>() {
        Ok(n) => n,
        Err(_) => {
            let mut total = 0.0;
            let mut rest = text;
            while !rest.is_empty() {
                let digits = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .filter(|&i| i > 0)
                    .ok_or_else(bad)?;
                let number: f64 = rest[..digits].parse().map_err(|_| bad())?;
                rest = &rest[digits..];
                let unit = rest
                    .find(|c: char| c.is_ascii_digit())
                    .unwrap_or(rest.len());
                total += number
                    * match &rest[..unit] {
                        "s" => 1.0,
                        "m" => 60.0,
                        "h" => 3600.0,
                        "d" => 86_400.0,
                        _ => return Err(bad()),
                    };
                rest = &rest[unit..];
            }
            total
        }
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(bad());
    }
    Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds)))
}

/// Where `serve`'s models come from, and how many it keeps loaded.
#[derive(Debug, Clone)]
pub struct ModelsConfig {
    /// `-m` files, loaded at start; the first answers to `aliases` too.
    pub files: Vec<PathBuf>,
    pub aliases: Vec<String>,
    pub stores: Sources,
    pub registry: RegistryConfig,
    /// `--models-preset`: per-model settings by id.
    pub presets: crate::registry::preset::Presets,
}

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Every engine setting but the model (each load fills in its path, id and offload).
    pub engine: LlamaEngineConfig,
    pub models: ModelsConfig,
    pub api: ApiConfig,
    pub host: String,
    pub port: u16,
    /// `--ollama-port`: a second port with the same routes.
    pub ollama_port: Option<u16>,
    pub shutdown_timeout: Duration,
    /// The placement settings; each model's plan (and its engine's offload) is decided when it
    /// loads, from live GPU readings.
    pub placement: PlanConfig,
    /// `--sandbox`: where the sandbox is and how commands are bounded.
    pub sandbox: Option<SandboxConfig>,
    pub http: HttpLimits,
    /// `--rpc`: the RPC workers whose devices join the placement (`HOST:PORT`).
    pub rpc: Vec<String>,
    /// `--rpc-timeout`: the deadline of each read and write on a worker's connection.
    pub rpc_timeout: Duration,
}

/// The `--rpc` endpoints, checked.
pub fn rpc_endpoints(args: &PlacementArgs) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::new();
    for text in &args.rpc {
        let endpoint =
            crate::rpc::parse_endpoint(text.trim()).map_err(|e| invalid("--rpc", e.to_string()))?;
        if !out.contains(&endpoint) {
            out.push(endpoint);
        }
    }
    Ok(out)
}

/// `rpc-worker`'s flags, validated: a non-loopback address only with `--allow-remote`.
pub fn rpc_worker_config(
    args: &crate::cli::RpcWorkerArgs,
) -> Result<crate::engine::RpcWorkerConfig, ConfigError> {
    if !crate::rpc::is_loopback(&args.host) && !args.allow_remote {
        return Err(invalid(
            "--host",
            format!(
                "{} is not a loopback address. llama.cpp's RPC protocol has no authentication: \
                 whoever reaches the port can run computations on this machine's devices and read \
                 and write their memory. Keep the worker on 127.0.0.1 and reach it through an SSH \
                 tunnel (on the server: ssh -N -L {port}:127.0.0.1:{port} THIS-HOST, then \
                 --rpc 127.0.0.1:{port}), or pass --allow-remote on a private network you trust",
                args.host,
                port = args.port
            ),
        ));
    }
    if args.mem == Some(0) {
        return Err(invalid("--mem", "must be at least 1 MiB"));
    }
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    Ok(crate::engine::RpcWorkerConfig {
        endpoint: format!("{}:{}", args.host, args.port),
        devices: args.devices.clone(),
        mem: args.mem.map(|mib| mib << 20),
        cache: args.cache.clone(),
        threads: threads.max(1),
    })
}

/// `serve --sandbox`, validated.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// STATE_DIR/NAME: the keys and `sandbox.json`.
    pub dir: PathBuf,
    pub audit_log: PathBuf,
    /// Size at which the audit log rotates (`--sandbox-audit-max`).
    pub audit_max: u64,
    pub limits: SandboxLimits,
    pub concurrency: usize,
    pub output_limit: usize,
    pub connect_timeout: Duration,
    pub queue_timeout: Duration,
    /// Bytes of each tenant's /workspace.
    pub disk_bytes: u64,
    pub max_tenants: usize,
    /// Tenants one key may hold unless its key says otherwise (`--sandbox-max-sessions`).
    pub max_sessions: usize,
    pub idle_stop: Duration,
    pub idle_remove: Duration,
}

/// A size of at least 1 MiB, as Docker writes them (`1g`, `512m`, `1GiB`, bytes).
fn bytes(flag: &'static str, text: &str) -> Result<u64, ConfigError> {
    crate::sandbox::container::parse_size(text)
        .filter(|&n| n >= 1 << 20)
        .ok_or_else(|| {
            invalid(
                flag,
                format!("must be a size of at least 1m (e.g. 1g, 512m); got {text:?}"),
            )
        })
}

fn seconds(flag: &'static str, value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && value > 0.0 && value <= 86_400.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(invalid(
            flag,
            format!("must be more than 0 and at most 86400 seconds; got {value}"),
        ))
    }
}

impl SandboxConfig {
    /// `keys` are every key the server takes (flags and keys files): `--sandbox` needs one with
    /// the `sandbox` scope.
    fn from_args(args: &ServeSandboxArgs, keys: &[ApiKey]) -> Result<Option<Self>, ConfigError> {
        if args.sandbox_api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("--sandbox-api-key", "keys must not be empty"));
        }
        if args.auto_shell_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid(
                "--sandbox-auto-shell-key",
                "keys must not be empty",
            ));
        }
        if args.max_tool_rounds == 0 {
            return Err(invalid("--sandbox-max-tool-rounds", "must be at least 1"));
        }
        if !args.sandbox {
            return Ok(None);
        }
        if !keys.iter().any(|k| k.scopes.contains(Scope::Sandbox)) {
            return Err(invalid(
                "--sandbox-api-key",
                "--sandbox needs at least one key allowed to run commands (--sandbox-api-key, or \
                 the `sandbox` scope in --keys-file): there is no unauthenticated path to \
                 command execution",
            ));
        }
        let default_timeout = seconds("--sandbox-timeout", args.timeout)?;
        let max_timeout = seconds("--sandbox-max-timeout", args.max_timeout)?;
        if default_timeout > max_timeout {
            return Err(invalid(
                "--sandbox-timeout",
                format!(
                    "{} is more than --sandbox-max-timeout {}",
                    args.timeout, args.max_timeout
                ),
            ));
        }
        if args.concurrency == 0 {
            return Err(invalid("--sandbox-concurrency", "must be at least 1"));
        }
        if args.output_limit < 1024 {
            return Err(invalid(
                "--sandbox-output-limit",
                format!("must be at least 1024 bytes; got {}", args.output_limit),
            ));
        }
        let dir = sandbox_dir(
            &resolve_state_dir(args.target.state_dir.as_deref()),
            &args.target.name,
        );
        Ok(Some(Self {
            audit_max: bytes("--sandbox-audit-max", &args.audit_max)?,
            audit_log: args
                .audit_log
                .clone()
                .unwrap_or_else(|| dir.join("audit.jsonl")),
            dir,
            limits: SandboxLimits {
                default_timeout,
                max_timeout,
            },
            concurrency: args.concurrency,
            output_limit: args.output_limit,
            connect_timeout: seconds("--sandbox-connect-timeout", args.connect_timeout)?,
            queue_timeout: seconds("--sandbox-queue-timeout", args.queue_timeout)?,
            disk_bytes: bytes("--sandbox-disk", &args.disk)?,
            max_tenants: match args.max_tenants {
                0 => return Err(invalid("--sandbox-max-tenants", "must be at least 1")),
                n => n,
            },
            max_sessions: match args.max_sessions {
                0 => return Err(invalid("--sandbox-max-sessions", "must be at least 1")),
                n => n,
            },
            idle_stop: seconds("--sandbox-idle-stop", args.idle_stop)?,
            idle_remove: seconds("--sandbox-idle-remove", args.idle_remove)?,
        }))
    }
}

impl ServeConfig {
    pub fn from_args(mut args: ServeArgs) -> Result<Self, ConfigError> {
        let file_keys = read_key_files("--api-key-file", &args.api_key_files)?;
        args.api_keys.extend(file_keys);
        let file_keys = read_key_files(
            "--sandbox-api-key-file",
            &args.sandbox.sandbox_api_key_files,
        )?;
        args.sandbox.sandbox_api_keys.extend(file_keys);
        if args.max_in_flight == 0 {
            return Err(invalid("--max-in-flight", "must be at least 1"));
        }
        if args.max_websockets == 0 {
            return Err(invalid("--max-websockets", "must be at least 1"));
        }
        let header_timeout = seconds("--header-timeout", args.header_timeout)?;
        let body_timeout = seconds("--body-timeout", args.body_timeout)?;
        let sse_keep_alive = seconds("--sse-keep-alive", args.sse_keep_alive)?;
        let stores = crate::store::command::sources(&args.stores);
        let presets = match &args.models_preset {
            Some(path) => crate::registry::preset::load(path)
                .map_err(|message| invalid("--models-preset", message))?,
            None => Default::default(),
        };
        let preset_files = presets.values().any(|p| p.path.is_some());
        if args.models.is_empty() && stores == Sources::default() && !preset_files {
            args.models.push(PathBuf::from(crate::cli::DEFAULT_MODEL));
        }
        let mut stems: Vec<String> = Vec::new();
        for model in &args.models {
            let metadata = std::fs::metadata(model).map_err(|e| ConfigError::Model {
                path: model.clone(),
                reason: e.to_string(),
            })?;
            if !metadata.is_file() {
                return Err(ConfigError::Model {
                    path: model.clone(),
                    reason: "not a file".into(),
                });
            }
            let stem = model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| ConfigError::Model {
                    path: model.clone(),
                    reason: "has no file name".into(),
                })?;
            if stems.contains(&stem) {
                return Err(invalid(
                    "--model",
                    format!("two files are called {stem:?}: ids must differ"),
                ));
            }
            stems.push(stem);
        }
        if args.models_max == 0 {
            return Err(invalid("--models-max", "must be at least 1"));
        }
        if args.models.len() > args.models_max {
            return Err(invalid(
                "--models-max",
                format!(
                    "{} is fewer than the {} -m models loaded at start",
                    args.models_max,
                    args.models.len()
                ),
            ));
        }
        let registry = RegistryConfig {
            models_max: args.models_max,
            idle_unload: idle_duration("--idle-unload", &args.idle_unload)?,
            autoload: !args.no_models_autoload,
            load_timeout: seconds("--load-timeout", args.load_timeout)?,
            unload_timeout: seconds("--unload-timeout", args.unload_timeout)?,
        };
        if args.parallel == 0 {
            return Err(invalid("--parallel", "must be at least 1"));
        }
        if args.batch_size < args.parallel {
            return Err(invalid(
                "--batch-size",
                format!(
                    "{} is less than --parallel {}: a step must fit one token per sequence",
                    args.batch_size, args.parallel
                ),
            ));
        }
        if args.ctx_size != 0 && args.ctx_size / args.parallel < 16 {
            return Err(invalid(
                "--ctx-size",
                format!(
                    "{} over --parallel {} leaves under 16 tokens per sequence",
                    args.ctx_size, args.parallel
                ),
            ));
        }
        let threads = match args.threads {
            Some(0) => return Err(invalid("--threads", "must be at least 1")),
            Some(t) => t,
            None => std::thread::available_parallelism().map_or(4, |n| n.get() as u32),
        };
        if args.max_queue == 0 {
            return Err(invalid("--max-queue", "must be at least 1"));
        }
        let n_predict = match args.n_predict {
            -1 => None,
            n if n >= 1 && n <= i64::from(u32::MAX) => Some(n as u32),
            n => {
                return Err(invalid(
                    "--n-predict",
                    format!("must be -1 or at least 1; got {n}"),
                ))
            }
        };
        if args.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("--api-key", "keys must not be empty"));
        }
        let mut api_keys = ApiKey::list_with_auto_shell(
            &args.api_keys,
            &args.sandbox.sandbox_api_keys,
            &args.sandbox.auto_shell_keys,
        );
        for path in &args.keys_files {
            let text = read_secret_file("--keys-file", path)?;
            let keys = crate::api::keys::parse_keys_file(&text)
                .map_err(|e| invalid("--keys-file", format!("{}: {e}", path.display())))?;
            for key in keys {
                if api_keys.iter().any(|k| k.same_secret(&key)) {
                    return Err(invalid(
                        "--keys-file",
                        format!(
                            "{}: a key is also given by another flag or file",
                            path.display()
                        ),
                    ));
                }
                api_keys.push(key);
            }
        }
        let sandbox = SandboxConfig::from_args(&args.sandbox, &api_keys)?;

        let chat_template = match &args.chat_template_file {
            None => None,
            Some(path) => {
                let source =
                    std::fs::read_to_string(path).map_err(|e| ConfigError::ChatTemplate {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                ChatTemplate::new(&source).map_err(|e| ConfigError::ChatTemplate {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Some(source)
            }
        };
        let mut aliases: Vec<String> = Vec::new();
        for alias in &args.aliases {
            if alias.trim().is_empty() {
                return Err(invalid("--alias", "aliases must not be empty"));
            }
            if args.models.is_empty() {
                return Err(invalid(
                    "--alias",
                    "names the first -m model; there is none",
                ));
            }
            if Some(alias) != stems.first() && !aliases.contains(alias) {
                aliases.push(alias.clone());
            }
        }
        Ok(Self {
            models: ModelsConfig {
                files: args.models.clone(),
                aliases,
                stores,
                registry,
                presets,
            },
            engine: LlamaEngineConfig {
                model_path: PathBuf::new(),
                model_id: String::new(),
                n_ctx: args.ctx_size,
                n_seq: args.parallel,
                n_batch: args.batch_size,
                n_threads: threads as i32,
                max_queue: args.max_queue as usize,
                offload: GpuOffload::default(),
            },
            api: ApiConfig {
                model_ids: Vec::new(),
                api_keys,
                n_predict,
                chat_template,
                created: 0,
                max_tool_rounds: args.sandbox.max_tool_rounds,
                max_in_flight: args.max_in_flight as usize,
                body_timeout,
                sse_keep_alive,
                health_build_info: args.health_build_info,
                metrics: args.metrics,
                metrics_public: args.metrics_public,
                model_path: None,
                browser: BrowserPolicy::for_bind(
                    &args.host,
                    &args.allowed_origins,
                    &args.allowed_hosts,
                ),
                max_websockets: args.max_websockets as usize,
                responses_max: args.responses_max as usize,
                responses_max_bytes: bytes("--responses-max-bytes", &args.responses_max_bytes)?
                    as usize,
            },
            host: args.host,
            port: args.port,
            ollama_port: args.ollama_port,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            placement: plan_config(&args.placement),
            rpc: rpc_endpoints(&args.placement)?,
            rpc_timeout: seconds("--rpc-timeout", args.placement.rpc_timeout)?,
            sandbox,
            http: HttpLimits { header_timeout },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn config(extra: &[&str]) -> Result<ServeConfig, ConfigError> {
        // Cargo.toml stands in for a model file: validation only checks that it is a file.
        let mut argv = vec!["lm-sandbox", "serve", "-m", "Cargo.toml"];
        argv.extend_from_slice(extra);
        let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not a serve command")
        };
        ServeConfig::from_args(*args)
    }

    fn flag_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { flag, .. } => flag,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn sizes_parse_like_dockers() {
        assert_eq!(bytes("f", "1g").unwrap(), 1 << 30);
        assert_eq!(bytes("f", "512M").unwrap(), 512 << 20);
        assert_eq!(bytes("f", "2GiB").unwrap(), 2 << 30);
        assert_eq!(bytes("f", "1048576").unwrap(), 1 << 20);
        assert!(bytes("f", "1x").is_err());
        assert!(bytes("f", "10k").is_err(), "under 1m");
        assert!(bytes("f", "99999999999g").is_err());
    }

    #[test]
    fn defaults_validate_and_the_stem_is_the_model_id() {
        let c = config(&["--alias", "smol", "--alias", "Cargo"]).unwrap();
        // `-m Cargo.toml`: the stem is the id, so `--alias Cargo` adds nothing.
        assert_eq!(c.models.aliases, vec!["smol"]);
        assert_eq!(c.models.registry.models_max, 3);
        assert_eq!(
            c.models.registry.idle_unload,
            Some(std::time::Duration::from_secs(600))
        );
        assert_eq!(c.engine.n_seq, 4);
        assert_eq!(c.api.n_predict, None);
    }

    #[test]
    fn cross_field_errors_name_the_flag() {
        assert_eq!(
            flag_of(config(&["--parallel", "0"]).unwrap_err()),
            "--parallel"
        );
        assert_eq!(
            flag_of(config(&["--parallel", "8", "-b", "4"]).unwrap_err()),
            "--batch-size"
        );
        assert_eq!(
            flag_of(config(&["-c", "64", "--parallel", "8"]).unwrap_err()),
            "--ctx-size"
        );
        assert_eq!(flag_of(config(&["-n", "-5"]).unwrap_err()), "--n-predict");
        assert_eq!(
            flag_of(config(&["--max-queue", "0"]).unwrap_err()),
            "--max-queue"
        );
        assert_eq!(
            flag_of(config(&["--threads", "0"]).unwrap_err()),
            "--threads"
        );
    }

    #[test]
    fn the_sandbox_always_needs_a_key_of_its_own() {
        assert!(config(&[]).unwrap().sandbox.is_none());
        assert_eq!(
            flag_of(config(&["--sandbox"]).unwrap_err()),
            "--sandbox-api-key"
        );
        assert_eq!(
            flag_of(config(&["--sandbox", "--api-key", "plain"]).unwrap_err()),
            "--sandbox-api-key"
        );
        let c = config(&[
            "--sandbox",
            "--sandbox-api-key",
            "runner",
            "--api-key",
            "plain",
            "--sandbox-state-dir",
            "/s",
            "--sandbox-name",
            "box",
        ])
        .unwrap();
        let sandbox = c.sandbox.unwrap();
        assert_eq!(sandbox.dir, PathBuf::from("/s/box"));
        assert_eq!(sandbox.audit_log, PathBuf::from("/s/box/audit.jsonl"));
        assert_eq!(sandbox.limits.default_timeout, Duration::from_secs(30));
        assert_eq!(
            c.api
                .api_keys
                .iter()
                .map(|k| k.scopes.contains(Scope::Sandbox))
                .collect::<Vec<_>>(),
            [true, false]
        );
        let with = |extra: &[&str]| {
            let mut argv = vec!["--sandbox", "--sandbox-api-key", "k"];
            argv.extend_from_slice(extra);
            config(&argv)
        };
        assert_eq!(
            flag_of(with(&["--sandbox-timeout", "0"]).unwrap_err()),
            "--sandbox-timeout"
        );
        assert_eq!(
            flag_of(with(&["--sandbox-timeout", "400"]).unwrap_err()),
            "--sandbox-timeout"
        );
        assert_eq!(
            flag_of(with(&["--sandbox-concurrency", "0"]).unwrap_err()),
            "--sandbox-concurrency"
        );
        assert_eq!(
            flag_of(with(&["--sandbox-output-limit", "10"]).unwrap_err()),
            "--sandbox-output-limit"
        );
        assert_eq!(
            flag_of(with(&["--sandbox-connect-timeout", "nan"]).unwrap_err()),
            "--sandbox-connect-timeout"
        );
    }

    #[test]
    fn a_missing_model_or_bad_template_is_reported() {
        let Command::Serve(mut args) = Cli::try_parse_from(["x", "serve"]).unwrap().command else {
            panic!("not a serve command")
        };
        args.models = vec!["/nonexistent.gguf".into()];
        assert!(matches!(
            ServeConfig::from_args(*args),
            Err(ConfigError::Model { .. })
        ));
        let dir = std::env::temp_dir().join(format!("lm-sandbox-tpl-{}", std::process::id()));
        std::fs::write(&dir, "{% for %}").unwrap();
        let err = config(&["--chat-template-file", dir.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::ChatTemplate { .. }), "{err}");
        std::fs::remove_file(dir).unwrap();
    }
}
