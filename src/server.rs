//! Process-level serving: start the engine thread, bind, serve, and shut down cleanly.
//!
//! On SIGINT/SIGTERM the listener stops accepting, in-flight requests (streams included) get up to
//! `--shutdown-timeout` to finish, every model is unloaded, then the process exits 0. A `-m` model
//! that fails to load ends the process with the reason (a store's model that fails is `failed` and
//! the others keep serving). Each load plans its placement first (see `registry::loader`). SIGHUP
//! rescans the stores.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::unproven::{Proof, Unproven};
use crate::api::{self, AppState, PlacementView};
use crate::config::{ModelsConfig, SandboxConfig, ServeConfig};
use crate::gpu::inventory::{Inventory, InventorySource, NvmlSource, Shared, WithRemote};
use crate::gpu::placement::{spawn_poller, POLL_INTERVAL};
use crate::registry::loader::LlamaLoader;
use crate::registry::{ModelCard, Registry, SystemClock};
use crate::sandbox::container::SandboxState;
use crate::sandbox::image::{Docker, Progress};
use crate::sandbox::ssh::SshExecutor;
use crate::sandbox::tenants::{TenantConfig, Tenants};
use crate::sandbox::{AuditLog, Sandbox};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the engine thread: {0}")]
    Spawn(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the model failed to load: {0}")]
    Load(String),
    #[error(transparent)]
    Placement(#[from] crate::gpu::placement::PlacementError),
    #[error("--sandbox: {0}")]
    Sandbox(String),
    #[error("--rpc: {0}")]
    Rpc(String),
}

/// The sandbox `--sandbox` asks for: its executor (connecting lazily) and audit log. An
/// unreachable container is logged, not fatal: requests get 503 until it is back.
async fn open_sandbox(config: &SandboxConfig) -> Result<Sandbox, ServeError> {
    // Key ids in the audit log are keyed with this install's secret.
    let secret = config.dir.join("key-id.secret");
    crate::api::auth::load_key_id_secret(&secret).map_err(|e| {
        ServeError::Sandbox(format!("cannot read or create {}: {e}", secret.display()))
    })?;
    let state = SandboxState::load(&config.dir).map_err(|e| ServeError::Sandbox(e.to_string()))?;
    let mut ssh = state
        .ssh_config(
            &config.dir,
            config.connect_timeout,
            config.concurrency,
            config.output_limit,
        )
        .map_err(|e| ServeError::Sandbox(e.to_string()))?;
    ssh.queue_timeout = config.queue_timeout;
    let audit = AuditLog::open_with_limit(&config.audit_log, config.audit_max)
        .await
        .map_err(|e| {
            ServeError::Sandbox(format!(
                "cannot open the audit log {}: {e}",
                config.audit_log.display()
            ))
        })?;
    let executor = SshExecutor::new(ssh.clone());
    // The container `up` started answers for the sandbox as a whole: reachable means Docker and
    // the image work, and tenants start from the same image.
    match executor.check().await {
        Ok(()) => tracing::info!(
            audit_log = %config.audit_log.display(),
            max_tenants = config.max_tenants,
            disk_mib = config.disk_bytes >> 20,
            "sandbox connected; commands run in a container per tenant"
        ),
        Err(e) => {
            tracing::warn!(%e, "sandbox not reachable yet; /v1/sandbox/exec answers 503 until it is")
        }
    }
    let tenants = Tenants::new(TenantConfig {
        docker: Docker::new(state.docker.clone(), Progress::Quiet),
        state,
        ssh,
        disk_bytes: config.disk_bytes,
        max_tenants: config.max_tenants,
        max_sessions: config.max_sessions,
        idle_stop: config.idle_stop,
        idle_remove: config.idle_remove,
        record: config.dir.join("tenants.json"),
    });
    Ok(Sandbox::new(tenants, audit, config.limits.clone()))
}

/// Every model the configuration names: the `-m` files (the first with `--alias`es), then the
/// stores' (a store that cannot be read is logged and skipped; an id seen twice keeps the first).
fn catalog(models: &ModelsConfig) -> Vec<ModelCard> {
    let mut cards = Vec::new();
    for (i, path) in models.files.iter().enumerate() {
        let aliases = if i == 0 {
            models.aliases.clone()
        } else {
            Vec::new()
        };
        match ModelCard::from_file(path, aliases) {
            Ok(card) => cards.push(card),
            Err(e) => tracing::error!(path = %path.display(), %e, "cannot read a -m model"),
        }
    }
    let (found, errors) = crate::store::discover(&models.stores);
    for error in errors {
        tracing::warn!("{error}");
    }
    for model in found {
        if cards.iter().any(|c| c.id() == model.id) {
            tracing::warn!(id = %model.id, path = %model.path.display(), "a model with this id is known already; skipping this one");
            continue;
        }
        cards.push(ModelCard::found(model));
    }
    for (id, preset) in &models.presets {
        let Some(path) = &preset.path else { continue };
        if cards.iter().any(|c| c.id() == id) {
            continue;
        }
        match ModelCard::from_file(path, Vec::new()) {
            Ok(mut card) => {
                card.found.id = id.clone();
                card.pinned = false;
                cards.push(card);
            }
            Err(e) => tracing::error!(path = %path.display(), %e, "cannot read a preset's model"),
        }
    }
    cards
        .into_iter()
        .map(|card| match models.presets.get(card.id()) {
            Some(preset) => card.with_preset(preset),
            None => card,
        })
        .collect()
}

/// Each `-m` model's id and how its load ended.
type Preloaded = Vec<(String, Result<(), String>)>;

/// A server accepting connections; its `-m` models may still be loading.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// `--ollama-port`'s address, serving the same routes.
    pub ollama_addr: Option<SocketAddr>,
    ollama_task: Option<JoinHandle<std::io::Result<()>>>,
    pub registry: Arc<Registry>,
    /// The GPU reading before any model loaded.
    before: Inventory,
    /// The `-m` models' loads: each model's id and outcome.
    preload: watch::Receiver<Option<Preloaded>>,
    reaper: JoinHandle<()>,
    rescan: JoinHandle<()>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Starts serving HTTP on `config.host:config.port` and loads the `-m` models in the background
/// (`/health` says 503 meanwhile). The stores' models load when a request names them.
pub async fn start(config: &ServeConfig) -> Result<RunningServer, ServeError> {
    let sandbox = match &config.sandbox {
        Some(sandbox) => Some(open_sandbox(sandbox).await?),
        None => None,
    };
    // RPC workers first: an unreachable one is an error naming it, and their devices are part of
    // every inventory reading from here on.
    let (endpoints, deadline) = (config.rpc.clone(), config.rpc_timeout);
    let links =
        tokio::task::spawn_blocking(move || crate::engine::link_workers(&endpoints, deadline))
            .await
            .map_err(|e| ServeError::Rpc(format!("linking task: {e}")))?
            .map_err(|e| ServeError::Rpc(e.to_string()))?;
    // Plans ask the workers for their memory; the 2-second poller only re-reads what this process
    // allocated on them (asking would open a connection to every idle worker each time).
    let polled = links.clone();
    let source: Arc<dyn InventorySource + Send + Sync> = Arc::new(WithRemote {
        local: NvmlSource,
        remote: Arc::new(move || crate::engine::remote_gpus(&links, true)),
    });
    let poll_source: Arc<dyn InventorySource + Send + Sync> = Arc::new(WithRemote {
        local: NvmlSource,
        remote: Arc::new(move || crate::engine::remote_gpus(&polled, false)),
    });
    let reader = Arc::clone(&source);
    let before = tokio::task::spawn_blocking(move || reader.read())
        .await
        .map_err(|e| ServeError::Load(format!("GPU inventory task: {e}")))?
        .map_err(crate::gpu::placement::PlacementError::from)?;
    if let Some(reason) = &before.unavailable {
        tracing::info!("{reason}");
    }
    let loader = LlamaLoader::new(
        config.engine.clone(),
        config.placement.clone(),
        Box::new(Shared(Arc::clone(&source))),
    );
    let models = config.models.clone();
    let registry = tokio::task::spawn_blocking(move || {
        let scan = models.clone();
        Registry::new(
            Box::new(move || catalog(&scan)),
            Arc::new(loader),
            models.registry.clone(),
            Arc::new(SystemClock),
        )
    })
    .await
    .map_err(|e| ServeError::Load(format!("model scan task: {e}")))?;
    let addr = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: format!("{}:{}", config.host, config.port),
        source,
    })?;
    let gpus = spawn_poller(before.clone(), POLL_INTERVAL, poll_source);
    let view = PlacementView {
        placement: None,
        before: before.clone(),
        gpus,
    };
    let state = AppState::with_registry(
        Arc::clone(&registry),
        config.api.clone(),
        Some(view),
        sandbox,
    );
    let app = api::router(state.clone());
    let (stop, stopped) = watch::channel(false);
    let (ollama_addr, ollama_task) = match config.ollama_port {
        None => (None, None),
        Some(port) => {
            let second = format!("{}:{port}", config.host);
            let listener = TcpListener::bind(&second)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: second.clone(),
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| ServeError::Bind {
                addr: second,
                source,
            })?;
            tracing::info!(addr = %bound, "listening for Ollama clients");
            let task = tokio::spawn(serve_connections(
                listener,
                app.clone(),
                config.http.header_timeout,
                stopped.clone(),
            ));
            (Some(bound), Some(task))
        }
    };
    let task = tokio::spawn(serve_connections(
        listener,
        app,
        config.http.header_timeout,
        stopped,
    ));
    tracing::info!(%addr, "listening");
    let (preloaded, preload) = watch::channel(None);
    let loading = Arc::clone(&registry);
    tokio::spawn(async move {
        let results = loading.preload().await;
        preloaded.send_replace(Some(
            results
                .into_iter()
                .map(|(id, r)| (id, r.map_err(|e| e.to_string())))
                .collect(),
        ));
    });
    let reaper = registry.spawn_reaper(REAP_INTERVAL);
    let rescan = spawn_rescan_on_hangup(Arc::clone(&registry), state);
    Ok(RunningServer {
        addr,
        ollama_addr,
        ollama_task,
        registry,
        before,
        preload,
        reaper,
        rescan,
        stop,
        task,
    })
}

/// How often idle models are looked for.
const REAP_INTERVAL: Duration = Duration::from_secs(1);

/// Rescans the stores on every SIGHUP.
fn spawn_rescan_on_hangup(registry: Arc<Registry>, state: AppState) -> JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangups.recv().await.is_some() {
                let registry = Arc::clone(&registry);
                let _ = tokio::task::spawn_blocking(move || registry.rescan()).await;
                state.forget_unloaded();
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (registry, state);
        }
    })
}

/// Most connections open at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;

/// Most connections open at once that have not sent a request yet; a new one beyond it closes
/// the oldest of them (see `api::unproven`).
pub const MAX_UNPROVEN_CONNECTIONS: usize = 256;

/// The accept loop: each connection served by hyper (HTTP/1.1 with a deadline for the request
/// headers, so a client that trickles them cannot hold a connection)
/// until `stopped`, then no new connections and the open ones finish (graceful shutdown). A
/// connection that sends nothing within the header deadline is closed (hyper's own deadline starts
/// at the first byte), and at most [`MAX_CONNECTIONS`] are open at once, so idle sockets cannot
/// exhaust file descriptors. Of those, at most [`MAX_UNPROVEN_CONNECTIONS`] may be silent (no
/// request yet): a client without a key cannot fill the server's connections and keep a keyed
/// client out.
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower_http::add_extension::AddExtension;

    // HTTP/1.1 only: every client of this server speaks it, and hyper's version-sniffing
    // connection (`auto`) is cancelled outright by a graceful shutdown before it has read enough
    // bytes, which could drop a request that had just arrived.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let unproven = Unproven::new(MAX_UNPROVEN_CONNECTIONS);
    loop {
        let (socket, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop_requested(&mut stopped) => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tracing::warn!(
                limit = MAX_CONNECTIONS,
                "too many open connections; closing a new one"
            );
            continue;
        };
        let _ = socket.set_nodelay(true);
        let (ticket, evicted) = unproven.enter();
        let service = TowerToHyperService::new(AddExtension::new(app.clone(), Proof::new(ticket)));
        let builder = Arc::clone(&builder);
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Closed to make room for a newer silent connection; `Err` only means this one sent a
            // request (its ticket left the queue).
            let evicted = async {
                if evicted.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::pin!(evicted);
            // Silent connections are closed at the header deadline.
            let mut first = [0u8; 1];
            tokio::select! {
                peeked = tokio::time::timeout(header_timeout, socket.peek(&mut first)) => match peeked {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => return,
                },
                _ = &mut evicted => return,
            }
            // Upgrades: LM Studio's SDK speaks over websockets (an upgraded socket lives on in
            // its own task; shutdown waits for HTTP connections only).
            let connection = builder
                .serve_connection(TokioIo::new(socket), service)
                .with_upgrades();
            tokio::pin!(connection);
            // A client's broken connection is its own business; nothing to report.
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = &mut evicted => {}
                _ = stop_requested(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    // Every connection holds a permit until it has finished: all back means all done.
    let _ = open.acquire_many(MAX_CONNECTIONS as u32).await;
    Ok(())
}

/// Resolves once `stopped` says true, or its sender is gone (which also means stop).
async fn stop_requested(stopped: &mut watch::Receiver<bool>) {
    loop {
        let stop = *stopped.borrow_and_update();
        if stop || stopped.changed().await.is_err() {
            return;
        }
    }
}

impl RunningServer {
    /// Waits until every `-m` model has loaded; an error naming the first that failed.
    pub async fn ready(&self) -> Result<(), ServeError> {
        let mut preload = self.preload.clone();
        let results = preload
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ServeError::Load("the server stopped while loading".into()))?
            .clone()
            .unwrap_or_default();
        for (id, result) in results {
            result.map_err(|e| ServeError::Load(format!("{id}: {e}")))?;
        }
        Ok(())
    }

    /// The engine of a loaded model (tests).
    pub fn engine(&self, model: &str) -> Option<crate::engine::EngineHandle> {
        self.registry.status(model).ok()?.running.map(|r| r.engine)
    }

    /// Stops accepting and gives in-flight requests `grace` to finish. Then unloads every model,
    /// waiting up to `grace` for each engine thread to free its model and context: llama.cpp's GPU
    /// buffers must be released before the process exits and the CUDA runtime tears down.
    /// Returns whether both happened in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.stop.send_replace(true);
        self.reaper.abort();
        self.rescan.abort();
        let both = async {
            if let Some(task) = self.ollama_task {
                // Ignored result: the main listener's outcome is the one reported.
                let _ = task.await;
            }
            self.task.await
        };
        let finished = match tokio::time::timeout(grace, both).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    grace_s = grace.as_secs(),
                    "in-flight requests did not finish in time"
                );
                false
            }
        };
        let joined = self.registry.shutdown(grace).await;
        finished && joined
    }
}

/// Serves until SIGINT/SIGTERM, then shuts down gracefully. A `-m` model that fails to load ends
/// the process, as it did with one model.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let server = start(&config).await?;
    tokio::select! {
        loaded = server.ready() => {
            if let Err(e) = loaded {
                server.shutdown(config.shutdown_timeout).await;
                return Err(e);
            }
            let models: Vec<String> = server.registry.list().iter().map(|m| m.card.id().to_owned()).collect();
            tracing::info!(addr = %server.addr, ?models, "ready");
            log_measured(&server).await;
            shutdown_signal().await;
        }
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    server.shutdown(config.shutdown_timeout).await;
    Ok(())
}

/// Logs, per loaded model and planned GPU, the memory the load took against the plan (NVML,
/// before vs. now).
async fn log_measured(server: &RunningServer) {
    let Ok(Ok(now)) = tokio::task::spawn_blocking(|| NvmlSource.read()).await else {
        return;
    };
    for status in server.registry.list() {
        let Some(running) = status.running else {
            continue;
        };
        let Some(placement) = &running.placement else {
            continue;
        };
        let plan = &placement.plan;
        if plan.devices.iter().all(|d| d.total == 0) {
            continue;
        }
        let allocated = running.allocated();
        for m in crate::gpu::placement::measure(plan, &server.before, &now, &allocated) {
            tracing::info!(
                model = status.card.id(),
                gpu = %m.pci_bus_id,
                planned_mib = m.planned >> 20,
                allocated_mib = m.allocated.map(|a| a >> 20),
                allocated_difference_percent = m.allocated_difference_percent,
                used_mib = m.used >> 20,
                used_difference_percent = m.difference_percent,
                "GPU memory after loading: llama.cpp's allocations and NVML's reading (which adds the CUDA runtime's own context) against the plan"
            );
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}
