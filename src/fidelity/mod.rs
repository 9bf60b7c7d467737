//! Tokenizer fidelity: does llama.cpp split text the way the model was trained to?
//!
//! A converted GGUF carries the vocabulary, the merges and a pre-tokenizer *name*
//! (`tokenizer.ggml.pre`); llama.cpp maps that name to its own regexes. A wrong name, or a
//! llama.cpp that lacks the model's rules, tokenizes differently from the original tokenizer and
//! quality drops without any error. This module builds a Hugging Face tokenizer (the `tokenizers`
//! crate) from the GGUF's own tables, or takes the model's `tokenizer.json` when one sits beside
//! the file, and compares the two over a corpus of hard cases.
//!
//! Must not: load weights (llama.cpp's side loads the vocabulary only). `command` is the CLI glue.

pub mod command;

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::engine::{Token, TokenizeText};
use crate::gpu::gguf::{GgufError, GgufHeader, MetaValue};

/// Text that separates good tokenizers from almost-right ones: unicode, code, whitespace runs,
/// numbers, emoji, contractions, special-token text.
pub const CORPUS: &[&str] = &[
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we'd've done, don't you?",
    "Numbers: 0 7 42 1234567890 3.14159 -12,345.67 1e-9 0x1F 2025-12-02",
    "  leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "multiple     spaces    between",
    "fn main() {\n    println!(\"{}\", x + 1);\n}\n",
    "def f(a, b=2):\n\treturn a**b  # comment\n",
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "SELECT * FROM users WHERE id = 42;",
    "Ünïcödé: naïve café, Straße, Œuvre, résumé",
    "日本語のテキストと中文文本以及한국어",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
    "Emoji: 🦀🚀👩‍💻👍🏽 🇫🇷 ❤️",
    "Math: ∑ x² ≤ ∞, α+β=γ, √2 ≈ 1.414",
    "URLs: https://example.com/path?q=a&b=c#frag",
    "snake_case camelCase PascalCase kebab-case SCREAMING_CASE",
    "Mixed123Numbers456andLetters",
    "   ",
    "\n",
    "a",
    "<|im_start|>user\nHi<|im_end|>",
];

#[derive(Debug, thiserror::Error)]
pub enum FidelityError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: {reason}")]
    TokenizerJson { path: PathBuf, reason: String },
    #[error("cannot build a Hugging Face tokenizer from this GGUF: {0}")]
    Unsupported(String),
    #[error("the Hugging Face tokenizer failed on {text:?}: {reason}")]
    Encode { text: String, reason: String },
}

/// Where the reference tokenizer came from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// `tokenizer.json` beside the GGUF.
    TokenizerJson(PathBuf),
    /// Built from the GGUF's vocabulary, merges and pre-tokenizer name.
    Gguf { pre: String },
}

/// One text the two tokenizers split differently.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub text: String,
    pub llama: Vec<Token>,
    pub reference: Vec<Token>,
    /// Index of the first token that differs.
    pub first_difference: usize,
}

/// The comparison over a corpus.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub reference: Reference,
    pub texts: usize,
    pub tokens: usize,
    pub mismatches: Vec<Mismatch>,
}

/// The reference tokenizer for the GGUF at `path`: `tokenizer.json` beside it, else one built
/// from its header.
pub fn reference_tokenizer(path: &Path) -> Result<(Tokenizer, Reference), FidelityError> {
    let beside = path.with_file_name("tokenizer.json");
    if beside.is_file() {
        let tokenizer =
            Tokenizer::from_file(&beside).map_err(|e| FidelityError::TokenizerJson {
                path: beside.clone(),
                reason: e.to_string(),
            })?;
        return Ok((tokenizer, Reference::TokenizerJson(beside)));
    }
    let header = crate::gpu::gguf::read_header_with_arrays(path)?;
    from_gguf(&header)
}

fn text<'h>(header: &'h GgufHeader, key: &str) -> Option<&'h str> {
    match header.metadata.get(key) {
        Some(MetaValue::Str(s)) => Some(s),
        _ => None,
    }
}

/// The pre-tokenizer llama.cpp applies for `pre`, in Hugging Face's terms. Only names whose
/// rules are known to match are modelled; any other is refused rather than guessed.
fn pre_tokenizer(pre: &str) -> Result<Sequence, FidelityError> {
    // llama.cpp's LLAMA3 and QWEN2 word regexes (llama-vocab.cpp).
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = |regex: &str| -> Result<Split, FidelityError> {
        Split::new(
            SplitPattern::Regex(regex.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| FidelityError::Unsupported(e.to_string()))
    };
    // The GPT-2 regex is ByteLevel's own (`use_regex`).
    let gpt2 = || ByteLevel::new(false, true, true).into();
    let bytes_only = || ByteLevel::new(false, true, false).into();
    Ok(Sequence::new(match pre {
        "gpt2" | "gpt-2" | "default" => vec![gpt2()],
        // Every digit alone, then GPT-2's regex.
        "smollm" => vec![Digits::new(true).into(), gpt2()],
        "llama3" | "llama-v3" | "llama-bpe" => vec![split(LLAMA3)?.into(), bytes_only()],
        "qwen2" | "deepseek-r1-qwen" => vec![split(QWEN2)?.into(), bytes_only()],
        other => {
            return Err(FidelityError::Unsupported(format!(
                "pre-tokenizer `{other}` is not modelled; put the model's tokenizer.json beside the GGUF"
            )))
        }
    }))
}

/// A byte-level BPE tokenizer from the GGUF's `tokenizer.ggml.*` tables.
pub fn from_gguf(header: &GgufHeader) -> Result<(Tokenizer, Reference), FidelityError> {
    let model = text(header, "tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        return Err(FidelityError::Unsupported(format!(
            "vocabulary type `{model}` (only byte-level BPE, `gpt2`, is built from the GGUF; \
             put the model's tokenizer.json beside it)"
        )));
    }
    let pre = text(header, "tokenizer.ggml.pre")
        .unwrap_or("default")
        .to_owned();
    let (Some(MetaValue::Strings(tokens)), Some(MetaValue::Strings(merges))) = (
        header.metadata.get("tokenizer.ggml.tokens"),
        header.metadata.get("tokenizer.ggml.merges"),
    ) else {
        return Err(FidelityError::Unsupported(
            "the GGUF lacks tokenizer.ggml.tokens or tokenizer.ggml.merges".into(),
        ));
    };
    let types = match header.metadata.get("tokenizer.ggml.token_type") {
        Some(MetaValue::Array { ints, .. }) => ints.as_slice(),
        _ => &[],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| FidelityError::Unsupported(format!("merge {m:?} has no space")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| FidelityError::Unsupported(e.to_string()))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Control (3) and user-defined (4) tokens are matched whole, as llama.cpp's parse_special.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &ty)| ty == 3 || ty == 4)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    Ok((tokenizer, Reference::Gguf { pre }))
}

/// Tokenizes every text of `corpus` both ways (no BOS on either side) and lists the differences.
pub fn compare(
    llama: &dyn TokenizeText,
    reference: &Tokenizer,
    source: Reference,
    corpus: &[&str],
) -> Result<Report, FidelityError> {
    let mut mismatches = Vec::new();
    let mut tokens = 0;
    for &text in corpus {
        let ours = llama.tokenize(text, false);
        let theirs: Vec<Token> = reference
            .encode(text, false)
            .map_err(|e| FidelityError::Encode {
                text: text.to_owned(),
                reason: e.to_string(),
            })?
            .get_ids()
            .iter()
            .map(|&id| id as Token)
            .collect();
        tokens += ours.len();
        if ours != theirs {
            let first_difference = ours.iter().zip(&theirs).take_while(|(a, b)| a == b).count();
            mismatches.push(Mismatch {
                text: text.to_owned(),
                llama: ours,
                reference: theirs,
                first_difference,
            });
        }
    }
    Ok(Report {
        reference: source,
        texts: corpus.len(),
        tokens,
        mismatches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny byte-level vocabulary: the two tokenizers agree, and a wrong pre-tokenizer name is
    /// refused rather than guessed.
    fn header(pre: &str) -> GgufHeader {
        let mut tokens: Vec<String> = ["a", "b", "ab", "Ġ", "Ġab", "<|end|>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        tokens.extend(["1", "2"].iter().map(|s| s.to_string()));
        let mut metadata = HashMap::new();
        metadata.insert("tokenizer.ggml.model".into(), MetaValue::Str("gpt2".into()));
        metadata.insert("tokenizer.ggml.pre".into(), MetaValue::Str(pre.into()));
        metadata.insert("tokenizer.ggml.tokens".into(), MetaValue::Strings(tokens));
        metadata.insert(
            "tokenizer.ggml.merges".into(),
            MetaValue::Strings(vec!["a b".into(), "Ġ ab".into()]),
        );
        metadata.insert(
            "tokenizer.ggml.token_type".into(),
            MetaValue::Array {
                len: 8,
                ints: vec![1, 1, 1, 1, 1, 3, 1, 1],
            },
        );
        GgufHeader {
            metadata,
            tensors: Vec::new(),
            data_start: 0,
            file_bytes: 0,
            parameters: 0,
        }
    }

    #[test]
    fn a_gguf_vocabulary_becomes_a_byte_level_bpe() {
        let (tokenizer, source) = from_gguf(&header("smollm")).unwrap();
        assert_eq!(
            source,
            Reference::Gguf {
                pre: "smollm".into()
            }
        );
        let ids = tokenizer
            .encode("ab ab<|end|>12", false)
            .unwrap()
            .get_ids()
            .to_vec();
        // "ab", " ab" merged; the control token whole; digits one by one.
        assert_eq!(ids, vec![2, 4, 5, 6, 7]);
    }

    #[test]
    fn unknown_pre_tokenizers_and_vocabularies_are_refused() {
        assert!(matches!(
            from_gguf(&header("mystery")),
            Err(FidelityError::Unsupported(_))
        ));
        let mut spm = header("default");
        spm.metadata.insert(
            "tokenizer.ggml.model".into(),
            MetaValue::Str("llama".into()),
        );
        assert!(matches!(
            from_gguf(&spm),
            Err(FidelityError::Unsupported(_))
        ));
    }
}
