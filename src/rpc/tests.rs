//! The relay against a scripted worker (the real `rpc-worker` is in `tests/rpc.rs`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use super::wire::{self, read_u64};
use super::*;

#[test]
fn endpoints_need_a_host_and_a_port() {
    assert_eq!(
        parse_endpoint("127.0.0.1:50052").unwrap(),
        "127.0.0.1:50052"
    );
    assert_eq!(parse_endpoint("gpu-box:50052").unwrap(), "gpu-box:50052");
    assert!(parse_endpoint("[::1]:50052").is_ok());
    for bad in ["127.0.0.1", ":50052", "host:0", "host:port", "host:70000"] {
        assert!(parse_endpoint(bad).is_err(), "{bad}");
    }
    assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost"));
    assert!(!is_loopback("0.0.0.0") && !is_loopback("192.168.1.5") && !is_loopback("gpu-box"));
}

#[test]
fn device_ids_round_trip() {
    let id = device_id("10.0.0.2:50052", 1);
    assert_eq!(parse_device_id(&id), Some(("10.0.0.2:50052", 1)));
    assert_eq!(parse_device_id("0000:01:00.0"), None);
}

/// How a scripted worker goes wrong.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Hangs up on GRAPH_COMPUTE: a worker killed mid-generation.
    DiesOnCompute,
    /// Never answers GET_TENSOR, and keeps the connection open: a hung worker.
    HangsOnGetTensor,
    /// Answers BUFFER_GET_BASE with 0, which ggml asserts on.
    NullBase,
}

/// A worker killed mid-generation (see [`faulty_worker`]).
fn scripted_worker() -> String {
    faulty_worker(Fault::DiesOnCompute).0
}

/// A worker that answers HELLO, allocations (at 0x1000, 0x2000, …), BUFFER_GET_BASE and
/// GET_TENSOR (with 7s), and goes wrong as `fault` says. Returns its address and a count of the
/// connections it accepted.
fn faulty_worker(fault: Fault) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&accepted);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut s = stream.unwrap();
            let mut next_ptr = 0x1000u64;
            loop {
                let mut cmd = [0u8];
                if s.read_exact(&mut cmd).is_err() {
                    break;
                }
                let size = read_u64(&mut s).unwrap();
                let mut payload = vec![0u8; size as usize];
                s.read_exact(&mut payload).unwrap();
                let reply: Vec<u8> = match cmd[0] {
                    wire::HELLO => {
                        let mut r = vec![0u8; wire::HELLO_RESPONSE];
                        r[0] = wire::PROTO_MAJOR;
                        r
                    }
                    wire::ALLOC_BUFFER => {
                        let bytes = u64::from_le_bytes(payload[4..12].try_into().unwrap());
                        let mut r = next_ptr.to_le_bytes().to_vec();
                        r.extend_from_slice(&bytes.to_le_bytes());
                        next_ptr += 0x1000;
                        r
                    }
                    wire::GET_TENSOR if fault == Fault::HangsOnGetTensor => {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                        break;
                    }
                    wire::GET_TENSOR => {
                        let n =
                            u64::from_le_bytes(payload[size as usize - 8..].try_into().unwrap());
                        vec![7u8; n as usize]
                    }
                    wire::BUFFER_GET_BASE if fault == Fault::NullBase => {
                        0u64.to_le_bytes().to_vec()
                    }
                    wire::BUFFER_GET_BASE => 0x1000u64.to_le_bytes().to_vec(),
                    10 if fault == Fault::DiesOnCompute => break,
                    _ => continue,
                };
                // Ignored: a probe hangs up right after its handshake.
                let _ = s.write_all(&(reply.len() as u64).to_le_bytes());
                let _ = s.write_all(&reply);
            }
        }
    });
    (addr, accepted)
}

fn request(s: &mut TcpStream, cmd: u8, payload: &[u8]) {
    s.write_all(&[cmd]).unwrap();
    s.write_all(&(payload.len() as u64).to_le_bytes()).unwrap();
    s.write_all(payload).unwrap();
}

fn answer(s: &mut TcpStream) -> Vec<u8> {
    let n = read_u64(s).unwrap();
    let mut out = vec![0u8; n as usize];
    s.read_exact(&mut out).unwrap();
    out
}

fn alloc(device: u32, bytes: u64) -> Vec<u8> {
    let mut p = device.to_le_bytes().to_vec();
    p.extend_from_slice(&bytes.to_le_bytes());
    p
}

fn get_tensor(bytes: u64) -> Vec<u8> {
    let mut p = vec![0u8; 300];
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&bytes.to_le_bytes());
    p
}

#[test]
fn the_relay_passes_the_protocol_through_and_counts_allocations() {
    let worker = scripted_worker();
    probe(&worker).unwrap();
    let link = fuse::start(&worker, std::time::Duration::from_secs(5)).unwrap();
    let mut s = TcpStream::connect(link.relay).unwrap();
    assert_eq!(wire::hello(&mut s).unwrap().0, wire::PROTO_MAJOR);
    request(&mut s, wire::ALLOC_BUFFER, &alloc(1, 5000));
    let a = answer(&mut s);
    let ptr = u64::from_le_bytes(a[0..8].try_into().unwrap());
    request(&mut s, wire::ALLOC_BUFFER, &alloc(1, 3000));
    answer(&mut s);
    request(&mut s, wire::ALLOC_BUFFER, &alloc(0, 100));
    answer(&mut s);
    assert_eq!((link.allocated(0), link.allocated(1)), (100, 8000));
    request(&mut s, wire::FREE_BUFFER, &ptr.to_le_bytes());
    // Tensor data larger than the relay reads whole is streamed through.
    request(&mut s, 6, &vec![1u8; 3 << 20]);
    request(&mut s, wire::GET_TENSOR, &get_tensor(10));
    assert_eq!(answer(&mut s), vec![7u8; 10]);
    assert_eq!(link.allocated(1), 3000);
    assert!(link.lost().is_none());
}

#[test]
fn a_lost_worker_is_stood_in_for_and_reported() {
    let worker = scripted_worker();
    let link = fuse::start(&worker, std::time::Duration::from_secs(5)).unwrap();
    let mut s = TcpStream::connect(link.relay).unwrap();
    wire::hello(&mut s).unwrap();
    request(&mut s, wire::ALLOC_BUFFER, &alloc(0, 4096));
    answer(&mut s);
    request(&mut s, 10, &[0u8; 64]); // the worker hangs up on this one
    request(&mut s, wire::GET_TENSOR, &get_tensor(12));
    // llama.cpp gets a well-formed answer, never a closed socket (which would abort it).
    assert_eq!(answer(&mut s), vec![0u8; 12]);
    // Whether the write or the read noticed first, the link is lost.
    assert!(link.lost().is_some());
    assert_eq!(link.allocated(0), 0);
    request(&mut s, wire::GET_ALIGNMENT, &0u32.to_le_bytes());
    assert_eq!(answer(&mut s), 32u64.to_le_bytes());
    // ggml asserts on a null buffer and a null base: neither is ever answered.
    request(&mut s, wire::ALLOC_BUFFER, &alloc(0, 512));
    let a = answer(&mut s);
    assert_ne!(&a[..8], &[0u8; 8]);
    assert_eq!(u64::from_le_bytes(a[8..].try_into().unwrap()), 512);
    request(&mut s, wire::BUFFER_GET_BASE, &a[..8]);
    assert_ne!(answer(&mut s), vec![0u8; 8]);
    assert_eq!(link.allocated(0), 0, "stand-in allocations are not counted");
    // With no connection left, a worker that answers again is found again.
    drop(s);
    for _ in 0..100 {
        if link.lock().connections == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    link.ready().unwrap();
    assert!(link.lost().is_none());
}

#[test]
fn an_unreachable_worker_is_named() {
    // A port nothing listens on: bind one, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let err = open(&endpoint, std::time::Duration::from_secs(5))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&endpoint) && err.contains("unreachable"),
        "{err}"
    );
}

#[test]
fn a_hung_worker_is_lost_at_the_deadline_and_stood_in_for() {
    let (worker, _) = faulty_worker(Fault::HangsOnGetTensor);
    let link = fuse::start(&worker, std::time::Duration::from_millis(500)).unwrap();
    let mut s = TcpStream::connect(link.relay).unwrap();
    wire::hello(&mut s).unwrap();
    let asked = std::time::Instant::now();
    request(&mut s, wire::GET_TENSOR, &get_tensor(12));
    // llama.cpp's wait ends with a well-formed answer soon after the deadline, never forever.
    assert_eq!(answer(&mut s), vec![0u8; 12]);
    assert!(asked.elapsed() < std::time::Duration::from_secs(30));
    let reason = link.lost().expect("lost");
    assert!(reason.contains("--rpc-timeout"), "{reason}");
}

#[test]
fn a_null_base_never_reaches_ggml() {
    let (worker, _) = faulty_worker(Fault::NullBase);
    let link = fuse::start(&worker, std::time::Duration::from_secs(5)).unwrap();
    let mut s = TcpStream::connect(link.relay).unwrap();
    wire::hello(&mut s).unwrap();
    request(&mut s, wire::ALLOC_BUFFER, &alloc(0, 4096));
    let a = answer(&mut s);
    assert!(link.lost().is_none());
    request(&mut s, wire::BUFFER_GET_BASE, &a[..8]);
    assert_ne!(answer(&mut s), vec![0u8; 8]);
    let reason = link.lost().expect("lost");
    assert!(reason.contains("null buffer base"), "{reason}");
}

#[test]
fn answers_that_ggml_would_assert_on_are_refused() {
    use wire::check_answer;
    let alloc_request = alloc(0, 4096);
    let mut ok = 0x1000u64.to_le_bytes().to_vec();
    ok.extend_from_slice(&4096u64.to_le_bytes());
    assert!(check_answer(wire::ALLOC_BUFFER, Some(&alloc_request), &ok).is_ok());
    let null = [0u8; 16];
    assert!(check_answer(wire::ALLOC_BUFFER, Some(&alloc_request), &null).is_err());
    let mut short = 0x1000u64.to_le_bytes().to_vec();
    short.extend_from_slice(&16u64.to_le_bytes());
    assert!(check_answer(wire::ALLOC_BUFFER, Some(&alloc_request), &short).is_err());
    assert!(check_answer(wire::BUFFER_GET_BASE, None, &[0u8; 8]).is_err());
    assert!(check_answer(wire::GET_ALIGNMENT, None, &48u64.to_le_bytes()).is_err());
    assert!(check_answer(wire::GET_ALIGNMENT, None, &32u64.to_le_bytes()).is_ok());
    assert!(check_answer(wire::DEVICE_COUNT, None, &0u32.to_le_bytes()).is_err());
    assert!(check_answer(wire::DEVICE_COUNT, None, &1000u32.to_le_bytes()).is_err());
    assert!(check_answer(wire::DEVICE_COUNT, None, &2u32.to_le_bytes()).is_ok());
}

#[test]
fn the_relay_serves_only_this_process() {
    let (worker, accepted) = faulty_worker(Fault::DiesOnCompute);
    let link = fuse::start(&worker, std::time::Duration::from_secs(5)).unwrap();
    // Another process (a shell) connects and sends a handshake: it is closed without an answer,
    // and the worker never sees a connection.
    let port = link.relay.port();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; \
         printf '\\016\\030\\000\\000\\000\\000\\000\\000\\000' >&3; \
         head -c 24 /dev/zero >&3; \
         timeout 10 head -c 1 <&3 | wc -c"
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // This process's own connection (llama.cpp's) is served.
    let mut s = TcpStream::connect(link.relay).unwrap();
    assert_eq!(wire::hello(&mut s).unwrap().0, wire::PROTO_MAJOR);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
