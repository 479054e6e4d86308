//! Convolutions as our own blocked matrix multiply (`gemm.rs`), on CPUs with AVX-512.
//!
//! tract runs a convolution as im2col then its matmul; on the model-zoo CNNs that matmul is
//! 83-93% of the time (PERFORMANCE.md, bench/RESULTS.md). Here a convolution is one matrix
//! multiply per group whose `B` operand is read straight from the input: a 1x1 convolution
//! with stride 1 reads the input channels as they are; any other is first split into
//! zero-padded stride phases (`Window2d::split`, as for depthwise convolutions), after which
//! every kernel tap `(c, ky, kx)` reads, for each output row, one contiguous run of a phase
//! plane's row (`RowsB::wrap`: the phase rows are a few columns wider than the output's, and
//! only the output's columns are packed and computed). The per-channel multiply / add chain
//! and the ReLU that follow the convolution are folded into its kernel, bias and the kernel's
//! epilogue.

use std::cell::RefCell;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::affine::{compose, steps_after};
use super::gemm::{self, PackedA, RowsB};
use super::geometry::Window2d;
use super::{conv_constants, f32_values};
use crate::inference::warm::{self, Crew};

#[derive(Clone, Debug, PartialEq)]
pub struct GemmConv {
    pub geometry: Window2d,
    pub input_channels: usize,
    /// One per group: `output_channels / groups` rows, `(input_channels / groups) * kh * kw`
    /// columns.
    pub groups: Vec<PackedA>,
    pub relu: bool,
    /// `[N, C, H, W]` or `[C, H, W]`: tract may add or drop a batch axis of 1 here.
    pub output_shape: Vec<usize>,
}

impl Eq for GemmConv {}

thread_local! {
    /// The phase planes of the thread that evaluates: kept between calls (a fresh buffer per
    /// call would cost a page-faulting allocation).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl Op for GemmConv {
    fn name(&self) -> StaticName {
        "GemmConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels, {} group(s), {}{}",
            self.input_channels,
            self.output_channels(),
            self.groups.len(),
            self.geometry.info(),
            if self.relu { ", relu" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl GemmConv {
    fn output_channels(&self) -> usize {
        self.groups.iter().map(|g| g.m).sum()
    }

    /// A 1x1 convolution with stride 1 and no padding reads its input as it is.
    fn direct(&self) -> bool {
        self.geometry.kernel == [1, 1]
            && self.geometry.stride == [1, 1]
            && self.geometry.pad_before == [0, 0]
    }

    /// Where row `(c, ky, kx)` of group `g`'s `B` starts: in the input (planes of `plane`
    /// elements) when `direct`, else in the phase planes.
    fn offsets(&self, g: usize, plane: usize) -> Vec<usize> {
        let [kh, kw] = self.geometry.kernel;
        let [sy, sx] = self.geometry.stride;
        let [_, cols] = self.geometry.phase_dims();
        let size = self.geometry.phase_len();
        let per_group = self.input_channels / self.groups.len();
        let mut offsets = Vec::with_capacity(per_group * kh * kw);
        for c in g * per_group..(g + 1) * per_group {
            if self.direct() {
                offsets.push(c * plane);
                continue;
            }
            for ky in 0..kh {
                for kx in 0..kw {
                    let phase = (c * sy + ky % sy) * sx + kx % sx;
                    offsets.push(phase * size + (ky / sy) * cols + kx / sx);
                }
            }
        }
        offsets
    }
}

impl EvalOp for GemmConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        let rank = shape.len();
        ensure!((rank == 3 || rank == 4) && shape[rank - 3] == self.input_channels);
        let (n, h, w) = (
            shape[..rank - 3].iter().product::<usize>(),
            shape[rank - 2],
            shape[rank - 1],
        );
        let [oh, ow] = self.geometry.output;
        let cout = self.output_channels();
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        ensure!(
            self.output_shape.iter().product::<usize>() == n * cout * oh * ow,
            "GemmConv: input {shape:?} does not give output {:?}",
            self.output_shape
        );
        let mut output = super::kernels::output_f32(&self.output_shape)?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        if n * cout * oh * ow == 0 {
            return Ok(tvec!(output.into_tvalue()));
        }
        let plane = h * w;
        let cin = self.input_channels;
        let direct = self.direct();
        let [sy, sx] = self.geometry.stride;
        let [_, cols] = self.geometry.phase_dims();
        // A direct convolution reads the input as it is; any other reads phase planes, whose
        // rows are `cols` wide: the output's rows are runs of `ow` columns in them.
        let (phases_len, wrap) = if direct {
            (0, None)
        } else {
            (cin * sy * sx * self.geometry.phase_len(), Some([ow, cols]))
        };
        // Rows of each group's product: the same for every group.
        let rows = self.groups.first().map_or(0, |g| g.m);
        ensure!(self.groups.iter().all(|g| g.m == rows));
        let offsets: Vec<Vec<usize>> = (0..self.groups.len())
            .map(|g| self.offsets(g, plane))
            .collect();
        SCRATCH.with_borrow_mut(|phases| {
            // Grown, never shrunk (a regrow would zero it again); `split` writes every element
            // the kernel reads.
            if phases.len() < phases_len {
                phases.resize(phases_len, 0.0);
            }
            for (x, y) in x
                .chunks_exact(cin * plane)
                .zip(y.chunks_exact_mut(cout * oh * ow))
            {
                let base: &[f32] = if direct {
                    x
                } else {
                    for (x, phases) in x
                        .chunks_exact(plane)
                        .zip(phases.chunks_exact_mut(sy * sx * self.geometry.phase_len()))
                    {
                        self.geometry.split(x, [h, w], phases);
                    }
                    phases
                };
                let product = |g: usize, c: &mut [f32], crew: Option<&Crew>| {
                    let b = RowsB {
                        base,
                        offsets: &offsets[g],
                        n: oh * ow,
                        wrap,
                    };
                    gemm::multiply(&self.groups[g], &b, c, oh * ow, self.relu, crew);
                };
                if self.groups.len() == 1 {
                    warm::with_current(|crew| product(0, y, crew));
                } else {
                    // The groups of a grouped convolution are independent products, each
                    // mostly too small to split well: the crew takes whole groups.
                    let work: usize = self.groups.iter().map(|g| g.m * g.k).sum::<usize>();
                    warm::for_parts(y, rows * oh * ow, work * oh * ow, &|groups, y| {
                        for (g, c) in groups.zip(y.chunks_exact_mut(rows * oh * ow)) {
                            product(g, c, None);
                        }
                    });
                }
            }
        });
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for GemmConv {
    as_op!();

    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(f32::fact(&self.output_shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let [oh, ow] = self.geometry.output;
        let per_image: usize = self.groups.iter().map(|g| g.m * g.k).sum::<usize>() * oh * ow;
        let shape = &inputs[0].shape;
        let images: TDim = shape.iter().take(shape.len().saturating_sub(3)).product();
        Ok(tvec!((Cost::FMA(f32::datum_type()), images * per_image)))
    }
}

/// What a convolution node computes, read off a `Conv` or a 1x1 convolution's `EinSum`.
struct Found {
    /// The data operand.
    input: OutletId,
    geometry: Window2d,
    input_channels: usize,
    groups: usize,
    /// `[output channels, input channels / groups, kh, kw]`, row-major.
    weights: Vec<f32>,
    bias: Vec<f32>,
    output_shape: Vec<usize>,
}

fn found_conv(model: &TypedModel, node: &TypedNode, conv: &Conv) -> Option<Found> {
    let spec = &conv.pool_spec;
    let fact = model.outlet_fact(node.inputs[0]).ok()?;
    let shape = fact.shape.as_concrete()?;
    let cout = conv.output_channels();
    // NCHW, or CHW (Window2d::of checks which).
    let rank = shape.len();
    let cin = *shape.get(rank.checked_sub(3)?)?;
    if conv.q_params.is_some()
        || conv.kernel_fmt != KernelFormat::OIHW
        || fact.datum_type != f32::datum_type()
        || node.outputs[0].fact.datum_type != f32::datum_type()
        || spec.input_channels != cin
        || conv.group == 0
        || !cin.is_multiple_of(conv.group)
        || !cout.is_multiple_of(conv.group)
        // Depthwise: `RowDepthwiseConv`'s (a one-row matrix multiply per channel).
        || conv.group == cin
    {
        return None;
    }
    let mut produced = node.outputs[0].fact.clone();
    produced.shape.set(rank - 3, cin.into());
    let geometry = Window2d::of(spec, shape, &produced)?;
    let (kernel, bias) = conv_constants(model, node, cout)?;
    let [kh, kw] = geometry.kernel;
    if kernel.shape() != [cout, cin / conv.group, kh, kw] {
        return None;
    }
    let mut output_shape = shape.to_vec();
    output_shape[rank - 3..].copy_from_slice(&[cout, geometry.output[0], geometry.output[1]]);
    Some(Found {
        input: node.inputs[0],
        geometry,
        input_channels: cin,
        groups: conv.group,
        weights: f32_values(&kernel)?,
        bias,
        output_shape,
    })
}

/// tract declutters a 1x1 convolution with stride 1 into an `EinSum` such as
/// `NIHW,OI->OHW`: the input `[N?, I, H, W]` (`N` of size 1 or absent), a constant `[O, I]`
/// kernel, the output `[N?, O, H, W]`.
fn found_einsum(model: &TypedModel, node: &TypedNode, einsum: &EinSum) -> Option<Found> {
    let formula = format!("{}", einsum.axes);
    let (inputs, output) = formula.split_once("->")?;
    let (first, second) = inputs.split_once(',')?;
    if node.inputs.len() != 2 {
        return None;
    }
    // The kernel is the constant operand, first or second (an NNEF-loaded graph puts it first).
    let facts = [0, 1].map(|ix| model.outlet_fact(node.inputs[ix]).ok());
    let [Some(a), Some(b)] = facts else {
        return None;
    };
    let (input, x, k, x_axes, k_axes) = match (a.konst.is_some(), b.konst.is_some()) {
        (false, true) => (node.inputs[0], a, b, first, second),
        (true, false) => (node.inputs[1], b, a, second, first),
        _ => return None,
    };
    let (x_axes, k_axes, output): (Vec<char>, Vec<char>, Vec<char>) = (
        x_axes.chars().collect(),
        k_axes.chars().collect(),
        output.chars().collect(),
    );
    let shape = x.shape.as_concrete()?;
    let output_shape = node.outputs[0].fact.shape.as_concrete()?.to_vec();
    let kernel = k.konst.as_ref()?;
    if einsum.q_params.is_some()
        || x.datum_type != f32::datum_type()
        || kernel.datum_type() != f32::datum_type()
        || node.outputs[0].fact.datum_type != f32::datum_type()
        || k_axes.len() != 2
        || x_axes.len() != shape.len()
        || !(3..=4).contains(&x_axes.len())
        || !(3..=4).contains(&output.len())
    {
        return None;
    }
    let [o, i] = [k_axes[0], k_axes[1]];
    let x_tail = &x_axes[x_axes.len() - 3..];
    let out_tail = &output[output.len() - 3..];
    let (h, w) = (x_tail[1], x_tail[2]);
    // A batch axis on both sides (any size), or a batch axis of 1 on one side only.
    let batch_ok = match (x_axes.len(), output.len()) {
        (4, 4) => x_axes[0] == output[0],
        (4, 3) => shape[0] == 1,
        (3, 4) => output_shape[0] == 1,
        _ => true,
    };
    let distinct = [o, i, h, w]
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
        == 4;
    if x_tail[0] != i || out_tail != [o, h, w] || !distinct || !batch_ok {
        return None;
    }
    let [cout, cin] = [kernel.shape()[0], kernel.shape()[1]];
    let [height, width] = [shape[shape.len() - 2], shape[shape.len() - 1]];
    if shape[shape.len() - 3] != cin || output_shape[output.len() - 3..] != [cout, height, width] {
        return None;
    }
    Some(Found {
        input,
        geometry: Window2d {
            kernel: [1, 1],
            stride: [1, 1],
            pad_before: [0, 0],
            output: [height, width],
        },
        input_channels: cin,
        groups: 1,
        weights: f32_values(kernel)?,
        bias: vec![0.0; cout],
        output_shape,
    })
}

/// Replaces every f32 convolution that is not depthwise (NCHW or CHW, no dilation, constant
/// kernel, concrete shapes; tract's `Conv`, or the `EinSum` a 1x1 one becomes) and the
/// multiply / add / ReLU chain after it with a `GemmConv`, on CPUs that have the
/// micro-kernel; returns how many.
pub fn translate(model: &mut TypedModel) -> TractResult<usize> {
    if !gemm::available() {
        return Ok(0);
    }
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let found = if let Some(conv) = node.op_as::<Conv>() {
            found_conv(model, node, conv)
        } else if let Some(einsum) = node.op_as::<EinSum>() {
            found_einsum(model, node, einsum)
        } else {
            None
        };
        let Some(Found {
            input,
            geometry,
            input_channels,
            groups,
            mut weights,
            mut bias,
            output_shape,
        }) = found
        else {
            continue;
        };
        let cout = bias.len();
        let channel_axis = output_shape.len() - 3;
        let chain = steps_after(model, OutletId::new(id, 0), true, channel_axis);
        let affine = compose(&chain.steps);
        let (nodes, relu) = if affine.scale.is_empty() || affine.scale.len() == cout {
            (chain.nodes, affine.relu)
        } else {
            (vec![], false)
        };
        let [kh, kw] = geometry.kernel;
        let k = input_channels / groups * kh * kw;
        if !affine.scale.is_empty() && !nodes.is_empty() {
            affine.fold_into(&mut weights, k, &mut bias);
        }
        let m = cout / groups;
        let op = GemmConv {
            geometry,
            input_channels,
            groups: (0..groups)
                .map(|g| PackedA::new(&weights[g * m * k..][..m * k], m, k, &bias[g * m..][..m]))
                .collect(),
            relu,
            output_shape,
        };
        let last = nodes.last().copied().unwrap_or(id);
        let mut patch = TypedModelPatch::new(format!("gemm conv {}", node.name));
        let input = patch.tap_model(model, input)?;
        let out = patch.wire_node(format!("{}.gemm", node.name), op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
