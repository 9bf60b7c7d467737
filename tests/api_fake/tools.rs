//! Tool calls and reasoning, scripted: a template that renders only the last message, so the echo
//! model "generates" exactly that text.

use super::*;

#[tokio::test]
async fn scripted_tool_calls_stream_and_answer_alike() {
    let h = scripted_harness();
    let scripts = [
        ("Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich \\\"old town\\\"\"}}\n</tool_call>", "tool_calls"),
        ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}</tool_call><tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"B\"}}</tool_call>", "tool_calls"),
        ("<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"town\": \"A\"}}</tool_call>", "stop"),
        ("<tool_call>{\"name\": \"get_weather\", \"argu", "stop"),
        ("No tool needed: it is sunny.", "stop"),
    ];
    for (script, expected_reason) in scripts {
        let (status, body) = send_json(
            &h.app,
            post("/v1/chat/completions", tool_request(script, false)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], expected_reason, "{script}: {body}");
        let message = choice["message"].clone();
        if expected_reason == "tool_calls" {
            for call in message["tool_calls"].as_array().unwrap() {
                let args: Value =
                    serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
                assert!(args["city"].is_string(), "{args}");
            }
        } else {
            assert_eq!(
                message["content"], script,
                "unparsable calls come back whole as content"
            );
            assert!(message.get("tool_calls").is_none());
        }
        let (status, _, sse) = send(
            &h.app,
            post("/v1/chat/completions", tool_request(script, true)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let (streamed, reason) = assemble(&sse);
        assert_eq!(reason, expected_reason, "{script}");
        if expected_reason == "tool_calls" {
            let content = streamed["content"].as_str().unwrap_or("");
            assert!(
                !content.contains("<tool_call>"),
                "markup leaked into content: {content}"
            );
        }
        assert_eq!(without_ids(streamed), without_ids(message), "{script}");
    }
}

#[tokio::test]
async fn a_call_cut_off_by_max_tokens_finishes_with_length() {
    let h = scripted_harness();
    let mut request = tool_request(
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}</tool_call>",
        false,
    );
    request["max_tokens"] = json!(20);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn tool_mistakes_are_400s_naming_the_field() {
    let h = scripted_harness();
    let cases = [
        (json!({"tools": "x"}), "tools"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "sometimes"}),
            "tool_choice",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "other"}}}),
            "tool_choice.function.name",
        ),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/x"}}}]}),
            "tools[0].function.parameters",
        ),
        (
            json!({"tools": weather_tools(), "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ];
    for (extra, param) in cases {
        let mut request = chat("x");
        for (k, v) in extra.as_object().unwrap() {
            request[k] = v.clone();
        }
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(error_of(&body)["param"], param, "{extra}: {body}");
    }
}

#[tokio::test]
async fn reasoning_is_parsed_out_without_tools_when_the_template_knows_it() {
    // The echo model repeats the last message; the template mentions `<think>`.
    let h = ollama_harness(Some("{# <think> #}{{ messages[-1].content }}"));
    let said = "<think>pondering</think>The answer.";
    let chat = json!({"model": MODEL, "stream": false,
                      "messages": [{"role": "user", "content": said}]});
    let (status, one) = send_json(&h.app, post("/api/chat", chat.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["message"]["thinking"], "pondering", "{one}");
    assert_eq!(one["message"]["content"], "The answer.");
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/api/chat", streamed)).await;
    let lines = ndjson(&body);
    let thinking: String = lines
        .iter()
        .filter_map(|l| l["message"]["thinking"].as_str())
        .collect();
    let content: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(
        (thinking.as_str(), content.as_str()),
        ("pondering", "The answer."),
        "{body}"
    );
    // OpenAI's dialect: `reasoning_content`, never in `content`.
    let (status, openai) = send_json(&h.app, post("/v1/chat/completions", chat)).await;
    assert_eq!(status, StatusCode::OK, "{openai}");
    let message = &openai["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "pondering", "{openai}");
    assert_eq!(message["content"], "The answer.");
    // Without reasoning in the template, the text is the text.
    let plain = ollama_harness(Some("{{ messages[-1].content }}"));
    let chat = json!({"model": MODEL, "stream": false,
                      "messages": [{"role": "user", "content": said}]});
    let (_, one) = send_json(&plain.app, post("/api/chat", chat)).await;
    assert_eq!(one["message"]["content"], said);
}

#[tokio::test]
async fn reasoning_effort_and_template_kwargs_reach_the_template() {
    // The echo model repeats the prompt: the rendered variables come back as the answer
    // (booleans as Python writes them, as Hugging Face templates expect).
    let h = ollama_harness(Some(
        "{# <think> #}{{ reasoning_effort | default('none') }}|{{ enable_thinking | default('unset') }}|{{ messages[-1].content }}",
    ));
    let ask = |extra: Value| {
        let mut body = json!({"model": MODEL, "max_tokens": 32,
                              "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let (status, body) = send_json(
        &h.app,
        post(
            "/v1/chat/completions",
            ask(json!({"reasoning_effort": "high", "chat_template_kwargs": {"enable_thinking": false}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "high|False|hi");
    for (bad, param) in [
        (json!({"reasoning_effort": "extreme"}), "reasoning_effort"),
        (
            json!({"chat_template_kwargs": {"messages": []}}),
            "chat_template_kwargs",
        ),
    ] {
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", ask(bad))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
    // Ollama's `think`: a level is the effort, and thinking is switched on or off.
    let ollama = json!({"model": MODEL, "stream": false, "think": "low",
                        "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send_json(&h.app, post("/api/chat", ollama)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["message"]["content"], "low|True|hi");
    let off = json!({"model": MODEL, "stream": false, "think": false,
                     "messages": [{"role": "user", "content": "hi"}]});
    let (_, body) = send_json(&h.app, post("/api/chat", off)).await;
    assert_eq!(body["message"]["content"], "none|False|hi");
}

/// DeepSeek V3.1's published template lists no tools but renders calls in its own syntax: the
/// prompt gets the tool section its model card gives (not the generic format, whose `<tool_call>`
/// syntax its parser would not read), and earlier calls stay in DeepSeek's syntax.
#[tokio::test]
async fn a_template_with_its_own_call_syntax_but_no_tool_list_gets_its_model_cards_section() {
    let template = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/templates/deepseek-ai-DeepSeek-V3.1.jinja"),
    )
    .unwrap();
    let h = ollama_harness(Some(&template));
    let request = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18"},
            {"role": "user", "content": "And Oslo?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather",
            "description": "Current weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]});
    let (status, body) = send_json(&h.app, post("/apply-template", request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let prompt = body["prompt"].as_str().unwrap();
    assert!(prompt.starts_with("## Tools\nYou have access to the following tools:\n\n### get_weather\nDescription: Current weather"), "{prompt}");
    assert!(
        prompt.contains("<｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}"),
        "{prompt}"
    );
    assert!(!prompt.contains("<tool_call>"), "{prompt}");
}
