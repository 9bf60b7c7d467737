//! llama.cpp's RPC workers: other machines' devices (or this one's, for tests) that take layers.
//!
//! llama.cpp's RPC client aborts the whole process when a worker it talks to goes away
//! (`GGML_ABORT("Remote RPC server crashed…")`), and it connects to whatever endpoint it is given.
//! So llama.cpp never talks to a worker directly: each `--rpc HOST:PORT` gets a [`Link`], a relay on
//! a loopback port of this process ([`fuse`]) that llama.cpp connects to instead. The relay passes
//! the protocol through, records what the worker allocated (the measured use `/v1/placement`
//! reports), and when the worker goes away it marks the link lost and answers llama.cpp's pending
//! requests itself, so the engine that used it fails its requests and the server stays up.
//!
//! This module knows sockets and the wire format, never llama.cpp's API: `engine::llama` registers
//! each link's relay endpoint as llama.cpp's RPC server.

pub mod fuse;
pub mod wire;

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The port `rpc-worker` listens on by default (llama.cpp's `rpc-server` default).
pub const DEFAULT_PORT: u16 = 50052;

/// How long connecting to a worker and its handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("--rpc {0:?}: expected HOST:PORT")]
    Endpoint(String),
    #[error("RPC worker {endpoint} is unreachable: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("RPC worker {endpoint} speaks protocol {found}, this build {wanted}")]
    Version {
        endpoint: String,
        found: String,
        wanted: String,
    },
    #[error("cannot open a relay for RPC worker {endpoint}: {reason}")]
    Relay { endpoint: String, reason: String },
}

/// Checks `HOST:PORT` (a name or an address, and a port) and returns it as written.
pub fn parse_endpoint(text: &str) -> Result<String, RpcError> {
    let bad = || RpcError::Endpoint(text.to_owned());
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(text.to_owned())
}

/// Whether `host` (an address or `localhost`) is a loopback address.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn resolve(endpoint: &str) -> Result<SocketAddr, RpcError> {
    endpoint
        .to_socket_addrs()
        .map_err(|e| e.to_string())
        .and_then(|mut addrs| addrs.next().ok_or_else(|| "no address".to_owned()))
        .map_err(|reason| RpcError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason,
        })
}

/// Connects to a worker, with [`CONNECT_TIMEOUT`] and Nagle off (every request is small and
/// waited on).
pub fn connect(endpoint: &str) -> Result<TcpStream, RpcError> {
    let addr = resolve(endpoint)?;
    let stream =
        TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| RpcError::Unreachable {
            endpoint: endpoint.to_owned(),
            reason: e.to_string(),
        })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects, says hello and hangs up: whether a worker answers, in this build's protocol version.
/// A worker serves one client at a time, so this must not run while llama.cpp is connected to it.
pub fn probe(endpoint: &str) -> Result<(), RpcError> {
    let mut stream = connect(endpoint)?;
    let unreachable = |reason: String| RpcError::Unreachable {
        endpoint: endpoint.to_owned(),
        reason,
    };
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| unreachable(e.to_string()))?;
    let version =
        wire::hello(&mut stream).map_err(|e| unreachable(format!("no handshake: {e}")))?;
    if version.0 != wire::PROTO_MAJOR {
        return Err(RpcError::Version {
            endpoint: endpoint.to_owned(),
            found: format!("{}.{}.{}", version.0, version.1, version.2),
            wanted: format!("{}.x", wire::PROTO_MAJOR),
        });
    }
    Ok(())
}

/// One worker as this process reaches it: the relay llama.cpp connects to, whether the worker is
/// lost, and what llama.cpp has allocated on each of its devices.
#[derive(Debug)]
pub struct Link {
    /// The worker's `HOST:PORT`, as given to `--rpc`.
    pub worker: String,
    /// The relay's loopback address: the endpoint llama.cpp is told.
    pub relay: SocketAddr,
    /// The deadline of each read and write on the worker's side (`--rpc-timeout`).
    pub deadline: Duration,
    lost: AtomicBool,
    state: Mutex<LinkState>,
}

#[derive(Debug, Default)]
struct LinkState {
    /// Why the worker was lost, while it is.
    lost: Option<String>,
    /// Relayed connections open now.
    connections: usize,
    /// Buffers allocated on the worker: remote pointer → (device, bytes).
    buffers: HashMap<u64, (u32, u64)>,
}

impl Link {
    /// Why the worker is lost, or `None` while it answers.
    pub fn lost(&self) -> Option<String> {
        if !self.lost.load(Ordering::Acquire) {
            return None;
        }
        self.lock().lost.clone()
    }

    /// Bytes llama.cpp holds on the worker's device `device`, as the worker reported allocating
    /// them.
    pub fn allocated(&self, device: u32) -> u64 {
        self.lock()
            .buffers
            .values()
            .filter(|(d, _)| *d == device)
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// Before a load: a lost worker with no relayed connection left is probed again, and found
    /// again if it answers (a restarted worker). `Err` names the worker and why it is unusable.
    pub fn ready(&self) -> Result<(), RpcError> {
        let Some(reason) = self.lost() else {
            return Ok(());
        };
        if self.lock().connections > 0 {
            return Err(RpcError::Unreachable {
                endpoint: self.worker.clone(),
                reason,
            });
        }
        probe(&self.worker)?;
        self.lock().lost = None;
        self.lost.store(false, Ordering::Release);
        tracing::info!(worker = %self.worker, "RPC worker answers again");
        Ok(())
    }

    fn lose(&self, reason: String) {
        let mut state = self.lock();
        if state.lost.is_none() {
            tracing::error!(worker = %self.worker, %reason, "RPC worker lost");
            state.lost = Some(reason);
            // Nothing it held survives it.
            state.buffers.clear();
        }
        self.lost.store(true, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        // A std Mutex: held for a map update, never across I/O; a relay thread that panicked
        // left the map consistent (each update is one statement).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every link this process opened. llama.cpp's device registry is process-wide, so the links
/// that back its RPC devices are too; a worker named twice gets one link.
fn links() -> &'static Mutex<Vec<Arc<Link>>> {
    static LINKS: OnceLock<Mutex<Vec<Arc<Link>>>> = OnceLock::new();
    LINKS.get_or_init(Mutex::default)
}

/// The link to `worker`: probed and relayed the first time it is named, each read and write on
/// its connections bounded by `deadline` (a link opened earlier keeps its own).
pub fn open(worker: &str, deadline: Duration) -> Result<Arc<Link>, RpcError> {
    let worker = parse_endpoint(worker)?;
    let mut all = links().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(link) = all.iter().find(|l| l.worker == worker) {
        return Ok(Arc::clone(link));
    }
    probe(&worker)?;
    let link = fuse::start(&worker, deadline)?;
    all.push(Arc::clone(&link));
    Ok(link)
}

/// The link whose relay llama.cpp knows as `relay` (an RPC device's description).
pub fn by_relay(relay: &str) -> Option<Arc<Link>> {
    let all = links().lock().unwrap_or_else(|e| e.into_inner());
    all.iter().find(|l| l.relay.to_string() == relay).cloned()
}

/// The link to `worker`, if one is open.
pub fn by_worker(worker: &str) -> Option<Arc<Link>> {
    let all = links().lock().unwrap_or_else(|e| e.into_inner());
    all.iter().find(|l| l.worker == worker).cloned()
}

/// The placement id of device `index` of `worker`, in the inventory's `pci_bus_id` slot.
pub fn device_id(worker: &str, index: u32) -> String {
    format!("rpc:{worker}/{index}")
}

/// The worker and device index a placement id names, for an RPC device.
pub fn parse_device_id(id: &str) -> Option<(&str, u32)> {
    let rest = id.strip_prefix("rpc:")?;
    let (worker, index) = rest.rsplit_once('/')?;
    Some((worker, index.parse().ok()?))
}

#[cfg(test)]
mod tests;
