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
