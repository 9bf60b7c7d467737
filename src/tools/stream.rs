//! Streaming a reply that may hold tool calls: reasoning and content go out as soon as they are
//! settled; text that may be a call is held until the end, when the whole output is parsed exactly
//! as the non-streamed response parses it. So the streamed deltas add up to the same message.

use serde_json::{json, Value};

use super::parse::{may_open_reasoning, settled_content, split};
use super::{AssistantMessage, ToolRequest};

/// One choice's stream.
#[derive(Debug, Default)]
pub struct ToolStream {
    text: String,
    reasoning_sent: bool,
    /// Bytes of the body already sent as content.
    content_sent: usize,
}

/// A `delta` object.
pub type Delta = Value;

impl ToolStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes generated text; returns the deltas that are settled now.
    pub fn push(&mut self, piece: &str, tools: &ToolRequest) -> Vec<Delta> {
        if self.text.is_empty() {
            // The prompt opened reasoning: the output continues inside it.
            if let Some(open) = tools.opened {
                self.text.push_str(open);
            }
        }
        self.text.push_str(piece);
        let parts = split(&self.text);
        if parts.reasoning.is_none() && may_open_reasoning(&self.text) {
            return Vec::new();
        }
        let mut deltas = Vec::new();
        let Some(body) = parts.body else {
            // Inside an unfinished reasoning block: wait for its end.
            return deltas;
        };
        if let (Some(reasoning), false) = (parts.reasoning, self.reasoning_sent) {
            self.reasoning_sent = true;
            let reasoning = reasoning.trim();
            if !reasoning.is_empty() {
                deltas.push(json!({"reasoning_content": reasoning}));
            }
        }
        let settled = settled_content(body, tools.format);
        if settled > self.content_sent {
            deltas.push(json!({"content": &body[self.content_sent..settled]}));
            self.content_sent = settled;
        }
        deltas
    }

    /// Parses the whole output; returns the remaining deltas, the message, and whether it holds
    /// calls.
    pub fn finish(
        &mut self,
        tools: &ToolRequest,
        truncated: bool,
    ) -> (Vec<Delta>, AssistantMessage, bool) {
        if self.text.is_empty() {
            if let Some(open) = tools.opened {
                self.text.push_str(open);
            }
        }
        let (message, has_calls) = tools.finish_whole(&self.text, truncated);
        let mut deltas = Vec::new();
        if let (Some(reasoning), false) = (&message.reasoning, self.reasoning_sent) {
            if !reasoning.is_empty() {
                deltas.push(json!({"reasoning_content": reasoning}));
            }
        }
        let sent = split(&self.text)
            .body
            .map_or("", |body| &body[..self.content_sent.min(body.len())]);
        if let Some(content) = &message.content {
            match content.strip_prefix(sent) {
                Some(rest) if !rest.is_empty() => deltas.push(json!({"content": rest})),
                Some(_) => {}
                None => tracing::error!("streamed content is not a prefix of the final content"),
            }
        }
        for (index, call) in message.tool_calls.iter().enumerate() {
            deltas.push(json!({"tool_calls": [{
                "index": index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}
            }]}));
            deltas.push(json!({"tool_calls": [{
                "index": index, "function": {"arguments": call.arguments}
            }]}));
        }
        (deltas, message, has_calls)
    }
}
