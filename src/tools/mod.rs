//! Tool calling and structured output: the request's tools and `tool_choice` checked, tools put into
//! the prompt (the model's own template, or the generic format for templates without tool
//! support), grammars that force a call or a JSON shape, and raw output turned into an OpenAI
//! assistant message.
//!
//! Must not: fail a request because the model wrote a bad call. Output that does not parse or does
//! not match a tool's schema comes back as content with `finish_reason: "stop"`, and the reason is
//! logged.

pub mod command;
mod families;
mod markers;
pub mod parse;
pub mod schema;
pub mod stream;

pub use markers::{gbnf_escaped, markers_as_tokens, CALL_MARKERS};

use serde_json::{json, Map, Value};

pub use parse::{ParsedCall, ToolFormat};
use schema::{GrammarBuilder, SchemaError};

/// A request mistake about tools, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ToolError {
    pub param: String,
    pub message: String,
}

fn tool_error(param: impl Into<String>, message: impl Into<String>) -> ToolError {
    ToolError {
        param: param.into(),
        message: message.into(),
    }
}

/// One function tool the client declared.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

/// The tools of one request, checked.
#[derive(Debug, Clone)]
pub struct ToolRequest {
    pub tools: Vec<ToolSpec>,
    pub choice: ToolChoice,
    pub parallel: bool,
    pub format: ToolFormat,
    /// The reasoning tag the prompt itself opened (a template that ends its generation prompt
    /// with `<think>`): the output starts inside reasoning, without the tag.
    pub opened: Option<&'static str>,
}

/// A call as the client gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// `call_` and 24 random characters.
    pub id: String,
    pub name: String,
    /// The arguments object, structured; [`ToolCall::arguments_text`] is OpenAI's string.
    pub arguments: Value,
}

impl ToolCall {
    /// The arguments as JSON text, as OpenAI's `function.arguments` carries them.
    pub fn arguments_text(&self) -> String {
        self.arguments.to_string()
    }
}

/// The assistant's reply.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AssistantMessage {
    pub content: Option<String>,
    pub reasoning: Option<String>,
    pub tool_calls: Vec<ToolCall>,
}

impl AssistantMessage {
    /// OpenAI's `message` object.
    pub fn to_json(&self) -> Value {
        let mut message = json!({
            "role": "assistant",
            "content": self.content,
            "refusal": null,
        });
        if let Some(reasoning) = &self.reasoning {
            message["reasoning_content"] = json!(reasoning);
        }
        if !self.tool_calls.is_empty() {
            message["tool_calls"] = Value::Array(
                self.tool_calls
                    .iter()
                    .map(|c| {
                        json!({"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments_text()}})
                    })
                    .collect(),
            );
        }
        message
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn schema_error(param: &str, e: SchemaError) -> ToolError {
    tool_error(param, e.to_string())
}

impl ToolRequest {
    /// For a request without tools whose template knows reasoning (`<think>`, `[THINK]`): no
    /// tools, nothing forced, but the reply is parsed so reasoning reaches `reasoning_content`
    /// (Ollama's `thinking`), never `content`.
    pub fn reasoning_only(template_source: &str) -> Option<Self> {
        parse::knows_reasoning(template_source).then(|| Self {
            tools: Vec::new(),
            choice: ToolChoice::None,
            parallel: false,
            format: ToolFormat::detect(template_source),
            opened: None,
        })
    }

    /// Checks `tools`, `tool_choice` and `parallel_tool_calls`. `None` when there are no tools
    /// (or `tool_choice` is `none`: the model is then not told about them).
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
        template_source: &str,
    ) -> Result<Option<Self>, ToolError> {
        let list = match tools {
            None | Some(Value::Null) => {
                if let Some(choice) = tool_choice.filter(|c| !c.is_null()) {
                    if choice != "none" && choice != "auto" {
                        return Err(tool_error(
                            "tool_choice",
                            "`tool_choice` needs `tools` (none were given)",
                        ));
                    }
                }
                return Ok(None);
            }
            Some(Value::Array(list)) => list,
            Some(_) => return Err(tool_error("tools", "`tools` must be an array")),
        };
        let mut specs = Vec::with_capacity(list.len());
        for (i, tool) in list.iter().enumerate() {
            specs.push(spec(tool, i)?);
        }
        for (i, a) in specs.iter().enumerate() {
            if specs[..i].iter().any(|b| b.name == a.name) {
                return Err(tool_error(
                    format!("tools[{i}].function.name"),
                    format!("two tools are named `{}`", a.name),
                ));
            }
        }
        let choice = match tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(tool_error(
                        "tool_choice",
                        format!("`tool_choice` must be \"none\", \"auto\", \"required\" or a function; got \"{other}\""),
                    ))
                }
            },
            Some(Value::Object(o)) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        tool_error(
                            "tool_choice.function.name",
                            "a named `tool_choice` is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !specs.iter().any(|s| s.name == name) {
                    return Err(tool_error(
                        "tool_choice.function.name",
                        format!("`tool_choice` names `{name}`, which is not in `tools`"),
                    ));
                }
                ToolChoice::Named(name.to_owned())
            }
            Some(_) => return Err(tool_error("tool_choice", "`tool_choice` must be a string or an object")),
        };
        if specs.is_empty() {
            if matches!(choice, ToolChoice::Required | ToolChoice::Named(_)) {
                return Err(tool_error(
                    "tools",
                    "`tool_choice` requires a call but `tools` is empty",
                ));
            }
            return Ok(None);
        }
        if choice == ToolChoice::None {
            return Ok(None);
        }
        Ok(Some(Self {
            tools: specs,
            choice,
            parallel: parallel.unwrap_or(true),
            format: ToolFormat::detect(template_source),
            opened: None,
        }))
    }

    /// The tools as the template's `tools` variable (OpenAI's shape, as Hugging Face templates
    /// expect).
    pub fn template_tools(&self) -> Value {
        Value::Array(self.tools.iter().map(tool_json).collect())
    }

    /// For templates without tool support: the instructions that go into the system message.
    pub fn generic_instructions(&self) -> String {
        let mut text = String::from(
            "You can call these tools. Each is described by a JSON schema of its arguments:\n<tools>\n",
        );
        for tool in &self.tools {
            text.push_str(&tool_json(tool).to_string());
            text.push('\n');
        }
        text.push_str(
            "</tools>\nTo call a tool, reply with only this, once per call:\n<tool_call>\n\
             {\"name\": \"<tool name>\", \"arguments\": {<the arguments as JSON>}}\n</tool_call>\n\
             When no tool is needed, answer normally.",
        );
        text
    }

    /// One GBNF piece per required argument of `tool`, in the schema's order: `string_rule` for
    /// string properties when given, else the JSON grammar of the property's schema; `piece(key,
    /// value)` writes the family's syntax (keys lose quotes and backslashes, as GBNF literals).
    fn required_arguments(
        g: &mut GrammarBuilder,
        tool: &ToolSpec,
        param: &str,
        string_rule: Option<&str>,
        piece: impl Fn(&str, &str) -> String,
    ) -> Result<Vec<String>, ToolError> {
        let required = tool.parameters["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        let mut parts = Vec::new();
        for key in required {
            let property = &tool.parameters["properties"][key];
            let at = format!("{param}.properties.{key}");
            let value = match string_rule {
                Some(rule) if property["type"] == "string" => rule.to_owned(),
                _ => g.schema(property, &at).map_err(|e| schema_error(&at, e))?,
            };
            parts.push(piece(&key.replace(['"', '\\'], ""), &value));
        }
        Ok(parts)
    }

    /// The grammar that forces a call, for `required` and a named choice; `None` for `auto`.
    pub fn grammar(&self) -> Result<Option<String>, ToolError> {
        let allowed: Vec<&ToolSpec> = match &self.choice {
            ToolChoice::Auto | ToolChoice::None => return Ok(None),
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let arguments_key = match self.format {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        };
        let mut g = GrammarBuilder::new();
        let mut calls = Vec::new();
        // Kimi K3 writes each argument's JSON type in its tag.
        let k3_type = (self.format == ToolFormat::KimiK3).then(|| {
            g.rule(
                "k3-type",
                r#""string" | "number" | "integer" | "boolean" | "object" | "array" | "null""#
                    .to_owned(),
            )
        });
        if matches!(self.format, ToolFormat::QwenXml | ToolFormat::Glm) {
            return self.xml_grammar(&allowed, g).map(Some);
        }
        for tool in allowed {
            let index = self
                .tools
                .iter()
                .position(|t| t.name == tool.name)
                .unwrap_or(0);
            let param = format!("tools[{index}].function.parameters");
            // The keyword-argument families build their arguments key by key instead.
            let args = if matches!(
                self.format,
                ToolFormat::FunctionGemma
                    | ToolFormat::Gemma4
                    | ToolFormat::Llama4
                    | ToolFormat::KimiK3
            ) {
                String::new()
            } else {
                g.schema(&tool.parameters, &param)
                    .map_err(|e| schema_error(&param, e))?
            };
            // Names are `[A-Za-z0-9_-]` (checked): a plain GBNF literal.
            let name = &tool.name;
            let body = match self.format {
                ToolFormat::Kimi => format!(
                    r#""<|tool_call_begin|>functions.{name}:0<|tool_call_argument_begin|>" {args} "<|tool_call_end|>""#
                ),
                ToolFormat::Deepseek => format!(
                    r#""<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>" {args} "<｜tool▁call▁end｜>""#
                ),
                // Arguments in FunctionGemma's own syntax: required keys in order, strings
                // between `<escape>`s, other values as JSON.
                ToolFormat::FunctionGemma => {
                    let parts = Self::required_arguments(
                        &mut g,
                        tool,
                        &param,
                        Some(r#""<escape>" [^<]* "<escape>""#),
                        |key, value| format!(r#""{key}:" {value}"#),
                    )?;
                    let arguments = if parts.is_empty() {
                        String::new()
                    } else {
                        parts.join(r#" "," "#)
                    };
                    format!(
                        r#""<start_function_call>call:{name}{{" {arguments} "}}<end_function_call>""#
                    )
                }
                // Gemma 4: FunctionGemma's syntax between its own tokens.
                ToolFormat::Gemma4 => {
                    let parts = Self::required_arguments(
                        &mut g,
                        tool,
                        &param,
                        Some(r#""<|\"|>" [^<]* "<|\"|>""#),
                        |key, value| format!(r#""{key}:" {value}"#),
                    )?;
                    format!(
                        r#""<|tool_call>call:{name}{{" {} "}}<tool_call|>""#,
                        if parts.is_empty() {
                            String::new()
                        } else {
                            parts.join(r#" "," "#)
                        }
                    )
                }
                // Kimi K3: an argument tag per required key, typed as its template types it.
                ToolFormat::KimiK3 => {
                    let parts = Self::required_arguments(
                        &mut g,
                        tool,
                        &param,
                        Some("[^<]*"),
                        |key, value| {
                            format!(
                                r#""<|open|>argument key=\"{key}\" type=\"" {} "\"<|sep|>" {value} "<|close|>argument<|sep|>""#,
                                k3_type.as_deref().unwrap_or("\"string\"")
                            )
                        },
                    )?;
                    format!(
                        r#""<|open|>call tool=\"{name}\" index=\"" [1-9] [0-9]* "\"<|sep|>" {} "<|close|>call<|sep|>""#,
                        parts.join(" ")
                    )
                }
                ToolFormat::Harmony => format!(
                    r#""<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>" {args}"#
                ),
                // Keyword arguments whose values are JSON (Python reads the same literals but
                // `true`/`false`/`null`, which the parser also takes).
                ToolFormat::Llama4 => {
                    let parts =
                        Self::required_arguments(&mut g, tool, &param, None, |key, value| {
                            format!(r#""{key}=" {value}"#)
                        })?;
                    format!(r#""{name}(" {} ")""#, parts.join(r#" ", " "#))
                }
                _ => format!(
                    r#""{{" ws "\"name\"" ws ":" ws {} ws "," ws {} ws ":" ws {args} ws "}}""#,
                    schema::literal(&json!(tool.name)),
                    schema::literal(&json!(arguments_key)),
                ),
            };
            calls.push(g.rule(&format!("call-{}", tool.name), body));
        }
        let call = g.rule("call", calls.join(" | "));
        // A named choice is one call to that function (as OpenAI's); `required` may make several
        // when parallel calls are allowed.
        let several = self.parallel && self.choice == ToolChoice::Required;
        // Each family's list of calls: what opens it, what separates two calls, what closes it
        // (GBNF fragments), around the call itself or a block wrapping it.
        let item = match self.format {
            ToolFormat::Hermes | ToolFormat::Generic => g.rule(
                "block",
                format!(r#""<tool_call>" ws {call} ws "</tool_call>""#),
            ),
            _ => call,
        };
        let (open, separator, close) = match self.format {
            ToolFormat::QwenXml | ToolFormat::Glm => unreachable!("built by xml_grammar"),
            ToolFormat::Hermes | ToolFormat::Generic => ("", "ws", ""),
            ToolFormat::Llama3 => ("", r#"";" ws"#, ""),
            ToolFormat::Llama4 => (r#""[""#, r#"", ""#, r#""]""#),
            ToolFormat::Mistral => (r#""[TOOL_CALLS][" ws"#, r#"ws "," ws"#, r#"ws "]""#),
            ToolFormat::Kimi => (
                r#""<|tool_calls_section_begin|>""#,
                "",
                r#""<|tool_calls_section_end|>""#,
            ),
            ToolFormat::Deepseek => (
                r#""<｜tool▁calls▁begin｜>""#,
                "",
                r#""<｜tool▁calls▁end｜>""#,
            ),
            ToolFormat::FunctionGemma | ToolFormat::Gemma4 | ToolFormat::Harmony => ("", "", ""),
            ToolFormat::KimiK3 => (
                r#""<|open|>tools<|sep|>""#,
                "",
                r#""<|close|>tools<|sep|>""#,
            ),
        };

        // Harmony's `<|call|>` ends the turn: one call.
        let list = if several && self.format != ToolFormat::Harmony {
            format!("{item} ( {separator} {item} )*")
        } else {
            item
        };
        let root = [open, list.as_str(), close]
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let grammar = g
            .finish_checked(&root, "tool_choice")
            .map_err(|e| schema_error("tool_choice", e))?;
        Ok(Some(grammar))
    }

    /// The forcing grammar in Qwen's XML or GLM's tags: each required parameter of the tool's
    /// schema in order (strings as text without `<`, other values as JSON of their schema).
    fn xml_grammar(
        &self,
        allowed: &[&ToolSpec],
        mut g: GrammarBuilder,
    ) -> Result<String, ToolError> {
        let text = g.rule("xml-text", r#"[^<]*"#.to_owned());
        let mut calls = Vec::new();
        for tool in allowed {
            let index = self
                .tools
                .iter()
                .position(|t| t.name == tool.name)
                .unwrap_or(0);
            let glm = self.format == ToolFormat::Glm;
            let name = &tool.name;
            let mut parts = vec![if glm {
                format!(r#""{name}\n""#)
            } else {
                format!(r#""<function={name}>\n""#)
            }];
            let text_rule = text.clone();
            parts.extend(Self::required_arguments(
                &mut g,
                tool,
                &format!("tools[{index}].function.parameters"),
                Some(&text_rule),
                |key, value| {
                    if glm {
                        format!(
                            r#""<arg_key>{key}</arg_key>\n<arg_value>" {value} "</arg_value>\n""#
                        )
                    } else {
                        format!(r#""<parameter={key}>\n" {value} "\n</parameter>\n""#)
                    }
                },
            )?);
            if !glm {
                parts.push(r#""</function>""#.to_owned());
            }
            calls.push(g.rule(&format!("call-{}", tool.name), parts.join(" ")));
        }
        let call = g.rule("call", calls.join(" | "));
        let block = if self.format == ToolFormat::Glm {
            g.rule("block", format!(r#""<tool_call>" {call} "</tool_call>""#))
        } else {
            g.rule(
                "block",
                format!(r#""<tool_call>\n" {call} "\n</tool_call>""#),
            )
        };
        let root = if self.parallel && self.choice == ToolChoice::Required {
            format!(r#"{block} ( "\n" {block} )*"#)
        } else {
            block
        };
        g.finish_checked(&root, "tool_choice")
            .map_err(|e| schema_error("tool_choice", e))
    }

    /// Every tool's schema checked against the supported subset, so a bad one is a 400 in any mode.
    pub fn check_schemas(&self) -> Result<(), ToolError> {
        for (i, tool) in self.tools.iter().enumerate() {
            let param = format!("tools[{i}].function.parameters");
            GrammarBuilder::new()
                .schema(&tool.parameters, &param)
                .map_err(|e| schema_error(&param, e))?;
        }
        Ok(())
    }

    /// The raw output as the assistant message, and whether it holds calls. Calls to unknown
    /// tools, arguments that do not match their schema, and calls cut off by the token limit all
    /// come back as content (logged), never as an error.
    pub fn finish(&self, raw: &str, truncated: bool) -> (AssistantMessage, bool) {
        match self.opened {
            Some(open) => self.finish_whole(&format!("{open}{raw}"), truncated),
            None => self.finish_whole(raw, truncated),
        }
    }

    /// [`ToolRequest::finish`] on text that already begins with the tag the prompt opened.
    pub fn finish_whole(&self, raw: &str, truncated: bool) -> (AssistantMessage, bool) {
        let parsed = parse::parse(raw, self.format);
        let mut message = AssistantMessage {
            content: parsed.content.clone(),
            reasoning: parsed.reasoning.clone(),
            tool_calls: Vec::new(),
        };
        let as_content = |message: &mut AssistantMessage, why: &str| {
            tracing::warn!(
                format = self.format.name(),
                why,
                "tool call returned as content"
            );
            message.content = parse::split(raw)
                .body
                .filter(|b| !b.trim().is_empty())
                .map(str::to_owned);
        };
        if let Some(problem) = &parsed.problem {
            tracing::warn!(
                format = self.format.name(),
                problem,
                "tool call did not parse; returned as content"
            );
            return (message, false);
        }
        if parsed.calls.is_empty() {
            return (message, false);
        }
        if truncated {
            // The calls that parsed are complete (a call cut off mid-way does not parse, and a
            // last one cut off after complete ones is dropped by the parser): they are kept.
            tracing::info!(
                calls = parsed.calls.len(),
                "the output was cut off by the token limit after complete calls"
            );
        }
        for repair in &parsed.repairs {
            tracing::info!(format = self.format.name(), repair, "tool call repaired");
        }
        let mut calls = parsed.calls;
        if matches!(self.format, ToolFormat::QwenXml | ToolFormat::Glm) {
            // Qwen's XML and GLM write every value as text: the tool's schema says what it is.
            for call in &mut calls {
                if let Some(tool) = self.tools.iter().find(|t| t.name == call.name) {
                    call.arguments = parse::type_by_schema(&call.arguments, &tool.parameters);
                }
            }
        }
        if !self.parallel && calls.len() > 1 {
            tracing::info!(
                dropped = calls.len() - 1,
                "parallel_tool_calls is false: kept the first call"
            );
            calls.truncate(1);
        }
        for call in &calls {
            if let Err(why) = self.check_call(call) {
                as_content(&mut message, &why);
                return (message, false);
            }
        }
        message.tool_calls = calls
            .into_iter()
            .map(|c| ToolCall {
                id: call_id(self.format),
                name: c.name,
                arguments: c.arguments,
            })
            .collect();
        (message, true)
    }

    fn check_call(&self, call: &ParsedCall) -> Result<(), String> {
        let Some(tool) = self.tools.iter().find(|t| t.name == call.name) else {
            return Err(format!("`{}` is not one of the tools", call.name));
        };
        if let ToolChoice::Named(name) = &self.choice {
            if name != &call.name {
                return Err(format!(
                    "`{}` is not the tool `tool_choice` names",
                    call.name
                ));
            }
        }
        schema::validate(&tool.parameters, &call.arguments, "arguments")
            .map_err(|e| format!("`{}`: {e}", call.name))
    }
}

/// A tool in OpenAI's request shape.
pub fn tool_json(tool: &ToolSpec) -> Value {
    let mut function = Map::new();
    function.insert("name".into(), json!(tool.name));
    if let Some(description) = &tool.description {
        function.insert("description".into(), json!(description));
    }
    function.insert("parameters".into(), tool.parameters.clone());
    json!({"type": "function", "function": function})
}

fn spec(tool: &Value, i: usize) -> Result<ToolSpec, ToolError> {
    let at = format!("tools[{i}]");
    let kind = tool.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(tool_error(
            format!("{at}.type"),
            format!("only tools of type \"function\" are supported; got {kind:?}"),
        ));
    }
    let function = tool
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| tool_error(format!("{at}.function"), "a tool needs a `function` object"))?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| tool_error(format!("{at}.function.name"), "a function needs a `name`"))?;
    if !valid_name(name) {
        return Err(tool_error(
            format!("{at}.function.name"),
            format!("`{name}`: names are 1 to 64 of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(tool_error(
                format!("{at}.function.description"),
                "`description` must be a string",
            ))
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(tool_error(
                format!("{at}.function.parameters"),
                "`parameters` must be a JSON Schema object",
            ))
        }
    };
    Ok(ToolSpec {
        name: name.to_owned(),
        description,
        parameters,
    })
}

/// `call_` and 24 alphanumerics, as OpenAI's ids look.
/// A new call id: OpenAI's shape (`call_` and 24 characters), except for Mistral, whose templates
/// refuse any id in the history that is not 9 alphanumeric characters (as Mistral's own API
/// writes them).
pub fn call_id(format: ToolFormat) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    let mut rng = rand::thread_rng();
    match format {
        ToolFormat::Mistral => Alphanumeric.sample_string(&mut rng, 9),
        _ => format!("call_{}", Alphanumeric.sample_string(&mut rng, 24)),
    }
}

/// The grammar for `response_format`: any JSON object, or one matching a schema.
pub fn response_format_grammar(format: &Value) -> Result<Option<String>, ToolError> {
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(GrammarBuilder::new().finish("object"))),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .ok_or_else(|| {
                    tool_error(
                        "response_format.json_schema.schema",
                        "a `json_schema` response format needs `json_schema.schema`",
                    )
                })?;
            let param = "response_format.json_schema.schema";
            let mut g = GrammarBuilder::new();
            let root = g.schema(schema, param).map_err(|e| schema_error(param, e))?;
            let grammar = g
                .finish_checked(&root, param)
                .map_err(|e| schema_error(param, e))?;
            Ok(Some(grammar))
        }
        other => Err(tool_error(
            "response_format.type",
            format!("`response_format.type` must be \"text\", \"json_object\" or \"json_schema\"; got {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests;
