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

/// Runs `$body` compiled for the best instruction set this CPU has. Other modules use it
/// for a whole plane's loops (with [`inline`]'s bodies); its one `unsafe`, the call of the
/// feature-enabled copy after the CPU check, is allowed wherever it expands.
macro_rules! dispatch {
    ($vis:vis $name:ident ( $($arg:ident : $ty:ty),* ) $body:block) => {
        #[allow(unsafe_code)]
        $vis fn $name($($arg: $ty),*) {
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
pub(crate) use dispatch;

dispatch!(pub affine(x: &[f32], y: &mut [f32], scale: f32, shift: f32, relu: bool) {
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

dispatch!(pub affine_in_place(y: &mut [f32], scale: f32, shift: f32, relu: bool) {
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

dispatch!(pub square(x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = x * x;
    }
});

dispatch!(pub add_assign(acc: &mut [f32], x: &[f32]) {
    inline::assign(acc, x, |a, b| a + b)
});

// `y = x / (bias + k * sum)^0.75`, the exponent of every LRN in the model zoo, as
// `t^0.75 = sqrt(t) * sqrt(sqrt(t))`: vector square roots instead of a scalar `powf`.
dispatch!(pub lrn_three_quarters(x: &[f32], sum: &[f32], y: &mut [f32], bias: f32, k: f32) {
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

// `out[i] = bias + sum over t of weights[t] * src[offsets[t] + i]`: every tap of a depthwise
// convolution over one run of outputs, 16 sums at a time kept in registers across the taps
// (one pass over the output instead of one per tap).
dispatch!(pub taps(out: &mut [f32], src: &[f32], offsets: &[usize], weights: &[f32], bias: f32) {
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

// `dst[k] = src[stride * k]`: the stride-phase split of convolutions and pooling.
dispatch!(pub strided_copy(dst: &mut [f32], src: &[f32], stride: usize) {
    inline::strided_copy(dst, src, stride)
});

/// The loops themselves, for a caller that runs a whole plane in one function of its own
/// compiled by [`dispatch!`] (a pool), so that they inline into it and take its instruction
/// set.
pub mod inline {
    /// The larger of `a` and `b` as one `maxps` / `fmax` instruction: `f32::max`'s NaN rule
    /// (the number wins) costs a compare and a blend more per vector on x86. A window with a
    /// NaN may or may not give NaN, as in onnxruntime's pools.
    #[inline(always)]
    pub fn max(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }

    /// `acc[i] = f(acc[i], x[i])`.
    #[inline(always)]
    pub fn assign(acc: &mut [f32], x: &[f32], f: impl Fn(f32, f32) -> f32) {
        for (a, x) in acc.iter_mut().zip(x) {
            *a = f(*a, *x);
        }
    }

    /// `out[i] = f(a[i], b[i])`: a copy and an update in one pass.
    #[inline(always)]
    pub fn combine2(out: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        for ((o, a), b) in out.iter_mut().zip(a).zip(b) {
            *o = f(*a, *b);
        }
    }

    /// `out[i] = f(f(a[i], b[i]), c[i])`.
    #[inline(always)]
    pub fn combine3(out: &mut [f32], [a, b, c]: [&[f32]; 3], f: impl Fn(f32, f32) -> f32) {
        for (((o, a), b), c) in out.iter_mut().zip(a).zip(b).zip(c) {
            *o = f(f(*a, *b), *c);
        }
    }

    /// `out[i] = f(row[2i], row[2i + 1])`, and with `three` also `row[2i + 2]`: a window of 2
    /// or 3 columns at stride 2 straight from the row, with no phase split. Eight outputs at
    /// a time from fixed-size arrays, which the compiler de-interleaves in registers; indexed
    /// loops over the row were scalar and bounds-checked (`perf`: a third of SqueezeNet's
    /// first max pool). `row` holds at least `2 * out.len() + three` elements.
    #[inline(always)]
    pub fn stride2_window(out: &mut [f32], row: &[f32], three: bool, f: impl Fn(f32, f32) -> f32) {
        const STEP: usize = 8;
        let n = out.len();
        let row = &row[..2 * n + usize::from(three)];
        let whole = n / STEP * STEP;
        let (head, tail) = out.split_at_mut(whole);
        let chunks = head.chunks_exact_mut(STEP).enumerate();
        if three {
            // Window `j`'s third column is window `j + 1`'s first: 17 elements per 8 outputs.
            for (i, out) in chunks {
                let x: &[f32; 2 * STEP + 1] =
                    row[2 * STEP * i..][..2 * STEP + 1].try_into().unwrap();
                for (j, o) in out.iter_mut().enumerate() {
                    *o = f(f(x[2 * j], x[2 * j + 1]), x[2 * j + 2]);
                }
            }
        } else {
            for (i, out) in chunks {
                let x: &[f32; 2 * STEP] = row[2 * STEP * i..][..2 * STEP].try_into().unwrap();
                for (j, o) in out.iter_mut().enumerate() {
                    *o = f(x[2 * j], x[2 * j + 1]);
                }
            }
        }
        for (j, o) in tail.iter_mut().enumerate() {
            let at = 2 * (whole + j);
            *o = f(row[at], row[at + 1]);
            if three {
                *o = f(*o, row[at + 2]);
            }
        }
    }

    /// The two column phases of one input row padded with `pad` zeros in front (and as many
    /// as needed after): `even[j] = padded[2j]`, `odd[j] = padded[2j + 1]`. One pass over
    /// the row's pairs, which the compiler de-interleaves in registers; the few columns at
    /// the edges that take padding one by one.
    #[inline(always)]
    pub fn split_pairs(even: &mut [f32], odd: &mut [f32], row: &[f32], pad: usize) {
        let cols = even.len().min(odd.len());
        let (w, at) = (row.len(), |t: usize| {
            t.checked_sub(pad)
                .and_then(|c| row.get(c))
                .copied()
                .unwrap_or(0.0)
        });
        // Columns whose two cells both lie in the row: 2j >= pad and 2j + 1 < pad + w.
        let lo = pad.div_ceil(2).min(cols);
        let hi = ((pad + w) / 2).clamp(lo, cols);
        for j in (0..lo).chain(hi..cols) {
            even[j] = at(2 * j);
            odd[j] = at(2 * j + 1);
        }
        if lo < hi {
            let pairs = row[2 * lo - pad..].chunks_exact(2);
            for ((e, o), pair) in even[lo..hi].iter_mut().zip(&mut odd[lo..hi]).zip(pairs) {
                *e = pair[0];
                *o = pair[1];
            }
        }
    }

    /// `dst[k] = src[stride * k]`. Stride 2, the common one, is a de-interleave the compiler
    /// vectorises; no bounds check in any loop.
    #[inline(always)]
    pub fn strided_copy(dst: &mut [f32], src: &[f32], stride: usize) {
        let n = dst.len();
        if n == 0 {
            return;
        }
        assert!(stride >= 1 && src.len() > stride * (n - 1));
        match stride {
            1 => dst.copy_from_slice(&src[..n]),
            2 => {
                let whole = n.min(src.len() / 2);
                let (head, tail) = dst.split_at_mut(whole);
                for (d, pair) in head.iter_mut().zip(src.chunks_exact(2)) {
                    *d = pair[0];
                }
                if let Some(last) = tail.first_mut() {
                    *last = src[2 * whole];
                }
            }
            _ => {
                for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                    *d = *s;
                }
            }
        }
    }
}

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
    fn stride2_windows_cover_every_length_from_the_row() {
        let row: Vec<f32> = (0..81).map(|v| ((v * 7) % 11) as f32 - 5.0).collect();
        // Shorter than a vector, whole vectors, and a tail, up to the longest the row serves.
        for n in 0..=40 {
            for three in [false, true] {
                let width = if three { 3 } else { 2 };
                let window = |i: usize| &row[2 * i..2 * i + width];
                let mut out = vec![f32::NAN; n];
                inline::stride2_window(&mut out, &row, three, inline::max);
                let expected: Vec<f32> = (0..n)
                    .map(|i| window(i).iter().copied().fold(f32::MIN, f32::max))
                    .collect();
                assert_eq!(out, expected, "max of {width}, {n} outputs");
                inline::stride2_window(&mut out, &row, three, |a, b| a + b);
                let expected: Vec<f32> = (0..n).map(|i| window(i).iter().sum()).collect();
                assert_eq!(out, expected, "sum of {width}, {n} outputs");
            }
        }
        // A row one element short of the last window is refused, not read past.
        let short = std::panic::catch_unwind(|| {
            inline::stride2_window(&mut [0f32; 4], &[0f32; 8], true, inline::max)
        });
        assert!(short.is_err());
    }

    #[test]
    fn split_pairs_is_the_padded_row_de_interleaved() {
        for w in 0..12 {
            let row: Vec<f32> = (1..=w).map(|v| v as f32).collect();
            for pad in 0..4 {
                // Phase rows shorter than, as long as, and longer than the padded row needs.
                for cols in 0..(w + pad) / 2 + 3 {
                    let padded = |t: usize| {
                        t.checked_sub(pad)
                            .and_then(|c| row.get(c))
                            .copied()
                            .unwrap_or(0.0)
                    };
                    let (mut even, mut odd) = (vec![f32::NAN; cols], vec![f32::NAN; cols]);
                    inline::split_pairs(&mut even, &mut odd, &row, pad);
                    let expected =
                        |b: usize| -> Vec<f32> { (0..cols).map(|j| padded(2 * j + b)).collect() };
                    let case = format!("{w} wide, pad {pad}, {cols} columns");
                    assert_eq!(even, expected(0), "{case}");
                    assert_eq!(odd, expected(1), "{case}");
                }
            }
        }
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
