//! What operators read: the placement, Prometheus metrics and `top`.

use super::*;

#[tokio::test]
async fn placement_shows_the_plan_and_live_gpu_memory() {
    let (placement, inventory) = fake_placement();
    let (gpus_tx, gpus_rx) = watch::channel(inventory.clone());
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let app = router(AppState::with_placement(
        engine,
        api_config(&[]),
        placement,
        gpus_rx,
    ));
    let get = || Request::get("/v1/placement").body(Body::empty()).unwrap();
    let (status, body) = send_json(&app, get()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["plan"]["n_gpu_layers"], 5);
    assert_eq!(body["plan"]["devices"][0]["pci_bus_id"], "00000000:01:00.0");
    assert_eq!(body["gpus"]["gpus"][0]["memory_free"], 8 * GIB);
    assert_eq!(body["measured"][0]["used"], 0, "nothing loaded yet: {body}");
    let planned = body["plan"]["devices"][0]["total"].as_u64().unwrap();
    assert_eq!(body["measured"][0]["planned"], planned);
    // A new NVML reading shows up at once, and what the load took is measured against the plan.
    let mut later = inventory;
    later.gpus[0].memory_free = 8 * GIB - planned - planned / 10;
    gpus_tx.send_replace(later.clone());
    let (_, body) = send_json(&app, get()).await;
    assert_eq!(
        body["gpus"]["gpus"][0]["memory_free"],
        later.gpus[0].memory_free
    );
    assert_eq!(body["measured"][0]["used"], planned + planned / 10);
    assert_eq!(body["measured"][0]["difference_percent"], 10.0);
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_gpus_in_prometheus_text() {
    let app = metrics_app(&["k"]);
    // Behind the key unless --metrics-public.
    let (status, _, _) = send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let keyed = |mut r: Request<Body>| {
        r.headers_mut()
            .insert(header::AUTHORIZATION, "Bearer k".parse().unwrap());
        r
    };
    let scrape_keyed = || async {
        let (status, headers, body) = send(
            &app,
            keyed(Request::get("/metrics").body(Body::empty()).unwrap()),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
        assert!(body.ends_with("# EOF\n"), "{body}");
        body
    };
    let model = [("model", MODEL)];
    let before = scrape_keyed().await;
    assert_eq!(sample(&before, "llamacpp:requests_processing", &model), 0.0);
    assert_eq!(sample(&before, "llamacpp:kv_cache_tokens", &model), 0.0);
    // GPU gauges from the inventory, labelled by bus id and name.
    let gpu = [("pci_bus_id", "00000000:01:00.0"), ("name", "Fake GPU")];
    assert_eq!(
        sample(&before, "lmsandbox_gpu_memory_total_bytes", &gpu),
        (8 * GIB) as f64
    );
    assert_eq!(
        sample(&before, "lmsandbox_gpu_temperature_celsius", &gpu),
        61.0
    );
    assert_eq!(sample(&before, "lmsandbox_gpu_power_watts", &gpu), 87.5);

    let (status, body) = send_json(&app, keyed(post("/v1/chat/completions", chat("hi")))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let prompt = body["usage"]["prompt_tokens"].as_f64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_f64().unwrap();
    let after = scrape_keyed().await;
    assert_eq!(
        sample(&after, "llamacpp:prompt_tokens_total", &model),
        prompt
    );
    assert_eq!(
        sample(&after, "llamacpp:tokens_predicted_total", &model),
        completion
    );
    assert!(sample(&after, "llamacpp:n_decode_total", &model) >= completion);
    // The engine's time, by the kind of step: the prompt's step, then one per further token.
    let busy = |text: &str, step| {
        sample(
            text,
            "lmsandbox_engine_busy_seconds_total",
            &[("model", MODEL), ("step", step)],
        )
    };
    assert_eq!(busy(&before, "prefill"), 0.0);
    assert_eq!(busy(&before, "decode"), 0.0);
    assert!(completion >= 2.0, "{body}");
    assert!(busy(&after, "prefill") > 0.0);
    assert!(busy(&after, "decode") > 0.0);
    assert!(
        sample(&after, "llamacpp:kv_cache_tokens", &model) > 0.0,
        "the prefix cache holds it"
    );
    let route = [("route", "/v1/chat/completions"), ("status", "200")];
    assert_eq!(
        sample(&after, "lmsandbox_request_duration_seconds_count", &route),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "lmsandbox_time_to_first_token_seconds_count",
            &model
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "lmsandbox_completion_tokens_sum", &model),
        completion
    );
    // Histogram buckets are cumulative: monotone in `le`, ending at the count.
    for name in [
        "lmsandbox_time_to_first_token_seconds",
        "lmsandbox_time_per_output_token_seconds",
        "lmsandbox_prompt_tokens",
    ] {
        let buckets: Vec<(f64, f64)> = lm_sandbox::metrics::read_samples(&after)
            .into_iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .map(|s| {
                let le = s.label("le").unwrap();
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    s.value,
                )
            })
            .collect();
        assert!(buckets.len() > 10, "{name}");
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}"
        );
        assert_eq!(buckets.last().unwrap(), &(f64::INFINITY, 1.0), "{name}");
    }
    // A second identical request is a prefix-cache hit.
    send_json(&app, keyed(post("/v1/chat/completions", chat("hi")))).await;
    let again = scrape_keyed().await;
    assert_eq!(
        sample(&again, "lmsandbox_prefix_cache_hits_total", &model),
        1.0
    );
    // --metrics-public: no key needed; the text ends with OpenMetrics' EOF.
    let engine = FakeRunner::new(Duration::ZERO).spawn(WorkerConfig {
        n_seq: 1,
        n_batch: 64,
        n_ctx_seq: 256,
        max_queue: 1,
    });
    let mut config = api_config(&["k"]);
    config.metrics = true;
    config.metrics_public = true;
    let public = router(AppState::new(engine, config));
    let (status, _, body) = send(
        &public,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Without --metrics there is no route.
    let (status, _, _) = send(
        &harness().app,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn top_renders_a_live_servers_models_rates_and_gpus() {
    use lm_sandbox::top::{render, Snapshot, View};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    let app = metrics_app(&[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let before = Snapshot::fetch(&client, &url, None).await.unwrap();
    for _ in 0..3 {
        let response = client
            .post(format!("{url}/v1/chat/completions"))
            .json(&chat("hello there"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let now = Snapshot::fetch(&client, &url, None).await.unwrap();
    let view = View::new(&url, &now, Some(&before));
    let model = &view.models[0];
    assert_eq!(model.id, MODEL);
    assert_eq!(model.state, "ready");
    assert_eq!(model.active, Some(0.0));
    assert!(model.tokens_per_second.unwrap() > 0.0, "{model:?}");
    assert!(model.ttft_p50.is_some() && model.ttft_p95 >= model.ttft_p50);
    assert_eq!(view.gpus[0].name, "Fake GPU");
    assert!(view.gpus[0].planned.unwrap() > 0);

    let mut terminal = Terminal::new(TestBackend::new(110, 14)).unwrap();
    terminal.draw(|frame| render(frame, &view)).unwrap();
    let screen: String = terminal
        .backend()
        .buffer()
        .content()
        .chunks(110)
        .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
        .collect();
    for expected in [
        "lm-sandbox top",
        "Models",
        MODEL,
        "ready",
        "TTFT p95",
        "Fake GPU",
        "00000000:01:00.0",
        "0 MiB / 8192 MiB",
        "requests in flight",
    ] {
        assert!(
            screen.contains(expected),
            "{expected:?} missing from\n{screen}"
        );
    }
    // The tokens/s cell shows a number, not a dash.
    let row = screen.lines().find(|l| l.contains(MODEL)).unwrap();
    assert!(!row.contains('—'), "{row}");
}
