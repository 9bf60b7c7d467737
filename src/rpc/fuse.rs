//! The relay between llama.cpp's RPC client and one worker: a loopback listener, and a thread per
//! connection llama.cpp opens (it opens one per worker while it holds buffers there, and short
//! ones to read device memory).
//!
//! Each relayed connection passes requests and answers through unchanged and in order. It reads
//! the few it must: allocations and frees (the link's measured use), and the size of each answer
//! (so it can stand in for one). When the worker's side fails — connection refused, reset, closed
//! — the link is marked lost and the relay keeps serving llama.cpp from [`wire::stand_in`]:
//! draining what it sends, answering what it waits for, until llama.cpp hangs up. A worker also
//! counts as lost when one read or write takes longer than the link's deadline (`--rpc-timeout`: a
//! hung worker fails its model's requests instead of holding the engine thread, and the registry's
//! lock behind it, forever), or when it answers something that would reach a ggml assertion
//! ([`wire::check_answer`]). Plain threads and blocking sockets: the protocol is strictly
//! request–answer, and the runtime never carries model weights.
//!
//! The relay's port is on loopback, where any local user could connect to it (and so to the
//! worker, through this process). It serves only connections opened by this process (llama.cpp's):
//! on Linux the peer's socket must be one of this process's file descriptors.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::wire::{self, Answer};
use super::{Link, LinkState, RpcError};

/// Requests at most this long are read whole before they are forwarded (the ones the relay
/// inspects are all a few hundred bytes); longer ones (tensor data, graphs) are streamed.
const INSPECT_LIMIT: u64 = 4096;
/// Buffer sizes for streaming tensor data.
const CHUNK: usize = 1 << 20;

/// Opens the relay for `worker` on an ephemeral loopback port; `deadline` bounds each read and
/// write on the worker's side.
pub fn start(worker: &str, deadline: std::time::Duration) -> Result<Arc<Link>, RpcError> {
    let relay_error = |e: io::Error| RpcError::Relay {
        endpoint: worker.to_owned(),
        reason: e.to_string(),
    };
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(relay_error)?;
    let link = Arc::new(Link {
        worker: worker.to_owned(),
        relay: listener.local_addr().map_err(relay_error)?,
        deadline,
        lost: AtomicBool::new(false),
        state: Mutex::new(LinkState::default()),
    });
    let accepting = Arc::clone(&link);
    std::thread::Builder::new()
        .name("rpc-relay".to_owned())
        .spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if !from_this_process(&client) {
                    tracing::warn!(
                        peer = ?client.peer_addr().ok(),
                        "refused a connection to the RPC relay from another process"
                    );
                    continue;
                }
                let link = Arc::clone(&accepting);
                let spawned = std::thread::Builder::new()
                    .name("rpc-relay-conn".to_owned())
                    .spawn(move || relay(client, &link));
                if let Err(err) = spawned {
                    tracing::error!(%err, "cannot start an RPC relay thread");
                }
            }
        })
        .map_err(relay_error)?;
    tracing::info!(worker, relay = %link.relay, "RPC worker linked");
    Ok(link)
}

/// The worker's side of one relayed connection; `None` once it failed.
struct Upstream {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

fn relay(client: TcpStream, link: &Link) {
    link.lock().connections += 1;
    let _ = client.set_nodelay(true);
    let mut upstream = match super::connect(&link.worker).and_then(|stream| {
        let deadline = Some(link.deadline);
        stream
            .set_read_timeout(deadline)
            .and_then(|()| stream.set_write_timeout(deadline))
            .map_err(|e| super::RpcError::Unreachable {
                endpoint: link.worker.clone(),
                reason: e.to_string(),
            })?;
        Ok(stream)
    }) {
        Ok(stream) => stream.try_clone().ok().map(|read| Upstream {
            reader: BufReader::with_capacity(CHUNK, read),
            writer: BufWriter::with_capacity(CHUNK, stream),
        }),
        Err(err) => {
            link.lose(err.to_string());
            None
        }
    };
    if let Ok(read) = client.try_clone() {
        let mut from = BufReader::with_capacity(CHUNK, read);
        let mut to = BufWriter::new(client);
        // Ends when llama.cpp hangs up (its client never sends a malformed frame).
        let _ = serve(&mut from, &mut to, &mut upstream, link);
    }
    link.lock().connections -= 1;
}

/// Relays requests until the client's side ends (`Err` from reading or writing it).
fn serve(
    from: &mut impl Read,
    to: &mut impl Write,
    upstream: &mut Option<Upstream>,
    link: &Link,
) -> io::Result<()> {
    loop {
        let mut cmd = [0u8; 1];
        from.read_exact(&mut cmd)?;
        let cmd = cmd[0];
        let size = wire::read_u64(from)?;
        let head = if size <= INSPECT_LIMIT {
            let mut head = vec![0u8; size as usize];
            from.read_exact(&mut head)?;
            Some(head)
        } else {
            None
        };
        forward(from, cmd, size, head.as_deref(), upstream, link)?;
        let Some(answer) = wire::answer(cmd) else {
            if cmd == wire::FREE_BUFFER {
                if let Some(ptr) = head.as_deref().and_then(|h| le_u64(h, 0)) {
                    link.lock().buffers.remove(&ptr);
                }
            }
            continue;
        };
        let expected = match answer {
            Answer::Fixed(n) => n,
            Answer::Requested => head
                .as_deref()
                .and_then(|h| le_u64(h, h.len().saturating_sub(8)))
                .unwrap_or(0) as usize,
        };
        let received = upstream.as_mut().map(|u| {
            receive(&mut u.reader, expected)
                .map_err(|err| match err.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                        "it did not answer within {} s (--rpc-timeout)",
                        link.deadline.as_secs_f64()
                    ),
                    _ => format!("it stopped answering: {err}"),
                })
                .and_then(|reply| wire::check_answer(cmd, head.as_deref(), &reply).map(|()| reply))
        });
        let reply = match received {
            Some(Ok(reply)) => reply,
            Some(Err(reason)) => {
                link.lose(reason);
                *upstream = None;
                wire::stand_in(cmd, expected, head.as_deref())
            }
            None => wire::stand_in(cmd, expected, head.as_deref()),
        };
        if cmd == wire::ALLOC_BUFFER && upstream.is_some() {
            let device = head.as_deref().and_then(|h| le_u32(h, 0));
            if let (Some(device), Some(ptr), Some(bytes)) =
                (device, le_u64(&reply, 0), le_u64(&reply, 8))
            {
                if ptr != 0 {
                    link.lock().buffers.insert(ptr, (device, bytes));
                }
            }
        }
        to.write_all(&(reply.len() as u64).to_le_bytes())?;
        to.write_all(&reply)?;
        to.flush()?;
    }
}

/// Sends one request on to the worker (if it is still there), streaming a payload that was not
/// read whole. A failure on the worker's side loses the link; the rest of the payload is still
/// read from the client.
fn forward(
    from: &mut impl Read,
    cmd: u8,
    size: u64,
    head: Option<&[u8]>,
    upstream: &mut Option<Upstream>,
    link: &Link,
) -> io::Result<()> {
    let mut failed: Option<io::Error> = None;
    let mut send = |upstream: &mut Option<Upstream>, bytes: &[u8]| {
        if let Some(u) = upstream.as_mut() {
            if let Err(err) = u.writer.write_all(bytes) {
                failed = Some(err);
                *upstream = None;
            }
        }
    };
    send(upstream, &[cmd]);
    send(upstream, &size.to_le_bytes());
    match head {
        Some(head) => send(upstream, head),
        None => {
            let mut left = size;
            let mut chunk = vec![0u8; CHUNK];
            while left > 0 {
                let n = (left.min(CHUNK as u64)) as usize;
                // The client's side failing ends the relay.
                from.read_exact(&mut chunk[..n])?;
                send(upstream, &chunk[..n]);
                left -= n as u64;
            }
        }
    }
    if let Some(u) = upstream.as_mut() {
        if let Err(err) = u.writer.flush() {
            failed = Some(err);
            *upstream = None;
        }
    }
    if let Some(err) = failed {
        link.lose(format!("sending to it failed: {err}"));
    }
    Ok(())
}

/// Reads one answer of `expected` bytes from the worker.
fn receive(reader: &mut impl Read, expected: usize) -> io::Result<Vec<u8>> {
    let size = wire::read_u64(reader)?;
    if size != expected as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("an answer of {size} bytes where {expected} were due"),
        ));
    }
    let mut reply = vec![0u8; expected];
    reader.read_exact(&mut reply)?;
    Ok(reply)
}

fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// Whether `client`'s other end is a socket of this process (llama.cpp's RPC client): its address
/// is looked up in `/proc/net/tcp{,6}` for the socket's inode, which must be one of this process's
/// descriptors. Elsewhere than Linux, every connection is taken.
fn from_this_process(client: &TcpStream) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    let Ok(peer) = client.peer_addr() else {
        return false;
    };
    let wanted: Vec<String> = socket_inodes(peer)
        .into_iter()
        .map(|inode| format!("socket:[{inode}]"))
        .collect();
    !wanted.is_empty()
        && std::fs::read_dir("/proc/self/fd").is_ok_and(|fds| {
            fds.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| wanted.iter().any(|w| target.as_os_str() == w.as_str()))
            })
        })
}

/// The inodes of the TCP sockets whose local address is `addr`, from `/proc/net/tcp` (IPv4) or
/// `/proc/net/tcp6`. An earlier connection from the same port may linger in TIME_WAIT (inode 0)
/// beside the live one, so every match counts.
fn socket_inodes(addr: std::net::SocketAddr) -> Vec<u64> {
    let (table, local) = match addr {
        std::net::SocketAddr::V4(v4) => (
            "/proc/net/tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            ),
        ),
        std::net::SocketAddr::V6(v6) => {
            let words: String = v6
                .ip()
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{words}:{:04X}", v6.port()))
        }
    };
    let Ok(text) = std::fs::read_to_string(table) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()))
                .then(|| fields.get(9)?.parse().ok())
                .flatten()
        })
        .filter(|inode| *inode != 0)
        .collect()
}
