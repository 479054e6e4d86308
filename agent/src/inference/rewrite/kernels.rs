//! The loops behind our own ops. Each is written once, in plain Rust over slices, and compiled
//! twice on x86-64: for the baseline (SSE2) and, picked at run time, for AVX2 + FMA, the way
//! tract-linalg picks its kernels. On aarch64 NEON is the baseline, so one copy suffices.

use tract_onnx::prelude::*;

/// An f32 tensor of `shape` whose elements the caller writes, every one, before reading any:
/// an output buffer without the memset of `Tensor::zero` (these ops are memory-bound).
pub fn output_f32(shape: &[usize]) -> TractResult<Tensor> {
    // SAFETY: every bit pattern is a valid f32, so the tensor is sound to read even before it
    // is written; the callers write every element.
    unsafe { Tensor::uninitialized::<f32>(shape) }
}

/// Runs `$body` compiled for the best instruction set this CPU has.
macro_rules! dispatch {
    ($name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

dispatch!(affine(x: &[f32], y: &mut [f32], scale: f32, shift: f32, relu: bool) {
    if relu {
        for (y, x) in y.iter_mut().zip(x) {
            *y = (x * scale + shift).max(0.0);
        }
    } else {
        for (y, x) in y.iter_mut().zip(x) {
            *y = x * scale + shift;
        }
    }
});

dispatch!(affine_in_place(y: &mut [f32], scale: f32, shift: f32, relu: bool) {
    if relu {
        for y in y.iter_mut() {
            *y = (*y * scale + shift).max(0.0);
        }
    } else {
        for y in y.iter_mut() {
            *y = *y * scale + shift;
        }
    }
});

dispatch!(square(x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = x * x;
    }
});

dispatch!(add_assign(acc: &mut [f32], x: &[f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a += x;
    }
});

// `y = x / (bias + k * sum)^0.75`, the exponent of every LRN in the model zoo, as
// `t^0.75 = sqrt(t) * sqrt(sqrt(t))`: vector square roots instead of a scalar `powf`.
dispatch!(lrn_three_quarters(x: &[f32], sum: &[f32], y: &mut [f32], bias: f32, k: f32) {
    for ((y, x), s) in y.iter_mut().zip(x).zip(sum) {
        let t = bias + k * s;
        let r = t.sqrt();
        *y = x / (r * r.sqrt());
    }
});

/// `y = x * (bias + k * sum)^-beta` for any `beta`.
pub fn lrn_any(x: &[f32], sum: &[f32], y: &mut [f32], bias: f32, k: f32, beta: f32) {
    for ((y, x), s) in y.iter_mut().zip(x).zip(sum) {
        *y = x * (bias + k * s).powf(-beta);
    }
}

dispatch!(max_assign(acc: &mut [f32], x: &[f32]) {
    for (a, x) in acc.iter_mut().zip(x) {
        *a = a.max(*x);
    }
});

// `out[i] = bias + sum over t of weights[t] * src[offsets[t] + i]`: every tap of a depthwise
// convolution over one run of outputs, 16 sums at a time kept in registers across the taps
// (one pass over the output instead of one per tap).
dispatch!(taps(out: &mut [f32], src: &[f32], offsets: &[usize], weights: &[f32], bias: f32) {
    const L: usize = 16;
    let n = out.len();
    assert!(offsets.len() == weights.len() && offsets.iter().all(|&o| o + n <= src.len()));
    let (whole, tail) = out.split_at_mut(n / L * L);
    for (i, out) in whole.chunks_exact_mut(L).enumerate() {
        let mut acc = [bias; L];
        for (&o, &w) in offsets.iter().zip(weights) {
            let x = &src[o + i * L..][..L];
            for l in 0..L {
                acc[l] += w * x[l];
            }
        }
        out.copy_from_slice(&acc);
    }
    let done = n - tail.len();
    for (i, out) in tail.iter_mut().enumerate() {
        let mut sum = bias;
        for (&o, &w) in offsets.iter().zip(weights) {
            sum += w * src[o + done + i];
        }
        *out = sum;
    }
});

/// `dst[k] = src[stride * k]`: the stride-phase split of convolutions and pooling. Stride 2,
/// the common one, is a de-interleave the compiler vectorises; no bounds check in any loop.
pub fn strided_copy(dst: &mut [f32], src: &[f32], stride: usize) {
    let n = dst.len();
    if n == 0 {
        return;
    }
    assert!(stride >= 1 && src.len() > stride * (n - 1));
    match stride {
        1 => dst.copy_from_slice(&src[..n]),
        2 => deinterleave(dst, src),
        _ => {
            for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                *d = *s;
            }
        }
    }
}

// `dst[k] = src[2 * k]`, `src` at least `2 * dst.len() - 1` long.
dispatch!(deinterleave(dst: &mut [f32], src: &[f32]) {
    let whole = dst.len().min(src.len() / 2);
    let (head, tail) = dst.split_at_mut(whole);
    for (d, pair) in head.iter_mut().zip(src.chunks_exact(2)) {
        *d = pair[0];
    }
    if let Some(last) = tail.first_mut() {
        *last = src[2 * whole];
    }
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_copy_takes_every_stride_th_element_up_to_the_last_one_src_holds() {
        let src: Vec<f32> = (0..23).map(|v| v as f32).collect();
        for stride in 1..=4 {
            // Every length `src` can serve, so that the last element read is at or near its end.
            for n in 0..=(src.len() - 1) / stride + 1 {
                let mut dst = vec![-1f32; n];
                strided_copy(&mut dst, &src, stride);
                let expected: Vec<f32> = (0..n).map(|k| (stride * k) as f32).collect();
                assert_eq!(dst, expected, "stride {stride}, {n} elements");
            }
        }
        // A source one element short of the last read is refused, not read past.
        let short = std::panic::catch_unwind(|| strided_copy(&mut [0f32; 3], &[0f32; 4], 2));
        assert!(short.is_err());
    }

    #[test]
    fn taps_sum_every_tap_over_whole_vectors_and_the_tail() {
        // Integers, so the sums are exact whatever the order of the additions.
        let src: Vec<f32> = (0..80).map(|v| (v % 7) as f32 - 3.0).collect();
        let offsets = [0, 1, 2, 9, 10, 11, 18, 19, 20];
        let weights = [1.0, -2.0, 3.0, 0.5, -1.0, 2.0, -0.5, 1.0, 4.0];
        // Shorter than a vector, exactly two, and two and a tail, up to the last element.
        for n in [0, 5, 32, 39, 60] {
            let mut out = vec![f32::NAN; n];
            taps(&mut out, &src, &offsets, &weights, 0.25);
            let expected: Vec<f32> = (0..n)
                .map(|i| {
                    let taps: f32 = offsets
                        .iter()
                        .zip(weights)
                        .map(|(o, w)| w * src[o + i])
                        .sum();
                    0.25 + taps
                })
                .collect();
            assert_eq!(out, expected, "{n} outputs");
        }
        // A run that would read past the source is refused.
        let past =
            std::panic::catch_unwind(|| taps(&mut [0f32; 61], &src, &offsets, &weights, 0.0));
        assert!(past.is_err());
    }
}
