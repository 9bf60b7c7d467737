//! From request bodies to engine submissions: the common fields and the model's defaults, then
//! admission (429/503). What comes back is read through [`super::reply`].

use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::extract::parse;
use super::params::{CommonFields, GenerationOptions};
use super::state::{AppState, Loaded, Served};
use crate::engine::{EngineHandle, GenerationEvent, GenerationRequest, SubmitError, Token};
use crate::registry::preset::ToolChoicePreset;
use crate::registry::ModelCard;

/// A request body parsed and checked against the loaded model, before its prompt is built.
pub struct Prepared<T> {
    /// The served name the client asked for.
    pub model: String,
    pub loaded: std::sync::Arc<Loaded>,
    /// The model, its engine and its card.
    pub served: Served,
    pub options: GenerationOptions,
    /// The endpoint's own fields.
    pub fields: T,
}

/// The steps every generation endpoint starts with: the model name (400 when missing, 404 when
/// unknown), the loaded model (503), the model's defaults under the request's fields, then the
/// common and the endpoint's fields, each parsed once, and the shared ranges (400).
pub async fn prepare<T: DeserializeOwned>(
    state: &AppState,
    body: &Value,
) -> Result<Prepared<T>, ApiError> {
    let name = match body.get("model") {
        Some(Value::String(name)) => name,
        // The full parse names the problem as it would for any field.
        _ => {
            parse::<CommonFields>(body)?;
            return Err(ApiError::invalid("model", "`model` must be a string"));
        }
    };
    let served = state.model(name).await?;
    // The model's defaults (a store's params and system prompt, a preset's) under the request's:
    // a copy of the body only for a model that has some.
    let defaulted = with_defaults(body, &served.card);
    let body = defaulted.as_ref().unwrap_or(body);
    let common: CommonFields = parse(body)?;
    let fields: T = parse(body)?;
    let options = common.validate(served.loaded.info.n_vocab)?;
    Ok(Prepared {
        model: served.name.clone(),
        loaded: std::sync::Arc::clone(&served.loaded),
        served,
        options,
        fields,
    })
}

/// `body` with the model's default options (Ollama's names, as a `params` layer or a preset has
/// them) where the request sets none, and its default system prompt before chat messages that
/// have none; `None` when the model has no defaults.
fn with_defaults(body: &Value, card: &ModelCard) -> Option<Value> {
    let params = &card.found.params;
    let system = card.found.system.as_deref();
    let force = card.preset.tool_choice == Some(ToolChoicePreset::Required);
    if params.is_empty() && system.is_none() && !force {
        return None;
    }
    let mut out = body.clone();
    let object = out.as_object_mut()?;
    for (key, value) in params {
        let to = match key.as_str() {
            "temperature" | "top_p" | "top_k" | "min_p" | "seed" | "stop" | "repeat_penalty"
            | "repeat_last_n" | "presence_penalty" | "frequency_penalty" => key.as_str(),
            "num_predict" if value.as_i64().is_some_and(|n| n > 0) => "max_tokens",
            // Load-time and unsupported options: the Ollama dialect reports them.
            _ => continue,
        };
        let taken = object.contains_key(to)
            || (to == "max_tokens" && object.contains_key("max_completion_tokens"));
        if !taken {
            object.insert(to.to_owned(), value.clone());
        }
    }
    // A preset's `tool-choice = "required"`: a user turn with tools must call one.
    let user_turn = object
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "user");
    let has_tools = object
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if force && user_turn && has_tools && !object.contains_key("tool_choice") {
        object.insert("tool_choice".into(), json!("required"));
    }
    if let (Some(system), Some(Value::Array(messages))) = (system, object.get_mut("messages")) {
        if !messages.iter().any(|m| m["role"] == "system") {
            messages.insert(0, json!({"role": "system", "content": system}));
        }
    }
    Some(out)
}

/// Most log-probability entries (each sampled token and each alternative, over every choice) one
/// answer may carry: ~100 bytes of JSON each.
pub const MAX_LOGPROB_ENTRIES: u64 = 1 << 19;

/// One prompt, tokenized, with its token budget.
pub struct PromptJob {
    pub tokens: Vec<Token>,
    pub max_new_tokens: u32,
}

/// Submits `n` choices per prompt; choice `i * n + j` is prompt `i`'s `j`-th. All or nothing: if one
/// cannot be queued, the ones already queued are dropped (their receivers close, so the engine
/// skips them) and the whole request is refused.
pub fn submit(
    engine: &EngineHandle,
    jobs: Vec<PromptJob>,
    options: &GenerationOptions,
) -> Result<Vec<mpsc::Receiver<GenerationEvent>>, ApiError> {
    let total = jobs.len().saturating_mul(options.n as usize);
    let capacity = engine.queue_capacity();
    if total > capacity {
        // Never admissible, so not a 429: retrying cannot help.
        return Err(ApiError::invalid(
            "n",
            format!(
                "{} prompt(s) × n = {} makes {total} sequences, more than the {capacity} this \
                 server queues at once (--max-queue); lower `n` or send fewer prompts",
                jobs.len(),
                options.n
            ),
        ));
    }
    if let Some(top) = options.logprobs {
        let entries: u64 = jobs
            .iter()
            .map(|j| u64::from(j.max_new_tokens) * u64::from(options.n) * (u64::from(top) + 1))
            .sum();
        if entries > MAX_LOGPROB_ENTRIES {
            return Err(ApiError::invalid(
                "logprobs",
                format!(
                    "log-probabilities for up to {entries} tokens and alternatives (choices × \
                     max_tokens × (top_logprobs + 1)) is more than the limit of \
                     {MAX_LOGPROB_ENTRIES} per request; lower `n`, `max_tokens` or `top_logprobs`"
                ),
            ));
        }
    }
    // The caller's token rate, if any, is charged as each sequence ends.
    let usage = super::auth::current_caller().and_then(|caller| caller.usage_sink());
    let mut receivers = Vec::with_capacity(total);
    for job in jobs {
        for j in 0..options.n {
            let mut sampling = options.sampling.clone();
            // With a fixed seed, `n` choices still differ from each other, reproducibly.
            sampling.seed = sampling.seed.map(|seed| seed.wrapping_add(j));
            let request = GenerationRequest {
                prompt: job.tokens.clone(),
                sampling,
                max_new_tokens: job.max_new_tokens,
                stop: options.stop.clone(),
                special_tokens: options.special_tokens,
                logprobs: options.logprobs,
                usage: usage.clone(),
            };
            let rx = engine.submit(request).map_err(|err| match err {
                SubmitError::QueueFull => ApiError::QueueFull,
                SubmitError::Unavailable => ApiError::Unavailable(err.to_string()),
            })?;
            receivers.push(rx);
        }
    }
    Ok(receivers)
}

/// A random id with OpenAI's prefixes (`chatcmpl-`, `cmpl-`).
pub fn response_id(prefix: &str) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    format!(
        "{prefix}-{}",
        Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
