//! llama.cpp's RPC wire format (`ggml/src/ggml-rpc/ggml-rpc.cpp`, protocol 7), as far as a relay
//! needs it: which commands are answered, how long each answer is, and the few fields the relay
//! reads (allocations). Requests are `cmd: u8, size: u64 LE, payload`; answers `size: u64 LE,
//! payload`. The client waits for each answer before it sends anything else, so at most one answer
//! is ever outstanding on a connection.

use std::io::{self, Read, Write};

pub const PROTO_MAJOR: u8 = 7;

pub const ALLOC_BUFFER: u8 = 0;
pub const GET_ALIGNMENT: u8 = 1;
pub const GET_MAX_SIZE: u8 = 2;
pub const BUFFER_GET_BASE: u8 = 3;
pub const FREE_BUFFER: u8 = 4;
pub const SET_TENSOR_HASH: u8 = 7;
pub const GET_TENSOR: u8 = 8;
pub const COPY_TENSOR: u8 = 9;
pub const GET_DEVICE_MEMORY: u8 = 11;
pub const GET_ALLOC_SIZE: u8 = 13;
pub const HELLO: u8 = 14;
pub const DEVICE_COUNT: u8 = 15;
/// One past the last command (`RPC_CMD_COUNT` less `RPC_CMD_NONE`, which never goes on the wire).
pub const COMMANDS: u8 = 18;

/// `rpc_msg_hello_req`: the transport capabilities (RDMA), 24 bytes.
pub const HELLO_REQUEST: usize = 24;
/// `rpc_msg_hello_rsp`: major, minor, patch, padding, capabilities.
pub const HELLO_RESPONSE: usize = 4 + HELLO_REQUEST;

/// How an answer to `cmd` is sized: `None` when the command has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Fixed(usize),
    /// `GET_TENSOR`: the size the request asked for (its last 8 bytes).
    Requested,
}

pub fn answer(cmd: u8) -> Option<Answer> {
    match cmd {
        ALLOC_BUFFER | GET_DEVICE_MEMORY => Some(Answer::Fixed(16)),
        GET_ALIGNMENT | GET_MAX_SIZE | BUFFER_GET_BASE | GET_ALLOC_SIZE => Some(Answer::Fixed(8)),
        SET_TENSOR_HASH | COPY_TENSOR => Some(Answer::Fixed(1)),
        DEVICE_COUNT => Some(Answer::Fixed(4)),
        HELLO => Some(Answer::Fixed(HELLO_RESPONSE)),
        GET_TENSOR => Some(Answer::Requested),
        _ => None,
    }
}

/// What a relay answers for a lost worker, given the request's bytes (when it read them whole):
/// well-formed and consistent, so llama.cpp's client never aborts — an allocation "succeeds" at a
/// made-up address and a buffer's base is never null (ggml asserts on both), no device has memory,
/// every copy fails. Whatever is computed meanwhile is thrown away: the engine fails the requests
/// of a model whose worker is lost.
pub fn stand_in(cmd: u8, size: usize, request: Option<&[u8]>) -> Vec<u8> {
    // Far from any real mapping, and aligned for every buffer type.
    const FAKE_BASE: u64 = 0x7a00_0000_0000;
    let mut out = vec![0u8; size];
    match cmd {
        HELLO => out[0] = PROTO_MAJOR,
        // A power of two keeps ggml's padding arithmetic sane.
        GET_ALIGNMENT => out.copy_from_slice(&32u64.to_le_bytes()),
        GET_MAX_SIZE => out.copy_from_slice(&(1u64 << 40).to_le_bytes()),
        BUFFER_GET_BASE => out.copy_from_slice(&FAKE_BASE.to_le_bytes()),
        ALLOC_BUFFER => {
            let asked = request
                .and_then(|r| r.get(4..12))
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes);
            out[..8].copy_from_slice(&FAKE_BASE.to_le_bytes());
            out[8..].copy_from_slice(&asked.to_le_bytes());
        }
        _ => {}
    }
    out
}

/// Whether a worker's answer to `cmd` is one llama.cpp can take: a null buffer or base, an
/// alignment that is not a power of two or an absurd device count would reach a ggml assertion
/// (which aborts the process). `Err` says what was wrong; the relay then treats the worker as
/// lost and answers with [`stand_in`].
pub fn check_answer(cmd: u8, request: Option<&[u8]>, reply: &[u8]) -> Result<(), String> {
    let word = |at: usize| {
        reply
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    match cmd {
        BUFFER_GET_BASE if word(0) == Some(0) => Err("it answered a null buffer base".into()),
        ALLOC_BUFFER => {
            let asked = request
                .and_then(|r| r.get(4..12))
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes);
            match (word(0), word(8)) {
                (Some(0), _) if asked > 0 => {
                    Err(format!("it answered a null buffer for {asked} bytes"))
                }
                (Some(_), Some(size)) if size < asked => Err(format!(
                    "it allocated {size} bytes where {asked} were asked for"
                )),
                _ => Ok(()),
            }
        }
        GET_ALIGNMENT => match word(0) {
            Some(a) if a.is_power_of_two() && a <= 1 << 30 => Ok(()),
            other => Err(format!("it answered an alignment of {other:?}")),
        },
        DEVICE_COUNT => {
            let count = reply
                .get(..4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes);
            if (1..=MAX_DEVICES).contains(&count) {
                Ok(())
            } else {
                Err(format!("it answered {count} devices"))
            }
        }
        _ => Ok(()),
    }
}

/// Most devices one worker may say it has.
pub const MAX_DEVICES: u32 = 64;

pub fn read_u64(reader: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    reader.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Sends HELLO on a fresh connection and returns the worker's (major, minor, patch).
pub fn hello(stream: &mut (impl Read + Write)) -> io::Result<(u8, u8, u8)> {
    let mut request = vec![HELLO];
    request.extend_from_slice(&(HELLO_REQUEST as u64).to_le_bytes());
    request.extend_from_slice(&[0u8; HELLO_REQUEST]);
    stream.write_all(&request)?;
    stream.flush()?;
    let size = read_u64(stream)?;
    if size != HELLO_RESPONSE as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a HELLO answer of {size} bytes (expected {HELLO_RESPONSE})"),
        ));
    }
    let mut answer = [0u8; HELLO_RESPONSE];
    stream.read_exact(&mut answer)?;
    Ok((answer[0], answer[1], answer[2]))
}
