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

pub fn run(args: &ModelsArgs) -> anyhow::Result<()> {
    let (models, errors) = discover(&sources(&args.stores));
    for error in errors {
        eprintln!("{error}");
    }
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
