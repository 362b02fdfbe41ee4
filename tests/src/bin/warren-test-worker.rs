//! A `warren-worker` that also serves the test-only tasks (`record`, `crash`, `flaky`), for
//! tests that need a worker in a process of its own (to kill it, or to signal it).

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use warren_shared::{BrokerSettings, Policy};
use warren_tests::tasks::{Crash, Flaky, Record};
use warren_worker::{Mailer, WorkerSettings, builtin_registry};

/// Test worker.
#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "AMQP_URL", default_value = warren_shared::broker::DEFAULT_AMQP_URL)]
    amqp_url: String,
    #[arg(long)]
    queue: String,
    /// The exchange that routes by function name; default: one of the queue's own
    /// (`<queue>.functions`), so that tests running at once do not claim each other's functions.
    #[arg(long, env = "WARREN_FUNCTIONS_EXCHANGE")]
    functions_exchange: Option<String>,
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Serve `/metrics`, `/healthz` and `/readyz` on this address, as `warren-worker
    /// --metrics` does.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    warren_shared::telemetry::init("warn");
    let outbox = std::env::temp_dir().join("warren-test-worker-outbox");
    let registry = builtin_registry(Mailer::outbox(outbox))
        .register::<Record>()
        .register::<Crash>()
        .register::<Flaky>();
    let settings = WorkerSettings {
        broker: BrokerSettings::new(args.amqp_url),
        functions_exchange: args
            .functions_exchange
            .unwrap_or_else(|| warren_tests::functions_exchange_of(&args.queue)),
        queue: args.queue,
        concurrency: args.concurrency,
        shutdown_grace: args.shutdown_grace,
        policy: Policy {
            backoff: vec![Duration::from_millis(100)],
            ..Policy::default()
        },
        ..WorkerSettings::default()
    };
    let (queue, concurrency) = (settings.queue.clone(), settings.concurrency);
    // Installed before the worker starts, so that its first tasks are counted.
    let handle = match args.metrics {
        Some(_) => match warren_worker::metrics::install() {
            Ok(handle) => Some(handle),
            Err(e) => {
                eprintln!("warren-test-worker: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let shutdown = CancellationToken::new();
    let worker = match warren_worker::start(settings, registry, shutdown.clone()).await {
        Ok(worker) => worker,
        Err(e) => {
            eprintln!("warren-test-worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = args.metrics {
        let ops = warren_worker::ops::Ops {
            probe: worker.probe(),
            metrics: handle,
            queue,
            concurrency,
        };
        if let Err(e) = warren_worker::ops::bind(addr, ops, CancellationToken::new()).await {
            eprintln!("warren-test-worker: cannot serve metrics on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    }
    tokio::spawn(async move {
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            term.recv().await;
            shutdown.cancel();
        }
    });
    match worker.wait().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-test-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
