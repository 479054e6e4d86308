//! Chains of per-channel affine ops merged into one multiply-add (and ReLU) pass.
//!
//! After tract's declutter, a batch norm that it could not fold into a convolution stays as a
//! `Mul` and an `Add` by `[1, C, 1, 1]` constants, and Caffe2-exported graphs (DenseNet,
//! Inception v2) follow it with a second scale and bias: `Mul, Add, Mul, Add, Max(0)` on every
//! concatenation. tract runs each as a broadcast binary op, five passes over the tensor with a
//! broadcast per element. Composed, the chain is `y = max(a_c * x + b_c, 0)`: one pass.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Max, Mul, Sub};

use super::{kernels, sole_reader};
use crate::inference::warm;

/// `y = a_c * x + b_c`, then `max(y, 0)` when `relu`, with `c` the index on axis 1.
#[derive(Clone, Debug, PartialEq)]
pub struct ChannelAffine {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
    pub relu: bool,
}

impl Eq for ChannelAffine {}

impl Op for ChannelAffine {
    fn name(&self) -> StaticName {
        "ChannelAffine".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels{}",
            self.scale.len(),
            if self.relu { ", relu" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ChannelAffine {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let channels = self.scale.len();
        let shape = input.shape().to_vec();
        ensure!(shape.len() >= 2 && shape[1] == channels);
        let plane: usize = shape[2..].iter().product();
        if plane == 0 || shape[0] == 0 {
            return Ok(tvec!(input));
        }
        // The producer's buffer is reused when nothing else holds it.
        let output = match Arc::try_unwrap(input.into_arc_tensor()) {
            Ok(mut tensor) => {
                let mut view = tensor.try_as_plain_ram_mut()?;
                let y = view.as_slice_mut::<f32>()?;
                let work_size = y.len();
                warm::for_parts(y, plane, work_size, &|planes, y| {
                    for (ix, y) in planes.zip(y.chunks_exact_mut(plane)) {
                        let c = ix % channels;
                        kernels::affine_in_place(y, self.scale[c], self.shift[c], self.relu);
                    }
                });
                tensor
            }
            Err(shared) => {
                let mut tensor = kernels::output_f32(&shape)?;
                let view = shared.try_as_plain_ram()?;
                let x = view.as_slice::<f32>()?;
                let mut out = tensor.try_as_plain_ram_mut()?;
                let y = out.as_slice_mut::<f32>()?;
                let work_size = y.len();
                warm::for_parts(y, plane, work_size, &|planes, y| {
                    for (ix, y) in planes.zip(y.chunks_exact_mut(plane)) {
                        let c = ix % channels;
                        let x = &x[ix * plane..][..plane];
                        kernels::affine(x, y, self.scale[c], self.shift[c], self.relu);
                    }
                });
                tensor
            }
        };
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for ChannelAffine {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let count: TDim = inputs[0].shape.iter().product();
        Ok(tvec!((Cost::FMA(f32::datum_type()), count)))
    }
}

/// What one node of a chain does to `y = a x + b` (per channel).
#[derive(Clone, Debug)]
pub(super) enum Step {
    Mul(Vec<f32>),
    Add(Vec<f32>),
    /// `y - c`.
    SubConst(Vec<f32>),
    /// `c - y`.
    ConstSub(Vec<f32>),
    Relu,
}

/// The per-channel values of a constant operand broadcast against `x` (channels on `axis`,
/// 1 for `[N, C, ...]`): a scalar, or a shape of ones but for `C` on `axis` (aligned from the
/// right, numpy style).
fn per_channel(konst: &Tensor, x: &TypedFact, axis: usize) -> Option<Vec<f32>> {
    let rank = x.rank();
    let channels = x.shape.as_concrete()?.get(axis).copied()?;
    if konst.datum_type() != f32::datum_type() || konst.rank() > rank || rank <= axis {
        return None;
    }
    let pad = rank - konst.rank();
    let mut per_channel_axis = false;
    for (ix, &dim) in konst.shape().iter().enumerate() {
        match (ix + pad, dim) {
            (_, 1) => {}
            (a, d) if a == axis && d == channels => per_channel_axis = true,
            _ => return None,
        }
    }
    let values = konst
        .try_as_plain_ram()
        .ok()?
        .as_slice::<f32>()
        .ok()?
        .to_vec();
    Some(if per_channel_axis {
        values
    } else {
        vec![values[0]; channels]
    })
}

/// The step node `node` applies to its non-constant input (channels on `axis`), and that
/// input's slot.
pub(super) fn step_of(model: &TypedModel, node: &TypedNode, axis: usize) -> Option<(Step, usize)> {
    let bin = node.op_as::<TypedBinOp>()?;
    if node.inputs.len() != 2 || bin.1.is_some_and(|dt| dt != f32::datum_type()) {
        return None;
    }
    let facts: Vec<&TypedFact> = node
        .inputs
        .iter()
        .map(|i| model.outlet_fact(*i).ok())
        .collect::<Option<_>>()?;
    let (x_slot, k_slot) = match (facts[0].konst.is_some(), facts[1].konst.is_some()) {
        (false, true) => (0, 1),
        (true, false) => (1, 0),
        _ => return None,
    };
    let x = facts[x_slot];
    let out = &node.outputs[0].fact;
    // The op must keep x's shape and type: a constant that broadcasts x up is not per-channel.
    if x.datum_type != f32::datum_type() || out.shape != x.shape || out.datum_type != x.datum_type {
        return None;
    }
    let values = per_channel(facts[k_slot].konst.as_ref()?, x, axis)?;
    let op = &bin.0;
    let step = if op.is::<Mul>() {
        Step::Mul(values)
    } else if op.is::<Add>() {
        Step::Add(values)
    } else if op.is::<Sub>() {
        if x_slot == 0 {
            Step::SubConst(values)
        } else {
            Step::ConstSub(values)
        }
    } else if op.is::<Max>() && values.iter().all(|v| *v == 0.0) {
        Step::Relu
    } else {
        return None;
    };
    Some((step, x_slot))
}

/// Producers that tract fuses a following per-channel multiply or add into (a convolution's
/// or matmul's epilogue): a chain right after one is cheaper left to tract.
fn fuses_epilogue(node: &TypedNode) -> bool {
    node.op_is::<Conv>() || node.op_is::<EinSum>()
}

/// Consecutive step nodes and what each does, in order.
#[derive(Default)]
pub(super) struct Chain {
    pub nodes: Vec<usize>,
    pub steps: Vec<Step>,
}

/// The steps that follow `outlet`, each the only reader of the one before and none of them a
/// model output (an intermediate read elsewhere must stay); up to and including a ReLU when
/// `with_relu`, else up to the ReLU; channels on `axis`.
pub(super) fn steps_after(
    model: &TypedModel,
    mut outlet: OutletId,
    with_relu: bool,
    axis: usize,
) -> Chain {
    let mut chain = Chain::default();
    while let Some(next) = sole_reader(model, outlet) {
        let Some((step, slot)) = step_of(model, next, axis) else {
            break;
        };
        let relu = matches!(step, Step::Relu);
        if next.inputs[slot] != outlet || (relu && !with_relu) {
            break;
        }
        chain.nodes.push(next.id);
        chain.steps.push(step);
        if relu {
            break;
        }
        outlet = OutletId::new(next.id, 0);
    }
    chain
}

/// A maximal chain starting at `start`, and the slot of `start`'s non-constant input.
fn chain_from(model: &TypedModel, start: &TypedNode) -> Option<(Chain, usize)> {
    let (first, x_slot) = step_of(model, start, 1)?;
    if matches!(first, Step::Relu) {
        // A lone activation is tract's to fuse into its producer.
        return None;
    }
    let producer = model.node(start.inputs[x_slot].node);
    if fuses_epilogue(producer) && model.outlet_successors(start.inputs[x_slot]).len() == 1 {
        return None;
    }
    let rest = steps_after(model, OutletId::new(start.id, 0), true, 1);
    let chain = Chain {
        nodes: [start.id].into_iter().chain(rest.nodes).collect(),
        steps: [first].into_iter().chain(rest.steps).collect(),
    };
    (chain.nodes.len() >= 2).then_some((chain, x_slot))
}

impl ChannelAffine {
    /// Folds `y = scale_o * conv + shift_o` into the convolution: `weights` is a run of
    /// `inner` values per output channel (cycling through the channels, as on a kernel's
    /// output axis) and is scaled run by run; `bias_o` becomes `scale_o * bias_o + shift_o`.
    pub(super) fn fold_into(&self, weights: &mut [f32], inner: usize, bias: &mut [f32]) {
        let channels = self.scale.len();
        for (ix, run) in weights.chunks_exact_mut(inner.max(1)).enumerate() {
            let s = self.scale[ix % channels];
            run.iter_mut().for_each(|v| *v *= s);
        }
        for (o, b) in bias.iter_mut().enumerate() {
            *b = *b * self.scale[o] + self.shift[o];
        }
    }
}

/// Composes a chain's steps into one op.
pub(super) fn compose(steps: &[Step]) -> ChannelAffine {
    let mut scale: Vec<f32> = Vec::new();
    let mut shift: Vec<f32> = Vec::new();
    let mut relu = false;
    for step in steps {
        let channels = match step {
            Step::Mul(v) | Step::Add(v) | Step::SubConst(v) | Step::ConstSub(v) => v.len(),
            Step::Relu => {
                // Set here: a chain that is only a ReLU has no channels to loop over.
                relu = true;
                continue;
            }
        };
        if scale.is_empty() {
            scale = vec![1.0; channels];
            shift = vec![0.0; channels];
        }
        for c in 0..channels {
            match step {
                Step::Mul(v) => {
                    scale[c] *= v[c];
                    shift[c] *= v[c];
                }
                Step::Add(v) => shift[c] += v[c],
                Step::SubConst(v) => shift[c] -= v[c],
                Step::ConstSub(v) => {
                    scale[c] = -scale[c];
                    shift[c] = v[c] - shift[c];
                }
                Step::Relu => {}
            }
        }
    }
    ChannelAffine { scale, shift, relu }
}

/// Replaces every chain of two or more per-channel affine steps; returns how many.
pub fn merge_chains(model: &mut TypedModel) -> TractResult<usize> {
    let mut chains = Vec::new();
    let mut taken = std::collections::HashSet::new();
    for id in model.eval_order()? {
        if taken.contains(&id) {
            continue;
        }
        if let Some((chain, x_slot)) = chain_from(model, model.node(id)) {
            taken.extend(chain.nodes.iter().copied());
            chains.push((chain, x_slot));
        }
    }
    for (chain, x_slot) in &chains {
        let op = compose(&chain.steps);
        // Read the input now: an earlier patch may have rewired it to its own output.
        let input = model.node(chain.nodes[0]).inputs[*x_slot];
        let last = *chain.nodes.last().expect("chains are not empty");
        let mut patch = TypedModelPatch::new(format!("merge {} affine steps", chain.nodes.len()));
        let tap = patch.tap_model(model, input)?;
        let name = format!("{}.affine", model.node(last).name);
        let out = patch.wire_node(name, op, &[tap])?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
    }
    Ok(chains.len())
}
