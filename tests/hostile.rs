//! Hostile requests against the real binary on the default model: generated and mutated GBNF
//! grammars and JSON schemas (seeded), grammars with no admissible token at the start and midway,
//! an all-banning `logit_bias`, huge stop lists, impossible `n`, a corrupt model file. After each
//! the process is alive, the answer is 200 or 400 (or an in-band error once a stream began), and a
//! normal request still succeeds.
#![cfg(feature = "real-model")]

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MODEL_ID: &str = "SmolLM2-135M-Instruct.Q4_1";

fn model() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    .to_owned()
}

struct Server {
    child: tokio::process::Child,
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
            .args(["serve", "-m", &model(), "--port", &port.to_string()])
            .args(["--parallel", "4", "-t", "2", "--max-queue", "16"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            assert!(Instant::now() < deadline, "the server did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Self {
            child,
            base,
            client: reqwest::Client::new(),
        }
    }

    /// Sends a chat request with `extra` fields; returns the status and the body (SSE as text).
    async fn chat(&self, extra: Value) -> (u16, String) {
        let mut body = json!({
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": 8,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let response = self
            .client
            .post(format!("{}/v1/chat/completions", self.base))
            .json(&body)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap_or_else(|e| panic!("no answer to {body}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the server process died"
        );
    }

    async fn assert_serves(&mut self) {
        self.assert_alive();
        let (status, body) = self.chat(json!({})).await;
        assert_eq!(status, 200, "a normal request after hostile ones: {body}");
    }
}

/// A 200, or a 400 naming the field; a stream may end in one in-band error.
fn assert_handled(status: u16, body: &str, what: &str) {
    match status {
        200 => {
            if body.starts_with("data:") {
                let events: Vec<&str> = body.lines().filter(|l| l.starts_with("data:")).collect();
                let last = events.last().copied().unwrap_or("");
                assert!(
                    last == "data: [DONE]" || last.contains("\"error\""),
                    "{what}: a stream that neither finished nor failed in-band: {body}"
                );
                if last.contains("\"error\"") {
                    assert!(last.contains("invalid_request_error"), "{what}: {last}");
                }
            }
        }
        400 => {
            let error: Value = serde_json::from_str(body).unwrap();
            assert!(error["error"]["param"].is_string(), "{what}: {body}");
        }
        other => panic!("{what}: status {other}: {body}"),
    }
}

/// A random grammar over the GBNF constructs: half of them tame (they should run), half wild
/// (empty classes, NUL, undefined rules, bad repetitions, token refs, byte mutations).
fn grammar(rng: &mut StdRng) -> String {
    fn item(rng: &mut StdRng, depth: u32, wild: bool) -> String {
        let atom = if !wild {
            match rng.gen_range(0..if depth > 1 { 3 } else { 4 }) {
                0 => ["\"a\"", "\"yes\"", "\" \"", "\"é\""][rng.gen_range(0..4)].to_owned(),
                1 => ["[a-z]", "[0-9]", "[^\"]"][rng.gen_range(0..3)].to_owned(),
                2 => "ws".to_owned(),
                _ => format!("( {} )", alternatives(rng, depth + 1, wild)),
            }
        } else {
            match rng.gen_range(0..if depth > 2 { 5 } else { 7 }) {
                0 => format!(
                    "\"{}\"",
                    ["a", "\\n", "\\x00", "é", ""][rng.gen_range(0..5)]
                ),
                1 => ["[^a]", r"[^\x00-\U0010FFFF]", "[z-a]", "."][rng.gen_range(0..4)].to_owned(),
                2 => ["<[0]>", "!<[1]>", "<[99999999]>"][rng.gen_range(0..3)].to_owned(),
                3 => ["r1", "root", "missing"][rng.gen_range(0..3)].to_owned(),
                4 => "ws".to_owned(),
                _ => format!("( {} )", alternatives(rng, depth + 1, wild)),
            }
        };
        let rep = match rng.gen_range(0..10) {
            0 => "*".to_owned(),
            1 => "+".to_owned(),
            2 => "?".to_owned(),
            3 if wild => {
                let (a, b) = (rng.gen_range(0..5u32), rng.gen_range(0..5u32));
                format!("{{{a},{b}}}")
            }
            4 if wild => format!("{{{}}}", [3u32, 2000, 2001, 70000][rng.gen_range(0..4)]),
            3 | 4 => format!("{{1,{}}}", rng.gen_range(1..4u32)),
            _ => String::new(),
        };
        format!("{atom}{rep}")
    }
    fn alternatives(rng: &mut StdRng, depth: u32, wild: bool) -> String {
        (0..rng.gen_range(1..3))
            .map(|_| {
                (0..rng.gen_range(1..4))
                    .map(|_| item(rng, depth, wild))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
    let wild = rng.gen_bool(0.5);
    let mut text = format!(
        "root ::= {}\nr1 ::= {}\nws ::= [ ]?\n",
        alternatives(rng, 0, wild),
        alternatives(rng, 0, wild),
    );
    if wild && rng.gen_bool(0.5) {
        // A byte-level mutation on top.
        let mut bytes = text.into_bytes();
        let at = rng.gen_range(0..bytes.len());
        bytes[at] = b"()[]{}|*\"\\<>"[rng.gen_range(0..12)];
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    text
}

/// A random schema from the supported keywords, with contradictory or huge bounds at times.
fn schema(rng: &mut StdRng, depth: u32) -> Value {
    let bound = |rng: &mut StdRng| json!([0u64, 1, 2, 5, 2001, 1 << 40][rng.gen_range(0..6)]);
    match rng.gen_range(0..if depth > 2 { 3 } else { 6 }) {
        0 => json!({"type": "string", "minLength": bound(rng), "maxLength": bound(rng)}),
        1 => json!({"type": ["integer", "boolean"]}),
        2 => json!({"enum": ["x", 2, null]}),
        3 => json!({"type": "array", "items": schema(rng, depth + 1),
                    "minItems": bound(rng), "maxItems": bound(rng)}),
        4 => {
            let props: serde_json::Map<String, Value> = (0..rng.gen_range(1..4))
                .map(|i| (format!("p{i}"), schema(rng, depth + 1)))
                .collect();
            json!({"type": "object", "properties": props, "required": ["p0"],
                   "additionalProperties": false})
        }
        _ => json!({"anyOf": [schema(rng, depth + 1), schema(rng, depth + 1)]}),
    }
}

#[tokio::test]
async fn hostile_requests_never_take_the_server_down() {
    let mut server = Server::start().await;
    let mut rng = StdRng::seed_from_u64(2026);

    // Grammars: 200 generated ones, four at a time, streamed and not.
    let cases: Vec<(String, bool)> = (0..200).map(|i| (grammar(&mut rng), i % 3 == 0)).collect();
    let server_ref = &server;
    let results: Vec<_> = futures::stream::iter(cases)
        .map(|(g, stream)| async move {
            let (status, body) = server_ref
                .chat(json!({"grammar": g, "stream": stream}))
                .await;
            (g, status, body)
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut ok = 0;
    for (g, status, body) in &results {
        assert_handled(*status, body, g);
        ok += usize::from(*status == 200);
    }
    assert!(ok > 30, "only {ok} of 200 generated grammars ran at all");
    server.assert_serves().await;

    // Schemas: 100 generated ones.
    let schemas: Vec<Value> = (0..100).map(|_| schema(&mut rng, 0)).collect();
    let server_ref = &server;
    let results: Vec<_> = futures::stream::iter(schemas)
        .map(|s| async move {
            let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s}});
            let (status, body) = server_ref.chat(json!({"response_format": format})).await;
            (format, status, body)
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for (format, status, body) in &results {
        assert_handled(*status, body, &format.to_string());
    }
    server.assert_serves().await;

    // The two reports that started this: an empty character class, contradictory bounds.
    let (status, body) = server
        .chat(json!({"grammar": r"root ::= [^\x00-\U0010FFFF]"}))
        .await;
    assert_eq!(status, 400, "{body}");
    let format = json!({"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "array", "minItems": 5, "maxItems": 2}}});
    let (status, body) = server.chat(json!({"response_format": format})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("response_format"), "{body}");

    // No admissible token at the start (token 0 ends generation, which the grammar refuses
    // while incomplete) and midway; streamed, the error comes in-band.
    for grammar in ["root ::= <[0]>", "root ::= \"ab\" <[0]>"] {
        let (status, body) = server.chat(json!({"grammar": grammar})).await;
        assert_eq!(status, 400, "{grammar}: {body}");
        assert!(body.contains("admits no token"), "{body}");
        let (status, body) = server
            .chat(json!({"grammar": grammar, "stream": true}))
            .await;
        assert_eq!(status, 200);
        assert!(body.contains("admits no token"), "{body}");
        assert!(!body.contains("[DONE]"), "{body}");
    }
    server.assert_serves().await;

    // A bias of -100 on every token (OpenAI's "ban"), with and without a grammar.
    let all: serde_json::Map<String, Value> =
        (0..49152).map(|t| (t.to_string(), json!(-100))).collect();
    let (status, body) = server.chat(json!({"logit_bias": all.clone()})).await;
    assert_handled(status, &body, "all-banning logit_bias");
    let (status, body) = server
        .chat(json!({"logit_bias": all, "grammar": "root ::= \"ok\""}))
        .await;
    assert_eq!(status, 200, "{body}");

    // Stop strings: too many, too long.
    let (status, _) = server
        .chat(json!({"stop": ["a", "b", "c", "d", "e"]}))
        .await;
    assert_eq!(status, 400);
    let (status, body) = server.chat(json!({"stop": ["x".repeat(100_000)]})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("stop[0]"), "{body}");

    // `n` that can never be admitted is a 400, not a retryable 429.
    let (status, body) = server.chat(json!({"n": 100})).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"param\":\"n\""), "{body}");
    server.assert_serves().await;
}

#[tokio::test]
async fn a_corrupt_model_file_is_a_clear_error_from_plan_and_serve() {
    let original = std::fs::read(model()).unwrap();
    let dir = std::env::temp_dir().join(format!("lm-sandbox-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    // Truncated inside the header, and a tensor count flipped to something absurd.
    let mut absurd = original[..1 << 20].to_vec();
    absurd[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let cases = [
        (
            "truncated",
            original[..rng.gen_range(100..200_000)].to_vec(),
        ),
        ("absurd", absurd),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        for args in [vec!["plan", "-m"], vec!["serve", "--port", "0", "-m"]] {
            let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lm-sandbox"))
                .args(&args)
                .arg(&path)
                .output()
                .await
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{name} {args:?}: {stderr}");
            assert!(
                stderr.contains("malformed GGUF") || stderr.contains("GGUF lacks"),
                "{name} {args:?}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two 15 MiB prompts tokenize for seconds; meanwhile the server answers everyone else at once
/// (they used to block the runtime's workers: `/health` took 5 s).
#[tokio::test]
async fn huge_prompts_do_not_stall_other_requests() {
    let mut server = Server::start().await;
    let content = "hello world ".repeat(1_300_000);
    let big = {
        let server = &server;
        let content = &content;
        futures::future::join_all((0..2).map(|_| async move {
            server
                .chat(json!({"messages": [{"role": "user", "content": content}]}))
                .await
        }))
    };
    let probe = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let started = Instant::now();
            let status = reqwest::get(format!("{}/health", server.base))
                .await
                .unwrap()
                .status();
            assert!(status.is_success());
            worst = worst.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        worst
    };
    let (answers, worst) = tokio::join!(big, probe);
    for (status, body) in answers {
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("context_length_exceeded"), "{body}");
    }
    assert!(worst < Duration::from_millis(500), "/health took {worst:?}");
    server.assert_serves().await;
}
