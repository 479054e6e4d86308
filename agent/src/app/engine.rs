//! The daemon's model: loaded, checked, warmed up and measured once at start, then run by the
//! built-in workload (and, with the local API, by applications). Inference runs on dedicated
//! threads, never on the async runtime.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tract_onnx::prelude::*;

use crate::api::metrics::{Metrics, Source};
use crate::config::ModelConfig;
use crate::dataset::{Dataset, DatasetError};
use crate::inference::cache::ModelCache;
use crate::inference::{
    predicted_labels, select_runtime, InferenceError, ModelSource, OnnxModel, PreparedModel,
    RuntimeChoice,
};
use crate::lock;
use crate::plaster::accuracy;
use crate::plaster::latency::LatencyRecorder;
use crate::plaster::report::Accuracy;
use crate::plaster::scenario;

/// Warm-up at load: this many queries, or this long, whichever comes first.
const WARMUP_QUERIES: u32 = 10;
const WARMUP_MAX: Duration = Duration::from_secs(2);
/// A failing model is logged on its first failure and then every this many.
const FAILURE_LOG_EVERY: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Inference(#[from] InferenceError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
}

/// A model ready to serve, with what was measured when it was loaded.
pub struct Engine {
    pub model: OnnxModel,
    pub prepared: PreparedModel,
    pub dataset: Option<Arc<Dataset>>,
    pub dataset_path: Option<PathBuf>,
    /// Top-1 on the bundle's dataset, measured at load (the workload's replay refines it live).
    pub accuracy_at_load: Option<Accuracy>,
    /// The runtime the model was prepared on (further plans, e.g. the API's batch sizes, use it).
    pub choice: RuntimeChoice,
    pub loaded_at: SystemTime,
}

impl Engine {
    /// Loads the model of `config`, checks its dataset fits, warms it up and measures its
    /// accuracy: everything that can fail does so here, before the agent reports ready.
    pub fn load(config: &ModelConfig) -> Result<Engine, EngineError> {
        let source = ModelSource::resolve(&config.path)?;
        let dataset_path = source.bundle_dataset();
        let model =
            OnnxModel::load(source)?.with_cache(config.cache_dir.clone().map(ModelCache::new));
        let dataset = dataset_path.as_deref().map(Dataset::load).transpose()?;
        let choice = select_runtime(config.device)?;
        let batch = model.natural_batch();
        let prepared = PreparedModel::prepare(&model, batch, &choice, config.plan_options())?;
        if let Some(dataset) = &dataset {
            dataset.check_fits(&prepared.named_input_shapes(&model))?;
        }
        let mut session = prepared.session()?;
        let warm_inputs = prepared.synthetic_inputs(0)?;
        scenario::warm_up(
            &mut || session.run(warm_inputs.clone()).map(|_| ()),
            WARMUP_QUERIES,
            WARMUP_MAX,
        )?;
        let accuracy_at_load = match &dataset {
            Some(dataset) => {
                let top1 = accuracy::top1(&prepared, dataset, &mut |_| {})?;
                Some(Accuracy::top1(top1, prepared.precision(), None))
            }
            None => None,
        };
        Ok(Engine {
            model,
            prepared,
            dataset: dataset.map(Arc::new),
            dataset_path,
            accuracy_at_load,
            choice,
            loaded_at: SystemTime::now(),
        })
    }
}

/// What ran in the current telemetry window, filled by every path that runs inference.
#[derive(Default)]
pub struct Window {
    pub latency: LatencyRecorder,
    pub inferences: u64,
    /// Dataset samples replayed and how many the model got right: live accuracy.
    pub labelled: u64,
    pub correct: u64,
    pub failures: u64,
}

pub type SharedWindow = Arc<Mutex<Window>>;

/// The built-in workload: replays the bundle's dataset (or seeded synthetic inputs when the
/// model has none) at a fixed rate on its own thread, so a device with no application
/// traffic still reports real latency, accuracy and energy. A fleet benchmarks itself this way.
pub struct Workload {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl Workload {
    pub fn start(
        engine: &Engine,
        rate_per_s: f64,
        window: SharedWindow,
        metrics: Arc<Metrics>,
    ) -> Result<Workload, InferenceError> {
        let prepared = engine.prepared.clone();
        let batch = prepared.batch();
        let mut queries = Queries::new(&prepared, engine.dataset.clone())?;
        let mut session = prepared.session()?;
        let period = Duration::from_secs_f64(batch as f64 / rate_per_s);
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("workload".into())
            .spawn(move || {
                let mut next = Instant::now();
                let mut failures = 0u64;
                loop {
                    let now = Instant::now();
                    if next > now {
                        match stopped.recv_timeout(next - now) {
                            Err(RecvTimeoutError::Timeout) => {}
                            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                        }
                    } else if !matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty)) {
                        return;
                    }
                    // A slow query delays the schedule instead of causing a burst after it.
                    next = next.max(Instant::now()) + period;
                    let query = queries.next();
                    let start = Instant::now();
                    let result = query.and_then(|query| {
                        let labels = query.labels;
                        session.run(query.inputs).map(|outputs| (outputs, labels))
                    });
                    let elapsed = start.elapsed();
                    let mut window = lock(&window);
                    match result.and_then(|(outputs, labels)| match labels {
                        Some(labels) => predicted_labels(&outputs, labels.len())
                            .map(|predicted| (predicted, Some(labels))),
                        None => Ok((Vec::new(), None)),
                    }) {
                        Ok((predicted, labels)) => {
                            window.latency.record(elapsed);
                            window.inferences += batch as u64;
                            metrics.inferred(Source::Workload, batch as u64, elapsed);
                            if let Some(labels) = labels {
                                window.labelled += labels.len() as u64;
                                window.correct += predicted
                                    .iter()
                                    .zip(&labels)
                                    .filter(|(p, y)| p == y)
                                    .count()
                                    as u64;
                            }
                        }
                        Err(e) => {
                            window.failures += 1;
                            metrics.failed(Source::Workload);
                            failures += 1;
                            if failures % FAILURE_LOG_EVERY == 1 {
                                tracing::error!(
                                    "workload inference failed ({failures} so far): {e}"
                                );
                            }
                        }
                    }
                }
            })
            .expect("spawning the workload thread");
        Ok(Workload { stop, thread })
    }

    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Stops after the query in progress; blocks until the thread has ended.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

struct Query {
    inputs: TVec<TValue>,
    /// The dataset labels of the batch's real samples (a last partial batch is padded).
    labels: Option<Vec<i64>>,
}

/// The workload's inputs: consecutive dataset batches, cycling, built one at a time (a large
/// dataset is not copied into tensors up front), or a small pool of synthetic inputs.
enum Queries {
    Dataset {
        prepared: PreparedModel,
        dataset: Arc<Dataset>,
        next: usize,
    },
    Synthetic {
        pool: Vec<TVec<TValue>>,
        next: usize,
    },
}

impl Queries {
    fn new(
        prepared: &PreparedModel,
        dataset: Option<Arc<Dataset>>,
    ) -> Result<Queries, InferenceError> {
        Ok(match dataset {
            Some(dataset) if !dataset.is_empty() => Queries::Dataset {
                prepared: prepared.clone(),
                dataset,
                next: 0,
            },
            _ => Queries::Synthetic {
                pool: (0..8)
                    .map(|seed| prepared.synthetic_inputs(seed))
                    .collect::<Result<_, _>>()?,
                next: 0,
            },
        })
    }

    fn next(&mut self) -> Result<Query, InferenceError> {
        match self {
            Queries::Dataset {
                prepared,
                dataset,
                next,
            } => {
                let batch = prepared.batch();
                let start = *next;
                let taken = batch.min(dataset.len() - start);
                *next = if start + taken >= dataset.len() {
                    0
                } else {
                    start + taken
                };
                let x = dataset.batch(start, batch).map_err(InferenceError::run)?;
                Ok(Query {
                    inputs: tvec![prepared.conform_input(0, x)?],
                    labels: Some(dataset.y[start..start + taken].to_vec()),
                })
            }
            Queries::Synthetic { pool, next } => {
                *next = (*next + 1) % pool.len();
                Ok(Query {
                    inputs: pool[*next].clone(),
                    labels: None,
                })
            }
        }
    }
}
