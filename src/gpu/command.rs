//! `lm-sandbox gpus` and `lm-sandbox plan`: CLI glue over the inventory and the planner.

use anyhow::Context as _;

use super::gguf::model_facts;
use super::inventory::{FileSource, InventorySource, NvmlSource};
use super::plan::{plan, PlanConfig};
use super::report;
use crate::cli::{GpusArgs, PlanArgs};

/// Prints this machine's GPUs.
pub fn gpus(args: &GpusArgs) -> anyhow::Result<()> {
    let inventory = NvmlSource.read()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inventory)?);
    } else {
        print!("{}", report::inventory_table(&inventory));
    }
    Ok(())
}

/// Prints the placement plan for a model.
pub fn plan_command(args: &PlanArgs) -> anyhow::Result<()> {
    let facts =
        model_facts(&args.model).with_context(|| format!("reading {}", args.model.display()))?;
    let mut inventory = match &args.gpus {
        Some(path) => FileSource(path.clone()).read()?,
        None => NvmlSource.read()?,
    };
    let endpoints = crate::config::rpc_endpoints(&args.placement)?;
    if !endpoints.is_empty() {
        // The workers' devices as they report them now; nothing is loaded on them.
        let deadline = std::time::Duration::from_secs_f64(args.placement.rpc_timeout);
        let links = crate::engine::link_workers(&endpoints, deadline)?;
        inventory
            .gpus
            .extend(crate::engine::remote_gpus(&links, true));
    }
    let n_ctx = if args.ctx_size == 0 {
        facts.n_ctx_train
    } else {
        args.ctx_size
    };
    let config = PlanConfig {
        n_ctx,
        n_seq: args.parallel.max(1),
        n_ubatch: args.batch_size.clamp(1, 512),
        kv_bytes_per_element: args.cache_type.bytes_per_element(),
        cuda: cfg!(feature = "cuda") || args.assume_cuda || args.gpus.is_some(),
        ..crate::config::plan_config(&args.placement)
    };
    let placement = plan(&facts, &inventory, &config)?;
    if args.json {
        let out = serde_json::json!({"model": facts, "plan": placement});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{} ({}, {} layers, {:.2} GiB), context {} over {} sequences",
            args.model.display(),
            facts.architecture,
            facts.n_layer,
            facts.file_bytes as f64 / (1u64 << 30) as f64,
            n_ctx,
            config.n_seq
        );
        print!("{}", report::plan_table(&placement, facts.n_layer));
        let local_layers = placement
            .devices
            .iter()
            .filter(|d| inventory.gpus[d.gpu].remote.is_none())
            .any(|d| d.end_layer > d.first_layer);
        if !cfg!(feature = "cuda") && local_layers {
            println!("note: this binary has no CUDA backend; build with --features cuda to apply this plan");
        }
    }
    Ok(())
}
