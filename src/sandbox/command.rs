//! `lm-sandbox sandbox up|down|status|exec`: the operator's handle on the sandbox.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::container::{self, container_status, sandbox_dir, Profile, SandboxState, UpConfig};
use super::image::{Docker, Progress};
use super::ssh::SshExecutor;
use super::{AuditLog, Caller, ExecRequest, Sandbox, SandboxLimits};
use crate::cli::{SandboxArgs, SandboxCommand, SandboxTarget, TransportArg};

/// Commands `sandbox exec` and `status` allow at once (one).
const CLI_CONCURRENCY: usize = 1;

pub fn run(args: &SandboxArgs) -> anyhow::Result<i32> {
    match &args.command {
        SandboxCommand::Up(up) => {
            let config = UpConfig {
                name: up.target.name.clone(),
                state_dir: container::resolve_state_dir(up.target.state_dir.as_deref()),
                docker: Docker::new(up.target.docker.clone(), Progress::Show),
                profile: Profile {
                    memory: up.memory.clone(),
                    cpus: up.cpus.clone(),
                    pids_limit: up.pids_limit,
                    tmp_size: up.tmp_size.clone(),
                },
                transport: match up.transport {
                    TransportArg::Exec => container::TransportKind::Exec,
                    TransportArg::Tcp => container::TransportKind::Tcp,
                },
                labels: Vec::new(),
            };
            let state = container::up(&config)?;
            let dir = sandbox_dir(&config.state_dir, &config.name);
            println!("sandbox {} is up (image {})", state.name, state.image);
            println!("  state: {}", dir.display());
            if let Some(addr) = &state.addr {
                println!("  sshd:  {addr}");
            }
            println!("  host key pinned: {}", state.host_key);
            Ok(0)
        }
        SandboxCommand::Down(down) => {
            let docker = Docker::new(down.target.docker.clone(), Progress::Quiet);
            let existed = container::down(&docker, &down.target.name, down.volumes)?;
            println!(
                "sandbox {} {}",
                down.target.name,
                if existed { "removed" } else { "was not there" }
            );
            Ok(0)
        }
        SandboxCommand::Status(status) => {
            let docker = Docker::new(status.target.docker.clone(), Progress::Quiet);
            let name = &status.target.name;
            match container_status(&docker, name) {
                None => {
                    println!("sandbox {name}: no container (run `lm-sandbox sandbox up`)");
                    return Ok(1);
                }
                Some(s) => println!("sandbox {name}: {s}"),
            }
            print_tenants(&docker, &status.target)?;
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let executor = executor(&status.target)?;
            let started = Instant::now();
            let probe = runtime.block_on(executor.run(ExecRequest {
                command: "true".into(),
                timeout: Duration::from_secs(10),
                stdin: None,
                cancel: None,
                live: None,
            }));
            match probe {
                Ok(out) if out.exit_code == Some(0) => {
                    println!(
                        "  ssh: ok ({}, `true` took {} ms)",
                        executor.config().transport,
                        started.elapsed().as_millis()
                    );
                    Ok(0)
                }
                Ok(out) => {
                    println!("  ssh: connected, but `true` gave {out:?}");
                    Ok(1)
                }
                Err(e) => {
                    println!("  ssh: {e}");
                    Ok(1)
                }
            }
        }
        SandboxCommand::Exec(exec) => {
            let mut stdin = None;
            if !std::io::stdin().is_terminal() {
                let mut data = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut data)
                    .context("reading stdin")?;
                stdin = Some(data);
            }
            let runtime = tokio::runtime::Runtime::new().context("starting tokio")?;
            let executor = executor(&exec.target)?;
            let dir = sandbox_dir(
                &container::resolve_state_dir(exec.target.state_dir.as_deref()),
                &exec.target.name,
            );
            let out = runtime.block_on(async {
                let audit = AuditLog::open(&dir.join("audit.jsonl"))
                    .await
                    .context("opening the audit log")?;
                let sandbox = Sandbox::new(
                    std::sync::Arc::new(executor),
                    audit,
                    SandboxLimits::default(),
                );
                let caller = Caller {
                    request_id: format!("cli-{}", std::process::id()),
                    key_id: None,
                    session: None,
                    max_sessions: None,
                };
                let request = ExecRequest {
                    command: exec.command.join(" "),
                    timeout: Duration::from_secs_f64(exec.timeout),
                    stdin,
                    cancel: None,
                    live: None,
                };
                anyhow::Ok(sandbox.run(request, &caller).await?)
            })?;
            std::io::stdout().write_all(out.stdout.as_bytes())?;
            std::io::stderr().write_all(out.stderr.as_bytes())?;
            if out.timed_out {
                eprintln!("lm-sandbox: timed out after {}s", exec.timeout);
            }
            // Like a shell: the exit status, or 128 + the signal's number.
            Ok(match (out.exit_code, out.signal.as_deref()) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal_number(signal),
                (None, None) => 255,
            })
        }
    }
}

fn executor(target: &SandboxTarget) -> anyhow::Result<SshExecutor> {
    let dir = sandbox_dir(
        &container::resolve_state_dir(target.state_dir.as_deref()),
        &target.name,
    );
    let state = SandboxState::load(&dir)?;
    let config = state.ssh_config(&dir, Duration::from_secs(10), CLI_CONCURRENCY, 1 << 20)?;
    Ok(SshExecutor::new(config))
}

fn signal_number(name: &str) -> i32 {
    match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => 127,
    }
}

/// The tenant containers, with their age, idle time (from the server's `tenants.json`) and
/// workspace use.
fn print_tenants(docker: &Docker, target: &SandboxTarget) -> anyhow::Result<()> {
    let tenants = container::tenants(docker, &target.name)?;
    if tenants.is_empty() {
        println!("  tenants: none");
        return Ok(());
    }
    let dir = sandbox_dir(
        &container::resolve_state_dir(target.state_dir.as_deref()),
        &target.name,
    );
    let record: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("tenants.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    println!("  tenants: {}", tenants.len());
    for tenant in tenants {
        let idle = record
            .iter()
            .find(|r| r["container"] == tenant.name.as_str())
            .and_then(|r| r["idle_s"].as_u64())
            .map_or("?".to_owned(), |s| format!("{s} s"));
        let used = if tenant.status == "running" {
            docker
                .output(&[
                    "exec",
                    &tenant.name,
                    "df",
                    "-B1",
                    "--output=used,size",
                    "/workspace",
                ])
                .ok()
                .and_then(|out| {
                    let line = out.lines().nth(1)?.to_owned();
                    let mut parts = line.split_whitespace();
                    let used: u64 = parts.next()?.parse().ok()?;
                    let size: u64 = parts.next()?.parse().ok()?;
                    Some(format!("{} of {} MiB", used >> 20, size >> 20))
                })
                .unwrap_or_else(|| "?".into())
        } else {
            "-".into()
        };
        println!(
            "    {} {} created {} idle {idle} disk {used}",
            tenant.name, tenant.status, tenant.created
        );
    }
    Ok(())
}
