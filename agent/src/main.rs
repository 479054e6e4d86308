//! The `plaster-agent` binary: parse the command line, set up logging, run the command, and
//! turn its outcome into the documented exit status. Everything else lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use plaster_agent::cli::{self, exit, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match &cli.command {
        Command::Bench(args) => {
            if let Err(message) = args.check() {
                Cli::command()
                    .error(clap::error::ErrorKind::ArgumentConflict, message)
                    .exit();
            }
            cli::bench::run(args).map_err(anyhow::Error::from)
        }
        Command::Sensors(args) => cli::sensors::run(args).map_err(anyhow::Error::from),
        Command::Watch(args) => cli::watch::run(args).map_err(anyhow::Error::from),
        Command::Keygen(args) => cli::keygen::run(args).map_err(anyhow::Error::from),
        Command::Push(args) => cli::push::run_push(args).map_err(anyhow::Error::from),
        Command::Rollback(args) => cli::push::run_rollback(args).map_err(anyhow::Error::from),
        Command::Run(args) => return run_daemon(&args.config),
        Command::CheckConfig(args) => {
            return match plaster_agent::config::load(&args.config, std::env::vars()) {
                Ok(config) => {
                    let summary = format!("{}\n", plaster_agent::config::summary(&config));
                    match cli::write_stdout(&summary) {
                        Ok(()) => ExitCode::from(exit::OK),
                        Err(e) => {
                            eprintln!("error: writing to stdout: {e}");
                            ExitCode::from(exit::FAILURE)
                        }
                    }
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(exit::CONFIG)
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// `run`: a bad configuration exits 64 before anything touches the network; SIGTERM and SIGINT
/// start a drain bounded by the grace period.
fn run_daemon(config_path: &std::path::Path) -> ExitCode {
    let config = match plaster_agent::config::load(config_path, std::env::vars()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    // Every API connection is a file descriptor: raise the soft limit to the hard one (systemd
    // gives 1024 soft, 524288 hard), as a server that bounds its connections itself may.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!("open file limit {n}"),
        Err(e) => tracing::warn!("raising the open file limit: {e}"),
    }
    // Inference runs on its own threads; the runtime only moves messages and timers.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("plaster-async")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let result = runtime.block_on(plaster_agent::app::run(config, shutdown_signal()));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("error: {:#}", anyhow::Error::from(e));
            ExitCode::from(exit::FAILURE)
        }
    }
}

/// Resolves on the first SIGTERM (systemd stop) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot listen for SIGTERM/SIGINT ({e}); stop with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

/// Logs go to stderr (stdout carries reports), without colours when stderr is not a terminal
/// so journald stores plain text. `RUST_LOG` overrides the default level.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,plaster_agent=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
