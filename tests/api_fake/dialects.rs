//! One reply stream, every dialect: the same scripted output (an answer, a cut-off answer, a
//! call, an engine failure mid-stream) through OpenAI chat and completions, Ollama, LM Studio's
//! REST v1, Anthropic and Responses, each in its own words.

use super::*;

const ANSWER: &str = "It is sunny.";
const CALL: &str =
    "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>";

/// A dialect: its route, its request for a script, and where its answer says how it ended.
struct Dialect {
    name: &'static str,
    path: &'static str,
    body: fn(&str, Option<u32>, bool, bool) -> Value,
    ending: fn(&Value) -> Value,
}

fn dialects() -> Vec<Dialect> {
    vec![
        Dialect {
            name: "openai chat",
            path: "/v1/chat/completions",
            body: |script, max, tools, stream| {
                let mut b = json!({"model": MODEL, "stream": stream,
                                   "messages": [{"role": "user", "content": script}]});
                if let Some(max) = max {
                    b["max_tokens"] = json!(max);
                }
                if tools {
                    b["tools"] = weather_tools();
                }
                b
            },
            ending: |a| a["choices"][0]["finish_reason"].clone(),
        },
        Dialect {
            name: "ollama chat",
            path: "/api/chat",
            body: |script, max, tools, stream| {
                let mut b = json!({"model": MODEL, "stream": stream,
                                   "messages": [{"role": "user", "content": script}]});
                if let Some(max) = max {
                    b["options"] = json!({"num_predict": max});
                }
                if tools {
                    b["tools"] = weather_tools();
                }
                b
            },
            ending: |a| {
                let calls = a["message"]["tool_calls"].as_array().map_or(0, Vec::len);
                json!(format!(
                    "{} calls={calls}",
                    a["done_reason"].as_str().unwrap()
                ))
            },
        },
        Dialect {
            name: "anthropic",
            path: "/v1/messages",
            body: |script, max, tools, stream| {
                let mut b = json!({"model": MODEL, "stream": stream, "max_tokens": max.unwrap_or(512),
                                   "messages": [{"role": "user", "content": script}]});
                if tools {
                    b["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object",
                        "properties": {"city": {"type": "string"}}, "required": ["city"]}}]);
                }
                b
            },
            ending: |a| a["stop_reason"].clone(),
        },
        Dialect {
            name: "responses",
            path: "/v1/responses",
            body: |script, max, tools, stream| {
                let mut b = json!({"model": MODEL, "stream": stream, "input": script});
                if let Some(max) = max {
                    b["max_output_tokens"] = json!(max);
                }
                if tools {
                    b["tools"] = json!([{"type": "function", "name": "get_weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                       "required": ["city"]}}]);
                }
                b
            },
            ending: |a| {
                let calls = a["output"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["type"] == "function_call")
                    .count();
                json!(format!("{} calls={calls}", a["status"].as_str().unwrap()))
            },
        },
    ]
}

#[tokio::test]
async fn every_dialect_says_how_the_same_reply_ended_in_its_own_words() {
    let h = scripted_harness();
    let expected = [
        ("openai chat", ["stop", "length", "tool_calls", "length"]),
        (
            "ollama chat",
            [
                "stop calls=0",
                "length calls=0",
                "stop calls=1",
                "length calls=0",
            ],
        ),
        (
            "anthropic",
            ["end_turn", "max_tokens", "tool_use", "max_tokens"],
        ),
        (
            "responses",
            [
                "completed calls=0",
                "incomplete calls=0",
                "completed calls=1",
                "incomplete calls=0",
            ],
        ),
    ];
    // An answer; the answer cut off; a call; the call cut off (the one truncation rule: a reply
    // cut off is cut off, whatever it held).
    let cases = [
        (ANSWER, None, false),
        (ANSWER, Some(4), false),
        (CALL, None, true),
        (CALL, Some(10), true),
    ];
    for dialect in dialects() {
        let words = expected.iter().find(|(n, _)| *n == dialect.name).unwrap().1;
        for ((script, max, tools), word) in cases.iter().zip(words) {
            let body = (dialect.body)(script, *max, *tools, false);
            let (status, answer) = send_json(&h.app, post(dialect.path, body)).await;
            assert_eq!(status, StatusCode::OK, "{}: {answer}", dialect.name);
            assert_eq!(
                (dialect.ending)(&answer),
                json!(word),
                "{} {script:?} {max:?}: {answer}",
                dialect.name
            );
        }
    }
}

#[tokio::test]
async fn every_dialect_reports_a_failure_mid_stream_in_band() {
    let panic = lm_sandbox::engine::fake::FAKE_PANIC_PROMPT;
    let mut bodies: Vec<(&str, &str, Value)> = dialects()
        .iter()
        .map(|d| (d.name, d.path, (d.body)(panic, None, false, true)))
        .collect();
    bodies.push((
        "openai completions",
        "/v1/completions",
        json!({"model": MODEL, "prompt": panic, "stream": true}),
    ));
    bodies.push((
        "lmstudio v1",
        "/api/v1/chat",
        json!({"model": MODEL, "input": panic, "stream": true}),
    ));
    for (name, path, body) in bodies {
        // An engine of its own each: a fault makes the engine reload.
        let h = scripted_harness();
        let (status, _, text) = send(&h.app, post(path, body)).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{name}: the stream had begun: {text}"
        );
        let last = text
            .trim_end()
            .rsplit("\n\n")
            .next()
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_owned();
        let said = match name {
            "ollama chat" => last.contains("\"error\""),
            "anthropic" => text.contains("event: error") && last.contains("\"api_error\""),
            "responses" => last.contains("response.failed"),
            "lmstudio v1" => text.contains("event: error") && last.contains("chat.end"),
            _ => last.contains("\"engine_failed\""),
        };
        assert!(said, "{name} ends with its own error form: {text}");
    }
}
