//! Chat templates: the model's own Jinja template, rendered with Hugging Face semantics.
//!
//! HF renders with Jinja2 in a sandbox with `trim_blocks` and `lstrip_blocks`, Python string and dict
//! methods, `raise_exception`, `strftime_now`, and a `tojson` that is `json.dumps` (no HTML escaping,
//! `", "`/`": "` separators, keys in insertion order). minijinja plus `pycompat` gives the methods;
//! the rest is defined here. Knows nothing of HTTP or llama.cpp.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

/// ChatML, used when a model ships no template (SmolLM2's own template is this too).
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message['role'] }}\n\
{{ message['content'] }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

const NAME: &str = "chat_template";

/// Why a template could not be compiled or rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// Includes the template's own `raise_exception` messages (e.g. roles must alternate): these are
    /// the client's mistakes, answered with a 400.
    #[error("chat template rejected the messages: {0}")]
    Render(String),
}

/// What a template sees besides the messages.
#[derive(Debug, Clone, Serialize)]
pub struct RenderContext<M: Serialize, T: Serialize> {
    pub messages: M,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<T>,
    pub add_generation_prompt: bool,
    pub bos_token: String,
    pub eos_token: String,
    /// More variables for the template (`reasoning_effort`, `enable_thinking`, a request's
    /// `chat_template_kwargs`); never one of the names above.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The variables a request may not set through `chat_template_kwargs`.
pub const RESERVED_VARIABLES: [&str; 5] = [
    "messages",
    "tools",
    "add_generation_prompt",
    "bos_token",
    "eos_token",
];

/// Steps (minijinja's fuel: about one per instruction) one render may take. A real template
/// renders a long conversation with tools in well under a million; a template that loops without
/// end (or for a crafted message) stops here, in about a second, instead of pinning a thread.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported now, not at the first request.
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template_owned(NAME, rewrite_appends(source))
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        let template = Self {
            env,
            source: source.to_owned(),
        };
        template.check_it_finishes()?;
        Ok(template)
    }

    /// Renders a short conversation once: a template that cannot finish it within its fuel is
    /// refused now (a clear load error), not at every request. Other render errors (a template
    /// that wants other roles) are left to the requests that cause them.
    fn check_it_finishes(&self) -> Result<(), TemplateError> {
        let messages = serde_json::json!([
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ]);
        let context = RenderContext {
            messages,
            tools: None::<()>,
            add_generation_prompt: true,
            bos_token: String::new(),
            eos_token: String::new(),
            extra: serde_json::Map::new(),
        };
        match self.render(&context) {
            Err(TemplateError::Render(message)) if message.contains(OUT_OF_FUEL) => {
                Err(TemplateError::Syntax(message))
            }
            _ => Ok(()),
        }
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders a `tools` variable (else tools go in the generic format).
    pub fn knows_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// Renders the prompt for `context`.
    pub fn render<M: Serialize, T: Serialize>(
        &self,
        context: &RenderContext<M, T>,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        template
            .render(Value::from_serialize(context))
            .map_err(|e| TemplateError::Render(describe(&e)))
    }
}

/// How a render that ran out of fuel is described.
const OUT_OF_FUEL: &str = "the chat template did not finish within its step limit";

/// minijinja's message plus the template line, without the debug dump.
fn describe(err: &Error) -> String {
    let mut text = match err.detail() {
        _ if err.kind() == ErrorKind::OutOfFuel => {
            format!("{OUT_OF_FUEL} ({TEMPLATE_FUEL} steps): it loops too long for this input")
        }
        Some(detail) if err.kind() == ErrorKind::InvalidOperation => detail.to_owned(),
        _ => err.to_string(),
    };
    if let Some(line) = err.line() {
        let _ = write!(text, " (template line {line})");
    }
    text
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        ));
    }
    Ok(chrono::Local::now()
        .format_with_items(items.into_iter())
        .to_string())
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_owned()
        } else {
            let n = i64::try_from(v.clone()).map_err(|_| {
                Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be int or str",
                )
            })?;
            " ".repeat(n.max(0) as usize)
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() => {
            let a = seps.get_item(&Value::from(0))?;
            let b = seps.get_item(&Value::from(1))?;
            (
                a.as_str().unwrap_or(",").to_owned(),
                b.as_str().unwrap_or(": ").to_owned(),
            )
        }
        // Python's defaults: no trailing space before a newline when indenting.
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    let style = JsonStyle {
        indent: indent.as_deref(),
        item_sep: &item_sep,
        key_sep: &key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    write_json(&json, &style, 0, &mut out);
    // Marked safe: the output is JSON, not HTML, and must not be escaped again.
    Ok(Value::from_safe_string(out))
}

struct JsonStyle<'a> {
    indent: Option<&'a str>,
    item_sep: &'a str,
    key_sep: &'a str,
    sort_keys: bool,
}

fn write_json(value: &serde_json::Value, style: &JsonStyle<'_>, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(indent) = style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    };
    match value {
        J::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item_sep);
                }
                newline(out, depth + 1);
                write_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(map) if !map.is_empty() => {
            let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(style.item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&serde_json::to_string(key).unwrap_or_default());
                out.push_str(style.key_sep);
                write_json(item, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap_or_default()),
    }
}

/// Python's `list.append` and `list.pop` mutate; minijinja's lists are values. Templates that keep
/// a queue in a namespace's list (`{%- set _ = ns.ids.append(x) -%}`, `{%- set id =
/// ns.ids.pop(0) -%}`: Kimi K2's) get the same effect written as assignments (`{%- set ns.ids =
/// (ns.ids + [x])|list -%}`; `{%- set id = ns.ids[0] -%}{%- set ns.ids = ns.ids[1:] -%}`). Only
/// those statement shapes on a namespace attribute are rewritten; any other use still fails as an
/// unknown method, with the template's line.
fn rewrite_appends(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let Some(close) = rest[open..].find("%}").map(|c| open + c) else {
            break;
        };
        out.push_str(&rest[..open]);
        let tag = &rest[open..close + 2];
        out.push_str(&rewrite_append_tag(tag).unwrap_or_else(|| tag.to_owned()));
        rest = &rest[close + 2..];
    }
    out.push_str(rest);
    out
}

/// `{%- set NAME = PATH.append(ARG) -%}` as `{%- set PATH = PATH + [ARG] -%}`.
fn rewrite_append_tag(tag: &str) -> Option<String> {
    let inner = &tag[2..tag.len() - 2];
    let (lead, inner) = match inner.strip_prefix(['-', '+']) {
        Some(rest) => (&tag[2..3], rest),
        None => ("", inner),
    };
    let (inner, trail) = match inner.strip_suffix(['-', '+']) {
        Some(rest) => (rest, &inner[inner.len() - 1..]),
        None => (inner, ""),
    };
    let assignment = inner.trim().strip_prefix("set ")?;
    let (name, expression) = assignment.split_once('=')?;
    let (name, expression) = (name.trim(), expression.trim());
    let call = expression.strip_suffix(')')?;
    let (path, method) = [".append(", ".pop("]
        .iter()
        .find_map(|m| call.find(m).map(|at| (&call[..at], &call[at + 1..])))?;
    let path = path.trim();
    // Only a namespace attribute can be assigned from inside a loop.
    if !path.contains('.')
        || !path
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
    {
        return None;
    }
    let tag = |body: String| format!("{{%{lead} {body} {trail}%}}");
    if let Some(argument) = method.strip_prefix("append(") {
        return Some(tag(format!("set {path} = ({path} + [{argument}])|list")));
    }
    // `x = l.pop(0)` / `x = l.pop()`: the item, then the list without it.
    let (item, remaining) = match method {
        "pop(0" => ("[0]", "[1:]"),
        "pop(" => ("[-1]", "[:-1]"),
        _ => return None,
    };
    Some(format!(
        "{}{}",
        tag(format!("set {name} = {path}{item}")),
        tag(format!("set {path} = {path}{remaining}"))
    ))
}

/// The family of a chat template, by the markers its source writes (for listings): `harmony`,
/// `chatml`, `llama3`, `mistral`, `gemma`, `deepseek`, `glm`, `phi`, `zephyr`, else `custom`.
pub fn family(source: &str) -> &'static str {
    const MARKERS: [(&str, &str); 9] = [
        ("<|channel|>", "harmony"),
        ("<|im_start|>", "chatml"),
        ("<|start_header_id|>", "llama3"),
        ("[INST]", "mistral"),
        ("<start_of_turn>", "gemma"),
        ("<｜User｜>", "deepseek"),
        ("[gMASK]", "glm"),
        ("<|end|>", "phi"),
        ("<|user|>", "zephyr"),
    ];
    MARKERS
        .iter()
        .find(|(marker, _)| source.contains(marker))
        .map_or("custom", |&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: serde_json::Value) -> Result<String, TemplateError> {
        ChatTemplate::new(source)?.render(&RenderContext {
            messages,
            tools: None::<()>,
            add_generation_prompt: true,
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
            extra: Default::default(),
        })
    }

    #[test]
    fn a_namespace_list_append_is_an_assignment() {
        let source = "{%- set ns = namespace(ids=[]) -%}{%- for m in messages -%}\
                      {%- set _ = ns.ids.append(m.content) -%}{%- endfor -%}{{ ns.ids|join(',') }}";
        let out = render(source, json!([{"content": "a"}, {"content": "b"}])).unwrap();
        assert_eq!(out, "a,b");
        assert_eq!(
            rewrite_append_tag("{% set x = ns.l.append(1) %}").as_deref(),
            Some("{% set ns.l = (ns.l + [1])|list %}")
        );
        let queue = "{%- set ns = namespace(q=[]) -%}{%- set _ = ns.q.append('a') -%}\
                     {%- set _ = ns.q.append('b') -%}{%- set first = ns.q.pop(0) -%}\
                     {{ first }}|{{ ns.q|join(',') }}";
        assert_eq!(render(queue, json!([])).unwrap(), "a|b");
        // Other shapes are left alone.
        assert_eq!(rewrite_append_tag("{% set x = l.append(1) %}"), None);
        assert_eq!(rewrite_append_tag("{{ x }}"), None);
    }

    #[test]
    fn chatml_renders_with_generation_prompt() {
        let out = render(
            CHATML,
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
        )
        .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn tojson_is_python_json_dumps_without_html_escaping() {
        let src = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let out = render(src, json!([{"b": "<a&'>", "a": [1, 2], "c": {}}])).unwrap();
        assert_eq!(
            out,
            "{\"b\": \"<a&'>\", \"a\": [1, 2], \"c\": {}}|{\n  \"b\": \"<a&'>\",\n  \"a\": [\n    1,\n    2\n  ],\n  \"c\": {}\n}"
        );
        let sorted = render(
            "{{ messages[0] | tojson(sort_keys=true) }}",
            json!([{"b": 1, "a": 2}]),
        );
        assert_eq!(sorted.unwrap(), "{\"a\": 2, \"b\": 1}");
    }

    #[test]
    fn raise_exception_becomes_a_render_error_with_its_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}";
        let err = render(src, json!([{"role": "assistant", "content": "x"}])).unwrap_err();
        match err {
            TemplateError::Render(msg) => {
                assert!(msg.contains("Conversation must start with user"), "{msg}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn python_methods_and_trim_blocks_work() {
        let src = "{% for m in messages %}\n  {{ m.content.strip().upper() }}{% if m.content.startswith(' h') %}!{% endif %}\n{% endfor %}";
        // As Jinja2: trim_blocks eats the newline after each block tag; expression indentation stays.
        assert_eq!(render(src, json!([{"content": " hi "}])).unwrap(), "  HI!");
    }

    #[test]
    fn strftime_now_and_bos_are_available() {
        let out = render("{{ bos_token }}{{ strftime_now('%Y') }}", json!([])).unwrap();
        assert!(out.starts_with("<s>20"), "{out}");
        assert!(render("{{ strftime_now('%Q') }}", json!([])).is_err());
    }

    #[test]
    fn a_template_that_loops_is_stopped_at_load_or_for_the_request() {
        let forever =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        match ChatTemplate::new(forever) {
            Err(TemplateError::Syntax(message)) => {
                assert!(message.contains("step limit"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        // Loops only for one message: compiles, and that request is refused.
        let crafted = "{% for m in messages %}{% if m.content == 'spin' %}{% for i in range(100000) %}\
                       {% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{{ m.content }}{% endfor %}";
        assert_eq!(render(crafted, json!([{"content": "hi"}])).unwrap(), "hi");
        match render(crafted, json!([{"content": "spin"}])) {
            Err(TemplateError::Render(message)) => {
                assert!(message.contains("step limit"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_syntax_error_is_reported_at_compile_time() {
        assert!(matches!(
            ChatTemplate::new("{% for %}"),
            Err(TemplateError::Syntax(_))
        ));
    }
}
