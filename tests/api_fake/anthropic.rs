//! Anthropic's Messages API against the fake engine: the event sequence for text, reasoning, tool
//! calls, truncation and a failure mid-stream; errors in Anthropic's shape; a Claude Code request
//! sequence replayed from fixtures.

use super::*;

/// A scripted Messages request: the fake model "generates" `script`.
fn messages(script: &str, stream: bool) -> Value {
    json!({"model": MODEL, "max_tokens": 256, "stream": stream,
           "messages": [{"role": "user", "content": script}]})
}

fn anthropic_tools() -> Value {
    json!([{"name": "get_weather", "description": "The weather.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}}])
}

/// The named events of an SSE body: (event, data), each data's `type` its event's name.
fn anthropic_events(body: &str) -> Vec<(String, Value)> {
    let events = named_events(body);
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "the data's type names its event"
        );
    }
    events
}

/// The Message a client assembles from the events, checking their order as it goes.
fn assemble_message(events: &[(String, Value)]) -> Value {
    assert_eq!(events[0].0, "message_start");
    assert_eq!(events[1].0, "ping");
    assert_eq!(events.last().unwrap().0, "message_stop");
    let mut message = events[0].1["message"].clone();
    let mut open: Option<usize> = None;
    let mut partial_json = String::new();
    for (name, data) in &events[2..events.len() - 1] {
        match name.as_str() {
            "content_block_start" => {
                assert!(open.is_none(), "a block starts while another is open");
                let index = data["index"].as_u64().unwrap() as usize;
                assert_eq!(index, message["content"].as_array().unwrap().len());
                message["content"]
                    .as_array_mut()
                    .unwrap()
                    .push(data["content_block"].clone());
                open = Some(index);
                partial_json.clear();
            }
            "content_block_delta" => {
                let index = data["index"].as_u64().unwrap() as usize;
                assert_eq!(Some(index), open);
                let block = &mut message["content"][index];
                let delta = &data["delta"];
                match delta["type"].as_str().unwrap() {
                    "text_delta" => {
                        let text = format!(
                            "{}{}",
                            block["text"].as_str().unwrap(),
                            delta["text"].as_str().unwrap()
                        );
                        block["text"] = json!(text);
                    }
                    "thinking_delta" => {
                        let text = format!(
                            "{}{}",
                            block["thinking"].as_str().unwrap(),
                            delta["thinking"].as_str().unwrap()
                        );
                        block["thinking"] = json!(text);
                    }
                    "signature_delta" => block["signature"] = delta["signature"].clone(),
                    "input_json_delta" => {
                        partial_json.push_str(delta["partial_json"].as_str().unwrap())
                    }
                    other => panic!("unknown delta {other}"),
                }
            }
            "content_block_stop" => {
                let index = open.take().expect("a block to stop");
                assert_eq!(data["index"], index);
                let block = &mut message["content"][index];
                if block["type"] == "tool_use" {
                    block["input"] = serde_json::from_str(&partial_json).unwrap();
                }
            }
            "message_delta" => {
                assert!(open.is_none(), "message_delta while a block is open");
                message["stop_reason"] = data["delta"]["stop_reason"].clone();
                message["usage"] = data["usage"].clone();
            }
            "error" => panic!("error event: {data}"),
            "sandbox_execution" | "sandbox_execution_started" => {}
            other => panic!("unexpected event {other}"),
        }
    }
    message
}

/// The Message with the fields that differ between two answers (ids, timings) blanked.
fn comparable(mut message: Value) -> Value {
    message["id"] = Value::Null;
    for block in message["content"].as_array_mut().unwrap() {
        if block["type"] == "tool_use" {
            block["id"] = Value::Null;
        }
    }
    message
}

#[tokio::test]
async fn every_event_sequence_streams_to_the_unstreamed_message() {
    let h = scripted_harness();
    let scripts = [
        ("It is sunny.", false, "end_turn", vec!["text"]),
        (
            "<think>The user wants weather.</think>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
            true,
            "tool_use",
            vec!["thinking", "tool_use"],
        ),
        (
            "Checking.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"B\"}}</tool_call>",
            true,
            "tool_use",
            vec!["text", "tool_use", "tool_use"],
        ),
    ];
    for (script, tools, reason, kinds) in scripts {
        let mut body = messages(script, false);
        if tools {
            body["tools"] = anthropic_tools();
        }
        let (status, whole) = send_json(&h.app, post("/v1/messages", body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{whole}");
        assert_eq!(whole["type"], "message");
        assert_eq!(whole["stop_reason"], reason, "{script}: {whole}");
        let got: Vec<&str> = whole["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["type"].as_str().unwrap())
            .collect();
        assert_eq!(got, kinds, "{script}");
        for block in whole["content"].as_array().unwrap() {
            if block["type"] == "tool_use" {
                assert!(
                    block["input"]["city"].is_string(),
                    "structured input: {block}"
                );
            }
        }
        body["stream"] = json!(true);
        let (status, headers, sse) = send(&h.app, post("/v1/messages", body)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let streamed = assemble_message(&anthropic_events(&sse));
        let mut whole = comparable(whole);
        let mut streamed = comparable(streamed);
        // message_start's usage is the prompt's; the final usage arrives with message_delta.
        whole["usage"] = Value::Null;
        streamed["usage"] = Value::Null;
        assert_eq!(streamed, whole, "{script}");
    }
}

#[tokio::test]
async fn truncation_stop_sequences_and_a_failure_mid_stream() {
    let h = scripted_harness();
    let mut body = messages("A long answer that will not fit.", false);
    body["max_tokens"] = json!(5);
    let (status, whole) = send_json(&h.app, post("/v1/messages", body.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(whole["stop_reason"], "max_tokens");
    assert_eq!(whole["usage"]["output_tokens"], 5);
    body["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/v1/messages", body)).await;
    let events = anthropic_events(&sse);
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "max_tokens");

    // A stop sequence is named in `stop_sequence`, whole and streamed.
    let mut stopped = messages("It is sunny today.", false);
    stopped["stop_sequences"] = json!(["never", "sunny"]);
    let (_, whole) = send_json(&h.app, post("/v1/messages", stopped.clone())).await;
    assert_eq!(whole["stop_reason"], "stop_sequence", "{whole}");
    assert_eq!(whole["stop_sequence"], "sunny");
    assert_eq!(whole["content"][0]["text"], "It is ");
    stopped["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/v1/messages", stopped)).await;
    let events = anthropic_events(&sse);
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_sequence"], "sunny");

    let failing = messages(lm_sandbox::engine::fake::FAKE_PANIC_PROMPT, true);
    let (status, _, sse) = send(&h.app, post("/v1/messages", failing)).await;
    assert_eq!(status, StatusCode::OK, "the stream had begun");
    let events = anthropic_events(&sse);
    assert_eq!(events[0].0, "message_start");
    let (name, error) = events.last().unwrap();
    assert_eq!(name, "error", "{sse}");
    assert_eq!(error["error"]["type"], "api_error");
}

/// Asserts Anthropic's error shape and returns the error's type.
fn anthropic_error(body: &Value) -> &str {
    assert_eq!(body["type"], "error", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body["error"]["type"].as_str().unwrap()
}

#[tokio::test]
async fn errors_have_anthropics_shape_and_status_from_every_layer() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 512,
            n_ctx_seq: 512,
            max_queue: 8,
        },
        Duration::ZERO,
        &["sk-right"],
    );
    let keyed = |body: Value, key: Option<&str>| {
        let mut request =
            Request::post("/v1/messages").header(header::CONTENT_TYPE, "application/json");
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        request.body(Body::from(body.to_string())).unwrap()
    };
    let ok =
        json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send_json(&h.app, keyed(ok.clone(), None)).await;
    assert_eq!(
        (status, anthropic_error(&body)),
        (StatusCode::UNAUTHORIZED, "authentication_error")
    );
    let (status, body) = send_json(&h.app, keyed(ok.clone(), Some("sk-wrong"))).await;
    assert_eq!(
        (status, anthropic_error(&body)),
        (StatusCode::UNAUTHORIZED, "authentication_error")
    );
    let (status, body) = send_json(&h.app, keyed(ok.clone(), Some("sk-right"))).await;
    assert_eq!(status, StatusCode::OK, "x-api-key is a key: {body}");

    let cases = [
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
            "max_tokens",
        ),
        (
            json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "robot", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]}]}),
            "messages[0].content[0].type",
        ),
        (
            json!({"model": MODEL, "max_tokens": 8, "messages": [], }),
            "messages",
        ),
        (
            json!({"model": MODEL, "max_tokens": 8, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}),
            "temperature",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = send_json(&h.app, keyed(body, Some("sk-right"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {answer}");
        assert_eq!(anthropic_error(&answer), "invalid_request_error");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("{field}: ")),
            "names {field}: {answer}"
        );
    }
    let mut missing = ok.clone();
    missing["model"] = json!("no-such-model");
    let (status, body) = send_json(&h.app, keyed(missing, Some("sk-right"))).await;
    assert_eq!(
        (status, anthropic_error(&body)),
        (StatusCode::NOT_FOUND, "not_found_error")
    );
    let huge = Request::post("/v1/messages")
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-api-key", "sk-right")
        .body(Body::from(vec![b' '; MAX_BODY_BYTES + 1]))
        .unwrap();
    let (status, body) = send_json(&h.app, huge).await;
    assert_eq!(
        (status, anthropic_error(&body)),
        (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
    );
    let (status, body) = send_json(&h.app, keyed(json!("not an object"), Some("sk-right"))).await;
    assert_eq!(
        (status, anthropic_error(&body)),
        (StatusCode::BAD_REQUEST, "invalid_request_error")
    );
}

#[tokio::test]
async fn count_tokens_equals_the_requests_prompt() {
    let h = harness();
    let body = json!({"model": MODEL, "system": "Be brief.",
                      "messages": [{"role": "user", "content": "hello there"}]});
    let (status, counted) =
        send_json(&h.app, post("/v1/messages/count_tokens", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{counted}");
    let mut real = body;
    real["max_tokens"] = json!(4);
    let (_, answer) = send_json(&h.app, post("/v1/messages", real)).await;
    let usage = &answer["usage"];
    let input = usage["input_tokens"].as_u64().unwrap()
        + usage["cache_read_input_tokens"].as_u64().unwrap();
    assert_eq!(counted["input_tokens"].as_u64().unwrap(), input, "{answer}");
}

/// A Claude Code session's first two requests, written from its public documentation and
/// captures (tests/fixtures/agents/claude-code-*.json), with the model renamed to the fake one:
/// both answer, and the second turn's different billing nonce does not change the prompt's start.
#[tokio::test]
async fn a_claude_code_request_sequence_replays() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 2,
            n_batch: 512,
            n_ctx_seq: 8192,
            max_queue: 8,
        },
        Duration::ZERO,
        &[],
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agents");
    let mut rendered = Vec::new();
    for turn in ["claude-code-turn1.json", "claude-code-turn2.json"] {
        let text = std::fs::read_to_string(root.join(turn)).unwrap();
        let mut body: Value = serde_json::from_str(&text).unwrap();
        body["model"] = json!(MODEL);
        let (status, _, sse) = send(&h.app, post("/v1/messages", body.clone())).await;
        assert_eq!(status, StatusCode::OK, "{turn}: {sse}");
        let events = anthropic_events(&sse);
        let message = assemble_message(&events);
        assert!(message["stop_reason"].is_string(), "{turn}: {message}");
        // The echo model repeats its prompt: what the template rendered.
        let text: String = message["content"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect();
        assert!(!text.contains("x-anthropic-billing-header"), "{text}");
        let (status, counted) = send_json(&h.app, post("/v1/messages/count_tokens", body)).await;
        assert_eq!(status, StatusCode::OK, "{counted}");
        rendered.push(text);
    }
    // Turn 2's prompt begins with turn 1's (the cache can reuse it).
    let common = rendered[0]
        .chars()
        .zip(rendered[1].chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        common > 100,
        "turn 2 shares only {common} characters with turn 1"
    );
}
