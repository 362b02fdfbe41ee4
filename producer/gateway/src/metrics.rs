//! The gateway's Prometheus series and its operations listener (`--metrics ADDR`: `/metrics`,
//! `/healthz`, `/readyz`). Every name, label and recording call is here, so that the call
//! sites stay one line each; `docs/operations.md` describes each series.
//!
//! Without [`install`] no recorder exists and every call is a no-op. Label cardinality is
//! bounded: `function` is an allowlisted function, or `other` when the allowlist is `*`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warren_client::{Client, Error};
use warren_shared::metrics::{BuildError, PrometheusHandle};

use crate::limits::{Allowlist, Kind};

/// Gauge: connections open now, by `protocol` (`websocket`, `text`).
pub const CONNECTIONS: &str = "warren_gateway_connections";
/// Counter: connections accepted, by `protocol`.
pub const CONNECTIONS_TOTAL: &str = "warren_gateway_connections_total";
/// Counter: tasks called through the gateway, by `function` and `outcome`
/// (`ok`, `failed`, `timeout`, `unavailable`).
pub const TASKS: &str = "warren_gateway_tasks_total";
/// Counter: requests refused by the gateway itself, by `reason`
/// (`forbidden`, `busy`, `too_large`, `unauthorized`, `too_many_connections`).
pub const REJECTED: &str = "warren_gateway_rejected_total";
/// Gauge: bytes the calls of all connections hold now (requests, and results until written):
/// what `--max-gateway-in-flight-bytes` bounds, results counted past it included.
pub const HELD_BYTES: &str = "warren_gateway_held_bytes";
/// Gauge: 1 while the gateway's broker connection is up, an alarm blocking it included (as
/// `/readyz`).
pub const CONNECTION_UP: &str = "warren_gateway_connection_up";

/// Installs the process-wide Prometheus recorder and describes the gateway's series.
///
/// # Errors
/// [`BuildError`] when another recorder is already installed in this process.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = warren_shared::metrics::install()?;
    metrics::describe_gauge!(CONNECTIONS, "Connections open now.");
    metrics::describe_counter!(CONNECTIONS_TOTAL, "Connections accepted.");
    metrics::describe_counter!(TASKS, "Tasks called through the gateway, by outcome.");
    metrics::describe_counter!(REJECTED, "Requests the gateway refused, by reason.");
    metrics::describe_gauge!(
        HELD_BYTES,
        "Bytes the calls of all connections hold now (requests, and results until written)."
    );
    metrics::gauge!(HELD_BYTES).set(0.0);
    metrics::describe_gauge!(
        CONNECTION_UP,
        "1 while the broker connection is up (also while an alarm blocks it)."
    );
    // Every refusal reason from 0, so that rates and alerts see the first one.
    for kind in REFUSALS {
        metrics::counter!(REJECTED, "reason" => kind.as_str()).increment(0);
    }
    Ok(handle)
}

/// The refusals the gateway counts: its own, not the worker's.
const REFUSALS: [Kind; 5] = [
    Kind::Forbidden,
    Kind::Busy,
    Kind::TooLarge,
    Kind::Unauthorized,
    Kind::TooManyConnections,
];

/// Counts `bytes` more (a positive delta) or fewer held by calls.
#[allow(clippy::cast_precision_loss)] // a byte count far below 2^52
pub(crate) fn held_bytes(delta: isize) {
    metrics::gauge!(HELD_BYTES).increment(delta as f64);
}

/// Counts a connection as open until dropped.
#[derive(Debug)]
pub(crate) struct OpenConnection(&'static str);

/// A `protocol` connection was accepted; it counts as open until the guard is dropped.
pub(crate) fn connection_opened(protocol: &'static str) -> OpenConnection {
    metrics::counter!(CONNECTIONS_TOTAL, "protocol" => protocol).increment(1);
    metrics::gauge!(CONNECTIONS, "protocol" => protocol).increment(1.0);
    OpenConnection(protocol)
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS, "protocol" => self.0).decrement(1.0);
    }
}

/// The gateway refused a request with `kind` (only its own refusals are counted).
pub(crate) fn rejected(kind: Kind) {
    if REFUSALS.contains(&kind) {
        metrics::counter!(REJECTED, "reason" => kind.as_str()).increment(1);
    }
}

/// The `function` label: the function when the allowlist names it, else `other`.
pub(crate) fn function_label(allow: &Allowlist, function: &str) -> String {
    match allow {
        Allowlist::Any => "other".to_owned(),
        _ if allow.allows(function) => function.to_owned(),
        _ => "other".to_owned(),
    }
}

/// A call through the gateway ended with `result`.
pub(crate) fn task_finished<T>(function: String, result: &Result<T, Error>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(Error::Failed(_)) => "failed",
        Err(Error::Timeout(_)) => "timeout",
        Err(_) => "unavailable",
    };
    metrics::counter!(TASKS, "function" => function, "outcome" => outcome).increment(1);
}

/// Binds `addr` and serves `/metrics` (when `handle` is given), `/healthz` (200 while the
/// process serves) and `/readyz` (200 while `client`'s broker connection is up, also while an
/// alarm blocks it; 503 otherwise)
/// until `shutdown` is cancelled.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn serve_ops(
    addr: SocketAddr,
    client: Client,
    handle: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state((client, handle));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "operations listener stopped");
        }
    });
    tracing::info!(%local, "serving /metrics, /healthz and /readyz");
    Ok(local)
}

type OpsState = (Client, Option<PrometheusHandle>);

async fn render(State((client, handle)): State<OpsState>) -> Response {
    let Some(handle) = handle else {
        return (StatusCode::NOT_FOUND, "metrics are off\n").into_response();
    };
    let up = client.link_state().is_connected();
    metrics::gauge!(CONNECTION_UP).set(if up { 1.0 } else { 0.0 });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

fn details(client: &Client) -> (bool, Value) {
    let state = client.link_state();
    let ready = state.is_connected();
    (
        ready,
        json!({
            "alive": true,
            "ready": ready,
            "broker": state.to_string(),
            "queue": client.settings().queue,
            "calls_in_flight": client.pending_calls(),
        }),
    )
}

async fn healthz(State((client, _)): State<OpsState>) -> Response {
    (StatusCode::OK, axum::Json(details(&client).1)).into_response()
}

async fn readyz(State((client, _)): State<OpsState>) -> Response {
    let (ready, body) = details(&client);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
