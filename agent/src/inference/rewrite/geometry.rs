//! What our 2-D ops over NCHW planes share: the window geometry, read off tract's `PoolSpec` for
//! a concrete input shape, and the output fact it gives.

use std::ops::Range;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::PoolSpec;
use tract_onnx::tract_core::ops::nn::DataFormat;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad_before: [usize; 2],
    /// Output height and width.
    pub output: [usize; 2],
}

impl Window2d {
    /// The geometry of `spec` on an NCHW `input` of concrete shape, when it is 2-D without
    /// dilation and gives the `[N, C, H, W]` output tract computed for the node (`produced`).
    pub fn of(spec: &PoolSpec, input: &[usize], produced: &TypedFact) -> Option<Window2d> {
        if spec.data_format != DataFormat::NCHW
            || input.len() != 4
            || spec.kernel_shape.len() != 2
            || spec.kernel_shape.contains(&0)
            || spec.strides().contains(&0)
            || spec.dilations().iter().any(|d| *d != 1)
        {
            return None;
        }
        let padding = spec.computed_padding(&input[2..]);
        let strides = spec.strides();
        let window = Window2d {
            kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
            stride: [strides[0], strides[1]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            output: [padding[0].convoluted, padding[1].convoluted],
        };
        let expected = [input[0], input[1], window.output[0], window.output[1]];
        (produced.shape.as_concrete() == Some(&expected[..])).then_some(window)
    }

    /// The input indices of output index `o`'s window on axis `axis` (0: rows, 1: columns) of
    /// length `len`, clamped to the input.
    pub fn window(&self, axis: usize, o: usize, len: usize) -> Range<usize> {
        let start = (o * self.stride[axis]) as isize - self.pad_before[axis] as isize;
        let end = start + self.kernel[axis] as isize;
        (start.max(0) as usize)..(end.min(len as isize).max(0) as usize)
    }

    /// Rows and columns of one stride phase of the padded input (`phase[i][j] =
    /// padded[stride_y * i + a][stride_x * j + b]` for phase `(a, b)`): enough for every tap of
    /// every output, each tap then being one contiguous run per output row.
    pub fn phase_dims(&self) -> [usize; 2] {
        [0, 1].map(|axis| self.output[axis] + (self.kernel[axis] - 1) / self.stride[axis] + 1)
    }

    /// `[N, C, output height, output width]` of `input`'s type.
    pub fn output_fact(&self, input: &TypedFact) -> TypedFact {
        let shape = &input.shape;
        let out: TVec<TDim> = tvec![
            shape[0].clone(),
            shape[1].clone(),
            self.output[0].into(),
            self.output[1].into(),
        ];
        input.datum_type.fact(out)
    }

    pub fn info(&self) -> String {
        format!(
            "kernel {:?} stride {:?} pad {:?}",
            self.kernel, self.stride, self.pad_before
        )
    }
}
