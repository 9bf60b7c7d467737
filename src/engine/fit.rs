//! llama.cpp's own fit (`common_fit_params`, libcommon) beside lm-sandbox's plan.
//!
//! llama-cpp-2 0.1.160 has no `tensor_split` setter; its `fit_params` is the one way to hand
//! llama.cpp per-device layer counts. So with several GPUs the plan is applied as per-device
//! *margins*: each device's target (free memory minus margin) is the plan's bytes for it plus half a
//! layer of slack, and llama.cpp's fit fills the devices back to front up to those targets, which
//! lands on the plan's counts when both estimate a layer alike. Separately, llama.cpp's fit is run
//! with its own default margin (llama-server's `--fit-target`, 1 GiB) so the log shows where
//! llama.cpp alone would have placed the model and how that differs from the plan.
//!
//! The pure parts (margins, comparing two splits) are unit-tested; the FFI runs for every load on
//! devices (CUDA GPUs, RPC workers' devices).

/// llama-server's default `--fit-target`: memory llama.cpp's fit leaves free on each device.
pub const LLAMA_DEFAULT_MARGIN: u64 = 1024 * 1024 * 1024;

/// Where llama.cpp would put the layers: `n_gpu_layers` and the count per device, both in
/// llama.cpp's units (the output layer counts as one more layer on the last device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitSplit {
    pub n_gpu_layers: u32,
    /// `None`: several devices and no explicit split, so llama.cpp divides by free memory.
    pub layers: Option<Vec<u32>>,
    /// Tensor overrides the fit added (parts of layers kept in host memory).
    pub overrides: usize,
}

/// The plan in llama.cpp's units: `layers` per device without the output layer (the plan's
/// `tensor_split`), plus one on the last device when `n_gpu_layers > n_layer`.
pub fn plan_split(n_layer: u32, n_gpu_layers: u32, layers: &[u32]) -> Vec<u32> {
    let mut split = layers.to_vec();
    if n_gpu_layers > n_layer {
        if let Some(last) = split.last_mut() {
            *last += 1;
        }
    }
    split
}

/// Margins that make llama.cpp's fit fill each device up to the plan: `free - (planned + slack)`,
/// where slack is half of one of that device's layers, so a small difference between the two
/// estimates does not move a layer. Never negative.
pub fn margins_for_plan(free: &[u64], planned: &[u64], layers: &[u32]) -> Vec<u64> {
    free.iter()
        .zip(planned)
        .zip(layers)
        .map(|((&free, &planned), &layers)| {
            let slack = planned / u64::from(layers.max(1)) / 2;
            free.saturating_sub(planned + slack)
        })
        .collect()
}

/// Margins corrected after a fit landed on `fitted` layers per device where the plan has
/// `planned` (both as [`plan_split`] counts them): a device that got `k` layers too many keeps `k`
/// half-layers more free, one that got too few that much less. `None` when the fit
/// already matches. llama.cpp's estimate of a device's buffers differs from the plan's (the
/// compute buffers above all), so margins computed from the plan alone can move a layer; a fit or
/// two with corrected margins lands on the plan's counts.
pub fn corrected_margins(
    margins: &[u64],
    planned_bytes: &[u64],
    planned: &[u32],
    fitted: &[u32],
) -> Option<Vec<u64>> {
    if planned == fitted {
        return None;
    }
    Some(
        margins
            .iter()
            .enumerate()
            .map(|(i, &margin)| {
                let (want, got) = (
                    planned.get(i).copied().unwrap_or(0),
                    fitted.get(i).copied().unwrap_or(0),
                );
                // Half a layer per layer moved: the device's bytes per layer include its share of
                // compute and output buffers, and a whole step overshoots into the other side.
                let step = planned_bytes.get(i).copied().unwrap_or(0) / u64::from(want.max(1)) / 2;
                if got > want {
                    margin + step * u64::from(got - want)
                } else {
                    margin.saturating_sub(step * u64::from(want - got))
                }
            })
            .collect(),
    )
}

/// `margins` in the buffer llama.cpp's fit reads: `max_devices` entries, the rest zero.
pub fn margin_buffer(margins: &[u64], max_devices: usize) -> Vec<usize> {
    let mut buffer = vec![0usize; max_devices.max(margins.len())];
    for (slot, &margin) in buffer.iter_mut().zip(margins) {
        *slot = usize::try_from(margin).unwrap_or(usize::MAX);
    }
    buffer
}

/// How `fit` differs from the plan, one sentence each; empty when they agree.
pub fn disagreements(
    who: &str,
    n_layer: u32,
    plan_ngl: u32,
    plan_layers: &[u32],
    devices: &[String],
    fit: &FitSplit,
) -> Vec<String> {
    let mut out = Vec::new();
    let plan = plan_split(n_layer, plan_ngl, plan_layers);
    if fit.n_gpu_layers != plan_ngl {
        out.push(format!(
            "{who} offloads {} layers, the plan {plan_ngl} (of {} with the output layer)",
            fit.n_gpu_layers,
            n_layer + 1
        ));
    }
    match &fit.layers {
        None => out.push(format!(
            "{who} leaves the split to llama.cpp's default (by free memory); the plan puts {plan:?} layers on {devices:?}"
        )),
        Some(layers) => {
            for (i, device) in devices.iter().enumerate() {
                let theirs = layers.get(i).copied().unwrap_or(0);
                let ours = plan.get(i).copied().unwrap_or(0);
                if theirs != ours {
                    out.push(format!(
                        "{who} puts {theirs} layers on {device}, the plan {ours}"
                    ));
                }
            }
        }
    }
    if fit.overrides > 0 {
        out.push(format!(
            "{who} keeps parts of {} layer(s) in host memory",
            fit.overrides
        ));
    }
    out
}

/// The context a fit measures: the same numbers the engine's context is created with.
#[derive(Debug, Clone, Copy)]
pub struct FitContext {
    pub n_ctx: u32,
    pub n_seq: u32,
    pub n_batch: u32,
    pub n_ubatch: u32,
}

pub use ffi::{device_free, llama_fit};

mod ffi {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use llama_cpp_sys_2 as sys;

    use super::{FitContext, FitSplit};

    /// Free memory of llama.cpp's device `index`, as its fit reads it.
    pub fn device_free(index: usize) -> u64 {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: `index` comes from `ggml_backend_dev_count`'s range (checked by the caller's
        // bus-id match); the two out-pointers are valid for the call.
        unsafe {
            sys::ggml_backend_dev_memory(
                sys::ggml_backend_dev_get(index),
                &raw mut free,
                &raw mut total,
            );
        }
        free as u64
    }

    /// Runs llama.cpp's fit for `model_path` (`n_layer` repeating layers) on the ggml devices `devices` (in order) with
    /// `margins` bytes to leave free on each, without touching any params the engine will use.
    /// Loads only metadata (`no_alloc`).
    pub fn llama_fit(
        model_path: &Path,
        n_layer: u32,
        devices: &[usize],
        context: FitContext,
        margins: &[u64],
    ) -> Result<FitSplit, String> {
        let path = CString::new(model_path.as_os_str().as_bytes())
            .map_err(|_| "the model path holds a NUL byte".to_owned())?;
        // SAFETY: every pointer handed to the fit points into a buffer of the size llama.cpp
        // documents (`llama_max_devices()` splits and margins, `llama_max_tensor_buft_overrides()`
        // overrides plus the terminator, a NULL-terminated device list) that outlives the call.
        unsafe {
            let max_devices = sys::llama_max_devices();
            if devices.len() > max_devices {
                return Err(format!(
                    "{} devices, llama.cpp takes {max_devices}",
                    devices.len()
                ));
            }
            let mut device_list: Vec<sys::ggml_backend_dev_t> = devices
                .iter()
                .map(|&index| sys::ggml_backend_dev_get(index))
                .collect();
            device_list.push(std::ptr::null_mut());
            let mut mparams = sys::llama_model_default_params();
            mparams.devices = device_list.as_mut_ptr();
            let mut cparams = sys::llama_context_default_params();
            cparams.n_ctx = context.n_ctx;
            cparams.n_seq_max = context.n_seq;
            cparams.n_batch = context.n_batch;
            cparams.n_ubatch = context.n_ubatch;
            cparams.kv_unified = false;
            let mut split = vec![0f32; max_devices];
            let empty = sys::llama_model_tensor_buft_override {
                pattern: std::ptr::null(),
                buft: std::ptr::null_mut(),
            };
            let mut overrides = vec![empty; sys::llama_max_tensor_buft_overrides() + 1];
            let mut margin_buf = super::margin_buffer(margins, max_devices);
            let status = sys::llama_rs_fit_params(
                path.as_ptr(),
                &raw mut mparams,
                &raw mut cparams,
                split.as_mut_ptr(),
                overrides.as_mut_ptr(),
                margin_buf.as_mut_ptr(),
                context.n_ctx,
                std::ptr::null(),
                sys::GGML_LOG_LEVEL_WARN,
            );
            match status {
                0 => {}
                1 => return Err("llama.cpp's fit found no allocation that fits".to_owned()),
                _ => return Err("llama.cpp's fit failed (see its log)".to_owned()),
            }
            // -1, llama.cpp's default, offloads everything (the output layer too).
            let n_gpu_layers =
                u32::try_from(mparams.n_gpu_layers).map_or(n_layer + 1, |n| n.min(n_layer + 1));
            let layers = match devices.len() {
                0 => Some(Vec::new()),
                1 => Some(vec![n_gpu_layers]),
                n => {
                    let counts: Vec<u32> = split[..n].iter().map(|&c| c.round() as u32).collect();
                    (counts.iter().any(|&c| c > 0)).then_some(counts)
                }
            };
            let overrides = overrides
                .iter()
                .take_while(|o| !o.pattern.is_null())
                .count();
            Ok(FitSplit {
                n_gpu_layers,
                layers,
                overrides,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn the_output_layer_counts_on_the_last_device() {
        assert_eq!(plan_split(30, 31, &[10, 20]), vec![10, 21]);
        assert_eq!(plan_split(30, 30, &[10, 20]), vec![10, 20]);
        assert_eq!(plan_split(30, 12, &[4, 8]), vec![4, 8]);
        assert_eq!(plan_split(30, 0, &[]), Vec::<u32>::new());
    }

    #[test]
    fn margins_leave_the_plan_plus_half_a_layer() {
        // 10 GiB free, 4 GiB planned over 8 layers: slack 256 MiB.
        let margins = margins_for_plan(&[10 * GIB, 5 * GIB], &[4 * GIB, 6 * GIB], &[8, 12]);
        assert_eq!(margins[0], 10 * GIB - 4 * GIB - GIB / 4);
        // More planned than free: no margin, never an underflow.
        assert_eq!(margins[1], 0);
        // A device with no layers (only the output layer) does not divide by zero.
        assert_eq!(margins_for_plan(&[GIB], &[GIB / 2], &[0]), vec![GIB / 4]);
    }

    #[test]
    fn margins_are_corrected_by_the_layers_a_fit_moved() {
        // Planned [16, 15] at 4 MiB a layer; the fit gave [15, 16]: the last device keeps half a
        // layer more free, the first half a layer less.
        const MIB: u64 = 1 << 20;
        let corrected = corrected_margins(
            &[10 * MIB, 20 * MIB],
            &[64 * MIB, 60 * MIB],
            &[16, 15],
            &[15, 16],
        );
        assert_eq!(corrected, Some(vec![8 * MIB, 22 * MIB]));
        assert_eq!(corrected_margins(&[MIB], &[MIB], &[4], &[4]), None);
        // Never below zero.
        assert_eq!(
            corrected_margins(&[MIB], &[40 * MIB], &[4], &[2]),
            Some(vec![0])
        );
    }

    #[test]
    fn the_margin_buffer_has_a_slot_per_device() {
        assert_eq!(
            margin_buffer(&[GIB, 2 * GIB], 4),
            vec![1 << 30, 2 << 30, 0, 0]
        );
        assert_eq!(margin_buffer(&[], 2), vec![0, 0]);
    }

    #[test]
    fn agreement_is_silent_and_each_difference_is_named() {
        let devices = vec!["00000000:01:00.0".to_owned(), "00000000:02:00.0".to_owned()];
        let same = FitSplit {
            n_gpu_layers: 31,
            layers: Some(vec![10, 21]),
            overrides: 0,
        };
        assert!(disagreements("fit", 30, 31, &[10, 20], &devices, &same).is_empty());

        let other = FitSplit {
            n_gpu_layers: 29,
            layers: Some(vec![12, 17]),
            overrides: 1,
        };
        let said = disagreements("llama.cpp's fit", 30, 31, &[10, 20], &devices, &other);
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(
            said[0].contains("offloads 29 layers, the plan 31"),
            "{said:?}"
        );
        assert!(said[1].contains("12 layers on 00000000:01:00.0, the plan 10"));
        assert!(said[2].contains("17 layers on 00000000:02:00.0, the plan 21"));
        assert!(said[3].contains("host memory"));

        let default_split = FitSplit {
            n_gpu_layers: 31,
            layers: None,
            overrides: 0,
        };
        let said = disagreements("fit", 30, 31, &[10, 20], &devices, &default_split);
        assert_eq!(said.len(), 1);
        assert!(said[0].contains("by free memory"));
    }
}
