//! The daemon's configuration: a TOML file, its sorted drop-ins (`agent.toml.d/*.toml`) and
//! `PLASTER_<SECTION>_<KEY>` environment overrides, merged in that order, then checked as a
//! whole: every problem is reported at once, each with the file (or variable) and key at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::inference::{DeviceKind, Precision};
use crate::sensors::SourceKind;

/// Where `run` and `check-config` look without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/plaster-agent/agent.toml";
/// Models, spool and transfer staging live here (systemd's StateDirectory).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/plaster-agent";
/// The first model, until an update activates one.
pub const DEFAULT_MODEL_PATH: &str = "/var/lib/plaster-agent/models/active";
/// Brokers usually listen on loopback on the device or behind a bridge.
pub const DEFAULT_MQTT_URL: &str = "mqtt://127.0.0.1:1883";
/// Often enough for a live dashboard, rare enough for a metered cellular link.
pub const DEFAULT_TELEMETRY_INTERVAL_S: f64 = 10.0;
/// PROTOCOL.md: keep-alive 30 s.
pub const DEFAULT_KEEP_ALIVE_S: u64 = 30;
/// Telemetry spooled while the broker is away: a day of records at the default interval is
/// about 8640 records of under 1 KiB each, so 16 MiB keeps more than a day.
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// The local inference API: loopback only unless the operator opens it.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8000";
/// Batches of up to 8 samples: most of the throughput gain on small CPUs and GPUs, little
/// added latency.
pub const DEFAULT_API_MAX_BATCH: usize = 8;
/// A batch takes what is queued when the batcher gets to it and does not wait for more:
/// under load, requests queue while the previous batch runs, so batches form by themselves,
/// and a lone request never waits (Triton's default too).
pub const DEFAULT_API_MAX_QUEUE_DELAY_US: u64 = 0;
/// Requests waiting for inference at most (beyond: 503, Retry-After).
pub const DEFAULT_API_MAX_QUEUE: usize = 128;
/// A batch of 8 SqueezeNet inputs in JSON is about 40 MB; 64 MiB leaves room.
pub const DEFAULT_API_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// Connections served at once (each costs a task and its buffers; beyond: 503).
pub const DEFAULT_API_MAX_CONNECTIONS: usize = 512;
/// One inference thread for the API: the rest of the cores stay with the application.
pub const DEFAULT_API_INSTANCES: usize = 1;
/// Two threads leave a Jetson Nano's other two cores to the application.
pub const DEFAULT_THREADS: usize = 2;
/// PROTOCOL.md: a pushed model may lose at most one point of accuracy.
pub const DEFAULT_MAX_ACCURACY_DROP: f64 = 0.01;
/// PROTOCOL.md: five minutes of canary after activation.
pub const DEFAULT_CANARY_S: u64 = 300;
/// Previous versions kept for rollback.
pub const DEFAULT_KEEP_VERSIONS: u64 = 3;
/// The largest bundle a device accepts: a model-zoo CNN with its dataset is tens of MB; a
/// Jetson's state partition is a few GB.
pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 256 * 1024 * 1024;
/// PROTOCOL.md: after a pause in chunks of 10 s the device reports what is missing.
pub const DEFAULT_CHUNK_PAUSE_S: f64 = 10.0;
/// PROTOCOL.md: a transfer still incomplete after 10 minutes is dropped.
pub const DEFAULT_TRANSFER_DEADLINE_S: f64 = 600.0;
/// The canary rolls back when p90 latency grows by more than half over the previous version's
/// (well beyond window-to-window noise, which stays within about 20 % here).
pub const DEFAULT_CANARY_MAX_LATENCY_INCREASE: f64 = 0.5;
/// ... or joules per inference by more than half.
pub const DEFAULT_CANARY_MAX_ENERGY_INCREASE: f64 = 0.5;
/// ... or more than 1 % of inferences fail.
pub const DEFAULT_CANARY_MAX_ERROR_RATE: f64 = 0.01;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Cbor,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttVersion {
    V311,
    V5,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub device_id: String,
    pub fleet: String,
    pub state_dir: PathBuf,
    pub model: ModelConfig,
    pub mqtt: MqttConfig,
    pub api: ApiConfig,
    pub energy: EnergyConfig,
    pub ota: OtaConfig,
    pub workload: WorkloadConfig,
    /// The files read, in merge order (for logs and `check-config`).
    pub sources: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub device: DeviceKind,
    pub precision: Precision,
    pub threads: usize,
    /// Our graph rewrites (CPU, f32); `false` runs tract's plan unmodified.
    pub rewrites: bool,
    /// Where decluttered models are cached (`state_dir/cache/models`) with `model.cache =
    /// true`; off by default: it saves about a sixth of the load time of 30-100 MB models but
    /// costs a little on small ones (bench/RESULTS.md).
    pub cache_dir: Option<PathBuf>,
}

/// Under `state_dir`: decluttered models cached as NNEF (inference::cache).
pub const MODEL_CACHE_DIR: &str = "cache/models";

impl ModelConfig {
    /// The plan options this model is prepared with.
    pub fn plan_options(&self) -> crate::inference::PlanOptions {
        crate::inference::PlanOptions::new(self.precision, self.threads)
            .with_rewrites(self.rewrites)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqttConfig {
    pub url: BrokerUrl,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub telemetry_interval: Duration,
    pub encoding: Encoding,
    pub keep_alive: Duration,
    pub version: MqttVersion,
    pub spool_max_bytes: u64,
}

/// `mqtt://host:port` or `mqtts://host:port` (TLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!(
                "{s:?} is not an MQTT URL (use mqtt://HOST:PORT or mqtts://HOST:PORT)"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("{s:?} has an invalid port {port:?}"))?;
                (
                    host.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port,
                )
            }
            _ => (rest.to_string(), if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(BrokerUrl { tls, host, port })
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    /// Where the local inference API listens; `None` (`listen = ""`) turns it off.
    pub listen: Option<ApiListen>,
    /// Samples per batch the dynamic batcher runs at most (models with a batch axis); 1 = off.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others.
    pub max_queue_delay: Duration,
    /// Requests waiting for inference at most; more are answered 503 with Retry-After.
    pub max_queue: usize,
    /// Request bodies larger than this are answered 413.
    pub max_body_bytes: u64,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Inference threads serving the API (each runs `model.threads` intra-op threads).
    pub instances: usize,
}

/// `host:port`, or `unix:/path/to/socket`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ApiListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiListen::Tcp(addr) => write!(f, "http://{addr}"),
            ApiListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnergyConfig {
    pub sysfs_root: PathBuf,
    pub total_rail: Option<String>,
    pub source: Option<SourceKind>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OtaConfig {
    /// Key id to base64 Ed25519 public key.
    pub trusted_keys: BTreeMap<String, String>,
    pub max_accuracy_drop: f64,
    pub canary: Duration,
    pub keep_versions: u64,
    pub max_bundle_bytes: u64,
    pub chunk_pause: Duration,
    pub transfer_deadline: Duration,
    pub canary_max_latency_increase: f64,
    pub canary_max_energy_increase: f64,
    pub canary_max_error_rate: f64,
    /// The optional latency gate at validation: refuse a version whose p90 is more than this
    /// fraction above the active model's, measured side by side; `None`: no gate.
    pub max_latency_increase: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadConfig {
    /// Inferences per second the built-in workload runs; 0 turns it off.
    pub rate_per_s: f64,
}

/// One problem with the configuration: where it came from, which key, what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub origin: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.message)
        }
    }
}

/// Every problem found, in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{n} configuration problem{}",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Sections whose keys env variables can set (`PLASTER_MQTT_URL` is `mqtt.url`).
const SECTIONS: [&str; 6] = ["model", "mqtt", "api", "energy", "ota", "workload"];

/// Loads `path`, its drop-ins and the environment `env` (pass `std::env::vars()`).
pub fn load(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let mut merged = toml::Table::new();
    let mut origins: BTreeMap<String, String> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut sources = Vec::new();

    let mut files = vec![path.to_path_buf()];
    let dropins = PathBuf::from(format!("{}.d", path.display()));
    if let Ok(read) = std::fs::read_dir(&dropins) {
        let mut extra: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        extra.sort();
        files.extend(extra);
    }
    for file in files {
        let origin = file.display().to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => match text.parse::<toml::Table>() {
                Ok(table) => {
                    merge(&mut merged, table, "", &origin, &mut origins);
                    sources.push(file);
                }
                Err(e) => problems.push(Problem {
                    origin,
                    key: String::new(),
                    message: format!("not valid TOML: {}", e.message()),
                }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problems.push(Problem {
                origin,
                key: String::new(),
                message: "file not found".into(),
            }),
            Err(e) => problems.push(Problem {
                origin,
                key: String::new(),
                message: e.to_string(),
            }),
        }
    }

    // Without its main file a configuration has nothing to check; the rest would be noise.
    if sources.first().map(PathBuf::as_path) != Some(path) {
        return Err(ConfigError { problems });
    }

    let mut env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("PLASTER_"))
        .collect();
    env.sort();
    for (var, value) in env {
        let rest = var["PLASTER_".len()..].to_ascii_lowercase();
        let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) {
            Some(section) => (Some(*section), rest[section.len() + 1..].to_string()),
            None => (None, rest.clone()),
        };
        // A value that parses as TOML (a number, a bool, a quoted string, an inline table)
        // keeps its type; anything else is a string.
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let full_key = match section {
            Some(s) => format!("{s}.{key}"),
            None => key.clone(),
        };
        let table = match section {
            Some(s) => merged
                .entry(s)
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            None => {
                merged.insert(key.clone(), parsed);
                origins.insert(full_key, format!("environment {var}"));
                continue;
            }
        };
        match table.as_table_mut() {
            Some(t) => {
                t.insert(key, parsed);
                origins.insert(full_key, format!("environment {var}"));
            }
            None => problems.push(Problem {
                origin: format!("environment {var}"),
                key: full_key,
                message: "its section is not a table".into(),
            }),
        }
    }

    let mut reader = Reader {
        table: &merged,
        origins: &origins,
        default_origin: path.display().to_string(),
        problems: Vec::new(),
        used: Vec::new(),
    };
    let config = reader.config(sources);
    problems.append(&mut reader.problems);
    let mut unknown = Vec::new();
    collect_keys(&merged, "", &mut unknown);
    for key in unknown {
        if !reader
            .used
            .iter()
            .any(|u| *u == key || key.starts_with(&format!("{u}.")))
        {
            problems.push(Problem {
                origin: reader.origin(&key),
                key,
                message: "unknown key".into(),
            });
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError { problems })
    }
}

fn merge(
    into: &mut toml::Table,
    from: toml::Table,
    prefix: &str,
    origin: &str,
    origins: &mut BTreeMap<String, String>,
) {
    for (key, value) in from {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(incoming))
                if full != "ota.trusted_keys" =>
            {
                merge(existing, incoming, &full, origin, origins);
            }
            (_, value) => {
                if let toml::Value::Table(t) = &value {
                    let mut nested = Vec::new();
                    collect_keys(t, &full, &mut nested);
                    for k in nested {
                        origins.insert(k, origin.to_string());
                    }
                }
                origins.insert(full, origin.to_string());
                into.insert(key, value);
            }
        }
    }
}

fn collect_keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) if prefix.is_empty() && SECTIONS.contains(&key.as_str()) => {
                collect_keys(t, &full, out)
            }
            _ => out.push(full),
        }
    }
}

/// Reads typed values out of the merged table, recording every problem instead of stopping.
struct Reader<'a> {
    table: &'a toml::Table,
    origins: &'a BTreeMap<String, String>,
    default_origin: String,
    problems: Vec<Problem>,
    used: Vec<String>,
}

impl Reader<'_> {
    fn origin(&self, key: &str) -> String {
        self.origins
            .get(key)
            .cloned()
            .unwrap_or_else(|| self.default_origin.clone())
    }

    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(Problem {
            origin: self.origin(key),
            key: key.to_string(),
            message,
        });
    }

    fn value(&mut self, key: &str) -> Option<&toml::Value> {
        self.used.push(key.to_string());
        let mut parts = key.split('.');
        let first = parts.next()?;
        let mut value = self.table.get(first)?;
        for part in parts {
            value = value.as_table()?.get(part)?;
        }
        Some(value)
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.value(key)? {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                let shown = other.to_string();
                self.problem(key, format!("{shown} is not a string"));
                None
            }
        }
    }

    /// A string where "" means unset.
    fn optional_string(&mut self, key: &str) -> Option<String> {
        self.string(key).filter(|s| !s.is_empty())
    }

    /// One of a fixed set of names; `default` when the key is absent or wrong.
    fn choice<T: Copy>(&mut self, key: &str, options: &[(&str, T)], default: T) -> T {
        let Some(name) = self.string(key) else {
            return default;
        };
        match options.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => *value,
            None => {
                let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
                self.problem(key, format!("{name:?} is not one of {}", names.join(", ")));
                default
            }
        }
    }

    /// `true` or `false`; `default` when the key is absent (or wrong: the problem is recorded).
    fn boolean(&mut self, key: &str, default: bool) -> bool {
        match self.value(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                let shown = other.to_string();
                self.problem(key, format!("{shown} is not true or false"));
                default
            }
        }
    }

    fn number(&mut self, key: &str, min: f64, max: f64) -> Option<f64> {
        let v = match self.value(key)? {
            toml::Value::Integer(i) => *i as f64,
            toml::Value::Float(f) => *f,
            other => {
                let shown = other.to_string();
                self.problem(key, format!("{shown} is not a number"));
                return None;
            }
        };
        if !(min..=max).contains(&v) {
            self.problem(key, format!("{v} is out of range ({min}..={max})"));
            return None;
        }
        Some(v)
    }

    /// A whole count or size in `min..=max`, or `default` when absent (or wrong: the
    /// problem is recorded).
    fn count(&mut self, key: &str, min: f64, max: f64, default: u64) -> u64 {
        self.number(key, min, max).map_or(default, |n| n as u64)
    }

    fn config(&mut self, sources: Vec<PathBuf>) -> Config {
        let device_id = match self.optional_string("device_id") {
            Some(id)
                if id
                    .chars()
                    .any(|c| matches!(c, '/' | '+' | '#') || c.is_control()) =>
            {
                self.problem("device_id", format!("{id:?} contains a character MQTT topics cannot carry (/ + # or a control character)"));
                id
            }
            Some(id) => id,
            None => crate::device::default_device_id(),
        };
        let fleet = match self.optional_string("fleet") {
            Some(f)
                if f.chars()
                    .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
                    || f == "_all" =>
            {
                self.problem(
                    "fleet",
                    format!("{f:?} cannot be a fleet name (no / + #, not _all)"),
                );
                f
            }
            Some(f) => f,
            None => {
                self.problem(
                    "fleet",
                    "missing: every device belongs to a fleet (e.g. fleet = \"lab\")".into(),
                );
                String::new()
            }
        };
        let state_dir = self
            .optional_string("state_dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());

        let model = ModelConfig {
            path: self
                .optional_string("model.path")
                .map(PathBuf::from)
                .unwrap_or_else(|| DEFAULT_MODEL_PATH.into()),
            device: self.choice(
                "model.device",
                &[
                    ("cpu", DeviceKind::Cpu),
                    ("cuda", DeviceKind::Cuda),
                    ("auto", DeviceKind::Auto),
                ],
                DeviceKind::Auto,
            ),
            precision: self.choice(
                "model.precision",
                &[("f32", Precision::F32), ("f16", Precision::F16)],
                Precision::F32,
            ),
            threads: self
                .number("model.threads", 1.0, 1024.0)
                .map(|t| t as usize)
                .unwrap_or(DEFAULT_THREADS),
            rewrites: self.boolean("model.rewrites", true),
            cache_dir: self
                .boolean("model.cache", false)
                .then(|| state_dir.join(MODEL_CACHE_DIR)),
        };

        let url = match self.string("mqtt.url") {
            None => BrokerUrl::parse(DEFAULT_MQTT_URL).expect("the default URL parses"),
            Some(s) => BrokerUrl::parse(&s).unwrap_or_else(|message| {
                self.problem("mqtt.url", message);
                BrokerUrl::parse(DEFAULT_MQTT_URL).expect("the default URL parses")
            }),
        };
        let existing_file = |r: &mut Self, key: &str| -> Option<PathBuf> {
            let path = PathBuf::from(r.optional_string(key)?);
            if !path.is_file() {
                r.problem(
                    key,
                    format!("{} does not exist or is not a file", path.display()),
                );
            }
            Some(path)
        };
        let password_file = existing_file(self, "mqtt.password_file");
        let ca_file = existing_file(self, "mqtt.ca_file");
        let cert_file = existing_file(self, "mqtt.cert_file");
        let key_file = existing_file(self, "mqtt.key_file");
        if cert_file.is_some() != key_file.is_some() {
            self.problem(
                "mqtt.cert_file",
                "a client certificate needs both mqtt.cert_file and mqtt.key_file".into(),
            );
        }
        if (ca_file.is_some() || cert_file.is_some()) && !url.tls {
            self.problem(
                "mqtt.url",
                format!("{url} is not TLS but certificates are configured: use mqtts://"),
            );
        }
        let mqtt = MqttConfig {
            username: self.optional_string("mqtt.username"),
            password_file,
            ca_file,
            cert_file,
            key_file,
            telemetry_interval: Duration::from_secs_f64(
                self.number("mqtt.telemetry_interval_s", 0.1, 86_400.0)
                    .unwrap_or(DEFAULT_TELEMETRY_INTERVAL_S),
            ),
            encoding: self.choice(
                "mqtt.encoding",
                &[("cbor", Encoding::Cbor), ("json", Encoding::Json)],
                Encoding::Cbor,
            ),
            keep_alive: Duration::from_secs(
                self.number("mqtt.keep_alive_s", 5.0, 3600.0)
                    .map(|s| s as u64)
                    .unwrap_or(DEFAULT_KEEP_ALIVE_S),
            ),
            version: match self.value("mqtt.protocol").cloned() {
                None => MqttVersion::V311,
                Some(toml::Value::String(s)) if s == "3.1.1" => MqttVersion::V311,
                Some(toml::Value::String(s)) if s == "5" => MqttVersion::V5,
                Some(other) => {
                    self.problem(
                        "mqtt.protocol",
                        format!("{other} is not one of \"3.1.1\", \"5\""),
                    );
                    MqttVersion::V311
                }
            },
            spool_max_bytes: self
                .number("mqtt.spool_max_bytes", 4096.0, 1e12)
                .map(|b| b as u64)
                .unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
            url,
        };

        let api = ApiConfig {
            listen: match self.string("api.listen") {
                None => Some(ApiListen::Tcp(
                    DEFAULT_API_LISTEN
                        .parse()
                        .expect("the default address parses"),
                )),
                Some(s) if s.is_empty() => None,
                Some(s) => match s.strip_prefix("unix:") {
                    Some(path) if path.starts_with('/') => Some(ApiListen::Unix(path.into())),
                    Some(_) => {
                        self.problem(
                            "api.listen",
                            format!("{s:?}: a Unix socket needs an absolute path (unix:/run/plaster-agent/api.sock)"),
                        );
                        None
                    }
                    None => s.parse().map(ApiListen::Tcp).map(Some).unwrap_or_else(|_| {
                        self.problem(
                            "api.listen",
                            format!("{s:?} is not an address:port (e.g. 127.0.0.1:8000), unix:/path or \"\" (off)"),
                        );
                        None
                    }),
                },
            },
            max_batch: self.count("api.max_batch", 1.0, 1024.0, DEFAULT_API_MAX_BATCH as u64)
                as usize,
            max_queue_delay: Duration::from_micros(self.count(
                "api.max_queue_delay_us",
                0.0,
                1e7,
                DEFAULT_API_MAX_QUEUE_DELAY_US,
            )),
            max_queue: self.count("api.max_queue", 1.0, 1e6, DEFAULT_API_MAX_QUEUE as u64) as usize,
            max_body_bytes: self.count(
                "api.max_body_bytes",
                1024.0,
                1e10,
                DEFAULT_API_MAX_BODY_BYTES,
            ),
            max_connections: self.count(
                "api.max_connections",
                1.0,
                1e6,
                DEFAULT_API_MAX_CONNECTIONS as u64,
            ) as usize,
            instances: self.count("api.instances", 1.0, 256.0, DEFAULT_API_INSTANCES as u64)
                as usize,
        };

        let energy = EnergyConfig {
            sysfs_root: self
                .optional_string("energy.sysfs_root")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/".into()),
            total_rail: self.optional_string("energy.total_rail"),
            source: self.optional_string("energy.source").and_then(|s| {
                let kind = SourceKind::parse(&s);
                if kind.is_none() {
                    let kinds: Vec<&str> = SourceKind::ALL.iter().map(|k| k.as_str()).collect();
                    self.problem(
                        "energy.source",
                        format!("{s:?} is not one of {}", kinds.join(", ")),
                    );
                }
                kind
            }),
        };

        let mut trusted_keys = BTreeMap::new();
        match self.value("ota.trusted_keys").cloned() {
            None => {}
            Some(toml::Value::Table(keys)) => {
                for (id, key) in keys {
                    match key.as_str() {
                        Some(k) if is_ed25519_public_key(k) => {
                            trusted_keys.insert(id, k.to_string());
                        }
                        _ => self.problem(
                            &format!("ota.trusted_keys.{id}"),
                            "is not a base64 Ed25519 public key (32 bytes; make one with `plaster-agent keygen`)".into(),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                "ota.trusted_keys",
                format!("{other} is not a table of key id = public key"),
            ),
        }
        let ota = OtaConfig {
            trusted_keys,
            max_accuracy_drop: self
                .number("ota.max_accuracy_drop", 0.0, 1.0)
                .unwrap_or(DEFAULT_MAX_ACCURACY_DROP),
            canary: Duration::from_secs(
                self.number("ota.canary_s", 0.0, 86_400.0)
                    .map(|s| s as u64)
                    .unwrap_or(DEFAULT_CANARY_S),
            ),
            keep_versions: self
                .number("ota.keep_versions", 0.0, 100.0)
                .map(|n| n as u64)
                .unwrap_or(DEFAULT_KEEP_VERSIONS),
            max_bundle_bytes: self.count(
                "ota.max_bundle_bytes",
                1024.0,
                1e12,
                DEFAULT_MAX_BUNDLE_BYTES,
            ),
            chunk_pause: Duration::from_secs_f64(
                self.number("ota.chunk_pause_s", 0.1, 3600.0)
                    .unwrap_or(DEFAULT_CHUNK_PAUSE_S),
            ),
            transfer_deadline: Duration::from_secs_f64(
                self.number("ota.transfer_deadline_s", 1.0, 7.0 * 86_400.0)
                    .unwrap_or(DEFAULT_TRANSFER_DEADLINE_S),
            ),
            canary_max_latency_increase: self
                .number("ota.canary_max_latency_increase", 0.0, 1000.0)
                .unwrap_or(DEFAULT_CANARY_MAX_LATENCY_INCREASE),
            canary_max_energy_increase: self
                .number("ota.canary_max_energy_increase", 0.0, 1000.0)
                .unwrap_or(DEFAULT_CANARY_MAX_ENERGY_INCREASE),
            canary_max_error_rate: self
                .number("ota.canary_max_error_rate", 0.0, 1.0)
                .unwrap_or(DEFAULT_CANARY_MAX_ERROR_RATE),
            max_latency_increase: self.number("ota.max_latency_increase", 0.0, 1000.0),
        };
        let workload = WorkloadConfig {
            rate_per_s: self.number("workload.rate_per_s", 0.0, 1e6).unwrap_or(0.0),
        };
        Config {
            device_id,
            fleet,
            state_dir,
            model,
            mqtt,
            api,
            energy,
            ota,
            workload,
            sources,
        }
    }
}

/// What `check-config` prints for a valid configuration.
pub fn summary(config: &Config) -> String {
    let files: Vec<String> = config
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    format!(
        "configuration ok ({})\n  device {} in fleet {}\n  broker {} ({}, telemetry every {} s)\n  model {} on {}, {}, {} threads\n  state in {}\n  {} trusted update key(s)",
        files.join(", "),
        config.device_id,
        config.fleet,
        config.mqtt.url,
        match config.mqtt.encoding {
            Encoding::Cbor => "cbor",
            Encoding::Json => "json",
        },
        config.mqtt.telemetry_interval.as_secs_f64(),
        config.model.path.display(),
        config.model.device.as_str(),
        config.model.precision.as_str(),
        config.model.threads,
        config.state_dir.display(),
        config.ota.trusted_keys.len(),
    )
}

/// 32 bytes of standard base64 (44 characters with padding).
pub(crate) fn is_ed25519_public_key(s: &str) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    bytes.len() == 44
        && bytes[43] == b'='
        && bytes[42] != b'='
        && bytes[..43].iter().all(|b| ALPHABET.contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn messages(e: ConfigError) -> Vec<String> {
        e.problems.iter().map(|p| p.to_string()).collect()
    }

    const KEY: &str = "GXoNRVVu6DHDpmhtLEH6dPvd5Tdv2l6hMn4cmFrR/ws=";

    #[test]
    fn defaults_fill_a_minimal_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "agent.toml", "fleet = \"lab\"\n");
        let c = load(&path, []).unwrap();
        assert_eq!(c.fleet, "lab");
        assert_eq!(
            c.mqtt.url,
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 1883
            }
        );
        assert_eq!(c.mqtt.telemetry_interval, Duration::from_secs(10));
        assert_eq!(c.mqtt.encoding, Encoding::Cbor);
        assert_eq!(c.model.path, PathBuf::from(DEFAULT_MODEL_PATH));
        assert_eq!(c.model.threads, 2);
        assert!(c.model.rewrites);
        assert_eq!(c.model.cache_dir, None);
        assert_eq!(
            c.api.listen,
            Some(ApiListen::Tcp("127.0.0.1:8000".parse().unwrap()))
        );
        assert_eq!(c.api.max_batch, DEFAULT_API_MAX_BATCH);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.ota.keep_versions, 3);
        assert!(!c.device_id.is_empty());
    }

    #[test]
    fn dropins_then_environment_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "agent.toml", "fleet = \"lab\"\n[mqtt]\nurl = \"mqtt://a:1\"\ntelemetry_interval_s = 5\n[ota]\ntrusted_keys = { \"ops-1\" = \"KEY\" }\n".replace("KEY", KEY).as_str());
        write(
            dir.path(),
            "agent.toml.d/20-late.toml",
            "[mqtt]\nurl = \"mqtt://c:3\"\n",
        );
        write(
            dir.path(),
            "agent.toml.d/10-early.toml",
            "[mqtt]\nurl = \"mqtt://b:2\"\nencoding = \"json\"\n",
        );
        write(dir.path(), "agent.toml.d/README", "not toml, not read");
        let c = load(
            &path,
            [
                (
                    "PLASTER_MQTT_TELEMETRY_INTERVAL_S".to_string(),
                    "2.5".to_string(),
                ),
                ("PLASTER_DEVICE_ID".to_string(), "jetson-017".to_string()),
                ("HOME".to_string(), "/root".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(c.mqtt.url.to_string(), "mqtt://c:3");
        assert_eq!(c.mqtt.encoding, Encoding::Json);
        assert_eq!(c.mqtt.telemetry_interval, Duration::from_millis(2500));
        assert_eq!(c.device_id, "jetson-017");
        assert_eq!(c.ota.trusted_keys["ops-1"], KEY);
        assert_eq!(c.sources.len(), 3);
    }

    #[test]
    fn five_errors_are_all_reported_with_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "agent.toml", "fleet = \"lab\"\n[model]\ndevice = \"tpu\"\nthreads = 0\nrewrites = \"yes\"\n[mqtt]\nurl = \"http://broker\"\ntelemetry_intervl_s = 5\n");
        let dropin = write(
            dir.path(),
            "agent.toml.d/50-site.toml",
            "[api]\nlisten = \"everywhere\"\n",
        );
        let err = load(
            &path,
            [("PLASTER_MQTT_ENCODING".to_string(), "xml".to_string())],
        )
        .unwrap_err();
        let file = path.display().to_string();
        let dropin = dropin.display().to_string();
        assert_eq!(
            messages(err),
            vec![
                format!("{file}: model.device: \"tpu\" is not one of cpu, cuda, auto"),
                format!("{file}: model.threads: 0 is out of range (1..=1024)"),
                format!("{file}: model.rewrites: \"yes\" is not true or false"),
                format!("{file}: mqtt.url: \"http://broker\" is not an MQTT URL (use mqtt://HOST:PORT or mqtts://HOST:PORT)"),
                "environment PLASTER_MQTT_ENCODING: mqtt.encoding: \"xml\" is not one of cbor, json".to_string(),
                format!("{dropin}: api.listen: \"everywhere\" is not an address:port (e.g. 127.0.0.1:8000), unix:/path or \"\" (off)"),
                format!("{file}: mqtt.telemetry_intervl_s: unknown key"),
            ]
        );
    }

    #[test]
    fn file_level_problems() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert_eq!(
            messages(load(&missing, []).unwrap_err())[0],
            format!("{}: file not found", missing.display())
        );
        let bad = write(dir.path(), "bad.toml", "fleet = \n");
        let m = messages(load(&bad, []).unwrap_err());
        assert!(
            m[0].starts_with(&format!("{}: not valid TOML: ", bad.display())),
            "{m:?}"
        );
        let nofleet = write(
            dir.path(),
            "nofleet.toml",
            "device_id = \"a/b\"\n[ota]\ntrusted_keys = { k = \"short\" }\n",
        );
        let f = nofleet.display().to_string();
        assert_eq!(
            messages(load(&nofleet, []).unwrap_err()),
            vec![
                format!("{f}: device_id: \"a/b\" contains a character MQTT topics cannot carry (/ + # or a control character)"),
                format!("{f}: fleet: missing: every device belongs to a fleet (e.g. fleet = \"lab\")"),
                format!("{f}: ota.trusted_keys.k: is not a base64 Ed25519 public key (32 bytes; make one with `plaster-agent keygen`)"),
            ]
        );
    }

    #[test]
    fn the_api_listens_on_tcp_a_unix_socket_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let listen = |value: &str| {
            let path = write(
                dir.path(),
                "agent.toml",
                &format!("fleet = \"lab\"\n[api]\nlisten = \"{value}\"\n"),
            );
            load(&path, []).map(|c| c.api.listen)
        };
        assert_eq!(
            listen("unix:/run/plaster-agent/api.sock"),
            Ok(Some(ApiListen::Unix("/run/plaster-agent/api.sock".into())))
        );
        assert_eq!(listen(""), Ok(None));
        let e = listen("unix:api.sock").unwrap_err();
        assert_eq!(
            messages(e),
            vec![format!(
                "{}: api.listen: \"unix:api.sock\": a Unix socket needs an absolute path (unix:/run/plaster-agent/api.sock)",
                dir.path().join("agent.toml").display()
            )]
        );
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            BrokerUrl::parse("mqtts://broker.example:8883").unwrap(),
            BrokerUrl {
                tls: true,
                host: "broker.example".into(),
                port: 8883
            }
        );
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]:1884").unwrap().to_string(),
            "mqtt://[::1]:1884"
        );
        assert_eq!(BrokerUrl::parse("mqtts://b").unwrap().port, 8883);
        assert_eq!(
            BrokerUrl::parse("mqtt://b:x").unwrap_err(),
            "\"mqtt://b:x\" has an invalid port \"x\""
        );
        assert_eq!(
            BrokerUrl::parse("mqtt://").unwrap_err(),
            "\"mqtt://\" has no host"
        );
    }
}
