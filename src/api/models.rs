//! `GET /v1/models`, `GET /v1/models/{id}`, and `GET /health`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use std::sync::Arc;

use super::auth::Authenticated;
use super::error::ApiError;
use super::extract::{parse, JsonObject};
use super::keys::Scope;
use super::state::AppState;
use crate::build_info;
use crate::engine::{EngineHandle, EngineState};
use crate::registry::{ModelStatus, State as ModelState};

/// One model object: OpenAI's four fields, then the registry's `state` (and why it failed),
/// `aliases`, `source`, and the loaded engine's `meta`.
/// A failure's reason keeps host paths only for a caller with the `models` scope (`reveal`).
fn model_object(status: &ModelStatus, name: &str, reveal: bool) -> Value {
    let card = &status.card;
    let mut object = json!({
        "id": name,
        "object": "model",
        "created": card.created,
        "owned_by": "lm-sandbox",
        "state": status.state.as_str(),
        "source": card.found.source,
        "aliases": card.aliases,
    });
    if name != card.id() {
        object["alias_of"] = json!(card.id());
    }
    if let Some(reason) = &status.reason {
        object["failure"] = json!(if reveal {
            reason.clone()
        } else {
            super::redact::paths(reason)
        });
    }
    if let Some(running) = &status.running {
        object["load_ms"] = json!(running.load_ms);
    }
    if let Some(info) = status.running.as_ref().and_then(|r| r.engine.model_info()) {
        object["meta"] = json!({
            "n_ctx_train": info.n_ctx_train,
            "n_ctx_seq": info.n_ctx_seq,
            "n_vocab": info.n_vocab,
            "n_embd": info.n_embd,
            "n_ctx_embed": info.n_ctx_embed,
            "pooling": info.pooling,
        });
    }
    object
}

/// Every model the registry knows, whatever its state; an alias is listed as a model too.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
) -> Json<Value> {
    let reveal = caller.may(Scope::Models);
    let data: Vec<Value> = state
        .listed_models()
        .iter()
        .flat_map(|status| {
            std::iter::once(status.card.id())
                .chain(status.card.aliases.iter().map(String::as_str))
                .map(|name| model_object(status, name, reveal))
                .collect::<Vec<_>>()
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let status = state.registry().status(&id)?;
    Ok(Json(model_object(&status, &id, caller.may(Scope::Models))))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRequest {
    model: String,
}

/// `POST /v1/models/load {"model"}` (llama-server's router shape): loads it, waiting for the
/// load; `{"success": true, …}` once it is loaded.
pub async fn load(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let body: ModelRequest = parse(&body)?;
    tracing::info!(key = %caller.key_id, model = %body.model, "load");
    let id = state.registry().load(&body.model).await?;
    Ok(Json(
        json!({"success": true, "model": id, "state": "loaded"}),
    ))
}

/// `POST /v1/models/unload {"model"}`: waits for its requests (bounded), then frees it.
pub async fn unload(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
    JsonObject(body): JsonObject,
) -> Result<Json<Value>, ApiError> {
    let body: ModelRequest = parse(&body)?;
    tracing::info!(key = %caller.key_id, model = %body.model, "unload");
    let id = state.registry().unload(&body.model).await?;
    state.forget_unloaded();
    Ok(Json(
        json!({"success": true, "model": id, "state": "unloaded"}),
    ))
}

/// `POST /v1/models/rescan`: the stores read again (as on SIGHUP).
pub async fn rescan(
    State(state): State<AppState>,
    Extension(caller): Extension<Authenticated>,
) -> Json<Value> {
    tracing::info!(key = %caller.key_id, "rescan");
    let registry = Arc::clone(state.registry());
    let report = tokio::task::spawn_blocking(move || registry.rescan())
        .await
        .unwrap_or_default();
    Json(
        json!({"success": true, "added": report.added, "removed": report.removed, "kept": report.kept}),
    )
}

/// `GET /metrics` (with `--metrics`): Prometheus's text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let Some(metrics) = state.metrics() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let engines: Vec<(String, EngineHandle)> = state
        .registry()
        .list()
        .into_iter()
        .filter_map(|s| Some((s.card.id().to_owned(), s.running?.engine)))
        .collect();
    let readings: Vec<crate::metrics::EngineReading> = engines
        .iter()
        .map(|(model, engine)| crate::metrics::EngineReading {
            model,
            live: engine.live(),
            queued: engine.queued(),
        })
        .collect();
    let gpus = state.placement().map(|p| p.gpus.borrow().clone());
    let text = metrics.encode(&readings, gpus.as_ref());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}

/// Records every request's route, status and time to its response head (with `--metrics`), and
/// counts 429s as shed.
pub async fn track(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(metrics) = state.metrics().cloned() else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().to_string();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS
        && response
            .extensions()
            .get::<super::auth::ShedCounted>()
            .is_none()
    {
        metrics.shed("queue_full");
    }
    metrics.observe_request(&route, &method, status.as_u16(), started.elapsed());
    response
}

/// The default model's engine state: `Loading` while the registry loads it, its engine's state
/// once it has one; `None` for a model that is simply not loaded (nothing is wrong).
fn default_state(state: &AppState) -> Option<EngineState> {
    let id = state.registry().default_model()?;
    let status = state.registry().status(&id).ok()?;
    match (status.state, status.running) {
        (_, Some(running)) => Some(running.engine.state()),
        (ModelState::Loading, None) => Some(EngineState::Loading),
        (ModelState::Failed, None) if status.card.pinned => {
            Some(EngineState::Failed(status.reason.unwrap_or_default()))
        }
        _ => None,
    }
}

/// 200 when the default model (the first `-m`) is ready or simply not loaded, 503 while it loads,
/// after it failed and while it reloads after a fault (with the reason). Never needs a key, and
/// never shed. The build (version, git revision, backends) only with `--health-build-info`.
pub async fn health(State(state): State<AppState>) -> Response {
    let (in_flight, shed) = state.request_counts();
    let (status, mut body) = match default_state(&state).unwrap_or(EngineState::Stopped) {
        EngineState::Ready(_) => (StatusCode::OK, json!({"status": "ok"})),
        EngineState::Loading => {
            let mut body = serde_json::to_value(ApiError::Loading.body()).unwrap_or_default();
            body["status"] = json!("loading");
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        EngineState::Failed(reason) => {
            // `/health` needs no key: never a host path.
            let reason = super::redact::paths(&reason);
            let mut body = serde_json::to_value(ApiError::Unavailable(reason.clone()).body())
                .unwrap_or_default();
            body["status"] = json!("failed");
            body["reason"] = json!(reason);
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
        EngineState::Stopped if default_state(&state).is_none() => {
            (StatusCode::OK, json!({"status": "ok"}))
        }
        EngineState::Stopped => {
            let mut body =
                serde_json::to_value(ApiError::Unavailable("the engine has stopped".into()).body())
                    .unwrap_or_default();
            body["status"] = json!("stopped");
            (StatusCode::SERVICE_UNAVAILABLE, body)
        }
    };
    let models = state.registry().list();
    body["models"] = json!({
        "known": models.len(),
        "loaded": models.iter().filter(|m| m.state == ModelState::Loaded).count(),
    });
    body["requests"] = json!({"in_flight": in_flight, "shed": shed});
    if state.config().health_build_info {
        body["build"] = json!({
            "version": build_info::VERSION,
            "git_revision": build_info::GIT_REVISION,
            "backends": build_info::backends(),
        });
    }
    (status, Json(body)).into_response()
}

/// Each loaded model's plan with what its load measurably took, and the GPUs' live memory. The
/// default model's plan is also at the top level (`model`, `plan`, `measured`).
pub async fn placement(State(state): State<AppState>) -> Json<Value> {
    let Some(view) = state.placement() else {
        return Json(
            json!({"model": null, "plan": null, "gpus": null, "measured": null, "models": []}),
        );
    };
    let gpus = view.gpus.borrow().clone();
    let statuses = state.registry().list();
    let mut models = Vec::new();
    for status in &statuses {
        let Some(running) = &status.running else {
            continue;
        };
        let Some(placement) = running.placement.as_ref().or(view.placement.as_ref()) else {
            continue;
        };
        let allocated = running.allocated();
        let measured =
            crate::gpu::placement::measure(&placement.plan, &view.before, &gpus, &allocated);
        // The plan's layer count per device (the output layer on the last) beside what
        // llama.cpp's load put there.
        let planned = |i: usize| {
            let d = &placement.plan.devices[i];
            let last = i + 1 == placement.plan.devices.len();
            d.end_layer - d.first_layer + u32::from(last && d.output > 0)
        };
        let layers: Vec<Value> = running
            .layers()
            .into_iter()
            .map(|(device, loaded)| {
                let planned = placement
                    .plan
                    .devices
                    .iter()
                    .position(|d| d.pci_bus_id == device)
                    .map(planned);
                json!({"device": device, "planned": planned, "loaded": loaded})
            })
            .collect();
        models.push(json!({
            "id": status.card.id(),
            "state": status.state.as_str(),
            "model": placement.model,
            "plan": placement.plan,
            "measured": measured,
            "layers": layers,
        }));
    }
    let default = state.registry().default_model();
    let first = models
        .iter()
        .find(|m| default.as_deref().is_some_and(|d| m["id"] == d))
        .or(models.first())
        .cloned()
        .unwrap_or(json!({}));
    Json(json!({
        "model": first.get("model").cloned().unwrap_or(Value::Null),
        "plan": first.get("plan").cloned().unwrap_or(Value::Null),
        "measured": first.get("measured").cloned().unwrap_or(Value::Null),
        "gpus": gpus,
        "models": models,
    }))
}
