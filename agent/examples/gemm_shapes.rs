//! GFLOP/s of our convolution matrix multiply (`rewrite::gemm`) on its own, on the shapes of
//! SqueezeNet's first layer, ResNet-50's layers and DenseNet-121's 3x3 layers (`M` output
//! channels, `K` = input channels x kernel taps, `N` output positions), on one thread and on
//! all cores, best of 20 runs each, alternated so that machine noise hits both alike; for 3x3
//! and 7x7 layers also on one thread with whole phase rows (no `wrap`), counting only the
//! output's columns. Every micro-kernel this CPU runs (AVX-512, AVX2), in panels and, where
//! a model's layer gets another layout (`Layout::for_product`), in that one too. `B` lies as
//! GemmConv reads it in a model (`rows_of`): a channel's taps overlap in its phase planes.
//! Prints a Markdown table.
//!
//! Usage: gemm_shapes

use plaster_agent::inference::rewrite::gemm::{self, Epilogue, Kernel, Layout, PackedA, RowsB};
use plaster_agent::inference::warm::Crew;
use std::time::Instant;

/// Name, `M`, `K`, `N`, and for a 3x3 or 7x7 layer its kernel size, stride and output width:
/// GemmConv reads `B` as its taps in the input's stride phases (`Window2d::tap_offset`),
/// output rows of that width from phase rows `(kernel - 1) / stride` wider (`RowsB::wrap`).
type Shape = (&'static str, usize, usize, usize, Option<[usize; 3]>);
const SHAPES: [Shape; 12] = [
    (
        "SqueezeNet conv1 3x3/2, 111x111",
        64,
        27,
        111 * 111,
        Some([3, 2, 111]),
    ),
    (
        "conv1 7x7/2, 112x112",
        64,
        147,
        112 * 112,
        Some([7, 2, 112]),
    ),
    ("3x3 64, 56x56", 64, 576, 56 * 56, Some([3, 1, 56])),
    ("1x1 64 -> 256, 56x56", 256, 64, 3136, None),
    ("1x1 256 -> 64, 56x56", 64, 256, 3136, None),
    ("3x3 128, 28x28", 128, 1152, 28 * 28, Some([3, 1, 28])),
    ("3x3 256, 14x14", 256, 2304, 14 * 14, Some([3, 1, 14])),
    ("3x3 512, 7x7", 512, 4608, 7 * 7, Some([3, 1, 7])),
    (
        "DenseNet 3x3 128 -> 32, 56x56",
        32,
        1152,
        56 * 56,
        Some([3, 1, 56]),
    ),
    (
        "DenseNet 3x3 128 -> 32, 28x28",
        32,
        1152,
        28 * 28,
        Some([3, 1, 28]),
    ),
    ("1x1 1024 -> 2048, 7x7", 2048, 1024, 49, None),
    ("1x1 2048 -> 512, 7x7", 512, 2048, 49, None),
];

/// `B`'s row offsets for `k` rows of an `n`-column product, its wrap, and the length of the
/// buffer they read: a 1x1 layer's input channel planes, or a `kernel x kernel` layer's taps
/// in the phase planes of its input (`stride x stride` per channel, as GemmConv splits them),
/// so that the taps of a channel overlap in memory as they do in a model.
fn rows_of(
    k: usize,
    n: usize,
    conv: Option<[usize; 3]>,
) -> (Vec<usize>, Option<[usize; 2]>, usize) {
    let Some([kernel, stride, width]) = conv else {
        return ((0..k).map(|c| c * n).collect(), None, k * n);
    };
    let pitch = width + (kernel - 1) / stride;
    let phase_len = (n / width + (kernel - 1) / stride) * pitch;
    let taps = kernel * kernel;
    let offsets = (0..k)
        .map(|row| {
            let (c, tap) = (row / taps, row % taps);
            let (ky, kx) = (tap / kernel, tap % kernel);
            let phase = (c * stride + ky % stride) * stride + kx % stride;
            phase * phase_len + (ky / stride) * pitch + kx / stride
        })
        .collect();
    // A wide row (below) reads `(n / width) * pitch` columns from the last tap's offset.
    let len = k / taps * stride * stride * phase_len + pitch;
    (offsets, Some([width, pitch]), len)
}

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 201) as f32 / 100.0 - 1.0)
        .collect()
}

fn main() -> anyhow::Result<()> {
    if !gemm::available() {
        println!("this CPU has neither AVX-512 nor AVX2: GemmConv does not run here");
        return Ok(());
    }
    let cores = std::thread::available_parallelism()?.get();
    let crew = Crew::new(cores - 1);
    let _hot = crew.hold();
    println!(
        "| kernel | layout | layer | M | K | N | 1 thread GFLOP/s | {cores} threads GFLOP/s | speedup | 1 thread, wide rows |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|");
    // Every kernel in panels, and also in the layout a model gets where that differs.
    let runs = Kernel::here().flat_map(|kernel| {
        SHAPES.into_iter().flat_map(move |s @ (_, m, k, n, _)| {
            let chosen = Layout::for_product(kernel, m, k, n);
            std::iter::once((kernel, Layout::Panels, s))
                .chain((chosen != Layout::Panels).then_some((kernel, chosen, s)))
        })
    });
    for (kernel, layout, (name, m, k, n, conv)) in runs {
        let a = PackedA::with_layout(kernel, layout, &values(m * k, 1), m, k, &values(m, 3));
        let (offsets, wrap, len) = rows_of(k, n, conv);
        let span = wrap.map_or(n, |[width, pitch]| n / width * pitch);
        let b = values(len, 2);
        let rows = RowsB {
            base: &b,
            offsets: &offsets,
            n,
            wrap,
        };
        // The same rows read whole (the phase rows' extra columns computed and dropped),
        // the way GemmConv read them before `wrap`: GFLOP/s of the useful columns.
        let wide = RowsB {
            base: &b,
            offsets: &offsets,
            n: span,
            wrap: None,
        };
        let mut c = vec![0f32; m * span];
        let mut best = [f64::MAX; 3];
        for _ in 0..20 {
            for (slot, (b, threads)) in [(&rows, None), (&rows, Some(&crew)), (&wide, None)]
                .into_iter()
                .enumerate()
            {
                if slot == 2 && wrap.is_none() {
                    continue;
                }
                let t = Instant::now();
                gemm::multiply(&a, b, &mut c, b.n, Epilogue::relu(true), threads);
                best[slot] = best[slot].min(t.elapsed().as_secs_f64());
            }
        }
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let wide = match wrap {
            Some(_) => format!("{:.1}", gflop / best[2]),
            None => "-".to_string(),
        };
        println!(
            "| {kernel:?} | {layout:?} | {name} | {m} | {k} | {n} | {:.1} | {:.1} | {:.2} | {wide} |",
            gflop / best[0],
            gflop / best[1],
            best[0] / best[1]
        );
    }
    Ok(())
}
