//! `warren-gateway`: the websocket gateway, its web page and the Workerman Text protocol bridge.
//!
//! Settings come from `warren_gateway::GatewayConfig` (flags, environment, `--config FILE`);
//! the server is `warren_gateway`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Command;
use tokio_util::sync::CancellationToken;
use warren_client::Client;
use warren_gateway::GatewayConfig;
use warren_shared::config::{self, ConfigError};

fn command() -> Command {
    Command::new("warren-gateway")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Serves Warren tasks over a websocket (with a web page at /) and over the Workerman \
             Text protocol, so that websocket services and Workerman applications can hand work \
             to Warren workers.",
        )
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = match config::load::<GatewayConfig>(command()) {
        Ok(config) => config,
        Err(ConfigError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("warren-gateway: error: {e}");
            return ExitCode::from(2);
        }
    };
    warren_shared::telemetry::init("info");
    // Spans are exported while it runs (when OTEL_EXPORTER_OTLP_ENDPOINT is set).
    match warren_shared::otel::exporting_while("warren-gateway", run(config)).await {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("warren-gateway: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("warren-gateway: error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let config = config.read_secret_files()?;
    config.validate()?;
    let http_addr = config.http_addr().context("--http")?;
    let text_addr = config.text_addr().context("--text")?;
    if config.insecure_public
        && config.token.is_none()
        && !(http_addr.ip().is_loopback() && text_addr.ip().is_loopback())
    {
        tracing::warn!(
            "--insecure-public: listening beyond loopback without a token; anyone who reaches \
             the ports may run the allowed functions"
        );
    }
    check_host_limits(&config);
    let backlog = config.listen_backlog;
    let http = warren_gateway::listen(http_addr, backlog)
        .with_context(|| format!("cannot listen on --http {http_addr}"))?;
    let text = warren_gateway::listen(text_addr, backlog)
        .with_context(|| format!("cannot listen on --text {text_addr}"))?;
    let handle = match config.metrics {
        Some(_) => Some(warren_gateway::metrics::install()?),
        None => None,
    };
    let client = Client::connect(config.client_settings()?).await?;
    let shutdown = CancellationToken::new();
    if let Some(addr) = config.metrics {
        // Stops with the process: it answers (503) while the gateway drains.
        warren_gateway::metrics::serve_ops(addr, client.clone(), handle, CancellationToken::new())
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tokio::spawn(warren_shared::shutdown::on_signals(
        shutdown.clone(),
        "no new connections; delivering results in flight",
    ));
    warren_gateway::serve(config.settings(), client.clone(), http, text, shutdown).await;
    client.close().await;
    Ok(())
}

/// Raises the open-files limit for `--max-connections`, and warns where the host cannot give
/// the connections or the backlog asked for (docs/gateway.md, "Security").
fn check_host_limits(config: &GatewayConfig) {
    use warren_gateway::host;
    let needed = u64::try_from(config.max_connections.get())
        .unwrap_or(u64::MAX)
        .saturating_add(host::SPARE_FILES);
    match host::raise_open_files_limit() {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-files limit is below --max-connections plus spare descriptors: accept \
             will fail with EMFILE before the connection cap is reached; raise the hard limit \
             (LimitNOFILE= in a systemd unit, ulimit -Hn) or lower --max-connections"
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    if let Some(cap) = host::somaxconn()
        && cap < config.listen_backlog
    {
        tracing::warn!(
            somaxconn = cap,
            listen_backlog = config.listen_backlog,
            "net.core.somaxconn caps the listen backlog below --listen-backlog: a burst of \
             connects past it is dropped and retried after 1 s; raise it (sysctl \
             net.core.somaxconn) or expect that"
        );
    }
}
