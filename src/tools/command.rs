//! `lm-sandbox tools parse`: raw model output on stdin, the OpenAI assistant message on stdout, so
//! a user can see why a model's call did or did not parse.

use std::io::Read as _;

use anyhow::Context as _;
use serde_json::{json, Value};

use super::parse::{parse, ToolFormat};
use super::{call_id, ToolRequest};
use crate::cli::{FormatChoice, ToolsParseArgs};

pub fn parse_command(args: &ToolsParseArgs) -> anyhow::Result<()> {
    let mut raw = String::new();
    std::io::stdin()
        .read_to_string(&mut raw)
        .context("reading the model output from stdin")?;
    let template = match &args.template {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let format = match args.format {
        FormatChoice::Auto => template
            .as_deref()
            .map_or(ToolFormat::Generic, ToolFormat::detect),
        FormatChoice::Hermes => ToolFormat::Hermes,
        FormatChoice::QwenXml => ToolFormat::QwenXml,
        FormatChoice::Glm => ToolFormat::Glm,
        FormatChoice::Kimi => ToolFormat::Kimi,
        FormatChoice::Llama4 => ToolFormat::Llama4,
        FormatChoice::Harmony => ToolFormat::Harmony,
        FormatChoice::FunctionGemma => ToolFormat::FunctionGemma,
        FormatChoice::Gemma4 => ToolFormat::Gemma4,
        FormatChoice::KimiK3 => ToolFormat::KimiK3,
        FormatChoice::Deepseek => ToolFormat::Deepseek,
        FormatChoice::Llama3 => ToolFormat::Llama3,
        FormatChoice::Mistral => ToolFormat::Mistral,
        FormatChoice::Generic => ToolFormat::Generic,
    };
    let opened = args
        .generation_prompt
        .as_deref()
        .map(|p| p.replace("\\n", "\n"))
        .and_then(|p| super::parse::opened_reasoning(&p));
    if let Some(open) = opened {
        raw.insert_str(0, open);
    }
    let parsed = parse(&raw, format);
    let (message, has_calls) = match &args.tools {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let tools: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let mut request = ToolRequest::from_request(Some(&tools), None, None, "")
                .map_err(|e| anyhow::anyhow!("{}: {}: {e}", path.display(), e.param))?
                .context("no tools in the file")?;
            request.format = format;
            request.finish_whole(&raw, false)
        }
        None => {
            let message = super::AssistantMessage {
                content: parsed.content.clone(),
                reasoning: parsed.reasoning.clone(),
                tool_calls: parsed
                    .calls
                    .iter()
                    .map(|c| super::ToolCall {
                        id: call_id(format),
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    })
                    .collect(),
            };
            let has_calls = !message.tool_calls.is_empty();
            (message, has_calls)
        }
    };
    let report = json!({
        "format": format.name(),
        "message": message.to_json(),
        "finish_reason": if has_calls { "tool_calls" } else { "stop" },
        "problem": parsed.problem,
        "repairs": parsed.repairs,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
