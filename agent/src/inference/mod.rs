//! The inference core: load an ONNX model (a file or a bundle directory), fix its input shapes
//! for a batch size, pick a tract runtime (CPU, or CUDA through tract-cuda) and run it.
//!
//! Everything tract-specific stays behind this module: tract's errors are converted to
//! [`InferenceError`] here, once. Inference is synchronous and CPU/GPU-bound; callers run it on
//! dedicated threads, never on an async runtime.

pub mod cache;
mod error;
mod profile;
mod programmability;
pub mod rewrite;
mod runtime;
mod source;
// Shares a job on the stack with helper threads (a scoped pointer; see its SAFETY notes).
#[allow(unsafe_code)]
pub mod warm;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{RunOptions, Runnable, State};
use tract_onnx::tract_core::transform::get_transform;

pub use error::InferenceError;
pub use profile::{NodeProfile, OpProfile, Profile, SLOWEST_NODES};

/// How far one runtime's outputs are from the CPU runtime's in f32 on the same inputs
/// (`bench --check-outputs`): a GPU or f16 plan that computes something else shows here.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutputCheck {
    /// What was compared: `"<runtime> <precision> vs cpu f32"`; the reference is tract's
    /// unmodified CPU plan, so the CPU runtime with our rewrites checks the rewrites.
    pub compared: String,
    /// Input batches run through both plans.
    pub inputs: usize,
    /// Largest absolute difference over every floating-point output element.
    pub max_abs_diff: f64,
    /// Elements of integer outputs (e.g. predicted labels) that differ.
    pub integer_mismatches: u64,
}

/// A tensor's elements cast to `T`.
fn cast_vec<T: Datum + Copy>(tensor: &Tensor) -> Result<Vec<T>, InferenceError> {
    let cast = tensor.cast_to::<T>().map_err(InferenceError::run)?;
    to_vec::<T>(&cast).map_err(InferenceError::run)
}

impl PreparedModel {
    /// Runs `inputs` through this plan and through `reference` and compares the outputs.
    pub fn compare_outputs(
        &self,
        reference: &PreparedModel,
        inputs: &[TVec<TValue>],
    ) -> Result<OutputCheck, InferenceError> {
        let mut ours = self.session()?;
        let mut theirs = reference.session()?;
        let mut max_abs_diff = 0f64;
        let mut integer_mismatches = 0u64;
        for input in inputs {
            let a = ours.run(input.clone())?;
            // The reference may take another element type (an f16 plan's inputs are f16).
            let reference_input = input
                .iter()
                .enumerate()
                .map(|(ix, value)| reference.conform_input(ix, value.clone().into_tensor()))
                .collect::<Result<TVec<_>, _>>()?;
            let b = theirs.run(reference_input)?;
            for (x, y) in a.iter().zip(b.iter()) {
                if x.datum_type().is_float() {
                    let (x, y) = (cast_vec::<f32>(x)?, cast_vec::<f32>(y)?);
                    for (p, q) in x.iter().zip(&y) {
                        max_abs_diff = max_abs_diff.max(f64::from((p - q).abs()));
                    }
                } else {
                    let (x, y) = (cast_vec::<i64>(x)?, cast_vec::<i64>(y)?);
                    integer_mismatches += x.iter().zip(&y).filter(|(p, q)| p != q).count() as u64;
                }
            }
        }
        Ok(OutputCheck {
            compared: format!(
                "{} {} vs cpu f32",
                self.runtime.as_str(),
                self.options.precision.as_str()
            ),
            inputs: inputs.len(),
            max_abs_diff,
            integer_mismatches,
        })
    }
}
pub use programmability::Programmability;
pub use runtime::{select_runtime, DeviceKind, RuntimeChoice, RuntimeKind};
pub use source::{InputSpec, ModelSource, OnnxModel};

/// Floating-point precision the model runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

/// How to prepare a plan, besides the runtime and the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanOptions {
    pub precision: Precision,
    /// Intra-op threads given to tract-linalg's executor; 1 means the calling thread only
    /// (tract's `multithread(1)` would fall back to rayon's global pool).
    pub threads: usize,
    /// Our graph rewrites ([`rewrite`]), applied to f32 plans on the CPU runtime.
    pub rewrites: bool,
}

impl PlanOptions {
    /// f32, one thread, rewrites on: the defaults of `bench` and the daemon.
    pub fn new(precision: Precision, threads: usize) -> PlanOptions {
        PlanOptions {
            precision,
            threads,
            rewrites: true,
        }
    }

    pub fn with_rewrites(self, rewrites: bool) -> PlanOptions {
        PlanOptions { rewrites, ..self }
    }
}

/// A model prepared for one runtime, precision, thread count and batch size. Cheap to share:
/// every worker thread spawns its own [`Session`] on the same plan.
#[derive(Clone, Debug)]
pub struct PreparedModel {
    runnable: Arc<dyn Runnable>,
    runtime: RuntimeKind,
    options: PlanOptions,
    batch: usize,
    input_facts: Vec<TypedFact>,
    programmability: Programmability,
    flops_per_batch: Option<u64>,
    parameters: u64,
    /// With several threads on the CPU: the helpers that stay awake while a session runs and
    /// share our ops' work ([`warm`]).
    crew: Option<Arc<warm::Crew>>,
}

impl PreparedModel {
    /// Prepares `model` at `batch` on the chosen runtime.
    pub fn prepare(
        model: &OnnxModel,
        batch: usize,
        choice: &RuntimeChoice,
        options: PlanOptions,
    ) -> Result<PreparedModel, InferenceError> {
        let PlanOptions {
            precision, threads, ..
        } = options;
        let mut typed = model.typed(batch)?;
        let flops_per_batch = programmability::flops(&typed);
        let parameters = model.parameters;
        // Our ops are f32 CPU kernels: an accelerator runtime would leave them on the CPU.
        let applied =
            if options.rewrites && choice.kind == RuntimeKind::Cpu && precision == Precision::F32 {
                rewrite::optimise(&mut typed).map_err(|e| model.invalid(e))?
            } else {
                rewrite::Applied::default()
            };
        if precision == Precision::F16 {
            let transform = get_transform("f32_to_f16")
                .map_err(|e| model.invalid(e))?
                .ok_or_else(|| model.invalid_msg("tract has no f32_to_f16 transform"))?;
            transform
                .transform(&mut typed)
                .map_err(|e| model.invalid(e))?;
        }
        // tract's own threads only where its ops carry the weight. With our matrix multiply
        // doing the convolutions (on the crew below), what is left to tract is small
        // memory-bound ops, which its executor splits at a loss (rayon workers woken per op:
        // ShuffleNet's `OptBinChain` nodes took 0.20 ms on one thread, 0.43-0.97 ms on two).
        let executor = if threads <= 1 || applied.gemm_convs > 0 {
            Executor::SingleThread
        } else {
            Executor::multithread(threads)
        };
        let run_options = RunOptions {
            executor: Some(executor),
            ..Default::default()
        };
        let runtime = choice.runtime;
        // Some of tract-cuda's failures after `check()` panic (context creation, missing NVRTC
        // headers): contain them at this boundary so the agent reports instead of crashing.
        let prepared = catch_unwind(AssertUnwindSafe(|| {
            runtime.prepare_with_options(typed, &run_options)
        }))
        .map_err(|panic| {
            model.invalid_msg(format!(
                "runtime {} panicked while preparing: {}",
                choice.kind.as_str(),
                panic_message(&panic)
            ))
        })?
        .map_err(|e| model.invalid(e))?;
        let runnable: Arc<dyn Runnable> = Arc::from(prepared);
        let mut input_facts = Vec::with_capacity(runnable.input_count());
        for ix in 0..runnable.input_count() {
            input_facts.push(
                runnable
                    .input_fact(ix)
                    .map_err(|e| model.invalid(e))?
                    .clone(),
            );
        }
        let mut programmability = match runnable.typed_model() {
            Some(plan_model) => Programmability::of(plan_model, choice.kind),
            None => Programmability::default(),
        };
        programmability.rewrites = applied;
        let crew = (threads > 1 && choice.kind == RuntimeKind::Cpu)
            .then(|| Arc::new(warm::Crew::new(threads - 1)));
        Ok(PreparedModel {
            runnable,
            runtime: choice.kind,
            options,
            batch,
            input_facts,
            programmability,
            flops_per_batch,
            parameters,
            crew,
        })
    }

    /// A new inference state on this plan; each thread running inference owns one.
    pub fn session(&self) -> Result<Session, InferenceError> {
        let state = self.runnable.spawn().map_err(InferenceError::run)?;
        Ok(Session {
            state,
            crew: self.crew.clone(),
        })
    }

    pub fn runtime(&self) -> RuntimeKind {
        self.runtime
    }

    pub fn precision(&self) -> Precision {
        self.options.precision
    }

    /// What this plan was prepared with (a sibling plan, e.g. another batch size, reuses it).
    pub fn options(&self) -> PlanOptions {
        self.options
    }

    /// The rewrites applied to this plan.
    pub fn rewrites(&self) -> &rewrite::Applied {
        &self.programmability.rewrites
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn programmability(&self) -> &Programmability {
        &self.programmability
    }

    /// Floating-point operations per inference (2 per multiply-accumulate), from tract's cost
    /// model on the decluttered graph, or `None` when a node's cost is symbolic.
    pub fn flops_per_inference(&self) -> Option<u64> {
        self.flops_per_batch.map(|f| f / self.batch.max(1) as u64)
    }

    /// Learned parameters (elements of the model's floating-point constants).
    pub fn parameters(&self) -> u64 {
        self.parameters
    }

    pub fn input_count(&self) -> usize {
        self.input_facts.len()
    }

    /// Each output's datum type and concrete shape, as this plan computes it.
    pub fn output_facts(&self) -> Result<Vec<(DatumType, Vec<usize>)>, InferenceError> {
        (0..self.runnable.output_count())
            .map(|ix| {
                let fact = self.runnable.output_fact(ix).map_err(InferenceError::run)?;
                Ok((
                    fact.datum_type,
                    fact.shape
                        .as_concrete()
                        .map(|s| s.to_vec())
                        .unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Each input of `model` by name, with the shape this plan takes (what a dataset must fit).
    pub fn named_input_shapes(&self, model: &OnnxModel) -> Vec<(String, Vec<usize>)> {
        model
            .inputs
            .iter()
            .enumerate()
            .map(|(ix, spec)| (spec.name.clone(), self.input_shape(ix)))
            .collect()
    }

    /// The concrete shape of input `ix`.
    pub fn input_shape(&self, ix: usize) -> Vec<usize> {
        self.input_facts[ix]
            .shape
            .as_concrete()
            .map(|s| s.to_vec())
            .unwrap_or_default()
    }

    /// Converts `tensor` to the datum type input `ix` expects (f16 models take f16 inputs).
    pub fn conform_input(&self, ix: usize, tensor: Tensor) -> Result<TValue, InferenceError> {
        let dt = self.input_facts[ix].datum_type;
        if tensor.datum_type() == dt {
            return Ok(tensor.into_tvalue());
        }
        let cast = tensor
            .cast_to_dt(dt)
            .map_err(InferenceError::run)?
            .into_owned();
        Ok(cast.into_tvalue())
    }

    /// Deterministic synthetic inputs (uniform in [0, 1) for floats, zeros otherwise) for
    /// models run without a dataset; `seed` varies them between queries.
    pub fn synthetic_inputs(&self, seed: u64) -> Result<TVec<TValue>, InferenceError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut inputs = TVec::new();
        for ix in 0..self.input_facts.len() {
            let shape = self.input_shape(ix);
            let n: usize = shape.iter().product();
            let dt = self.input_facts[ix].datum_type;
            let tensor = if dt.is_float() {
                let values: Vec<f32> = (0..n).map(|_| rng.gen::<f32>()).collect();
                Tensor::from_shape(&shape, &values).map_err(InferenceError::run)?
            } else {
                Tensor::zero_dt(dt, &shape).map_err(InferenceError::run)?
            };
            inputs.push(self.conform_input(ix, tensor)?);
        }
        Ok(inputs)
    }
}

/// One inference state: the buffers of a plan, owned by one thread at a time.
#[derive(Debug)]
pub struct Session {
    state: Box<dyn State>,
    crew: Option<Arc<warm::Crew>>,
}

impl Session {
    /// Runs one inference. A panic inside the runtime is contained and reported as an error.
    pub fn run(&mut self, inputs: TVec<TValue>) -> Result<TVec<TValue>, InferenceError> {
        let _hot = self.crew.as_deref().map(warm::Crew::hold);
        match catch_unwind(AssertUnwindSafe(|| self.state.run(inputs))) {
            Ok(result) => result.map_err(InferenceError::run),
            Err(panic) => Err(InferenceError::Run(format!(
                "runtime panicked: {}",
                panic_message(&panic)
            ))),
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Reads the predicted class of each of the first `n` rows out of a model's outputs, as
/// PRODUCT.md specifies: an integer first output of shape `[batch]` is the label itself (as
/// scikit-learn converters emit); otherwise the argmax over the last axis of the first
/// floating-point output.
pub fn predicted_labels(outputs: &[TValue], n: usize) -> Result<Vec<i64>, InferenceError> {
    let first = outputs
        .first()
        .ok_or_else(|| InferenceError::Run("model has no output".into()))?;
    if !first.datum_type().is_float() && first.rank() == 1 {
        let labels = first.cast_to::<i64>().map_err(InferenceError::run)?;
        let mut labels = to_vec::<i64>(&labels).map_err(InferenceError::run)?;
        labels.truncate(n);
        return Ok(labels);
    }
    let scores = outputs.iter().find(|o| o.datum_type().is_float()).ok_or_else(|| {
        InferenceError::Run(
            "model has no floating-point output and no integer label output to read a prediction from".into(),
        )
    })?;
    let scores = scores.cast_to::<f32>().map_err(InferenceError::run)?;
    let classes = *scores.shape().last().unwrap_or(&1);
    let values = to_vec::<f32>(&scores).map_err(InferenceError::run)?;
    if classes == 0 {
        return Err(InferenceError::Run(
            "model output has an empty class axis".into(),
        ));
    }
    Ok(values
        .chunks(classes)
        .take(n)
        .map(|row| {
            let mut best = 0;
            for (ix, v) in row.iter().enumerate() {
                if *v > row[best] {
                    best = ix;
                }
            }
            best as i64
        })
        .collect())
}

/// The elements of a tensor, in logical order.
pub fn to_vec<T: Datum + Copy>(tensor: &Tensor) -> TractResult<Vec<T>> {
    Ok(tensor.to_plain_array_view::<T>()?.iter().copied().collect())
}
