//! 2-D max and average pooling over whole rows.
//!
//! tract's `OptMaxPool` and `OptSumPool` walk each output element's window through a generic
//! patch iterator. Here each output row is the element-wise max (or sum) of its window's input
//! rows (contiguous vector work), then a short horizontal pass per output column: SqueezeNet's
//! three 3x3/2 max pools drop from a sixth of its time to a few percent. Windows are clamped to
//! the input, which is what max pooling's padding means (padded cells never win) and what an
//! average that does not count padding divides by: the window's cells inside the input, rows
//! times columns. Where the window allows (stride 2 with AVX-512, "same" stride 1 with AVX2
//! too: [`InPlace`]), the windows are read from the input plane in place instead, 16
//! outputs at a time, padded lanes masked off.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{MaxPool, SumPool};

use super::gemm::Kernel;
use super::geometry::Window2d;
use super::in_place::InPlace;
use super::kernels::{self, inline};
use crate::inference::warm;

/// What a window's cells become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Max,
    /// Their sum, divided by how many of them lie inside the input when `average`.
    Sum {
        average: bool,
    },
}

impl Reduce {
    /// What a padded cell holds: it never changes the result.
    fn padding(self) -> f32 {
        match self {
            Reduce::Max => f32::NEG_INFINITY,
            Reduce::Sum { .. } => 0.0,
        }
    }

    /// `out` = the element-wise max (or sum) of `inputs`, each at least as long as `out`:
    /// two or three at a time in one pass, the rest folded in after.
    #[inline(always)]
    fn combine(self, out: &mut [f32], inputs: &[&[f32]]) {
        if inputs.is_empty() {
            return out.fill(self.padding());
        }
        match self {
            Reduce::Max => combine(out, inputs, inline::max),
            Reduce::Sum { .. } => combine(out, inputs, |a, b| a + b),
        }
    }

    /// Output columns from a padded row: windows of 2 or 3 (`three`) columns at stride 2.
    #[inline(always)]
    fn stride2_window(self, out: &mut [f32], row: &[f32], three: bool) {
        match self {
            Reduce::Max => inline::stride2_window(out, row, three, inline::max),
            Reduce::Sum { .. } => inline::stride2_window(out, row, three, |a, b| a + b),
        }
    }
}

/// [`Reduce::combine`] for one combining function (a function item or closure, so that each
/// is compiled into its loops, not called through a pointer).
#[inline(always)]
fn combine(out: &mut [f32], inputs: &[&[f32]], f: impl Fn(f32, f32) -> f32 + Copy) {
    let first = inputs.len().min(3);
    match inputs[..first] {
        [] => {}
        [a] => out.copy_from_slice(&a[..out.len()]),
        [a, b] => inline::combine2(out, a, b, f),
        [a, b, c] => inline::combine3(out, [a, b, c], f),
        _ => unreachable!("at most three inputs first"),
    }
    for x in &inputs[first..] {
        inline::assign(out, x, f);
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct RowPool {
    pub geometry: Window2d,
    pub reduce: Reduce,
    /// The plane read in place, where the window allows it and the CPU has a kernel for it.
    in_place: Option<InPlace>,
    /// With `in_place`, for an average: per output of a plane, 1 / its window's cells inside
    /// the input.
    scale: Vec<f32>,
}

impl Eq for RowPool {}

impl Op for RowPool {
    fn name(&self) -> StaticName {
        match self.reduce {
            Reduce::Max => "RowMaxPool".into(),
            Reduce::Sum { .. } => "RowAvgPool".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let sum = matches!(self.reduce, Reduce::Sum { average: false });
        Ok(vec![format!(
            "{}{}{}",
            self.geometry.info(),
            if sum { ", sum" } else { "" },
            if self.in_place.is_some() {
                ", read in place"
            } else {
                ""
            }
        )])
    }

    op_as_typed_op!();
}

impl RowPool {
    /// Length of a padded input row that covers every output column's window.
    fn padded_width(&self, w: usize) -> usize {
        let Window2d {
            kernel,
            stride,
            pad_before,
            output: [_, ow],
        } = &self.geometry;
        (stride[1] * ow.saturating_sub(1) + kernel[1]).max(pad_before[1] + w)
    }

    /// Whether a row's window columns are read straight from it (2 or 3 at stride 2) rather
    /// than from its stride phases.
    fn columns_from_row(&self) -> bool {
        self.geometry.stride[1] == 2 && matches!(self.geometry.kernel[1], 2 | 3)
    }

    /// One channel plane, row by row: the window's input rows combined into one padded row,
    /// then its window columns: 2 or 3 at stride 2 read straight from the row; otherwise the
    /// row split into `stride` phases (`phase[p][i] = row[stride * i + p]`), so that window
    /// column `j` of every output column is `phase[j % stride][column + j / stride]`, and
    /// those combined. Inlined into [`pool_plane`], one function per plane compiled for the
    /// CPU's vector width, so that every loop of a row inlines into it.
    #[inline(always)]
    fn plane(&self, x: &[f32], y: &mut [f32], [h, w]: [usize; 2], scratch: &mut Scratch) {
        let geometry = &self.geometry;
        let reduce = self.reduce;
        let [oh, ow] = geometry.output;
        let (pad, stride) = (geometry.pad_before[1], geometry.stride[1]);
        let kw = geometry.kernel[1];
        for oy in 0..oh {
            let rows = geometry.window(0, oy, h);
            let out = &mut y[oy * ow..][..ow];
            if rows.is_empty() {
                out.fill(reduce.padding());
                continue;
            }
            let row = |iy: usize| &x[iy * w..][..w];
            let combined = &mut scratch.row[pad..][..w];
            if rows.len() <= 3 {
                // The usual window, on the stack: collecting a `TVec` per output row was a
                // call and a store-forwarding stall (`perf`).
                let mut few = [&x[..0]; 3];
                for (input, iy) in few.iter_mut().zip(rows.clone()) {
                    *input = row(iy);
                }
                reduce.combine(combined, &few[..rows.len()]);
            } else {
                let inputs: TVec<&[f32]> = rows.clone().map(row).collect();
                reduce.combine(combined, &inputs);
            }
            if self.columns_from_row() {
                reduce.stride2_window(out, &scratch.row, kw == 3);
            } else {
                scratch.split_phases();
                let phases = &scratch.phases;
                let taps: TVec<&[f32]> = (0..kw)
                    .map(|j| &phases[j % stride][j / stride..][..ow])
                    .collect();
                reduce.combine(out, &taps);
            }
            if reduce == (Reduce::Sum { average: true }) {
                let rows = 1.0 / rows.len() as f32;
                for (o, columns) in out.iter_mut().zip(&scratch.column_divisors) {
                    *o *= rows * columns;
                }
            }
        }
    }
}

kernels::dispatch!(pool_plane(op: &RowPool, x: &[f32], y: &mut [f32], hw: [usize; 2], scratch: &mut Scratch) {
    op.plane(x, y, hw, scratch)
});

/// Buffers reused across the rows of one evaluation.
struct Scratch {
    /// One input row with the padding value (`-inf` or 0) in its padding.
    row: Vec<f32>,
    /// The row's stride phases, when its columns are not read from it directly.
    phases: Vec<Vec<f32>>,
    /// For averages: 1 / (the count of the window's columns inside the input), per output
    /// column.
    column_divisors: Vec<f32>,
}

impl Scratch {
    fn new(op: &RowPool, w: usize) -> Scratch {
        let [_, phase_len] = op.geometry.phase_dims();
        let stride = op.geometry.stride[1];
        let fill = op.reduce.padding();
        Scratch {
            // Long enough for every phase element: the phase split needs no bounds checks.
            row: vec![fill; op.padded_width(w).max(stride * phase_len)],
            phases: match op.columns_from_row() {
                true => Vec::new(),
                false => vec![vec![fill; phase_len]; stride],
            },
            column_divisors: match op.reduce {
                Reduce::Sum { average: true } => (0..op.geometry.output[1])
                    .map(|ox| 1.0 / op.geometry.window(1, ox, w).len() as f32)
                    .collect(),
                _ => Vec::new(),
            },
        }
    }

    /// `phases[p][i] = row[stride * i + p]`, a strided copy per phase (as a convolution's
    /// phase split): branch-free, a vectorised de-interleave for stride 2, where a
    /// bounds-checked scalar gather was most of a pool's time. The row is in L1.
    #[inline(always)]
    fn split_phases(&mut self) {
        let stride = self.phases.len();
        for (b, phase) in self.phases.iter_mut().enumerate() {
            inline::strided_copy(phase, &self.row[b..], stride);
        }
    }
}

impl EvalOp for RowPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(shape.len() == 4);
        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let [oh, ow] = self.geometry.output;
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let mut output = kernels::output_f32(&[n, c, oh, ow])?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        if oh * ow > 0 && h * w > 0 {
            let [kh, kw] = self.geometry.kernel;
            let work_size = y.len() * kh * kw;
            if let Some(in_place) = &self.in_place {
                ensure!([h, w] == in_place.input());
                warm::for_parts(y, oh * ow, work_size, &|planes, y| {
                    for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                        let x = &x[ix * h * w..][..h * w];
                        match self.reduce {
                            Reduce::Max => in_place.max(x, y),
                            Reduce::Sum { .. } => in_place.sum(x, y, &self.scale),
                        }
                    }
                });
                return Ok(tvec!(output.into_tvalue()));
            }
            // Planes shared out over the inference's crew, each part with its own buffers.
            warm::for_parts(y, oh * ow, work_size, &|planes, y| {
                let mut scratch = Scratch::new(self, w);
                for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                    pool_plane(self, &x[ix * h * w..][..h * w], y, [h, w], &mut scratch);
                }
            });
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowPool {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.geometry.output_fact(inputs[0])))
    }
}

/// Replaces every f32 2-D NCHW `MaxPool` (no dilation, no index output) of concrete shape,
/// and every such strided `SumPool` (ONNX `AveragePool`) that does not count padding and has
/// an input cell in every window, with a `RowPool`; returns how many, `[max, average]`.
pub fn translate(model: &mut TypedModel) -> TractResult<[usize; 2]> {
    let mut replaced = [0, 0];
    for id in model.eval_order()? {
        let node = model.node(id);
        let (spec, reduce) = if let Some(pool) = node.op_as::<MaxPool>() {
            if pool.with_index_outputs.is_some() {
                continue;
            }
            (&pool.pool_spec, Reduce::Max)
        } else if let Some(pool) = node.op_as::<SumPool>() {
            // With stride 1 (global pooling, mostly), tract's separable box sums are faster.
            if pool.count_include_pad || pool.pool_spec.strides().iter().all(|s| *s == 1) {
                continue;
            }
            let average = pool.normalize;
            (&pool.pool_spec, Reduce::Sum { average })
        } else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if fact.datum_type != f32::datum_type()
            // Window2d::of also takes CHW; our eval is NCHW only.
            || shape.len() != 4
        {
            continue;
        }
        let Some(geometry) = Window2d::of(spec, shape, &node.outputs[0].fact) else {
            continue;
        };
        // A window wholly in the padding has no cell to divide by: left to tract.
        let [h, w] = [shape[2], shape[3]];
        let empty = (0..geometry.output[0]).any(|oy| geometry.window(0, oy, h).is_empty())
            || (0..geometry.output[1]).any(|ox| geometry.window(1, ox, w).is_empty());
        if empty && reduce != Reduce::Max {
            continue;
        }
        let in_place = Kernel::best().and_then(|k| InPlace::of(k, &geometry, [h, w]));
        let scale = match (&in_place, reduce) {
            (Some(in_place), Reduce::Sum { average: true }) => {
                in_place.cells().iter().map(|&c| 1.0 / c as f32).collect()
            }
            _ => Vec::new(),
        };
        let op = RowPool {
            geometry,
            reduce,
            in_place,
            scale,
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced[usize::from(reduce != Reduce::Max)] += 1;
    }
    Ok(replaced)
}
