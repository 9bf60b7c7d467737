//! Call syntaxes of the families whose calls are delimited by their own special tokens: GLM
//! (4.5 and later), Kimi (K2), DeepSeek (V3, V3.1 and later). Each parser finds the calls in a
//! body, keeps complete ones before a last call cut off mid-way, and reports anything else that
//! looks like a call but does not parse as `Found::Broken` (returned as content, never a 5xx).

use serde_json::{Map, Value};

use super::parse::{leading_json, Found, ParsedCall};

pub(super) const GLM_ARG_KEY: &str = "<arg_key>";
const GLM_OPEN: &str = "<tool_call>";
const GLM_CLOSE: &str = "</tool_call>";

pub(super) const KIMI_SECTION: &str = "<|tool_calls_section_begin|>";
pub(super) const KIMI_CALL: &str = "<|tool_call_begin|>";
const KIMI_ARGUMENT: &str = "<|tool_call_argument_begin|>";
const KIMI_CALL_END: &str = "<|tool_call_end|>";
const KIMI_SECTION_END: &str = "<|tool_calls_section_end|>";

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
                "call {} was cut off mid-way and dropped",
                calls.len() + 1
            ));
            rest = "";
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
