//! `plaster-agent bench`: the PLASTER scorecard of a model on this machine.
//!
//! Order of work: load and check everything first (model, dataset, runtime), so bad input fails
//! in well under a second; then warm up, measure the scenario inside the energy window, and
//! only then run the accuracy pass, which is not part of the timed window.

use std::path::PathBuf;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tract_onnx::prelude::*;

use super::scorecard;
use super::BenchArgs;
use crate::dataset::{Dataset, DatasetError};
use crate::device;
use crate::inference::cache::ModelCache;
use crate::inference::{
    select_runtime, InferenceError, ModelSource, OnnxModel, PlanOptions, Precision, PreparedModel,
    RuntimeKind,
};
use crate::plaster::accuracy::{self, Top1};
use crate::plaster::energy::EnergyMeter;
use crate::plaster::report::{
    self, Accuracy, DeviceInfo, Learning, ModelInfo, Report, Size, Throughput,
};
use crate::plaster::scenario::{self, RunOutcome, Scenario};
use crate::sensors::sampler::best_meter;
use crate::sensors::DiscoveryOptions;

/// Batch of the offline scenario for models whose batch axis is dynamic: large enough to
/// amortise per-run overhead, small enough for a Jetson Nano's memory with a CNN.
pub const DEFAULT_OFFLINE_BATCH: usize = 8;
/// Warm-up before measuring: this many queries, or this long, whichever comes first.
const WARMUP_QUERIES: u32 = 10;
const WARMUP_MAX: Duration = Duration::from_secs(1);
/// Input batches `--check-outputs` runs through both plans.
const CHECK_BATCHES: usize = 8;
/// Distinct input sets cycled through during a run (dataset batches or synthetic inputs).
const INPUT_POOL: usize = 64;
/// Share of `--duration` spent measuring one-stream capacity before a server run.
const CALIBRATION_SHARE: u32 = 10;
/// The quiet window before the run that measures idle power: a fifth of the run, within
/// bounds (sensors update every 13 ms to 1 s, so shorter windows say little).
const IDLE_SHARE: u32 = 5;
const IDLE_MIN: Duration = Duration::from_millis(500);
const IDLE_MAX: Duration = Duration::from_secs(3);
const CALIBRATION_MIN: Duration = Duration::from_millis(200);
const CALIBRATION_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Target(#[from] super::target::TargetError),
    #[error("writing the report to stdout: {0}")]
    Output(std::io::Error),
    #[error("--batch {requested}: model input \"{input}\" has a fixed batch of {fixed}")]
    FixedBatch {
        requested: usize,
        input: String,
        fixed: usize,
    },
}

/// Runs the whole benchmark and returns the report.
pub fn measure(args: &BenchArgs) -> Result<Report, BenchError> {
    let source = ModelSource::resolve(&args.model)?;
    let dataset_path: Option<PathBuf> = args.dataset.clone().or_else(|| source.bundle_dataset());
    let model = OnnxModel::load(source)?.with_cache(args.model_cache.clone().map(ModelCache::new));
    let dataset = dataset_path.as_deref().map(Dataset::load).transpose()?;
    let choice = select_runtime(args.device)?;
    let batch = batch_for(args, &model)?;
    let threads = usize::from(args.threads);
    let options = PlanOptions::new(args.precision, threads).with_rewrites(!args.no_rewrites);
    let prepared = PreparedModel::prepare(&model, batch, &choice, options)?;
    if let Some(dataset) = &dataset {
        dataset.check_fits(&prepared.named_input_shapes(&model))?;
    }
    let pool = input_pool(&prepared, dataset.as_ref())?;
    let check_inputs: Vec<TVec<TValue>> = if args.check_outputs {
        pool.iter().take(CHECK_BATCHES).cloned().collect()
    } else {
        Vec::new()
    };
    let profile_inputs = if args.profile {
        pool.clone()
    } else {
        Vec::new()
    };

    let mut session = prepared.session()?;
    let mut next = 0usize;
    let mut runner = move || {
        let inputs = pool[next % pool.len()].clone();
        next = next.wrapping_add(1);
        session.run(inputs).map(|_| ())
    };
    scenario::warm_up(&mut runner, WARMUP_QUERIES, WARMUP_MAX)?;

    let (min_duration, min_queries) = if args.strict {
        args.scenario.strict_minimums()
    } else {
        (Duration::ZERO, 1)
    };
    let duration = args.duration.max(min_duration);
    let mut meter = energy_meter(args, prepared.runtime(), duration);
    meter.measure_idle();
    let bound = Duration::from_secs_f64(args.latency_bound_ms / 1e3);
    // Offline counts samples; the closed loop counts queries of `batch` samples each.
    let min_loop_queries = match args.scenario {
        Scenario::Offline => min_queries.div_ceil(batch as u64),
        _ => min_queries,
    };

    let bar = progress_bar(
        &format!("{} {}", args.scenario.as_str(), model.source.name),
        duration,
    );
    let mut tick = |elapsed: Duration, queries: u64| {
        bar.set_position(elapsed.as_millis().min(u128::from(u64::MAX)) as u64);
        bar.set_message(format!("{queries} queries"));
    };
    meter.start_window();
    let outcome = match args.scenario {
        Scenario::SingleStream | Scenario::Offline => {
            scenario::closed_loop(&mut runner, duration, min_loop_queries, &mut tick)?
        }
        Scenario::Server => {
            let mut capacity_qps = || -> Result<f64, InferenceError> {
                let calibration =
                    (duration / CALIBRATION_SHARE).clamp(CALIBRATION_MIN, CALIBRATION_MAX);
                Ok(
                    scenario::closed_loop(&mut runner, calibration, 1, &mut |_, _| {})?
                        .queries_per_s(),
                )
            };
            match (args.find_peak, args.target_qps) {
                (true, _) => {
                    let capacity = capacity_qps()?;
                    scenario::find_peak(&mut runner, capacity, duration, bound, &mut tick)?
                }
                (false, Some(rate)) => {
                    scenario::server(&mut runner, rate, duration, bound, 0, &mut tick)?
                }
                (false, None) => {
                    let rate = capacity_qps()? / 2.0;
                    scenario::server(&mut runner, rate, duration, bound, 0, &mut tick)?
                }
            }
        }
    };
    let inferences = outcome.queries * batch as u64;
    let energy = meter.finish_window(inferences);
    bar.finish_and_clear();

    let profile = if args.profile {
        let bar = progress_bar(&format!("profile {}", model.source.name), duration);
        let profile = prepared.profile(&profile_inputs, duration)?;
        bar.finish_and_clear();
        Some(profile)
    } else {
        None
    };

    let outputs_vs_cpu = if args.check_outputs {
        let cpu = select_runtime(crate::inference::DeviceKind::Cpu)?;
        // The reference is tract's own plan: rewrites are checked against it too.
        let unmodified = PlanOptions::new(Precision::F32, threads).with_rewrites(false);
        let reference = PreparedModel::prepare(&model, batch, &cpu, unmodified)?;
        Some(prepared.compare_outputs(&reference, &check_inputs)?)
    } else {
        None
    };

    let accuracy = match &dataset {
        Some(dataset) => Some(measure_accuracy(&model, &prepared, dataset, &choice)?),
        None => None,
    };

    let valid = args.strict.then(|| {
        outcome.elapsed >= min_duration
            && outcome.queries >= min_loop_queries
            && outcome.bound_met != Some(false)
    });
    Ok(Report {
        schema: report::SCHEMA.to_string(),
        device: DeviceInfo {
            id: device::default_device_id(),
            arch: std::env::consts::ARCH.to_string(),
            runtime: prepared.runtime().as_str().to_string(),
            threads,
        },
        model: ModelInfo {
            name: model.source.name.clone(),
            version: None,
            sha256: model.sha256.clone(),
            format: "onnx".to_string(),
        },
        programmability: prepared.programmability().into(),
        latency_ms: outcome.latency.summary(),
        accuracy,
        size: Size {
            file_bytes: model.file_bytes,
            parameters: prepared.parameters(),
            flops_per_inference: prepared.flops_per_inference(),
            peak_rss_bytes: device::peak_rss_bytes(),
        },
        throughput: throughput(args, &outcome, batch, valid),
        energy,
        learning: Learning::without_updates("bench runs no model updates"),
        profile,
        outputs_vs_cpu,
    })
}

/// Runs `bench` as the command line does: the report as JSON or as a table on stdout.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if let Some(target) = &args.target {
        let report = super::target::run(args, target)?;
        let text = if args.json {
            format!(
                "{}\n",
                serde_json::to_string(&report).expect("reports always serialize")
            )
        } else {
            super::target::render(&report)
        };
        return super::write_stdout(&text).map_err(BenchError::Output);
    }
    let report = measure(args)?;
    let text = if args.json {
        format!(
            "{}\n",
            serde_json::to_string(&report).expect("reports always serialize")
        )
    } else {
        scorecard::render(&report)
    };
    super::write_stdout(&text).map_err(BenchError::Output)
}

/// The meter of the best energy source under `--sysfs-root`, or one that says why there is
/// none; its idle window is a share of the run.
fn energy_meter(
    args: &BenchArgs,
    runtime: RuntimeKind,
    duration: Duration,
) -> Box<dyn EnergyMeter> {
    let mut options = DiscoveryOptions::new(&args.sysfs_root);
    options.total_rail = args.total_rail.clone();
    options.pin = args.energy_source;
    let idle = (duration / IDLE_SHARE).clamp(IDLE_MIN, IDLE_MAX);
    best_meter(&options, runtime == RuntimeKind::Cpu, idle)
}

fn batch_for(args: &BenchArgs, model: &OnnxModel) -> Result<usize, BenchError> {
    let requested = args.batch.map(|b| b as usize);
    if let Some(input) = model.inputs.iter().find(|i| i.fixed_batch().is_some()) {
        let fixed = input.fixed_batch().unwrap_or(1);
        return match requested {
            Some(requested) if requested != fixed => Err(BenchError::FixedBatch {
                requested,
                input: input.name.clone(),
                fixed,
            }),
            _ => Ok(fixed),
        };
    }
    Ok(match (requested, args.scenario) {
        (Some(b), _) => b,
        (None, Scenario::Offline) if model.has_dynamic_batch() => DEFAULT_OFFLINE_BATCH,
        (None, _) => 1,
    })
}

/// Inputs cycled through the run: consecutive dataset batches, or seeded synthetic inputs.
fn input_pool(
    prepared: &PreparedModel,
    dataset: Option<&Dataset>,
) -> Result<Vec<TVec<TValue>>, InferenceError> {
    let batch = prepared.batch();
    match dataset {
        Some(dataset) => {
            let n = dataset.len().div_ceil(batch).min(INPUT_POOL);
            (0..n)
                .map(|ix| {
                    let x = dataset
                        .batch(ix * batch, batch)
                        .map_err(InferenceError::run)?;
                    Ok(tvec![prepared.conform_input(0, x)?])
                })
                .collect()
        }
        None => (0..8).map(|seed| prepared.synthetic_inputs(seed)).collect(),
    }
}

fn measure_accuracy(
    model: &OnnxModel,
    prepared: &PreparedModel,
    dataset: &Dataset,
    choice: &crate::inference::RuntimeChoice,
) -> Result<Accuracy, BenchError> {
    let bar =
        ProgressBar::with_draw_target(Some(dataset.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(style("{msg} [{bar:30}] {pos}/{len} samples"));
    bar.set_message(format!("accuracy ({})", prepared.precision().as_str()));
    let top1 = accuracy::top1(prepared, dataset, &mut |done| bar.set_position(done as u64))?;
    let delta_vs_f32 = if prepared.precision() == Precision::F16 {
        bar.set_position(0);
        bar.set_message("accuracy (f32 reference)");
        let f32_options = PlanOptions {
            precision: Precision::F32,
            ..prepared.options()
        };
        let reference = PreparedModel::prepare(model, prepared.batch(), choice, f32_options)?;
        let f32_top1: Top1 = accuracy::top1(&reference, dataset, &mut |done| {
            bar.set_position(done as u64)
        })?;
        Some(top1.value() - f32_top1.value())
    } else {
        None
    };
    bar.finish_and_clear();
    Ok(Accuracy::top1(top1, prepared.precision(), delta_vs_f32))
}

fn throughput(
    args: &BenchArgs,
    outcome: &RunOutcome,
    batch: usize,
    valid: Option<bool>,
) -> Throughput {
    let server = args.scenario == Scenario::Server;
    Throughput {
        scenario: args.scenario.as_str().to_string(),
        inferences_per_s: outcome.queries_per_s() * batch as f64,
        batch,
        duration_s: outcome.elapsed.as_secs_f64(),
        target_qps: outcome.target_qps,
        latency_bound_ms: server.then_some(args.latency_bound_ms),
        bound_met: outcome.bound_met,
        valid,
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("static progress template")
        .progress_chars("=> ")
}

/// A bar on stderr, drawn only when stderr is a terminal (indicatif hides it otherwise), so
/// `--json` output and logs under systemd stay clean.
fn progress_bar(label: &str, duration: Duration) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(duration.as_millis().min(u128::from(u64::MAX)) as u64),
        ProgressDrawTarget::stderr(),
    );
    bar.set_style(style("{prefix} [{bar:30}] {elapsed} {msg}"));
    bar.set_prefix(label.to_string());
    bar
}
