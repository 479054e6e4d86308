//! Convolutions as our own blocked matrix multiply (`gemm.rs`), on CPUs with AVX-512 or AVX2.
//!
//! tract runs a convolution as im2col then its matmul; on the model-zoo CNNs that matmul is
//! 83-93% of the time (PERFORMANCE.md, bench/RESULTS.md). Here a convolution is one matrix
//! multiply per group whose `B` operand is read straight from the input: a 1x1 convolution
//! with stride 1 reads the input channels as they are; any other is first split into
//! zero-padded stride phases (`Window2d::split`, as for depthwise convolutions), after which
//! every kernel tap `(c, ky, kx)` reads, for each output row, one contiguous run of a phase
//! plane's row (`RowsB::wrap`: the phase rows are a few columns wider than the output's, and
//! only the output's columns are packed and computed); a strided 1x1 convolution reads a
//! subsampled copy of its input (tract's `Downsample`s before it are absorbed). The per-channel
//! multiply / add chain that follows the convolution is folded into its kernel and bias, and a
//! residual connection's add and the ReLU into the kernel's epilogue.

use std::cell::RefCell;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::ops::Downsample;

use super::affine::{compose, step_of, steps_after, Step};
use super::gemm::{self, Epilogue, Layout, PackedA, RowsB};
use super::geometry::Window2d;
use super::{conv_constants, f32_values, sole_reader};
use crate::inference::warm::{self, Crew};

#[derive(Clone, Debug, PartialEq)]
pub struct GemmConv {
    pub geometry: Window2d,
    pub input_channels: usize,
    /// One per group: `output_channels / groups` rows, `(input_channels / groups) * kh * kw`
    /// columns.
    pub groups: Vec<PackedA>,
    /// A second input, shaped as the output, added before the ReLU: a residual connection.
    pub residual: bool,
    pub relu: bool,
    /// `[N, C, H, W]` or `[C, H, W]`: tract may add or drop a batch axis of 1 here. A
    /// classifier's fully connected layer (a 1x1 convolution of a 1x1 image): `[1, C]` or
    /// `[C]`.
    pub output_shape: Vec<usize>,
}

/// The channel axis of a GemmConv's input or output of `rank` (1 to 4) axes: `[N?, C, H, W]`,
/// or a classifier's `[N?, C]`.
fn channel_axis(rank: usize) -> usize {
    match rank {
        1 | 2 => rank - 1,
        _ => rank - 3,
    }
}

/// A classifier's fully connected layer becomes a GemmConv from this many weights (256 KiB;
/// the model zoo's: 544 to 2048 inputs, 1000 outputs): tract's matrix multiply runs its
/// matrix-vector product on one thread, GemmConv's runs on the crew. Small ones (the bundled
/// digits MLP's 64 x 64) stay tract's.
const CLASSIFIER_MIN_WEIGHTS: usize = 1 << 16;

/// How a convolution's `B` rows read its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// A 1x1 convolution with stride 1 and no padding: the input channels as they are.
    Input,
    /// A strided 1x1 convolution without padding: a copy of every `stride`-th row and column.
    Subsampled,
    /// Anything else: the zero-padded stride phases.
    Phases,
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
        let columns = self.groups.iter().any(|g| g.layout() == Layout::Columns);
        Ok(vec![format!(
            "{} -> {} channels, {} group(s), {}{}{}{}",
            self.input_channels,
            self.output_channels(),
            self.groups.len(),
            self.geometry.info(),
            if self.residual { ", + residual" } else { "" },
            if self.relu { ", relu" } else { "" },
            if columns { ", column kernel" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl GemmConv {
    fn output_channels(&self) -> usize {
        self.groups.iter().map(|g| g.m).sum()
    }

    /// How `B` reads an input of `h x w` planes.
    fn read(&self, input: [usize; 2]) -> Read {
        match self.geometry.subsamples(input) {
            true if self.geometry.stride == [1, 1] => Read::Input,
            true => Read::Subsampled,
            false => Read::Phases,
        }
    }

    /// Where row `(c, ky, kx)` of group `g`'s `B` starts: in planes of `plane` elements (the
    /// input's or the subsampled copy's), or in the phase planes.
    fn offsets(&self, g: usize, read: Read, plane: usize) -> Vec<usize> {
        let [kh, kw] = self.geometry.kernel;
        let per_group = self.input_channels / self.groups.len();
        let mut offsets = Vec::with_capacity(per_group * kh * kw);
        for c in g * per_group..(g + 1) * per_group {
            if read != Read::Phases {
                offsets.push(c * plane);
                continue;
            }
            for ky in 0..kh {
                for kx in 0..kw {
                    offsets.push(self.geometry.tap_offset(c, ky, kx));
                }
            }
        }
        offsets
    }
}

impl EvalOp for GemmConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, mut inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1 + usize::from(self.residual));
        let residual = self.residual.then(|| inputs.pop()).flatten();
        let input = args_1!(inputs);
        let shape = input.shape();
        let rank = shape.len();
        ensure!((1..=4).contains(&rank) && shape[channel_axis(rank)] == self.input_channels);
        // A classifier's input, `[1?, I]`, is one 1x1 image.
        let n = shape[..channel_axis(rank)].iter().product::<usize>();
        let (h, w) = match rank {
            1 | 2 => (1, 1),
            _ => (shape[rank - 2], shape[rank - 1]),
        };
        let [oh, ow] = self.geometry.output;
        let cout = self.output_channels();
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        ensure!(
            self.output_shape.iter().product::<usize>() == n * cout * oh * ow,
            "GemmConv: input {shape:?} does not give output {:?}",
            self.output_shape
        );
        let residual = match &residual {
            Some(r) => {
                ensure!(
                    r.shape().iter().product::<usize>() == n * cout * oh * ow,
                    "GemmConv: residual {:?} is not shaped as the output {:?}",
                    r.shape(),
                    self.output_shape
                );
                Some(r.try_as_plain_ram()?)
            }
            None => None,
        };
        let residual = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
        let mut output = super::kernels::output_f32(&self.output_shape)?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        if n * cout * oh * ow == 0 {
            return Ok(tvec!(output.into_tvalue()));
        }
        let plane = h * w;
        let cin = self.input_channels;
        let read = self.read([h, w]);
        let [sy, sx] = self.geometry.stride;
        let [_, cols] = self.geometry.phase_dims();
        // Phase planes' rows are `cols` wide: the output's rows are runs of `ow` columns in
        // them. The input and its subsampled copy are read as they are.
        let (scratch_len, wrap, b_plane) = match read {
            Read::Input => (0, None, plane),
            Read::Subsampled => (cin * oh * ow, None, oh * ow),
            Read::Phases => (
                cin * sy * sx * self.geometry.phase_len(),
                Some([ow, cols]),
                0,
            ),
        };
        // Rows of each group's product: the same for every group.
        let rows = self.groups.first().map_or(0, |g| g.m);
        ensure!(self.groups.iter().all(|g| g.m == rows));
        let offsets: Vec<Vec<usize>> = (0..self.groups.len())
            .map(|g| self.offsets(g, read, b_plane))
            .collect();
        let image = cout * oh * ow;
        SCRATCH.with_borrow_mut(|scratch| {
            // Grown, never shrunk (a regrow would zero it again); `split` and `subsample`
            // write every element the kernel reads.
            if scratch.len() < scratch_len {
                scratch.resize(scratch_len, 0.0);
            }
            for (i, (x, y)) in x
                .chunks_exact(cin * plane)
                .zip(y.chunks_exact_mut(image))
                .enumerate()
            {
                let base: &[f32] = match read {
                    Read::Input => x,
                    Read::Subsampled => {
                        for (x, copy) in
                            x.chunks_exact(plane).zip(scratch.chunks_exact_mut(oh * ow))
                        {
                            self.geometry.subsample(x, [h, w], copy);
                        }
                        scratch
                    }
                    Read::Phases => {
                        // Channel planes split on the crew too: on one thread the padded
                        // copies of a 3x3 layer's input were a serial part of a 2-thread run.
                        let len = sy * sx * self.geometry.phase_len();
                        let split = &mut scratch[..cin * len];
                        warm::for_parts(split, len, cin * len, &|planes, phases| {
                            for (c, phases) in planes.zip(phases.chunks_exact_mut(len)) {
                                self.geometry
                                    .split(&x[c * plane..][..plane], [h, w], phases);
                            }
                        });
                        scratch
                    }
                };
                let residual = residual.map(|r| &r[i * image..][..image]);
                let product = |g: usize, c: &mut [f32], crew: Option<&Crew>| {
                    let b = RowsB {
                        base,
                        offsets: &offsets[g],
                        n: oh * ow,
                        wrap,
                    };
                    let epilogue = Epilogue {
                        add: residual.map(|r| &r[g * rows * oh * ow..][..rows * oh * ow]),
                        relu: self.relu,
                    };
                    gemm::multiply(&self.groups[g], &b, c, oh * ow, epilogue, crew);
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

impl Found {
    /// A 1x1 convolution with stride 1 and no padding, no bias, of `[cout, cin]` weights onto
    /// `output` planes.
    fn pointwise(
        input: OutletId,
        weights: Vec<f32>,
        [cout, cin]: [usize; 2],
        output: [usize; 2],
        output_shape: Vec<usize>,
    ) -> Found {
        Found {
            input,
            geometry: Window2d {
                kernel: [1, 1],
                stride: [1, 1],
                pad_before: [0, 0],
                output,
            },
            input_channels: cin,
            groups: 1,
            weights,
            bias: vec![0.0; cout],
            output_shape,
        }
    }
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
    {
        return None;
    }
    if output.len() <= 2 {
        return found_classifier(
            input,
            [&x_axes, &k_axes, &output],
            shape,
            &output_shape,
            kernel,
        );
    }
    if !(3..=4).contains(&x_axes.len()) || !(3..=4).contains(&output.len()) {
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
    Some(Found::pointwise(
        input,
        f32_values(kernel)?,
        [cout, cin],
        [height, width],
        output_shape,
    ))
}

/// A classifier's fully connected layer as tract declutters ONNX's `Gemm` or `MatMul`: an
/// `EinSum` of the input and a constant kernel `[O, I]` (or `[I, O]`, then transposed) whose
/// every other axis has size 1: ResNet-50's `mkba,nk->mn` on `[1, 2048, 1, 1]` (the image it
/// was flattened from kept), `mk,nk->mn` on `[1, I]`, or `k,kn->mn` on `[I]` once tract has
/// dropped the batch axis; the output `[O]` or `[1, O]`. The bias is an `Add` after it, folded
/// in as a convolution's. Only from [`CLASSIFIER_MIN_WEIGHTS`].
fn found_classifier(
    input: OutletId,
    [x_axes, k_axes, output]: [&[char]; 3],
    shape: &[usize],
    output_shape: &[usize],
    kernel: &Tensor,
) -> Option<Found> {
    // The input's and the output's one axis longer than 1 (or, for one of 1, the kernel's).
    let sole = |axes: &[char], shape: &[usize]| {
        let mut long = axes
            .iter()
            .zip(shape)
            .filter(|(a, &size)| size > 1 || k_axes.contains(a));
        let (&axis, &size) = long.next()?;
        long.next().is_none().then_some((axis, size))
    };
    let (i, cin) = sole(x_axes, shape)?;
    let (o, cout) = sole(output, output_shape)?;
    // The input's other axes (a batch, an image's) have size 1: kept or summed over alike.
    if i == o || x_axes.iter().any(|a| *a != i && k_axes.contains(a)) {
        return None;
    }
    // The classifier's layout as GemmConv reads it: one `1 x 1` image of `I` channels,
    // `[1, I, 1, 1]` or no more than `[1, I]`.
    let image = match shape {
        [_] | [1, _] => true,
        [1, _, 1, 1] => x_axes[1] == i,
        _ => false,
    };
    if !image || cout * cin < CLASSIFIER_MIN_WEIGHTS {
        return None;
    }
    let weights = if k_axes == [o, i] && kernel.shape() == [cout, cin] {
        f32_values(kernel)?
    } else if k_axes == [i, o] && kernel.shape() == [cin, cout] {
        f32_values(&kernel.clone().permute_axes(&[1, 0]).ok()?)?
    } else {
        return None;
    };
    Some(Found::pointwise(
        input,
        weights,
        [cout, cin],
        [1, 1],
        output_shape.to_vec(),
    ))
}

/// tract declutters a strided 1x1 convolution into `Downsample`s on the height and width axes
/// before a stride-1 one: the convolution reads through them (`Read::Subsampled`), so that
/// nothing copies the subsampled input but the convolution itself.
fn through_downsamples(model: &TypedModel, found: &mut Found) {
    let g = &found.geometry;
    if g.kernel != [1, 1] || g.stride != [1, 1] || g.pad_before != [0, 0] {
        return;
    }
    let mut stride = [1, 1];
    let mut input = found.input;
    loop {
        let node = model.node(input.node);
        let Some(down) = node.op_as::<Downsample>() else {
            break;
        };
        let Ok(fact) = model.outlet_fact(node.inputs[0]) else {
            break;
        };
        let rank = fact.rank();
        let axis = match down.axis.checked_sub(rank.saturating_sub(2)) {
            Some(axis @ (0 | 1)) => axis,
            _ => break,
        };
        // Another reader of the subsampled input (tract shares one `Downsample` between the
        // strided convolutions of a residual block) keeps it, or reads through it as well.
        if down.modulo != 0 || down.stride < 1 || stride[axis] != 1 {
            break;
        }
        stride[axis] = down.stride as usize;
        input = node.inputs[0];
    }
    let Some(shape) = model
        .outlet_fact(input)
        .ok()
        .and_then(|f| f.shape.as_concrete().map(<[usize]>::to_vec))
    else {
        return;
    };
    let [.., h, w] = shape[..] else {
        return;
    };
    let geometry = Window2d {
        stride,
        ..found.geometry.clone()
    };
    if stride != [1, 1] && geometry.subsamples([h, w]) {
        found.input = input;
        found.geometry = geometry;
    }
}

/// The residual connection's add right after `tail` (a convolution's output, or the end of the
/// chain after it): `tail + other`, both of the sum's shape; `other` becomes the `GemmConv`'s
/// second input. It cannot depend on the convolution: every path from the convolution runs
/// through the chain (each step the sole reader of the one before) to this add.
fn residual_add(model: &TypedModel, tail: OutletId) -> Option<(&TypedNode, OutletId)> {
    let add = sole_reader(model, tail)?;
    let bin = add.op_as::<TypedBinOp>()?;
    if !bin.0.is::<Add>()
        || add.inputs.len() != 2
        || bin.1.is_some_and(|dt| dt != f32::datum_type())
    {
        return None;
    }
    let slot = add.inputs.iter().position(|i| *i == tail)?;
    let other = add.inputs[1 - slot];
    let sum = &add.outputs[0].fact;
    for outlet in [tail, other] {
        let fact = model.outlet_fact(outlet).ok()?;
        if fact.konst.is_some() || fact.datum_type != f32::datum_type() || fact.shape != sum.shape {
            return None;
        }
    }
    (other != tail).then_some((add, other))
}

/// Replaces every f32 convolution that is not depthwise (NCHW or CHW, no dilation, constant
/// kernel, concrete shapes; tract's `Conv`, or the `EinSum` a 1x1 one becomes, with the
/// `Downsample`s of a strided one) and the multiply / add chain, residual add and ReLU after it
/// with a `GemmConv`, on CPUs that have the micro-kernel; returns how many.
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
        let Some(mut found) = found else {
            continue;
        };
        through_downsamples(model, &mut found);
        let Found {
            input,
            geometry,
            input_channels,
            groups,
            mut weights,
            mut bias,
            output_shape,
        } = found;
        let cout = bias.len();
        let channel_axis = channel_axis(output_shape.len());
        let chain = steps_after(model, OutletId::new(id, 0), true, channel_axis);
        let affine = compose(&chain.steps);
        let [kh, kw] = geometry.kernel;
        let k = input_channels / groups * kh * kw;
        let (mut nodes, mut relu) = if affine.scale.is_empty() || affine.scale.len() == cout {
            if !affine.scale.is_empty() {
                affine.fold_into(&mut weights, k, &mut bias);
            }
            (chain.nodes, affine.relu)
        } else {
            (vec![], false)
        };
        // A residual connection's add (and a ReLU after it) right after: the epilogue's.
        let mut residual = None;
        if !relu {
            let tail = OutletId::new(nodes.last().copied().unwrap_or(id), 0);
            if let Some((add, other)) = residual_add(model, tail) {
                nodes.push(add.id);
                residual = Some(other);
                let sum = OutletId::new(add.id, 0);
                if let Some(next) = sole_reader(model, sum) {
                    if let Some((Step::Relu, slot)) = step_of(model, next, channel_axis) {
                        if next.inputs[slot] == sum {
                            nodes.push(next.id);
                            relu = true;
                        }
                    }
                }
            }
        }
        let m = cout / groups;
        // The product's columns: the output positions.
        let n = geometry.output.iter().product();
        let op = GemmConv {
            geometry,
            input_channels,
            groups: (0..groups)
                .map(|g| {
                    let (a, bias) = (&weights[g * m * k..][..m * k], &bias[g * m..][..m]);
                    PackedA::new(a, m, k, bias, n)
                })
                .collect(),
            residual: residual.is_some(),
            relu,
            output_shape,
        };
        let last = nodes.last().copied().unwrap_or(id);
        let mut patch = TypedModelPatch::new(format!("gemm conv {}", node.name));
        let mut taps = vec![patch.tap_model(model, input)?];
        if let Some(other) = residual {
            taps.push(patch.tap_model(model, other)?);
        }
        let out = patch.wire_node(format!("{}.gemm", node.name), op, &taps)?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
