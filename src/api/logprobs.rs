//! OpenAI's two `logprobs` shapes, from the engine's [`TokenLogprob`]s: chat's
//! `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}` and the legacy
//! completions' `{tokens, token_logprobs, top_logprobs, text_offset}`.

use serde_json::{json, Map, Value};

use crate::engine::TokenLogprob;

/// What OpenAI reports for a token it considers impossible (JSON has no minus infinity).
const LOWEST: f32 = -9999.0;

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        LOWEST
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Chat's `logprobs` object for `tokens`.
pub fn chat(tokens: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let top: Vec<Value> = t
                .top
                .iter()
                .map(|a| json!({"token": text(&a.bytes), "logprob": finite(a.logprob), "bytes": a.bytes}))
                .collect();
            json!({
                "token": text(&t.bytes),
                "logprob": finite(t.logprob),
                "bytes": t.bytes,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// The legacy completions' `logprobs` object, built token by token; `text_offset` counts
/// characters of the choice's `text` before each token.
#[derive(Debug, Default, Clone)]
pub struct CompletionLogprobs {
    /// Characters of the choice's text before the next token.
    offset: usize,
}

impl CompletionLogprobs {
    /// The object for `tokens`, the next tokens of the choice.
    pub fn next(&mut self, tokens: &[TokenLogprob]) -> Value {
        let mut out_tokens = Vec::with_capacity(tokens.len());
        let mut token_logprobs = Vec::with_capacity(tokens.len());
        let mut top_logprobs = Vec::with_capacity(tokens.len());
        let mut text_offset = Vec::with_capacity(tokens.len());
        for t in tokens {
            out_tokens.push(text(&t.bytes));
            token_logprobs.push(finite(t.logprob));
            let mut top = Map::new();
            for a in &t.top {
                top.insert(text(&a.bytes), json!(finite(a.logprob)));
            }
            top_logprobs.push(Value::Object(top));
            text_offset.push(self.offset);
            // A character starts at every byte that is not a UTF-8 continuation byte, so a
            // character split over tokens is counted once, at its first token.
            self.offset += t.bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count();
        }
        json!({
            "tokens": out_tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TopLogprob;

    fn token(bytes: &[u8], logprob: f32) -> TokenLogprob {
        TokenLogprob {
            token: 1,
            bytes: bytes.to_vec(),
            logprob,
            top: vec![TopLogprob {
                token: 1,
                bytes: bytes.to_vec(),
                logprob,
            }],
        }
    }

    #[test]
    fn chat_shape_has_every_field() {
        let v = chat(&[token(b"Hi", -0.5)]);
        assert_eq!(
            v,
            json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}],
                "refusal": null})
        );
    }

    #[test]
    fn text_offsets_count_characters_across_split_tokens() {
        let mut acc = CompletionLogprobs::default();
        // "é" (C3 A9) split over two tokens, then "x".
        let first = acc.next(&[token(b"a", -1.0), token(&[0xC3], -1.0)]);
        let second = acc.next(&[token(&[0xA9], -1.0), token(b"x", f32::NEG_INFINITY)]);
        assert_eq!(first["text_offset"], json!([0, 1]));
        assert_eq!(second["text_offset"], json!([2, 2]));
        assert_eq!(second["token_logprobs"], json!([-1.0, -9999.0]));
    }
}
