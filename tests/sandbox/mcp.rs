//! MCP: the official Python SDK against the real binary's `/mcp` (feature `real-model`).
#![cfg(feature = "real-model")]

use super::*;
use crate::http::{spawn_serve, PLAIN_KEY, RUNNER_KEY};

/// The official MCP Python SDK against the real binary's `/mcp` with real containers: the tools,
/// a command's output and status, files written and read, two keys' tenants apart, a key without
/// the permission refused, a deadline, progress, and every call in the audit log with its MCP
/// session.
#[cfg(feature = "real-model")]
#[tokio::test]
async fn the_mcp_sdk_uses_the_sandbox_through_mcp() {
    const OTHER_KEY: &str = "runner-two";
    let audit = state_root().join("mcp-audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let extra = [
        "-c",
        "512",
        "--api-key",
        PLAIN_KEY,
        "--sandbox-api-key",
        OTHER_KEY,
    ];
    let (mut server, base) = spawn_serve(&extra, &audit).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/clients-venv/bin/python");
    assert!(python.is_file(), "run .ci/setup first");
    let script = root.join("tests/clients/mcp_client.py");
    let output = tokio::process::Command::new(python)
        .arg(script)
        .args([base.as_str(), RUNNER_KEY, OTHER_KEY, PLAIN_KEY])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the MCP client failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every call has its start and end lines; each MCP call's name its MCP session and call
    // (the `true`s of the overhead measurement also went through /v1/sandbox/exec).
    let starts: Vec<&Value> = lines.iter().filter(|l| l["event"] == "start").collect();
    assert!(starts.len() >= 10, "{log}");
    for start in &starts {
        assert!(
            lines
                .iter()
                .any(|l| l["event"] == "end" && l["exec_id"] == start["exec_id"]),
            "no end line for {start}"
        );
        let id = start["request_id"].as_str().unwrap();
        assert!(
            start["command"] == "true" || id.contains(" mcp:"),
            "the MCP session is recorded: {start}"
        );
    }
    let through_mcp = starts
        .iter()
        .filter(|s| s["request_id"].as_str().unwrap().contains(" mcp:"))
        .count();
    assert!(
        through_mcp >= 60,
        "50 timed calls and the others: {through_mcp}"
    );
    let shell = lines
        .iter()
        .find(|l| l["event"] == "start" && l["command"] == "echo out; echo err >&2; exit 3")
        .expect("the shell call's start line");
    let end = lines
        .iter()
        .find(|l| l["event"] == "end" && l["exec_id"] == shell["exec_id"])
        .expect("its end line");
    assert_eq!(end["exit_code"], 3);
    // The cancelled call: its command was stopped (not left to its 60 s deadline), and the
    // audit says so.
    let started = lines
        .iter()
        .find(|l| l["event"] == "start" && l["command"] == "sleep 45; echo never")
        .expect("the cancelled call's start line");
    let ended = lines
        .iter()
        .find(|l| l["event"] == "end" && l["exec_id"] == started["exec_id"])
        .expect("the cancelled call's end line, written before the client finished");
    assert_eq!(ended["cancelled"], true, "{ended}");
    assert!(ended["duration_ms"].as_u64().unwrap() < 20_000, "{ended}");
    server.start_kill().unwrap();
    let _ = server.wait().await;
}
