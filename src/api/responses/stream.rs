//! A reply stream as a Responses output: items (`reasoning`, `message`, `function_call`) and the
//! events that build them (`response.output_item.added`, `content_part.added`,
//! `output_text.delta`/`.done`, `reasoning_text.delta`/`.done`,
//! `function_call_arguments.delta`/`.done`, `content_part.done`, `output_item.done`). The
//! non-streamed answer folds the same events through the same [`Output`], so both hold the same
//! items.

use serde_json::{json, Value};

use super::super::reply::ReplyEvent;

fn item_id(prefix: &str) -> String {
    super::super::generate::response_id(prefix).replacen('-', "_", 1)
}

/// The item being built.
enum Open {
    Reasoning {
        id: String,
        text: String,
    },
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
    },
}

/// The output items of one reply, built event by event; each step returns the stream events
/// (without `sequence_number`, which the sender stamps).
#[derive(Default)]
pub struct Output {
    /// Finished items.
    pub items: Vec<Value>,
    open: Option<Open>,
    /// The assistant turn, as chat messages see it: its text and calls.
    pub text: String,
    pub calls: Vec<Value>,
    pub executions: Vec<Value>,
}

impl Output {
    fn index(&self) -> usize {
        self.items.len()
    }

    /// The events that finish the open item.
    fn close(&mut self) -> Vec<Value> {
        let index = self.index();
        let Some(open) = self.open.take() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let item = match open {
            Open::Reasoning { id, text } => {
                out.push(
                    json!({"type": "response.reasoning_text.done", "item_id": id,
                                "output_index": index, "content_index": 0, "text": text}),
                );
                json!({"type": "reasoning", "id": id, "summary": [],
                       "content": [{"type": "reasoning_text", "text": text}]})
            }
            Open::Message { id, text } => {
                let part = json!({"type": "output_text", "text": text, "annotations": [],
                                  "logprobs": []});
                out.push(json!({"type": "response.output_text.done", "item_id": id,
                                "output_index": index, "content_index": 0, "text": text,
                                "logprobs": []}));
                out.push(json!({"type": "response.content_part.done", "item_id": id,
                                "output_index": index, "content_index": 0, "part": part}));
                json!({"type": "message", "id": id, "status": "completed", "role": "assistant",
                       "content": [part]})
            }
            Open::Call {
                id,
                call_id,
                name,
                arguments,
            } => {
                out.push(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                                "output_index": index, "name": name, "arguments": arguments}),
                );
                json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
                       "arguments": arguments, "status": "completed"})
            }
        };
        out.push(
            json!({"type": "response.output_item.done", "output_index": index,
                        "item": item}),
        );
        self.items.push(item);
        out
    }

    /// The events for one reply event (a `Finish` or `Error` closes the open item).
    pub fn event(&mut self, event: ReplyEvent) -> Vec<Value> {
        match event {
            ReplyEvent::Reasoning(delta) => {
                let mut out = Vec::new();
                if !matches!(self.open, Some(Open::Reasoning { .. })) {
                    out = self.close();
                    let id = item_id("rs");
                    out.push(json!({"type": "response.output_item.added",
                                    "output_index": self.index(),
                                    "item": {"type": "reasoning", "id": id, "summary": [],
                                             "content": []}}));
                    self.open = Some(Open::Reasoning {
                        id,
                        text: String::new(),
                    });
                }
                let index = self.index();
                if let Some(Open::Reasoning { id, text }) = &mut self.open {
                    text.push_str(&delta);
                    out.push(
                        json!({"type": "response.reasoning_text.delta", "item_id": id,
                                    "output_index": index, "content_index": 0, "delta": delta}),
                    );
                }
                out
            }
            ReplyEvent::Content(delta) => {
                let mut out = Vec::new();
                if !matches!(self.open, Some(Open::Message { .. })) {
                    out = self.close();
                    let id = item_id("msg");
                    let index = self.index();
                    out.push(
                        json!({"type": "response.output_item.added", "output_index": index,
                                    "item": {"type": "message", "id": id,
                                             "status": "in_progress", "role": "assistant",
                                             "content": []}}),
                    );
                    out.push(json!({"type": "response.content_part.added", "item_id": id,
                                    "output_index": index, "content_index": 0,
                                    "part": {"type": "output_text", "text": "",
                                             "annotations": [], "logprobs": []}}));
                    self.open = Some(Open::Message {
                        id,
                        text: String::new(),
                    });
                }
                self.text.push_str(&delta);
                let index = self.index();
                if let Some(Open::Message { id, text }) = &mut self.open {
                    text.push_str(&delta);
                    out.push(json!({"type": "response.output_text.delta", "item_id": id,
                                    "output_index": index, "content_index": 0, "delta": delta,
                                    "logprobs": []}));
                }
                out
            }
            ReplyEvent::ToolCallStarted {
                id: call_id, name, ..
            } => {
                let mut out = self.close();
                let id = item_id("fc");
                out.push(json!({"type": "response.output_item.added",
                                "output_index": self.index(),
                                "item": {"type": "function_call", "id": id, "call_id": call_id,
                                         "name": name, "arguments": "",
                                         "status": "in_progress"}}));
                self.open = Some(Open::Call {
                    id,
                    call_id,
                    name,
                    arguments: String::new(),
                });
                out
            }
            ReplyEvent::ToolCallArguments { delta, .. } => {
                let index = self.index();
                match &mut self.open {
                    Some(Open::Call { id, arguments, .. }) => {
                        arguments.push_str(&delta);
                        vec![json!({"type": "response.function_call_arguments.delta",
                                    "item_id": id, "output_index": index, "delta": delta})]
                    }
                    _ => Vec::new(),
                }
            }
            ReplyEvent::ToolCallDone(call) => {
                self.calls.push(json!({"id": call.id, "type": "function",
                                       "function": {"name": call.name,
                                                    "arguments": call.arguments}}));
                self.close()
            }
            ReplyEvent::ExecutionFinished(record) => {
                self.executions.push(record);
                Vec::new()
            }
            ReplyEvent::Finish(_) | ReplyEvent::Error(_) => self.close(),
            ReplyEvent::Logprobs(_) | ReplyEvent::ExecutionStarted { .. } => Vec::new(),
        }
    }

    /// The assistant turn as a chat message (what a follow-up continues from).
    pub fn turn(&self) -> Value {
        let mut message = json!({"role": "assistant", "content": self.text});
        if !self.calls.is_empty() {
            message["tool_calls"] = Value::Array(self.calls.clone());
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::ToolCall;

    #[test]
    fn items_are_built_in_order_with_matching_ids() {
        let mut output = Output::default();
        let mut events = Vec::new();
        events.extend(output.event(ReplyEvent::Reasoning("think".into())));
        events.extend(output.event(ReplyEvent::Content("Hel".into())));
        events.extend(output.event(ReplyEvent::Content("lo".into())));
        let call = ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: json!({"a": 1}),
        };
        events.extend(output.event(ReplyEvent::ToolCallStarted {
            index: 0,
            id: call.id.clone(),
            name: call.name.clone(),
        }));
        events.extend(output.event(ReplyEvent::ToolCallArguments {
            index: 0,
            delta: call.arguments_text(),
        }));
        events.extend(output.event(ReplyEvent::ToolCallDone(call)));
        let kinds: Vec<&str> = output
            .items
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["reasoning", "message", "function_call"]);
        assert_eq!(output.items[1]["content"][0]["text"], "Hello");
        assert_eq!(output.items[2]["arguments"], "{\"a\":1}");
        // Every item's added and done events carry its id and index.
        for (index, item) in output.items.iter().enumerate() {
            let added = events
                .iter()
                .find(|e| e["type"] == "response.output_item.added" && e["output_index"] == index)
                .unwrap();
            assert_eq!(added["item"]["id"], item["id"]);
        }
        assert_eq!(output.turn()["tool_calls"][0]["function"]["name"], "f");
    }
}
