//! The real [`Loader`]: checks the file (and an Ollama blob's digest, once), reads the GPUs, plans
//! the model against the memory other loaded models leave, and starts a llama.cpp engine thread
//! with the plan.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

use super::{Holding, LoadFailure, Loader, ModelCard, Started};
use crate::engine::{spawn_llama_engine, GpuOffload, LlamaEngineConfig};
use crate::gpu::inventory::{Inventory, InventorySource};
use crate::gpu::placement::{
    budget_report, decide, subtract_held, Held, Placement, PlacementError,
};
use crate::gpu::plan::{PlanConfig, PlanError, SplitMode};
use crate::gpu::report;

/// Plans `card` on `inventory` with `others` loaded: the plan, or why it cannot be made.
///
/// A plan that leaves layers on the CPU while other models hold GPU memory is refused as not
/// fitting, so the registry unloads an idle model first; with `last_resort` (nothing left to
/// unload) it is accepted, as it is when the layer count was asked for (`--n-gpu-layers`, a
/// preset's `n_gpu_layers`).
pub fn place(
    card: &ModelCard,
    others: &[Holding],
    inventory: &Inventory,
    engine: &LlamaEngineConfig,
    request: &PlanConfig,
    last_resort: bool,
) -> Result<Placement, LoadFailure> {
    let held: Vec<Held> = others
        .iter()
        .map(|h| Held::new(&h.id, &h.placement.plan, &h.allocated))
        .collect();
    let available = subtract_held(inventory, &held);
    let mut request = request.clone();
    // The engine's micro-batch (llama.cpp's n_ubatch), which sizes the compute buffers.
    request.n_ubatch = engine.n_batch.clamp(1, 512);
    request.occupied = held
        .iter()
        .flat_map(|h| h.gpus.iter().map(|(bus, _, _)| bus.clone()))
        .collect();
    match decide(
        &card.found.path,
        engine.n_ctx,
        engine.n_seq,
        &request,
        &available,
    ) {
        Ok((placement, facts))
            if placement.plan.cpu_layers > 0
                && request.n_gpu_layers.is_none()
                && !last_resort
                && held.iter().any(|h| !h.gpus.is_empty()) =>
        {
            Err(LoadFailure::DoesNotFit(format!(
                "{} of {} layers would run on the CPU beside the loaded models. Memory now: {}",
                placement.plan.cpu_layers,
                facts.n_layer,
                budget_report(&available, &held)
            )))
        }
        Ok((placement, facts)) => {
            tracing::info!(
                model = card.id(),
                "placement plan:\n{}",
                report::plan_table(&placement.plan, facts.n_layer)
            );
            Ok(placement)
        }
        Err(PlacementError::Plan(e @ (PlanError::DoesNotFit(_) | PlanError::OverBudget(_)))) => {
            Err(LoadFailure::DoesNotFit(format!(
                "{e}. Memory now: {}",
                budget_report(&available, &held)
            )))
        }
        Err(e) => Err(LoadFailure::Failed(e.to_string())),
    }
}

/// The plan in llama.cpp's terms: the GPUs that hold something, in device order.
pub fn offload(placement: &Placement, split_mode: SplitMode) -> GpuOffload {
    let plan = &placement.plan;
    let used: Vec<_> = plan
        .devices
        .iter()
        .filter(|d| d.end_layer > d.first_layer || d.output > 0)
        .collect();
    GpuOffload {
        n_gpu_layers: plan.n_gpu_layers,
        devices: used.iter().map(|d| d.pci_bus_id.clone()).collect(),
        single_gpu: split_mode == SplitMode::None,
        layers: used.iter().map(|d| d.end_layer - d.first_layer).collect(),
        bytes: used.iter().map(|d| d.total).collect(),
        n_layer: placement.model.n_layer,
    }
}

/// Starts llama.cpp engines.
pub struct LlamaLoader {
    /// Every setting but the model's path, id and offload.
    pub engine: LlamaEngineConfig,
    /// The user's placement settings.
    pub request: PlanConfig,
    pub inventory: Box<dyn InventorySource + Send + Sync>,
    /// Blobs whose digest matched, with the size and modification time they had then: each is
    /// read once, and again if it changes.
    verified: Mutex<HashSet<(PathBuf, u64, Option<std::time::SystemTime>)>>,
}

impl LlamaLoader {
    pub fn new(
        engine: LlamaEngineConfig,
        request: PlanConfig,
        inventory: Box<dyn InventorySource + Send + Sync>,
    ) -> Self {
        Self {
            engine,
            request,
            inventory,
            verified: Mutex::default(),
        }
    }

    /// The file as it is now: present, every part there, and an Ollama blob matching its digest.
    fn check_file(&self, card: &ModelCard) -> Result<(), LoadFailure> {
        for part in &card.found.parts {
            let meta = std::fs::metadata(part).map_err(|e| {
                LoadFailure::Failed(format!(
                    "{}: {e} (moved or deleted since the scan? rescan with SIGHUP or POST /v1/models/rescan)",
                    part.display()
                ))
            })?;
            if !meta.is_file() {
                return Err(LoadFailure::Failed(format!(
                    "{} is not a file",
                    part.display()
                )));
            }
        }
        let Some(digest) = &card.found.digest else {
            return Ok(());
        };
        let path = &card.found.path;
        let meta = std::fs::metadata(path)
            .map_err(|e| LoadFailure::Failed(format!("{}: {e}", path.display())))?;
        let identity = (path.clone(), meta.len(), meta.modified().ok());
        if self
            .verified
            .lock()
            .expect("verified set")
            .contains(&identity)
        {
            return Ok(());
        }
        tracing::info!(model = card.id(), path = %path.display(), "checking the blob's digest before its first load");
        let mut shown = 0;
        crate::store::verify_digest(path, digest, |done, total| {
            let tenth = done * 10 / total.max(1);
            if tenth > shown {
                shown = tenth;
                tracing::info!(model = card.id(), percent = tenth * 10, "digest check");
            }
        })
        .map_err(|e| LoadFailure::Failed(e.to_string()))?;
        self.verified.lock().expect("verified set").insert(identity);
        Ok(())
    }
}

impl Loader for LlamaLoader {
    fn start(
        &self,
        card: &ModelCard,
        others: &[Holding],
        last_resort: bool,
    ) -> Result<Started, LoadFailure> {
        self.check_file(card)?;
        let inventory = self
            .inventory
            .read()
            .map_err(|e| LoadFailure::Failed(format!("cannot read the GPUs: {e}")))?;
        // The preset's settings over the server-wide ones.
        let preset = &card.preset;
        let mut config = self.engine.clone();
        config.n_seq = preset.parallel.unwrap_or(config.n_seq);
        // An Ollama `params` layer's `num_ctx` is the context of one sequence.
        let num_ctx = card
            .found
            .params
            .get("num_ctx")
            .and_then(serde_json::Value::as_u64);
        config.n_ctx = match (preset.ctx, num_ctx) {
            (Some(ctx), _) => ctx,
            (None, Some(n)) if n >= 16 => (n as u32).saturating_mul(config.n_seq),
            (None, _) => config.n_ctx,
        };
        // A request asked for more per sequence (Ollama's num_ctx): at least that.
        if let Some(per_seq) = card.ctx_per_seq {
            let want = per_seq.saturating_mul(config.n_seq);
            if config.n_ctx != 0 && want > config.n_ctx {
                config.n_ctx = want;
            }
        }
        config.n_batch = config.n_batch.max(config.n_seq);
        let mut request = self.request.clone();
        request.n_gpu_layers = preset.n_gpu_layers.or(request.n_gpu_layers);
        request.policy = preset.policy.unwrap_or(request.policy);
        let placement = place(card, others, &inventory, &config, &request, last_resort)?;
        config.model_path = card.found.path.clone();
        config.model_id = card.id().to_owned();
        config.offload = offload(&placement, request.split_mode);
        // The context size the plan was made for (0 meant the model's trained context).
        config.n_ctx = placement.model.n_ctx;
        let (engine, thread) = spawn_llama_engine(config)
            .map_err(|e| LoadFailure::Failed(format!("cannot start the engine thread: {e}")))?;
        Ok(Started {
            engine,
            thread,
            placement: Some(placement),
        })
    }
}
