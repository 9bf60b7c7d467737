//! The request fields chat and completions share, and their validation into engine terms.
//!
//! OpenAI's words (`max_tokens`, `frequency_penalty`) stop here; what leaves is a
//! [`SamplingParams`] and a token budget. Every range error names the field, the limit and the value.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;
use crate::engine::{SamplingParams, Token};

/// At most this many stop strings (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes: text that may begin a stop string is held back, so a longer one
/// would delay the stream by that much and cost that much per token.
pub const MAX_STOP_BYTES: usize = 1024;
/// At most this many choices per request (OpenAI's limit for `n`).
pub const MAX_CHOICES: i64 = 128;

/// Fields common to `/v1/chat/completions` and `/v1/completions`. Unknown fields are ignored, as
/// OpenAI clients send many.
#[derive(Debug, Deserialize)]
pub struct CommonFields {
    /// Required and a string (a 400 naming it otherwise); `generate::prepare` has already looked
    /// the model up by the body's own field before the common fields are parsed.
    #[allow(dead_code)]
    pub model: String,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// llama-server extension.
    pub top_k: Option<i64>,
    /// llama-server extension.
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    /// llama-server extension.
    pub repeat_penalty: Option<f64>,
    /// llama-server extension.
    pub repeat_last_n: Option<i64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// llama-server extension: a GBNF grammar (root rule `root`) the output must match.
    pub grammar: Option<String>,
}

/// Longest raw `grammar` accepted.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Validated common fields.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub sampling: SamplingParams,
    /// `max_completion_tokens`, else `max_tokens`; `None` lets generation run to the context limit.
    pub max_tokens: Option<u32>,
    /// `max_tokens` is a cap, not a demand: a request whose prompt leaves less room generates
    /// what fits (the agents' dialects: Claude Code asks for 32,000 whatever the model) rather
    /// than being refused, as OpenAI's dialects are.
    pub max_tokens_is_cap: bool,
    pub stop: Vec<String>,
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
    /// Control tokens come out as text (set when tool calls are parsed).
    pub special_tokens: bool,
    /// The field a grammar refused while sampling is blamed on: `grammar`, `response_format` or
    /// `tool_choice`, whichever the grammar came from.
    pub grammar_param: &'static str,
    /// Report log-probabilities with this many alternatives per token (set by each endpoint from
    /// its own fields: chat's `logprobs`/`top_logprobs`, completions' `logprobs`).
    pub logprobs: Option<u8>,
}

fn range_f32(
    param: &str,
    value: Option<f64>,
    min: f64,
    max: f64,
    default: f32,
) -> Result<f32, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v.is_finite() && (min..=max).contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::out_of_range(
            param,
            &format!("between {min} and {max}"),
            v,
        )),
    }
}

fn positive_u32(param: &str, value: Option<i64>) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if (1..=i64::from(u32::MAX)).contains(&v) => Ok(Some(v as u32)),
        Some(v) => Err(ApiError::out_of_range(param, "at least 1", v)),
    }
}

impl CommonFields {
    /// Checks every range and translates to engine terms. `n_vocab` bounds `logit_bias` keys.
    pub fn validate(&self, n_vocab: i32) -> Result<GenerationOptions, ApiError> {
        let temperature = range_f32("temperature", self.temperature, 0.0, 2.0, 1.0)?;
        let top_p = range_f32("top_p", self.top_p, 0.0, 1.0, 1.0)?;
        let min_p = range_f32("min_p", self.min_p, 0.0, 1.0, 0.0)?;
        let frequency_penalty =
            range_f32("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?;
        let presence_penalty =
            range_f32("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?;
        let repeat_penalty = range_f32("repeat_penalty", self.repeat_penalty, 0.0, 10.0, 1.0)?;
        let top_k = match self.top_k {
            None => 0,
            Some(k) if (0..=i64::from(n_vocab)).contains(&k) => k as i32,
            Some(k) => {
                return Err(ApiError::out_of_range(
                    "top_k",
                    &format!("between 0 and {n_vocab}"),
                    k,
                ))
            }
        };
        let penalty_last_n = match self.repeat_last_n {
            None => 64,
            Some(n) if (-1..=1_000_000).contains(&n) => n as i32,
            Some(n) => return Err(ApiError::out_of_range("repeat_last_n", "-1 or more", n)),
        };
        // llama.cpp seeds are 32-bit; larger seeds are folded, as llama-server does.
        let seed = self.seed.map(|s| s as u32);
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let param = format!("logit_bias.{key}");
            let token: Token = key
                .parse()
                .ok()
                .filter(|t| (0..n_vocab).contains(t))
                .ok_or_else(|| {
                    ApiError::invalid(
                        &param,
                        format!(
                            "`logit_bias` keys must be token ids between 0 and {}; got {key:?}",
                            n_vocab - 1
                        ),
                    )
                })?;
            if !(-100.0..=100.0).contains(&bias) {
                return Err(ApiError::out_of_range(&param, "between -100 and 100", bias));
            }
            logit_bias.push((token, bias as f32));
        }
        let max_tokens = match positive_u32("max_completion_tokens", self.max_completion_tokens)? {
            Some(m) => Some(m),
            None => positive_u32("max_tokens", self.max_tokens)?,
        };
        let n = match self.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES).contains(&n) => n as u32,
            Some(n) => {
                return Err(ApiError::out_of_range(
                    "n",
                    &format!("between 1 and {MAX_CHOICES}"),
                    n,
                ))
            }
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::invalid(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        let grammar = match &self.grammar {
            None => None,
            Some(g) if g.trim().is_empty() => None,
            Some(g) if g.len() > MAX_GRAMMAR_BYTES => {
                return Err(ApiError::out_of_range(
                    "grammar",
                    &format!("at most {MAX_GRAMMAR_BYTES} bytes"),
                    g.len(),
                ))
            }
            Some(g) => {
                crate::engine::grammar::check(g)
                    .map_err(|e| ApiError::invalid("grammar", e.to_string()))?;
                Some(std::sync::Arc::from(g.as_str()))
            }
        };
        let include_usage = self
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(GenerationOptions {
            max_tokens_is_cap: false,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k,
                min_p,
                seed,
                frequency_penalty,
                presence_penalty,
                repeat_penalty,
                penalty_last_n,
                logit_bias,
                grammar,
            },
            max_tokens,
            stop: parse_stop(self.stop.as_ref())?,
            n,
            stream,
            include_usage,
            special_tokens: false,
            grammar_param: "grammar",
            logprobs: None,
        })
    }
}

/// A count of alternatives per token (`top_logprobs`, completions' `logprobs`): 0 to 20.
pub fn top_logprobs(param: &str, value: Option<i64>) -> Result<u8, ApiError> {
    let max = crate::engine::MAX_TOP_LOGPROBS;
    match value {
        None => Ok(0),
        Some(n) if (0..=i64::from(max)).contains(&n) => Ok(n as u8),
        Some(n) => Err(ApiError::out_of_range(
            param,
            &format!("between 0 and {max}"),
            n,
        )),
    }
}

/// `stop`: null, a string, or an array of up to four strings.
fn parse_stop(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let stops = match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid(format!("stop[{i}]"), "`stop` entries must be strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if let Some((i, long)) = stops
        .iter()
        .enumerate()
        .find(|(_, s)| s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::out_of_range(
            &format!("stop[{i}]"),
            &format!("at most {MAX_STOP_BYTES} bytes"),
            format!("{} bytes", long.len()),
        ));
    }
    if stops.len() > MAX_STOP_STRINGS {
        return Err(ApiError::out_of_range(
            "stop",
            &format!("at most {MAX_STOP_STRINGS} strings"),
            format!("{} strings", stops.len()),
        ));
    }
    Ok(stops)
}

/// The generation budget for a prompt: the request's limit, the server's `--n-predict` cap and the
/// sequence's context. A prompt that cannot fit with its requested limit is a 400, sent before any
/// stream byte.
impl GenerationOptions {
    /// The tokens a prompt of `prompt_tokens` may generate ([`token_budget`]), `max_tokens` cut
    /// to the room left when it is a cap.
    pub fn budget(
        &self,
        prompt_tokens: usize,
        n_ctx_seq: u32,
        n_predict: Option<u32>,
    ) -> Result<u32, ApiError> {
        let room = (n_ctx_seq as usize).saturating_sub(prompt_tokens);
        let requested = match self.max_tokens {
            Some(r) if self.max_tokens_is_cap && room > 0 => Some(r.min(room as u32)),
            requested => requested,
        };
        token_budget(prompt_tokens, requested, n_ctx_seq, n_predict)
    }
}

pub fn token_budget(
    prompt_tokens: usize,
    requested: Option<u32>,
    n_ctx_seq: u32,
    n_predict: Option<u32>,
) -> Result<u32, ApiError> {
    let room = (n_ctx_seq as usize).saturating_sub(prompt_tokens);
    let exceeded = || ApiError::ContextLengthExceeded {
        prompt_tokens,
        max_tokens: requested.unwrap_or(1),
        n_ctx: n_ctx_seq,
    };
    if room == 0 {
        return Err(exceeded());
    }
    let budget = match requested {
        Some(r) if r as usize > room => return Err(exceeded()),
        Some(r) => r,
        None => room as u32,
    };
    Ok(n_predict.map_or(budget, |cap| budget.min(cap)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn options(body: Value) -> Result<GenerationOptions, ApiError> {
        let fields: CommonFields = super::super::extract::parse(&body)?;
        fields.validate(1000)
    }

    fn param_of(err: ApiError) -> String {
        match err {
            ApiError::InvalidRequest { param, .. } => param.unwrap_or_default(),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_openai_defaults() {
        let o = options(json!({"model": "m"})).unwrap();
        assert_eq!(o.sampling, SamplingParams::default());
        assert_eq!((o.n, o.stream, o.max_tokens), (1, false, None));
    }

    #[test]
    fn out_of_range_values_name_field_limit_and_value() {
        let err = options(json!({"model": "m", "temperature": 2.5})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`temperature` must be between 0 and 2; got 2.5"
        );
        for (field, value) in [
            ("top_p", json!(1.5)),
            ("frequency_penalty", json!(-3)),
            ("presence_penalty", json!(9)),
            ("max_tokens", json!(0)),
            ("max_completion_tokens", json!(-5)),
            ("n", json!(0)),
            ("top_k", json!(-1)),
            ("min_p", json!(2)),
        ] {
            let err = options(json!({"model": "m", field: value})).unwrap_err();
            assert_eq!(param_of(err.clone()), field, "{err}");
            assert!(err.to_string().contains(&value.to_string()), "{err}");
        }
    }

    #[test]
    fn wrong_types_and_missing_fields_are_named() {
        assert_eq!(
            param_of(options(json!({"model": "m", "temperature": "hot"})).unwrap_err()),
            "temperature"
        );
        assert_eq!(
            param_of(options(json!({"temperature": 1})).unwrap_err()),
            "model"
        );
        assert_eq!(
            param_of(options(json!({"model": "m", "stop": 5})).unwrap_err()),
            "stop"
        );
        assert_eq!(
            param_of(options(json!({"model": "m", "stop": ["a", 1]})).unwrap_err()),
            "stop[1]"
        );
        assert_eq!(
            param_of(
                options(json!({"model": "m", "stop": ["a", "b", "c", "d", "e"]})).unwrap_err()
            ),
            "stop"
        );
    }

    #[test]
    fn logit_bias_keys_and_values_are_checked() {
        let o = options(json!({"model": "m", "logit_bias": {"5": -100, "7": 2.5}})).unwrap();
        let mut bias = o.sampling.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!(
            param_of(options(json!({"model": "m", "logit_bias": {"x": 1}})).unwrap_err()),
            "logit_bias.x"
        );
        assert_eq!(
            param_of(options(json!({"model": "m", "logit_bias": {"5000": 1}})).unwrap_err()),
            "logit_bias.5000"
        );
        assert_eq!(
            param_of(options(json!({"model": "m", "logit_bias": {"5": 101}})).unwrap_err()),
            "logit_bias.5"
        );
    }

    #[test]
    fn long_stop_strings_and_bad_grammars_are_400s() {
        let long = "x".repeat(MAX_STOP_BYTES + 1);
        assert_eq!(
            param_of(options(json!({"model": "m", "stop": ["a", long]})).unwrap_err()),
            "stop[1]"
        );
        for grammar in [
            r"root ::= [^\x00-\U0010FFFF]",
            r#"root ::= "a"{5,2}"#,
            "root ::= x",
        ] {
            let err = options(json!({"model": "m", "grammar": grammar})).unwrap_err();
            assert_eq!(param_of(err), "grammar", "{grammar}");
        }
    }

    #[test]
    fn max_completion_tokens_wins_and_stop_accepts_a_string() {
        let o = options(
            json!({"model": "m", "max_tokens": 5, "max_completion_tokens": 7, "stop": "END"}),
        )
        .unwrap();
        assert_eq!(o.max_tokens, Some(7));
        assert_eq!(o.stop, vec!["END".to_string()]);
    }

    #[test]
    fn stream_options_need_stream() {
        assert_eq!(
            param_of(
                options(json!({"model": "m", "stream_options": {"include_usage": true}}))
                    .unwrap_err()
            ),
            "stream_options"
        );
        let o = options(
            json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}}),
        )
        .unwrap();
        assert!(o.include_usage);
    }

    #[test]
    fn budget_respects_context_request_and_server_cap() {
        assert_eq!(token_budget(10, None, 100, None).unwrap(), 90);
        assert_eq!(token_budget(10, Some(20), 100, None).unwrap(), 20);
        assert_eq!(token_budget(10, Some(20), 100, Some(5)).unwrap(), 5);
        assert_eq!(token_budget(10, None, 100, Some(5)).unwrap(), 5);
        assert!(matches!(
            token_budget(10, Some(91), 100, None),
            Err(ApiError::ContextLengthExceeded { .. })
        ));
        assert!(matches!(
            token_budget(100, None, 100, None),
            Err(ApiError::ContextLengthExceeded { .. })
        ));
    }
}
