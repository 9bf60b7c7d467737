//! LM Studio's REST v0 and v1 against the fake engine.

use super::*;

#[tokio::test]
async fn lmstudio_rest_v0_models_and_answers_with_stats() {
    let h = ollama_harness(None);
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let (status, list) = send_json(&h.app, get("/api/v0/models")).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let first = &list["data"][0];
    assert_eq!(first["id"], MODEL);
    assert_eq!(first["object"], "model");
    assert_eq!(first["type"], "llm");
    assert_eq!(first["arch"], "llama");
    assert_eq!(first["compatibility_type"], "gguf");
    assert_eq!(first["quantization"], "Q4_1");
    assert_eq!(first["state"], "loaded");
    assert_eq!(first["max_context_length"], 2048);
    let (status, one) = send_json(&h.app, get("/api/v0/models/alias")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one["id"], "alias");
    let (status, _) = send_json(&h.app, get("/api/v0/models/nope")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let check_extras = |v: &Value, reason: &str| {
        assert_eq!(v["stats"]["stop_reason"], reason, "{v}");
        assert!(v["stats"]["tokens_per_second"].is_number());
        assert!(v["stats"]["time_to_first_token"].as_f64().unwrap() >= 0.0);
        assert!(v["stats"]["generation_time"].is_number());
        assert_eq!(v["model_info"]["arch"], "llama");
        assert_eq!(v["model_info"]["quant"], "Q4_1");
        assert_eq!(v["model_info"]["format"], "gguf");
        assert_eq!(v["model_info"]["context_length"], 2048);
        assert_eq!(v["runtime"]["supported_formats"], json!(["gguf"]));
    };
    let (status, answer) = send_json(&h.app, post("/api/v0/chat/completions", chat("hi"))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["content"], echoed("hi"));
    check_extras(&answer, "eosFound");
    let mut streamed = chat("hi");
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/api/v0/chat/completions", streamed)).await;
    let chunks = sse_chunks(&sse);
    let last = chunks
        .iter()
        .rev()
        .find(|c| c.get("stats").is_some())
        .unwrap();
    check_extras(last, "eosFound");
    assert_eq!(
        chunks.iter().filter(|c| c.get("stats").is_some()).count(),
        1
    );
    let capped = json!({"model": MODEL, "prompt": "hello", "max_tokens": 2});
    let (_, text) = send_json(&h.app, post("/api/v0/completions", capped)).await;
    assert_eq!(text["choices"][0]["text"], "he");
    check_extras(&text, "maxPredictedTokensReached");
    let stopped = json!({"model": MODEL, "prompt": "hello", "stop": ["ll"]});
    let (_, text) = send_json(&h.app, post("/api/v0/completions", stopped)).await;
    assert_eq!(text["choices"][0]["text"], "he");
    assert_eq!(text["choices"][0]["finish_reason"], "stop");
    check_extras(&text, "stopStringFound");
    let (status, embedded) = send_json(
        &h.app,
        post("/api/v0/embeddings", json!({"model": MODEL, "input": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(embedded["object"], "list");
    // The OpenAI routes are unchanged: no LM Studio fields.
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("hi"))).await;
    assert!(plain.get("stats").is_none() && plain.get("runtime").is_none());
}

#[tokio::test]
async fn lmstudio_rest_v1_model_routes() {
    let h = ollama_harness(None);
    let (status, list) = send_json(
        &h.app,
        Request::get("/api/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let model = &list["models"][0];
    assert_eq!(model["type"], "llm");
    assert_eq!(model["key"], MODEL);
    assert_eq!(model["architecture"], "llama");
    assert_eq!(
        model["quantization"],
        json!({"name": "Q4_1", "bits_per_weight": 4})
    );
    assert_eq!(model["params_string"], "135M");
    assert_eq!(model["format"], "gguf");
    assert!(model["size_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        model["loaded_instances"][0]["config"]["context_length"],
        2048
    );
    assert_eq!(model["capabilities"]["trained_for_tool_use"], false);
    let (status, loaded) = send_json(
        &h.app,
        post(
            "/api/v1/models/load",
            json!({"model": MODEL, "config": {"context_length": 1024}}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{loaded}");
    assert_eq!(loaded["model_instance_id"], MODEL);
    assert_eq!(loaded["config"]["context_length"], 2048);
    for (path, body, status, param) in [
        (
            "/api/v1/models/load",
            json!({"model": MODEL, "config": {"context_length": 1_000_000}}),
            StatusCode::BAD_REQUEST,
            "config.context_length",
        ),
        (
            "/api/v1/models/load",
            json!({"model": "nope"}),
            StatusCode::NOT_FOUND,
            "model",
        ),
        (
            "/api/v1/models/unload",
            json!({}),
            StatusCode::BAD_REQUEST,
            "instance_id",
        ),
    ] {
        let (got, resp) = send_json(&h.app, post(path, body)).await;
        assert_eq!(got, status, "{path}: {resp}");
        assert_eq!(error_of(&resp)["param"], param, "{resp}");
    }
    let (status, resp) = send_json(
        &h.app,
        post("/api/v1/models/download", json!({"model": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&resp)["message"]
        .as_str()
        .unwrap()
        .contains("does not download"));
    // Unloading frees the model: no loaded instance is left.
    let (status, resp) = send_json(
        &h.app,
        post("/api/v1/models/unload", json!({"instance_id": MODEL})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["instance_id"], MODEL);
    let (_, models) = send_json(
        &h.app,
        Request::get("/api/v1/models").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        models["models"][0]["loaded_instances"],
        json!([]),
        "{models}"
    );
}

#[tokio::test]
async fn lmstudio_v1_chat_answers_keeps_threads_and_streams_named_events() {
    let h = ollama_harness(None);
    let (status, one) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "hi", "system_prompt": "s"}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["model_instance_id"], MODEL);
    let first = "<|system|>s\n<|user|>hi\n<|assistant|>";
    assert_eq!(
        one["output"],
        json!([{"type": "message", "content": first}])
    );
    assert_eq!(one["stats"]["input_tokens"], first.len());
    assert!(one["stats"]["tokens_per_second"].is_number());
    let thread = one["thread_id"].as_str().unwrap().to_owned();
    assert!(thread.starts_with("thread_"));
    // The thread continues: the template sees the earlier turns.
    let (_, two) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "more", "thread_id": thread, "stream": false}),
        ),
    )
    .await;
    let content = two["output"][0]["content"].as_str().unwrap();
    assert!(
        content.starts_with(&format!(
            "<|system|>s\n<|user|>hi\n<|assistant|>{first}\n<|user|>more"
        )),
        "{content}"
    );
    assert_eq!(two["thread_id"], thread.as_str());
    // store: false keeps nothing and says no thread.
    let (_, three) = send_json(
        &h.app,
        post(
            "/api/v1/chat",
            json!({"model": MODEL, "input": "x", "store": false}),
        ),
    )
    .await;
    assert!(three.get("thread_id").is_none());
    // Streamed: LM Studio's named events, chat.end with the same result.
    let (status, headers, body) = send(
        &h.app,
        post("/api/v1/chat", json!({"model": MODEL, "input": "hi", "system_prompt": "s", "stream": true, "store": false})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events = named_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "chat.start",
            "prompt_processing.start",
            "prompt_processing.end",
            "message.start"
        ]
    );
    assert_eq!(&names[names.len() - 2..], ["message.end", "chat.end"]);
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    let streamed: String = events
        .iter()
        .filter(|(n, _)| n == "message.delta")
        .map(|(_, d)| d["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, first);
    assert_eq!(
        events.last().unwrap().1["result"]["output"][0]["content"],
        first
    );
    for (body, param) in [
        (json!({"model": MODEL}), "input"),
        (
            json!({"model": MODEL, "input": "x", "thread_id": "thread_nope"}),
            "thread_id",
        ),
        (
            json!({"model": MODEL, "input": "x", "integrations": ["mcp/playwright"]}),
            "integrations",
        ),
        (
            json!({"model": MODEL, "input": "x", "reasoning": "high"}),
            "reasoning",
        ),
        (
            json!({"model": MODEL, "input": "x", "context_length": 999_999}),
            "context_length",
        ),
    ] {
        let (status, resp) = send_json(&h.app, post("/api/v1/chat", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        assert_eq!(error_of(&resp)["param"], param);
    }
}

/// `/api/v1/chat` reads the reply stream like every dialect: reasoning is a `reasoning` output
/// item (and `reasoning.*` events), never content nor kept in the thread, and the request's
/// `reasoning` setting reaches the template.
#[tokio::test]
async fn lmstudio_v1_chat_keeps_reasoning_out_of_content_and_passes_the_setting() {
    // The echo model repeats what the template renders: the last message, and `enable_thinking`.
    let h = ollama_harness(Some(
        "{# <think> #}{{ messages[-1].content }}{% if enable_thinking is defined %}[thinking={{ enable_thinking }}]{% endif %}",
    ));
    let said = "<think>pondering</think>The answer.";
    let body = json!({"model": MODEL, "input": said});
    let (status, one) = send_json(&h.app, post("/api/v1/chat", body.clone())).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(
        one["output"],
        json!([{"type": "reasoning", "content": "pondering"},
               {"type": "message", "content": "The answer."}])
    );
    // The thread keeps the answer, not the reasoning: the next turn's prompt shows it.
    let thread = one["thread_id"].as_str().unwrap();
    let next = json!({"model": MODEL, "input": "again", "thread_id": thread,
                      "reasoning": "off"});
    let (status, two) = send_json(&h.app, post("/api/v1/chat", next)).await;
    assert_eq!(status, StatusCode::OK, "{two}");
    assert_eq!(
        two["output"],
        json!([{"type": "message", "content": "again[thinking=False]"}])
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["reasoning"] = json!("on");
    let (_, _, sse) = send(&h.app, post("/api/v1/chat", streamed)).await;
    let mut kinds: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    // Deltas come a piece at a time.
    kinds.dedup();
    assert_eq!(
        kinds,
        [
            "chat.start",
            "prompt_processing.start",
            "prompt_processing.end",
            "reasoning.start",
            "reasoning.delta",
            "reasoning.end",
            "message.start",
            "message.delta",
            "message.end",
            "chat.end"
        ],
        "{sse}"
    );
    assert!(sse.contains("[thinking=True]"), "{sse}");
}
