//! `lm-sandbox`: parse the command line, set up logging, hand off.

use anyhow::Context as _;
use clap::Parser;
use lm_sandbox::cli::{normalize_args, Cli, Command};
use lm_sandbox::config::ServeConfig;

fn main() -> anyhow::Result<()> {
    // CUDA 11.x's runtime loads every kernel of the binary onto each GPU when it starts unless told
    // to load them on first use, the default only from CUDA 12.2: lazily saves hundreds of MiB per
    // card. Set before any thread exists; an operator's own setting wins.
    #[cfg(feature = "cuda")]
    if std::env::var_os("CUDA_MODULE_LOADING").is_none() {
        std::env::set_var("CUDA_MODULE_LOADING", "LAZY");
    }
    let cli = Cli::parse_from(normalize_args(std::env::args()));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,llama_cpp_2=warn,llama-cpp-2=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => {
            let config = ServeConfig::from_args(*args)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(lm_sandbox::server::run(config))?;
        }
        Command::Gpus(args) => lm_sandbox::gpu::command::gpus(&args)?,
        Command::Plan(args) => lm_sandbox::gpu::command::plan_command(&args)?,
        Command::Tools(args) => match &args.command {
            lm_sandbox::cli::ToolsCommand::Parse(parse) => {
                lm_sandbox::tools::command::parse_command(parse)?
            }
        },
        Command::Model(args) => match &args.command {
            lm_sandbox::cli::ModelCommand::Check(check) => {
                let code = lm_sandbox::fidelity::command::check(check)?;
                if code != 0 {
                    std::process::exit(code);
                }
            }
        },
        Command::Top(args) => lm_sandbox::top::command::run(&args)?,
        Command::Models(args) => lm_sandbox::store::command::run(&args)?,
        Command::RpcWorker(args) => {
            let config = lm_sandbox::config::rpc_worker_config(&args)?;
            if args.allow_remote && !lm_sandbox::rpc::is_loopback(&args.host) {
                tracing::warn!(
                    host = %args.host,
                    "serving llama.cpp's RPC protocol, which has no authentication, beyond this machine: anyone who reaches the port can use its devices"
                );
            }
            lm_sandbox::engine::serve_worker(&config)?;
        }
        Command::Sandbox(args) => {
            let code = lm_sandbox::sandbox::command::run(&args)?;
            if code != 0 {
                std::process::exit(code);
            }
        }
    }
    Ok(())
}
