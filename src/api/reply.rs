//! The one typed reply stream: engine events (or a shell loop's rounds) turned, once, into the
//! events every dialect formats — reasoning and content as they settle, tool calls with their
//! structured arguments, log-probabilities, sandbox executions, and one finish per choice with its
//! reason and usage. Dialects only shape these events; none reads engine events itself
//! (invariant 34).
//!
//! The non-streamed answer is the fold of the same events ([`Replies::collect`]), so a streamed
//! reply and an unstreamed one say the same thing.

use futures::stream::{self, BoxStream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use crate::engine::{FinishReason, GenerationEvent, GenerationStats, TokenLogprob};
use crate::tools::stream::{Delta, ToolStream};
use crate::tools::{AssistantMessage, ToolCall, ToolRequest};

/// Why a choice ended, in words every dialect maps from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The model ended its turn.
    Stop,
    /// One of the request's stop strings: its position in the request's list.
    StopSequence(usize),
    /// The token budget or the context ran out.
    Length,
    /// The reply is (ends with) tool calls for the client to run.
    ToolCalls,
}

impl Reason {
    /// The one truncation rule: calls completed before a cut-off are still calls, but the reply
    /// was cut off, so it says `Length`.
    pub fn of(engine: FinishReason, has_calls: bool) -> Self {
        match engine {
            FinishReason::Length => Self::Length,
            _ if has_calls => Self::ToolCalls,
            FinishReason::Stop => Self::Stop,
            FinishReason::StopString(which) => Self::StopSequence(which),
        }
    }

    /// OpenAI's `finish_reason`.
    pub fn openai(self) -> &'static str {
        match self {
            Self::Stop | Self::StopSequence(_) => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }

    /// Ollama's `done_reason` (a reply with calls is `stop` there).
    pub fn ollama(self) -> &'static str {
        match self {
            Self::Length => "length",
            _ => "stop",
        }
    }

    /// LM Studio's `stopReason`.
    pub fn lmstudio(self) -> &'static str {
        match self {
            Self::Stop => "eosFound",
            Self::StopSequence(_) => "stopStringFound",
            Self::Length => "maxPredictedTokensReached",
            Self::ToolCalls => "toolCalls",
        }
    }

    /// Anthropic's `stop_reason`.
    pub fn anthropic(self) -> &'static str {
        match self {
            Self::Stop => "end_turn",
            Self::StopSequence(_) => "stop_sequence",
            Self::Length => "max_tokens",
            Self::ToolCalls => "tool_use",
        }
    }
}

/// How a choice ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub reason: Reason,
    /// The counts and timings of the choice's (last) generation.
    pub stats: GenerationStats,
    /// What the choice adds to the response's usage: its prompt once per prompt, every round of
    /// a shell loop.
    pub usage: Usage,
}

/// One event of one choice.
#[derive(Debug)]
pub enum ReplyEvent {
    Reasoning(String),
    Content(String),
    /// The log-probabilities of the tokens whose text the next `Reasoning` or `Content` carries
    /// (or, before `Finish`, text already sent or held back as a call).
    Logprobs(Vec<TokenLogprob>),
    /// A call begins: its position among the reply's calls, its id and tool.
    ToolCallStarted {
        index: u32,
        id: String,
        name: String,
    },
    /// More of the call's arguments, as JSON text.
    ToolCallArguments {
        index: u32,
        delta: String,
    },
    /// The call, whole, with its arguments structured.
    ToolCallDone(ToolCall),
    /// The shell loop runs one of the model's `shell` calls.
    ExecutionStarted {
        round: u32,
        call: ToolCall,
    },
    /// It ran: the execution's record (what `sandbox_executions` lists).
    ExecutionFinished(Value),
    /// The choice is complete; nothing follows for it.
    Finish(Finish),
    /// The whole reply failed; nothing follows for any choice.
    Error(ApiError),
}

/// The events of every choice of one reply, tagged with the choice index. Dropping it cancels
/// the generation (or the shell loop) behind it.
pub struct Replies {
    events: BoxStream<'static, (u32, ReplyEvent)>,
    /// How many choices the reply has.
    pub choices: u32,
}

impl Replies {
    /// The reply of submitted choices (`n` per prompt): with `tools`, output is parsed for
    /// reasoning and calls; a refused grammar is blamed on `grammar_param`.
    pub fn generation(
        receivers: Vec<mpsc::Receiver<GenerationEvent>>,
        tools: Option<Arc<ToolRequest>>,
        n: u32,
        grammar_param: &'static str,
    ) -> Self {
        let choices = receivers.len();
        let state = Generation {
            events: merged(receivers).boxed(),
            streams: (0..choices).map(|_| ToolStream::new()).collect(),
            pending: VecDeque::new(),
            tools,
            n: n.max(1),
            grammar_param,
            finished: 0,
            ended: false,
        };
        let events = stream::unfold(state, |mut state| async move {
            state.step().await.map(|event| (event, state))
        })
        .boxed();
        Self {
            events,
            choices: choices as u32,
        }
    }

    /// The reply a task sends into `rx` (the shell loop's, one choice); the task stops when this
    /// is dropped.
    /// A task that ends before every choice finished (it failed) ends the reply with an error,
    /// as an engine that stops does.
    pub fn from_channel(rx: mpsc::Receiver<(u32, ReplyEvent)>, choices: u32) -> Self {
        // (the receiver, choices still to finish, whether the reply is over)
        let state = (rx, choices, false);
        let events = stream::unfold(state, |(mut rx, left, over)| async move {
            if over {
                return None;
            }
            match rx.recv().await {
                Some((index, event)) => {
                    let done = matches!(event, ReplyEvent::Error(_));
                    let left = left - u32::from(matches!(event, ReplyEvent::Finish(_)));
                    Some(((index, event), (rx, left, done)))
                }
                None if left > 0 => {
                    let error = ApiError::EngineFailed(ENGINE_STOPPED.into());
                    Some(((0, ReplyEvent::Error(error)), (rx, 0, true)))
                }
                None => None,
            }
        })
        .boxed();
        Self { events, choices }
    }

    /// The next event; `None` once every choice finished or the reply failed.
    pub async fn next(&mut self) -> Option<(u32, ReplyEvent)> {
        self.events.next().await
    }

    /// Every choice, whole: the non-streamed answer. A reply that ends without a choice's finish
    /// is the engine's failure.
    pub async fn collect(mut self) -> Result<Vec<Collected>, ApiError> {
        let mut out: Vec<Folding> = (0..self.choices).map(|_| Folding::default()).collect();
        while let Some((index, event)) = self.next().await {
            let choice = &mut out[index as usize];
            match event {
                ReplyEvent::Reasoning(text) => choice
                    .reasoning
                    .get_or_insert_with(String::new)
                    .push_str(&text),
                ReplyEvent::Content(text) => choice
                    .content
                    .get_or_insert_with(String::new)
                    .push_str(&text),
                ReplyEvent::Logprobs(tokens) => choice.logprobs.extend(tokens),
                ReplyEvent::ToolCallDone(call) => choice.calls.push(call),
                ReplyEvent::ToolCallStarted { .. }
                | ReplyEvent::ToolCallArguments { .. }
                | ReplyEvent::ExecutionStarted { .. } => {}
                ReplyEvent::ExecutionFinished(record) => choice.executions.push(record),
                ReplyEvent::Finish(finish) => choice.finish = Some(finish),
                ReplyEvent::Error(error) => return Err(error),
            }
        }
        out.into_iter()
            .map(|choice| {
                let finish = choice
                    .finish
                    .ok_or_else(|| ApiError::EngineFailed(ENGINE_STOPPED.into()))?;
                // A reply of calls alone has no content; any other reply has some, maybe empty.
                let content = match choice.content {
                    None if !choice.calls.is_empty() => None,
                    content => Some(content.unwrap_or_default()),
                };
                Ok(Collected {
                    message: AssistantMessage {
                        content,
                        reasoning: choice.reasoning,
                        tool_calls: choice.calls,
                    },
                    logprobs: choice.logprobs,
                    executions: choice.executions,
                    finish,
                })
            })
            .collect()
    }
}

/// A choice being folded.
#[derive(Default)]
struct Folding {
    content: Option<String>,
    reasoning: Option<String>,
    calls: Vec<ToolCall>,
    logprobs: Vec<TokenLogprob>,
    executions: Vec<Value>,
    finish: Option<Finish>,
}

/// A finished choice.
#[derive(Debug, Clone)]
pub struct Collected {
    pub message: AssistantMessage,
    /// Per generated token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprob>,
    /// The shell loop's executions, in order.
    pub executions: Vec<Value>,
    pub finish: Finish,
}

impl Collected {
    /// The content, or nothing.
    pub fn text(&self) -> &str {
        self.message.content.as_deref().unwrap_or("")
    }
}

/// The usage of every choice together.
pub fn total_usage(done: &[Collected]) -> Usage {
    done.iter()
        .fold(Usage::default(), |sum, c| sum + c.finish.usage)
}

/// Turns the merged engine events of several choices into reply events.
struct Generation {
    events: BoxStream<'static, (u32, GenerationEvent)>,
    streams: Vec<ToolStream>,
    pending: VecDeque<(u32, ReplyEvent)>,
    tools: Option<Arc<ToolRequest>>,
    n: u32,
    grammar_param: &'static str,
    finished: usize,
    ended: bool,
}

impl Generation {
    async fn step(&mut self) -> Option<(u32, ReplyEvent)> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.ended {
                return None;
            }
            let Some((index, event)) = self.events.next().await else {
                self.ended = true;
                if self.finished < self.streams.len() {
                    let error = ApiError::EngineFailed(ENGINE_STOPPED.into());
                    return Some((0, ReplyEvent::Error(error)));
                }
                return None;
            };
            match event {
                GenerationEvent::Text(text) => match &self.tools {
                    None if text.is_empty() => {}
                    None => self.pending.push_back((index, ReplyEvent::Content(text))),
                    Some(tools) => {
                        let deltas = self.streams[index as usize].push(&text, tools);
                        self.pending
                            .extend(deltas.into_iter().map(|d| (index, delta_event(d))));
                    }
                },
                GenerationEvent::Logprobs(tokens) if tokens.is_empty() => {}
                GenerationEvent::Logprobs(tokens) => self
                    .pending
                    .push_back((index, ReplyEvent::Logprobs(tokens))),
                GenerationEvent::Done { reason, stats } => {
                    self.finished += 1;
                    let usage = Usage::of(&stats, index % self.n == 0);
                    let mut has_calls = false;
                    if let Some(tools) = &self.tools {
                        let truncated = reason == FinishReason::Length;
                        let (deltas, message, calls) =
                            self.streams[index as usize].finish(tools, truncated);
                        has_calls = calls;
                        self.pending
                            .extend(deltas.into_iter().map(|d| (index, delta_event(d))));
                        for event in call_events(message.tool_calls) {
                            self.pending.push_back((index, event));
                        }
                    }
                    let finish = Finish {
                        reason: Reason::of(reason, has_calls),
                        stats,
                        usage,
                    };
                    self.pending.push_back((index, ReplyEvent::Finish(finish)));
                }
                GenerationEvent::Rejected(message) => {
                    self.ended = true;
                    let error = ApiError::invalid(self.grammar_param, message);
                    return Some((index, ReplyEvent::Error(error)));
                }
                GenerationEvent::Failed(message) => {
                    self.ended = true;
                    let error = ApiError::EngineFailed(message);
                    tracing::error!(%error, "generation failed");
                    return Some((index, ReplyEvent::Error(error)));
                }
            }
        }
    }
}

fn delta_event(delta: Delta) -> ReplyEvent {
    match delta {
        Delta::Reasoning(text) => ReplyEvent::Reasoning(text),
        Delta::Content(text) => ReplyEvent::Content(text),
    }
}

/// The events that report `calls`: started, the arguments, done, for each in turn.
pub fn call_events(calls: Vec<ToolCall>) -> Vec<ReplyEvent> {
    let mut out = Vec::with_capacity(calls.len() * 3);
    for (index, call) in (0u32..).zip(calls) {
        out.push(ReplyEvent::ToolCallStarted {
            index,
            id: call.id.clone(),
            name: call.name.clone(),
        });
        out.push(ReplyEvent::ToolCallArguments {
            index,
            delta: call.arguments_text(),
        });
        out.push(ReplyEvent::ToolCallDone(call));
    }
    out
}

/// The events of every choice, interleaved as they arrive, tagged with the choice index.
fn merged(
    receivers: Vec<mpsc::Receiver<GenerationEvent>>,
) -> impl futures::Stream<Item = (u32, GenerationEvent)> + Send + Unpin {
    stream::select_all(
        receivers
            .into_iter()
            .enumerate()
            .map(|(i, rx)| ReceiverStream::new(rx).map(move |event| (i as u32, event))),
    )
}

/// Why a request ends without its final event: the engine thread dropped it (a fault).
pub const ENGINE_STOPPED: &str = "the engine stopped before the generation finished";

/// OpenAI's `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the KV cache of an earlier request.
    pub cached_tokens: u32,
}

impl Usage {
    /// One generation's usage; `count_prompt` is false for the 2nd..nth choice of one prompt,
    /// whose prompt OpenAI counts once.
    pub fn of(stats: &GenerationStats, count_prompt: bool) -> Self {
        let (prompt, cached) = if count_prompt {
            (stats.prompt_tokens, stats.cached_tokens)
        } else {
            (0, 0)
        };
        Self {
            prompt_tokens: prompt,
            completion_tokens: stats.generated_tokens,
            total_tokens: prompt + stats.generated_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        let prompt_tokens = self.prompt_tokens + other.prompt_tokens;
        let completion_tokens = self.completion_tokens + other.completion_tokens;
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: self.prompt_tokens_details.cached_tokens
                    + other.prompt_tokens_details.cached_tokens,
            },
        }
    }
}

/// llama-server's `timings` object, for one choice. `prompt_n` counts the prompt tokens actually
/// computed; `cache_n` those reused from the KV cache.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timings {
    pub cache_n: u32,
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_token_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_token_ms: f64,
    pub predicted_per_second: f64,
}

impl From<&GenerationStats> for Timings {
    fn from(s: &GenerationStats) -> Self {
        let per = |ms: f64, n: u32| if n == 0 { 0.0 } else { ms / f64::from(n) };
        let rate = |ms: f64, n: u32| {
            if ms <= 0.0 {
                0.0
            } else {
                1e3 * f64::from(n) / ms
            }
        };
        // The first generated token is produced by the prompt's decode, so decode speed is
        // measured over the tokens after it.
        let decoded = s.generated_tokens.saturating_sub(1);
        let computed = s.prompt_tokens - s.cached_tokens;
        Self {
            cache_n: s.cached_tokens,
            prompt_n: computed,
            prompt_ms: s.prompt_ms,
            prompt_per_token_ms: per(s.prompt_ms, computed),
            prompt_per_second: rate(s.prompt_ms, computed),
            predicted_n: s.generated_tokens,
            predicted_ms: s.generation_ms,
            predicted_per_token_ms: per(s.generation_ms, decoded),
            predicted_per_second: rate(s.generation_ms, decoded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_stops_before_its_finish_ends_the_reply_with_an_error() {
        let (tx, rx) = mpsc::channel(4);
        tx.send((0, ReplyEvent::Content("partial".into())))
            .await
            .unwrap();
        drop(tx);
        let mut replies = Replies::from_channel(rx, 1);
        assert!(matches!(
            replies.next().await,
            Some((0, ReplyEvent::Content(_)))
        ));
        assert!(matches!(
            replies.next().await,
            Some((0, ReplyEvent::Error(_)))
        ));
        assert!(replies.next().await.is_none());
        let (tx, rx) = mpsc::channel(4);
        drop(tx);
        assert!(Replies::from_channel(rx, 1).collect().await.is_err());
    }
}
