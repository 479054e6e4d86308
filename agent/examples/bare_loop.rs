//! A bare tract run loop: the same model, plan and inputs as `bench` single-stream, without the
//! histogram, progress or sampling. `bench/compare-onnxruntime.sh` compares its mean latency
//! with `bench`'s to measure what the instrumentation costs.
//!
//! Usage: bare_loop MODEL THREADS SECONDS  (prints one JSON object)

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plaster_agent::inference::{
    select_runtime, DeviceKind, ModelSource, OnnxModel, Precision, PreparedModel,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: bare_loop MODEL THREADS SECONDS");
    let source = ModelSource::resolve(&PathBuf::from(&args[1]))?;
    let threads: usize = args[2].parse()?;
    let duration = Duration::from_secs_f64(args[3].parse()?);
    let model = OnnxModel::load(source)?;
    let cpu = select_runtime(DeviceKind::Cpu)?;
    let prepared =
        PreparedModel::prepare(&model, model.natural_batch(), &cpu, Precision::F32, threads)?;
    let pool: Vec<_> = (0..8)
        .map(|seed| prepared.synthetic_inputs(seed))
        .collect::<Result<_, _>>()?;
    let mut session = prepared.session()?;
    for inputs in pool.iter().take(8) {
        session.run(inputs.clone())?;
    }
    // Time is read once per 64 runs so the loop itself is as bare as tract allows.
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            session.run(pool[(runs % 8) as usize].clone())?;
            runs += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"runs\": {runs}, \"mean_ms\": {}}}",
        elapsed * 1e3 / runs as f64
    );
    Ok(())
}
