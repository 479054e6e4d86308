//! The P and S of PLASTER read off tract graphs: how much of the plan runs on the accelerator,
//! how many parameters the model holds and how many FLOPs an inference costs.

use std::collections::BTreeSet;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::source::TypedSource;
use tract_onnx::tract_core::ops::Cost;

use super::RuntimeKind;

/// Node counts of the prepared plan (PLASTER "P").
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Programmability {
    /// Compute nodes in the plan (sources and constants are not counted).
    pub nodes_total: usize,
    /// Nodes whose outputs live on the accelerator. Always 0 on the CPU runtime.
    pub nodes_on_accelerator: usize,
    /// Distinct op names the accelerator runtime left on the CPU, sorted.
    pub cpu_fallback_ops: Vec<String>,
    /// What our graph rewrites changed before tract's codegen (all zero with `--no-rewrites`,
    /// on an accelerator, or in f16).
    pub rewrites: super::rewrite::Applied,
}

impl Programmability {
    pub fn of(plan_model: &TypedModel, runtime: RuntimeKind) -> Programmability {
        let mut nodes_total = 0;
        let mut nodes_on_accelerator = 0;
        let mut fallback = BTreeSet::new();
        for node in plan_model.nodes() {
            if node.op_is::<TypedSource>() || node.op_is::<Const>() {
                continue;
            }
            nodes_total += 1;
            if runtime == RuntimeKind::Cpu {
                continue;
            }
            if is_on_device(node) {
                nodes_on_accelerator += 1;
            } else if !is_transfer(node) {
                fallback.insert(node.op().name().to_string());
            }
        }
        Programmability {
            nodes_total,
            nodes_on_accelerator,
            cpu_fallback_ops: fallback.into_iter().collect(),
            rewrites: Default::default(),
        }
    }
}

#[cfg(feature = "cuda")]
fn is_on_device(node: &TypedNode) -> bool {
    use tract_gpu::fact::DeviceTypedFactExt;
    !node.outputs.is_empty()
        && node
            .outputs
            .iter()
            .all(|o| o.fact.as_device_fact().is_some())
}

#[cfg(not(feature = "cuda"))]
fn is_on_device(_node: &TypedNode) -> bool {
    false
}

/// The copies tract-gpu inserts between host and device are plumbing, not fallbacks.
fn is_transfer(node: &TypedNode) -> bool {
    let name = node.op().name();
    name.starts_with("DeviceSync") || name.starts_with("Gpu")
}

/// FLOPs of one run of `model` (2 per multiply-accumulate, 1 per division), or `None` when a
/// cost is symbolic or an op cannot say.
pub fn flops(model: &TypedModel) -> Option<u64> {
    model.nodes().iter().try_fold(0u64, |total, node| {
        total.checked_add(node_flops(model, node)?)
    })
}

/// FLOPs of one evaluation of `node`, by tract's cost model, or `None` when it cannot say.
pub(crate) fn node_flops(model: &TypedModel, node: &TypedNode) -> Option<u64> {
    let facts = model.node_input_facts(node.id).ok()?;
    let mut total: u64 = 0;
    for (cost, count) in node.op.cost(&facts).ok()? {
        let per = match cost {
            Cost::FMA(_) => 2,
            Cost::Div(_) => 1,
            _ => continue,
        };
        let count = count.to_i64().ok()?;
        total = total.checked_add(per * count.max(0) as u64)?;
    }
    Some(total)
}
