//! Finding the energy sources of this machine and choosing the one that measures the total.

use std::path::PathBuf;

use super::battery::{self, BatteryProbe, BatterySource};
use super::sysfs::RailSource;
use super::{jetson, nvml, rapl, EnergySource, SourceKind};

/// Where and what to look for.
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    /// The root under which `sys/` is read: `/` on a device, a recorded tree in tests.
    pub sysfs_root: PathBuf,
    /// The rail that carries the total (e.g. `VDD_IN`), overriding discovery.
    pub total_rail: Option<String>,
    /// Use only this kind of source.
    pub pin: Option<SourceKind>,
    /// Ask NVML (a real driver call: off when reading a recorded tree).
    pub nvml: bool,
}

impl DiscoveryOptions {
    pub fn new(sysfs_root: impl Into<PathBuf>) -> DiscoveryOptions {
        let sysfs_root = sysfs_root.into();
        let nvml = sysfs_root == std::path::Path::new("/");
        DiscoveryOptions {
            sysfs_root,
            total_rail: None,
            pin: None,
            nvml,
        }
    }
}

/// A source that was found but cannot be used, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Unusable {
    pub name: String,
    pub kind: SourceKind,
    pub reason: String,
}

/// Everything found. `sources` are the usable ones, best first: its first element, if any, is
/// the one to measure the system's energy with.
pub struct Discovery {
    pub sources: Vec<Box<dyn EnergySource>>,
    pub unusable: Vec<Unusable>,
    pub batteries: Vec<BatteryProbe>,
}

impl Discovery {
    /// Takes the best source out, leaving the rest.
    pub fn take_best(&mut self) -> Option<Box<dyn EnergySource>> {
        (!self.sources.is_empty()).then(|| self.sources.remove(0))
    }

    /// Why no source is usable, for the report's `energy.status`.
    pub fn why_none(&self) -> String {
        if self.unusable.is_empty() {
            "no energy source found".to_string()
        } else {
            let reasons: Vec<String> = self
                .unusable
                .iter()
                .map(|u| format!("{}: {}", u.name, u.reason))
                .collect();
            format!("no usable energy source ({})", reasons.join("; "))
        }
    }
}

/// Finds and probes every source. Each candidate is read once; one that fails (permission,
/// garbage, an implausible value, a charging battery) is listed as unusable with the reason.
pub fn discover(options: &DiscoveryOptions) -> Discovery {
    let root = &options.sysfs_root;
    let mut candidates: Vec<Result<Box<dyn EnergySource>, Unusable>> = Vec::new();
    let unusable =
        |(name, kind, reason): (String, SourceKind, String)| Unusable { name, kind, reason };
    let boxed = |s: RailSource| -> Box<dyn EnergySource> { Box::new(s) };

    for found in jetson::find(root, options.total_rail.as_deref()) {
        candidates.push(found.map(boxed).map_err(unusable));
    }
    if options.nvml {
        for found in nvml::find() {
            candidates.push(
                found
                    .map(|s| Box::new(s) as Box<dyn EnergySource>)
                    .map_err(unusable),
            );
        }
    }
    if let Some(found) = rapl::find_rapl(root) {
        candidates.push(found.map(boxed).map_err(unusable));
    }
    for found in rapl::find_hwmon_energy(root) {
        candidates.push(found.map(boxed).map_err(unusable));
    }
    let batteries = battery::find(root);
    for probe in &batteries {
        candidates.push(Ok(Box::new(BatterySource::new(probe.clone()))));
    }

    let mut sources = Vec::new();
    let mut unusable_list = Vec::new();
    for candidate in candidates {
        match candidate {
            Ok(mut source) => {
                if options.pin.is_some_and(|pin| pin != source.kind()) {
                    continue;
                }
                match source.read_total() {
                    Ok(_) => sources.push(source),
                    Err(e) => unusable_list.push(Unusable {
                        name: source.name().to_string(),
                        kind: source.kind(),
                        reason: e.to_string(),
                    }),
                }
            }
            Err(u) => {
                if options.pin.is_none_or(|pin| pin == u.kind) {
                    unusable_list.push(u);
                }
            }
        }
    }
    // Stable: within a kind, the order found (sorted paths) is kept.
    sources.sort_by_key(|s| s.kind());
    Discovery {
        sources,
        unusable: unusable_list,
        batteries,
    }
}
