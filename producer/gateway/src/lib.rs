//! The gateway: enqueue from where the users are.
//!
//! A websocket service must not block: a client message triggers heavy work, the work runs on
//! Warren workers, and the client is told when it is done. The gateway offers that on two front
//! doors, both backed by one [`Client`]:
//!
//! - [`ws`]: a websocket endpoint (`/ws`) and a web page (`/`) for new services and browsers;
//!   many tasks in flight per connection, results in completion order.
//! - [`text`]: a Workerman Text protocol bridge, a drop-in replacement for a Workerman task
//!   worker: one JSON request per line in, one JSON line out, in request order.
//!
//! Both apply the same [`Limits`] (allowlist, token, sizes, in-flight calls and bytes, idle and
//! write timeout), share one budget of bytes held for calls (`budget`) and one cap on open
//! connections, in total and, for connections from outside the trusted networks that have not
//! presented the token, per peer address and together; with a token, a connection must present
//! it within the authentication deadline. All are described with the message formats in
//! `docs/gateway.md`. [`listen_addr`] is the binding policy: loopback unless a token is set or
//! public exposure is asked for explicitly, and [`listen`] binds with a backlog sized for
//! bursts. [`serve`] runs everything until its shutdown token is cancelled, then stops reading,
//! lets calls in flight finish within the grace period and returns.
//! `results` answers "what became of task X?" on both the websocket and `/api/tasks/<id>`.
//! [`config`] holds the `warren-gateway` binary's flags, file and defaults; [`host`] what it
//! needs from the host (open files, the kernel's backlog cap); [`browser`] the defences
//! against web pages.

mod admission;
pub mod browser;
mod budget;
pub mod config;
mod due;
pub mod host;
pub mod limits;
pub mod metrics;
mod results;
pub mod resume;
mod tail;
pub mod text;
pub mod ws;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ipnet::IpNet;
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::GatewayConfig;
pub use limits::{Allowlist, DEMO_FUNCTIONS, GatewayError, Kind, Limits, MAX_ID_BYTES};
pub use resume::ResumeSettings;

use warren_client::{CallOptions, Client};

use admission::{Admitted, Gate};
use budget::Budget;

/// The web page served at `/`: plain HTML and JS, no build step.
const PAGE: &str = include_str!("page.html");

/// How the gateway behaves. The queue is the [`Client`]'s default queue.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// What callers may do; see [`Limits`].
    pub limits: Limits,
    /// How long one task may take, publish to result, before the caller gets `timeout`.
    pub call_timeout: Duration,
    /// On shutdown, how long calls in flight may take to deliver their results before their
    /// connections are closed anyway.
    pub shutdown_grace: Duration,
    /// How often the queue depth shown on the page is refreshed.
    pub queue_poll_interval: Duration,
    /// Connections (HTTP, websocket and Text together) the gateway holds open at most; one
    /// more is refused at once (HTTP 503, or a `too_many_connections` line on the Text port).
    pub max_connections: usize,
    /// Connections one peer (an IPv4 address, or an IPv6 /64) outside
    /// [`trusted_networks`](Self::trusted_networks) may hold open at most before they present
    /// the token, refused the same way. A connection that presents the token counts toward
    /// [`max_connections`](Self::max_connections) only.
    pub max_connections_per_peer: usize,
    /// Bytes the calls of all connections together may hold (each connection also has its
    /// own [`Limits::max_in_flight_bytes`]); a request that does not fit is answered `busy`.
    pub max_gateway_in_flight_bytes: usize,
    /// Connections from outside [`trusted_networks`](Self::trusted_networks) that have not
    /// presented the token (all of them without a token), from all peers together, held open
    /// at most; more are refused the same way. `None` (the default): half of
    /// [`max_connections`](Self::max_connections), see
    /// [`max_unauthenticated`](Self::max_unauthenticated()).
    pub max_unauthenticated: Option<usize>,
    /// Peers in these networks meet [`max_connections`](Self::max_connections) only (loopback
    /// by default: a Workerman front on the gateway's host opens a connection per task). Trust
    /// lifts no other check: with a token, they must present it all the same.
    pub trusted_networks: Vec<IpNet>,
    /// With a token configured, how long a connection may take to present it: a Text or
    /// websocket connection that has not by then is answered `unauthorized` and closed, an
    /// HTTP connection that has made no request with the token is closed (a request in
    /// progress included). Nothing but the token extends it.
    pub auth_timeout: Duration,
    /// Origins, besides the gateway's own, whose pages may open the websocket (e.g.
    /// `https://app.example.com`; `*` allows any). An upgrade with an `Origin` header that is
    /// neither is refused with 403; clients that send no `Origin` (all but browsers) are not
    /// affected. Without a token, their hosts are also the only names (besides IP addresses
    /// and `localhost`) the gateway answers to ([`browser::check_host`]).
    pub allowed_origins: Vec<String>,
    /// Resume after a reconnect: the event stream the gateway follows, and the limits of
    /// replaying it ([`resume`]).
    pub resume: ResumeSettings,
}

/// The default of [`GatewaySettings::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default of [`GatewaySettings::max_connections_per_peer`].
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 64;
/// The default of [`GatewaySettings::max_gateway_in_flight_bytes`]: 256 MiB.
pub const DEFAULT_MAX_GATEWAY_IN_FLIGHT_BYTES: usize = 256 * 1024 * 1024;
/// The default port of the web page and websocket endpoint.
pub const DEFAULT_HTTP_PORT: u16 = 8080;
/// The default port of the Workerman Text bridge.
pub const DEFAULT_TEXT_PORT: u16 = 12345;
/// Loopback, IPv4 and IPv6: the default of [`GatewaySettings::trusted_networks`].
const LOOPBACK: [IpNet; 2] = [
    IpNet::new_assert(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8),
    IpNet::new_assert(IpAddr::V6(Ipv6Addr::LOCALHOST), 128),
];
/// The default listen backlog of both ports (see [`listen`]).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 1024;

/// A listening socket on `addr` whose accept queue holds `backlog` connections.
///
/// A Workerman front opens one Text connection per task, so a burst of a thousand messages is
/// a thousand connects at once. Past the backlog the kernel drops SYNs, and the clients retry
/// only after a second; so the backlog is sized for bursts ([`DEFAULT_LISTEN_BACKLOG`]), not
/// the 128 of `std` and tokio's `bind`. Linux caps it at `net.core.somaxconn` (4096 by
/// default since 5.4). Like tokio's `bind`, it sets `SO_REUSEADDR`.
///
/// # Errors
/// The socket cannot be created, bound or put to listen (the address is in use, say).
pub fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// A listening address the gateway refuses to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// A non-loopback address without a token: anyone who reaches it could run the allowed
    /// functions (send mail, for one).
    #[error(
        "refusing to listen on {0} without a token: anyone who reaches it could run the allowed \
         functions (send_mail makes it an open mail relay). Set --token, \
         listen on 127.0.0.1, or pass --insecure-public on a trusted network"
    )]
    PublicWithoutToken(SocketAddr),
}

/// Where to listen: `requested` if given, otherwise `default_port` on loopback, or on every
/// interface when a token is set or `insecure_public` is.
///
/// # Errors
/// [`ListenError::PublicWithoutToken`] for a non-loopback `requested` address with neither a
/// token nor `insecure_public`.
pub fn listen_addr(
    requested: Option<SocketAddr>,
    default_port: u16,
    token_set: bool,
    insecure_public: bool,
) -> Result<SocketAddr, ListenError> {
    let public_ok = token_set || insecure_public;
    match requested {
        Some(addr) if !addr.ip().is_loopback() && !public_ok => {
            Err(ListenError::PublicWithoutToken(addr))
        }
        Some(addr) => Ok(addr),
        None if public_ok => Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            default_port,
        )),
        None => Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            default_port,
        )),
    }
}

impl GatewaySettings {
    /// The cap on connections from outside the trusted networks that have not presented the
    /// token: [`max_unauthenticated`](Self::max_unauthenticated) if set, else half of
    /// [`max_connections`](Self::max_connections) (at least 1), so that strangers with many
    /// addresses leave the other half to trusted and authenticated connections.
    pub fn max_unauthenticated(&self) -> usize {
        self.max_unauthenticated
            .unwrap_or(self.max_connections / 2)
            .max(1)
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            call_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            queue_poll_interval: Duration::from_secs(1),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            max_gateway_in_flight_bytes: DEFAULT_MAX_GATEWAY_IN_FLIGHT_BYTES,
            max_unauthenticated: None,
            trusted_networks: LOOPBACK.to_vec(),
            auth_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            resume: ResumeSettings::default(),
        }
    }
}

/// The queue's depth as last seen by the gateway, pushed to the page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSnapshot {
    /// The work queue.
    pub name: String,
    /// Messages waiting for a worker.
    pub ready: u32,
    /// Workers consuming it.
    pub consumers: u32,
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    settings: GatewaySettings,
    client: Client,
    queue: watch::Receiver<Option<QueueSnapshot>>,
    shutdown: CancellationToken,
    connections: TaskTracker,
    gate: Arc<Gate>,
    /// Bytes the calls of every connection hold together.
    budget: Arc<Budget>,
    /// The follower of the event stream, with resume on.
    tail: Option<Arc<tail::Tail>>,
}

impl Shared {
    fn call_options(&self) -> CallOptions {
        CallOptions::default().timeout(self.settings.call_timeout)
    }

    /// The call options of a request with these timing fields.
    fn options_due(&self, due: &due::Due) -> Result<CallOptions, limits::GatewayError> {
        let mut options = self.call_options();
        options.run_at = due.run_at()?;
        Ok(options)
    }

    fn limits(&self) -> &Limits {
        &self.settings.limits
    }
}

/// Serves the websocket endpoint and the page on `http` and the Workerman Text bridge on
/// `text`, calling tasks through `client`, until `shutdown` is cancelled.
///
/// On shutdown it stops accepting and reading, gives calls in flight up to
/// [`GatewaySettings::shutdown_grace`] to deliver their results, then returns. Pass listeners
/// bound to `127.0.0.1:0` to run it in tests.
pub async fn serve(
    settings: GatewaySettings,
    client: Client,
    http: TcpListener,
    text: TcpListener,
    shutdown: CancellationToken,
) {
    let (queue_tx, queue_rx) = watch::channel(None);
    let gate = Gate::new(admission::GateLimits {
        max_total: settings.max_connections,
        max_per_peer: settings.max_connections_per_peer,
        max_unauthenticated: settings.max_unauthenticated(),
        trusted: settings.trusted_networks.clone(),
        token_set: settings.limits.token.is_some(),
    });
    let tail = settings
        .resume
        .stream
        .as_deref()
        .map(|stream| tail::Tail::new(stream, settings.resume.max_replays));
    let follower = tail.clone().map(|tail| {
        let client = client.settings();
        tokio::spawn(tail.run(client.broker.clone(), client.name.clone(), shutdown.clone()))
    });
    let shared = Arc::new(Shared {
        gate,
        tail,
        budget: Budget::new(settings.max_gateway_in_flight_bytes),
        settings,
        client,
        queue: queue_rx,
        shutdown: shutdown.clone(),
        connections: TaskTracker::new(),
    });
    tracing::info!(
        http = ?http.local_addr().ok(),
        text = ?text.local_addr().ok(),
        queue = ?shared.client.settings().queue,
        functions_exchange = %shared.client.settings().functions_exchange,
        limits = ?shared.settings.limits,
        max_connections = shared.settings.max_connections,
        max_connections_per_peer = shared.settings.max_connections_per_peer,
        max_gateway_in_flight_bytes = shared.settings.max_gateway_in_flight_bytes,
        max_unauthenticated = shared.settings.max_unauthenticated(),
        trusted_networks = ?shared.settings.trusted_networks,
        resume = ?shared.settings.resume,
        "gateway serving"
    );
    let poller = tokio::spawn(poll_queue(shared.clone(), queue_tx));
    tokio::join!(
        accept_http(http, shared.clone()),
        text::accept(text, shared.clone())
    );
    poller.abort();
    shared.connections.close();
    // Connections bound their own drain by the grace period; this bounds a stuck write too.
    let bound = shared.settings.shutdown_grace + Duration::from_secs(1);
    if tokio::time::timeout(bound, shared.connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; leaving them");
    }
    if let Some(follower) = follower {
        // It stops with the shutdown token; closing its connection is bounded by the link.
        let _ = tokio::time::timeout(Duration::from_secs(10), follower).await;
    }
    tracing::info!("gateway stopped");
}

/// The HTTP routes: the page, the websocket and small JSON endpoints (a task's outcome among
/// them, [`results`]).
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/ws", get(ws::upgrade))
        .route("/api/info", get(info))
        .route("/api/queue", get(queue))
        .route("/api/tasks/{id}", get(results::http))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            refuse_rebound_host,
        ))
        .with_state(shared)
}

/// Without a token, refuses (403) a request for a host name a web page could have pointed at
/// this machine (DNS rebinding); see [`browser::check_host`].
async fn refuse_rebound_host(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if shared.limits().token.is_none()
        && let Err(refused) =
            browser::check_host(request.headers(), &shared.settings.allowed_origins)
    {
        tracing::debug!(error = %refused, "http: request refused");
        return error_response(StatusCode::FORBIDDEN, &refused);
    }
    next.run(request).await
}

/// Accepts HTTP connections; each is served by hyper with a header read timeout, so a client
/// that dribbles its request headers is dropped after the idle timeout. A connection over the
/// connection limits gets a 503 at once. With a token configured, a connection that has made
/// no request with it within the authentication deadline is closed, whatever it is doing (a
/// keep-alive `GET /` or a request that never ends holds no place for long).
async fn accept_http(listener: TcpListener, shared: Arc<Shared>) {
    let router = router(shared.clone());
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
        };
        let admitted = match shared.gate.admit(peer) {
            Ok(admitted) => Arc::new(admitted),
            Err(refusal) => {
                tracing::debug!(%peer, error = %refusal, "http: connection refused");
                let bytes = admission::http_refusal(&refusal);
                shared.connections.spawn(admission::refuse(stream, bytes));
                continue;
            }
        };
        // The ticket travels with the requests, so that a websocket upgraded from this
        // connection keeps the place after hyper lets go of the connection.
        let service = TowerToHyperService::new(router.clone().layer(Extension(admitted.clone())));
        let shutdown = shared.shutdown.clone();
        let mut auth_deadline = shared
            .limits()
            .token
            .is_some()
            .then(|| tokio::time::Instant::now() + shared.settings.auth_timeout);
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(shared.limits().idle_timeout);
        shared.connections.spawn(async move {
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let served = loop {
                tokio::select! {
                    served = connection.as_mut() => break served,
                    () = shutdown.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        break connection.await;
                    }
                    () = sleep_until_some(auth_deadline), if auth_deadline.is_some() => {
                        auth_deadline = None;
                        if !admitted.is_authenticated() {
                            // Dropped, not shut down gracefully: hyper would wait for the
                            // request in progress, which a stranger may never finish.
                            tracing::debug!("http: no request with the token in time; closing");
                            break Ok(());
                        }
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

/// An `accept` error (out of file descriptors, usually) is logged and retried shortly, without
/// spinning.
async fn accept_failed(error: &std::io::Error) {
    tracing::warn!(error = %error, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Refreshes the queue depth while the gateway runs: of the queue it sends to, or of the
/// default queue when it routes by function.
async fn poll_queue(shared: Arc<Shared>, tx: watch::Sender<Option<QueueSnapshot>>) {
    let queue = shared
        .client
        .settings()
        .queue
        .clone()
        .unwrap_or_else(|| warren_shared::topology::DEFAULT_QUEUE.to_owned());
    let mut every = tokio::time::interval(shared.settings.queue_poll_interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match shared.client.queue_stats(&queue).await {
            Ok(stats) => {
                let now = Some(QueueSnapshot {
                    name: queue.clone(),
                    ready: stats.ready,
                    consumers: stats.consumers,
                });
                // Watchers hear of a change, not of every poll (docs/gateway.md).
                tx.send_if_modified(|seen| {
                    let changed = *seen != now;
                    if changed {
                        *seen = now;
                    }
                    changed
                });
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the queue depth"),
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `GET /api/info`: what the page needs to know before it connects (token required when one
/// is configured; the page learns that from the 401).
async fn info(
    State(shared): State<Arc<Shared>>,
    Extension(admitted): Extension<Arc<Admitted>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refuse_without_bearer(shared.limits(), &headers, &admitted) {
        return refused;
    }
    let limits = shared.limits();
    axum::Json(json!({
        "queue": shared.client.settings().queue,
        "functions": limits.allow.names(),
        "auth_required": limits.token.is_some(),
        "max_in_flight": limits.max_in_flight,
        "max_message_bytes": limits.max_message_bytes,
        "max_batch": limits.max_batch,
        "max_in_flight_bytes": limits.max_in_flight_bytes,
    }))
    .into_response()
}

/// `GET /api/queue`: the last queue depth read (token required when one is configured).
async fn queue(
    State(shared): State<Arc<Shared>>,
    Extension(admitted): Extension<Arc<Admitted>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refuse_without_bearer(shared.limits(), &headers, &admitted) {
        return refused;
    }
    match shared.queue.borrow().clone() {
        Some(snapshot) => axum::Json(snapshot).into_response(),
        None => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &GatewayError::new(Kind::Unavailable, "queue depth not read yet"),
        ),
    }
}

/// The token of an `Authorization: Bearer <token>` header, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The refusal of a request whose bearer token is missing or wrong, when a token is configured.
/// A right token authenticates the connection it came on.
fn refuse_without_bearer(
    limits: &Limits,
    headers: &HeaderMap,
    admitted: &Admitted,
) -> Option<Response> {
    limits.token.as_ref()?; // no token configured: nothing to check
    match bearer(headers) {
        Some(token) if limits.token_matches(token) => {
            admitted.authenticated();
            None
        }
        _ => Some(error_response(
            StatusCode::UNAUTHORIZED,
            &GatewayError::unauthorized(),
        )),
    }
}

fn error_response(status: StatusCode, error: &GatewayError) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

/// Sleeps until `at`, or forever when there is no `at` (a disabled deadline in a `select!`).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
