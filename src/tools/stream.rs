//! Streaming a reply that may hold tool calls: reasoning and content go out as they grow, as far
//! as they are settled (`parse::settled`); text that may be a call is held until the end, when
//! the whole output is parsed exactly as the non-streamed response parses it. So the streamed
//! deltas add up to the same message.

use serde_json::{json, Value};

use super::parse::settled;
use super::{AssistantMessage, ToolRequest};

/// One choice's stream.
#[derive(Debug, Default)]
pub struct ToolStream {
    text: String,
    /// The reasoning and content already sent.
    reasoning: String,
    content: String,
}

/// A `delta` object.
pub type Delta = Value;

/// The delta that takes `sent` to `now`, if `now` extends it.
fn grow(field: &str, sent: &mut String, now: &str) -> Option<Delta> {
    if now.len() <= sent.len() {
        return None;
    }
    let Some(new) = now.strip_prefix(sent.as_str()) else {
        tracing::error!("streamed {field} is not a prefix of what the output settles");
        return None;
    };
    let delta = json!({ field: new });
    sent.push_str(new);
    Some(delta)
}

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
        let now = settled(&self.text, tools.format);
        let reasoning = grow("reasoning_content", &mut self.reasoning, &now.reasoning);
        let content = grow("content", &mut self.content, &now.content);
        reasoning.into_iter().chain(content).collect()
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
        for (field, sent, whole) in [
            ("reasoning_content", &mut self.reasoning, &message.reasoning),
            ("content", &mut self.content, &message.content),
        ] {
            let whole = whole.as_deref().unwrap_or("");
            if whole.starts_with(sent.as_str()) {
                deltas.extend(grow(field, sent, whole));
            } else {
                tracing::error!("streamed {field} is not a prefix of the final {field}");
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
