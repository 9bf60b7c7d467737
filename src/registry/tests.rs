//! The registry over fake engines and a fake clock: load on demand, `--models-max`, LRU, idle
//! unload, keep-alive, failures that leave the others serving, memory that forces an unload, and
//! rescans.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::engine::fake::FakeRunner;
use crate::engine::{spawn_engine_with_runner, RestartPolicy, WorkerConfig};
use crate::gpu::placement::ModelSummary;
use crate::gpu::plan::{DevicePlan, Plan, Policy};

struct FakeClock {
    base: Instant,
    offset: Mutex<Duration>,
}

impl FakeClock {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            offset: Mutex::new(Duration::ZERO),
        })
    }

    fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Instant {
        self.base + *self.offset.lock().unwrap()
    }
}

/// One GPU of `capacity` bytes; each model takes its size in `sizes`. A model in `broken` fails
/// to load, as a truncated file would.
struct FakeLoader {
    capacity: u64,
    sizes: HashMap<String, u64>,
    broken: Vec<String>,
    starts: AtomicUsize,
    /// How long a start takes (a slow load).
    delay: Duration,
}

impl FakeLoader {
    fn new(capacity: u64, sizes: &[(&str, u64)]) -> Self {
        Self {
            capacity,
            sizes: sizes.iter().map(|&(id, n)| (id.to_owned(), n)).collect(),
            broken: Vec::new(),
            starts: AtomicUsize::new(0),
            delay: Duration::ZERO,
        }
    }
}

fn placement(size: u64) -> Placement {
    Placement {
        model: ModelSummary {
            architecture: "fake".into(),
            n_layer: 1,
            n_ctx_train: 256,
            file_bytes: size,
            n_ctx: 256,
            n_seq: 1,
        },
        plan: Plan {
            policy: Policy::Auto,
            devices: vec![DevicePlan {
                gpu: 0,
                name: "Fake GPU".into(),
                pci_bus_id: "00000000:01:00.0".into(),
                first_layer: 0,
                end_layer: 1,
                weights: size,
                kv_cache: 0,
                compute: 0,
                output: 0,
                total: size,
                budget: 0,
                headroom: 0,
            }],
            n_gpu_layers: 2,
            tensor_split: vec![1],
            cpu_layers: 0,
            cpu_bytes: 0,
            ram_available: 0,
            reasons: Vec::new(),
        },
    }
}

impl Loader for FakeLoader {
    fn start(
        &self,
        card: &ModelCard,
        others: &[Holding],
        _last_resort: bool,
    ) -> Result<Started, LoadFailure> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        if self.broken.iter().any(|b| b == card.id()) {
            return Err(LoadFailure::Failed(format!(
                "{}: the file is truncated",
                card.id()
            )));
        }
        let size = self.sizes.get(card.id()).copied().unwrap_or(1);
        let held: u64 = others
            .iter()
            .map(|h| h.placement.plan.devices[0].total)
            .sum();
        if size > self.capacity {
            return Err(LoadFailure::DoesNotFit(format!(
                "{} needs {size}; the GPU has {} in all",
                card.id(),
                self.capacity
            )));
        }
        if held + size > self.capacity {
            return Err(LoadFailure::DoesNotFit(format!(
                "{} needs {size}; {held} of {} is held by {:?}",
                card.id(),
                self.capacity,
                others.iter().map(|h| &h.id).collect::<Vec<_>>()
            )));
        }
        let config = WorkerConfig {
            n_seq: 2,
            n_batch: 64,
            n_ctx_seq: 256,
            max_queue: 8,
        };
        let (engine, thread) = spawn_engine_with_runner(
            FakeRunner::new(Duration::ZERO),
            FakeRunner::model_info(256),
            config,
            RestartPolicy::default(),
        )
        .map_err(|e| LoadFailure::Failed(e.to_string()))?;
        Ok(Started {
            engine,
            thread,
            placement: Some(placement(size)),
        })
    }
}

fn card(id: &str) -> ModelCard {
    ModelCard::found(crate::store::FoundModel {
        id: id.into(),
        source: Source::File,
        path: format!("/models/{id}.gguf").into(),
        parts: vec![format!("/models/{id}.gguf").into()],
        size: 1,
        digest: None,
        params: Default::default(),
        system: None,
    })
}

fn registry(
    ids: &'static [&'static str],
    loader: FakeLoader,
    config: RegistryConfig,
    clock: Arc<FakeClock>,
) -> (Arc<Registry>, Arc<FakeLoader>) {
    let loader = Arc::new(loader);
    let registry = Registry::new(
        Box::new(move || ids.iter().map(|id| card(id)).collect()),
        Arc::clone(&loader) as Arc<dyn Loader>,
        config,
        clock,
    );
    (registry, loader)
}

fn states(registry: &Registry) -> Vec<(String, State)> {
    registry
        .list()
        .iter()
        .map(|s| (s.card.id().to_owned(), s.state))
        .collect()
}

fn state_of(registry: &Registry, id: &str) -> State {
    registry.status(id).unwrap().state
}

#[tokio::test]
async fn a_request_loads_its_model_and_models_max_unloads_the_least_recently_used() {
    let clock = FakeClock::new();
    let config = RegistryConfig {
        models_max: 2,
        ..RegistryConfig::default()
    };
    let (registry, loader) = registry(
        &["a", "b", "c"],
        FakeLoader::new(100, &[]),
        config,
        Arc::clone(&clock),
    );
    assert!(states(&registry).iter().all(|(_, s)| *s == State::Unloaded));
    registry.acquire("a", None).await.unwrap();
    clock.advance(Duration::from_secs(1));
    registry.acquire("b", None).await.unwrap();
    clock.advance(Duration::from_secs(1));
    // `a` is used again: `b` is now the least recently used.
    registry.acquire("a", None).await.unwrap();
    clock.advance(Duration::from_secs(1));
    let c = registry.acquire("c", None).await.unwrap();
    assert_eq!(
        states(&registry),
        [
            ("a".into(), State::Loaded),
            ("b".into(), State::Unloaded),
            ("c".into(), State::Loaded)
        ]
    );
    assert_eq!(loader.starts.load(Ordering::SeqCst), 3);
    // The engine it handed out serves.
    assert!(c.engine.model_info().is_some());
}

#[tokio::test]
async fn concurrent_requests_for_an_unloaded_model_share_one_load() {
    let clock = FakeClock::new();
    let mut loader = FakeLoader::new(100, &[]);
    loader.delay = Duration::from_millis(100);
    let (registry, loader) = registry(&["a"], loader, RegistryConfig::default(), clock);
    let acquires: Vec<_> = (0..5)
        .map(|_| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move { registry.acquire("a", None).await.map(|_| ()) })
        })
        .collect();
    for acquire in acquires {
        acquire.await.unwrap().unwrap();
    }
    assert_eq!(loader.starts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idle_models_are_unloaded_by_the_clock_and_keep_alive() {
    let clock = FakeClock::new();
    let config = RegistryConfig {
        idle_unload: Some(Duration::from_secs(600)),
        models_max: 3,
        ..RegistryConfig::default()
    };
    let (registry, _) = registry(
        &["a", "b", "c"],
        FakeLoader::new(100, &[]),
        config,
        Arc::clone(&clock),
    );
    registry.acquire("a", None).await.unwrap();
    registry
        .acquire(
            "b",
            Some(KeepAlive::Until(clock.now() + Duration::from_secs(5))),
        )
        .await
        .unwrap();
    registry
        .acquire("c", Some(KeepAlive::Forever))
        .await
        .unwrap();
    assert!(registry.reap().await.is_empty());
    clock.advance(Duration::from_secs(5));
    assert_eq!(registry.reap().await, ["b"]);
    assert_eq!(state_of(&registry, "b"), State::Unloaded);
    // `expires_at` tells when `a` goes.
    // (A status holds an engine handle: dropped at once, or the unload would wait for it.)
    assert!(registry.status("a").unwrap().expires_at.is_some());
    assert!(registry.status("c").unwrap().expires_at.is_none());
    clock.advance(Duration::from_secs(595));
    assert_eq!(registry.reap().await, ["a"]);
    assert_eq!(state_of(&registry, "a"), State::Unloaded);
    assert_eq!(state_of(&registry, "c"), State::Loaded);
    // Unloaded, a model loads again on the next request.
    registry.acquire("a", None).await.unwrap();
    assert_eq!(state_of(&registry, "a"), State::Loaded);
}

#[tokio::test]
async fn a_busy_model_is_not_idle() {
    let clock = FakeClock::new();
    let config = RegistryConfig {
        idle_unload: Some(Duration::from_secs(1)),
        ..RegistryConfig::default()
    };
    let (registry, _) = registry(
        &["a"],
        FakeLoader::new(100, &[]),
        config,
        Arc::clone(&clock),
    );
    let a = registry.acquire("a", None).await.unwrap();
    // A request in the queue: the engine counts it until it is admitted and finished.
    a.engine.live().parked.store(1, Ordering::Relaxed);
    clock.advance(Duration::from_secs(10));
    assert!(registry.reap().await.is_empty());
    a.engine.live().parked.store(0, Ordering::Relaxed);
    // Seen busy just now: idle from that moment.
    assert!(registry.reap().await.is_empty());
    drop(a);
    clock.advance(Duration::from_secs(1));
    assert_eq!(registry.reap().await, ["a"]);
}

#[tokio::test]
async fn a_failed_load_is_reported_and_the_others_keep_serving() {
    let clock = FakeClock::new();
    let mut loader = FakeLoader::new(100, &[]);
    loader.broken.push("broken".into());
    let (registry, loader) = registry(
        &["good", "broken"],
        loader,
        RegistryConfig::default(),
        clock,
    );
    let good = registry.acquire("good", None).await.unwrap();
    let err = registry.acquire("broken", None).await.err().unwrap();
    assert!(
        matches!(&err, RegistryError::LoadFailed { id, reason } if id == "broken" && reason.contains("truncated")),
        "{err}"
    );
    let status = registry.status("broken").unwrap();
    assert_eq!(status.state, State::Failed);
    assert!(status.reason.unwrap().contains("truncated"));
    assert_eq!(state_of(&registry, "good"), State::Loaded);
    assert!(good.engine.model_info().is_some());
    // A later request tries again (the file may have been fixed), and fails again here.
    assert!(registry.acquire("broken", None).await.is_err());
    assert_eq!(loader.starts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn memory_that_runs_out_unloads_idle_models_first_and_names_the_holders_when_it_cannot() {
    let clock = FakeClock::new();
    let (registry, _) = registry(
        &["small", "medium", "large", "huge"],
        FakeLoader::new(
            100,
            &[("small", 30), ("medium", 40), ("large", 60), ("huge", 150)],
        ),
        RegistryConfig {
            models_max: 4,
            ..RegistryConfig::default()
        },
        Arc::clone(&clock),
    );
    registry.acquire("small", None).await.unwrap();
    clock.advance(Duration::from_secs(1));
    registry.acquire("medium", None).await.unwrap();
    clock.advance(Duration::from_secs(1));
    // 30 + 40 + 60 > 100: the least recently used (small) goes, then it fits.
    registry.acquire("large", None).await.unwrap();
    assert_eq!(
        states(&registry),
        [
            ("small".into(), State::Unloaded),
            ("medium".into(), State::Loaded),
            ("large".into(), State::Loaded),
            ("huge".into(), State::Unloaded)
        ]
    );
    // Never fits: every idle model is unloaded trying, and the error says why.
    let err = registry.acquire("huge", None).await.err().unwrap();
    assert!(err.to_string().contains("huge needs 150"), "{err}");
    assert_eq!(state_of(&registry, "huge"), State::Failed);
}

#[tokio::test]
async fn a_busy_model_is_not_unloaded_for_memory() {
    let clock = FakeClock::new();
    let (registry, _) = registry(
        &["a", "b"],
        FakeLoader::new(100, &[("a", 60), ("b", 60)]),
        RegistryConfig::default(),
        clock,
    );
    let a = registry.acquire("a", None).await.unwrap();
    a.engine.live().parked.store(1, Ordering::Relaxed);
    let err = registry.acquire("b", None).await.err().unwrap();
    assert!(err.to_string().contains("held by [\"a\"]"), "{err}");
    assert_eq!(state_of(&registry, "a"), State::Loaded);
    a.engine.live().parked.store(0, Ordering::Relaxed);
}

#[tokio::test]
async fn without_autoload_a_request_names_the_state_and_explicit_load_and_unload_work() {
    let clock = FakeClock::new();
    let config = RegistryConfig {
        autoload: false,
        unload_timeout: Duration::from_millis(200),
        ..RegistryConfig::default()
    };
    let (registry, _) = registry(&["a"], FakeLoader::new(100, &[]), config, clock);
    let err = registry.acquire("a", None).await.err().unwrap();
    assert!(
        matches!(
            err,
            RegistryError::NotLoaded {
                state: "unloaded",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("/v1/models/load"));
    registry.load("a").await.unwrap();
    registry.acquire("a", None).await.unwrap();
    let a = registry.status("a").unwrap().running.unwrap().engine;
    // `a` holds a handle, as a request would: past the unload deadline the engine ends anyway.
    registry.unload("a").await.unwrap();
    assert_eq!(state_of(&registry, "a"), State::Unloaded);
    assert!(
        a.embed(vec![vec![1]]).is_err(),
        "the engine thread has ended"
    );
    // Unloading an unloaded model is a no-op.
    registry.unload("a").await.unwrap();
    assert!(matches!(
        registry.acquire("missing", None).await.err().unwrap(),
        RegistryError::NotFound(_)
    ));
}

#[tokio::test]
async fn an_unload_waits_for_the_requests_of_its_model() {
    let clock = FakeClock::new();
    let (registry, _) = registry(
        &["a"],
        FakeLoader::new(100, &[]),
        RegistryConfig::default(),
        clock,
    );
    let a = registry.acquire("a", None).await.unwrap();
    let request = crate::engine::GenerationRequest {
        prompt: b"hello, world".iter().map(|&b| i32::from(b)).collect(),
        sampling: Default::default(),
        max_new_tokens: 8,
        stop: Vec::new(),
        special_tokens: false,
        logprobs: None,
        usage: None,
    };
    let mut events = a.engine.submit(request).unwrap();
    drop(a);
    registry.unload("a").await.unwrap();
    // The request finished before the engine ended.
    let mut done = false;
    while let Some(event) = events.recv().await {
        done |= matches!(event, crate::engine::GenerationEvent::Done { .. });
    }
    assert!(done);
}

#[tokio::test]
async fn names_resolve_by_id_alias_and_latest_and_a_rescan_adds_and_removes() {
    let clock = FakeClock::new();
    let known: Arc<Mutex<Vec<ModelCard>>> = Arc::new(Mutex::new(vec![card("a"), {
        let mut b = card("qwen:7b");
        b.found.source = Source::Ollama;
        b.aliases = vec!["q".into()];
        b
    }]));
    let scan = Arc::clone(&known);
    let registry = Registry::new(
        Box::new(move || scan.lock().unwrap().clone()),
        Arc::new(FakeLoader::new(100, &[])),
        RegistryConfig::default(),
        clock,
    );
    assert_eq!(registry.resolve("a").unwrap(), "a");
    assert_eq!(registry.resolve("a:latest").unwrap(), "a");
    assert_eq!(registry.resolve("q").unwrap(), "qwen:7b");
    assert!(matches!(
        registry.resolve("qwen"),
        Err(RegistryError::NotFound(_))
    ));
    registry.acquire("a", None).await.unwrap();
    *known.lock().unwrap() = vec![card("c")];
    let report = registry.rescan();
    assert_eq!(report.added, ["c"]);
    assert_eq!(report.removed, ["qwen:7b"]);
    // Gone from the store but loaded: kept until unloaded, then removed.
    assert_eq!(report.kept, ["a"]);
    assert!(registry.resolve("qwen:7b").is_err());
    registry.unload("a").await.unwrap();
    assert_eq!(states(&registry), [("c".into(), State::Unloaded)]);
}
