//! The seam between the scheduler and a model: [`ModelRunner`].
//!
//! The scheduler decides *what* to decode; a runner does it. The real runner wraps llama.cpp
//! (`llama/`); the fake runner (`fake.rs`) lets the scheduler be tested without a model or threads.

use super::{SamplingParams, SeqId, Token};

/// One token of a decode batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEntry {
    pub token: Token,
    /// Position of the token within its sequence.
    pub pos: u32,
    pub seq: SeqId,
    /// Whether logits are needed for this token (the last token of each sequence in the batch).
    pub logits: bool,
}

/// The logits a token is sampled from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Those of batch entry `i` of the last decode.
    Batch(usize),
    /// The sequence's kept row ([`ModelRunner::keep_logits`]).
    Kept,
}

/// Errors a runner reports for a whole decode step.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("decode failed: {0}")]
    Decode(String),
    /// A device the model is placed on is gone (an RPC worker): no step can succeed again.
    #[error("{0}")]
    Lost(String),
}

/// A model that can decode batches over several sequences and sample from their logits.
pub trait ModelRunner {
    /// Prepares per-sequence state (the sampler chain) for a new request on `seq`.
    /// `Err`: the settings cannot be used (llama.cpp rejects the grammar); nothing was changed.
    fn begin_sequence(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), String>;

    /// Runs one forward pass over `batch`.
    fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), RunnerError>;

    /// Samples the next token for `seq` from `logits`, and records it in the sequence's sampler
    /// history (penalties). `Err`: the sequence's grammar admits no token here; nothing was
    /// recorded, and the sequence must end.
    fn sample(&mut self, seq: SeqId, logits: Logits) -> Result<Token, String>;

    /// The log-probability of `chosen` and of the `top_n` most likely tokens in `logits`, from
    /// the distribution `seq` samples from (see `logprobs.rs`). Called after `sample`, only for
    /// requests that ask for log-probabilities.
    fn logprobs(
        &self,
        seq: SeqId,
        logits: Logits,
        chosen: Token,
        top_n: usize,
    ) -> (f32, Vec<(Token, f32)>);

    /// Keeps the logits of batch entry `batch_index` of the last decode as `seq`'s kept row,
    /// replacing the one before: the next-token logits of the tokens `seq` holds up to that
    /// entry, so a request with exactly those tokens as its prompt samples its first token
    /// without a decode. The row outlives requests and decodes; `sample` and `logprobs` read it
    /// as [`Logits::Kept`].
    fn keep_logits(&mut self, seq: SeqId, batch_index: usize);

    /// Drops per-sequence sampling state. The KV cells stay (they are the prefix cache).
    fn end_sequence(&mut self, seq: SeqId);

    /// Frees the sequence's KV cells at positions `keep..`; `keep == 0` frees them all.
    fn truncate_sequence(&mut self, seq: SeqId, keep: u32);

    /// Makes `dst` hold `src`'s KV cells at positions `0..keep` (its own cells are dropped
    /// first): a prompt prefix another sequence already computed. `src`'s cells at those
    /// positions must all be decoded; the copy takes effect before the next decode.
    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, keep: u32);

    /// Appends the bytes of `token`'s text to `out`. Control tokens append nothing unless
    /// `special` (tool-call markers such as `[TOOL_CALLS]` and `<|python_tag|>` are control
    /// tokens in their vocabularies).
    fn token_bytes(&self, token: Token, special: bool, out: &mut Vec<u8>);

    /// The pooled embedding of each input (not normalized), in one decode: the inputs fit
    /// [`ModelRunner::embed_limits`] together (the scheduler packs them so; an input alone always
    /// fits, as the API checks).
    fn embed(&mut self, inputs: &[Vec<Token>]) -> Result<Vec<Vec<f32>>, String>;

    /// What one embedding decode holds: tokens, and inputs (sequences).
    fn embed_limits(&self) -> (usize, usize);

    /// Whether `token` ends generation (EOS, EOT, ...).
    fn is_end_of_generation(&self, token: Token) -> bool;
}
