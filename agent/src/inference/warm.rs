//! The helper threads of a plan with several threads: they stay awake while an inference runs
//! and take parts of our ops' work.
//!
//! tract's executor hands work to rayon workers, which sleep when idle. On a virtual machine
//! a core with nothing to run is halted by the hypervisor, and waking it for the next layer
//! can take longer than the layer: on the 2-core VM of bench/RESULTS.md a 0.55 ms product
//! handed half to a rayon worker took 0.30 ms at best but 0.45-0.59 ms on average, the caller
//! doing both halves whenever the worker came late. onnxruntime keeps its workers spinning
//! between the ops of a run for this reason, and so does a [`Crew`]: while any session of its
//! plan runs, its `threads - 1` helpers poll for work, yielding the core between polls (so a
//! rayon worker of tract's, or anything else runnable, takes it at once), and the caller of
//! [`Crew::run`] shares its parts with them with no wake-up at all. A millisecond after the
//! last inference ends the helpers park, spending nothing until the next.

use std::any::Any;
use std::cell::Cell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The helpers of one plan.
#[derive(Debug)]
pub struct Crew {
    shared: Arc<Shared>,
    helpers: Mutex<Vec<JoinHandle<()>>>,
    /// The caller and the helpers started.
    threads: usize,
}

#[derive(Debug, Default)]
struct Shared {
    /// Inferences running now.
    running: AtomicUsize,
    stop: AtomicBool,
    /// Helpers parked now (read by the tests).
    parked: AtomicUsize,
    /// Helpers that may be reading `job` now: a job outlives every visit to it.
    visitors: AtomicUsize,
    /// The job being shared out, or null.
    job: AtomicPtr<Job<'static>>,
}

/// `work(0..count)`, each part claimed by whoever takes `next` first.
struct Job<'a> {
    work: &'a (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// The first panic of a part, rethrown by the caller once every part has ended (a helper
    /// must not die holding a part, nor the caller leave while a helper uses the job).
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job<'_> {
    /// Claims and runs parts until none is left.
    fn take_parts(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::AcqRel);
            if part >= self.count {
                return;
            }
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (self.work)(part))) {
                if let Ok(mut first) = self.panic.lock() {
                    first.get_or_insert(panic);
                }
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

thread_local! {
    /// The crew of the inference this thread is running, if it has one.
    static CURRENT: Cell<*const Crew> = const { Cell::new(ptr::null()) };
}

/// `f` with the crew of the inference the calling thread is running (`None` outside one, or
/// when its plan has a single thread).
pub fn with_current<R>(f: impl FnOnce(Option<&Crew>) -> R) -> R {
    let crew = CURRENT.with(Cell::get);
    // SAFETY: `CURRENT` is set only by a `Hot` guard, to its crew, and reset before the guard
    // (which borrows the crew) is dropped; it is never set on another thread.
    f(unsafe { crew.as_ref() })
}

/// How long a helper keeps polling after the last inference of its plan ends, before it
/// parks: a short stretch of one core's time per burst of inferences.
const LINGER: Duration = Duration::from_millis(1);

/// Work below which [`for_parts`] keeps to the calling thread: elements (or multiply-adds)
/// of a memory-bound op, about 10-20 µs of it; handing a part to a polling helper costs a few.
pub const SPLIT_MIN: usize = 1 << 16;

/// `work(units, part)` over `out` cut into runs of whole `unit`-element units, one run per
/// thread of the current crew when `work_size` (elements or multiply-adds) is at least
/// [`SPLIT_MIN`]; else `work(0..units, out)` on the calling thread. `units` index `out`'s
/// units, so a part can find its inputs.
pub fn for_parts<T: Send>(
    out: &mut [T],
    unit: usize,
    work_size: usize,
    work: &(dyn Fn(Range<usize>, &mut [T]) + Sync),
) {
    let units = out.len().checked_div(unit).unwrap_or(0);
    with_current(|crew| {
        let crew = match crew {
            Some(crew) if work_size >= SPLIT_MIN && units > 1 && crew.threads() > 1 => crew,
            _ => return work(0..units, out),
        };
        let per = units.div_ceil(crew.threads());
        let base = Parts(out.as_mut_ptr());
        crew.run(units.div_ceil(per), &|part| {
            let range = part * per..((part + 1) * per).min(units);
            // SAFETY: the parts are disjoint runs of `out`, which stays mutably borrowed until
            // `run` returns, after every part is done.
            let slice = unsafe { base.slice(range.start * unit, range.len() * unit) };
            work(range, slice)
        });
    })
}

/// The start of a buffer that threads write disjoint parts of.
struct Parts<T>(*mut T);

// SAFETY: each thread makes its own disjoint slice of the buffer from it (`for_parts`).
unsafe impl<T: Send> Sync for Parts<T> {}

impl<T> Parts<T> {
    /// # Safety
    /// `start..start + len` is inside the buffer and no other thread uses it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

impl Crew {
    /// Starts `helpers` parked helper threads (fewer if the system refuses a thread: they
    /// only speed inference up, so a refusal is logged, not an error).
    pub fn new(helpers: usize) -> Crew {
        let shared = Arc::new(Shared::default());
        let mut handles = Vec::with_capacity(helpers);
        for ix in 0..helpers {
            let shared = Arc::clone(&shared);
            match thread::Builder::new()
                .name(format!("plaster-crew-{ix}"))
                .spawn(move || shared.help())
            {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    tracing::warn!("could not start an inference helper thread: {e}");
                    break;
                }
            }
        }
        Crew {
            shared,
            threads: 1 + handles.len(),
            helpers: Mutex::new(handles),
        }
    }

    /// The threads that share a [`run`](Crew::run): the caller and the helpers.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Wakes the helpers until the guard drops, and makes this crew the calling thread's
    /// current one ([`with_current`]) meanwhile.
    pub fn hold(&self) -> Hot<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0 {
            if let Ok(helpers) = self.helpers.lock() {
                for helper in helpers.iter() {
                    helper.thread().unpark();
                }
            }
        }
        let previous = CURRENT.with(|current| current.replace(self));
        Hot {
            crew: self,
            previous,
        }
    }

    /// Runs `work(part)` for every part in `0..count`, on the calling thread and on whichever
    /// helpers are free, and returns when all are done. When another run holds the helpers
    /// (two sessions of one plan at once), the caller does every part itself. A part that
    /// panics does so again here, on the caller, after the other parts have ended.
    pub fn run(&self, count: usize, work: &(dyn Fn(usize) + Sync)) {
        let job = Job {
            work,
            count,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        let shared = &self.shared;
        // The helpers see the job only between the exchange and the store of null below, and
        // the store waits for every visitor to leave: `job` outlives every use of it.
        let published = (&job as *const Job).cast_mut().cast::<Job<'static>>();
        let shared_out = count > 1
            && shared
                .job
                .compare_exchange(
                    ptr::null_mut(),
                    published,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok();
        job.take_parts();
        if shared_out {
            while job.done.load(Ordering::Acquire) < count {
                std::hint::spin_loop();
            }
            shared.job.store(ptr::null_mut(), Ordering::SeqCst);
            while shared.visitors.load(Ordering::SeqCst) > 0 {
                std::hint::spin_loop();
            }
        }
        if let Some(panic) = job.panic.into_inner().ok().flatten() {
            resume_unwind(panic);
        }
    }

    #[cfg(test)]
    fn parked(&self) -> usize {
        self.shared.parked.load(Ordering::Acquire)
    }
}

impl Shared {
    fn help(&self) {
        let mut idle_since = None;
        while !self.stop.load(Ordering::Acquire) {
            if self.running.load(Ordering::Acquire) == 0 {
                // Back-to-back inferences find the helper still awake: parking at the end of
                // each would put its wake-up on the next one's path.
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() < LINGER {
                    thread::yield_now();
                    continue;
                }
                idle_since = None;
                self.parked.fetch_add(1, Ordering::AcqRel);
                // `hold` unparks after raising `running`: an unpark that comes between the
                // check above and this call makes it return at once.
                thread::park();
                self.parked.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            idle_since = None;
            self.visitors.fetch_add(1, Ordering::SeqCst);
            let job = self.job.load(Ordering::SeqCst);
            // SAFETY: `run` clears `job` and then waits for the visitors to leave before its
            // job goes out of scope; this visitor was counted before it read the pointer.
            if let Some(job) = unsafe { job.as_ref() } {
                job.take_parts();
            }
            self.visitors.fetch_sub(1, Ordering::SeqCst);
            if job.is_null() {
                thread::yield_now();
            }
        }
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Ok(helpers) = self.helpers.get_mut() {
            for helper in helpers.drain(..) {
                helper.thread().unpark();
                let _ = helper.join();
            }
        }
    }
}

/// While it lives, the helpers of its crew are awake and the crew is its thread's current one.
#[derive(Debug)]
pub struct Hot<'a> {
    crew: &'a Crew,
    previous: *const Crew,
}

impl Drop for Hot<'_> {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(self.previous));
        self.crew.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (yielding, up to 10 s) until `done` holds.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::yield_now();
        }
    }

    #[test]
    fn helpers_wake_only_while_an_inference_runs_and_stop_with_the_plan() {
        let crew = Crew::new(2);
        assert_eq!(crew.threads(), 3);
        until("both helpers park", || crew.parked() == 2);
        with_current(|current| assert!(current.is_none()));
        let first = crew.hold();
        with_current(|current| assert!(current.is_some_and(|c| ptr::eq(c, &crew))));
        until("both helpers run", || crew.parked() == 0);
        // A second inference on the same plan keeps them running after the first ends.
        let second = crew.hold();
        drop(second);
        with_current(|current| assert!(current.is_some()));
        assert_eq!(crew.shared.running.load(Ordering::Acquire), 1);
        drop(first);
        with_current(|current| assert!(current.is_none()));
        until("both helpers park again", || crew.parked() == 2);
        let shared = Arc::clone(&crew.shared);
        drop(crew);
        // Joined in drop: only this test's reference is left.
        assert_eq!(Arc::strong_count(&shared), 1);
    }

    #[test]
    fn run_does_every_part_once_with_or_without_the_helpers() {
        let crew = Crew::new(2);
        let check = |crew: &Crew, count: usize| {
            let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
            let threads = Mutex::new(std::collections::HashSet::new());
            crew.run(count, &|part| {
                hits[part].fetch_add(1, Ordering::Relaxed);
                threads.lock().unwrap().insert(thread::current().id());
                // Long enough parts that a helper is likely to take some; not required.
                std::hint::black_box((0..20_000).sum::<u64>());
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            threads.into_inner().unwrap().len()
        };
        // Parked helpers: the caller does everything.
        assert_eq!(check(&crew, 64), 1);
        let hot = crew.hold();
        until("both helpers run", || crew.parked() == 0);
        for _ in 0..20 {
            assert!(check(&crew, 64) >= 1);
            assert_eq!(check(&crew, 1), 1);
            check(&crew, 0);
        }
        drop(hot);
    }

    #[test]
    fn for_parts_hands_each_unit_to_exactly_one_part_in_order() {
        let crew = Crew::new(2);
        let run = |work_size: usize, len: usize, unit: usize| {
            let mut out = vec![0usize; len];
            for_parts(&mut out, unit, work_size, &|units, part| {
                assert_eq!(part.len(), units.len() * unit);
                for (ix, chunk) in units.zip(part.chunks_exact_mut(unit)) {
                    chunk.fill(ix + 1);
                }
            });
            let expected: Vec<usize> = (0..len).map(|i| i / unit + 1).collect();
            assert_eq!(out, expected, "{len} elements in units of {unit}");
        };
        // Outside an inference, then inside one: small work on one thread, large split.
        run(SPLIT_MIN, 60, 4);
        let _hot = crew.hold();
        for (len, unit) in [(60, 4), (7, 7), (0, 3), (3 * 5 * 11, 5), (100, 1)] {
            run(1, len, unit);
            run(SPLIT_MIN, len, unit);
        }
    }

    #[test]
    fn a_part_that_panics_panics_on_the_caller_after_the_others_end() {
        let crew = Crew::new(1);
        let _hot = crew.hold();
        until("the helper runs", || crew.parked() == 0);
        let done = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            crew.run(8, &|part| {
                if part == 5 {
                    panic!("part 5 failed");
                }
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        let panic = result.expect_err("the panic reaches the caller");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"part 5 failed"));
        assert_eq!(done.load(Ordering::Relaxed), 7);
        // The crew is still whole: the next run does every part.
        done.store(0, Ordering::Relaxed);
        crew.run(8, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 8);
    }
}
