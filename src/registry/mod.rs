//! The model registry: every model the server knows (from `-m` files and the stores), its state,
//! and the engine of each loaded one. The API asks it for a model by name; it loads on demand,
//! unloads the least recently used model when `--models-max` or the GPUs' memory is reached, and
//! unloads idle models after `--idle-unload` or a request's `keep_alive`.
//!
//! Loads and unloads run one at a time, each in a task of its own (a client that gives up does not
//! cancel a load half-way), so a load racing an unload of the same model is serialized; requests
//! for loaded models never wait for them. Requests wait for a load on the `changes` watch, bounded
//! by `--load-timeout`. An unload drops the registry's engine handle: the engine thread finishes
//! the requests it holds and exits, freeing the model; after `unload_timeout` the rest are failed.
//!
//! Owns: ids and aliases, states, the load/unload order, the LRU and idle clocks.
//! Must not: know HTTP (the API maps [`RegistryError`] to statuses) or touch llama.cpp: a
//! [`Loader`] places and starts engines (`loader::LlamaLoader` for real; tests use fake ones).

pub mod loader;
pub mod policy;
pub mod preset;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::engine::{EngineHandle, EngineState};
use crate::gpu::placement::Placement;
use crate::store::{FoundModel, Source};

pub use policy::KeepAlive;
use policy::Usage;

/// A model the registry knows: what the store said of it, and how it is named.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelCard {
    #[serde(flatten)]
    pub found: FoundModel,
    /// Other names it answers to (`--alias`, presets).
    pub aliases: Vec<String>,
    /// Given with `-m`: loaded at start and kept while idle.
    pub pinned: bool,
    /// The file's modification time, seconds since the epoch (OpenAI's `created`).
    pub created: u64,
    /// Its `--models-preset` settings (empty: the server-wide flags).
    #[serde(skip)]
    pub preset: preset::Preset,
    /// Tokens per sequence a request asked for (Ollama's `num_ctx`): its loads take at least this.
    #[serde(skip)]
    pub ctx_per_seq: Option<u32>,
}

impl ModelCard {
    /// A `-m` file: its id is the file stem.
    pub fn from_file(path: &std::path::Path, aliases: Vec<String>) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        let id = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| std::io::Error::other("the path has no file name"))?;
        let mut card = Self::found(FoundModel {
            id,
            source: Source::File,
            path: path.to_owned(),
            parts: vec![path.to_owned()],
            size: meta.len(),
            digest: None,
            params: Default::default(),
            system: None,
        });
        card.aliases = aliases;
        card.pinned = true;
        Ok(card)
    }

    /// A model a store found.
    pub fn found(found: FoundModel) -> Self {
        let created = std::fs::metadata(&found.path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        Self {
            found,
            aliases: Vec::new(),
            pinned: false,
            created,
            preset: preset::Preset::default(),
            ctx_per_seq: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.found.id
    }

    /// Applies its preset: aliases added, default options and system prompt over the store's.
    pub fn with_preset(mut self, preset: &preset::Preset) -> Self {
        for alias in &preset.aliases {
            if !self.aliases.contains(alias) && *alias != self.found.id {
                self.aliases.push(alias.clone());
            }
        }
        self.found.params.extend(preset.defaults.clone());
        if preset.system.is_some() {
            self.found.system = preset.system.clone();
        }
        self.preset = preset.clone();
        self
    }

    /// Whether `name` is this model: its id, an alias, either with `:latest` added, or an Ollama
    /// id without `:latest`.
    fn answers_to(&self, name: &str) -> bool {
        let named = |name: &str| self.found.id == name || self.aliases.iter().any(|a| a == name);
        named(name)
            // Ollama clients add `:latest` to any untagged name.
            || name.strip_suffix(":latest").is_some_and(named)
            || (self.found.source == Source::Ollama
                && self.found.id.strip_suffix(":latest") == Some(name))
    }
}

/// Where a model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Unloaded,
    Loading,
    Loaded,
    Unloading,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unloaded => "unloaded",
            Self::Loading => "loading",
            Self::Loaded => "loaded",
            Self::Unloading => "unloading",
            Self::Failed => "failed",
        }
    }
}

/// An engine a [`Loader`] started (its model may still be loading on its thread).
pub struct Started {
    pub engine: EngineHandle,
    pub thread: JoinHandle<()>,
    pub placement: Option<Placement>,
}

/// Why a loader could not start a model.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadFailure {
    /// The plan does not fit the memory that is free now: unloading an idle model may help. The
    /// message names every GPU's budget and what holds it.
    DoesNotFit(String),
    /// Anything else (a missing or corrupt file, a digest mismatch): final for this attempt.
    Failed(String),
}

/// What a loaded (or loading, or unloading) model holds, for planning the next load.
#[derive(Debug, Clone)]
pub struct Holding {
    pub id: String,
    pub placement: Placement,
    /// What llama.cpp allocated per GPU (PCI bus id, bytes); empty until loaded.
    pub allocated: Vec<(String, u64)>,
}

/// Places and starts engines. Blocking: it reads the GPUs and the file.
pub trait Loader: Send + Sync + 'static {
    /// Starts `card` beside `others`. Without `last_resort` a plan that only fits partly (layers
    /// on the CPU beside other models) is `DoesNotFit`, so an idle model is unloaded first; with
    /// it (nothing is left to unload) such a plan is used.
    fn start(
        &self,
        card: &ModelCard,
        others: &[Holding],
        last_resort: bool,
    ) -> Result<Started, LoadFailure>;
}

/// The time, for the LRU and idle clocks (tests move a fake one).
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The registry's flags, validated.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Models loaded at once (`--models-max`).
    pub models_max: usize,
    /// `--idle-unload`; `None` never unloads for idleness.
    pub idle_unload: Option<Duration>,
    /// Load a model when a request names it (`--no-models-autoload` turns this off).
    pub autoload: bool,
    /// How long a request waits for its model to load (`--load-timeout`).
    pub load_timeout: Duration,
    /// How long an unload waits for the model's requests before failing them.
    pub unload_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            models_max: 2,
            idle_unload: Some(Duration::from_secs(600)),
            autoload: true,
            load_timeout: Duration::from_secs(600),
            unload_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("the model {0:?} does not exist on this server")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error(
        "the model {id:?} is {state}, and this server loads models only when asked \
         (--no-models-autoload): POST /v1/models/load {{\"model\": \"{id}\"}} first"
    )]
    NotLoaded { id: String, state: &'static str },
    #[error("the model {id:?} failed to load: {reason}")]
    LoadFailed { id: String, reason: String },
    #[error("the model {id:?} did not finish loading within {seconds} s (--load-timeout)")]
    LoadTimeout { id: String, seconds: u64 },
    #[error("the server is shutting down")]
    Closed,
}

/// A loaded model, handed to a request.
#[derive(Clone)]
pub struct Acquired {
    pub card: Arc<ModelCard>,
    pub engine: EngineHandle,
}

/// One model as listings show it.
#[derive(Clone)]
pub struct ModelStatus {
    pub card: Arc<ModelCard>,
    pub state: State,
    /// Why it failed, for `Failed`.
    pub reason: Option<String>,
    /// Its engine, placement and load time while it has one.
    pub running: Option<RunningStatus>,
    /// When it will be unloaded if it stays idle (`None`: not loaded, or never).
    pub expires_at: Option<SystemTime>,
}

#[derive(Clone)]
pub struct RunningStatus {
    pub engine: EngineHandle,
    pub placement: Option<Placement>,
    pub loaded_at: SystemTime,
    pub load_ms: u64,
}

impl RunningStatus {
    /// What llama.cpp allocated per GPU while loading (PCI bus id, bytes); empty while loading.
    pub fn allocated(&self) -> Vec<(String, u64)> {
        self.engine
            .model_info()
            .map(|i| i.device_memory)
            .unwrap_or_default()
    }

    /// The layers llama.cpp put on each planned device, read back from its load (placement id,
    /// count); empty while loading or on the CPU alone.
    pub fn layers(&self) -> Vec<(String, u32)> {
        self.engine
            .model_info()
            .map(|i| i.device_layers)
            .unwrap_or_default()
    }
}

struct Running {
    engine: EngineHandle,
    thread: Option<JoinHandle<()>>,
    placement: Option<Placement>,
    loaded_at: SystemTime,
    load_ms: u64,
}

struct Entry {
    card: Arc<ModelCard>,
    state: State,
    reason: Option<String>,
    running: Option<Running>,
    last_used: Instant,
    keep: KeepAlive,
    /// Finished load attempts, so a waiter tells its own attempt's failure from an older one.
    attempts: u64,
    /// A rescan no longer finds it: removed once unloaded.
    gone: bool,
}

impl Entry {
    fn new(card: ModelCard, now: Instant) -> Self {
        Self {
            card: Arc::new(card),
            state: State::Unloaded,
            reason: None,
            running: None,
            last_used: now,
            keep: KeepAlive::Default,
            attempts: 0,
            gone: false,
        }
    }

    fn busy(&self) -> bool {
        self.running.as_ref().is_some_and(|r| {
            r.engine.queued() > 0
                || r.engine
                    .live()
                    .active
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
        })
    }
}

#[derive(Default)]
struct Inner {
    /// `-m` models first, then the stores' in scan order.
    entries: Vec<Entry>,
    /// Models with a load task spawned that has not started yet.
    pending: HashSet<String>,
    closed: bool,
}

impl Inner {
    fn entry(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.card.id() == id)
    }

    fn usage(&self, except: &str) -> Vec<Usage> {
        self.entries
            .iter()
            .filter(|e| e.state == State::Loaded && e.card.id() != except)
            .map(|e| Usage {
                id: e.card.id().to_owned(),
                last_used: e.last_used,
                busy: e.busy(),
                keep: e.keep,
                pinned: e.card.pinned,
            })
            .collect()
    }
}

/// Everything a rescan finds: the `-m` models and the stores' (called on SIGHUP and
/// `POST /v1/models/rescan`).
pub type Catalog = Box<dyn Fn() -> Vec<ModelCard> + Send + Sync>;

/// Called with every engine the registry starts (the metrics install their hook).
pub type StartedHook = Box<dyn Fn(&str, &EngineHandle) + Send + Sync>;

/// What a rescan changed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Rescan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Gone from the stores but loaded: removed once unloaded.
    pub kept: Vec<String>,
}

pub struct Registry {
    inner: Mutex<Inner>,
    /// Held by the one load or unload under way.
    ops: tokio::sync::Mutex<()>,
    /// Bumped on every state change; requests waiting for a load watch it.
    changes: watch::Sender<u64>,
    loader: Arc<dyn Loader>,
    catalog: Catalog,
    config: RegistryConfig,
    clock: Arc<dyn Clock>,
    on_started: OnceLock<StartedHook>,
}

impl Registry {
    /// A registry over `catalog()`'s models, none loaded yet (see [`Registry::preload`]).
    pub fn new(
        catalog: Catalog,
        loader: Arc<dyn Loader>,
        config: RegistryConfig,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let now = clock.now();
        let mut inner = Inner::default();
        for card in catalog() {
            if inner.entry(card.id()).is_none() {
                inner.entries.push(Entry::new(card, now));
            }
        }
        Arc::new(Self {
            inner: Mutex::new(inner),
            ops: tokio::sync::Mutex::new(()),
            changes: watch::channel(0).0,
            loader,
            catalog,
            config,
            clock,
            on_started: OnceLock::new(),
        })
    }

    /// One model already running on `engine`, and nothing to load (tests and embedders).
    pub fn with_engine(card: ModelCard, engine: EngineHandle) -> Arc<Self> {
        struct NoLoader;
        impl Loader for NoLoader {
            fn start(
                &self,
                card: &ModelCard,
                _: &[Holding],
                _: bool,
            ) -> Result<Started, LoadFailure> {
                Err(LoadFailure::Failed(format!(
                    "{} cannot be reloaded: this server was given a running engine",
                    card.id()
                )))
            }
        }
        let registry = Self::new(
            Box::new(Vec::new),
            Arc::new(NoLoader),
            RegistryConfig {
                idle_unload: None,
                ..RegistryConfig::default()
            },
            Arc::new(SystemClock),
        );
        let mut entry = Entry::new(card, Instant::now());
        entry.state = State::Loaded;
        entry.running = Some(Running {
            engine,
            thread: None,
            placement: None,
            loaded_at: SystemTime::now(),
            load_ms: 0,
        });
        registry.lock().entries.push(entry);
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry lock")
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Sets the hook told of every engine started from now on (once).
    pub fn on_started(&self, hook: StartedHook) {
        let _ = self.on_started.set(hook);
        if let Some(hook) = self.on_started.get() {
            for entry in &self.lock().entries {
                if let Some(running) = &entry.running {
                    hook(entry.card.id(), &running.engine);
                }
            }
        }
    }

    /// The id `name` refers to: an id, an alias, or an Ollama id without `:latest`.
    pub fn resolve(&self, name: &str) -> Result<String, RegistryError> {
        let inner = self.lock();
        let matches: Vec<&Entry> = inner
            .entries
            .iter()
            .filter(|e| (!e.gone || e.running.is_some()) && e.card.answers_to(name))
            .collect();
        // An exact id wins over another model's alias.
        if let Some(exact) = matches.iter().find(|e| e.card.id() == name) {
            return Ok(exact.card.id().to_owned());
        }
        match matches.as_slice() {
            [one] => Ok(one.card.id().to_owned()),
            [] => Err(RegistryError::NotFound(name.to_owned())),
            many => Err(RegistryError::Ambiguous(format!(
                "{name:?} names several models: {}",
                many.iter()
                    .map(|e| format!("{} ({})", e.card.id(), e.card.found.path.display()))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    /// The model a request that names none gets: the first `-m` model, else the only loaded one,
    /// else the first known.
    pub fn default_model(&self) -> Option<String> {
        let inner = self.lock();
        let loaded: Vec<&Entry> = inner
            .entries
            .iter()
            .filter(|e| e.state == State::Loaded)
            .collect();
        inner
            .entries
            .iter()
            .find(|e| e.card.pinned)
            .or(match loaded.as_slice() {
                [one] => Some(*one),
                _ => None,
            })
            .or(inner.entries.first())
            .map(|e| e.card.id().to_owned())
    }

    /// Every model and its state, in listing order.
    pub fn list(&self) -> Vec<ModelStatus> {
        let inner = self.lock();
        let now = self.clock.now();
        let wall = SystemTime::now();
        inner
            .entries
            .iter()
            .map(|e| ModelStatus {
                card: Arc::clone(&e.card),
                state: e.state,
                reason: e.reason.clone(),
                running: e.running.as_ref().map(|r| RunningStatus {
                    engine: r.engine.clone(),
                    placement: r.placement.clone(),
                    loaded_at: r.loaded_at,
                    load_ms: r.load_ms,
                }),
                expires_at: (e.state == State::Loaded)
                    .then(|| {
                        policy::expires_at(
                            e.last_used,
                            e.keep,
                            e.card.pinned,
                            self.config.idle_unload,
                        )
                    })
                    .flatten()
                    .map(|at| wall + at.saturating_duration_since(now)),
            })
            .collect()
    }

    /// One model's status.
    pub fn status(&self, name: &str) -> Result<ModelStatus, RegistryError> {
        let id = self.resolve(name)?;
        self.list()
            .into_iter()
            .find(|s| s.card.id() == id)
            .ok_or(RegistryError::NotFound(id))
    }

    /// The model `name`, loaded: at once if it is, else after its load (started here when
    /// autoload is on), waiting at most `--load-timeout`. `keep`, when given, replaces how long
    /// it stays loaded once idle.
    pub async fn acquire(
        self: &Arc<Self>,
        name: &str,
        keep: Option<KeepAlive>,
    ) -> Result<Acquired, RegistryError> {
        self.ensure_loaded(name, keep, self.config.autoload).await
    }

    /// Loads `name` (explicit control: `POST /v1/models/load`, whatever `--no-models-autoload`
    /// says), waiting as `acquire` does.
    pub async fn load(self: &Arc<Self>, name: &str) -> Result<String, RegistryError> {
        let acquired = self.ensure_loaded(name, None, true).await?;
        Ok(acquired.card.id().to_owned())
    }

    async fn ensure_loaded(
        self: &Arc<Self>,
        name: &str,
        keep: Option<KeepAlive>,
        autoload: bool,
    ) -> Result<Acquired, RegistryError> {
        let id = self.resolve(name)?;
        let deadline = tokio::time::Instant::now() + self.config.load_timeout;
        let mut changes = self.changes.subscribe();
        let mut attempt = None;
        loop {
            {
                let now = self.clock.now();
                let mut inner = self.lock();
                if inner.closed {
                    return Err(RegistryError::Closed);
                }
                let entry = inner
                    .entry(&id)
                    .ok_or_else(|| RegistryError::NotFound(id.clone()))?;
                if let (State::Loaded, Some(running)) = (entry.state, &entry.running) {
                    let acquired = Acquired {
                        card: Arc::clone(&entry.card),
                        engine: running.engine.clone(),
                    };
                    entry.last_used = now;
                    if let Some(keep) = keep {
                        entry.keep = keep;
                    }
                    return Ok(acquired);
                }
                match attempt {
                    Some(a) if entry.attempts > a && entry.state == State::Failed => {
                        return Err(RegistryError::LoadFailed {
                            id,
                            reason: entry.reason.clone().unwrap_or_default(),
                        });
                    }
                    Some(_) => {}
                    None if !autoload => {
                        return Err(RegistryError::NotLoaded {
                            id,
                            state: entry.state.as_str(),
                        });
                    }
                    None => {
                        attempt = Some(entry.attempts);
                        if entry.state != State::Loading {
                            self.spawn_load(&mut inner, &id);
                        }
                    }
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(RegistryError::Closed),
                Err(_) => {
                    return Err(RegistryError::LoadTimeout {
                        id,
                        seconds: self.config.load_timeout.as_secs(),
                    })
                }
            }
        }
    }

    /// Unloads `name` (explicit control, `keep_alive: 0`): waits for its requests (bounded), then
    /// its engine thread has ended and its memory is free. Unloading an unloaded model is a no-op.
    pub async fn unload(self: &Arc<Self>, name: &str) -> Result<String, RegistryError> {
        let id = self.resolve(name)?;
        let registry = Arc::clone(self);
        let task_id = id.clone();
        // A task of its own: a client that leaves does not stop an unload half-way.
        let task = tokio::spawn(async move {
            let _ops = registry.ops.lock().await;
            registry.unload_locked(&task_id, "asked to").await;
        });
        task.await.map_err(|_| RegistryError::Closed)?;
        Ok(id)
    }

    /// Reloads `name` with at least `per_seq` tokens per sequence (Ollama's `num_ctx`, as Ollama
    /// reloads for it): after the requests it is serving, like any unload. If the larger context
    /// cannot load, the model keeps its earlier setting and the error says why.
    pub async fn grow_context(
        self: &Arc<Self>,
        name: &str,
        per_seq: u32,
    ) -> Result<(), RegistryError> {
        let id = self.resolve(name)?;
        let registry = Arc::clone(self);
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let _ops = registry.ops.lock().await;
            let before = {
                let mut inner = registry.lock();
                let entry = inner.entry(&task_id)?;
                let before = entry.card.ctx_per_seq;
                let mut card = (*entry.card).clone();
                card.ctx_per_seq = Some(before.unwrap_or(0).max(per_seq));
                entry.card = Arc::new(card);
                before
            };
            let why = format!("to give it {per_seq} tokens per sequence (num_ctx)");
            registry.unload_locked(&task_id, &why).await;
            registry.run_load(&task_id).await;
            let mut inner = registry.lock();
            let entry = inner.entry(&task_id)?;
            if entry.state == State::Loaded {
                return Some(Ok(()));
            }
            let reason = entry.reason.clone().unwrap_or_default();
            let mut card = (*entry.card).clone();
            card.ctx_per_seq = before;
            entry.card = Arc::new(card);
            Some(Err(reason))
        });
        match task.await {
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(reason))) => Err(RegistryError::LoadFailed { id, reason }),
            Ok(None) => Err(RegistryError::NotFound(id)),
            Err(_) => Err(RegistryError::Closed),
        }
    }

    fn spawn_load(self: &Arc<Self>, inner: &mut Inner, id: &str) {
        if !inner.pending.insert(id.to_owned()) {
            return;
        }
        let registry = Arc::clone(self);
        let id = id.to_owned();
        tokio::spawn(async move {
            let _ops = registry.ops.lock().await;
            registry.run_load(&id).await;
        });
    }

    /// Loads `id`, holding the ops lock.
    async fn run_load(self: &Arc<Self>, id: &str) {
        {
            let mut inner = self.lock();
            inner.pending.remove(id);
            let closed = inner.closed;
            let Some(entry) = inner.entry(id) else { return };
            if entry.state == State::Loaded {
                return;
            }
            if closed {
                entry.state = State::Failed;
                entry.reason = Some("the server is shutting down".into());
                entry.attempts += 1;
                drop(inner);
                self.changed();
                return;
            }
            entry.state = State::Loading;
            entry.reason = None;
        }
        self.changed();
        let started = Instant::now();
        let result = self.place_and_start(id).await;
        let load_ms = started.elapsed().as_millis() as u64;
        {
            let now = self.clock.now();
            let mut inner = self.lock();
            let Some(entry) = inner.entry(id) else { return };
            entry.attempts += 1;
            match result {
                Ok((started, placement)) => {
                    if let Some(hook) = self.on_started.get() {
                        hook(id, &started.engine);
                    }
                    tracing::info!(model = id, load_ms, "model loaded");
                    entry.state = State::Loaded;
                    entry.last_used = now;
                    entry.running = Some(Running {
                        engine: started.engine,
                        thread: Some(started.thread),
                        placement,
                        loaded_at: SystemTime::now(),
                        load_ms,
                    });
                }
                Err(reason) => {
                    tracing::error!(model = id, %reason, "model failed to load");
                    entry.state = State::Failed;
                    entry.reason = Some(reason);
                }
            }
        }
        self.changed();
    }

    /// Makes room (`--models-max`, then memory), starts the engine and waits for its model to
    /// load. Holds the ops lock.
    async fn place_and_start(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<(Started, Option<Placement>), String> {
        loop {
            let victim = {
                let inner = self.lock();
                let usage = inner.usage(id);
                (usage.len() >= self.config.models_max)
                    .then(|| policy::pick_victim(&usage, true))
                    .flatten()
            };
            match victim {
                Some(victim) => {
                    let why = format!(
                        "to make room for {id} (--models-max {})",
                        self.config.models_max
                    );
                    self.unload_locked(&victim, &why).await;
                }
                None => break,
            }
        }
        let mut last_resort = false;
        loop {
            let (card, others) = {
                let inner = self.lock();
                let card = inner
                    .entries
                    .iter()
                    .find(|e| e.card.id() == id)
                    .map(|e| Arc::clone(&e.card))
                    .ok_or_else(|| format!("{id} is no longer known"))?;
                let others: Vec<Holding> = inner
                    .entries
                    .iter()
                    .filter(|e| e.card.id() != id)
                    .filter_map(|e| {
                        let running = e.running.as_ref()?;
                        Some(Holding {
                            id: e.card.id().to_owned(),
                            placement: running.placement.clone()?,
                            allocated: running
                                .engine
                                .model_info()
                                .map(|i| i.device_memory)
                                .unwrap_or_default(),
                        })
                    })
                    .collect();
                (card, others)
            };
            let loader = Arc::clone(&self.loader);
            let started =
                tokio::task::spawn_blocking(move || loader.start(&card, &others, last_resort))
                    .await
                    .map_err(|e| format!("the load task failed: {e}"))?;
            match started {
                Ok(started) => {
                    let placement = started.placement.clone();
                    return match started.engine.wait_loaded().await {
                        EngineState::Ready(_) => Ok((started, placement)),
                        EngineState::Failed(reason) => {
                            join_quietly(started.thread);
                            Err(reason)
                        }
                        other => {
                            join_quietly(started.thread);
                            Err(format!("the engine ended while loading ({other:?})"))
                        }
                    };
                }
                Err(LoadFailure::Failed(reason)) => return Err(reason),
                Err(LoadFailure::DoesNotFit(reason)) => {
                    let victim = policy::pick_victim(&self.lock().usage(id), false);
                    match victim {
                        Some(victim) => {
                            self.unload_locked(
                                &victim,
                                &format!("to make room for {id} on the GPUs"),
                            )
                            .await
                        }
                        None if !last_resort => last_resort = true,
                        None => return Err(reason),
                    }
                }
            }
        }
    }

    /// Unloads `id`, holding the ops lock: drops the registry's engine handle, so the engine
    /// thread finishes the requests it holds and exits; after `unload_timeout` it fails the rest.
    async fn unload_locked(&self, id: &str, why: &str) {
        let running = {
            let mut inner = self.lock();
            let Some(entry) = inner.entry(id) else { return };
            let Some(running) = entry.running.take() else {
                if entry.state != State::Failed {
                    entry.state = State::Unloaded;
                }
                return;
            };
            entry.state = State::Unloading;
            running
        };
        self.changed();
        tracing::info!(model = id, why, "unloading");
        let stopper = running.engine.stopper();
        drop(running.engine);
        if let Some(thread) = running.thread {
            let mut joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(self.config.unload_timeout, &mut joined)
                .await
                .is_err()
            {
                tracing::warn!(
                    model = id,
                    timeout_s = self.config.unload_timeout.as_secs(),
                    "requests still running at the unload deadline: failing them"
                );
                stopper.stop();
                if tokio::time::timeout(self.config.unload_timeout, &mut joined)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        model = id,
                        "the engine thread has not ended (a request still holds its handle); it ends with that request"
                    );
                }
            }
        }
        {
            let mut inner = self.lock();
            if let Some(entry) = inner.entry(id) {
                entry.state = State::Unloaded;
                entry.keep = KeepAlive::Default;
            }
            inner.entries.retain(|e| !(e.gone && e.running.is_none()));
        }
        tracing::info!(model = id, "unloaded");
        self.changed();
    }

    /// Loads every `-m` model (at start-up); resolves when each is loaded or failed.
    pub async fn preload(self: &Arc<Self>) -> Vec<(String, Result<(), RegistryError>)> {
        let pinned: Vec<String> = self
            .lock()
            .entries
            .iter()
            .filter(|e| e.card.pinned)
            .map(|e| e.card.id().to_owned())
            .collect();
        let mut results = Vec::new();
        for id in pinned {
            let result = self.load(&id).await.map(|_| ());
            results.push((id, result));
        }
        results
    }

    /// Unloads the models that are idle past their keep-alive; a busy model counts as used now.
    pub async fn reap(self: &Arc<Self>) -> Vec<String> {
        let due = {
            let now = self.clock.now();
            let mut inner = self.lock();
            for entry in inner.entries.iter_mut() {
                if entry.state == State::Loaded && entry.busy() {
                    entry.last_used = now;
                }
            }
            policy::idle_due(&inner.usage(""), now, self.config.idle_unload)
        };
        for id in &due {
            let _ops = self.ops.lock().await;
            // Still idle and due? A request may have come in meanwhile.
            let still = {
                let inner = self.lock();
                policy::idle_due(&inner.usage(""), self.clock.now(), self.config.idle_unload)
                    .contains(id)
            };
            if still {
                self.unload_locked(id, "idle").await;
            }
        }
        due
    }

    /// Runs [`Registry::reap`] every `interval` while the registry lives.
    pub fn spawn_reaper(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                if registry.lock().closed {
                    return;
                }
                registry.reap().await;
            }
        })
    }

    /// Reads the catalog again: new models are added, vanished ones removed (once unloaded).
    pub fn rescan(&self) -> Rescan {
        let found = (self.catalog)();
        let now = self.clock.now();
        let mut report = Rescan::default();
        {
            let mut inner = self.lock();
            for entry in inner.entries.iter_mut() {
                // `with_engine`'s model has no catalog behind it.
                if entry.card.pinned && entry.running.as_ref().is_some_and(|r| r.thread.is_none()) {
                    continue;
                }
                match found.iter().find(|c| c.id() == entry.card.id()) {
                    Some(card) => {
                        entry.gone = false;
                        if entry.running.is_none() && *card != *entry.card {
                            entry.card = Arc::new(card.clone());
                        }
                    }
                    None if entry.running.is_some() => {
                        entry.gone = true;
                        report.kept.push(entry.card.id().to_owned());
                    }
                    None => {
                        entry.gone = true;
                        report.removed.push(entry.card.id().to_owned());
                    }
                }
            }
            inner.entries.retain(|e| !(e.gone && e.running.is_none()));
            for card in found {
                if inner.entry(card.id()).is_none() {
                    report.added.push(card.id().to_owned());
                    inner.entries.push(Entry::new(card, now));
                }
            }
        }
        tracing::info!(
            added = report.added.len(),
            removed = report.removed.len(),
            kept = report.kept.len(),
            "models rescanned"
        );
        self.changed();
        report
    }

    /// Refuses new requests and unloads every model, giving each `grace` for its requests.
    /// Returns whether every engine thread ended in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        let running: Vec<(String, Running)> = {
            let mut inner = self.lock();
            inner.closed = true;
            inner
                .entries
                .iter_mut()
                .filter_map(|e| {
                    let running = e.running.take()?;
                    e.state = State::Unloading;
                    Some((e.card.id().to_owned(), running))
                })
                .collect()
        };
        self.changed();
        let mut all = true;
        for (id, running) in running {
            drop(running.engine);
            let Some(thread) = running.thread else {
                continue;
            };
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(grace, joined).await.is_err() {
                tracing::warn!(model = id, "the engine thread is still running");
                all = false;
            }
        }
        all
    }
}

/// Joins an engine thread that already failed, off the runtime.
fn join_quietly(thread: JoinHandle<()>) {
    tokio::task::spawn_blocking(move || {
        let _ = thread.join();
    });
}
