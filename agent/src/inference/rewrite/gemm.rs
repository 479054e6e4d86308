//! A blocked f32 matrix multiply for convolutions, `C = relu?(A B + bias (+ R))`, with a
//! micro-kernel for AVX-512 and one for AVX2 + FMA, picked at run time: `A` is a
//! convolution's kernel (packed once, when the model is prepared), `B` is read as rows of the
//! (phase-split) input at given offsets, so a convolution needs no im2col buffer, and `C` is
//! written in place of the output.
//!
//! The blocking is the usual one (Goto / BLIS): a `KC x NC` block of `B` is packed into
//! `NR`-column strips that stay in L2, one strip stays in L1 while every `MR`-row panel of `A`
//! in an `MC`-row block passes over it, and each micro-tile keeps its `MR x NR` sums in
//! registers across the whole `KC` run (24 zmm registers with AVX-512, 12 ymm with AVX2).
//! A `B` whose columns are contiguous (a 1x1 convolution's input channels) or wrapped in runs
//! at least a vector wide (a 3x3 layer's output rows in its phase rows) is not packed for
//! blocks of at most 64 rows: the tiles read its rows where they lie, and the last panel of
//! each strip fetches the next strip's lines into L1 for the next tile. The AVX-512 tiles
//! fetch their lines of `C` for writing while they compute (PREFETCHW, two per step of `k`),
//! as a layer's output is rarely in cache.
//!
//! Products with few columns (a 7x7 layer's 49, which 48-column tiles round up to 64) with
//! AVX-512, and products with few rows (DenseNet's 32-channel 3x3 layers) with AVX2, instead
//! lay `A` out in strips of 48 or 16 rows ([`Layout::Columns`]): the output channels go in
//! the vectors, up to 8 or 6 columns of `B` are broadcast straight from its rows (nothing
//! packed), and a 128-step block of a strip stays in L1 while a group of column panels passes
//! over it.

use std::cell::RefCell;
use std::ops::Range;

use crate::inference::warm::Crew;

/// A micro-kernel and the blocking it is tuned for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `8 x 48` tiles on zmm registers (AVX-512F).
    Avx512,
    /// `6 x 16` tiles on ymm registers (AVX2 and FMA): the BLIS shape for Haswell-class and
    /// Zen cores, 12 sums, two `B` vectors and a broadcast in 16 registers.
    Avx2,
}

impl Kernel {
    /// Every kernel, best first.
    pub const ALL: [Kernel; 2] = [Kernel::Avx512, Kernel::Avx2];

    /// Whether this CPU runs the kernel.
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
                Kernel::Avx2 => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The kernels this CPU runs, best first.
    pub fn here() -> impl Iterator<Item = Kernel> {
        Kernel::ALL.into_iter().filter(|k| k.runs_here())
    }

    /// The best kernel this CPU runs.
    pub fn best() -> Option<Kernel> {
        Kernel::here().next()
    }

    /// Rows of a micro-tile (output channels).
    pub const fn mr(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 => 6,
        }
    }

    /// Lanes of one register.
    const fn lanes(self) -> usize {
        match self {
            Kernel::Avx512 => 16,
            Kernel::Avx2 => 8,
        }
    }

    /// Columns of a micro-tile (output positions): registers per row times lanes.
    pub const fn nr(self) -> usize {
        match self {
            Kernel::Avx512 => 3 * 16,
            Kernel::Avx2 => 2 * 8,
        }
    }

    /// The run of `k` a tile's sums stay in registers for. AVX-512: 192, long enough to
    /// amortise loading and storing `C` between blocks (+4% over 128 on the deep layers of
    /// ResNet-50), short enough that a strip of `B` (36 KiB) and an `A` panel share L1.
    /// AVX2: a 16 KiB strip and a 6 KiB panel in a 32 KiB L1.
    const fn kc(self) -> usize {
        match self {
            Kernel::Avx512 => 192,
            Kernel::Avx2 => 256,
        }
    }

    /// Rows of `A` whose `KC` block stays in L2 while the strips of `B` pass (a multiple of
    /// `MR`).
    const fn mc(self) -> usize {
        match self {
            Kernel::Avx512 => 128,
            Kernel::Avx2 => 120,
        }
    }

    /// Columns of `B` packed at a time. AVX2: 256, so that the packed block (256 KiB) and
    /// `A`'s (120 KiB) share a 512 KiB L2.
    const fn nc(self) -> usize {
        match self {
            Kernel::Avx512 => 20 * self.nr(),
            Kernel::Avx2 => 16 * self.nr(),
        }
    }

    /// Rows of `A` in one strip of the [`Layout::Columns`] layout: output channels in three
    /// vectors (AVX-512) or two (AVX2).
    const fn strip(self) -> usize {
        match self {
            Kernel::Avx512 => 3 * 16,
            Kernel::Avx2 => 2 * 8,
        }
    }

    /// The most columns of `B` a [`Layout::Columns`] tile broadcasts per step of `k`: with
    /// the strip's vectors, its sums take 24 zmm or 12 ymm registers.
    const fn max_columns(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 => 6,
        }
    }

    /// Columns of `B` whose column tiles run one after another over each block of `k` (their
    /// sums kept between blocks), so that the block of `A` and the lines of `B` they read
    /// stay in L1. AVX-512 uses the layout for products of a 7x7 output's 49 columns: one
    /// group. AVX2: 16 and 64 ran no differently from 32 in `bench --profile` (DenseNet-121).
    const fn group_columns(self) -> usize {
        match self {
            Kernel::Avx512 => 64,
            Kernel::Avx2 => 32,
        }
    }
}

/// Whether this CPU runs one of the micro-kernels.
pub fn available() -> bool {
    Kernel::best().is_some()
}

/// How [`PackedA`] lays `A` out, and so which loop nest [`multiply`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `MR`-row panels: tiles of `MR` rows by `NR` columns over packed strips of `B`, the
    /// columns in vectors. For products with many columns.
    Panels,
    /// Strips of 48 rows (AVX-512) or 16 (AVX2), output channels in the vectors, `B`'s
    /// elements broadcast straight from its rows, up to 8 or 6 columns a tile, nothing
    /// packed. AVX-512, for products with few columns: a 7x7 layer's 49 cost the panels 64
    /// columns' work (48 + a 16-wide tile for the last one), here 49. AVX2, for products with
    /// few rows: packing `B` costs the same per column whatever the rows, and 6-row panels
    /// pad 32 rows to 36.
    Columns,
}

/// AVX2 lays `A` out in [`Layout::Columns`] up to this many rows (whole strips of 16)...
const AVX2_COLUMNS_MAX_M: usize = 64;
/// ... and from this many steps of `k`: below it, the column layout was no faster
/// (SqueezeNet's 3x3 16 -> 64, `k` = 144) or slower (the 7x7 64-channel first layer of
/// ResNet-50 and DenseNet-121, `k` = 147: 11-20%), `bench --profile` on an AMD EPYC.
const AVX2_COLUMNS_MIN_K: usize = 256;

impl Layout {
    /// AVX-512: the layout that spends fewer multiply-adds on padding for an `m x n` product
    /// (rows rounded up to `MR` or 48, columns to `NR` and whole vectors or not at all),
    /// `Columns` only when it saves a tenth or more. AVX2: `Columns` for few rows and a long
    /// `k` (`AVX2_COLUMNS_MAX_M`, `AVX2_COLUMNS_MIN_K`).
    pub fn for_product(kernel: Kernel, m: usize, k: usize, n: usize) -> Layout {
        if kernel == Kernel::Avx2 {
            let few_rows = m <= AVX2_COLUMNS_MAX_M && m.is_multiple_of(kernel.strip());
            return if few_rows && k >= AVX2_COLUMNS_MIN_K {
                Layout::Columns
            } else {
                Layout::Panels
            };
        }
        let (nr, lanes) = (kernel.nr(), kernel.lanes());
        let panels =
            m.next_multiple_of(kernel.mr()) * (n / nr * nr + (n % nr).next_multiple_of(lanes));
        let columns = m.next_multiple_of(kernel.strip()) * n;
        if columns * 10 <= panels * 9 {
            Layout::Columns
        } else {
            Layout::Panels
        }
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
    /// The kernel the panels are laid out for.
    kernel: Kernel,
    layout: Layout,
    /// `Layout::Panels`: as above. `Layout::Columns`: 48-row strips, `strip[s][kk][r]`.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl PackedA {
    /// Packed for this CPU's best kernel and the layout that suits products of `n` columns
    /// ([`Layout::for_product`]); panics where no kernel runs ([`available`]).
    pub fn new(a: &[f32], m: usize, k: usize, bias: &[f32], n: usize) -> PackedA {
        let kernel = Kernel::best().expect("no GEMM micro-kernel runs on this CPU");
        PackedA::with_layout(kernel, Layout::for_product(kernel, m, k, n), a, m, k, bias)
    }

    /// Packed in panels for `kernel` (which [`multiply`] then runs, so it must run here).
    pub fn for_kernel(kernel: Kernel, a: &[f32], m: usize, k: usize, bias: &[f32]) -> PackedA {
        PackedA::with_layout(kernel, Layout::Panels, a, m, k, bias)
    }

    /// Packed for `kernel` in `layout`.
    pub fn with_layout(
        kernel: Kernel,
        layout: Layout,
        a: &[f32],
        m: usize,
        k: usize,
        bias: &[f32],
    ) -> PackedA {
        assert_eq!(a.len(), m * k);
        assert_eq!(bias.len(), m);
        if layout == Layout::Columns {
            let rows = kernel.strip();
            let strips = m.div_ceil(rows);
            let mut panels = vec![0f32; strips * k * rows];
            for (row, values) in a.chunks_exact(k.max(1)).enumerate().take(m) {
                let strip = &mut panels[(row / rows) * k * rows..];
                for (kk, v) in values.iter().enumerate() {
                    strip[kk * rows + row % rows] = *v;
                }
            }
            let mut padded = bias.to_vec();
            padded.resize(strips * rows, 0.0);
            return PackedA {
                m,
                k,
                kernel,
                layout,
                panels,
                bias: padded,
            };
        }
        let (mr, kc) = (kernel.mr(), kernel.kc());
        let count = m.div_ceil(mr);
        let mut panels = vec![0f32; count * k * mr];
        for (row, values) in a.chunks_exact(k.max(1)).enumerate().take(m) {
            for (k0, block) in values.chunks(kc).enumerate().map(|(b, v)| (b * kc, v)) {
                let panel = &mut panels[(k0 * count + (row / mr) * block.len()) * mr..];
                for (kk, v) in block.iter().enumerate() {
                    panel[kk * mr + row % mr] = *v;
                }
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(count * mr, 0.0);
        PackedA {
            m,
            k,
            kernel,
            layout,
            panels,
            bias: padded,
        }
    }

    /// The layout `multiply` runs.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Panel `p`'s part of the block `ks` of `k` (one of the multiply's `KC` blocks).
    fn panel(&self, p: usize, ks: Range<usize>) -> &[f32] {
        let (mr, kc) = (self.kernel.mr(), self.kernel.kc());
        debug_assert!(ks.start.is_multiple_of(kc) && ks.end == (ks.start + kc).min(self.k));
        let count = self.m.div_ceil(mr);
        &self.panels[(ks.start * count + p * ks.len()) * mr..][..ks.len() * mr]
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
    fn runs(&self, j: usize, cols: usize, runs: &mut [(usize, usize, usize); MAX_NR]) -> usize {
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
/// Column tiles a thread gets at least when the columns are split.
const PARALLEL_MIN_TILES: usize = 4;
/// The widest kernel's `NR`.
const MAX_NR: usize = Kernel::Avx512.nr();
/// The widest kernel's lanes: the padding a strip's start is aligned within.
const MAX_LANES: usize = Kernel::Avx512.lanes();

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
/// split between them at whole vectors (each packs only its own part of `B`); when there are
/// too few columns for that, the rows are.
pub fn multiply(
    a: &PackedA,
    b: &RowsB,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue,
    crew: Option<&Crew>,
) {
    let kernel = a.kernel;
    assert!(
        kernel.runs_here(),
        "this CPU does not run the {kernel:?} GEMM kernel"
    );
    let (mr, nr) = (kernel.mr(), kernel.nr());
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
    if a.layout == Layout::Columns {
        return multiply_columns(a, b, &out, crew);
    }
    let threads = crew.map_or(1, Crew::threads);
    let blocks: Vec<(Range<usize>, Range<usize>)> =
        if threads <= 1 || a.m * a.k * b.n < PARALLEL_MIN_FMAS {
            vec![(0..a.m, 0..b.n)]
        } else if b.n >= threads * PARALLEL_MIN_TILES * nr {
            // In whole vectors, not whole strips: a 13x13 layer's 169 columns in strips of 16
            // are 96 + 73, 6 strips against 5 (the last 9 wide), and 88 + 81 are 5 strips and
            // one a vector wide each.
            let per = b.n.div_ceil(threads).next_multiple_of(kernel.lanes());
            parts(b.n, per).map(|cols| (0..a.m, cols)).collect()
        } else {
            let per = a.m.div_ceil(mr).div_ceil(threads) * mr;
            parts(a.m, per).map(|rows| (rows, 0..b.n)).collect()
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

/// `0..len` in consecutive ranges of `per` (the last one shorter): a product's rows, columns,
/// strips or panels shared out between threads.
fn parts(len: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len)
        .step_by(per)
        .map(move |start| start..(start + per).min(len))
}

/// [`multiply`] for [`Layout::Columns`]: every strip of `A` against every panel of at most
/// `max_columns` columns that lie in one contiguous run of `B`'s rows (a 7-wide output row is
/// one panel, a 14-wide one two of 7). The panels go in groups of about `group_columns`
/// columns; a group's panels run one after another over each block of `k` of a strip (their
/// sums kept between blocks), every strip in turn, so that the group's rows of `B` stay in
/// cache while the strips pass. (Without the blocks of `k`, every panel streamed its whole
/// strip of `A` from L2, and an AVX-512 7x7 layer ran at two thirds of the panels' speed.)
/// With several threads the panels are shared out, or the strips when there are too few
/// panels.
fn multiply_columns(a: &PackedA, b: &RowsB, out: &Out, crew: Option<&Crew>) {
    let kernel = a.kernel;
    let (strip, widest) = (kernel.strip(), kernel.max_columns());
    let mut panels = Vec::new();
    let mut j = 0;
    while j < b.n {
        let run = match b.wrap {
            None => b.n,
            Some([width, _]) => (width - j % width).min(b.n - j),
        };
        // As even as whole panels of at most `widest` make them.
        let count = run.div_ceil(widest);
        for p in 0..count {
            let width = run / count + usize::from(p < run % count);
            panels.push((j, width));
            j += width;
        }
    }
    let strips = a.m.div_ceil(strip);
    let threads = crew.map_or(1, Crew::threads);
    let blocks: Vec<(Range<usize>, Range<usize>)> =
        if threads <= 1 || a.m * a.k * b.n < PARALLEL_MIN_FMAS {
            vec![(0..strips, 0..panels.len())]
        } else if panels.len() < threads * PARALLEL_MIN_TILES && strips >= threads {
            let per = strips.div_ceil(threads);
            parts(strips, per).map(|s| (s, 0..panels.len())).collect()
        } else {
            let per = panels.len().div_ceil(threads);
            parts(panels.len(), per).map(|p| (0..strips, p)).collect()
        };
    let group_columns = kernel.group_columns();
    // One panel's sums, `sums[c * strip + r]`.
    let per_panel = widest * strip;
    let work = |part: usize| {
        let (strips, range) = blocks[part].clone();
        let mut panels = &panels[range];
        let mut sums = Vec::new();
        while !panels.is_empty() {
            // Whole panels, at least one, up to `group_columns` columns.
            let mut count = 1;
            let mut columns = panels[0].1;
            while count < panels.len() && columns + panels[count].1 <= group_columns {
                columns += panels[count].1;
                count += 1;
            }
            let (group, rest) = panels.split_at(count);
            panels = rest;
            sums.resize(group.len() * per_panel, 0.0);
            for s in strips.clone() {
                let bias = &a.bias[s * strip..][..strip];
                for column in sums.chunks_exact_mut(strip) {
                    column.copy_from_slice(bias);
                }
                let rows = strip.min(a.m - s * strip);
                for k0 in (0..a.k).step_by(COLUMN_KC) {
                    let ks = k0..(k0 + COLUMN_KC).min(a.k);
                    let panels = group.iter().zip(sums.chunks_exact_mut(per_panel));
                    for (i, (&(j, width), sums)) in panels.enumerate() {
                        let tile = ColumnTile {
                            kernel,
                            a: &a.panels[(s * a.k + ks.start) * strip..][..ks.len() * strip],
                            b: &b.base[b.column(j)..],
                            offsets: &b.offsets[ks.clone()],
                            width,
                            // The first panel fetches the next block of `A` from memory
                            // (AVX-512 only).
                            prefetch: i == 0,
                        };
                        // SAFETY: `multiply` checked the CPU's features.
                        unsafe { tile.run(sums) };
                    }
                }
                for (&(j, width), sums) in group.iter().zip(sums.chunks_exact(per_panel)) {
                    let at = s * strip * out.ldc + j;
                    // SAFETY: the block's strips and panels are its own (disjoint from every
                    // other block's), inside `c` and `add` (checked in `multiply`), which stay
                    // borrowed until every block is done.
                    unsafe { out.store_columns(at, rows, width, strip, sums) };
                }
            }
        }
    };
    match crew {
        Some(crew) if blocks.len() > 1 => crew.run(blocks.len(), &work),
        _ => work(0),
    }
}

/// Steps of `k` per block in [`multiply_columns`] (AVX2: 64 and 256 ran no differently).
const COLUMN_KC: usize = 128;

/// One [`Layout::Columns`] tile: a block of a strip of `A` (`k x strip`), and `width` columns
/// of `B` starting at `b[offsets[kk]]` in each row `kk`.
struct ColumnTile<'a> {
    kernel: Kernel,
    a: &'a [f32],
    b: &'a [f32],
    offsets: &'a [usize],
    width: usize,
    prefetch: bool,
}

impl ColumnTile<'_> {
    /// Adds the block's products to `sums` (`sums[c * strip + r]`, columns `c < width`).
    ///
    /// # Safety
    /// The CPU runs the kernel.
    unsafe fn run(&self, sums: &mut [f32]) {
        let (strip, widest) = (self.kernel.strip(), self.kernel.max_columns());
        assert!(self.width >= 1 && self.width <= widest);
        assert_eq!(self.a.len(), self.offsets.len() * strip);
        assert_eq!(sums.len(), widest * strip);
        // `multiply` checked every row's span against `B`'s length: per tile, this would be
        // a pass over the block's offsets.
        debug_assert!(self.offsets.iter().all(|&o| o + self.width <= self.b.len()));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the assertions (and `multiply`'s) bound the kernel's reads of `a` and `b`;
        // the caller promises the CPU's features.
        unsafe {
            // Panels of 1 to 3 columns (only in outputs whose rows are that narrow) have no
            // prefetching copy: rare, and not measured.
            match (self.kernel, self.width, self.prefetch) {
                (Kernel::Avx512, 1, _) => avx512::columns::<1, false>(self, sums),
                (Kernel::Avx512, 2, _) => avx512::columns::<2, false>(self, sums),
                (Kernel::Avx512, 3, _) => avx512::columns::<3, false>(self, sums),
                (Kernel::Avx512, 4, false) => avx512::columns::<4, false>(self, sums),
                (Kernel::Avx512, 4, true) => avx512::columns::<4, true>(self, sums),
                (Kernel::Avx512, 5, false) => avx512::columns::<5, false>(self, sums),
                (Kernel::Avx512, 5, true) => avx512::columns::<5, true>(self, sums),
                (Kernel::Avx512, 6, false) => avx512::columns::<6, false>(self, sums),
                (Kernel::Avx512, 6, true) => avx512::columns::<6, true>(self, sums),
                (Kernel::Avx512, 7, false) => avx512::columns::<7, false>(self, sums),
                (Kernel::Avx512, 7, true) => avx512::columns::<7, true>(self, sums),
                (Kernel::Avx512, _, false) => avx512::columns::<8, false>(self, sums),
                (Kernel::Avx512, _, true) => avx512::columns::<8, true>(self, sums),
                (Kernel::Avx2, 1, _) => avx2::columns::<1>(self, sums),
                (Kernel::Avx2, 2, _) => avx2::columns::<2>(self, sums),
                (Kernel::Avx2, 3, _) => avx2::columns::<3>(self, sums),
                (Kernel::Avx2, 4, _) => avx2::columns::<4>(self, sums),
                (Kernel::Avx2, 5, _) => avx2::columns::<5>(self, sums),
                (Kernel::Avx2, _, _) => avx2::columns::<6>(self, sums),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (sums, self.prefetch);
    }
}

impl Out {
    /// `C[r][c] = relu?(sums[c * strip + r] (+ add[r][c]))` for `r < rows`, `c < width`, at
    /// `c + at` (and `add + at`): the column kernel's sums are per column, `C` is row-major.
    /// Once per tile, after every step of `k`.
    ///
    /// # Safety
    /// Those elements are inside `C` (and `add`), and no other thread touches them meanwhile.
    unsafe fn store_columns(
        &self,
        at: usize,
        rows: usize,
        width: usize,
        strip: usize,
        sums: &[f32],
    ) {
        for r in 0..rows {
            for (c, column) in sums.chunks_exact(strip).take(width).enumerate() {
                let i = at + r * self.ldc + c;
                let mut x = column[r];
                if let Some(add) = self.add {
                    // SAFETY: the caller's.
                    x += unsafe { *add.add(i) };
                }
                if self.relu {
                    x = if x > 0.0 { x } else { 0.0 };
                }
                // SAFETY: the caller's.
                unsafe { *self.c.add(i) = x };
            }
        }
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

/// The most rows of a block whose tiles read `B`'s columns in place; more, and they pack
/// them (`block`).
const DIRECT_MAX_ROWS: usize = 64;

/// The deepest product whose AVX2 in-place tiles go panel by panel along `C`'s rows, rather
/// than strip by strip down its panels (`block`). With so short a `k` a strip's rows of `B`
/// are a few lines each and the tile's stores dominate: a panel's tiles in a row write its
/// rows of `C` front to back. SqueezeNet's first layer (64 rows, `k` = 27, a 3x3/2 layer's
/// wrapped columns) went from 15.4% to 10.6% of the model at 1 thread and the model's p50
/// fell 6.3% (a 2-core AMD EPYC, Zen 3, 6 alternating rounds); for every in-place block the
/// same order cost ResNet-50 8% (bench/RESULTS.md, session 23).
const PANELS_OUTER_MAX_K: usize = 32;

/// Where an in-place tile's vectors of wrapped columns lie (`RowsB::wrap` with runs at least
/// a vector wide, so that a vector spans at most two): vector `v`'s lanes start at `at[v]`
/// from the tile's first column, and those on `next[v]` (the first columns of the next run)
/// lie `gap` further on.
#[derive(Clone, Copy, Debug)]
struct Straddles {
    at: [usize; 3],
    next: [u16; 3],
    gap: usize,
}

impl Straddles {
    /// Columns `j..j + cols` (at most `kernel`'s `NR`) of `b`, whose runs are at least a
    /// vector wide.
    fn of(kernel: Kernel, b: &RowsB, wrap: [usize; 2], j: usize, cols: usize) -> Straddles {
        let ([width, pitch], lanes) = (wrap, kernel.lanes());
        debug_assert!(width >= lanes && cols <= kernel.nr());
        let mut straddles = Straddles {
            at: [0; 3],
            next: [0; 3],
            gap: pitch - width,
        };
        for v in 0..cols.div_ceil(lanes) {
            let first = j + v * lanes;
            straddles.at[v] = b.column(first) - b.column(j);
            let left = width - first % width;
            if left < lanes {
                straddles.next[v] = !((1u16 << left) - 1);
            }
        }
        straddles
    }
}

/// Where one vector of an in-place tile's row of `B` comes from: lanes `low` from `at` on
/// (from the tile's first column), lanes `high` from `next_at` on (the next run's, for a
/// vector that straddles two; otherwise `high` is empty and `next_at` is `at`, so that no load
/// reaches past the vector's last column).
#[derive(Clone, Copy, Debug, Default)]
struct VectorLanes {
    low: u16,
    at: usize,
    high: u16,
    next_at: usize,
}

impl VectorLanes {
    /// Each of the `V` vectors of `lanes` in a tile `cols` wide, whose columns are contiguous
    /// (`straddles` none) or wrapped as `straddles` says.
    fn of<const V: usize>(straddles: Option<Straddles>, cols: usize, lanes: usize) -> [Self; V] {
        let mut vectors = [VectorLanes::default(); V];
        for (v, vector) in vectors.iter_mut().enumerate() {
            let whole = ((1u32 << cols.saturating_sub(v * lanes).min(lanes)) - 1) as u16;
            let (at, next, gap) = match straddles {
                Some(s) => (s.at[v], s.next[v] & whole, s.gap),
                None => (v * lanes, 0, 0),
            };
            *vector = VectorLanes {
                low: whole & !next,
                at,
                high: next,
                next_at: if next != 0 { at + gap } else { at },
            };
        }
        vectors
    }
}

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
    let kernel = a.kernel;
    let (mr, nr, lanes, kc, mc, nc) = (
        kernel.mr(),
        kernel.nr(),
        kernel.lanes(),
        kernel.kc(),
        kernel.mc(),
        kernel.nc(),
    );
    assert!(rows.start.is_multiple_of(mr) && rows.end <= a.m && cols.end <= b.n);
    if rows.is_empty() || cols.is_empty() {
        return;
    }
    // Contiguous columns (a 1x1 convolution's input channels, a classifier's vector) and
    // few rows: the tile reads `B` where it lies, as no strip needs packing. A
    // packed strip serves every panel of the block, so the fewer the rows the less its
    // packing pays off; but a tile reading in place touches a page per row of `B` per step
    // of `k`. On an AMD EPYC the in-place read was as fast as packed or up to 17% faster on
    // SqueezeNet's, DenseNet-121's and ResNet-50's 1x1 shapes (18% at 2 threads where a
    // split by rows had each thread pack all of `B`); on an Intel Xeon it was 10-20% faster
    // up to 48 rows, even at 64, and 10-23% slower from 128 rows up (SqueezeNet's classifier:
    // 1000 rows, 139 vs 165 GFLOP/s; bench/RESULTS.md). 64 keeps the AMD gains at 64 rows
    // (ResNet-50's and SqueezeNet's squeeze layers, DenseNet's split in two at 2 threads).
    // Wrapped columns (a 3x3 or strided layer's output rows in its phase rows) too, when a
    // run is at least a vector wide: a vector's lanes then come from at most two runs, two
    // loads (`Straddles`). AVX2 (a 2-core AMD EPYC, Zen 3, gemm_shapes' layers with `B`
    // laid out as in a model, both ways in one process): 25-38% faster on SqueezeNet's
    // 16-row squeeze layer, -1 to +15% on ResNet-50's 7x7 first layer, -3 to +7% on
    // SqueezeNet's 3x3 16 -> 64, 4% slower on SqueezeNet's first layer (`k` = 27); whole
    // models within the machine's noise (bench/RESULTS.md, session 22).
    let direct = rows.len() <= DIRECT_MAX_ROWS && b.wrap.is_none_or(|[width, _]| width >= lanes);
    let need = if direct {
        0
    } else {
        kc.min(a.k.max(1)) * nc + MAX_LANES
    };
    if pack.len() < need {
        pack.resize(need, 0.0);
    }
    // Strips start on a cache line, so that no load of `B` in the micro-kernel straddles two
    // (the allocator only promises 16 bytes).
    let skip = pack.as_ptr().align_offset(64).min(pack.len());
    let pack = &mut pack[skip..];
    for j0 in cols.clone().step_by(nc) {
        let ncols = nc.min(cols.end - j0);
        for k0 in (0..a.k.max(1)).step_by(kc) {
            let ks = k0..(k0 + kc).min(a.k);
            if !direct {
                pack_b(kernel, b, ks.clone(), j0..j0 + ncols, pack);
            }
            let first = k0 == 0;
            let last = ks.end >= a.k;
            for i0 in rows.clone().step_by(mc) {
                let i1 = (i0 + mc).min(rows.end);
                let panels = i0 / mr..i1.div_ceil(mr);
                let last_panel = panels.end - 1;
                // Where the in-place vectors of the strip at column `j` lie: once per strip.
                let straddles = |j: usize| {
                    let wrap = b.wrap.filter(|_| direct)?;
                    Some(Straddles::of(kernel, b, wrap, j0 + j, nr.min(ncols - j)))
                };
                // The tile of panel `p` and the strip at column `j` of the block; with
                // `fetch_next`, an in-place tile also fetches the next strip's lines.
                let tile = |p: usize, j: usize, straddles: Option<Straddles>, fetch_next: bool| {
                    let (r0, tile_cols) = (p * mr, nr.min(ncols - j));
                    let first_column = b.column(j0 + j);
                    let tile = Tile {
                        kernel,
                        a: a.panel(p, ks.clone()),
                        b: if direct {
                            StripB::InPlace {
                                base: b.base[first_column..].as_ptr(),
                                offsets: &b.offsets[ks.clone()],
                                fetch_next: (fetch_next && j + nr < ncols)
                                    .then(|| b.column(j0 + j + nr) - first_column),
                                straddles,
                            }
                        } else {
                            let len = ks.len() * tile_cols.div_ceil(lanes) * lanes;
                            StripB::Packed(&pack[(j / nr) * ks.len() * nr..][..len])
                        },
                        kc: ks.len(),
                        rows: mr.min(rows.end - r0),
                        cols: tile_cols,
                        bias: first.then(|| &a.bias[r0..r0 + mr]),
                        relu: last && out.relu,
                        add: out
                            .add
                            .filter(|_| last)
                            .map(|add| add.wrapping_add(r0 * out.ldc + j0 + j)),
                    };
                    // SAFETY: the tile is inside the block (the caller's promise), and so
                    // inside `add`, which is as long as `C` (checked in `multiply`).
                    unsafe { tile.run(out.c.add(r0 * out.ldc + j0 + j), out.ldc) };
                };
                if direct && kernel == Kernel::Avx2 && a.k <= PANELS_OUTER_MAX_K {
                    // A panel's tiles one after another along its rows of `C`, each strip's
                    // straddles found once for all the panels.
                    let strips: Vec<_> =
                        (0..ncols).step_by(nr).map(|j| (j, straddles(j))).collect();
                    for p in panels {
                        for &(j, straddles) in &strips {
                            tile(p, j, straddles, true);
                        }
                    }
                } else {
                    // A strip's tiles down its panels, the strip's `B` in L1 for all but
                    // the first.
                    for j in (0..ncols).step_by(nr) {
                        let straddles = straddles(j);
                        for p in panels.clone() {
                            tile(p, j, straddles, p == last_panel);
                        }
                    }
                }
            }
        }
    }
}

/// Packs `b[ks, js]` as strips of `NR` columns (the last one as wide as it needs in whole
/// registers, zero-padded): `strip[s][kk][j]`.
///
/// Row by row of `B`, each read front to back: one stream at a time for the prefetcher.
/// Strip by strip, every strip read a line from each of its `KC` rows, and with AVX2 (16-
/// column strips) ResNet-50 ran slower: median of 8 alternating rounds 192 vs 169-173 ms
/// (bench/RESULTS.md).
fn pack_b(kernel: Kernel, b: &RowsB, ks: Range<usize>, js: Range<usize>, pack: &mut [f32]) {
    let (nr, lanes) = (kernel.nr(), kernel.lanes());
    let kc = ks.len();
    // Every strip's runs in column order: `(where the run starts in the strip's first row,
    // the strip's row width, the run's column from a row's offset, its length)`.
    let mut segments = [(0, 0, 0); MAX_NR];
    let mut runs = Vec::with_capacity(js.len().div_ceil(nr) * 2);
    let mut last = (0, 0, 0);
    for (s, j) in js.clone().step_by(nr).enumerate() {
        let cols = nr.min(js.end - j);
        let width = cols.div_ceil(lanes) * lanes;
        let count = b.runs(j, cols, &mut segments);
        let start = s * kc * nr;
        runs.extend(
            segments[..count]
                .iter()
                .map(|&(at, from, len)| (start + at, width, from, len)),
        );
        last = (start, cols, width);
    }
    let (last_start, last_cols, last_width) = last;
    for (kk, &offset) in b.offsets[ks].iter().enumerate() {
        let row = &b.base[offset..];
        for &(start, width, from, len) in &runs {
            let (dst, src) = (&mut pack[start + kk * width..][..len], &row[from..][..len]);
            match kernel {
                // SAFETY: `multiply` checked that the CPU runs the kernel; both slices are
                // `len` long.
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => unsafe { avx512::copy(dst.as_mut_ptr(), src.as_ptr(), len) },
                _ => copy_run(dst, src),
            }
        }
        if last_cols < last_width {
            pack[last_start + kk * last_width..][last_cols..last_width].fill(0.0);
        }
    }
}

/// `dst.copy_from_slice(src)` for runs of at most `NR` elements, as register moves: with AVX2
/// (16-column strips) a `memcpy` call per run took half as long as the micro-kernel itself
/// over gemm_shapes' layers (`perf`), and the compiler keeps these fixed-size copies inline.
#[inline(always)]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    debug_assert_eq!(dst.len(), src.len());
    let mut to = dst.chunks_exact_mut(8);
    let mut from = src.chunks_exact(8);
    for (to, from) in (&mut to).zip(&mut from) {
        let eight: [f32; 8] = from.try_into().unwrap();
        to.copy_from_slice(&eight);
    }
    let (to, from) = (to.into_remainder(), from.remainder());
    let mut i = 0;
    if from.len() >= 4 {
        let four: [f32; 4] = from[..4].try_into().unwrap();
        to[..4].copy_from_slice(&four);
        i = 4;
    }
    if from.len() - i >= 2 {
        let two: [f32; 2] = from[i..i + 2].try_into().unwrap();
        to[i..i + 2].copy_from_slice(&two);
        i += 2;
    }
    if i < from.len() {
        to[i] = from[i];
    }
}

/// Where a micro-tile's `kc` rows of `B` come from.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum StripB<'a> {
    /// A packed strip: `kc` rows of the tile's columns rounded up to whole registers.
    Packed(&'a [f32]),
    /// `B`'s rows where they lie: row `kk` of the tile's columns from `base +
    /// offsets[kk]` (`offsets` as long as `kc`), contiguous, or wrapped as `straddles` says.
    /// With `fetch_next` (a strip's last panel, or every tile of a block that goes panel by
    /// panel), the tile also fetches the next strip's lines of those rows, that far on, into
    /// L1.
    InPlace {
        base: *const f32,
        offsets: &'a [usize],
        fetch_next: Option<usize>,
        straddles: Option<Straddles>,
    },
}

/// One micro-tile's operands: `kc` steps of an `MR`-row panel of `A` and of `B`'s rows.
struct Tile<'a> {
    kernel: Kernel,
    a: &'a [f32],
    b: StripB<'a>,
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
        let (mr, nr, lanes) = (self.kernel.mr(), self.kernel.nr(), self.kernel.lanes());
        let vectors = self.cols.div_ceil(lanes);
        assert!(self.rows >= 1 && self.rows <= mr && self.cols >= 1 && self.cols <= nr);
        assert_eq!(self.a.len(), self.kc * mr);
        match self.b {
            StripB::InPlace { offsets, .. } => assert_eq!(offsets.len(), self.kc),
            StripB::Packed(b) => assert_eq!(b.len(), self.kc * vectors * lanes),
        }
        assert!(self.bias.is_none_or(|b| b.len() == mr));
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `multiply` checked that the CPU runs the kernel; the assertions above bound
        // the kernel's reads of `a`, a packed `b` and `bias`, `multiply`'s its reads of `B` in
        // place (every row holds `B`'s `n` columns, and the tile's lie among them), and the
        // caller its accesses to `c`.
        unsafe {
            use avx512::{tile, DIRECT, PACKED, WRAPPED};
            let read = match self.b {
                StripB::Packed(_) => PACKED,
                StripB::InPlace {
                    straddles: None, ..
                } => DIRECT,
                StripB::InPlace { .. } => WRAPPED,
            };
            match (self.kernel, vectors, read) {
                (Kernel::Avx512, 1, DIRECT) => tile::<1, DIRECT>(self, c, ldc),
                (Kernel::Avx512, 2, DIRECT) => tile::<2, DIRECT>(self, c, ldc),
                (Kernel::Avx512, _, DIRECT) => tile::<3, DIRECT>(self, c, ldc),
                (Kernel::Avx512, 1, WRAPPED) => tile::<1, WRAPPED>(self, c, ldc),
                (Kernel::Avx512, 2, WRAPPED) => tile::<2, WRAPPED>(self, c, ldc),
                (Kernel::Avx512, _, WRAPPED) => tile::<3, WRAPPED>(self, c, ldc),
                (Kernel::Avx512, 1, _) => tile::<1, PACKED>(self, c, ldc),
                (Kernel::Avx512, 2, _) => tile::<2, PACKED>(self, c, ldc),
                (Kernel::Avx512, _, _) => tile::<3, PACKED>(self, c, ldc),
                (Kernel::Avx2, 1, _) => avx2::tile::<1>(self, c, ldc),
                (Kernel::Avx2, _, _) => avx2::tile::<2>(self, c, ldc),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (c, ldc, vectors, self.relu, self.add);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{ColumnTile, StripB, Tile, VectorLanes};

    const MR: usize = super::Kernel::Avx512.mr();
    const LANES: usize = super::Kernel::Avx512.lanes();
    const STRIP: usize = super::Kernel::Avx512.strip();
    /// Vectors in a strip's 48 rows.
    const STRIP_VECTORS: usize = STRIP / LANES;

    /// The `48 x W` column kernel: per step of `k`, the strip's three vectors of `A` and `W`
    /// elements of `B`'s row broadcast, `3 W` multiply-adds into sums that stay in registers
    /// for the whole block; they start from and go back to `sums` (`sums[c * 48 + r]`, `8 x
    /// 48` of them). With `PREFETCH` (a block's first panel), each step also fetches the next
    /// block's lines.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn columns<const W: usize, const PREFETCH: bool>(
        t: &ColumnTile,
        sums: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); STRIP_VECTORS]; W];
        for c in 0..W {
            for v in 0..STRIP_VECTORS {
                acc[c][v] = _mm512_loadu_ps(sums.as_ptr().add(c * STRIP + v * LANES));
            }
        }
        let mut a = t.a.as_ptr();
        let b = t.b.as_ptr();
        for &offset in t.offsets {
            if PREFETCH {
                // The next block's line at this step, into L2: a block's worth of steps
                // (about 1300 cycles) ahead, more than a trip to memory.
                for v in 0..STRIP_VECTORS {
                    let ahead = a.wrapping_add(super::COLUMN_KC * STRIP + v * LANES);
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                }
            }
            let mut av = [_mm512_setzero_ps(); STRIP_VECTORS];
            for v in 0..STRIP_VECTORS {
                av[v] = _mm512_loadu_ps(a.add(v * LANES));
            }
            let row = b.add(offset);
            for c in 0..W {
                let x = _mm512_set1_ps(*row.add(c));
                for v in 0..STRIP_VECTORS {
                    acc[c][v] = _mm512_fmadd_ps(av[v], x, acc[c][v]);
                }
            }
            a = a.add(STRIP);
        }
        for c in 0..W {
            for v in 0..STRIP_VECTORS {
                _mm512_storeu_ps(sums.as_mut_ptr().add(c * STRIP + v * LANES), acc[c][v]);
            }
        }
    }

    /// `len` floats from `src` to `dst`, 16 at a time, the rest under a mask: a run of `B`
    /// into its packed strip (at most `NR` long, three vectors). `copy_run` compiles to
    /// 16-byte moves outside the kernels' target features; with these the packing took
    /// about the same share of SqueezeNet (`perf`: its loads wait on L3 either way), and the
    /// model ran 2% faster (alternating rounds with and without).
    ///
    /// # Safety
    /// The CPU runs AVX-512 F; `src` and `dst` are valid for `len` floats.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy(dst: *mut f32, src: *const f32, len: usize) {
        let mut i = 0;
        while i + LANES <= len {
            _mm512_storeu_ps(dst.add(i), _mm512_loadu_ps(src.add(i)));
            i += LANES;
        }
        if i < len {
            let mask = ((1u32 << (len - i)) - 1) as u16;
            _mm512_mask_storeu_ps(dst.add(i), mask, _mm512_maskz_loadu_ps(mask, src.add(i)));
        }
    }

    /// About 400 cycles of a full tile's arithmetic ahead (32 steps of `k`): a memory latency.
    const PREFETCH_A: usize = 1024;

    /// How a tile reads `B`: a packed strip, its rows in place, or its rows in place with
    /// wrapped columns (`Straddles`).
    pub(super) const PACKED: u8 = 0;
    pub(super) const DIRECT: u8 = 1;
    pub(super) const WRAPPED: u8 = 2;

    /// The `MR x (V * 16)` micro-kernel. Loops have constant trip counts and index the arrays
    /// with them, so that they unroll and the sums stay in registers (iterators over `acc`
    /// would do too, but this reads as the tile it computes).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const V: usize, const READ: u8>(t: &Tile, c: *mut f32, ldc: usize) {
        let mut masks = [0u16; V];
        for (v, mask) in masks.iter_mut().enumerate() {
            let left = t.cols.saturating_sub(v * LANES).min(LANES);
            *mask = ((1u32 << left) - 1) as u16;
        }
        let mut acc = [[_mm512_setzero_ps(); V]; MR];
        // At most `V + 1` lines a row, `V` being at most 3 (`Tile::run`).
        let mut lines = [c; MR * 4];
        let mut fetches = 0;
        match t.bias {
            Some(bias) => {
                // The tile's lines of `C`, fetched for writing: their trip from L3 or memory
                // overlaps the arithmetic instead of stalling the stores at the end (a
                // layer's output is rarely in cache: SqueezeNet's first convolution writes
                // 3 MiB). A row's vectors start anywhere in a line, so its last element's
                // line is fetched too. Two per step of `k`, in the loop below: issued all at
                // once, the 32 requests stalled the tile on an Intel Xeon (a quarter of the
                // time of SqueezeNet's first layer, whose `k` is 27). Every CPU with AVX-512
                // runs PREFETCHW (stable Rust has no intrinsic for it); a prefetch never
                // faults. (Fetching the next panel's lines as well ran SqueezeNet 3% slower.)
                for r in 0..MR {
                    if r < t.rows {
                        for v in 0..=V {
                            lines[fetches] =
                                c.wrapping_add(r * ldc + (v * LANES).min(V * LANES - 1));
                            fetches += 1;
                        }
                    }
                }
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
        let (mut b, base, offsets, fetch_next, straddles) = match t.b {
            StripB::Packed(b) => (b.as_ptr(), b.as_ptr(), [].as_slice(), None, None),
            StripB::InPlace {
                base,
                offsets,
                fetch_next,
                straddles,
            } => (base, base, offsets, fetch_next, straddles),
        };
        debug_assert_eq!(READ == PACKED, matches!(t.b, StripB::Packed(_)));
        debug_assert_eq!(READ == WRAPPED, straddles.is_some());
        let split = VectorLanes::of::<V>(straddles, t.cols, LANES);
        let offsets = offsets.as_ptr();
        for kk in 0..t.kc {
            if 2 * kk < fetches {
                for at in [lines[2 * kk], lines[(2 * kk + 1).min(fetches - 1)]] {
                    std::arch::asm!(
                        "prefetchw [{at}]",
                        at = in(reg) at,
                        options(nostack, preserves_flags, readonly)
                    );
                }
            }
            // `A`'s panels follow one another in memory (`PackedA`): fetch the line
            // `PREFETCH_A` bytes ahead, into this panel's rest or the next one, so that the
            // weights' trip from memory overlaps the arithmetic. A prefetch never faults.
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_byte_add(PREFETCH_A).cast());
            let mut bv = [_mm512_setzero_ps(); V];
            if READ != PACKED {
                // Masked: a row's last tile may end where the buffer does, and a wrapped
                // vector's lanes past its run come from the next run (a second load).
                let row = base.add(*offsets.add(kk));
                for v in 0..V {
                    let VectorLanes {
                        low,
                        at,
                        high,
                        next_at,
                    } = split[v];
                    bv[v] = _mm512_maskz_loadu_ps(low, row.add(at));
                    if READ == WRAPPED {
                        bv[v] = _mm512_mask_loadu_ps(bv[v], high, row.add(next_at));
                    }
                }
                if let Some(next) = fetch_next {
                    for v in 0..=V {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(next + v * LANES).cast());
                    }
                }
            } else {
                for v in 0..V {
                    bv[v] = _mm512_loadu_ps(b.add(v * LANES));
                }
            }
            for r in 0..MR {
                let ar = _mm512_set1_ps(*a.add(r));
                for v in 0..V {
                    acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
                }
            }
            a = a.add(MR);
            b = b.wrapping_add(V * LANES);
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

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ColumnTile, StripB, Tile, VectorLanes};

    const MR: usize = super::Kernel::Avx2.mr();
    const LANES: usize = super::Kernel::Avx2.lanes();
    const STRIP: usize = super::Kernel::Avx2.strip();
    /// Vectors in a strip's 16 rows.
    const STRIP_VECTORS: usize = STRIP / LANES;

    /// The `16 x W` column kernel: per step of `k`, the strip's two vectors of `A` and `W`
    /// elements of `B`'s row broadcast, `2 W` multiply-adds into sums that stay in registers
    /// for the whole block; they start from and go back to `sums` (`sums[c * 16 + r]`, `6 x
    /// 16` of them).
    ///
    /// # Safety
    /// As `ColumnTile::run`'s, and the CPU has AVX2 and FMA.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns<const W: usize>(t: &ColumnTile, sums: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); STRIP_VECTORS]; W];
        // SAFETY (every block below): `ColumnTile::run` checked the lengths of `sums` (`W`
        // columns of `STRIP`) and `a` (a strip's rows per offset), and `multiply` that every
        // row of `B` has `W` columns from its offset.
        for c in 0..W {
            for v in 0..STRIP_VECTORS {
                acc[c][v] = unsafe { _mm256_loadu_ps(sums.as_ptr().add(c * STRIP + v * LANES)) };
            }
        }
        let mut a = t.a.as_ptr();
        let b = t.b.as_ptr();
        for &offset in t.offsets {
            let mut av = [_mm256_setzero_ps(); STRIP_VECTORS];
            for v in 0..STRIP_VECTORS {
                av[v] = unsafe { _mm256_loadu_ps(a.add(v * LANES)) };
            }
            let row = unsafe { b.add(offset) };
            for c in 0..W {
                let x = unsafe { _mm256_broadcast_ss(&*row.add(c)) };
                for v in 0..STRIP_VECTORS {
                    acc[c][v] = _mm256_fmadd_ps(av[v], x, acc[c][v]);
                }
            }
            a = unsafe { a.add(STRIP) };
        }
        for c in 0..W {
            for v in 0..STRIP_VECTORS {
                unsafe {
                    _mm256_storeu_ps(sums.as_mut_ptr().add(c * STRIP + v * LANES), acc[c][v])
                };
            }
        }
    }

    /// The widest tile's columns.
    const NR: usize = super::Kernel::Avx2.nr();
    /// As the AVX-512 kernel's: 32 steps of `k` ahead.
    const PREFETCH_A: usize = 32 * MR * 4;

    /// How a tile reads `B`: a packed strip; its rows in place, each vector whole in one run
    /// (`DIRECT`); in place, a vector that straddles two runs blended from two loads
    /// (`WRAPPED`); in place under masks, for a tile narrower than its vectors, whose last
    /// lanes may lie past `B`'s end (`MASKED`).
    const PACKED: u8 = 0;
    const DIRECT: u8 = 1;
    const WRAPPED: u8 = 2;
    const MASKED: u8 = 3;

    /// A tile of `rows x cols` (`V` = `cols / 8` rounded up). AVX2 has no cheap masked
    /// store, so a tile on the edge of `C` goes through a whole one on the stack.
    ///
    /// # Safety
    /// As `Tile::run`'s, and the CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile<const V: usize>(t: &Tile, c: *mut f32, ldc: usize) {
        let (read, split) = match t.b {
            StripB::Packed(_) => (PACKED, [VectorLanes::default(); V]),
            StripB::InPlace { straddles, .. } => {
                let split = VectorLanes::of::<V>(straddles, t.cols, LANES);
                let read = if t.cols < V * LANES {
                    MASKED
                } else if split.iter().any(|vector| vector.high != 0) {
                    WRAPPED
                } else {
                    DIRECT
                };
                (read, split)
            }
        };
        if t.rows == MR && t.cols == V * LANES {
            // SAFETY: the whole tile is the caller's.
            return unsafe {
                match read {
                    PACKED => whole::<V, PACKED>(t, &split, c, ldc, t.add),
                    DIRECT => whole::<V, DIRECT>(t, &split, c, ldc, t.add),
                    _ => whole::<V, WRAPPED>(t, &split, c, ldc, t.add),
                }
            };
        }
        let mut sums = [0f32; MR * NR];
        let mut add = [0f32; MR * NR];
        for r in 0..t.rows {
            let (sums, add) = (&mut sums[r * NR..][..t.cols], &mut add[r * NR..][..t.cols]);
            // SAFETY: row `r`'s `cols` elements are the caller's, in `c` and in `t.add`.
            unsafe {
                if t.bias.is_none() {
                    sums.copy_from_slice(std::slice::from_raw_parts(c.add(r * ldc), t.cols));
                }
                if let Some(from) = t.add {
                    add.copy_from_slice(std::slice::from_raw_parts(from.add(r * ldc), t.cols));
                }
            }
        }
        let from = t.add.map(|_| add.as_ptr());
        let to = sums.as_mut_ptr();
        // SAFETY: `sums` and `add` hold `MR` rows of `NR`.
        unsafe {
            match read {
                PACKED => whole::<V, PACKED>(t, &split, to, NR, from),
                DIRECT => whole::<V, DIRECT>(t, &split, to, NR, from),
                WRAPPED => whole::<V, WRAPPED>(t, &split, to, NR, from),
                _ => whole::<V, MASKED>(t, &split, to, NR, from),
            }
        }
        for (r, sums) in sums.chunks_exact(NR).take(t.rows).enumerate() {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), t.cols) }
                .copy_from_slice(&sums[..t.cols]);
        }
    }

    /// Lanes whose bit is set in `bits`, as a mask for `_mm256_maskload_ps` and
    /// `_mm256_blendv_ps` (all ones).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes_of(bits: u16) -> __m256i {
        let lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let set = _mm256_and_si256(_mm256_set1_epi32(i32::from(bits)), lane);
        _mm256_cmpeq_epi32(set, lane)
    }

    /// The `6 x (V * 8)` micro-kernel on a whole tile of `c` (and of `add`, as `c`'s), with
    /// constant trip counts so that the loops unroll and the sums stay in registers; `READ`
    /// says how it reads `B`, in place from where `split` says (`t.b`, `t.cols` and `split`
    /// agree with it: `tile`).
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn whole<const V: usize, const READ: u8>(
        t: &Tile,
        split: &[VectorLanes; V],
        c: *mut f32,
        ldc: usize,
        add: Option<*const f32>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; MR];
        for r in 0..MR {
            for v in 0..V {
                acc[r][v] = match t.bias {
                    Some(bias) => _mm256_set1_ps(bias[r]),
                    // SAFETY: the tile is the caller's.
                    None => unsafe { _mm256_loadu_ps(c.add(r * ldc + v * LANES)) },
                };
            }
        }
        let mut a = t.a.as_ptr();
        let (mut b, offsets, fetch_next) = match t.b {
            StripB::Packed(b) => (b.as_ptr(), [].as_slice(), None),
            StripB::InPlace {
                base,
                offsets,
                fetch_next,
                ..
            } => (base, offsets, fetch_next),
        };
        debug_assert_eq!(READ == PACKED, matches!(t.b, StripB::Packed(_)));
        // The in-place lanes as vector masks, for the masked loads and the blend.
        let (mut low, mut high) = ([_mm256_setzero_si256(); V], [_mm256_setzero_si256(); V]);
        if READ == WRAPPED || READ == MASKED {
            for v in 0..V {
                low[v] = lanes_of(split[v].low);
                high[v] = lanes_of(split[v].high);
            }
        }
        let offsets = offsets.as_ptr();
        for kk in 0..t.kc {
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_byte_add(PREFETCH_A).cast());
            let mut bv = [_mm256_setzero_ps(); V];
            if READ == PACKED {
                for v in 0..V {
                    // SAFETY: `Tile::run` checked `b`'s length: `kc` rows of `V` registers.
                    bv[v] = unsafe { _mm256_loadu_ps(b.add(v * LANES)) };
                }
                b = b.wrapping_add(V * LANES);
            } else {
                // SAFETY (every load): `multiply` checked that every row holds `B`'s columns
                // from its offset, and the tile's lie among them. A `DIRECT` or `WRAPPED`
                // tile's vectors are whole: each load starts at one of the vector's columns
                // and ends at or before its last. A `MASKED` one reads only its columns.
                let row = unsafe { b.add(*offsets.add(kk)) };
                for v in 0..V {
                    let (at, next_at) = (split[v].at, split[v].next_at);
                    bv[v] = match READ {
                        DIRECT => unsafe { _mm256_loadu_ps(row.add(at)) },
                        WRAPPED => unsafe {
                            let first = _mm256_loadu_ps(row.add(at));
                            let next = _mm256_loadu_ps(row.add(next_at));
                            _mm256_blendv_ps(first, next, _mm256_castsi256_ps(high[v]))
                        },
                        _ => unsafe {
                            let first = _mm256_maskload_ps(row.add(at), low[v]);
                            let next = _mm256_maskload_ps(row.add(next_at), high[v]);
                            _mm256_or_ps(first, next)
                        },
                    };
                }
                if let Some(next) = fetch_next {
                    // The next strip's lines of this row, into L1 for the next tile. A
                    // prefetch never faults.
                    for at in [next, next + V * LANES - 1] {
                        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at).cast());
                    }
                }
            }
            for r in 0..MR {
                // SAFETY: and `a`'s: `kc` rows of `MR`.
                let ar = _mm256_set1_ps(unsafe { *a.add(r) });
                for v in 0..V {
                    acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
                }
            }
            // SAFETY: one past the last row at most.
            a = unsafe { a.add(MR) };
        }
        if let Some(add) = add {
            for r in 0..MR {
                for v in 0..V {
                    // SAFETY: the tile is the caller's in `add` too.
                    let x = unsafe { _mm256_loadu_ps(add.add(r * ldc + v * LANES)) };
                    acc[r][v] = _mm256_add_ps(acc[r][v], x);
                }
            }
        }
        if t.relu {
            let zero = _mm256_setzero_ps();
            for row in acc.iter_mut() {
                for x in row.iter_mut() {
                    *x = _mm256_max_ps(*x, zero);
                }
            }
        }
        for r in 0..MR {
            for v in 0..V {
                // SAFETY: the tile is the caller's.
                unsafe { _mm256_storeu_ps(c.add(r * ldc + v * LANES), acc[r][v]) };
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

    /// Every kernel this CPU runs (none, on a CPU without AVX2: nothing to check there), in
    /// every layout it has.
    #[test]
    fn matches_a_plain_matrix_multiply_on_ragged_shapes() {
        for kernel in Kernel::here() {
            matches_a_plain_matrix_multiply(kernel, Layout::Panels);
            matches_a_plain_matrix_multiply(kernel, Layout::Columns);
        }
    }

    #[test]
    fn the_column_layout_is_chosen_where_it_saves_work() {
        use Layout::{Columns, Panels};
        for (kernel, m, k, n, want) in [
            // A 7x7 layer: 49 columns cost the panels 64; 512 rows are whole strips.
            (Kernel::Avx512, 512, 4608, 49, Columns),
            (Kernel::Avx512, 2048, 1024, 49, Columns),
            // 32 rows would be padded to a 48-row strip: more waste than 64 columns for 49.
            (Kernel::Avx512, 32, 1152, 49, Panels),
            // 196 columns (14x14) are 4 x 48 + 4: the panels pad 6%, the strips 256 rows to 288.
            (Kernel::Avx512, 256, 2304, 196, Panels),
            (Kernel::Avx512, 64, 576, 3136, Panels),
            // AVX2: few rows in whole strips (DenseNet's 3x3 128 -> 32, ResNet-50's 3x3 64).
            (Kernel::Avx2, 32, 1152, 3136, Columns),
            (Kernel::Avx2, 64, 576, 3136, Columns),
            (Kernel::Avx2, 512, 4608, 49, Panels),
            (Kernel::Avx2, 24, 1152, 3136, Panels),
        ] {
            let got = Layout::for_product(kernel, m, k, n);
            assert_eq!(got, want, "{kernel:?} {m} x {k} x {n}");
        }
    }

    fn matches_a_plain_matrix_multiply(kernel: Kernel, layout: Layout) {
        let crew = Crew::new(2);
        let _hot = crew.hold();
        // Rows not a multiple of MR, columns of every tail width, K across several KC blocks,
        // N across several NC blocks; on one thread and on three, which split the larger
        // shapes by columns and by rows (panels and strips), at ragged boundaries.
        for &(m, k, n) in &[
            (1, 1, 1),
            (8, 3, 16),
            (13, 27, 49),
            (16, 129, 63),
            (30, 300, 17),
            (64, 257, kernel.nc() + kernel.nr() + 5),
            (250, 600, 49),
            (97, 40, 23),
            // A short `k` over many panels and strips (SqueezeNet's first layer: 64 rows,
            // `k` = 27), which AVX2 runs panel by panel when it reads `B` in place.
            (64, 27, 3 * kernel.nr() + 5),
            // Split by columns between three threads at 88 and 176, inside a strip (AVX2),
            // read in place and packed.
            (30, 300, 250),
            (70, 100, 250),
            // Too few columns to share out: the column layout's strips go to the threads.
            (64, 2048, 12),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bias = values(m, 3);
            let packed = PackedA::with_layout(kernel, layout, &a, m, k, &bias);
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
                // Runs at least a vector wide (read in place, a vector from two runs at most):
                // 20 of 23, 56 of 58 (a 3x3 layer at 56x56); with AVX2 also 8 of 9 (one
                // vector wide) and 13 of 15 (a 13x13 output: nearly every tile straddles).
                (Some([20, 23]), false, None, false),
                (Some([20, 23]), true, Some(&crew), true),
                (Some([56, 58]), true, None, true),
                (Some([8, 9]), true, None, true),
                (Some([13, 15]), false, Some(&crew), true),
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
                            "{kernel:?} {layout:?} {m}x{k}x{n} wrap {wrap:?} relu {relu} residual {residual}: c[{i}][{j}] = {got}, want {want}"
                        );
                    }
                    assert_eq!(
                        c[i * ldc + n],
                        7.0,
                        "{kernel:?} {layout:?} {m}x{k}x{n}: column past n written"
                    );
                }
            }
        }
    }
}
