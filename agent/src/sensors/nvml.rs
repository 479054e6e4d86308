//! NVIDIA discrete GPUs through NVML (nvml-wrapper loads `libnvidia-ml.so.1` at run time).
//!
//! The board energy counter (mJ since driver load, Volta and newer) is preferred; GPUs without
//! it fall back to power samples (on Ampere and newer a 1 s average). On Jetson NVML may
//! initialise but answer NotSupported: the INA monitors are used there instead. A missing
//! library is "unavailable", never an error.

use std::sync::Arc;
use std::time::Duration;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

use super::{EnergySource, Joules, Reading, SensorError, SourceKind, Watts};

/// A data-centre GPU's board power peaks around 1 kW.
const NVML_LIMIT: Watts = Watts(1500.0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Counter,
    Power,
}

pub(crate) struct NvmlSource {
    nvml: Arc<Nvml>,
    index: u32,
    mode: Mode,
    name: String,
}

/// Every GPU NVML can measure, or why none can.
pub(crate) fn find() -> Vec<Result<NvmlSource, (String, SourceKind, String)>> {
    let nvml = match Nvml::init() {
        Ok(nvml) => Arc::new(nvml),
        // No library: there is no NVIDIA GPU to measure, which is not a fault.
        Err(NvmlError::LibloadingError(_)) => return Vec::new(),
        Err(e) => return vec![Err(("nvml".into(), SourceKind::Nvml, describe(&e)))],
    };
    let count = match nvml.device_count() {
        Ok(n) => n,
        Err(e) => return vec![Err(("nvml".into(), SourceKind::Nvml, describe(&e)))],
    };
    (0..count)
        .map(|index| {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| (format!("nvml gpu{index}"), SourceKind::Nvml, describe(&e)))?;
            let model = device.name().unwrap_or_else(|_| "GPU".into());
            let name = format!("nvml gpu{index} {model}");
            let mode = match (device.total_energy_consumption(), device.power_usage()) {
                (Ok(_), _) => Mode::Counter,
                (Err(_), Ok(_)) => Mode::Power,
                (Err(e), Err(_)) => return Err((name, SourceKind::Nvml, describe(&e))),
            };
            Ok(NvmlSource {
                nvml: nvml.clone(),
                index,
                mode,
                name,
            })
        })
        .collect()
}

fn describe(e: &NvmlError) -> String {
    match e {
        NvmlError::DriverNotLoaded => "the NVIDIA driver is not loaded".into(),
        NvmlError::NotSupported => "the GPU reports neither energy nor power (NotSupported; on Jetson the INA monitors are used)".into(),
        NvmlError::NoPermission => "permission denied talking to the NVIDIA driver".into(),
        other => other.to_string(),
    }
}

impl EnergySource for NvmlSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Nvml
    }

    fn update_interval(&self) -> Option<Duration> {
        // NVML's counter moves about every 100 ms (ENERGY.md).
        Some(Duration::from_millis(100))
    }

    fn read_total(&mut self) -> Result<Vec<Reading>, SensorError> {
        let device = self
            .nvml
            .device_by_index(self.index)
            .map_err(|e| SensorError::Nvml(describe(&e)))?;
        let reading = match self.mode {
            Mode::Counter => {
                let mj = device
                    .total_energy_consumption()
                    .map_err(|e| SensorError::Nvml(describe(&e)))?;
                Reading::Counter {
                    total: Joules(mj as f64 / 1e3),
                    wrap: None,
                }
            }
            Mode::Power => {
                let mw = device
                    .power_usage()
                    .map_err(|e| SensorError::Nvml(describe(&e)))?;
                let watts = Watts(f64::from(mw) / 1e3);
                if watts > NVML_LIMIT {
                    return Err(SensorError::Implausible {
                        what: format!("power of {}", self.name),
                        value: format!("{:.1} W", watts.0),
                        limit: format!("{:.0} W", NVML_LIMIT.0),
                    });
                }
                Reading::Power(watts)
            }
        };
        Ok(vec![reading])
    }

    fn read_rails(&mut self) -> Vec<(String, Result<Reading, SensorError>)> {
        let reading = self.read_total().map(|r| r[0]);
        vec![("board".to_string(), reading)]
    }
}
