//! The sandbox route and the server-side shell loop, with the echo model and a scripted sandbox.

use super::*;

#[tokio::test]
async fn the_sandbox_route_exists_only_with_a_sandbox_and_maps_its_errors() {
    let without = harness();
    let (status, body) = send_json(
        &without.app,
        post("/v1/sandbox/exec", json!({"command": "id"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-fake-audit-{}.jsonl",
        std::process::id()
    ));
    let sandbox = lm_sandbox::sandbox::Sandbox::new(
        Arc::new(ScriptedExecutor),
        lm_sandbox::sandbox::AuditLog::open(&audit).await.unwrap(),
        lm_sandbox::sandbox::SandboxLimits::default(),
    );
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let mut config = api_config(&[]);
    config.api_keys = ApiKey::list(&["plain".into()], &["runner".into()]);
    config.metrics = true;
    let direct = sandbox.clone();
    let app = router(AppState::from_parts(engine, config, None, Some(sandbox)));
    let with_key = |key: &str, body: Value| {
        let mut request = post("/sandbox/exec", body);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        request
    };
    let (status, headers, body) = send(&app, with_key("runner", json!({"command": "id"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(headers["x-request-id"]
        .to_str()
        .unwrap()
        .starts_with("req_"));
    let (status, body) = send_json(&app, with_key("runner", json!({"command": "down"}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["code"], "sandbox_unavailable");
    let (status, body) = send_json(&app, with_key("plain", json!({"command": "id"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error_of(&body)["code"], "insufficient_permissions");
    let (status, body) = send_json(&app, with_key("runner", json!({"command": "a\u{0}b"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "command");
    let (status, headers, body) = send(&app, with_key("runner", json!({"command": "busy"}))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(body.contains("\"sandbox_busy\""), "{body}");
    let bad_session = json!({"command": "id", "session": "../../etc"});
    let (status, body) = send_json(&app, with_key("runner", bad_session)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "session");
    // A command the shell loop would send unchecked is refused before the log is touched.
    let caller = lm_sandbox::sandbox::Caller {
        request_id: "req_direct".into(),
        key_id: Some("key-x".into()),
        session: None,
        max_sessions: None,
    };
    let long = lm_sandbox::sandbox::ExecRequest {
        command: "x".repeat(lm_sandbox::sandbox::MAX_COMMAND_BYTES + 1),
        timeout: Duration::from_secs(1),
        stdin: None,
        cancel: None,
        live: None,
    };
    assert!(matches!(
        direct.run(long, &caller).await,
        Err(lm_sandbox::sandbox::SandboxError::InvalidCommand(_))
    ));
    let lines = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<(String, String)> = lines
        .lines()
        .map(|l| {
            let line: Value = serde_json::from_str(l).unwrap();
            (
                line["event"].as_str().unwrap().to_owned(),
                line["command"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("start", "id"),
        ("end", "id"),
        ("start", "down"),
        ("end", "down"),
    ];
    assert_eq!(
        events,
        expected.map(|(e, c)| (e.to_owned(), c.to_owned())),
        "a start and an end line for each command that was sent; none for one refused as busy \
         (no slot) or invalid: {lines}"
    );
    std::fs::remove_file(&audit).unwrap();
    // The metrics count each command by outcome, from the same end-of-command task.
    let mut scrape = Request::get("/metrics").body(Body::empty()).unwrap();
    scrape
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer plain".parse().unwrap());
    let (status, _, text) = send(&app, scrape).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    for (outcome, count) in [("ok", 1.0), ("error", 1.0), ("busy", 1.0)] {
        let labels = [("outcome", outcome)];
        assert_eq!(
            sample(&text, "lmsandbox_sandbox_commands_total", &labels),
            count
        );
        let name = "lmsandbox_sandbox_command_duration_seconds_count";
        assert_eq!(sample(&text, name, &labels), count);
    }
}

#[tokio::test]
async fn the_shell_loop_runs_calls_feeds_results_back_and_answers() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-loop-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                      "sandbox": {"shell": true}});
    let (status, headers, text) = send(&app, keyed("runner", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let response: Value = serde_json::from_str(&text).unwrap();
    let executions = response["sandbox_executions"].as_array().unwrap();
    assert_eq!(executions.len(), 1, "{response}");
    assert_eq!(executions[0]["command"], "echo hi");
    assert_eq!(executions[0]["result"]["stdout"], "ran echo hi");
    let choice = &response["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    // The second round echoed the tool result the first round's call produced.
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("<tool_response>") && content.contains("ran echo hi"),
        "{content}"
    );
    assert!(
        choice["message"].get("tool_calls").is_none(),
        "shell calls are the server's"
    );
    let prompt_tokens = response["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        prompt_tokens > SHELL_CALL.len() as u64,
        "usage sums both rounds: {prompt_tokens}"
    );
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        log.contains(&request_id) && log.contains("echo hi"),
        "{log}"
    );

    // Streamed: an execution chunk OpenAI SDKs can ignore, then the same answer.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, _, sse) = send(&app, keyed("runner", streamed)).await;
    assert_eq!(status, StatusCode::OK);
    let executions: Vec<Value> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|c| c.get("sandbox_execution").is_some())
        .collect();
    assert_eq!(executions.len(), 1);
    assert_eq!(executions[0]["choices"][0]["delta"], json!({}));
    let (message, reason) = assemble(&sse);
    assert_eq!(reason, "stop");
    assert_eq!(message["content"].as_str().unwrap(), content);
    let usage_chunk = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .find(|c| c["usage"].is_object())
        .unwrap();
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap(),
        prompt_tokens
    );
    std::fs::remove_file(&audit).unwrap();
}

#[tokio::test]
async fn the_shell_loop_stops_at_max_tool_rounds_and_says_so() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-loop-bound-{}.jsonl",
        std::process::id()
    ));
    // The echo model repeats the first user message every round: a call, forever.
    let app = loop_harness(FIRST_USER, &audit).await;
    for stream in [false, true] {
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                          "sandbox": {"shell": true, "max_tool_rounds": 3}, "stream": stream});
        let (status, _, text) = send(&app, keyed("runner", body)).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let (content, executions) = if stream {
            let count = text.matches("sandbox_execution").count();
            (
                assemble(&text).0["content"].as_str().unwrap().to_owned(),
                count,
            )
        } else {
            let response: Value = serde_json::from_str(&text).unwrap();
            (
                response["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                response["sandbox_executions"].as_array().unwrap().len(),
            )
        };
        assert_eq!(executions, 3);
        assert!(content.contains("stopped after 3 round(s)"), "{content}");
    }
    let (status, body) = send_json(
        &app,
        keyed(
            "runner",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                               "sandbox": {"shell": true, "max_tool_rounds": 17}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "sandbox.max_tool_rounds");
    std::fs::remove_file(&audit).unwrap();
}

#[tokio::test]
async fn only_sandbox_keys_get_the_loop_and_auto_shell_keys_get_it_unasked() {
    let audit =
        std::env::temp_dir().join(format!("lm-sandbox-loop-keys-{}.jsonl", std::process::id()));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let asked = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}],
                       "sandbox": {"shell": true}});
    let (status, body) = send_json(&app, keyed("plain", asked)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // A client that cannot send extra fields (LM Studio): its key turns the loop on.
    let unasked = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}]});
    let (status, body) = send_json(&app, keyed("studio", unasked.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["sandbox_executions"].as_array().unwrap().len(), 1);
    // The same through LM Studio's REST v0.
    let mut v0 = keyed("studio", unasked.clone());
    *v0.uri_mut() = "/api/v0/chat/completions".parse().unwrap();
    let (status, body) = send_json(&app, v0).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["sandbox_executions"].as_array().unwrap().len(),
        1,
        "{body}"
    );
    // Other keys keep plain OpenAI behaviour: no tools, no execution.
    let (status, body) = send_json(&app, keyed("runner", unasked)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("sandbox_executions").is_none());
    assert_eq!(body["choices"][0]["message"]["content"], SHELL_CALL);

    // A client tool keeps the normal behaviour: returned to the client, not run.
    let client_tool = json!({"model": MODEL,
        "messages": [{"role": "user", "content": "<tool_call>{\"name\": \"lookup\", \"arguments\": {\"q\": \"x\"}}</tool_call>"}],
        "tools": [{"type": "function", "function": {"name": "lookup",
                   "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
        "sandbox": {"shell": true}});
    let (status, body) = send_json(&app, keyed("runner", client_tool)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "lookup"
    );
    assert!(body["sandbox_executions"].as_array().unwrap().is_empty());
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn the_shell_loop_answers_ollama_chat_for_auto_shell_keys_streamed_and_not() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-ollama-loop-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let ollama = |key: &str, body: Value| {
        let mut request = post("/api/chat", body);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        request
    };
    // An auto-shell key gets the loop unasked, as on the OpenAI route.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": SHELL_CALL}], "stream": false});
    let (status, one) = send_json(&app, ollama("studio", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let executions = one["sandbox_executions"].as_array().unwrap();
    assert_eq!(executions[0]["command"], "echo hi");
    assert_eq!(executions[0]["result"]["stdout"], "ran echo hi");
    assert_eq!(one["done"], true);
    assert_eq!(one["done_reason"], "stop");
    let content = one["message"]["content"].as_str().unwrap();
    assert!(content.contains("ran echo hi"), "{content}");
    assert!(
        one["message"].get("tool_calls").is_none(),
        "shell calls are the server's"
    );
    // Streamed: the execution is a line of its own, then the answer, then done.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, _, text) = send(&app, ollama("studio", streamed)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let lines = ndjson(&text);
    let executed: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("sandbox_execution").is_some())
        .collect();
    assert_eq!(executed.len(), 1, "{text}");
    let answer: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert!(answer.contains("ran echo hi"), "{answer}");
    assert_eq!(lines.last().unwrap()["done"], true);
    // A key without the sandbox permission asking for it: 403 in Ollama's shape.
    let mut asked = body;
    asked["sandbox"] = json!({"shell": true});
    let (status, error) = send_json(&app, ollama("plain", asked)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{error}");
    assert!(error["error"].as_str().unwrap().contains("sandbox"));
    let _ = std::fs::remove_file(&audit);
}

/// A sandbox key's Messages and Responses requests get the same server-side loop as chat, with
/// the same audit: the execution listed (and, streamed, sent as an event), the result fed back.
#[tokio::test]
async fn the_shell_loop_answers_messages_and_responses_with_the_same_audit() {
    let audit = std::env::temp_dir().join(format!(
        "lm-sandbox-agents-audit-{}.jsonl",
        std::process::id()
    ));
    let app = loop_harness(LAST_MESSAGE, &audit).await;
    let with_key = |path: &str, key: &str, body: Value| {
        let mut request = post(path, body);
        request
            .headers_mut()
            .insert("x-api-key", key.parse().unwrap());
        request
    };
    let message = json!({"model": MODEL, "max_tokens": 512, "sandbox": {"shell": true},
                         "messages": [{"role": "user", "content": SHELL_CALL}]});
    let (status, headers, text) =
        send(&app, with_key("/v1/messages", "runner", message.clone())).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        answer["sandbox_executions"][0]["command"], "echo hi",
        "{answer}"
    );
    assert_eq!(answer["stop_reason"], "end_turn");
    let said = answer["content"][0]["text"].as_str().unwrap();
    assert!(said.contains("ran echo hi"), "the result went back: {said}");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(&request_id), "{log}");

    let mut streamed = message.clone();
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&app, with_key("/v1/messages", "runner", streamed)).await;
    assert!(sse.contains("event: sandbox_execution_started"), "{sse}");
    assert!(sse.contains("event: sandbox_execution\n"), "{sse}");
    assert!(sse.contains("event: message_stop"), "{sse}");

    // A key without the sandbox permission is refused in Anthropic's shape.
    let (status, refused) = send_json(&app, with_key("/v1/messages", "plain", message)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{refused}");
    assert_eq!(refused["error"]["type"], "permission_error");

    let response = json!({"model": MODEL, "input": SHELL_CALL, "sandbox": {"shell": true},
                          "max_output_tokens": 512});
    let (status, headers, text) = send(&app, with_key("/v1/responses", "runner", response)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        answer["sandbox_executions"][0]["command"], "echo hi",
        "{answer}"
    );
    assert_eq!(answer["status"], "completed");
    let request_id = headers["x-request-id"].to_str().unwrap().to_owned();
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(&request_id), "{log}");
    std::fs::remove_file(&audit).unwrap();
}
