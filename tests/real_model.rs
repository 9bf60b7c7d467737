//! End to end on the real default model over real HTTP: greedy determinism, streamed equals
//! unstreamed, concurrency, cancellation, context overflow. Needs `--features real-model`.

#![cfg(feature = "real-model")]

mod common;

use std::time::{Duration, Instant};

use common::{start, MODEL_ID};
use futures::StreamExt;
use serde_json::{json, Value};

fn chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Reads an SSE response to the end: (text, finish_reason, saw [DONE]).
async fn read_stream(response: reqwest::Response) -> (String, Option<String>, bool) {
    let body = response.text().await.unwrap();
    let mut text = String::new();
    let mut finish = None;
    let mut done = false;
    for frame in body.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let data = frame.strip_prefix("data: ").expect("data frame");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        if let Some(choice) = chunk["choices"].get(0) {
            text += choice["delta"]["content"].as_str().unwrap_or("");
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
    }
    (text, finish, done)
}

#[tokio::test]
async fn greedy_output_is_identical_twice_and_streamed_matches_unstreamed() {
    let server = start(&["--parallel", "2"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let request = chat("Name three colors.", 40);
    let (status, first) = post(&client, &url, &request).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = post(&client, &url, &request).await;
    let text = first["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!text.is_empty());
    assert_eq!(
        text,
        second["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert!(first["usage"]["prompt_tokens"].as_u64().unwrap() > 5);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let response = client.post(&url).json(&streamed).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (stream_text, finish, done) = read_stream(response).await;
    assert_eq!(stream_text, text);
    assert_eq!(
        finish.as_deref(),
        first["choices"][0]["finish_reason"].as_str()
    );
    assert!(done);
}

#[tokio::test]
async fn the_same_seed_reproduces_a_sampled_completion() {
    let server = start(&["--parallel", "2"]).await;
    let url = format!("http://{}/v1/completions", server.addr);
    let client = reqwest::Client::new();
    let request = json!({"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 24,
        "temperature": 1.0, "top_p": 0.95, "top_k": 40, "seed": 1234, "frequency_penalty": 0.5});
    let (status, a) = post(&client, &url, &request).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = post(&client, &url, &request).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[tokio::test]
async fn eight_concurrent_streams_all_finish() {
    let server = start(&["--parallel", "8", "-c", "8192"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            let mut request = chat(&format!("Count from {i} upwards."), 32);
            request["stream"] = json!(true);
            tokio::spawn(async move {
                let response = client.post(&url).json(&request).send().await.unwrap();
                assert_eq!(response.status(), 200);
                read_stream(response).await
            })
        })
        .collect();
    for task in tasks {
        let (text, finish, done) = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .unwrap()
            .unwrap();
        assert!(!text.is_empty());
        assert!(
            matches!(finish.as_deref(), Some("stop" | "length")),
            "{finish:?}"
        );
        assert!(done);
    }
}

#[tokio::test]
async fn a_dropped_stream_frees_its_slot_for_a_queued_request() {
    let server = start(&["--parallel", "1"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    // A long generation holds the only slot.
    let mut long = chat("Write a very long story about the sea.", 1000);
    long["stream"] = json!(true);
    // EOS banned: left alone, this request would hold the slot for all 1000 tokens (10 s or more).
    long["logit_bias"] = json!({"0": -100, "2": -100});
    let response = client.post(&url).json(&long).send().await.unwrap();
    let mut bytes = response.bytes_stream();
    bytes.next().await.unwrap().unwrap();
    bytes.next().await.unwrap().unwrap();
    // A second request queues behind it, then the first client hangs up.
    let queued = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move {
            let started = Instant::now();
            let result = post(&client, &url, &chat("Say hi.", 8)).await;
            (result, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(bytes);
    let ((status, body), waited) = tokio::time::timeout(Duration::from_secs(30), queued)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{body}");
    // 1000 tokens at ~100 tok/s would take 10 s or more; the cancelled stream must not have run on.
    assert!(
        waited < Duration::from_secs(8),
        "queued request waited {waited:?}"
    );
}

#[tokio::test]
async fn a_context_overflow_is_a_400_before_any_stream_byte() {
    let server = start(&["--parallel", "2", "-c", "512"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let long = "word ".repeat(400);
    let (status, body) = post(&client, &url, &chat(&long, 10)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let mut request = chat("hi", 300);
    request["stream"] = json!(true);
    let response = client.post(&url).json(&request).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn stop_strings_and_n_predict_apply_to_the_real_model() {
    let server = start(&["--parallel", "2", "--n-predict", "5"]).await;
    let url = format!("http://{}/v1/completions", server.addr);
    let client = reqwest::Client::new();
    let (_, capped) = post(
        &client,
        &url,
        &json!({"model": MODEL_ID, "prompt": "1, 2, 3,", "max_tokens": 50, "temperature": 0}),
    )
    .await;
    assert_eq!(capped["usage"]["completion_tokens"], 5);
    assert_eq!(capped["choices"][0]["finish_reason"], "length");
    let (_, stopped) = post(
        &client,
        &url,
        &json!({"model": MODEL_ID, "prompt": "1, 2, 3, 4,", "temperature": 0, "stop": [","]}),
    )
    .await;
    let text = stopped["choices"][0]["text"].as_str().unwrap();
    assert!(!text.contains(','), "{text:?}");
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn graceful_shutdown_lets_an_in_flight_request_finish() {
    let server = start(&["--parallel", "1"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = url.clone();
        async move { post(&client, &url, &chat("Tell me about cats.", 48)).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let addr = server.addr;
    assert!(
        server.shutdown(Duration::from_secs(30)).await,
        "in-flight work finished within the bound"
    );
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn a_client_that_gives_up_on_a_non_streamed_request_frees_its_slot() {
    let server = start(&["--parallel", "1"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(400))
        .build()
        .unwrap();
    let mut long = chat("Write a very long story about the sea.", 1000);
    long["logit_bias"] = json!({"0": -100, "2": -100});
    assert!(
        impatient.post(&url).json(&long).send().await.is_err(),
        "the client times out"
    );
    let started = Instant::now();
    let (status, body) = post(&reqwest::Client::new(), &url, &chat("Say hi.", 8)).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the abandoned request kept the slot for {:?}",
        started.elapsed()
    );
}

/// The real binary: SIGTERM stops accepting, lets the in-flight request finish, and exits 0.
#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args([
            "serve",
            "-t",
            "2",
            "--parallel",
            "1",
            // Under CI load (every test of this file at once on two cores) the drained request
            // can outlast the default 30 s grace; the drain, not its speed, is tested here.
            "--shutdown-timeout",
            "300",
            "--port",
            &port.to_string(),
            "-m",
        ])
        .arg(common::model_path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "server never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut request = chat("Tell me about dogs.", 64);
    request["logit_bias"] = json!({"0": -100, "2": -100});
    let in_flight = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/v1/chat/completions");
        async move { post(&client, &url, &request).await }
    });
    // SIGTERM once the request is in flight (a connection whose request has not arrived yet is
    // closed by a graceful shutdown, as in any HTTP server).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health: Value = client
            .get(format!("{base}/health"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if health["requests"]["in_flight"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request never arrived: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["usage"]["completion_tokens"], 64,
        "the request ran to its end"
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_repeated_prompt_is_served_from_the_cache_with_the_same_greedy_output() {
    let server = start(&["--parallel", "1"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let request = chat("List the planets of the solar system.", 32);
    let (_, cold) = post(&client, &url, &request).await;
    let (_, warm) = post(&client, &url, &request).await;
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    // The whole prompt: its cells, and the logits kept after its last token, so the first
    // token is sampled without a decode.
    assert_eq!(
        cached,
        warm["usage"]["prompt_tokens"].as_u64().unwrap(),
        "{warm}"
    );
    assert_eq!(
        cold["choices"][0]["message"]["content"],
        warm["choices"][0]["message"]["content"]
    );

    // The conversation re-sent with one more turn prefills only the new part.
    let answer = cold["choices"][0]["message"]["content"].as_str().unwrap();
    let follow_up = json!({
        "model": MODEL_ID, "temperature": 0, "max_tokens": 8,
        "messages": [
            {"role": "user", "content": "List the planets of the solar system."},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Which one is largest?"}
        ]
    });
    let (_, next) = post(&client, &url, &follow_up).await;
    let cached = next["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let earlier = cold["usage"]["total_tokens"].as_u64().unwrap();
    // Everything of the first exchange is reused but the answer's last token (sampled, never
    // decoded) and at most one token where the answer meets the template's closing markup.
    assert!(
        cached + 2 >= earlier,
        "the first exchange ({earlier} tokens) should be reused; {cached} were: {next}"
    );
}

const LIBRARY_DESK: &str = "You are the reference desk of a small public library. Answer in one \
    short sentence, name your source when you have one, never invent a title or an author, and say \
    so plainly when you do not know. Patrons ask about opening hours, the catalogue, local history \
    and how to use the reading room computers; keep a friendly, even tone, avoid jargon, and \
    suggest a librarian at the desk for anything about accounts or fines.";

#[tokio::test]
async fn a_system_prompt_shared_by_concurrent_conversations_is_copied_not_recomputed() {
    // 1,024 positions per sequence; the donor holds ~110 cells, so they are copied through a
    // serialized state (fewer bytes than its whole KV stream).
    copied_system_prompt_gives_computed_logprobs(LIBRARY_DESK, &[]).await;
}

#[tokio::test]
async fn a_system_prompt_copied_as_a_whole_kv_stream_gives_the_computed_logprobs() {
    // 256 positions per sequence and a system prompt twice as long: the donor's ~200 cells
    // serialized (read, then written) would move more bytes than its whole stream, so the stream
    // is copied.
    let system = format!("{LIBRARY_DESK}\n\n{LIBRARY_DESK}");
    copied_system_prompt_gives_computed_logprobs(&system, &["--ctx-size", "1024"]).await;
}

/// Four conversations sharing `system` at once on a server started with `extra` (and
/// `--parallel 4`): three copy the first's cells, and each first token's distribution matches
/// the one computed from scratch.
async fn copied_system_prompt_gives_computed_logprobs(system: &str, extra: &[&str]) {
    let questions = [
        "When does the library open on Saturdays?",
        "Can I print from the reading room?",
        "Who founded the town?",
        "How do I renew a book?",
    ];
    let request = |question: &str| {
        json!({
            "model": MODEL_ID, "temperature": 0, "max_tokens": 24,
            "logprobs": true, "top_logprobs": 5,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": question}
            ]
        })
    };
    let client = reqwest::Client::new();
    // All at once: the first computes the system prompt's cells, the others copy them.
    let server = start(&[&["--parallel", "4"], extra].concat()).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let together = futures::future::join_all(
        questions
            .iter()
            .map(|q| async { post(&client, &url, &request(q)).await }),
    )
    .await;
    drop(server);
    // One at a time on one sequence: each reuses the cells it computed itself.
    let server = start(&["--parallel", "1"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let mut copied = 0;
    for ((status, shared), question) in together.iter().zip(questions) {
        assert_eq!(*status, 200, "{shared}");
        let (_, alone) = post(&client, &url, &request(question)).await;
        // Copied cells give the distribution computed ones give, compared on the first token.
        // Not on the greedy text: batched with other sequences the same cells round a little
        // differently from a decode alone, enough to flip a near tie (seen: "The" -2.54 and "We"
        // -2.60 alone, "We" first batched) and part the answers from there. Cells not copied
        // give another distribution (seen: one token of the top 5 in common, 0.35 apart); batch
        // shapes alone moved an unlikely token by up to 0.16 (seen: "Our" -3.20 against -3.36).
        let top = |answer: &Value| -> Vec<(String, f64)> {
            answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap().to_owned(),
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect()
        };
        let computed_top = top(&alone);
        let both: Vec<(String, f64, f64)> = top(shared)
            .into_iter()
            .filter_map(|(token, copied)| {
                let (_, computed) = computed_top.iter().find(|(t, _)| *t == token)?;
                Some((token, copied, *computed))
            })
            .collect();
        assert!(
            both.len() >= 3,
            "{question}: the top 5 first tokens differ: {:?} from copied cells, {computed_top:?} computed",
            top(shared)
        );
        for (token, copied, computed) in both {
            assert!(
                (copied - computed).abs() < 0.3,
                "{question}: {token:?} has logprob {copied} from copied cells, {computed} computed"
            );
        }
        let cached = shared["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
        if cached >= 64 {
            copied += 1;
        }
    }
    assert_eq!(
        copied, 3,
        "three conversations copied the system prompt: {together:?}"
    );
}

#[tokio::test]
async fn a_burst_beyond_capacity_gets_responses_or_429s_and_the_server_recovers() {
    // 2 sequences + 2 queued = 4 in flight at most; a burst of 16 (4x) concurrent requests.
    let server = start(&["--parallel", "2", "--max-queue", "2"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let url = url.clone();
            let request = chat(&format!("Say the number {i}."), 16);
            tokio::spawn(async move {
                let response = client.post(&url).json(&request).send().await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").cloned();
                let body: Value = response.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for task in tasks {
        let (status, retry_after, body) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("no request hangs")
            .unwrap();
        match status {
            200 => {
                assert!(body["choices"][0]["finish_reason"].is_string(), "{body}");
                ok += 1;
            }
            429 => {
                assert!(retry_after.is_some());
                assert_eq!(body["error"]["code"], "queue_full");
                busy += 1;
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert_eq!(ok + busy, 16, "none lost");
    // Requests count against the queue until the engine takes them into a sequence, so a burst that
    // lands before the engine wakes can find only the queue's 2 places.
    assert!(ok >= 2, "at least the queue's worth was served: {ok}");
    assert!(
        busy >= 1,
        "the burst exceeded capacity, so some were refused"
    );
    let (status, _) = post(&client, &url, &chat("Still there?", 4)).await;
    assert_eq!(status, 200, "the server keeps serving afterwards");
}

#[tokio::test]
async fn the_placement_plan_and_live_gpus_are_served() {
    let server = start(&["--parallel", "1"]).await;
    let body: Value = reqwest::get(format!("http://{}/v1/placement", server.addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["model"]["n_layer"], 30);
    assert_eq!(body["model"]["architecture"], "llama");
    // This machine has no GPU (and this build no CUDA): every layer stays on the CPU, and says why.
    assert_eq!(body["plan"]["n_gpu_layers"], 0);
    assert_eq!(body["plan"]["cpu_layers"], 30);
    assert!(
        !body["plan"]["reasons"].as_array().unwrap().is_empty(),
        "{body}"
    );
    assert!(body["gpus"]["ram_available"].as_u64().unwrap() > 0);
    assert_eq!(
        body["measured"],
        serde_json::json!([]),
        "no GPU, nothing measured"
    );
}

#[test]
fn a_plan_that_cannot_fit_stops_the_server_before_loading_with_the_numbers() {
    use lm_sandbox::gpu::inventory::Inventory;
    use lm_sandbox::gpu::placement::{decide, PlacementError};
    use lm_sandbox::gpu::plan::{PlanConfig, PlanError, Policy};
    let starved = Inventory {
        gpus: Vec::new(),
        ram_available: 10 * 1024 * 1024,
        driver_version: None,
        unavailable: Some("test: no GPUs".into()),
    };
    let request = PlanConfig {
        policy: Policy::Proportional,
        ..PlanConfig::default()
    };
    match decide(&common::model_path(), 8192, 1, &request, &starved) {
        Err(PlacementError::Plan(PlanError::DoesNotFit(message))) => {
            assert!(
                message.contains("GiB") && message.contains("8192"),
                "{message}"
            );
        }
        other => panic!("expected DoesNotFit, got {other:?}"),
    }
}

#[tokio::test]
async fn tokenize_round_trips_and_input_tokens_match_a_real_request() {
    let server = start(&["--parallel", "1"]).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let text = "Hello world! Ünïcödé, 数字 123, emoji 🦀 and\ttabs";
    let (status, body) = post(
        &client,
        &format!("{base}/tokenize"),
        &json!({"content": text}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let tokens = body["tokens"].as_array().unwrap().clone();
    assert!(tokens.len() > 5);
    let (_, back) = post(
        &client,
        &format!("{base}/detokenize"),
        &json!({"tokens": tokens}),
    )
    .await;
    assert_eq!(back["content"], text);
    // ChatML's control tokens are single tokens, rendered back as text.
    let (_, body) = post(
        &client,
        &format!("{base}/tokenize"),
        &json!({"content": "<|im_start|>user", "with_pieces": true}),
    )
    .await;
    assert_eq!(body["tokens"][0]["piece"], "<|im_start|>", "{body}");
    // The count of a chat request without running it equals what running it reports.
    let request = chat("What is the capital of France?", 1);
    let (_, counted) = post(
        &client,
        &format!("{base}/v1/chat/completions/input_tokens"),
        &request,
    )
    .await;
    let (_, ran) = post(&client, &format!("{base}/v1/chat/completions"), &request).await;
    assert_eq!(
        counted["input_tokens"], ran["usage"]["prompt_tokens"],
        "{counted} {ran}"
    );
    let (_, rendered) = post(&client, &format!("{base}/apply-template"), &request).await;
    let prompt = rendered["prompt"].as_str().unwrap();
    assert!(
        prompt.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>")
            && prompt.ends_with("<|im_start|>assistant\n"),
        "{prompt}"
    );
}

/// The chat `logprobs.content` entries of a response, streamed or not.
async fn logprob_entries(client: &reqwest::Client, url: &str, request: &Value) -> Vec<Value> {
    let response = client.post(url).json(request).send().await.unwrap();
    assert_eq!(response.status(), 200);
    if request["stream"] != json!(true) {
        let body: Value = response.json().await.unwrap();
        return body["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .clone();
    }
    let body = response.text().await.unwrap();
    body.split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .flat_map(|d| {
            let chunk: Value = serde_json::from_str(d).unwrap();
            chunk["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn logprobs_of_greedy_and_forced_answers_agree_streamed_and_not() {
    let server = start(&["--parallel", "2"]).await;
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let client = reqwest::Client::new();
    let mut greedy = chat("What is the capital of France?", 12);
    greedy["logprobs"] = json!(true);
    greedy["top_logprobs"] = json!(5);
    let entries = logprob_entries(&client, &url, &greedy).await;
    assert!(!entries.is_empty());
    for entry in &entries {
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        // Greedy: the chosen token is the likeliest.
        assert_eq!(top[0]["bytes"], entry["bytes"], "{entry}");
        assert!(
            (top[0]["logprob"].as_f64().unwrap() - entry["logprob"].as_f64().unwrap()).abs() < 1e-6
        );
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
    }

    // A forced answer: the grammar fixes the text; the log-probabilities are the model's own.
    let mut forced = greedy.clone();
    forced["grammar"] = json!(r#"root ::= "The capital of France is Paris.""#);
    forced["max_tokens"] = json!(32);
    let plain = logprob_entries(&client, &url, &forced).await;
    forced["stream"] = json!(true);
    let streamed = logprob_entries(&client, &url, &forced).await;
    let text: String = plain.iter().map(|e| e["token"].as_str().unwrap()).collect();
    assert_eq!(text, "The capital of France is Paris.");
    let sum =
        |entries: &[Value]| -> f64 { entries.iter().map(|e| e["logprob"].as_f64().unwrap()).sum() };
    assert_eq!(plain.len(), streamed.len());
    assert!(
        (sum(&plain) - sum(&streamed)).abs() < 1e-3,
        "{} vs {}",
        sum(&plain),
        sum(&streamed)
    );
    assert!(sum(&plain) < 0.0);
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[tokio::test]
async fn embeddings_rank_paraphrases_above_unrelated_sentences() {
    let server = start(&["--parallel", "2"]).await;
    let url = format!("http://{}/v1/embeddings", server.addr);
    let client = reqwest::Client::new();
    let sentences = [
        "The cat sat on the mat.",
        "A cat was sitting on the rug.",
        "Quarterly revenue grew by twelve percent.",
        "The stock market fell sharply on Monday.",
    ];
    let (status, body) = post(
        &client,
        &url,
        &json!({"model": MODEL_ID, "input": sentences}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let vectors: Vec<Vec<f64>> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vectors.len(), 4);
    assert_eq!(vectors[0].len(), 576, "SmolLM2-135M's width");
    let paraphrase = cosine(&vectors[0], &vectors[1]);
    for unrelated in [2, 3] {
        assert!(
            paraphrase > cosine(&vectors[0], &vectors[unrelated]),
            "paraphrase {paraphrase} vs unrelated {}",
            cosine(&vectors[0], &vectors[unrelated])
        );
    }
    // Packed or alone, an input embeds the same.
    let (_, alone) = post(
        &client,
        &url,
        &json!({"model": MODEL_ID, "input": sentences[1]}),
    )
    .await;
    let single: Vec<f64> = alone["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(cosine(&single, &vectors[1]) > 0.9999);
    // usage counts the tokens embedded: each sentence as /tokenize counts it.
    let mut expected = 0;
    for sentence in sentences {
        let (_, t) = post(
            &client,
            &format!("http://{}/tokenize", server.addr),
            &json!({"content": sentence, "add_special": true}),
        )
        .await;
        expected += t["tokens"].as_array().unwrap().len() as u64;
    }
    assert_eq!(body["usage"]["prompt_tokens"].as_u64().unwrap(), expected);
    // Over the embedding context: a 400, never silent truncation.
    let long = "word ".repeat(5000);
    let (status, body) = post(&client, &url, &json!({"model": MODEL_ID, "input": long})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    // Chat still works beside the embedding context.
    let (status, _) = post(
        &client,
        &format!("http://{}/v1/chat/completions", server.addr),
        &chat("Hi", 4),
    )
    .await;
    assert_eq!(status, 200);
}

#[test]
fn the_default_models_tokenizer_matches_hugging_faces() {
    use lm_sandbox::fidelity::{compare, from_gguf, reference_tokenizer, CORPUS};
    let path = common::model_path();
    let llama = lm_sandbox::engine::load_vocabulary(&path).unwrap();
    let (reference, source) = reference_tokenizer(&path).unwrap();
    let report = compare(&llama, &reference, source, CORPUS).unwrap();
    assert!(report.tokens > 300);
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    // The check has teeth: the same vocabulary under Llama 3's pre-tokenizer (newline runs split
    // off whitespace, a punctuation mark joined to the word after it) differs on whitespace and
    // code. (GPT-2's rules would not: this vocabulary has no multi-digit tokens, so grouping
    // digits before BPE changes nothing.)
    let mut header = lm_sandbox::gpu::gguf::read_header_with_arrays(&path).unwrap();
    header.metadata.insert(
        "tokenizer.ggml.pre".into(),
        lm_sandbox::gpu::gguf::MetaValue::Str("llama3".into()),
    );
    let (wrong, source) = from_gguf(&header).unwrap();
    let report = compare(&llama, &wrong, source, CORPUS).unwrap();
    assert!(
        report.mismatches.iter().any(|m| m.text.starts_with("tabs")),
        "{:#?}",
        report.mismatches
    );
    // The command says the same, with its exit status.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args(["model", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains(": 0 mismatch(es)"), "{stdout}");
}

#[test]
fn a_tokenizer_json_beside_the_gguf_is_the_reference() {
    use lm_sandbox::fidelity::{compare, from_gguf, reference_tokenizer, Reference, CORPUS};
    let path = common::model_path();
    let dir = std::env::temp_dir().join(format!("lmsbx-tokjson-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let linked = dir.join("model.gguf");
    let _ = std::fs::remove_file(&linked);
    std::os::unix::fs::symlink(&path, &linked).unwrap();
    // A tokenizer.json written from the GGUF's own tables: the check must pick it up.
    let header = lm_sandbox::gpu::gguf::read_header_with_arrays(&path).unwrap();
    let (built, _) = from_gguf(&header).unwrap();
    let json = dir.join("tokenizer.json");
    built.save(&json, false).unwrap();
    let (reference, source) = reference_tokenizer(&linked).unwrap();
    assert_eq!(source, Reference::TokenizerJson(json));
    let llama = lm_sandbox::engine::load_vocabulary(&linked).unwrap();
    let report = compare(&llama, &reference, source, CORPUS).unwrap();
    assert!(report.mismatches.is_empty(), "{:#?}", report.mismatches);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn lmstudio_v0_answers_carry_stats_streamed_and_not() {
    let server = start(&["--parallel", "2"]).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let (status, list) = {
        let r = client
            .get(format!("{base}/api/v0/models"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    assert_eq!(list["data"][0]["id"], MODEL_ID);
    assert_eq!(list["data"][0]["arch"], "llama");
    assert_eq!(list["data"][0]["quantization"], "Q4_1");
    assert_eq!(list["data"][0]["max_context_length"], 8192);
    let request = chat("Name a color.", 8);
    let (status, answer) = post(
        &client,
        &format!("{base}/api/v0/chat/completions"),
        &request,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let stats = &answer["stats"];
    assert!(
        stats["tokens_per_second"].as_f64().unwrap() > 0.0,
        "{stats}"
    );
    assert!(stats["time_to_first_token"].as_f64().unwrap() > 0.0);
    assert!(matches!(
        stats["stop_reason"].as_str(),
        Some("eosFound" | "maxPredictedTokensReached")
    ));
    assert_eq!(answer["model_info"]["quant"], "Q4_1");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let response = client
        .post(format!("{base}/api/v0/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let body = response.text().await.unwrap();
    let finals: Vec<Value> = body
        .split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|c| c.get("stats").is_some())
        .collect();
    assert_eq!(finals.len(), 1, "{body}");
    assert_eq!(finals[0]["stats"]["stop_reason"], stats["stop_reason"]);
    // REST v1 chat, with a thread.
    let v1 = json!({"model": MODEL_ID, "input": "Name a color.", "max_output_tokens": 4, "temperature": 0});
    let (status, answer) = post(&client, &format!("{base}/api/v1/chat"), &v1).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["output"][0]["type"], "message");
    assert_eq!(answer["stats"]["total_output_tokens"], 4);
    let thread = answer["thread_id"].as_str().unwrap();
    let next = json!({"model": MODEL_ID, "input": "Another.", "max_output_tokens": 4, "thread_id": thread});
    let (status, again) = post(&client, &format!("{base}/api/v1/chat"), &next).await;
    assert_eq!(status, 200, "{again}");
    assert!(
        again["stats"]["input_tokens"].as_u64() > answer["stats"]["input_tokens"].as_u64(),
        "the thread's history is in the prompt"
    );
}

#[tokio::test]
async fn a_large_embedding_job_does_not_stall_a_chat() {
    let server = start(&["--parallel", "2"]).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let big = json!({"model": MODEL_ID, "input": vec!["word ".repeat(200); 24]});
    let job = {
        let client = client.clone();
        let url = format!("{base}/v1/embeddings");
        tokio::spawn(async move {
            let started = Instant::now();
            let (status, body) = post(&client, &url, &big).await;
            assert_eq!(status, 200, "{body}");
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (status, _) = post(
        &client,
        &format!("{base}/v1/chat/completions"),
        &chat("Hi", 8),
    )
    .await;
    assert_eq!(status, 200);
    let chat_took = started.elapsed();
    let job_took = job.await.unwrap();
    // The job runs one short decode at a time, interleaved with generation: the chat waits for
    // one of them, not for the whole job.
    assert!(
        chat_took * 3 < job_took,
        "chat {chat_took:?} during an embedding job of {job_took:?}"
    );
}

#[test]
fn models_lists_the_default_model_from_a_folder_an_ollama_store_and_lm_studios_folder() {
    let model = common::model_path();
    let root = std::env::temp_dir().join(format!("lmsbx-stores-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let link = |to: &std::path::Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&model, to).unwrap();
    };
    // A folder, LM Studio's layout, and an Ollama store whose blob is named by its digest.
    link(&root.join("dir/smol.gguf"));
    link(
        &root.join("lms/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q4_1.gguf"),
    );
    let sha = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
    link(&root.join(format!("ollama/blobs/sha256-{sha}")));
    let manifest = json!({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": format!("sha256:{sha}")}]});
    let manifest_path = root.join("ollama/manifests/registry.ollama.ai/library/smollm2/135m");
    std::fs::create_dir_all(manifest_path.parent().unwrap()).unwrap();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
        .args(["models", "--json", "--models-dir"])
        .arg(root.join("dir"))
        .arg("--ollama-models")
        .arg(root.join("ollama"))
        .arg("--lmstudio-models")
        .arg(root.join("lms"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "smol",
            "smollm2:135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
        ]
    );
    assert!(rows
        .iter()
        .all(|r| r["architecture"] == "llama" && r["n_ctx_train"] == 8192));
    assert!(rows.iter().all(|r| r["quantization"] == "Q4_1"
        && r["template"] == "chatml"
        && r["tools"] == false
        && (130_000_000..140_000_000).contains(&r["parameters"].as_u64().unwrap())));
    assert_eq!(rows[1]["source"], "ollama");
    assert_eq!(rows[1]["digest"], format!("sha256:{sha}"));
    // The blob is what its manifest says.
    let blob = root.join(format!("ollama/blobs/sha256-{sha}"));
    lm_sandbox::store::verify_digest(&blob, &format!("sha256:{sha}"), |_, _| {}).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}
