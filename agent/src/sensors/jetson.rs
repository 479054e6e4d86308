//! Jetson power monitors: INA3221 through hwmon (JetPack 5+) or iio (JetPack 4), and the
//! INA238 on Thor carriers. Found through `/sys/bus/i2c/devices/*/name`.

use std::path::Path;

use super::sysfs::{entries, read_optional_text, update_interval, Probe, RailSource};
use super::{SourceKind, Watts};

/// Rails that carry the whole module's input power, in the order tried (ENERGY.md):
/// `VDD_IN` on Orin NX/Nano and Xavier NX, `POM_5V_IN` on Nano and TX2, `VIN` on Thor.
const TOTAL_RAILS: [&str; 3] = ["VDD_IN", "POM_5V_IN", "VIN"];

/// An INA3221 channel carries at most a few tens of watts; a Jetson module draws under 100 W.
const INA3221_LIMIT: Watts = Watts(100.0);
/// Thor's total input peaks around 130 W at its maximum power mode; allow headroom.
const INA238_LIMIT: Watts = Watts(300.0);

/// A monitor chip found on the i2c bus, or why it cannot be used.
pub(crate) type Found = Result<RailSource, (String, SourceKind, String)>;

pub(crate) fn find(root: &Path, total_rail: Option<&str>) -> Vec<Found> {
    let mut found = Vec::new();
    for dev in entries(&root.join("sys/bus/i2c/devices"), |_| true) {
        let Some(chip) = read_optional_text(&dev.join("name")) else {
            continue;
        };
        let addr = dev
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        let result = if chip.starts_with("ina3221") {
            let hwmon = entries(&dev.join("hwmon"), |n| n.starts_with("hwmon"));
            let iio = entries(&dev, |n| n.starts_with("iio:device"));
            if let Some(dir) = hwmon.first() {
                Some(ina3221_hwmon(dir, &addr, total_rail))
            } else {
                iio.first().map(|dir| ina3221_iio(dir, &addr, total_rail))
            }
        } else if chip.starts_with("ina238") {
            entries(&dev.join("hwmon"), |n| n.starts_with("hwmon"))
                .first()
                .map(|dir| ina238(dir, &addr))
        } else {
            None
        };
        if let Some(result) = result {
            found.push(result);
        }
    }
    found
}

fn ina3221_hwmon(dir: &Path, addr: &str, total_rail: Option<&str>) -> Found {
    let mut rails = Vec::new();
    // Channels 1..3 are the rails; channel 7 (in7) is the sum of shunt voltages, not a rail.
    for n in 1..=3 {
        let Some(label) = read_optional_text(&dir.join(format!("in{n}_label"))) else {
            continue;
        };
        if label.contains("NC") {
            continue;
        }
        rails.push((
            label,
            Probe::voltage_current(
                dir.join(format!("in{n}_input")),
                dir.join(format!("curr{n}_input")),
            ),
        ));
    }
    choose_total(
        format!("ina3221 {addr}"),
        SourceKind::Ina3221,
        rails,
        update_interval(dir),
        INA3221_LIMIT,
        total_rail,
    )
}

fn ina3221_iio(dir: &Path, addr: &str, total_rail: Option<&str>) -> Found {
    let mut rails = Vec::new();
    for n in 0..=2 {
        let Some(label) = read_optional_text(&dir.join(format!("rail_name_{n}"))) else {
            continue;
        };
        if label.contains("NC") {
            continue;
        }
        let power = dir.join(format!("in_power{n}_input"));
        let probe = if power.exists() {
            Probe::power(power, 1e-3)
        } else {
            Probe::voltage_current(
                dir.join(format!("in_voltage{n}_input")),
                dir.join(format!("in_current{n}_input")),
            )
        };
        rails.push((label, probe));
    }
    choose_total(
        format!("ina3221 {addr}"),
        SourceKind::Ina3221Iio,
        rails,
        None,
        INA3221_LIMIT,
        total_rail,
    )
}

fn ina238(dir: &Path, addr: &str) -> Found {
    // in0 is the shunt voltage; channel 1 is the bus: power1_input in microwatts.
    let label = read_optional_text(&dir.join("in1_label")).unwrap_or_else(|| "VIN".to_string());
    let rails = vec![(label, Probe::power(dir.join("power1_input"), 1e-6))];
    choose_total(
        format!("ina238 {addr}"),
        SourceKind::Ina238,
        rails,
        update_interval(dir),
        INA238_LIMIT,
        None,
    )
}

fn choose_total(
    device: String,
    kind: SourceKind,
    rails: Vec<(String, Probe)>,
    update_interval: Option<std::time::Duration>,
    limit: Watts,
    total_rail: Option<&str>,
) -> Found {
    if rails.is_empty() {
        return Err((device, kind, "no labelled rails".to_string()));
    }
    let position = |name: &str| rails.iter().position(|(label, _)| label == name);
    // AGX Orin has no total rail: its rails are summed, and the name says so.
    let (total, name) = if let Some(wanted) = total_rail {
        match position(wanted) {
            Some(ix) => (vec![ix], format!("{device} {wanted}")),
            None => {
                let labels: Vec<&str> = rails.iter().map(|(l, _)| l.as_str()).collect();
                return Err((
                    device,
                    kind,
                    format!(
                        "energy.total_rail {wanted:?} is not one of its rails ({})",
                        labels.join(", ")
                    ),
                ));
            }
        }
    } else if let Some(ix) = TOTAL_RAILS.iter().find_map(|t| position(t)) {
        (vec![ix], format!("{device} {}", rails[ix].0))
    } else {
        let labels: Vec<&str> = rails.iter().map(|(l, _)| l.as_str()).collect();
        (
            (0..rails.len()).collect(),
            format!("{device} sum of rails ({})", labels.join("+")),
        )
    };
    Ok(RailSource {
        name,
        kind,
        rails,
        total,
        update_interval,
        limit,
    })
}
