//! Load scenarios after MLPerf LoadGen: single-stream (the next query is issued when the
//! previous one completes; report p90), offline (every query available at once; report
//! inferences per second) and server (Poisson arrivals at a target rate; report p99 against a
//! latency bound, and optionally search the highest rate that meets it).

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_distr::{Distribution, Exp};

use super::latency::LatencyRecorder;
use crate::inference::InferenceError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    SingleStream,
    Offline,
    Server,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::SingleStream => "single-stream",
            Scenario::Offline => "offline",
            Scenario::Server => "server",
        }
    }

    /// MLPerf Inference's minimum run for a valid result: duration and query count
    /// (`--strict`). Offline counts samples, not queries.
    pub fn strict_minimums(self) -> (Duration, u64) {
        match self {
            Scenario::SingleStream => (Duration::from_secs(600), 1024),
            Scenario::Offline => (Duration::from_secs(600), 24_576),
            Scenario::Server => (Duration::from_secs(600), 270_336),
        }
    }
}

/// Runs one query (one batch) to completion on the calling thread.
pub trait QueryRunner {
    fn run_query(&mut self) -> Result<(), InferenceError>;
}

impl<F: FnMut() -> Result<(), InferenceError>> QueryRunner for F {
    fn run_query(&mut self) -> Result<(), InferenceError> {
        self()
    }
}

/// Runs queries until `queries` ran or `max` passed, whichever comes first: caches, lazily
/// built kernels and (on a GPU) compiled kernels are ready before anything is measured.
pub fn warm_up(
    runner: &mut dyn QueryRunner,
    queries: u32,
    max: Duration,
) -> Result<(), InferenceError> {
    let start = Instant::now();
    for _ in 0..queries {
        runner.run_query()?;
        if start.elapsed() >= max {
            break;
        }
    }
    Ok(())
}

/// Told how far a run has gone: time elapsed in the current phase and queries completed.
pub type Tick<'a> = &'a mut dyn FnMut(Duration, u64);

/// Progress is reported at most this often, so the instrumentation stays off the hot path.
const TICK_EVERY: Duration = Duration::from_millis(100);

/// What a scenario run measured.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    pub latency: LatencyRecorder,
    pub queries: u64,
    pub elapsed: Duration,
    /// Server scenario: the arrival rate offered, in queries per second.
    pub target_qps: Option<f64>,
    /// Server scenario: whether p99 latency met the bound.
    pub bound_met: Option<bool>,
}

impl RunOutcome {
    pub fn queries_per_s(&self) -> f64 {
        if self.elapsed.is_zero() {
            0.0
        } else {
            self.queries as f64 / self.elapsed.as_secs_f64()
        }
    }
}

/// Closed loop: each query is issued when the previous one completes, until `duration` has
/// passed and at least `min_queries` ran. Single-stream runs it at batch 1; offline runs it
/// with whole batches, all queries being available at once.
pub fn closed_loop(
    runner: &mut dyn QueryRunner,
    duration: Duration,
    min_queries: u64,
    tick: Tick,
) -> Result<RunOutcome, InferenceError> {
    let mut latency = LatencyRecorder::new();
    let start = Instant::now();
    let mut last_tick = start;
    let mut queries = 0u64;
    loop {
        let issued = Instant::now();
        runner.run_query()?;
        let done = Instant::now();
        latency.record(done - issued);
        queries += 1;
        if done - start >= duration && queries >= min_queries.max(1) {
            break;
        }
        if done - last_tick >= TICK_EVERY {
            last_tick = done;
            tick(done - start, queries);
        }
    }
    let elapsed = start.elapsed();
    tick(elapsed, queries);
    Ok(RunOutcome {
        latency,
        queries,
        elapsed,
        target_qps: None,
        bound_met: None,
    })
}

/// A query whose latency passes this many bounds means the queue is growing without limit:
/// the run stops early, failed.
const OVERLOAD_FACTOR: u32 = 10;

/// Server: queries arrive as a Poisson process at `target_qps` for `duration` and are served
/// first-in first-out by this thread; latency runs from arrival to completion, so it includes
/// queueing. `bound_met` says whether p99 stayed within `bound`.
pub fn server(
    runner: &mut dyn QueryRunner,
    target_qps: f64,
    duration: Duration,
    bound: Duration,
    seed: u64,
    tick: Tick,
) -> Result<RunOutcome, InferenceError> {
    let not_positive = || {
        InferenceError::Run(format!(
            "server target rate {target_qps} queries/s is not positive"
        ))
    };
    if !(target_qps.is_finite() && target_qps > 0.0) {
        return Err(not_positive());
    }
    let interarrival = Exp::new(target_qps).map_err(|_| not_positive())?;
    // An exponential sample is finite for a finite positive rate; saturate rather than panic.
    let gap = |rng: &mut rand::rngs::StdRng| {
        Duration::try_from_secs_f64(interarrival.sample(rng)).unwrap_or(Duration::MAX)
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut latency = LatencyRecorder::new();
    let start = Instant::now();
    let mut last_tick = start;
    let mut queries = 0u64;
    let mut overloaded = false;
    let mut next_arrival = gap(&mut rng);
    while next_arrival < duration {
        let arrival = start + next_arrival;
        wait_until(arrival);
        runner.run_query()?;
        let done = Instant::now();
        let waited = done - arrival;
        latency.record(waited);
        queries += 1;
        if waited > bound * OVERLOAD_FACTOR {
            overloaded = true;
            break;
        }
        if done - last_tick >= TICK_EVERY {
            last_tick = done;
            tick(done - start, queries);
        }
        next_arrival = next_arrival.saturating_add(gap(&mut rng));
    }
    let elapsed = start.elapsed();
    tick(elapsed, queries);
    let bound_met = !overloaded && queries > 0 && latency.quantile(0.99) <= bound;
    Ok(RunOutcome {
        latency,
        queries,
        elapsed,
        target_qps: Some(target_qps),
        bound_met: Some(bound_met),
    })
}

/// Sleeps until shortly before `deadline`, then spins: `sleep` overshoots by tens of
/// microseconds, which would count as queueing latency for fast models.
fn wait_until(deadline: Instant) {
    const SPIN: Duration = Duration::from_micros(500);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > SPIN {
            std::thread::sleep(left - SPIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Probes of the peak search: the first at the measured capacity, the rest bisecting.
const PEAK_PROBES: u32 = 7;

/// Searches the highest Poisson arrival rate whose p99 meets `bound`, between 0 and
/// `capacity_qps` (what one stream sustains back to back), within about `duration` in all.
/// Returns the run at the best rate found, or the lowest rate probed when none met the bound.
pub fn find_peak(
    runner: &mut dyn QueryRunner,
    capacity_qps: f64,
    duration: Duration,
    bound: Duration,
    tick: Tick,
) -> Result<RunOutcome, InferenceError> {
    let probe = (duration / PEAK_PROBES).max(Duration::from_millis(500));
    let mut best: Option<RunOutcome> = None;
    let mut lowest_failed: Option<RunOutcome> = None;
    let (mut lo, mut hi) = (0.0f64, capacity_qps);
    let mut rate = capacity_qps;
    for ix in 0..PEAK_PROBES {
        let outcome = server(runner, rate, probe, bound, u64::from(ix), tick)?;
        if outcome.bound_met == Some(true) {
            lo = rate;
            best = Some(outcome);
            if ix == 0 {
                break;
            }
        } else {
            hi = rate;
            lowest_failed = Some(outcome);
        }
        rate = (lo + hi) / 2.0;
        if rate <= 0.0 {
            break;
        }
    }
    Ok(best.or(lowest_failed).expect("at least one probe ran"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(d: Duration) -> impl FnMut() -> Result<(), InferenceError> {
        move || {
            let t = Instant::now();
            while t.elapsed() < d {
                std::hint::spin_loop();
            }
            Ok(())
        }
    }

    #[test]
    fn closed_loop_honours_min_queries_and_duration() {
        let mut runner = busy(Duration::from_micros(50));
        let mut ticks = 0;
        let out = closed_loop(&mut runner, Duration::from_millis(5), 200, &mut |_, _| {
            ticks += 1
        })
        .unwrap();
        assert!(out.queries >= 200);
        assert!(out.elapsed >= Duration::from_millis(5));
        assert_eq!(out.latency.count(), out.queries);
        assert!(ticks >= 1);
    }

    #[test]
    fn overloaded_server_fails_its_bound() {
        // 2 ms of work per query offered at 2000 queries/s: four times what one stream serves.
        let mut runner = busy(Duration::from_millis(2));
        let out = server(
            &mut runner,
            2000.0,
            Duration::from_secs(2),
            Duration::from_millis(5),
            1,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out.bound_met, Some(false));
    }

    #[test]
    fn light_server_meets_its_bound_and_rate() {
        let mut runner = busy(Duration::from_micros(20));
        let out = server(
            &mut runner,
            500.0,
            Duration::from_millis(400),
            Duration::from_millis(50),
            7,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(out.bound_met, Some(true));
        // A Poisson process at 500/s over 0.4 s yields 200 arrivals on average (sd ~14).
        assert!((120..=280).contains(&out.queries), "{}", out.queries);
    }

    #[test]
    fn server_rejects_a_non_positive_rate() {
        let mut runner = busy(Duration::ZERO);
        let err = server(
            &mut runner,
            0.0,
            Duration::from_millis(1),
            Duration::from_millis(1),
            1,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "inference failed: server target rate 0 queries/s is not positive"
        );
    }
}
