//! `lm-sandbox tools parse` as a user runs it: raw output on stdin, a message on stdout.

mod common;

use common::tools_parse as parse;

#[test]
fn parse_prints_the_message_or_says_why_not() {
    let report = parse(
        &["--format", "llama3"],
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Rome\"}}",
    );
    assert_eq!(report["finish_reason"], "tool_calls");
    let call = &report["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Rome\"}");

    let report = parse(
        &[],
        "<tool_call>{\"name\": \"x\", \"arguments\": [1]}</tool_call>",
    );
    assert_eq!(report["format"], "generic");
    assert_eq!(report["finish_reason"], "stop");
    assert!(report["problem"]
        .as_str()
        .unwrap()
        .contains("arguments must be a JSON object"));

    let dir = std::env::temp_dir().join(format!("lm-sandbox-tools-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("template.jinja");
    std::fs::write(
        &template,
        "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]",
    )
    .unwrap();
    let tools = dir.join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]"#,
    )
    .unwrap();
    let report = parse(
        &[
            "--template",
            template.to_str().unwrap(),
            "--tools",
            tools.to_str().unwrap(),
        ],
        "[TOOL_CALLS]search[ARGS]{\"q\": 5}",
    );
    assert_eq!(report["format"], "mistral");
    assert_eq!(
        report["finish_reason"], "stop",
        "the arguments do not match the schema"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
