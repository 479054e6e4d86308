//! Local response normalisation (AlexNet, GoogLeNet, ZFNet) over whole channel planes.
//!
//! tract's `Lrn` computes each output element on its own: an n-dimensional index, a loop over
//! the channel window with an index each, and a scalar `powf`. Here the squares are computed
//! once, each channel's window sum is `size` vector additions of whole planes, and the power
//! for the usual `beta = 0.75` is two vector square roots. Same formula, same window
//! (ONNX: channels `c - floor((size - 1) / 2)` to `c + ceil((size - 1) / 2)`).

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx_opl::lrn::Lrn;

use super::kernels;

#[derive(Clone, Debug, PartialEq)]
pub struct PlaneLrn {
    pub alpha: f32,
    pub beta: f32,
    pub bias: f32,
    pub size: usize,
}

impl Eq for PlaneLrn {}

impl PlaneLrn {
    fn window(&self, c: usize, channels: usize) -> std::ops::RangeInclusive<usize> {
        let below = (self.size - 1) / 2;
        let above = (self.size - 1).div_ceil(2);
        c.saturating_sub(below)..=(c + above).min(channels - 1)
    }
}

impl Op for PlaneLrn {
    fn name(&self) -> StaticName {
        "PlaneLrn".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "size {} alpha {} beta {} bias {}",
            self.size, self.alpha, self.beta, self.bias
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneLrn {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape().to_vec();
        ensure!(shape.len() >= 3 && self.size >= 1);
        let (batch, channels) = (shape[0], shape[1]);
        let plane: usize = shape[2..].iter().product();
        let view = input.try_as_plain_ram()?;
        let x = view.as_slice::<f32>()?;
        let mut output = kernels::output_f32(&shape)?;
        let mut out = output.try_as_plain_ram_mut()?;
        let y = out.as_slice_mut::<f32>()?;
        let mut squares = vec![0f32; channels * plane];
        let mut sum = vec![0f32; plane];
        let k = self.alpha / self.size as f32;
        let image = channels * plane;
        for n in 0..batch {
            let x = &x[n * image..][..image];
            let y = &mut y[n * image..][..image];
            kernels::square(x, &mut squares);
            for c in 0..channels {
                let window = self.window(c, channels);
                let first = *window.start();
                sum.copy_from_slice(&squares[first * plane..][..plane]);
                for other in first + 1..=*window.end() {
                    kernels::add_assign(&mut sum, &squares[other * plane..][..plane]);
                }
                let x = &x[c * plane..][..plane];
                let y = &mut y[c * plane..][..plane];
                if self.beta == 0.75 {
                    kernels::lrn_three_quarters(x, &sum, y, self.bias, k);
                } else {
                    kernels::lrn_any(x, &sum, y, self.bias, k, self.beta);
                }
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PlaneLrn {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let count: TDim = inputs[0].shape.iter().product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            count * (self.size as i64 + 2)
        )))
    }
}

/// Replaces every f32 `Lrn` with concrete input dimensions; returns how many.
pub fn translate(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(lrn) = node.op_as::<Lrn>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        if fact.datum_type != f32::datum_type()
            || fact.rank() < 3
            || fact.shape.as_concrete().is_none()
            || lrn.size == 0
        {
            continue;
        }
        let op = PlaneLrn {
            alpha: lrn.alpha,
            beta: lrn.beta,
            bias: lrn.bias,
            size: lrn.size,
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}
