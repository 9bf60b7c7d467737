//! The audit log: two JSON lines per command run through the sandbox. `start` is written and
//! flushed before the command reaches the container (time, ids, the command, stdin's length and
//! SHA-256); `end` after it finished, whatever happened to the client that asked (exit code,
//! signal, timeout, bytes, duration, or the error). If `start` cannot be written the command is
//! refused: nothing runs unrecorded. It names the API key by its keyed id, never the key itself.
//!
//! The file is the owner's only (0600), even when it existed before with wider permissions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use super::{ExecOutput, ExecRequest, SandboxError};

/// Who asked for a command.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The HTTP request's id (also sent back as `x-request-id`).
    pub request_id: String,
    /// The API key's id (`key-` and a keyed hash prefix); `None` for the local CLI.
    pub key_id: Option<String>,
    /// A session the request named within its key: a tenant of its own.
    pub session: Option<String>,
    /// Sessions (tenants) this caller's key may hold at once; `None`: the server's
    /// `--sandbox-max-sessions`.
    pub max_sessions: Option<usize>,
}

impl Caller {
    /// The tenant whose container runs this caller's commands: its key, and its session.
    pub fn tenant(&self) -> String {
        format!("{}/{}", self.owner(), self.session.as_deref().unwrap_or(""))
    }

    /// The key whose tenants this caller's count against (`local` for the CLI).
    pub fn owner(&self) -> &str {
        self.key_id.as_deref().unwrap_or("local")
    }
}

/// The `start` line's record of one command; `end` repeats its `exec_id`.
#[derive(Serialize)]
struct StartLine<'a> {
    event: &'static str,
    time: String,
    exec_id: &'a str,
    request_id: &'a str,
    key_id: Option<&'a str>,
    session: Option<&'a str>,
    command: &'a str,
    stdin_bytes: usize,
    /// Hex SHA-256 of the stdin bytes (`null` without stdin).
    stdin_sha256: Option<String>,
}

#[derive(Serialize)]
struct EndLine<'a> {
    event: &'static str,
    time: String,
    exec_id: &'a str,
    request_id: &'a str,
    key_id: Option<&'a str>,
    command: &'a str,
    exit_code: Option<i32>,
    signal: Option<&'a str>,
    timed_out: bool,
    bytes_out: u64,
    stdout_bytes: u64,
    stderr_bytes: u64,
    truncated: bool,
    /// The client withdrew the request while the command ran, which stopped it.
    cancelled: bool,
    duration_ms: u64,
    error: Option<String>,
}

/// The audit log could not be written: the command must not run.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit log {path}: {source}")]
pub struct AuditError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// What the `start` line records of a command, taken before it is queued (so the stdin itself
/// need not be kept).
#[derive(Debug, Clone)]
pub struct Intent {
    command: String,
    stdin_bytes: usize,
    stdin_sha256: Option<String>,
}

impl Intent {
    pub fn of(request: &ExecRequest) -> Self {
        let stdin = request.stdin.as_deref();
        Self {
            command: request.command.clone(),
            stdin_bytes: stdin.map_or(0, <[u8]>::len),
            stdin_sha256: stdin.map(|s| crate::sandbox::image::hex(&Sha256::digest(s))),
        }
    }
}

/// Size at which the log is rotated by default (`--sandbox-audit-max`).
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// Rotated files kept beside the log (`audit.jsonl.1` the newest … `.4` the oldest).
pub const KEPT_ROTATIONS: u32 = 4;

pub struct AuditLog {
    path: PathBuf,
    /// The log is rotated before a line would take it past this size.
    max_bytes: u64,
    // A tokio mutex: a line is written while it is held, across an await; one writer at a time
    // keeps lines whole, and a rotation happens between lines.
    file: tokio::sync::Mutex<Open>,
}

/// The file being written and its size.
struct Open {
    file: tokio::fs::File,
    bytes: u64,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl AuditLog {
    /// Opens `path` for appending, created or narrowed to 0600, rotated at
    /// [`DEFAULT_MAX_BYTES`].
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with_limit(path, DEFAULT_MAX_BYTES).await
    }

    /// As [`AuditLog::open`], rotated before a line would take it past `max_bytes`; the last
    /// [`KEPT_ROTATIONS`] files are kept, so the log never holds more than about
    /// `(KEPT_ROTATIONS + 1) × max_bytes`.
    pub async fn open_with_limit(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await?;
        }
        let file = Self::open_file(path).await?;
        let bytes = file.metadata().await?.len();
        Ok(Self {
            path: path.to_owned(),
            max_bytes,
            file: tokio::sync::Mutex::new(Open { file, bytes }),
        })
    }

    async fn open_file(path: &Path) -> std::io::Result<tokio::fs::File> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await?;
        // `mode` applies only when the file is created; an older file may be wider.
        #[cfg(unix)]
        if file.metadata().await?.is_file() {
            use std::os::unix::fs::PermissionsExt as _;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .await?;
        }
        Ok(file)
    }

    /// `audit.jsonl` → `audit.jsonl.1`, shifting older ones up and dropping the oldest.
    async fn rotate(&self, open: &mut Open) -> std::io::Result<()> {
        let numbered = |n: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        // Ignored errors: an older file that is not there is fine.
        let _ = tokio::fs::remove_file(numbered(KEPT_ROTATIONS)).await;
        for n in (1..KEPT_ROTATIONS).rev() {
            let _ = tokio::fs::rename(numbered(n), numbered(n + 1)).await;
        }
        tokio::fs::rename(&self.path, numbered(1)).await?;
        open.file = Self::open_file(&self.path).await?;
        open.bytes = 0;
        tracing::info!(path = %self.path.display(), "rotated the audit log");
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn write(&self, line: &impl Serialize) -> Result<(), AuditError> {
        let fail = |source| AuditError {
            path: self.path.clone(),
            source,
        };
        let mut text = serde_json::to_string(line).map_err(|e| fail(e.into()))?;
        text.push('\n');
        let mut open = self.file.lock().await;
        if open.bytes > 0 && open.bytes + text.len() as u64 > self.max_bytes {
            self.rotate(&mut open).await.map_err(fail)?;
        }
        let written = async {
            open.file.write_all(text.as_bytes()).await?;
            open.file.flush().await?;
            // Durable before the command runs: a crash right after still leaves the intent.
            open.file.sync_data().await
        };
        let result = written.await;
        // Counted even when partly written (a full disk): rotation then comes sooner.
        open.bytes += text.len() as u64;
        result.map_err(fail)
    }

    /// Writes the `start` line for `intent` under `exec_id`. An error means the command must
    /// not run.
    pub async fn start(
        &self,
        exec_id: &str,
        caller: &Caller,
        intent: &Intent,
    ) -> Result<(), AuditError> {
        self.write(&StartLine {
            event: "start",
            time: now(),
            exec_id,
            request_id: &caller.request_id,
            key_id: caller.key_id.as_deref(),
            session: caller.session.as_deref(),
            command: &intent.command,
            stdin_bytes: intent.stdin_bytes,
            stdin_sha256: intent.stdin_sha256.clone(),
        })
        .await
    }

    /// Writes the `end` line. Failing here is logged: the command has already run.
    pub async fn end(
        &self,
        exec_id: &str,
        caller: &Caller,
        command: &str,
        result: &Result<ExecOutput, SandboxError>,
        elapsed: Duration,
    ) {
        let line = end_line(exec_id, caller, command, result, elapsed);
        if let Err(e) = self.write(&line).await {
            tracing::error!(%e, exec_id, "the audit log's end line was not written");
        }
    }
}

fn end_line<'a>(
    exec_id: &'a str,
    caller: &'a Caller,
    command: &'a str,
    result: &'a Result<ExecOutput, SandboxError>,
    elapsed: Duration,
) -> EndLine<'a> {
    let base = EndLine {
        event: "end",
        time: now(),
        exec_id,
        request_id: &caller.request_id,
        key_id: caller.key_id.as_deref(),
        command,
        exit_code: None,
        signal: None,
        timed_out: false,
        bytes_out: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        truncated: false,
        cancelled: false,
        duration_ms: elapsed.as_millis() as u64,
        error: None,
    };
    match result {
        Ok(out) => EndLine {
            exit_code: out.exit_code,
            signal: out.signal.as_deref(),
            timed_out: out.timed_out,
            bytes_out: out.stdout_bytes + out.stderr_bytes,
            stdout_bytes: out.stdout_bytes,
            stderr_bytes: out.stderr_bytes,
            truncated: out.truncated,
            cancelled: out.cancelled,
            duration_ms: out.duration_ms,
            ..base
        },
        Err(e) => EndLine {
            error: Some(e.to_string()),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: &str, stdin: Option<&[u8]>) -> ExecRequest {
        ExecRequest {
            command: command.into(),
            timeout: Duration::from_secs(1),
            stdin: stdin.map(<[u8]>::to_vec),
            cancel: None,
            live: None,
        }
    }

    #[tokio::test]
    async fn start_and_end_lines_with_the_key_id_and_stdin_by_hash() {
        let path =
            std::env::temp_dir().join(format!("lm-sandbox-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        // An older, wider file is narrowed to 0600.
        std::fs::write(&path, "").unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let log = AuditLog::open(&path).await.unwrap();
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let caller = Caller {
            request_id: "req_1".into(),
            key_id: Some("key-abc".into()),
            session: None,
            max_sessions: None,
        };
        let out = ExecOutput {
            stdout: "hi\n".into(),
            stderr: String::new(),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            truncated: false,
            cancelled: false,
            duration_ms: 7,
            stdout_bytes: 3,
            stderr_bytes: 0,
        };
        log.start("x1", &caller, &Intent::of(&request("cat", Some(b"abc"))))
            .await
            .unwrap();
        log.end("x1", &caller, "cat", &Ok(out), Duration::from_millis(8))
            .await;
        log.start(
            "x2",
            &caller,
            &Intent::of(&request("echo 'two\nlines'", None)),
        )
        .await
        .unwrap();
        log.end(
            "x2",
            &caller,
            "echo 'two\nlines'",
            &Err(SandboxError::Unavailable("down".into())),
            Duration::from_millis(5),
        )
        .await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0]["event"], "start");
        assert_eq!(lines[0]["exec_id"], "x1");
        assert_eq!(lines[0]["request_id"], "req_1");
        assert_eq!(lines[0]["key_id"], "key-abc");
        assert_eq!(lines[0]["stdin_bytes"], 3);
        assert_eq!(
            lines[0]["stdin_sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(lines[1]["event"], "end");
        assert_eq!(lines[1]["exec_id"], "x1");
        assert_eq!(lines[1]["exit_code"], 0);
        assert_eq!(lines[1]["bytes_out"], 3);
        assert_eq!(lines[1]["duration_ms"], 7);
        assert!(lines[1]["error"].is_null());
        assert!(lines[2]["stdin_sha256"].is_null());
        assert_eq!(lines[3]["command"], "echo 'two\nlines'");
        assert!(lines[3]["error"].as_str().unwrap().contains("unreachable"));
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn the_log_rotates_at_its_size_and_keeps_four_old_files() {
        let dir = std::env::temp_dir().join(format!("lm-sandbox-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("audit.jsonl");
        let log = AuditLog::open_with_limit(&path, 4096).await.unwrap();
        let caller = Caller {
            request_id: "req_1".into(),
            key_id: None,
            session: None,
            max_sessions: None,
        };
        let intent = Intent::of(&request(&"x".repeat(1000), None));
        for i in 0..40 {
            log.start(&format!("x{i}"), &caller, &intent).await.unwrap();
        }
        let mut sizes = Vec::new();
        for name in [
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2",
            "audit.jsonl.3",
            "audit.jsonl.4",
        ] {
            let size = std::fs::metadata(dir.join(name)).unwrap().len();
            assert!(size <= 4096, "{name}: {size}");
            sizes.push(size);
        }
        assert!(!dir.join("audit.jsonl.5").exists());
        // The newest lines are in the live file, whole.
        let live = std::fs::read_to_string(&path).unwrap();
        let last: serde_json::Value = serde_json::from_str(live.lines().last().unwrap()).unwrap();
        assert_eq!(last["exec_id"], "x39");
        // A reopened log continues at its size and rotates on time.
        drop(log);
        let log = AuditLog::open_with_limit(&path, 4096).await.unwrap();
        for i in 40..44 {
            log.start(&format!("x{i}"), &caller, &intent).await.unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
