//! What `GET /metrics` exposes: llama-server's counters under their own names (so existing
//! dashboards work), plus the distributions llama-server lacks, per model; the GPUs as NVML reads
//! them; sandbox commands by outcome; requests shed.
//!
//! One [`Metrics`] per server, on the Prometheus project's own client (`prometheus-client`): a
//! registry of its own rather than a process-global recorder, so servers in one process (the tests
//! start many) never share counts. Counters and histograms are updated where the event happens
//! (the engine's finished-generation hook, the HTTP middleware, the sandbox's end-of-command
//! task); gauges are read when scraped.
//!
//! Must not: know HTTP types (the API passes plain route, method and status), or hold a lock
//! across an await.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::{GenerationStats, LiveCounts};
use crate::gpu::inventory::Inventory;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    pci_bus_id: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    model: String,
    step: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;
type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 1 ms to about 33 s, doubling.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// 1 to 65 536 tokens, doubling.
fn tokens() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 17))
}

fn histograms<L: Clone + std::hash::Hash + Eq>(buckets: fn() -> Histogram) -> Histograms<L> {
    Family::new_with_constructor(buckets)
}

/// The server's metrics. Cheap to share behind an `Arc`.
pub struct Metrics {
    // A std Mutex: encoding is synchronous and short, and the gauges are set and read under the
    // same lock so one scrape sees one consistent reading.
    registry: Mutex<Registry>,
    // llama-server's names.
    prompt_tokens: Family<ModelLabel, Counter>,
    prompt_seconds: Family<ModelLabel, FloatCounter>,
    predicted_tokens: Family<ModelLabel, Counter>,
    predicted_seconds: Family<ModelLabel, FloatCounter>,
    decodes: Family<ModelLabel, Counter>,
    prompt_rate: Family<ModelLabel, FloatGauge>,
    predicted_rate: Family<ModelLabel, FloatGauge>,
    processing: Family<ModelLabel, Gauge>,
    deferred: Family<ModelLabel, Gauge>,
    kv_ratio: Family<ModelLabel, FloatGauge>,
    kv_tokens: Family<ModelLabel, Gauge>,
    // Distributions llama-server lacks.
    ttft: Histograms<ModelLabel>,
    tpot: Histograms<ModelLabel>,
    queue_wait: Histograms<ModelLabel>,
    prompt_lengths: Histograms<ModelLabel>,
    completion_lengths: Histograms<ModelLabel>,
    request_duration: Histograms<RouteLabels>,
    cache_hits: Family<ModelLabel, Counter>,
    cache_hit_tokens: Family<ModelLabel, Counter>,
    kv_cells_total: Family<ModelLabel, Gauge>,
    engine_busy: Family<StepLabels, FloatCounter>,
    gpu_memory_used: Family<GpuLabels, Gauge>,
    gpu_memory_total: Family<GpuLabels, Gauge>,
    gpu_utilization: Family<GpuLabels, Gauge>,
    gpu_temperature: Family<GpuLabels, Gauge>,
    gpu_power: Family<GpuLabels, FloatGauge>,
    sandbox_commands: Family<OutcomeLabel, Counter>,
    sandbox_duration: Histograms<OutcomeLabel>,
    shed: Family<ReasonLabel, Counter>,
}

/// What a scrape reads of one model's engine.
pub struct EngineReading<'a> {
    pub model: &'a str,
    pub live: &'a LiveCounts,
    /// Requests waiting in the admission queue.
    pub queued: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:expr, $help:expr, $metric:expr) => {{
                let metric = $metric;
                r.register($name, $help, metric.clone());
                metric
            }};
        }
        Self {
            prompt_tokens: reg!(
                "llamacpp:prompt_tokens",
                "Number of prompt tokens processed",
                Family::default()
            ),
            prompt_seconds: reg!(
                "llamacpp:prompt_seconds",
                "Prompt process time",
                Family::default()
            ),
            predicted_tokens: reg!(
                "llamacpp:tokens_predicted",
                "Number of generation tokens processed",
                Family::default()
            ),
            predicted_seconds: reg!(
                "llamacpp:tokens_predicted_seconds",
                "Predict process time",
                Family::default()
            ),
            decodes: reg!(
                "llamacpp:n_decode",
                "Number of llama_decode() calls",
                Family::default()
            ),
            prompt_rate: reg!(
                "llamacpp:prompt_tokens_seconds",
                "Average prompt throughput in tokens/s",
                Family::default()
            ),
            predicted_rate: reg!(
                "llamacpp:predicted_tokens_seconds",
                "Average generation throughput in tokens/s",
                Family::default()
            ),
            processing: reg!(
                "llamacpp:requests_processing",
                "Number of requests processing",
                Family::default()
            ),
            deferred: reg!(
                "llamacpp:requests_deferred",
                "Number of requests deferred",
                Family::default()
            ),
            kv_ratio: reg!(
                "llamacpp:kv_cache_usage_ratio",
                "KV-cache usage. 1 means 100 percent usage",
                Family::default()
            ),
            kv_tokens: reg!(
                "llamacpp:kv_cache_tokens",
                "KV-cache tokens",
                Family::default()
            ),
            ttft: reg!(
                "lmsandbox_time_to_first_token_seconds",
                "From the request's admission to the queue until its first token",
                histograms(seconds)
            ),
            tpot: reg!(
                "lmsandbox_time_per_output_token_seconds",
                "Mean time per generated token after the first, per request",
                histograms(seconds)
            ),
            queue_wait: reg!(
                "lmsandbox_queue_wait_seconds",
                "Time a request waited for a free sequence",
                histograms(seconds)
            ),
            prompt_lengths: reg!(
                "lmsandbox_prompt_tokens",
                "Prompt length per request, cached tokens included",
                histograms(tokens)
            ),
            completion_lengths: reg!(
                "lmsandbox_completion_tokens",
                "Generated tokens per request",
                histograms(tokens)
            ),
            request_duration: reg!(
                "lmsandbox_request_duration_seconds",
                "HTTP requests until the response head, by route and status",
                histograms(seconds)
            ),
            cache_hits: reg!(
                "lmsandbox_prefix_cache_hits",
                "Requests that reused KV cells of an earlier request",
                Family::default()
            ),
            cache_hit_tokens: reg!(
                "lmsandbox_prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache",
                Family::default()
            ),
            kv_cells_total: reg!(
                "lmsandbox_kv_cells",
                "KV cells of the context, over all sequences",
                Family::default()
            ),
            engine_busy: reg!(
                "lmsandbox_engine_busy_seconds",
                "Time in generation steps: prefill (the step held prompt tokens) or decode (only sampled tokens)",
                Family::default()
            ),
            gpu_memory_used: reg!(
                "lmsandbox_gpu_memory_used_bytes",
                "GPU memory in use (NVML)",
                Family::default()
            ),
            gpu_memory_total: reg!(
                "lmsandbox_gpu_memory_total_bytes",
                "GPU memory (NVML)",
                Family::default()
            ),
            gpu_utilization: reg!(
                "lmsandbox_gpu_utilization_percent",
                "GPU utilisation (NVML)",
                Family::default()
            ),
            gpu_temperature: reg!(
                "lmsandbox_gpu_temperature_celsius",
                "GPU temperature (NVML)",
                Family::default()
            ),
            gpu_power: reg!(
                "lmsandbox_gpu_power_watts",
                "GPU power draw (NVML)",
                Family::default()
            ),
            sandbox_commands: reg!(
                "lmsandbox_sandbox_commands",
                "Sandbox commands by outcome",
                Family::default()
            ),
            sandbox_duration: reg!(
                "lmsandbox_sandbox_command_duration_seconds",
                "Sandbox command run time by outcome",
                histograms(seconds)
            ),
            shed: reg!(
                "lmsandbox_requests_shed",
                "Requests refused for load: queue_full (429) or overloaded (503)",
                Family::default()
            ),
            registry: Mutex::new(r),
        }
    }

    /// A finished generation of `model`.
    pub fn observe_generation(&self, model: &str, stats: &GenerationStats) {
        let label = ModelLabel {
            model: model.to_owned(),
        };
        let computed = stats.prompt_tokens.saturating_sub(stats.cached_tokens);
        self.prompt_tokens
            .get_or_create(&label)
            .inc_by(u64::from(computed));
        self.prompt_seconds
            .get_or_create(&label)
            .inc_by(stats.prompt_ms / 1e3);
        self.predicted_tokens
            .get_or_create(&label)
            .inc_by(u64::from(stats.generated_tokens));
        self.predicted_seconds
            .get_or_create(&label)
            .inc_by(stats.generation_ms / 1e3);
        if stats.generated_tokens > 0 {
            self.ttft
                .get_or_create(&label)
                .observe((stats.queue_ms + stats.prompt_ms) / 1e3);
        }
        if stats.generated_tokens > 1 {
            let per_token = stats.generation_ms / f64::from(stats.generated_tokens - 1);
            self.tpot.get_or_create(&label).observe(per_token / 1e3);
        }
        self.queue_wait
            .get_or_create(&label)
            .observe(stats.queue_ms / 1e3);
        self.prompt_lengths
            .get_or_create(&label)
            .observe(f64::from(stats.prompt_tokens));
        self.completion_lengths
            .get_or_create(&label)
            .observe(f64::from(stats.generated_tokens));
        if stats.cached_tokens > 0 {
            self.cache_hits.get_or_create(&label).inc();
            self.cache_hit_tokens
                .get_or_create(&label)
                .inc_by(u64::from(stats.cached_tokens));
        }
    }

    /// An HTTP request answered (`route` is the matched route pattern).
    /// A request's answer. `route` is a matched route pattern (a fixed set) or `unmatched`;
    /// `method` outside HTTP's standard ones is recorded as `other`, so no client can grow the
    /// label set.
    pub fn observe_request(&self, route: &str, method: &str, status: u16, elapsed: Duration) {
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        let method = METHODS
            .into_iter()
            .find(|m| *m == method)
            .unwrap_or("other");
        let labels = RouteLabels {
            route: route.to_owned(),
            method: method.to_owned(),
            status: status.to_string(),
        };
        self.request_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A request refused for load: `queue_full` (429), `overloaded` (503), `rate_limited` (a
    /// key's own rate, 429) or `unauthenticated` (401, refused before its body was read).
    pub fn shed(&self, reason: &str) {
        self.shed
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// A sandbox command ended: `ok`, `failed` (non-zero exit), `timed_out`, `signal`, or
    /// `error` (it could not run).
    pub fn observe_sandbox(&self, outcome: &str, elapsed: Duration) {
        let label = OutcomeLabel {
            outcome: outcome.to_owned(),
        };
        self.sandbox_commands.get_or_create(&label).inc();
        self.sandbox_duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    /// The text exposition (OpenMetrics, which Prometheus reads): the gauges are set from
    /// `engines` and `gpus` first.
    pub fn encode(&self, engines: &[EngineReading<'_>], gpus: Option<&Inventory>) -> String {
        let registry = self.registry.lock().expect("metrics registry");
        for e in engines {
            let label = ModelLabel {
                model: e.model.to_owned(),
            };
            let counter_to = |c: &Counter, value: u64| {
                // The engine counts decodes itself; the counter catches up to it.
                c.inc_by(value.saturating_sub(c.get()));
            };
            counter_to(
                &self.decodes.get_or_create(&label),
                e.live.decodes.load(Ordering::Relaxed),
            );
            for (step, nanos) in [
                ("prefill", &e.live.prefill_step_ns),
                ("decode", &e.live.decode_step_ns),
            ] {
                let busy = self.engine_busy.get_or_create(&StepLabels {
                    model: e.model.to_owned(),
                    step,
                });
                let seconds = nanos.load(Ordering::Relaxed) as f64 / 1e9;
                busy.inc_by((seconds - busy.get()).max(0.0));
            }
            self.processing
                .get_or_create(&label)
                .set(e.live.active.load(Ordering::Relaxed) as i64);
            self.deferred.get_or_create(&label).set(e.queued as i64);
            let used = e.live.kv_cells.load(Ordering::Relaxed);
            let total = e.live.kv_capacity.load(Ordering::Relaxed);
            self.kv_tokens.get_or_create(&label).set(used as i64);
            self.kv_cells_total.get_or_create(&label).set(total as i64);
            let ratio = if total == 0 {
                0.0
            } else {
                used as f64 / total as f64
            };
            self.kv_ratio.get_or_create(&label).set(ratio);
            let rate = |tokens: u64, seconds: f64| {
                if seconds > 0.0 {
                    tokens as f64 / seconds
                } else {
                    0.0
                }
            };
            self.prompt_rate.get_or_create(&label).set(rate(
                self.prompt_tokens.get_or_create(&label).get(),
                self.prompt_seconds.get_or_create(&label).get(),
            ));
            self.predicted_rate.get_or_create(&label).set(rate(
                self.predicted_tokens.get_or_create(&label).get(),
                self.predicted_seconds.get_or_create(&label).get(),
            ));
        }
        for gpu in gpus.map(|i| i.gpus.as_slice()).unwrap_or_default() {
            let labels = GpuLabels {
                pci_bus_id: gpu.pci_bus_id.clone(),
                name: gpu.name.clone(),
            };
            self.gpu_memory_used
                .get_or_create(&labels)
                .set(gpu.memory_used as i64);
            self.gpu_memory_total
                .get_or_create(&labels)
                .set(gpu.memory_total as i64);
            if let Some(u) = gpu.utilization_percent {
                self.gpu_utilization
                    .get_or_create(&labels)
                    .set(i64::from(u));
            }
            if let Some(t) = gpu.temperature_celsius {
                self.gpu_temperature
                    .get_or_create(&labels)
                    .set(i64::from(t));
            }
            if let Some(p) = gpu.power_watts {
                self.gpu_power.get_or_create(&labels).set(p);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One sample of a metrics text: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of a text [`Metrics::encode`] wrote (`lm-sandbox top` reads a server's
/// `/metrics` with it). Written here rather than taken from a crate: the maintained Rust parser
/// (`prometheus-parse`) refuses the colons of llama-server's metric names. It reads sample lines
/// only — `name{k="v",…} value` — and skips comments and lines it cannot read; label values are
/// taken as written (this exporter's values have no escapes).
pub fn read_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_owned(), v.trim_matches('"').to_owned()))
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Sample {
                name: name.to_owned(),
                labels,
                value,
            })
        })
        .collect()
}

/// Prometheus's `histogram_quantile`: the `q` quantile of cumulative `(le, count)` buckets,
/// interpolated linearly inside the bucket it falls in. `None` with no observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                // Past the last finite bound: say the bound.
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let fraction = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                0.0
            };
            return Some(lower.0 + (le - lower.0) * fraction);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_back_what_encode_wrote() {
        let metrics = Metrics::new();
        metrics.observe_request(
            "/v1/chat/completions",
            "POST",
            200,
            Duration::from_millis(3),
        );
        let text = metrics.encode(&[], None);
        let samples = read_samples(&text);
        let count = samples
            .iter()
            .find(|s| s.name == "lmsandbox_request_duration_seconds_count")
            .unwrap();
        assert_eq!(count.value, 1.0);
        assert_eq!(count.label("route"), Some("/v1/chat/completions"));
        assert!(samples
            .iter()
            .any(|s| s.name == "lmsandbox_request_duration_seconds_bucket"
                && s.label("le") == Some("+Inf")));
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let buckets = [
            (0.1, 0.0),
            (0.2, 50.0),
            (0.4, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(0.2));
        assert!((histogram_quantile(0.75, &buckets).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(histogram_quantile(0.5, &[(f64::INFINITY, 0.0)]), None);
        assert_eq!(
            histogram_quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 5.0)]),
            Some(1.0)
        );
    }
}
