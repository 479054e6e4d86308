//! Depthwise 2-D convolution (one filter per channel: ShuffleNet, MobileNet) as plane-wide
//! multiply-adds.
//!
//! tract's `DepthWiseConv` has no AVX path on x86 and runs strided cases element by element.
//! Here each channel's plane is split once into zero-padded stride phases, after which every
//! kernel tap reads one contiguous run over the whole output plane (computed a few columns
//! wide, then trimmed), whatever the stride and padding; all taps are summed in one pass with
//! the sums in registers (`kernels::taps`): one call per plane, not one per row and tap.
//!
//! The usual cases need no split at all: a stride-1 window whose output rows are as wide as
//! the input's ("same" padding across: every depthwise convolution of ShuffleNet's and
//! MobileNet's units but the strided ones) and, with AVX-512, a stride-2 window are read from
//! the input plane in place, padded lanes masked off ([`InPlace`]).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};

use super::gemm::Kernel;
use super::geometry::Window2d;
use super::in_place::InPlace;
use super::{conv_constants, kernels};
use crate::inference::warm;

#[derive(Clone, Debug, PartialEq)]
pub struct RowDepthwiseConv {
    /// `[channels, kh, kw]`, row-major.
    pub weights: Vec<f32>,
    pub bias: Vec<f32>,
    pub geometry: Window2d,
    /// The plane read in place, where the window allows it and the CPU has a kernel for it.
    in_place: Option<InPlace>,
}

impl Eq for RowDepthwiseConv {}

impl Op for RowDepthwiseConv {
    fn name(&self) -> StaticName {
        "RowDepthwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} channels, {}{}",
            self.bias.len(),
            self.geometry.info(),
            if self.in_place.is_some() {
                ", read in place"
            } else {
                ""
            }
        )])
    }

    op_as_typed_op!();
}

/// The plane is computed in whole runs of this many outputs (`kernels::taps`' vector): the
/// buffers have this much slack, so no output is left to a scalar tail loop.
const RUN: usize = 16;

impl RowDepthwiseConv {
    /// Where tap `(ky, kx)` of the first output row reads in the phase planes, row-major.
    fn tap_offsets(&self) -> Vec<usize> {
        let [kh, kw] = self.geometry.kernel;
        (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| self.geometry.tap_offset(0, ky, kx)))
            .collect()
    }

    /// One channel, every tap at once (`kernels::taps`) over all output rows, computed `cols`
    /// wide (the columns past the output's width, and the run's slack, dropped at the end):
    /// one call per plane, whatever its width, and no scalar tail (row by row, a 28-wide row
    /// left 12 of its outputs to one).
    fn plane(&self, c: usize, phases: &[f32], taps: &[usize], wide: &mut [f32], y: &mut [f32]) {
        let [oh, ow] = self.geometry.output;
        let [kh, kw] = self.geometry.kernel;
        let [_, cols] = self.geometry.phase_dims();
        let weights = &self.weights[c * kh * kw..][..kh * kw];
        let wide = &mut wide[..(oh * cols).next_multiple_of(RUN)];
        kernels::taps(wide, phases, taps, weights, self.bias[c]);
        for (out, wide) in y.chunks_exact_mut(ow).zip(wide.chunks_exact(cols)) {
            out.copy_from_slice(&wide[..ow]);
        }
    }
}

impl EvalOp for RowDepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(shape.len() == 4 && shape[1] == self.bias.len());
        let (n, channels, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let [oh, ow] = self.geometry.output;
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let mut output = kernels::output_f32(&[n, channels, oh, ow])?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        if oh * ow > 0 && h * w > 0 {
            let [kh, kw] = self.geometry.kernel;
            let work_size = y.len() * kh * kw;
            if let Some(in_place) = &self.in_place {
                ensure!([h, w] == in_place.input());
                warm::for_parts(y, oh * ow, work_size, &|planes, y| {
                    for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                        let c = ix % channels;
                        let weights = &self.weights[c * kh * kw..][..kh * kw];
                        in_place.convolve(&x[ix * h * w..][..h * w], y, weights, self.bias[c]);
                    }
                });
                return Ok(tvec!(output.into_tvalue()));
            }
            let [_, cols] = self.geometry.phase_dims();
            let [sy, sx] = self.geometry.stride;
            let taps = self.tap_offsets();
            // Planes shared out over the inference's crew, each part with its own buffers.
            warm::for_parts(y, oh * ow, work_size, &|planes, y| {
                // Slack after the last phase for the last run's reads (zeros, never output).
                // Zeroed once: every plane's split writes the same cells, the padding stays 0.
                let mut phases = vec![0f32; sy * sx * self.geometry.phase_len() + RUN];
                let mut wide = vec![0f32; (oh * cols).next_multiple_of(RUN)];
                for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                    self.geometry
                        .split_into_zeroed(&x[ix * h * w..][..h * w], [h, w], &mut phases);
                    self.plane(ix % channels, &phases, &taps, &mut wide, y);
                }
            });
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowDepthwiseConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.geometry.output_fact(inputs[0])))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let shape = &inputs[0].shape;
        let [oh, ow] = self.geometry.output;
        let outputs = shape[0].clone() * shape[1].clone() * (oh * ow);
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            outputs * (self.geometry.kernel[0] * self.geometry.kernel[1])
        )))
    }
}

/// Replaces every f32 NCHW depthwise `Conv` (one filter per channel, no dilation) with constant
/// weights and concrete shapes; returns how many.
pub fn translate(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let spec = &conv.pool_spec;
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if conv.q_params.is_some()
            || conv.kernel_fmt != KernelFormat::OIHW
            || fact.datum_type != f32::datum_type()
            || shape.len() != 4
            || conv.group != shape[1]
            || spec.input_channels != shape[1]
            || spec.output_channels != shape[1]
        {
            continue;
        }
        let Some(geometry) = Window2d::of(spec, shape, &node.outputs[0].fact) else {
            continue;
        };
        let Some((kernel, bias)) = conv_constants(model, node, shape[1]) else {
            continue;
        };
        let channels = shape[1];
        let [kh, kw] = geometry.kernel;
        if kernel.shape() != [channels, 1, kh, kw] {
            continue;
        }
        let in_place = Kernel::best().and_then(|k| InPlace::of(k, &geometry, [shape[2], shape[3]]));
        let op = RowDepthwiseConv {
            weights: kernel.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(),
            bias,
            geometry,
            in_place,
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
