//! An Anthropic Messages request as the OpenAI chat body every dialect runs through: `system`,
//! content blocks (`text`, `tool_use`, `tool_result`), tools and `tool_choice`, sampling fields,
//! `thinking`. Field errors name the Anthropic field.

use serde_json::{json, Map, Value};

use super::super::error::ApiError;

/// The line Claude Code puts first in its system prompt: a per-request hash (`cch=`) for
/// Anthropic's billing, no instruction to the model. Kept, it would make every request's prompt
/// differ from its first tokens and defeat the prefix cache.
const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// What a Messages body asks for.
pub struct Translated {
    /// The OpenAI chat body.
    pub openai: Value,
    pub stream: bool,
    pub model: String,
    /// `stop_sequences`, for the `stop_sequence` an answer names.
    pub stops: Vec<String>,
}

/// Translates a Messages body; `count_only` (count_tokens) needs no `max_tokens`.
pub fn messages(body: &Value, count_only: bool) -> Result<Translated, ApiError> {
    let object = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "the body must be a JSON object"))?;
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
        None => return Err(ApiError::invalid("model", "`model` is required")),
    };
    let mut openai = Map::new();
    openai.insert("model".into(), json!(model));
    let mut messages = Vec::new();
    if let Some(system) = object.get("system").filter(|s| !s.is_null()) {
        let text = system_text(system)?;
        if !text.is_empty() {
            messages.push(json!({"role": "system", "content": text}));
        }
    }
    let turns = object
        .get("messages")
        .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages", "`messages` must be an array"))?;
    if turns.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    for (i, turn) in turns.iter().enumerate() {
        messages.extend(message(turn, i)?);
    }
    openai.insert("messages".into(), Value::Array(messages));
    match object.get("max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => {
            openai.insert("max_tokens".into(), json!(n));
        }
        Some(other) if !(count_only && other.is_null()) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("`max_tokens` must be a positive integer; got {other}"),
            ))
        }
        _ if count_only => {}
        _ => return Err(ApiError::invalid("max_tokens", "`max_tokens` is required")),
    }
    for field in ["temperature", "top_p", "top_k"] {
        if let Some(value) = object.get(field).filter(|v| !v.is_null()) {
            if !value.is_number() {
                return Err(ApiError::invalid(
                    field,
                    format!("`{field}` must be a number"),
                ));
            }
            openai.insert(field.into(), value.clone());
        }
    }
    if let Some(stops) = object.get("stop_sequences").filter(|v| !v.is_null()) {
        let valid = stops
            .as_array()
            .is_some_and(|s| s.iter().all(Value::is_string));
        if !valid {
            return Err(ApiError::invalid(
                "stop_sequences",
                "`stop_sequences` must be an array of strings",
            ));
        }
        openai.insert("stop".into(), stops.clone());
    }
    let stops: Vec<String> = object
        .get("stop_sequences")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if let Some(metadata) = object.get("metadata").filter(|v| !v.is_null()) {
        if !metadata.is_object() {
            return Err(ApiError::invalid(
                "metadata",
                "`metadata` must be an object",
            ));
        }
    }
    if let Some(tools) = object.get("tools").filter(|v| !v.is_null()) {
        openai.insert("tools".into(), self::tools(tools)?);
    }
    if let Some(choice) = object.get("tool_choice").filter(|v| !v.is_null()) {
        let (choice, parallel) = tool_choice(choice)?;
        openai.insert("tool_choice".into(), choice);
        if let Some(parallel) = parallel {
            openai.insert("parallel_tool_calls".into(), json!(parallel));
        }
    }
    if let Some(thinking) = object.get("thinking").filter(|v| !v.is_null()) {
        let on = self::thinking(thinking)?;
        openai.insert(
            "chat_template_kwargs".into(),
            json!({"enable_thinking": on}),
        );
    }
    if let Some(config) = object.get("output_config").filter(|v| !v.is_null()) {
        output_config(config, &mut openai)?;
    }
    // lm-sandbox's own extension, as on chat: the server-side shell loop.
    if let Some(sandbox) = object.get("sandbox") {
        openai.insert("sandbox".into(), sandbox.clone());
    }
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    openai.insert("stream".into(), json!(stream));
    Ok(Translated {
        openai: Value::Object(openai),
        stream,
        model,
        stops,
    })
}

/// `system` (a string or text blocks) as one text, without Claude Code's billing line.
fn system_text(system: &Value) -> Result<String, ApiError> {
    let texts: Vec<&str> = match system {
        Value::String(text) => vec![text.as_str()],
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                if block["type"] != "text" {
                    return Err(ApiError::invalid(
                        format!("system[{j}].type"),
                        "`system` blocks must be of type `text`",
                    ));
                }
                let text = block["text"].as_str().ok_or_else(|| {
                    ApiError::invalid(format!("system[{j}].text"), "a text block needs `text`")
                })?;
                texts.push(text);
            }
            texts
        }
        _ => {
            return Err(ApiError::invalid(
                "system",
                "`system` must be a string or an array of text blocks",
            ))
        }
    };
    let kept: Vec<String> = texts
        .into_iter()
        .map(|text| {
            text.lines()
                .filter(|line| !line.trim_start().starts_with(BILLING_HEADER))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|text| !text.trim().is_empty())
        .collect();
    Ok(kept.join("\n\n"))
}

/// One Messages turn as OpenAI messages: a user turn's `tool_result` blocks become `tool`
/// messages (before its text), an assistant turn's `tool_use` blocks its `tool_calls`.
fn message(turn: &Value, i: usize) -> Result<Vec<Value>, ApiError> {
    let role = match turn.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant")) => role,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!("`role` must be user or assistant; got {other:?}"),
            ))
        }
        None => {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                "every message needs a `role`",
            ))
        }
    };
    let blocks = match turn.get("content") {
        Some(Value::String(text)) => {
            return Ok(vec![json!({"role": role, "content": text})]);
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "`content` must be a string or an array of content blocks",
            ))
        }
    };
    let mut text = Vec::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, role) {
            ("text", _) => text.push(
                block["text"]
                    .as_str()
                    .ok_or_else(|| {
                        ApiError::invalid(format!("{at}.text"), "a text block needs `text`")
                    })?
                    .to_owned(),
            ),
            // Earlier reasoning is not shown to the model again (as the chat templates do).
            ("thinking" | "redacted_thinking", "assistant") => {}
            ("tool_use", "assistant") => {
                let id = block["id"].as_str().ok_or_else(|| {
                    ApiError::invalid(format!("{at}.id"), "a tool_use block needs `id`")
                })?;
                let name = block["name"].as_str().ok_or_else(|| {
                    ApiError::invalid(format!("{at}.name"), "a tool_use block needs `name`")
                })?;
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                if !input.is_object() {
                    return Err(ApiError::invalid(
                        format!("{at}.input"),
                        "`input` must be an object",
                    ));
                }
                calls.push(json!({"id": id, "type": "function",
                                  "function": {"name": name, "arguments": input}}));
            }
            ("tool_result", "user") => {
                let id = block["tool_use_id"].as_str().ok_or_else(|| {
                    ApiError::invalid(
                        format!("{at}.tool_use_id"),
                        "a tool_result block needs `tool_use_id`",
                    )
                })?;
                let mut content = result_text(block.get("content"), &at)?;
                if block["is_error"] == true {
                    content = format!("Error: {content}");
                }
                results.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            ("image" | "document", _) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("`{kind}` blocks are not supported: this server takes text only"),
                ))
            }
            ("", _) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    "every content block needs a `type`",
                ))
            }
            (other, role) => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("`{other}` blocks are not supported in a {role} message"),
                ))
            }
        }
    }
    let mut out = results;
    let text = text.join("\n");
    if role == "assistant" {
        let mut message = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            message["tool_calls"] = Value::Array(calls);
            if text.is_empty() {
                message["content"] = Value::Null;
            }
        }
        out.push(message);
    } else if !text.is_empty() || out.is_empty() {
        out.push(json!({"role": "user", "content": text}));
    }
    Ok(out)
}

/// A `tool_result`'s content: a string, or text blocks.
fn result_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(blocks)) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (k, block) in blocks.iter().enumerate() {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(block["text"].as_str().unwrap_or("")),
                    Some(other) => {
                        return Err(ApiError::invalid(
                            format!("{at}.content[{k}].type"),
                            format!(
                                "`{other}` blocks in a tool result are not supported: text only"
                            ),
                        ))
                    }
                    None => {
                        return Err(ApiError::invalid(
                            format!("{at}.content[{k}].type"),
                            "every content block needs a `type`",
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid(
            format!("{at}.content"),
            "a tool result's `content` must be a string or text blocks",
        )),
    }
}

/// `tools` as OpenAI function tools.
fn tools(tools: &Value) -> Result<Value, ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "`tools` must be an array"))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, tool) in list.iter().enumerate() {
        match tool.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "server tools (`{other}`) are not offered here: declare client tools \
                         with `name` and `input_schema`"
                    ),
                ))
            }
        }
        let name = tool["name"].as_str().ok_or_else(|| {
            ApiError::invalid(format!("tools[{i}].name"), "every tool needs a `name`")
        })?;
        let schema = tool.get("input_schema").ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].input_schema"),
                "every tool needs an `input_schema`",
            )
        })?;
        let mut function = json!({"name": name, "parameters": schema});
        if let Some(description) = tool.get("description").filter(|d| !d.is_null()) {
            function["description"] = description.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Value::Array(out))
}

/// `tool_choice` as OpenAI's, with `parallel_tool_calls` when it disables parallel use.
fn tool_choice(choice: &Value) -> Result<(Value, Option<bool>), ApiError> {
    let parallel = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(disable)) => Some(!disable),
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice.disable_parallel_tool_use",
                "`disable_parallel_tool_use` must be a boolean",
            ))
        }
    };
    let openai = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => {
            let name = choice["name"].as_str().ok_or_else(|| {
                ApiError::invalid(
                    "tool_choice.name",
                    "`tool_choice` of type tool needs `name`",
                )
            })?;
            json!({"type": "function", "function": {"name": name}})
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice.type",
                "`tool_choice.type` must be auto, any, tool or none",
            ))
        }
    };
    Ok((openai, parallel))
}

/// `output_config`: `effort` as the template's reasoning effort, `format` (a JSON schema) as a
/// grammar.
fn output_config(config: &Value, openai: &mut Map<String, Value>) -> Result<(), ApiError> {
    if !config.is_object() {
        return Err(ApiError::invalid(
            "output_config",
            "`output_config` must be an object",
        ));
    }
    match config.get("effort") {
        None | Some(Value::Null) => {}
        Some(Value::String(effort)) => {
            let effort = match effort.as_str() {
                "low" | "medium" | "high" => effort.as_str(),
                "xhigh" | "max" => "high",
                other => {
                    return Err(ApiError::invalid(
                        "output_config.effort",
                        format!("`effort` must be low, medium, high, xhigh or max; got {other:?}"),
                    ))
                }
            };
            openai.insert("reasoning_effort".into(), json!(effort));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "output_config.effort",
                "`effort` must be a string",
            ))
        }
    }
    match config.get("format") {
        None | Some(Value::Null) => {}
        Some(format) if format["type"] == "json_schema" && format["schema"].is_object() => {
            openai.insert(
                "response_format".into(),
                json!({"type": "json_schema",
                       "json_schema": {"name": "output", "schema": format["schema"]}}),
            );
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "output_config.format",
                "`format` must be {\"type\": \"json_schema\", \"schema\": {…}}",
            ))
        }
    }
    Ok(())
}

/// `thinking`: whether the model reasons.
fn thinking(thinking: &Value) -> Result<bool, ApiError> {
    match thinking.get("type").and_then(Value::as_str) {
        Some("enabled") => {
            match thinking.get("budget_tokens") {
                Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => {}
                _ => {
                    return Err(ApiError::invalid(
                        "thinking.budget_tokens",
                        "`thinking` of type enabled needs a positive integer `budget_tokens`",
                    ))
                }
            }
            Ok(true)
        }
        Some("adaptive" | "between_tools") => Ok(true),
        Some("disabled") => Ok(false),
        _ => Err(ApiError::invalid(
            "thinking.type",
            "`thinking.type` must be enabled, adaptive, between_tools or disabled",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claude_code_billing_line_leaves_the_system_prompt() {
        let system = json!([
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.37.0d9; cc_entrypoint=cli; cch=fa690;"},
            {"type": "text", "text": "You are Claude Code."},
        ]);
        assert_eq!(system_text(&system).unwrap(), "You are Claude Code.");
    }

    #[test]
    fn tool_results_become_tool_messages_before_the_text() {
        let turn = json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "42"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no", "is_error": true},
            {"type": "text", "text": "thanks"},
        ]});
        let out = message(&turn, 0).unwrap();
        assert_eq!(
            out,
            vec![
                json!({"role": "tool", "tool_call_id": "toolu_1", "content": "42"}),
                json!({"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no"}),
                json!({"role": "user", "content": "thanks"}),
            ]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let base =
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let cases = [
            ("max_tokens", json!(0)),
            ("tool_choice", json!({"type": "sometimes"})),
            ("thinking", json!({"type": "enabled"})),
            ("stop_sequences", json!("x")),
            ("tools", json!([{"name": "t"}])),
        ];
        for (field, value) in cases {
            let mut body = base.clone();
            body[field] = value;
            let Err(ApiError::InvalidRequest { param, .. }) = messages(&body, false) else {
                panic!("{field} accepted");
            };
            assert!(param.unwrap().starts_with(field));
        }
        let mut image = base.clone();
        image["messages"][0]["content"] = json!([{"type": "image", "source": {}}]);
        let Err(ApiError::InvalidRequest { param, .. }) = messages(&image, false) else {
            panic!("image accepted");
        };
        assert_eq!(param.as_deref(), Some("messages[0].content[0].type"));
    }
}
