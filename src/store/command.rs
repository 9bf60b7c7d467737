//! `lm-sandbox models`: what the stores hold, with facts from each GGUF header.

use serde_json::json;

use super::{scan_dir, scan_lmstudio, scan_ollama, FoundModel};
use crate::cli::ModelsArgs;

/// Every model the arguments' stores hold (a store that cannot be read is reported and skipped).
pub fn discover(args: &ModelsArgs) -> Vec<FoundModel> {
    let mut models = Vec::new();
    let mut add = |what: &str, found: Result<Vec<FoundModel>, super::StoreError>| match found {
        Ok(found) => models.extend(found),
        Err(err) => eprintln!("{what}: {err}"),
    };
    for dir in &args.models_dirs {
        add("--models-dir", scan_dir(dir));
    }
    if let Some(dir) = &args.ollama_models {
        let dir = dir.clone().unwrap_or_else(super::ollama::default_dir);
        add("--ollama-models", scan_ollama(&dir));
    }
    if let Some(dir) = &args.lmstudio_models {
        let dirs = match dir {
            Some(dir) => vec![dir.clone()],
            None => super::lmstudio::default_dirs()
                .into_iter()
                .filter(|d| d.is_dir())
                .take(1)
                .collect(),
        };
        for dir in dirs {
            add("--lmstudio-models", scan_lmstudio(&dir));
        }
    }
    models
}

pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let models = discover(args);
    let rows: Vec<serde_json::Value> = models
        .iter()
        .map(|m| {
            let facts = crate::gpu::gguf::model_facts(&m.path);
            let mut row = json!(m);
            match facts {
                Ok(f) => {
                    row["architecture"] = json!(f.architecture);
                    row["n_layer"] = json!(f.n_layer);
                    row["n_ctx_train"] = json!(f.n_ctx_train);
                }
                Err(e) => row["unreadable"] = json!(e.to_string()),
            }
            row
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no models found (give --models-dir DIR, --ollama-models [DIR] or --lmstudio-models [DIR])");
        return Ok(());
    }
    println!(
        "{:<48} {:<9} {:>10} {:<10} {:>8}  path",
        "id", "source", "MiB", "arch", "ctx"
    );
    for row in rows {
        println!(
            "{:<48} {:<9} {:>10} {:<10} {:>8}  {}",
            row["id"].as_str().unwrap_or(""),
            row["source"].as_str().unwrap_or(""),
            row["size"].as_u64().unwrap_or(0) >> 20,
            row["architecture"].as_str().unwrap_or("?"),
            row["n_ctx_train"]
                .as_u64()
                .map_or("?".into(), |n| n.to_string()),
            row["path"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}
