//! Per-channel multiply / add chains folded into the grouped convolution before them.
//!
//! tract folds a batch norm into a convolution's kernel and bias only when the convolution has
//! one group. Depthwise and grouped convolutions (ShuffleNet, MobileNet) keep theirs as a
//! broadcast `Mul` and `Add` after every convolution. Scaling output channel `o` of the kernel
//! by `a_o` and setting its bias to `a_o * bias_o + b_o` computes the same thing for free.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::Conv;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::affine::{compose, steps_after};
use super::conv_constants;

/// Folds every such chain; returns how many.
pub fn into_grouped_convs(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        if conv.group == 1
            || conv.q_params.is_some()
            || conv.pool_spec.data_format != DataFormat::NCHW
        {
            continue;
        }
        let channels = conv.output_channels();
        let Some((kernel, bias)) = conv_constants(model, node, channels) else {
            continue;
        };
        // The multiplies and adds after it; a ReLU stays (it follows the folded convolution).
        let chain = steps_after(model, OutletId::new(node.id, 0), false, 1);
        if chain.nodes.is_empty() {
            continue;
        }
        let affine = compose(&chain.steps);
        if affine.scale.len() != channels {
            continue;
        }
        let o_axis = conv.kernel_fmt.o_axis(kernel.shape());
        let inner: usize = kernel.shape()[o_axis + 1..].iter().product();
        let mut new_kernel = (*kernel).clone();
        let mut new_bias = bias;
        affine.fold_into(
            new_kernel.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?,
            inner,
            &mut new_bias,
        );
        let last = *chain.nodes.last().expect("the chain is not empty");
        let mut patch = TypedModelPatch::new(format!(
            "fold {} steps into {}",
            chain.nodes.len(),
            node.name
        ));
        let input = patch.tap_model(model, node.inputs[0])?;
        let k = patch.add_const(format!("{}.folded_kernel", node.name), new_kernel)?;
        let b = patch.add_const(format!("{}.folded_bias", node.name), tensor1(&new_bias))?;
        let out = patch.wire_node(
            format!("{}.folded", node.name),
            conv.clone(),
            &[input, k, b],
        )?[0];
        patch.shunt_outside(model, OutletId::new(last, 0), out)?;
        patch.apply(model)?;
        folded += 1;
    }
    Ok(folded)
}
