//! `POST /v1/chat/completions`: messages through the model's chat template, streamed or not.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::auth::{Authenticated, RequestId};
use super::error::ApiError;
use super::extract::JsonObject;
use super::generate::{self, prepare, Prepared, PromptJob};
use super::reply::Replies;
use super::shell_loop;
use super::sse::{self, ChunkHeader};
use super::state::AppState;
use crate::tools::{response_format_grammar, ToolError, ToolRequest};

mod chunks;

use chunks::ChatChunks;

/// Chat-only request fields.
#[derive(Debug, Deserialize)]
struct ChatFields {
    messages: Vec<ChatMessage>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    /// lm-sandbox's extension: `{"shell": bool, "max_tool_rounds": n}`.
    sandbox: Option<shell_loop::SandboxFields>,
    /// OpenAI's reasoning effort, handed to the template (gpt-oss reads it).
    reasoning_effort: Option<String>,
    /// llama-server's extension: more variables for the chat template (`enable_thinking`).
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

impl ChatFields {
    /// The messages as the template sees them.
    fn template_messages(&self) -> Result<Vec<Value>, ApiError> {
        (0..)
            .zip(&self.messages)
            .map(|(i, m)| template_message(m, i))
            .collect()
    }

    /// The template variables the request sets: `chat_template_kwargs`, then `reasoning_effort`.
    fn template_variables(&self) -> Result<serde_json::Map<String, Value>, ApiError> {
        let mut extra = self.chat_template_kwargs.clone().unwrap_or_default();
        if let Some(reserved) = extra
            .keys()
            .find(|k| crate::template::RESERVED_VARIABLES.contains(&k.as_str()))
        {
            return Err(ApiError::invalid(
                "chat_template_kwargs",
                format!("`{reserved}` is set by the server and cannot be given"),
            ));
        }
        if let Some(effort) = &self.reasoning_effort {
            if !["minimal", "low", "medium", "high"].contains(&effort.as_str()) {
                return Err(ApiError::invalid(
                    "reasoning_effort",
                    format!(
                        "`reasoning_effort` must be minimal, low, medium or high; got {effort:?}"
                    ),
                ));
            }
            extra.insert("reasoning_effort".into(), json!(effort));
        }
        Ok(extra)
    }
}

impl From<ToolError> for ApiError {
    fn from(e: ToolError) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Function,
}

impl Role {
    /// The role name templates know. `developer` is OpenAI's newer name for `system`.
    fn template_name(self) -> &'static str {
        match self {
            Self::System | Self::Developer => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
            Self::Function => "function",
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: Role,
    #[serde(default)]
    content: Option<Value>,
    name: Option<String>,
    tool_calls: Option<Vec<Value>>,
    tool_call_id: Option<String>,
}

/// Flattens `content` (a string or an array of parts) to text, naming the field on errors.
fn content_text(content: &Value, at: usize) -> Result<String, ApiError> {
    let param = format!("messages[{at}].content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                let text = match kind {
                    "text" => part.get("text"),
                    "refusal" => part.get("refusal"),
                    "" => {
                        return Err(ApiError::invalid(
                            format!("{param}[{j}].type"),
                            "every content part needs a `type`",
                        ))
                    }
                    other => {
                        return Err(ApiError::invalid(
                            format!("{param}[{j}].type"),
                            format!("content parts of type `{other}` are not supported: this model takes text only"),
                        ))
                    }
                };
                let text = text.and_then(Value::as_str).ok_or_else(|| {
                    ApiError::invalid(
                        format!("{param}[{j}].{kind}"),
                        format!("a `{kind}` content part needs a string `{kind}`"),
                    )
                })?;
                texts.push(text);
            }
            Ok(texts.join("\n"))
        }
        _ => Err(ApiError::invalid(
            param,
            "`content` must be a string or an array of content parts",
        )),
    }
}

/// The message as the template sees it (Hugging Face's shape).
fn template_message(message: &ChatMessage, at: usize) -> Result<Value, ApiError> {
    let mut out = Map::new();
    out.insert("role".into(), json!(message.role.template_name()));
    let content = match &message.content {
        None | Some(Value::Null) => {
            let may_be_empty = message.role == Role::Assistant && message.tool_calls.is_some();
            if !may_be_empty {
                return Err(ApiError::invalid(
                    format!("messages[{at}].content"),
                    format!(
                        "messages[{at}] ({}) needs `content`",
                        message.role.template_name()
                    ),
                ));
            }
            Value::Null
        }
        Some(content) => Value::String(content_text(content, at)?),
    };
    out.insert("content".into(), content);
    if let Some(name) = &message.name {
        out.insert("name".into(), json!(name));
    }
    if let Some(calls) = &message.tool_calls {
        // Templates index `tool_call.function.arguments` as a mapping; OpenAI sends a JSON string.
        let calls: Vec<Value> = calls
            .iter()
            .map(|call| {
                let mut call = call.clone();
                if let Some(args) = call.pointer_mut("/function/arguments") {
                    if let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str(s).ok()) {
                        *args = parsed;
                    }
                }
                call
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if let Some(id) = &message.tool_call_id {
        out.insert("tool_call_id".into(), json!(id));
    }
    Ok(Value::Object(out))
}

/// A chat request's rendered prompt and its tokens, without running it (`/apply-template`,
/// `/v1/chat/completions/input_tokens`): the same checks and rendering as a real request, the
/// client's tools included. `model` may be left out: the served model is meant.
pub(super) async fn render_request(
    state: &AppState,
    body: &Value,
) -> Result<(String, Vec<crate::engine::Token>), ApiError> {
    let mut body = body.clone();
    if body.get("model").is_none() {
        body["model"] = json!(state.registry().default_model().unwrap_or_default());
    }
    let Prepared {
        loaded,
        fields: chat,
        ..
    } = prepare::<ChatFields>(state, &body).await?;
    if chat.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let tools = ToolRequest::from_request(
        chat.tools.as_ref(),
        chat.tool_choice.as_ref(),
        chat.parallel_tool_calls,
        loaded.template.source(),
    )?;
    let messages = chat.template_messages()?;
    super::prompt::rendered_off_runtime(loaded, messages, tools, chat.template_variables()?).await
}

/// A submitted chat request: its reply stream (a generation, or the server-side shell loop) for
/// the caller's dialect to shape.
pub(crate) struct StartedChat {
    /// The served name the client asked for.
    pub model: String,
    pub options: super::params::GenerationOptions,
    pub replies: Replies,
    /// The reply is the shell loop's: it may hold executions.
    pub shell: bool,
    /// The prompt's tokens (0 for the shell loop, whose rounds differ), before any is computed.
    pub prompt_tokens: u32,
}

pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    authenticated: Option<Extension<Authenticated>>,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let authenticated = authenticated.map(|Extension(a)| a);
    answer(&state, &request_id, authenticated.as_ref(), &body, None).await
}

/// A chat completion in OpenAI's shapes; `lmstudio` adds LM Studio's REST v0 fields.
pub(super) async fn answer(
    state: &AppState,
    request_id: &str,
    authenticated: Option<&Authenticated>,
    body: &Value,
    lmstudio: Option<Arc<Map<String, Value>>>,
) -> Result<Response, ApiError> {
    let StartedChat {
        model,
        options,
        replies,
        shell,
        ..
    } = start_chat(state, request_id, authenticated, body).await?;
    let mut header = ChunkHeader::chat(state, model, options.include_usage);
    header.lmstudio = lmstudio;
    header.shell = shell;
    let choices = replies.choices;
    let wants_logprobs = options.logprobs.is_some();
    sse::respond(
        replies,
        &options,
        header,
        "chat.completion",
        move |header| ChatChunks::new(header, choices),
        |i, c| {
            json!({
                "index": i,
                "message": c.message.to_json(),
                "logprobs": if wants_logprobs {
                    super::logprobs::chat(&c.logprobs)
                } else {
                    Value::Null
                },
                "finish_reason": c.finish.reason.openai(),
            })
        },
    )
    .await
}

/// What a request's `max_tokens` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Budget {
    /// A demand: one the context cannot hold is a 400 (OpenAI's dialects, Ollama, LM Studio).
    Exact,
    /// A cap: the reply ends where the context does (Anthropic's and Responses' agents).
    UpTo,
}

/// Everything a chat request does before its output is shaped: validation, tools, grammars, the
/// shell loop, the prompt, the budget and the submission. Shared by every dialect.
pub(super) async fn start_chat(
    state: &AppState,
    request_id: &str,
    authenticated: Option<&Authenticated>,
    body: &Value,
) -> Result<StartedChat, ApiError> {
    start_chat_as(state, request_id, authenticated, body, Budget::Exact).await
}

/// [`start_chat`], with `max_tokens` meaning what `budget` says.
pub(super) async fn start_chat_as(
    state: &AppState,
    request_id: &str,
    authenticated: Option<&Authenticated>,
    body: &Value,
    budget: Budget,
) -> Result<StartedChat, ApiError> {
    let state = state.clone();
    let Prepared {
        model,
        loaded,
        served,
        mut options,
        fields: chat,
    } = prepare::<ChatFields>(&state, body).await?;
    options.max_tokens_is_cap = budget == Budget::UpTo;
    if chat.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    if chat.logprobs == Some(true) {
        options.logprobs = Some(super::params::top_logprobs(
            "top_logprobs",
            chat.top_logprobs,
        )?);
    } else if chat.top_logprobs.is_some() {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs: true`",
        ));
    }
    let sandbox_request = chat.sandbox.clone().unwrap_or_default();
    let shell = shell_loop::wanted(
        &state,
        &sandbox_request,
        authenticated,
        request_id,
        options.n,
    )?;
    // With the shell loop, the built-in `shell` tool joins the client's (and may be named in
    // `tool_choice`).
    let declared = match &shell {
        Some(_) => Some(shell_loop::with_shell(chat.tools.as_ref(), &state)?),
        None => chat.tools.clone(),
    };
    let tools = ToolRequest::from_request(
        declared.as_ref(),
        chat.tool_choice.as_ref(),
        chat.parallel_tool_calls,
        loaded.template.source(),
    )?;
    let mut grammar = match chat.response_format.as_ref().filter(|f| !f.is_null()) {
        Some(format) => response_format_grammar(format)?,
        None => None,
    };
    if grammar.is_some() {
        options.grammar_param = "response_format";
    }
    if grammar.is_some() && options.sampling.grammar.is_some() {
        return Err(ApiError::invalid(
            "grammar",
            "a raw `grammar` cannot be combined with a JSON `response_format`",
        ));
    }
    if tools.is_none() && ToolRequest::reasoning_only(loaded.template.source()).is_some() {
        // Reasoning markers (`<think>`, harmony's channels) may be control tokens.
        options.special_tokens = true;
    }
    if let Some(tools) = &tools {
        // Markers like `[TOOL_CALLS]` and `<|python_tag|>` are control tokens: keep them as text.
        options.special_tokens = true;
        tools.check_schemas()?;
        if let Some(forced) = tools.grammar()? {
            // Markers this vocabulary holds as one token are forced as that token.
            let tokenizer = &loaded.info.tokenizer;
            let tokens: Vec<(&str, crate::engine::Token)> = crate::tools::CALL_MARKERS
                .iter()
                .filter(|m| forced.contains(&crate::tools::gbnf_escaped(m)))
                .filter_map(|&m| match tokenizer.tokenize(m, false).as_slice() {
                    [t] if tokenizer.piece(*t) == m.as_bytes() => Some((m, *t)),
                    _ => None,
                })
                .collect();
            let forced = crate::tools::markers_as_tokens(&forced, &tokens);
            if grammar.is_some() {
                return Err(ApiError::invalid(
                    "response_format",
                    "a JSON `response_format` cannot be combined with a forced `tool_choice`",
                ));
            }
            if options.sampling.grammar.is_some() {
                return Err(ApiError::invalid(
                    "grammar",
                    "a raw `grammar` cannot be combined with a forced `tool_choice`",
                ));
            }
            grammar = Some(forced);
            options.grammar_param = "tool_choice";
        }
    }
    if let Some(grammar) = grammar {
        options.sampling.grammar = Some(Arc::from(grammar));
    }
    let messages = chat.template_messages()?;
    // `tool_choice: "none"` leaves no tools, and so no loop.
    if let (Some(shell), Some(loop_tools)) = (shell, tools.clone()) {
        if chat
            .response_format
            .as_ref()
            .is_some_and(|f| f.get("type") != Some(&json!("text")))
        {
            return Err(ApiError::invalid(
                "response_format",
                "a JSON `response_format` cannot be combined with the server-side shell loop",
            ));
        }
        if options.logprobs.is_some() {
            return Err(ApiError::invalid(
                "logprobs",
                "`logprobs` cannot be combined with the server-side shell loop",
            ));
        }
        let loop_tools = Arc::new(loop_tools);
        let run = shell_loop::start(
            state.clone(),
            served,
            options.clone(),
            messages,
            loop_tools,
            shell,
        )
        .await?;
        return Ok(StartedChat {
            model,
            options,
            replies: run.replies(),
            shell: true,
            prompt_tokens: 0,
        });
    }
    let (prompt, tokens) = super::prompt::rendered_off_runtime(
        Arc::clone(&loaded),
        messages,
        tools.clone(),
        chat.template_variables()?,
    )
    .await?;
    // Without tools, a template that knows reasoning still has its reasoning parsed out; a
    // prompt that opens reasoning itself (`…assistant\n<think>\n`) starts the output inside it.
    let mut tools = tools.or_else(|| ToolRequest::reasoning_only(loaded.template.source()));
    if let Some(tools) = tools.as_mut() {
        tools.opened = crate::tools::parse::opened_reasoning(&prompt);
    }
    submit_prompt(&state, &served, tokens, options, tools)
}

/// Budgets `tokens` against the sequence's context and `--n-predict`, submits them, and reads
/// the reply through `tools` (its reasoning and calls parsed out) when there are some.
fn submit_prompt(
    state: &AppState,
    served: &super::state::Served,
    tokens: Vec<crate::engine::Token>,
    options: super::params::GenerationOptions,
    tools: Option<ToolRequest>,
) -> Result<StartedChat, ApiError> {
    let prompt_tokens = tokens.len() as u32;
    let max_new_tokens = options.budget(
        tokens.len(),
        served.loaded.info.n_ctx_seq,
        state.config().n_predict,
    )?;
    let job = PromptJob {
        tokens,
        max_new_tokens,
    };
    let receivers = generate::submit(&served.engine, vec![job], &options)?;
    let replies = Replies::generation(
        receivers,
        tools.map(Arc::new),
        options.n,
        options.grammar_param,
    );
    Ok(StartedChat {
        model: served.name.clone(),
        options,
        replies,
        shell: false,
        prompt_tokens,
    })
}

/// A prompt run as it is (no template): `openai` holds the model and sampling fields as a
/// completion request would. Ollama's `raw` and `suffix`, LM Studio's `complete`.
pub(super) async fn start_raw(
    state: &AppState,
    openai: &Value,
    text: &str,
) -> Result<StartedChat, ApiError> {
    let Prepared {
        loaded,
        served,
        options,
        ..
    } = prepare::<serde::de::IgnoredAny>(state, openai).await?;
    let tokens =
        super::prompt::tokenize_off_runtime(Arc::clone(&loaded), text.to_owned(), true).await?;
    submit_prompt(state, &served, tokens, options, None)
}
