//! OpenAI's routes against the fake engine: shapes, errors, keys, streaming, completions, the
//! queue, cancellation and the prefix cache.

use super::*;

#[tokio::test]
async fn chat_completion_has_openai_shape_and_usage() {
    let h = harness();
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("hi"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], echoed("hi"));
    assert_eq!(choice["finish_reason"], "stop");
    let prompt_len = echoed("hi").len() as u64;
    assert_eq!(body["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(
        body["usage"]["completion_tokens"],
        prompt_len + 1,
        "echo plus EOS"
    );
    assert_eq!(body["usage"]["total_tokens"], 2 * prompt_len + 1);
}

#[tokio::test]
async fn routes_answer_without_the_v1_prefix_and_to_aliases() {
    let h = harness();
    let mut body = chat("x");
    body["model"] = json!("alias");
    let (status, resp) = send_json(&h.app, post("/chat/completions", body)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp["model"], "alias");
    let (status, models) =
        send_json(&h.app, Request::get("/models").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "alias"]);
    let (status, model) = send_json(
        &h.app,
        Request::get("/v1/models/alias")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, model["id"].clone(), model["object"].clone()),
        (StatusCode::OK, json!("alias"), json!("model"))
    );
}

#[tokio::test]
async fn every_client_mistake_is_a_4xx_with_an_openai_error_body() {
    let h = harness();
    // (request, status, expected `param`, expected `code`)
    type Case = (
        Request<Body>,
        StatusCode,
        Option<&'static str>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            Request::post("/v1/chat/completions")
                .body(Body::from("{not json"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            Request::post("/v1/chat/completions")
                .body(Body::from("[1,2]"))
                .unwrap(),
            StatusCode::BAD_REQUEST,
            None,
            Some("invalid_json"),
        ),
        (
            post("/v1/chat/completions", json!({"model": MODEL})),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post("/v1/chat/completions", json!({"messages": []})),
            StatusCode::BAD_REQUEST,
            Some("model"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": []}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": "hi"}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user"}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].content"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("messages[0].content[0].type"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "warm"}),
            ),
            StatusCode::BAD_REQUEST,
            Some("temperature"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            ),
            StatusCode::BAD_REQUEST,
            Some("max_tokens"),
            None,
        ),
        (
            post(
                "/v1/chat/completions",
                json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}),
            ),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            post("/v1/completions", json!({"model": MODEL, "prompt": 5})),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            None,
        ),
        (
            post(
                "/v1/completions",
                json!({"model": MODEL, "prompt": [1, 99999]}),
            ),
            StatusCode::BAD_REQUEST,
            Some("prompt[1]"),
            None,
        ),
        (
            post("/v1/completions", json!({"model": MODEL, "prompt": []})),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            None,
        ),
        (
            Request::get("/v1/nope").body(Body::empty()).unwrap(),
            StatusCode::NOT_FOUND,
            None,
            Some("unknown_url"),
        ),
        (
            Request::get("/v1/models/gpt-4")
                .body(Body::empty())
                .unwrap(),
            StatusCode::NOT_FOUND,
            Some("model"),
            Some("model_not_found"),
        ),
        (
            Request::get("/v1/chat/completions")
                .body(Body::empty())
                .unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            Some("method_not_allowed"),
        ),
    ];
    for (request, want_status, want_param, want_code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (status, body) = send_json(&h.app, request).await;
        assert_eq!(status, want_status, "{what}: {body}");
        let error = error_of(&body);
        if let Some(param) = want_param {
            assert_eq!(error["param"], param, "{what}: {body}");
        }
        if let Some(code) = want_code {
            assert_eq!(error["code"], code, "{what}: {body}");
        }
    }
}

#[tokio::test]
async fn an_out_of_range_value_names_the_field_the_limit_and_the_value() {
    let h = harness();
    let mut body = chat("x");
    body["top_p"] = json!(1.7);
    let (status, resp) = send_json(&h.app, post("/v1/chat/completions", body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error = error_of(&resp);
    assert_eq!(error["param"], "top_p");
    assert_eq!(error["type"], "invalid_request_error");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("top_p") && message.contains("between 0 and 1") && message.contains("1.7"),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let h = harness();
    let big = "x".repeat(MAX_BODY_BYTES + 1);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat(&big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&body)["code"], "request_too_large");
}

#[tokio::test]
async fn a_prompt_that_cannot_fit_the_context_is_400_context_length_exceeded() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 64,
            max_queue: 1,
        },
        Duration::ZERO,
        &[],
    );
    let (status, body) =
        send_json(&h.app, post("/v1/chat/completions", chat(&"y".repeat(100)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
    // Fits alone, but not with the tokens asked for; streaming gets the same 400, before any byte.
    let mut request = chat("short");
    request["max_tokens"] = json!(60);
    request["stream"] = json!(true);
    let (status, headers, text) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers[header::CONTENT_TYPE], "application/json");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(error_of(&body)["code"], "context_length_exceeded");
    assert!(
        h.log.lock().unwrap().begun.is_empty(),
        "nothing reached the engine"
    );
}

#[tokio::test]
async fn api_keys_guard_everything_but_health() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 256,
            max_queue: 1,
        },
        Duration::ZERO,
        &["sk-one", "sk-two"],
    );
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body)["code"], "invalid_api_key");
    let wrong = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-three")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send_json(&h.app, wrong).await.0, StatusCode::UNAUTHORIZED);
    let unknown_route = Request::get("/v1/secret").body(Body::empty()).unwrap();
    assert_eq!(
        send_json(&h.app, unknown_route).await.0,
        StatusCode::UNAUTHORIZED,
        "no route probing without a key"
    );
    let right = Request::get("/v1/models")
        .header(header::AUTHORIZATION, "Bearer sk-two")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send_json(&h.app, right).await.0, StatusCode::OK);
    let health = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(send_json(&h.app, health).await.0, StatusCode::OK);
}

#[tokio::test]
async fn while_loading_health_and_inference_are_503() {
    let (commands, _keep) = mpsc::channel(1);
    let (_state_tx, state_rx) = watch::channel(EngineState::Loading);
    let app = router(AppState::new(
        EngineHandle::new(commands, state_rx),
        api_config(&[]),
    ));
    let (status, body) =
        send_json(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["code"], "model_loading");
    let (status, body) = send_json(&app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&body)["type"], "unavailable_error");
}

#[tokio::test]
async fn streamed_chat_frames_follow_openai_and_match_the_unstreamed_text() {
    let h = harness();
    let mut request = chat("héllo 🦀");
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let (status, headers, body) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let frames = sse_data(&body);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..]
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, echoed("héllo 🦀"));
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(finish["usage"], Value::Null);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        echoed("héllo 🦀").len() as u64
    );
    // No chunk but the last carries usage; no text chunk carries a finish_reason.
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("héllo 🦀"))).await;
    assert_eq!(plain["choices"][0]["message"]["content"], text);
}

#[tokio::test]
async fn stop_strings_cut_streamed_and_unstreamed_text_alike() {
    let h = harness();
    let mut request = chat("one STOP two");
    request["stop"] = json!(["STOP", "never"]);
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(plain["choices"][0]["message"]["content"], "<|user|>one ");
    assert_eq!(plain["choices"][0]["finish_reason"], "stop");
    request["stream"] = json!(true);
    let (_, _, body) = send(&h.app, post("/v1/chat/completions", request)).await;
    let streamed: String = sse_data(&body)
        .iter()
        .filter(|f| *f != "[DONE]")
        .filter_map(|f| {
            serde_json::from_str::<Value>(f).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, "<|user|>one ");
}

#[tokio::test]
async fn max_tokens_ends_with_length() {
    let h = harness();
    let mut request = chat("abcdef");
    request["max_completion_tokens"] = json!(4);
    let (_, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(body["choices"][0]["message"]["content"], "<|us");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 4);
}

#[tokio::test]
async fn completions_take_strings_batches_and_tokens() {
    let h = harness();
    let (status, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "abc", "max_tokens": 10}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "abc");
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": ["ab", "xyz"], "max_tokens": 10}),
        ),
    )
    .await;
    let texts = choice_texts(&body);
    assert_eq!(texts, vec!["ab", "xyz"]);
    assert_eq!(body["usage"]["prompt_tokens"], 5);
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": [104, 105], "max_tokens": 10}),
        ),
    )
    .await;
    assert_eq!(body["choices"][0]["text"], "hi");
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "ab", "echo": true, "n": 2}),
        ),
    )
    .await;
    let texts = choice_texts(&body);
    assert_eq!(texts, vec!["abab", "abab"]);
    assert_eq!(
        body["usage"]["prompt_tokens"], 2,
        "the prompt counts once for n choices"
    );
    // Completions default to 16 tokens, as OpenAI's do.
    let (_, body) = send_json(
        &h.app,
        post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "x".repeat(40)}),
        ),
    )
    .await;
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streamed_completions_end_with_done() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": ["ab", "cd"], "stream": true, "max_tokens": 10});
    let (_, _, body) = send(&h.app, post("/v1/completions", request)).await;
    let frames = sse_data(&body);
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let mut texts = [String::new(), String::new()];
    let mut finished = 0;
    for frame in &frames[..frames.len() - 1] {
        let chunk: Value = serde_json::from_str(frame).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        let choice = &chunk["choices"][0];
        texts[choice["index"].as_u64().unwrap() as usize] += choice["text"].as_str().unwrap();
        finished += usize::from(choice["finish_reason"].is_string());
    }
    assert_eq!(texts, ["ab".to_string(), "cd".to_string()]);
    assert_eq!(finished, 2);
}

#[tokio::test]
async fn a_full_queue_is_429_with_retry_after() {
    let mut api = api_config(&[]);
    api.metrics = true;
    let h = harness_with_api(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 4096,
            max_queue: 1,
        },
        Duration::from_millis(20),
        api,
    );
    let long = chat(&"z".repeat(300));
    let spawn_send = |body: Value| {
        let app = h.app.clone();
        tokio::spawn(async move { send(&app, post("/v1/chat/completions", body)).await })
    };
    let running = spawn_send(long.clone());
    wait_for(&h.log, "the first request to start", |l| l.begun.len() == 1).await;
    let queued = spawn_send(long.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, headers, body) = send(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error_of(&body)["code"], "queue_full");
    // Counted as shed, and visible while the queue is full.
    let (_, _, text) = send(
        &h.app,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    let queue_full = [("reason", "queue_full")];
    assert_eq!(
        sample(&text, "lmsandbox_requests_shed_total", &queue_full),
        1.0
    );
    let model = [("model", MODEL)];
    assert_eq!(sample(&text, "llamacpp:requests_processing", &model), 1.0);
    assert_eq!(sample(&text, "llamacpp:requests_deferred", &model), 1.0);
    running.abort();
    queued.abort();
}

#[tokio::test]
async fn a_dropped_stream_cancels_its_sequence_and_a_queued_request_starts() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 64,
            n_ctx_seq: 4096,
            max_queue: 4,
        },
        Duration::from_millis(5),
        &[],
    );
    let mut request = chat(&"w".repeat(1000));
    request["stream"] = json!(true);
    let response = h
        .app
        .clone()
        .oneshot(post("/v1/chat/completions", request))
        .await
        .unwrap();
    let mut body = response.into_body();
    // Read a few frames, then hang up.
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    let queued = tokio::spawn({
        let app = h.app.clone();
        async move { send_json(&app, post("/v1/chat/completions", chat("next"))).await }
    });
    drop(body);
    wait_for(&h.log, "the dropped stream's sequence to end", |l| {
        l.ended.contains(&0)
    })
    .await;
    let (status, resp) = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp["choices"][0]["message"]["content"], echoed("next"));
    // The cancelled sequence decoded far fewer than its 1000+ tokens.
    let decoded_for_first: usize = h
        .log
        .lock()
        .unwrap()
        .batches
        .iter()
        .flatten()
        .filter(|e| e.pos > 1100)
        .count();
    assert_eq!(decoded_for_first, 0);
}

#[tokio::test]
async fn unsupported_features_are_refused_clearly_not_ignored() {
    let h = harness();
    for (field, value, param) in [
        ("top_logprobs", json!(3), "top_logprobs"),
        ("top_logprobs", json!(21), "top_logprobs"),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}),
            "response_format.json_schema.schema",
        ),
        (
            "response_format",
            json!({"type": "yaml"}),
            "response_format.type",
        ),
    ] {
        let mut request = chat("x");
        request[field] = value;
        let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
    let mut request = chat("x");
    request["response_format"] = json!({"type": "text"});
    assert_eq!(
        send_json(&h.app, post("/v1/chat/completions", request))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn content_parts_and_developer_messages_render() {
    let h = harness();
    let request = json!({"model": MODEL, "messages": [
        {"role": "developer", "content": "be nice"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ], "max_tokens": 100});
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "<|system|>be nice\n<|user|>a\nb\n<|assistant|>"
    );
}

#[tokio::test]
async fn a_repeated_prompt_reports_cached_tokens_in_usage_and_timings() {
    let h = harness_with(
        WorkerConfig {
            n_seq: 1,
            n_batch: 512,
            n_ctx_seq: 512,
            max_queue: 1,
        },
        Duration::ZERO,
        &[],
    );
    let (_, cold) = send_json(&h.app, post("/v1/chat/completions", chat("same"))).await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let (_, warm) = send_json(&h.app, post("/v1/chat/completions", chat("same"))).await;
    let prompt = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    // All of it: the cells, and the logits kept after its last token (nothing is decoded again).
    assert_eq!(
        warm["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt
    );
    assert_eq!(warm["timings"]["cache_n"], prompt);
    assert_eq!(warm["timings"]["prompt_n"], 0);
    assert_eq!(warm["timings"]["prompt_per_second"], 0.0);
    assert_eq!(cold["choices"][0]["message"], warm["choices"][0]["message"]);
}
