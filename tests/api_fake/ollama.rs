//! Ollama's API against the fake engine.

use super::*;

#[tokio::test]
async fn ollama_chat_and_generate_stream_ndjson_and_answer_alike() {
    let h = ollama_harness(None);
    let chat = json!({"model": format!("{MODEL}:latest"), "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, body) = send(&h.app, post("/api/chat", chat.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::CONTENT_TYPE], "application/x-ndjson");
    let lines = ndjson(&body);
    let (last, rest) = lines.split_last().unwrap();
    assert!(rest
        .iter()
        .all(|l| l["done"] == false && l["message"]["role"] == "assistant"));
    assert!(rest
        .iter()
        .all(|l| l["created_at"].as_str().unwrap().ends_with('Z')));
    let text: String = rest
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, echoed("hi"));
    assert_eq!(last["done"], true);
    assert_eq!(last["done_reason"], "stop");
    assert_eq!(last["model"], format!("{MODEL}:latest"));
    assert_eq!(last["prompt_eval_count"], echoed("hi").len());
    assert_eq!(last["eval_count"], echoed("hi").len() + 1, "echo plus EOS");
    for field in [
        "total_duration",
        "prompt_eval_duration",
        "eval_duration",
        "load_duration",
    ] {
        assert!(last[field].is_u64(), "{field}: {last}");
    }
    let mut unstreamed = chat.clone();
    unstreamed["stream"] = json!(false);
    let (status, one) = send_json(&h.app, post("/api/chat", unstreamed)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["message"]["content"], text.as_str());
    assert_eq!(one["done"], true);

    // num_predict caps the output: done_reason length.
    let capped =
        json!({"model": MODEL, "prompt": "hello", "stream": false, "options": {"num_predict": 3}});
    let (_, one) = send_json(&h.app, post("/api/generate", capped)).await;
    assert_eq!(one["done_reason"], "length");
    assert_eq!(one["eval_count"], 3);
    // raw: the prompt itself, no template.
    let raw = json!({"model": MODEL, "prompt": "plain", "raw": true});
    let (_, _, body) = send(&h.app, post("/api/generate", raw)).await;
    let lines = ndjson(&body);
    let text: String = lines
        .iter()
        .map(|l| l["response"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(text, "plain");
    // system and prompt go through the template.
    let templated = json!({"model": MODEL, "prompt": "p", "system": "s", "stream": false});
    let (_, one) = send_json(&h.app, post("/api/generate", templated)).await;
    assert_eq!(one["response"], "<|system|>s\n<|user|>p\n<|assistant|>");
}

#[tokio::test]
async fn ollama_errors_are_json_with_a_status_and_a_final_line_mid_stream() {
    let h = ollama_harness(None);
    for (path, body, status, words) in [
        (
            "/api/chat",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
            404,
            "does not exist",
        ),
        ("/api/chat", json!({"messages": []}), 400, "model"),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"temperature": 9}}),
            400,
            "temperature",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "options": {"bogus": 1}}),
            400,
            "bogus",
        ),
        (
            "/api/chat",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "keep_alive": "soon"}),
            400,
            "keep_alive",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "images": ["aGk="]}),
            400,
            "text only",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "", "keep_alive": "soon"}),
            400,
            "keep_alive",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}),
            400,
            "Jinja",
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "suffix": "y"}),
            400,
            "fill-in-the-middle",
        ),
        (
            "/api/pull",
            json!({"model": "llama3.2"}),
            400,
            "does not download",
        ),
        (
            "/api/copy",
            json!({"source": MODEL, "destination": "x"}),
            400,
            "not supported",
        ),
    ] {
        let (got, resp) = send_json(&h.app, post(path, body.clone())).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {resp}");
        let error = resp["error"].as_str().unwrap_or_else(|| panic!("{resp}"));
        assert!(error.contains(words), "{path}: {error}");
    }
    // An engine fault after the stream began: the last line is the error.
    let panic =
        json!({"model": MODEL, "prompt": lm_sandbox::engine::fake::FAKE_PANIC_PROMPT, "raw": true});
    let (status, _, body) = send(&h.app, post("/api/generate", panic)).await;
    assert_eq!(status, StatusCode::OK);
    let lines = ndjson(&body);
    assert!(lines.last().unwrap()["error"].as_str().is_some(), "{body}");
    // `keep_alive: 0` with no prompt unloads the model (this fake server cannot load it again).
    let unload = json!({"model": MODEL, "prompt": "", "keep_alive": 0, "stream": false});
    let (status, resp) = send_json(&h.app, post("/api/generate", unload)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["done_reason"], "unload");
    let (_, ps) = send_json(&h.app, Request::get("/api/ps").body(Body::empty()).unwrap()).await;
    assert_eq!(ps["models"], json!([]), "{ps}");
}

#[tokio::test]
async fn ollama_tool_calls_carry_object_arguments_streamed_and_not() {
    let h = ollama_harness(Some("{{ messages[-1].content }}"));
    let call = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": call}],
                          "tools": weather_tools(), "stream": false});
    let (status, one) = send_json(&h.app, post("/api/chat", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    let calls = &one["message"]["tool_calls"];
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], json!({"city": "Paris"}));
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/api/chat", streamed)).await;
    let lines = ndjson(&body);
    let with_calls: Vec<&Value> = lines
        .iter()
        .filter(|l| l["message"]["tool_calls"].is_array())
        .collect();
    assert_eq!(with_calls.len(), 1, "{body}");
    assert_eq!(with_calls[0]["message"]["tool_calls"], *calls);
    assert_eq!(lines.last().unwrap()["done"], true);
    // A tool result comes back as role tool with tool_name, and a call in history with object
    // arguments: the request renders.
    let history = json!({"model": MODEL, "stream": false, "tools": weather_tools(), "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]});
    let (status, one) = send_json(&h.app, post("/api/chat", history)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
}

#[tokio::test]
async fn open_webui_and_continue_connection_sequences() {
    let h = ollama_harness(None);
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    // Open WebUI: version, tags, ps, then loads with an empty prompt.
    let (status, _, body) = send(&h.app, get("/")).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "Ollama is running")
    );
    let (_, version) = send_json(&h.app, get("/api/version")).await;
    assert!(version["version"].as_str().is_some());
    let (status, tags) = send_json(&h.app, get("/api/tags")).await;
    assert_eq!(status, StatusCode::OK, "{tags}");
    let first = &tags["models"][0];
    assert_eq!(first["name"], format!("{MODEL}:latest"));
    assert_eq!(first["details"]["format"], "gguf");
    assert_eq!(first["details"]["family"], "llama");
    assert_eq!(first["details"]["parameter_size"], "135M");
    assert_eq!(first["details"]["quantization_level"], "Q4_1");
    assert_eq!(first["digest"].as_str().unwrap().len(), 64);
    assert_eq!(
        tags["models"].as_array().unwrap().len(),
        2,
        "the id and the alias"
    );
    let (_, ps) = send_json(&h.app, Request::get("/api/ps").body(Body::empty()).unwrap()).await;
    assert_eq!(ps["models"][0]["context_length"], 2048);
    assert_eq!(ps["models"][0]["size_vram"], 0);
    let load = json!({"model": MODEL, "prompt": "", "keep_alive": "5m"});
    let (status, loaded) = send_json(&h.app, post("/api/generate", load)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (loaded["done"].clone(), loaded["done_reason"].clone()),
        (json!(true), json!("load"))
    );
    // Continue: show, then chat with keep_alive.
    let (status, show) = send_json(&h.app, post("/api/show", json!({"model": MODEL}))).await;
    assert_eq!(status, StatusCode::OK, "{show}");
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    assert_eq!(show["capabilities"], json!(["completion"]));
    assert!(show["template"].as_str().unwrap().contains("messages"));
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "keep_alive": 1800, "stream": false,
                       "options": {"num_ctx": 2048, "num_predict": 4}});
    let (status, one) = send_json(&h.app, post("/api/chat", chat)).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["eval_count"], 4);
}

#[tokio::test]
async fn ollama_accepts_tool_choice_to_force_a_call() {
    let h = ollama_harness(Some("{{ messages[-1].content }}"));
    let call = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;
    for request in [
        json!({"model": MODEL, "stream": false, "tools": weather_tools(), "tool_choice": "required",
               "messages": [{"role": "user", "content": call}]}),
        json!({"model": MODEL, "stream": false, "tools": weather_tools(),
               "options": {"tool_choice": "required"},
               "messages": [{"role": "user", "content": call}]}),
    ] {
        let (status, one) = send_json(&h.app, post("/api/chat", request)).await;
        assert_eq!(status, StatusCode::OK, "{one}");
        assert_eq!(
            one["message"]["tool_calls"][0]["function"]["arguments"]["city"],
            "Paris"
        );
    }
    // A forced call with no tools is the same 400 as in OpenAI's dialect.
    let bad = json!({"model": MODEL, "stream": false, "tool_choice": "required",
                     "messages": [{"role": "user", "content": "x"}]});
    let (status, resp) = send_json(&h.app, post("/api/chat", bad)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
}
