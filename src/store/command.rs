//! `lm-sandbox models`: what the stores hold, with facts from each GGUF header.

use serde_json::json;

use super::{discover, Sources};
use crate::cli::{ModelsArgs, StoreArgs};

/// The stores the arguments name.
pub fn sources(args: &StoreArgs) -> Sources {
    Sources {
        dirs: args.models_dirs.clone(),
        ollama: args
            .ollama_models
            .as_ref()
            .map(|dir| dir.clone().unwrap_or_else(super::ollama::default_dir)),
        lmstudio: args.lmstudio_models.as_ref().and_then(|dir| match dir {
            Some(dir) => Some(dir.clone()),
            None => super::lmstudio::default_dirs()
                .into_iter()
                .find(|d| d.is_dir()),
        }),
    }
}

/// One model as `lm-sandbox models` shows it: the store's facts, then the header's.
fn describe(model: &super::FoundModel) -> serde_json::Value {
    let mut row = json!(model);
    match crate::gpu::gguf::read_header(&model.path) {
        Ok(header) => {
            row["quantization"] = json!(header.quantization());
            row["parameters"] = json!(header.parameters);
            match header.facts() {
                Ok(f) => {
                    row["architecture"] = json!(f.architecture);
                    row["n_layer"] = json!(f.n_layer);
                    row["n_ctx_train"] = json!(f.n_ctx_train);
                }
                Err(e) => row["unreadable"] = json!(e.to_string()),
            }
            let template = match header.metadata.get("tokenizer.chat_template") {
                Some(crate::gpu::gguf::MetaValue::Str(t)) => Some(t.as_str()),
                _ => None,
            };
            row["template"] =
                json!(template.map_or("none (ChatML is used)", |t| { crate::template::family(t) }));
            let tools = template.map(crate::tools::ToolFormat::detect);
            row["tool_format"] = json!(tools.map_or("generic", |f| f.name()));
            row["tools"] = json!(template.is_some_and(|t| t.contains("tools")));
        }
        Err(e) => row["unreadable"] = json!(e.to_string()),
    }
    row
}

pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let (models, errors) = discover(&sources(&args.stores));
    for error in errors {
        eprintln!("{error}");
    }
    let rows: Vec<serde_json::Value> = models.iter().map(describe).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no models found (give --models-dir DIR, --ollama-models [DIR] or --lmstudio-models [DIR])");
        return Ok(());
    }
    println!(
        "{:<44} {:<9} {:>8} {:<10} {:>7} {:<8} {:>8} {:<9} {:<5}  path",
        "id", "source", "MiB", "arch", "params", "quant", "ctx", "template", "tools"
    );
    for row in rows {
        let params = row["parameters"]
            .as_u64()
            .map_or("?".into(), |n| format!("{:.2}B", n as f64 / 1e9));
        println!(
            "{:<44} {:<9} {:>8} {:<10} {:>7} {:<8} {:>8} {:<9} {:<5}  {}",
            row["id"].as_str().unwrap_or(""),
            row["source"].as_str().unwrap_or(""),
            row["size"].as_u64().unwrap_or(0) >> 20,
            row["architecture"].as_str().unwrap_or("?"),
            params,
            row["quantization"].as_str().unwrap_or("?"),
            row["n_ctx_train"]
                .as_u64()
                .map_or("?".into(), |n| n.to_string()),
            row["template"].as_str().unwrap_or("?"),
            if row["tools"] == true { "yes" } else { "no" },
            row["path"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}
