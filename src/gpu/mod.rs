//! GPUs: the NVML inventory, model facts read from GGUF, and the placement planner.
//!
//! Owns: reading hardware (behind [`inventory::InventorySource`]) and deciding placement as a pure
//! function ([`plan::plan`]). Must not: create a CUDA context or load weights; it only reads NVML and
//! file headers, so `lm-sandbox plan` is safe to run anywhere.

pub mod command;
pub mod gguf;
pub mod inventory;
pub mod placement;
pub mod plan;
pub mod report;
