//! `warren-worker`: consume a Warren queue and run the built-in tasks and handler pools.
//!
//! Settings come from `warren_worker::WorkerConfig` (flags, environment, `--config FILE`); the
//! runtime is the `warren_worker` library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Command;
use tokio_util::sync::CancellationToken;
use warren_shared::config::{self, ConfigError};
use warren_worker::builtin::builtin_registry_of;
use warren_worker::pool;
use warren_worker::{Registry, WorkerConfig};

fn command() -> Command {
    Command::new("warren-worker")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Runs Warren tasks from a RabbitMQ queue: echo, sleep, fail, send_mail, and functions \
             served by pools of processes in any language (--exec, [[pool]] in --config).",
        )
}

fn main() -> ExitCode {
    // First, before any thread starts: this executable is also its pool processes' guard.
    pool::serve_if_guard();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("warren-worker: error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main() -> ExitCode {
    let config = match config::load::<WorkerConfig>(command()) {
        Ok(config) => config,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("warren-worker: error: {e}");
            return ExitCode::from(2);
        }
    };
    warren_shared::telemetry::init("info");
    // Spans are exported while it runs (when OTEL_EXPORTER_OTLP_ENDPOINT is set).
    match warren_shared::otel::exporting_while("warren-worker", run(config)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("warren-worker: error: {e:#}");
            // A pool or schedule table that cannot work is a bad value in the configuration, like the
            // ones `config::load` refuses: the same status.
            if matches!(e.downcast_ref(), Some(pool::PoolError::Config(_)))
                || matches!(
                    e.downcast_ref(),
                    Some(warren_worker::WorkerError::Schedule(_))
                )
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("warren-worker: error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: WorkerConfig) -> anyhow::Result<()> {
    // Before anything else: a SIGHUP (a reload, or a terminal closing) never stops the worker.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    let settings = config.settings()?;
    let mailer = config.mailer().map_err(anyhow::Error::msg)?;
    let builtins =
        builtin_registry_of(mailer, &config.builtin_names()).map_err(anyhow::Error::msg)?;
    let pools = pool::start_all(config.pools()?).await?;
    let registry = pools.iter().fold(builtins, Registry::register_pool);
    let shutdown = CancellationToken::new();
    // Installed before the worker starts, so that its first tasks are counted.
    let handle = match config.metrics {
        Some(_) => Some(warren_worker::metrics::install()?),
        None => None,
    };
    let (queue, concurrency) = (settings.queue.clone(), settings.concurrency);
    let worker = match warren_worker::start(settings, registry, shutdown.clone()).await {
        Ok(worker) => worker,
        Err(e) => {
            pool::shutdown_all(&pools).await;
            return Err(e.into());
        }
    };
    if let Some(addr) = config.metrics {
        let ops = warren_worker::ops::Ops {
            probe: worker.probe(),
            metrics: handle,
            queue,
            concurrency,
        };
        // Stops with the process: it must answer (503) while the worker drains.
        if let Err(e) = warren_worker::ops::bind(addr, ops, CancellationToken::new()).await {
            worker.stop();
            let _ = worker.wait().await;
            pool::shutdown_all(&pools).await;
            anyhow::bail!("cannot serve metrics on {addr}: {e}");
        }
    }
    tokio::spawn(warren_shared::shutdown::on_signals(
        shutdown,
        "no new tasks; finishing the ones in flight",
    ));
    tokio::spawn(pool::reload_on_sighup(hangup, pools.clone()));
    let result = worker.wait().await;
    // The worker has drained: the pools' processes are idle now.
    pool::shutdown_all(&pools).await;
    result?;
    Ok(())
}
