//! A real MQTT broker per test on a free loopback port: mosquitto when it is installed (CI
//! installs it), else the embedded rumqttd broker built from this crate, so `cargo test`
//! passes on a machine with only Rust. `MQTT_TEST_BROKER=embedded|mosquitto` forces one.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a broker may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mosquitto,
    Embedded,
}

/// A listener that admits one user with one password (the plain port stays anonymous, for
/// test clients).
#[derive(Clone, Debug)]
pub struct PasswordListener {
    pub username: String,
    pub password: String,
}

/// Server side of TLS: files in PEM, and whether clients must present a certificate.
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub require_client_certificate: bool,
}

pub struct Broker {
    pub kind: Kind,
    pub port: u16,
    /// Where MQTT 5 clients connect: mosquitto speaks both on one port, rumqttd needs two.
    pub v5_port: u16,
    /// The TLS listener's port, when one was asked for.
    pub tls_port: Option<u16>,
    tls: Option<TlsListener>,
    /// The password listener's port, when one was asked for.
    pub auth_port: Option<u16>,
    auth: Option<PasswordListener>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    log: mpsc::Receiver<String>,
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

fn mosquitto_path() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")]);
    candidates
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
}

impl Kind {
    pub fn detect() -> Kind {
        match std::env::var("MQTT_TEST_BROKER").as_deref() {
            Ok("embedded") => Kind::Embedded,
            Ok("mosquitto") => Kind::Mosquitto,
            _ if mosquitto_path().is_some() => Kind::Mosquitto,
            _ => Kind::Embedded,
        }
    }
}

impl Broker {
    /// A plain broker on a free port.
    pub fn start() -> Broker {
        Broker::start_with(None)
    }

    /// A plain broker on `port` (one an agent was already told about).
    pub fn start_on(port: u16) -> Broker {
        Broker::start_at(port, None, None)
    }

    /// A broker with an anonymous listener and one that requires `auth`'s credentials.
    pub fn start_with_password(auth: PasswordListener) -> Broker {
        Broker::start_at(free_port(), None, Some(auth))
    }

    /// A broker with a plain listener (for test clients) and, with `tls`, a TLS listener.
    /// TLS needs mosquitto.
    pub fn start_with(tls: Option<TlsListener>) -> Broker {
        Broker::start_at(free_port(), tls, None)
    }

    fn start_at(port: u16, tls: Option<TlsListener>, auth: Option<PasswordListener>) -> Broker {
        let kind = if tls.is_some() {
            Kind::Mosquitto
        } else {
            Kind::detect()
        };
        let (_tx, log) = mpsc::channel();
        let mut broker = Broker {
            kind,
            port,
            v5_port: match kind {
                Kind::Mosquitto => port,
                Kind::Embedded => free_port(),
            },
            tls_port: tls.as_ref().map(|_| free_port()),
            tls,
            auth_port: auth.as_ref().map(|_| free_port()),
            auth,
            dir: tempfile::tempdir().expect("broker dir"),
            child: None,
            log,
        };
        broker.spawn();
        broker
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The URL an MQTT 5 client uses.
    pub fn v5_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.v5_port)
    }

    fn spawn(&mut self) {
        let (tx, rx) = mpsc::channel();
        let mut child = match self.kind {
            Kind::Mosquitto => {
                let conf = self.write_mosquitto_conf();
                Command::new(mosquitto_path().expect("mosquitto installed"))
                    .arg("-c")
                    .arg(conf)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("spawn mosquitto")
            }
            Kind::Embedded => Command::new(embedded_broker_bin())
                .arg(self.port.to_string())
                .arg(self.v5_port.to_string())
                .args(match (&self.auth, self.auth_port) {
                    (Some(auth), Some(port)) => vec![
                        port.to_string(),
                        auth.username.clone(),
                        auth.password.clone(),
                    ],
                    _ => Vec::new(),
                })
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn embedded-broker"),
        };
        let stderr = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.child = Some(child);
        self.log = rx;
        let deadline = Instant::now() + START_TIMEOUT;
        match self.kind {
            // mosquitto says when its listeners are open.
            Kind::Mosquitto => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.log.recv_timeout(left) {
                    Ok(line) if line.contains(" running") => break,
                    Ok(_) => {}
                    Err(_) => panic!("mosquitto did not start on port {}", self.port),
                }
            },
            // rumqttd does not: probe its port until it accepts.
            Kind::Embedded => {
                let ports = [Some(self.port), Some(self.v5_port), self.auth_port];
                while ports
                    .iter()
                    .flatten()
                    .any(|&p| TcpStream::connect(("127.0.0.1", p)).is_err())
                {
                    assert!(
                        Instant::now() < deadline,
                        "embedded broker did not start on port {}",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    fn write_mosquitto_conf(&self) -> PathBuf {
        let dir = self.dir.path();
        // Settings per listener: the plain one stays anonymous for test clients. `user root`:
        // started as root (CI), mosquitto would otherwise drop to the `mosquitto` user, which
        // cannot write the saved sessions into this root-owned directory, and a restart would
        // lose what it had queued for persistent clients; as any other user it has no effect.
        let mut conf = format!(
            "per_listener_settings true\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             persistence true\npersistence_location {}/\nuser root\n\
             listener {} 127.0.0.1\nallow_anonymous true\n",
            dir.display(),
            self.port
        );
        if let (Some(auth), Some(port)) = (&self.auth, self.auth_port) {
            let passwords = dir.join("passwords");
            let status = Command::new("mosquitto_passwd")
                .args(["-b", "-c"])
                .arg(&passwords)
                .arg(&auth.username)
                .arg(&auth.password)
                .status()
                .expect("run mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed");
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
                passwords.display()
            ));
        }
        if let (Some(tls), Some(port)) = (&self.tls, self.tls_port) {
            conf.push_str(&format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {}\n",
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
                tls.require_client_certificate
            ));
        }
        let path = dir.join("mosquitto.conf");
        std::fs::write(&path, conf).expect("write mosquitto.conf");
        path
    }

    /// Stops the broker the way an operator or a crash would: SIGTERM for mosquitto (which
    /// saves its sessions, as a restarted production broker has them), SIGKILL for rumqttd.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let signal = match self.kind {
                Kind::Mosquitto => "-TERM",
                Kind::Embedded => "-KILL",
            };
            let _ = Command::new("kill")
                .arg(signal)
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
            if self.kind == Kind::Mosquitto {
                // Every line it wrote: the log's sender ends with its stderr.
                let errors: Vec<String> = self
                    .log
                    .iter()
                    .filter(|line| line.contains("Error"))
                    .collect();
                assert!(
                    errors.is_empty(),
                    "mosquitto did not save its sessions on stop: {errors:?}"
                );
            }
        }
    }

    /// Starts the broker again on the same port(s), with its saved sessions.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The broker's log lines so far (mosquitto logs connections and refusals).
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `embedded-broker`, built next to the test executables.
fn embedded_broker_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..");
    let bin = dir.join("embedded-broker");
    if !bin.is_file() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "plaster-agent-tests",
                "--bin",
                "embedded-broker",
            ])
            .current_dir(crate::repo_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building embedded-broker failed");
    }
    bin
}
