//! `warren-worker`: consume a Warren queue and run the built-in tasks.
//!
//! Settings come from `warren_worker::WorkerConfig` (flags, environment, `--config FILE`); the
//! runtime is the `warren_worker` library.

use std::process::ExitCode;

use clap::Command;
use tokio_util::sync::CancellationToken;
use warren_shared::config::{self, ConfigError};
use warren_worker::{WorkerConfig, builtin_registry};

fn command() -> Command {
    Command::new("warren-worker")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Runs Warren tasks from a RabbitMQ queue: echo, sleep, fail, send_mail.")
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load::<WorkerConfig>(command()) {
        Ok(config) => config,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("warren-worker: error: {e}");
            return ExitCode::from(2);
        }
    };
    warren_shared::telemetry::init("info");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    let settings = config.settings()?;
    let mailer = config.mailer().map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    let worker = warren_worker::start(settings, builtin_registry(mailer), shutdown.clone()).await?;
    tokio::spawn(warren_shared::shutdown::on_signals(
        shutdown,
        "no new tasks; finishing the ones in flight",
    ));
    worker.wait().await?;
    Ok(())
}
