//! llama.cpp's RPC backend, both ends: `rpc-worker` serves this machine's devices
//! ([`serve_worker`]), and `serve --rpc` registers a worker's devices with llama.cpp through the
//! worker's relay ([`register`]), reads them as inventory entries ([`remote_gpus`]) and finds them
//! again by placement id ([`device_index`]).
//!
//! The binding declares nothing of `ggml-rpc.h`; the two functions used are declared here.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use llama_cpp_sys_2 as sys;

use super::LoadError;
use crate::gpu::inventory::Gpu;
use crate::rpc::Link;

unsafe extern "C" {
    fn ggml_backend_rpc_start_server(
        endpoint: *const c_char,
        cache_dir: *const c_char,
        n_threads: usize,
        n_devices: usize,
        devices: *mut sys::ggml_backend_dev_t,
    );
    fn ggml_backend_rpc_add_server(endpoint: *const c_char) -> sys::ggml_backend_reg_t;
}

/// What `rpc-worker` serves.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `HOST:PORT` to listen on.
    pub endpoint: String,
    /// llama.cpp device names (`CUDA0`, `CPU`); `None`: every GPU, else the CPU.
    pub devices: Option<Vec<String>>,
    /// The memory each device reports, in bytes (for a GPU, its use by this worker subtracted for
    /// "free").
    pub mem: Option<u64>,
    /// llama.cpp's tensor cache directory.
    pub cache: Option<PathBuf>,
    pub threads: usize,
}

fn name_of(device: sys::ggml_backend_dev_t) -> String {
    // SAFETY: a device's name is a static C string owned by its backend.
    unsafe { CStr::from_ptr(sys::ggml_backend_dev_name(device)) }
        .to_string_lossy()
        .into_owned()
}

fn description_of(device: sys::ggml_backend_dev_t) -> String {
    // SAFETY: as for the name.
    unsafe { CStr::from_ptr(sys::ggml_backend_dev_description(device)) }
        .to_string_lossy()
        .into_owned()
}

fn memory_of(device: sys::ggml_backend_dev_t) -> (u64, u64) {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two sizes.
    unsafe { sys::ggml_backend_dev_memory(device, &raw mut free, &raw mut total) };
    (free as u64, total as u64)
}

fn all_devices() -> Vec<sys::ggml_backend_dev_t> {
    // SAFETY: plain getters over llama.cpp's device registry.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .collect()
    }
}

/// The devices a worker serves: the named ones, else every GPU, else the CPU.
fn worker_devices(names: Option<&[String]>) -> Result<Vec<sys::ggml_backend_dev_t>, LoadError> {
    let all = all_devices();
    if let Some(names) = names {
        return names
            .iter()
            .map(|name| {
                all.iter()
                    .copied()
                    .find(|&d| name_of(d).eq_ignore_ascii_case(name))
                    .ok_or_else(|| {
                        LoadError::Backend(format!(
                            "--devices: llama.cpp has no device {name:?} (it has {:?})",
                            all.iter().map(|&d| name_of(d)).collect::<Vec<_>>()
                        ))
                    })
            })
            .collect();
    }
    // SAFETY: a getter.
    let of_type = |t| {
        all.iter()
            .copied()
            .filter(|&d| unsafe { sys::ggml_backend_dev_type(d) } == t)
            .collect::<Vec<_>>()
    };
    let gpus = of_type(sys::GGML_BACKEND_DEVICE_TYPE_GPU);
    if !gpus.is_empty() {
        return Ok(gpus);
    }
    let cpu = of_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
    if cpu.is_empty() {
        return Err(LoadError::Backend("llama.cpp has no CPU device".to_owned()));
    }
    Ok(cpu)
}

/// The head of ggml's `struct ggml_backend_device_i` (ggml-backend-impl.h), the first member of
/// `struct ggml_backend_device`: the three entries up to `get_memory`.
#[repr(C)]
struct DeviceIfaceHead {
    get_name: *const std::ffi::c_void,
    get_description: *const std::ffi::c_void,
    get_memory: Option<unsafe extern "C" fn(sys::ggml_backend_dev_t, *mut usize, *mut usize)>,
}

/// A device whose memory `--mem` sets: what it reports and what it used before serving.
struct Reported {
    device: usize,
    original: unsafe extern "C" fn(sys::ggml_backend_dev_t, *mut usize, *mut usize),
    total: u64,
    cpu: bool,
    baseline: u64,
}

fn reported() -> &'static Mutex<Vec<Reported>> {
    static REPORTED: OnceLock<Mutex<Vec<Reported>>> = OnceLock::new();
    REPORTED.get_or_init(Mutex::default)
}

/// Used memory of a device as its backend reports it.
fn used_by_backend(r: &Reported, device: sys::ggml_backend_dev_t) -> u64 {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: the backend's own getter, with its own device.
    unsafe { (r.original)(device, &raw mut free, &raw mut total) };
    total.saturating_sub(free) as u64
}

/// `get_memory` for a device under `--mem`: the chosen total, less what this worker has taken
/// on a GPU since it started.
unsafe extern "C" fn reported_memory(
    device: sys::ggml_backend_dev_t,
    free: *mut usize,
    total: *mut usize,
) {
    let all = reported().lock().unwrap_or_else(|e| e.into_inner());
    let Some(r) = all.iter().find(|r| r.device == device as usize) else {
        return;
    };
    // ggml's CPU device calls all of its memory free ("free" system memory is ill-defined); the
    // same here, since freed heap memory stays resident. A GPU's use is the backend's, since
    // this worker started.
    let used = if r.cpu {
        0
    } else {
        used_by_backend(r, device).saturating_sub(r.baseline)
    };
    // SAFETY: llama.cpp passes two writable sizes.
    unsafe {
        *total = r.total as usize;
        *free = r.total.saturating_sub(used) as usize;
    }
}

/// Makes `device` report `mem` bytes: its interface's `get_memory` is replaced (the device lives
/// as long as the process; ggml reads the table through the device on every call). Checked by
/// reading the memory back.
fn report_memory(device: sys::ggml_backend_dev_t, mem: u64) -> Result<(), LoadError> {
    // SAFETY: `device` points at a live `struct ggml_backend_device`, whose first member is its
    // interface table, laid out as `DeviceIfaceHead` up to `get_memory`; the worker is single
    // purpose and no other thread reads the table yet.
    unsafe {
        let head = device.cast::<DeviceIfaceHead>();
        let Some(original) = (*head).get_memory else {
            return Err(LoadError::Backend(format!(
                "{} reports no memory",
                name_of(device)
            )));
        };
        let cpu = sys::ggml_backend_dev_type(device) == sys::GGML_BACKEND_DEVICE_TYPE_CPU;
        let mut r = Reported {
            device: device as usize,
            original,
            total: mem,
            cpu,
            baseline: 0,
        };
        r.baseline = used_by_backend(&r, device);
        reported().lock().unwrap_or_else(|e| e.into_inner()).push(r);
        (*head).get_memory = Some(reported_memory);
    }
    let (_, total) = memory_of(device);
    if total != mem {
        return Err(LoadError::Backend(format!(
            "--mem: {} still reports {total} bytes (this llama.cpp's device table differs)",
            name_of(device)
        )));
    }
    Ok(())
}

/// Serves this machine's devices over llama.cpp's RPC protocol on `config.endpoint`. Returns only
/// when llama.cpp's server gives up (the port is taken, a device cannot start).
pub fn serve_worker(config: &WorkerConfig) -> Result<(), LoadError> {
    super::backend()?;
    let mut devices = worker_devices(config.devices.as_deref())?;
    if let Some(mem) = config.mem {
        for &device in &devices {
            report_memory(device, mem)?;
        }
    }
    for &device in &devices {
        let (free, total) = memory_of(device);
        tracing::info!(
            device = name_of(device),
            description = description_of(device),
            total_mib = total >> 20,
            free_mib = free >> 20,
            "serving"
        );
    }
    let endpoint = CString::new(config.endpoint.as_str())
        .map_err(|_| LoadError::Backend("the endpoint has a NUL byte".to_owned()))?;
    let cache = match &config.cache {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .map_err(|e| LoadError::Backend(format!("--cache {}: {e}", dir.display())))?;
            Some(
                CString::new(dir.as_os_str().as_encoded_bytes())
                    .map_err(|_| LoadError::Backend("the cache path has a NUL byte".to_owned()))?,
            )
        }
        None => None,
    };
    // SAFETY: the strings and the device list outlive the call, which blocks while serving.
    unsafe {
        ggml_backend_rpc_start_server(
            endpoint.as_ptr(),
            cache.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            config.threads.max(1),
            devices.len(),
            devices.as_mut_ptr(),
        );
    }
    Err(LoadError::Backend(format!(
        "llama.cpp's RPC server on {} stopped (is the port free?)",
        config.endpoint
    )))
}

/// Registers the devices of `link`'s worker with llama.cpp (through its relay), once per process.
pub fn register(link: &Arc<Link>) -> Result<(), LoadError> {
    static REGISTERED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    super::backend()?;
    let relay = link.relay.to_string();
    let mut registered = REGISTERED.lock().unwrap_or_else(|e| e.into_inner());
    if registered.contains(&relay) {
        return Ok(());
    }
    let endpoint = CString::new(relay.as_str()).expect("a socket address has no NUL");
    // SAFETY: llama.cpp copies the endpoint; the registry it returns lives as long as the process.
    unsafe {
        let reg = ggml_backend_rpc_add_server(endpoint.as_ptr());
        if reg.is_null() {
            return Err(LoadError::Backend(format!(
                "RPC worker {} serves no device",
                link.worker
            )));
        }
        for i in 0..sys::ggml_backend_reg_dev_count(reg) {
            sys::ggml_backend_device_register(sys::ggml_backend_reg_dev_get(reg, i));
        }
    }
    registered.push(relay);
    Ok(())
}

/// llama.cpp's devices that `link`'s worker serves, in the worker's order.
fn devices_of(link: &Link) -> Vec<(usize, sys::ggml_backend_dev_t)> {
    let relay = link.relay.to_string();
    all_devices()
        .into_iter()
        .enumerate()
        .filter(|&(_, d)| name_of(d).starts_with("RPC") && description_of(d) == relay)
        .collect()
}

/// llama.cpp's device index for device `index` of `worker`.
pub fn device_index(worker: &str, index: u32) -> Result<usize, LoadError> {
    let link = crate::rpc::by_worker(worker)
        .ok_or_else(|| LoadError::Placement(format!("RPC worker {worker} is not linked")))?;
    link.ready()
        .map_err(|e| LoadError::Placement(e.to_string()))?;
    devices_of(&link)
        .get(index as usize)
        .map(|&(i, _)| i)
        .ok_or_else(|| LoadError::Placement(format!("RPC worker {worker} has no device {index}")))
}

/// What each worker's devices last reported (relay address, device) → (free, total): the
/// live view re-reads only this process's allocations, so a poll never opens a connection to an
/// idle worker.
fn last_reported() -> &'static Mutex<Readings> {
    static LAST: OnceLock<Mutex<Readings>> = OnceLock::new();
    LAST.get_or_init(Mutex::default)
}

/// (relay address, device index) → (free, total) bytes.
type Readings = std::collections::HashMap<(String, usize), (u64, u64)>;

/// The devices of every linked worker as inventory entries, named by placement id
/// (`rpc:HOST:PORT/N`), marked remote, with what this process allocated there as `memory_used`.
/// `ask`: memory as each worker reports it now (before a plan); else as it last reported it. A
/// lost worker's devices report none.
pub fn remote_gpus(links: &[Arc<Link>], ask: bool) -> Vec<Gpu> {
    let mut out = Vec::new();
    for link in links {
        for (n, (_, device)) in devices_of(link).into_iter().enumerate() {
            let key = (link.relay.to_string(), n);
            let (free, total) = if link.lost().is_some() {
                (0, 0)
            } else {
                let cached = if ask {
                    None
                } else {
                    let last = last_reported().lock().unwrap_or_else(|e| e.into_inner());
                    last.get(&key).copied()
                };
                cached.unwrap_or_else(|| {
                    let reading = memory_of(device);
                    last_reported()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, reading);
                    reading
                })
            };
            out.push(Gpu {
                name: format!("{} ({})", name_of(device), link.worker),
                uuid: String::new(),
                pci_bus_id: crate::rpc::device_id(&link.worker, n as u32),
                memory_total: total,
                memory_free: free,
                memory_used: link.allocated(n as u32),
                compute_capability: [0, 0],
                utilization_percent: None,
                temperature_celsius: None,
                power_watts: None,
                display_attached: false,
                other_process_memory: 0,
                remote: Some(link.worker.clone()),
            });
        }
    }
    out
}

/// Links every `--rpc` worker (probing it: an unreachable one is an error naming it) and
/// registers its devices with llama.cpp; `deadline` bounds each read and write on its
/// connections (`--rpc-timeout`).
pub fn link_workers(
    endpoints: &[String],
    deadline: std::time::Duration,
) -> Result<Vec<Arc<Link>>, LoadError> {
    endpoints
        .iter()
        .map(|endpoint| {
            let link = crate::rpc::open(endpoint, deadline)
                .map_err(|e| LoadError::Backend(e.to_string()))?;
            register(&link)?;
            Ok(link)
        })
        .collect()
}
