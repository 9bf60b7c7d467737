//! Human-readable tables for `lm-sandbox gpus` and `lm-sandbox plan`.

use std::fmt::Write as _;

use super::inventory::Inventory;
use super::plan::Plan;

/// Bytes as GiB with two decimals, without the unit (tables carry it in the header).
pub(super) fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
}

/// The inventory as a table.
pub fn inventory_table(inventory: &Inventory) -> String {
    let mut out = String::new();
    if let Some(reason) = &inventory.unavailable {
        let _ = writeln!(out, "{reason}");
    }
    if let Some(driver) = &inventory.driver_version {
        let _ = writeln!(out, "driver {driver}");
    }
    let _ = writeln!(
        out,
        "{:>3}  {:<28} {:<17} {:>4}  {:>9} {:>9} {:>9} {:>9}  {:>5}  display",
        "#", "name", "pci bus id", "cc", "total GiB", "free GiB", "used GiB", "other GiB", "util"
    );
    for (i, g) in inventory.gpus.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>3}  {:<28} {:<17} {:>4}  {:>9} {:>9} {:>9} {:>9}  {:>5}  {}",
            i,
            g.name,
            g.pci_bus_id,
            format!("{}.{}", g.compute_capability[0], g.compute_capability[1]),
            gib(g.memory_total),
            gib(g.memory_free),
            gib(g.memory_used),
            gib(g.other_process_memory),
            g.utilization_percent
                .map_or("-".to_owned(), |u| format!("{u}%")),
            if g.display_attached { "yes" } else { "no" }
        );
    }
    let _ = writeln!(
        out,
        "host RAM available: {} GiB",
        gib(inventory.ram_available)
    );
    out
}

/// The plan as a table, followed by its reasons.
pub fn plan_table(plan: &Plan, n_layer: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy {:?}; n_gpu_layers {} of {} (+1 = output layer); tensor_split {:?}",
        plan.policy, plan.n_gpu_layers, n_layer, plan.tensor_split
    );
    let _ = writeln!(
        out,
        "{:<5} {:<28} {:>9}  {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "order",
        "device",
        "layers",
        "weights",
        "KV",
        "compute",
        "output",
        "total",
        "budget",
        "headroom"
    );
    for (order, d) in plan.devices.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<5} {:<28} {:>9}  {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            order,
            format!("GPU {} {}", d.gpu, d.name),
            format!("{}..{}", d.first_layer, d.end_layer),
            gib(d.weights),
            gib(d.kv_cache),
            gib(d.compute),
            gib(d.output),
            gib(d.total),
            gib(d.budget),
            gib(d.headroom)
        );
    }
    let _ = writeln!(
        out,
        "{:<5} {:<28} {:>9}  {:>8} GiB of host memory (embedding{}), {} GiB available",
        "",
        "CPU",
        format!("0..{}", plan.cpu_layers),
        gib(plan.cpu_bytes),
        if plan.devices.iter().any(|d| d.output > 0) {
            ""
        } else {
            ", output layer"
        },
        gib(plan.ram_available)
    );
    let _ = writeln!(out, "(GiB; compute buffers are estimates)");
    for reason in &plan.reasons {
        let _ = writeln!(out, "- {reason}");
    }
    out
}
