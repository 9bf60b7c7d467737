//! Validated configuration: [`ServeArgs`] checked once into [`ServeConfig`]. Every error names the
//! flag it is about; defaults live in `cli.rs` only.

use std::path::PathBuf;
use std::time::Duration;

use crate::api::ApiConfig;
use crate::cli::{PlacementArgs, ServeArgs};
use crate::engine::{GpuOffload, LlamaEngineConfig};
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

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: LlamaEngineConfig,
    pub api: ApiConfig,
    pub host: String,
    pub port: u16,
    pub shutdown_timeout: Duration,
    /// The placement flags; the plan (and `engine.offload`) is decided at start-up from live GPU
    /// readings.
    pub placement: PlacementArgs,
}

impl ServeConfig {
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let metadata = std::fs::metadata(&args.model).map_err(|e| ConfigError::Model {
            path: args.model.clone(),
            reason: e.to_string(),
        })?;
        if !metadata.is_file() {
            return Err(ConfigError::Model {
                path: args.model.clone(),
                reason: "not a file".into(),
            });
        }
        let stem = args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ConfigError::Model {
                path: args.model.clone(),
                reason: "has no file name".into(),
            })?;
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
        let mut model_ids = vec![stem.clone()];
        for alias in &args.aliases {
            if alias.trim().is_empty() {
                return Err(invalid("--alias", "aliases must not be empty"));
            }
            if !model_ids.contains(alias) {
                model_ids.push(alias.clone());
            }
        }
        let created = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Ok(Self {
            engine: LlamaEngineConfig {
                model_path: args.model,
                model_id: stem,
                n_ctx: args.ctx_size,
                n_seq: args.parallel,
                n_batch: args.batch_size,
                n_threads: threads as i32,
                max_queue: args.max_queue as usize,
                offload: GpuOffload::default(),
            },
            api: ApiConfig {
                model_ids,
                api_keys: args.api_keys,
                n_predict,
                chat_template,
                created,
            },
            host: args.host,
            port: args.port,
            shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
            placement: args.placement,
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
        ServeConfig::from_args(args)
    }

    fn flag_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { flag, .. } => flag,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn defaults_validate_and_the_stem_is_the_model_id() {
        let c = config(&["--alias", "smol", "--alias", "Cargo"]).unwrap();
        assert_eq!(c.api.model_ids, vec!["Cargo", "smol"]);
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
    fn a_missing_model_or_bad_template_is_reported() {
        let Command::Serve(mut args) = Cli::try_parse_from(["x", "serve"]).unwrap().command else {
            panic!("not a serve command")
        };
        args.model = "/nonexistent.gguf".into();
        assert!(matches!(
            ServeConfig::from_args(args),
            Err(ConfigError::Model { .. })
        ));
        let dir = std::env::temp_dir().join(format!("lm-sandbox-tpl-{}", std::process::id()));
        std::fs::write(&dir, "{% for %}").unwrap();
        let err = config(&["--chat-template-file", dir.to_str().unwrap()]).unwrap_err();
        assert!(matches!(err, ConfigError::ChatTemplate { .. }), "{err}");
        std::fs::remove_file(dir).unwrap();
    }
}
