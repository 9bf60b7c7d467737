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
use super::inventory::{Inventory, InventorySource};
use super::plan::{plan, Plan, PlanConfig};

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

/// Plans `model_path` for a context of `n_ctx` (0: trained) over `n_seq` sequences on `inventory`,
/// with the user's placement settings in `request` (its context and build fields are set here).
pub fn decide(
    model_path: &Path,
    n_ctx: u32,
    n_seq: u32,
    request: &PlanConfig,
    inventory: &Inventory,
) -> Result<(Placement, ModelFacts), PlacementError> {
    let facts = model_facts(model_path)?;
    let n_ctx = if n_ctx == 0 { facts.n_ctx_train } else { n_ctx };
    let config = PlanConfig {
        n_ctx,
        n_seq,
        cuda: cfg!(feature = "cuda"),
        ..request.clone()
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

/// What loading took on one planned GPU, beside what the plan said.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    pub pci_bus_id: String,
    /// The plan's bytes: weights, KV cache, compute buffers, output layer.
    pub planned: u64,
    /// Free memory before loading minus free memory now. Includes what the CUDA runtime itself
    /// takes on the device (its context and cuBLAS workspace), which the plan leaves to the margin,
    /// and anything other processes allocated meanwhile.
    pub used: u64,
    /// `(used - planned) / planned`, in percent.
    pub difference_percent: f64,
    /// What llama.cpp's load took on this GPU, the runtime's own context excluded: the figure the
    /// plan estimates. `None` until the model has loaded.
    pub allocated: Option<u64>,
    /// `(allocated - planned) / planned`, in percent.
    pub allocated_difference_percent: Option<f64>,
}

/// `(actual - planned) / planned` in percent, to one decimal.
fn percent_off(actual: u64, planned: u64) -> f64 {
    let off = (actual as f64 - planned as f64) / planned as f64 * 100.0;
    (off * 10.0).round() / 10.0
}

/// Per planned GPU, the memory this process's load took (`before` minus `now`, matched by PCI bus
/// id) against the plan, with what llama.cpp reported allocating (`allocated`: bus id, bytes).
/// GPUs the plan leaves empty, or missing from a reading, are skipped.
pub fn measure(
    plan: &Plan,
    before: &Inventory,
    now: &Inventory,
    allocated: &[(String, u64)],
) -> Vec<Measured> {
    use super::inventory::normalize_bus_id;
    let find = |inventory: &'_ Inventory, bus: &str| {
        inventory
            .gpus
            .iter()
            .find(|g| normalize_bus_id(&g.pci_bus_id) == bus)
            .cloned()
    };
    plan.devices
        .iter()
        .filter(|d| d.total > 0)
        .filter_map(|d| {
            let bus = normalize_bus_id(&d.pci_bus_id);
            let current = find(now, &bus)?;
            // An RPC device's use is what its worker allocated for this process, as the relay
            // saw it (a worker's "free" may be fixed, as ggml's CPU device reports it).
            let used = if current.remote.is_some() {
                current.memory_used
            } else {
                find(before, &bus)?
                    .memory_free
                    .saturating_sub(current.memory_free)
            };
            let allocated = allocated
                .iter()
                .find(|(b, _)| normalize_bus_id(b) == bus)
                .map(|&(_, bytes)| bytes);
            Some(Measured {
                pci_bus_id: d.pci_bus_id.clone(),
                planned: d.total,
                used,
                difference_percent: percent_off(used, d.total),
                allocated,
                allocated_difference_percent: allocated.map(|a| percent_off(a, d.total)),
            })
        })
        .collect()
}

/// What another loaded model holds on the GPUs, for planning the next load.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub model: String,
    /// Per GPU (PCI bus id): the plan's bytes, and what llama.cpp has allocated of them so far
    /// (already missing from NVML's free memory).
    pub gpus: Vec<(String, u64, u64)>,
}

impl Held {
    /// `plan`'s bytes per GPU, with llama.cpp's measured allocations (bus id, bytes).
    pub fn new(model: &str, plan: &Plan, allocated: &[(String, u64)]) -> Self {
        use super::inventory::normalize_bus_id;
        let gpus = plan
            .devices
            .iter()
            .filter(|d| d.total > 0)
            .map(|d| {
                let bus = normalize_bus_id(&d.pci_bus_id);
                let done = allocated
                    .iter()
                    .find(|(b, _)| normalize_bus_id(b) == bus)
                    .map_or(0, |&(_, bytes)| bytes);
                (d.pci_bus_id.clone(), d.total, done)
            })
            .collect();
        Self {
            model: model.to_owned(),
            gpus,
        }
    }
}

/// `inventory` with each GPU's free memory lowered by what loaded models' plans still hold beyond
/// what they have allocated (NVML already counts the allocated part as used).
pub fn subtract_held(inventory: &Inventory, held: &[Held]) -> Inventory {
    use super::inventory::normalize_bus_id;
    let mut out = inventory.clone();
    for gpu in &mut out.gpus {
        let bus = normalize_bus_id(&gpu.pci_bus_id);
        let pending: u64 = held
            .iter()
            .flat_map(|h| &h.gpus)
            .filter(|(b, _, _)| normalize_bus_id(b) == bus)
            .map(|&(_, planned, allocated)| planned.saturating_sub(allocated))
            .sum();
        gpu.memory_free = gpu.memory_free.saturating_sub(pending);
    }
    out
}

/// Every GPU's memory and what holds it, for the error a load that cannot fit gets.
pub fn budget_report(inventory: &Inventory, held: &[Held]) -> String {
    use super::inventory::normalize_bus_id;
    use super::report::gib;
    if inventory.gpus.is_empty() {
        return format!(
            "no GPU: host memory available {} GiB",
            gib(inventory.ram_available)
        );
    }
    inventory
        .gpus
        .iter()
        .enumerate()
        .map(|(i, gpu)| {
            let bus = normalize_bus_id(&gpu.pci_bus_id);
            let holders: Vec<String> = held
                .iter()
                .filter_map(|h| {
                    let bytes: u64 = h
                        .gpus
                        .iter()
                        .filter(|(b, _, _)| normalize_bus_id(b) == bus)
                        .map(|&(_, planned, _)| planned)
                        .sum();
                    (bytes > 0).then(|| format!("{} {} GiB", h.model, gib(bytes)))
                })
                .collect();
            let budget = gpu
                .memory_free
                .saturating_sub(super::plan::default_margin(gpu));
            format!(
                "GPU {i} ({}): {} GiB total, {} GiB free, budget {} GiB; held by {}{}",
                gpu.name,
                gib(gpu.memory_total),
                gib(gpu.memory_free),
                gib(budget),
                if holders.is_empty() {
                    "no loaded model".to_owned()
                } else {
                    holders.join(", ")
                },
                if gpu.other_process_memory > 0 {
                    format!(", other processes {} GiB", gib(gpu.other_process_memory))
                } else {
                    String::new()
                }
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How often the live inventory is re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Publishes `source`'s readings every `interval` from a thread of its own. Without NVML and
/// without RPC devices it publishes the first reading (empty, with the reason) once and stops.
pub fn spawn_poller(
    first: Inventory,
    interval: Duration,
    source: std::sync::Arc<dyn InventorySource + Send + Sync>,
) -> watch::Receiver<Inventory> {
    let nvml_present = first.unavailable.is_none() || first.gpus.iter().any(|g| g.remote.is_some());
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
                if let Ok(inventory) = source.read() {
                    tx.send_replace(inventory);
                }
            });
        if let Err(err) = spawned {
            tracing::warn!(%err, "cannot start the NVML poller; /v1/placement shows start-up readings");
        }
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::inventory::Gpu;
    use crate::gpu::plan::{DevicePlan, Policy};

    const GIB: u64 = 1024 * 1024 * 1024;

    fn device(bus: &str, total: u64) -> DevicePlan {
        DevicePlan {
            gpu: 0,
            name: "card".into(),
            pci_bus_id: bus.into(),
            first_layer: 0,
            end_layer: if total > 0 { 10 } else { 0 },
            weights: total,
            kv_cache: 0,
            compute: 0,
            output: 0,
            total,
            budget: 8 * GIB,
            headroom: 8 * GIB - total,
        }
    }

    fn reading(free: &[(&str, u64)]) -> Inventory {
        Inventory {
            gpus: free
                .iter()
                .map(|&(bus, memory_free)| Gpu {
                    name: "card".into(),
                    uuid: String::new(),
                    pci_bus_id: bus.into(),
                    memory_total: 12 * GIB,
                    memory_free,
                    memory_used: 12 * GIB - memory_free,
                    compute_capability: [8, 6],
                    utilization_percent: None,
                    temperature_celsius: None,
                    power_watts: None,
                    display_attached: false,
                    other_process_memory: 0,
                    remote: None,
                })
                .collect(),
            ram_available: 0,
            driver_version: None,
            unavailable: None,
        }
    }

    #[test]
    fn measured_use_is_matched_by_bus_id_and_compared_with_the_plan() {
        let plan = Plan {
            policy: Policy::Proportional,
            devices: vec![
                device("00000000:01:00.0", 4 * GIB),
                device("00000000:02:00.0", 2 * GIB),
                device("00000000:03:00.0", 0),
            ],
            n_gpu_layers: 20,
            tensor_split: vec![10, 10, 0],
            cpu_layers: 0,
            cpu_bytes: 0,
            ram_available: 0,
            reasons: vec![],
        };
        // The readings come in another order than the plan's.
        let before = reading(&[
            ("00000000:02:00.0", 6 * GIB),
            ("00000000:01:00.0", 11 * GIB),
            ("00000000:03:00.0", 6 * GIB),
        ]);
        let now = reading(&[
            ("00000000:01:00.0", 7 * GIB - GIB / 5),
            ("00000000:02:00.0", 4 * GIB + GIB / 10),
            ("00000000:03:00.0", 5 * GIB),
        ]);
        let allocated = vec![("00000000:02:00.0".to_owned(), 2 * GIB + GIB / 50)];
        let measured = measure(&plan, &before, &now, &allocated);
        assert_eq!(measured.len(), 2, "the empty device is skipped");
        assert_eq!(measured[0].allocated, None);
        assert_eq!(measured[1].allocated, Some(2 * GIB + GIB / 50));
        assert_eq!(measured[1].allocated_difference_percent, Some(1.0));
        assert_eq!(measured[0].pci_bus_id, "00000000:01:00.0");
        assert_eq!(measured[0].used, 4 * GIB + GIB / 5);
        assert_eq!(measured[0].difference_percent, 5.0);
        assert_eq!(measured[1].used, 2 * GIB - GIB / 10);
        assert_eq!(measured[1].difference_percent, -5.0);
        // A GPU gone from the reading is skipped, not a panic.
        assert_eq!(measure(&plan, &before, &reading(&[]), &[]).len(), 0);
    }
}
