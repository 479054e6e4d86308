//! The PLASTER report (`schema: "plaster/v1"`): the object `bench --json` prints and MQTT
//! telemetry carries. Its keys are a contract (PRODUCT.md, docs/report.md); add keys, never
//! rename or remove them.

use serde::{Deserialize, Serialize};

use super::accuracy::Top1;
use super::energy::EnergyReport;
use super::latency::LatencySummary;
use crate::inference::{Precision, Programmability};

/// The schema tag of every report.
pub const SCHEMA: &str = "plaster/v1";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub device: DeviceInfo,
    pub model: ModelInfo,
    pub programmability: ProgrammabilityReport,
    pub latency_ms: LatencySummary,
    /// `null` when no labelled dataset was given.
    pub accuracy: Option<Accuracy>,
    pub size: Size,
    pub throughput: Throughput,
    pub energy: EnergyReport,
    pub learning: Learning,
    /// Per-op profile, only with `bench --profile` (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::inference::Profile>,
    /// Outputs against the CPU runtime in f32, only with `bench --check-outputs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_vs_cpu: Option<crate::inference::OutputCheck>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: String,
    pub arch: String,
    /// `cpu` or `cuda`: the runtime inference actually ran on.
    pub runtime: String,
    pub threads: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    /// The pushed version; `null` for a model loaded from a path.
    pub version: Option<u64>,
    pub sha256: String,
    pub format: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgrammabilityReport {
    pub nodes_total: usize,
    pub nodes_on_accelerator: usize,
    pub cpu_fallback_ops: Vec<String>,
    /// Our graph rewrites applied to the plan; absent when none was (no bytes in telemetry
    /// for models they do not touch, and in reports of older agents).
    #[serde(
        default,
        skip_serializing_if = "crate::inference::rewrite::Applied::is_none"
    )]
    pub rewrites: crate::inference::rewrite::Applied,
}

impl From<&Programmability> for ProgrammabilityReport {
    fn from(p: &Programmability) -> Self {
        ProgrammabilityReport {
            nodes_total: p.nodes_total,
            nodes_on_accelerator: p.nodes_on_accelerator,
            cpu_fallback_ops: p.cpu_fallback_ops.clone(),
            rewrites: p.rewrites.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Always `top1` in schema v1.
    pub metric: String,
    pub value: f64,
    pub samples: usize,
    /// The precision the accuracy was measured in: `f32` or `f16`.
    pub precision: String,
    /// `value` minus the f32 accuracy on the same set when running in f16; `null` in f32.
    pub delta_vs_f32: Option<f64>,
}

impl Accuracy {
    /// The report's accuracy section for `top1` hits counted in `precision`.
    pub fn top1(top1: Top1, precision: Precision, delta_vs_f32: Option<f64>) -> Accuracy {
        Accuracy {
            metric: "top1".to_string(),
            value: top1.value(),
            samples: top1.samples,
            precision: precision.as_str().to_string(),
            delta_vs_f32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size {
    pub file_bytes: u64,
    pub parameters: u64,
    pub flops_per_inference: Option<u64>,
    /// Peak resident set size of the whole process (`VmHWM`); `null` without procfs.
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// `single-stream`, `offline` or `server`.
    pub scenario: String,
    pub inferences_per_s: f64,
    pub batch: usize,
    /// Measured window in seconds.
    pub duration_s: f64,
    /// Server scenario: the Poisson arrival rate offered (queries per second).
    pub target_qps: Option<f64>,
    /// Server scenario: the p99 latency bound the run was held to.
    pub latency_bound_ms: Option<f64>,
    /// Server scenario: whether p99 latency stayed within the bound.
    pub bound_met: Option<bool>,
    /// With `--strict`: whether the run met MLPerf's minimum duration and query count (and the
    /// latency bound in the server scenario); `null` for the default short run.
    pub valid: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Learning {
    /// `measured`, or `unavailable: <reason>` where no update machinery ran (e.g. `bench`).
    pub status: String,
    pub active_since: Option<String>,
    pub push_to_active_s: Option<f64>,
    pub updates_ok: u64,
    pub updates_rejected: u64,
    pub rollbacks: u64,
}

impl Learning {
    /// The learning figures of a process that receives no model updates.
    pub fn without_updates(reason: &str) -> Learning {
        Learning {
            status: format!("unavailable: {reason}"),
            active_since: None,
            push_to_active_s: None,
            updates_ok: 0,
            updates_rejected: 0,
            rollbacks: 0,
        }
    }
}
