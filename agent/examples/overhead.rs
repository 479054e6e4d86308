//! What `bench`'s instrumentation costs: the same session alternates between a bare tract run
//! loop (time read once per 64 runs) and the instrumented single-stream loop `bench` uses
//! (monotonic clock around every query, HDR histogram, progress ticks), in rounds, so that
//! machine noise hits both alike. Prints one JSON object with the median of each.
//!
//! Usage: overhead MODEL THREADS ROUNDS SECONDS_PER_ROUND

use std::path::PathBuf;
use std::time::{Duration, Instant};

use plaster_agent::inference::{
    select_runtime, DeviceKind, ModelSource, OnnxModel, PlanOptions, Precision, PreparedModel,
};
use plaster_agent::plaster::scenario::closed_loop;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: overhead MODEL THREADS ROUNDS SECONDS_PER_ROUND"
    );
    let source = ModelSource::resolve(&PathBuf::from(&args[1]))?;
    let threads: usize = args[2].parse()?;
    let rounds: usize = args[3].parse()?;
    let round = Duration::from_secs_f64(args[4].parse()?);
    let model = OnnxModel::load(source)?;
    let cpu = select_runtime(DeviceKind::Cpu)?;
    let prepared = PreparedModel::prepare(
        &model,
        model.natural_batch(),
        &cpu,
        PlanOptions::new(Precision::F32, threads),
    )?;
    let pool: Vec<_> = (0..8)
        .map(|seed| prepared.synthetic_inputs(seed))
        .collect::<Result<_, _>>()?;
    let mut session = prepared.session()?;
    let mut next = 0usize;
    let mut run = move || {
        next = next.wrapping_add(1);
        session.run(pool[next % pool.len()].clone()).map(|_| ())
    };
    for _ in 0..16 {
        run()?;
    }
    let (mut bare, mut instrumented) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let start = Instant::now();
        let mut runs = 0u64;
        while start.elapsed() < round {
            for _ in 0..64 {
                run()?;
            }
            runs += 64;
        }
        bare.push(start.elapsed().as_secs_f64() * 1e3 / runs as f64);
        let outcome = closed_loop(&mut run, round, 1, &mut |_, _| {})?;
        instrumented.push(outcome.elapsed.as_secs_f64() * 1e3 / outcome.queries as f64);
    }
    let (bare, instrumented) = (median(bare), median(instrumented));
    // The instrumentation alone: the same loop around a query that does nothing. Its cost per
    // query over the model's latency is the overhead, free of the machine's noise.
    let mut nothing = || Ok(());
    let empty = closed_loop(&mut nothing, Duration::from_secs(1), 1, &mut |_, _| {})?;
    let per_query_ns = empty.elapsed.as_secs_f64() * 1e9 / empty.queries as f64;
    println!(
        "{{\"bare_mean_ms\": {bare}, \"instrumented_mean_ms\": {instrumented}, \"ab_overhead_percent\": {}, \"instrumentation_ns_per_query\": {per_query_ns}, \"overhead_percent\": {}}}",
        100.0 * (instrumented / bare - 1.0),
        100.0 * per_query_ns / (bare * 1e6)
    );
    Ok(())
}
