//! Depthwise 2-D convolution (one filter per channel: ShuffleNet, MobileNet) as plane-wide
//! multiply-adds.
//!
//! tract's `DepthWiseConv` has no AVX path on x86 and runs strided cases element by element.
//! Here each channel's plane is split once into zero-padded stride phases, after which every
//! kernel tap reads one contiguous run over the whole output plane (computed a few columns
//! wide, then trimmed), whatever the stride and padding; all taps are summed in one pass with
//! the sums in registers (`kernels::taps`): one call per plane, not one per row and tap.
//!
//! The usual cases need no split at all ([`InPlace`]): a stride-1 window whose output rows
//! are as wide as the input's ("same" padding across: every depthwise convolution of
//! ShuffleNet's and MobileNet's units but the strided ones), where output `p` (row-major)
//! reads tap `t` at input `p + offset[t]` wherever the tap lies inside the input, so each tap
//! of a run of 16 outputs is one vector load from the input plane itself, its lanes in the
//! padding masked off (AVX-512 or AVX2 + FMA); and, with AVX-512, a stride-2 window, each tap
//! of a run of 16 outputs in a row being the even lanes of two such loads. The sums are
//! stored straight into the output.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};

use super::gemm::Kernel;
use super::geometry::Window2d;
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
            if let Some(in_place) = &self.in_place {
                ensure!([h, w] == in_place.input);
                let [kh, kw] = self.geometry.kernel;
                warm::for_parts(y, oh * ow, y.len() * kh * kw, &|planes, y| {
                    for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                        let c = ix % channels;
                        let weights = &self.weights[c * kh * kw..][..kh * kw];
                        in_place.plane(&x[ix * h * w..][..h * w], y, weights, self.bias[c]);
                    }
                });
                return Ok(tvec!(output.into_tvalue()));
            }
            let [_, cols] = self.geometry.phase_dims();
            let [sy, sx] = self.geometry.stride;
            let [kh, kw] = self.geometry.kernel;
            let work_size = y.len() * kh * kw;
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

/// Lanes of one run of outputs: a zmm register, or two ymm ones.
const LANES: usize = 16;

/// A depthwise window read from the input plane in place, run by run of up to 16 outputs
/// along a row (or, at stride 1, along the whole plane): tap `t` of a run reads the input
/// at `run.input + offsets[t]`, one vector (stride 1) or two whose even lanes it takes
/// (stride 2), its lanes outside the input masked off (a padded cell is zero).
#[derive(Clone, Debug, PartialEq, Eq)]
struct InPlace {
    kernel: Kernel,
    /// The input plane's height and width.
    input: [usize; 2],
    /// 1 or 2, on both axes.
    stride: usize,
    /// Per tap, row-major: where it reads relative to a run's `input`.
    offsets: Vec<isize>,
    runs: Vec<Run>,
    /// Per tap and run, `masks[t * runs + run]` (a group of runs' masks for one tap side by
    /// side): bit `j` set when the run's element `j` of its tap's read (of 16 at stride 1, of
    /// 32 at stride 2, even ones only) is a cell of the input that an output uses.
    masks: Vec<u32>,
}

/// Up to 16 consecutive outputs of a plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Where its reads start in the input plane, before a tap's offset (negative in the
    /// padding before the first row).
    input: isize,
    /// Its first output.
    output: usize,
    /// How many outputs, 1 to 16.
    len: usize,
}

impl InPlace {
    /// The in-place reading of `geometry` on an `h x w` input, run by `kernel`, when the
    /// window allows it: stride 1 with output rows `w` wide (then a run spans rows: one
    /// offset per tap for every output), or stride 2 on both axes with AVX-512.
    fn of(kernel: Kernel, geometry: &Window2d, [h, w]: [usize; 2]) -> Option<InPlace> {
        let [oh, ow] = geometry.output;
        let stride = match geometry.stride {
            [1, 1] if ow == w => 1,
            [2, 2] if kernel == Kernel::Avx512 => 2,
            _ => return None,
        };
        if oh * ow == 0 || h * w == 0 {
            return None;
        }
        let [kh, kw] = geometry.kernel;
        let [py, px] = geometry.pad_before.map(|p| p as isize);
        let (hi, wi) = (h as isize, w as isize);
        let taps: Vec<[isize; 2]> = (0..kh as isize)
            .flat_map(|ky| (0..kw as isize).map(move |kx| [ky, kx]))
            .collect();
        let runs: Vec<Run> = if stride == 1 {
            let n = oh * ow;
            (0..n.div_ceil(LANES))
                .map(|r| Run {
                    input: (r * LANES) as isize - py * wi - px,
                    output: r * LANES,
                    len: (n - r * LANES).min(LANES),
                })
                .collect()
        } else {
            (0..oh)
                .flat_map(|oy| {
                    (0..ow.div_ceil(LANES)).map(move |r| Run {
                        input: (2 * oy as isize - py) * wi + (2 * r * LANES) as isize - px,
                        output: oy * ow + r * LANES,
                        len: (ow - r * LANES).min(LANES),
                    })
                })
                .collect()
        };
        let offsets: Vec<isize> = taps.iter().map(|[ky, kx]| ky * wi + kx).collect();
        // The input cell that output `l` of a run reads at tap `[ky, kx]`, when inside.
        let cell = |run: &Run, l: usize, [ky, kx]: [isize; 2]| {
            let p = run.output + l;
            let (oy, ox) = ((p / ow) as isize, (p % ow) as isize);
            let s = stride as isize;
            let (iy, ix) = (s * oy + ky - py, s * ox + kx - px);
            ((0..hi).contains(&iy) && (0..wi).contains(&ix)).then_some(iy * wi + ix)
        };
        let masks = taps
            .iter()
            .zip(&offsets)
            .flat_map(|(&tap, &offset)| {
                runs.iter().map(move |run| {
                    let mut mask = 0u32;
                    for l in 0..run.len {
                        if let Some(at) = cell(run, l, tap) {
                            // Element `j` of the tap's read of the run is at `input + offset
                            // + j`; output `l` takes element `stride * l`.
                            debug_assert_eq!(at, run.input + offset + (stride * l) as isize);
                            mask |= 1 << (stride * l);
                        }
                    }
                    mask
                })
            })
            .collect();
        Some(InPlace {
            kernel,
            input: [h, w],
            stride,
            offsets,
            runs,
            masks,
        })
    }

    /// One channel's output plane: `bias` plus every tap inside the input times its weight.
    fn plane(&self, x: &[f32], y: &mut [f32], weights: &[f32], bias: f32) {
        assert_eq!(x.len(), self.input[0] * self.input[1]);
        assert_eq!(weights.len(), self.offsets.len());
        assert_eq!(self.masks.len(), self.offsets.len() * self.runs.len());
        assert!(self
            .runs
            .last()
            .is_some_and(|r| r.output + r.len == y.len()));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `of` took the kernel from `Kernel::best` (or a test from `Kernel::here`):
        // the CPU runs it, and stride 2 only with AVX-512. The masks let through only cells
        // inside `x` (`of`), and the runs' outputs lie inside `y`, whose lengths are
        // asserted above.
        unsafe {
            match (self.kernel, self.stride) {
                (Kernel::Avx512, 1) => avx512::plane::<false>(self, x, y, weights, bias),
                (Kernel::Avx512, _) => avx512::plane::<true>(self, x, y, weights, bias),
                (Kernel::Avx2, _) => avx2::plane(self, x, y, weights, bias),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (x, y, bias);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::InPlace;

    /// Runs whose sums go through the taps together: independent multiply-add chains, so
    /// that one's latency hides behind the others'.
    const GROUP: usize = 4;

    /// [`InPlace::plane`] in zmm registers; `STRIDE2`: each tap's 16 outputs are the even
    /// lanes of two loads.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as `InPlace::plane` asserts, with the runs and masks `of` built.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane<const STRIDE2: bool>(
        op: &InPlace,
        x: &[f32],
        y: &mut [f32],
        weights: &[f32],
        bias: f32,
    ) {
        let runs = op.runs.len();
        let mut first = 0;
        while first + GROUP <= runs {
            unsafe { group::<GROUP, STRIDE2>(op, x, y, weights, bias, first) };
            first += GROUP;
        }
        for first in first..runs {
            unsafe { group::<1, STRIDE2>(op, x, y, weights, bias, first) };
        }
    }

    /// `G` runs from `first`. Raw pointers, so that the loop over the taps keeps its bases in
    /// registers with no bounds check (`perf`: the indexed form spilled them).
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const G: usize, const STRIDE2: bool>(
        op: &InPlace,
        x: &[f32],
        y: &mut [f32],
        weights: &[f32],
        bias: f32,
        first: usize,
    ) {
        let runs = &op.runs[first..][..G];
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let mut acc = [_mm512_set1_ps(bias); G];
        let mut from = [x.as_ptr(); G];
        for u in 0..G {
            from[u] = x.as_ptr().wrapping_offset(runs[u].input);
        }
        for (t, (&w, &offset)) in weights.iter().zip(&op.offsets).enumerate() {
            let w = _mm512_set1_ps(w);
            // SAFETY: `plane` asserted `masks` has `taps * runs` elements, and `first + G <=
            // runs`.
            let masks = unsafe { op.masks.as_ptr().add(t * op.runs.len() + first) };
            for u in 0..G {
                let at = from[u].wrapping_offset(offset);
                let mask = unsafe { *masks.add(u) };
                // SAFETY: lanes off the mask are neither read nor able to fault, wherever they
                // point; those on it are inside `x` (`InPlace::of`).
                let v = unsafe {
                    let low = _mm512_maskz_loadu_ps(mask as u16, at);
                    if STRIDE2 {
                        let high = _mm512_maskz_loadu_ps((mask >> 16) as u16, at.wrapping_add(16));
                        _mm512_permutex2var_ps(low, evens, high)
                    } else {
                        low
                    }
                };
                acc[u] = _mm512_fmadd_ps(w, v, acc[u]);
            }
        }
        for u in 0..G {
            let mask = ((1u32 << runs[u].len) - 1) as u16;
            unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(runs[u].output), mask, acc[u]) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{InPlace, LANES};

    /// Lanes of a ymm register: half a run.
    const HALF: usize = LANES / 2;
    /// Half-runs whose sums go through the taps together.
    const GROUP: usize = 4;

    /// [`InPlace::plane`] at stride 1 in ymm registers, half a run at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as `InPlace::plane` asserts, with the runs and masks `of`
    /// built at stride 1.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn plane(op: &InPlace, x: &[f32], y: &mut [f32], weights: &[f32], bias: f32) {
        // Stride 1: runs are whole 16-output stretches of the plane but the last.
        let halves = y.len().div_ceil(HALF);
        let mut first = 0;
        while first + GROUP <= halves {
            unsafe { group::<GROUP>(op, x, y, weights, bias, first) };
            first += GROUP;
        }
        for first in first..halves {
            unsafe { group::<1>(op, x, y, weights, bias, first) };
        }
    }

    /// Lane `l` of the result all ones where bit `l` of `bits` is set: a mask for
    /// `vmaskmovps`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn lanes(bits: u32) -> __m256i {
        let select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let bits = _mm256_set1_epi32((bits & 0xff) as i32);
        _mm256_cmpeq_epi32(_mm256_and_si256(bits, select), select)
    }

    /// `G` half-runs from `first`, as the AVX-512 kernel's group.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group<const G: usize>(
        op: &InPlace,
        x: &[f32],
        y: &mut [f32],
        weights: &[f32],
        bias: f32,
        first: usize,
    ) {
        let runs = op.runs.len();
        let mut acc = [_mm256_set1_ps(bias); G];
        let from = x
            .as_ptr()
            .wrapping_offset(op.runs[0].input)
            .wrapping_add(first * HALF);
        for (t, (&w, &offset)) in weights.iter().zip(&op.offsets).enumerate() {
            let w = _mm256_set1_ps(w);
            let masks = &op.masks[t * runs..][..runs];
            let at = from.wrapping_offset(offset);
            for u in 0..G {
                let half = first + u;
                let bits = masks[half / 2] >> (half % 2 * HALF);
                // SAFETY: lanes off the mask are neither read nor able to fault, wherever they
                // point; those on it are inside `x` (`InPlace::of`).
                let v = unsafe { _mm256_maskload_ps(at.wrapping_add(u * HALF), lanes(bits)) };
                acc[u] = _mm256_fmadd_ps(w, v, acc[u]);
            }
        }
        for u in 0..G {
            let start = (first + u) * HALF;
            let left = (y.len() - start).min(HALF);
            let mask = lanes((1u32 << left) - 1);
            unsafe { _mm256_maskstore_ps(y.as_mut_ptr().add(start), mask, acc[u]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tap inside the input, summed in f64 over the plain NCHW indices.
    fn reference(
        g: &Window2d,
        x: &[f32],
        [h, w]: [usize; 2],
        weights: &[f32],
        bias: f32,
    ) -> Vec<f32> {
        let [oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let mut y = Vec::new();
        for oy in 0..oh {
            for ox in 0..ow {
                let mut sum = f64::from(bias);
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (g.stride[0] * oy + ky) as isize - g.pad_before[0] as isize;
                        let ix = (g.stride[1] * ox + kx) as isize - g.pad_before[1] as isize;
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            let v = x[iy as usize * w + ix as usize];
                            sum += f64::from(weights[ky * kw + kx]) * f64::from(v);
                        }
                    }
                }
                y.push(sum as f32);
            }
        }
        y
    }

    #[test]
    fn planes_read_in_place_match_the_windows_sums_on_every_kernel() {
        // Stride 1: widths of 1, under a run, a run and not, planes of one run and of many;
        // windows padded evenly, unevenly and on one side, taller than the input, and 1x1.
        // Stride 2: ShuffleNet's three, odd sizes, 5x5, padding on one side, rows of more
        // than one run, a 1x1 input, an even window.
        let cases: &[(usize, [usize; 2], [usize; 2], [usize; 4])] = &[
            (1, [3, 3], [28, 28], [1, 1, 1, 1]),
            (1, [3, 3], [7, 7], [1, 1, 1, 1]),
            (1, [3, 3], [14, 14], [1, 1, 1, 1]),
            (1, [3, 3], [1, 1], [1, 1, 1, 1]),
            (1, [3, 3], [5, 1], [1, 1, 1, 1]),
            (1, [5, 3], [9, 13], [2, 0, 1, 2]),
            (1, [5, 5], [4, 17], [2, 2, 2, 2]),
            (1, [7, 7], [3, 3], [3, 3, 3, 3]),
            (1, [1, 1], [6, 19], [0, 0, 0, 0]),
            (1, [3, 1], [16, 16], [0, 0, 2, 0]),
            (2, [3, 3], [56, 56], [1, 1, 1, 1]),
            (2, [3, 3], [28, 28], [1, 1, 1, 1]),
            (2, [3, 3], [14, 14], [1, 1, 1, 1]),
            (2, [3, 3], [15, 9], [1, 1, 1, 1]),
            (2, [5, 5], [37, 20], [2, 2, 2, 2]),
            (2, [3, 3], [8, 71], [0, 0, 1, 1]),
            (2, [3, 3], [1, 1], [1, 1, 1, 1]),
            (2, [2, 2], [6, 6], [0, 0, 0, 0]),
        ];
        for &(stride, [kh, kw], [h, w], [top, left, bottom, right]) in cases {
            let oh = (h + top + bottom - kh) / stride + 1;
            let ow = (w + left + right - kw) / stride + 1;
            assert!(
                stride == 2 || ow == w,
                "a stride-1 case whose rows keep their width"
            );
            let g = Window2d {
                kernel: [kh, kw],
                stride: [stride; 2],
                pad_before: [top, left],
                output: [oh, ow],
            };
            let x: Vec<f32> = (0..h * w)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 8.0)
                .collect();
            let weights: Vec<f32> = (0..kh * kw)
                .map(|i| ((i * 5 % 7) as f32 - 3.0) / 4.0)
                .collect();
            let expected = reference(&g, &x, [h, w], &weights, 0.5);
            for kernel in Kernel::here() {
                let Some(op) = InPlace::of(kernel, &g, [h, w]) else {
                    assert!(stride == 2 && kernel == Kernel::Avx2);
                    continue;
                };
                // Slack around the output: a lane stored past its end would show.
                let mut y = vec![f32::NAN; oh * ow + 40];
                op.plane(&x, &mut y[..oh * ow], &weights, 0.5);
                let case = format!("{kernel:?} {kh}x{kw}/{stride} on {h}x{w}");
                for (i, (got, want)) in y.iter().zip(&expected).enumerate() {
                    let close = (got - want).abs() <= 1e-5 * want.abs().max(1.0);
                    assert!(close, "{case}: output {i} is {got}, not {want}");
                }
                assert!(
                    y[oh * ow..].iter().all(|v| v.is_nan()),
                    "{case}: wrote past"
                );
            }
        }
    }

    #[test]
    fn only_windows_of_one_offset_per_tap_or_stride_2_are_read_in_place() {
        let g = |stride, output| Window2d {
            kernel: [3, 3],
            stride,
            pad_before: [1, 1],
            output,
        };
        let in_place = |kernel, g: &Window2d| InPlace::of(kernel, g, [8, 8]).is_some();
        for kernel in Kernel::ALL {
            assert!(in_place(kernel, &g([1, 1], [8, 8])));
            assert!(
                in_place(kernel, &g([1, 1], [7, 8])),
                "rows dropped: one offset per tap"
            );
            assert!(
                !in_place(kernel, &g([1, 1], [8, 6])),
                "narrower rows: no single offset"
            );
            assert!(!in_place(kernel, &g([1, 2], [8, 4])));
            assert!(!in_place(kernel, &g([3, 3], [3, 3])));
        }
        assert!(in_place(Kernel::Avx512, &g([2, 2], [4, 4])));
        assert!(
            !in_place(Kernel::Avx2, &g([2, 2], [4, 4])),
            "stride 2 on AVX-512 only"
        );
    }
}
