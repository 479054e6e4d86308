//! Batteries under `/sys/class/power_supply` (`type` = `Battery`).
//!
//! Units: µV, µA, µAh, µWh, µW, percent; every attribute is optional. Drivers disagree on the
//! sign of `power_now`/`current_now`, so magnitudes are taken and the direction comes from
//! `status` (ENERGY.md, "Batteries").

use std::path::{Path, PathBuf};

use super::sysfs::{check_power, entries, read_number, read_optional_text, read_text};
use super::{EnergySource, Reading, SensorError, SourceKind, Watts};

/// A laptop or robot battery delivers well under this.
const BATTERY_LIMIT: Watts = Watts(300.0);

#[derive(Clone, Debug, PartialEq)]
pub struct BatteryProbe {
    pub name: String,
    dir: PathBuf,
}

/// One reading of a battery.
#[derive(Clone, Debug, PartialEq)]
pub struct BatteryState {
    pub name: String,
    /// Charge level in percent, from `capacity` or the energy/charge ratio.
    pub percent: Option<f64>,
    /// `Charging`, `Discharging`, `Not charging`, `Full` or `Unknown`.
    pub status: String,
    /// The magnitude of the power flowing in or out; `None` when the driver reports no rate.
    pub power: Option<Watts>,
}

pub fn find(root: &Path) -> Vec<BatteryProbe> {
    entries(&root.join("sys/class/power_supply"), |_| true)
        .into_iter()
        .filter(|dir| read_optional_text(&dir.join("type")).as_deref() == Some("Battery"))
        // Peripherals (a mouse's battery) report scope "Device"; they do not power the system.
        .filter(|dir| read_optional_text(&dir.join("scope")).as_deref() != Some("Device"))
        .map(|dir| BatteryProbe {
            name: dir
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("battery")
                .to_string(),
            dir,
        })
        .collect()
}

impl BatteryProbe {
    pub fn read(&self) -> Result<BatteryState, SensorError> {
        let status = read_text(&self.dir.join("status"))?;
        let number = |attr: &str| -> Result<Option<f64>, SensorError> {
            match read_number(&self.dir.join(attr)) {
                Ok(v) => Ok(Some(v)),
                Err(SensorError::Missing { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let power_now = number("power_now")?;
        let current_now = number("current_now")?;
        let voltage_now = number("voltage_now")?;
        let energy_now = number("energy_now")?;
        let power_path = self.dir.join("power_now");
        let power = match (power_now, current_now, voltage_now, energy_now) {
            (Some(uw), _, _, _) => Some(uw.abs() * 1e-6),
            (None, Some(ua), Some(uv), _) => Some((ua * uv).abs() * 1e-12),
            // Legacy drivers with energy units and no power_now put µW in current_now.
            (None, Some(uw), None, Some(_)) => Some(uw.abs() * 1e-6),
            _ => None,
        };
        let power = match power {
            Some(w) => match check_power(Watts(w), BATTERY_LIMIT, &power_path)? {
                Reading::Power(p) => Some(p),
                Reading::Counter { .. } => None,
            },
            None => None,
        };
        let percent = match number("capacity")? {
            Some(p) => Some(p),
            None => match (
                energy_now,
                number("energy_full")?,
                number("charge_now")?,
                number("charge_full")?,
            ) {
                (Some(now), Some(full), _, _) if full > 0.0 => Some(100.0 * now / full),
                (_, _, Some(now), Some(full)) if full > 0.0 => Some(100.0 * now / full),
                _ => None,
            },
        };
        if let Some(p) = percent {
            if !(0.0..=100.5).contains(&p) {
                return Err(SensorError::Implausible {
                    what: format!("charge of battery {}", self.name),
                    value: format!("{p}%"),
                    limit: "0..100%".into(),
                });
            }
        }
        Ok(BatteryState {
            name: self.name.clone(),
            percent: percent.map(|p| p.min(100.0)),
            status,
            power,
        })
    }
}

/// A discharging battery powers the whole system: its output is the system's power.
pub(crate) struct BatterySource {
    probe: BatteryProbe,
    name: String,
}

impl BatterySource {
    pub(crate) fn new(probe: BatteryProbe) -> BatterySource {
        let name = format!("battery {}", probe.name);
        BatterySource { probe, name }
    }
}

impl EnergySource for BatterySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Battery
    }

    fn update_interval(&self) -> Option<std::time::Duration> {
        // Fuel gauges update about once a second.
        Some(std::time::Duration::from_secs(1))
    }

    fn read_total(&mut self) -> Result<Vec<Reading>, SensorError> {
        let state = self.probe.read()?;
        if state.status != "Discharging" {
            return Err(SensorError::NotDischarging {
                name: self.probe.name.clone(),
                status: state.status,
            });
        }
        match state.power {
            Some(p) => Ok(vec![Reading::Power(p)]),
            None => Err(SensorError::Missing {
                path: self.probe.dir.join("power_now"),
            }),
        }
    }

    fn read_rails(&mut self) -> Vec<(String, Result<Reading, SensorError>)> {
        let reading = self.probe.read().and_then(|s| {
            s.power.map(Reading::Power).ok_or(SensorError::Missing {
                path: self.probe.dir.join("power_now"),
            })
        });
        vec![(self.probe.name.clone(), reading)]
    }
}
