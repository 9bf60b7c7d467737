//! The engine thread's loop: admit from the bounded queue, step the scheduler, repeat.
//!
//! The loop never awaits: it blocks on the queue only when no sequence is active, and otherwise
//! polls it between steps. It ends when every handle is gone and the last sequence has finished.
//! [`supervise`] runs it: a panic on the engine thread is caught, reported and followed by a
//! reload, so a fault never leaves a server that says it is healthy but cannot generate.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::runner::ModelRunner;
use super::scheduler::{EmbedProgress, Scheduler};
use super::{EngineCommand, EngineHandle, EngineState, GenerationEvent, LiveCounts, ModelInfo};

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
/// `Err`: a device the model is placed on is gone; its sequences and the queue were failed.
///
/// Embedding jobs run as they are taken from the queue, between steps. A generation that finds
/// every sequence busy is parked (at most one), and the queue is not read further until it is
/// admitted, so the queue keeps its bound and its order.
pub fn run<R: ModelRunner>(
    mut scheduler: Scheduler<R>,
    commands: &mut mpsc::Receiver<EngineCommand>,
    live: &LiveCounts,
) -> Result<(), String> {
    let mut parked = None;
    let mut embedding: Option<EmbedProgress> = None;
    // Time embedding decodes took while sequences were generating, not yet matched by
    // generation steps.
    let mut embed_debt = Duration::ZERO;
    live.kv_capacity
        .store(scheduler.kv_capacity(), Ordering::Relaxed);
    // Takes a command on: a generation into a free sequence, an embedding job when none is under
    // way; else gives it back to be parked.
    let take = |command: EngineCommand,
                scheduler: &mut Scheduler<R>,
                embedding: &mut Option<EmbedProgress>|
     -> Result<(), Box<EngineCommand>> {
        // Boxed: giving a command back is rare, and it is large.
        match command {
            EngineCommand::Generate(submission) => scheduler
                .admit(submission)
                .map_err(|s| Box::new(EngineCommand::Generate(*s))),
            EngineCommand::Embed(job) if embedding.is_none() => {
                *embedding = Some(EmbedProgress::new(job));
                Ok(())
            }
            // Its flag is checked at the top of the loop.
            EngineCommand::Stop => Ok(()),
            other => Err(Box::new(other)),
        }
    };
    loop {
        if live.abort.load(Ordering::Relaxed) {
            tracing::warn!("engine aborted: its model is being unloaded");
            if let Some(command) = parked.take() {
                fail_command(command, "the model was unloaded");
            }
            fail_queued(commands, "the model was unloaded");
            return Ok(());
        }
        if let Some(command) = parked.take() {
            match take(command, &mut scheduler, &mut embedding) {
                Err(command) => parked = Some(*command),
                Ok(()) => live.parked.store(0, Ordering::Relaxed),
            }
        }
        while parked.is_none() {
            let command = if scheduler.is_idle() && embedding.is_none() {
                // Nothing to decode: sleeping on the queue is the engine's idle state.
                match commands.blocking_recv() {
                    Some(command) => command,
                    None => return Ok(()),
                }
            } else {
                match commands.try_recv() {
                    Ok(command) => command,
                    // Empty, or closed with sequences still running: decode them first.
                    Err(_) => break,
                }
            };
            if let Err(command) = take(command, &mut scheduler, &mut embedding) {
                live.parked.store(1, Ordering::Relaxed);
                parked = Some(*command);
            }
            if live.abort.load(Ordering::Relaxed) {
                break;
            }
        }
        // Embedding decodes and generation steps share the thread: while sequences generate, an
        // embedding decode runs only once the generation steps since the last one took as long
        // as it did (at most half the time goes to embeddings), so a large embedding job slows
        // running streams by at most half and never stalls them.
        if let Some(job) = embedding.as_mut() {
            let shared = !scheduler.is_idle();
            if !shared || embed_debt.is_zero() {
                let started = Instant::now();
                if scheduler.embed_step(job) {
                    embedding = None;
                }
                if shared {
                    embed_debt += started.elapsed();
                }
            }
        }
        let started = Instant::now();
        let report = scheduler.step();
        embed_debt = if report.batch_tokens > 0 {
            embed_debt.saturating_sub(started.elapsed())
        } else {
            Duration::ZERO
        };
        if report.batch_tokens > 0 {
            live.decodes.fetch_add(1, Ordering::Relaxed);
            let busy = if report.prompt_tokens > 0 {
                &live.prefill_step_ns
            } else {
                &live.decode_step_ns
            };
            busy.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        if let Some(hook) = live.on_finished.get() {
            for stats in &report.finished {
                hook(stats);
            }
        }
        if let Some(reason) = report.lost {
            if let Some(command) = parked.take() {
                fail_command(command, &reason);
            }
            fail_queued(commands, &reason);
            return Err(reason);
        }
        live.active.store(scheduler.active(), Ordering::Relaxed);
        live.kv_cells.store(scheduler.kv_cells(), Ordering::Relaxed);
    }
}

/// How the engine thread recovers from a fault (a panic) on it.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// Faults in a row after which the engine stays failed.
    pub max_restarts: u32,
    /// Wait before the first reload; doubled for each fault in a row, up to 30 s.
    pub backoff: Duration,
    /// Serving this long without a fault forgets the earlier ones.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            backoff: Duration::from_secs(1),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// A panic's message, for the log and `/health`.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Answers every queued request with `Failed`: none of them can run until the engine is back.
fn fail_queued(commands: &mut mpsc::Receiver<EngineCommand>, reason: &str) {
    while let Ok(command) = commands.try_recv() {
        fail_command(command, reason);
    }
}

fn fail_command(command: EngineCommand, reason: &str) {
    // Ignored send errors: a client that left needs no answer.
    match command {
        EngineCommand::Generate(submission) => {
            let _ = submission
                .events
                .try_send(GenerationEvent::Failed(reason.to_owned()));
        }
        EngineCommand::Embed(job) => {
            let _ = job.reply.send(Err(reason.to_owned()));
        }
        EngineCommand::Stop => {}
    }
}

/// The engine thread's body: `serve` loads and serves until every handle is gone (`Ok`), or
/// fails to load (`Err`). A panic anywhere in it is caught: the sequences it was running are
/// dropped with it (their clients see the channel close, `engine_failed`), queued requests are
/// failed, the state turns `Failed` with the reason (so `/health` is 503), and after a backoff
/// `serve` runs again, which reloads the model. The first load failing is final, as is a fault
/// after `max_restarts` in a row.
pub fn supervise(
    state_tx: &watch::Sender<EngineState>,
    commands: &mut mpsc::Receiver<EngineCommand>,
    policy: RestartPolicy,
    mut serve: impl FnMut(&mut mpsc::Receiver<EngineCommand>, &dyn Fn(ModelInfo)) -> Result<(), String>,
) {
    let mut faults = 0u32;
    let mut loaded_once = false;
    loop {
        let started = Instant::now();
        let on_ready = |mut info: ModelInfo| {
            info.load_id = LOADS.fetch_add(1, Ordering::Relaxed);
            state_tx.send_replace(EngineState::Ready(info));
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| serve(commands, &on_ready)));
        let was_ready = matches!(*state_tx.borrow(), EngineState::Ready(_));
        loaded_once |= was_ready;
        let reason = match result {
            Ok(Ok(())) => {
                state_tx.send_replace(EngineState::Stopped);
                return;
            }
            Ok(Err(err)) if !loaded_once => {
                tracing::error!(%err, "engine failed");
                state_tx.send_replace(EngineState::Failed(err));
                return;
            }
            Ok(Err(err)) => err,
            Err(payload) => format!("engine thread panicked: {}", panic_message(&*payload)),
        };
        if was_ready && started.elapsed() >= policy.healthy_after {
            faults = 0;
        }
        faults += 1;
        if faults > policy.max_restarts {
            let reason = format!(
                "{reason}; {} faults in a row, not restarting",
                policy.max_restarts
            );
            tracing::error!("{reason}");
            state_tx.send_replace(EngineState::Failed(reason.clone()));
            fail_queued(commands, &reason);
            return;
        }
        let wait = policy
            .backoff
            .saturating_mul(1 << (faults - 1).min(5))
            .min(Duration::from_secs(30));
        tracing::error!(
            %reason,
            fault = faults,
            of = policy.max_restarts,
            wait_ms = wait.as_millis() as u64,
            "engine fault; reloading after a backoff"
        );
        state_tx.send_replace(EngineState::Failed(format!("{reason}; reloading")));
        fail_queued(commands, &reason);
        // Sleeps the backoff in slices, so an unload (every handle gone) does not wait it out.
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if commands.is_closed() && commands.is_empty() {
                state_tx.send_replace(EngineState::Stopped);
                return;
            }
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        // Requests that raced the state change are failed too, rather than left waiting.
        fail_queued(commands, &reason);
        state_tx.send_replace(EngineState::Loading);
    }
}

/// Numbers each successful load, so the API knows when cached model facts are stale.
static LOADS: AtomicU64 = AtomicU64::new(1);

pub(super) fn channels(
    max_queue: usize,
) -> (
    mpsc::Sender<EngineCommand>,
    mpsc::Receiver<EngineCommand>,
    watch::Sender<EngineState>,
    watch::Receiver<EngineState>,
) {
    // The admission queue: `max_queue` requests wait here for a free sequence; when it is full,
    // `EngineHandle::submit` fails at once and the API answers 429.
    let (tx, rx) = mpsc::channel(max_queue.max(1));
    let (state_tx, state_rx) = watch::channel(EngineState::Loading);
    (tx, rx, state_tx, state_rx)
}

/// Starts an engine thread over an already-built runner (the fake runner in tests). A restart
/// after a fault starts again from a clone of `runner`.
pub fn spawn_engine_with_runner<R: ModelRunner + Clone + Send + 'static>(
    runner: R,
    info: ModelInfo,
    config: WorkerConfig,
    policy: RestartPolicy,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    let (tx, mut rx, state_tx, state_rx) = channels(config.max_queue);
    let handle = EngineHandle::new(tx, state_rx);
    let live = Arc::clone(handle.live());
    let mut info = info;
    info.load_id = LOADS.fetch_add(1, Ordering::Relaxed);
    // Nothing to load: the engine is ready before its handle is returned.
    state_tx.send_replace(EngineState::Ready(info.clone()));
    let thread = std::thread::Builder::new()
        .name("engine-fake".into())
        .spawn(move || {
            let mut first = true;
            supervise(&state_tx, &mut rx, policy, |commands, on_ready| {
                if !std::mem::take(&mut first) {
                    on_ready(info.clone());
                }
                let scheduler = Scheduler::new(
                    runner.clone(),
                    config.n_seq,
                    config.n_batch,
                    config.n_ctx_seq,
                );
                run(scheduler, commands, &live)
            });
        })?;
    Ok((handle, thread))
}
