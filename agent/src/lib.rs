//! plaster-agent: on-device ONNX inference that measures the seven PLASTER properties of itself.
//!
//! The binary (`main.rs`) is a thin shell over this library so tests drive the same code paths.
//! See ARCHITECTURE.md at the repository root for the code map and invariants.
// Unsafe code is refused everywhere but in the SIMD kernels of our own ops
// (inference/rewrite/kernels.rs and gemm.rs), which allow it for target-feature dispatch, and
// in the helper threads that share their work (inference/warm.rs).
#![deny(unsafe_code)]

pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod device;
pub mod inference;
pub mod mqtt;
pub mod ota;
pub mod plaster;
pub mod sensors;
pub mod telemetry;

/// Locks `mutex`, taking over a lock a panicked thread left poisoned: the data it guards
/// (counters, a window of figures, the spool index) stays usable, and the agent keeps serving.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The agent's version, as printed by `--version` and published in the MQTT birth message.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
