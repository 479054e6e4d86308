//! `plaster-agent sensors`: the energy, battery and thermal sources of this machine and a live
//! reading of each (like a small jtop), and why each unusable one cannot be used.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::table;
use crate::sensors::battery::BatteryState;
use crate::sensors::sampler::counter_delta;
use crate::sensors::thermal::{self, ZoneReading};
use crate::sensors::{discover, DiscoveryOptions, Reading, SourceKind, Unusable};

/// Counters give power only as a difference: read them twice this far apart.
const COUNTER_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, clap::Args)]
pub struct SensorsArgs {
    /// Read sysfs under this directory instead of / (a recorded tree of another board)
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub sysfs_root: PathBuf,

    /// The rail that carries the total power (e.g. VDD_IN), overriding discovery
    #[arg(long, value_name = "RAIL")]
    pub total_rail: Option<String>,

    /// Print one JSON object instead of tables
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct SensorsReport {
    pub sysfs_root: PathBuf,
    /// The source `bench` and the daemon measure energy with; `null` when none is usable.
    pub selected: Option<String>,
    pub sources: Vec<SourceReport>,
    pub unusable: Vec<Unusable>,
    pub batteries: Vec<BatteryReport>,
    pub thermal: Vec<ThermalReport>,
}

#[derive(Debug, Serialize)]
pub struct SourceReport {
    pub name: String,
    pub kind: SourceKind,
    pub update_interval_ms: Option<f64>,
    /// Total power now, in watts (counters: averaged over 200 ms).
    pub power_w: Option<f64>,
    pub rails: Vec<RailReport>,
}

#[derive(Debug, Serialize)]
pub struct RailReport {
    pub name: String,
    pub power_w: Option<f64>,
    /// Counter rails: the counter's value in joules.
    pub energy_j: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BatteryReport {
    pub name: String,
    pub percent: Option<f64>,
    pub status: Option<String>,
    pub power_w: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ThermalReport {
    #[serde(flatten)]
    pub zone: ZoneReading,
    pub throttled: bool,
}

/// Finds and reads everything under the root.
pub fn inspect(args: &SensorsArgs) -> SensorsReport {
    let mut options = DiscoveryOptions::new(&args.sysfs_root);
    options.total_rail = args.total_rail.clone();
    let mut discovery = discover(&options);
    let selected = discovery.sources.first().map(|s| s.name().to_string());
    let mut sources = Vec::new();
    for source in discovery.sources.iter_mut() {
        let first = source.read_total();
        let t0 = Instant::now();
        let has_counter =
            matches!(&first, Ok(r) if r.iter().any(|r| matches!(r, Reading::Counter { .. })));
        let power_w = match first {
            Ok(first) if has_counter => {
                std::thread::sleep(COUNTER_INTERVAL);
                source.read_total().ok().map(|second| {
                    let seconds = t0.elapsed().as_secs_f64();
                    first
                        .iter()
                        .zip(&second)
                        .map(|(a, b)| rate(a, b, seconds))
                        .sum()
                })
            }
            Ok(readings) => Some(readings.iter().map(|r| rate(r, r, 0.0)).sum()),
            Err(_) => None,
        };
        let rails = source
            .read_rails()
            .into_iter()
            .map(|(name, reading)| match reading {
                Ok(Reading::Power(w)) => RailReport {
                    name,
                    power_w: Some(w.0),
                    energy_j: None,
                    error: None,
                },
                Ok(Reading::Counter { total, .. }) => RailReport {
                    name,
                    power_w: None,
                    energy_j: Some(total.0),
                    error: None,
                },
                Err(e) => RailReport {
                    name,
                    power_w: None,
                    energy_j: None,
                    error: Some(e.to_string()),
                },
            })
            .collect();
        sources.push(SourceReport {
            name: source.name().to_string(),
            kind: source.kind(),
            update_interval_ms: source.update_interval().map(|d| d.as_secs_f64() * 1e3),
            power_w,
            rails,
        });
    }
    let batteries = discovery
        .batteries
        .iter()
        .map(|probe| match probe.read() {
            Ok(BatteryState {
                name,
                percent,
                status,
                power,
            }) => BatteryReport {
                name,
                percent,
                status: Some(status),
                power_w: power.map(|w| w.0),
                error: None,
            },
            Err(e) => BatteryReport {
                name: probe.name.clone(),
                percent: None,
                status: None,
                power_w: None,
                error: Some(e.to_string()),
            },
        })
        .collect();
    let thermal = thermal::read_zones(&args.sysfs_root)
        .into_iter()
        .map(|zone| ThermalReport {
            throttled: zone.throttled(),
            zone,
        })
        .collect();
    SensorsReport {
        sysfs_root: args.sysfs_root.clone(),
        selected,
        sources,
        unusable: std::mem::take(&mut discovery.unusable),
        batteries,
        thermal,
    }
}

/// Watts from two readings of one channel `seconds` apart (power channels: the latest value).
fn rate(a: &Reading, b: &Reading, seconds: f64) -> f64 {
    match (a, b) {
        (_, Reading::Power(w)) => w.0,
        (Reading::Counter { total: c0, .. }, Reading::Counter { total: c1, wrap })
            if seconds > 0.0 =>
        {
            counter_delta(*c0, *c1, *wrap).0 / seconds
        }
        _ => 0.0,
    }
}

pub fn run(args: &SensorsArgs) -> std::io::Result<()> {
    let report = inspect(args);
    let text = if args.json {
        format!(
            "{}\n",
            serde_json::to_string(&report).expect("sensor reports always serialize")
        )
    } else {
        render(&report)
    };
    super::write_stdout(&text)
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map(|v| format!("{v:.digits$} {unit}"))
        .unwrap_or_else(|| "-".into())
}

pub fn render(report: &SensorsReport) -> String {
    let mut out = String::new();
    match &report.selected {
        Some(name) => out.push_str(&format!("energy source: {name}\n")),
        None => {
            out.push_str("energy source: none usable: joules per inference will be unavailable\n")
        }
    }
    if !report.sources.is_empty() {
        let mut t = table(vec!["source", "kind", "update", "total", "rails"]);
        for s in &report.sources {
            let rails: Vec<String> = s
                .rails
                .iter()
                .map(|r| match (&r.error, r.power_w, r.energy_j) {
                    (Some(e), _, _) => format!("{}: {e}", r.name),
                    (None, Some(w), _) => format!("{} {w:.3} W", r.name),
                    (None, None, Some(j)) => format!("{} {j:.3} J", r.name),
                    _ => r.name.clone(),
                })
                .collect();
            t.add_row(vec![
                s.name.clone(),
                s.kind.to_string(),
                opt(s.update_interval_ms, 0, "ms"),
                opt(s.power_w, 3, "W"),
                rails.join("\n"),
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    if !report.unusable.is_empty() {
        let mut t = table(vec!["unusable source", "kind", "why"]);
        for u in &report.unusable {
            t.add_row(vec![u.name.clone(), u.kind.to_string(), u.reason.clone()]);
        }
        out.push_str(&format!("{t}\n"));
    }
    if !report.batteries.is_empty() {
        let mut t = table(vec!["battery", "charge", "status", "power"]);
        for b in &report.batteries {
            t.add_row(vec![
                b.name.clone(),
                opt(b.percent, 1, "%"),
                b.status
                    .clone()
                    .or_else(|| b.error.clone())
                    .unwrap_or_default(),
                opt(b.power_w, 3, "W"),
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    if !report.thermal.is_empty() {
        let mut t = table(vec!["thermal zone", "temperature", "throttles at", ""]);
        for z in &report.thermal {
            t.add_row(vec![
                z.zone.zone.clone(),
                z.zone
                    .error
                    .clone()
                    .unwrap_or_else(|| opt(z.zone.temp_c, 1, "°C")),
                opt(z.zone.throttle_c, 1, "°C"),
                if z.throttled {
                    "THROTTLED".into()
                } else {
                    String::new()
                },
            ]);
        }
        out.push_str(&format!("{t}\n"));
    }
    out
}
