//! Where llama.cpp actually put each layer, read back from its own account while loading.
//!
//! llama.cpp has no getter for a layer's device; it states each assignment in one debug log line
//! (`load_tensors: layer N assigned to device D`). The log callback the engine installs
//! (llama-cpp-2's, which sends logs to `tracing`) is wrapped so that, while a load on this thread
//! is being read back, those lines are also recorded; every line still reaches `tracing`. Loads run on their engine thread, so a
//! thread-local recording sees only its own load.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

thread_local! {
    static RECORDING: RefCell<Option<Vec<(u32, String)>>> = const { RefCell::new(None) };
}

/// llama-cpp-2's callback and its state, which every line is still handed to.
static FORWARD: OnceLock<(sys::ggml_log_callback, usize)> = OnceLock::new();

unsafe extern "C" fn record_then_forward(
    level: sys::ggml_log_level,
    text: *const c_char,
    user_data: *mut c_void,
) {
    if !text.is_null() {
        // SAFETY: llama.cpp passes a NUL-terminated line.
        let line = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        if let Some(assignment) = parse(&line) {
            RECORDING.with(|r| {
                if let Some(lines) = r.borrow_mut().as_mut() {
                    lines.push(assignment);
                }
            });
        }
    }
    if let Some((Some(forward), state)) = FORWARD.get() {
        // SAFETY: the callback and state llama-cpp-2 registered, unchanged.
        unsafe { forward(level, text, *state as *mut c_void) };
    }
    let _ = user_data;
}

/// `load_tensors: layer  12 assigned to device RPC0, is_swa = 0` → (12, "RPC0").
fn parse(line: &str) -> Option<(u32, String)> {
    let rest = line.split("load_tensors: layer").nth(1)?;
    let (layer, rest) = rest.split_once("assigned to device")?;
    let device = rest.trim().split(',').next()?.trim();
    Some((layer.trim().parse().ok()?, device.to_owned()))
}

/// Wraps the log callback llama-cpp-2 installed (once). `llama_log_get` reads ggml's logger, which
/// llama-cpp-2 set to the same function, so every line goes on to it; and since llama.cpp's fit
/// saves and restores that logger around its dry runs, both loggers are set to the wrapper.
pub(super) fn install() {
    // SAFETY: reads and writes llama.cpp's and ggml's logger state, before any model loads.
    unsafe {
        let (mut callback, mut state): (sys::ggml_log_callback, *mut c_void) =
            (None, std::ptr::null_mut());
        sys::llama_log_get(&raw mut callback, &raw mut state);
        if FORWARD.set((callback, state as usize)).is_ok() {
            sys::llama_log_set(Some(record_then_forward), std::ptr::null_mut());
        }
    }
}

/// Runs `load`, recording the layer assignments llama.cpp states meanwhile on this thread:
/// layer index → llama.cpp's device name (the output layer is index `n_layer`).
pub(super) fn recording<T>(load: impl FnOnce() -> T) -> (T, Vec<(u32, String)>) {
    if FORWARD.get().is_some() {
        // SAFETY: sets the logger to the wrapper again, in case anything put another back.
        unsafe { sys::llama_log_set(Some(record_then_forward), std::ptr::null_mut()) };
    }
    RECORDING.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let out = load();
    let lines = RECORDING
        .with(|r| r.borrow_mut().take())
        .unwrap_or_default();
    (out, lines)
}

/// Layers per device, in `devices` order, from recorded assignments (the output layer counted
/// on its device, as in [`crate::engine::fit::plan_split`]).
pub(super) fn counts(assignments: &[(u32, String)], devices: &[String]) -> Vec<u32> {
    devices
        .iter()
        .map(|d| assignments.iter().filter(|(_, on)| on == d).count() as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_lines_are_read() {
        assert_eq!(
            parse("load_tensors: layer  12 assigned to device RPC0, is_swa = 0\n"),
            Some((12, "RPC0".to_owned()))
        );
        assert_eq!(
            parse("load_tensors: layer 30 assigned to device CPU, is_swa = 1"),
            Some((30, "CPU".to_owned()))
        );
        assert_eq!(parse("load_tensors: offloaded 30/31 layers to GPU"), None);
        let lines = vec![(0, "RPC0".into()), (1, "RPC1".into()), (2, "RPC1".into())];
        assert_eq!(counts(&lines, &["RPC1".into(), "RPC0".into()]), vec![2, 1]);
    }
}
