//! OpenAI's Responses API against the fake engine: event sequences (text, reasoning, calls,
//! truncation, a failure mid-stream), the store (per key, chained, listed, deleted), errors, and a
//! Codex request replayed from a fixture.

use super::*;

fn responses(script: &str, stream: bool) -> Value {
    json!({"model": MODEL, "input": script, "stream": stream})
}

fn function_tools() -> Value {
    json!([{"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}])
}

/// The `data` of each SSE frame, checking that its event name is its type and that
/// `sequence_number`s count from 0.
fn events_of(body: &str) -> Vec<Value> {
    let events: Vec<Value> = body
        .split("\n\n")
        .filter(|frame| !frame.trim().is_empty() && !frame.starts_with(':'))
        .map(|frame| {
            let name = frame
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap();
            let data = frame
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap();
            let data: Value = serde_json::from_str(data).unwrap();
            assert_eq!(data["type"], name);
            data
        })
        .collect();
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event["sequence_number"], i, "{event}");
    }
    events
}

/// The output items a client builds from the events, checking each item's events refer to it.
fn assemble_output(events: &[Value]) -> Vec<Value> {
    let mut items: Vec<Value> = Vec::new();
    for event in events {
        let index = event["output_index"].as_u64().map(|i| i as usize);
        match event["type"].as_str().unwrap() {
            "response.output_item.added" => {
                assert_eq!(index, Some(items.len()));
                items.push(event["item"].clone());
            }
            "response.output_text.delta" => {
                let item = &mut items[index.unwrap()];
                assert_eq!(event["item_id"], item["id"]);
                let text = format!(
                    "{}{}",
                    item["text"].as_str().unwrap_or(""),
                    event["delta"].as_str().unwrap()
                );
                item["text"] = json!(text);
            }
            "response.function_call_arguments.delta" => {
                let item = &mut items[index.unwrap()];
                assert_eq!(event["item_id"], item["id"]);
                let args = format!(
                    "{}{}",
                    item["arguments"].as_str().unwrap(),
                    event["delta"].as_str().unwrap()
                );
                item["arguments"] = json!(args);
            }
            "response.output_item.done" => {
                let item = &mut items[index.unwrap()];
                assert_eq!(event["item"]["id"], item["id"]);
                if let Some(text) = item.get("text").cloned() {
                    assert_eq!(event["item"]["content"][0]["text"], text, "deltas add up");
                }
                if item["type"] == "function_call" {
                    assert_eq!(
                        event["item"]["arguments"], item["arguments"],
                        "deltas add up"
                    );
                }
                *item = event["item"].clone();
            }
            _ => {}
        }
    }
    items
}

fn without_ids(mut items: Vec<Value>) -> Vec<Value> {
    for item in &mut items {
        item["id"] = Value::Null;
        if item["type"] == "function_call" {
            item["call_id"] = Value::Null;
        }
    }
    items
}

#[tokio::test]
async fn every_event_sequence_streams_to_the_unstreamed_output() {
    let h = scripted_harness();
    let scripts = [
        ("It is sunny.", false, "completed", vec!["message"]),
        (
            "<think>Weather, then.</think>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
            true,
            "completed",
            vec!["reasoning", "function_call"],
        ),
        (
            "Both.<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"B\"}}</tool_call>",
            true,
            "completed",
            vec!["message", "function_call", "function_call"],
        ),
    ];
    for (script, tools, status, kinds) in scripts {
        let mut body = responses(script, false);
        if tools {
            body["tools"] = function_tools();
        }
        let (code, whole) = send_json(&h.app, post("/v1/responses", body.clone())).await;
        assert_eq!(code, StatusCode::OK, "{whole}");
        assert_eq!(whole["object"], "response");
        assert_eq!(whole["status"], status, "{whole}");
        let got: Vec<&str> = whole["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(got, kinds, "{script}");
        for item in whole["output"].as_array().unwrap() {
            if item["type"] == "function_call" {
                let args: Value =
                    serde_json::from_str(item["arguments"].as_str().unwrap()).unwrap();
                assert!(args["city"].is_string());
                assert!(item["call_id"].as_str().unwrap().starts_with("call_"));
            }
        }
        body["stream"] = json!(true);
        let (code, _, sse) = send(&h.app, post("/v1/responses", body)).await;
        assert_eq!(code, StatusCode::OK);
        let events = events_of(&sse);
        assert_eq!(events[0]["type"], "response.created");
        assert_eq!(events[0]["response"]["status"], "in_progress");
        assert_eq!(events[1]["type"], "response.in_progress");
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.completed");
        let output = assemble_output(&events);
        assert_eq!(
            without_ids(output.clone()),
            without_ids(whole["output"].as_array().unwrap().clone()),
            "{script}"
        );
        assert_eq!(
            last["response"]["output"],
            json!(output),
            "the final response holds the streamed items"
        );
    }
}

#[tokio::test]
async fn truncation_is_incomplete_and_a_failure_mid_stream_is_failed() {
    let h = scripted_harness();
    let mut body = responses("A long answer that will not fit.", false);
    body["max_output_tokens"] = json!(5);
    let (_, whole) = send_json(&h.app, post("/v1/responses", body.clone())).await;
    assert_eq!(whole["status"], "incomplete");
    assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(whole["usage"]["output_tokens"], 5);
    body["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/v1/responses", body)).await;
    let events = events_of(&sse);
    assert_eq!(events.last().unwrap()["type"], "response.incomplete");

    let failing = responses(lm_sandbox::engine::fake::FAKE_PANIC_PROMPT, true);
    let (code, _, sse) = send(&h.app, post("/v1/responses", failing)).await;
    assert_eq!(code, StatusCode::OK, "the stream had begun");
    let events = events_of(&sse);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.failed", "{sse}");
    assert_eq!(last["response"]["status"], "failed");
    assert!(last["response"]["error"]["message"].is_string());
}

fn keyed(method: &str, path: &str, key: &str, body: Option<Value>) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap()
}

#[tokio::test]
async fn stored_responses_chain_list_delete_and_stay_with_their_key() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 2,
            n_batch: 512,
            n_ctx_seq: 2048,
            max_queue: 8,
        },
        Duration::ZERO,
        &["sk-alice", "sk-bob"],
    );
    let first = json!({"model": MODEL, "input": "first question", "instructions": "Be brief.",
                       "max_output_tokens": 200});
    let (code, one) = send_json(
        &h.app,
        keyed("POST", "/v1/responses", "sk-alice", Some(first)),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{one}");
    let id = one["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("resp_"));
    assert_eq!(one["store"], true);

    // Chained: the second request's prompt holds the first turn (the echo model repeats it).
    let second = json!({"model": MODEL, "input": "second question", "previous_response_id": id,
                        "max_output_tokens": 400});
    let (code, two) = send_json(
        &h.app,
        keyed("POST", "/v1/responses", "sk-alice", Some(second.clone())),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{two}");
    let text = two["output"][0]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("first question") && text.contains("second question"),
        "{text}"
    );
    // Instructions are not carried over: the prompt starts with the first turn, no system line.
    assert!(text.starts_with("<|user|>first question"), "{text}");
    assert_eq!(two["previous_response_id"], id.as_str());

    // Another key sees none of it.
    for (method, path) in [
        ("GET", format!("/v1/responses/{id}")),
        ("DELETE", format!("/v1/responses/{id}")),
        ("GET", format!("/v1/responses/{id}/input_items")),
    ] {
        let (code, body) = send_json(&h.app, keyed(method, &path, "sk-bob", None)).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "{method} {path}: {body}");
        error_of(&body);
    }
    let (code, body) = send_json(
        &h.app,
        keyed("POST", "/v1/responses", "sk-bob", Some(second)),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&body)["param"], "previous_response_id");

    // Its owner retrieves, lists and deletes it.
    let (code, got) = send_json(
        &h.app,
        keyed("GET", &format!("/v1/responses/{id}"), "sk-alice", None),
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(got["output"], one["output"]);
    let (code, items) = send_json(
        &h.app,
        keyed(
            "GET",
            &format!("/v1/responses/{id}/input_items"),
            "sk-alice",
            None,
        ),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{items}");
    assert_eq!(items["object"], "list");
    assert_eq!(items["data"][0]["content"][0]["text"], "first question");
    assert_eq!(items["first_id"], items["data"][0]["id"]);
    let (code, deleted) = send_json(
        &h.app,
        keyed("DELETE", &format!("/v1/responses/{id}"), "sk-alice", None),
    )
    .await;
    assert_eq!((code, &deleted["deleted"]), (StatusCode::OK, &json!(true)));
    let (code, _) = send_json(
        &h.app,
        keyed("GET", &format!("/v1/responses/{id}"), "sk-alice", None),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    // `store: false` keeps nothing.
    let unstored = json!({"model": MODEL, "input": "x", "store": false, "max_output_tokens": 50});
    let (_, three) = send_json(
        &h.app,
        keyed("POST", "/v1/responses", "sk-alice", Some(unstored)),
    )
    .await;
    let path = format!("/v1/responses/{}", three["id"].as_str().unwrap());
    let (code, _) = send_json(&h.app, keyed("GET", &path, "sk-alice", None)).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn input_tokens_and_bad_input_name_their_fields() {
    let h = harness();
    let body = json!({"model": MODEL, "input": "hello there", "instructions": "Be brief."});
    let (code, counted) = send_json(&h.app, post("/v1/responses/input_tokens", body.clone())).await;
    assert_eq!(code, StatusCode::OK, "{counted}");
    assert_eq!(counted["object"], "response.input_tokens");
    let mut real = body;
    real["max_output_tokens"] = json!(4);
    let (_, answer) = send_json(&h.app, post("/v1/responses", real)).await;
    assert_eq!(counted["input_tokens"], answer["usage"]["input_tokens"]);

    for (body, param) in [
        (json!({"model": MODEL}), "input"),
        (json!({"model": MODEL, "input": 7}), "input"),
        (
            json!({"model": MODEL, "input": [{"type": "item_reference", "id": "x"}]}),
            "input[0].type",
        ),
        (
            json!({"model": MODEL, "input": [{"type": "function_call", "name": "f"}]}),
            "input[0].call_id",
        ),
        (
            json!({"model": MODEL, "input": "hi", "temperature": 9}),
            "temperature",
        ),
        (
            json!({"model": MODEL, "input": "hi", "store": "yes"}),
            "store",
        ),
        (
            json!({"model": MODEL, "input": "hi", "tools": [{"type": "function"}]}),
            "tools[0].name",
        ),
        (
            json!({"model": MODEL, "input": "hi", "text": {"format": {"type": "json_schema"}}}),
            "text.format.schema",
        ),
    ] {
        let (code, answer) = send_json(&h.app, post("/v1/responses", body.clone())).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(error_of(&answer)["param"], param, "{body}");
    }
    let (code, answer) = send_json(
        &h.app,
        post("/v1/responses", json!({"model": "nope", "input": "hi"})),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{answer}");
}

/// Codex CLI's request, written from its public documentation (tests/fixtures/agents): function
/// tools served, the others skipped with a stated warning, the stream complete.
#[tokio::test]
async fn a_codex_request_replays() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 2,
            n_batch: 512,
            n_ctx_seq: 4096,
            max_queue: 8,
        },
        Duration::ZERO,
        &[],
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/agents");
    let text = std::fs::read_to_string(root.join("codex-request.json")).unwrap();
    let mut body: Value = serde_json::from_str(&text).unwrap();
    body["model"] = json!(MODEL);
    body["max_output_tokens"] = json!(64);
    let (code, headers, sse) = send(&h.app, post("/v1/responses", body)).await;
    assert_eq!(code, StatusCode::OK, "{sse}");
    let warning = headers["x-lm-sandbox-warning"].to_str().unwrap();
    assert!(
        warning.contains("custom") && warning.contains("web_search"),
        "{warning}"
    );
    let events = events_of(&sse);
    let last = events.last().unwrap();
    assert!(
        ["response.completed", "response.incomplete"].contains(&last["type"].as_str().unwrap()),
        "{last}"
    );
    assert_eq!(last["response"]["store"], false);
    let output = assemble_output(&events);
    assert_eq!(output[0]["type"], "message");
    // The echo model repeats its prompt: the developer message and instructions were rendered.
    let text = output[0]["content"][0]["text"].as_str().unwrap();
    assert!(text.contains("You are Codex"), "{text}");
}
