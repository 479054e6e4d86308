//! Our graph rewrites: a pass over the decluttered model, before tract's codegen, that replaces
//! patterns tract runs slowly on CPUs with our own ops (PERFORMANCE.md has the profiles that
//! chose them). Each rewrite keeps the model's outputs within [`TOLERANCE`] of tract's
//! unmodified plan; `tests/tests/rewrites.rs` checks that on every model and on synthetic
//! graphs. `--no-rewrites` (`model.rewrites = false`) turns the pass off, so a user can
//! compare and report a bug.

mod affine;
mod conv;
mod depthwise;
mod fold;
/// Public for `examples/gemm_shapes.rs`, which measures it on its own.
#[allow(unsafe_code)]
pub mod gemm;
mod geometry;
#[allow(unsafe_code)]
mod in_place;
#[allow(unsafe_code)]
mod kernels;
mod lrn;
mod pool;

pub use affine::ChannelAffine;
pub use conv::GemmConv;
pub use depthwise::RowDepthwiseConv;
pub use lrn::PlaneLrn;
pub use pool::{Reduce, RowPool};

use tract_onnx::prelude::*;

/// Largest absolute difference a rewrite may introduce in an output, relative to the largest
/// absolute value of that output (they reorder floating-point sums and use square roots for
/// powers).
pub const TOLERANCE: f32 = 1e-5;

/// What the pass changed in one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Applied {
    /// Per-channel multiply / add chains folded into a grouped convolution's kernel and bias.
    pub folded_into_convs: usize,
    /// Convolutions (and the multiply / add / ReLU chain after each) replaced by `GemmConv`,
    /// our matrix multiply (AVX-512 or AVX2 + FMA), counting a batch-1 classifier's large
    /// fully connected layer (a 1x1 convolution of a 1x1 image); 0 on CPUs with neither (and
    /// on aarch64).
    #[serde(default)]
    pub gemm_convs: usize,
    /// Chains of per-channel multiply / add / ReLU merged into one `ChannelAffine` pass each.
    pub affine_chains: usize,
    /// `Lrn` nodes replaced by `PlaneLrn`.
    pub lrn: usize,
    /// 2-D `MaxPool` nodes replaced by `RowPool` (`RowMaxPool` in profiles).
    pub max_pools: usize,
    /// 2-D average pools (tract's `SumPool`) replaced by `RowPool` (`RowAvgPool`).
    #[serde(default)]
    pub avg_pools: usize,
    /// Depthwise 2-D convolutions replaced by `RowDepthwiseConv`.
    pub depthwise_convs: usize,
}

impl Applied {
    pub fn is_none(&self) -> bool {
        self.total() == 0
    }

    pub fn total(&self) -> usize {
        self.folded_into_convs
            + self.gemm_convs
            + self.affine_chains
            + self.lrn
            + self.max_pools
            + self.avg_pools
            + self.depthwise_convs
    }

    /// One line for logs and the human report: `2 affine chains, 1 LRN` or `none`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if self.folded_into_convs > 0 {
            parts.push(format!(
                "{} folded into convolutions",
                self.folded_into_convs
            ));
        }
        if self.gemm_convs > 0 {
            parts.push(format!("{} GEMM convolutions", self.gemm_convs));
        }
        if self.affine_chains > 0 {
            parts.push(format!("{} affine chains", self.affine_chains));
        }
        if self.lrn > 0 {
            parts.push(format!("{} LRN", self.lrn));
        }
        if self.max_pools > 0 {
            parts.push(format!("{} max pools", self.max_pools));
        }
        if self.avg_pools > 0 {
            parts.push(format!("{} average pools", self.avg_pools));
        }
        if self.depthwise_convs > 0 {
            parts.push(format!("{} depthwise convolutions", self.depthwise_convs));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// Whether this CPU runs one of `GemmConv`'s kernels (AVX-512, AVX2 + FMA): elsewhere
/// convolutions stay tract's.
pub fn gemm_kernel_available() -> bool {
    gemm::available()
}

/// The node reading `outlet` when it is the only reader and `outlet` is not a model output:
/// what a rewrite may fuse with the node that produced `outlet`.
fn sole_reader(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    if model.output_outlets().ok()?.contains(&outlet) {
        return None;
    }
    match model.outlet_successors(outlet) {
        [only] => Some(model.node(only.node)),
        _ => None,
    }
}

/// The elements of an f32 tensor in memory.
fn f32_values(tensor: &Tensor) -> Option<Vec<f32>> {
    Some(
        tensor
            .try_as_plain_ram()
            .ok()?
            .as_slice::<f32>()
            .ok()?
            .to_vec(),
    )
}

/// A float convolution's constant kernel, and its bias as one value per output channel (a
/// scalar bias repeated), or `None` when either is computed or not f32.
fn conv_constants(
    model: &TypedModel,
    conv: &TypedNode,
    channels: usize,
) -> Option<(Arc<Tensor>, Vec<f32>)> {
    if conv.inputs.len() != 3 {
        return None;
    }
    let kernel = model.outlet_fact(conv.inputs[1]).ok()?.konst.clone()?;
    let bias = model.outlet_fact(conv.inputs[2]).ok()?.konst.clone()?;
    if kernel.datum_type() != f32::datum_type()
        || bias.datum_type() != f32::datum_type()
        || !(bias.len() == 1 || bias.len() == channels)
    {
        return None;
    }
    let values = f32_values(&bias)?;
    Some((
        kernel,
        (0..channels).map(|c| values[c % values.len()]).collect(),
    ))
}

/// Runs every rewrite over `model` (decluttered, f32, for the CPU runtime).
pub fn optimise(model: &mut TypedModel) -> TractResult<Applied> {
    let folded_into_convs = fold::into_grouped_convs(model)?;
    // Before the affine merge: the chain after a convolution goes into its kernel.
    let gemm_convs = conv::translate(model)?;
    let affine_chains = affine::merge_chains(model)?;
    let lrn = lrn::translate(model)?;
    let [max_pools, avg_pools] = pool::translate(model)?;
    let applied = Applied {
        folded_into_convs,
        gemm_convs,
        affine_chains,
        lrn,
        max_pools,
        avg_pools,
        // After the folds: a depthwise convolution's batch norm is in its weights by now.
        depthwise_convs: depthwise::translate(model)?,
    };
    if !applied.is_none() {
        model.compact()?;
    }
    Ok(applied)
}
