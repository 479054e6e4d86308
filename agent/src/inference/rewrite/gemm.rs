//! A blocked f32 matrix multiply for convolutions, `C = relu?(A B + bias (+ R))`, with an AVX-512
//! micro-kernel: `A` is a convolution's kernel (packed once, when the model is prepared), `B`
//! is read as rows of the (phase-split) input at given offsets, so a convolution needs no
//! im2col buffer, and `C` is written in place of the output.
//!
//! The blocking is the usual one (Goto / BLIS): a `KC x NC` block of `B` is packed into
//! `NR`-column strips that stay in L2, one strip (`KC x NR`, 36 KiB) stays in L1 while every
//! `MR`-row panel of `A` in an `MC`-row block passes over it, and each micro-tile keeps its
//! `MR x NR` sums in 24 zmm registers across the whole `KC` run.

use std::cell::RefCell;
use std::ops::Range;

use crate::inference::warm::Crew;

/// Rows of a micro-tile (output channels).
pub const MR: usize = 8;
/// Lanes of one zmm register.
const LANES: usize = 16;
/// Columns of a micro-tile (output positions): three registers per row.
pub const NR: usize = 3 * LANES;
/// 192: long enough to amortise loading and storing `C` between blocks (+4% over 128 on the
/// deep layers of ResNet-50), short enough that a strip of `B` and an `A` panel share L1.
const KC: usize = 192;
const MC: usize = 128;
const NC: usize = 20 * NR;

/// Whether this CPU runs the micro-kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `A` (`m x k`, row-major on input) packed in `MR`-row panels, zero rows past `m`, and the
/// bias padded the same way. The panels are cut into the `KC`-long blocks of `k` the multiply
/// runs, and a block's panels lie one after another, `block[p][kk][r]`: the multiply reads
/// them in that order, so a convolution's weights (read once per inference, from memory, for
/// the deep layers) stream through the prefetcher instead of in `KC x MR` pieces a whole
/// panel apart.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedA {
    pub m: usize,
    pub k: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedA {
    pub fn new(a: &[f32], m: usize, k: usize, bias: &[f32]) -> PackedA {
        assert_eq!(a.len(), m * k);
        assert_eq!(bias.len(), m);
        let count = m.div_ceil(MR);
        let mut panels = vec![0f32; count * k * MR];
        for (row, values) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            for (k0, block) in values.chunks(KC).enumerate().map(|(b, v)| (b * KC, v)) {
                let panel = &mut panels[(k0 * count + (row / MR) * block.len()) * MR..];
                for (kk, v) in block.iter().enumerate() {
                    panel[kk * MR + row % MR] = *v;
                }
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(count * MR, 0.0);
        PackedA {
            m,
            k,
            panels,
            bias: padded,
        }
    }

    /// Panel `p`'s part of the block `ks` of `k` (one of the multiply's `KC` blocks).
    fn panel(&self, p: usize, ks: Range<usize>) -> &[f32] {
        debug_assert!(ks.start.is_multiple_of(KC) && ks.end == (ks.start + KC).min(self.k));
        let count = self.m.div_ceil(MR);
        &self.panels[(ks.start * count + p * ks.len()) * MR..][..ks.len() * MR]
    }
}

/// `B` (`k x n`): element `(kk, j)` is `base[offsets[kk] + column(j)]`, the columns
/// contiguous unless `wrap` says otherwise.
pub struct RowsB<'a> {
    pub base: &'a [f32],
    pub offsets: &'a [usize],
    pub n: usize,
    /// `Some([width, pitch])`: the columns are runs of `width`, `pitch` apart in `base`, so
    /// column `j` is at `(j / width) * pitch + j % width`. A convolution's output rows read
    /// from phase-plane rows that are wider than them: `C` then gets only the output's
    /// columns, and no multiply-add is spent on the others.
    pub wrap: Option<[usize; 2]>,
}

impl RowsB<'_> {
    /// Where column `j` of a row is, from the row's offset.
    fn column(&self, j: usize) -> usize {
        match self.wrap {
            None => j,
            Some([width, pitch]) => (j / width) * pitch + j % width,
        }
    }

    /// Columns `j..j + cols` as runs contiguous in `base`, `(first column, from the row's
    /// offset, length)`, into `runs`; returns how many.
    fn runs(&self, j: usize, cols: usize, runs: &mut [(usize, usize, usize); NR]) -> usize {
        let mut count = 0;
        let mut done = 0;
        while done < cols {
            let len = match self.wrap {
                None => cols - done,
                Some([width, _]) => (width - (j + done) % width).min(cols - done),
            };
            runs[count] = (done, self.column(j + done), len);
            count += 1;
            done += len;
        }
        count
    }
}

/// Below this many multiply-adds (about 10 µs of work) a product stays on the calling
/// thread. The crew's helpers are polling while an inference runs, so handing a part over
/// costs microseconds, not a wake-up (`warm.rs`).
const PARALLEL_MIN_FMAS: usize = 1 << 20;
/// Columns a thread gets at least when the columns are split.
const PARALLEL_MIN_COLS: usize = 4 * NR;

thread_local! {
    /// Packed blocks of `B`, per thread, grown and never shrunk: a fresh buffer per call would
    /// cost a page-faulting allocation (and a regrow, zeroing it again).
    static PACK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// What the last block of `k` does to a tile's sums before it stores them: adds `add` (laid
/// out as `C`: a residual connection's other branch), then applies the ReLU.
#[derive(Clone, Copy, Debug, Default)]
pub struct Epilogue<'a> {
    pub add: Option<&'a [f32]>,
    pub relu: bool,
}

impl Epilogue<'_> {
    pub fn relu(relu: bool) -> Epilogue<'static> {
        Epilogue { add: None, relu }
    }
}

/// `c = relu?(a b + bias (+ add))` (`epilogue`): `c` (and `add`) are `a.m x ldc`, row-major,
/// columns `0..b.n` written. With a crew of several threads and enough work, the columns are
/// split between them (each packs only its own part of `B`); when there are too few columns
/// for that, the rows are.
pub fn multiply(
    a: &PackedA,
    b: &RowsB,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
    crew: Option<&Crew>,
) {
    assert!(available(), "the GEMM micro-kernel needs AVX-512");
    assert_eq!(b.offsets.len(), a.k);
    assert!(b.n <= ldc);
    assert!(b
        .wrap
        .is_none_or(|[width, pitch]| width >= 1 && pitch >= width));
    let span = b.n.checked_sub(1).map_or(0, |last| b.column(last) + 1);
    assert!(b.offsets.iter().all(|o| o + span <= b.base.len()));
    if a.m == 0 || b.n == 0 {
        return;
    }
    assert!(c.len() >= (a.m - 1) * ldc + b.n);
    assert!(epilogue
        .add
        .is_none_or(|r| r.len() >= (a.m - 1) * ldc + b.n));
    let out = Out {
        c: c.as_mut_ptr(),
        add: epilogue.add.map(<[f32]>::as_ptr),
        ldc,
        relu: epilogue.relu,
    };
    let threads = crew.map_or(1, Crew::threads);
    let blocks: Vec<(Range<usize>, Range<usize>)> =
        if threads <= 1 || a.m * a.k * b.n < PARALLEL_MIN_FMAS {
            vec![(0..a.m, 0..b.n)]
        } else if b.n >= threads * PARALLEL_MIN_COLS {
            let per = b.n.div_ceil(threads).next_multiple_of(NR);
            (0..b.n)
                .step_by(per)
                .map(|j| (0..a.m, j..(j + per).min(b.n)))
                .collect()
        } else {
            let per = a.m.div_ceil(MR).div_ceil(threads) * MR;
            (0..a.m)
                .step_by(per)
                .map(|i| (i..(i + per).min(a.m), 0..b.n))
                .collect()
        };
    let work = |part: usize| {
        let (rows, cols) = blocks[part].clone();
        // SAFETY: the blocks are disjoint and inside `c` (checked above), which `multiply`
        // borrows mutably until every block is done.
        PACK.with_borrow_mut(|pack| unsafe { block(a, b, rows, cols, &out, pack) })
    };
    match crew {
        Some(crew) if blocks.len() > 1 => crew.run(blocks.len(), &work),
        _ => work(0),
    }
}

/// `C`'s element `(i, j)` is at `c + i * ldc + j`, and the epilogue's `add`'s likewise.
struct Out {
    c: *mut f32,
    add: Option<*const f32>,
    ldc: usize,
    relu: bool,
}

// SAFETY: threads write disjoint blocks of `C` through it (`multiply`); `add` is only read.
unsafe impl Sync for Out {}

/// The rows `rows` (starting on an `MR` panel) and columns `cols` of `C`: the work of one
/// thread.
///
/// # Safety
/// Every element of the block is inside the buffer `out` points to, and no other thread
/// reads or writes the block meanwhile.
unsafe fn block(
    a: &PackedA,
    b: &RowsB,
    rows: Range<usize>,
    cols: Range<usize>,
    out: &Out,
    pack: &mut Vec<f32>,
) {
    assert!(rows.start.is_multiple_of(MR) && rows.end <= a.m && cols.end <= b.n);
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    let need = KC.min(a.k.max(1)) * NC + LANES;
    if pack.len() < need {
        pack.resize(need, 0.0);
    }
    // Strips start on a cache line, so that no load of `B` in the micro-kernel straddles two
    // (the allocator only promises 16 bytes).
    let skip = pack.as_ptr().align_offset(64).min(LANES);
    let pack = &mut pack[skip..];
    for j0 in cols.clone().step_by(NC) {
        let nc = NC.min(cols.end - j0);
        for k0 in (0..a.k.max(1)).step_by(KC) {
            let ks = k0..(k0 + KC).min(a.k);
            pack_b(b, ks.clone(), j0..j0 + nc, pack);
            let first = k0 == 0;
            let last = ks.end >= a.k;
            for i0 in rows.clone().step_by(MC) {
                let i1 = (i0 + MC).min(rows.end);
                for (s, j) in (0..nc).step_by(NR).enumerate() {
                    let tile_cols = NR.min(nc - j);
                    let strip =
                        &pack[s * ks.len() * NR..][..ks.len() * tile_cols.div_ceil(LANES) * LANES];
                    for p in i0 / MR..i1.div_ceil(MR) {
                        let r0 = p * MR;
                        let tile = Tile {
                            a: a.panel(p, ks.clone()),
                            b: strip,
                            kc: ks.len(),
                            rows: MR.min(rows.end - r0),
                            cols: tile_cols,
                            bias: first.then(|| &a.bias[r0..r0 + MR]),
                            relu: last && out.relu,
                            add: out
                                .add
                                .filter(|_| last)
                                .map(|add| add.wrapping_add(r0 * out.ldc + j0 + j)),
                        };
                        // SAFETY: the tile is inside the block (the caller's promise), and
                        // so inside `add`, which is as long as `C` (checked in `multiply`).
                        unsafe { tile.run(out.c.add(r0 * out.ldc + j0 + j), out.ldc) };
                    }
                }
            }
        }
    }
}

/// Packs `b[ks, js]` as strips of `NR` columns (the last one as wide as it needs in whole
/// registers, zero-padded): `strip[s][kk][j]`.
fn pack_b(b: &RowsB, ks: Range<usize>, js: Range<usize>, pack: &mut [f32]) {
    let kc = ks.len();
    let mut segments = [(0, 0, 0); NR];
    for (s, j) in js.clone().step_by(NR).enumerate() {
        let cols = NR.min(js.end - j);
        let width = cols.div_ceil(LANES) * LANES;
        let count = b.runs(j, cols, &mut segments);
        let runs = &segments[..count];
        let strip = &mut pack[s * kc * NR..][..kc * width];
        for (dst, &offset) in strip.chunks_exact_mut(width).zip(&b.offsets[ks.clone()]) {
            for &(at, from, len) in runs {
                dst[at..at + len].copy_from_slice(&b.base[offset + from..][..len]);
            }
            dst[cols..].fill(0.0);
        }
    }
}

/// One micro-tile's operands: `kc` steps of an `MR`-row panel of `A` and a strip of `B` whose
/// rows are `cols` rounded up to whole registers wide.
struct Tile<'a> {
    a: &'a [f32],
    b: &'a [f32],
    kc: usize,
    rows: usize,
    cols: usize,
    /// Start from the bias (the first `KC` block), else from what `c` holds.
    bias: Option<&'a [f32]>,
    /// The epilogue (the last `KC` block): add what `add` holds at the tile's positions (as
    /// `c`'s, `ldc` apart), then the ReLU.
    add: Option<*const f32>,
    relu: bool,
}

impl Tile<'_> {
    /// `c[r * ldc + j]` for `r < rows`, `j < cols`, `c` at the tile's corner.
    ///
    /// # Safety
    /// Those elements are inside one buffer, and no other thread touches them meanwhile;
    /// with `add`, the same elements from it are inside one buffer.
    unsafe fn run(&self, c: *mut f32, ldc: usize) {
        let vectors = self.cols.div_ceil(LANES);
        assert!(self.rows >= 1 && self.rows <= MR && self.cols >= 1 && self.cols <= NR);
        assert_eq!(self.a.len(), self.kc * MR);
        assert_eq!(self.b.len(), self.kc * vectors * LANES);
        assert!(self.bias.is_none_or(|b| b.len() == MR));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `multiply` checked that the CPU has AVX-512F; the assertions above bound the
        // kernel's reads of `a`, `b` and `bias`, and the caller its masked accesses to `c`.
        unsafe {
            match vectors {
                1 => avx512::tile::<1>(self, c, ldc),
                2 => avx512::tile::<2>(self, c, ldc),
                _ => avx512::tile::<3>(self, c, ldc),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (c, ldc, vectors, self.relu, self.add);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, LANES, MR};

    /// About 400 cycles of a full tile's arithmetic ahead (32 steps of `k`): a memory latency.
    const PREFETCH_A: usize = 1024;

    /// The `MR x (V * 16)` micro-kernel. Loops have constant trip counts and index the arrays
    /// with them, so that they unroll and the sums stay in registers (iterators over `acc`
    /// would do too, but this reads as the tile it computes).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const V: usize>(t: &Tile, c: *mut f32, ldc: usize) {
        let mut masks = [0u16; V];
        for (v, mask) in masks.iter_mut().enumerate() {
            let left = t.cols.saturating_sub(v * LANES).min(LANES);
            *mask = ((1u32 << left) - 1) as u16;
        }
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        match t.bias {
            Some(bias) => {
                for r in 0..MR {
                    let b = _mm512_set1_ps(bias[r]);
                    for v in 0..V {
                        acc[r][v] = b;
                    }
                }
            }
            None => {
                for r in 0..MR {
                    if r < t.rows {
                        for v in 0..V {
                            let at = c.wrapping_add(r * ldc + v * LANES);
                            acc[r][v] = _mm512_maskz_loadu_ps(masks[v], at);
                        }
                    }
                }
            }
        }
        let mut a = t.a.as_ptr();
        let mut b = t.b.as_ptr();
        for _ in 0..t.kc {
            // `A`'s panels follow one another in memory (`PackedA`): fetch the line
            // `PREFETCH_A` bytes ahead, into this panel's rest or the next one, so that the
            // weights' trip from memory overlaps the arithmetic. A prefetch never faults.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_byte_add(PREFETCH_A).cast());
            let mut bv = [_mm512_setzero_ps(); V];
            for v in 0..V {
                bv[v] = _mm512_loadu_ps(b.add(v * LANES));
            }
            for r in 0..MR {
                let ar = _mm512_set1_ps(*a.add(r));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
                }
            }
            a = a.add(MR);
            b = b.add(V * LANES);
        }
        if let Some(add) = t.add {
            for r in 0..MR {
                if r < t.rows {
                    for v in 0..V {
                        let at = add.wrapping_add(r * ldc + v * LANES);
                        acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(masks[v], at));
                    }
                }
            }
        }
        if t.relu {
            let zero = _mm512_setzero_ps();
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = _mm512_max_ps(*x, zero);
                }
            }
        }
        for r in 0..MR {
            if r < t.rows {
                for v in 0..V {
                    let at = c.wrapping_add(r * ldc + v * LANES);
                    _mm512_mask_storeu_ps(at, masks[v], acc[r][v]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain triple loop, in f64.
    fn reference(a: &[f32], b: &[f32], bias: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let sum: f64 = (0..k)
                    .map(|kk| a[i * k + kk] as f64 * b[kk * n + j] as f64)
                    .sum();
                c[i * n + j] = (sum + bias[i] as f64) as f32;
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 201) as f32 / 100.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_a_plain_matrix_multiply_on_ragged_shapes() {
        if !available() {
            return;
        }
        let crew = Crew::new(2);
        let _hot = crew.hold();
        // Rows not a multiple of MR, columns of every tail width, K across several KC blocks,
        // N across several NC blocks; on one thread and on three, which split the last two
        // shapes by columns and by rows, at ragged boundaries.
        for &(m, k, n) in &[
            (1, 1, 1),
            (8, 3, 16),
            (13, 27, 49),
            (16, 129, 63),
            (30, 300, 17),
            (64, 257, NC + NR + 5),
            (250, 300, 49),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bias = values(m, 3);
            let packed = PackedA::new(&a, m, k, &bias);
            let expected = reference(&a, &b, &bias, m, k, n);
            // B contiguous, and in runs of 7 columns 9 apart (a convolution's 7-wide output
            // rows read from 9-wide phase rows); the gaps hold NaN, which must not be read.
            // With a residual added before the ReLU (negative and positive values, so the
            // order of the two shows).
            for (wrap, relu, crew, residual) in [
                (None, false, None, false),
                (None, true, None, false),
                (None, false, Some(&crew), false),
                (Some([7, 9]), false, None, false),
                (Some([7, 9]), true, Some(&crew), false),
                (None, true, None, true),
                (Some([7, 9]), true, Some(&crew), true),
                (None, false, Some(&crew), true),
            ] {
                let (width, pitch) = wrap.map_or((n, n), |[w, p]| (w, p));
                let span = n.div_ceil(width) * pitch;
                let row_pitch = span + 3;
                let mut base = vec![f32::NAN; k * row_pitch + 1];
                let offsets: Vec<usize> = (0..k).map(|kk| kk * row_pitch + 1).collect();
                for kk in 0..k {
                    for j in 0..n {
                        base[offsets[kk] + (j / width) * pitch + j % width] = b[kk * n + j];
                    }
                }
                let rows_b = RowsB {
                    base: &base,
                    offsets: &offsets,
                    n,
                    wrap,
                };
                // The padding column of each row must stay untouched.
                let ldc = n + 1;
                let mut c = vec![7f32; m * ldc];
                let add = values(m * ldc, 4);
                let epilogue = Epilogue {
                    add: residual.then_some(&add[..]),
                    relu,
                };
                multiply(&packed, &rows_b, &mut c, ldc, epilogue, crew);
                for i in 0..m {
                    for j in 0..n {
                        let sum =
                            expected[i * n + j] + if residual { add[i * ldc + j] } else { 0.0 };
                        let want = if relu { sum.max(0.0) } else { sum };
                        let got = c[i * ldc + j];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{m}x{k}x{n} wrap {wrap:?} relu {relu} residual {residual}: c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                    assert_eq!(c[i * ldc + n], 7.0, "{m}x{k}x{n}: column past n written");
                }
            }
        }
    }
}
