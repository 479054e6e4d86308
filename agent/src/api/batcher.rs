//! Dynamic batching: requests wait in a bounded queue; an inference thread (one per
//! `api.instances`) takes the first, gathers more until `max_batch` samples or `max_queue_delay` after the first arrived, runs
//! them as one batch on the smallest prepared plan that fits (the rest padded), and answers
//! each request with its slice of the outputs and its queue and compute times.
//!
//! The queue is bounded: a full queue refuses a request at once (503 with Retry-After) instead
//! of growing memory or latency without limit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tract_onnx::prelude::*;

use super::metrics::{Metrics, Source};
use super::oip::Timing;
use super::ApiError;
use crate::app::engine::SharedWindow;
use crate::inference::{InferenceError, PreparedModel, Session};
use crate::lock;

/// How requests are batched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Samples per batch at most; 1 turns batching off.
    pub max_batch: usize,
    /// How long the first request of a batch may wait for others.
    pub max_queue_delay: Duration,
    /// Requests waiting at most; more are refused with 503.
    pub max_queue: usize,
    /// Inference threads taking batches from the queue (each with its own state).
    pub instances: usize,
}

/// One request's inputs (each with `batch` on axis 0 when the model has a batch axis).
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub batch: usize,
    pub arrived: Instant,
    pub reply: oneshot::Sender<Result<Done, ApiError>>,
}

/// One request's outputs, in the model's declared datatypes, and what it waited and cost.
pub struct Done {
    pub outputs: Vec<Tensor>,
    pub timing: Timing,
}

/// The plans one model is prepared at: ascending batch sizes, the last one `max_batch`.
pub struct Plans {
    pub plans: Vec<PreparedModel>,
    /// Axis 0 of every input and output is the batch axis.
    pub batch_axis: bool,
    /// Output datatypes as the model declares them (an f16 plan computes in f16; clients get
    /// what the model's metadata says).
    pub output_types: Vec<DatumType>,
}

impl Plans {
    pub fn max_batch(&self) -> usize {
        if self.batch_axis {
            self.plans.last().map_or(1, PreparedModel::batch)
        } else {
            1
        }
    }
}

/// The batch sizes prepared for `max_batch`: powers of two below it, and itself. A batch of
/// `n` samples runs on the smallest that fits, so padding wastes less than half a batch.
pub fn batch_sizes(max_batch: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
        .take_while(|b| *b < max_batch)
        .collect();
    sizes.push(max_batch.max(1));
    sizes
}

/// The queue and its inference threads.
pub struct Batcher {
    /// `None` only while dropping: closing it lets the threads drain and end.
    queue: Option<SyncSender<Job>>,
    depth: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Batcher {
    pub fn start(
        plans: Plans,
        policy: Policy,
        window: SharedWindow,
        metrics: Arc<Metrics>,
    ) -> Result<Batcher, InferenceError> {
        let (queue, jobs) = mpsc::sync_channel::<Job>(policy.max_queue.max(1));
        let jobs = Arc::new(Mutex::new(jobs));
        let depth = Arc::new(AtomicU64::new(0));
        let plans = Arc::new(plans);
        let mut threads = Vec::new();
        for instance in 0..policy.instances.max(1) {
            let sessions = plans
                .plans
                .iter()
                .map(PreparedModel::session)
                .collect::<Result<Vec<_>, _>>()?;
            let mut worker = Worker {
                plans: plans.clone(),
                sessions,
                policy,
                window: window.clone(),
                metrics: metrics.clone(),
                depth: depth.clone(),
                carry: None,
            };
            let jobs = jobs.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("api-batcher-{instance}"))
                    .spawn(move || worker.run(&jobs))
                    .map_err(|e| InferenceError::Run(format!("spawning a batcher thread: {e}")))?,
            );
        }
        Ok(Batcher {
            queue: Some(queue),
            depth,
            threads,
        })
    }

    /// Queues a job, or refuses it at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let unloading = || ApiError::unavailable("the model is being unloaded".into());
        let queue = self.queue.as_ref().ok_or_else(unloading)?;
        self.depth.fetch_add(1, Ordering::Relaxed);
        queue.try_send(job).map_err(|e| {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            match e {
                TrySendError::Full(_) => ApiError::queue_full(),
                TrySendError::Disconnected(_) => unloading(),
            }
        })
    }

    /// Requests waiting now.
    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }
}

impl Drop for Batcher {
    /// Closes the queue; the thread answers what is queued, then ends.
    fn drop(&mut self) {
        drop(self.queue.take());
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct Worker {
    plans: Arc<Plans>,
    sessions: Vec<Session>,
    policy: Policy,
    window: SharedWindow,
    metrics: Arc<Metrics>,
    depth: Arc<AtomicU64>,
    /// A job taken from the queue that did not fit the previous batch.
    carry: Option<Job>,
}

impl Worker {
    fn run(&mut self, jobs: &Mutex<mpsc::Receiver<Job>>) {
        loop {
            // One worker gathers at a time. A worker holding a job left over from its last
            // batch does not wait for the queue (another worker may be blocked on it): it
            // runs the job alone when the queue is busy.
            let gathered = match self.carry.take() {
                Some(first) => match jobs.try_lock() {
                    Ok(jobs) => self.gather(first, &jobs),
                    Err(_) => (first.batch, vec![first]),
                },
                None => {
                    let jobs = lock(jobs);
                    match jobs.recv() {
                        Ok(first) => self.gather(first, &jobs),
                        Err(_) => return,
                    }
                }
            };
            let (samples, batch) = gathered;
            self.depth.fetch_sub(batch.len() as u64, Ordering::Relaxed);
            self.run_batch(batch, samples);
        }
    }

    /// Adds queued jobs to `first` until `max_batch` samples or `max_queue_delay` after
    /// `first` arrived; a job that does not fit is carried to the next batch.
    fn gather(&mut self, first: Job, jobs: &mpsc::Receiver<Job>) -> (usize, Vec<Job>) {
        let max_batch = self.plans.max_batch().min(self.policy.max_batch.max(1));
        let deadline = first.arrived + self.policy.max_queue_delay;
        let mut samples = first.batch;
        let mut batch = vec![first];
        while self.plans.batch_axis && samples < max_batch {
            let now = Instant::now();
            let job = if now >= deadline {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                match jobs.recv_timeout(deadline - now) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            };
            if samples + job.batch > max_batch {
                self.carry = Some(job);
                break;
            }
            samples += job.batch;
            batch.push(job);
        }
        (samples, batch)
    }

    fn run_batch(&mut self, batch: Vec<Job>, samples: usize) {
        let started = Instant::now();
        let result = self.infer(&batch, samples);
        let compute = started.elapsed();
        let queued: Vec<Duration> = batch.iter().map(|j| started - j.arrived).collect();
        self.metrics.batch(samples, &queued);
        match result {
            Ok(mut outputs) => {
                let mut window = lock(&self.window);
                let mut offset = 0;
                for (job, queued) in batch.into_iter().zip(queued) {
                    let latency = queued + compute;
                    window.latency.record(latency);
                    window.inferences += job.batch as u64;
                    self.metrics
                        .inferred(Source::Api, job.batch as u64, latency);
                    let mine = if self.plans.batch_axis {
                        outputs
                            .iter()
                            .map(|o| o.slice(0, offset, offset + job.batch))
                            .collect::<TractResult<Vec<_>>>()
                            .map_err(ApiError::internal)
                    } else {
                        Ok(std::mem::take(&mut outputs))
                    };
                    offset += job.batch;
                    let timing = Timing {
                        queue_us: queued.as_micros() as u64,
                        compute_us: compute.as_micros() as u64,
                        batch: samples,
                    };
                    // A client that went away no longer waits for its answer: nothing to do.
                    let _ = job.reply.send(mine.map(|outputs| Done { outputs, timing }));
                }
            }
            Err(e) => {
                lock(&self.window).failures += 1;
                self.metrics.failed(Source::Api);
                tracing::error!("API inference of {samples} samples failed: {e}");
                for job in batch {
                    let _ = job
                        .reply
                        .send(Err(ApiError::internal(format!("inference failed: {e}"))));
                }
            }
        }
    }

    /// Runs the jobs' samples together on the smallest plan that holds them.
    fn infer(&mut self, batch: &[Job], samples: usize) -> Result<Vec<Tensor>, InferenceError> {
        let ix = self
            .plans
            .plans
            .iter()
            .position(|p| !self.plans.batch_axis || p.batch() >= samples)
            .ok_or_else(|| InferenceError::Run(format!("no plan holds a batch of {samples}")))?;
        let plan = &self.plans.plans[ix];
        let mut inputs = TVec::new();
        for input in 0..plan.input_count() {
            let mut parts: Vec<&Tensor> = batch.iter().map(|j| &j.inputs[input]).collect();
            let padding;
            if self.plans.batch_axis && plan.batch() > samples {
                let mut shape = parts[0].shape().to_vec();
                shape[0] = plan.batch() - samples;
                padding =
                    Tensor::zero_dt(parts[0].datum_type(), &shape).map_err(InferenceError::run)?;
                parts.push(&padding);
            }
            let tensor = if parts.len() == 1 {
                parts[0].clone()
            } else {
                Tensor::stack_tensors(0, &parts).map_err(InferenceError::run)?
            };
            inputs.push(plan.conform_input(input, tensor)?);
        }
        let outputs = self.sessions[ix].run(inputs)?;
        outputs
            .into_iter()
            .zip(&self.plans.output_types)
            .map(|(o, dt)| {
                let o = o.into_tensor();
                if o.datum_type() == *dt {
                    Ok(o)
                } else {
                    o.cast_to_dt(*dt)
                        .map(|c| c.into_owned())
                        .map_err(InferenceError::run)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_sizes_are_powers_of_two_then_the_maximum() {
        assert_eq!(batch_sizes(1), vec![1]);
        assert_eq!(batch_sizes(8), vec![1, 2, 4, 8]);
        assert_eq!(batch_sizes(12), vec![1, 2, 4, 8, 12]);
    }
}
