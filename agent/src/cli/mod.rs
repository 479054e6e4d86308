//! The command line: argument definitions (a stable contract, PRODUCT.md "The binary and its
//! commands") and one module per command.

pub mod bench;
pub mod keygen;
pub mod push;
pub mod scorecard;
pub mod sensors;
pub mod target;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::inference::{DeviceKind, Precision};
use crate::plaster::scenario::Scenario;

/// Exit statuses (PRODUCT.md): 0 ok, 1 runtime failure, 2 usage error, 64 bad configuration.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const CONFIG: u8 = 64;
}

#[derive(Debug, Parser)]
#[command(
    name = "plaster-agent",
    version,
    about = "On-device PLASTER measurement of ONNX inference"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the PLASTER scorecard of a model on this machine (no broker, no server)
    Bench(BenchArgs),
    /// List the energy, battery and thermal sources of this machine with a live reading
    Sensors(sensors::SensorsArgs),
    /// Run the daemon: serve the model, measure PLASTER, publish telemetry over MQTT
    Run(ConfigArgs),
    /// Validate a daemon configuration and print every problem at once
    CheckConfig(ConfigArgs),
    /// A live table of a fleet's PLASTER telemetry, read from the broker
    Watch(watch::WatchArgs),
    /// Make an Ed25519 key pair for signing model pushes (PREFIX.key, PREFIX.pub)
    Keygen(keygen::KeygenArgs),
    /// Sign, chunk and send a model to devices over MQTT; wait for each one's result
    Push(push::PushArgs),
    /// Tell devices (signed) to roll back from a version to the one before it
    Rollback(push::RollbackArgs),
}

/// How an operator command (`watch`, `push`, `rollback`) logs in to the broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerLogin {
    #[arg(long, value_name = "NAME")]
    pub username: Option<String>,
    #[arg(long, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
    /// CA certificate(s) that verify an mqtts:// broker
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for brokers that require mutual TLS
    #[arg(long, value_name = "PATH", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, value_name = "PATH", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl BrokerLogin {
    pub fn connection(&self) -> crate::mqtt::options::Connection {
        crate::mqtt::options::Connection {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file; drop-ins are read from PATH.d/*.toml, then PLASTER_* variables
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The model: an .onnx file or a bundle directory (model.onnx, optional dataset.npz)
    #[arg(value_name = "MODEL")]
    pub model: PathBuf,

    /// Labelled NPZ validation set (`x` inputs, batch on axis 0; `y` integer labels); defaults
    /// to the bundle's dataset.npz
    #[arg(long, value_name = "NPZ")]
    pub dataset: Option<PathBuf>,

    /// Where to run: the GPU through CUDA, the CPU, or the GPU when one works
    #[arg(long, value_enum, default_value_t = DeviceKind::Auto)]
    pub device: DeviceKind,

    /// Floating-point precision; f16 also reports the accuracy delta against f32
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,

    /// MLPerf LoadGen scenario
    #[arg(long, value_enum, default_value_t = Scenario::SingleStream)]
    pub scenario: Scenario,

    /// Length of the measured run in seconds (MLPerf's 600 s minimum applies with --strict)
    #[arg(long, value_name = "SECS", default_value = "10", value_parser = parse_duration)]
    pub duration: Duration,

    /// Threads for one inference (tract's intra-op executor)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: u16,

    /// Run tract's plan as tract optimises it, without our graph rewrites (folded and merged
    /// per-channel chains, convolutions on our own matrix multiply, our LRN, max pool and
    /// depthwise ops): to compare, or to rule them out when reporting a bug
    #[arg(long)]
    pub no_rewrites: bool,

    /// Cache the decluttered model (NNEF) in DIR, keyed by the model's sha256, and load it
    /// from there next time (the daemon caches in state_dir/cache/models)
    #[arg(long, value_name = "DIR")]
    pub model_cache: Option<PathBuf>,

    /// Batch size per query [default: 1; offline: 8 for models with a dynamic batch axis]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub batch: Option<u32>,

    /// Server scenario: Poisson arrival rate in queries per second [default: half of what
    /// one stream sustains back to back]
    #[arg(long, value_name = "QPS", value_parser = parse_positive)]
    pub target_qps: Option<f64>,

    /// Server scenario: the p99 latency bound in milliseconds
    #[arg(long, value_name = "MS", default_value = "50", value_parser = parse_positive)]
    pub latency_bound_ms: f64,

    /// Server scenario: search the highest arrival rate whose p99 meets the latency bound
    #[arg(long)]
    pub find_peak: bool,

    /// Apply MLPerf's minimum duration and query count, and report whether the run is valid
    #[arg(long)]
    pub strict: bool,

    /// Print exactly one JSON object, the PLASTER report, on stdout
    #[arg(long)]
    pub json: bool,

    /// After the run, time every op of the plan for another --duration and print where the
    /// time goes (op kind, share, ms per inference, GFLOP/s)
    #[arg(long)]
    pub profile: bool,

    /// Run the scenario against a running server's inference API (Open Inference Protocol)
    /// instead of in this process: http://HOST:PORT; MODEL gives the name and the inputs
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// With --target: requests kept in flight by the offline scenario and the server
    /// scenario's rate calibration
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub concurrency: u16,

    /// After the run, compare the outputs with tract's unmodified CPU plan in f32 on the same
    /// inputs (the dataset's first batches, or synthetic inputs) and report the largest
    /// difference
    #[arg(long)]
    pub check_outputs: bool,

    /// Read energy sensors under this directory instead of / (a recorded tree of a board)
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub sysfs_root: PathBuf,

    /// The rail that carries the total power (e.g. VDD_IN), overriding discovery
    #[arg(long, value_name = "RAIL")]
    pub total_rail: Option<String>,

    /// Measure energy with this kind of source only
    #[arg(long, value_name = "KIND", value_parser = parse_source_kind)]
    pub energy_source: Option<crate::sensors::SourceKind>,
}

fn parse_source_kind(s: &str) -> Result<crate::sensors::SourceKind, String> {
    crate::sensors::SourceKind::parse(s).ok_or_else(|| {
        let kinds: Vec<&str> = crate::sensors::SourceKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect();
        format!("unknown source kind; one of: {}", kinds.join(", "))
    })
}

impl BenchArgs {
    /// Combinations clap cannot express; the message is shown as a usage error (exit 2).
    pub fn check(&self) -> Result<(), String> {
        if self.scenario != Scenario::Server {
            if self.target_qps.is_some() {
                return Err("--target-qps applies to --scenario server only".into());
            }
            if self.find_peak {
                return Err("--find-peak applies to --scenario server only".into());
            }
        }
        if self.find_peak && self.target_qps.is_some() {
            return Err("--find-peak searches the rate itself; drop --target-qps".into());
        }
        Ok(())
    }
}

/// A table in the style every command prints.
pub(crate) fn table(header: Vec<&str>) -> comfy_table::Table {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    table.set_header(header);
    table
}

/// Writes a command's output. A reader that went away (`| head`) is not a failure: the
/// output was not wanted any more, so a closed pipe ends the command quietly instead of
/// panicking as `println!` would.
pub fn write_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("\"{s}\" is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("the duration must be more than 0 seconds, got {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s} seconds is too long"))
}

fn parse_positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("\"{s}\" is not a number"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("must be more than 0, got {s}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(
            parse_duration("0").unwrap_err(),
            "the duration must be more than 0 seconds, got 0"
        );
        assert_eq!(
            parse_duration("-1").unwrap_err(),
            "the duration must be more than 0 seconds, got -1"
        );
        assert_eq!(
            parse_duration("x").unwrap_err(),
            "\"x\" is not a number of seconds"
        );
        assert_eq!(
            parse_duration("inf").unwrap_err(),
            "the duration must be more than 0 seconds, got inf"
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
