//! Sysfs fixture trees: a writable copy of a recorded tree, and a writer thread that drives
//! one attribute over time with a known profile and logs exactly what it wrote and when.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A private, writable copy of `tests/fixtures/<board>` (or an empty tree).
pub struct Tree {
    dir: TempDir,
}

impl Tree {
    pub fn copy(board: &str) -> Tree {
        let dir = tempfile::tempdir().expect("tempdir");
        copy_dir(
            &crate::repo_root().join("tests/fixtures").join(board),
            dir.path(),
        );
        Tree { dir }
    }

    pub fn empty() -> Tree {
        Tree {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Replaces an attribute atomically (write a temporary file, rename over), as the kernel
    /// makes a sysfs read see either the old or the new value.
    pub fn write(&self, rel: &str, value: &str) {
        write_atomic(&self.path(rel), value);
    }

    /// Lets other users traverse and read the tree (for tests that drop privileges).
    pub fn open_to_all(&self) {
        use std::os::unix::fs::PermissionsExt;
        for entry in walk(self.root()) {
            let mode = if entry.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(&entry, fs::Permissions::from_mode(mode)).unwrap();
        }
        fs::set_permissions(self.root(), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(walk(&path));
        }
        all.push(path);
    }
    all
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Overwrites an attribute in place (same inode, fixed width, one positional write), the way a
/// sysfs attribute changes under a reader that keeps it open and re-reads offset 0.
pub fn overwrite_in_place(path: &Path, value: &str) {
    use std::os::unix::fs::FileExt;
    let file = fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(format!("{value:<31}\n").as_bytes(), 0)
        .unwrap();
}

pub fn write_atomic(path: &Path, value: &str) {
    let tmp = path.with_extension("fixture-tmp");
    fs::write(&tmp, format!("{value}\n")).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// One write of the profile: the text written and the power (or counter value) it stands for.
#[derive(Clone, Copy, Debug)]
pub struct Written {
    pub at: Instant,
    pub value: f64,
}

/// A thread that writes `step(n)` into a file (in place) every `period` until `step` returns `None` or it
/// is stopped; it logs when each value became visible.
pub struct Writer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Written>>>,
}

impl Writer {
    pub fn start(
        path: PathBuf,
        period: Duration,
        mut step: impl FnMut(u64) -> Option<(String, f64)> + Send + 'static,
    ) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut log = Vec::new();
            let start = Instant::now();
            let mut n = 0u64;
            while !thread_stop.load(Ordering::SeqCst) {
                let Some((text, value)) = step(n) else { break };
                overwrite_in_place(&path, &text);
                log.push(Written {
                    at: Instant::now(),
                    value,
                });
                n += 1;
                // Pacing of the generated profile (the writer plays a sensor's update clock).
                let next = start + period * n as u32;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            log
        });
        Writer {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits for the profile to end by itself and returns what was written.
    pub fn join(mut self) -> Vec<Written> {
        self.thread.take().unwrap().join().expect("writer thread")
    }

    /// Stops the writer and returns what was written.
    pub fn stop(self) -> Vec<Written> {
        self.stop.store(true, Ordering::SeqCst);
        self.join()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exact integral of the step function the writer produced, between `t0` and `t1`:
/// `before` until the first write, then each written value until the next.
pub fn integral(log: &[Written], before: f64, t0: Instant, t1: Instant) -> f64 {
    let mut total = 0.0;
    let mut value = before;
    let mut from = t0;
    for w in log {
        if w.at <= t0 {
            value = w.value;
            continue;
        }
        if w.at >= t1 {
            break;
        }
        total += value * (w.at - from).as_secs_f64();
        from = w.at;
        value = w.value;
    }
    total + value * (t1 - from).as_secs_f64()
}
