//! 2-D max pooling over whole rows.
//!
//! tract's `OptMaxPool` walks each output element's window through a generic patch iterator.
//! Here each output row is the element-wise max of its window's input rows (contiguous vector
//! work), then a short horizontal max per output column: SqueezeNet's three 3x3/2 pools drop
//! from a sixth of its time to a few percent. Windows are clamped to the input, which is what
//! max pooling's padding means (padded cells never win).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::MaxPool;

use super::geometry::Window2d;
use super::kernels;
use crate::inference::warm;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowMaxPool(pub Window2d);

impl Op for RowMaxPool {
    fn name(&self) -> StaticName {
        "RowMaxPool".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.0.info()])
    }

    op_as_typed_op!();
}

impl RowMaxPool {
    /// Length of a padded input row that covers every output column's window.
    fn padded_width(&self, w: usize) -> usize {
        let Window2d {
            kernel,
            stride,
            pad_before,
            output: [_, ow],
        } = &self.0;
        (stride[1] * ow.saturating_sub(1) + kernel[1]).max(pad_before[1] + w)
    }

    /// One channel plane. The horizontal max is done as `kernel` contiguous passes: with the
    /// padded row split into `stride` phases (`phase[p][i] = row[stride * i + p]`), window
    /// element `j` of every output column is `phase[j % stride][column + j / stride]`.
    fn plane(&self, x: &[f32], y: &mut [f32], [h, w]: [usize; 2], scratch: &mut Scratch) {
        let geometry = &self.0;
        let [oh, ow] = geometry.output;
        let (pad, stride) = (geometry.pad_before[1], geometry.stride[1]);
        for oy in 0..oh {
            let rows = geometry.window(0, oy, h);
            let out = &mut y[oy * ow..][..ow];
            out.fill(f32::NEG_INFINITY);
            if rows.is_empty() {
                continue;
            }
            let row = &mut scratch.row[pad..][..w];
            row.copy_from_slice(&x[rows.start * w..][..w]);
            for iy in rows.start + 1..rows.end {
                kernels::max_assign(row, &x[iy * w..][..w]);
            }
            scratch.split_phases();
            for j in 0..geometry.kernel[1] {
                kernels::max_assign(out, &scratch.phases[j % stride][j / stride..][..ow]);
            }
        }
    }
}

/// Buffers reused across the rows of one evaluation.
struct Scratch {
    /// One input row with `-inf` in its padding.
    row: Vec<f32>,
    phases: Vec<Vec<f32>>,
}

impl Scratch {
    fn new(op: &RowMaxPool, w: usize) -> Scratch {
        let [_, phase_len] = op.0.phase_dims();
        let stride = op.0.stride[1];
        Scratch {
            // Long enough for every phase element: the phase split needs no bounds checks.
            row: vec![f32::NEG_INFINITY; op.padded_width(w).max(stride * phase_len)],
            phases: vec![vec![f32::NEG_INFINITY; phase_len]; stride],
        }
    }

    /// `phases[p][i] = row[stride * i + p]`: branch-free loops the compiler vectorises
    /// (de-interleaving loads for stride 2, by far the commonest), where a bounds-checked
    /// scalar gather was most of a pool's time.
    fn split_phases(&mut self) {
        let stride = self.phases.len();
        let phase_len = self.phases[0].len();
        let row = &self.row[..stride * phase_len];
        match &mut self.phases[..] {
            [phase] => phase.copy_from_slice(row),
            [even, odd] => {
                for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(row.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
            }
            phases => {
                for (i, chunk) in row.chunks_exact(stride).enumerate() {
                    for (phase, v) in phases.iter_mut().zip(chunk) {
                        phase[i] = *v;
                    }
                }
            }
        }
    }
}

impl EvalOp for RowMaxPool {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        ensure!(shape.len() == 4);
        let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
        let [oh, ow] = self.0.output;
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let mut output = kernels::output_f32(&[n, c, oh, ow])?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        if oh * ow > 0 && h * w > 0 {
            let [kh, kw] = self.0.kernel;
            let work_size = y.len() * kh * kw;
            // Planes shared out over the inference's crew, each part with its own buffers.
            warm::for_parts(y, oh * ow, work_size, &|planes, y| {
                let mut scratch = Scratch::new(self, w);
                for (ix, y) in planes.zip(y.chunks_exact_mut(oh * ow)) {
                    self.plane(&x[ix * h * w..][..h * w], y, [h, w], &mut scratch);
                }
            });
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowMaxPool {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.0.output_fact(inputs[0])))
    }
}

/// Replaces every f32 2-D NCHW `MaxPool` (no dilation, no index output) of concrete shape;
/// returns how many.
pub fn translate(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(pool) = node.op_as::<MaxPool>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if pool.with_index_outputs.is_some()
            || fact.datum_type != f32::datum_type()
            // Window2d::of also takes CHW; our eval is NCHW only.
            || shape.len() != 4
        {
            continue;
        }
        let Some(geometry) = Window2d::of(&pool.pool_spec, shape, &node.outputs[0].fact) else {
            continue;
        };
        let op = RowMaxPool(geometry);
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
