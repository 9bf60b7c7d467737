//! The placement planner: a pure function from model facts, a GPU inventory and the run config to a
//! plan a person can read before anything loads.
//!
//! llama.cpp's model: with `n_gpu_layers = k` the *last* `k` repeating layers are offloaded, split
//! over the devices in order as contiguous ranges (`tensor_split`), and the output layer is offloaded
//! (to the device holding the last layer) only when `k > n_layer`. The token embedding stays in host
//! memory. Each offloaded layer carries its KV cache; each device with layers needs a compute buffer.
//!
//! Policies:
//! - `auto` (the CLI's default): a model that fits on one card with its margin goes on one card
//!   alone, the fastest such card, preferring cards no other loaded model holds (every token would
//!   otherwise wait on the slower card); otherwise it is split as `prefer-fast` splits it.
//! - `proportional`: every card ends with the same fraction of its budget free. Cards are ordered by
//!   budget, smallest first, so the largest card holds the last layers and the output layer.
//! - `prefer-fast`: the fastest card (compute capability, then memory size) is filled first and gets
//!   the output layer; slower cards take the layers before it; the rest stays on the CPU.
//!
//! Budgets: free memory minus a margin of max(512 MiB, 5 % of the card), plus 256 MiB on a card
//! driving a display. Memory other processes hold is already missing from "free".
//!
//! RPC workers' devices (`Gpu::remote`) are devices like the others, in any build, with a margin
//! of 5 % of what the worker reports. `auto` and `prefer-fast` order them before the local cards,
//! so the local cards take the last layers and the output layer and the workers the layers before
//! them (each remote layer costs a network round trip per token), and `auto` puts a model on one
//! device alone only on a local card, unless there is none.

use serde::Serialize;

use super::gguf::ModelFacts;
use super::inventory::{Gpu, Inventory};

const MIB: u64 = 1024 * 1024;

/// How layers are spread over GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Auto,
    Proportional,
    PreferFast,
}

/// llama.cpp's split modes; `none` keeps everything on `main_gpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SplitMode {
    Layer,
    None,
}

/// Everything the planner is told besides the model and the inventory.
#[derive(Debug, Clone)]
pub struct PlanConfig {
    /// Total context over all sequences.
    pub n_ctx: u32,
    pub n_seq: u32,
    pub n_ubatch: u32,
    /// Bytes per KV element: 2 for f16, 34/32 for q8_0, 18/32 for q4_0.
    pub kv_bytes_per_element: f64,
    pub policy: Policy,
    /// Replaces the default per-card margin.
    pub margin: Option<u64>,
    /// Whether this build can offload at all (CUDA), and the lowest compute capability it runs on.
    pub cuda: bool,
    pub min_compute_capability: [u32; 2],
    // User overrides (llama-server's flags).
    pub n_gpu_layers: Option<u32>,
    /// Inventory indices to use, in that order.
    pub devices: Option<Vec<usize>>,
    /// Proportions per used device (in `devices` order or the policy's order).
    pub tensor_split: Option<Vec<f64>>,
    pub split_mode: SplitMode,
    pub main_gpu: usize,
    /// PCI bus ids of cards other loaded models hold (`auto` prefers the others).
    pub occupied: Vec<String>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            n_ctx: 4096,
            n_seq: 1,
            n_ubatch: 512,
            kv_bytes_per_element: 2.0,
            policy: Policy::Proportional,
            margin: None,
            cuda: true,
            min_compute_capability: [6, 1],
            n_gpu_layers: None,
            devices: None,
            tensor_split: None,
            split_mode: SplitMode::Layer,
            main_gpu: 0,
            occupied: Vec::new(),
        }
    }
}

/// One GPU's share.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePlan {
    /// Index in the inventory.
    pub gpu: usize,
    pub name: String,
    pub pci_bus_id: String,
    /// Layers `first..end`.
    pub first_layer: u32,
    pub end_layer: u32,
    pub weights: u64,
    pub kv_cache: u64,
    pub compute: u64,
    pub output: u64,
    pub total: u64,
    pub budget: u64,
    pub headroom: u64,
}

/// The placement, with its reasons.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub policy: Policy,
    /// GPUs in llama.cpp device order.
    pub devices: Vec<DevicePlan>,
    /// llama.cpp's `n_gpu_layers` (`n_layer + 1` means the output layer too).
    pub n_gpu_layers: u32,
    /// Layer count per device, in device order (llama.cpp's `tensor_split`).
    pub tensor_split: Vec<u32>,
    pub cpu_layers: u32,
    /// Host memory for CPU layers, their KV, the embedding, and the output layer if not offloaded.
    pub cpu_bytes: u64,
    pub ram_available: u64,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Override(String),
    /// A card's share exceeds its budget: freeing memory on it (unloading a model) may help.
    #[error("{0}")]
    OverBudget(String),
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
}

fn gib(bytes: u64) -> String {
    format!("{} GiB", super::report::gib(bytes))
}

/// Per-layer memory costs for a config.
struct Costs {
    weights: Vec<u64>,
    kv: Vec<u64>,
    output: u64,
    embedding: u64,
    compute: u64,
    output_compute: u64,
}

impl Costs {
    fn new(m: &ModelFacts, c: &PlanConfig) -> Self {
        let kv = (0..m.n_layer as usize)
            .map(|l| {
                let per_token = f64::from(m.n_head_kv[l])
                    * (m.key_length + m.value_length) as f64
                    * c.kv_bytes_per_element;
                let cells = match m.sliding_window {
                    Some(w) if m.swa_layers.contains(&(l as u32)) => {
                        u64::from(c.n_ctx).min(u64::from(c.n_seq) * w + u64::from(c.n_ubatch))
                    }
                    _ => u64::from(c.n_ctx),
                };
                (per_token * cells as f64) as u64
            })
            .collect();
        // Estimates of llama.cpp's compute buffers: activations for one micro-batch on every device
        // with layers, plus the logits of a micro-batch on the output device.
        let compute = u64::from(c.n_ubatch) * m.n_embd * 4 * 16;
        let output_compute = u64::from(c.n_ubatch) * m.n_vocab * 4;
        Self {
            weights: m.layer_bytes.clone(),
            kv,
            output: m.output_bytes,
            embedding: m.embedding_bytes,
            compute,
            output_compute,
        }
    }

    fn layer(&self, l: usize) -> u64 {
        self.weights[l] + self.kv[l]
    }
}

/// The default margin for a card. An RPC worker's device keeps 5 % of what it reports (its
/// `--mem` is the headroom the worker's operator chose).
pub fn default_margin(gpu: &Gpu) -> u64 {
    if gpu.remote.is_some() {
        return gpu.memory_total / 20;
    }
    let base = (512 * MIB).max(gpu.memory_total / 20);
    if gpu.display_attached {
        base + 256 * MIB
    } else {
        base
    }
}

/// A speed rank for `prefer-fast`: compute capability, then memory size.
fn speed(gpu: &Gpu) -> (u32, u32, u64) {
    (
        gpu.compute_capability[0],
        gpu.compute_capability[1],
        gpu.memory_total,
    )
}

/// Plans the placement of `model` on `inventory` under `config`.
pub fn plan(
    model: &ModelFacts,
    inventory: &Inventory,
    config: &PlanConfig,
) -> Result<Plan, PlanError> {
    let mut planning = Planning {
        model,
        inventory,
        config,
        costs: Costs::new(model, config),
        reasons: Vec::new(),
    };
    let usable = planning.select()?;
    let usable = planning.order(usable);
    let budgets: Vec<u64> = usable
        .iter()
        .map(|&i| {
            inventory.gpus[i]
                .memory_free
                .saturating_sub(margin(config, &inventory.gpus[i]))
        })
        .collect();
    let (counts, output_on_gpu) = planning.counts(&usable, &budgets)?;
    let gpu_layers: u32 = counts.iter().sum();
    let devices = planning.devices(&usable, &counts, &budgets, output_on_gpu)?;
    let (cpu_layers, cpu_bytes) = planning.host(&usable, &budgets, gpu_layers, output_on_gpu)?;
    let n_gpu_layers = gpu_layers + u32::from(output_on_gpu);
    Ok(Plan {
        policy: config.policy,
        devices,
        n_gpu_layers,
        tensor_split: counts,
        cpu_layers,
        cpu_bytes,
        ram_available: inventory.ram_available,
        reasons: planning.reasons,
    })
}

/// A card's margin: the configured one, else [`default_margin`].
fn margin(config: &PlanConfig, gpu: &Gpu) -> u64 {
    config.margin.unwrap_or_else(|| default_margin(gpu))
}

/// One plan in the making: its inputs, the costs, and the reasons gathered step by step.
struct Planning<'a> {
    model: &'a ModelFacts,
    inventory: &'a Inventory,
    config: &'a PlanConfig,
    costs: Costs,
    reasons: Vec<String>,
}

impl Planning<'_> {
    /// Which GPUs may take layers: a CUDA build, `--devices`, the build's compute capability,
    /// `--split-mode none`.
    fn select(&mut self) -> Result<Vec<usize>, PlanError> {
        let (config, inventory) = (self.config, self.inventory);
        let reasons = &mut self.reasons;
        let mut usable: Vec<usize> = Vec::new();
        let has_local = inventory.gpus.iter().any(|g| g.remote.is_none());
        let has_remote = inventory.gpus.iter().any(|g| g.remote.is_some());
        if !config.cuda && !has_remote {
            reasons.push("this build has no CUDA backend: everything runs on the CPU".to_owned());
        } else if !has_local && !has_remote {
            reasons.push(
                inventory
                    .unavailable
                    .clone()
                    .unwrap_or_else(|| "no GPU found: everything runs on the CPU".to_owned()),
            );
        } else {
            let candidates: Vec<usize> = match &config.devices {
                Some(list) => {
                    for &i in list {
                        if i >= inventory.gpus.len() {
                            return Err(PlanError::Override(format!(
                                "--devices names GPU {i}, but there are {} GPUs",
                                inventory.gpus.len()
                            )));
                        }
                    }
                    list.clone()
                }
                None => (0..inventory.gpus.len()).collect(),
            };
            for i in candidates {
                let gpu = &inventory.gpus[i];
                if gpu.remote.is_some() {
                    // An RPC worker's device runs whatever backend the worker was built with.
                    usable.push(i);
                } else if !config.cuda {
                    reasons.push(format!(
                        "GPU {i} ({}) skipped: this build has no CUDA backend",
                        gpu.name
                    ));
                } else if gpu.compute_capability < config.min_compute_capability {
                    reasons.push(format!(
                        "GPU {i} ({}) skipped: compute capability {}.{} is below this build's {}.{}",
                        gpu.name,
                        gpu.compute_capability[0],
                        gpu.compute_capability[1],
                        config.min_compute_capability[0],
                        config.min_compute_capability[1]
                    ));
                } else {
                    usable.push(i);
                }
            }
        }
        if config.split_mode == SplitMode::None && !usable.is_empty() {
            if !usable.contains(&config.main_gpu) {
                return Err(PlanError::Override(format!(
                    "--split-mode none uses --main-gpu {}, which is not a usable GPU",
                    config.main_gpu
                )));
            }
            usable = vec![config.main_gpu];
            reasons.push(format!(
                "--split-mode none: everything offloaded goes to GPU {}",
                config.main_gpu
            ));
        }
        Ok(usable)
    }

    /// The usable GPUs in llama.cpp's device order (the last holds the last layers): `auto` alone
    /// on one card when the model fits one, else by the policy; each card's budget in the reasons.
    fn order(&mut self, mut usable: Vec<usize>) -> Vec<usize> {
        let (config, inventory, n_layer) = (self.config, self.inventory, self.model.n_layer);
        let costs = &self.costs;
        let reasons = &mut self.reasons;
        let margin_of = |i: usize| margin(config, &inventory.gpus[i]);
        let budget_of = |i: usize| inventory.gpus[i].memory_free.saturating_sub(margin_of(i));
        // What the whole model needs on one card: every layer, the output layer, one compute buffer.
        let whole = (0..n_layer).map(|l| costs.layer(l as usize)).sum::<u64>()
            + costs.output
            + costs.output_compute
            + costs.compute;
        let auto_alone = config.policy == Policy::Auto
            && config.devices.is_none()
            && config.tensor_split.is_none()
            && config.n_gpu_layers.is_none()
            && config.split_mode == SplitMode::Layer;
        if auto_alone {
            // An RPC device alone only when no local card can take layers: the default keeps as
            // many layers as fit on local cards (each remote layer costs a round trip per token).
            let any_local = usable.iter().any(|&i| inventory.gpus[i].remote.is_none());
            let alone = usable
                .iter()
                .copied()
                .filter(|&i| !(any_local && inventory.gpus[i].remote.is_some()))
                .filter(|&i| budget_of(i) >= whole)
                .max_by_key(|&i| {
                    let gpu = &inventory.gpus[i];
                    (
                        !config.occupied.contains(&gpu.pci_bus_id),
                        speed(gpu),
                        budget_of(i),
                        std::cmp::Reverse(gpu.pci_bus_id.clone()),
                    )
                });
            match alone {
                Some(i) => {
                    let gpu = &inventory.gpus[i];
                    let held = usable
                        .iter()
                        .filter(|&&j| j != i && config.occupied.contains(&inventory.gpus[j].pci_bus_id))
                        .count();
                    reasons.push(format!(
                        "auto: the model ({}) fits on GPU {i} ({}) alone, the fastest card it fits on{}: one card, so no token waits on a slower one",
                        gib(whole),
                        gpu.name,
                        if config.occupied.contains(&gpu.pci_bus_id) {
                            " (other models share it: no free card fits it)".to_owned()
                        } else if held > 0 {
                            " that no other model holds".to_owned()
                        } else {
                            String::new()
                        }
                    ));
                    usable = vec![i];
                }
                None if !usable.is_empty() => reasons.push(format!(
                    "auto: the model ({}) fits on no single card: split, fastest cards first (as prefer-fast)",
                    gib(whole)
                )),
                None => {}
            }
        }
        if config.devices.is_none() {
            match config.policy {
                Policy::Proportional => {
                    usable.sort_by_key(|&i| (budget_of(i), inventory.gpus[i].pci_bus_id.clone()));
                    if usable.len() > 1 {
                        reasons.push("proportional: cards ordered by budget, so the largest holds the last layers and the output layer".to_owned());
                    }
                }
                Policy::Auto | Policy::PreferFast => {
                    // Local cards last, so they are filled first and hold the output layer: every
                    // layer on an RPC worker costs a network round trip per token.
                    usable.sort_by_key(|&i| {
                        (
                            inventory.gpus[i].remote.is_none(),
                            speed(&inventory.gpus[i]),
                            inventory.gpus[i].pci_bus_id.clone(),
                        )
                    });
                    let remote = usable
                        .iter()
                        .filter(|&&i| inventory.gpus[i].remote.is_some())
                        .count();
                    if remote > 0 && remote < usable.len() {
                        reasons.push(format!(
                            "{}: local GPUs are filled first and hold the output layer; the {remote} RPC device(s) take the layers before them (each remote layer costs a network round trip per token)",
                            if config.policy == Policy::Auto { "auto" } else { "prefer-fast" }
                        ));
                    }
                    if let (Some(&fast), Policy::PreferFast) = (usable.last(), config.policy) {
                        reasons.push(format!(
                            "prefer-fast: GPU {fast} ({}) is fastest (compute capability {}.{}): filled first, with the output layer",
                            inventory.gpus[fast].name,
                            inventory.gpus[fast].compute_capability[0],
                            inventory.gpus[fast].compute_capability[1]
                        ));
                    }
                }
            }
        }
        for &i in &usable {
            let gpu = &inventory.gpus[i];
            reasons.push(format!(
                "{} {i} ({}, {}): {} free, margin {}{}, budget {}",
                if gpu.remote.is_some() {
                    "RPC device"
                } else {
                    "GPU"
                },
                gpu.name,
                gpu.pci_bus_id,
                gib(gpu.memory_free),
                gib(margin_of(i)),
                if gpu.display_attached {
                    " (display attached)"
                } else {
                    ""
                },
                gib(budget_of(i))
            ));
        }
        usable
    }

    /// How many repeating layers each device takes, and whether the output layer is offloaded.
    fn counts(&mut self, usable: &[usize], budgets: &[u64]) -> Result<(Vec<u32>, bool), PlanError> {
        let (config, n_layer) = (self.config, self.model.n_layer);
        let costs = &self.costs;
        let reasons = &mut self.reasons;
        let output_allowed = config.n_gpu_layers.is_none_or(|n| n > n_layer);
        // The repeating layers an explicit --n-gpu-layers asks for.
        let asked = config.n_gpu_layers.map(|n| n.min(n_layer));
        let (counts, output_on_gpu) = if usable.is_empty() {
            (Vec::new(), false)
        } else if let Some(split) = &config.tensor_split {
            if split.len() != usable.len()
                || split.iter().any(|p| !p.is_finite() || *p < 0.0)
                || split.iter().sum::<f64>() <= 0.0
            {
                return Err(PlanError::Override(format!(
                    "--tensor-split needs {} non-negative proportions (one per used GPU); got {split:?}",
                    usable.len()
                )));
            }
            let k = asked.unwrap_or(n_layer);
            reasons.push(format!("--tensor-split {split:?} over {k} layers"));
            (split_by(k, split), k == n_layer && output_allowed)
        } else {
            // An explicit --n-gpu-layers above n_layer asks for the output layer too: plan it whole.
            let cap = config.n_gpu_layers.filter(|&n| n < n_layer);
            let (counts, output) = match config.policy {
                Policy::Proportional => proportional(costs, n_layer, budgets, cap),
                Policy::Auto | Policy::PreferFast => fill_from_end(costs, n_layer, budgets, cap),
            };
            match asked {
                Some(k) if counts.iter().sum::<u32>() < k => {
                    // Honour the override as asked; the per-device check below names what does not fit.
                    let split: Vec<f64> = budgets.iter().map(|&b| b as f64).collect();
                    (split_by(k, &split), k == n_layer && output_allowed)
                }
                // Above n_layer asks for the output layer too, as llama.cpp would place it; the
                // per-device check below names what does not fit.
                _ => (
                    counts,
                    output_allowed && (output || config.n_gpu_layers.is_some()),
                ),
            }
        };
        match config.n_gpu_layers {
            Some(n) if n > n_layer + 1 => reasons.push("--n-gpu-layers all".to_owned()),
            Some(n) => reasons.push(format!("--n-gpu-layers {n}")),
            None => {}
        }

        Ok((counts, output_on_gpu))
    }

    /// Each device's layers and bytes, checked against its budget.
    fn devices(
        &self,
        usable: &[usize],
        counts: &[u32],
        budgets: &[u64],
        output_on_gpu: bool,
    ) -> Result<Vec<DevicePlan>, PlanError> {
        let (config, inventory, n_layer) = (self.config, self.inventory, self.model.n_layer);
        let costs = &self.costs;
        let margin_of = |i: usize| margin(config, &inventory.gpus[i]);
        let gpu_layers: u32 = counts.iter().sum();
        // Per-device totals.
        let mut devices = Vec::new();
        let mut start = n_layer - gpu_layers;
        for (slot, (&i, &count)) in usable.iter().zip(counts).enumerate() {
            let end = start + count;
            let weights: u64 = (start..end).map(|l| costs.weights[l as usize]).sum();
            let kv: u64 = (start..end).map(|l| costs.kv[l as usize]).sum();
            let is_output = output_on_gpu && slot == usable.len() - 1;
            let output = if is_output { costs.output } else { 0 };
            let compute = if count > 0 || is_output {
                costs.compute + if is_output { costs.output_compute } else { 0 }
            } else {
                0
            };
            let total = weights + kv + output + compute;
            let budget = budgets[slot];
            if total > budget {
                let gpu = &inventory.gpus[i];
                return Err(PlanError::OverBudget(format!(
                    "GPU {i} ({}) would need {} ({} layers: {} weights, {} KV, {} compute{}) but its budget is {} ({} free, margin {})",
                    gpu.name,
                    gib(total),
                    count,
                    gib(weights),
                    gib(kv),
                    gib(compute),
                    if output > 0 { format!(", {} output", gib(output)) } else { String::new() },
                    gib(budget),
                    gib(gpu.memory_free),
                    gib(margin_of(i))
                )));
            }
            devices.push(DevicePlan {
                gpu: i,
                name: inventory.gpus[i].name.clone(),
                pci_bus_id: inventory.gpus[i].pci_bus_id.clone(),
                first_layer: start,
                end_layer: end,
                weights,
                kv_cache: kv,
                compute,
                output,
                total,
                budget,
                headroom: budget - total,
            });
            start = end;
        }

        Ok(devices)
    }

    /// What stays on the CPU, checked against the host's memory.
    fn host(
        &mut self,
        usable: &[usize],
        budgets: &[u64],
        gpu_layers: u32,
        output_on_gpu: bool,
    ) -> Result<(u32, u64), PlanError> {
        let (config, inventory, n_layer) = (self.config, self.inventory, self.model.n_layer);
        let costs = &self.costs;
        let reasons = &mut self.reasons;
        let cpu_layers = n_layer - gpu_layers;
        let cpu_bytes = (0..cpu_layers)
            .map(|l| costs.layer(l as usize))
            .sum::<u64>()
            + costs.embedding
            + if output_on_gpu {
                0
            } else {
                costs.output + costs.output_compute
            }
            + if cpu_layers > 0 { costs.compute } else { 0 };
        if cpu_layers > 0 && !usable.is_empty() {
            reasons.push(format!(
                "{cpu_layers} of {n_layer} layers stay on the CPU: the GPUs' budgets are full"
            ));
        }
        if cpu_bytes > inventory.ram_available {
            let vram: u64 = budgets.iter().sum();
            let kv_per_ctx: f64 =
                costs.kv.iter().sum::<u64>() as f64 / f64::from(config.n_ctx.max(1));
            let fixed: u64 = costs.weights.iter().sum::<u64>() + costs.output + costs.embedding;
            let room = (vram + inventory.ram_available).saturating_sub(fixed);
            let max_ctx = if kv_per_ctx > 0.0 {
                (room as f64 / kv_per_ctx) as u64
            } else {
                0
            };
            return Err(PlanError::DoesNotFit(format!(
                "it needs {} of host memory for {cpu_layers} CPU layers and the rest, but {} is available; \
                 in all it needs {} weights + {} KV cache for {} tokens, against {} of GPU budget and {} of RAM{}",
                gib(cpu_bytes),
                gib(inventory.ram_available),
                gib(fixed),
                gib(costs.kv.iter().sum()),
                config.n_ctx,
                gib(vram),
                gib(inventory.ram_available),
                if fixed < vram + inventory.ram_available && max_ctx >= 256 {
                    format!("; about --ctx-size {max_ctx} would fit")
                } else {
                    "; no context fits".to_owned()
                }
            )));
        }
        Ok((cpu_layers, cpu_bytes))
    }
}

/// `k` layers split by proportions, largest remainders rounding.
fn split_by(k: u32, proportions: &[f64]) -> Vec<u32> {
    let sum: f64 = proportions.iter().sum();
    let exact: Vec<f64> = proportions.iter().map(|p| p / sum * f64::from(k)).collect();
    let mut counts: Vec<u32> = exact.iter().map(|e| e.floor() as u32).collect();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    let mut left = k - counts.iter().sum::<u32>();
    for i in order {
        if left == 0 {
            break;
        }
        counts[i] += 1;
        left -= 1;
    }
    counts
}

/// Greedy placement of the last `want` layers, last device first; with `output`, the last device
/// also reserves the output layer and the logits.
fn greedy(costs: &Costs, n_layer: u32, budgets: &[u64], want: u32, output: bool) -> Vec<u32> {
    let mut counts = vec![0u32; budgets.len()];
    let lowest = n_layer - want;
    let mut next = n_layer;
    for slot in (0..budgets.len()).rev() {
        let reserve = if output && slot == budgets.len() - 1 {
            costs.output + costs.output_compute
        } else {
            0
        };
        let mut used = costs.compute + reserve;
        while next > lowest && used + costs.layer(next as usize - 1) <= budgets[slot] {
            used += costs.layer(next as usize - 1);
            next -= 1;
            counts[slot] += 1;
        }
    }
    counts
}

/// Fills the last device first. Everything with the output layer if it fits; else as many of the
/// last layers as fit, the output layer staying on the CPU. Returns the counts and whether the
/// output layer is offloaded.
fn fill_from_end(
    costs: &Costs,
    n_layer: u32,
    budgets: &[u64],
    cap: Option<u32>,
) -> (Vec<u32>, bool) {
    let want = cap.unwrap_or(n_layer);
    if cap.is_none() {
        let counts = greedy(costs, n_layer, budgets, n_layer, true);
        if counts.iter().sum::<u32>() == n_layer {
            return (counts, true);
        }
    }
    (greedy(costs, n_layer, budgets, want, false), false)
}

/// Equal headroom fraction: each card gets layers in proportion to its budget, the last card also
/// carrying the output layer. Falls back to filling from the end when the model does not fit whole.
fn proportional(
    costs: &Costs,
    n_layer: u32,
    budgets: &[u64],
    cap: Option<u32>,
) -> (Vec<u32>, bool) {
    if cap.is_none() {
        let need: u64 = (0..n_layer).map(|l| costs.layer(l as usize)).sum::<u64>()
            + costs.output
            + costs.output_compute
            + costs.compute * budgets.len() as u64;
        let total: u64 = budgets.iter().sum();
        if need <= total {
            let fraction = need as f64 / total as f64;
            let mut counts = vec![0u32; budgets.len()];
            let mut layer = 0u32;
            for (slot, &budget) in budgets.iter().enumerate() {
                let last = slot == budgets.len() - 1;
                let mut target = fraction * budget as f64 - costs.compute as f64;
                if last {
                    counts[slot] = n_layer - layer;
                    break;
                }
                // Reserve nothing for output here: it sits on the last card.
                while layer < n_layer {
                    let cost = costs.layer(layer as usize) as f64;
                    if target - cost / 2.0 < 0.0 {
                        break;
                    }
                    target -= cost;
                    layer += 1;
                    counts[slot] += 1;
                }
            }
            if fits(costs, n_layer, budgets, &counts) {
                return (counts, true);
            }
        }
    }
    fill_from_end(costs, n_layer, budgets, cap)
}

/// Whether `counts` (device order, covering the last layers, the output layer on the last device)
/// fits every budget.
fn fits(costs: &Costs, n_layer: u32, budgets: &[u64], counts: &[u32]) -> bool {
    let mut start = n_layer - counts.iter().sum::<u32>();
    counts.iter().enumerate().all(|(slot, &count)| {
        let end = start + count;
        let is_output = slot == counts.len() - 1;
        let used: u64 = (start..end).map(|l| costs.layer(l as usize)).sum::<u64>()
            + costs.compute
            + if is_output {
                costs.output + costs.output_compute
            } else {
                0
            };
        start = end;
        used <= budgets[slot]
    })
}

#[cfg(test)]
mod tests;
