//! The real agent daemon as a child process: a config written for the test, stderr captured
//! line by line so a test waits for what the agent says instead of sleeping, and real signals.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A daemon configuration for tests: the digits bundle on the CPU, short telemetry windows.
pub struct DaemonConfig {
    pub device_id: String,
    pub fleet: String,
    pub broker_url: String,
    pub state_dir: PathBuf,
    pub telemetry_interval_s: f64,
    pub workload_rate_per_s: f64,
    /// `model.path`: the digits bundle by default.
    pub model: PathBuf,
    /// `api.listen`: by default a port the OS picks (read it with [`Daemon::api_addr`]).
    pub api_listen: String,
    /// More TOML under `[api]`.
    pub api_extra: String,
    /// More TOML appended as is (e.g. an `[energy]` section, TLS files under `[mqtt]`).
    pub mqtt_extra: String,
    pub extra: String,
}

impl DaemonConfig {
    pub fn new(dir: &Path, device_id: &str, broker_url: &str) -> DaemonConfig {
        DaemonConfig {
            device_id: device_id.to_string(),
            fleet: "lab".to_string(),
            broker_url: broker_url.to_string(),
            state_dir: dir.join("state"),
            telemetry_interval_s: 0.5,
            workload_rate_per_s: 200.0,
            model: crate::model_path("digits"),
            api_listen: "127.0.0.1:0".to_string(),
            api_extra: String::new(),
            mqtt_extra: String::new(),
            extra: String::new(),
        }
    }

    /// Writes `agent.toml` into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let text = format!(
            r#"device_id = "{}"
fleet = "{}"
state_dir = "{}"

[model]
path = "{}"
device = "cpu"
threads = 1

[mqtt]
url = "{}"
telemetry_interval_s = {}
{}

[api]
listen = "{}"
{}

[energy]
sysfs_root = "{}"

[workload]
rate_per_s = {}
{}"#,
            self.device_id,
            self.fleet,
            self.state_dir.display(),
            self.model.display(),
            self.broker_url,
            self.telemetry_interval_s,
            self.mqtt_extra,
            self.api_listen,
            self.api_extra,
            dir.join("no-sysfs").display(),
            self.workload_rate_per_s,
            self.extra,
        );
        let path = dir.join("agent.toml");
        std::fs::write(&path, text).expect("write agent.toml");
        path
    }
}

pub struct Daemon {
    pid: u32,
    lines: mpsc::Receiver<String>,
    exited: mpsc::Receiver<Option<i32>>,
    log: std::cell::RefCell<Vec<String>>,
    status: Option<Option<i32>>,
}

impl Daemon {
    /// Starts `plaster-agent run --config CONFIG` with debug logs.
    pub fn start(config: &Path) -> Daemon {
        Daemon::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut child: Child = Command::new(crate::agent_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "warn,plaster_agent=debug")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plaster-agent run");
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (exit_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait().ok().and_then(|s| s.code());
            let _ = exit_tx.send(status);
        });
        Daemon {
            pid,
            lines,
            exited,
            log: Default::default(),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the inference API listens on TCP and returns its `host:port`.
    pub fn api_addr(&self) -> String {
        let line = self.wait_for_log("inference API on http://", Duration::from_secs(60));
        let addr = line
            .split("inference API on http://")
            .nth(1)
            .expect("the address follows")
            .trim()
            .to_string();
        addr
    }

    /// Waits until the agent logs a line containing `needle`; returns the line.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.borrow_mut().push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "the agent did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log.borrow().join("\n")
                ),
            }
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.borrow_mut().extend(self.lines.try_iter());
        self.log.borrow().join("\n")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.pid);
    }

    /// Waits for the process to exit; its exit code (`None` when a signal ended it).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        if let Some(status) = self.status {
            return status;
        }
        let status = self.exited.recv_timeout(timeout).unwrap_or_else(|_| {
            panic!(
                "the agent did not exit within {timeout:?}; log:\n{}",
                self.log()
            )
        });
        self.status = Some(status);
        status
    }

    /// SIGKILL, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        self.signal("KILL");
        assert_eq!(self.wait(Duration::from_secs(10)), None);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() && self.exited.try_recv().is_err() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
    }
}
