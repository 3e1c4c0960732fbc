use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use skiff::config::Config;
use skiff::server::LogFormat;

/// Data-tier sidecar: PostgreSQL pooler, Redis router and log shipper.
#[derive(Parser)]
#[command(name = "skiff", version, about)]
struct Cli {
    /// Path of the TOML config file.
    #[arg(long, short = 'c', global = true, default_value = "config/skiff.toml")]
    config: PathBuf,
    /// Log line format: `human` or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and exit: 0 when it is valid.
    Check,
    /// Print pool sizes that keep all sidecars within each PostgreSQL
    /// server's max_connections, as [[postgres.databases]] entries.
    Plan(skiff::plan::PlanArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("skiff: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Plan(args)) = &cli.command {
        match skiff::plan::run(&config, args) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("skiff plan: {err}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(Command::Check) = cli.command {
        match skiff::server::check(&config) {
            Ok(()) => {
                println!("{}: ok", cli.config.display());
                return ExitCode::SUCCESS;
            }
            Err(err) => {
                eprintln!("skiff: {err}");
                return ExitCode::from(2);
            }
        }
    }
    skiff::server::init_tracing(cli.log_format);
    let threads = skiff::threads::worker_threads();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(threads);
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("skiff: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(skiff::server::run(config, cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "skiff stopped");
            eprintln!("skiff: {err}");
            ExitCode::FAILURE
        }
    }
}
