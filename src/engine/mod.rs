//! The engine: one named thread per loaded model, and the cheap handle the HTTP side holds.
//!
//! Owns: the llama.cpp model, context, batch and samplers (all on the engine thread), the
//! scheduler that batches every active sequence into one decode per step, and the bounded
//! admission queue in front of it.
//!
//! Must not: know HTTP or OpenAI's words (`max_tokens` is `max_new_tokens` here), await anything
//! on the engine thread, or grow a queue without bound. Only `llama/` and `fit.rs` (llama.cpp's
//! fit, CUDA builds) import `llama_cpp_2` / `llama_cpp_sys_2`.

mod detok;
pub mod fake;
// The pure parts are used by CUDA builds and tests only.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod fit;
pub mod grammar;
mod llama;
pub mod logprobs;
mod runner;
mod sampling;
mod scheduler;
mod stop;
mod worker;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

pub use detok::Utf8Decoder;
pub use llama::{
    link_workers, load_vocabulary, remote_gpus, serve_worker, GpuOffload, LlamaEngineConfig,
    LoadError, RpcWorkerConfig, Tokenizer,
};
pub use logprobs::{TokenLogprob, TopLogprob, MAX_TOP_LOGPROBS};
pub use runner::{BatchEntry, ModelRunner, RunnerError};
pub use sampling::SamplingParams;
pub use scheduler::Scheduler;
pub use stop::{StopMatcher, StopOutcome};

/// A token id, as llama.cpp numbers them.
pub type Token = i32;
/// A llama.cpp sequence id: one per parallel slot.
pub type SeqId = i32;

/// One generation request, fully validated and tokenized by the caller.
#[derive(Debug)]
pub struct GenerationRequest {
    pub prompt: Vec<Token>,
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens, already capped to fit the sequence's context.
    pub max_new_tokens: u32,
    pub stop: Vec<String>,
    /// Render control tokens as text (the tool-call parser needs markers such as `[TOOL_CALLS]`).
    pub special_tokens: bool,
    /// Report each generated token's log-probability with this many alternatives (at most
    /// [`MAX_TOP_LOGPROBS`]); `None` computes nothing.
    pub logprobs: Option<u8>,
    /// Told the tokens the sequence took (its prompt and what it generated) when it ends, however
    /// it ends (a key's token rate is charged this way).
    pub usage: Option<UsageSink>,
}

/// Receives a finished sequence's token count, on the engine thread: it must return at once.
#[derive(Clone)]
pub struct UsageSink(pub Arc<dyn Fn(u64) + Send + Sync>);

impl std::fmt::Debug for UsageSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageSink")
    }
}

/// Why generation ended, in engine terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token.
    Stop,
    /// One of the request's stop strings: its position in the request's list.
    StopString(usize),
    /// `max_new_tokens` or the sequence's context was reached.
    Length,
}

/// Token counts and timings of a finished generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// The whole prompt, cached part included.
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV cells were reused rather than computed.
    pub cached_tokens: u32,
    pub generated_tokens: u32,
    pub prompt_ms: f64,
    pub generation_ms: f64,
    /// Time from submission until a sequence was free for it.
    pub queue_ms: f64,
}

/// What the engine sends back for one request, in order: any number of `Text`, then exactly one
/// `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Newly generated text: whole characters, never part of a stop string.
    Text(String),
    /// The log-probabilities of the tokens whose text the next `Text` carries (or, before `Done`,
    /// the last text). Sent only for requests that asked for them.
    Logprobs(Vec<TokenLogprob>),
    Done {
        reason: FinishReason,
        stats: GenerationStats,
    },
    /// The engine could not complete the request (a server fault, not a client mistake).
    Failed(String),
    /// The request's settings were refused before any token (a grammar llama.cpp cannot use): a
    /// client mistake.
    Rejected(String),
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the admission queue is full")]
    QueueFull,
    #[error("the engine is not running")]
    Unavailable,
}

/// Facts about the loaded model that the HTTP side needs.
#[derive(Clone)]
pub struct ModelInfo {
    /// Context length available to one sequence (`n_ctx / n_seq_max`).
    pub n_ctx_seq: u32,
    pub n_ctx_train: u32,
    pub n_vocab: i32,
    /// The Jinja chat template stored in the GGUF, if any.
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    /// Tokenizes on the caller's thread (the vocabulary is immutable and `Sync`).
    pub tokenizer: Arc<dyn TokenizeText>,
    /// Per GPU (PCI bus id), the bytes loading the model and creating its context took, read as
    /// llama.cpp's device free memory before and after (the CUDA runtime's own context excluded).
    /// Empty without GPUs.
    pub device_memory: Vec<(String, u64)>,
    /// Layers llama.cpp put on each planned device (placement id, count, the output layer
    /// included), read back from its load; empty on the CPU alone.
    pub device_layers: Vec<(String, u32)>,
    /// Which load of the engine these facts come from (set by the worker; a reload after a fault
    /// gets a new one).
    pub load_id: u64,
    /// The embedding context's size: the most tokens one embedding input may have.
    pub n_ctx_embed: u32,
    /// Width of an embedding.
    pub n_embd: u32,
    /// How token embeddings are pooled into one vector, and where that came from (e.g. `mean
    /// (the model declares no pooling)`).
    pub pooling: String,
}

impl std::fmt::Debug for ModelInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelInfo")
            .field("n_ctx_seq", &self.n_ctx_seq)
            .field("n_ctx_train", &self.n_ctx_train)
            .field("n_vocab", &self.n_vocab)
            .finish_non_exhaustive()
    }
}

/// Text to tokens, for prompt validation and admission.
pub trait TokenizeText: Send + Sync {
    /// `add_bos`: prepend BOS if the model wants one. Special-token text (e.g. `<|im_start|>`)
    /// is parsed into its token.
    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<Token>;

    /// The bytes of `token`'s text, control tokens rendered (`<|im_start|>`). A piece may be part
    /// of a UTF-8 character.
    fn piece(&self, token: Token) -> Vec<u8>;
}

/// The engine's lifecycle, published through a `watch`.
#[derive(Debug, Clone)]
pub enum EngineState {
    Loading,
    Ready(ModelInfo),
    Failed(String),
    Stopped,
}

/// An admitted request as the scheduler holds it.
#[derive(Debug)]
pub struct Submission {
    pub request: GenerationRequest,
    pub events: mpsc::Sender<GenerationEvent>,
    pub submitted_at: std::time::Instant,
}

/// Pooled embeddings of each input, in order (not normalized), or why they could not be made.
pub type EmbedResult = Result<Vec<Vec<f32>>, String>;

/// Inputs to embed, each already checked to fit `ModelInfo::n_ctx_embed`.
#[derive(Debug)]
pub struct EmbedJob {
    pub inputs: Vec<Vec<Token>>,
    /// Dropping the receiver cancels the job if it has not run yet.
    pub reply: oneshot::Sender<EmbedResult>,
}

/// What the admission queue carries to the engine thread.
#[derive(Debug)]
pub enum EngineCommand {
    Generate(Submission),
    Embed(EmbedJob),
    /// Wakes an idle worker to see its `abort` flag (sent by [`Stopper::stop`]).
    Stop,
}

/// Ends an engine whose other handles may still be held (an unload past its deadline), without
/// keeping its queue open itself.
pub struct Stopper {
    commands: mpsc::WeakSender<EngineCommand>,
    live: Arc<LiveCounts>,
}

impl Stopper {
    /// The worker drops its sequences (their clients see the engine fail), fails what is queued,
    /// and ends.
    pub fn stop(&self) {
        self.live
            .abort
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(commands) = self.commands.upgrade() {
            // A full queue means a worker that is busy, and so sees the flag at its next step.
            let _ = commands.try_send(EngineCommand::Stop);
        }
    }
}

/// Called on the engine thread for every generation that ends with `Done`: it must be quick.
pub type FinishedHook = Box<dyn Fn(&GenerationStats) + Send + Sync>;

/// What the engine thread is doing, published after every step for `/metrics`.
#[derive(Default)]
pub struct LiveCounts {
    /// Sequences bound to a request.
    pub active: std::sync::atomic::AtomicUsize,
    /// KV cells holding tokens (prefix caches included).
    pub kv_cells: std::sync::atomic::AtomicUsize,
    /// KV cells of the context, over all sequences.
    pub kv_capacity: std::sync::atomic::AtomicUsize,
    /// Generations taken off the queue that wait for a free sequence (0 or 1): they still count
    /// against the queue's bound.
    pub parked: std::sync::atomic::AtomicUsize,
    /// Decode steps run.
    pub decodes: std::sync::atomic::AtomicU64,
    /// Nanoseconds the engine spent in generation steps that prefilled prompt tokens (decoding
    /// running streams alongside), and in steps that only decoded: with the wall time, where the
    /// engine's time goes and how much of it was idle.
    pub prefill_step_ns: std::sync::atomic::AtomicU64,
    pub decode_step_ns: std::sync::atomic::AtomicU64,
    /// Told of every finished generation (the metrics); set once, by whoever serves the engine.
    pub on_finished: std::sync::OnceLock<FinishedHook>,
    /// Set by an unload whose deadline passed: the worker drops its sequences (their clients see
    /// the engine fail) and ends.
    pub abort: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LiveCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveCounts")
            .field("active", &self.active)
            .field("kv_cells", &self.kv_cells)
            .finish_non_exhaustive()
    }
}

/// Cheap, cloneable front of an engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<EngineCommand>,
    state: watch::Receiver<EngineState>,
    live: Arc<LiveCounts>,
}

impl EngineHandle {
    /// Builds a handle over an existing channel pair (the worker and tests use this).
    pub fn new(commands: mpsc::Sender<EngineCommand>, state: watch::Receiver<EngineState>) -> Self {
        Self {
            commands,
            state,
            live: Arc::default(),
        }
    }

    /// What ends this engine later without keeping it alive meanwhile.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            commands: self.commands.downgrade(),
            live: Arc::clone(&self.live),
        }
    }

    /// The engine thread's live counts (it writes them; readers load them).
    pub fn live(&self) -> &Arc<LiveCounts> {
        &self.live
    }

    /// Queues inputs to embed, as `submit` queues a generation (a full queue is an immediate
    /// error). They run between decode steps, packed into as few decodes as the embedding
    /// context allows.
    pub fn embed(
        &self,
        inputs: Vec<Vec<Token>>,
    ) -> Result<oneshot::Receiver<EmbedResult>, SubmitError> {
        let (reply, rx) = oneshot::channel();
        self.send(EngineCommand::Embed(EmbedJob { inputs, reply }))?;
        Ok(rx)
    }

    fn send(&self, command: EngineCommand) -> Result<(), SubmitError> {
        if self.queued() >= self.queue_capacity() && !self.commands.is_closed() {
            return Err(SubmitError::QueueFull);
        }
        self.commands.try_send(command).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Unavailable,
        })
    }

    /// Requests waiting for a sequence now: in the admission queue, or taken off it and parked.
    pub fn queued(&self) -> usize {
        self.commands.max_capacity() - self.commands.capacity()
            + self.live.parked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues a request. Never blocks: a full queue is an immediate error.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::Receiver<GenerationEvent>, SubmitError> {
        // Every token yields at most one event (two with log-probabilities), plus the final one:
        // with this capacity the engine's `try_send` never finds the channel full while the
        // receiver is alive, and the channel is still bounded (by the sequence's context).
        let per_token = if request.logprobs.is_some() { 2 } else { 1 };
        let capacity = request.max_new_tokens as usize * per_token + 2;
        let (tx, rx) = mpsc::channel(capacity);
        self.send(EngineCommand::Generate(Submission {
            request,
            events: tx,
            submitted_at: std::time::Instant::now(),
        }))?;
        Ok(rx)
    }

    /// How many requests the admission queue holds: more submitted at once can never all be
    /// admitted.
    pub fn queue_capacity(&self) -> usize {
        self.commands.max_capacity()
    }

    /// The current lifecycle state.
    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// The model facts, once loaded.
    pub fn model_info(&self) -> Option<ModelInfo> {
        match &*self.state.borrow() {
            EngineState::Ready(info) => Some(info.clone()),
            _ => None,
        }
    }

    /// Waits until the engine leaves `Loading`; returns the state it reached.
    pub async fn wait_loaded(&self) -> EngineState {
        let mut state = self.state.clone();
        let result = state
            .wait_for(|s| !matches!(s, EngineState::Loading))
            .await
            .map(|s| s.clone());
        // A dropped sender means the engine thread is gone.
        result.unwrap_or(EngineState::Stopped)
    }
}

pub use llama::spawn_llama_engine;
pub use worker::{spawn_engine_with_runner, RestartPolicy, WorkerConfig};
