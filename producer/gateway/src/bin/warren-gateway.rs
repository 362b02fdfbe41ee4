//! `warren-gateway`: the websocket gateway, its web page and the Workerman Text protocol bridge.
//!
//! Flags and environment only; the server is `warren_gateway`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_client::{Client, ClientSettings};
use warren_gateway::{Allowlist, GatewaySettings, Limits};
use warren_shared::broker::{BrokerSettings, DEFAULT_AMQP_URL};
use warren_shared::topology::DEFAULT_QUEUE;

/// Serves Warren tasks over a websocket (with a web page at /) and over the Workerman Text
/// protocol, so that websocket services and Workerman applications can hand work to Warren
/// workers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Broker URL (the vhost `/` is `%2f`).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    amqp_url: String,
    /// Work queue the tasks go to.
    #[arg(long, env = "WARREN_QUEUE", default_value = DEFAULT_QUEUE)]
    queue: String,
    /// Address of the web page (/) and the websocket endpoint (/ws).
    #[arg(long, env = "WARREN_GATEWAY_HTTP", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Address of the Workerman Text protocol bridge.
    #[arg(long, env = "WARREN_GATEWAY_TEXT", default_value = "0.0.0.0:12345")]
    text: SocketAddr,
    /// Functions callers may run, comma-separated; `*` allows any (trusted networks only).
    #[arg(long, env = "WARREN_GATEWAY_ALLOW", value_delimiter = ',',
          default_values_t = warren_gateway::DEMO_FUNCTIONS.iter().map(|f| (*f).to_owned()))]
    allow: Vec<String>,
    /// Bearer token callers must present (Authorization header or a first {"auth": ...}
    /// message). No token: anyone who reaches the port may call the allowed functions.
    #[arg(long, env = "WARREN_GATEWAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Largest websocket message or Text line, in bytes.
    #[arg(long, env = "WARREN_GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    max_message_bytes: usize,
    /// Tasks one connection may have in flight; more are answered `busy`.
    #[arg(long, env = "WARREN_GATEWAY_MAX_IN_FLIGHT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_in_flight: u32,
    /// Close connections that send nothing for this long with nothing in flight.
    #[arg(long, env = "WARREN_GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// How long a task may take, publish to result, before the caller gets `timeout`.
    #[arg(long, env = "WARREN_GATEWAY_CALL_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    call_timeout: Duration,
    /// On SIGTERM, how long calls in flight may take to deliver their results.
    #[arg(long, env = "WARREN_GATEWAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`) on this
    /// address, e.g. `127.0.0.1:9465`. Off by default.
    #[arg(long = "metrics", env = "WARREN_METRICS_ADDR", value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    warren_shared::telemetry::init("info");
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-gateway: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let http = TcpListener::bind(args.http)
        .await
        .with_context(|| format!("cannot listen on --http {}", args.http))?;
    let text = TcpListener::bind(args.text)
        .await
        .with_context(|| format!("cannot listen on --text {}", args.text))?;
    let handle = match args.metrics {
        Some(_) => Some(warren_gateway::metrics::install()?),
        None => None,
    };
    let client = Client::connect(ClientSettings {
        broker: BrokerSettings::new(args.amqp_url),
        queue: args.queue,
        name: warren_shared::broker::process_name("warren-gateway"),
        ..ClientSettings::default()
    })
    .await?;
    let settings = GatewaySettings {
        limits: Limits {
            allow: Allowlist::of(&args.allow),
            token: args.token.filter(|t| !t.is_empty()),
            max_message_bytes: args.max_message_bytes,
            max_in_flight: args.max_in_flight as usize,
            idle_timeout: args.idle_timeout,
        },
        call_timeout: args.call_timeout,
        shutdown_grace: args.shutdown_grace,
        ..GatewaySettings::default()
    };
    let shutdown = CancellationToken::new();
    if let Some(addr) = args.metrics {
        // Stops with the process: it answers (503) while the gateway drains.
        warren_gateway::metrics::serve_ops(addr, client.clone(), handle, CancellationToken::new())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tokio::spawn(warren_shared::shutdown::on_signals(
        shutdown.clone(),
        "no new connections; delivering results in flight",
    ));
    warren_gateway::serve(settings, client.clone(), http, text, shutdown).await;
    client.close().await;
    Ok(())
}
