//! Call syntaxes of the families whose calls are delimited by their own special tokens: GLM
//! (4.5 and later), Kimi (K2; K3's tagged sections, parsed whole), DeepSeek (V3, V3.1 and later),
//! Llama 4, harmony, FunctionGemma and Gemma 4. Each parser finds the calls in a
//! body, keeps complete ones before a last call cut off mid-way, and reports anything else that
//! looks like a call but does not parse as `Found::Broken` (returned as content, never a 5xx).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::parse::{before_markers, leading_json, Found, Parsed, ParsedCall, Settled};

pub(super) const GLM_ARG_KEY: &str = "<arg_key>";
const GLM_OPEN: &str = "<tool_call>";
const GLM_CLOSE: &str = "</tool_call>";

pub(super) const KIMI_SECTION: &str = "<|tool_calls_section_begin|>";
pub(super) const KIMI_CALL: &str = "<|tool_call_begin|>";
const KIMI_ARGUMENT: &str = "<|tool_call_argument_begin|>";
const KIMI_CALL_END: &str = "<|tool_call_end|>";
const KIMI_SECTION_END: &str = "<|tool_calls_section_end|>";

pub(super) const LLAMA4_START: &str = "<|python_start|>";
const LLAMA4_END: &str = "<|python_end|>";

pub(super) const HARMONY_CHANNEL: &str = "<|channel|>";
const HARMONY_MESSAGE: &str = "<|message|>";
const HARMONY_ENDS: [&str; 4] = ["<|end|>", "<|call|>", "<|return|>", "<|start|>"];

pub(super) const GEMMA_CALL: &str = "<start_function_call>";
const GEMMA_CALL_END: &str = "<end_function_call>";
const GEMMA_ESCAPE: &str = "<escape>";

pub(super) const GEMMA4_CALL: &str = "<|tool_call>";
const GEMMA4_CALL_END: &str = "<tool_call|>";
const GEMMA4_ESCAPE: &str = "<|\"|>";

pub(super) const K3_OPEN: &str = "<|open|>";
pub(super) const K3_SEP: &str = "<|sep|>";
pub(super) const K3_THINK_START: &str = "<|open|>think<|sep|>";
pub(super) const K3_THINK_END: &str = "<|close|>think<|sep|>";
const K3_MSG_START: &str = "<|open|>message role=\"assistant\"<|sep|>";
const K3_RESP_START: &str = "<|open|>response<|sep|>";
const K3_RESP_END: &str = "<|close|>response<|sep|>";
pub(super) const K3_TOOLS_START: &str = "<|open|>tools<|sep|>";
const K3_TOOLS_END: &str = "<|close|>tools<|sep|>";
const K3_CALL: &str = "<|open|>call";
const K3_CALL_END: &str = "<|close|>call<|sep|>";
const K3_ARGUMENT: &str = "<|open|>argument";
const K3_ARGUMENT_END: &str = "<|close|>argument<|sep|>";
const K3_JSON: &str = "<|open|>json";
const K3_JSON_END: &str = "<|close|>json<|sep|>";
const K3_MSG_END: &str = "<|close|>message<|sep|>";
const K3_EOM: &str = "<|end_of_msg|>";

pub(super) const DEEPSEEK_CALLS: &str = "<｜tool▁calls▁begin｜>";
pub(super) const DEEPSEEK_CALL: &str = "<｜tool▁call▁begin｜>";
const DEEPSEEK_SEP: &str = "<｜tool▁sep｜>";
const DEEPSEEK_CALL_END: &str = "<｜tool▁call▁end｜>";
const DEEPSEEK_CALLS_END: &str = "<｜tool▁calls▁end｜>";

/// The calls of a body whose calls are `open … close` segments (after an optional section
/// marker), each read by `call`. `section` markers around them are dropped.
fn delimited<'a>(
    body: &'a str,
    starts: &[&str],
    open: &str,
    close: &str,
    section_end: Option<&str>,
    call: impl Fn(&str) -> Result<ParsedCall, String>,
) -> Found<'a> {
    let Some(first) = starts.iter().filter_map(|m| body.find(m)).min() else {
        return Found::None;
    };
    let mut calls = Vec::new();
    let mut repairs = Vec::new();
    let mut rest = &body[first..];
    for marker in starts {
        if let Some(after) = rest.strip_prefix(marker).filter(|_| *marker != open) {
            rest = after;
        }
    }
    loop {
        let trimmed = rest.trim_start();
        let Some(inner) = trimmed.strip_prefix(open) else {
            rest = trimmed;
            break;
        };
        let Some(end) = inner.find(close) else {
            if calls.is_empty() {
                return Found::Broken(format!("call 1: `{close}` never comes"));
            }
            repairs.push(format!(
                "call {} was cut off mid-way: its text is content",
                calls.len() + 1
            ));
            rest = trimmed;
            break;
        };
        match call(&inner[..end]) {
            Ok(found) => calls.push(found),
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        }
        rest = &inner[end + close.len()..];
    }
    if let Some(section_end) = section_end {
        rest = rest.trim_start().strip_prefix(section_end).unwrap_or(rest);
    }
    Found::Calls {
        before: &body[..first],
        after: rest,
        calls,
        repairs,
    }
}

/// A JSON arguments object (any text around it is an error).
fn json_arguments(name: &str, text: &str) -> Result<Value, String> {
    let (value, after) = leading_json(text).map_err(|e| format!("`{name}`: {e}"))?;
    if !after.trim().is_empty() {
        return Err(format!("`{name}`: text after the arguments"));
    }
    match value {
        Value::Object(_) => Ok(value),
        other => Err(format!(
            "`{name}`: arguments must be a JSON object, not {other}"
        )),
    }
}

/// GLM: `<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>…</tool_call>`; values
/// are text, typed by the schema later (as Qwen's XML).
pub(super) fn glm(body: &str) -> Found<'_> {
    if !body.contains(GLM_OPEN) {
        return Found::None;
    }
    delimited(body, &[GLM_OPEN], GLM_OPEN, GLM_CLOSE, None, |call| {
        let name_end = call.find(GLM_ARG_KEY).unwrap_or(call.len());
        let name = call[..name_end].trim();
        if name.is_empty() || name.contains(['{', '<', '\n']) {
            return Err("a call needs a function name before its arguments".into());
        }
        let mut arguments = Map::new();
        let mut rest = &call[name_end..];
        while let Some(inner) = rest.trim_start().strip_prefix(GLM_ARG_KEY) {
            let key_end = inner
                .find("</arg_key>")
                .ok_or_else(|| format!("`{name}`: `<arg_key>` is never closed"))?;
            let key = inner[..key_end].trim().to_owned();
            let after = inner[key_end + "</arg_key>".len()..].trim_start();
            let value_text = after
                .strip_prefix("<arg_value>")
                .ok_or_else(|| format!("`{name}`: `{key}` has no `<arg_value>`"))?;
            let value_end = value_text
                .find("</arg_value>")
                .ok_or_else(|| format!("`{name}`: `<arg_value>` is never closed"))?;
            arguments.insert(key, Value::String(value_text[..value_end].to_owned()));
            rest = &value_text[value_end + "</arg_value>".len()..];
        }
        if !rest.trim().is_empty() {
            return Err(format!("`{name}`: text between the arguments"));
        }
        Ok(ParsedCall {
            name: name.to_owned(),
            arguments: Value::Object(arguments),
        })
    })
}

/// Kimi: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
/// <|tool_call_argument_begin|>{…}<|tool_call_end|>…<|tool_calls_section_end|>`.
pub(super) fn kimi(body: &str) -> Found<'_> {
    delimited(
        body,
        &[KIMI_SECTION, KIMI_CALL],
        KIMI_CALL,
        KIMI_CALL_END,
        Some(KIMI_SECTION_END),
        |call| {
            let (id, arguments) = call
                .split_once(KIMI_ARGUMENT)
                .ok_or("no `<|tool_call_argument_begin|>`")?;
            let id = id.trim();
            let id = id.strip_prefix("functions.").unwrap_or(id);
            let name = id.rsplit_once(':').map_or(id, |(name, _)| name).trim();
            if name.is_empty() {
                return Err("a call needs a function name".into());
            }
            Ok(ParsedCall {
                name: name.to_owned(),
                arguments: json_arguments(name, arguments)?,
            })
        },
    )
}

/// DeepSeek: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>…<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`,
/// each call V3's `function<｜tool▁sep｜>NAME` + a fenced JSON block, or V3.1's
/// `NAME<｜tool▁sep｜>{…}`.
pub(super) fn deepseek(body: &str) -> Found<'_> {
    delimited(
        body,
        &[DEEPSEEK_CALLS, DEEPSEEK_CALL],
        DEEPSEEK_CALL,
        DEEPSEEK_CALL_END,
        Some(DEEPSEEK_CALLS_END),
        |call| {
            let (left, right) = call.split_once(DEEPSEEK_SEP).ok_or("no `<｜tool▁sep｜>`")?;
            let (name, arguments) = if left.trim() == "function" {
                // V3: the name on the first line, then ```json … ```.
                let (name, rest) = right.split_once('\n').unwrap_or((right, ""));
                let rest = rest.trim();
                let json = rest
                    .strip_prefix("```json")
                    .or_else(|| rest.strip_prefix("```"))
                    .unwrap_or(rest);
                let json = json.trim_end().strip_suffix("```").unwrap_or(json);
                (name.trim(), json)
            } else {
                (left.trim(), right)
            };
            if name.is_empty() {
                return Err("a call needs a function name".into());
            }
            Ok(ParsedCall {
                name: name.to_owned(),
                arguments: json_arguments(name, arguments)?,
            })
        },
    )
}

/// Llama 4: `[name(key=value, …), …]` with Python literals (both quote kinds and their escapes,
/// numbers, `True`/`False`/`None`, lists, dicts; JSON's `true`/`false`/`null` too), optionally
/// inside `<|python_start|>…<|python_end|>`. A body that is not such a list is content.
pub(super) fn llama4(body: &str) -> Found<'_> {
    let trimmed = body.trim_start();
    let (tagged, inner) = match trimmed.strip_prefix(LLAMA4_START) {
        Some(rest) => (true, rest.trim_start()),
        None => (false, trimmed),
    };
    if !inner.starts_with('[') {
        return if tagged {
            Found::Broken("`<|python_start|>` without a call list".into())
        } else {
            Found::None
        };
    }
    let mut parser = Python { text: inner, at: 1 };
    let mut calls = Vec::new();
    let parsed = (|| -> Result<(), String> {
        loop {
            parser.space();
            if parser.eat(']') {
                return Ok(());
            }
            if !calls.is_empty() && !parser.eat(',') {
                return Err("expected `,` or `]` between calls".into());
            }
            parser.space();
            calls.push(parser.call()?);
        }
    })();
    if let Err(e) = parsed {
        if calls.is_empty() && !tagged && !looks_like_call(inner) {
            // A Python-ish list that is not a call: an answer.
            return Found::None;
        }
        return Found::Broken(format!("call {}: {e}", calls.len() + 1));
    }
    let mut rest = parser.text[parser.at..].trim_start();
    if tagged {
        rest = rest.strip_prefix(LLAMA4_END).unwrap_or(rest);
    }
    if !rest.trim().is_empty() {
        return Found::Broken("text after the call list".into());
    }
    Found::Calls {
        before: "",
        after: "",
        calls,
        repairs: Vec::new(),
    }
}

/// `[identifier(`: what a call list starts with.
fn looks_like_call(text: &str) -> bool {
    let rest = text[1..].trim_start();
    let name_len = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    name_len > 0 && rest[name_len..].trim_start().starts_with('(')
}

/// A small reader of Python call syntax and literals.
struct Python<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Python<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.at += c.len_utf8();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self) -> Result<String, String> {
        let rest = self.rest();
        let len = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
            .unwrap_or(rest.len());
        if len == 0 || rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(format!("expected a name at {:?}", preview(rest)));
        }
        self.at += len;
        Ok(rest[..len].to_owned())
    }

    /// `name(key=value, …)`.
    fn call(&mut self) -> Result<ParsedCall, String> {
        let name = self.identifier()?;
        self.space();
        if !self.eat('(') {
            return Err(format!("`{name}`: expected `(`"));
        }
        let mut arguments = Map::new();
        loop {
            self.space();
            if self.eat(')') {
                break;
            }
            if !arguments.is_empty() && !self.eat(',') {
                return Err(format!("`{name}`: expected `,` or `)`"));
            }
            self.space();
            if self.eat(')') {
                break;
            }
            let key = self.identifier()?;
            self.space();
            if !self.eat('=') {
                return Err(format!(
                    "`{name}`: `{key}` needs `=` (only keyword arguments)"
                ));
            }
            self.space();
            let value = self.value()?;
            arguments.insert(key, value);
        }
        Ok(ParsedCall {
            name,
            arguments: Value::Object(arguments),
        })
    }

    fn value(&mut self) -> Result<Value, String> {
        self.space();
        let rest = self.rest();
        match rest.chars().next() {
            Some('"') | Some('\'') => self.string().map(Value::String),
            Some('[') | Some('(') => {
                let close = if self.eat('[') {
                    ']'
                } else {
                    self.at += 1;
                    ')'
                };
                let mut items = Vec::new();
                loop {
                    self.space();
                    if self.eat(close) {
                        return Ok(Value::Array(items));
                    }
                    if !items.is_empty() {
                        if !self.eat(',') {
                            return Err("expected `,` in a list".into());
                        }
                        self.space();
                        if self.eat(close) {
                            return Ok(Value::Array(items));
                        }
                    }
                    items.push(self.value()?);
                }
            }
            Some('{') => {
                self.at += 1;
                let mut object = Map::new();
                loop {
                    self.space();
                    if self.eat('}') {
                        return Ok(Value::Object(object));
                    }
                    if !object.is_empty() {
                        if !self.eat(',') {
                            return Err("expected `,` in a dict".into());
                        }
                        self.space();
                        if self.eat('}') {
                            return Ok(Value::Object(object));
                        }
                    }
                    let key = match self.value()? {
                        Value::String(key) => key,
                        other => other.to_string(),
                    };
                    self.space();
                    if !self.eat(':') {
                        return Err("expected `:` in a dict".into());
                    }
                    let value = self.value()?;
                    object.insert(key, value);
                }
            }
            Some(_) => {
                let len = rest
                    .find(|c: char| !(c.is_alphanumeric() || matches!(c, '.' | '-' | '+' | '_')))
                    .unwrap_or(rest.len());
                let word = &rest[..len];
                let value = match word {
                    "True" | "true" => Value::Bool(true),
                    "False" | "false" => Value::Bool(false),
                    "None" | "null" => Value::Null,
                    number => {
                        let clean = number.replace('_', "");
                        serde_json::from_str::<serde_json::Number>(&clean)
                            .map(Value::Number)
                            .or_else(|_| {
                                clean
                                    .parse::<f64>()
                                    .ok()
                                    .and_then(serde_json::Number::from_f64)
                                    .map(Value::Number)
                                    .ok_or(())
                            })
                            .map_err(|()| format!("not a value: {:?}", preview(rest)))?
                    }
                };
                self.at += len;
                Ok(value)
            }
            None => Err("the call list ends mid-way".into()),
        }
    }

    /// A quoted string with Python's escapes.
    fn string(&mut self) -> Result<String, String> {
        let rest = self.rest();
        let quote = rest.chars().next().unwrap_or('"');
        let mut out = String::new();
        let mut chars = rest.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                c if c == quote => {
                    self.at += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, '0')) => out.push('\0'),
                    Some((_, 'u')) => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        let code = u32::from_str_radix(&hex, 16)
                            .ok()
                            .and_then(char::from_u32)
                            .ok_or("a bad \\u escape")?;
                        out.push(code);
                    }
                    Some((_, other)) => out.push(other),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err("a string is never closed".into())
    }
}

fn preview(text: &str) -> String {
    text.chars().take(20).collect()
}

/// One harmony message.
struct HarmonyMessage<'a> {
    channel: &'a str,
    /// `to=…` in its header (before or after the channel name).
    recipient: Option<&'a str>,
    body: &'a str,
    /// Whether an end marker (or the next `<|start|>`) closed it.
    ended: bool,
    /// The output from this message's header on.
    from: &'a str,
}

/// The messages of a harmony output in order, and whether one stopped at a header without
/// `<|message|>`. `partial`: `text` is a streamed prefix, and an unended last body stops before
/// a tail that may become its end marker.
fn harmony_messages(text: &str, partial: bool) -> (Vec<HarmonyMessage<'_>>, bool) {
    let mut messages = Vec::new();
    let Some(first) = text.find(HARMONY_CHANNEL) else {
        return (messages, false);
    };
    // A recipient may be written in the header before the channel (`<|start|>assistant to=…`).
    let mut rest = &text[text[..first].rfind("<|start|>").unwrap_or(first)..];
    while let Some(channel_at) = rest.find(HARMONY_CHANNEL) {
        let header = &rest[..channel_at];
        let after_channel = &rest[channel_at + HARMONY_CHANNEL.len()..];
        let Some(message_at) = after_channel.find(HARMONY_MESSAGE) else {
            return (messages, true);
        };
        let channel_header = &after_channel[..message_at];
        let body_and_rest = &after_channel[message_at + HARMONY_MESSAGE.len()..];
        let ended_at = HARMONY_ENDS
            .iter()
            .filter_map(|m| body_and_rest.find(m).map(|at| (at, *m)))
            .min();
        let end = match ended_at {
            Some((at, _)) => at,
            None if partial => before_markers(body_and_rest, &HARMONY_ENDS),
            None => body_and_rest.len(),
        };
        messages.push(HarmonyMessage {
            channel: channel_header.split_whitespace().next().unwrap_or(""),
            recipient: header
                .split_whitespace()
                .chain(channel_header.split_whitespace())
                .find_map(|word| word.strip_prefix("to=")),
            body: &body_and_rest[..end],
            ended: ended_at.is_some(),
            from: rest,
        });
        rest = match ended_at {
            // `<|start|>` opens the next header; the other ends are consumed.
            Some((at, marker)) if marker != "<|start|>" => &body_and_rest[at + marker.len()..],
            _ => &body_and_rest[end..],
        };
    }
    (messages, false)
}

/// OpenAI's harmony (gpt-oss): messages `<|channel|>NAME[ to=functions.TOOL][ <|constrain|>json]
/// <|message|>BODY` ended by `<|end|>`, `<|call|>`, `<|return|>` or the next `<|start|>`.
/// `analysis` is reasoning, `final` (and a `commentary` preamble) content, and a message
/// addressed `to=functions.NAME` a call with a JSON body. Text without channels is content.
pub(super) fn harmony(text: &str) -> Parsed {
    if !text.contains(HARMONY_CHANNEL) {
        return Parsed {
            content: (!text.trim().is_empty()).then(|| text.to_owned()),
            ..Parsed::default()
        };
    }
    let mut parsed = Parsed::default();
    let mut reasoning = String::new();
    let mut content = String::new();
    let (messages, headless) = harmony_messages(text, false);
    if headless {
        parsed.problem = Some("a channel without `<|message|>`".into());
    }
    for message in messages {
        match (message.channel, message.recipient) {
            (_, Some(to)) => {
                let name = to.strip_prefix("functions.").unwrap_or(to).to_owned();
                match json_arguments(&name, message.body) {
                    Ok(arguments) => parsed.calls.push(ParsedCall { name, arguments }),
                    Err(problem) => {
                        if !message.ended && !parsed.calls.is_empty() {
                            parsed.repairs.push(format!(
                                "call {} was cut off mid-way: its text is content",
                                parsed.calls.len() + 1
                            ));
                        } else {
                            parsed.problem =
                                Some(format!("call {}: {problem}", parsed.calls.len() + 1));
                            parsed.calls.clear();
                        }
                        // The broken call is content from its header on; the reasoning before
                        // it stays reasoning.
                        content.push_str(message.from);
                        break;
                    }
                }
            }
            ("analysis", None) => reasoning.push_str(message.body),
            (_, None) => content.push_str(message.body),
        }
    }
    parsed.reasoning = non_empty(reasoning.trim());
    parsed.content = non_empty(&content);
    parsed
}

/// What a streamed harmony prefix settles: the analysis and final text of the messages before
/// the first call (a call that fails to parse turns its text and all after it into content).
pub(super) fn harmony_settled(text: &str) -> Settled<'_> {
    let (messages, _) = harmony_messages(text, true);
    let mut reasoning = Cow::Borrowed("");
    let mut content = Cow::Borrowed("");
    for message in messages.iter().take_while(|m| m.recipient.is_none()) {
        let slot = if message.channel == "analysis" {
            &mut reasoning
        } else {
            &mut content
        };
        if slot.is_empty() {
            *slot = Cow::Borrowed(message.body);
        } else {
            slot.to_mut().push_str(message.body);
        }
    }
    Settled::new(reasoning, content)
}

/// FunctionGemma (Google's Gemma function-calling format):
/// `<start_function_call>call:NAME{key:<escape>text<escape>,key2:12,key3:{…}}<end_function_call>`;
/// strings sit between `<escape>` tokens, other values are written bare (numbers, booleans,
/// nested `{…}` and `[…]`).
pub(super) fn function_gemma(body: &str) -> Found<'_> {
    gemma_calls(body, GEMMA_CALL, GEMMA_CALL_END, GEMMA_ESCAPE)
}

/// Gemma 4: FunctionGemma's call syntax between `<|tool_call>` and `<tool_call|>`, strings
/// between `<|"|>` tokens.
pub(super) fn gemma4(body: &str) -> Found<'_> {
    gemma_calls(body, GEMMA4_CALL, GEMMA4_CALL_END, GEMMA4_ESCAPE)
}

fn gemma_calls<'a>(body: &'a str, open: &str, close: &str, escape: &'static str) -> Found<'a> {
    delimited(body, &[open], open, close, None, |call| {
        let rest = call.trim().strip_prefix("call:").ok_or("no `call:`")?;
        let open = rest.find('{').ok_or("no `{` after the name")?;
        let name = rest[..open].trim();
        if name.is_empty() {
            return Err("a call needs a function name".into());
        }
        let mut reader = Gemma {
            text: &rest[open..],
            at: 0,
            escape,
        };
        let arguments = reader.value()?;
        if !reader.text[reader.at..].trim().is_empty() {
            return Err(format!("`{name}`: text after the arguments"));
        }
        match arguments {
            Value::Object(_) => Ok(ParsedCall {
                name: name.to_owned(),
                arguments,
            }),
            other => Err(format!(
                "`{name}`: arguments must be an object, not {other}"
            )),
        }
    })
}

/// A reader of FunctionGemma's (and Gemma 4's) values; strings sit between `escape` tokens.
struct Gemma<'a> {
    text: &'a str,
    at: usize,
    escape: &'static str,
}

impl<'a> Gemma<'a> {
    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn skip_space(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_space();
        if self.eat(self.escape) {
            let rest = self.rest();
            let end = rest.find(self.escape).ok_or("a string is never closed")?;
            self.at += end + self.escape.len();
            return Ok(Value::String(rest[..end].to_owned()));
        }
        if self.eat("{") {
            let mut object = Map::new();
            loop {
                self.skip_space();
                if self.eat("}") {
                    return Ok(Value::Object(object));
                }
                if !object.is_empty() && !self.eat(",") {
                    return Err("expected `,` or `}`".into());
                }
                self.skip_space();
                let rest = self.rest();
                let colon = rest.find(':').ok_or("a key without `:`")?;
                let key = rest[..colon].trim().trim_matches('"').to_owned();
                self.at += colon + 1;
                let value = self.value()?;
                object.insert(key, value);
            }
        }
        if self.eat("[") {
            let mut items = Vec::new();
            loop {
                self.skip_space();
                if self.eat("]") {
                    return Ok(Value::Array(items));
                }
                if !items.is_empty() && !self.eat(",") {
                    return Err("expected `,` or `]`".into());
                }
                items.push(self.value()?);
            }
        }
        let rest = self.rest();
        let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
        let word = rest[..end].trim();
        self.at += end;
        match serde_json::from_str::<Value>(word) {
            Ok(value) => Ok(value),
            // A bare word the model did not escape: text.
            Err(_) if !word.is_empty() => Ok(Value::String(word.to_owned())),
            Err(_) => Err("a key without a value".into()),
        }
    }
}

/// An attribute of a Kimi K3 tag (`key="v"`, with `&quot;` and `&amp;` escaped).
fn k3_attribute(attributes: &str, name: &str) -> Option<String> {
    let start = attributes.find(&format!("{name}=\""))? + name.len() + 2;
    let end = attributes[start..].find('"')? + start;
    Some(
        attributes[start..end]
            .replace("&quot;", "\"")
            .replace("&amp;", "&"),
    )
}

/// The tag at the start of `text` opened with `open` (`<|open|>call`): its attributes and what
/// follows its `<|sep|>`.
fn k3_tag<'a>(text: &'a str, open: &str) -> Option<(&'a str, &'a str)> {
    let rest = text.strip_prefix(open)?;
    let sep = rest.find(K3_SEP)?;
    Some((&rest[..sep], &rest[sep + K3_SEP.len()..]))
}

/// One Kimi K3 call after its `<|open|>call` tag: `(call, rest)`; `Err` when it is cut off or
/// malformed.
fn k3_call<'a>(attributes: &str, mut rest: &'a str) -> Result<(ParsedCall, &'a str), String> {
    let name = k3_attribute(attributes, "tool").ok_or("a call without `tool=\"…\"`")?;
    let mut arguments = Map::new();
    loop {
        if let Some(after) = rest.strip_prefix(K3_CALL_END) {
            return Ok((
                ParsedCall {
                    name,
                    arguments: Value::Object(arguments),
                },
                after,
            ));
        }
        if let Some((attrs, value)) = k3_tag(rest, K3_ARGUMENT) {
            let key = k3_attribute(attrs, "key").ok_or("an argument without `key`")?;
            let end = value
                .find(K3_ARGUMENT_END)
                .ok_or(format!("`{name}`: argument `{key}` never closes"))?;
            let text = &value[..end];
            // `type="string"` is the text itself; anything else is JSON (a string if it is not).
            let typed = match k3_attribute(attrs, "type").as_deref() {
                Some("string") | None => Value::String(text.to_owned()),
                Some(_) => serde_json::from_str(text.trim())
                    .unwrap_or_else(|_| Value::String(text.to_owned())),
            };
            arguments.insert(key, typed);
            rest = &value[end + K3_ARGUMENT_END.len()..];
        } else if let Some((_, json)) = k3_tag(rest, K3_JSON) {
            let end = json
                .find(K3_JSON_END)
                .ok_or(format!("`{name}`: its JSON arguments never close"))?;
            match json_arguments(&name, &json[..end])? {
                Value::Object(map) => arguments.extend(map),
                _ => unreachable!("json_arguments returns objects"),
            }
            rest = &json[end + K3_JSON_END.len()..];
        } else {
            return Err(format!("`{name}`: the call is cut off or malformed"));
        }
    }
}

/// Kimi K3's think section and response text, up to the tools section or the message's end.
#[derive(Default)]
struct K3Head<'a> {
    reasoning: Option<&'a str>,
    /// The think section is still open (a streamed prefix, or a budget cut).
    thinking: bool,
    content: &'a str,
    /// From the end of the response text on.
    rest: &'a str,
}

/// `partial`: `text` is a streamed prefix; an opener it may still grow into settles nothing yet,
/// and a section's text stops before a tail that may become its closer.
fn k3_head(text: &str, partial: bool) -> K3Head<'_> {
    let undecided = |rest: &str, openers: &[&str]| {
        partial
            && openers
                .iter()
                .any(|o| o.len() > rest.len() && o.starts_with(rest))
    };
    let first = |text: &str, markers: &[&str]| {
        markers
            .iter()
            .filter_map(|m| text.find(m).map(|at| (at, m.len())))
            .min()
    };
    let mut head = K3Head::default();
    let mut rest = text.trim_start();
    if undecided(rest, &[K3_MSG_START, K3_THINK_START, K3_RESP_START]) {
        return head;
    }
    rest = rest.strip_prefix(K3_MSG_START).unwrap_or(rest);
    if undecided(rest, &[K3_THINK_START, K3_RESP_START]) {
        return head;
    }
    if let Some(inner) = rest.strip_prefix(K3_THINK_START) {
        let stops = [K3_THINK_END, K3_RESP_START, K3_TOOLS_START];
        match first(inner, &stops) {
            Some((at, len)) => {
                head.reasoning = Some(&inner[..at]);
                // A closer is consumed; another section's opener starts what follows.
                rest = if inner[at..].starts_with(K3_THINK_END) {
                    &inner[at + len..]
                } else {
                    &inner[at..]
                };
            }
            None => {
                let end = if partial {
                    before_markers(inner, &stops)
                } else {
                    inner.len()
                };
                head.reasoning = Some(&inner[..end]);
                head.thinking = true;
                return head;
            }
        }
    }
    rest = rest.trim_start();
    if undecided(rest, &[K3_RESP_START]) {
        return head;
    }
    rest = rest.strip_prefix(K3_RESP_START).unwrap_or(rest);
    let ends = [K3_RESP_END, K3_TOOLS_START, K3_MSG_END, K3_EOM];
    let end = match first(rest, &ends) {
        Some((at, _)) => at,
        None if partial => before_markers(rest, &ends),
        None => rest.len(),
    };
    head.content = &rest[..end];
    head.rest = &rest[end..];
    head
}

/// What a streamed Kimi K3 prefix settles: the think section's text and the response text.
pub(super) fn kimi_k3_settled(text: &str) -> Settled<'_> {
    let head = k3_head(text, true);
    Settled::new(head.reasoning.unwrap_or(""), head.content)
}

/// Kimi K3: the whole message, section by section. The generation prompt opens the think section
/// (the server puts the opener back in front, as for `<think>`), or the response section when
/// thinking is off; a model that skips a closer moves on at the next section's opener.
pub(super) fn kimi_k3(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let head = k3_head(text, false);
    parsed.reasoning = head.reasoning.and_then(|r| non_empty(r.trim()));
    if head.thinking {
        parsed.problem = Some("the think section never closed".into());
        return parsed;
    }
    let mut content = head.content.to_owned();
    let mut rest = head.rest;
    rest = rest.strip_prefix(K3_RESP_END).unwrap_or(rest);
    if let Some(mut calls_text) = rest.trim_start().strip_prefix(K3_TOOLS_START) {
        loop {
            calls_text = calls_text.trim_start();
            let Some((attributes, after)) = k3_tag(calls_text, K3_CALL) else {
                break;
            };
            match k3_call(attributes, after) {
                Ok((call, after)) => {
                    parsed.calls.push(call);
                    calls_text = after;
                }
                Err(problem) if parsed.calls.is_empty() => {
                    parsed.problem = Some(format!("call 1: {problem}"));
                    break;
                }
                Err(_) => {
                    parsed.repairs.push(format!(
                        "call {} was cut off mid-way: its text is content",
                        parsed.calls.len() + 1
                    ));
                    break;
                }
            }
        }
        if parsed.calls.is_empty() {
            // Nothing parsed: the whole section is content, as for every family.
            content.push_str(rest);
            rest = "";
        } else {
            rest = calls_text;
        }
    }
    for trailer in [K3_TOOLS_END, K3_MSG_END, K3_EOM] {
        rest = rest.trim_start();
        rest = rest.strip_prefix(trailer).unwrap_or(rest);
    }
    content.push_str(rest);
    parsed.content = non_empty(&content);
    parsed
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}
