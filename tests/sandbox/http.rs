//! HTTP: the real router (a fake engine) and the real binary over the real sandbox.

use super::*;

// ---- HTTP: the real router, a fake engine, the real sandbox ----

pub(crate) const RUNNER_KEY: &str = "runner-key";
pub(crate) const PLAIN_KEY: &str = "plain-key";

pub(crate) async fn serve(sandbox: Sandbox) -> String {
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 4,
    });
    let config = ApiConfig {
        model_ids: vec!["fake".into()],
        api_keys: ApiKey::list(&[PLAIN_KEY.into()], &[RUNNER_KEY.into()]),
        n_predict: None,
        chat_template: None,
        created: 0,
        max_tool_rounds: 4,
        ..ApiConfig::default()
    };
    let app = router(AppState::from_parts(engine, config, None, Some(sandbox)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

pub(crate) async fn sandbox_for(
    fixture: &Fixture,
    audit: &Path,
    connect_timeout: Duration,
) -> Sandbox {
    let ex = executor_with(fixture, connect_timeout, 1 << 20);
    Sandbox::new(
        Arc::new(ex),
        AuditLog::open(audit).await.unwrap(),
        SandboxLimits::default(),
    )
}

pub(crate) async fn post(
    base: &str,
    key: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/v1/sandbox/exec"))
        .json(&body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, id, resp.json().await.unwrap())
}

#[tokio::test]
pub(crate) async fn http_exec_needs_a_sandbox_key_and_is_audited() {
    let audit = state_root().join("http-audit.jsonl");
    let base = serve(sandbox_for(shared(), &audit, Duration::from_secs(10)).await).await;

    let (status, _, body) = post(&base, None, json!({"command": "id"})).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = post(&base, Some(PLAIN_KEY), json!({"command": "id"})).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error");

    let (status, id, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "cat; echo oops >&2; exit 2", "stdin": "fed\n", "timeout_s": 10}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"stdout": "fed\n", "stderr": "oops\n", "exit_code": 2, "signal": null,
               "timed_out": false, "truncated": false, "cancelled": false,
               "duration_ms": body["duration_ms"]})
    );
    let (status, _, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "sleep 5", "timeout_s": 0.5}),
    )
    .await;
    assert_eq!(status, 200, "a timeout is a result: {body}");
    assert_eq!(body["timed_out"], true);

    for (bad, param) in [
        (json!({}), "command"),
        (json!({"command": ""}), "command"),
        (json!({"command": 5}), "command"),
        (json!({"command": "id", "timeout_s": -1}), "timeout_s"),
        (json!({"command": "id", "timeout_s": 100000}), "timeout_s"),
        (json!({"command": "id", "stdin": 3}), "stdin"),
    ] {
        let (status, _, body) = post(&base, Some(RUNNER_KEY), bad.clone()).await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert_eq!(body["error"]["param"], param, "{bad} -> {body}");
    }
    let (status, _, _) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "id", "shell": "zsh"}),
    )
    .await;
    assert_eq!(status, 400);

    let log = std::fs::read_to_string(&audit).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = lines
        .iter()
        .find(|l| l["request_id"] == id.clone().unwrap().as_str() && l["event"] == "end")
        .expect("the audit log names the request");
    assert_eq!(first["command"], "cat; echo oops >&2; exit 2");
    assert_eq!(first["key_id"], ApiKey::new(RUNNER_KEY, true).id().as_str());
    assert_eq!(first["exit_code"], 2);
    assert_eq!(first["bytes_out"], 9);
    assert!(!log.contains(RUNNER_KEY), "the key itself is never logged");
    assert_eq!(
        lines.len(),
        4,
        "a start and an end line per command; refused and invalid requests run nothing"
    );
}

#[tokio::test]
pub(crate) async fn http_exec_answers_503_within_the_connect_timeout_when_the_sandbox_is_down() {
    let fixture = start("down", Profile::default(), TransportKind::Exec);
    docker()
        .output(&["stop", "--time", "0", &fixture.name])
        .unwrap();
    let audit = state_root().join("down-audit.jsonl");
    let base = serve(sandbox_for(&fixture, &audit, Duration::from_secs(2)).await).await;
    let started = Instant::now();
    let (status, _, body) = post(&base, Some(RUNNER_KEY), json!({"command": "id"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "sandbox_unavailable");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let health = reqwest::get(format!("{base}/health")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200, "the server stays healthy");
    container::down(&docker(), &fixture.name, true).unwrap();
}

/// The real binary serving the default model with the shared sandbox; killed when dropped.
#[cfg(feature = "real-model")]
pub(crate) async fn spawn_serve(extra: &[&str], audit: &Path) -> (tokio::process::Child, String) {
    let fixture = shared();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    let server = tokio::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args([
            "serve",
            "-m",
            model,
            "--port",
            &port.to_string(),
            "--parallel",
            "1",
        ])
        .args(["--sandbox", "--sandbox-api-key", RUNNER_KEY])
        .args(["--sandbox-state-dir", state_root().to_str().unwrap()])
        .args(["--sandbox-name", &fixture.name])
        .args(["--sandbox-audit-log", audit.to_str().unwrap()])
        .args(extra)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("{base}/health"))
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "the server did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (server, base)
}

/// The real binary: `serve --sandbox` on the default model, wired to the shared sandbox by flags.
#[cfg(feature = "real-model")]
#[tokio::test]
pub(crate) async fn serve_with_the_sandbox_flag_runs_commands_over_http() {
    let audit = state_root().join("serve-audit.jsonl");
    let (mut server, base) = spawn_serve(&["-c", "512"], &audit).await;
    let (status, id, body) = post(
        &base,
        Some(RUNNER_KEY),
        json!({"command": "echo from-serve; id -u"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "from-serve\n1000\n");
    let (status, _, _) = post(&base, None, json!({"command": "id"})).await;
    assert_eq!(status, 401);
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(id.unwrap().as_str()), "{log}");
    server.start_kill().unwrap();
    let _ = server.wait().await;
}

/// The whole flow on the real model and the real container: a forced `shell` call runs in the
/// sandbox, its result reaches the model, an answer comes back, and the audit log has the command.
#[cfg(feature = "real-model")]
#[tokio::test]
pub(crate) async fn the_real_model_runs_a_forced_shell_call_in_the_sandbox_and_answers() {
    let audit = state_root().join("loop-audit.jsonl");
    let (mut server, base) = spawn_serve(&["-c", "4096", "--api-key", PLAIN_KEY], &audit).await;
    let request = json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": "Use the shell tool to run this command: echo hello-sandbox"}],
        "tool_choice": {"type": "function", "function": {"name": "shell"}},
        "sandbox": {"shell": true, "max_tool_rounds": 2},
        "temperature": 0,
        "max_tokens": 96,
    });
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(RUNNER_KEY)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&body).unwrap());
    let executions = body["sandbox_executions"].as_array().unwrap();
    assert!(!executions.is_empty(), "{body}");
    let first = &executions[0];
    let command = first["command"].as_str().unwrap();
    assert!(command.contains("echo"), "the model's command: {command}");
    assert!(first["result"]["exit_code"].is_number(), "{first}");
    assert!(
        first["result"]["stdout"]
            .as_str()
            .unwrap()
            .contains("hello"),
        "{first}"
    );
    let choice = &body["choices"][0];
    assert!(
        choice["message"]["content"].is_string(),
        "an answer comes back: {body}"
    );
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let log = std::fs::read_to_string(&audit).unwrap();
    let line = log
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["request_id"] == request_id.as_str())
        .expect("the audit log has the loop's command");
    assert_eq!(line["command"], command);
    // The binary keys ids with this install's secret, which it created next to sandbox.json.
    let secret = std::fs::read(state_root().join(&shared().name).join("key-id.secret")).unwrap();
    assert_eq!(
        line["key_id"],
        lm_sandbox::api::auth::keyed_id(&secret, RUNNER_KEY).as_str()
    );

    // A key without the sandbox permission cannot trigger it.
    let refused = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(PLAIN_KEY)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    server.start_kill().unwrap();
    let _ = server.wait().await;
}
