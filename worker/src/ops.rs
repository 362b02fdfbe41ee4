//! The operations listener (`--metrics ADDR`): `/metrics` (Prometheus text exposition),
//! `/healthz` (alive: the supervisor runs) and `/readyz` (ready: consuming, not starving, both
//! connections up), the last two with the [`Health`] details as JSON and 200 or 503.
//!
//! `metrics-exporter-prometheus` renders the exposition but serves no other route, so this
//! small axum server serves all three.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_shared::metrics::PrometheusHandle;

use crate::health::{Health, HealthProbe, WorkerState};

/// What the listener serves.
#[derive(Debug, Clone)]
pub struct Ops {
    /// The worker's health.
    pub probe: HealthProbe,
    /// The rendered registry, when metrics are on.
    pub metrics: Option<PrometheusHandle>,
    /// The queue the worker consumes (a label of its gauges).
    pub queue: String,
    /// Its concurrency (free slots = concurrency − in flight).
    pub concurrency: u16,
}

/// Binds `addr` and serves [`Ops`] until `shutdown` is cancelled.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn bind(
    addr: SocketAddr,
    ops: Ops,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ops);
    let join = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "operations listener stopped");
        }
    });
    tracing::info!(%local, "serving /metrics, /healthz and /readyz");
    Ok((local, join))
}

async fn metrics(State(ops): State<Ops>) -> Response {
    let Some(handle) = &ops.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are off\n").into_response();
    };
    crate::metrics::refresh(&ops.queue, ops.concurrency, &ops.probe.health());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

async fn healthz(State(ops): State<Ops>) -> Response {
    let health = ops.probe.health();
    answer(health.is_alive(), &ops, &health)
}

async fn readyz(State(ops): State<Ops>) -> Response {
    let health = ops.probe.health();
    answer(health.is_ready(), &ops, &health)
}

fn answer(ok: bool, ops: &Ops, health: &Health) -> Response {
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(details(ops, health))).into_response()
}

/// The health details both endpoints answer with.
fn details(ops: &Ops, health: &Health) -> serde_json::Value {
    let state = match health.state {
        WorkerState::Consuming => "consuming",
        WorkerState::Recovering => "recovering",
        WorkerState::Stopping => "stopping",
        WorkerState::Stopped => "stopped",
    };
    json!({
        "alive": health.is_alive(),
        "ready": health.is_ready(),
        "state": state,
        "state_for_seconds": round_ms(health.since.elapsed()),
        "queue": ops.queue,
        "concurrency": ops.concurrency,
        "in_flight": health.in_flight,
        "recoveries": health.recoveries,
        "last_problem": health.last_problem,
        "connections": { "consume": health.consume_up, "publish": health.publish_up },
    })
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
