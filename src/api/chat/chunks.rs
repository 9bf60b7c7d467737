//! `chat.completion.chunk`s of a streamed chat reply (a generation's or the shell loop's).

use serde_json::{json, Value};

use super::super::reply::{ReplyEvent, Timings};
use super::super::sse::{ChunkHeader, ChunkShape};
use crate::engine::TokenLogprob;

/// Chunks of `chat.completion.chunk`.
pub struct ChatChunks {
    header: ChunkHeader,
    /// Per choice: log-probabilities of tokens whose text produced no chunk yet (held by the
    /// tool-call parser); they go on the choice's next chunk.
    held_logprobs: Vec<Vec<TokenLogprob>>,
}

impl ChatChunks {
    pub fn new(header: ChunkHeader, choices: u32) -> Self {
        Self {
            header,
            held_logprobs: vec![Vec::new(); choices as usize],
        }
    }

    fn delta_chunk(&self, index: u32, delta: Value) -> Value {
        self.header.chunk(
            json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": null}]),
            None,
        )
    }

    /// Puts the held log-probabilities of choice `index` on `chunk`.
    fn attach_logprobs(&mut self, index: u32, chunk: &mut Value) {
        let held = &mut self.held_logprobs[index as usize];
        if !held.is_empty() {
            chunk["choices"][0]["logprobs"] = super::super::logprobs::chat(&std::mem::take(held));
        }
    }
}

impl ChunkShape for ChatChunks {
    fn opening(&self, index: u32) -> Option<Value> {
        Some(self.header.chunk(
            json!([{"index": index, "delta": {"role": "assistant", "content": "", "refusal": null}, "logprobs": null, "finish_reason": null}]),
            None,
        ))
    }

    fn event(&mut self, index: u32, event: ReplyEvent) -> Vec<Value> {
        let mut chunk = match event {
            ReplyEvent::Logprobs(tokens) => {
                self.held_logprobs[index as usize].extend(tokens);
                return Vec::new();
            }
            ReplyEvent::Reasoning(text) => {
                self.delta_chunk(index, json!({"reasoning_content": text}))
            }
            ReplyEvent::Content(text) => self.delta_chunk(index, json!({"content": text})),
            ReplyEvent::ToolCallStarted {
                index: call,
                id,
                name,
            } => self.delta_chunk(
                index,
                json!({"tool_calls": [{"index": call, "id": id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]}),
            ),
            ReplyEvent::ToolCallArguments { index: call, delta } => self.delta_chunk(
                index,
                json!({"tool_calls": [{"index": call, "function": {"arguments": delta}}]}),
            ),
            ReplyEvent::ToolCallDone(_) | ReplyEvent::ExecutionStarted { .. } => return Vec::new(),
            // An extra chunk per execution, with an empty delta: OpenAI SDKs ignore it.
            ReplyEvent::ExecutionFinished(record) => self.header.chunk(
                json!([{"index": index, "delta": {}, "logprobs": null, "finish_reason": null}]),
                Some(("sandbox_execution", record)),
            ),
            ReplyEvent::Finish(finish) => {
                let mut last = self.header.chunk(
                    json!([{"index": index, "delta": {}, "logprobs": null,
                            "finish_reason": finish.reason.openai()}]),
                    Some(("timings", json!(Timings::from(&finish.stats)))),
                );
                self.header
                    .add_lmstudio_stats(&mut last, &finish.stats, finish.reason);
                last
            }
            ReplyEvent::Error(_) => return Vec::new(),
        };
        self.attach_logprobs(index, &mut chunk);
        vec![chunk]
    }

    fn header(&self) -> &ChunkHeader {
        &self.header
    }
}
