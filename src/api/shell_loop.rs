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
//! The loop is a reply stream like any generation (`reply`): each dialect shows its executions
//! its own way. OpenAI's non-streamed response lists every execution in `sandbox_executions`; a
//! stream sends one chunk per execution, with an empty `delta` and the execution in
//! `sandbox_execution`, which OpenAI SDKs ignore. Usage sums every round.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::auth::Authenticated;
use super::error::ApiError;
use super::generate::{self, PromptJob};
use super::keys::Scope;
use super::params::GenerationOptions;
use super::prompt::tokens_off_runtime;
use super::reply::{call_events, Finish, Reason, Replies, ReplyEvent, Usage, ENGINE_STOPPED};
use super::state::{AppState, Served};
use crate::engine::GenerationEvent;
use crate::sandbox::output::CappedBuffer;
use crate::sandbox::{Caller, ExecRequest, Sandbox};
use crate::tools::{tool_json, ToolCall, ToolChoice, ToolRequest, ToolSpec};

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
    let arguments = &call.arguments;
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
    let arguments = &call.arguments;
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
        cancel: None,
        live: None,
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
fn round_messages(content: &str, calls: &[ToolCall], results: &[String]) -> Vec<Value> {
    let tool_calls: Vec<Value> = calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    let content = (!content.is_empty()).then_some(content);
    let mut out = vec![json!({"role": "assistant", "content": content, "tool_calls": tool_calls})];
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
    let budget = options.budget(
        tokens.len(),
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

/// A shell loop whose first round is submitted: its mistakes (context, queue) were proper 4xx
/// responses, not in-band stream errors.
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

/// Events a loop may send ahead of its consumer: a small buffer, so a slow client slows the loop.
const LOOP_EVENTS: usize = 16;

impl LoopRun {
    /// The loop's reply (one choice). The loop runs in a task of its own, as the request's caller
    /// (later rounds acquire the model and submit under its model allowlist and token rate), and
    /// stops when the reply is dropped: the client went away.
    pub fn replies(self) -> Replies {
        let (tx, rx) = mpsc::channel(LOOP_EVENTS);
        tokio::spawn(super::auth::keeping_caller(
            self.rounds.drive(self.first, tx),
        ));
        Replies::from_channel(rx, 1)
    }
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

/// Where the loop's reply events go.
type Events = mpsc::Sender<(u32, ReplyEvent)>;

impl Rounds {
    /// The one round loop: generate, parse, run the `shell` calls, feed their results back, repeat
    /// until the model answers, calls a client tool, the context is full or the bound is hit.
    /// Reasoning and content go out as each round settles them; the client's own calls, a note
    /// when the loop stopped early, and the finish (usage summed over the rounds) come last. Ends
    /// early, silently, when `events`' consumer is gone.
    async fn drive(mut self, first: mpsc::Receiver<GenerationEvent>, events: Events) {
        let send = |event: ReplyEvent| {
            let events = events.clone();
            async move { events.send((0, event)).await.is_ok() }
        };
        let mut usage = Usage::default();
        let mut round = 0;
        let mut receiver = first;
        loop {
            let tools = Arc::new(self.tools.clone());
            let mut replies =
                Replies::generation(vec![receiver], Some(tools), 1, self.options.grammar_param);
            let mut content = String::new();
            let mut calls = Vec::new();
            let finish = loop {
                let next = tokio::select! {
                    // The consumer is gone: dropping the reply cancels the sequence.
                    _ = events.closed() => return,
                    next = replies.next() => next,
                };
                let event = match next {
                    Some((_, ReplyEvent::Finish(finish))) => break finish,
                    Some((_, ReplyEvent::ToolCallDone(call))) => {
                        calls.push(call);
                        continue;
                    }
                    Some((_, ReplyEvent::ToolCallStarted { .. }))
                    | Some((_, ReplyEvent::ToolCallArguments { .. })) => continue,
                    Some((_, ReplyEvent::Error(error))) => {
                        let _ = send(ReplyEvent::Error(error)).await;
                        return;
                    }
                    None => {
                        let error = ApiError::EngineFailed(ENGINE_STOPPED.into());
                        let _ = send(ReplyEvent::Error(error)).await;
                        return;
                    }
                    Some((_, event)) => event,
                };
                if let ReplyEvent::Content(text) = &event {
                    content.push_str(text);
                }
                if !send(event).await {
                    return;
                }
            };
            usage = usage + finish.usage;
            let (shell_calls, client_calls): (Vec<ToolCall>, Vec<ToolCall>) =
                calls.into_iter().partition(|c| c.name == SHELL_TOOL);
            // Calls the loop ran itself are not the client's: without client calls, the turn
            // ended as any answer does.
            let reason = match finish.reason {
                Reason::ToolCalls if client_calls.is_empty() => Reason::Stop,
                reason => reason,
            };
            let end = |client_calls: Vec<ToolCall>, note: Option<String>| {
                let mut out = call_events(client_calls);
                if let Some(note) = note {
                    // On a line of its own after the final round's content.
                    let text = if content.trim().is_empty() {
                        note
                    } else {
                        format!("\n{note}")
                    };
                    out.push(ReplyEvent::Content(text));
                }
                out.push(ReplyEvent::Finish(Finish {
                    reason,
                    stats: finish.stats,
                    usage,
                }));
                out
            };
            let finished = if shell_calls.is_empty() {
                Some(end(client_calls.clone(), None))
            } else if round == self.shell.max_rounds {
                Some(end(client_calls.clone(), Some(stopped_note(round))))
            } else {
                None
            };
            if let Some(last) = finished {
                for event in last {
                    if !send(event).await {
                        return;
                    }
                }
                return;
            }
            round += 1;
            let mut results = Vec::new();
            for call in &shell_calls {
                let started = ReplyEvent::ExecutionStarted {
                    round,
                    call: call.clone(),
                };
                if !send(started).await {
                    return;
                }
                let (shown, for_model) = execute(&self.shell, call).await;
                let record = execution_record(round, call, &shown);
                if !send(ReplyEvent::ExecutionFinished(record)).await {
                    return;
                }
                results.push(for_model);
            }
            self.messages
                .extend(round_messages(&content, &shell_calls, &results));
            if !client_calls.is_empty() {
                for event in end(client_calls, None) {
                    if !send(event).await {
                        return;
                    }
                }
                return;
            }
            free_choice(&mut self.tools, &mut self.options);
            let next = submit_round(
                &self.state,
                &self.served,
                &self.messages,
                &self.tools,
                &self.options,
                round,
            )
            .await;
            match next {
                Ok(Some(next)) => receiver = next,
                Ok(None) => {
                    for event in end(Vec::new(), Some(CONTEXT_NOTE.to_owned())) {
                        if !send(event).await {
                            return;
                        }
                    }
                    return;
                }
                Err(error) => {
                    let _ = send(ReplyEvent::Error(error)).await;
                    return;
                }
            }
        }
    }
}
