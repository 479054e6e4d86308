//! Shared helpers for the integration tests: where the repository's models are, a way to
//! run the real `plaster-agent` binary and capture what it prints, and sysfs fixture trees.

pub mod broker;
pub mod daemon;
pub mod http;
pub mod mqtt;
pub mod ota;
pub mod sysfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A path under `models/`.
pub fn model_path(rel: &str) -> PathBuf {
    repo_root().join("models").join(rel)
}

/// The `plaster-agent` binary next to this test executable (one level above `deps/`).
/// `cargo test --workspace` builds it; when it is missing or older than the agent's sources
/// (`cargo test -p plaster-agent-tests` after an edit), it is built first, once per process,
/// so a test never runs a stale binary.
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("test executable path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("target/<profile>/deps/..");
            let bin = dir.join(format!("plaster-agent{}", std::env::consts::EXE_SUFFIX));
            let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
            let root = repo_root();
            let sources = [root.join("agent/src"), root.join("agent/Cargo.toml")];
            let newest = sources.iter().filter_map(|p| newest_mtime(p)).max();
            if built.is_none() || newest > built {
                let profile = dir.file_name().and_then(|s| s.to_str()).unwrap_or("debug");
                let mut build = Command::new(env!("CARGO"));
                build.args([
                    "build",
                    "--quiet",
                    "-p",
                    "plaster-agent",
                    "--bin",
                    "plaster-agent",
                ]);
                if profile == "release" {
                    build.arg("--release");
                }
                let status = build.current_dir(&root).status().expect("run cargo build");
                assert!(status.success(), "cargo build -p plaster-agent failed");
            }
            assert!(bin.is_file(), "{} is missing", bin.display());
            bin
        })
        .clone()
}

/// The latest modification time of a file, or of any file below a directory.
fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// A real filesystem that runs out of space: a small tmpfs mounted over a temporary directory
/// (mounting needs root, as CI and the development machines run).
pub struct TinyFs {
    pub dir: tempfile::TempDir,
}

impl TinyFs {
    /// `size` as mount(8) takes it, e.g. "64k".
    pub fn mount(size: &str) -> TinyFs {
        let dir = tempfile::tempdir().expect("temporary directory");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (this test fills a real disk)"
        );
        TinyFs { dir }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// What one run of the agent produced.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The run succeeded; its stdout parsed as exactly one JSON value.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "agent failed: {}", self.stderr);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}): {}", self.stdout))
    }

    /// The run failed with `code` and printed exactly `message` as its error line, without
    /// panicking.
    pub fn assert_error(&self, code: i32, message: &str) {
        assert!(
            !self.stderr.contains("panicked"),
            "agent panicked: {}",
            self.stderr
        );
        assert_eq!(self.code, code, "stderr: {}", self.stderr);
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or_default();
        assert_eq!(line, message, "full stderr: {}", self.stderr);
    }
}

/// Runs the agent with `args` from the repository root and waits for it.
pub fn agent(args: &[&str]) -> Run {
    let output: Output = Command::new(agent_bin())
        .args(args)
        .current_dir(repo_root())
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn plaster-agent");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The figures `models/make_models.py` recorded with onnxruntime.
pub fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(model_path("expected.json")).expect("models/expected.json");
    serde_json::from_str(&text).expect("expected.json is JSON")
}
