//! Ollama's request fields into the OpenAI fields the shared validation takes: the one place
//! Ollama's words (`num_predict`, `format`, `tool_name`, `keep_alive`) are translated.

use serde_json::{json, Map, Value};

use super::super::chat::StartedChat;
use super::super::error::ApiError;
use super::super::state::{AppState, Served};
use super::OllamaError;
use crate::registry::KeepAlive;

/// A chat or generate request in OpenAI's fields.
pub struct Translated {
    /// The name the client used (answered back as `model`).
    pub model: String,
    /// The OpenAI chat body (generate: the chat it amounts to), or for raw prompts the
    /// completion fields.
    pub openai: Value,
    pub stream: bool,
    /// An empty prompt only loads (or unloads) the model: the `done_reason` to answer.
    pub load_only: Option<&'static str>,
    /// Generate with `raw` or `suffix`: the text to tokenize as it is.
    pub raw_prompt: Option<String>,
}

impl Translated {
    /// An empty prompt: it only loads (or would unload) the model.
    fn load_only(model: String, stream: bool, body: &Value) -> Result<Self, ApiError> {
        Ok(Self {
            model,
            openai: Value::Null,
            stream,
            load_only: Some(load_only(body.get("keep_alive"))?),
            raw_prompt: None,
        })
    }
}

/// The model a request names and its `keep_alive`: `None` when absent (the server's
/// `--idle-unload`), else until now plus the duration (0: unload once idle), or forever when
/// negative.
pub fn target(body: &Value) -> Result<(String, Option<KeepAlive>), ApiError> {
    let name = string_field(body, "model")?
        .or_else(|| body.get("name").and_then(Value::as_str))
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?
        .to_owned();
    let keep = match body.get("keep_alive").filter(|k| !k.is_null()) {
        None => None,
        Some(value) => Some(match keep_alive_seconds(value)? {
            None => KeepAlive::Forever,
            Some(seconds) => KeepAlive::Until(
                std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds.min(1e9)),
            ),
        }),
    };
    Ok((name, keep))
}

/// The context per sequence `body` asks for (`options.num_ctx`), if any; a number is required.
pub fn num_ctx(body: &Value) -> Result<Option<u32>, ApiError> {
    match body.pointer("/options/num_ctx") {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .filter(|&n| (16..=u64::from(u32::MAX)).contains(&n))
            .map(|n| Some(n as u32))
            .ok_or_else(|| {
                ApiError::invalid(
                    "options.num_ctx",
                    format!("`num_ctx` must be a whole number of at least 16; got {value}"),
                )
            }),
    }
}

/// Whether `body` only asks to unload its model: no prompt (or no messages), `keep_alive: 0`.
pub fn unload_only(body: &Value, prompt_field: &str) -> bool {
    let empty = match body.get(prompt_field) {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(_) => false,
    };
    let no_suffix = body
        .get("suffix")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    empty
        && no_suffix
        && body
            .get("keep_alive")
            .and_then(|k| keep_alive_seconds(k).ok())
            == Some(Some(0.0))
}

/// Seconds of a `keep_alive`: a number of seconds, a Go duration (`5m`, `1h30m`, `250ms`), or a
/// negative value for "forever" (`None`).
pub fn keep_alive_seconds(value: &Value) -> Result<Option<f64>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "keep_alive",
            format!("`keep_alive` must be seconds or a duration such as \"5m\" or \"1h30m\"; got {value}"),
        )
    };
    let seconds = match value {
        Value::Number(n) => n.as_f64().ok_or_else(bad)?,
        Value::String(s) => go_duration(s).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok((seconds >= 0.0).then_some(seconds))
}

/// Go's `time.ParseDuration` units (a bare number is seconds, as Ollama reads it).
fn go_duration(text: &str) -> Option<f64> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Some(seconds);
    }
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let mut total = 0.0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&i| i > 0)?;
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, scale) = [
            ("ns", 1e-9),
            ("us", 1e-6),
            ("µs", 1e-6),
            ("ms", 1e-3),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3600.0),
        ]
        .into_iter()
        .filter(|(u, _)| rest.starts_with(u))
        .max_by_key(|(u, _)| u.len())?;
        total += number * scale;
        rest = &rest[unit.len()..];
    }
    Some(if negative { -total } else { total })
}

/// `options` into OpenAI's sampling fields of `out`. Load-time options are checked against the
/// running model: they cannot change it per request.
fn options(
    served: &Served,
    options: Option<&Value>,
    out: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let Some(options) = options.filter(|o| !o.is_null()) else {
        return Ok(());
    };
    let options = options
        .as_object()
        .ok_or_else(|| ApiError::invalid("options", "`options` must be an object"))?;
    for (key, value) in options {
        let to = match key.as_str() {
            "temperature" | "top_p" | "top_k" | "min_p" | "seed" | "stop" | "repeat_penalty"
            | "repeat_last_n" | "presence_penalty" | "frequency_penalty" => key.as_str(),
            "num_predict" => {
                // -1: no limit; -2: fill the context. Both leave the budget to the context.
                if value.as_i64().is_some_and(|n| n < 0) {
                    continue;
                }
                "max_tokens"
            }
            "num_ctx" => {
                // Applied before this request ran (`num_ctx`): the model was reloaded with a
                // larger context if it needed one, up to its trained context.
                tracing::debug!(num_ctx = %value, n_ctx_seq = served.loaded.info.n_ctx_seq, "num_ctx");
                continue;
            }
            // lm-sandbox's own: OpenAI's `tool_choice` (Ollama has none), here so that clients
            // whose `chat()` takes no extra fields can still force a call.
            "tool_choice" => "tool_choice",
            "parallel_tool_calls" => "parallel_tool_calls",
            "num_gpu" | "main_gpu" | "num_thread" | "num_batch" | "num_keep" | "use_mmap"
            | "numa" | "low_vram" | "vocab_only" | "use_mlock" | "num_gqa" | "typical_p"
            | "penalize_newline" | "tfs_z" | "mirostat" | "mirostat_eta" | "mirostat_tau" => {
                tracing::info!(option = %key, %value, "Ollama option not applied: placement and threads are fixed at start, and these samplers are not offered");
                continue;
            }
            other => {
                return Err(ApiError::invalid(
                    format!("options.{other}"),
                    format!("unknown option `{other}`"),
                ))
            }
        };
        out.insert(to.to_owned(), value.clone());
    }
    Ok(())
}

/// `format`: `"json"` or a JSON schema, as OpenAI's `response_format`.
fn format(value: Option<&Value>) -> Option<Value> {
    match value? {
        Value::String(s) if s == "json" => Some(json!({"type": "json_object"})),
        Value::String(s) if s.is_empty() => None,
        Value::Null => None,
        schema => Some(
            json!({"type": "json_schema", "json_schema": {"name": "format", "schema": schema}}),
        ),
    }
}

/// `think`: accepted only for templates that know reasoning.
/// `think`: accepted only for templates that know reasoning; it reaches the template as
/// `enable_thinking` (true/false) and, for a level, `reasoning_effort`.
fn think(
    served: &Served,
    value: Option<&Value>,
    model: &str,
    out: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let (wants, level) = match value {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Bool(b)) => (*b, None),
        Some(Value::String(level)) if ["low", "medium", "high"].contains(&level.as_str()) => {
            (true, Some(level.clone()))
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "think",
                format!(
                    "`think` must be true, false, or \"low\", \"medium\", \"high\"; got {other}"
                ),
            ))
        }
    };
    let knows = crate::tools::parse::knows_reasoning(served.loaded.template.source())
        || served.loaded.template.source().contains("enable_thinking");
    if wants && !knows {
        return Err(ApiError::invalid(
            "think",
            format!("\"{model}\" does not support thinking"),
        ));
    }
    out.insert(
        "chat_template_kwargs".into(),
        json!({"enable_thinking": wants}),
    );
    if let Some(level) = level {
        out.insert("reasoning_effort".into(), json!(level));
    }
    Ok(())
}

fn refuse_images(value: Option<&Value>, param: &str) -> Result<(), ApiError> {
    if value
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
    {
        return Err(ApiError::invalid(
            param,
            "this model takes text only: images are not supported",
        ));
    }
    Ok(())
}

/// A Go `template` in the request: this server renders the GGUF's Jinja template only.
fn refuse_template(body: &Value) -> Result<(), ApiError> {
    if body
        .get("template")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty())
    {
        return Err(ApiError::invalid(
            "template",
            "lm-sandbox renders the model's own Jinja chat template; an Ollama Go `template` \
             cannot be used (give a Jinja file with --chat-template-file or a preset)",
        ));
    }
    Ok(())
}

/// What an empty prompt means: load (`keep_alive: 0` unloads, and never gets here).
fn load_only(keep_alive: Option<&Value>) -> Result<&'static str, ApiError> {
    keep_alive.map(keep_alive_seconds).transpose()?;
    Ok("load")
}

fn string_field<'b>(body: &'b Value, field: &str) -> Result<Option<&'b str>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("`{field}` must be a string"),
        )),
    }
}

/// The fields chat and generate share.
fn common(served: &Served, body: &Value) -> Result<(String, Map<String, Value>, bool), ApiError> {
    refuse_template(body)?;
    let name = served.name.clone();
    let mut out = Map::new();
    out.insert("model".into(), json!(served.id()));
    // The store's `params` are the model's defaults; the request's options win.
    // Load-time options in the store's params (`num_ctx`) were applied when the model loaded.
    let mut merged: Map<String, Value> = served
        .card
        .found
        .params
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "num_ctx" | "num_gpu" | "main_gpu" | "num_thread" | "num_batch"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(given) = body.get("options").filter(|o| !o.is_null()) {
        let given = given
            .as_object()
            .ok_or_else(|| ApiError::invalid("options", "`options` must be an object"))?;
        merged.extend(given.clone());
    }
    options(served, Some(&Value::Object(merged)), &mut out)?;
    if let Some(format) = format(body.get("format")) {
        out.insert("response_format".into(), format);
    }
    let stream = match body.get("stream") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid("stream", "`stream` must be a boolean")),
    };
    think(served, body.get("think"), &name, &mut out)?;
    Ok((name, out, stream))
}

/// `/api/chat`.
pub fn chat(served: &Served, body: &Value) -> Result<Translated, OllamaError> {
    let (model, mut out, stream) = common(served, body)?;
    let messages = match body.get("messages") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(m)) => m.clone(),
        Some(_) => return Err(ApiError::invalid("messages", "`messages` must be an array").into()),
    };
    if messages.is_empty() {
        return Ok(Translated::load_only(model, stream, body)?);
    }
    let mut converted = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        refuse_images(message.get("images"), &format!("messages[{i}].images"))?;
        let mut m = Map::new();
        m.insert(
            "role".into(),
            message.get("role").cloned().unwrap_or(Value::Null),
        );
        m.insert(
            "content".into(),
            message.get("content").cloned().unwrap_or_else(|| json!("")),
        );
        if let Some(Value::Array(calls)) = message.get("tool_calls") {
            let calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(j, call)| {
                    let arguments = call
                        .pointer("/function/arguments")
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    let arguments = match arguments {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    json!({
                        "id": format!("call_{i}_{j}"),
                        "type": "function",
                        "function": {
                            "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
                            "arguments": arguments,
                        },
                    })
                })
                .collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(name) = message.get("tool_name").filter(|n| n.is_string()) {
            m.insert("name".into(), name.clone());
        }
        converted.push(Value::Object(m));
    }
    // The store's `system` layer is the default system prompt.
    if let Some(system) = &served.card.found.system {
        if !converted.iter().any(|m| m["role"] == "system") {
            converted.insert(0, json!({"role": "system", "content": system}));
        }
    }
    out.insert("messages".into(), Value::Array(converted));
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        out.insert("tools".into(), tools.clone());
    }
    // lm-sandbox's own: OpenAI's `tool_choice` (`required`, or `{"type": "function", ...}`) and
    // `parallel_tool_calls`.
    for field in ["tool_choice", "parallel_tool_calls"] {
        if let Some(value) = body.get(field).filter(|c| !c.is_null()) {
            out.insert(field.into(), value.clone());
        }
    }
    // lm-sandbox's own field, as in OpenAI requests: `{"shell": bool, "max_tool_rounds": n}`.
    if let Some(sandbox) = body.get("sandbox").filter(|s| !s.is_null()) {
        out.insert("sandbox".into(), sandbox.clone());
    }
    Ok(Translated {
        model,
        openai: Value::Object(out),
        stream,
        load_only: None,
        raw_prompt: None,
    })
}

/// `/api/generate`: a chat of `system` and `prompt` through the template, or with `raw` (or a
/// `suffix`, fill-in-the-middle) the prompt text itself.
pub fn generate(served: &Served, body: &Value) -> Result<Translated, OllamaError> {
    let (model, mut out, stream) = common(served, body)?;
    refuse_images(body.get("images"), "images")?;
    if body.get("context").is_some_and(|c| !c.is_null()) {
        tracing::info!(
            "Ollama `context` ignored: the prefix cache reuses earlier tokens by itself"
        );
    }
    let prompt = string_field(body, "prompt")?.unwrap_or("");
    let suffix = string_field(body, "suffix")?.filter(|s| !s.is_empty());
    let raw = body.get("raw").and_then(Value::as_bool).unwrap_or(false);
    if prompt.is_empty() && suffix.is_none() {
        return Ok(Translated::load_only(model, stream, body)?);
    }
    let raw_prompt = if let Some(suffix) = suffix {
        Some(fill_in_the_middle(served, prompt, suffix)?)
    } else if raw {
        Some(prompt.to_owned())
    } else {
        None
    };
    if raw_prompt.is_none() {
        let mut messages = Vec::new();
        let system = string_field(body, "system")?.filter(|s| !s.is_empty());
        if let Some(system) = system.or(served.card.found.system.as_deref()) {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        out.insert("messages".into(), Value::Array(messages));
    }
    Ok(Translated {
        model,
        openai: Value::Object(out),
        stream,
        load_only: None,
        raw_prompt,
    })
}

/// The model's fill-in-the-middle prompt, for vocabularies with StarCoder's FIM tokens.
fn fill_in_the_middle(served: &Served, prompt: &str, suffix: &str) -> Result<String, ApiError> {
    let loaded = &served.loaded;
    let single = |text: &str| loaded.info.tokenizer.tokenize(text, false).len() == 1;
    let markers = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"];
    if !markers.iter().all(|m| single(m)) {
        return Err(ApiError::invalid(
            "suffix",
            "this model has no fill-in-the-middle tokens: `suffix` cannot be used",
        ));
    }
    Ok(format!(
        "<fim_prefix>{prompt}<fim_suffix>{suffix}<fim_middle>"
    ))
}

/// Runs a generate request: through the chat path, or for a raw prompt through the completion
/// path's validation and budget.
pub async fn start_generate(
    state: &AppState,
    request_id: &str,
    request: &Translated,
) -> Result<StartedChat, ApiError> {
    let Some(text) = &request.raw_prompt else {
        // No key reaches here, so no shell loop starts.
        return super::super::chat::start_chat(state, request_id, None, &request.openai).await;
    };
    super::super::chat::start_raw(state, &request.openai, text).await
}

/// `/api/embed` (`input`) and `/api/embeddings` (`prompt`) as an OpenAI embeddings body.
pub fn embed(body: &Value, field: &str) -> Result<(String, Value), OllamaError> {
    let name = string_field(body, "model")?
        .ok_or_else(|| ApiError::invalid("model", "`model` is required"))?
        .to_owned();
    let id = name.clone();
    if body.get("truncate").and_then(Value::as_bool) == Some(true) {
        tracing::debug!("truncate: inputs over the context are refused, never cut");
    }
    let input = body
        .get(field)
        .cloned()
        .ok_or_else(|| ApiError::invalid(field, format!("`{field}` is required")))?;
    let mut openai = json!({"model": id, "input": input});
    if let Some(dimensions) = body.get("dimensions").filter(|d| !d.is_null()) {
        openai["dimensions"] = dimensions.clone();
    }
    Ok((name, openai))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_takes_seconds_durations_and_negatives() {
        assert_eq!(keep_alive_seconds(&json!(300)).unwrap(), Some(300.0));
        assert_eq!(keep_alive_seconds(&json!("5m")).unwrap(), Some(300.0));
        assert_eq!(keep_alive_seconds(&json!("1h30m")).unwrap(), Some(5400.0));
        assert_eq!(keep_alive_seconds(&json!("250ms")).unwrap(), Some(0.25));
        assert_eq!(keep_alive_seconds(&json!("0")).unwrap(), Some(0.0));
        assert_eq!(keep_alive_seconds(&json!(-1)).unwrap(), None);
        assert_eq!(keep_alive_seconds(&json!("-1m")).unwrap(), None);
        assert!(keep_alive_seconds(&json!("soon")).is_err());
        assert!(keep_alive_seconds(&json!(true)).is_err());
    }

    #[test]
    fn format_becomes_response_format() {
        assert_eq!(
            format(Some(&json!("json"))),
            Some(json!({"type": "json_object"}))
        );
        assert_eq!(format(Some(&json!(""))), None);
        let schema = json!({"type": "object"});
        assert_eq!(
            format(Some(&schema)).unwrap()["json_schema"]["schema"],
            schema
        );
    }
}
