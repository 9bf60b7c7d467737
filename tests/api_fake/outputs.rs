//! What a request may ask of the output, against the fake engine: grammars, llama-server's token
//! routes, log-probabilities and embeddings.

use super::*;

#[tokio::test]
async fn a_grammar_the_engine_refuses_is_a_400_not_a_500() {
    let h = harness();
    let mut request = chat("x");
    request["grammar"] = json!(lm_sandbox::engine::fake::FAKE_INVALID_GRAMMAR);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["param"], "grammar");
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        sse.contains("\"param\":\"grammar\""),
        "an in-band error: {sse}"
    );
    request["stream"] = json!(false);
    request["response_format"] = json!({"type": "json_object"});
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "grammar");
}

#[tokio::test]
async fn a_grammar_that_cannot_work_is_a_400_before_any_stream() {
    let h = harness();
    for grammar in [
        r"root ::= [^\x00-\U0010FFFF]",
        r#"root ::= "a"{5,2}"#,
        "root ::= (",
    ] {
        for stream in [false, true] {
            let mut request = chat("x");
            request["grammar"] = json!(grammar);
            request["stream"] = json!(stream);
            let (status, body) = send_json(&h.app, post("/v1/chat/completions", request)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{grammar}: {body}");
            assert_eq!(error_of(&body)["param"], "grammar");
        }
    }
}

#[tokio::test]
async fn a_grammar_that_dead_ends_midway_ends_that_request_only() {
    let h = harness();
    let mut request = chat("hello there");
    request["grammar"] = json!(lm_sandbox::engine::fake::FAKE_DEAD_END_GRAMMAR);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["param"], "grammar");
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(sse.contains("\"param\":\"grammar\""), "in-band: {sse}");
    assert!(!sse.contains("[DONE]"), "{sse}");
    // The engine goes on.
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", chat("ok"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn tokenize_detokenize_apply_template_and_input_tokens_in_llama_servers_shapes() {
    let h = harness();
    let (status, body) = send_json(&h.app, post("/tokenize", json!({"content": "hé"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"tokens": [104, 195, 169]}));
    // Pieces: text when a token is whole UTF-8, its bytes when it is part of a character.
    let (_, body) = send_json(
        &h.app,
        post("/tokenize", json!({"content": "hé", "with_pieces": true})),
    )
    .await;
    assert_eq!(
        body,
        json!({"tokens": [{"id": 104, "piece": "h"}, {"id": 195, "piece": [195]},
                          {"id": 169, "piece": [169]}]})
    );
    let (_, body) = send_json(
        &h.app,
        post("/detokenize", json!({"tokens": [104, 195, 169]})),
    )
    .await;
    assert_eq!(body, json!({"content": "hé"}));
    let (status, body) =
        send_json(&h.app, post("/detokenize", json!({"tokens": [1, 99999]}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "tokens[1]");
    let (status, body) = send_json(
        &h.app,
        post("/tokenize", json!({"content": "x", "model": "nope"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The prompt a chat request renders to, and its length, without running it (no `model`
    // needed).
    let request = json!({"messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send_json(&h.app, post("/apply-template", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["prompt"], echoed("hi"));
    let (_, body) = send_json(
        &h.app,
        post("/v1/chat/completions/input_tokens", request.clone()),
    )
    .await;
    assert_eq!(body["object"], "chat.completion.input_tokens");
    assert_eq!(body["input_tokens"], echoed("hi").len());
    assert!(
        h.log.lock().unwrap().batches.is_empty(),
        "nothing was decoded"
    );
    let (status, body) = send_json(&h.app, post("/apply-template", json!({"messages": []}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&body)["param"], "messages");
}

#[tokio::test]
async fn chat_logprobs_stream_and_answer_alike_and_follow_the_distribution() {
    let h = harness();
    let mut request = chat("héllo");
    request["logprobs"] = json!(true);
    request["top_logprobs"] = json!(2);
    let (status, body) = send_json(&h.app, post("/v1/chat/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(choice["logprobs"]["refusal"], Value::Null);
    // One entry per generated token but EOS; their bytes are the message.
    let bytes: Vec<u8> = content
        .iter()
        .flat_map(|t| t["bytes"].as_array().unwrap().clone())
        .map(|b| b.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(String::from_utf8(bytes).unwrap(), echoed("héllo"));
    assert_eq!(
        content.len() as u64 + 1,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    // The fake's logits: the echoed token 2, the next byte 1, 255 others 0.
    let expected = 2.0 - (2f64.exp() + 1f64.exp() + 255.0).ln();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!((lp - expected).abs() < 1e-4, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert_eq!(
            top[0]["bytes"], t["bytes"],
            "the chosen token is the likeliest"
        );
        assert!(top[1]["logprob"].as_f64().unwrap() < lp);
    }
    // Streamed: the chunks' logprobs add up to the same list.
    request["stream"] = json!(true);
    let (status, _, sse) = send(&h.app, post("/v1/chat/completions", request)).await;
    assert_eq!(status, StatusCode::OK);
    let streamed: Vec<Value> = sse_chunks(&sse)
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&streamed, content);
    // Not asked for: null, and nothing computed.
    let (_, plain) = send_json(&h.app, post("/v1/chat/completions", chat("x"))).await;
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);
}

#[tokio::test]
async fn completion_logprobs_have_tokens_offsets_and_top_maps() {
    let h = harness();
    let request = json!({"model": MODEL, "prompt": "aé", "logprobs": 1, "max_tokens": 8});
    let (status, body) = send_json(&h.app, post("/v1/completions", request.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    // "a", then "é" split over two byte tokens.
    assert_eq!(lp["text_offset"], json!([0, 1, 2]));
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 1);
    assert_eq!(lp["tokens"][0], "a");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, _, sse) = send(&h.app, post("/v1/completions", streamed)).await;
    let offsets: Vec<Value> = sse_chunks(&sse)
        .iter()
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["text_offset"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(Value::Array(offsets), lp["text_offset"]);
    for (field, value, param) in [
        ("logprobs", json!(21), "logprobs"),
        ("echo", json!(true), "echo"),
    ] {
        let mut bad = request.clone();
        bad[field] = value;
        let (status, body) = send_json(&h.app, post("/v1/completions", bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
}

#[tokio::test]
async fn embeddings_take_every_input_shape_and_encode_floats_and_base64() {
    let h = harness();
    let body = json!({"model": MODEL, "input": ["abc", "abd", "abc"]});
    let (status, resp) = send_json(&h.app, post("/v1/embeddings", body)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["object"], "list");
    assert_eq!(resp["model"], MODEL);
    assert_eq!(resp["usage"]["prompt_tokens"], 9);
    let data = resp["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    let vector = |i: usize| -> Vec<f64> {
        data[i]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    assert_eq!(data[1]["index"], 1);
    assert_eq!(data[0]["object"], "embedding");
    let norm: f64 = vector(0).iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5, "L2-normalised: {norm}");
    assert_eq!(vector(0), vector(2));
    assert_ne!(vector(0), vector(1));
    // Token ids embed like the text they spell; base64 holds the same little-endian floats.
    let tokens = json!({"model": MODEL, "input": [[97, 98, 99]], "encoding_format": "base64", "dimensions": 4});
    let (status, resp) = send_json(&h.app, post("/v1/embeddings", tokens)).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(resp["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let floats: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(floats.len(), 4);
    let norm: f32 = floats.iter().map(|x| x * x).sum();
    assert!((norm - 1.0).abs() < 1e-5);
    let first4: Vec<f64> = vector(0)[..4].to_vec();
    let renorm: f64 = first4.iter().map(|x| x * x).sum::<f64>().sqrt();
    for (a, b) in floats.iter().zip(&first4) {
        assert!((f64::from(*a) - b / renorm).abs() < 1e-5);
    }
    for (input, extra, param, code) in [
        (json!([]), json!({}), "input", None),
        (json!(""), json!({}), "input", None),
        (json!(["a", 1]), json!({}), "input[1]", None),
        (json!([[1, 999]]), json!({}), "input[0][1]", None),
        (
            json!("x".repeat(600)),
            json!({}),
            "input",
            Some("context_length_exceeded"),
        ),
        (json!("x"), json!({"dimensions": 9}), "dimensions", None),
        (
            json!("x"),
            json!({"encoding_format": "int8"}),
            "encoding_format",
            None,
        ),
    ] {
        let mut body = json!({"model": MODEL, "input": input});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, resp) = send_json(&h.app, post("/v1/embeddings", body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{resp}");
        let error = error_of(&resp);
        assert_eq!(error["param"], param, "{resp}");
        if let Some(code) = code {
            assert_eq!(error["code"], code);
        }
    }
    let (status, _) = send_json(
        &h.app,
        post("/v1/embeddings", json!({"model": "nope", "input": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
