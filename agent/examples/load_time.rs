//! Model load time from ONNX vs from the NNEF cache (inference::cache), alternating rounds so
//! machine noise hits both alike. Each round loads the ONNX file (parse, checks, sha256), then
//! prepares the CPU plan: fixes the batch and declutters (or reads the cached NNEF), applies
//! our rewrites and runs tract's codegen: what the agent does at start and on every model
//! update. Prints one JSON object with the median of each phase.
//!
//! Usage: load_time MODEL ROUNDS

use std::path::{Path, PathBuf};
use std::time::Instant;

use plaster_agent::inference::cache::ModelCache;
use plaster_agent::inference::{
    select_runtime, DeviceKind, ModelSource, OnnxModel, PlanOptions, Precision, PreparedModel,
};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Milliseconds of (ONNX load, prepare: batch fixed + declutter or cache read, rewrites,
/// tract's codegen; and of the typed model alone: batch fixed + declutter, or cache read).
fn load(path: &Path, cache: Option<ModelCache>) -> anyhow::Result<[f64; 3]> {
    let cpu = select_runtime(DeviceKind::Cpu)?;
    let t0 = Instant::now();
    let model = OnnxModel::load(ModelSource::resolve(path)?)?.with_cache(cache);
    let t1 = Instant::now();
    let options = PlanOptions::new(Precision::F32, 1);
    let prepared = PreparedModel::prepare(&model, model.natural_batch(), &cpu, options)?;
    let t2 = Instant::now();
    drop(prepared);
    let t3 = Instant::now();
    drop(model.typed(model.natural_batch())?);
    let t4 = Instant::now();
    let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
    Ok([ms(t0, t1), ms(t1, t2), ms(t3, t4)])
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 3, "usage: load_time MODEL ROUNDS");
    let path = PathBuf::from(&args[1]);
    let rounds: usize = args[2].parse()?;
    let dir = tempfile::tempdir()?;
    let cache = ModelCache::new(dir.path());
    // Fill the cache once.
    load(&path, Some(cache.clone()))?;
    let (mut onnx, mut cached) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        onnx.push(load(&path, None)?);
        cached.push(load(&path, Some(cache.clone()))?);
    }
    let phase = |runs: &[[f64; 3]], ix: usize| median(runs.iter().map(|r| r[ix]).collect());
    let total = |runs: &[[f64; 3]]| median(runs.iter().map(|r| r[0] + r[1]).collect());
    println!(
        "{}",
        serde_json::json!({
            "rounds": rounds,
            "onnx": {"load_ms": phase(&onnx, 0), "prepare_ms": phase(&onnx, 1),
                     "typed_ms": phase(&onnx, 2), "total_ms": total(&onnx)},
            "cached": {"load_ms": phase(&cached, 0), "prepare_ms": phase(&cached, 1),
                       "typed_ms": phase(&cached, 2), "total_ms": total(&cached)},
        })
    );
    Ok(())
}
