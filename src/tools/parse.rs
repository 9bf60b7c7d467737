//! Raw model output into an OpenAI assistant message: reasoning, content and tool calls.
//!
//! Families (chosen from the chat template, or by `tools parse --format`):
//! - Hermes/Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated.
//! - Llama 3.x: the message is JSON, `{"name": ..., "parameters": {...}}` (optionally after
//!   `<|python_tag|>`; several separated by `;` or newlines).
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` or the newer
//!   `[TOOL_CALLS]name[ARGS]{...}`, repeated.
//! - Generic (templates without tool support; see `prompt.rs`): Hermes tags, or a message that is
//!   only a call object or a list of them.
//!
//! A reasoning block at the start (`<think>...</think>`, `[THINK]...[/THINK]`) becomes
//! `reasoning_content`. Text before the first call is content; so is text after the last. Output
//! that starts a call but does not parse comes back whole as content, with the reason, never as
//! an error.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// The tool-call syntax a model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolFormat {
    Hermes,
    /// Qwen's XML calls (Qwen3-Coder, Qwen3.5 and later):
    /// `<tool_call><function=NAME><parameter=KEY>value</parameter>…</function></tool_call>`.
    QwenXml,
    /// GLM 4.5 and later: `<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call>`.
    Glm,
    /// Kimi K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0…`.
    Kimi,
    /// Llama 4's pythonic calls: `[name(arg=value, …), …]`, optionally inside
    /// `<|python_start|>…<|python_end|>`.
    Llama4,
    /// DeepSeek V3 and later: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>…`.
    Deepseek,
    /// OpenAI's harmony (gpt-oss): channels `analysis`, `final`, and `commentary` messages to
    /// `functions.NAME`.
    Harmony,
    /// FunctionGemma: `<start_function_call>call:NAME{key:<escape>v<escape>}<end_function_call>`.
    FunctionGemma,
    /// Gemma 4: `<|tool_call>call:NAME{key:<|"|>v<|"|>}<tool_call|>`, reasoning in
    /// `<|channel>thought…<channel|>`.
    Gemma4,
    /// Kimi K3's tagged sections: `<|open|>think<|sep|>…`, `<|open|>response<|sep|>…`, and
    /// `<|open|>tools<|sep|><|open|>call tool="NAME" index="1"<|sep|><|open|>argument key="K"
    /// type="T"<|sep|>V<|close|>argument<|sep|>…<|close|>call<|sep|><|close|>tools<|sep|>`.
    KimiK3,
    Llama3,
    Mistral,
    Generic,
}

const REASONING_TAGS: [(&str, &str); 4] = [
    ("<think>", "</think>"),
    ("[THINK]", "[/THINK]"),
    // Gemma 4.
    ("<|channel>thought", "<channel|>"),
    // Kimi K3 (its generation prompt opens it).
    (families::K3_THINK_START, families::K3_THINK_END),
];
/// The reasoning tag a rendered prompt leaves open at its end (`…<|im_start|>assistant\n<think>\n`),
/// if any: the model's output then starts inside reasoning.
pub fn opened_reasoning(prompt: &str) -> Option<&'static str> {
    let end = prompt.trim_end();
    REASONING_TAGS
        .iter()
        .find(|(open, close)| {
            end.ends_with(open)
                // Not `<think></think>` (reasoning turned off) or `<think>…</think>`.
                && !end[..end.len() - open.len()].trim_end().ends_with(close)
        })
        .map(|(open, _)| *open)
}

/// Whether a chat template writes or expects reasoning tags.
pub fn knows_reasoning(template_source: &str) -> bool {
    template_source.contains(families::HARMONY_CHANNEL)
        || REASONING_TAGS
            .iter()
            .any(|(open, _)| template_source.contains(open))
}

const HERMES_OPEN: &str = "<tool_call>";
const QWEN_FUNCTION: &str = "<function=";
const QWEN_PARAMETER: &str = "<parameter=";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
const MISTRAL_ARGS: &str = "[ARGS]";

impl ToolFormat {
    /// The family a chat template's source speaks; `Generic` when it has no tool syntax.
    pub fn detect(template: &str) -> Self {
        if template.contains(families::HARMONY_CHANNEL) {
            Self::Harmony
        } else if template.contains(families::K3_OPEN) && template.contains(families::K3_SEP) {
            Self::KimiK3
        } else if template.contains(families::GEMMA4_CALL) {
            Self::Gemma4
        } else if template.contains(QWEN_FUNCTION) && template.contains(QWEN_PARAMETER) {
            Self::QwenXml
        } else if template.contains(families::GEMMA_CALL) {
            Self::FunctionGemma
        } else if template.contains(families::GLM_ARG_KEY) {
            Self::Glm
        } else if template.contains(families::LLAMA4_START) || template.contains("func_name1(") {
            Self::Llama4
        } else if template.contains(families::KIMI_CALL) {
            Self::Kimi
        } else if template.contains("tool▁calls▁begin") {
            Self::Deepseek
        } else if template.contains(MISTRAL_CALLS) {
            Self::Mistral
        } else if template.contains(HERMES_OPEN) {
            Self::Hermes
        } else if template.contains(PYTHON_TAG) || template.contains("ipython") {
            Self::Llama3
        } else {
            Self::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hermes => "hermes",
            Self::QwenXml => "qwen-xml",
            Self::Glm => "glm",
            Self::Kimi => "kimi",
            Self::Llama4 => "llama4",
            Self::Deepseek => "deepseek",
            Self::Harmony => "harmony",
            Self::FunctionGemma => "function-gemma",
            Self::Gemma4 => "gemma4",
            Self::KimiK3 => "kimi-k3",
            Self::Llama3 => "llama3",
            Self::Mistral => "mistral",
            Self::Generic => "generic",
        }
    }

    /// Text that starts a call anywhere in the body.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes | Self::Generic => &[HERMES_OPEN],
            Self::QwenXml => &[HERMES_OPEN, QWEN_FUNCTION],
            Self::Glm => &[HERMES_OPEN],
            Self::Kimi => &[families::KIMI_SECTION, families::KIMI_CALL],
            Self::Llama4 => &[families::LLAMA4_START],
            Self::Deepseek => &[families::DEEPSEEK_CALLS, families::DEEPSEEK_CALL],
            Self::Harmony => &[families::HARMONY_CHANNEL],
            Self::FunctionGemma => &[families::GEMMA_CALL],
            Self::Gemma4 => &[families::GEMMA4_CALL],
            Self::KimiK3 => &[families::K3_TOOLS_START],
            Self::Llama3 => &[PYTHON_TAG],
            Self::Mistral => &[MISTRAL_CALLS],
        }
    }

    /// Whether a body that opens with `{` or `[` may be a bare call.
    fn bare_json(self) -> bool {
        matches!(self, Self::Llama3 | Self::Llama4 | Self::Generic)
    }
}

/// One call as written: the name and the arguments object.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: Value,
}

/// What the output says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub calls: Vec<ParsedCall>,
    /// Why output that looked like a call came back as content (for the log and `tools parse`).
    pub problem: Option<String>,
    /// Repairs made to calls that did parse (for the log and `tools parse`).
    pub repairs: Vec<String>,
}

/// Where the reasoning and the body lie in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split<'a> {
    pub reasoning: Option<&'a str>,
    /// The text after the reasoning block (leading whitespace dropped); `None` while the block is
    /// still open.
    pub body: Option<&'a str>,
    /// The tag that closes the reasoning block, when there is one.
    pub close: &'static str,
}

/// Separates a leading reasoning block from the rest. Used on whole outputs and on streamed
/// prefixes alike, so both agree.
pub fn split(text: &str) -> Split<'_> {
    let start = text.trim_start();
    for (open, close) in REASONING_TAGS {
        if let Some(inner) = start.strip_prefix(open) {
            return match inner.find(close) {
                Some(end) => Split {
                    reasoning: Some(&inner[..end]),
                    body: Some(inner[end + close.len()..].trim_start()),
                    close,
                },
                None => Split {
                    reasoning: Some(inner),
                    body: None,
                    close,
                },
            };
        }
    }
    Split {
        reasoning: None,
        body: Some(text),
        close: "",
    }
}

/// Whether `text` could still grow into a reasoning opening tag.
fn may_open_reasoning(text: &str) -> bool {
    let start = text.trim_start();
    start.is_empty()
        || REASONING_TAGS
            .iter()
            .any(|(open, _)| open.starts_with(start) || start.starts_with(open))
}

/// What a streamed prefix of an output settles: the text the whole output's `reasoning` and
/// `content` are sure to begin with, whatever comes next. Empty while nothing is settled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settled<'a> {
    pub reasoning: Cow<'a, str>,
    pub content: Cow<'a, str>,
}

impl<'a> Settled<'a> {
    /// Reasoning is trimmed as the whole parse trims it (a trailing space may yet be followed
    /// by more); content waits for its first visible character (all-blank content is none).
    pub fn new(reasoning: impl Into<Cow<'a, str>>, content: impl Into<Cow<'a, str>>) -> Self {
        let trim = |text: Cow<'a, str>| match text {
            Cow::Borrowed(text) => Cow::Borrowed(text.trim()),
            Cow::Owned(text) => Cow::Owned(text.trim().to_owned()),
        };
        let content = content.into();
        Self {
            reasoning: trim(reasoning.into()),
            content: if content.trim().is_empty() {
                Cow::Borrowed("")
            } else {
                content
            },
        }
    }
}

/// The reasoning and content a streamed prefix settles, for every format: the streamer sends
/// them as they grow, so a reasoning model's thinking and its answer arrive token by token.
pub fn settled(text: &str, format: ToolFormat) -> Settled<'_> {
    match format {
        ToolFormat::Harmony => families::harmony_settled(text),
        ToolFormat::KimiK3 => families::kimi_k3_settled(text),
        _ => {
            let parts = split(text);
            if parts.reasoning.is_none() && may_open_reasoning(text) {
                return Settled::default();
            }
            match (parts.reasoning, parts.body) {
                (Some(open), None) => {
                    // Inside the block: all but a tail that may be its closing tag.
                    Settled::new(&open[..before_markers(open, &[parts.close])], "")
                }
                (reasoning, Some(body)) => Settled::new(
                    reasoning.unwrap_or(""),
                    &body[..settled_content(body, format)],
                ),
                (None, None) => Settled::default(),
            }
        }
    }
}

/// The length of `text`'s prefix before the first of `markers`, and never into a tail that may
/// become one.
pub fn before_markers(text: &str, markers: &[&str]) -> usize {
    let mut end = markers
        .iter()
        .filter_map(|marker| text.find(marker))
        .min()
        .unwrap_or(text.len());
    if end < text.len() {
        return end;
    }
    for marker in markers {
        // Markers may be multi-byte (DeepSeek's `｜`): only whole-character prefixes.
        for cut in (1..marker.len())
            .rev()
            .filter(|&cut| marker.is_char_boundary(cut))
        {
            if text.ends_with(&marker[..cut]) && text.is_char_boundary(text.len() - cut) {
                end = end.min(text.len() - cut);
                break;
            }
        }
    }
    end
}

/// The length of `body`'s prefix that is content whatever comes next: up to the first call
/// marker, and never into a tail that may become one. A body that may be a bare JSON call holds
/// everything. (Harmony and Kimi K3 settle by their own sections: `settled`.)
fn settled_content(body: &str, format: ToolFormat) -> usize {
    let trimmed = body.trim_start();
    if trimmed.is_empty() {
        return 0;
    }
    if format.bare_json() && (trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return 0;
    }
    before_markers(body, format.markers())
}

fn non_empty(text: &str) -> Option<String> {
    (!text.trim().is_empty()).then(|| text.to_owned())
}

/// Parses a whole output.
pub fn parse(text: &str, format: ToolFormat) -> Parsed {
    if format == ToolFormat::Harmony {
        // Channels carry the reasoning, the content and the calls alike.
        return families::harmony(text);
    }
    if format == ToolFormat::KimiK3 {
        // So do Kimi K3's sections.
        return families::kimi_k3(text);
    }
    let split = split(text);
    let reasoning = split.reasoning.map(|r| r.trim().to_owned());
    let Some(body) = split.body else {
        return Parsed {
            reasoning,
            problem: Some("the reasoning block never closed".into()),
            ..Parsed::default()
        };
    };
    let found = match format {
        Format::Hermes => hermes(body, false),
        Format::QwenXml => qwen_xml(body),
        Format::Glm => families::glm(body),
        Format::Kimi => families::kimi(body),
        Format::Llama4 => families::llama4(body),
        Format::Deepseek => families::deepseek(body),
        Format::Harmony => unreachable!("parsed whole above"),
        Format::FunctionGemma => families::function_gemma(body),
        Format::Gemma4 => families::gemma4(body),
        Format::KimiK3 => unreachable!("parsed whole above"),
        Format::Generic => hermes(body, true),
        Format::Llama3 => llama3(body),
        Format::Mistral => mistral(body),
    };
    match found {
        Found::None => Parsed {
            reasoning,
            content: non_empty(body),
            ..Parsed::default()
        },
        Found::Calls {
            before,
            after,
            calls,
            repairs,
        } => {
            let mut content = before.to_owned();
            if !after.trim().is_empty() {
                content.push_str(after);
            }
            Parsed {
                reasoning,
                content: non_empty(&content),
                calls,
                problem: None,
                repairs,
            }
        }
        Found::Broken(problem) => Parsed {
            reasoning,
            content: non_empty(body),
            problem: Some(problem),
            ..Parsed::default()
        },
    }
}

use super::families;
use ToolFormat as Format;

pub(super) enum Found<'a> {
    None,
    Calls {
        before: &'a str,
        after: &'a str,
        calls: Vec<ParsedCall>,
        repairs: Vec<String>,
    },
    Broken(String),
}

/// The first JSON value at the start of `text` (after whitespace) and the rest after it.
pub(super) fn leading_json(text: &str) -> Result<(Value, &str), String> {
    let trimmed = text.trim_start();
    let mut stream = serde_json::Deserializer::from_str(trimmed).into_iter::<Value>();
    match stream.next() {
        Some(Ok(value)) => Ok((value, &trimmed[stream.byte_offset()..])),
        Some(Err(e)) => Err(format!("invalid JSON: {e}")),
        None => Err("no JSON where a call should be".into()),
    }
}

/// A call object in any of the shapes models write.
fn call_of(value: &Value, repairs: &mut Vec<String>) -> Result<ParsedCall, String> {
    let Value::Object(object) = value else {
        return Err(format!("a call must be a JSON object, not {value}"));
    };
    // OpenAI's own shape: {"type": "function", "function": {"name", "arguments"}}.
    let object = match object.get("function") {
        Some(Value::Object(inner)) if inner.contains_key("name") => inner,
        _ => object,
    };
    let name = object
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("a call needs a string `name`")?
        .to_owned();
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None => Value::Object(Map::new()),
        Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
            Ok(parsed @ Value::Object(_)) => {
                repairs.push(format!(
                    "`{name}`: arguments sent as a JSON string were decoded"
                ));
                parsed
            }
            _ => return Err(format!("`{name}`: arguments must be a JSON object")),
        },
        Some(args @ Value::Object(_)) => args.clone(),
        Some(other) => {
            return Err(format!(
                "`{name}`: arguments must be a JSON object, not {other}"
            ))
        }
    };
    Ok(ParsedCall { name, arguments })
}

/// One call object, or a list of them.
fn calls_of(value: &Value, repairs: &mut Vec<String>) -> Result<Vec<ParsedCall>, String> {
    match value {
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|item| call_of(item, repairs)).collect()
        }
        Value::Array(_) => Err("an empty list of calls".into()),
        other => Ok(vec![call_of(other, repairs)?]),
    }
}

fn hermes(body: &str, bare_json: bool) -> Found<'_> {
    let Some(first) = body.find(HERMES_OPEN) else {
        return if bare_json { bare(body) } else { Found::None };
    };
    let mut calls = Vec::new();
    let mut repairs = Vec::new();
    let mut rest = &body[first..];
    while let Some(inner) = rest.strip_prefix(HERMES_OPEN) {
        let (value, after) = match leading_json(inner) {
            Ok(found) => found,
            // The last call cut off mid-way (no closing tag follows): the complete ones before
            // it are kept.
            Err(_) if !calls.is_empty() && !inner.contains(HERMES_CLOSE) => {
                repairs.push(format!(
                    "call {} was cut off mid-way: its text is content",
                    calls.len() + 1
                ));
                break;
            }
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        };
        match calls_of(&value, &mut repairs) {
            Ok(found) => calls.extend(found),
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        }
        let after = after.trim_start();
        rest = match after.strip_prefix(HERMES_CLOSE) {
            Some(next) => next.trim_start(),
            None if after.is_empty() => {
                repairs.push("the last `</tool_call>` was missing".into());
                after
            }
            None => {
                return Found::Broken(format!(
                    "call {}: text after the JSON where `</tool_call>` should be",
                    calls.len()
                ))
            }
        };
    }
    Found::Calls {
        before: &body[..first],
        after: rest,
        calls,
        repairs,
    }
}

/// Qwen's XML calls. Every value is kept as the text the model wrote (one leading and trailing
/// newline dropped); `ToolRequest::finish` types them by the tool's schema. A last call cut off
/// after complete ones is dropped, as in `hermes`.
fn qwen_xml(body: &str) -> Found<'_> {
    let starts = [HERMES_OPEN, QWEN_FUNCTION]
        .iter()
        .filter_map(|m| body.find(m))
        .min();
    let Some(first) = starts else {
        return Found::None;
    };
    let mut calls = Vec::new();
    let mut repairs = Vec::new();
    let mut rest = &body[first..];
    loop {
        let trimmed = rest.trim_start();
        let (wrapped, inner) = match trimmed.strip_prefix(HERMES_OPEN) {
            Some(inner) => (true, inner.trim_start()),
            None if trimmed.starts_with(QWEN_FUNCTION) => (false, trimmed),
            None => break,
        };
        match qwen_function(inner) {
            Ok((call, after)) => {
                calls.push(call);
                let after = after.trim_start();
                rest = match after.strip_prefix("</tool_call>") {
                    Some(next) => next,
                    None if wrapped && after.is_empty() => {
                        repairs.push("the last `</tool_call>` was missing".into());
                        after
                    }
                    None => after,
                };
            }
            Err(_) if !calls.is_empty() && !inner.contains("</function>") => {
                repairs.push(format!(
                    "call {} was cut off mid-way: its text is content",
                    calls.len() + 1
                ));
                rest = trimmed;
                break;
            }
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        }
    }
    Found::Calls {
        before: &body[..first],
        after: rest,
        calls,
        repairs,
    }
}

/// `<function=NAME>` then `<parameter=KEY>value</parameter>`… then `</function>`.
fn qwen_function(text: &str) -> Result<(ParsedCall, &str), String> {
    let rest = text
        .strip_prefix(QWEN_FUNCTION)
        .ok_or("no `<function=` where a call should be")?;
    let end = rest.find('>').ok_or("`<function=` is never closed")?;
    let name = rest[..end].trim();
    if name.is_empty() {
        return Err("a call needs a function name".into());
    }
    let mut rest = &rest[end + 1..];
    let mut arguments = Map::new();
    loop {
        let trimmed = rest.trim_start();
        if let Some(after) = trimmed.strip_prefix("</function>") {
            return Ok((
                ParsedCall {
                    name: name.to_owned(),
                    arguments: Value::Object(arguments),
                },
                after,
            ));
        }
        let inner = trimmed
            .strip_prefix(QWEN_PARAMETER)
            .ok_or_else(|| format!("`{name}`: expected `<parameter=` or `</function>`"))?;
        let end = inner
            .find('>')
            .ok_or_else(|| format!("`{name}`: `<parameter=` is never closed"))?;
        let key = inner[..end].trim().to_owned();
        let value_and_rest = &inner[end + 1..];
        let close = value_and_rest
            .find("</parameter>")
            .ok_or_else(|| format!("`{name}`: parameter `{key}` is never closed"))?;
        let value = &value_and_rest[..close];
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        arguments.insert(key, Value::String(value.to_owned()));
        rest = &value_and_rest[close + "</parameter>".len()..];
    }
}

/// Types `arguments` (all strings, as Qwen's XML writes them) by `schema`: a property the schema
/// says is a string stays the text written, even if it looks like a number; any other value is
/// read as JSON when it is JSON, else kept as text.
pub fn type_by_schema(arguments: &Value, schema: &Value) -> Value {
    let Value::Object(arguments) = arguments else {
        return arguments.clone();
    };
    let typed = arguments
        .iter()
        .map(|(key, value)| {
            let declared = &schema["properties"][key]["type"];
            let is_string = declared == "string"
                || declared
                    .as_array()
                    .is_some_and(|types| types.len() == 1 && types[0] == "string");
            let value = match value {
                Value::String(text) if !is_string => {
                    serde_json::from_str::<Value>(text).unwrap_or_else(|_| value.clone())
                }
                other => other.clone(),
            };
            (key.clone(), value)
        })
        .collect();
    Value::Object(typed)
}

/// A body that is nothing but a call object or a list of them.
fn bare(body: &str) -> Found<'_> {
    let trimmed = body.trim_start();
    if !(trimmed.starts_with('{') || trimmed.starts_with('[')) {
        return Found::None;
    }
    let mut repairs = Vec::new();
    let (value, after) = match leading_json(trimmed) {
        Ok(found) => found,
        Err(e) => return Found::Broken(e),
    };
    if !after.trim().is_empty() {
        return Found::Broken("text after the call's JSON".into());
    }
    let looks_like_call = match &value {
        Value::Object(o) => o.contains_key("name"),
        Value::Array(items) => items.iter().all(|i| i.get("name").is_some()) && !items.is_empty(),
        _ => false,
    };
    if !looks_like_call {
        // A JSON answer, not a call.
        return Found::None;
    }
    match calls_of(&value, &mut repairs) {
        Ok(calls) => Found::Calls {
            before: "",
            after: "",
            calls,
            repairs,
        },
        Err(e) => Found::Broken(e),
    }
}

fn llama3(body: &str) -> Found<'_> {
    // Text may come before `<|python_tag|>`: it is content.
    let (before, trimmed) = match body.find(PYTHON_TAG) {
        Some(at) => (&body[..at], &body[at..]),
        None => ("", body.trim_start()),
    };
    let (tagged, json) = match trimmed.strip_prefix(PYTHON_TAG) {
        Some(rest) => (true, rest.trim_start()),
        None => (false, trimmed),
    };
    if !json.starts_with('{') {
        return if tagged {
            Found::Broken("`<|python_tag|>` without a JSON call".into())
        } else {
            Found::None
        };
    }
    let mut calls = Vec::new();
    let mut repairs = Vec::new();
    let mut rest = json;
    while rest.starts_with('{') {
        let (value, after) = match leading_json(rest) {
            Ok(found) => found,
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        };
        if calls.is_empty() && !tagged && value.get("name").is_none() {
            // JSON, but not a call.
            return Found::None;
        }
        match call_of(&value, &mut repairs) {
            Ok(call) => calls.push(call),
            Err(e) => return Found::Broken(format!("call {}: {e}", calls.len() + 1)),
        }
        rest = after.trim_start();
        rest = rest.strip_prefix(';').unwrap_or(rest).trim_start();
    }
    if !rest.is_empty() {
        return Found::Broken("text after the calls".into());
    }
    Found::Calls {
        before,
        after: "",
        calls,
        repairs,
    }
}

fn mistral(body: &str) -> Found<'_> {
    let Some(first) = body.find(MISTRAL_CALLS) else {
        return Found::None;
    };
    let mut calls = Vec::new();
    let mut repairs = Vec::new();
    let mut rest = &body[first..];
    while let Some(inner) = rest.strip_prefix(MISTRAL_CALLS) {
        let inner = inner.trim_start();
        if inner.starts_with('[') || inner.starts_with('{') {
            let (value, after) = match leading_json(inner) {
                Ok(found) => found,
                Err(e) => return Found::Broken(format!("[TOOL_CALLS]: {e}")),
            };
            match calls_of(&value, &mut repairs) {
                Ok(found) => calls.extend(found),
                Err(e) => return Found::Broken(format!("[TOOL_CALLS]: {e}")),
            }
            rest = after.trim_start();
            continue;
        }
        let Some(args_at) = inner.find(MISTRAL_ARGS) else {
            return Found::Broken("[TOOL_CALLS] without `[ARGS]` or a JSON list".into());
        };
        // `name[CALL_ID]id[ARGS]{...}` in some versions: the name is what precedes `[`.
        let name = inner[..args_at].split('[').next().unwrap_or("").trim();
        if name.is_empty() {
            return Found::Broken("[TOOL_CALLS] without a function name".into());
        }
        let (value, after) = match leading_json(&inner[args_at + MISTRAL_ARGS.len()..]) {
            Ok(found) => found,
            Err(e) => return Found::Broken(format!("`{name}` arguments: {e}")),
        };
        let mut object = Map::new();
        object.insert("name".into(), Value::String(name.to_owned()));
        object.insert("arguments".into(), value);
        match call_of(&Value::Object(object), &mut repairs) {
            Ok(call) => calls.push(call),
            Err(e) => return Found::Broken(e),
        }
        rest = after.trim_start();
    }
    Found::Calls {
        before: &body[..first],
        after: rest,
        calls,
        repairs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, arguments: Value) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments,
        }
    }

    #[test]
    fn hermes_calls_with_text_before_and_several_calls() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
        let p = parse(out, ToolFormat::Hermes);
        assert_eq!(p.content.as_deref(), Some("Let me check.\n"));
        assert_eq!(
            p.calls,
            [
                call("get_weather", json!({"city": "Paris"})),
                call("get_time", json!({}))
            ]
        );
        assert_eq!(p.problem, None);
    }

    #[test]
    fn unicode_and_escaped_quotes_survive_in_arguments() {
        let out = r#"<tool_call>{"name": "say", "arguments": {"text": "naïve \"quoted\" 東京 \\ done"}}</tool_call>"#;
        let p = parse(out, ToolFormat::Hermes);
        assert_eq!(
            p.calls,
            [call(
                "say",
                json!({"text": "naïve \"quoted\" 東京 \\ done"})
            )]
        );
        assert_eq!(p.content, None);
    }

    #[test]
    fn reasoning_goes_to_its_own_field() {
        let out = "<think>The user wants weather.</think>\n\n<tool_call>{\"name\": \"w\", \"arguments\": {}}</tool_call>";
        let p = parse(out, ToolFormat::Hermes);
        assert_eq!(p.reasoning.as_deref(), Some("The user wants weather."));
        assert_eq!(p.content, None);
        assert_eq!(p.calls.len(), 1);
        let p = parse("[THINK]hmm[/THINK]Answer.", ToolFormat::Mistral);
        assert_eq!(
            (p.reasoning.as_deref(), p.content.as_deref()),
            (Some("hmm"), Some("Answer."))
        );
    }

    #[test]
    fn malformed_and_truncated_calls_come_back_as_content() {
        for out in [
            "<tool_call>{\"name\": \"w\", \"arguments\": {\"city\": \"Par",
            "<tool_call>{\"arguments\": {}}</tool_call>",
            "<tool_call>not json</tool_call>",
            "<tool_call>{\"name\": \"w\", \"arguments\": 5}</tool_call>",
        ] {
            let p = parse(out, ToolFormat::Hermes);
            assert!(p.calls.is_empty(), "{out}");
            assert_eq!(p.content.as_deref(), Some(out));
            assert!(p.problem.is_some(), "{out}");
        }
    }

    #[test]
    fn safe_repairs_are_made_and_said() {
        let p = parse(
            "<tool_call>{\"name\": \"w\", \"arguments\": \"{\\\"city\\\": \\\"Oslo\\\"}\"}",
            ToolFormat::Hermes,
        );
        assert_eq!(p.calls, [call("w", json!({"city": "Oslo"}))]);
        assert_eq!(p.repairs.len(), 2, "{:?}", p.repairs);
    }

    #[test]
    fn llama3_json_calls() {
        let p = parse(
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}",
            ToolFormat::Llama3,
        );
        assert_eq!(p.calls, [call("get_weather", json!({"city": "Rome"}))]);
        let p = parse(
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}",
            ToolFormat::Llama3,
        );
        assert_eq!(p.calls, [call("a", json!({})), call("b", json!({"x": 1}))]);
        let p = parse("{\"answer\": 42}", ToolFormat::Llama3);
        assert!(p.calls.is_empty());
        assert_eq!(p.content.as_deref(), Some("{\"answer\": 42}"));
        assert_eq!(p.problem, None);
    }

    #[test]
    fn mistral_both_forms() {
        let p = parse(
            "[TOOL_CALLS][{\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}, {\"name\": \"b\", \"arguments\": {}}]",
            ToolFormat::Mistral,
        );
        assert_eq!(
            p.calls,
            [call("a", json!({"q": "x"})), call("b", json!({}))]
        );
        let p = parse(
            "Sure.[TOOL_CALLS]search[ARGS]{\"q\": \"rust\"}[TOOL_CALLS]open[ARGS]{\"id\": 3}",
            ToolFormat::Mistral,
        );
        assert_eq!(p.content.as_deref(), Some("Sure."));
        assert_eq!(
            p.calls,
            [
                call("search", json!({"q": "rust"})),
                call("open", json!({"id": 3}))
            ]
        );
        let p = parse(
            "[TOOL_CALLS]search[CALL_ID]abc123[ARGS]{\"q\": 1}",
            ToolFormat::Mistral,
        );
        assert_eq!(p.calls, [call("search", json!({"q": 1}))]);
        let p = parse("[TOOL_CALLS]search", ToolFormat::Mistral);
        assert!(p.calls.is_empty() && p.problem.is_some());
    }

    #[test]
    fn generic_takes_tags_or_a_bare_call_object() {
        let p = parse(
            "{\"name\": \"shell\", \"arguments\": {\"command\": \"ls\"}}",
            ToolFormat::Generic,
        );
        assert_eq!(p.calls, [call("shell", json!({"command": "ls"}))]);
        let p = parse("Plain answer.", ToolFormat::Generic);
        assert_eq!(
            (p.content.as_deref(), p.calls.len()),
            (Some("Plain answer."), 0)
        );
    }

    #[test]
    fn the_family_is_detected_from_the_template() {
        assert_eq!(
            ToolFormat::detect("{{ '<tool_call>' }}"),
            ToolFormat::Hermes
        );
        assert_eq!(ToolFormat::detect("[TOOL_CALLS]"), ToolFormat::Mistral);
        assert_eq!(ToolFormat::detect("<|python_tag|>"), ToolFormat::Llama3);
        assert_eq!(
            ToolFormat::detect(crate::template::CHATML),
            ToolFormat::Generic
        );
    }

    #[test]
    fn settled_content_stops_before_a_marker_or_its_beginning() {
        assert_eq!(settled_content("Hello <tool", ToolFormat::Hermes), 6);
        assert_eq!(settled_content("Hello <tool_call>{", ToolFormat::Hermes), 6);
        assert_eq!(settled_content("Hello", ToolFormat::Hermes), 5);
        assert_eq!(settled_content("  {\"name\"", ToolFormat::Generic), 0);
        assert_eq!(settled_content("  ", ToolFormat::Hermes), 0);
    }
}
