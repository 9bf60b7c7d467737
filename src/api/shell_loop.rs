//! The server-side shell loop: with `serve --sandbox`, a chat request may let the server run the
//! model's `shell` calls itself. The model gets a built-in `shell` tool; each call it makes runs in
//! the sandbox (audited under the request's id and key), the result goes back as a `tool` message,
//! and generation continues until the model answers, calls a client tool, or `max_tool_rounds`
//! rounds of commands have run, which the reply then says plainly.
//!
//! Asking for it: `"sandbox": {"shell": true, "max_tool_rounds": n}` in the request, or a key
//! given with `--sandbox-auto-shell-key` (for clients that cannot send extra fields, such as
//! LM Studio pointed at this server). Only keys with the sandbox permission get it.
//!
//! What the client sees: the non-streamed response lists every execution in
//! `sandbox_executions`; a stream sends one chunk per execution, with an empty `delta` and the
//! execution in `sandbox_execution`, which OpenAI SDKs ignore. Usage sums every round.

use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::auth::Authenticated;
use super::error::ApiError;
use super::generate::{self, finish_reason, PromptJob, Timings, Usage};
use super::keys::Scope;
use super::params::{token_budget, GenerationOptions};
use super::prompt::tokens_off_runtime;
use super::sse::{error_event, ChunkHeader};
use super::{AppState, Served};
use crate::engine::{FinishReason, GenerationEvent, GenerationStats};
use crate::sandbox::output::CappedBuffer;
use crate::sandbox::{Caller, ExecRequest, Sandbox};
use crate::tools::stream::ToolStream;
use crate::tools::{tool_json, AssistantMessage, ToolCall, ToolChoice, ToolRequest, ToolSpec};

/// The built-in tool's name.
pub const SHELL_TOOL: &str = "shell";
/// `max_tool_rounds` when the request names none.
pub const DEFAULT_MAX_TOOL_ROUNDS: u32 = 8;
/// Bytes of each of stdout and stderr the model sees per command.
const RESULT_LIMIT: usize = 8 * 1024;

/// The request's `sandbox` object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxFields {
    pub shell: Option<bool>,
    pub max_tool_rounds: Option<u32>,
    /// A tenant of its own within the key (default: the key's one tenant).
    pub session: Option<String>,
}

/// A loop the request asked for (or its key is set up for).
pub struct ShellLoop {
    pub max_rounds: u32,
    pub caller: Caller,
    pub sandbox: Sandbox,
}

/// Whether this request runs the shell loop; errors for asking without the right key or server.
pub fn wanted(
    state: &AppState,
    fields: &SandboxFields,
    key: Option<&Authenticated>,
    request_id: &str,
    n: u32,
) -> Result<Option<ShellLoop>, ApiError> {
    let asked = fields.shell;
    let auto = key.is_some_and(|k| k.auto_shell);
    if !asked.unwrap_or(auto) {
        if fields.max_tool_rounds.is_some() && asked.is_none() && !auto {
            return Err(ApiError::invalid(
                "sandbox.max_tool_rounds",
                "`max_tool_rounds` applies to the shell loop: set `sandbox.shell` to true",
            ));
        }
        return Ok(None);
    }
    let Some(sandbox) = state.sandbox() else {
        return Err(ApiError::invalid(
            "sandbox.shell",
            "this server runs without --sandbox: it cannot run shell commands",
        ));
    };
    let key = key.cloned().unwrap_or_else(Authenticated::keyless);
    key.require(Scope::Sandbox)?;
    let cap = state.config().max_tool_rounds;
    let max_rounds = fields
        .max_tool_rounds
        .unwrap_or(DEFAULT_MAX_TOOL_ROUNDS.min(cap));
    if max_rounds == 0 || max_rounds > cap {
        return Err(ApiError::out_of_range(
            "sandbox.max_tool_rounds",
            &format!("between 1 and {cap} (--sandbox-max-tool-rounds)"),
            max_rounds,
        ));
    }
    if n != 1 {
        return Err(ApiError::invalid(
            "n",
            "the shell loop runs one conversation: `n` must be 1",
        ));
    }
    Ok(Some(ShellLoop {
        max_rounds,
        caller: Caller {
            request_id: request_id.to_owned(),
            key_id: Some(key.key_id.clone()),
            session: match &fields.session {
                Some(session) => {
                    crate::sandbox::validate_session(session)
                        .map_err(|e| ApiError::invalid("sandbox.session", e))?;
                    Some(session.clone())
                }
                None => None,
            },
            max_sessions: key.sandbox_sessions,
        },
        sandbox: sandbox.clone(),
    }))
}

/// The built-in `shell` tool.
pub fn shell_spec(max_timeout: Duration) -> ToolSpec {
    ToolSpec {
        name: SHELL_TOOL.into(),
        description: Some(
            "Run a bash command in an isolated Linux sandbox (Debian with python3 and git, working \
             directory /workspace, no network) and get its stdout, stderr and exit code."
                .into(),
        ),
        parameters: json!({
            "type": "object",
            "properties": {
                "command": {"type": "string", "description": "The bash command to run"},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                              "maximum": max_timeout.as_secs_f64(),
                              "description": "Seconds before the command is killed"}
            },
            "required": ["command"]
        }),
    }
}

/// The client's `tools` plus `shell` (a client tool of that name is a 400).
pub fn with_shell(tools: Option<&Value>, state: &AppState) -> Result<Value, ApiError> {
    let max_timeout = state
        .sandbox()
        .map_or(Duration::from_secs(300), |s| s.limits().max_timeout);
    let mut list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.clone(),
        Some(_) => return Err(ApiError::invalid("tools", "`tools` must be an array")),
    };
    if let Some(i) = list
        .iter()
        .position(|t| t.pointer("/function/name") == Some(&json!(SHELL_TOOL)))
    {
        return Err(ApiError::invalid(
            format!("tools[{i}].function.name"),
            "`shell` is the server's built-in tool in the shell loop; name yours differently",
        ));
    }
    list.push(tool_json(&shell_spec(max_timeout)));
    Ok(Value::Array(list))
}

/// One command the loop ran, as the response lists it.
fn execution_record(round: u32, call: &ToolCall, outcome: &Value) -> Value {
    let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
    json!({
        "round": round,
        "call_id": call.id,
        "command": arguments["command"],
        "timeout_s": arguments.get("timeout_s"),
        "result": outcome,
    })
}

/// Runs one `shell` call; returns (what the response shows, what the model reads).
async fn execute(shell: &ShellLoop, call: &ToolCall) -> (Value, String) {
    let arguments: Value = serde_json::from_str(&call.arguments).unwrap_or(Value::Null);
    let command = arguments["command"].as_str().unwrap_or("").to_owned();
    let limits = shell.sandbox.limits();
    let timeout = arguments["timeout_s"]
        .as_f64()
        .filter(|t| *t > 0.0)
        .map_or(limits.default_timeout, |t| {
            Duration::from_secs_f64(t).min(limits.max_timeout)
        });
    let request = ExecRequest {
        command,
        timeout,
        stdin: None,
    };
    match shell.sandbox.run(request, &shell.caller).await {
        Ok(out) => {
            let recap = |text: &str| {
                let mut b = CappedBuffer::new(RESULT_LIMIT);
                b.push(text.as_bytes());
                b.into_text()
            };
            let for_model = json!({
                "exit_code": out.exit_code, "signal": out.signal, "timed_out": out.timed_out,
                "truncated": out.truncated || out.stdout.len() > RESULT_LIMIT || out.stderr.len() > RESULT_LIMIT,
                "stdout": recap(&out.stdout), "stderr": recap(&out.stderr),
            });
            (json!(out), for_model.to_string())
        }
        Err(e) => {
            let error = json!({"error": e.to_string()});
            (error.clone(), error.to_string())
        }
    }
}

/// The messages a round adds: the assistant's shell calls, then one `tool` message per result.
fn round_messages(
    message: &AssistantMessage,
    calls: &[ToolCall],
    results: &[String],
) -> Vec<Value> {
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            let arguments: Value = serde_json::from_str(&c.arguments).unwrap_or(json!({}));
            json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
        })
        .collect();
    let mut out =
        vec![json!({"role": "assistant", "content": message.content, "tool_calls": tool_calls})];
    for (call, result) in calls.iter().zip(results) {
        out.push(json!({"role": "tool", "tool_call_id": call.id, "content": result}));
    }
    out
}

/// Submits one round. `Ok(None)`: the conversation no longer fits (after the first round).
async fn submit_round(
    state: &AppState,
    served: &Served,
    messages: &[Value],
    tools: &ToolRequest,
    options: &GenerationOptions,
    round: u32,
) -> Result<Option<mpsc::Receiver<GenerationEvent>>, ApiError> {
    let loaded = &served.loaded;
    let tokens =
        tokens_off_runtime(Arc::clone(loaded), messages.to_vec(), Some(tools.clone())).await?;
    let budget = token_budget(
        tokens.len(),
        options.max_tokens,
        loaded.info.n_ctx_seq,
        state.config().n_predict,
    );
    let max_new_tokens = match budget {
        Ok(b) => b,
        Err(e) if round == 0 => return Err(e),
        Err(_) => return Ok(None),
    };
    let job = PromptJob {
        tokens,
        max_new_tokens,
    };
    let mut receivers = generate::submit(&served.engine, vec![job], options)?;
    Ok(receivers.pop())
}

/// After the first round the model chooses freely: a forced choice (and its grammar) would never
/// let it answer.
fn free_choice(tools: &mut ToolRequest, options: &mut GenerationOptions) {
    if tools.choice != ToolChoice::Auto {
        tools.choice = ToolChoice::Auto;
        options.sampling.grammar = None;
    }
}

fn stopped_note(rounds: u32) -> String {
    format!(
        "[lm-sandbox: stopped after {rounds} round(s) of shell commands (max_tool_rounds); the model had not given its answer yet]"
    )
}

const CONTEXT_NOTE: &str =
    "[lm-sandbox: stopped: the conversation with the command results no longer fits the context]";

pub(super) fn append_note(content: Option<String>, note: &str) -> Option<String> {
    Some(match content {
        Some(c) if !c.trim().is_empty() => format!("{c}\n{note}"),
        _ => note.to_owned(),
    })
}

/// A shell loop whose first round is submitted: its mistakes (context, queue) were proper 4xx
/// responses, not in-band stream errors. Each dialect consumes its events.
pub struct LoopRun {
    rounds: Rounds,
    first: mpsc::Receiver<GenerationEvent>,
}

/// Submits the first round of a shell loop.
pub async fn start(
    state: AppState,
    served: Served,
    options: GenerationOptions,
    messages: Vec<Value>,
    tools: Arc<ToolRequest>,
    shell: ShellLoop,
) -> Result<LoopRun, ApiError> {
    let first = submit_round(&state, &served, &messages, &tools, &options, 0)
        .await?
        .expect("the first round either fits or is an error");
    Ok(LoopRun {
        rounds: Rounds {
            state,
            served,
            options,
            messages,
            tools: (*tools).clone(),
            shell,
        },
        first,
    })
}

impl LoopRun {
    /// Runs the loop with `consume` reading its events: in a task of its own when `detached` (a
    /// stream, whose consumer ends when the client goes), else inside this future, so a client
    /// that goes away drops it (and cancels the generation) as for any other request.
    pub async fn drive_with<T>(
        self,
        detached: bool,
        consume: impl std::future::Future<Output = T>,
        events: mpsc::Sender<LoopEvent>,
    ) -> T {
        if detached {
            // Later rounds acquire the model and submit as the request's caller (its model
            // allowlist, its token rate).
            tokio::spawn(super::auth::keeping_caller(
                self.rounds.drive(self.first, events),
            ));
            consume.await
        } else {
            tokio::join!(self.rounds.drive(self.first, events), consume).1
        }
    }
}

/// The OpenAI answer of a started loop: SSE chunks, or one chat completion.
pub async fn respond(state: &AppState, model: String, run: LoopRun) -> Result<Response, ApiError> {
    let options = &run.rounds.options;
    let header = ChunkHeader::chat(state, model, options.include_usage);
    let include_usage = options.include_usage;
    let stream = options.stream;
    // A small buffer: the loop waits for its consumer, so a slow client slows the loop.
    let (tx, rx) = mpsc::channel::<LoopEvent>(LOOP_EVENTS);
    if stream {
        let (events, out) = mpsc::channel::<Event>(64);
        let keep_alive = header.keep_alive;
        run.drive_with(true, async {}, tx).await;
        tokio::spawn(to_sse(header, include_usage, rx, events));
        return Ok(super::sse::body(out, keep_alive));
    }
    run.drive_with(false, to_json(header, rx), tx).await
}

/// Events a loop may send ahead of its consumer.
pub const LOOP_EVENTS: usize = 16;

/// What the round loop reports, in order: any number of `Deltas` and `Execution`s, then exactly
/// one `Finished` or `Failed`.
pub enum LoopEvent {
    /// Content or reasoning that can no longer become a call, as it settles (streamed at once).
    Deltas(Vec<Value>),
    /// A `shell` command the loop ran: its record for the response.
    Execution(Value),
    /// The answer: the last round's message (only the client's own calls left in it), its
    /// finish reason, a note to append when the loop stopped early, and the totals.
    Finished {
        message: AssistantMessage,
        reason: &'static str,
        note: Option<String>,
        stats: GenerationStats,
        usage: Usage,
    },
    Failed(ApiError),
}

/// One shell loop's state: the conversation so far and what each round needs.
struct Rounds {
    state: AppState,
    served: Served,
    options: GenerationOptions,
    messages: Vec<Value>,
    tools: ToolRequest,
    shell: ShellLoop,
}

impl Rounds {
    /// The one round loop: generate, parse, run the `shell` calls, feed their results back, repeat
    /// until the model answers, calls a client tool, the context is full or the bound is hit.
    /// Ends early, silently, when `events`' consumer is gone.
    async fn drive(
        mut self,
        first: mpsc::Receiver<GenerationEvent>,
        events: mpsc::Sender<LoopEvent>,
    ) {
        let mut usage = Usage::default();
        let mut round = 0;
        let mut receiver = first;
        loop {
            let mut stream = ToolStream::new();
            let finished = loop {
                let next = tokio::select! {
                    // The consumer is gone: dropping the receiver cancels the sequence.
                    _ = events.closed() => return,
                    next = receiver.recv() => next,
                };
                match next {
                    Some(GenerationEvent::Text(text)) => {
                        let deltas = stream.push(&text, &self.tools);
                        if !deltas.is_empty()
                            && events.send(LoopEvent::Deltas(deltas)).await.is_err()
                        {
                            return;
                        }
                    }
                    // The loop refuses `logprobs`, so none are computed.
                    Some(GenerationEvent::Logprobs(_)) => {}
                    Some(GenerationEvent::Done { reason, stats }) => break Ok((reason, stats)),
                    Some(GenerationEvent::Rejected(message)) => {
                        break Err(ApiError::invalid(self.options.grammar_param, message))
                    }
                    Some(GenerationEvent::Failed(message)) => {
                        break Err(ApiError::EngineFailed(message))
                    }
                    None => break Err(ApiError::EngineFailed(generate::ENGINE_STOPPED.into())),
                }
            };
            let (reason, stats) = match finished {
                Ok(done) => done,
                Err(error) => {
                    let _ = events.send(LoopEvent::Failed(error)).await;
                    return;
                }
            };
            usage.add(&stats, true);
            // The same final parse as a non-streamed reply (invariant 17); calls are not
            // streamed from here: the client's own are part of `Finished`.
            let (deltas, mut message, _) =
                stream.finish(&self.tools, reason == FinishReason::Length);
            let settled: Vec<Value> = deltas
                .into_iter()
                .filter(|d| d.get("tool_calls").is_none())
                .collect();
            if !settled.is_empty() && events.send(LoopEvent::Deltas(settled)).await.is_err() {
                return;
            }
            let (shell_calls, client_calls): (Vec<ToolCall>, Vec<ToolCall>) = message
                .tool_calls
                .drain(..)
                .partition(|c| c.name == SHELL_TOOL);
            message.tool_calls = client_calls;
            let reason_text = if message.tool_calls.is_empty() {
                finish_reason(reason)
            } else {
                "tool_calls"
            };
            let finish = |message, note| LoopEvent::Finished {
                message,
                reason: reason_text,
                note,
                stats,
                usage,
            };
            if shell_calls.is_empty() {
                let _ = events.send(finish(message, None)).await;
                return;
            }
            if round == self.shell.max_rounds {
                let _ = events
                    .send(finish(message, Some(stopped_note(round))))
                    .await;
                return;
            }
            round += 1;
            let mut results = Vec::new();
            for call in &shell_calls {
                let (shown, for_model) = execute(&self.shell, call).await;
                let record = execution_record(round, call, &shown);
                if events.send(LoopEvent::Execution(record)).await.is_err() {
                    return;
                }
                results.push(for_model);
            }
            self.messages
                .extend(round_messages(&message, &shell_calls, &results));
            if !message.tool_calls.is_empty() {
                let _ = events.send(finish(message, None)).await;
                return;
            }
            free_choice(&mut self.tools, &mut self.options);
            match submit_round(
                &self.state,
                &self.served,
                &self.messages,
                &self.tools,
                &self.options,
                round,
            )
            .await
            {
                Ok(Some(next)) => receiver = next,
                Ok(None) => {
                    let _ = events
                        .send(finish(message, Some(CONTEXT_NOTE.to_owned())))
                        .await;
                    return;
                }
                Err(error) => {
                    let _ = events.send(LoopEvent::Failed(error)).await;
                    return;
                }
            }
        }
    }
}

/// The non-streamed consumer: one chat completion with every execution listed.
async fn to_json(
    header: ChunkHeader,
    mut events: mpsc::Receiver<LoopEvent>,
) -> Result<Response, ApiError> {
    let mut executions = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            LoopEvent::Deltas(_) => {}
            LoopEvent::Execution(record) => executions.push(record),
            LoopEvent::Failed(error) => return Err(error),
            LoopEvent::Finished {
                mut message,
                reason,
                note,
                stats,
                usage,
            } => {
                if let Some(note) = note {
                    message.content = append_note(message.content, &note);
                }
                return Ok(axum::Json(json!({
                    "id": header.id,
                    "object": "chat.completion",
                    "created": header.created,
                    "model": header.model,
                    "system_fingerprint": header.fingerprint,
                    "choices": [{"index": 0, "message": message.to_json(), "logprobs": null, "finish_reason": reason}],
                    "usage": usage,
                    "timings": Timings::from(&stats),
                    "sandbox_executions": executions,
                }))
                .into_response());
            }
        }
    }
    Err(ApiError::EngineFailed(generate::ENGINE_STOPPED.into()))
}

fn event(value: &Value) -> Event {
    Event::default().data(value.to_string())
}

fn delta_chunk(header: &ChunkHeader, delta: Value, extra: Option<(&str, Value)>) -> Value {
    header.chunk(
        json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]),
        extra,
    )
}

/// The streamed consumer: OpenAI's chunks, one extra chunk per execution, then the client's calls,
/// the note, the finish, usage and `[DONE]`. Returning drops `events`, which stops the loop.
async fn to_sse(
    header: ChunkHeader,
    include_usage: bool,
    mut events: mpsc::Receiver<LoopEvent>,
    tx: mpsc::Sender<Event>,
) {
    let send = |value: Value| {
        let tx = tx.clone();
        async move { tx.send(event(&value)).await.is_ok() }
    };
    let opening = delta_chunk(
        &header,
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    );
    if !send(opening).await {
        return;
    }
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = events.recv() => next,
        };
        let Some(next) = next else {
            let error = ApiError::EngineFailed(generate::ENGINE_STOPPED.into());
            let _ = tx.send(error_event(&error)).await;
            return;
        };
        match next {
            LoopEvent::Deltas(deltas) => {
                for delta in deltas {
                    if !send(delta_chunk(&header, delta, None)).await {
                        return;
                    }
                }
            }
            LoopEvent::Execution(record) => {
                if !send(delta_chunk(
                    &header,
                    json!({}),
                    Some(("sandbox_execution", record)),
                ))
                .await
                {
                    return;
                }
            }
            LoopEvent::Failed(error) => {
                let _ = tx.send(error_event(&error)).await;
                return;
            }
            LoopEvent::Finished {
                message,
                reason,
                note,
                stats,
                usage,
            } => {
                for (index, call) in message.tool_calls.iter().enumerate() {
                    let first = json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                       "function": {"name": call.name, "arguments": ""}}]});
                    let args = json!({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]});
                    if !send(delta_chunk(&header, first, None)).await
                        || !send(delta_chunk(&header, args, None)).await
                    {
                        return;
                    }
                }
                if let Some(note) = note {
                    // As `append_note` words it in the non-streamed reply: on a line of its own
                    // after the final round's content.
                    let content_sent = message
                        .content
                        .as_deref()
                        .is_some_and(|c| !c.trim().is_empty());
                    let text = if content_sent {
                        format!("\n{note}")
                    } else {
                        note
                    };
                    if !send(delta_chunk(&header, json!({"content": text}), None)).await {
                        return;
                    }
                }
                let finish = header.chunk(
                    json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": reason}]),
                    Some(("timings", json!(Timings::from(&stats)))),
                );
                if !send(finish).await {
                    return;
                }
                if include_usage
                    && !send(header.chunk(Value::Array(Vec::new()), Some(("usage", json!(usage)))))
                        .await
                {
                    return;
                }
                let _ = tx.send(Event::default().data("[DONE]")).await;
                return;
            }
        }
    }
}
