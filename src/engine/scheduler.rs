//! Continuous batching over a fixed set of sequence slots, with prompt-prefix reuse.
//!
//! Each [`Scheduler::step`] builds one batch: the pending token of every decoding sequence first
//! (so running streams never stall), then prompt chunks of sequences still in prefill, up to
//! `n_batch` tokens in all. Prefill goes to the sequence with the fewest prompt tokens left first
//! (shortest-remaining-first), and prompts are prefilled one after another, not together: a step
//! starts another prompt only while it holds fewer than [`COMBINE_PROMPTS_BELOW`] prompt tokens.
//! Both minimise the mean and median time to first token, and a prompt that finishes starts
//! decoding while the next one prefills. A prompt passed over for `n_seq` steps in a row goes
//! first, so a long prompt is not starved by short ones that keep arriving. A request admitted
//! between steps joins at the next step; it never waits for others to finish. A sequence whose
//! receiver is gone is dropped at the start of the next step.
//!
//! Prefix reuse: a finished (or cancelled) sequence keeps its KV cells and remembers the tokens in
//! them. A new request goes to the idle sequence whose whole cache its prompt continues (the next
//! turn of a conversation) or that holds its whole prompt (the same prompt again); else to an empty sequence, else to the least recently used cache. Then
//! it takes the longest prefix of its prompt that any sequence's cells hold, its own or another's
//! (copied: a system prompt many conversations share is computed once), and only the rest of the
//! prompt is prefilled. A prompt sharing a long prefix with one an earlier request is still
//! prefilling waits for it instead of computing the same cells alongside. Each sequence holds at
//! most `n_ctx_seq` positions, so cached cells can never crowd out active ones.
//!
//! Pure logic over a [`ModelRunner`]: no threads, no channels it waits on, so it is unit-tested with
//! the fake runner.

use std::time::Instant;

use super::detok::Utf8Decoder;
use super::logprobs::{TokenLogprob, TopLogprob};
use super::runner::{BatchEntry, Logits, ModelRunner};
use super::stop::StopMatcher;
use super::{FinishReason, GenerationEvent, GenerationStats, SeqId, Submission, Token};

mod slot;
use slot::Slot;

/// What one step did, for the worker loop and for tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepReport {
    /// Tokens in the decoded batch (0: nothing to do).
    pub batch_tokens: usize,
    /// Of those, prompt tokens (the rest are sampled tokens fed back).
    pub prompt_tokens: usize,
    /// Sequences that finished or were cancelled during the step.
    pub ended: Vec<SeqId>,
    /// The stats of every generation that ended with `Done` during the step.
    pub finished: Vec<GenerationStats>,
    /// A device the model runs on is gone (`RunnerError::Lost`): the engine must stop.
    pub lost: Option<String>,
}

/// The tokens whose KV cells a sequence holds, at positions `0..tokens.len()`.
#[derive(Debug, Default)]
struct SeqCache {
    tokens: Vec<Token>,
    /// The runner keeps the logits that follow `tokens[..n]` (`ModelRunner::keep_logits`): the
    /// next-token distribution of the last prompt that ended there.
    logits_follow: Option<usize>,
    /// When the sequence was last released, for LRU eviction.
    last_used: u64,
}

impl SeqCache {
    /// Drops the tokens at positions `keep..`, and the kept logits if they followed any of them.
    fn truncate(&mut self, keep: usize) {
        self.tokens.truncate(keep);
        self.logits_follow = self.logits_follow.filter(|&n| n <= keep);
    }
}

/// Fewest prompt tokens worth copying from another sequence's cells rather than prefilling: a
/// copy moves at most the source's whole KV stream (the runner takes the cheaper of that and the
/// source's cells alone), which on the default model on a CPU (a ~47 MB stream) costs about as
/// much as prefilling a dozen tokens; a GPU copies faster than it prefills. Enough to cover a
/// template's default system prompt.
pub const MIN_SHARED_PREFIX: usize = 16;

/// Prompt tokens up to which one step prefills several prompts together; once a step holds this
/// many, it starts no other prompt. Prompts finish one after another rather than together: with
/// four prompts of equal cost P arriving at once, their first tokens come at P, 2P, 3P, 4P instead
/// of all at 4P, and each starts decoding (riding along the next prompt's step) as soon as its
/// own prefill is done. Combining pays only while prompts are short enough that one costs about
/// a step's fixed part (reading the weights once, sampling): measured on the default model on 2
/// CPU cores, four 11-token prompts decode 13 % faster when combined at 64 than when split at 32
/// (`cargo bench` engine_decode/sequences/4), while prompts of 140 tokens and more (the agent
/// and long-prompt loads of `benches/compare.sh`) gain from going one by one.
pub const COMBINE_PROMPTS_BELOW: usize = 64;

/// Orders a batch by sequence id, each sequence's tokens kept in position order, and moves the
/// sampling positions with their entries. With one KV stream per sequence llama.cpp micro-batches
/// only consecutive sequence ids, taking each one's tokens in batch order: decoding 0, 1 and 3
/// while 2 prefills costs three passes over the weights as `[0, 1, 3, 2…]` (0–2, 3, the rest of
/// 2) and two as `[0, 1, 2…, 3]` (0–3, the rest of 2).
fn in_sequence_order(
    batch: Vec<BatchEntry>,
    mut sample_at: Vec<(usize, usize)>,
) -> (Vec<BatchEntry>, Vec<(usize, usize)>) {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    // Stable: a sequence's tokens stay in position order.
    order.sort_by_key(|&k| batch[k].seq);
    let mut moved_to = vec![0; batch.len()];
    for (new, &old) in order.iter().enumerate() {
        moved_to[old] = new;
    }
    for (_, at) in &mut sample_at {
        *at = moved_to[*at];
    }
    (order.into_iter().map(|k| batch[k]).collect(), sample_at)
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Most tokens of one embedding decode (an input longer than this still goes whole: pooling
/// needs all of it in one decode). Throughput hardly depends on it; the wait of a request that
/// arrives during a large job does.
pub const EMBED_STEP_TOKENS: usize = 512;

/// An embedding job under way: the vectors of its first inputs.
pub struct EmbedProgress {
    job: super::EmbedJob,
    out: Vec<Vec<f32>>,
}

impl EmbedProgress {
    pub fn new(job: super::EmbedJob) -> Self {
        Self {
            job,
            out: Vec::new(),
        }
    }

    /// The reply channel, taken to answer (the job ends with it).
    fn take_reply(&mut self) -> tokio::sync::oneshot::Sender<super::EmbedResult> {
        let (placeholder, _) = tokio::sync::oneshot::channel();
        std::mem::replace(&mut self.job.reply, placeholder)
    }
}

/// Batches up to `slots` sequences into one decode per step.
pub struct Scheduler<R> {
    runner: R,
    slots: Vec<Option<Slot>>,
    kv: Vec<SeqCache>,
    n_batch: usize,
    n_ctx_seq: u32,
    next_order: u64,
}

impl<R: ModelRunner> Scheduler<R> {
    /// `n_seq`: parallel sequences; `n_batch`: most tokens per decode; `n_ctx_seq`: positions per
    /// sequence.
    pub fn new(runner: R, n_seq: usize, n_batch: usize, n_ctx_seq: u32) -> Self {
        assert!(
            n_seq > 0 && n_batch >= n_seq,
            "n_batch must cover one token per sequence"
        );
        Self {
            runner,
            slots: (0..n_seq).map(|_| None).collect(),
            kv: (0..n_seq).map(|_| SeqCache::default()).collect(),
            n_batch,
            n_ctx_seq,
            next_order: 0,
        }
    }

    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// Runs the next embedding decode of `job` (as many of its inputs as one decode holds, within
    /// [`EMBED_STEP_TOKENS`]), so a large job is interleaved with generation steps rather than
    /// stalling them, and a request that arrives meanwhile waits for one short decode at most.
    /// Returns whether the job is over: answered, failed, or its client gone.
    pub fn embed_step(&mut self, job: &mut EmbedProgress) -> bool {
        // A client that left costs nothing more.
        if job.job.reply.is_closed() {
            return true;
        }
        let (max_tokens, max_inputs) = self.runner.embed_limits();
        let max_tokens = max_tokens.min(EMBED_STEP_TOKENS);
        let inputs = &job.job.inputs;
        let start = job.out.len();
        let mut end = start;
        let mut tokens = 0;
        while end < inputs.len()
            && end - start < max_inputs
            && tokens + inputs[end].len() <= max_tokens
        {
            tokens += inputs[end].len();
            end += 1;
        }
        // An input over the limit still goes alone: the runner says why it cannot.
        let end = end.max(start + 1).min(inputs.len());
        match self.runner.embed(&inputs[start..end]) {
            Ok(vectors) => job.out.extend(vectors),
            Err(reason) => {
                // Ignored send error: a client that left needs no answer.
                let _ = job.take_reply().send(Err(reason));
                return true;
            }
        }
        if job.out.len() < inputs.len() {
            return false;
        }
        let out = std::mem::take(&mut job.out);
        let _ = job.take_reply().send(Ok(out));
        true
    }

    /// Sequences bound to a request now.
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// KV cells in use: the tokens every sequence holds, prefix caches included.
    pub fn kv_cells(&self) -> usize {
        self.kv.iter().map(|c| c.tokens.len()).sum()
    }

    /// KV cells of the context: `n_ctx_seq` for each sequence.
    pub fn kv_capacity(&self) -> usize {
        self.kv.len() * self.n_ctx_seq as usize
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.iter().any(Option::is_none)
    }

    pub fn is_idle(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Binds a request to a free sequence. Returns it back (boxed: it is rare and large) if every
    /// slot is busy.
    pub fn admit(&mut self, submission: Submission) -> Result<(), Box<Submission>> {
        let Some(index) = self.pick_sequence(&submission.request.prompt) else {
            return Err(Box::new(submission));
        };
        // A client that left while queued costs nothing.
        if submission.events.is_closed() {
            return Ok(());
        }
        let request = &submission.request;
        let seq = index as SeqId;
        if request.prompt.is_empty() || request.prompt.len() as u32 >= self.n_ctx_seq {
            // The API rejects these before submitting; this guards the KV cache regardless.
            let _ = submission.events.try_send(GenerationEvent::Failed(format!(
                "prompt of {} tokens does not fit a context of {}",
                request.prompt.len(),
                self.n_ctx_seq
            )));
            return Ok(());
        }
        if request.max_new_tokens == 0 {
            let stats = GenerationStats {
                prompt_tokens: request.prompt.len() as u32,
                ..GenerationStats::default()
            };
            // Ignored send error: a client that left needs no answer.
            let _ = submission.events.try_send(GenerationEvent::Done {
                reason: FinishReason::Length,
                stats,
            });
            return Ok(());
        }
        if let Err(reason) = self.runner.begin_sequence(seq, &request.sampling) {
            // Ignored send error: a client that left needs no answer.
            let _ = submission
                .events
                .try_send(GenerationEvent::Rejected(reason));
            return Ok(());
        }
        // Keep the shared prefix, but decode at least the last prompt token, whose logits pick the
        // first generated token, unless the sequence kept exactly those logits (the same prompt
        // again: a regenerated answer, another sample).
        let cache = &mut self.kv[index];
        let prompt_len = request.prompt.len();
        let shared = common_prefix(&cache.tokens, &request.prompt);
        let from_kept = shared == prompt_len && cache.logits_follow == Some(prompt_len);
        let reuse = if from_kept {
            prompt_len
        } else {
            shared.min(prompt_len - 1)
        };
        if cache.tokens.len() > reuse {
            self.runner.truncate_sequence(seq, reuse as u32);
            cache.truncate(reuse);
        }
        let stop = StopMatcher::new(request.stop.clone());
        self.slots[index] = Some(Slot {
            submission,
            n_prefilled: reuse,
            pending: None,
            cached: reuse as u32,
            generated: 0,
            decoder: Utf8Decoder::default(),
            stop,
            admitted_at: Instant::now(),
            first_token_at: None,
            order: self.next_order,
            passed_over: 0,
            logprobs: Vec::new(),
        });
        self.next_order += 1;
        Ok(())
    }

    /// The idle sequence for `prompt`: the one whose whole cache the prompt continues or that
    /// holds the whole prompt (the longest such), else an empty one, else the least recently used. A cache the prompt only partly
    /// shares is not cut short for it: its shared prefix is copied instead (`share_prefixes`), so
    /// the conversation it holds can still continue. `None` when every sequence is busy.
    fn pick_sequence(&self, prompt: &[Token]) -> Option<usize> {
        // Reversed: `max_by_key` keeps the last of equal keys, and the lowest index should win.
        let idle = (0..self.slots.len())
            .rev()
            .filter(|&i| self.slots[i].is_none());
        idle.max_by_key(|&i| {
            let cache = &self.kv[i];
            let shared = common_prefix(&cache.tokens, prompt);
            // Its whole cache continued (a conversation's next turn), or the whole prompt in it
            // (the same prompt again, a regenerated answer: what is cut is the old answer).
            let continued = if shared == cache.tokens.len() || shared + 1 >= prompt.len() {
                shared
            } else {
                0
            };
            // Ordered: most tokens continued, then empty over occupied, then next to a busy
            // sequence, then least recently used.
            (
                continued,
                cache.tokens.is_empty(),
                self.next_to_busy(i),
                std::cmp::Reverse(cache.last_used),
            )
        })
    }

    /// Whether sequence `i` neighbours one bound to a request. With one KV stream per sequence,
    /// llama.cpp puts only sequences with consecutive ids in one micro-batch (each micro-batch is
    /// a pass over the weights), so a step decoding sequences 0, 2 and 5 costs three passes where
    /// 0, 1 and 2 cost one: new requests keep the busy sequences together.
    fn next_to_busy(&self, i: usize) -> bool {
        let busy = |j: usize| self.slots.get(j).is_some_and(Option::is_some);
        (i > 0 && busy(i - 1)) || busy(i + 1)
    }

    /// Gives each sequence in prefill the longest prefix of its prompt that another sequence's
    /// cells hold, copied when that saves at least [`MIN_SHARED_PREFIX`] tokens of prefill (a
    /// system prompt many conversations share is computed once). Returns, per sequence, whether
    /// it waits this step: at least half of what its prompt still needs is a prefix one an
    /// earlier request is still prefilling, and copying it once that is done beats computing the
    /// same cells twice.
    fn share_prefixes(&mut self) -> Vec<bool> {
        (0..self.slots.len())
            .map(|i| self.share_prefix(i))
            .collect()
    }

    /// `share_prefixes` for sequence `i`: whether it waits.
    fn share_prefix(&mut self, i: usize) -> bool {
        let n = self.slots.len();
        let Some(slot) = self.slots[i].as_ref().filter(|s| s.in_prefill()) else {
            return false;
        };
        // The last prompt token is always decoded: its logits pick the first token.
        let limit = slot.prompt().len() - 1;
        // Waiting pays when the leader's cells are most of what this prompt still needs; a few
        // shared tokens (a template's preamble) are cheaper computed alongside in this step.
        let left = slot.prompt().len() - slot.n_prefilled;
        let waits = self.slots.iter().flatten().any(|leader| {
            let shared = common_prefix(leader.prompt(), slot.prompt()).min(limit);
            let saved = shared.saturating_sub(slot.n_prefilled);
            leader.order < slot.order
                && leader.in_prefill()
                && leader.n_prefilled < shared
                && saved >= MIN_SHARED_PREFIX
                && saved * 2 >= left
        });
        if waits {
            // Copied whole once the leader holds it.
            return true;
        }
        let donor = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                (
                    common_prefix(&self.kv[j].tokens, slot.prompt()).min(limit),
                    j,
                )
            })
            // The lowest index of equals: the first to hold the cells.
            .max_by_key(|&(shared, j)| (shared, std::cmp::Reverse(j)));
        if let Some((shared, j)) =
            donor.filter(|&(shared, _)| shared >= slot.n_prefilled + MIN_SHARED_PREFIX)
        {
            self.runner
                .copy_prefix(j as SeqId, i as SeqId, shared as u32);
            let tokens = self.kv[j].tokens[..shared].to_vec();
            self.kv[i] = SeqCache {
                tokens,
                logits_follow: None,
                last_used: self.kv[i].last_used,
            };
            let slot = self.slots[i].as_mut().expect("checked above");
            slot.n_prefilled = shared;
            slot.cached = shared as u32;
        }
        false
    }

    /// Tokens cached in each sequence's KV cells (for tests and diagnostics).
    pub fn cached_tokens(&self, seq: SeqId) -> &[Token] {
        &self.kv[seq as usize].tokens
    }

    /// Runs one decode over every active sequence.
    pub fn step(&mut self) -> StepReport {
        let mut report = StepReport::default();
        self.drop_cancelled(&mut report);
        // First tokens answered from kept logits join this step's batch as pending tokens.
        for index in 0..self.slots.len() {
            if self.slots[index]
                .as_ref()
                .is_some_and(Slot::answered_from_kept)
            {
                self.sample_token(index, Logits::Kept, &mut report);
            }
        }

        let (batch, sample_at, prompt_tokens) = self.build_batch();
        report.batch_tokens = batch.len();
        report.prompt_tokens = prompt_tokens;
        if batch.is_empty() {
            return report;
        }
        if let Err(err) = self.runner.decode(&batch) {
            tracing::error!(%err, "decode failed; failing every sequence in the batch");
            if let super::runner::RunnerError::Lost(reason) = &err {
                report.lost = Some(reason.clone());
            }
            for &(index, _) in &sample_at {
                self.fail(index, err.to_string(), &mut report);
            }
            // Sequences mid-prefill in this batch are failed too: their KV state is unknown.
            let seqs: Vec<usize> = batch.iter().map(|e| e.seq as usize).collect();
            for index in seqs {
                if self.slots[index].is_some() {
                    self.fail(index, err.to_string(), &mut report);
                }
            }
            return report;
        }
        for (index, batch_index) in sample_at {
            // After a prompt's last token, its logits are kept for the same prompt again.
            if self.slots[index]
                .as_ref()
                .is_some_and(Slot::before_first_token)
            {
                self.runner.keep_logits(index as SeqId, batch_index);
                self.kv[index].logits_follow = Some(self.kv[index].tokens.len());
            }
            self.sample_token(index, Logits::Batch(batch_index), &mut report);
        }
        report
    }

    /// Samples the next token of slot `index` from `logits` and takes it on.
    fn sample_token(&mut self, index: usize, logits: Logits, report: &mut StepReport) {
        match self.runner.sample(index as SeqId, logits) {
            Ok(token) => {
                self.record_logprobs(index, logits, token);
                self.accept_token(index, token, report);
            }
            // The request's grammar left no admissible token: its mistake, ended in-band.
            Err(reason) => self.reject(index, reason, report),
        }
    }

    fn drop_cancelled(&mut self, report: &mut StepReport) {
        for index in 0..self.slots.len() {
            if self.slots[index]
                .as_ref()
                .is_some_and(|s| s.submission.events.is_closed())
            {
                self.release(index, report);
            }
        }
    }

    /// Decode tokens first, then prompt chunks shortest-first, within `n_batch`; the entries are
    /// then ordered by sequence (see [`in_sequence_order`]). Returns the batch, for each entry
    /// with logits the slot index and batch position to sample from, and how many of the batch's
    /// tokens are prompt tokens.
    fn build_batch(&mut self) -> (Vec<BatchEntry>, Vec<(usize, usize)>, usize) {
        let waiting = self.share_prefixes();
        let mut batch = Vec::with_capacity(self.n_batch);
        let mut sample_at = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            if let Some(token) = slot.pending.take() {
                let cache = &mut self.kv[index].tokens;
                sample_at.push((index, batch.len()));
                batch.push(BatchEntry {
                    token,
                    pos: cache.len() as u32,
                    seq: index as SeqId,
                    logits: true,
                });
                cache.push(token);
            }
        }
        let mut prefilling: Vec<usize> = (0..self.slots.len())
            .filter(|&i| !waiting[i] && self.slots[i].as_ref().is_some_and(Slot::in_prefill))
            .collect();
        // Shortest remaining prompt first, admission order breaking ties; but a prompt passed over
        // for as many steps as there are sequences goes first, so a long prompt is never starved
        // by short ones that keep arriving.
        let n_seq = self.slots.len();
        prefilling.sort_by_key(|&i| {
            self.slots[i]
                .as_ref()
                .map_or((true, usize::MAX, u64::MAX), |s| {
                    (
                        s.passed_over < n_seq,
                        s.prompt().len() - s.n_prefilled,
                        s.order,
                    )
                })
        });
        let mut prompt_tokens = 0;
        for index in prefilling {
            let budget = self.n_batch - batch.len();
            let Some(slot) = self.slots[index].as_mut() else {
                continue;
            };
            if budget == 0 || prompt_tokens >= COMBINE_PROMPTS_BELOW {
                slot.passed_over += 1;
                continue;
            }
            slot.passed_over = 0;
            prompt_tokens += (slot.prompt().len() - slot.n_prefilled).min(budget);
            let cache = &mut self.kv[index].tokens;
            let prompt_len = slot.prompt().len();
            let end = (slot.n_prefilled + budget).min(prompt_len);
            for i in slot.n_prefilled..end {
                let last = i + 1 == prompt_len;
                if last {
                    sample_at.push((index, batch.len()));
                }
                let token = slot.prompt()[i];
                batch.push(BatchEntry {
                    token,
                    pos: cache.len() as u32,
                    seq: index as SeqId,
                    logits: last,
                });
                cache.push(token);
            }
            slot.n_prefilled = end;
        }
        let (batch, sample_at) = in_sequence_order(batch, sample_at);
        (batch, sample_at, prompt_tokens)
    }

    /// For a request that asked for them, the sampled token's log-probability and alternatives,
    /// kept until the token's text is sent. End-of-generation tokens are not reported (they have
    /// no text), as OpenAI does not report them.
    fn record_logprobs(&mut self, index: usize, logits: Logits, token: Token) {
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let Some(top_n) = slot.submission.request.logprobs else {
            return;
        };
        if self.runner.is_end_of_generation(token) {
            return;
        }
        let special = slot.submission.request.special_tokens;
        let (logprob, top) =
            self.runner
                .logprobs(index as SeqId, logits, token, usize::from(top_n));
        let bytes = |t: Token| {
            let mut out = Vec::new();
            self.runner.token_bytes(t, special, &mut out);
            out
        };
        slot.logprobs.push(TokenLogprob {
            token,
            bytes: bytes(token),
            logprob,
            top: top
                .into_iter()
                .map(|(token, logprob)| TopLogprob {
                    token,
                    bytes: bytes(token),
                    logprob,
                })
                .collect(),
        });
    }

    fn accept_token(&mut self, index: usize, token: Token, report: &mut StepReport) {
        let is_end = self.runner.is_end_of_generation(token);
        let mut piece = Vec::new();
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        if !is_end {
            let special = slot.submission.request.special_tokens;
            self.runner.token_bytes(token, special, &mut piece);
        }
        slot.generated += 1;
        slot.first_token_at.get_or_insert_with(Instant::now);
        if is_end {
            self.finish(index, FinishReason::Stop, report);
            return;
        }
        let text = slot.decoder.push(&piece);
        let outcome = slot.stop.push(&text);
        if !outcome.emit.is_empty() && !slot.send_text(outcome.emit) {
            self.release(index, report);
            return;
        }
        if outcome.stopped {
            let which = slot.stop.matched().unwrap_or_default();
            self.send_done(index, FinishReason::StopString(which), report);
            return;
        }
        let at_limit = slot.generated >= slot.submission.request.max_new_tokens
            || self.kv[index].tokens.len() as u32 + 1 >= self.n_ctx_seq;
        if at_limit {
            self.finish(index, FinishReason::Length, report);
        } else {
            slot.pending = Some(token);
        }
    }

    /// Ends a sequence that was not cut by a stop string: flushes held text first.
    fn finish(&mut self, index: usize, reason: FinishReason, report: &mut StepReport) {
        let Some(slot) = self.slots[index].as_mut() else {
            return;
        };
        let tail = slot.decoder.flush();
        let mut outcome = slot.stop.push(&tail);
        if !outcome.stopped {
            outcome.emit.push_str(&slot.stop.flush());
        }
        let reason = if outcome.stopped {
            FinishReason::StopString(slot.stop.matched().unwrap_or_default())
        } else {
            reason
        };
        let sent = if !outcome.emit.is_empty() {
            slot.send_text(outcome.emit)
        } else if !outcome.stopped && !slot.logprobs.is_empty() {
            // Tokens without text of their own (a control token not rendered) still count.
            let logprobs = std::mem::take(&mut slot.logprobs);
            slot.send(GenerationEvent::Logprobs(logprobs))
        } else {
            true
        };
        if !sent {
            self.release(index, report);
            return;
        }
        self.send_done(index, reason, report);
    }

    fn send_done(&mut self, index: usize, reason: FinishReason, report: &mut StepReport) {
        if let Some(slot) = self.slots[index].as_mut() {
            // Charged before the client hears it is done, so its next request sees the charge.
            slot.charge_usage();
            let stats = slot.stats();
            report.finished.push(stats);
            // Ignored result: the slot is released either way.
            let _ = slot.send(GenerationEvent::Done { reason, stats });
        }
        self.release(index, report);
    }

    fn reject(&mut self, index: usize, message: String, report: &mut StepReport) {
        if let Some(slot) = self.slots[index].as_ref() {
            // Ignored result: the slot is released either way.
            let _ = slot.send(GenerationEvent::Rejected(message));
        }
        self.release(index, report);
    }

    fn fail(&mut self, index: usize, message: String, report: &mut StepReport) {
        if let Some(slot) = self.slots[index].as_ref() {
            let _ = slot.send(GenerationEvent::Failed(message));
        }
        self.release(index, report);
        // After a failed decode the cells' contents are unknown: drop them.
        self.runner.truncate_sequence(index as SeqId, 0);
        self.kv[index].truncate(0);
    }

    /// Frees the slot for the next request. Its KV cells stay as a prefix cache.
    fn release(&mut self, index: usize, report: &mut StepReport) {
        if let Some(mut slot) = self.slots[index].take() {
            slot.charge_usage();
            self.runner.end_sequence(index as SeqId);
            self.kv[index].last_used = self.next_order;
            self.next_order += 1;
            report.ended.push(index as SeqId);
        }
    }
}

#[cfg(test)]
mod tests;
