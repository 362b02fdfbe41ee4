//! One broker connection that is always being kept alive: the one owner of recovery in a process.
//!
//! A [`Link`] opens a named connection (trying the broker's addresses in shuffled order), watches
//! it through lapin's events (blocked, unblocked, errors) and status (a lost socket or two missed
//! heartbeats end it), and when it is lost closes what is left of it and connects again, with
//! capped, jittered exponential backoff ([`Reconnect`](crate::broker::Reconnect)), to the next
//! address of its list. Each new connection is a new [`Generation`]: whoever built channels,
//! consumers or pools on the old one watches [`Link::generations`] and rebuilds them. lapin's own
//! auto-recovery is never turned on, so nothing else re-registers an old consumer behind the
//! process's back, and a process holds exactly one connection per link.
//!
//! The state ([`LinkState`]: up, down, blocked, closed) sits behind a `tokio::sync::watch`, each
//! change logged once, so publishers can wait, with a bound, until the link can carry a publish.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::broker::{self, BrokerError, BrokerSettings, Purpose, redact_url};

/// How often a [`Link`] reads its connection's status (a cheap local read, no traffic).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Bound on closing a connection that is being replaced or shut.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a link can do right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connected; publishes and deliveries flow.
    Up,
    /// Lost; the link is reconnecting. `reason` is the error that broke it.
    Down {
        /// The error that broke the connection.
        reason: String,
    },
    /// Connected, but the broker refuses to read publishes (a memory or disk alarm).
    Blocked {
        /// The broker's reason, e.g. `low on memory`.
        reason: String,
    },
    /// Closed for good: closed on purpose, or reconnecting gave up (see [`Link::gave_up`]).
    Closed,
}

impl LinkState {
    /// Whether a publish can go out now.
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Up)
    }

    /// Whether the connection is there: up, or blocked by a broker alarm (publishes wait for
    /// it to end; deliveries and acks still flow). What readiness and the `connection_up`
    /// gauges report.
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Up | Self::Blocked { .. })
    }
}

impl std::fmt::Display for LinkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Up => f.write_str("connected"),
            Self::Down { reason } => write!(f, "connection lost ({reason}); reconnecting"),
            Self::Blocked { reason } => write!(f, "the broker blocks publishers ({reason})"),
            Self::Closed => f.write_str("connection closed"),
        }
    }
}

/// One connection of a link's life.
#[derive(Debug, Clone)]
pub struct Generation {
    /// 1 for the first connection, then one more per reconnect.
    pub number: u64,
    /// The connection.
    pub connection: Arc<Connection>,
    /// The address it was made to, password hidden.
    pub address: String,
}

/// Why [`Link::wait_up`] gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker unavailable for {waited:?}: {state}")]
pub struct Unavailable {
    /// How long it waited.
    pub waited: Duration,
    /// The state it was in when the wait ended.
    pub state: String,
}

/// Not `Debug`: `addresses` hold passwords.
struct Inner {
    settings: BrokerSettings,
    name: String,
    purpose: Purpose,
    /// Extra client properties of every connection (see [`broker::connect`]).
    details: Vec<(String, String)>,
    state: watch::Sender<LinkState>,
    generation: watch::Sender<Generation>,
    changed_at: std::sync::Mutex<Instant>,
    gave_up: std::sync::Mutex<Option<String>>,
    reset: Notify,
    stop: CancellationToken,
    /// Set once the link's last connection is closed for good: `Link::close` and the
    /// supervisor (when the last clone is dropped) may both get there, and a second
    /// `connection.close` would have the broker's close-ok arrive unexpected (lapin logs it).
    closed: tokio::sync::OnceCell<()>,
    /// When the current connection's lifetime is over (`BrokerSettings::max_lifetime`).
    due_at: std::sync::Mutex<Option<Instant>>,
    /// Held while a new connection is made and swapped in (reconnect or rotation), so that
    /// the two never both replace the same connection.
    swap: tokio::sync::Mutex<()>,
    /// Index into `addresses` of the current connection's address.
    at: AtomicU64,
    addresses: Vec<String>,
}

/// A self-healing broker connection; cheap to clone. Dropping the last clone closes it.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
    _owner: Arc<DropGuard>,
    process_name: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let generation = self.inner.generation.borrow();
        f.debug_struct("Link")
            .field("name", &self.inner.name)
            .field("state", &self.state())
            .field("generation", &generation.number)
            .field("address", &generation.address)
            .finish()
    }
}

impl Link {
    /// Connects to the first address (of the shuffled list) that answers and starts keeping the
    /// connection alive. `name` is the process name the management UI shows (see
    /// [`broker::process_name`]); the purpose is appended. `details` (e.g. `queue`,
    /// `concurrency`) join the connection's client properties (see [`broker::connect`]).
    ///
    /// # Errors
    /// The [`BrokerError`] of the last address tried when none answers, or
    /// [`BrokerError::InvalidUrl`].
    pub async fn open(
        settings: &BrokerSettings,
        name: &str,
        purpose: Purpose,
        details: &[(String, String)],
    ) -> Result<Self, BrokerError> {
        let addresses = settings.shuffled_addresses()?;
        let mut last = None;
        for (index, address) in addresses.iter().enumerate() {
            match broker::connect(settings, address, name, purpose, details).await {
                Ok(connection) => {
                    return Ok(Self::watch(
                        settings.clone(),
                        name,
                        purpose,
                        details.to_vec(),
                        addresses.clone(),
                        index,
                        connection,
                    ));
                }
                Err(e) => {
                    if addresses.len() > 1 {
                        tracing::warn!(address = %redact_url(address), error = %e, "broker address not answering; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| BrokerError::InvalidUrl {
            url: settings.redacted_url(),
            reason: "no broker address given".into(),
        }))
    }

    fn watch(
        settings: BrokerSettings,
        name: &str,
        purpose: Purpose,
        details: Vec<(String, String)>,
        addresses: Vec<String>,
        index: usize,
        connection: Connection,
    ) -> Self {
        let first = Generation {
            number: 1,
            connection: Arc::new(connection),
            address: redact_url(&addresses[index]),
        };
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            settings,
            name: format!("{name}/{purpose:?}"),
            purpose,
            details,
            state: watch::Sender::new(LinkState::Up),
            generation: watch::Sender::new(first),
            changed_at: std::sync::Mutex::new(Instant::now()),
            gave_up: std::sync::Mutex::new(None),
            reset: Notify::new(),
            stop: stop.clone(),
            closed: tokio::sync::OnceCell::new(),
            due_at: std::sync::Mutex::new(None),
            swap: tokio::sync::Mutex::new(()),
            at: AtomicU64::new(index as u64),
            addresses,
        });
        renew_lifetime(&inner);
        let process_name = name.to_owned();
        tokio::spawn(supervise(inner.clone(), process_name.clone()));
        Self {
            inner,
            _owner: Arc::new(stop.drop_guard()),
            process_name,
        }
    }

    /// Whether the current connection has outlived its (jittered) lifetime and the link is up:
    /// its owner should call [`Link::rotate`] at the next moment nothing is in flight on it.
    pub fn rotation_due(&self) -> bool {
        self.state().is_up() && lock(&self.inner.due_at).is_some_and(|due| due <= Instant::now())
    }

    /// Replaces a healthy connection by a new one to a random address of the list (make before
    /// break): the new generation is published, and the old connection is returned for its
    /// owner to close once nothing it carries is still waiting (`None` when the link was not
    /// up, so nothing was replaced).
    ///
    /// # Errors
    /// The [`BrokerError`] of the new connection; the current one then stays, and the next
    /// rotation is due after another lifetime.
    pub async fn rotate(&self) -> Result<Option<Arc<Connection>>, BrokerError> {
        let inner = &self.inner;
        let _swap = inner.swap.lock().await;
        // A reconnect meanwhile started a new lifetime, or the link was closed.
        if !self.rotation_due() || inner.stop.is_cancelled() {
            return Ok(None);
        }
        let index = fastrand::usize(..inner.addresses.len());
        let address = &inner.addresses[index];
        let connected = broker::connect(
            &inner.settings,
            address,
            &self.process_name,
            inner.purpose,
            &inner.details,
        )
        .await;
        renew_lifetime(inner);
        let connection = connected?;
        inner.at.store(index as u64, Ordering::SeqCst);
        let number = inner.generation.borrow().number + 1;
        let old = inner.generation.send_replace(Generation {
            number,
            connection: Arc::new(connection),
            address: redact_url(address),
        });
        tracing::info!(connection = %inner.name, address = %redact_url(address), generation = number, "connection lifetime over; moved to a new connection");
        Ok(Some(old.connection))
    }

    /// The state now.
    pub fn state(&self) -> LinkState {
        self.inner.state.borrow().clone()
    }

    /// A receiver that sees every change of state.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// A receiver that sees every new connection. It does not keep the link open.
    pub fn generations(&self) -> watch::Receiver<Generation> {
        self.inner.generation.subscribe()
    }

    /// The current connection (possibly lost and about to be replaced).
    pub fn connection(&self) -> Arc<Connection> {
        self.inner.generation.borrow().connection.clone()
    }

    /// The current generation's number.
    pub fn generation(&self) -> u64 {
        self.inner.generation.borrow().number
    }

    /// Why the link stopped reconnecting, once it has given up
    /// ([`Reconnect::max_attempts`](crate::broker::Reconnect::max_attempts)).
    pub fn gave_up(&self) -> Option<String> {
        lock(&self.inner.gave_up).clone()
    }

    /// How long the link has not been up, or `None` while it is.
    pub fn down_for(&self) -> Option<Duration> {
        if self.state().is_up() {
            return None;
        }
        Some(lock(&self.inner.changed_at).elapsed())
    }

    /// Replaces the current connection now, as if it had been lost (for a consumer that a
    /// watchdog found wedged on a connection that still looks healthy).
    pub fn reset(&self) {
        self.inner.reset.notify_one();
    }

    /// Closes the connection for good and stops reconnecting.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        set_state(&self.inner, LinkState::Closed);
        close_for_good(&self.inner).await;
    }

    /// Waits until the link is up, at most `bound`.
    ///
    /// # Errors
    /// [`Unavailable`] when it is still down, blocked or closed after `bound` (at once when it is
    /// closed).
    pub async fn wait_up(&self, bound: Duration) -> Result<(), Unavailable> {
        let mut rx = self.subscribe();
        let settled = |s: &LinkState| s.is_up() || *s == LinkState::Closed;
        let waited = tokio::time::timeout(bound, rx.wait_for(settled)).await;
        match waited {
            Ok(Ok(state)) if state.is_up() => Ok(()),
            _ => Err(Unavailable {
                waited: bound,
                state: self.state().to_string(),
            }),
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the lifetime of a new connection: 75-100 % of `max_lifetime`, so that a fleet that
/// connected together does not move together.
fn renew_lifetime(inner: &Inner) {
    *lock(&inner.due_at) = inner
        .settings
        .max_lifetime
        .map(|lifetime| Instant::now() + lifetime.mul_f64(0.75 + 0.25 * fastrand::f64()));
}

fn set_state(inner: &Inner, next: LinkState) {
    let changed = inner.state.send_if_modified(|state| {
        if *state == LinkState::Closed || *state == next {
            return false;
        }
        *state = next.clone();
        true
    });
    if changed {
        *lock(&inner.changed_at) = Instant::now();
        match &next {
            LinkState::Up => tracing::info!(connection = %inner.name, "broker connection up"),
            // Closed on purpose, or after giving up (which is logged as an error where it happens).
            LinkState::Closed => {
                tracing::info!(connection = %inner.name, "broker connection closed")
            }
            other => {
                tracing::warn!(connection = %inner.name, state = %other, "broker connection changed")
            }
        }
    }
}

/// Closes `connection` if it is still open, within [`CLOSE_TIMEOUT`].
/// Closes the current connection once, for good; a second caller waits for the first.
async fn close_for_good(inner: &Inner) {
    // No reconnect or rotation swaps a connection in while the current one is closed (they
    // check `stop` once they hold the lock, see `reconnect`).
    let _swap = inner.swap.lock().await;
    let connection = inner.generation.borrow().connection.clone();
    inner
        .closed
        .get_or_init(|| close_connection(&connection, "closing"))
        .await;
}

async fn close_connection(connection: &Connection, why: &str) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, why.into())).await;
    }
}

/// The link's life: watch the current connection until it is lost, then replace it.
async fn supervise(inner: Arc<Inner>, process_name: String) {
    loop {
        match watch_until_lost(&inner).await {
            Watched::Stopped => return,
            Watched::Replaced => continue,
            Watched::Lost(reason, old) => {
                set_state(&inner, LinkState::Down { reason });
                // Whatever is left of the lost connection goes (a reset one is still open).
                close_connection(&old, "replaced").await;
            }
        };
        if !reconnect(&inner, &process_name).await {
            return;
        }
    }
}

/// How watching one connection ended.
enum Watched {
    /// The link was closed.
    Stopped,
    /// The connection was lost, for this reason.
    Lost(String, Arc<Connection>),
    /// A rotation replaced it by a new generation.
    Replaced,
}

/// Follows the current connection until it is lost, replaced or the link stops.
async fn watch_until_lost(inner: &Inner) -> Watched {
    let (connection, number) = {
        let generation = inner.generation.borrow();
        (generation.connection.clone(), generation.number)
    };
    let mut events = Some(connection.events_listener());
    let mut blocked: Option<String> = connection
        .status()
        .blocked()
        .then(|| "blocked by the broker".to_owned());
    let mut last_error = String::from("connection lost");
    let mut poll = tokio::time::interval(POLL_INTERVAL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = async {
            match events.as_mut() {
                Some(stream) => stream.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = inner.stop.cancelled() => {
                close_for_good(inner).await;
                return Watched::Stopped;
            }
            () = inner.reset.notified() => {
                return Watched::Lost("replaced on request".into(), connection);
            }
            event = event => match event {
                Some(Event::ConnectionBlocked(reason)) => blocked = Some(reason),
                Some(Event::ConnectionUnblocked) => blocked = None,
                Some(Event::Error(e)) => last_error = e.to_string(),
                Some(_) => {}
                None => events = None,
            },
            _ = poll.tick() => {}
        }
        if inner.generation.borrow().number != number {
            return Watched::Replaced;
        }
        if !connection.status().connected() {
            return Watched::Lost(last_error, connection);
        }
        set_state(
            inner,
            match &blocked {
                Some(reason) => LinkState::Blocked {
                    reason: reason.clone(),
                },
                None => LinkState::Up,
            },
        );
    }
}

/// Connects again, to the next address each attempt, with backoff between attempts. `false`
/// when the link stopped or gave up.
async fn reconnect(inner: &Inner, process_name: &str) -> bool {
    let _swap = inner.swap.lock().await;
    if inner.stop.is_cancelled() {
        return false;
    }
    let mut delays = inner.settings.reconnect.delays();
    let mut attempts = 0usize;
    loop {
        let index = (inner.at.load(Ordering::SeqCst) as usize + 1) % inner.addresses.len();
        inner.at.store(index as u64, Ordering::SeqCst);
        let address = &inner.addresses[index];
        let connected = tokio::select! {
            () = inner.stop.cancelled() => return false,
            connected = broker::connect(&inner.settings, address, process_name, inner.purpose, &inner.details) => connected,
        };
        attempts += 1;
        match connected {
            Ok(connection) => {
                let number = inner.generation.borrow().number + 1;
                inner.generation.send_replace(Generation {
                    number,
                    connection: Arc::new(connection),
                    address: redact_url(address),
                });
                renew_lifetime(inner);
                tracing::info!(connection = %inner.name, address = %redact_url(address), generation = number, attempts, "reconnected");
                set_state(inner, LinkState::Up);
                return true;
            }
            Err(e) => {
                if attempts == 1 {
                    tracing::warn!(connection = %inner.name, error = %e, "cannot reconnect yet; retrying with backoff");
                } else {
                    tracing::debug!(connection = %inner.name, error = %e, attempts, "reconnect failed");
                }
                let limit = inner.settings.reconnect.max_attempts;
                let delay = delays.next().unwrap_or(inner.settings.reconnect.max_delay);
                if limit.is_some_and(|max| attempts >= max) {
                    let reason = format!("gave up after {attempts} attempts: {e}");
                    tracing::error!(connection = %inner.name, %reason, "not reconnecting any more");
                    *lock(&inner.gave_up) = Some(reason);
                    set_state(inner, LinkState::Closed);
                    return false;
                }
                tokio::select! {
                    () = inner.stop.cancelled() => return false,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
