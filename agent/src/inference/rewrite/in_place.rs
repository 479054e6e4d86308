//! Window ops over one NCHW plane read from the input in place, run by run of 16 outputs,
//! for the windows where every tap of a run is one vector load (or two): a stride-1 window
//! whose output rows are as wide as the input's ("same" padding across), where output `p`
//! (row-major) reads tap `t` at input `p + offset[t]`; and, with AVX-512, a stride-2 window,
//! each tap of a run of 16 outputs in a row being the even lanes of two loads (a pool's 3x3
//! stride-2 window runs separably: rows first, then columns, `avx512::separable`). Lanes whose
//! cell lies in the padding are masked off (read as the fold's identity: 0, or `-inf` for a
//! max), and the results are stored straight into the output plane: no phase split of the
//! input, no padded copy, no trim. Depthwise convolutions (weighted sums) and max and average
//! pools run on it.

use super::gemm::Kernel;
use super::geometry::Window2d;

/// Lanes of one run of outputs: a zmm register, or two ymm ones.
const LANES: usize = 16;

/// A window read from the input plane in place, run by run of up to 16 outputs along a row
/// (or, at stride 1, along the whole plane): tap `t` of a run reads the input at `run.input +
/// offsets[t]`, one vector (stride 1) or two whose even lanes it takes (stride 2), its lanes
/// outside the input masked off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InPlace {
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
    /// A 3x3 stride-2 window on AVX-512, which pools run separably ([`avx512::separable`]).
    separable: Option<Separable>,
}

/// A 3x3 stride-2 window's separable reading: the geometry of one output row, the same for
/// every row, built once like the taps' masks.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Separable {
    /// The output's height and width.
    output: [usize; 2],
    /// The padding rows above the input.
    pad_top: usize,
    /// A row's runs of up to 16 outputs.
    columns: Vec<Columns>,
}

/// One run of a separable row: 16 outputs at most, reading 33 input columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Columns {
    /// Its first output column.
    output: usize,
    /// How many outputs, 1 to 16.
    len: usize,
    /// Its first input column (negative in the padding before the first).
    input: isize,
    /// Per load `i` of 16 columns from `input + 16 * i`, bit `j` set when its column `j` lies
    /// inside the row; the third load keeps only its first column, the last the run's 16th
    /// output reads.
    masks: [u16; 3],
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
    pub fn of(kernel: Kernel, geometry: &Window2d, [h, w]: [usize; 2]) -> Option<InPlace> {
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
                            // + j`; output `l` takes element `stride * l`. The kernels read
                            // every lane on the mask unchecked: it must be this cell.
                            assert_eq!(at, run.input + offset + (stride * l) as isize);
                            mask |= 1 << (stride * l);
                        }
                    }
                    mask
                })
            })
            .collect();
        let separable = (stride == 2 && [kh, kw] == [3, 3]).then(|| {
            // Lanes `j` of 16 from column `start` with `start + j` inside a row.
            let inside = |start: isize| -> u16 {
                let (from, to) = ((-start).clamp(0, 16), (wi - start).clamp(0, 16));
                if from >= to {
                    0
                } else {
                    ((1u32 << to) - (1u32 << from)) as u16
                }
            };
            let columns = (0..ow)
                .step_by(LANES)
                .map(|output| {
                    let input = 2 * output as isize - px;
                    Columns {
                        output,
                        len: (ow - output).min(LANES),
                        input,
                        masks: [inside(input), inside(input + 16), inside(input + 32) & 1],
                    }
                })
                .collect();
            Separable {
                output: geometry.output,
                pad_top: geometry.pad_before[0],
                columns,
            }
        });
        Some(InPlace {
            kernel,
            input: [h, w],
            stride,
            offsets,
            runs,
            masks,
            separable,
        })
    }

    /// The input plane's height and width.
    pub fn input(&self) -> [usize; 2] {
        self.input
    }

    /// Per output of the plane, how many of its window's cells lie inside the input.
    pub fn cells(&self) -> Vec<usize> {
        let runs = self.runs.len();
        let mut cells = vec![0; self.runs.last().map_or(0, |r| r.output + r.len)];
        for masks in self.masks.chunks_exact(runs) {
            for (run, mask) in self.runs.iter().zip(masks) {
                for (l, cells) in cells[run.output..][..run.len].iter_mut().enumerate() {
                    *cells += usize::from(mask >> (self.stride * l) & 1 == 1);
                }
            }
        }
        cells
    }

    /// A depthwise convolution's channel: `y = bias + the sum over the window's cells inside
    /// the input of weight times cell`.
    pub fn convolve(&self, x: &[f32], y: &mut [f32], weights: &[f32], bias: f32) {
        assert_eq!(weights.len(), self.offsets.len());
        let plane = Plane {
            x,
            weights,
            init: bias,
            scale: &[],
        };
        self.plane::<WEIGHTED>(&plane, y);
    }

    /// A max pool's channel: `y` = the largest of the window's cells inside the input
    /// (`-inf` where there is none).
    pub fn max(&self, x: &[f32], y: &mut [f32]) {
        let plane = Plane {
            x,
            weights: &[],
            init: f32::NEG_INFINITY,
            scale: &[],
        };
        self.plane::<MAX>(&plane, y);
    }

    /// A sum pool's channel: `y` = the sum of the window's cells inside the input, times
    /// `scale`'s element for that output unless `scale` is empty (an average: 1 / [`cells`]).
    ///
    /// [`cells`]: InPlace::cells
    pub fn sum(&self, x: &[f32], y: &mut [f32], scale: &[f32]) {
        assert!(scale.is_empty() || scale.len() == y.len());
        let plane = Plane {
            x,
            weights: &[],
            init: 0.0,
            scale,
        };
        self.plane::<SUM>(&plane, y);
    }

    fn plane<const FOLD: u8>(&self, plane: &Plane, y: &mut [f32]) {
        assert_eq!(plane.x.len(), self.input[0] * self.input[1]);
        assert_eq!(self.masks.len(), self.offsets.len() * self.runs.len());
        assert!(self
            .runs
            .last()
            .is_some_and(|r| r.output + r.len == y.len()));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `of` took the kernel from `Kernel::best` (or a test from `Kernel::here`):
        // the CPU runs it, and stride 2 only with AVX-512. The masks let through only cells
        // inside `x` (`of`), and the runs' outputs lie inside `y` (and `scale`, when given),
        // whose lengths are asserted above; `convolve` asserted one weight per tap.
        unsafe {
            match (self.kernel, self.stride, &self.separable) {
                (Kernel::Avx512, 2, Some(window)) if FOLD != WEIGHTED => {
                    avx512::separable::<FOLD>(self, window, plane, y)
                }
                (Kernel::Avx512, 1, _) => avx512::plane::<false, FOLD>(self, plane, y),
                (Kernel::Avx512, _, _) => avx512::plane::<true, FOLD>(self, plane, y),
                (Kernel::Avx2, _, _) => avx2::plane::<FOLD>(self, plane, y),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (self.kernel, plane, y);
    }
}

/// One plane's fold: its input, and what the fold takes besides (read by the x86 kernels).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Plane<'a> {
    x: &'a [f32],
    /// A convolution's weights, one per tap (empty for a pool).
    weights: &'a [f32],
    /// What each output starts from: a convolution's bias, `-inf` for a max, 0 for a sum.
    init: f32,
    /// An average's factor per output (empty otherwise).
    scale: &'a [f32],
}

/// What the window's cells fold into: `init + sum of weight * cell`.
const WEIGHTED: u8 = 0;
/// `max(init, cells...)`.
const MAX: u8 = 1;
/// `(init + sum of cells) * scale`.
const SUM: u8 = 2;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Columns, InPlace, Plane, Separable, MAX, SUM, WEIGHTED};

    /// Runs whose results go through the taps together: independent chains, so that one's
    /// latency hides behind the others'.
    const GROUP: usize = 4;

    /// [`InPlace::plane`] in zmm registers; `STRIDE2`: each tap's 16 outputs are the even
    /// lanes of two loads.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as `InPlace::plane` asserts, with the runs and masks `of` built.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn plane<const STRIDE2: bool, const FOLD: u8>(
        op: &InPlace,
        plane: &Plane,
        y: &mut [f32],
    ) {
        let runs = op.runs.len();
        let mut first = 0;
        while first + GROUP <= runs {
            unsafe { group::<GROUP, STRIDE2, FOLD>(op, plane, y, first) };
            first += GROUP;
        }
        for first in first..runs {
            unsafe { group::<1, STRIDE2, FOLD>(op, plane, y, first) };
        }
    }

    /// A pool's 3x3 stride-2 window, separably: per run of up to 16 outputs of a row, the
    /// fold of its window's (up to three) input rows over the 33 columns the run reads, as
    /// three vectors of 16 columns from the run's first, then of their even columns, their odd
    /// ones and their even ones one further on (the third vector's first lane ending the
    /// last). Per 16 outputs: 9 loads, 3 shuffles and 8 folds, where the taps take 18 loads,
    /// 9 shuffles and 9 folds. Columns outside the input read as the fold's identity, and rows
    /// outside it are not read: the same cells as the taps' masks.
    ///
    /// # Safety
    /// The CPU has AVX-512F; as `InPlace::plane` asserts, with `window` built by `of` for
    /// `op`'s input.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn separable<const FOLD: u8>(
        op: &InPlace,
        window: &Separable,
        plane: &Plane,
        y: &mut [f32],
    ) {
        let [oh, ow] = window.output;
        let [h, w] = op.input.map(|d| d as isize);
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let fill = _mm512_set1_ps(if FOLD == MAX { f32::NEG_INFINITY } else { 0.0 });
        let base = plane.x.as_ptr();
        for oy in 0..oh {
            let top = (2 * oy) as isize - window.pad_top as isize;
            let rows = top.max(0)..(top + 3).min(h);
            for &Columns {
                output: first,
                len,
                input: c,
                masks,
            } in &window.columns
            {
                let mut v = [fill; 3];
                for iy in rows.clone() {
                    let row = base.wrapping_offset(iy * w + c);
                    for (i, v) in v.iter_mut().enumerate() {
                        // SAFETY: lanes off the mask are neither read nor able to fault; those
                        // on it are columns of row `iy`, inside `x` (`InPlace::plane`'s
                        // assert).
                        let cells = unsafe {
                            _mm512_mask_loadu_ps(fill, masks[i], row.wrapping_add(16 * i))
                        };
                        *v = fold::<FOLD>(*v, cells);
                    }
                }
                let even = _mm512_permutex2var_ps(v[0], evens, v[1]);
                let odd = _mm512_permutex2var_ps(v[0], odds, v[1]);
                let next = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                    _mm512_castps_si512(v[2]),
                    _mm512_castps_si512(even),
                ));
                let mut out = fold::<FOLD>(fold::<FOLD>(even, odd), next);
                let at = oy * ow + first;
                let mask = ((1u32 << len) - 1) as u16;
                if FOLD == SUM && !plane.scale.is_empty() {
                    // SAFETY: `scale` is as long as `y` (`InPlace::sum`), and `at + len` is
                    // inside it.
                    let s = unsafe { _mm512_maskz_loadu_ps(mask, plane.scale.as_ptr().add(at)) };
                    out = _mm512_mul_ps(out, s);
                }
                // SAFETY: `y` holds `oh * ow` outputs (`InPlace::plane`'s assert).
                unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(at), mask, out) };
            }
        }
    }

    /// A pool's fold of two vectors: their max, or their sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn fold<const FOLD: u8>(a: __m512, b: __m512) -> __m512 {
        match FOLD {
            MAX => _mm512_max_ps(a, b),
            _ => _mm512_add_ps(a, b),
        }
    }

    /// `G` runs from `first`. Raw pointers, so that the loop over the taps keeps its bases in
    /// registers with no bounds check (`perf`: the indexed form spilled them).
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group<const G: usize, const STRIDE2: bool, const FOLD: u8>(
        op: &InPlace,
        plane: &Plane,
        y: &mut [f32],
        first: usize,
    ) {
        let runs = &op.runs[first..][..G];
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        // What a masked-off lane reads: the fold's identity.
        let fill = _mm512_set1_ps(if FOLD == MAX { f32::NEG_INFINITY } else { 0.0 });
        let mut acc = [_mm512_set1_ps(plane.init); G];
        let mut from = [plane.x.as_ptr(); G];
        for u in 0..G {
            from[u] = plane.x.as_ptr().wrapping_offset(runs[u].input);
        }
        for (t, &offset) in op.offsets.iter().enumerate() {
            let w = match FOLD {
                WEIGHTED => _mm512_set1_ps(plane.weights[t]),
                _ => fill,
            };
            // SAFETY: `plane` asserted `masks` has `taps * runs` elements, and `first + G <=
            // runs`.
            let masks = unsafe { op.masks.as_ptr().add(t * op.runs.len() + first) };
            for u in 0..G {
                let at = from[u].wrapping_offset(offset);
                let mask = unsafe { *masks.add(u) };
                // SAFETY: lanes off the mask are neither read nor able to fault, wherever they
                // point; those on it are inside `x` (`InPlace::of`).
                let v = unsafe {
                    let low = _mm512_mask_loadu_ps(fill, mask as u16, at);
                    if STRIDE2 {
                        let high =
                            _mm512_mask_loadu_ps(fill, (mask >> 16) as u16, at.wrapping_add(16));
                        _mm512_permutex2var_ps(low, evens, high)
                    } else {
                        low
                    }
                };
                acc[u] = match FOLD {
                    WEIGHTED => _mm512_fmadd_ps(w, v, acc[u]),
                    MAX => _mm512_max_ps(acc[u], v),
                    _ => _mm512_add_ps(acc[u], v),
                };
            }
        }
        for u in 0..G {
            let mask = ((1u32 << runs[u].len) - 1) as u16;
            let at = runs[u].output;
            if FOLD == SUM && !plane.scale.is_empty() {
                let s = unsafe { _mm512_maskz_loadu_ps(mask, plane.scale.as_ptr().add(at)) };
                acc[u] = _mm512_mul_ps(acc[u], s);
            }
            unsafe { _mm512_mask_storeu_ps(y.as_mut_ptr().add(at), mask, acc[u]) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{InPlace, Plane, LANES, MAX, SUM, WEIGHTED};

    /// Lanes of a ymm register: half a run.
    const HALF: usize = LANES / 2;
    /// Half-runs whose results go through the taps together.
    const GROUP: usize = 4;

    /// [`InPlace::plane`] at stride 1 in ymm registers, half a run at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as `InPlace::plane` asserts, with the runs and masks `of`
    /// built at stride 1.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn plane<const FOLD: u8>(op: &InPlace, plane: &Plane, y: &mut [f32]) {
        // Stride 1: runs are whole 16-output stretches of the plane but the last.
        let halves = y.len().div_ceil(HALF);
        let mut first = 0;
        while first + GROUP <= halves {
            unsafe { group::<GROUP, FOLD>(op, plane, y, first) };
            first += GROUP;
        }
        for first in first..halves {
            unsafe { group::<1, FOLD>(op, plane, y, first) };
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
    unsafe fn group<const G: usize, const FOLD: u8>(
        op: &InPlace,
        plane: &Plane,
        y: &mut [f32],
        first: usize,
    ) {
        let runs = op.runs.len();
        let negative_infinity = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut acc = [_mm256_set1_ps(plane.init); G];
        let from = plane
            .x
            .as_ptr()
            .wrapping_offset(op.runs[0].input)
            .wrapping_add(first * HALF);
        for (t, &offset) in op.offsets.iter().enumerate() {
            let w = match FOLD {
                WEIGHTED => _mm256_set1_ps(plane.weights[t]),
                _ => negative_infinity,
            };
            let masks = &op.masks[t * runs..][..runs];
            let at = from.wrapping_offset(offset);
            for u in 0..G {
                let half = first + u;
                let mask = lanes(masks[half / 2] >> (half % 2 * HALF));
                // SAFETY: lanes off the mask are neither read nor able to fault, wherever they
                // point; those on it are inside `x` (`InPlace::of`). They read as 0.
                let v = unsafe { _mm256_maskload_ps(at.wrapping_add(u * HALF), mask) };
                acc[u] = match FOLD {
                    WEIGHTED => _mm256_fmadd_ps(w, v, acc[u]),
                    MAX => {
                        let v = _mm256_blendv_ps(negative_infinity, v, _mm256_castsi256_ps(mask));
                        _mm256_max_ps(acc[u], v)
                    }
                    _ => _mm256_add_ps(acc[u], v),
                };
            }
        }
        for u in 0..G {
            let start = (first + u) * HALF;
            let left = (y.len() - start).min(HALF);
            let mask = lanes((1u32 << left) - 1);
            if FOLD == SUM && !plane.scale.is_empty() {
                let s = unsafe { _mm256_maskload_ps(plane.scale.as_ptr().add(start), mask) };
                acc[u] = _mm256_mul_ps(acc[u], s);
            }
            unsafe { _mm256_maskstore_ps(y.as_mut_ptr().add(start), mask, acc[u]) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Per output, the window's cells inside the input with their taps' weights, over the
    /// plain NCHW indices.
    fn windows(
        g: &Window2d,
        x: &[f32],
        [h, w]: [usize; 2],
        weights: &[f32],
    ) -> Vec<Vec<(f32, f32)>> {
        let [oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let mut y = Vec::new();
        for oy in 0..oh {
            for ox in 0..ow {
                let mut cells = Vec::new();
                for ky in 0..kh {
                    for kx in 0..kw {
                        let iy = (g.stride[0] * oy + ky) as isize - g.pad_before[0] as isize;
                        let ix = (g.stride[1] * ox + kx) as isize - g.pad_before[1] as isize;
                        if (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix) {
                            cells.push((weights[ky * kw + kx], x[iy as usize * w + ix as usize]));
                        }
                    }
                }
                y.push(cells);
            }
        }
        y
    }

    #[test]
    fn planes_read_in_place_fold_their_windows_cells_on_every_kernel() {
        // Stride 1: widths of 1, under a run, a run and not, planes of one run and of many;
        // windows padded evenly, unevenly and on one side, taller than the input, and 1x1.
        // Stride 2: ShuffleNet's three, odd sizes, 5x5, padding on one side, rows of more
        // than one run, a 1x1 input, an even window.
        // Stride, kernel, input, padding (top, left, bottom, right).
        type Case = (usize, [usize; 2], [usize; 2], [usize; 4]);
        let cases: &[Case] = &[
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
            (2, [3, 3], [111, 111], [0, 0, 0, 0]),
            (2, [3, 3], [27, 27], [0, 0, 1, 1]),
            (2, [3, 3], [2, 40], [2, 2, 2, 2]),
            (2, [3, 3], [5, 33], [0, 1, 1, 0]),
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
            let windows = windows(&g, &x, [h, w], &weights);
            let weighted = windows.iter().map(|cells| {
                let sum: f64 = cells
                    .iter()
                    .map(|&(w, x)| f64::from(w) * f64::from(x))
                    .sum();
                (0.5 + sum) as f32
            });
            let max = windows
                .iter()
                .map(|cells| cells.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max));
            let sum = windows
                .iter()
                .map(|cells| cells.iter().map(|c| f64::from(c.1)).sum::<f64>() as f32);
            let average = windows.iter().map(|cells| {
                (cells.iter().map(|c| f64::from(c.1)).sum::<f64>() / cells.len() as f64) as f32
            });
            let counts: Vec<usize> = windows.iter().map(Vec::len).collect();
            let expected: [Vec<f32>; 4] = [
                weighted.collect(),
                max.collect(),
                sum.collect(),
                average.collect(),
            ];
            for kernel in Kernel::here() {
                let Some(op) = InPlace::of(kernel, &g, [h, w]) else {
                    assert!(stride == 2 && kernel == Kernel::Avx2);
                    continue;
                };
                assert_eq!(op.cells(), counts);
                let scale: Vec<f32> = counts.iter().map(|&c| 1.0 / c as f32).collect();
                for (fold, expected) in ["weighted", "max", "sum", "average"].iter().zip(&expected)
                {
                    // Slack around the output: a lane stored past its end would show.
                    let mut y = vec![f32::NAN; oh * ow + 40];
                    let out = &mut y[..oh * ow];
                    match *fold {
                        "weighted" => op.convolve(&x, out, &weights, 0.5),
                        "max" => op.max(&x, out),
                        "sum" => op.sum(&x, out, &[]),
                        _ => op.sum(&x, out, &scale),
                    }
                    let case = format!("{kernel:?} {fold} {kh}x{kw}/{stride} on {h}x{w}");
                    for (i, (got, want)) in y.iter().zip(expected).enumerate() {
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
