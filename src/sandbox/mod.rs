//! The sandbox: a hardened container where every shell command a model (or an operator) issues
//! runs, reached over SSH, never on the host.
//!
//! Owns: the container image and its run profile ([`image`], [`container`]), the keys that pin both
//! ends of the SSH connection ([`keys`]), the russh executor ([`ssh`]), output capping
//! ([`output`]), and the audit log ([`audit`]). [`Sandbox`] puts an [`Executor`] and the audit log
//! together: every command that goes through it is recorded, whoever asked.
//!
//! Must not: run anything on the host but the `docker` CLI (to build, start and reach the
//! container), accept an unknown host key, or hold a command's whole output in memory.

pub mod audit;
pub mod command;
pub mod container;
pub mod image;
pub mod keys;
pub mod output;
pub mod ssh;
pub mod tenants;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub use audit::{AuditError, AuditLog, Caller, Intent};

/// Longest command accepted, in bytes (it travels base64-encoded as one argument).
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// One command to run.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Run with `bash -c` in `/workspace`.
    pub command: String,
    /// Enforced inside the container (TERM, then KILL two seconds later) and on the client.
    pub timeout: Duration,
    /// Fed to the command's standard input, then end-of-file (no stdin: end-of-file at once).
    pub stdin: Option<Vec<u8>>,
    /// Cancelling it stops the command as its timeout would (TERM to its process group): the
    /// client that asked has withdrawn the request.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// Where the output goes as it comes, besides the captured result (a client showing
    /// progress).
    pub live: Option<Arc<output::LiveOutput>>,
}

/// What a command did. A command that fails or times out is still an `ExecOutput`; only the
/// sandbox itself failing is an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    /// The exit status; `None` when a signal ended the command.
    pub exit_code: Option<i32>,
    /// The signal that ended the command (`KILL`, `SEGV`, ...), as sshd reports it.
    pub signal: Option<String>,
    /// The timeout fired; `exit_code` is then 124, as with timeout(1).
    pub timed_out: bool,
    /// stdout or stderr was longer than the limit and ends with a truncation marker.
    pub truncated: bool,
    /// The request was cancelled while the command ran, which stopped it.
    pub cancelled: bool,
    pub duration_ms: u64,
    /// Bytes the command wrote to each stream, whether kept or not.
    #[serde(skip)]
    pub stdout_bytes: u64,
    #[serde(skip)]
    pub stderr_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The container cannot be reached (stopped, restarting, wrong address) within the connect
    /// timeout.
    #[error("the sandbox is unreachable: {0}")]
    Unavailable(String),
    /// The server presented another host key than the pinned one.
    #[error("the sandbox's host key {offered} is not the pinned {pinned}: refusing to connect")]
    HostKeyMismatch { pinned: String, offered: String },
    /// The sandbox refused our client key.
    #[error("the sandbox refused the client key {0}")]
    AuthRejected(String),
    /// The connection broke while the command ran (the container stopped or was killed).
    #[error("the sandbox connection was lost while the command ran: {0}")]
    Lost(String),
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// Every slot (`--sandbox-concurrency`) stayed taken past the queue deadline.
    #[error("the sandbox is busy: {0}")]
    Busy(String),
    /// The audit log could not record the command, so it was not run.
    #[error("the command was refused: {0}")]
    AuditFailed(String),
}

pub type ExecFuture<'a> =
    Pin<Box<dyn Future<Output = Result<ExecOutput, SandboxError>> + Send + 'a>>;

/// Called by an executor once it holds what the command needs (a slot, the tenant's container)
/// and before it sends the command: [`Sandbox`] writes the audit `start` line here, so a command
/// refused for being busy never fills the log. An error means the command must not be sent.
pub type StartHook =
    Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = Result<(), SandboxError>> + Send>> + Send>;

/// A [`StartHook`] that does nothing (the CLI's executor tests).
pub fn no_hook() -> StartHook {
    Box::new(|| Box::pin(async { Ok(()) }))
}

/// Runs commands somewhere isolated: [`tenants::Tenants`] (a container per tenant, what `serve`
/// uses), [`ssh::SshExecutor`] (one container, for the CLI); tests of the HTTP layer use a fake.
pub trait Executor: Send + Sync {
    /// Runs `request` for `caller`'s tenant ([`Caller::tenant`]; an executor of one container
    /// ignores who asks), calling `start` after taking its slot and before sending the command.
    fn exec(&self, caller: &Caller, request: ExecRequest, start: StartHook) -> ExecFuture<'_>;
}

/// Limits on what a caller may ask for.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Timeout when the request names none.
    pub default_timeout: Duration,
    /// Most a request may ask for.
    pub max_timeout: Duration,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
        }
    }
}

/// The executor plus the audit log: what the HTTP layer (and the tool loop) runs commands through.
#[derive(Clone)]
pub struct Sandbox {
    executor: Arc<dyn Executor>,
    audit: Arc<AuditLog>,
    limits: SandboxLimits,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Sandbox {
    pub fn new(executor: Arc<dyn Executor>, audit: AuditLog, limits: SandboxLimits) -> Self {
        Self {
            executor,
            audit: Arc::new(audit),
            limits,
            metrics: None,
        }
    }

    /// Counts every command's outcome and run time in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Runs `request`, recorded in the audit log. The command is checked first (an invalid one
    /// writes nothing); the `start` line is written once the executor holds a slot and the
    /// tenant's container, before the command is sent (if it cannot be written, the command is
    /// refused and counted as `audit_failed`); the command runs in a task of its own that writes
    /// the `end` line when it finishes, even if the caller has gone away.
    pub async fn run(
        &self,
        request: ExecRequest,
        caller: &Caller,
    ) -> Result<ExecOutput, SandboxError> {
        validate_command(&request.command)?;
        let exec_id = exec_id();
        let executor = Arc::clone(&self.executor);
        let audit = Arc::clone(&self.audit);
        let caller = caller.clone();
        let metrics = self.metrics.clone();
        let intent = Intent::of(&request);
        let task = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let wrote = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let hook: StartHook = {
                let (audit, exec_id, caller, wrote) = (
                    Arc::clone(&audit),
                    exec_id.clone(),
                    caller.clone(),
                    Arc::clone(&wrote),
                );
                Box::new(move || {
                    Box::pin(async move {
                        audit
                            .start(&exec_id, &caller, &intent)
                            .await
                            .map_err(|e| SandboxError::AuditFailed(e.to_string()))?;
                        wrote.store(true, std::sync::atomic::Ordering::Release);
                        Ok(())
                    })
                })
            };
            let command = request.command.clone();
            let result = executor.exec(&caller, request, hook).await;
            // An `end` line only for a command whose `start` line was written.
            if wrote.load(std::sync::atomic::Ordering::Acquire) {
                audit
                    .end(&exec_id, &caller, &command, &result, started.elapsed())
                    .await;
            }
            if let Some(metrics) = metrics {
                metrics.observe_sandbox(outcome(&result), started.elapsed());
            }
            result
        });
        // Dropping the join handle (the caller left) does not cancel the task.
        task.await
            .map_err(|e| SandboxError::Lost(format!("the command's task ended: {e}")))?
    }
}

/// A command's outcome in one word, for the metrics.
fn outcome(result: &Result<ExecOutput, SandboxError>) -> &'static str {
    match result {
        Err(SandboxError::AuditFailed(_)) => "audit_failed",
        Err(SandboxError::Busy(_)) => "busy",
        Err(_) => "error",
        Ok(out) if out.timed_out => "timed_out",
        Ok(out) if out.signal.is_some() => "signal",
        Ok(out) if out.exit_code == Some(0) => "ok",
        Ok(_) => "failed",
    }
}

/// `exec_` and 16 random hex digits: joins a command's `start` and `end` audit lines.
fn exec_id() -> String {
    format!("exec_{:016x}", rand::random::<u64>())
}

/// Checks a tenant session name: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn validate_session(session: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&session.len())
        && session
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`session` must be 1 to 64 letters, digits, `_`, `-` or `.`; got {session:?}"
        ))
    }
}

/// Checks a command before it is sent: not empty, within [`MAX_COMMAND_BYTES`], no NUL byte.
pub fn validate_command(command: &str) -> Result<(), SandboxError> {
    if command.trim().is_empty() {
        return Err(SandboxError::InvalidCommand("the command is empty".into()));
    }
    if command.len() > MAX_COMMAND_BYTES {
        return Err(SandboxError::InvalidCommand(format!(
            "the command is {} bytes; the limit is {MAX_COMMAND_BYTES}",
            command.len()
        )));
    }
    if command.contains('\0') {
        return Err(SandboxError::InvalidCommand(
            "the command contains a NUL byte".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked() {
        assert!(validate_command("echo hi").is_ok());
        assert!(validate_command("  ").is_err());
        assert!(validate_command("a\0b").is_err());
        assert!(validate_command(&"x".repeat(MAX_COMMAND_BYTES + 1)).is_err());
        assert!(validate_command(&"x".repeat(MAX_COMMAND_BYTES)).is_ok());
    }
}
