//! The E of PLASTER: energy attributed to a window of inferences.
//!
//! [`EnergyMeter`] is the seam between measurement (scenarios, the daemon's windows) and the
//! energy sources (sensors: Jetson INA monitors, RAPL, batteries, NVML). A meter is told when a
//! quiet window, then a measured window, starts and ends; it never claims the energy of one
//! inference, only of a window of many (ENERGY.md, "Attributing energy to inference").

use serde::{Deserialize, Serialize};

/// The report's `energy` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnergyReport {
    /// `measured`, or `unavailable: <reason>`.
    pub status: String,
    pub source: Option<String>,
    pub joules_per_inference: Option<f64>,
    pub marginal_joules_per_inference: Option<f64>,
    pub inferences_per_joule: Option<f64>,
    pub mean_power_w: Option<f64>,
    pub idle_power_w: Option<f64>,
    pub samples: u64,
    pub battery: Option<BatteryReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatteryReport {
    pub percent: f64,
    pub status: String,
    pub power_w: Option<f64>,
}

impl EnergyReport {
    pub fn unavailable(reason: &str) -> EnergyReport {
        EnergyReport {
            status: format!("unavailable: {reason}"),
            source: None,
            joules_per_inference: None,
            marginal_joules_per_inference: None,
            inferences_per_joule: None,
            mean_power_w: None,
            idle_power_w: None,
            samples: 0,
            battery: None,
        }
    }
}

/// Measures the energy of windows of inference.
pub trait EnergyMeter: Send {
    /// Called before the measured window, while no inference runs, to measure idle power.
    fn measure_idle(&mut self);
    /// The measured window starts now.
    fn start_window(&mut self);
    /// The measured window ends now, after `inferences` inferences.
    fn finish_window(&mut self, inferences: u64) -> EnergyReport;
    /// The window ends now and the next one starts at the same instant (the daemon's
    /// back-to-back telemetry windows).
    fn continue_window(&mut self, inferences: u64) -> EnergyReport {
        let report = self.finish_window(inferences);
        self.start_window();
        report
    }
}

/// The meter of a machine where no energy source could be used: it reports why.
#[derive(Debug, Clone)]
pub struct NoEnergySource {
    pub reason: String,
}

impl EnergyMeter for NoEnergySource {
    fn measure_idle(&mut self) {}
    fn start_window(&mut self) {}
    fn finish_window(&mut self, _inferences: u64) -> EnergyReport {
        EnergyReport::unavailable(&self.reason)
    }
}
