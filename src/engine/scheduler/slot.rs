//! A sequence slot: one active request bound to a sequence id, what it has decoded and sampled,
//! and how its events reach the client.

use std::time::Instant;

use tokio::sync::mpsc::error::TrySendError;

use super::super::detok::Utf8Decoder;
use super::super::logprobs::TokenLogprob;
use super::super::stop::StopMatcher;
use super::super::{GenerationEvent, GenerationStats, Submission, Token};

/// One active request bound to a sequence id.
pub(super) struct Slot {
    pub(super) submission: Submission,
    /// Prompt tokens already decoded into the KV cache.
    pub(super) n_prefilled: usize,
    /// Sampled token not yet decoded (the sequence is in its decode phase).
    pub(super) pending: Option<Token>,
    /// Prompt tokens whose KV cells were reused from an earlier request.
    pub(super) cached: u32,
    pub(super) generated: u32,
    pub(super) decoder: Utf8Decoder,
    pub(super) stop: StopMatcher,
    pub(super) admitted_at: Instant,
    pub(super) first_token_at: Option<Instant>,
    pub(super) order: u64,
    /// Steps in a row this prompt waited in prefill while others were prefilled.
    pub(super) passed_over: usize,
    /// Log-probabilities of tokens whose text has not been sent yet (held back by the UTF-8
    /// decoder or the stop matcher).
    pub(super) logprobs: Vec<TokenLogprob>,
}

impl Slot {
    pub(super) fn prompt(&self) -> &[Token] {
        &self.submission.request.prompt
    }

    /// Tells the request's usage sink (once) the tokens the sequence took.
    pub(super) fn charge_usage(&mut self) {
        if let Some(usage) = self.submission.request.usage.take() {
            (usage.0)(self.prompt().len() as u64 + u64::from(self.generated));
        }
    }

    pub(super) fn in_prefill(&self) -> bool {
        self.pending.is_none() && self.n_prefilled < self.prompt().len()
    }

    /// Whether the first token is still to be sampled (in prefill, or answered from kept logits).
    pub(super) fn before_first_token(&self) -> bool {
        self.generated == 0 && self.pending.is_none()
    }

    /// The whole prompt was cached with the logits that follow it (`Scheduler::admit`): its first
    /// token is sampled from the kept row, without a decode.
    pub(super) fn answered_from_kept(&self) -> bool {
        self.before_first_token() && !self.in_prefill()
    }

    pub(super) fn stats(&self) -> GenerationStats {
        let now = Instant::now();
        let first = self.first_token_at.unwrap_or(now);
        GenerationStats {
            prompt_tokens: self.prompt().len() as u32,
            cached_tokens: self.cached,
            generated_tokens: self.generated,
            prompt_ms: first.duration_since(self.admitted_at).as_secs_f64() * 1e3,
            generation_ms: now.duration_since(first).as_secs_f64() * 1e3,
            queue_ms: self
                .admitted_at
                .duration_since(self.submission.submitted_at)
                .as_secs_f64()
                * 1e3,
        }
    }

    /// Sends `text`, preceded by the log-probabilities of the tokens it completes; `false` means
    /// the client is gone.
    pub(super) fn send_text(&mut self, text: String) -> bool {
        if !self.logprobs.is_empty() {
            let logprobs = std::mem::take(&mut self.logprobs);
            if !self.send(GenerationEvent::Logprobs(logprobs)) {
                return false;
            }
        }
        self.send(GenerationEvent::Text(text))
    }

    /// Sends an event; `false` means the client is gone and the slot should be dropped.
    pub(super) fn send(&self, event: GenerationEvent) -> bool {
        match self.submission.events.try_send(event) {
            Ok(()) => true,
            Err(TrySendError::Closed(_)) => false,
            // Cannot happen: the channel has room for every token plus the final event.
            Err(TrySendError::Full(_)) => {
                tracing::error!("event channel full; cancelling the sequence");
                false
            }
        }
    }
}
