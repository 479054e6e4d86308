//! What our 2-D ops over NCHW planes share: the window geometry, read off tract's `PoolSpec` for
//! a concrete input shape, and the output fact it gives.

use std::ops::Range;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::cnn::PoolSpec;
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::kernels;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window2d {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad_before: [usize; 2],
    /// Output height and width.
    pub output: [usize; 2],
}

impl Window2d {
    /// The geometry of `spec` on an input of concrete shape, NCHW or (batch axis removed, as
    /// tract's declutter does for batch 1) CHW, when it is 2-D without dilation and gives the
    /// output tract computed for the node (`produced`, channels as the input's).
    pub fn of(spec: &PoolSpec, input: &[usize], produced: &TypedFact) -> Option<Window2d> {
        if !matches!(
            (spec.data_format, input.len()),
            (DataFormat::NCHW, 4) | (DataFormat::CHW, 3)
        ) || spec.kernel_shape.len() != 2
            || spec.kernel_shape.contains(&0)
            || spec.strides().contains(&0)
            || spec.dilations().iter().any(|d| *d != 1)
        {
            return None;
        }
        let spatial = &input[input.len() - 2..];
        let padding = spec.computed_padding(spatial);
        let strides = spec.strides();
        let window = Window2d {
            kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
            stride: [strides[0], strides[1]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            output: [padding[0].convoluted, padding[1].convoluted],
        };
        let mut expected = input.to_vec();
        expected[input.len() - 2..].copy_from_slice(&window.output);
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

    /// Elements of one phase plane: its rows plus a spare one, so that a tap's run over all
    /// output rows may read past the last column.
    pub fn phase_len(&self) -> usize {
        let [rows, cols] = self.phase_dims();
        (rows + 1) * cols
    }

    /// The zero-padded input plane split into `stride_y * stride_x` phase planes, row-major
    /// with `cols` columns: `phase[a][b][i][j] = x[stride_y * i + a - pad_y][stride_x * j + b -
    /// pad_x]`. Each phase has one spare row, so a tap's run may read past its last column.
    pub fn split(&self, x: &[f32], hw: [usize; 2], phases: &mut [f32]) {
        self.split_rows(x, hw, phases, true)
    }

    /// [`split`](Window2d::split) into phase planes whose padding cells hold zero already (a
    /// buffer zeroed once and written only by this, for plane after plane of one geometry):
    /// only the input's cells are written, which on small planes halves the calls per row.
    pub fn split_into_zeroed(&self, x: &[f32], hw: [usize; 2], phases: &mut [f32]) {
        self.split_rows(x, hw, phases, false)
    }

    fn split_rows(&self, x: &[f32], [h, w]: [usize; 2], phases: &mut [f32], zero_padding: bool) {
        let [_, cols] = self.phase_dims();
        let [sy, sx] = self.stride;
        let [py, px] = self.pad_before.map(|p| p as isize);
        let size = self.phase_len();
        for a in 0..sy {
            let rows = &mut phases[a * sx * size..][..sx * size];
            for i in 0..size / cols {
                let y = (sy * i + a) as isize - py;
                let input = (0..h as isize)
                    .contains(&y)
                    .then(|| &x[y as usize * w..][..w]);
                if sx == 2 {
                    // Both column phases of the row in one pass over it.
                    let (even, odd) = rows.split_at_mut(size);
                    let even = &mut even[i * cols..][..cols];
                    let odd = &mut odd[i * cols..][..cols];
                    match input {
                        Some(input) => kernels::inline::split_pairs(even, odd, input, px as usize),
                        None if zero_padding => {
                            even.fill(0.0);
                            odd.fill(0.0);
                        }
                        None => {}
                    }
                    continue;
                }
                for b in 0..sx {
                    let row = &mut rows[b * size + i * cols..][..cols];
                    let Some(input) = input else {
                        if zero_padding {
                            row.fill(0.0);
                        }
                        continue;
                    };
                    // Columns j whose input column sx * j + b - px lies in 0..w.
                    let first = (px - b as isize).max(0) as usize;
                    let lo = first.div_ceil(sx).min(cols);
                    let hi = ((w as isize + px - b as isize).max(0) as usize)
                        .div_ceil(sx)
                        .clamp(lo, cols);
                    if zero_padding {
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                    }
                    let offset = (sx * lo + b) as isize - px;
                    kernels::strided_copy(&mut row[lo..hi], &input[offset as usize..], sx);
                }
            }
        }
    }

    /// Where tap `(ky, kx)` of channel `c` reads for the first output in the phase planes
    /// (`split`'s, each channel's `stride_y * stride_x` phases one after another); the output
    /// row `i` reads `i * cols` further on.
    pub fn tap_offset(&self, c: usize, ky: usize, kx: usize) -> usize {
        let [sy, sx] = self.stride;
        let [_, cols] = self.phase_dims();
        let phase = (c * sy + ky % sy) * sx + kx % sx;
        phase * self.phase_len() + (ky / sy) * cols + kx / sx
    }

    /// Whether the window, on an `h x w` plane, only picks every `stride`-th row and column
    /// from the first: 1x1, no padding before, and as many outputs as that gives (none padded
    /// after). Then `subsample` is its whole input.
    pub fn subsamples(&self, [h, w]: [usize; 2]) -> bool {
        self.kernel == [1, 1]
            && self.pad_before == [0, 0]
            && [h, w]
                .iter()
                .zip(self.stride)
                .map(|(len, stride)| len.div_ceil(stride))
                .eq(self.output)
    }

    /// Every `stride`-th row and column of an `h x w` plane, from the first: the input of a
    /// window that `subsamples`, `output` rows and columns.
    pub fn subsample(&self, x: &[f32], [h, w]: [usize; 2], out: &mut [f32]) {
        let [sy, sx] = self.stride;
        let [oh, ow] = self.output;
        assert!(x.len() >= h * w && self.subsamples([h, w]));
        for (i, row) in out.chunks_exact_mut(ow).take(oh).enumerate() {
            kernels::strided_copy(row, &x[i * sy * w..][..w], sx);
        }
    }

    /// `input`'s type with the output's height and width.
    pub fn output_fact(&self, input: &TypedFact) -> TypedFact {
        let mut shape = input.shape.clone();
        let rank = shape.len();
        shape.set(rank - 2, self.output[0].into());
        shape.set(rank - 1, self.output[1].into());
        input.datum_type.fact(shape)
    }

    pub fn info(&self) -> String {
        format!(
            "kernel {:?} stride {:?} pad {:?} -> {:?}",
            self.kernel, self.stride, self.pad_before, self.output
        )
    }
}
