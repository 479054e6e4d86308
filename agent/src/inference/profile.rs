//! Where a model's time goes: each node of the plan timed over repeated runs, grouped by op
//! kind, with the GFLOP/s tract's cost model implies (`bench --profile`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{eval, SimpleState};

use super::programmability::node_flops;
use super::{InferenceError, PreparedModel};

/// The per-op profile of a prepared model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Runs (queries) profiled.
    pub runs: u64,
    /// Wall-clock time per inference around the whole plan.
    pub wall_ms_per_inference: f64,
    /// The sum of the ops' times per inference; the rest of the wall time is the plan's own.
    pub ops_ms_per_inference: f64,
    /// The median over runs of (time in ops / wall time): how completely the ops account for a
    /// run. The median keeps a run the scheduler interrupted between two ops from skewing it.
    pub ops_share_of_wall: f64,
    /// Op kinds, slowest first.
    pub ops: Vec<OpProfile>,
    /// The slowest nodes (at most [`SLOWEST_NODES`]), slowest first: which layers of an op
    /// kind are behind its rate.
    #[serde(default)]
    pub nodes: Vec<NodeProfile>,
}

/// How many nodes [`Profile::nodes`] lists.
pub const SLOWEST_NODES: usize = 12;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// The node's name in the plan (from the ONNX graph, with tract's suffixes).
    pub name: String,
    pub op: String,
    /// The op's own description of its shape and parameters.
    pub info: String,
    pub ms_per_inference: f64,
    /// Share of the ops' total time, 0 to 1.
    pub share: f64,
    pub gflops_per_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpProfile {
    /// tract's op name, e.g. `OptMatMul`, `Max`, `OptMaxPool`.
    pub op: String,
    pub nodes: usize,
    pub ms_per_inference: f64,
    /// Share of the ops' total time, 0 to 1.
    pub share: f64,
    /// Floating-point throughput of these nodes, when the cost model counts their work.
    pub gflops_per_s: Option<f64>,
}

impl PreparedModel {
    /// Runs the plan over `inputs` (cycled) for about `duration`, timing every node.
    pub fn profile(
        &self,
        inputs: &[TVec<TValue>],
        duration: Duration,
    ) -> Result<Profile, InferenceError> {
        let plan = self
            .runnable
            .typed_plan()
            .ok_or_else(|| {
                InferenceError::Run("this runtime's plan cannot be profiled per node".into())
            })?
            .clone();
        let model = plan.model();
        // Nodes whose cost tract cannot state count no work (their GFLOP/s is left out).
        let flops: Vec<f64> = model
            .nodes()
            .iter()
            .map(|node| node_flops(model, node).unwrap_or(0) as f64)
            .collect();
        let mut state = SimpleState::new(&plan).map_err(InferenceError::run)?;
        let mut per_node = vec![Duration::ZERO; model.nodes().len()];
        let mut runs = 0u64;
        let mut wall = Duration::ZERO;
        let mut coverage = Vec::new();
        // The same conditions as `Session::run`: the crew awake and sharing our ops' work.
        let _hot = self.crew.as_deref().map(super::warm::Crew::hold);
        let start = Instant::now();
        while runs == 0 || start.elapsed() < duration {
            let input = inputs[runs as usize % inputs.len()].clone();
            let ops_before: Duration = per_node.iter().sum();
            let t0 = Instant::now();
            state
                .run_plan_with_eval(input, |ctx, op_state, node, node_inputs| {
                    let t = Instant::now();
                    let result = eval(ctx, op_state, node, node_inputs);
                    per_node[node.id] += t.elapsed();
                    result
                })
                .map_err(InferenceError::run)?;
            let run_wall = t0.elapsed();
            let run_ops = per_node.iter().sum::<Duration>() - ops_before;
            wall += run_wall;
            coverage.push(run_ops.as_secs_f64() / run_wall.as_secs_f64().max(f64::MIN_POSITIVE));
            runs += 1;
        }
        let per_inference = |d: Duration| d.as_secs_f64() * 1e3 / (runs as f64 * self.batch as f64);
        let total: Duration = per_node.iter().sum();
        let share = |d: Duration| d.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE);
        let rate = |flops_per_run: f64, time: Duration| {
            let seconds_per_run = time.as_secs_f64() / runs as f64;
            (flops_per_run > 0.0 && seconds_per_run > 0.0)
                .then(|| flops_per_run / seconds_per_run / 1e9)
        };
        let mut groups: BTreeMap<String, (usize, Duration, f64)> = BTreeMap::new();
        for node in model.nodes() {
            let entry = groups.entry(node.op().name().to_string()).or_default();
            entry.0 += 1;
            entry.1 += per_node[node.id];
            entry.2 += flops[node.id];
        }
        let mut ops: Vec<OpProfile> = groups
            .into_iter()
            .filter(|(_, (_, time, _))| !time.is_zero())
            .map(|(op, (nodes, time, flops_per_run))| OpProfile {
                op,
                nodes,
                ms_per_inference: per_inference(time),
                share: share(time),
                gflops_per_s: rate(flops_per_run, time),
            })
            .collect();
        ops.sort_by(|a, b| b.ms_per_inference.total_cmp(&a.ms_per_inference));
        let mut slowest: Vec<&TypedNode> = model.nodes().iter().collect();
        slowest.sort_by(|a, b| per_node[b.id].cmp(&per_node[a.id]));
        let nodes = slowest
            .into_iter()
            .take(SLOWEST_NODES)
            .filter(|node| !per_node[node.id].is_zero())
            .map(|node| NodeProfile {
                name: node.name.clone(),
                op: node.op().name().to_string(),
                info: node.op().info().unwrap_or_default().join("; "),
                ms_per_inference: per_inference(per_node[node.id]),
                share: share(per_node[node.id]),
                gflops_per_s: rate(flops[node.id], per_node[node.id]),
            })
            .collect();
        coverage.sort_by(f64::total_cmp);
        Ok(Profile {
            runs,
            wall_ms_per_inference: per_inference(wall),
            ops_ms_per_inference: per_inference(total),
            ops_share_of_wall: coverage[coverage.len() / 2],
            ops,
            nodes,
        })
    }
}
