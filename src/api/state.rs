//! The HTTP layer's state: its configuration, the registry it serves, and what it keeps (keys,
//! permits, stored conversations and responses, the loaded models' compiled templates).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use super::keys::ApiKey;
use super::origin::BrowserPolicy;
use super::{auth, lmstudio, model_facts, responses, unproven};
use crate::engine::{EngineHandle, EngineState, ModelInfo};
use crate::gpu::inventory::Inventory;
use crate::gpu::placement::Placement;
use crate::metrics::Metrics;
use crate::registry::{KeepAlive, ModelCard, Registry};
use crate::sandbox::Sandbox;
use crate::template::{ChatTemplate, CHATML};

/// What the HTTP layer is configured with.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// For a state over one running engine (`AppState::new`): the names its model answers to,
    /// id first. A server's models come from its registry.
    pub model_ids: Vec<String>,
    /// Empty: no key needed.
    pub api_keys: Vec<ApiKey>,
    /// Server-wide cap on generated tokens (`--n-predict`).
    pub n_predict: Option<u32>,
    /// A `--chat-template-file` that replaces the model's own template.
    pub chat_template: Option<String>,
    /// For a state over one running engine: `created` of its model object.
    pub created: u64,
    /// The most `sandbox.max_tool_rounds` a request may ask for (`--sandbox-max-tool-rounds`).
    pub max_tool_rounds: u32,
    /// Requests handled at once (`--max-in-flight`); more are shed with 503.
    pub max_in_flight: usize,
    /// Time a client gets to send a whole request body (`--body-timeout`).
    pub body_timeout: Duration,
    /// Interval of SSE keep-alive comments (`--sse-keep-alive`).
    pub sse_keep_alive: Duration,
    /// `/health` shows the git revision and backends (`--health-build-info`).
    pub health_build_info: bool,
    /// Serve `GET /metrics` (`--metrics`).
    pub metrics: bool,
    /// `/metrics` needs no key (`--metrics-public`).
    pub metrics_public: bool,
    /// For a state over one running engine: its model file (what `/api/show` reads).
    pub model_path: Option<std::path::PathBuf>,
    /// Which `Origin`s and `Host`s browsers may reach the server from.
    pub browser: BrowserPolicy,
    /// LM Studio SDK websockets open at once (`--max-websockets`).
    pub max_websockets: usize,
    /// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`
    /// (`--responses-max`), and their bytes (`--responses-max-bytes`).
    pub responses_max: usize,
    pub responses_max_bytes: usize,
}

impl Default for ApiConfig {
    /// The CLI's defaults, for tests and embedders.
    fn default() -> Self {
        Self {
            model_ids: Vec::new(),
            api_keys: Vec::new(),
            n_predict: None,
            chat_template: None,
            created: 0,
            max_tool_rounds: 16,
            max_in_flight: 256,
            body_timeout: Duration::from_secs(30),
            sse_keep_alive: Duration::from_secs(15),
            health_build_info: false,
            metrics: false,
            metrics_public: false,
            model_path: None,
            browser: BrowserPolicy::default(),
            max_websockets: 64,
            responses_max: 1024,
            responses_max_bytes: 256 << 20,
        }
    }
}

impl ApiConfig {
    pub fn system_fingerprint(&self) -> String {
        format!("lm-sandbox-{}", crate::build_info::GIT_REVISION)
    }
}

/// The loaded model as the HTTP side uses it.
pub struct Loaded {
    pub info: ModelInfo,
    pub template: ChatTemplate,
}

/// A request's model: loaded, with its engine, facts and compiled template.
#[derive(Clone)]
pub struct Served {
    /// The name the request used (an id or an alias), echoed in responses.
    pub name: String,
    pub card: Arc<ModelCard>,
    pub engine: EngineHandle,
    pub loaded: Arc<Loaded>,
}

impl Served {
    /// The registry's id of the model.
    pub fn id(&self) -> &str {
        self.card.id()
    }
}

struct Shared {
    registry: Arc<Registry>,
    config: ApiConfig,
    /// `config.api_keys` with their ids and rate buckets.
    keys: auth::Keys,
    /// `--max-websockets` permits, held by each SDK socket for its life; see `lmstudio::socket`.
    websockets: Arc<Semaphore>,
    /// SDK sockets that have not sent their passkey yet.
    waiting_sockets: Arc<unproven::Unproven>,
    /// Per model id, the facts of its engine's current load and its compiled template. A std
    /// Mutex: held only to compare a load id and clone an `Arc`, never across an await.
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
    placement: Option<PlacementView>,
    sandbox: Option<Sandbox>,
    /// `--max-in-flight` permits; see `limits`.
    in_flight: Arc<Semaphore>,
    /// Requests shed because every permit was taken.
    shed: AtomicU64,
    /// With `--metrics`.
    metrics: Option<Arc<Metrics>>,
    /// Each model file's facts, read once (`model_facts`).
    facts: Mutex<HashMap<std::path::PathBuf, Arc<tokio::sync::OnceCell<Arc<model_facts::Facts>>>>>,
    /// LM Studio v1 chat threads (`store: true`), bounded.
    threads: lmstudio::Threads,
    /// Stored Responses, bounded, per key.
    responses: responses::ResponseStore,
}

/// The GPU reading at start-up and the live readings, for `GET /v1/placement` (each loaded
/// model's plan comes from the registry).
pub struct PlacementView {
    /// The plan of a server over one running engine (tests and embedders); `None` when the
    /// registry's models carry their own.
    pub placement: Option<Placement>,
    /// The reading before any model loaded.
    pub before: Inventory,
    pub gpus: watch::Receiver<Inventory>,
}

/// Cheap to clone: everything lives behind one `Arc`.
#[derive(Clone)]
pub struct AppState {
    shared: Arc<Shared>,
}

/// The registry over one running engine, named as `config.model_ids` says.
fn single(engine: EngineHandle, config: &ApiConfig) -> Arc<Registry> {
    let id = config.model_ids.first().cloned().unwrap_or_default();
    let path = config.model_path.clone().unwrap_or_default();
    let mut card = ModelCard::found(crate::store::FoundModel {
        id,
        source: crate::store::Source::File,
        path: path.clone(),
        parts: vec![path],
        size: 0,
        digest: None,
        params: Default::default(),
        system: None,
    });
    card.aliases = config.model_ids.iter().skip(1).cloned().collect();
    card.pinned = true;
    card.created = config.created;
    Registry::with_engine(card, engine)
}

impl AppState {
    /// A state over one running engine, without a placement (`GET /v1/placement` answers with
    /// nulls).
    pub fn new(engine: EngineHandle, config: ApiConfig) -> Self {
        Self::from_parts(engine, config, None, None)
    }

    /// A state over one running engine that shows `placement` and the live `gpus` readings at
    /// `GET /v1/placement`.
    pub fn with_placement(
        engine: EngineHandle,
        config: ApiConfig,
        placement: Placement,
        gpus: watch::Receiver<Inventory>,
    ) -> Self {
        let before = gpus.borrow().clone();
        Self::from_parts(
            engine,
            config,
            Some(PlacementView {
                placement: Some(placement),
                before,
                gpus,
            }),
            None,
        )
    }

    /// One running engine and everything else at once; `sandbox` mounts `POST /v1/sandbox/exec`.
    pub fn from_parts(
        engine: EngineHandle,
        config: ApiConfig,
        placement: Option<PlacementView>,
        sandbox: Option<Sandbox>,
    ) -> Self {
        let registry = single(engine, &config);
        Self::with_registry(registry, config, placement, sandbox)
    }

    /// A state over the model registry (the server's).
    pub fn with_registry(
        registry: Arc<Registry>,
        config: ApiConfig,
        placement: Option<PlacementView>,
        sandbox: Option<Sandbox>,
    ) -> Self {
        let metrics = config.metrics.then(|| Arc::new(Metrics::new()));
        if let Some(metrics) = &metrics {
            let metrics = Arc::clone(metrics);
            registry.on_started(Box::new(move |model, engine| {
                let metrics = Arc::clone(&metrics);
                let model = model.to_owned();
                // Ignored error: an engine already observed (a second state over it) keeps its hook.
                let _ = engine.live().on_finished.set(Box::new(move |stats| {
                    metrics.observe_generation(&model, stats);
                }));
            }));
        }
        let sandbox = match (&metrics, sandbox) {
            (Some(metrics), Some(sandbox)) => Some(sandbox.with_metrics(Arc::clone(metrics))),
            (_, sandbox) => sandbox,
        };
        Self {
            shared: Arc::new(Shared {
                registry,
                loaded: Mutex::default(),
                placement,
                sandbox,
                in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
                keys: auth::Keys::new(&config.api_keys),
                websockets: Arc::new(Semaphore::new(config.max_websockets)),
                waiting_sockets: unproven::Unproven::new(lmstudio::MAX_UNAUTHENTICATED),
                shed: AtomicU64::new(0),
                metrics,
                facts: Mutex::default(),
                threads: lmstudio::Threads::default(),
                responses: responses::ResponseStore::new(
                    config.responses_max,
                    config.responses_max_bytes,
                ),
                config,
            }),
        }
    }

    /// The Responses store.
    pub(super) fn responses(&self) -> &responses::ResponseStore {
        &self.shared.responses
    }

    /// LM Studio v1 chat's threads.
    pub(super) fn lmstudio_threads(&self) -> &lmstudio::Threads {
        &self.shared.threads
    }

    /// Where a model file's facts are kept once read.
    pub(super) fn model_facts(
        &self,
        path: &std::path::Path,
    ) -> Arc<tokio::sync::OnceCell<Arc<model_facts::Facts>>> {
        let mut facts = self.shared.facts.lock().expect("facts cache");
        Arc::clone(facts.entry(path.to_owned()).or_default())
    }

    /// The metrics, with `--metrics`.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.shared.metrics.as_ref()
    }

    /// The server's keys.
    pub fn keys(&self) -> &auth::Keys {
        &self.shared.keys
    }

    /// A permit for one more SDK websocket, or `None` when `--max-websockets` are open.
    pub fn try_open_websocket(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.shared.websockets).try_acquire_owned().ok()
    }

    /// SDK sockets waiting for their first message.
    pub(super) fn waiting_sockets(&self) -> &Arc<unproven::Unproven> {
        &self.shared.waiting_sockets
    }

    /// A permit for one more request in flight, or `None` (counted) when all are taken.
    pub fn try_begin_request(&self) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.shared.in_flight).try_acquire_owned().ok();
        if permit.is_none() {
            self.shared.shed.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    /// Requests in flight now, and requests shed since start.
    pub fn request_counts(&self) -> (usize, u64) {
        let free = self.shared.in_flight.available_permits();
        (
            self.shared.config.max_in_flight.saturating_sub(free),
            self.shared.shed.load(Ordering::Relaxed),
        )
    }

    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.shared.sandbox.as_ref()
    }

    pub fn placement(&self) -> Option<&PlacementView> {
        self.shared.placement.as_ref()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.shared.registry
    }

    pub fn config(&self) -> &ApiConfig {
        &self.shared.config
    }

    /// Every model the registry knows that the request's caller may use (all of them outside a
    /// request, or for a key without a models allowlist): what model listings show.
    pub fn listed_models(&self) -> Vec<crate::registry::ModelStatus> {
        let caller = auth::current_caller();
        self.shared
            .registry
            .list()
            .into_iter()
            .filter(|status| {
                caller.as_ref().is_none_or(|caller| {
                    std::iter::once(status.card.id())
                        .chain(status.card.aliases.iter().map(String::as_str))
                        .any(|name| caller.require_model(name, status.card.id()).is_ok())
                })
            })
            .collect()
    }

    /// The model `requested` names, loaded (waiting for its load if needed).
    pub async fn model(&self, requested: &str) -> Result<Served, ApiError> {
        self.model_keep(requested, None).await
    }

    /// As [`AppState::model`], with how long it stays loaded once idle (a dialect's `keep_alive`).
    pub async fn model_keep(
        &self,
        requested: &str,
        keep: Option<KeepAlive>,
    ) -> Result<Served, ApiError> {
        // A key limited to some models is refused before anything is loaded for it.
        if let Some(caller) = auth::current_caller() {
            let id = self.shared.registry.resolve(requested)?;
            caller.require_model(requested, &id)?;
        }
        let acquired = self.shared.registry.acquire(requested, keep).await?;
        let loaded = self.loaded(&acquired.card, &acquired.engine)?;
        Ok(Served {
            name: requested.to_owned(),
            card: acquired.card,
            engine: acquired.engine,
            loaded,
        })
    }

    /// The model a request gets that names none (`requested` when it does).
    pub async fn model_or_default(&self, requested: Option<&str>) -> Result<Served, ApiError> {
        match requested {
            Some(name) => self.model(name).await,
            None => {
                let id = self.shared.registry.default_model().ok_or_else(|| {
                    ApiError::ModelNotFound("(none given, and this server has no model)".into())
                })?;
                self.model(&id).await
            }
        }
    }

    /// A model's facts and compiled template; 503 unless its engine is ready (after a fault,
    /// while it reloads).
    fn loaded(&self, card: &ModelCard, engine: &EngineHandle) -> Result<Arc<Loaded>, ApiError> {
        let id = card.id();
        let info = match engine.state() {
            EngineState::Ready(info) => info,
            EngineState::Loading => return Err(ApiError::Loading),
            EngineState::Failed(reason) => return Err(ApiError::Unavailable(reason)),
            EngineState::Stopped => {
                return Err(ApiError::Unavailable("the engine has stopped".into()))
            }
        };
        let mut cache = self.shared.loaded.lock().expect("loaded-model cache");
        if let Some(loaded) = cache.get(id).filter(|l| l.info.load_id == info.load_id) {
            return Ok(Arc::clone(loaded));
        }
        let loaded = Arc::new(Loaded {
            template: self.compile_template(card, &info),
            info,
        });
        cache.insert(id.to_owned(), Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Forgets what was cached of the models that are not loaded (their tokenizer holds the
    /// weights in memory).
    pub fn forget_unloaded(&self) {
        let loaded: std::collections::HashSet<String> = self
            .shared
            .registry
            .list()
            .into_iter()
            .filter(|s| s.running.is_some())
            .map(|s| s.card.id().to_owned())
            .collect();
        self.shared
            .loaded
            .lock()
            .expect("loaded-model cache")
            .retain(|id, _| loaded.contains(id));
    }

    /// The model's preset `template-file`, else `--chat-template-file` (both checked at start-up),
    /// else the GGUF's template, else ChatML.
    fn compile_template(&self, card: &ModelCard, info: &ModelInfo) -> ChatTemplate {
        let candidates = [
            card.preset.template.as_deref(),
            self.shared.config.chat_template.as_deref(),
            info.chat_template.as_deref(),
        ];
        for source in candidates.into_iter().flatten() {
            match ChatTemplate::new(source) {
                Ok(template) => return template,
                Err(err) => tracing::warn!(%err, "chat template unusable; trying the next"),
            }
        }
        ChatTemplate::new(CHATML).expect("the built-in ChatML template compiles")
    }
}
