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

dispatch!(axpy(y: &mut [f32], x: &[f32], a: f32) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
});
