//! `GET /metrics`: the PLASTER figures in Prometheus' text exposition format (version 0.0.4).
//!
//! Counters and the latency histograms are cumulative since the agent started, as Prometheus
//! expects (it computes rates itself); the figures of the last telemetry window (accuracy,
//! joules per inference, power, battery) are gauges, absent until measured rather than zero.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::telemetry::record::Telemetry;

/// Upper bounds of the latency buckets, in seconds: 100 µs (the digits MLP on a desktop core)
/// to 10 s (a large CNN on a Jetson Nano's CPU).
const BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A cumulative latency histogram with fixed buckets (lock-free: every inference records).
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(ix) = BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[ix].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (ix, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[ix].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.trim_end_matches(','))
        };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// Where an inference came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Api,
    Workload,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Workload => "workload",
        }
    }
}

#[derive(Default)]
struct PerSource {
    /// Samples inferred (a request of batch 4 counts 4).
    inferences: AtomicU64,
    /// Queries (requests or workload batches) that failed inside the runtime.
    failures: AtomicU64,
    /// Per query: API requests from arrival in the queue to the answer; workload batches
    /// for their compute.
    latency: Histogram,
}

/// The agent's counters, shared by everything that runs inference or answers requests.
#[derive(Default)]
pub struct Metrics {
    api: PerSource,
    workload: PerSource,
    /// API requests answered, by status code class.
    responses_2xx: AtomicU64,
    responses_4xx: AtomicU64,
    responses_5xx: AtomicU64,
    /// Requests refused because the queue was full (503) or the connection limit reached.
    shed_queue_full: AtomicU64,
    shed_connections: AtomicU64,
    shed_body_budget: AtomicU64,
    /// Samples in batches the batcher ran, and batches: their ratio is the mean batch size.
    batched_samples: AtomicU64,
    batches: AtomicU64,
    queue: Histogram,
}

impl Metrics {
    fn source(&self, source: Source) -> &PerSource {
        match source {
            Source::Api => &self.api,
            Source::Workload => &self.workload,
        }
    }

    pub fn inferred(&self, source: Source, samples: u64, latency: Duration) {
        let s = self.source(source);
        s.inferences.fetch_add(samples, Ordering::Relaxed);
        s.latency.record(latency);
    }

    /// Inferences and failures from every source since start (the canary's error rate).
    pub fn totals(&self) -> (u64, u64) {
        [&self.api, &self.workload]
            .iter()
            .fold((0, 0), |(n, f), s| {
                (
                    n + s.inferences.load(Ordering::Relaxed),
                    f + s.failures.load(Ordering::Relaxed),
                )
            })
    }

    pub fn failed(&self, source: Source) {
        self.source(source).failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn batch(&self, samples: usize, queued: &[Duration]) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.batched_samples
            .fetch_add(samples as u64, Ordering::Relaxed);
        queued.iter().for_each(|q| self.queue.record(*q));
    }

    pub fn responded(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.responses_2xx,
            400..=499 => &self.responses_4xx,
            _ => &self.responses_5xx,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed_queue_full(&self) {
        self.shed_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed_connection(&self) {
        self.shed_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed_body_budget(&self) {
        self.shed_body_budget.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `/metrics` shows besides the counters: the served model, the last telemetry record
/// and the spool.
pub struct Snapshot<'a> {
    pub model: Option<ModelLabels<'a>>,
    pub last: Option<&'a Telemetry>,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub queue_depth: u64,
}

pub struct ModelLabels<'a> {
    pub name: &'a str,
    pub version: Option<u64>,
    pub sha256: &'a str,
    pub runtime: &'a str,
    pub precision: &'a str,
    /// Unix time the model went live.
    pub active_since_s: f64,
}

/// Prometheus label values escape backslash, double quote and newline.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A family with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: Option<f64>) {
    if let Some(value) = value.filter(|v| v.is_finite()) {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// Renders every family. Families of figures not measured yet are left out, not zero.
pub fn render(metrics: &Metrics, snapshot: &Snapshot) -> String {
    let mut out = String::with_capacity(8192);
    let sources = [Source::Api, Source::Workload];

    let per_source =
        |out: &mut String, name: &str, help: &str, value: &dyn Fn(&PerSource) -> u64| {
            family(out, name, "counter", help);
            for s in sources {
                let _ = writeln!(
                    out,
                    "{name}{{source=\"{}\"}} {}",
                    s.as_str(),
                    value(metrics.source(s))
                );
            }
        };
    per_source(
        &mut out,
        "plaster_inferences_total",
        "Samples inferred, by where the request came from.",
        &|s| s.inferences.load(Ordering::Relaxed),
    );
    per_source(
        &mut out,
        "plaster_inference_failures_total",
        "Queries the runtime failed to run.",
        &|s| s.failures.load(Ordering::Relaxed),
    );
    family(&mut out, "plaster_latency_seconds", "histogram", "Latency per query: API requests from arrival to answer (queue and compute), workload batches compute only.");
    for s in sources {
        metrics.source(s).latency.render(
            &mut out,
            "plaster_latency_seconds",
            &format!("source=\"{}\",", s.as_str()),
        );
    }
    family(
        &mut out,
        "plaster_api_queue_seconds",
        "histogram",
        "Time API requests waited for the batcher.",
    );
    metrics
        .queue
        .render(&mut out, "plaster_api_queue_seconds", "");
    family(
        &mut out,
        "plaster_api_responses_total",
        "counter",
        "API responses by status class.",
    );
    for (class, c) in [
        ("2xx", &metrics.responses_2xx),
        ("4xx", &metrics.responses_4xx),
        ("5xx", &metrics.responses_5xx),
    ] {
        let _ = writeln!(
            out,
            "plaster_api_responses_total{{code=\"{class}\"}} {}",
            c.load(Ordering::Relaxed)
        );
    }
    family(
        &mut out,
        "plaster_api_shed_total",
        "counter",
        "Requests refused with 503 to keep memory bounded.",
    );
    let _ = writeln!(
        out,
        "plaster_api_shed_total{{reason=\"queue_full\"}} {}",
        metrics.shed_queue_full.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "plaster_api_shed_total{{reason=\"connections\"}} {}",
        metrics.shed_connections.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "plaster_api_shed_total{{reason=\"body_budget\"}} {}",
        metrics.shed_body_budget.load(Ordering::Relaxed)
    );
    single(
        &mut out,
        "plaster_api_batches_total",
        "counter",
        "Batches the dynamic batcher ran.",
        metrics.batches.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "plaster_api_batched_samples_total",
        "counter",
        "Samples in those batches (divide by batches for the mean batch size).",
        metrics.batched_samples.load(Ordering::Relaxed),
    );
    single(
        &mut out,
        "plaster_api_queue_depth",
        "gauge",
        "Requests waiting for the batcher now.",
        snapshot.queue_depth,
    );

    if let Some(model) = &snapshot.model {
        family(
            &mut out,
            "plaster_model_info",
            "gauge",
            "The active model (value 1).",
        );
        let _ = writeln!(
            out,
            "plaster_model_info{{name=\"{}\",version=\"{}\",sha256=\"{}\",runtime=\"{}\",precision=\"{}\"}} 1",
            label(model.name),
            model.version.map(|v| v.to_string()).unwrap_or_default(),
            label(model.sha256),
            label(model.runtime),
            label(model.precision)
        );
        gauge(
            &mut out,
            "plaster_model_active_since_seconds",
            "Unix time the active model went live.",
            Some(model.active_since_s),
        );
    }

    if let Some(t) = snapshot.last {
        let r = &t.report;
        gauge(&mut out, "plaster_accuracy_top1", "Top-1 accuracy: live replay of the dataset in the last window, else as measured at load.", r.accuracy.as_ref().map(|a| a.value));
        gauge(
            &mut out,
            "plaster_energy_joules_per_inference",
            "Joules per inference in the last telemetry window.",
            r.energy.joules_per_inference,
        );
        gauge(
            &mut out,
            "plaster_power_watts",
            "Mean power of the measured source in the last telemetry window.",
            r.energy.mean_power_w,
        );
        gauge(
            &mut out,
            "plaster_idle_power_watts",
            "Idle power measured at start.",
            r.energy.idle_power_w,
        );
        gauge(
            &mut out,
            "plaster_battery_percent",
            "Battery charge.",
            r.energy.battery.as_ref().map(|b| b.percent),
        );
        gauge(
            &mut out,
            "plaster_throughput_inferences_per_second",
            "Inferences per second in the last telemetry window.",
            Some(r.throughput.inferences_per_s),
        );
        gauge(
            &mut out,
            "plaster_latency_p90_seconds",
            "p90 latency of the last telemetry window.",
            r.latency_ms.p90.map(|ms| ms / 1e3),
        );
        gauge(
            &mut out,
            "plaster_model_size_bytes",
            "Size of the model file.",
            Some(r.size.file_bytes as f64),
        );
        gauge(
            &mut out,
            "plaster_resident_memory_peak_bytes",
            "Peak resident memory of the agent.",
            r.size.peak_rss_bytes.map(|b| b as f64),
        );
        let l = &r.learning;
        family(
            &mut out,
            "plaster_model_updates_total",
            "counter",
            "Model updates by result.",
        );
        let _ = writeln!(
            out,
            "plaster_model_updates_total{{result=\"activated\"}} {}",
            l.updates_ok
        );
        let _ = writeln!(
            out,
            "plaster_model_updates_total{{result=\"rejected\"}} {}",
            l.updates_rejected
        );
        let _ = writeln!(
            out,
            "plaster_model_updates_total{{result=\"rolled_back\"}} {}",
            l.rollbacks
        );
        gauge(
            &mut out,
            "plaster_push_to_active_seconds",
            "Push-to-active time of the last update.",
            l.push_to_active_s,
        );
        gauge(
            &mut out,
            "plaster_telemetry_seq",
            "Sequence number of the last telemetry record.",
            Some(t.seq as f64),
        );
        single(
            &mut out,
            "plaster_telemetry_dropped_total",
            "counter",
            "Telemetry records dropped because the spool was full.",
            t.spool_dropped,
        );
        if !t.temperatures_c.is_empty() {
            family(
                &mut out,
                "plaster_temperature_celsius",
                "gauge",
                "Thermal zone temperatures.",
            );
        }
        for (zone, c) in &t.temperatures_c {
            let _ = writeln!(
                out,
                "plaster_temperature_celsius{{zone=\"{}\"}} {c}",
                label(zone)
            );
        }
    }
    single(
        &mut out,
        "plaster_spool_records",
        "gauge",
        "Telemetry records waiting for the broker.",
        snapshot.spool_records,
    );
    single(
        &mut out,
        "plaster_spool_bytes",
        "gauge",
        "Bytes of telemetry waiting for the broker.",
        snapshot.spool_bytes,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let h = Histogram::default();
        for us in [50, 300, 300, 20_000_000] {
            h.record(Duration::from_micros(us));
        }
        let mut out = String::new();
        h.render(&mut out, "x", "source=\"api\",");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "x_bucket{source=\"api\",le=\"0.0001\"} 1");
        assert_eq!(lines[2], "x_bucket{source=\"api\",le=\"0.0005\"} 3");
        assert_eq!(lines[15], "x_bucket{source=\"api\",le=\"10\"} 3");
        assert_eq!(lines[16], "x_bucket{source=\"api\",le=\"+Inf\"} 4");
        assert_eq!(lines[17], "x_sum{source=\"api\"} 20.00065");
        assert_eq!(lines[18], "x_count{source=\"api\"} 4");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
