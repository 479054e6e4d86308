//! `bench MODEL --target http://HOST:PORT`: the load scenarios through a running server's Open
//! Inference Protocol API (a plaster-agent, or any OIP server such as the onnxruntime peer in
//! bench/), so the served path is measured like the in-process one.
//!
//! Requests carry binary tensor data both ways (what a latency-minded client sends). MODEL is
//! the local copy of the served model: its name addresses the server, its dataset (or synthetic
//! inputs of its input shape) feeds the queries and gives top-1 accuracy through the API.
//! Single-stream keeps one request in flight; offline keeps `--concurrency` in flight; server
//! issues requests at Poisson arrival times regardless of completions (open loop), so queueing
//! in the server shows in the latency from arrival to answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use serde::Serialize;
use tract_onnx::prelude::*;

use super::BenchArgs;
use crate::api::oip::{self, Datatype};
use crate::dataset::Dataset;
use crate::inference::{predicted_labels, ModelSource, OnnxModel};
use crate::lock;
use crate::plaster::accuracy::Top1;
use crate::plaster::latency::{LatencyRecorder, LatencySummary};
use crate::plaster::scenario::Scenario;

/// Distinct synthetic request bodies cycled through a run (a model without a dataset).
const SYNTHETIC_POOL: usize = 8;
/// Warm-up requests before measuring (connections open, server caches warm).
const WARMUP_REQUESTS: usize = 20;
/// Bisection probes of `--find-peak`.
const PEAK_PROBES: u32 = 7;
/// A query waiting this many latency bounds means the server is overloaded: the probe stops.
const OVERLOAD_FACTOR: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("--target {0:?} is not an http://HOST:PORT URL")]
    Url(String),
    #[error("{target}: {message}")]
    Http { target: String, message: String },
    #[error("{0}")]
    Model(String),
}

/// What a `--target` run measured: `--json` prints this object.
#[derive(Debug, Serialize)]
pub struct TargetReport {
    /// `plaster.bench-target/1`.
    pub schema: &'static str,
    pub target: String,
    pub model: String,
    pub scenario: &'static str,
    pub batch: usize,
    pub concurrency: usize,
    pub requests: u64,
    pub failed: u64,
    pub duration_s: f64,
    pub inferences_per_s: f64,
    pub latency_ms: LatencySummary,
    /// Server scenario: the offered rate, the bound and whether p99 met it.
    pub target_qps: Option<f64>,
    pub latency_bound_ms: Option<f64>,
    pub bound_met: Option<bool>,
    /// Medians of the server's own `queue_us` and `compute_us` (null when it reports none).
    pub server_queue_us_p50: Option<f64>,
    pub server_compute_us_p50: Option<f64>,
    /// Top-1 over the model's dataset, answered by the target.
    pub accuracy_top1: Option<f64>,
    pub accuracy_samples: Option<usize>,
}

#[derive(Clone)]
struct Target {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    infer: String,
}

/// One request body and the labels of its samples (when they come from the dataset).
#[derive(Clone)]
struct Query {
    body: Bytes,
    header_length: String,
    labels: Option<Vec<i64>>,
}

struct Answer {
    outputs: Vec<Tensor>,
    queue_us: Option<f64>,
    compute_us: Option<f64>,
}

impl Target {
    /// Sends `request`; the headers and whole body of a 2xx answer, else the status and body
    /// as the error.
    async fn fetch(
        &self,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<(hyper::HeaderMap, Bytes), String> {
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
        }
        Ok((headers, body))
    }

    async fn send(&self, query: &Query) -> Result<Answer, String> {
        let request = hyper::Request::post(&self.infer)
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", &query.header_length)
            .body(Full::new(query.body.clone()))
            .map_err(|e| e.to_string())?;
        let (headers, body) = self.fetch(request).await?;
        let header_length = headers
            .get("inference-header-content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let n = header_length.unwrap_or(body.len()).min(body.len());
        let head: serde_json::Value =
            serde_json::from_slice(&body[..n]).map_err(|e| format!("response JSON: {e}"))?;
        let us = |key: &str| head["parameters"][key].as_f64();
        // Every output with binary data, decoded (the accuracy pass reads the prediction).
        let mut outputs = Vec::new();
        let mut offset = n;
        for output in head["outputs"].as_array().into_iter().flatten() {
            let Some(size) = output["parameters"]["binary_data_size"].as_u64() else {
                continue;
            };
            let datatype = output["datatype"]
                .as_str()
                .and_then(Datatype::parse)
                .ok_or_else(|| format!("output datatype {}", output["datatype"]))?;
            let shape: Vec<usize> = serde_json::from_value(output["shape"].clone())
                .map_err(|e| format!("output shape: {e}"))?;
            let bytes = body
                .get(offset..offset + size as usize)
                .ok_or("binary output shorter than its binary_data_size")?;
            offset += size as usize;
            outputs
                .push(oip::tensor_from_le_bytes(datatype, &shape, bytes).map_err(|e| e.message)?);
        }
        Ok(Answer {
            outputs,
            queue_us: us("queue_us"),
            compute_us: us("compute_us"),
        })
    }

    async fn get_json(&self, path: &str) -> Result<serde_json::Value, String> {
        let uri = format!("{}{path}", self.base);
        let request = hyper::Request::get(&uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let (_, body) = self
            .fetch(request)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
    }
}

/// What the requests of one run measured.
#[derive(Default)]
struct Tally {
    latency: LatencyRecorder,
    requests: u64,
    failed: u64,
    first_failure: Option<String>,
    queue_us: Vec<f64>,
    compute_us: Vec<f64>,
    overloaded: bool,
}

impl Tally {
    /// The tally once every request task has ended (they held the other references).
    fn take(shared: &Mutex<Tally>) -> Tally {
        let mut guard = lock(shared);
        std::mem::take(&mut *guard)
    }

    fn record(&mut self, latency: Duration, answer: Result<Answer, String>) {
        self.requests += 1;
        match answer {
            Ok(answer) => {
                self.latency.record(latency);
                self.queue_us.extend(answer.queue_us);
                self.compute_us.extend(answer.compute_us);
            }
            Err(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert(e);
            }
        }
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

pub fn run(args: &BenchArgs, target: &str) -> Result<TargetReport, TargetError> {
    let base = target.trim_end_matches('/');
    if !base.starts_with("http://") || base.len() <= "http://".len() {
        return Err(TargetError::Url(target.to_string()));
    }
    let source =
        ModelSource::resolve(&args.model).map_err(|e| TargetError::Model(e.to_string()))?;
    let dataset_path = args.dataset.clone().or_else(|| source.bundle_dataset());
    let model = OnnxModel::load(source).map_err(|e| TargetError::Model(e.to_string()))?;
    let dataset = dataset_path
        .as_deref()
        .map(Dataset::load)
        .transpose()
        .map_err(|e| TargetError::Model(e.to_string()))?;
    let name = model.source.name.clone();
    let batch = args.batch.map_or(1, |b| b as usize);
    let queries = build_queries(&model, dataset.as_ref(), batch)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TargetError::Http {
            target: base.to_string(),
            message: e.to_string(),
        })?;
    let http_error = |message: String| TargetError::Http {
        target: base.to_string(),
        message,
    };
    runtime.block_on(async {
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build_http();
        let target = Target {
            client,
            base: base.to_string(),
            infer: format!("{base}/v2/models/{name}/infer"),
        };
        target
            .get_json(&format!("/v2/models/{name}"))
            .await
            .map_err(|e| http_error(format!("the target does not serve \"{name}\": {e}")))?;
        for query in queries.iter().cycle().take(WARMUP_REQUESTS) {
            target.send(query).await.map_err(&http_error)?;
        }
        let queries = Arc::new(queries);
        let concurrency = usize::from(args.concurrency.max(1));
        let duration = args.duration;
        let bound = Duration::from_secs_f64(args.latency_bound_ms / 1e3);
        let (tally, elapsed, rate) = match args.scenario {
            Scenario::SingleStream => {
                let (t, e) = closed_loop(&target, &queries, 1, duration).await;
                (t, e, None)
            }
            Scenario::Offline => {
                let (t, e) = closed_loop(&target, &queries, concurrency, duration).await;
                (t, e, None)
            }
            Scenario::Server => {
                let rate = match (args.find_peak, args.target_qps) {
                    (false, Some(rate)) => rate,
                    (peak, _) => {
                        // What the server sustains with requests always waiting.
                        let calibration = (duration / 10)
                            .clamp(Duration::from_millis(500), Duration::from_secs(3));
                        let (t, e) = closed_loop(&target, &queries, concurrency, calibration).await;
                        let capacity = t.requests as f64 / e.as_secs_f64();
                        if peak {
                            capacity
                        } else {
                            capacity / 2.0
                        }
                    }
                };
                if args.find_peak {
                    let (t, e, r) = find_peak(&target, &queries, rate, duration, bound).await;
                    (t, e, Some(r))
                } else {
                    let (t, e) = open_loop(&target, &queries, rate, duration, bound, 0).await;
                    (t, e, Some(rate))
                }
            }
        };
        if tally.requests > 0 && tally.failed == tally.requests {
            return Err(http_error(format!(
                "every request failed: {}",
                tally.first_failure.clone().unwrap_or_default()
            )));
        }
        let accuracy = match &dataset {
            Some(_) => Some(accuracy(&target, &queries).await.map_err(&http_error)?),
            None => None,
        };
        let mut tally = tally;
        let server = args.scenario == Scenario::Server;
        let bound_met = server.then(|| {
            !tally.overloaded
                && tally.failed == 0
                && tally.latency.count() > 0
                && tally.latency.quantile(0.99) <= bound
        });
        Ok(TargetReport {
            schema: "plaster.bench-target/1",
            target: base.to_string(),
            model: name.clone(),
            scenario: args.scenario.as_str(),
            batch,
            concurrency: match args.scenario {
                Scenario::SingleStream => 1,
                _ => concurrency,
            },
            requests: tally.requests,
            failed: tally.failed,
            duration_s: elapsed.as_secs_f64(),
            inferences_per_s: (tally.requests - tally.failed) as f64 * batch as f64
                / elapsed.as_secs_f64().max(1e-9),
            latency_ms: tally.latency.summary(),
            target_qps: rate,
            latency_bound_ms: server.then_some(args.latency_bound_ms),
            bound_met,
            server_queue_us_p50: median(&mut tally.queue_us),
            server_compute_us_p50: median(&mut tally.compute_us),
            accuracy_top1: accuracy.map(|a| a.value()),
            accuracy_samples: accuracy.map(|a| a.samples),
        })
    })
}

/// Request bodies: consecutive dataset batches (with their labels), or synthetic inputs.
fn build_queries(
    model: &OnnxModel,
    dataset: Option<&Dataset>,
    batch: usize,
) -> Result<Vec<Query>, TargetError> {
    if model.inputs.len() != 1 || model.inputs[0].datum_type != DatumType::F32 {
        return Err(TargetError::Model(format!(
            "{}: --target sends one FP32 input; this model has {} input(s)",
            model.source.name,
            model.inputs.len()
        )));
    }
    let spec = &model.inputs[0];
    let shape: Vec<usize> = spec
        .shape
        .iter()
        .enumerate()
        .map(|(axis, d)| d.unwrap_or(if axis == 0 { batch } else { 1 }))
        .collect();
    let batch = shape[0];
    let make = |values: Vec<f32>, labels: Option<Vec<i64>>| {
        let header = serde_json::json!({
            "inputs": [{"name": spec.name, "shape": shape, "datatype": "FP32",
                        "parameters": {"binary_data_size": values.len() * 4}}],
            "parameters": {"binary_data_output": true},
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
        Query {
            body: Bytes::from(body),
            header_length: header.len().to_string(),
            labels,
        }
    };
    match dataset {
        Some(dataset) if !dataset.is_empty() => (0..dataset.len().div_ceil(batch))
            .map(|ix| {
                let start = ix * batch;
                let x = dataset
                    .batch(start, batch)
                    .and_then(|t| t.cast_to::<f32>().map(|t| t.into_owned()))
                    .map_err(|e| TargetError::Model(e.to_string()))?;
                let values = crate::inference::to_vec::<f32>(&x)
                    .map_err(|e| TargetError::Model(e.to_string()))?;
                let end = (start + batch).min(dataset.len());
                Ok(make(values, Some(dataset.y[start..end].to_vec())))
            })
            .collect(),
        _ => {
            use rand::Rng;
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let n: usize = shape.iter().product();
            Ok((0..SYNTHETIC_POOL)
                .map(|_| make((0..n).map(|_| rng.gen::<f32>()).collect(), None))
                .collect())
        }
    }
}

/// Waits for every request task of a run, then hands back what they tallied and how long
/// the run took.
async fn finish(
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tally: &Mutex<Tally>,
    start: tokio::time::Instant,
) -> (Tally, Duration) {
    for task in tasks {
        let _ = task.await;
    }
    (Tally::take(tally), start.elapsed())
}

/// `workers` clients, each sending its next request when the previous one is answered.
async fn closed_loop(
    target: &Target,
    queries: &Arc<Vec<Query>>,
    workers: usize,
    duration: Duration,
) -> (Tally, Duration) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let (target, queries, tally) = (target.clone(), queries.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = worker;
            while start.elapsed() < duration {
                let query = &queries[next % queries.len()];
                next += workers;
                let sent = Instant::now();
                let answer = target.send(query).await;
                lock(&tally).record(sent.elapsed(), answer);
            }
        }));
    }
    finish(tasks, &tally, start.into()).await
}

/// Requests issued at Poisson arrival times at `rate` per second for `duration`, each on its
/// own task; latency runs from the scheduled arrival to the answer.
async fn open_loop(
    target: &Target,
    queries: &Arc<Vec<Query>>,
    rate: f64,
    duration: Duration,
    bound: Duration,
    seed: u64,
) -> (Tally, Duration) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let Ok(gaps) = Exp::new(rate.max(1e-9)) else {
        return (Tally::default(), Duration::ZERO);
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = tokio::time::Instant::now();
    let mut at = Duration::ZERO;
    let mut tasks = Vec::new();
    let mut ix = 0usize;
    loop {
        at += Duration::try_from_secs_f64(gaps.sample(&mut rng)).unwrap_or(Duration::MAX / 4);
        if at >= duration || lock(&tally).overloaded {
            break;
        }
        let arrival = start + at;
        tokio::time::sleep_until(arrival).await;
        let (target, tally) = (target.clone(), tally.clone());
        let query = queries[ix % queries.len()].clone();
        ix += 1;
        tasks.push(tokio::spawn(async move {
            let answer = target.send(&query).await;
            let latency = arrival.elapsed();
            let mut tally = lock(&tally);
            if latency > bound * OVERLOAD_FACTOR {
                tally.overloaded = true;
            }
            tally.record(latency, answer);
        }));
    }
    finish(tasks, &tally, start).await
}

/// The highest Poisson rate whose p99 meets `bound`, bisecting below `capacity`.
async fn find_peak(
    target: &Target,
    queries: &Arc<Vec<Query>>,
    capacity: f64,
    duration: Duration,
    bound: Duration,
) -> (Tally, Duration, f64) {
    let probe = (duration / PEAK_PROBES).max(Duration::from_millis(500));
    let (mut lo, mut hi) = (0.0f64, capacity);
    let mut rate = capacity;
    let mut best: Option<(Tally, Duration, f64)> = None;
    let mut lowest_failed: Option<(Tally, Duration, f64)> = None;
    for ix in 0..PEAK_PROBES {
        let (tally, elapsed) = open_loop(target, queries, rate, probe, bound, u64::from(ix)).await;
        let met = !tally.overloaded
            && tally.failed == 0
            && tally.latency.count() > 0
            && tally.latency.quantile(0.99) <= bound;
        if met {
            lo = rate;
            best = Some((tally, elapsed, rate));
            if ix == 0 {
                break;
            }
        } else {
            hi = rate;
            lowest_failed = Some((tally, elapsed, rate));
        }
        rate = (lo + hi) / 2.0;
    }
    best.or(lowest_failed)
        .unwrap_or_else(|| (Tally::default(), Duration::ZERO, 0.0))
}

/// Top-1 over the dataset, every batch answered by the target.
async fn accuracy(target: &Target, queries: &[Query]) -> Result<Top1, String> {
    let mut top1 = Top1 {
        correct: 0,
        samples: 0,
    };
    for query in queries {
        let Some(labels) = &query.labels else {
            continue;
        };
        let answer = target.send(query).await?;
        if answer.outputs.is_empty() {
            return Err("the target answered without binary outputs".into());
        }
        let outputs: TVec<TValue> = answer
            .outputs
            .into_iter()
            .map(Tensor::into_tvalue)
            .collect();
        let predicted = predicted_labels(&outputs, labels.len()).map_err(|e| e.to_string())?;
        top1.correct += predicted.iter().zip(labels).filter(|(p, y)| p == y).count();
        top1.samples += labels.len();
    }
    Ok(top1)
}

/// The table `bench --target` prints without `--json`.
pub fn render(report: &TargetReport) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    let mut out = format!(
        "{} {} on {} ({}, batch {}, {} in flight)\n",
        report.scenario,
        report.model,
        report.target,
        report.schema,
        report.batch,
        report.concurrency
    );
    out += &format!(
        "  requests      {} ({} failed) in {:.1} s: {:.1} inferences/s\n",
        report.requests, report.failed, report.duration_s, report.inferences_per_s
    );
    let l = &report.latency_ms;
    out += &format!(
        "  latency ms    p50 {}  p90 {}  p99 {}  max {}\n",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max)
    );
    if let (Some(rate), Some(bound)) = (report.target_qps, report.latency_bound_ms) {
        out += &format!(
            "  server        {rate:.1} queries/s offered, p99 bound {bound} ms: {}\n",
            if report.bound_met == Some(true) {
                "met"
            } else {
                "not met"
            }
        );
    }
    out += &format!(
        "  server time   queue p50 {} us, compute p50 {} us\n",
        ms(report.server_queue_us_p50),
        ms(report.server_compute_us_p50)
    );
    if let (Some(a), Some(n)) = (report.accuracy_top1, report.accuracy_samples) {
        out += &format!("  accuracy      top-1 {a:.4} on {n} samples\n");
    }
    out
}
