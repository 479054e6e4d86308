//! Latency recording: an HDR histogram (3 significant digits) of per-query wall-clock times on
//! the monotonic clock, plus the exact count, sum and maximum.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Longest latency the histogram resolves; longer ones are clamped (and still counted).
const MAX_TRACKED: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
    sum: Duration,
    max: Duration,
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        LatencyRecorder::new()
    }
}

impl LatencyRecorder {
    pub fn new() -> LatencyRecorder {
        let histogram = Histogram::new_with_bounds(1, MAX_TRACKED.as_nanos() as u64, 3)
            .expect("static histogram bounds are valid");
        LatencyRecorder {
            histogram,
            sum: Duration::ZERO,
            max: Duration::ZERO,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        let nanos = (latency.as_nanos() as u64).clamp(1, MAX_TRACKED.as_nanos() as u64);
        self.histogram.saturating_record(nanos);
        self.sum += latency;
        self.max = self.max.max(latency);
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_nanos(self.histogram.value_at_quantile(q))
    }

    /// The figures of the recorded queries; every figure is `None` when none were recorded
    /// (a daemon window without inference), never a made-up zero.
    pub fn summary(&self) -> LatencySummary {
        let count = self.count();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let measured = |value: f64| (count > 0).then_some(value);
        LatencySummary {
            count,
            mean: measured(ms(self.sum) / count.max(1) as f64),
            p50: measured(ms(self.quantile(0.50))),
            p90: measured(ms(self.quantile(0.90))),
            p99: measured(ms(self.quantile(0.99))),
            max: measured(ms(self.max)),
        }
    }
}

/// Latency figures in milliseconds, as the report's `latency_ms` object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub max: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let mut rec = LatencyRecorder::new();
        for us in 1..=1000u64 {
            rec.record(Duration::from_micros(us));
        }
        let s = rec.summary();
        assert_eq!(s.count, 1000);
        let close = |value: Option<f64>, want: f64, tolerance: f64| {
            let value = value.expect("measured");
            assert!((value - want).abs() < tolerance, "{value} vs {want}");
        };
        close(s.mean, 0.5005, 1e-9);
        close(s.p50, 0.500, 0.001);
        close(s.p90, 0.900, 0.001);
        close(s.p99, 0.990, 0.001);
        assert_eq!(s.max, Some(1.0));
    }

    #[test]
    fn empty_and_out_of_range() {
        let mut rec = LatencyRecorder::new();
        let empty = rec.summary();
        assert_eq!(empty.count, 0);
        assert_eq!((empty.mean, empty.p50, empty.max), (None, None, None));
        rec.record(Duration::ZERO);
        rec.record(Duration::from_secs(7200));
        assert_eq!(rec.count(), 2);
        assert_eq!(rec.summary().max, Some(7_200_000.0));
    }
}
