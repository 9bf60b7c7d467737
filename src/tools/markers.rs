//! Call markers as the model's own tokens: every family's markers a vocabulary may hold as one
//! control token, and the rewrite of a forcing grammar's literal markers into those tokens
//! (invariant 37).

/// Every family's call markers that a vocabulary may hold as one control token
/// (`[TOOL_CALLS]`, `<|python_tag|>`, `<|tool_call>`, …).
pub const CALL_MARKERS: &[&str] = &[
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|python_start|>",
    "<|python_end|>",
    "<tool_call>",
    "</tool_call>",
    "<|tool_calls_section_begin|>",
    "<|tool_calls_section_end|>",
    "<|tool_call_begin|>",
    "<|tool_call_argument_begin|>",
    "<|tool_call_end|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<|channel|>",
    "<|constrain|>",
    "<|message|>",
    "<start_function_call>",
    "<end_function_call>",
    "<escape>",
    "<|tool_call>",
    "<tool_call|>",
    "<|\"|>",
    "<|open|>",
    "<|close|>",
    "<|sep|>",
];

/// `text` as it is written inside a GBNF literal.
pub fn gbnf_escaped(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Rewrites the literals of a forcing `grammar` so each marker of `tokens` (a marker and the one
/// token the model's vocabulary holds it as) is matched as that token (`<[id]>`), not as text: a
/// literal `"[TOOL_CALLS]"` would let the model spell the marker out of ordinary tokens, which it
/// never does in training (and then writes worse calls). A literal split this way becomes a group,
/// so a repetition after it still applies to the whole.
pub fn markers_as_tokens(grammar: &str, tokens: &[(&str, crate::engine::Token)]) -> String {
    if tokens.is_empty() {
        return grammar.to_owned();
    }
    let escaped: Vec<(String, crate::engine::Token)> = tokens
        .iter()
        .map(|&(marker, token)| (gbnf_escaped(marker), token))
        .collect();
    let mut out = String::with_capacity(grammar.len());
    let mut rest = grammar;
    while let Some(at) = rest.find(['"', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        // The end of this literal or character class (after its closing quote or bracket).
        let close = if tail.starts_with('"') { '"' } else { ']' };
        let mut end = None;
        let mut chars = tail.char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                c if c == close => {
                    end = Some(i + 1);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            // Unterminated: left as it is (the grammar check reports it).
            out.push_str(tail);
            return out;
        };
        if close == '"' {
            out.push_str(&split_literal(&tail[1..end - 1], &escaped));
        } else {
            out.push_str(&tail[..end]);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// One literal's source as GBNF pieces: text literals around `<[id]>` tokens.
fn split_literal(source: &str, markers: &[(String, crate::engine::Token)]) -> String {
    let mut pieces = Vec::new();
    let mut rest = source;
    loop {
        let next = markers
            .iter()
            .filter_map(|(m, t)| rest.find(m.as_str()).map(|at| (at, m.len(), *t)))
            .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
        let Some((at, len, token)) = next else { break };
        if at > 0 {
            pieces.push(format!("\"{}\"", &rest[..at]));
        }
        pieces.push(format!("<[{token}]>"));
        rest = &rest[at + len..];
    }
    if pieces.is_empty() {
        return format!("\"{source}\"");
    }
    if !rest.is_empty() {
        pieces.push(format!("\"{rest}\""));
    }
    if pieces.len() == 1 {
        pieces.remove(0)
    } else {
        format!("({})", pieces.join(" "))
    }
}
