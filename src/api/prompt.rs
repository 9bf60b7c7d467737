//! From chat messages to prompt tokens, shared by the chat route and the shell loop: tools into
//! the model's template, or the generic tool format for templates that do not render tools, then
//! tokenized. Knows nothing of either caller.
//!
//! Rendering and tokenizing a 16 MiB prompt takes seconds of CPU, so both run on the blocking
//! pool ([`tokens_off_runtime`]), never on a runtime worker: two such requests used to stall every
//! other connection, `/health` included, for as long.

use std::sync::Arc;

use serde_json::{json, Value};

use super::error::ApiError;
use super::state::Loaded;
use crate::engine::Token;
use crate::template::{RenderContext, TemplateError};
use crate::tools::parse::ToolFormat;
use crate::tools::ToolRequest;

/// For templates that do not render tools: the history in the generic format. Calls become
/// `<tool_call>` blocks in the assistant's text, results become `<tool_response>` user turns, and
/// the tool instructions join the system message.
fn generic_history(messages: &mut Vec<Value>, tools: Option<&ToolRequest>) {
    for message in messages.iter_mut() {
        let role = message["role"].as_str().unwrap_or("").to_owned();
        if role == "assistant" {
            if let Some(Value::Array(calls)) = message.get("tool_calls").cloned() {
                let mut text = message["content"].as_str().unwrap_or("").to_owned();
                for call in &calls {
                    let name = call
                        .pointer("/function/name")
                        .cloned()
                        .unwrap_or(Value::Null);
                    let arguments = call
                        .pointer("/function/arguments")
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    if !text.is_empty() && !text.ends_with('\n') {
                        text.push('\n');
                    }
                    text.push_str(&format!(
                        "<tool_call>\n{}\n</tool_call>",
                        json!({"name": name, "arguments": arguments})
                    ));
                }
                message["content"] = json!(text);
                if let Some(object) = message.as_object_mut() {
                    object.remove("tool_calls");
                }
            }
        } else if role == "tool" {
            let result = message["content"].as_str().unwrap_or("").to_owned();
            *message = json!({"role": "user", "content": format!("<tool_response>\n{result}\n</tool_response>")});
        }
    }
    if let Some(tools) = tools {
        add_to_system(messages, &tools.generic_instructions());
    }
}

/// The rendered prompt (tools into the template, or the generic format) and its tokens.
/// Appends `text` to the system message (one is added first when there is none).
fn add_to_system(messages: &mut Vec<Value>, text: &str) {
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let current = first["content"].as_str().unwrap_or("").to_owned();
            first["content"] = json!(format!("{current}\n\n{text}"));
        }
        _ => messages.insert(0, json!({"role": "system", "content": text})),
    }
}

/// The tool section DeepSeek V3.1's model card puts in the system prompt (its template lists no
/// tools), in the card's words.
fn deepseek_tools_section(tools: &ToolRequest) -> String {
    let mut text = String::from("## Tools\nYou have access to the following tools:\n");
    for tool in tools.template_tools().as_array().into_iter().flatten() {
        let function = &tool["function"];
        text.push_str(&format!(
            "\n### {}\nDescription: {}\n\nParameters: {}\n",
            function["name"].as_str().unwrap_or(""),
            function["description"].as_str().unwrap_or(""),
            function["parameters"]
        ));
    }
    text.push_str(
        "\nIMPORTANT: ALWAYS adhere to this exact format for tool use:\n\
         <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments\
         <｜tool▁call▁end｜>{{additional_tool_calls}}<｜tool▁calls▁end｜>\n\n\
         Where:\n\n\
         - `tool_call_name` must be an exact match to one of the available tools\n\
         - `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema\n\
         - For multiple tool calls, chain them directly without separators or spaces",
    );
    text
}

fn render_and_tokenize(
    loaded: &Loaded,
    mut messages: Vec<Value>,
    tools: Option<&ToolRequest>,
    extra: serde_json::Map<String, Value>,
) -> Result<(String, Vec<Token>), ApiError> {
    // A template that writes a family's call syntax renders calls in history itself even when
    // it does not list the tools (DeepSeek V3.1's): the generic format would teach the model a
    // syntax its parser does not read.
    let own_syntax = tools.is_some_and(|t| t.format != ToolFormat::Generic);
    let template_tools = if loaded.template.knows_tools() || own_syntax {
        if !loaded.template.knows_tools() {
            if let Some(tools) = tools.filter(|t| t.format == ToolFormat::Deepseek) {
                add_to_system(&mut messages, &deepseek_tools_section(tools));
            }
        }
        tools.map(ToolRequest::template_tools)
    } else {
        generic_history(&mut messages, tools);
        None
    };
    let prompt = loaded
        .template
        .render(&RenderContext {
            messages,
            tools: template_tools,
            add_generation_prompt: true,
            bos_token: loaded.info.bos_token.clone(),
            eos_token: loaded.info.eos_token.clone(),
            extra,
        })
        .map_err(|err| match err {
            TemplateError::Render(message) => ApiError::invalid("messages", message),
            TemplateError::Syntax(message) => ApiError::Internal(message),
        })?;
    let bos = &loaded.info.bos_token;
    let add_bos = bos.is_empty() || !prompt.starts_with(bos.as_str());
    let tokens = loaded.info.tokenizer.tokenize(&prompt, add_bos);
    Ok((prompt, tokens))
}

fn prompt_tokens(
    loaded: &Loaded,
    messages: Vec<Value>,
    tools: Option<&ToolRequest>,
) -> Result<Vec<Token>, ApiError> {
    render_and_tokenize(loaded, messages, tools, Default::default()).map(|(_, tokens)| tokens)
}

/// The rendered prompt and its tokens, on the blocking pool (`/apply-template`, `input_tokens`).
/// `extra`: more template variables (`reasoning_effort`, `chat_template_kwargs`).
pub async fn rendered_off_runtime(
    loaded: Arc<Loaded>,
    messages: Vec<Value>,
    tools: Option<ToolRequest>,
    extra: serde_json::Map<String, Value>,
) -> Result<(String, Vec<Token>), ApiError> {
    tokio::task::spawn_blocking(move || {
        render_and_tokenize(&loaded, messages, tools.as_ref(), extra)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("the prompt task failed: {e}")))?
}

/// [`prompt_tokens`] on the blocking pool.
pub async fn tokens_off_runtime(
    loaded: Arc<Loaded>,
    messages: Vec<Value>,
    tools: Option<ToolRequest>,
) -> Result<Vec<Token>, ApiError> {
    tokio::task::spawn_blocking(move || prompt_tokens(&loaded, messages, tools.as_ref()))
        .await
        .map_err(|e| ApiError::Internal(format!("the prompt task failed: {e}")))?
}

/// Tokenizes `text` on the blocking pool (`add_bos` as [`crate::engine::TokenizeText`]).
pub async fn tokenize_off_runtime(
    loaded: Arc<Loaded>,
    text: String,
    add_bos: bool,
) -> Result<Vec<Token>, ApiError> {
    tokio::task::spawn_blocking(move || loaded.info.tokenizer.tokenize(&text, add_bos))
        .await
        .map_err(|e| ApiError::Internal(format!("the tokenizer task failed: {e}")))
}
