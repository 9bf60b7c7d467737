//! The GPU inventory: what each NVIDIA card has, read live through NVML or from a JSON file.
//!
//! NVML numbers devices by PCI bus order and ignores `CUDA_VISIBLE_DEVICES`, so a device is named
//! by its PCI bus id everywhere, never by its NVML index. No driver or no `libnvidia-ml.so.1` is not
//! an error for the server: the inventory is empty and the reason is kept for one log line.

use serde::{Deserialize, Serialize};

/// One GPU, as NVML reports it. This is also the `--gpus` JSON format (see README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    #[serde(default)]
    pub uuid: String,
    /// e.g. `00000000:01:00.0`.
    pub pci_bus_id: String,
    pub memory_total: u64,
    pub memory_free: u64,
    #[serde(default)]
    pub memory_used: u64,
    /// CUDA compute capability, e.g. `[8, 6]`.
    pub compute_capability: [u32; 2],
    #[serde(default)]
    pub utilization_percent: Option<u32>,
    #[serde(default)]
    pub temperature_celsius: Option<u32>,
    #[serde(default)]
    pub power_watts: Option<f64>,
    #[serde(default)]
    pub display_attached: bool,
    /// Memory held by other processes (compute and graphics).
    #[serde(default)]
    pub other_process_memory: u64,
    /// An RPC worker's device: the worker's `HOST:PORT`. Its `pci_bus_id` is then a placement id
    /// (`rpc:HOST:PORT/N`), its memory what the worker reports, and `memory_used` what this
    /// process allocated there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// Every GPU plus host memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub gpus: Vec<Gpu>,
    /// Host memory available for what stays on the CPU.
    pub ram_available: u64,
    #[serde(default)]
    pub driver_version: Option<String>,
    /// Why `gpus` is empty, when NVML could not be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
}

/// Reads an inventory (NVML, a file, or a fake in tests).
pub trait InventorySource {
    fn read(&self) -> Result<Inventory, InventoryError>;
}

/// `MemAvailable` from /proc/meminfo, in bytes (0 when unreadable).
pub fn host_ram_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Live readings through NVML.
pub struct NvmlSource;

impl InventorySource for NvmlSource {
    fn read(&self) -> Result<Inventory, InventoryError> {
        Ok(read_nvml())
    }
}

fn read_nvml() -> Inventory {
    let ram_available = host_ram_available();
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        Err(err) => {
            return Inventory {
                gpus: Vec::new(),
                ram_available,
                driver_version: None,
                unavailable: Some(format!("NVML unavailable ({err}); running on the CPU")),
            }
        }
    };
    let count = nvml.device_count().unwrap_or(0);
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        let (Ok(memory), Ok(pci)) = (device.memory_info(), device.pci_info()) else {
            continue;
        };
        let compute = device
            .cuda_compute_capability()
            .map(|c| [c.major as u32, c.minor as u32])
            .unwrap_or([0, 0]);
        let other: u64 = [
            device.running_compute_processes(),
            device.running_graphics_processes(),
        ]
        .into_iter()
        .flatten()
        .flatten()
        // This process is not "other": a reading taken while serving must not count our own model.
        .filter(|p| p.pid != std::process::id())
        .map(|p| match p.used_gpu_memory {
            nvml_wrapper::enums::device::UsedGpuMemory::Used(bytes) => bytes,
            nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
        })
        .sum();
        gpus.push(Gpu {
            name: device.name().unwrap_or_else(|_| "unknown".into()),
            uuid: device.uuid().unwrap_or_default(),
            pci_bus_id: pci.bus_id,
            memory_total: memory.total,
            memory_free: memory.free,
            memory_used: memory.used,
            compute_capability: compute,
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            temperature_celsius: device
                .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                .ok(),
            // NVML reports milliwatts.
            power_watts: device.power_usage().ok().map(|mw| f64::from(mw) / 1e3),
            // "Active" (a display is being driven), not "connected": datacenter cards report a
            // display mode as connected with no display (seen on an H100), which would cost them a
            // needless margin.
            display_attached: device.is_display_active().unwrap_or(false),
            other_process_memory: other,
            remote: None,
        });
    }
    Inventory {
        gpus,
        ram_available,
        driver_version: nvml.sys_driver_version().ok(),
        unavailable: None,
    }
}

/// A local source plus the devices of RPC workers, read by `remote` (which knows llama.cpp; this
/// module does not).
pub struct WithRemote<S> {
    pub local: S,
    pub remote: std::sync::Arc<dyn Fn() -> Vec<Gpu> + Send + Sync>,
}

impl<S: InventorySource> InventorySource for WithRemote<S> {
    fn read(&self) -> Result<Inventory, InventoryError> {
        let mut inventory = self.local.read()?;
        inventory.gpus.extend((self.remote)());
        Ok(inventory)
    }
}

/// One source read from several places (the loader, the poller).
pub struct Shared(pub std::sync::Arc<dyn InventorySource + Send + Sync>);

impl InventorySource for Shared {
    fn read(&self) -> Result<Inventory, InventoryError> {
        self.0.read()
    }
}

/// An inventory from a JSON file (`lm-sandbox gpus --json` writes one), to plan for another machine.
pub struct FileSource(pub std::path::PathBuf);

impl InventorySource for FileSource {
    fn read(&self) -> Result<Inventory, InventoryError> {
        let error = |reason: String| InventoryError::File {
            path: self.0.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(&self.0).map_err(|e| error(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| error(e.to_string()))
    }
}

/// Normalises a PCI bus id for comparison: NVML writes an 8-digit domain (`00000000:01:00.0`),
/// CUDA and llama.cpp a 4-digit one (`0000:01:00.0`), in either case.
pub fn normalize_bus_id(id: &str) -> String {
    if id.starts_with("rpc:") {
        return id.to_owned();
    }
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) => {
            let domain = u32::from_str_radix(domain, 16).unwrap_or(0);
            format!("{domain:04x}:{rest}")
        }
        None => id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_match_across_nvml_and_cuda_spellings() {
        assert_eq!(
            normalize_bus_id("00000000:01:00.0"),
            normalize_bus_id("0000:01:00.0")
        );
        assert_eq!(normalize_bus_id("00000000:0A:00.0"), "0000:0a:00.0");
    }

    #[test]
    fn without_a_driver_the_inventory_is_empty_with_a_reason() {
        // This machine has no NVIDIA driver; on one that has, the GPUs are listed instead.
        let inventory = NvmlSource.read().unwrap();
        if inventory.gpus.is_empty() {
            assert!(inventory.unavailable.unwrap().contains("NVML"));
        }
        assert!(inventory.ram_available > 0);
    }

    #[test]
    fn the_json_format_round_trips_and_defaults_optional_fields() {
        let json = r#"{"gpus":[{"name":"RTX 3060","pci_bus_id":"00000000:01:00.0",
            "memory_total":12884901888,"memory_free":12000000000,"compute_capability":[8,6]}],
            "ram_available":100000000000}"#;
        let inventory: Inventory = serde_json::from_str(json).unwrap();
        assert!(!inventory.gpus[0].display_attached);
        let back: Inventory =
            serde_json::from_str(&serde_json::to_string(&inventory).unwrap()).unwrap();
        assert_eq!(back, inventory);
    }
}
