//! The `ferry` binary: parse arguments, load configuration, start logging, hand the command to
//! `cli::command::run`, and map its error to an exit code (0 ok, 1 a check failed, 2 a
//! permanent error, 3 bad configuration or arguments, 4 a transient failure of a one-shot
//! command: run it again later).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferry_pipeline::cli::command::{self, exit, Command};
use ferry_pipeline::config::Config;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Keeps data in sync across regions: change capture, shipping and apply over Kafka"
)]
struct Cli {
    /// Configuration file (TOML); FERRY__SECTION__KEY environment variables override it.
    #[arg(
        long,
        global = true,
        env = "FERRY_CONFIG",
        default_value = "ops/ferry.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(exit::PERMANENT);
        }
    };
    let code = match runtime.block_on(command::run(cli.command, cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", command::causes(&e));
            ExitCode::from(e.exit_code())
        }
    };
    // A client call blocked on an unreachable broker would hold a plain runtime drop for as
    // long as its own timeout: the outcome is known, so end now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    code
}
