//! `warren-worker`: consume a Warren queue and run the built-in tasks.
//!
//! Flags and environment only; the runtime is the `warren_worker` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_shared::Policy;
use warren_shared::broker::{BrokerSettings, DEFAULT_AMQP_URL, Reconnect};
use warren_shared::topology::DEFAULT_QUEUE;
use warren_worker::{Mailer, WorkerSettings, builtin_registry};

/// Runs Warren tasks from a RabbitMQ queue: echo, sleep, fail, send_mail.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Broker URL (the vhost `/` is `%2f`).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Work queue to consume.
    #[arg(long, env = "WARREN_QUEUE", default_value = DEFAULT_QUEUE)]
    queue: String,
    /// Tasks run at once (and the consumer's prefetch).
    #[arg(long, env = "WARREN_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Execution time limit of one task (e.g. `30s`, `5m`). Keep it below RabbitMQ's
    /// consumer_timeout (30 min by default).
    #[arg(long, env = "WARREN_TIME_LIMIT", default_value = "5m", value_parser = humantime::parse_duration)]
    time_limit: Duration,
    /// Attempts a task gets in all, unless its caller says otherwise.
    #[arg(long, env = "WARREN_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_attempts: u32,
    /// Delays between attempts, comma-separated (e.g. `1s,10s,1m`); the last one repeats.
    #[arg(long, env = "WARREN_BACKOFF", default_value = "1s,10s", value_parser = parse_backoff)]
    backoff: Backoff,
    /// On SIGTERM, how long in-flight tasks may take to finish before they are handed back.
    #[arg(long, env = "WARREN_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Give up (exit non-zero) after this many failed attempts to reconnect; default: never.
    #[arg(long, env = "WARREN_RECONNECT_MAX_ATTEMPTS")]
    reconnect_max_attempts: Option<usize>,
    /// How often an idle worker checks that it is not starving next to ready tasks.
    #[arg(long, env = "WARREN_WATCHDOG_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    watchdog_interval: Duration,
    /// Largest task body accepted, in bytes.
    #[arg(long, env = "WARREN_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Directory where send_mail writes .eml files when no SMTP relay is set.
    #[arg(long, env = "WARREN_OUTBOX", default_value = "outbox")]
    outbox: PathBuf,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`) on this
    /// address, e.g. `127.0.0.1:9464`. Off by default.
    #[arg(long = "metrics", env = "WARREN_METRICS_ADDR", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// SMTP relay for send_mail, e.g. `smtp://relay:25` or `smtps://user:pass@host:465`.
    #[arg(long, env = "WARREN_SMTP_URL", hide_env_values = true)]
    smtp_url: Option<String>,
}

/// A backoff schedule from the command line.
#[derive(Debug, Clone)]
struct Backoff(Vec<Duration>);

fn parse_backoff(text: &str) -> Result<Backoff, String> {
    text.split(',')
        .map(|part| humantime::parse_duration(part.trim()).map_err(|e| format!("{part:?}: {e}")))
        .collect::<Result<Vec<_>, _>>()
        .map(Backoff)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    warren_shared::telemetry::init("info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mailer = match &args.smtp_url {
        Some(url) => Mailer::smtp(url).map_err(anyhow::Error::msg)?,
        None => Mailer::outbox(&args.outbox),
    };
    let settings = WorkerSettings {
        broker: BrokerSettings {
            reconnect: Reconnect {
                max_attempts: args.reconnect_max_attempts,
                ..Reconnect::default()
            },
            ..BrokerSettings::new(args.amqp_url)
        },
        watchdog_interval: args.watchdog_interval,
        queue: args.queue,
        concurrency: args.concurrency,
        policy: Policy {
            max_attempts: args.max_attempts,
            backoff: args.backoff.0,
            time_limit: args.time_limit,
        },
        max_body_bytes: args.max_body_bytes,
        shutdown_grace: args.shutdown_grace,
        ..WorkerSettings::default()
    };
    let shutdown = CancellationToken::new();
    // Installed before the worker starts, so that its first tasks are counted.
    let handle = match args.metrics {
        Some(_) => Some(warren_worker::metrics::install()?),
        None => None,
    };
    let (queue, concurrency) = (settings.queue.clone(), settings.concurrency);
    let worker = warren_worker::start(settings, builtin_registry(mailer), shutdown.clone()).await?;
    if let Some(addr) = args.metrics {
        let ops = warren_worker::ops::Ops {
            probe: worker.probe(),
            metrics: handle,
            queue,
            concurrency,
        };
        // Stops with the process: it must answer (503) while the worker drains.
        warren_worker::ops::bind(addr, ops, CancellationToken::new())
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    }
    tokio::spawn(warren_shared::shutdown::on_signals(
        shutdown,
        "no new tasks; finishing the ones in flight",
    ));
    worker.wait().await?;
    Ok(())
}
