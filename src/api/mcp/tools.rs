//! The sandbox's tools as MCP describes them (a JSON schema, a description a model can act on,
//! read-only / destructive hints), and each call as one sandbox command: `shell` as given,
//! `read_file`, `write_file` and `list_dir` as small fixed scripts over a path checked to stay in
//! the tenant's workspace. Bad arguments are errors naming the argument.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::sandbox::{ExecOutput, ExecRequest, SandboxLimits};

/// Bytes `read_file` returns at most (more is cut, and says so).
pub const READ_LIMIT: usize = 1 << 20;
/// Bytes `write_file` takes at most.
pub const WRITE_LIMIT: usize = 4 << 20;
/// Entries `list_dir` returns at most.
pub const LIST_LIMIT: usize = 1000;
/// The tenant's workspace: where commands start and where paths must stay.
pub const WORKSPACE: &str = "/workspace";

/// One tool: name, description, input schema, read-only.
pub struct ToolDef {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub schema: Value,
    pub read_only: bool,
}

/// The tools, in the order `tools/list` gives them.
pub fn definitions(limits: &SandboxLimits) -> Vec<ToolDef> {
    let max_timeout = limits.max_timeout.as_secs_f64();
    vec![
        ToolDef {
            name: "shell",
            title: "Run a shell command in the sandbox",
            description:
                "Run a bash command in an isolated Linux sandbox (Debian with python3 and \
                git, no network, working directory /workspace, which persists between calls) and \
                get its stdout, stderr and exit code. Long output is cut at a limit and marked \
                truncated.",
            schema: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The bash command to run"},
                    "stdin": {"type": "string", "description": "Text fed to the command's standard input"},
                    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": max_timeout,
                                  "description": "Seconds before the command is killed"},
                    "cwd": {"type": "string", "description": "Directory to run in, inside /workspace (default /workspace)"},
                },
                "required": ["command"],
                "additionalProperties": false,
            }),
            read_only: false,
        },
        ToolDef {
            name: "read_file",
            title: "Read a file in the sandbox",
            description: "Read a text file in the sandbox's /workspace (a path relative to it, or \
                absolute inside it). At most 1 MiB is returned.",
            schema: json!({
                "type": "object",
                "properties": {"path": {"type": "string", "description": "The file to read"}},
                "required": ["path"],
                "additionalProperties": false,
            }),
            read_only: true,
        },
        ToolDef {
            name: "write_file",
            title: "Write a file in the sandbox",
            description: "Write text to a file in the sandbox's /workspace, creating its \
                directories and replacing the file if it exists. At most 4 MiB.",
            schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "The file to write"},
                    "content": {"type": "string", "description": "The whole new content"},
                },
                "required": ["path", "content"],
                "additionalProperties": false,
            }),
            read_only: false,
        },
        ToolDef {
            name: "list_dir",
            title: "List a directory in the sandbox",
            description: "List the entries of a directory in the sandbox's /workspace (default: \
                /workspace itself) with their type and size.",
            schema: json!({
                "type": "object",
                "properties": {"path": {"type": "string", "description": "The directory (default /workspace)"}},
                "additionalProperties": false,
            }),
            read_only: true,
        },
    ]
}

/// A bad argument: the argument, and what is wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct BadArgument {
    pub argument: String,
    pub message: String,
}

impl BadArgument {
    fn new(argument: &str, message: impl Into<String>) -> Self {
        Self {
            argument: argument.to_owned(),
            message: message.into(),
        }
    }
}

/// A call as one sandbox command, and how to read its output.
pub struct Planned {
    pub request: ExecRequest,
    pub kind: Kind,
}

/// Which tool ran, for reading its output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Shell,
    Read { path: String },
    Write { path: String, bytes: usize },
    List { path: String },
}

fn string<'a>(args: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, BadArgument> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(BadArgument::new(
            name,
            format!("`{name}` must be a string; got {other}"),
        )),
    }
}

fn required<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, BadArgument> {
    string(args, name)?.ok_or_else(|| BadArgument::new(name, format!("`{name}` is required")))
}

/// `path` as an absolute path inside the workspace, or why not. Relative paths are taken from
/// the workspace; `..` may not climb out of it.
pub fn workspace_path(argument: &str, path: &str) -> Result<String, BadArgument> {
    if path.is_empty() {
        return Err(BadArgument::new(argument, format!("`{argument}` is empty")));
    }
    if path.contains('\0') {
        return Err(BadArgument::new(
            argument,
            format!("`{argument}` holds a NUL byte"),
        ));
    }
    let rest = match path.strip_prefix(WORKSPACE) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
        _ if path.starts_with('/') => {
            return Err(BadArgument::new(
                argument,
                format!("`{argument}` must be inside {WORKSPACE}; got {path:?}"),
            ))
        }
        _ => path,
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in rest.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(BadArgument::new(
                        argument,
                        format!("`{argument}` climbs out of {WORKSPACE}: {path:?}"),
                    ));
                }
            }
            part => parts.push(part),
        }
    }
    let mut out = WORKSPACE.to_owned();
    for part in parts {
        out.push('/');
        out.push_str(part);
    }
    Ok(out)
}

/// A shell word: `text` in single quotes.
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Checks a call's arguments and turns it into one command.
pub fn plan(
    tool: &str,
    args: &Map<String, Value>,
    limits: &SandboxLimits,
) -> Result<Planned, BadArgument> {
    let allowed: &[&str] = match tool {
        "shell" => &["command", "stdin", "timeout_s", "cwd"],
        "read_file" => &["path"],
        "write_file" => &["path", "content"],
        "list_dir" => &["path"],
        other => return Err(BadArgument::new("name", format!("no tool `{other}`"))),
    };
    if let Some(extra) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(BadArgument::new(
            extra,
            format!("`{tool}` takes no argument `{extra}`"),
        ));
    }
    let timeout = limits.default_timeout;
    let planned = match tool {
        "shell" => {
            let command = required(args, "command")?;
            let timeout = match args.get("timeout_s") {
                None | Some(Value::Null) => timeout,
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(t) if t > 0.0 && t <= limits.max_timeout.as_secs_f64() => {
                        Duration::from_secs_f64(t)
                    }
                    _ => {
                        return Err(BadArgument::new(
                            "timeout_s",
                            format!(
                                "`timeout_s` must be greater than 0 and at most {}; got {n}",
                                limits.max_timeout.as_secs_f64()
                            ),
                        ))
                    }
                },
                Some(other) => {
                    return Err(BadArgument::new(
                        "timeout_s",
                        format!("`timeout_s` must be a number; got {other}"),
                    ))
                }
            };
            let command = match string(args, "cwd")? {
                Some(cwd) => {
                    let cwd = workspace_path("cwd", cwd)?;
                    format!("cd -- {} && {command}", quoted(&cwd))
                }
                None => command.to_owned(),
            };
            Planned {
                request: ExecRequest {
                    command,
                    timeout,
                    stdin: string(args, "stdin")?.map(|s| s.as_bytes().to_vec()),
                    cancel: None,
                    live: None,
                },
                kind: Kind::Shell,
            }
        }
        "read_file" => {
            let path = workspace_path("path", required(args, "path")?)?;
            Planned {
                request: ExecRequest {
                    command: format!(
                        "test -f {p} || {{ echo \"not a file: {p}\" >&2; exit 2; }}; head -c {} -- {p}",
                        READ_LIMIT + 1,
                        p = quoted(&path)
                    ),
                    timeout,
                    stdin: None,
                    cancel: None,
                    live: None,
                },
                kind: Kind::Read { path },
            }
        }
        "write_file" => {
            let path = workspace_path("path", required(args, "path")?)?;
            let content = required(args, "content")?;
            if content.len() > WRITE_LIMIT {
                return Err(BadArgument::new(
                    "content",
                    format!(
                        "`content` is {} bytes, more than the {WRITE_LIMIT} a write takes",
                        content.len()
                    ),
                ));
            }
            Planned {
                request: ExecRequest {
                    command: format!(
                        "mkdir -p -- \"$(dirname -- {p})\" && cat > {p}",
                        p = quoted(&path)
                    ),
                    timeout,
                    stdin: Some(content.as_bytes().to_vec()),
                    cancel: None,
                    live: None,
                },
                kind: Kind::Write {
                    path,
                    bytes: content.len(),
                },
            }
        }
        _ => {
            let path = workspace_path("path", string(args, "path")?.unwrap_or(WORKSPACE))?;
            Planned {
                request: ExecRequest {
                    command: format!(
                        "test -d {p} || {{ echo \"not a directory: {p}\" >&2; exit 2; }}; \
                         find {p} -mindepth 1 -maxdepth 1 -printf '%y\\t%s\\t%f\\n' | sort -t $'\\t' -k3 | head -n {}",
                        LIST_LIMIT + 1,
                        p = quoted(&path)
                    ),
                    timeout,
                    stdin: None,
                    cancel: None,
                    live: None,
                },
                kind: Kind::List { path },
            }
        }
    };
    Ok(planned)
}

/// A command's result as the tool's structured content, and whether it is a tool error.
pub fn result(kind: &Kind, out: &ExecOutput) -> (Value, bool) {
    let failed = out.exit_code != Some(0);
    match kind {
        Kind::Shell => (json!(out), false),
        _ if failed => (
            json!({"error": out.stderr.trim_end(), "exit_code": out.exit_code,
                   "timed_out": out.timed_out}),
            true,
        ),
        Kind::Read { path } => {
            let truncated = out.stdout.len() > READ_LIMIT || out.truncated;
            let mut content = out.stdout.clone();
            if content.len() > READ_LIMIT {
                let mut end = READ_LIMIT;
                while !content.is_char_boundary(end) {
                    end -= 1;
                }
                content.truncate(end);
            }
            (
                json!({"path": path, "content": content, "truncated": truncated}),
                false,
            )
        }
        Kind::Write { path, bytes } => (json!({"path": path, "bytes": bytes}), false),
        Kind::List { path } => {
            let mut entries: Vec<Value> = out
                .stdout
                .lines()
                .filter_map(|line| {
                    let mut parts = line.splitn(3, '\t');
                    let (kind, size, name) = (parts.next()?, parts.next()?, parts.next()?);
                    let kind = match kind {
                        "f" => "file",
                        "d" => "directory",
                        "l" => "symlink",
                        _ => "other",
                    };
                    Some(json!({"name": name, "type": kind, "size": size.parse::<u64>().unwrap_or(0)}))
                })
                .collect();
            let truncated = entries.len() > LIST_LIMIT;
            entries.truncate(LIST_LIMIT);
            (
                json!({"path": path, "entries": entries, "truncated": truncated}),
                false,
            )
        }
    }
}

/// The text a client shows for a result.
pub fn text(kind: &Kind, structured: &Value) -> String {
    match kind {
        Kind::Shell => {
            let mut text = String::new();
            let stdout = structured["stdout"].as_str().unwrap_or("");
            let stderr = structured["stderr"].as_str().unwrap_or("");
            text.push_str(stdout);
            if !stderr.is_empty() {
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str("[stderr]\n");
                text.push_str(stderr);
            }
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            match (&structured["exit_code"], &structured["signal"]) {
                (_, Value::String(signal)) => text.push_str(&format!("[killed by {signal}]")),
                (code, _) => text.push_str(&format!("[exit code {code}]")),
            }
            if structured["timed_out"] == true {
                text.push_str(" [timed out]");
            }
            text
        }
        Kind::Read { .. } => structured["content"].as_str().unwrap_or("").to_owned(),
        _ => structured.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_in_the_workspace() {
        assert_eq!(
            workspace_path("p", "a/b.txt").unwrap(),
            "/workspace/a/b.txt"
        );
        assert_eq!(
            workspace_path("p", "/workspace/a/../b").unwrap(),
            "/workspace/b"
        );
        assert_eq!(workspace_path("p", "/workspace").unwrap(), "/workspace");
        assert_eq!(workspace_path("p", "./x/./y/").unwrap(), "/workspace/x/y");
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "/workspaces/x",
            "",
            "a\0b",
        ] {
            assert_eq!(
                workspace_path("p", bad).unwrap_err().argument,
                "p",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn bad_arguments_are_named() {
        let limits = SandboxLimits::default();
        let args = |v: Value| v.as_object().unwrap().clone();
        let cases = [
            ("shell", json!({}), "command"),
            ("shell", json!({"command": 5}), "command"),
            (
                "shell",
                json!({"command": "ls", "timeout_s": -1}),
                "timeout_s",
            ),
            ("shell", json!({"command": "ls", "cwd": "/etc"}), "cwd"),
            ("shell", json!({"command": "ls", "color": true}), "color"),
            ("read_file", json!({}), "path"),
            ("write_file", json!({"path": "a"}), "content"),
            ("list_dir", json!({"path": "../.."}), "path"),
            ("rm_rf", json!({}), "name"),
        ];
        for (tool, value, argument) in cases {
            let err = plan(tool, &args(value), &limits).err().expect(tool);
            assert_eq!(err.argument, argument, "{tool}");
        }
        let big = "x".repeat(WRITE_LIMIT + 1);
        let err = plan(
            "write_file",
            &args(json!({"path": "a", "content": big})),
            &limits,
        );
        assert_eq!(err.err().unwrap().argument, "content");
    }

    #[test]
    fn a_path_is_one_quoted_word() {
        let limits = SandboxLimits::default();
        let args = json!({"path": "it's here/$(x)"});
        let planned = plan("read_file", args.as_object().unwrap(), &limits).unwrap();
        assert!(planned
            .request
            .command
            .contains(r"'/workspace/it'\''s here/$(x)'"));
    }
}
