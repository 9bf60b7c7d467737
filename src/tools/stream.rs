//! Streaming a reply that may hold tool calls: reasoning and content go out as they grow, as far
//! as they are settled (`parse::settled`); text that may be a call is held until the end, when
//! the whole output is parsed exactly as the non-streamed response parses it. So the streamed
//! pieces add up to the same message, whose calls the caller then reports.

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

/// A piece of the reply that can no longer change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Reasoning(String),
    Content(String),
}

impl Delta {
    pub fn content(&self) -> Option<&str> {
        match self {
            Self::Content(text) => Some(text),
            Self::Reasoning(_) => None,
        }
    }

    pub fn reasoning(&self) -> Option<&str> {
        match self {
            Self::Reasoning(text) => Some(text),
            Self::Content(_) => None,
        }
    }
}

/// The text that takes `sent` to `now`, if `now` extends it.
fn grow(field: &str, sent: &mut String, now: &str) -> Option<String> {
    if now.len() <= sent.len() {
        return None;
    }
    let Some(new) = now.strip_prefix(sent.as_str()) else {
        tracing::error!("streamed {field} is not a prefix of what the output settles");
        return None;
    };
    sent.push_str(new);
    Some(new.to_owned())
}

/// What remains of `whole` after `sent`, which must begin it.
fn rest(field: &str, sent: &mut String, whole: &str) -> Option<String> {
    if whole.starts_with(sent.as_str()) {
        grow(field, sent, whole)
    } else {
        tracing::error!("streamed {field} is not a prefix of the final {field}");
        None
    }
}

impl ToolStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes generated text; returns the pieces that are settled now.
    pub fn push(&mut self, piece: &str, tools: &ToolRequest) -> Vec<Delta> {
        if self.text.is_empty() {
            // The prompt opened reasoning: the output continues inside it.
            if let Some(open) = tools.opened {
                self.text.push_str(open);
            }
        }
        self.text.push_str(piece);
        let now = settled(&self.text, tools.format);
        let reasoning =
            grow("reasoning", &mut self.reasoning, &now.reasoning).map(Delta::Reasoning);
        let content = grow("content", &mut self.content, &now.content).map(Delta::Content);
        reasoning.into_iter().chain(content).collect()
    }

    /// Parses the whole output; returns the remaining pieces, the message, and whether it holds
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
        let reasoning = message.reasoning.as_deref().unwrap_or("");
        let content = message.content.as_deref().unwrap_or("");
        if let Some(text) = rest("reasoning", &mut self.reasoning, reasoning) {
            deltas.push(Delta::Reasoning(text));
        }
        if let Some(text) = rest("content", &mut self.content, content) {
            deltas.push(Delta::Content(text));
        }
        (deltas, message, has_calls)
    }
}
