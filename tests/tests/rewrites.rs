//! Our graph rewrites (agent/src/inference/rewrite/) against tract's unmodified plan: each
//! rewrite on a graph that exercises it (odd channel counts, strides, padding, broadcast
//! shapes), the patterns it must leave alone, and every model in models/. Outputs must agree
//! within `rewrite::TOLERANCE` of each output's largest magnitude. Then the NNEF model cache:
//! a cached model computes what the ONNX one does, and a broken entry is replaced.

use plaster_agent::inference::cache::ModelCache;
use plaster_agent::inference::rewrite::{self, Applied};
use plaster_agent::inference::{
    select_runtime, to_vec, DeviceKind, ModelSource, OnnxModel, PlanOptions, Precision,
    PreparedModel,
};
use plaster_agent_tests::model_path;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use tract_onnx::prelude::*;

fn prepare(rel: &str, rewrites: bool) -> PreparedModel {
    prepare_with(rel, rewrites, 1, None)
}

fn prepare_cached(rel: &str, rewrites: bool, cache: Option<ModelCache>) -> PreparedModel {
    prepare_with(rel, rewrites, 1, cache)
}

fn prepare_with(
    rel: &str,
    rewrites: bool,
    threads: usize,
    cache: Option<ModelCache>,
) -> PreparedModel {
    let model = OnnxModel::load(ModelSource::resolve(&model_path(rel)).unwrap())
        .unwrap()
        .with_cache(cache);
    let cpu = select_runtime(DeviceKind::Cpu).unwrap();
    let options = PlanOptions::new(Precision::F32, threads).with_rewrites(rewrites);
    PreparedModel::prepare(&model, model.natural_batch(), &cpu, options).unwrap()
}

/// Standard-normal inputs (negative values too, so ReLUs and max pools see both signs).
fn normal_inputs(prepared: &PreparedModel, seed: u64) -> TVec<TValue> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..prepared.input_count())
        .map(|ix| {
            let shape = prepared.input_shape(ix);
            let values: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_shape(&shape, &values).unwrap().into_tvalue()
        })
        .collect()
}

/// Runs `rel` with and without rewrites on a few inputs and returns what was rewritten.
fn rewritten_outputs_match(rel: &str) -> Applied {
    let ours = prepare(rel, true);
    let theirs = prepare(rel, false);
    assert_eq!(theirs.rewrites().total(), 0, "{rel}: --no-rewrites rewrote");
    outputs_match(rel, &ours, &theirs);
    ours.rewrites().clone()
}

fn outputs_match(rel: &str, ours: &PreparedModel, theirs: &PreparedModel) {
    let (mut a, mut b) = (ours.session().unwrap(), theirs.session().unwrap());
    for seed in 0..4 {
        let inputs = normal_inputs(theirs, seed);
        let (x, y) = (a.run(inputs.clone()).unwrap(), b.run(inputs).unwrap());
        assert_eq!(x.len(), y.len());
        for (ix, (x, y)) in x.iter().zip(y.iter()).enumerate() {
            assert_eq!(x.shape(), y.shape(), "{rel} output {ix}");
            if !y.datum_type().is_float() {
                assert_eq!(x, y, "{rel} output {ix}");
                continue;
            }
            let (x, y) = (to_vec::<f32>(x).unwrap(), to_vec::<f32>(y).unwrap());
            let scale = y.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = x
                .iter()
                .zip(&y)
                .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= rewrite::TOLERANCE * scale,
                "{rel} output {ix}: max |diff| {diff} above {} x {scale}",
                rewrite::TOLERANCE
            );
        }
    }
}

#[test]
fn affine_chain_becomes_one_pass() {
    // Batch norm (Mul + Add once decluttered), Mul, Add, Sub, Mul by a scalar and ReLU.
    let applied = rewritten_outputs_match("testdata/rewrites/affine_chain.onnx");
    assert_eq!(
        applied,
        Applied {
            affine_chains: 1,
            ..Applied::default()
        }
    );
}

#[test]
fn affine_chain_with_constants_first_on_rank_3() {
    // c - x, b + x, s * x with [3, 1] and [1, 3, 1] constants on a [1, 3, 10] tensor.
    let applied = rewritten_outputs_match("testdata/rewrites/affine_const_first.onnx");
    assert_eq!(applied.affine_chains, 1);
}

#[test]
fn an_intermediate_that_is_an_output_is_left_alone() {
    // x * s is a graph output: it must still be computed on its own; only Add + ReLU merge.
    let applied = rewritten_outputs_match("testdata/rewrites/affine_intermediate_output.onnx");
    assert_eq!(applied.affine_chains, 1);
    let ours = prepare("testdata/rewrites/affine_intermediate_output.onnx", true);
    let outputs = ours.output_facts().unwrap();
    assert_eq!(outputs.len(), 2);
}

#[test]
fn constants_that_are_not_per_channel_are_left_alone() {
    let applied = rewritten_outputs_match("testdata/rewrites/affine_not_per_channel.onnx");
    assert_eq!(applied, Applied::default());
}

#[test]
fn batch_norms_fold_into_grouped_and_depthwise_convolutions() {
    // Depthwise 3x3/2 (padded, biased) + batch norm, then a 3-group 1x1 + Mul + Add + ReLU.
    let applied = rewritten_outputs_match("testdata/rewrites/grouped_conv_bn.onnx");
    assert_eq!(
        applied,
        Applied {
            folded_into_convs: 2,
            // The grouped 1x1 convolution, its ReLU in the kernel's epilogue.
            gemm_convs: gemm_convs(1),
            depthwise_convs: 1,
            ..Applied::default()
        }
    );
}

/// What `GemmConv` replaces: `count` convolutions where the CPU runs our kernel, else none.
fn gemm_convs(count: usize) -> usize {
    if rewrite::gemm_kernel_available() {
        count
    } else {
        0
    }
}

#[test]
fn convolutions_as_our_matrix_multiply_match_tract() {
    // 3x3 with strides 2x3 and asymmetric padding + ReLU; 1x1 (tract's EinSum) to 70 channels
    // + scale and bias; 5x5 over 21 channels whose output is also a graph output (its ReLU,
    // the other output, must stay a separate node). A batch of 2.
    let rel = "testdata/rewrites/gemm_conv.onnx";
    let applied = rewritten_outputs_match(rel);
    assert_eq!(
        applied,
        Applied {
            gemm_convs: gemm_convs(3),
            ..Applied::default()
        }
    );
    let outputs = prepare(rel, true).output_facts().unwrap();
    assert_eq!(outputs.len(), 3);
}

/// The op kinds left in the plan (one profiled run).
fn op_kinds(prepared: &PreparedModel) -> Vec<String> {
    let inputs = normal_inputs(prepared, 0);
    let profile = prepared
        .profile(&[inputs], std::time::Duration::ZERO)
        .unwrap();
    profile.ops.into_iter().map(|op| op.op).collect()
}

#[test]
fn residual_adds_and_strided_1x1_convolutions_go_into_the_matrix_multiply() {
    // A residual block (3x3 + batch norm + its input + ReLU), two 1x1/2 convolutions on 9x10
    // summed, a 1x1 padded after, a 1x1 with strides 3x2 added to itself, and a grouped 1x1
    // added to the block's input + ReLU.
    let rel = "testdata/rewrites/residual_conv.onnx";
    let applied = rewritten_outputs_match(rel);
    assert_eq!(
        applied,
        Applied {
            gemm_convs: gemm_convs(7),
            ..Applied::default()
        }
    );
    let theirs = op_kinds(&prepare(rel, false));
    assert!(theirs.iter().any(|op| op == "Downsample"), "{theirs:?}");
    if rewrite::gemm_kernel_available() {
        // The three residual adds went into epilogues and the downsampling into the
        // convolutions; only x + x is left to tract.
        let ours = op_kinds(&prepare(rel, true));
        assert!(!ours.iter().any(|op| op == "Downsample"), "{ours:?}");
        let adds = ours.iter().filter(|op| op.contains("Add")).count();
        assert_eq!(adds, 1, "{ours:?}");
    }
}

#[test]
fn classifier_matrix_multiplies_go_into_gemm_conv() {
    // A global average pool, Flatten and a Gemm (weights [O, I]) + bias + ReLU, then a MatMul
    // (weights [I, O], transposed when packed) and a Gemm under the size GemmConv takes.
    let rel = "testdata/rewrites/classifier.onnx";
    let applied = rewritten_outputs_match(rel);
    assert_eq!(
        applied,
        Applied {
            gemm_convs: gemm_convs(2),
            ..Applied::default()
        }
    );
    if rewrite::gemm_kernel_available() {
        // The bias and the ReLU went into the first one's epilogue; the small Gemm is tract's.
        let ours = op_kinds(&prepare(rel, true));
        let matmuls = ours.iter().filter(|op| op.contains("MatMul")).count();
        assert!(matmuls >= 1, "{ours:?}");
        assert!(!ours.iter().any(|op| op.contains("Max")), "{ours:?}");
    }
}

#[test]
fn depthwise_convolutions_over_rows_match_tract() {
    // A 5x3 window with asymmetric padding and no bias; a 3x3 window with strides 2x3.
    let applied = rewritten_outputs_match("testdata/rewrites/depthwise_conv.onnx");
    assert_eq!(
        applied,
        Applied {
            depthwise_convs: 2,
            ..Applied::default()
        }
    );
}

#[test]
fn depthwise_convolutions_on_wide_planes_match_tract() {
    // 3x3 padded on 20x37 and 5x5 with stride 2 on 10x19: planes of many runs, and ends of
    // runs past the output that must be dropped.
    let applied = rewritten_outputs_match("testdata/rewrites/depthwise_wide.onnx");
    assert_eq!(
        applied,
        Applied {
            depthwise_convs: 2,
            ..Applied::default()
        }
    );
}

#[test]
fn lrn_over_planes_matches_tract() {
    // size 5 / beta 0.75 (the square-root path) and size 4 / beta 0.6 / bias 2 (powf).
    let applied = rewritten_outputs_match("testdata/rewrites/lrn.onnx");
    assert_eq!(
        applied,
        Applied {
            lrn: 2,
            ..Applied::default()
        }
    );
}

#[test]
fn max_pools_over_rows_match_tract() {
    // 3x3/2 padded, 2x2/2 ceil mode, asymmetric padding, a 2x3 window with strides 1x2, a 2x4
    // window with stride 3 (the generic phase split).
    let applied = rewritten_outputs_match("testdata/rewrites/max_pool.onnx");
    assert_eq!(
        applied,
        Applied {
            max_pools: 5,
            ..Applied::default()
        }
    );
}

#[test]
fn average_pools_over_rows_match_tract() {
    // 3x3/2 padded, 2x2/2, 2x2/2 in ceil mode: the divisor is the window's cells inside the
    // input. A 7x7 one with stride 1 and one that counts padding stay tract's.
    let rel = "testdata/rewrites/avg_pool.onnx";
    let applied = rewritten_outputs_match(rel);
    assert_eq!(
        applied,
        Applied {
            avg_pools: 3,
            ..Applied::default()
        }
    );
    let ours = op_kinds(&prepare(rel, true));
    assert!(ours.iter().any(|op| op == "RowAvgPool"), "{ours:?}");
    assert!(ours.iter().any(|op| op.contains("SumPool")), "{ours:?}");
}

#[test]
fn every_bundled_model_matches_tract_with_rewrites() {
    assert_eq!(rewritten_outputs_match("digits"), Applied::default());
    let squeezenet = rewritten_outputs_match("squeezenet/model.onnx");
    assert_eq!(squeezenet.max_pools, 3, "{squeezenet:?}");
    // All its convolutions: 26 in the ONNX graph, 32 once tract has split the six 1x1
    // convolutions over a concatenation into one per concatenated input.
    assert_eq!(squeezenet.gemm_convs, gemm_convs(32), "{squeezenet:?}");
}

#[test]
fn rewrites_on_three_threads_match_tract_on_one() {
    // A crew of two helpers shares out GEMM blocks, whole groups, and the planes of pools,
    // depthwise convolutions and affine passes (SqueezeNet's are large enough to be split).
    for rel in [
        "testdata/rewrites/grouped_conv_bn.onnx",
        "testdata/rewrites/gemm_conv.onnx",
        "testdata/rewrites/depthwise_conv.onnx",
        "testdata/rewrites/depthwise_wide.onnx",
        "testdata/rewrites/lrn.onnx",
        "testdata/rewrites/max_pool.onnx",
        "testdata/rewrites/avg_pool.onnx",
        "testdata/rewrites/residual_conv.onnx",
        "squeezenet/model.onnx",
    ] {
        let ours = prepare_with(rel, true, 3, None);
        let theirs = prepare(rel, false);
        outputs_match(rel, &ours, &theirs);
    }
}

#[test]
fn a_cached_model_computes_what_the_onnx_model_does() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(dir.path().join("models"));
    for rel in ["digits", "squeezenet/model.onnx"] {
        let sha256 = OnnxModel::load(ModelSource::resolve(&model_path(rel)).unwrap())
            .unwrap()
            .sha256;
        let entry = cache.entry(&sha256, 1);
        assert!(!entry.exists());
        // The first load declutters the ONNX graph and writes the entry; the second reads it.
        let first = prepare_cached(rel, true, Some(cache.clone()));
        assert!(
            entry.is_file(),
            "{rel}: no cache entry at {}",
            entry.display()
        );
        let cached = prepare_cached(rel, true, Some(cache.clone()));
        assert_eq!(cached.rewrites(), first.rewrites(), "{rel}");
        outputs_match(rel, &cached, &prepare(rel, false));
    }
}

#[test]
fn a_broken_cache_entry_is_replaced_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ModelCache::new(dir.path());
    let rel = "squeezenet/model.onnx";
    let sha256 = OnnxModel::load(ModelSource::resolve(&model_path(rel)).unwrap())
        .unwrap()
        .sha256;
    let entry = cache.entry(&sha256, 1);
    std::fs::write(&entry, b"half an archive").unwrap();
    let prepared = prepare_cached(rel, true, Some(cache.clone()));
    outputs_match(rel, &prepared, &prepare(rel, false));
    // The load fell back to the ONNX file and wrote a good entry in place of the broken one.
    assert!(std::fs::metadata(&entry).unwrap().len() > 1_000_000);
    assert!(cache.load(&sha256, 1).is_some());
}
