//! A fake model for fast tests of everything above the runner: no weights, no threads of its own.
//!
//! Vocabulary: tokens 0..=255 are single bytes and [`FAKE_EOS`] ends generation. The "model"
//! echoes: the n-th generated token of a sequence is the n-th token of its prompt, and once the
//! prompt is exhausted it emits EOS. So a request's output is predictable from its prompt, multi-byte
//! characters arrive split across tokens, and stop strings can be placed anywhere.
//!
//! It records every batch it decodes so tests can assert how the scheduler batched sequences.
//! It is never used by the real server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::runner::{BatchEntry, Logits, ModelRunner, RunnerError};
use super::worker::{self, WorkerConfig};
use super::{EngineHandle, ModelInfo, SamplingParams, SeqId, Token, TokenizeText};

/// A grammar the fake runner refuses (it passes the API's own check), standing in for one
/// llama.cpp cannot use.
pub const FAKE_INVALID_GRAMMAR: &str = "root ::= \"refused by the fake engine\"";

/// A grammar under which the fake runner finds no admissible token after two generated tokens,
/// standing in for a real grammar that dead-ends midway.
pub const FAKE_DEAD_END_GRAMMAR: &str = "root ::= \"ab\" <[999999]>";

/// A prompt containing this makes the fake runner panic while sampling: an injected engine fault.
pub const FAKE_PANIC_PROMPT: &str = "__engine_panic__";

/// Width of the fake model's embeddings.
pub const FAKE_EMBD: usize = 8;

/// The fake vocabulary's end-of-generation token.
pub const FAKE_EOS: Token = 256;

/// Byte-level tokenizer of the fake vocabulary.
#[derive(Debug, Default, Clone, Copy)]
pub struct FakeTokenizer;

impl TokenizeText for FakeTokenizer {
    fn tokenize(&self, text: &str, _add_bos: bool) -> Vec<Token> {
        text.bytes().map(Token::from).collect()
    }

    fn piece(&self, token: Token) -> Vec<u8> {
        match u8::try_from(token) {
            Ok(byte) => vec![byte],
            Err(_) => b"<eos>".to_vec(),
        }
    }
}

/// What the fake runner saw, shared with the test that drives it.
#[derive(Debug, Default)]
pub struct FakeLog {
    pub batches: Vec<Vec<BatchEntry>>,
    pub begun: Vec<SeqId>,
    pub ended: Vec<SeqId>,
    /// `(seq, keep)` for every KV truncation.
    pub truncated: Vec<(SeqId, u32)>,
    /// `(src, dst, keep)` for every prefix copy.
    pub copied: Vec<(SeqId, SeqId, u32)>,
    /// `(seq, tokens)` for every first token sampled from a kept row: the tokens it followed.
    pub replayed: Vec<(SeqId, usize)>,
}

#[derive(Debug, Default, Clone)]
struct FakeSequence {
    /// Tokens decoded at positions 0.. in order.
    decoded: Vec<Token>,
    /// Length of the prompt, fixed at the first sample.
    prompt_len: Option<usize>,
    sampled: usize,
    dead_end: bool,
    /// How many decoded tokens the kept logits row follows.
    kept: Option<usize>,
}

/// The echo model described in the module docs.
#[derive(Debug, Clone, Default)]
pub struct FakeRunner {
    sequences: HashMap<SeqId, FakeSequence>,
    /// Sleep per decode, so tests can observe streams in flight.
    pub step_delay: Duration,
    // A std Mutex: the log is written by the engine thread and read by the test thread, never held
    // across an await or a decode.
    pub log: Arc<Mutex<FakeLog>>,
}

impl FakeRunner {
    pub fn new(step_delay: Duration) -> Self {
        Self {
            step_delay,
            ..Self::default()
        }
    }

    /// Facts the fake model reports, shaped like a real one's.
    pub fn model_info(n_ctx_seq: u32) -> ModelInfo {
        ModelInfo {
            n_ctx_seq,
            n_ctx_train: n_ctx_seq,
            n_vocab: FAKE_EOS + 1,
            chat_template: Some(
                "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}\
                 {% if add_generation_prompt %}<|assistant|>{% endif %}"
                    .to_owned(),
            ),
            bos_token: String::new(),
            eos_token: "<eos>".to_owned(),
            tokenizer: Arc::new(FakeTokenizer),
            device_memory: Vec::new(),
            device_layers: Vec::new(),
            load_id: 0,
            n_ctx_embed: n_ctx_seq,
            n_embd: FAKE_EMBD as u32,
            pooling: "mean".into(),
        }
    }

    /// Starts an engine thread around this runner.
    pub fn spawn(self, config: WorkerConfig) -> EngineHandle {
        self.spawn_with_policy(config, worker::RestartPolicy::default())
    }

    /// Starts an engine thread around this runner that recovers from faults as `policy` says.
    pub fn spawn_with_policy(
        self,
        config: WorkerConfig,
        policy: worker::RestartPolicy,
    ) -> EngineHandle {
        let info = Self::model_info(config.n_ctx_seq);
        let (handle, _thread) = worker::spawn_engine_with_runner(self, info, config, policy)
            .expect("spawning the fake engine thread");
        handle
    }
}

impl ModelRunner for FakeRunner {
    fn begin_sequence(&mut self, seq: SeqId, params: &SamplingParams) -> Result<(), String> {
        // The fake has no grammar engine; it refuses the one grammar tests use to mean "invalid".
        if params.grammar.as_deref() == Some(FAKE_INVALID_GRAMMAR) {
            return Err("fake: the grammar does not parse".into());
        }
        // The decoded tokens (the fake KV) stay; only the sampling state restarts.
        let state = self.sequences.entry(seq).or_default();
        state.prompt_len = None;
        state.sampled = 0;
        state.dead_end = params.grammar.as_deref() == Some(FAKE_DEAD_END_GRAMMAR);
        self.log.lock().expect("fake log").begun.push(seq);
        Ok(())
    }

    fn decode(&mut self, batch: &[BatchEntry]) -> Result<(), RunnerError> {
        if !self.step_delay.is_zero() {
            std::thread::sleep(self.step_delay);
        }
        for entry in batch {
            let seq = self.sequences.entry(entry.seq).or_default();
            if entry.pos as usize != seq.decoded.len() {
                return Err(RunnerError::Decode(format!(
                    "sequence {} got position {} after {} tokens",
                    entry.seq,
                    entry.pos,
                    seq.decoded.len()
                )));
            }
            seq.decoded.push(entry.token);
        }
        self.log
            .lock()
            .expect("fake log")
            .batches
            .push(batch.to_vec());
        Ok(())
    }

    fn sample(&mut self, seq: SeqId, logits: Logits) -> Result<Token, String> {
        let state = self
            .sequences
            .get_mut(&seq)
            .expect("sampled a begun sequence");
        if logits == Logits::Kept {
            // Only a prompt that is exactly what the kept row follows may be answered from it.
            assert_eq!(
                state.kept,
                Some(state.decoded.len()),
                "fake: sampled from a kept row that does not follow the sequence's tokens"
            );
            self.log
                .lock()
                .expect("fake log")
                .replayed
                .push((seq, state.decoded.len()));
        }
        let prompt_len = *state.prompt_len.get_or_insert(state.decoded.len());
        let prompt = &state.decoded[..prompt_len];
        let marker: Vec<Token> = FAKE_PANIC_PROMPT.bytes().map(Token::from).collect();
        if prompt.windows(marker.len()).any(|w| w == marker.as_slice()) {
            panic!("fake: injected engine fault");
        }
        if state.dead_end && state.sampled == 2 {
            return Err("fake: the grammar admits no token here".into());
        }
        let token = prompt.get(state.sampled).copied().unwrap_or(FAKE_EOS);
        state.sampled += 1;
        Ok(token)
    }

    /// The fake's logits: the echoed token leads by 2, the byte after it by 1, the rest are 0.
    fn logprobs(
        &self,
        _seq: SeqId,
        _logits: Logits,
        chosen: Token,
        top_n: usize,
    ) -> (f32, Vec<(Token, f32)>) {
        let n_vocab = FAKE_EOS as usize + 1;
        let mut logits = vec![0.0; n_vocab];
        logits[chosen as usize] = 2.0;
        logits[(chosen as usize + 1) % n_vocab] = 1.0;
        super::logprobs::Shaping::new(1.0, &[]).logprobs(&logits, chosen, top_n)
    }

    fn keep_logits(&mut self, seq: SeqId, _batch_index: usize) {
        let state = self
            .sequences
            .get_mut(&seq)
            .expect("kept logits of a decoded sequence");
        state.kept = Some(state.decoded.len());
    }

    fn end_sequence(&mut self, seq: SeqId) {
        self.log.lock().expect("fake log").ended.push(seq);
    }

    fn truncate_sequence(&mut self, seq: SeqId, keep: u32) {
        if let Some(state) = self.sequences.get_mut(&seq) {
            state.decoded.truncate(keep as usize);
            // The row no longer follows the sequence's tokens: a later `Kept` sample panics.
            state.kept = state.kept.filter(|&n| n <= keep as usize);
        }
        self.log
            .lock()
            .expect("fake log")
            .truncated
            .push((seq, keep));
    }

    fn copy_prefix(&mut self, src: SeqId, dst: SeqId, keep: u32) {
        let mut decoded = self
            .sequences
            .get(&src)
            .map(|s| s.decoded.clone())
            .unwrap_or_default();
        assert!(
            decoded.len() >= keep as usize,
            "fake: copied {keep} positions of sequence {src}, which holds {}",
            decoded.len()
        );
        decoded.truncate(keep as usize);
        let state = self.sequences.entry(dst).or_default();
        state.decoded = decoded;
        state.kept = None;
        self.log
            .lock()
            .expect("fake log")
            .copied
            .push((src, dst, keep));
    }

    fn token_bytes(&self, token: Token, _special: bool, out: &mut Vec<u8>) {
        if let Ok(byte) = u8::try_from(token) {
            out.push(byte);
        }
    }

    fn is_end_of_generation(&self, token: Token) -> bool {
        token == FAKE_EOS
    }

    /// As many inputs per "decode" as a real embedding context of 256 tokens would take.
    fn embed_limits(&self) -> (usize, usize) {
        (256, 64)
    }

    /// Mean pooling over fixed per-token vectors: token `t`'s component `k` is `sin(t·(k+1))`.
    fn embed(&mut self, inputs: &[Vec<Token>]) -> Result<Vec<Vec<f32>>, String> {
        Ok(inputs
            .iter()
            .map(|input| {
                let mut sum = [0f32; FAKE_EMBD];
                for &t in input {
                    for (k, v) in sum.iter_mut().enumerate() {
                        *v += (t as f32 * (k + 1) as f32).sin();
                    }
                }
                sum.iter().map(|v| v / input.len().max(1) as f32).collect()
            })
            .collect())
    }
}
