//! Process-level serving: start the engine thread, bind, serve, and shut down cleanly.
//!
//! On SIGINT/SIGTERM the listener stops accepting, in-flight requests (streams included) get up to
//! `--shutdown-timeout` to finish, then the process exits 0. A model that fails to load ends the
//! process with the reason. Before loading, the GPUs are read and the placement planned; a plan that
//! cannot fit ends the process with the planner's numbers.

use std::net::SocketAddr;
use std::sync::Arc;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState, PlacementView};
use crate::config::{SandboxConfig, ServeConfig};
use crate::engine::{spawn_llama_engine, EngineHandle, EngineState, GpuOffload};
use crate::gpu::inventory::{Inventory, InventorySource, NvmlSource};
use crate::gpu::placement::{decide, spawn_poller, Placement, POLL_INTERVAL};
use crate::gpu::plan::SplitMode;
use crate::gpu::report;
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
    let audit = AuditLog::open(&config.audit_log).await.map_err(|e| {
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
        idle_stop: config.idle_stop,
        idle_remove: config.idle_remove,
        record: config.dir.join("tenants.json"),
    });
    Ok(Sandbox::new(tenants, audit, config.limits.clone()))
}

/// Reads the GPUs and plans the placement (blocking: NVML and the GGUF header).
fn place(config: &ServeConfig) -> Result<(Placement, Inventory), ServeError> {
    let inventory = NvmlSource
        .read()
        .map_err(crate::gpu::placement::PlacementError::from)?;
    if let Some(reason) = &inventory.unavailable {
        tracing::info!("{reason}");
    }
    let engine = &config.engine;
    let (placement, facts) = decide(
        &engine.model_path,
        engine.n_ctx,
        engine.n_seq,
        &config.placement,
        &inventory,
    )?;
    tracing::info!(
        "placement plan:\n{}",
        report::plan_table(&placement.plan, facts.n_layer)
    );
    Ok((placement, inventory))
}

/// The plan in llama.cpp's terms: the GPUs that hold something, in device order.
fn offload(placement: &Placement, config: &ServeConfig) -> GpuOffload {
    let plan = &placement.plan;
    let used: Vec<_> = plan
        .devices
        .iter()
        .filter(|d| d.end_layer > d.first_layer || d.output > 0)
        .collect();
    GpuOffload {
        n_gpu_layers: plan.n_gpu_layers,
        devices: used.iter().map(|d| d.pci_bus_id.clone()).collect(),
        single_gpu: config.placement.split_mode == SplitMode::None,
        layers: used.iter().map(|d| d.end_layer - d.first_layer).collect(),
        bytes: used.iter().map(|d| d.total).collect(),
        n_layer: placement.model.n_layer,
    }
}

/// A server accepting connections; the model may still be loading.
pub struct RunningServer {
    pub addr: SocketAddr,
    /// `--ollama-port`'s address, serving the same routes.
    pub ollama_addr: Option<SocketAddr>,
    ollama_task: Option<JoinHandle<std::io::Result<()>>>,
    pub engine: EngineHandle,
    /// The plan and the GPU reading it was made from.
    placement: (crate::gpu::plan::Plan, Inventory),
    engine_thread: std::thread::JoinHandle<()>,
    stop: watch::Sender<bool>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Spawns the engine (the model loads in the background; `/health` says 503 meanwhile) and starts
/// serving HTTP on `config.host:config.port`.
pub async fn start(config: &ServeConfig) -> Result<RunningServer, ServeError> {
    let placing = config.clone();
    let (placement, inventory) = tokio::task::spawn_blocking(move || place(&placing))
        .await
        .map_err(|e| ServeError::Load(format!("placement task: {e}")))??;
    let sandbox = match &config.sandbox {
        Some(sandbox) => Some(open_sandbox(sandbox).await?),
        None => None,
    };
    let mut engine_config = config.engine.clone();
    engine_config.offload = offload(&placement, config);
    // The context size the plan was made for (0 meant the model's trained context).
    engine_config.n_ctx = placement.model.n_ctx;
    let (engine, engine_thread) = spawn_llama_engine(engine_config).map_err(ServeError::Spawn)?;
    let addr = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: format!("{}:{}", config.host, config.port),
        source,
    })?;
    let gpus = spawn_poller(inventory.clone(), POLL_INTERVAL);
    let planned = (placement.plan.clone(), inventory.clone());
    let view = PlacementView {
        placement,
        before: inventory,
        gpus,
    };
    let state = AppState::from_parts(engine.clone(), config.api.clone(), Some(view), sandbox);
    let app = api::router(state);
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
    Ok(RunningServer {
        addr,
        ollama_addr,
        ollama_task,
        engine,
        placement: planned,
        engine_thread,
        stop,
        task,
    })
}

/// Most connections open at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 4096;

/// The accept loop: each connection served by hyper (HTTP/1.1 with a deadline for the request
/// headers, so a client that trickles them cannot hold a connection)
/// until `stopped`, then no new connections and the open ones finish (graceful shutdown). A
/// connection that sends nothing within the header deadline is closed (hyper's own deadline starts
/// at the first byte), and at most [`MAX_CONNECTIONS`] are open at once, so idle sockets cannot
/// exhaust file descriptors.
pub async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // HTTP/1.1 only: every client of this server speaks it, and hyper's version-sniffing
    // connection (`auto`) is cancelled outright by a graceful shutdown before it has read enough
    // bytes, which could drop a request that had just arrived.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
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
        let service = TowerToHyperService::new(app.clone());
        let builder = Arc::clone(&builder);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            // Silent connections are closed at the header deadline.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, socket.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            // A client's broken connection is its own business; nothing to report.
            let _ = watcher.watch(connection).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
    /// Waits until the model is loaded; an error if it failed.
    pub async fn ready(&self) -> Result<(), ServeError> {
        match self.engine.wait_loaded().await {
            EngineState::Ready(_) => Ok(()),
            EngineState::Failed(reason) => Err(ServeError::Load(reason)),
            other => Err(ServeError::Load(format!(
                "engine ended while loading ({other:?})"
            ))),
        }
    }

    /// Stops accepting and gives in-flight requests `grace` to finish. Then, once the router (and
    /// with it every engine handle it held) is gone, waits up to `grace` for the engine thread to
    /// free the model and context: llama.cpp's GPU buffers must be released before the process
    /// exits and the CUDA runtime tears down. Returns whether both happened in time.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.stop.send_replace(true);
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
        drop(self.engine);
        let thread = self.engine_thread;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        let joined = tokio::time::timeout(grace, joined).await.is_ok();
        if !joined {
            tracing::warn!("the engine thread is still running (another engine handle is alive)");
        }
        finished && joined
    }
}

/// Serves until SIGINT/SIGTERM, then shuts down gracefully.
pub async fn run(config: ServeConfig) -> Result<(), ServeError> {
    let server = start(&config).await?;
    tokio::select! {
        loaded = server.ready() => {
            loaded?;
            tracing::info!(addr = %server.addr, models = ?config.api.model_ids, "ready");
            log_measured(&server).await;
            shutdown_signal().await;
        }
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down: no new connections; waiting for in-flight requests");
    server.shutdown(config.shutdown_timeout).await;
    Ok(())
}

/// Logs, per planned GPU, the memory the load took against the plan (NVML, before vs. now).
async fn log_measured(server: &RunningServer) {
    let (plan, before) = &server.placement;
    if plan.devices.iter().all(|d| d.total == 0) {
        return;
    }
    let Ok(Ok(now)) = tokio::task::spawn_blocking(|| NvmlSource.read()).await else {
        return;
    };
    let allocated = match server.engine.state() {
        EngineState::Ready(info) => info.device_memory,
        _ => Vec::new(),
    };
    for m in crate::gpu::placement::measure(plan, before, &now, &allocated) {
        tracing::info!(
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
