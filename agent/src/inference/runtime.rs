use std::panic::{catch_unwind, AssertUnwindSafe};

use tract_onnx::tract_core::runtime::{runtime_for_name, Runtime};

use super::InferenceError;

// tract-cuda registers its runtime through `inventory`; it must be linked to be found.
#[cfg(feature = "cuda")]
use tract_cuda as _;

/// Where the user asked inference to run.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// The GPU when CUDA works on this machine, else the CPU (with a log line saying why).
    Auto,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Auto => "auto",
        }
    }
}

/// The runtime inference actually runs on, as reported in `device.runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Cpu,
    Cuda,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Cpu => "cpu",
            RuntimeKind::Cuda => "cuda",
        }
    }
}

/// The outcome of runtime selection: the tract runtime and which kind it is.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeChoice {
    pub runtime: &'static dyn Runtime,
    pub kind: RuntimeKind,
}

/// Resolves `device` to a tract runtime. `cuda` fails with the reason CUDA cannot start;
/// `auto` falls back to the CPU and logs that reason once.
pub fn select_runtime(device: DeviceKind) -> Result<RuntimeChoice, InferenceError> {
    match device {
        DeviceKind::Cpu => Ok(cpu()),
        DeviceKind::Cuda => cuda().map_err(InferenceError::CudaUnavailable),
        DeviceKind::Auto => match cuda() {
            Ok(choice) => Ok(choice),
            Err(reason) => {
                tracing::info!("CUDA unavailable, running on the CPU: {reason}");
                Ok(cpu())
            }
        },
    }
}

fn cpu() -> RuntimeChoice {
    let runtime = runtime_for_name("cpu")
        .ok()
        .flatten()
        .expect("tract always registers its CPU runtime");
    RuntimeChoice {
        runtime,
        kind: RuntimeKind::Cpu,
    }
}

/// Why CUDA cannot run here, or its runtime. tract-cuda's `check()` dlopens the driver and
/// libraries; a panic there is contained and reported like any other failure.
pub(crate) fn cuda() -> Result<RuntimeChoice, String> {
    let found = catch_unwind(AssertUnwindSafe(|| runtime_for_name("cuda")))
        .map_err(|_| "the CUDA runtime panicked while probing the driver".to_string())?;
    match found {
        Ok(Some(runtime)) => Ok(RuntimeChoice {
            runtime,
            kind: RuntimeKind::Cuda,
        }),
        Ok(None) => Err(
            "this build has no CUDA runtime (rebuild with the `cuda-12` or `cuda-13` feature)"
                .to_string(),
        ),
        Err(e) => Err(format!("CUDA runtime unavailable: {e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        let choice = select_runtime(DeviceKind::Cpu).unwrap();
        assert_eq!(choice.kind, RuntimeKind::Cpu);
        assert_eq!(choice.runtime.name(), "cpu");
    }

    #[test]
    fn auto_agrees_with_cuda_probe() {
        let auto = select_runtime(DeviceKind::Auto).unwrap();
        match cuda() {
            Ok(_) => assert_eq!(auto.kind, RuntimeKind::Cuda),
            Err(reason) => {
                assert_eq!(auto.kind, RuntimeKind::Cpu);
                let err = select_runtime(DeviceKind::Cuda).unwrap_err();
                assert_eq!(err.to_string(), format!("--device cuda: {reason}"));
            }
        }
    }
}
