//! `lm-sandbox model check`: the fidelity report on the terminal (or as JSON).

use anyhow::Context as _;

use crate::cli::ModelCheckArgs;

/// Runs the check; returns the exit status (1 when the tokenizers differ).
pub fn check(args: &ModelCheckArgs) -> anyhow::Result<i32> {
    let owned: Vec<String>;
    let corpus: Vec<&str> = match &args.corpus {
        None => super::CORPUS.to_vec(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            owned = text
                .lines()
                .map(|l| l.replace("\\n", "\n").replace("\\t", "\t"))
                .collect();
            owned.iter().map(String::as_str).collect()
        }
    };
    let (reference, source) = super::reference_tokenizer(&args.model)?;
    let llama = crate::engine::load_vocabulary(&args.model)?;
    let report = super::compare(&llama, &reference, source, &corpus)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let source = match &report.reference {
            super::Reference::TokenizerJson(path) => format!("{}", path.display()),
            super::Reference::Gguf { pre } => {
                format!("built from the GGUF (byte-level BPE, pre-tokenizer `{pre}`)")
            }
        };
        println!("reference tokenizer: {source}");
        println!(
            "{} texts, {} tokens: {} mismatch(es)",
            report.texts,
            report.tokens,
            report.mismatches.len()
        );
        for m in &report.mismatches {
            println!(
                "\n{:?}\n  llama.cpp: {:?}\n  reference: {:?}\n  first difference at token {}",
                m.text, m.llama, m.reference, m.first_difference
            );
        }
    }
    Ok(i32::from(!report.mismatches.is_empty()))
}
