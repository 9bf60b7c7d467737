//! Each family's published chat template (`tests/fixtures/templates/`, sources and licences in
//! its README): the family detected from it, and a conversation with tools, a call and its result
//! rendered with reasoning on and off, against golden files. `LM_SANDBOX_BLESS=1 cargo test
//! --test templates` rewrites the golden files (review the diff). `lm-sandbox tools parse --format
//! auto --template F` picks the family and parses a call in its syntax.

mod common;

use std::path::{Path, PathBuf};

use lm_sandbox::template::{ChatTemplate, RenderContext};
use lm_sandbox::tools::parse::ToolFormat;
use serde_json::{json, Map, Value};

/// A template file, its family, what a rendered call looks like in it, and a raw output with a
/// call in its syntax.
struct Case {
    file: &'static str,
    family: &'static str,
    /// Whether the template lists the tools (DeepSeek V3.1's leaves that to the system prompt).
    lists_tools: bool,
    call_marker: &'static str,
    output: &'static str,
}

const CASES: &[Case] = &[
    Case {
        file: "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja",
        family: "hermes",
        lists_tools: true,
        call_marker: "<tool_call>",
        output: "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    },
    Case {
        file: "Qwen-Qwen3-0.6B.jinja",
        family: "hermes",
        lists_tools: true,
        call_marker: "<tool_call>",
        output: "<think>\nThe tool knows.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    },
    Case {
        file: "Qwen3-Coder.jinja",
        family: "qwen-xml",
        lists_tools: true,
        call_marker: "<function=get_weather>",
        output: "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    },
    Case {
        file: "GLM-4.6.jinja",
        family: "glm",
        lists_tools: true,
        call_marker: "<arg_key>city</arg_key>",
        output: "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
    },
    Case {
        file: "Kimi-K2-Instruct.jinja",
        family: "kimi",
        lists_tools: true,
        call_marker: "<|tool_call_begin|>",
        output: "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>",
    },
    Case {
        file: "Kimi-K3.jinja",
        family: "kimi-k3",
        lists_tools: true,
        call_marker: "<|open|>call tool=\"get_weather\"",
        output: "<|open|>response<|sep|><|close|>response<|sep|><|open|>tools<|sep|><|open|>call tool=\"get_weather\" index=\"1\"<|sep|><|open|>argument key=\"city\" type=\"string\"<|sep|>Paris<|close|>argument<|sep|><|close|>call<|sep|><|close|>tools<|sep|><|close|>message<|sep|>",
    },
    Case {
        file: "deepseek-ai-DeepSeek-V3.1.jinja",
        family: "deepseek",
        lists_tools: false,
        call_marker: "<｜tool▁call▁begin｜>get_weather",
        output: "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    },
    Case {
        file: "meta-llama-Llama-3.1-8B-Instruct.jinja",
        family: "llama3",
        lists_tools: true,
        call_marker: "\"name\": \"get_weather\"",
        output: "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
    },
    Case {
        file: "openai-gpt-oss-120b.jinja",
        family: "harmony",
        lists_tools: true,
        call_marker: "to=functions.get_weather",
        output: "<|channel|>analysis<|message|>The tool knows.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",
    },
    Case {
        file: "mistralai-Mistral-Nemo-Instruct-2407.jinja",
        family: "mistral",
        lists_tools: true,
        call_marker: "[TOOL_CALLS]",
        output: "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]",
    },
    Case {
        file: "google-gemma-4-31B-it.jinja",
        family: "gemma4",
        lists_tools: true,
        call_marker: "<|tool_call>call:get_weather{",
        output: "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>",
    },
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates")
}

fn tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}])
}

/// A conversation with a call and its result. The call id is 9 alphanumeric characters, the only
/// shape Mistral's templates accept (lm-sandbox writes such ids for Mistral models).
fn conversation() -> Value {
    json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "The tool knows.",
         "tool_calls": [{"id": "a1B2c3D4e", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather",
         "content": "{\"temperature_c\": 18}"},
        {"role": "assistant", "content": "18 °C."},
        {"role": "user", "content": "Thanks."}
    ])
}

/// Renders the conversation with the variables each family reads for reasoning on or off.
fn render(template: &ChatTemplate, thinking: bool) -> String {
    let mut extra = Map::new();
    extra.insert("enable_thinking".into(), json!(thinking));
    extra.insert("thinking".into(), json!(thinking));
    extra.insert(
        "reasoning_effort".into(),
        json!(if thinking { "high" } else { "low" }),
    );
    template
        .render(&RenderContext {
            messages: conversation(),
            tools: Some(tools()),
            add_generation_prompt: true,
            bos_token: String::new(),
            eos_token: String::new(),
            extra,
        })
        .unwrap_or_else(|e| panic!("rendering: {e}"))
}

/// Templates that print today's date (gpt-oss: `Current date: {{ strftime_now('%Y-%m-%d') }}`)
/// render a different text every day: the date is masked on both sides.
fn mask_dates(text: &str) -> String {
    const LABEL: &str = "Current date: ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(LABEL) {
        let (before, after) = rest.split_at(at + LABEL.len());
        out.push_str(before);
        let date_len = after
            .bytes()
            .take(10)
            .take_while(|b| b.is_ascii_digit() || *b == b'-')
            .count();
        out.push_str("YYYY-MM-DD");
        rest = &after[date_len..];
    }
    out.push_str(rest);
    out
}

fn check_golden(path: &Path, rendered: &str) {
    if std::env::var_os("LM_SANDBOX_BLESS").is_some() {
        std::fs::write(path, rendered).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (LM_SANDBOX_BLESS=1 writes it)", path.display()));
    assert_eq!(
        mask_dates(rendered),
        mask_dates(&golden),
        "{} differs",
        path.display()
    );
}

#[test]
fn every_family_is_detected_from_its_published_template() {
    for case in CASES {
        let source = std::fs::read_to_string(fixtures().join(case.file)).unwrap();
        assert_eq!(
            ToolFormat::detect(&source).name(),
            case.family,
            "{}",
            case.file
        );
    }
}

#[test]
fn every_template_renders_tools_calls_results_and_reasoning_as_its_golden_file() {
    for case in CASES {
        let source = std::fs::read_to_string(fixtures().join(case.file)).unwrap();
        let template = ChatTemplate::new(&source).unwrap_or_else(|e| panic!("{}: {e}", case.file));
        for thinking in [true, false] {
            let rendered = render(&template, thinking);
            // The tool, the call in the family's own syntax, and its result are all there.
            assert_eq!(
                rendered.contains("Current weather in a city"),
                case.lists_tools,
                "{}: {rendered}",
                case.file
            );
            assert!(
                rendered.contains(case.call_marker),
                "{}: {rendered}",
                case.file
            );
            assert!(
                rendered.contains("temperature_c"),
                "{}: {rendered}",
                case.file
            );
            let stem = case.file.trim_end_matches(".jinja");
            let name = format!("{stem}.{}.txt", if thinking { "thinking" } else { "plain" });
            check_golden(&fixtures().join("golden").join(name), &rendered);
        }
    }
}

#[test]
fn tools_parse_auto_picks_the_family_from_the_template() {
    for case in CASES {
        let template = fixtures().join(case.file);
        let parsed = common::tools_parse(
            &["--format", "auto", "--template", template.to_str().unwrap()],
            case.output,
        );
        assert_eq!(parsed["format"], case.family, "{}", case.file);
        let message = &parsed["message"];
        let text = message.to_string();
        let calls = message["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no tool_calls in {text}", case.file));
        assert_eq!(
            calls[0]["function"]["name"], "get_weather",
            "{}: {text}",
            case.file
        );
        let arguments: Value =
            serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(arguments, json!({"city": "Paris"}), "{}", case.file);
    }
}
