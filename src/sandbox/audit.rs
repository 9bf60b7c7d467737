//! The audit log: one JSON line per command run through the sandbox, failures included, written
//! before the caller gets its answer. It names the API key by an id, never the key itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt as _;

use super::{ExecOutput, SandboxError};

/// Who asked for a command.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The HTTP request's id (also sent back as `x-request-id`).
    pub request_id: String,
    /// The API key's id (`key-` and a hash prefix); `None` for the local CLI.
    pub key_id: Option<String>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
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
    duration_ms: u64,
    error: Option<String>,
}

pub struct AuditLog {
    path: PathBuf,
    // A tokio mutex: a line is written while it is held, across an await; one writer at a time
    // keeps lines whole.
    file: tokio::sync::Mutex<tokio::fs::File>,
}

impl AuditLog {
    /// Opens `path` for appending (created readable by its owner only).
    pub async fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent).await?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .await?;
        Ok(Self {
            path: path.to_owned(),
            file: tokio::sync::Mutex::new(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn record(
        &self,
        caller: &Caller,
        command: &str,
        result: &Result<ExecOutput, SandboxError>,
        elapsed: Duration,
    ) {
        let line = line(caller, command, result, elapsed);
        let mut text = match serde_json::to_string(&line) {
            Ok(text) => text,
            Err(e) => {
                tracing::error!(%e, "cannot encode an audit line");
                return;
            }
        };
        text.push('\n');
        let mut file = self.file.lock().await;
        let written = async {
            file.write_all(text.as_bytes()).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            tracing::error!(path = %self.path.display(), %e, "cannot write the audit log");
        }
    }
}

fn line<'a>(
    caller: &'a Caller,
    command: &'a str,
    result: &'a Result<ExecOutput, SandboxError>,
    elapsed: Duration,
) -> Line<'a> {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let base = Line {
        time,
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
        duration_ms: elapsed.as_millis() as u64,
        error: None,
    };
    match result {
        Ok(out) => Line {
            exit_code: out.exit_code,
            signal: out.signal.as_deref(),
            timed_out: out.timed_out,
            bytes_out: out.stdout_bytes + out.stderr_bytes,
            stdout_bytes: out.stdout_bytes,
            stderr_bytes: out.stderr_bytes,
            truncated: out.truncated,
            duration_ms: out.duration_ms,
            ..base
        },
        Err(e) => Line {
            error: Some(e.to_string()),
            ..base
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_line_per_command_with_the_key_id_not_the_key() {
        let path =
            std::env::temp_dir().join(format!("lm-sandbox-audit-{}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let log = AuditLog::open(&path).await.unwrap();
        let caller = Caller {
            request_id: "req_1".into(),
            key_id: Some("key-abc".into()),
        };
        let out = ExecOutput {
            stdout: "hi\n".into(),
            stderr: String::new(),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            truncated: false,
            duration_ms: 7,
            stdout_bytes: 3,
            stderr_bytes: 0,
        };
        log.record(&caller, "echo hi", &Ok(out), Duration::from_millis(8))
            .await;
        log.record(
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
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["request_id"], "req_1");
        assert_eq!(lines[0]["key_id"], "key-abc");
        assert_eq!(lines[0]["command"], "echo hi");
        assert_eq!(lines[0]["exit_code"], 0);
        assert_eq!(lines[0]["bytes_out"], 3);
        assert_eq!(lines[0]["duration_ms"], 7);
        assert!(lines[0]["error"].is_null());
        assert_eq!(lines[1]["command"], "echo 'two\nlines'");
        assert!(lines[1]["error"].as_str().unwrap().contains("unreachable"));
        std::fs::remove_file(&path).unwrap();
    }
}
