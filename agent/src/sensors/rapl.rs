//! x86 RAPL energy counters (powercap) and generic hwmon energy counters, both in microjoules.

use std::path::Path;

use super::sysfs::{entries, read_number, read_optional_text, Probe, RailSource};
use super::{SourceKind, Watts};

/// A CPU package or platform draws well under a kilowatt.
const RAPL_LIMIT: Watts = Watts(1000.0);
const HWMON_LIMIT: Watts = Watts(1000.0);

/// RAPL's top-level domains (`intel-rapl:N`): `psys` (the platform) when present, else the sum
/// of the `package-N` domains. Sub-domains (core, uncore, dram) are parts of a package.
pub(crate) fn find_rapl(root: &Path) -> Option<Result<RailSource, (String, SourceKind, String)>> {
    let domains = entries(&root.join("sys/class/powercap"), |n| {
        n.starts_with("intel-rapl:") && n.matches(':').count() == 1
    });
    if domains.is_empty() {
        return None;
    }
    let mut rails = Vec::new();
    for dir in &domains {
        let name = read_optional_text(&dir.join("name")).unwrap_or_else(|| "unknown".into());
        let wrap = read_number(&dir.join("max_energy_range_uj")).ok();
        rails.push((name, Probe::counter(dir.join("energy_uj"), 1e-6, wrap)));
    }
    let psys = rails.iter().position(|(n, _)| n == "psys");
    let (total, name) = match psys {
        Some(ix) => (vec![ix], "rapl psys".to_string()),
        None => {
            let packages: Vec<usize> = rails
                .iter()
                .enumerate()
                .filter(|(_, (n, _))| n.starts_with("package"))
                .map(|(ix, _)| ix)
                .collect();
            if packages.is_empty() {
                return Some(Err((
                    "rapl".into(),
                    SourceKind::Rapl,
                    "no package or psys domain".into(),
                )));
            }
            let names: Vec<&str> = packages.iter().map(|&ix| rails[ix].0.as_str()).collect();
            let name = if packages.len() == 1 {
                format!("rapl {}", names[0])
            } else {
                format!("rapl sum of {}", names.join("+"))
            };
            (packages, name)
        }
    };
    Some(Ok(RailSource {
        name,
        kind: SourceKind::Rapl,
        rails,
        total,
        update_interval: None,
        limit: RAPL_LIMIT,
    }))
}

/// Generic hwmon devices with `energyN_input` counters (microjoules, 64-bit: no wrap), such
/// as `amd_energy` or `zenpower`; the power monitors the Jetson module handles are skipped.
pub(crate) fn find_hwmon_energy(
    root: &Path,
) -> Vec<Result<RailSource, (String, SourceKind, String)>> {
    let mut found = Vec::new();
    for dir in entries(&root.join("sys/class/hwmon"), |n| n.starts_with("hwmon")) {
        let chip = read_optional_text(&dir.join("name")).unwrap_or_else(|| "hwmon".into());
        if chip.starts_with("ina") {
            continue;
        }
        let counters = entries(&dir, |n| n.starts_with("energy") && n.ends_with("_input"));
        if counters.is_empty() {
            continue;
        }
        let mut rails = Vec::new();
        for path in counters {
            let file = path
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let stem = file.trim_end_matches("_input");
            let label = read_optional_text(&dir.join(format!("{stem}_label")))
                .unwrap_or_else(|| stem.to_string());
            rails.push((label, Probe::counter(path, 1e-6, None)));
        }
        // Per-socket counters are the totals where a driver also lists per-core ones.
        let sockets: Vec<usize> = rails
            .iter()
            .enumerate()
            .filter(|(_, (l, _))| {
                l.to_ascii_lowercase().contains("socket")
                    || l.to_ascii_lowercase().contains("package")
            })
            .map(|(ix, _)| ix)
            .collect();
        let total = if sockets.is_empty() {
            (0..rails.len()).collect()
        } else {
            sockets
        };
        let dir_name = dir.file_name().and_then(|s| s.to_str()).unwrap_or("hwmon");
        found.push(Ok(RailSource {
            name: format!("hwmon {chip} ({dir_name})"),
            kind: SourceKind::HwmonEnergy,
            rails,
            total,
            update_interval: super::sysfs::update_interval(&dir),
            limit: HWMON_LIMIT,
        }));
    }
    found
}
