//! `lm-sandbox top URL`: a refreshing terminal view of a running server, like `nvtop` for it:
//! the model and its state, active sequences, queue, tokens/s, TTFT percentiles, KV use, and
//! GPU memory per device against the plan.
//!
//! Built on the server's own endpoints (`/health`, `/v1/models`, `/metrics`, `/v1/placement`):
//! [`Snapshot::fetch`] reads them, [`View`] turns two snapshots into what is shown, and
//! [`render`] draws a view on any ratatui backend (the terminal in `command`, a test buffer in
//! the tests). Must not: know the server's internals beyond those routes.

pub mod command;

use std::time::{Duration, Instant};

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::Frame;
use serde_json::Value;

use crate::metrics::{histogram_quantile, read_samples, Sample};

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
}

/// One reading of the server.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub at: Instant,
    pub health: Value,
    pub models: Value,
    /// Empty when the server runs without `--metrics`.
    pub metrics: Vec<Sample>,
    pub placement: Value,
}

impl Snapshot {
    /// Reads every endpoint once. `key` is sent as a bearer token when given.
    pub async fn fetch(
        client: &reqwest::Client,
        base: &str,
        key: Option<&str>,
    ) -> Result<Self, TopError> {
        let get = |path: &str| {
            let url = format!("{}{path}", base.trim_end_matches('/'));
            let mut request = client.get(&url);
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            async move {
                let response = request.send().await.map_err(|e| TopError::Http {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
                let status = response.status();
                let text = response.text().await.map_err(|e| TopError::Http {
                    url: url.clone(),
                    reason: e.to_string(),
                })?;
                Ok::<_, TopError>((status, text))
            }
        };
        let json = |text: &str| serde_json::from_str(text).unwrap_or(Value::Null);
        // /health answers 503 with a body while loading or failed: still a reading.
        let (_, health) = get("/health").await?;
        let (_, models) = get("/v1/models").await?;
        let (status, metrics) = get("/metrics").await?;
        let (_, placement) = get("/v1/placement").await?;
        Ok(Self {
            at: Instant::now(),
            health: json(&health),
            models: json(&models),
            metrics: if status.is_success() {
                read_samples(&metrics)
            } else {
                Vec::new()
            },
            placement: json(&placement),
        })
    }

    fn value(&self, name: &str, model: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|s| s.name == name && s.label("model").is_none_or(|m| m == model))
            .map(|s| s.value)
    }

    /// The sum of `name`'s samples for `model` over its other labels; `None` when it has none.
    fn sum(&self, name: &str, model: &str) -> Option<f64> {
        self.metrics
            .iter()
            .filter(|s| s.name == name && s.label("model") == Some(model))
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    fn buckets(&self, name: &str, model: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        self.metrics
            .iter()
            .filter(|s| s.name == bucket && s.label("model") == Some(model))
            .filter_map(|s| {
                let le = s.label("le")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, s.value))
            })
            .collect()
    }
}

/// A model's row.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    pub id: String,
    pub state: String,
    pub active: Option<f64>,
    pub queued: Option<f64>,
    /// Generated tokens per second since the previous reading.
    pub tokens_per_second: Option<f64>,
    /// The share of the time since the previous reading its engine spent in generation steps
    /// (1: it never waited for work, and more load only queues).
    pub busy: Option<f64>,
    pub ttft_p50: Option<f64>,
    pub ttft_p95: Option<f64>,
    /// KV cells in use, as a fraction.
    pub kv: Option<f64>,
}

/// A GPU's row.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuRow {
    pub pci_bus_id: String,
    pub name: String,
    pub used: u64,
    pub total: u64,
    /// What the plan puts on it.
    pub planned: Option<u64>,
    pub utilization: Option<u64>,
    pub temperature: Option<u64>,
}

/// What is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub url: String,
    pub models: Vec<ModelRow>,
    pub gpus: Vec<GpuRow>,
    pub in_flight: Option<u64>,
    pub shed: Option<u64>,
    /// Why the view is incomplete (no `--metrics`, a failed poll).
    pub note: Option<String>,
}

impl View {
    /// The view of `now`, with rates over the time since `before`.
    pub fn new(url: &str, now: &Snapshot, before: Option<&Snapshot>) -> Self {
        let state = now.health["status"]
            .as_str()
            .map(|s| if s == "ok" { "ready" } else { s })
            .unwrap_or("unreachable")
            .to_owned();
        // One row per model (aliases share their model's row): its registry state, `ready` for
        // a loaded one, and its engine's figures from the metrics (labelled with its id).
        let models = now.models["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m.get("alias_of").is_none())
            .filter_map(|m| {
                let id = m["id"].as_str()?.to_owned();
                let state = match m["state"].as_str() {
                    Some("loaded") => "ready".to_owned(),
                    Some(other) => other.to_owned(),
                    None => state.clone(),
                };
                // A counter's change per second since the previous reading.
                let per_second = |read: fn(&Snapshot, &str) -> Option<f64>| {
                    let b = before?;
                    let dt = now.at.duration_since(b.at).as_secs_f64();
                    let delta = read(now, &id)? - read(b, &id)?;
                    (dt > 0.0).then(|| delta / dt)
                };
                let rate = per_second(|s, id| s.value("llamacpp:tokens_predicted_total", id));
                let busy = per_second(|s, id| s.sum("lmsandbox_engine_busy_seconds_total", id))
                    .map(|share| share.clamp(0.0, 1.0));
                let ttft = now.buckets("lmsandbox_time_to_first_token_seconds", &id);
                Some(ModelRow {
                    active: now.value("llamacpp:requests_processing", &id),
                    queued: now.value("llamacpp:requests_deferred", &id),
                    tokens_per_second: rate,
                    busy,
                    ttft_p50: histogram_quantile(0.5, &ttft),
                    ttft_p95: histogram_quantile(0.95, &ttft),
                    kv: now.value("llamacpp:kv_cache_usage_ratio", &id),
                    id,
                    state,
                })
            })
            .collect();
        // What every loaded model's plan puts on a GPU (older servers: the one top-level plan).
        let plans: Vec<&Value> = match now.placement["models"].as_array() {
            Some(models) => models.iter().map(|m| &m["plan"]).collect(),
            None => vec![&now.placement["plan"]],
        };
        let planned = |bus: &str| {
            let totals: Vec<u64> = plans
                .iter()
                .filter_map(|plan| {
                    plan["devices"]
                        .as_array()?
                        .iter()
                        .find(|d| d["pci_bus_id"] == bus)?["total"]
                        .as_u64()
                })
                .collect();
            (!totals.is_empty()).then(|| totals.iter().sum())
        };
        let gpus = now.placement["gpus"]["gpus"]
            .as_array()
            .map(|gpus| {
                gpus.iter()
                    .map(|g| {
                        let bus = g["pci_bus_id"].as_str().unwrap_or_default().to_owned();
                        GpuRow {
                            planned: planned(&bus),
                            name: g["name"].as_str().unwrap_or_default().to_owned(),
                            used: g["memory_used"].as_u64().unwrap_or(0),
                            total: g["memory_total"].as_u64().unwrap_or(0),
                            utilization: g["utilization_percent"].as_u64(),
                            temperature: g["temperature_celsius"].as_u64(),
                            pci_bus_id: bus,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            url: url.to_owned(),
            models,
            gpus,
            in_flight: now.health["requests"]["in_flight"].as_u64(),
            shed: now.health["requests"]["shed"].as_u64(),
            note: now.metrics.is_empty().then(|| {
                "no /metrics (start the server with --metrics, and pass --api-key if it has keys)"
                    .to_owned()
            }),
        }
    }
}

fn or_dash(value: Option<String>) -> String {
    value.unwrap_or_else(|| "—".to_owned())
}

/// Seconds as milliseconds, with a decimal below 10 ms.
fn millis(seconds: f64) -> String {
    let ms = seconds * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes >> 20)
}

/// Draws `view` on the whole frame.
pub fn render(frame: &mut Frame<'_>, view: &View) {
    let [title, models, gpus, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(3 + view.models.len().max(1) as u16),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(Line::from(format!(
            "lm-sandbox top — {}   (q quits)",
            view.url
        )))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        title,
    );
    let header = |cells: &[&'static str]| {
        Row::new(cells.to_vec()).style(Style::default().add_modifier(Modifier::BOLD))
    };
    let model_rows = view.models.iter().map(|m| {
        Row::new(vec![
            m.id.clone(),
            m.state.clone(),
            or_dash(m.active.map(|v| format!("{v:.0}"))),
            or_dash(m.queued.map(|v| format!("{v:.0}"))),
            or_dash(m.tokens_per_second.map(|v| format!("{v:.1}"))),
            or_dash(m.busy.map(|v| format!("{:.0} %", v * 100.0))),
            or_dash(m.ttft_p50.map(millis)),
            or_dash(m.ttft_p95.map(millis)),
            or_dash(m.kv.map(|v| format!("{:.0} %", v * 100.0))),
        ])
    });
    frame.render_widget(
        Table::new(
            model_rows,
            [
                Constraint::Min(20),
                Constraint::Length(9),
                Constraint::Length(7),
                Constraint::Length(6),
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(6),
            ],
        )
        .header(header(&[
            "model", "state", "active", "queue", "tok/s", "busy", "TTFT p50", "TTFT p95", "KV",
        ]))
        .block(Block::bordered().title(" Models ")),
        models,
    );
    let gpu_rows = view.gpus.iter().map(|g| {
        Row::new(vec![
            g.pci_bus_id.clone(),
            g.name.clone(),
            format!("{} / {}", mib(g.used), mib(g.total)),
            or_dash(g.planned.map(mib)),
            or_dash(g.utilization.map(|u| format!("{u} %"))),
            or_dash(g.temperature.map(|t| format!("{t} °C"))),
        ])
    });
    let gpu_title = if view.gpus.is_empty() {
        " GPUs: none (CPU only) "
    } else {
        " GPUs "
    };
    frame.render_widget(
        Table::new(
            gpu_rows,
            [
                Constraint::Length(17),
                Constraint::Min(12),
                Constraint::Length(22),
                Constraint::Length(11),
                Constraint::Length(6),
                Constraint::Length(6),
            ],
        )
        .header(header(&[
            "device",
            "name",
            "used / total",
            "plan",
            "util",
            "temp",
        ]))
        .block(Block::bordered().title(gpu_title)),
        gpus,
    );
    let mut status = format!(
        "requests in flight {}, shed {}",
        or_dash(view.in_flight.map(|v| v.to_string())),
        or_dash(view.shed.map(|v| v.to_string()))
    );
    if let Some(note) = &view.note {
        status.push_str("   ");
        status.push_str(note);
    }
    frame.render_widget(Paragraph::new(status), footer);
}

/// Polls every `interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_model_has_a_row_with_its_state_and_plans_add_up_per_gpu() {
        let bus = "00000000:01:00.0";
        let now = Snapshot {
            at: Instant::now(),
            health: json!({"status": "ok"}),
            models: json!({"data": [
                {"id": "a", "state": "loaded"},
                {"id": "alias-of-a", "state": "loaded", "alias_of": "a"},
                {"id": "b:7b", "state": "unloaded"},
                {"id": "broken", "state": "failed"},
            ]}),
            metrics: Vec::new(),
            placement: json!({
                "gpus": {"gpus": [{"name": "RTX 3060", "pci_bus_id": bus,
                                    "memory_used": 3, "memory_total": 12}]},
                "models": [
                    {"id": "a", "plan": {"devices": [{"pci_bus_id": bus, "total": 100}]}},
                    {"id": "c", "plan": {"devices": [{"pci_bus_id": bus, "total": 50}]}},
                ],
            }),
        };
        let view = View::new("http://x", &now, None);
        let rows: Vec<(&str, &str)> = view
            .models
            .iter()
            .map(|m| (m.id.as_str(), m.state.as_str()))
            .collect();
        assert_eq!(
            rows,
            [("a", "ready"), ("b:7b", "unloaded"), ("broken", "failed")]
        );
        assert_eq!(view.gpus[0].planned, Some(150));
    }

    #[test]
    fn a_models_rates_are_over_the_time_between_readings() {
        let reading = |at: Instant, tokens: f64, prefill: f64, decode: f64| Snapshot {
            at,
            health: json!({"status": "ok"}),
            models: json!({"data": [{"id": "a", "state": "loaded"}, {"id": "b", "state": "loaded"}]}),
            metrics: crate::metrics::read_samples(&format!(
                "llamacpp:tokens_predicted_total{{model=\"a\"}} {tokens}\n\
                 lmsandbox_engine_busy_seconds_total{{model=\"a\",step=\"prefill\"}} {prefill}\n\
                 lmsandbox_engine_busy_seconds_total{{model=\"a\",step=\"decode\"}} {decode}\n\
                 lmsandbox_engine_busy_seconds_total{{model=\"b\",step=\"decode\"}} 9\n\
                 # EOF\n"
            )),
            placement: json!({}),
        };
        let start = Instant::now();
        let before = reading(start, 100.0, 1.0, 2.0);
        let now = reading(start + Duration::from_secs(2), 300.0, 1.5, 3.0);
        let view = View::new("http://x", &now, Some(&before));
        assert_eq!(view.models[0].tokens_per_second, Some(100.0));
        // 0.5 s of prefill and 1 s of decode steps in 2 s.
        assert_eq!(view.models[0].busy, Some(0.75));
        // b's engine was idle; the first reading has no rates.
        assert_eq!(view.models[1].busy, Some(0.0));
        assert_eq!(View::new("http://x", &now, None).models[0].busy, None);
    }
}
