//! Placement at start-up and live GPU readings while serving.
//!
//! [`decide`] runs before the model loads: inventory, GGUF facts, plan; a plan that cannot fit stops
//! the server with the planner's message. [`spawn_poller`] re-reads NVML on its own thread and
//! publishes through a `watch`, so `GET /v1/placement` never blocks the runtime on NVML.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::gguf::{model_facts, ModelFacts};
use super::inventory::{Inventory, InventorySource, NvmlSource};
use super::plan::{plan, Plan, PlanConfig};
use crate::cli::PlacementArgs;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("cannot read the model's GGUF header: {0}")]
    Gguf(#[from] super::gguf::GgufError),
    #[error("cannot read the GPU inventory: {0}")]
    Inventory(#[from] super::inventory::InventoryError),
    #[error("placement: {0}")]
    Plan(#[from] super::plan::PlanError),
}

/// The decided placement and what it was decided from.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub model: ModelSummary,
    pub plan: Plan,
}

/// The model facts worth showing next to a plan.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub architecture: String,
    pub n_layer: u32,
    pub n_ctx_train: u32,
    pub file_bytes: u64,
    pub n_ctx: u32,
    pub n_seq: u32,
}

/// Plans `model_path` for a context of `n_ctx` (0: trained) over `n_seq` sequences on `inventory`.
pub fn decide(
    model_path: &Path,
    n_ctx: u32,
    n_seq: u32,
    request: &PlacementArgs,
    inventory: &Inventory,
) -> Result<(Placement, ModelFacts), PlacementError> {
    let facts = model_facts(model_path)?;
    let n_ctx = if n_ctx == 0 { facts.n_ctx_train } else { n_ctx };
    let config = PlanConfig {
        n_ctx,
        n_seq,
        cuda: cfg!(feature = "cuda"),
        ..PlanConfig::from_request(request)
    };
    let plan = plan(&facts, inventory, &config)?;
    let model = ModelSummary {
        architecture: facts.architecture.clone(),
        n_layer: facts.n_layer,
        n_ctx_train: facts.n_ctx_train,
        file_bytes: facts.file_bytes,
        n_ctx,
        n_seq,
    };
    Ok((Placement { model, plan }, facts))
}

/// How often the live inventory is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Publishes NVML readings every `interval` from a thread of its own. Without NVML it publishes the
/// first reading (empty, with the reason) once and stops.
pub fn spawn_poller(first: Inventory, interval: Duration) -> watch::Receiver<Inventory> {
    let nvml_present = first.unavailable.is_none();
    let (tx, rx) = watch::channel(first);
    if nvml_present {
        let spawned = std::thread::Builder::new()
            .name("nvml-poller".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                // Every receiver gone: the server has stopped.
                if tx.is_closed() {
                    return;
                }
                if let Ok(inventory) = NvmlSource.read() {
                    tx.send_replace(inventory);
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "cannot start the NVML poller; /v1/placement shows start-up readings");
        }
    }
    rx
}
