use serde_json::{json, Value};

use super::stream::{Delta, ToolStream};
use super::*;

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object",
                       "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                       "required": ["city"]}}},
           {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}])
}

fn request(choice: Value) -> ToolRequest {
    ToolRequest::from_request(Some(&weather_tools()), Some(&choice), None, "<tool_call>")
        .unwrap()
        .unwrap()
}

#[test]
fn tool_choice_forms_and_their_mistakes() {
    assert_eq!(request(json!("auto")).choice, ToolChoice::Auto);
    assert_eq!(request(json!("required")).choice, ToolChoice::Required);
    assert_eq!(
        request(json!({"type": "function", "function": {"name": "get_time"}})).choice,
        ToolChoice::Named("get_time".into())
    );
    let none = ToolRequest::from_request(Some(&weather_tools()), Some(&json!("none")), None, "");
    assert!(none.unwrap().is_none(), "none: tools are not offered");
    let err = ToolRequest::from_request(
        Some(&weather_tools()),
        Some(&json!({"type": "function", "function": {"name": "nope"}})),
        None,
        "",
    )
    .unwrap_err();
    assert_eq!(err.param, "tool_choice.function.name");
    let err = ToolRequest::from_request(None, Some(&json!("required")), None, "").unwrap_err();
    assert_eq!(err.param, "tool_choice");
    let err = ToolRequest::from_request(Some(&json!([{"type": "retrieval"}])), None, None, "")
        .unwrap_err();
    assert_eq!(err.param, "tools[0].type");
    let bad_name = json!([{"type": "function", "function": {"name": "has space"}}]);
    let err = ToolRequest::from_request(Some(&bad_name), None, None, "").unwrap_err();
    assert_eq!(err.param, "tools[0].function.name");
    let bad_schema = json!([{"type": "function", "function": {"name": "f",
        "parameters": {"type": "object", "properties": {"a": {"allOf": []}}}}}]);
    let tools = ToolRequest::from_request(Some(&bad_schema), None, None, "")
        .unwrap()
        .unwrap();
    let err = tools.check_schemas().unwrap_err();
    assert_eq!(err.param, "tools[0].function.parameters");
    assert!(err.message.contains("allOf"), "{}", err.message);
}

#[test]
fn forced_choices_get_a_grammar_and_auto_does_not() {
    assert!(request(json!("auto")).grammar().unwrap().is_none());
    let named = request(json!({"type": "function", "function": {"name": "get_weather"}}))
        .grammar()
        .unwrap()
        .unwrap();
    assert!(named.starts_with("root ::= block-"), "{named}");
    assert!(named.contains(r#""\"get_weather\"""#));
    assert!(!named.contains(r#""\"get_time\"""#), "only the named tool");
    let required = request(json!("required")).grammar().unwrap().unwrap();
    assert!(required.contains(r#""\"get_time\"""#) && required.contains(r#""\"get_weather\"""#));
}

#[test]
fn calls_are_checked_against_the_tools() {
    let tools = request(json!("auto"));
    let (m, calls) = tools.finish(
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}</tool_call>",
        false,
    );
    assert!(calls);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(
        m.tool_calls[0].arguments_text(),
        r#"{"city":"Paris","days":2}"#
    );
    assert!(m.tool_calls[0].id.starts_with("call_") && m.tool_calls[0].id.len() == 29);
    for bad in [
        "<tool_call>{\"name\": \"launch\", \"arguments\": {}}</tool_call>",
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"days\": 2}}</tool_call>",
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"x\", \"days\": 0}}</tool_call>",
    ] {
        let (m, calls) = tools.finish(bad, false);
        assert!(!calls, "{bad}");
        assert_eq!(m.content.as_deref(), Some(bad));
    }
    // Cut off by max_tokens after a complete call: the call stands.
    let complete = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
    let (m, calls) = tools.finish(complete, true);
    assert!(calls, "a complete call is a call");
    assert_eq!(m.tool_calls[0].name, "get_time");
    // A complete call, then a second cut off mid-way: the first is a call, the broken tail content.
    let cut = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"argu";
    let (m, calls) = tools.finish(cut, true);
    assert!(calls, "{m:?}");
    assert_eq!(m.tool_calls.len(), 1);
    assert_eq!(m.tool_calls[0].name, "get_time");
    assert_eq!(
        m.content.as_deref(),
        Some("<tool_call>{\"name\": \"get_weather\", \"argu")
    );
    // Cut off inside the only call: text.
    let only = "<tool_call>{\"name\": \"get_weather\", \"argu";
    let (m, calls) = tools.finish(only, true);
    assert!(!calls);
    assert_eq!(m.content.as_deref(), Some(only));
}

#[test]
fn parallel_false_keeps_one_call() {
    let tools = ToolRequest::from_request(Some(&weather_tools()), None, Some(false), "<tool_call>")
        .unwrap()
        .unwrap();
    let out = "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
    assert_eq!(tools.finish(out, false).0.tool_calls.len(), 1);
}

/// Rebuilds the message a client gets by applying streamed deltas.
fn apply(
    deltas: &[Delta],
    message: &AssistantMessage,
) -> (Option<String>, Option<String>, Vec<(String, Value)>) {
    let mut content: Option<String> = None;
    let mut reasoning: Option<String> = None;
    for d in deltas {
        if let Some(c) = d.content() {
            content.get_or_insert_with(String::new).push_str(c);
        }
        if let Some(r) = d.reasoning() {
            reasoning.get_or_insert_with(String::new).push_str(r);
        }
    }
    let calls = message
        .tool_calls
        .iter()
        .map(|c| {
            assert!(c.id.starts_with("call_"));
            (c.name.clone(), c.arguments.clone())
        })
        .collect();
    (content, reasoning, calls)
}

#[test]
fn streamed_deltas_add_up_to_the_unstreamed_message_at_every_split() {
    let tools = request(json!("auto"));
    let outputs = [
        "Plain answer with <tags> and { braces }.",
        "Checking.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"東京\"}}</tool_call>",
        "<think>need time</think>\n<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
        "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": 3}}</tool_call>",
        "<tool_call>{\"name\": \"get_wea",
        "  \n<think>only thinking</think>The answer is 4.",
        "{\"name\": \"get_time\", \"arguments\": {}}",
    ];
    for out in outputs {
        let (expected, _) = tools.finish(out, false);
        let expected_calls: Vec<(String, Value)> = expected
            .tool_calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        let boundaries: Vec<usize> = (0..=out.len())
            .filter(|&i| out.is_char_boundary(i))
            .collect();
        for &cut in &boundaries {
            let mut stream = ToolStream::new();
            let mut deltas = stream.push(&out[..cut], &tools);
            deltas.extend(stream.push(&out[cut..], &tools));
            let (rest, message, _) = stream.finish(&tools, false);
            deltas.extend(rest);
            let (content, reasoning, calls) = apply(&deltas, &message);
            assert_eq!(content, expected.content, "{out:?} cut at {cut}");
            assert_eq!(reasoning, expected.reasoning, "{out:?} cut at {cut}");
            assert_eq!(calls, expected_calls, "{out:?} cut at {cut}");
            assert!(
                !deltas
                    .iter()
                    .any(|d| d.content().is_some_and(|c| c.contains("<tool_call>")))
                    || expected.tool_calls.is_empty(),
                "no call markup leaks into content: {out:?} cut at {cut}"
            );
        }
        // Byte by byte, too.
        let mut stream = ToolStream::new();
        let mut deltas = Vec::new();
        for i in 1..boundaries.len() {
            deltas.extend(stream.push(&out[boundaries[i - 1]..boundaries[i]], &tools));
        }
        let (rest, message, _) = stream.finish(&tools, false);
        deltas.extend(rest);
        assert_eq!(
            apply(&deltas, &message).0,
            expected.content,
            "{out:?} piece by piece"
        );
    }
}

#[test]
fn response_formats_compile_or_name_what_they_cannot() {
    assert!(response_format_grammar(&json!({"type": "text"}))
        .unwrap()
        .is_none());
    assert!(response_format_grammar(&json!({"type": "json_object"}))
        .unwrap()
        .unwrap()
        .starts_with("root ::= object"));
    let schema = json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true,
        "schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}});
    assert!(response_format_grammar(&schema).unwrap().is_some());
    let bad = json!({"type": "json_schema", "json_schema": {"schema": {"not": {}}}});
    let err = response_format_grammar(&bad).unwrap_err();
    assert!(err.message.contains("`not`"), "{}", err.message);
    assert_eq!(
        response_format_grammar(&json!({"type": "xml"}))
            .unwrap_err()
            .param,
        "response_format.type"
    );
}

/// The markers of Qwen3-Coder's chat template (its tool section), enough to detect the format.
const QWEN_XML_TEMPLATE: &str = "{%- if tools %}<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\nIf you choose to call a function ONLY reply in the following format:\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n</function>\n</tool_call>{%- endif %}";

fn qwen_tools(choice: Option<Value>) -> ToolRequest {
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                           "units": {"type": "object"}},
            "required": ["city", "days"]}}},
        {"type": "function", "function": {"name": "write_file", "parameters": {"type": "object",
            "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
            "required": ["path", "content"]}}}]);
    ToolRequest::from_request(Some(&tools), choice.as_ref(), None, QWEN_XML_TEMPLATE)
        .unwrap()
        .unwrap()
}

#[test]
fn qwen_xml_is_detected_parsed_and_typed_by_the_schema() {
    let tools = qwen_tools(None);
    assert_eq!(tools.format, ToolFormat::QwenXml);
    // As Qwen3-Coder writes it: text before, one value per parameter on its own lines.
    let out = "I'll look that up.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n<parameter=units>\n{\"temp\": \"C\"}\n</parameter>\n</function>\n</tool_call>";
    let (m, calls) = tools.finish(out, false);
    assert!(calls, "{m:?}");
    assert_eq!(m.content.as_deref(), Some("I'll look that up.\n"));
    assert_eq!(m.tool_calls[0].name, "get_weather");
    let args: Value = m.tool_calls[0].arguments.clone();
    assert_eq!(
        args,
        json!({"city": "Paris", "days": 2, "units": {"temp": "C"}})
    );
    // A string stays a string even when it looks like a number or JSON; multi-line values keep
    // their inner newlines.
    let out = "<tool_call>\n<function=write_file>\n<parameter=path>\n007\n</parameter>\n<parameter=content>\n{\"a\": 1}\nline two\n</parameter>\n</function>\n</tool_call>";
    let (m, calls) = tools.finish(out, false);
    assert!(calls);
    let args: Value = m.tool_calls[0].arguments.clone();
    assert_eq!(
        args,
        json!({"path": "007", "content": "{\"a\": 1}\nline two"})
    );
    // Several calls; a last one cut off mid-way is dropped and the first kept.
    let two = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nLy";
    let (m, calls) = tools.finish(two, true);
    assert!(calls);
    assert_eq!(m.tool_calls.len(), 1);
    // Without `<tool_call>` around it (some quantized models drop it) the call still parses.
    let bare = "<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>";
    let (m, calls) = tools.finish(bare, false);
    assert!(calls, "{m:?}");
    // Broken XML is content, never a 500.
    let broken = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</function>";
    let (m, calls) = tools.finish(broken, false);
    assert!(!calls);
    assert_eq!(m.content.as_deref(), Some(broken));
    // Streamed: nothing from a call leaks as content.
    let mut stream = ToolStream::new();
    let mut streamed = String::new();
    let text = "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>";
    for piece in text.as_bytes().chunks(3) {
        for delta in stream.push(std::str::from_utf8(piece).unwrap(), &tools) {
            streamed.push_str(delta.content().unwrap_or(""));
        }
    }
    let (deltas, message, _) = stream.finish(&tools, false);
    for delta in deltas {
        streamed.push_str(delta.content().unwrap_or(""));
    }
    assert_eq!(streamed, "Sure.\n");
    assert_eq!(message.tool_calls.len(), 1);
}

#[test]
fn qwen_xml_forcing_grammar_is_valid_gbnf() {
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "write_file"}}),
    ] {
        let grammar = qwen_tools(Some(choice)).grammar().unwrap().unwrap();
        crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
        assert!(
            grammar.contains("<function=") && grammar.contains("<parameter="),
            "{grammar}"
        );
    }
}

fn family_tools(template: &str, choice: Option<Value>) -> ToolRequest {
    ToolRequest::from_request(Some(&weather_tools()), choice.as_ref(), None, template)
        .unwrap()
        .unwrap()
}

/// Parses `out` as a whole and streamed in 2-byte pieces: the calls, and the content streamed
/// (which must never carry call markup).
fn both_ways(tools: &ToolRequest, out: &str) -> (AssistantMessage, String) {
    let (whole, _) = tools.finish(out, false);
    let mut stream = ToolStream::new();
    let mut content = String::new();
    let bytes = out.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        let mut end = (start + 2).min(bytes.len());
        while !out.is_char_boundary(end) {
            end += 1;
        }
        for delta in stream.push(&out[start..end], tools) {
            content.push_str(delta.content().unwrap_or(""));
        }
        start = end;
    }
    let (deltas, message, _) = stream.finish(tools, false);
    for delta in deltas {
        content.push_str(delta.content().unwrap_or(""));
    }
    assert_eq!(message.tool_calls.len(), whole.tool_calls.len(), "{out}");
    (whole, content)
}

fn arguments(message: &AssistantMessage, i: usize) -> Value {
    message.tool_calls[i].arguments.clone()
}

#[test]
fn glm_kimi_and_deepseek_calls_are_detected_parsed_streamed_and_forced() {
    // GLM 4.5+: values are text typed by the schema.
    let glm = family_tools("{{ '<tool_call>' }}{name}<arg_key>{k}</arg_key>", None);
    assert_eq!(glm.format, ToolFormat::Glm);
    let out = "Checking.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>";
    let (m, content) = both_ways(&glm, out);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(arguments(&m, 0), json!({"city": "Paris", "days": 2}));
    assert_eq!(content, "Checking.");
    // Kimi K2: `functions.NAME:IDX`, JSON arguments, several calls in one section.
    let kimi = family_tools("<|tool_call_begin|>", None);
    assert_eq!(kimi.format, ToolFormat::Kimi);
    let out = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>";
    let (m, content) = both_ways(&kimi, out);
    assert_eq!(m.tool_calls.len(), 2);
    assert_eq!(m.tool_calls[1].name, "get_time");
    assert_eq!(content, "");
    // DeepSeek V3 (a fenced JSON body) and V3.1 (the name, then the JSON).
    let deepseek = family_tools("<｜tool▁calls▁begin｜>", None);
    assert_eq!(deepseek.format, ToolFormat::Deepseek);
    let v3 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\", \"days\": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let (m, _) = both_ways(&deepseek, v3);
    assert_eq!(arguments(&m, 0), json!({"city": "Paris", "days": 3}));
    let v31 = "Let me see.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
    let (m, content) = both_ways(&deepseek, v31);
    assert_eq!(arguments(&m, 0), json!({"city": "Oslo"}));
    assert_eq!(content, "Let me see.");
    // A complete call then one cut off: the first is kept; the only call cut off is content.
    let cut = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Oslo\"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"ci";
    let (m, calls) = deepseek.finish(cut, true);
    assert!(calls && m.tool_calls.len() == 1, "{m:?}");
    let only = "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{\"ci";
    let (m, calls) = kimi.finish(only, true);
    assert!(!calls);
    assert_eq!(m.content.as_deref(), Some(only));
    // Forcing grammars for each family are valid GBNF.
    for template in [
        "{{ '<tool_call>' }}<arg_key>",
        "<|tool_call_begin|>",
        "<｜tool▁calls▁begin｜>",
    ] {
        for choice in [
            json!("required"),
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ] {
            let grammar = family_tools(template, Some(choice))
                .grammar()
                .unwrap()
                .unwrap();
            crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
        }
    }
}

#[test]
fn a_prompt_that_opens_reasoning_starts_the_output_inside_it() {
    use super::parse::opened_reasoning;
    assert_eq!(
        opened_reasoning("<|im_start|>assistant\n<think>\n"),
        Some("<think>")
    );
    // Reasoning turned off (`<think>\n\n</think>`), or no tag: nothing is open.
    assert_eq!(
        opened_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        None
    );
    assert_eq!(opened_reasoning("<|im_start|>assistant\n"), None);
    let mut tools = ToolRequest::reasoning_only("<think>").unwrap();
    tools.opened = Some("<think>");
    // The output has no opening tag: all before `</think>` is reasoning.
    let out = "The user wants a city.\n</think>\n\nParis.";
    let (m, _) = tools.finish(out, false);
    assert_eq!(m.reasoning.as_deref(), Some("The user wants a city."));
    assert_eq!(m.content.as_deref(), Some("Paris."));
    let mut stream = ToolStream::new();
    let mut content = String::new();
    let mut reasoning = String::new();
    for piece in ["The user ", "wants a city.\n</th", "ink>\n\nPar", "is."] {
        for delta in stream.push(piece, &tools) {
            content.push_str(delta.content().unwrap_or(""));
            reasoning.push_str(delta.reasoning().unwrap_or(""));
        }
    }
    let (deltas, _, _) = stream.finish(&tools, false);
    for delta in deltas {
        content.push_str(delta.content().unwrap_or(""));
    }
    assert_eq!(
        (reasoning.as_str(), content.as_str()),
        ("The user wants a city.", "Paris.")
    );
    // With tools: the call after the reasoning is still a call.
    let mut with_tools = request(json!("auto"));
    with_tools.opened = Some("<think>");
    let out =
        "Weather needed.</think><tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>";
    let (m, calls) = with_tools.finish(out, false);
    assert!(calls, "{m:?}");
    assert_eq!(m.reasoning.as_deref(), Some("Weather needed."));
}

#[test]
fn llama4_pythonic_calls_and_llama3_text_before_the_python_tag() {
    let llama4 = family_tools("{{- '<|python_start|>' }}", None);
    assert_eq!(llama4.format, ToolFormat::Llama4);
    // Several calls, both quote kinds with escapes, numbers, Python constants, lists, dicts, a
    // no-argument call and a name with leading underscores.
    let out = r#"[get_weather(city='Par\'is', days=2), get_time(), _probe(flag=True, none=None, ratio=-1.5e2, items=["a", 'b'], opts={'k': [1, 2]})]"#;
    let parsed = super::parse::parse(out, ToolFormat::Llama4);
    assert_eq!(parsed.problem, None, "{parsed:?}");
    assert_eq!(parsed.calls.len(), 3);
    assert_eq!(
        parsed.calls[0].arguments,
        json!({"city": "Par'is", "days": 2})
    );
    assert_eq!(parsed.calls[1].arguments, json!({}));
    assert_eq!(parsed.calls[2].name, "_probe");
    assert_eq!(
        parsed.calls[2].arguments,
        json!({"flag": true, "none": null, "ratio": -150.0, "items": ["a", "b"], "opts": {"k": [1, 2]}})
    );
    // Inside <|python_start|>…<|python_end|>, checked against the tools, streamed without markup.
    let tagged = "<|python_start|>[get_weather(city=\"Paris\")]<|python_end|>";
    let (m, content) = both_ways(&llama4, tagged);
    assert_eq!(arguments(&m, 0), json!({"city": "Paris"}));
    assert_eq!(content, "");
    // A list that is not a call is an answer; a broken call list is content, never a 500.
    let (m, calls) = llama4.finish("[1, 2, 3]", false);
    assert!(!calls && m.content.as_deref() == Some("[1, 2, 3]"));
    let (m, calls) = llama4.finish("[get_weather(city=\"Paris\"", false);
    assert!(!calls && m.content.is_some());
    let grammar = family_tools("<|python_start|>", Some(json!("required")))
        .grammar()
        .unwrap()
        .unwrap();
    crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));

    // Llama 3.x: text before `<|python_tag|>` is content, the call after it a call.
    let llama3 = family_tools("<|python_tag|>", None);
    assert_eq!(llama3.format, ToolFormat::Llama3);
    let out = "Let me check.<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
    let (m, content) = both_ways(&llama3, out);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(content, "Let me check.");
}

#[test]
fn harmony_channels_become_reasoning_content_and_calls() {
    let harmony = family_tools(
        "{{- '<|start|>assistant<|channel|>final<|message|>' }}",
        None,
    );
    assert_eq!(harmony.format, ToolFormat::Harmony);
    // Analysis, then the final answer.
    let out = "<|channel|>analysis<|message|>User asks capital.<|end|><|start|>assistant<|channel|>final<|message|>Paris.<|return|>";
    let (m, content) = both_ways(&harmony, out);
    assert_eq!(m.reasoning.as_deref(), Some("User asks capital."));
    assert_eq!(m.content.as_deref(), Some("Paris."));
    assert_eq!(content, "Paris.");
    // A call in the commentary channel, addressed in the channel header or before it.
    for out in [
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>",
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{\"city\":\"Paris\"}<|call|>",
    ] {
        let (m, calls) = harmony.finish(out, false);
        assert!(calls, "{out}: {m:?}");
        assert_eq!(m.tool_calls[0].name, "get_weather");
        assert_eq!(arguments(&m, 0), json!({"city": "Paris"}));
        assert_eq!(m.reasoning.as_deref(), Some("Need weather."));
        assert_eq!(m.content, None);
    }
    // Reasoning without tools, and text without channels.
    let plain = ToolRequest::reasoning_only("<|channel|>").unwrap();
    let (m, _) = plain.finish(
        "<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>final<|message|>Hi.",
        false,
    );
    assert_eq!(
        (m.reasoning.as_deref(), m.content.as_deref()),
        (Some("Hmm."), Some("Hi."))
    );
    let (m, _) = plain.finish("Just text.", false);
    assert_eq!(m.content.as_deref(), Some("Just text."));
    // A broken call body is content.
    let (m, calls) = harmony.finish(
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":",
        false,
    );
    assert!(!calls && m.content.is_some());
    // A broken call is content from its header on; the reasoning before it stays reasoning.
    let (m, calls) = harmony.finish(
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":<|call|>",
        false,
    );
    assert!(!calls);
    assert_eq!(m.reasoning.as_deref(), Some("Need weather."));
    assert!(
        m.content
            .as_deref()
            .is_some_and(|c| c.starts_with("<|start|>assistant<|channel|>commentary")),
        "{m:?}"
    );
    let grammar = family_tools("<|channel|>", Some(json!("required")))
        .grammar()
        .unwrap()
        .unwrap();
    crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
}

#[test]
fn function_gemma_calls_with_escaped_strings() {
    let gemma = family_tools("{{ '<start_function_call>' }}", None);
    assert_eq!(gemma.format, ToolFormat::FunctionGemma);
    let out = "<start_function_call>call:get_weather{city:<escape>Paris, France<escape>,days:3}<end_function_call>";
    let (m, content) = both_ways(&gemma, out);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(
        arguments(&m, 0),
        json!({"city": "Paris, France", "days": 3})
    );
    assert_eq!(content, "");
    // Two calls, nested values; a broken one is content.
    let two = "<start_function_call>call:get_time{}<end_function_call><start_function_call>call:get_weather{city:<escape>Oslo<escape>}<end_function_call>";
    let (m, calls) = gemma.finish(two, false);
    assert!(calls && m.tool_calls.len() == 2, "{m:?}");
    let parsed = super::parse::parse(
        "<start_function_call>call:f{a:{b:[1,2]},c:true}<end_function_call>",
        ToolFormat::FunctionGemma,
    );
    assert_eq!(
        parsed.calls[0].arguments,
        json!({"a": {"b": [1, 2]}, "c": true})
    );
    let (m, calls) = gemma.finish(
        "<start_function_call>call:get_weather{city:<escape>Par<end_function_call>",
        false,
    );
    assert!(!calls && m.content.is_some());
    let grammar = family_tools("<start_function_call>", Some(json!("required")))
        .grammar()
        .unwrap()
        .unwrap();
    crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
}

/// Gemma 4, from llama.cpp's recorded outputs for google/gemma-4-31B-it's template.
/// Forcing grammars match a marker the vocabulary holds as one token by that token, so the model
/// is never steered into spelling `[TOOL_CALLS]` out of ordinary tokens.
#[test]
fn markers_held_as_one_token_are_forced_as_that_token() {
    let mistral = family_tools("[TOOL_CALLS]", Some(json!("required")));
    let grammar = mistral.grammar().unwrap().unwrap();
    let forced = super::markers_as_tokens(&grammar, &[("[TOOL_CALLS]", 5)]);
    assert!(
        forced.contains("<[5]>") && !forced.contains("[TOOL_CALLS]"),
        "{forced}"
    );
    crate::engine::grammar::check(&forced).unwrap_or_else(|e| panic!("{e}\n{forced}"));
    // Markers inside longer literals, escaped quotes, character classes left alone.
    let k3 = family_tools("<|open|><|sep|>", Some(json!("required")));
    let grammar = k3.grammar().unwrap().unwrap();
    let forced = super::markers_as_tokens(
        &grammar,
        &[("<|open|>", 1), ("<|close|>", 2), ("<|sep|>", 3)],
    );
    assert!(
        !forced.contains("<|open|>") && !forced.contains("<|sep|>"),
        "{forced}"
    );
    assert!(
        forced.contains(r#"(<[1]> "call tool=\"get_weather\" index=\"")"#),
        "{forced}"
    );
    crate::engine::grammar::check(&forced).unwrap_or_else(|e| panic!("{e}\n{forced}"));
    let gemma = family_tools("<|tool_call>call:", Some(json!("required")));
    let grammar = gemma.grammar().unwrap().unwrap();
    let forced = super::markers_as_tokens(&grammar, &[("<|\"|>", 7), ("<|tool_call>", 8)]);
    assert!(
        forced.contains("<[7]>") && forced.contains("<[8]>"),
        "{forced}"
    );
    crate::engine::grammar::check(&forced).unwrap_or_else(|e| panic!("{e}\n{forced}"));
    // Nothing to rewrite: unchanged; a repeated literal stays one group.
    assert_eq!(super::markers_as_tokens(&grammar, &[]), grammar);
    assert_eq!(
        super::markers_as_tokens(
            r#"root ::= ("x[TOOL_CALLS]y")* [^"\]]"#,
            &[("[TOOL_CALLS]", 5)]
        ),
        r#"root ::= (("x" <[5]> "y"))* [^"\]]"#
    );
}

#[test]
fn mistral_call_ids_are_nine_alphanumerics_as_its_templates_require() {
    let id = super::call_id(ToolFormat::Mistral);
    assert!(
        id.len() == 9 && id.chars().all(|c| c.is_ascii_alphanumeric()),
        "{id}"
    );
    assert!(super::call_id(ToolFormat::Hermes).starts_with("call_"));
}

#[test]
fn gemma4_calls_and_thought_channel() {
    let gemma = family_tools("{{- '<|tool_call>call:' + function['name'] + '{' -}}", None);
    assert_eq!(gemma.format, ToolFormat::Gemma4);
    let out = "Hello, world!\nWhat's up?<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>,days:2}<tool_call|>";
    let (m, content) = both_ways(&gemma, out);
    assert_eq!(m.tool_calls[0].name, "get_weather");
    assert_eq!(arguments(&m, 0), json!({"city": "Paris", "days": 2}));
    assert_eq!(content, "Hello, world!\nWhat's up?");
    // Reasoning in the thought channel, then a call with no arguments.
    let out = "<|channel>thought\nI'm\nthinking<channel|><|tool_call>call:get_time{}<tool_call|>";
    let (m, _) = gemma.finish(out, false);
    assert_eq!(m.reasoning.as_deref(), Some("I'm\nthinking"));
    assert_eq!(m.tool_calls[0].name, "get_time");
    // A complete call, then one cut off: the first is a call, the tail content.
    let (m, calls) = gemma.finish(
        "<|tool_call>call:get_time{}<tool_call|><|tool_call>call:get_weather{city:<|\"|>Os",
        false,
    );
    assert!(calls && m.tool_calls.len() == 1, "{m:?}");
    assert!(m.content.unwrap().contains("<|tool_call>call:get_weather"));
    let grammar = family_tools("<|tool_call>call:", Some(json!("required")))
        .grammar()
        .unwrap()
        .unwrap();
    assert!(
        grammar.contains("<|tool_call>call:get_weather{"),
        "{grammar}"
    );
    crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
}

/// Kimi K3, from llama.cpp's recorded outputs for its published template: sections, typed
/// arguments, parallel calls, reasoning opened by the generation prompt.
#[test]
fn kimi_k3_sections_typed_arguments_and_calls() {
    let k3 = family_tools("{{- '<|open|>' + tag -}}{{- '<|sep|>' -}}", None);
    assert_eq!(k3.format, ToolFormat::KimiK3);
    let parse = |out: &str| super::parse::parse(out, ToolFormat::KimiK3);
    let p = parse("<|open|>response<|sep|>Hello, world!\nWhat's up?<|close|>response<|sep|><|close|>message<|sep|>");
    assert_eq!(p.content.as_deref(), Some("Hello, world!\nWhat's up?"));
    assert!(p.reasoning.is_none() && p.calls.is_empty());
    // The generation prompt opened the think section; the server puts the opener back.
    let opened = super::parse::opened_reasoning(
        "<|open|>message role=\"user\"<|sep|>Hi<|close|>message<|sep|><|open|>message role=\"assistant\"<|sep|><|open|>think<|sep|>",
    );
    assert_eq!(opened, Some("<|open|>think<|sep|>"));
    let out = "<|open|>think<|sep|>I should call it<|close|>think<|sep|><|open|>response<|sep|>On it.<|close|>response<|sep|><|open|>tools<|sep|><|open|>call tool=\"get_weather\" index=\"1\"<|sep|><|open|>argument key=\"city\" type=\"string\"<|sep|>12<|close|>argument<|sep|><|open|>argument key=\"days\" type=\"number\"<|sep|>2<|close|>argument<|sep|><|close|>call<|sep|><|open|>call tool=\"get_time\" index=\"2\"<|sep|><|close|>call<|sep|><|close|>tools<|sep|><|close|>message<|sep|><|end_of_msg|>";
    let (m, content) = both_ways(&k3, out);
    assert_eq!(m.reasoning.as_deref(), Some("I should call it"));
    assert_eq!(m.content.as_deref(), Some("On it."));
    assert_eq!(content, "On it.");
    assert_eq!(m.tool_calls.len(), 2);
    // A string stays a string even when it looks like a number; numbers are numbers.
    assert_eq!(arguments(&m, 0), json!({"city": "12", "days": 2}));
    assert_eq!(arguments(&m, 1), json!({}));
    // Prose that names the tags survives; a budget cut inside reasoning keeps the reasoning.
    let p = parse("<|open|>response<|sep|>Use the response tag, then message the handler.<|close|>response<|sep|><|close|>message<|sep|>");
    assert_eq!(
        p.content.as_deref(),
        Some("Use the response tag, then message the handler.")
    );
    let p = parse("<|open|>think<|sep|>I was still thinking when the budget ran out");
    assert_eq!(
        p.reasoning.as_deref(),
        Some("I was still thinking when the budget ran out")
    );
    // JSON arguments in one block, escaped attributes.
    let p = parse("<|open|>tools<|sep|><|open|>call tool=\"get_weather\" index=\"1\"<|sep|><|open|>json type=\"object\"<|sep|>{\"city\": \"Caf\\u00e9 \\\"Nord\\\"\"}<|close|>json<|sep|><|close|>call<|sep|><|close|>tools<|sep|>");
    assert_eq!(p.calls[0].arguments, json!({"city": "Café \"Nord\""}));
    // A complete call, then one cut off: the first stays a call, the tail is content.
    let (m, calls) = k3.finish(
        "<|open|>tools<|sep|><|open|>call tool=\"get_time\" index=\"1\"<|sep|><|close|>call<|sep|><|open|>call tool=\"get_weather\" index=\"2\"<|sep|><|open|>argument key=\"city\" type=\"string\"<|sep|>Pa",
        false,
    );
    assert!(calls && m.tool_calls.len() == 1, "{m:?}");
    assert!(m.content.unwrap().contains("get_weather"));
    // Malformed: no call parses, everything is content.
    let (m, calls) = k3.finish("<|open|>tools<|sep|><|open|>call index=\"1\"<|sep|>", false);
    assert!(!calls && m.content.is_some());
    let grammar = family_tools("<|open|><|sep|>", Some(json!("required")))
        .grammar()
        .unwrap()
        .unwrap();
    assert!(grammar.contains("<|open|>tools<|sep|>"), "{grammar}");
    crate::engine::grammar::check(&grammar).unwrap_or_else(|e| panic!("{e}\n{grammar}"));
}

/// Pushes `out` into a new stream in pieces of `size` bytes (widened to character boundaries);
/// the stream, and the reasoning and content sent so far.
fn push_in_pieces(tools: &ToolRequest, out: &str, size: usize) -> (ToolStream, String, String) {
    let mut stream = ToolStream::new();
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut start = 0;
    while start < out.len() {
        let mut end = (start + size).min(out.len());
        while !out.is_char_boundary(end) {
            end += 1;
        }
        for delta in stream.push(&out[start..end], tools) {
            content.push_str(delta.content().unwrap_or(""));
            reasoning.push_str(delta.reasoning().unwrap_or(""));
        }
        start = end;
    }
    (stream, reasoning, content)
}

/// Every family: streamed in pieces of every size (on character boundaries), the deltas add up to
/// the whole output's message (content, reasoning and calls), and no call markup is streamed.
#[test]
fn every_format_streams_to_the_same_message_at_every_piece_size() {
    let samples: Vec<(&str, &str)> = vec![
        ("<tool_call>", "Hi.<tool_call>{\"name\": \"get_time\", \"arguments\": {}}</tool_call>"),
        (QWEN_XML_TEMPLATE, "Ok.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNice\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>"),
        ("{{ '<tool_call>' }}<arg_key>", "So.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Été</arg_value>\n</tool_call>"),
        ("<|tool_call_begin|>", "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>{}<|tool_call_end|><|tool_calls_section_end|>"),
        ("<｜tool▁calls▁begin｜>", "Look: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"東京\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
        ("<|python_start|>", "[get_weather(city='Zürich')]"),
        ("<|channel|>", "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Ça va.<|return|>"),
        ("<start_function_call>", "<start_function_call>call:get_weather{city:<escape>Kyiv<escape>}<end_function_call>"),
        ("<|tool_call>call:", "Oui.<|tool_call>call:get_weather{city:<|\"|>Liège<|\"|>}<tool_call|>"),
        ("<|open|><|sep|>", "<|open|>think<|sep|>Hmm “x”.<|close|>think<|sep|><|open|>response<|sep|>Voilà.<|close|>response<|sep|><|open|>tools<|sep|><|open|>call tool=\"get_time\" index=\"1\"<|sep|><|close|>call<|sep|><|close|>tools<|sep|><|close|>message<|sep|>"),
        ("<|python_tag|>", "Sure.<|python_tag|>{\"name\": \"get_time\", \"parameters\": {}}"),
        ("<think>", "<think>Why \"x\"?</think>Plain answer with “quotes”."),
    ];
    for (template, out) in samples {
        let tools = family_tools(template, None);
        let (whole, _) = tools.finish(out, false);
        for size in 1..=7 {
            let (mut stream, mut reasoning, mut content) = push_in_pieces(&tools, out, size);
            let (deltas, message, _) = stream.finish(&tools, false);
            for delta in deltas {
                content.push_str(delta.content().unwrap_or(""));
                reasoning.push_str(delta.reasoning().unwrap_or(""));
            }
            let name = tools.format.name();
            assert_eq!(
                content,
                whole.content.clone().unwrap_or_default(),
                "{name} size {size}"
            );
            assert_eq!(
                reasoning,
                whole.reasoning.clone().unwrap_or_default(),
                "{name} size {size}"
            );
            assert_eq!(
                message.tool_calls.len(),
                whole.tool_calls.len(),
                "{name} size {size}"
            );
            for marker in [
                "<tool_call",
                "<|tool",
                "<｜tool",
                "<|channel",
                "<start_function",
                "<|python",
            ] {
                assert!(!content.contains(marker), "{name} size {size}: {content}");
            }
        }
    }
}

/// Reasoning and content go out as they are written, for every family: a thinking model's
/// reasoning reaches the client token by token, not when its block closes; only a tail that may
/// become a marker waits.
#[test]
fn reasoning_and_content_stream_as_they_grow() {
    use super::families::K3_THINK_START;
    // (template, reasoning opened by the prompt, output so far, reasoning sent, content sent)
    let cases: [(&str, Option<&'static str>, &str, &str, &str); 11] = [
        ("<think>", None, "<think>Let me think about th", "Let me think about th", ""),
        ("<think>", Some("<think>"), "Counting the r's </th", "Counting the r's", ""),
        ("<think>", None, "<think>ok</think>\nThe answer is", "ok", "The answer is"),
        ("<think>", None, "<thi", "", ""),
        ("<|channel|>", None, "<|channel|>analysis<|message|>User asks. Think", "User asks. Think", ""),
        ("<|channel|>", None, "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Ça va<|en", "Hm.", "Ça va"),
        ("<|channel|>", None, "<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>commentary to=functions.get_time <|constrain|>json<|message|>{\"a\"", "Hm.", ""),
        ("<|open|><|sep|>", Some(K3_THINK_START), "I should call it<|close|>th", "I should call it", ""),
        ("<|open|><|sep|>", None, "<|open|>think<|sep|>Hmm<|close|>think<|sep|><|open|>response<|sep|>Voilà, c'est<|clo", "Hmm", "Voilà, c'est"),
        ("<|open|><|sep|>", None, "<|open|>resp", "", ""),
        ("<|tool_call>call:", None, "<|channel>thought\nNeed weather", "Need weather", ""),
    ];
    for (template, opened, out, reasoning, content) in cases {
        let mut tools = family_tools(template, None);
        tools.opened = opened;
        for piece in [out.len(), 1] {
            let (_, sent_reasoning, sent_content) = push_in_pieces(&tools, out, piece);
            assert_eq!(
                (sent_reasoning.as_str(), sent_content.as_str()),
                (reasoning, content),
                "{out:?} in pieces of {piece}"
            );
        }
    }
    // A harmony call that does not parse: what was streamed is still where the message starts.
    let harmony = family_tools("<|channel|>", None);
    let out = "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant<|channel|>final<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":<|call|>";
    let (whole, _) = harmony.finish(out, false);
    let mut stream = ToolStream::new();
    let mut deltas: Vec<Delta> = out
        .char_indices()
        .flat_map(|(at, c)| stream.push(&out[at..at + c.len_utf8()], &harmony))
        .collect();
    let (rest, message, _) = stream.finish(&harmony, false);
    deltas.extend(rest);
    let (content, reasoning, calls) = apply(&deltas, &message);
    assert_eq!((content, reasoning), (whole.content, whole.reasoning));
    assert!(calls.is_empty());
}
