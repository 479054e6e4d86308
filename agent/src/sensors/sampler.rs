//! Sampling a source on its own thread and integrating its energy.
//!
//! Power channels are integrated with the trapezoid rule on the monotonic timestamps of the
//! reads; counter channels add their deltas, with wraparound. A read is a *fresh sample* when
//! any channel's value changed: a stalled sensor repeats itself and adds no samples, and the
//! sample count is what says whether a window is long enough to trust.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::battery::BatteryProbe;
use super::{discover, DiscoveryOptions, SourceKind};
use super::{sampling_period, EnergySource, Joules, Reading, SensorError, Watts};
use crate::lock;
use crate::plaster::energy::{BatteryReport, EnergyMeter, EnergyReport, NoEnergySource};

/// Fewer fresh samples than this in a window and its energy is not reported (ENERGY.md:
/// sensor periods are as long as an inference or longer).
pub const MIN_FRESH_SAMPLES: u64 = 10;

/// Running integral of a source's readings.
#[derive(Clone, Debug, Default)]
pub struct Integrator {
    last: Option<(Instant, Vec<Reading>)>,
    energy: Joules,
    fresh: u64,
    reads: u64,
    errors: u64,
    last_error: Option<String>,
}

/// The integrator's state at its latest read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// When the latest good read happened (`None` before the first).
    pub at: Option<Instant>,
    /// Energy integrated since sampling began.
    pub energy: Joules,
    pub fresh: u64,
    pub reads: u64,
    pub errors: u64,
    pub last_error: Option<String>,
}

impl Integrator {
    /// Adds one read taken at `at` (monotonic, after the previous one).
    pub fn add(&mut self, at: Instant, readings: Vec<Reading>) {
        self.reads += 1;
        let Some((t0, previous)) = &self.last else {
            self.last = Some((at, readings));
            self.fresh += 1;
            return;
        };
        if at <= *t0 || previous.len() != readings.len() {
            // Out of order, or the source changed shape: restart from this read.
            self.last = Some((at, readings));
            return;
        }
        let dt = (at - *t0).as_secs_f64();
        let mut changed = false;
        for (before, now) in previous.iter().zip(&readings) {
            match (before, now) {
                (Reading::Power(p0), Reading::Power(p1)) => {
                    self.energy.0 += 0.5 * (p0.0 + p1.0) * dt;
                    changed |= p0 != p1;
                }
                (Reading::Counter { total: c0, .. }, Reading::Counter { total: c1, wrap }) => {
                    self.energy.0 += counter_delta(*c0, *c1, *wrap).0;
                    changed |= c0 != c1;
                }
                _ => {}
            }
        }
        if changed {
            self.fresh += 1;
        }
        self.last = Some((at, readings));
    }

    pub fn add_error(&mut self, error: &SensorError) {
        self.reads += 1;
        self.errors += 1;
        self.last_error = Some(error.to_string());
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: self.last.as_ref().map(|(t, _)| *t),
            energy: self.energy,
            fresh: self.fresh,
            reads: self.reads,
            errors: self.errors,
            last_error: self.last_error.clone(),
        }
    }
}

/// The energy between two counter readings. A counter that went down wrapped at `wrap`;
/// without a known range it was reset (driver reload), and the interval counts nothing.
pub fn counter_delta(before: Joules, after: Joules, wrap: Option<Joules>) -> Joules {
    if after.0 >= before.0 {
        Joules(after.0 - before.0)
    } else if let Some(wrap) = wrap {
        Joules((wrap.0 - before.0).max(0.0) + after.0)
    } else {
        Joules(0.0)
    }
}

struct Shared {
    integrator: Mutex<Integrator>,
    /// Signalled after every read, for `wait_for_reads`.
    read_done: Condvar,
    stop: Mutex<bool>,
    /// Signalled when the sampler must stop.
    stop_requested: Condvar,
}

/// Reads a source every sampling period on a dedicated thread until dropped.
pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    pub source_name: String,
    pub period: Duration,
}

impl Sampler {
    pub fn start(mut source: Box<dyn EnergySource>) -> Sampler {
        let period = sampling_period(source.as_ref());
        let source_name = source.name().to_string();
        let shared = Arc::new(Shared {
            integrator: Mutex::new(Integrator::default()),
            read_done: Condvar::new(),
            stop: Mutex::new(false),
            stop_requested: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("energy-sampler".into())
            .spawn(move || sample_loop(source.as_mut(), period, &thread_shared))
            .expect("spawn the energy sampler thread");
        Sampler {
            shared,
            thread: Some(thread),
            source_name,
            period,
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        lock(&self.shared.integrator).snapshot()
    }

    /// Blocks until the sampler has read at least `reads` times in all, or `timeout` passes.
    /// Used to make sure a window has a read at its boundary.
    pub fn wait_for_reads(&self, reads: u64, timeout: Duration) -> Snapshot {
        let deadline = Instant::now() + timeout;
        let mut integrator = lock(&self.shared.integrator);
        while integrator.reads < reads {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            integrator = self
                .shared
                .read_done
                .wait_timeout(integrator, deadline - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        integrator.snapshot()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        *lock(&self.shared.stop) = true;
        self.shared.stop_requested.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sample_loop(source: &mut dyn EnergySource, period: Duration, shared: &Shared) {
    let mut next = Instant::now();
    loop {
        let result = source.read_total();
        let at = Instant::now();
        {
            let mut integrator = lock(&shared.integrator);
            match result {
                Ok(readings) => integrator.add(at, readings),
                Err(e) => integrator.add_error(&e),
            }
        }
        shared.read_done.notify_all();
        next += period;
        let now = Instant::now();
        if next < now {
            // Fell behind (a slow read): skip the missed ticks rather than burst.
            next = now + period;
        }
        let stop = lock(&shared.stop);
        let (stop, _) = shared
            .stop_requested
            .wait_timeout_while(stop, next - now, |stop| !*stop)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *stop {
            return;
        }
    }
}

/// The meter of the best energy source under `options`, or one that says why there is none.
/// On a CPU run (`cpu_inference`) a GPU's NVML counter is not the energy of the inference, so
/// other sources come first. `idle_window` is how long `measure_idle` will take.
pub fn best_meter(
    options: &DiscoveryOptions,
    cpu_inference: bool,
    idle_window: Duration,
) -> Box<dyn EnergyMeter> {
    let mut discovery = discover(options);
    if cpu_inference && discovery.sources.len() > 1 {
        discovery
            .sources
            .sort_by_key(|s| s.kind() == SourceKind::Nvml);
    }
    match discovery.take_best() {
        Some(source) => {
            tracing::info!("measuring energy with {}", source.name());
            Box::new(SensorMeter::new(
                source,
                idle_window,
                discovery.batteries.first().cloned(),
            ))
        }
        None => {
            let reason = discovery.why_none();
            tracing::info!("energy: {reason}");
            Box::new(NoEnergySource { reason })
        }
    }
}

/// The energy meter backed by a sensor: idle baseline, then windows of inference.
pub struct SensorMeter {
    sampler: Sampler,
    idle_window: Duration,
    idle: Option<Watts>,
    start: Option<Snapshot>,
    battery: Option<BatteryProbe>,
    source_kind: String,
}

impl SensorMeter {
    pub fn new(
        source: Box<dyn EnergySource>,
        idle_window: Duration,
        battery: Option<BatteryProbe>,
    ) -> SensorMeter {
        let source_kind = source.kind().as_str().to_string();
        SensorMeter {
            sampler: Sampler::start(source),
            idle_window,
            idle: None,
            start: None,
            battery,
            source_kind,
        }
    }

    /// A snapshot taken at a fresh read: waits for the next read so the boundary is exact
    /// to within one sampling period.
    fn boundary(&self) -> Snapshot {
        let reads = self.sampler.snapshot().reads + 1;
        self.sampler
            .wait_for_reads(reads, self.sampler.period * 4 + Duration::from_millis(100))
    }
}

impl EnergyMeter for SensorMeter {
    fn measure_idle(&mut self) {
        let start = self.boundary();
        std::thread::sleep(self.idle_window);
        let end = self.boundary();
        self.idle = window_power(&start, &end);
    }

    fn start_window(&mut self) {
        self.start = Some(self.boundary());
    }

    fn finish_window(&mut self, inferences: u64) -> EnergyReport {
        let end = self.boundary();
        let Some(start) = self.start.take() else {
            return EnergyReport::unavailable("the energy window was never started");
        };
        self.report(&start, &end, inferences)
    }

    /// Back-to-back windows share their boundary read, so no energy falls between them.
    fn continue_window(&mut self, inferences: u64) -> EnergyReport {
        let end = self.boundary();
        match self.start.replace(end.clone()) {
            Some(start) => self.report(&start, &end, inferences),
            None => EnergyReport::unavailable("the energy window was never started"),
        }
    }
}

impl SensorMeter {
    fn report(&self, start: &Snapshot, end: &Snapshot, inferences: u64) -> EnergyReport {
        let battery = self
            .battery
            .as_ref()
            .and_then(|b| b.read().ok())
            .and_then(|s| {
                Some(BatteryReport {
                    percent: s.percent?,
                    status: s.status,
                    power_w: s.power.map(|w| w.0),
                })
            });
        let mut report =
            window_report(start, end, inferences, self.idle, &self.sampler.source_name);
        report.battery = battery;
        report.source = Some(format!(
            "{} ({})",
            self.sampler.source_name, self.source_kind
        ));
        report
    }
}

fn window_power(start: &Snapshot, end: &Snapshot) -> Option<Watts> {
    let (t0, t1) = (start.at?, end.at?);
    let seconds = (t1 - t0).as_secs_f64();
    (seconds > 0.0).then(|| Watts((end.energy.0 - start.energy.0) / seconds))
}

/// The report of a window between two snapshots, `inferences` having run in it.
pub fn window_report(
    start: &Snapshot,
    end: &Snapshot,
    inferences: u64,
    idle: Option<Watts>,
    source_name: &str,
) -> EnergyReport {
    let fresh = end.fresh.saturating_sub(start.fresh);
    let errors = end.errors.saturating_sub(start.errors);
    let mut report = EnergyReport::unavailable("");
    report.samples = fresh;
    report.idle_power_w = idle.map(|w| w.0).filter(|w| w.is_finite());
    let (Some(t0), Some(t1)) = (start.at, end.at) else {
        report.status = format!(
            "unavailable: {source_name} gave no reading ({})",
            end.last_error.as_deref().unwrap_or("no read yet")
        );
        return report;
    };
    if fresh < MIN_FRESH_SAMPLES {
        let stalled = if errors > 0 {
            format!(
                "; {errors} failed reads, last: {}",
                end.last_error.as_deref().unwrap_or("?")
            )
        } else {
            String::new()
        };
        report.status = format!(
            "unavailable: window too short for a confident figure ({fresh} fresh sensor samples, need {MIN_FRESH_SAMPLES}{stalled}); run longer"
        );
        return report;
    }
    if inferences == 0 {
        report.status = "unavailable: no inference ran in the window".into();
        return report;
    }
    let seconds = (t1 - t0).as_secs_f64();
    let energy = end.energy.0 - start.energy.0;
    let finite = |v: f64| v.is_finite().then_some(v);
    report.status = "measured".into();
    report.joules_per_inference = finite(energy / inferences as f64);
    report.inferences_per_joule = if energy > 0.0 {
        finite(inferences as f64 / energy)
    } else {
        None
    };
    report.mean_power_w = if seconds > 0.0 {
        finite(energy / seconds)
    } else {
        None
    };
    report.marginal_joules_per_inference = report
        .idle_power_w
        .and_then(|idle| finite((energy - idle * seconds) / inferences as f64));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn trapezoid_of_a_ramp_is_exact() {
        let base = Instant::now();
        let mut i = Integrator::default();
        // 0 W to 10 W over 1 s in 100 steps: the integral is 5 J.
        for step in 0..=100u64 {
            i.add(
                at(base, step * 10),
                vec![Reading::Power(Watts(step as f64 / 10.0))],
            );
        }
        assert!((i.snapshot().energy.0 - 5.0).abs() < 1e-9);
        assert_eq!(i.snapshot().fresh, 101);
    }

    #[test]
    fn repeated_values_are_not_fresh_but_still_integrate() {
        let base = Instant::now();
        let mut i = Integrator::default();
        for step in 0..10u64 {
            i.add(at(base, step * 100), vec![Reading::Power(Watts(4.0))]);
        }
        let s = i.snapshot();
        assert_eq!(s.fresh, 1);
        assert_eq!(s.reads, 10);
        assert!((s.energy.0 - 3.6).abs() < 1e-9);
    }

    #[test]
    fn counters_wrap_and_reset() {
        let wrap = Some(Joules(100.0));
        assert_eq!(counter_delta(Joules(90.0), Joules(5.0), wrap), Joules(15.0));
        assert_eq!(counter_delta(Joules(5.0), Joules(9.0), wrap), Joules(4.0));
        assert_eq!(counter_delta(Joules(90.0), Joules(5.0), None), Joules(0.0));
        let base = Instant::now();
        let mut i = Integrator::default();
        for (ms, total) in [(0, 98.0), (10, 99.5), (20, 1.5), (30, 3.0)] {
            i.add(
                at(base, ms),
                vec![Reading::Counter {
                    total: Joules(total),
                    wrap,
                }],
            );
        }
        assert!((i.snapshot().energy.0 - 5.0).abs() < 1e-9);
    }

    #[test]
    fn out_of_order_reads_restart() {
        let base = Instant::now();
        let mut i = Integrator::default();
        i.add(at(base, 100), vec![Reading::Power(Watts(1.0))]);
        i.add(at(base, 50), vec![Reading::Power(Watts(1.0))]);
        assert_eq!(i.snapshot().energy, Joules(0.0));
    }

    #[test]
    fn window_reports() {
        let base = Instant::now();
        let snap = |ms: u64, energy: f64, fresh: u64| Snapshot {
            at: Some(at(base, ms)),
            energy: Joules(energy),
            fresh,
            reads: fresh,
            errors: 0,
            last_error: None,
        };
        let r = window_report(
            &snap(0, 0.0, 0),
            &snap(2000, 20.0, 50),
            1000,
            Some(Watts(4.0)),
            "s",
        );
        assert_eq!(r.status, "measured");
        assert_eq!(r.joules_per_inference, Some(0.02));
        assert_eq!(r.marginal_joules_per_inference, Some((20.0 - 8.0) / 1000.0));
        assert_eq!(r.mean_power_w, Some(10.0));
        assert_eq!(r.inferences_per_joule, Some(50.0));
        assert_eq!(r.samples, 50);
        let short = window_report(&snap(0, 0.0, 0), &snap(20, 0.2, 3), 10, None, "s");
        assert_eq!(
            short.status,
            "unavailable: window too short for a confident figure (3 fresh sensor samples, need 10); run longer"
        );
        assert_eq!(short.joules_per_inference, None);
        let empty = Snapshot {
            at: None,
            energy: Joules(0.0),
            fresh: 0,
            reads: 3,
            errors: 3,
            last_error: Some("x: empty".into()),
        };
        assert_eq!(
            window_report(&empty, &empty, 1, None, "ina").status,
            "unavailable: ina gave no reading (x: empty)"
        );
    }
}
