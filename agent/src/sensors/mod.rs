//! Energy, battery and thermal sources (the E of PLASTER), read from sysfs and NVML.
//!
//! `discover` finds every source under a sysfs root (default `/`; tests point it at recorded
//! trees of real boards), probes each once and says why the unusable ones cannot be used.
//! A [`sampler::Sampler`] reads the chosen source on its own thread at the sensor's update
//! rate and integrates energy; [`sampler::SensorMeter`] turns that into the report's `energy`
//! object. ../shared/design/ENERGY.md has the facts (units, sign conventions, wraparound).
//!
//! Sensors never block an async runtime: reads happen on the sampler's thread or on the
//! thread of a synchronous command.

pub mod battery;
mod discover;
mod jetson;
mod nvml;
mod rapl;
pub mod sampler;
mod sysfs;
pub mod thermal;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use discover::{discover, Discovery, DiscoveryOptions, Unusable};

/// Power in watts. A newtype so that watts, milliwatts and joules cannot be mixed up.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Watts(pub f64);

/// Energy in joules.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Joules(pub f64);

/// One reading of one channel of a source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reading {
    /// Instantaneous (or sensor-averaged) power.
    Power(Watts),
    /// A cumulative energy counter, which wraps to 0 after `wrap` when it has a range.
    Counter { total: Joules, wrap: Option<Joules> },
}

/// The kinds of energy source, in the order they are preferred for the system total.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// Jetson INA3221 power monitor through hwmon (JetPack 5 and later).
    Ina3221,
    /// Jetson INA3221 power monitor through iio (JetPack 4 and earlier).
    Ina3221Iio,
    /// INA238 power monitor (Jetson Thor carrier, total VIN), power in microwatts.
    Ina238,
    /// NVIDIA discrete GPU through NVML: board energy counter, or power.
    Nvml,
    /// x86 CPU package (or platform, psys) energy counters through powercap.
    Rapl,
    /// Generic hwmon energy counters (`energyN_input`, microjoules).
    HwmonEnergy,
    /// A battery, usable while it discharges (it then powers the whole system).
    Battery,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Ina3221 => "ina3221",
            SourceKind::Ina3221Iio => "ina3221-iio",
            SourceKind::Ina238 => "ina238",
            SourceKind::Nvml => "nvml",
            SourceKind::Rapl => "rapl",
            SourceKind::HwmonEnergy => "hwmon-energy",
            SourceKind::Battery => "battery",
        }
    }

    pub const ALL: [SourceKind; 7] = [
        SourceKind::Ina3221,
        SourceKind::Ina3221Iio,
        SourceKind::Ina238,
        SourceKind::Nvml,
        SourceKind::Rapl,
        SourceKind::HwmonEnergy,
        SourceKind::Battery,
    ];

    pub fn parse(s: &str) -> Option<SourceKind> {
        SourceKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a sensor could not be read. Messages name the file at fault and what to do.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SensorError {
    #[error("{}: permission denied: grant the service user read access, see docs/energy.md", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("{}: missing (the device went away)", path.display())]
    Missing { path: PathBuf },
    #[error("{}: empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: not a number: {text:?}", path.display())]
    Garbage { path: PathBuf, text: String },
    #[error("{what} of {value} is not plausible (limit {limit})")]
    Implausible {
        what: String,
        value: String,
        limit: String,
    },
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("battery {name} is {status}: only a discharging battery measures the system's power")]
    NotDischarging { name: String, status: String },
    #[error("NVML: {0}")]
    Nvml(String),
}

/// A source of the system's (or the accelerator's) energy use.
pub trait EnergySource: Send {
    /// e.g. `ina3221 VDD_IN`, `rapl psys`, `battery BAT0`.
    fn name(&self) -> &str;
    fn kind(&self) -> SourceKind;
    /// How often the hardware produces a new value, when it says.
    fn update_interval(&self) -> Option<Duration>;
    /// The channels whose sum is the total this source measures (one for a total rail,
    /// several where a board has none and its rails are summed).
    fn read_total(&mut self) -> Result<Vec<Reading>, SensorError>;
    /// Every channel with its name, for `plaster-agent sensors`.
    fn read_rails(&mut self) -> Vec<(String, Result<Reading, SensorError>)>;
}

/// The sampling period for a source: its update interval, within sane bounds; 100 Hz when the
/// hardware does not say (RAPL and hwmon counters update faster than that).
pub fn sampling_period(source: &dyn EnergySource) -> Duration {
    const DEFAULT: Duration = Duration::from_millis(10);
    const MIN: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);
    source
        .update_interval()
        .map(|d| d.clamp(MIN, MAX))
        .unwrap_or(DEFAULT)
}
