//! Tool calls and structured output on the real default model (SmolLM2-135M, whose ChatML template
//! has no tool support, so the generic format and grammars do the work). Needs
//! `--features real-model`.

#![cfg(feature = "real-model")]

mod common;

use common::{start, MODEL_ID};
use lm_sandbox::tools::schema::validate;
use serde_json::{json, Value};

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}})
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 16}},
                       "required": ["zone"]}}})
}

async fn post(url: &str, body: &Value) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// The assistant message a client rebuilds from streamed deltas, and the finish reason.
fn assemble(sse: &str) -> (Value, String) {
    let mut content = String::new();
    let mut calls: Vec<Value> = Vec::new();
    let mut reason = String::new();
    for data in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_owned();
        }
        content += choice["delta"]["content"].as_str().unwrap_or("");
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = call["index"].as_u64().unwrap() as usize;
            if i == calls.len() {
                calls.push(json!({"name": call["function"]["name"], "arguments": ""}));
            }
            let args = calls[i]["arguments"].as_str().unwrap().to_owned()
                + call["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["arguments"] = json!(args);
        }
    }
    (json!({"content": content, "calls": calls}), reason)
}

#[tokio::test]
async fn a_named_tool_choice_gets_a_valid_call_streamed_and_not() {
    let server = start(&["--parallel", "2"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let request = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [weather_tool(), time_tool()],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0,
        "max_tokens": 120,
    });
    let (status, body) = post(&url, &request).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty());
    let schema = &weather_tool()["function"]["parameters"];
    for call in calls {
        assert_eq!(call["type"], "function");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        validate(schema, &args, "arguments").unwrap();
    }

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (status, sse) = post(&url, &streamed).await;
    assert_eq!(status, 200);
    let (message, reason) = assemble(&sse);
    assert_eq!(reason, "tool_calls");
    let expected: Vec<Value> = calls
        .iter()
        .map(|c| json!({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}))
        .collect();
    assert_eq!(
        message["calls"],
        Value::Array(expected),
        "greedy: the same call streamed"
    );
    assert_eq!(
        message["content"],
        choice["message"]["content"].as_str().unwrap_or("")
    );
}

#[tokio::test]
async fn required_calls_one_of_the_tools_and_history_renders() {
    let server = start(&[]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let request = json!({
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What time is it in Tokyo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_time", "arguments": "{\"zone\": \"Asia/Tokyo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "09:30"},
            {"role": "user", "content": "And the weather there?"}
        ],
        "tools": [weather_tool(), time_tool()],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 0,
        "max_tokens": 120,
    });
    let (status, body) = post(&url, &request).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 1, "parallel_tool_calls: false");
    let name = calls[0]["function"]["name"].as_str().unwrap();
    let tool = if name == "get_weather" {
        weather_tool()
    } else {
        time_tool()
    };
    assert_eq!(tool["function"]["name"], name);
    let args: Value =
        serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
    validate(&tool["function"]["parameters"], &args, "arguments").unwrap();
}

#[tokio::test]
async fn response_format_json_schema_output_validates() {
    let server = start(&[]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let schema = json!({"type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30},
                       "age": {"type": "integer", "minimum": 0},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
        "required": ["name", "age", "tags"], "additionalProperties": false});
    for stream in [false, true] {
        let request = json!({
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": schema}},
            "temperature": 0,
            "max_tokens": 200,
            "stream": stream,
        });
        let (status, body) = post(&url, &request).await;
        assert_eq!(status, 200, "{body}");
        let text = if stream {
            assemble(&body).0["content"].as_str().unwrap().to_owned()
        } else {
            let body: Value = serde_json::from_str(&body).unwrap();
            body["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let value: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        validate(&schema, &value, "content").unwrap();
    }
    let request = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Give me a JSON object about cats."}],
        "response_format": {"type": "json_object"},
        "temperature": 0,
        "max_tokens": 200,
    });
    let (status, body) = post(&url, &request).await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    if body["choices"][0]["finish_reason"] == "stop" {
        assert!(
            serde_json::from_str::<Value>(text).unwrap().is_object(),
            "{text}"
        );
    }
}

#[tokio::test]
async fn a_raw_grammar_constrains_the_output_and_a_broken_one_is_a_400() {
    let server = start(&[]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let mut request = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        "grammar": "root ::= (\"yes\" | \"no\") \".\"",
        "temperature": 0,
        "max_tokens": 10,
    });
    let (status, body) = post(&url, &request).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes." || text == "no.", "{text}");
    request["grammar"] = json!("root ::= undefined-rule");
    let (status, body) = post(&url, &request).await;
    assert_eq!(status, 400, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["param"], "grammar");
    // The engine is fine afterwards.
    request.as_object_mut().unwrap().remove("grammar");
    assert_eq!(post(&url, &request).await.0, 200);
}

/// A grammar that names a token matches that token, not its text: how forcing grammars make a
/// model write a call marker its vocabulary holds as one control token (`[TOOL_CALLS]`,
/// `<|tool_call>`) rather than spell it. SmolLM2 holds `<filename>` as token 6; its text is a
/// control token's, so a request that does not ask for control tokens does not see it.
#[tokio::test]
async fn a_grammar_token_reference_forces_the_control_token_itself() {
    let server = start(&[]).await;
    let url = format!("http://{}/v1/completions", server.addr);
    let ask = |grammar: &str| {
        json!({"model": MODEL_ID, "prompt": "<|im_start|>user\nhi<|im_end|>\n", "max_tokens": 8,
               "temperature": 0, "grammar": grammar})
    };
    // By token: one token, then `a`, then the end.
    let (status, body) = post(&url, &ask(r#"root ::= <[6]> "a""#)).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["choices"][0]["text"], "a", "{reply}");
    assert_eq!(reply["usage"]["completion_tokens"], 3, "{reply}");
    // By text: the model spells it out of ordinary tokens.
    let (_, body) = post(&url, &ask(r#"root ::= "<filename>" "a""#)).await;
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["choices"][0]["text"], "<filename>a", "{reply}");
    assert!(
        reply["usage"]["completion_tokens"].as_u64().unwrap() > 3,
        "{reply}"
    );
}
