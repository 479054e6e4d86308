//! Thermal zones (`/sys/class/thermal/thermal_zone*`): temperatures in millidegrees Celsius
//! and their trip points, for telemetry and the throttling flag.

use std::path::Path;

use super::sysfs::{entries, read_number, read_optional_text};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ZoneReading {
    /// The zone's `type`, e.g. `cpu-thermal`, `gpu-thermal`, `x86_pkg_temp`.
    pub zone: String,
    pub temp_c: Option<f64>,
    /// The lowest passive (throttling) or hot trip point, when the zone has one.
    pub throttle_c: Option<f64>,
    /// Why the temperature could not be read.
    pub error: Option<String>,
}

impl ZoneReading {
    /// At or past its throttling trip point: the kernel is slowing the chip down, which
    /// changes latency and energy (Jetson throttles at its `passive` trips).
    pub fn throttled(&self) -> bool {
        matches!((self.temp_c, self.throttle_c), (Some(t), Some(limit)) if t >= limit)
    }
}

/// Hotter than any silicon survives: a reading above this is garbage.
const MAX_PLAUSIBLE_C: f64 = 200.0;
const MIN_PLAUSIBLE_C: f64 = -60.0;

pub fn read_zones(root: &Path) -> Vec<ZoneReading> {
    entries(&root.join("sys/class/thermal"), |n| {
        n.starts_with("thermal_zone")
    })
    .into_iter()
    .map(|dir| {
        let zone = read_optional_text(&dir.join("type")).unwrap_or_else(|| {
            dir.file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("zone")
                .to_string()
        });
        let (temp_c, error) = match read_number(&dir.join("temp")) {
            Ok(m) if (MIN_PLAUSIBLE_C..=MAX_PLAUSIBLE_C).contains(&(m / 1e3)) => {
                (Some(m / 1e3), None)
            }
            Ok(m) => (
                None,
                Some(format!(
                    "{}: {m} m°C is not plausible",
                    dir.join("temp").display()
                )),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        let throttle_c = entries(&dir, |n| {
            n.starts_with("trip_point_") && n.ends_with("_type")
        })
        .into_iter()
        .filter(|p| {
            matches!(
                read_optional_text(p).as_deref(),
                Some("passive") | Some("hot")
            )
        })
        .filter_map(|p| {
            let temp = p.to_str()?.replace("_type", "_temp");
            read_number(Path::new(&temp)).ok().map(|m| m / 1e3)
        })
        .fold(None, |low: Option<f64>, t| {
            Some(low.map_or(t, |l| l.min(t)))
        });
        ZoneReading {
            zone,
            temp_c,
            throttle_c,
            error,
        }
    })
    .collect()
}
