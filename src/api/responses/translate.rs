//! A Responses request as the OpenAI chat body every dialect runs through: `input` (a string or
//! items: messages, `function_call`, `function_call_output`, `reasoning`), `instructions`, function
//! tools, `tool_choice`, `text.format`, `reasoning.effort`, sampling fields. Tools of other types
//! (`web_search`, `file_search`, `custom`, `local_shell`, `mcp`, namespaces…) are skipped and
//! named in a warning: this server runs function tools, and shell commands only through its own
//! sandbox loop. Field errors name the Responses field.

use serde_json::{json, Map, Value};

use super::super::error::ApiError;

/// What a Responses body asks for.
pub struct Translated {
    /// The OpenAI chat body, messages excepted: the caller puts the conversation in.
    pub openai: Map<String, Value>,
    /// `instructions`, as the system message that leads this request only.
    pub instructions: Option<String>,
    /// This request's input as chat messages.
    pub messages: Vec<Value>,
    /// This request's input items, each with an id.
    pub items: Vec<Value>,
    pub stream: bool,
    pub store: bool,
    pub previous: Option<String>,
    /// Tool types skipped.
    pub skipped_tools: Vec<String>,
    /// The request fields a response object echoes.
    pub echo: Map<String, Value>,
}

fn item_id(prefix: &str) -> String {
    super::super::generate::response_id(prefix).replacen('-', "_", 1)
}

pub fn request(body: &Value) -> Result<Translated, ApiError> {
    let object = body
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "the body must be a JSON object"))?;
    let mut openai = Map::new();
    match object.get("model") {
        Some(Value::String(model)) => openai.insert("model".into(), json!(model)),
        Some(_) => return Err(ApiError::invalid("model", "`model` must be a string")),
        None => return Err(ApiError::invalid("model", "`model` is required")),
    };
    let instructions = match object.get("instructions") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "instructions",
                "`instructions` must be a string",
            ))
        }
    };
    let (messages, items) = match object.get("input") {
        Some(Value::String(text)) => {
            let item = json!({"id": item_id("msg"), "type": "message", "role": "user",
                              "content": [{"type": "input_text", "text": text}]});
            (vec![json!({"role": "user", "content": text})], vec![item])
        }
        Some(Value::Array(items)) => input_items(items)?,
        None | Some(Value::Null) => (Vec::new(), Vec::new()),
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "`input` must be a string or an array of items",
            ))
        }
    };
    if let Some(max) = object.get("max_output_tokens").filter(|v| !v.is_null()) {
        if max.as_u64().is_none_or(|n| n < 1) {
            return Err(ApiError::invalid(
                "max_output_tokens",
                format!("`max_output_tokens` must be a positive integer; got {max}"),
            ));
        }
        openai.insert("max_tokens".into(), max.clone());
    }
    for field in ["temperature", "top_p"] {
        if let Some(value) = object.get(field).filter(|v| !v.is_null()) {
            openai.insert(field.into(), value.clone());
        }
    }
    let mut skipped_tools = Vec::new();
    if let Some(tools) = object.get("tools").filter(|v| !v.is_null()) {
        let (functions, skipped) = self::tools(tools)?;
        skipped_tools = skipped;
        if !functions.is_empty() {
            openai.insert("tools".into(), Value::Array(functions));
        }
    }
    if let Some(choice) = object.get("tool_choice").filter(|v| !v.is_null()) {
        if openai.contains_key("tools") {
            openai.insert("tool_choice".into(), tool_choice(choice)?);
        }
    }
    if let Some(parallel) = object.get("parallel_tool_calls").filter(|v| !v.is_null()) {
        if !parallel.is_boolean() {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "`parallel_tool_calls` must be a boolean",
            ));
        }
        if openai.contains_key("tools") {
            openai.insert("parallel_tool_calls".into(), parallel.clone());
        }
    }
    if let Some(format) = body.pointer("/text/format").filter(|v| !v.is_null()) {
        if let Some(format) = response_format(format)? {
            openai.insert("response_format".into(), format);
        }
    }
    if let Some(effort) = body.pointer("/reasoning/effort").filter(|v| !v.is_null()) {
        let effort = effort.as_str().ok_or_else(|| {
            ApiError::invalid("reasoning.effort", "`reasoning.effort` must be a string")
        })?;
        match effort {
            "none" => {
                openai.insert(
                    "chat_template_kwargs".into(),
                    json!({"enable_thinking": false}),
                );
            }
            "minimal" | "low" | "medium" | "high" | "xhigh" => {
                let effort = if effort == "xhigh" { "high" } else { effort };
                openai.insert("reasoning_effort".into(), json!(effort));
            }
            other => {
                return Err(ApiError::invalid(
                    "reasoning.effort",
                    format!(
                        "`reasoning.effort` must be none, minimal, low, medium, high or xhigh; \
                         got {other:?}"
                    ),
                ))
            }
        }
    }
    if let Some(top) = object.get("top_logprobs").filter(|v| !v.is_null()) {
        if top.as_u64() != Some(0) {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` is not supported on /v1/responses; use /v1/chat/completions",
            ));
        }
    }
    if let Some(sandbox) = object.get("sandbox") {
        openai.insert("sandbox".into(), sandbox.clone());
    }
    let flag = |field: &str, default: bool| match object.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a boolean"),
        )),
    };
    let stream = flag("stream", false)?;
    let store = flag("store", true)?;
    let previous = match object.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                "previous_response_id",
                "`previous_response_id` must be a string",
            ))
        }
    };
    if let Some(metadata) = object.get("metadata").filter(|v| !v.is_null()) {
        if !metadata.is_object() {
            return Err(ApiError::invalid(
                "metadata",
                "`metadata` must be an object",
            ));
        }
    }
    let mut echo = Map::new();
    for field in [
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tool_choice",
        "tools",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "metadata",
        "user",
        "truncation",
        "previous_response_id",
    ] {
        echo.insert(
            field.into(),
            object.get(field).cloned().unwrap_or(Value::Null),
        );
    }
    Ok(Translated {
        openai,
        instructions,
        messages,
        items,
        stream,
        store,
        previous,
        skipped_tools,
        echo,
    })
}

/// Input items as chat messages (a run of `function_call`s joins one assistant message), and
/// the items with ids.
fn input_items(items: &[Value]) -> Result<(Vec<Value>, Vec<Value>), ApiError> {
    let mut messages: Vec<Value> = Vec::new();
    let mut listed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None if item.get("role").is_some() => "message",
            None => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    "every input item needs a `type` (or a message its `role`)",
                ))
            }
        };
        let mut with_id = item.clone();
        if with_id.get("id").is_none_or(Value::is_null) {
            let prefix = match kind {
                "message" => "msg",
                "function_call" => "fc",
                "function_call_output" => "fco",
                "reasoning" => "rs",
                _ => "item",
            };
            with_id["id"] = json!(item_id(prefix));
        }
        with_id["type"] = json!(kind);
        match kind {
            "message" => messages.push(message(item, &at)?),
            "function_call" => {
                let field = |name: &str| {
                    item.get(name).and_then(Value::as_str).ok_or_else(|| {
                        ApiError::invalid(
                            format!("{at}.{name}"),
                            format!("a function_call needs a string `{name}`"),
                        )
                    })
                };
                let call = json!({"id": field("call_id")?, "type": "function",
                                  "function": {"name": field("name")?,
                                               "arguments": field("arguments")?}});
                let joins = messages
                    .last()
                    .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_some());
                if joins {
                    let last = messages.last_mut().expect("checked");
                    last["tool_calls"]
                        .as_array_mut()
                        .expect("tool_calls")
                        .push(call);
                } else if messages
                    .last()
                    .is_some_and(|m| m["role"] == "assistant" && m.get("tool_calls").is_none())
                {
                    // The assistant's text, then its calls: one turn.
                    messages.last_mut().expect("checked")["tool_calls"] = json!([call]);
                } else {
                    messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]}));
                }
            }
            "function_call_output" => {
                let id = item.get("call_id").and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(
                        format!("{at}.call_id"),
                        "a function_call_output needs a string `call_id`",
                    )
                })?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => parts_text(parts, &format!("{at}.output"))?,
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{at}.output"),
                            "a function_call_output needs `output`: a string or text parts",
                        ))
                    }
                };
                messages.push(json!({"role": "tool", "tool_call_id": id, "content": output}));
            }
            // Earlier reasoning is not shown to the model again (as the chat templates do).
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!(
                        "input items of type `{other}` are not supported: send messages, \
                         function_call and function_call_output items"
                    ),
                ))
            }
        }
        listed.push(with_id);
    }
    Ok((messages, listed))
}

/// A `message` item as a chat message.
fn message(item: &Value, at: &str) -> Result<Value, ApiError> {
    let role = match item.get("role").and_then(Value::as_str) {
        Some(role @ ("user" | "assistant" | "system" | "developer")) => role,
        _ => {
            return Err(ApiError::invalid(
                format!("{at}.role"),
                "`role` must be user, assistant, system or developer",
            ))
        }
    };
    let content = match item.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts_text(parts, &format!("{at}.content"))?,
        _ => {
            return Err(ApiError::invalid(
                format!("{at}.content"),
                "`content` must be a string or an array of content parts",
            ))
        }
    };
    Ok(json!({"role": role, "content": content}))
}

/// Text parts (`input_text`, `output_text`) as one text.
fn parts_text(parts: &[Value], at: &str) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "text") => {
                texts.push(part["text"].as_str().ok_or_else(|| {
                    ApiError::invalid(format!("{at}[{j}].text"), "a text part needs `text`")
                })?)
            }
            Some("refusal") => texts.push(part["refusal"].as_str().unwrap_or("")),
            Some(other @ ("input_image" | "input_file" | "input_audio")) => {
                return Err(ApiError::invalid(
                    format!("{at}[{j}].type"),
                    format!("`{other}` parts are not supported: this server takes text only"),
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{at}[{j}].type"),
                    format!("content parts of type `{other}` are not supported"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{at}[{j}].type"),
                    "every content part needs a `type`",
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

/// Function tools in chat's shape, and the types of the tools skipped.
fn tools(tools: &Value) -> Result<(Vec<Value>, Vec<String>), ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "`tools` must be an array"))?;
    let mut functions = Vec::new();
    let mut skipped = Vec::new();
    for (i, tool) in list.iter().enumerate() {
        let kind = tool.get("type").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(format!("tools[{i}].type"), "every tool needs a `type`")
        })?;
        if kind != "function" {
            if !skipped.iter().any(|s| s == kind) {
                skipped.push(kind.to_owned());
            }
            continue;
        }
        let name = tool.get("name").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(format!("tools[{i}].name"), "a function tool needs a `name`")
        })?;
        let mut function = json!({"name": name});
        for field in ["description", "parameters", "strict"] {
            if let Some(value) = tool.get(field).filter(|v| !v.is_null()) {
                function[field] = value.clone();
            }
        }
        functions.push(json!({"type": "function", "function": function}));
    }
    Ok((functions, skipped))
}

/// `tool_choice` in chat's shape.
fn tool_choice(choice: &Value) -> Result<Value, ApiError> {
    match choice {
        Value::String(word) if ["auto", "none", "required"].contains(&word.as_str()) => {
            Ok(choice.clone())
        }
        Value::Object(object) if object.get("type") == Some(&json!("function")) => {
            let name = object.get("name").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("tool_choice.name", "a function `tool_choice` needs `name`")
            })?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(ApiError::invalid(
            "tool_choice",
            "`tool_choice` must be auto, none, required or {\"type\": \"function\", \"name\"}",
        )),
    }
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Result<Option<Value>, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema = format.get("schema").ok_or_else(|| {
                ApiError::invalid("text.format.schema", "a json_schema format needs `schema`")
            })?;
            let mut json_schema = json!({
                "name": format.get("name").cloned().unwrap_or(json!("response")),
                "schema": schema,
            });
            if let Some(strict) = format.get("strict") {
                json_schema["strict"] = strict.clone();
            }
            Ok(Some(
                json!({"type": "json_schema", "json_schema": json_schema}),
            ))
        }
        _ => Err(ApiError::invalid(
            "text.format.type",
            "`text.format.type` must be text, json_object or json_schema",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_outputs_become_one_assistant_turn_and_tool_messages() {
        let body = json!({"model": "m", "input": [
            {"role": "user", "content": "weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "w", "arguments": "{\"c\":1}"},
            {"type": "function_call", "call_id": "call_2", "name": "w", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
        ]});
        let t = request(&body).unwrap();
        assert_eq!(t.messages.len(), 3);
        assert_eq!(t.messages[1]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(t.messages[2]["role"], "tool");
        assert_eq!(t.items.len(), 5);
        assert!(t.items.iter().all(|i| i["id"].is_string()));
    }

    #[test]
    fn other_tool_types_are_skipped_and_named() {
        let body = json!({"model": "m", "input": "hi", "tools": [
            {"type": "function", "name": "f", "parameters": {"type": "object"}},
            {"type": "web_search"}, {"type": "local_shell"}, {"type": "web_search"},
        ]});
        let t = request(&body).unwrap();
        assert_eq!(t.skipped_tools, vec!["web_search", "local_shell"]);
        assert_eq!(t.openai["tools"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn bad_fields_are_named() {
        for (field, value, param) in [
            ("input", json!(3), "input"),
            ("max_output_tokens", json!(0), "max_output_tokens"),
            ("reasoning", json!({"effort": "huge"}), "reasoning.effort"),
            (
                "text",
                json!({"format": {"type": "yaml"}}),
                "text.format.type",
            ),
            ("tool_choice", json!("sometimes"), "tool_choice"),
            (
                "input",
                json!([{"role": "user", "content": [{"type": "input_image"}]}]),
                "input[0].content[0].type",
            ),
        ] {
            let mut body =
                json!({"model": "m", "input": "hi", "tools": [{"type": "function", "name": "f"}]});
            body[field] = value;
            let Err(ApiError::InvalidRequest { param: got, .. }) = request(&body) else {
                panic!("{field} accepted");
            };
            assert_eq!(got.as_deref(), Some(param));
        }
    }
}
