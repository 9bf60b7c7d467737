//! The SSH executor (russh): one connection to the sandbox's sshd, a channel per command.
//!
//! The host key is pinned: any other key is refused, never trusted on first use. The client
//! authenticates with its key as the unprivileged user. A broken connection (the container
//! stopped or restarted) is dropped and the next command reconnects, retrying with backoff until
//! the connect timeout, so an unreachable sandbox is an error within that timeout, never a hang.
//!
//! Each command is wrapped in the image's `lm-sandbox-run`, which enforces the timeout inside the
//! container and kills the command's whole process group; the client keeps its own deadline too.
//! Output is captured through [`CappedBuffer`]s, so memory per command is bounded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig};
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::Semaphore;

use super::keys::fingerprint;
use super::output::CappedBuffer;
use super::{validate_command, ExecFuture, ExecOutput, ExecRequest, Executor, SandboxError};

/// The per-command wrapper inside the image (see `image/lm-sandbox-run`).
const RUNNER: &str = "/usr/local/libexec/lm-sandbox-run";
/// The image's sshd configuration.
pub const SSHD_CONFIG: &str = "/etc/lm-sandbox/sshd_config";
/// The wrapper sends KILL this long after TERM.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How much later than the in-container timeout the client gives up on its own.
const CLIENT_SLACK: Duration = Duration::from_secs(5);
/// timeout(1)'s exit status when it fired.
const TIMEOUT_STATUS: u32 = 124;

/// How the SSH bytes reach the container's sshd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `docker exec -i CONTAINER sshd -i`: SSH over the exec's stdin and stdout, so the container
    /// needs no network at all. One `docker exec` per connection, not per command.
    DockerExec { docker: String, container: String },
    /// A listening sshd at `HOST:PORT` (a container on an internal network, or on another host).
    Tcp { addr: String },
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DockerExec { container, .. } => write!(f, "docker exec {container}"),
            Self::Tcp { addr } => write!(f, "tcp {addr}"),
        }
    }
}

/// Everything the executor needs.
#[derive(Debug, Clone)]
pub struct SshConfig {
    pub transport: Transport,
    pub user: String,
    pub client_key: Arc<PrivateKey>,
    /// The only host key accepted.
    pub host_key: PublicKey,
    /// Bound on reaching the sandbox, retries included.
    pub connect_timeout: Duration,
    /// Commands running at once; more wait for a turn.
    pub max_concurrent: usize,
    /// Bytes kept of each of stdout and stderr.
    pub output_limit: usize,
    /// Longest wait for a free slot (`max_concurrent`); then the command is refused as busy.
    pub queue_timeout: Duration,
}

/// `--sandbox-queue-timeout`'s default.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts exactly the pinned host key and remembers any other key offered, for the error.
struct PinnedHost {
    pinned: PublicKey,
    // A std mutex: set once inside a callback, read after it returns; never held across an await.
    offered: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key,
            // We pin a plain key; a certificate is not it.
            PublicKeyOrCertificate::Certificate(_) => return Ok(false),
        };
        if key.key_data() == self.pinned.key_data() {
            return Ok(true);
        }
        *self.offered.lock().expect("offered-key lock poisoned") = Some(key.clone());
        Ok(false)
    }
}

struct Connection {
    handle: client::Handle<PinnedHost>,
    /// The `docker exec` carrying this connection; killed when the connection is dropped.
    _carrier: Option<tokio::process::Child>,
}

pub struct SshExecutor {
    config: SshConfig,
    ssh: Arc<client::Config>,
    // A tokio mutex: whoever finds the connection broken reconnects while holding it (awaiting),
    // so concurrent commands wait for that one attempt instead of each starting their own.
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    permits: Semaphore,
}

impl SshExecutor {
    /// Connects lazily, on the first command.
    pub fn new(config: SshConfig) -> Self {
        let ssh = client::Config {
            // The connection is long-lived and idle between commands; keepalives notice a dead
            // peer instead of an inactivity timeout dropping a healthy one.
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            ..Default::default()
        };
        let permits = Semaphore::new(config.max_concurrent.max(1));
        Self {
            config,
            ssh: Arc::new(ssh),
            connection: tokio::sync::Mutex::new(None),
            permits,
        }
    }

    pub fn config(&self) -> &SshConfig {
        &self.config
    }

    /// Connects now (or checks the live connection): for start-up checks and `sandbox status`.
    pub async fn check(&self) -> Result<(), SandboxError> {
        self.connection().await.map(drop)
    }

    /// The live connection, or a new one within the connect timeout.
    async fn connection(&self) -> Result<Arc<Connection>, SandboxError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.handle.is_closed()) {
            return Ok(conn.clone());
        }
        *slot = None;
        let timeout = self.config.connect_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            let error = match tokio::time::timeout_at(deadline, self.connect_once()).await {
                Ok(Ok(conn)) => {
                    let conn = Arc::new(conn);
                    *slot = Some(conn.clone());
                    return Ok(conn);
                }
                // Retrying cannot fix these; only the operator can.
                Ok(Err(
                    e @ (SandboxError::HostKeyMismatch { .. } | SandboxError::AuthRejected(_)),
                )) => return Err(e),
                Ok(Err(e)) => e,
                Err(_) => {
                    return Err(SandboxError::Unavailable(format!(
                        "{} did not answer within {:.1}s",
                        self.config.transport,
                        timeout.as_secs_f64()
                    )))
                }
            };
            if tokio::time::Instant::now() + backoff >= deadline {
                return Err(error);
            }
            tracing::debug!(%error, ?backoff, "sandbox connect failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Drops `conn` if it is still the current connection, so the next command reconnects.
    async fn forget(&self, conn: &Arc<Connection>) {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    async fn connect_once(&self) -> Result<Connection, SandboxError> {
        let offered = Arc::new(Mutex::new(None));
        let handler = PinnedHost {
            pinned: self.config.host_key.clone(),
            offered: offered.clone(),
        };
        let mut carrier_stderr = None;
        let (connected, carrier) = match &self.config.transport {
            Transport::DockerExec { docker, container } => {
                let mut child = tokio::process::Command::new(docker)
                    .args(["exec", "-i", container, "/usr/sbin/sshd", "-i", "-e", "-f"])
                    .arg(SSHD_CONFIG)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| SandboxError::Unavailable(format!("cannot run {docker}: {e}")))?;
                let (Some(stdin), Some(stdout), Some(stderr)) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take())
                else {
                    unreachable!("all three were piped");
                };
                carrier_stderr = Some(spawn_stderr_log(stderr));
                let stream = tokio::io::join(stdout, stdin);
                (
                    client::connect_stream(self.ssh.clone(), stream, handler).await,
                    Some(child),
                )
            }
            Transport::Tcp { addr } => (
                client::connect(self.ssh.clone(), addr.as_str(), handler).await,
                None,
            ),
        };
        let mut handle = match connected {
            Ok(handle) => handle,
            Err(e) => {
                if let Some(key) = offered.lock().expect("offered-key lock poisoned").take() {
                    return Err(SandboxError::HostKeyMismatch {
                        pinned: fingerprint(&self.config.host_key),
                        offered: fingerprint(&key),
                    });
                }
                let mut reason = format!("{}: {e}", self.config.transport);
                if let Some(stderr) = carrier_stderr {
                    // Give `docker exec` a moment to say why it failed ("is not running", ...).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let said = stderr.lock().expect("stderr lock poisoned").clone();
                    if !said.trim().is_empty() {
                        reason = format!("{reason}: {}", said.trim());
                    }
                }
                return Err(SandboxError::Unavailable(reason));
            }
        };
        let key = PrivateKeyWithHashAlg::new(self.config.client_key.clone(), None);
        let auth = handle
            .authenticate_publickey(self.config.user.clone(), key)
            .await
            .map_err(|e| SandboxError::Unavailable(format!("authentication: {e}")))?;
        if !auth.success() {
            return Err(SandboxError::AuthRejected(format!(
                "{} for user {}",
                fingerprint(self.config.client_key.public_key()),
                self.config.user
            )));
        }
        Ok(Connection {
            handle,
            _carrier: carrier,
        })
    }

    /// Runs one command (see [`ExecRequest`]).
    pub async fn run(&self, request: ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.run_started(request, super::no_hook()).await
    }

    /// Runs one command, calling `start` once it holds a slot (see [`super::StartHook`]).
    pub async fn run_started(
        &self,
        request: ExecRequest,
        start: super::StartHook,
    ) -> Result<ExecOutput, SandboxError> {
        validate_command(&request.command)?;
        let _permit = acquire_slot(&self.permits, &self.config).await?;
        start().await?;
        let started = Instant::now();
        let conn = self.connection().await?;
        let (conn, channel) = match conn.handle.channel_open_session().await {
            Ok(channel) => (conn, channel),
            Err(first) => {
                // The connection died between commands: reconnect once.
                tracing::debug!(%first, "sandbox channel refused; reconnecting");
                self.forget(&conn).await;
                let conn = self.connection().await?;
                let channel =
                    conn.handle.channel_open_session().await.map_err(|e| {
                        SandboxError::Unavailable(format!("opening a channel: {e}"))
                    })?;
                (conn, channel)
            }
        };
        let line = wrapped_command(&request);
        if let Err(e) = channel.exec(true, line).await {
            self.forget(&conn).await;
            return Err(SandboxError::Lost(format!("starting the command: {e}")));
        }
        let (mut reader, writer) = channel.split();
        let limit = self.config.output_limit;
        let deadline =
            tokio::time::Instant::from_std(started) + request.timeout + KILL_GRACE + CLIENT_SLACK;
        // Writing stdin shares the command's deadline: a command that neither reads its input
        // nor exits is stopped by its timeout, and the writer gives up with it.
        let feed = async {
            let write = async {
                if let Some(stdin) = &request.stdin {
                    // A command that exits without reading its input closes the channel: not an
                    // error.
                    let _ = writer.data(&stdin[..]).await;
                }
                let _ = writer.eof().await;
            };
            let _ = tokio::time::timeout_at(deadline, write).await;
        };
        let cancel = request.cancel.clone().unwrap_or_default();
        let live = request.live.clone();
        let read = async {
            let mut out = Collected::new(limit);
            out.live = live;
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout_at(deadline, reader.wait()) => next,
                    _ = cancel.cancelled(), if !out.cancelled => {
                        // Stopped as a timeout stops it; its exit still comes back.
                        out.cancelled = true;
                        let _ = writer.signal(Sig::TERM).await;
                        continue;
                    }
                };
                match next {
                    Err(_) => {
                        out.client_timed_out = true;
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(msg)) => out.take(msg),
                }
            }
            out
        };
        let ((), out) = tokio::join!(feed, read);
        let elapsed = started.elapsed();
        if out.client_timed_out {
            // The wrapper kills the command's group on TERM; the in-container timeout should have
            // fired first, so something outlived it (a child that left the group, say).
            let _ = writer.signal(Sig::TERM).await;
        } else if out.exit_status.is_none() && out.exit_signal.is_none() {
            self.forget(&conn).await;
            let why = if conn.handle.is_closed() {
                "the connection closed"
            } else {
                "the channel closed without an exit status"
            };
            return Err(SandboxError::Lost(format!(
                "{why} after {:.1}s",
                elapsed.as_secs_f64()
            )));
        }
        Ok(out.finish(request.timeout, elapsed))
    }
}

/// A command slot of `slots` within `config.queue_timeout`, else [`SandboxError::Busy`].
pub(super) async fn acquire_slot<'s>(
    slots: &'s Semaphore,
    config: &SshConfig,
) -> Result<tokio::sync::SemaphorePermit<'s>, SandboxError> {
    let wait = config.queue_timeout;
    match tokio::time::timeout(wait, slots.acquire()).await {
        // The semaphore is never closed.
        Ok(permit) => Ok(permit.expect("semaphore closed")),
        Err(_) => Err(SandboxError::Busy(format!(
            "all {} command slots stayed taken for {:.1} s (--sandbox-concurrency, \
             --sandbox-queue-timeout)",
            config.max_concurrent,
            wait.as_secs_f64()
        ))),
    }
}

impl Executor for SshExecutor {
    fn exec(
        &self,
        _caller: &super::Caller,
        request: ExecRequest,
        start: super::StartHook,
    ) -> ExecFuture<'_> {
        Box::pin(self.run_started(request, start))
    }
}

/// What came back on a channel.
struct Collected {
    stdout: CappedBuffer,
    stderr: CappedBuffer,
    exit_status: Option<u32>,
    exit_signal: Option<String>,
    client_timed_out: bool,
    /// The request was cancelled and the command sent TERM.
    cancelled: bool,
    /// Where stdout and stderr also go as they come.
    live: Option<std::sync::Arc<super::output::LiveOutput>>,
}

impl Collected {
    fn new(limit: usize) -> Self {
        Self {
            stdout: CappedBuffer::new(limit),
            stderr: CappedBuffer::new(limit),
            exit_status: None,
            exit_signal: None,
            client_timed_out: false,
            cancelled: false,
            live: None,
        }
    }

    fn take(&mut self, msg: ChannelMsg) {
        if let (Some(live), ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. }) =
            (&self.live, &msg)
        {
            live.push(data);
        }
        match msg {
            ChannelMsg::Data { data } => self.stdout.push(&data),
            // Extended data type 1 is stderr (RFC 4254 §5.2).
            ChannelMsg::ExtendedData { data, ext: 1 } => self.stderr.push(&data),
            ChannelMsg::ExitStatus { exit_status } => self.exit_status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                self.exit_signal = Some(signal_name_of(&signal_name))
            }
            _ => {}
        }
    }

    fn finish(self, timeout: Duration, elapsed: Duration) -> ExecOutput {
        // timeout(1)'s 124 after the deadline is a timeout; a command exiting 124 by itself
        // before it is not.
        let timed_out = self.client_timed_out
            || (self.exit_status == Some(TIMEOUT_STATUS) && elapsed >= timeout);
        let truncated = self.stdout.truncated() || self.stderr.truncated();
        let (stdout_bytes, stderr_bytes) = (self.stdout.total(), self.stderr.total());
        ExecOutput {
            stdout: self.stdout.into_text(),
            stderr: self.stderr.into_text(),
            exit_code: match (self.exit_status, self.client_timed_out) {
                (Some(status), _) => Some(status as i32),
                (None, true) => Some(TIMEOUT_STATUS as i32),
                (None, false) => None,
            },
            signal: self.exit_signal,
            timed_out,
            truncated,
            cancelled: self.cancelled,
            duration_ms: elapsed.as_millis() as u64,
            stdout_bytes,
            stderr_bytes,
        }
    }
}

/// The exec line sshd hands to the user's shell: the wrapper, the timeout, and the command in
/// base64 (shell-safe whatever it contains).
fn wrapped_command(request: &ExecRequest) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(request.command.as_bytes());
    format!(
        "exec {RUNNER} {:.3} {encoded}",
        request.timeout.as_secs_f64()
    )
}

fn signal_name_of(signal: &Sig) -> String {
    match signal {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    }
    .to_owned()
}

/// Logs what `docker exec` (or sshd's `-e` logging) prints, and keeps the last of it for errors.
fn spawn_stderr_log(stderr: tokio::process::ChildStderr) -> Arc<Mutex<String>> {
    let said = Arc::new(Mutex::new(String::new()));
    let keep = said.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(target: "lm_sandbox::sandbox::sshd", "{line}");
            // A std mutex, held for a push: never across an await.
            let mut kept = keep.lock().expect("stderr lock poisoned");
            if kept.len() < 4096 {
                kept.push_str(&line);
                kept.push('\n');
            }
        }
    });
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_travels_base64_encoded_after_the_timeout() {
        let line = wrapped_command(&ExecRequest {
            command: "echo 'it''s' \"$HOME\"; exit 3".into(),
            timeout: Duration::from_millis(2500),
            stdin: None,
            cancel: None,
            live: None,
        });
        let parts: Vec<&str> = line.split(' ').collect();
        assert_eq!(parts[..3], ["exec", RUNNER, "2.500"]);
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(parts[3])
            .unwrap();
        assert_eq!(decoded, b"echo 'it''s' \"$HOME\"; exit 3");
        assert!(parts[3]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)));
    }

    fn collected(exit_status: Option<u32>, signal: Option<&str>) -> Collected {
        let mut c = Collected::new(8);
        c.take(ChannelMsg::Data {
            data: b"out".to_vec().into(),
        });
        c.take(ChannelMsg::ExtendedData {
            data: b"err".to_vec().into(),
            ext: 1,
        });
        c.exit_status = exit_status;
        c.exit_signal = signal.map(str::to_owned);
        c
    }

    #[test]
    fn exit_124_is_a_timeout_only_after_the_deadline() {
        let limit = Duration::from_secs(2);
        let out = collected(Some(124), None).finish(limit, Duration::from_millis(2100));
        assert!(out.timed_out);
        assert_eq!(out.exit_code, Some(124));
        let out = collected(Some(124), None).finish(limit, Duration::from_millis(50));
        assert!(!out.timed_out);
        assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("out", "err"));
    }

    #[test]
    fn a_signal_is_reported_without_an_exit_code() {
        let out = collected(None, Some("KILL")).finish(Duration::from_secs(5), Duration::ZERO);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.signal.as_deref(), Some("KILL"));
        assert!(!out.timed_out);
    }
}
