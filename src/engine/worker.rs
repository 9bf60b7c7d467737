//! The engine thread's loop: admit from the bounded queue, step the scheduler, repeat.
//!
//! The loop never awaits: it blocks on the queue only when no sequence is active, and otherwise
//! polls it between steps. It ends when every handle is gone and the last sequence has finished.

use std::thread::JoinHandle;

use tokio::sync::{mpsc, watch};

use super::llama::{self, LlamaEngineConfig};
use super::runner::ModelRunner;
use super::scheduler::Scheduler;
use super::{EngineHandle, EngineState, ModelInfo, Submission};

/// Shape of the batching loop, shared by the real and the fake engine.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    pub n_seq: usize,
    pub n_batch: usize,
    pub n_ctx_seq: u32,
    /// Requests that may wait for a free sequence; one more is refused.
    pub max_queue: usize,
}

/// Runs the batching loop until every handle is dropped and the last sequence has ended.
pub fn run<R: ModelRunner>(mut scheduler: Scheduler<R>, mut commands: mpsc::Receiver<Submission>) {
    loop {
        while scheduler.has_free_slot() {
            let submission = if scheduler.is_idle() {
                // Nothing to decode: sleeping on the queue is the engine's idle state.
                match commands.blocking_recv() {
                    Some(submission) => submission,
                    None => return,
                }
            } else {
                match commands.try_recv() {
                    Ok(submission) => submission,
                    // Empty, or closed with sequences still running: decode them first.
                    Err(_) => break,
                }
            };
            // Cannot fail: a slot is free.
            let _ = scheduler.admit(submission);
        }
        scheduler.step();
    }
}

fn channels(
    max_queue: usize,
) -> (
    mpsc::Sender<Submission>,
    mpsc::Receiver<Submission>,
    watch::Sender<EngineState>,
    watch::Receiver<EngineState>,
) {
    // The admission queue: `max_queue` requests wait here for a free sequence; when it is full,
    // `EngineHandle::submit` fails at once and the API answers 429.
    let (tx, rx) = mpsc::channel(max_queue.max(1));
    let (state_tx, state_rx) = watch::channel(EngineState::Loading);
    (tx, rx, state_tx, state_rx)
}

/// Starts an engine thread over an already-built runner (the fake runner in tests).
pub fn spawn_engine_with_runner<R: ModelRunner + Send + 'static>(
    runner: R,
    info: ModelInfo,
    config: WorkerConfig,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (tx, rx, state_tx, state_rx) = channels(config.max_queue);
    // Nothing to load: the engine is ready before its handle is returned.
    state_tx.send_replace(EngineState::Ready(info));
    let thread = std::thread::Builder::new()
        .name("engine-fake".into())
        .spawn(move || {
            let scheduler = Scheduler::new(runner, config.n_seq, config.n_batch, config.n_ctx_seq);
            run(scheduler, rx);
            state_tx.send_replace(EngineState::Stopped);
        })?;
    Ok((EngineHandle::new(tx, state_rx), thread))
}

/// Starts the llama.cpp engine thread: it loads the model (publishing `Loading`, then `Ready` or
/// `Failed`) and then serves requests.
pub fn spawn_llama_engine(
    config: LlamaEngineConfig,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (tx, rx, state_tx, state_rx) = channels(config.max_queue);
    let name = format!("engine-{}", config.model_id);
    let thread = std::thread::Builder::new().name(name).spawn(move || {
        // `serve_model` calls `on_ready` on this thread before it returns, so a borrow is enough.
        let result = llama::serve_model(&config, rx, |info| {
            state_tx.send_replace(EngineState::Ready(info));
        });
        match result {
            Ok(()) => state_tx.send_replace(EngineState::Stopped),
            Err(err) => {
                tracing::error!(%err, "engine failed");
                state_tx.send_replace(EngineState::Failed(err.to_string()))
            }
        };
    })?;
    Ok((EngineHandle::new(tx, state_rx), thread))
}
