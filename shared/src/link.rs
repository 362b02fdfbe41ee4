//! The state of one broker connection, as a value everyone can watch.
//!
//! lapin reports what happens to a connection as a stream of events (connected, error,
//! blocked, unblocked). A [`Link`] turns that stream into a [`LinkState`] behind a
//! `tokio::sync::watch`, logs each change once (not each reconnect attempt), and lets
//! publishers wait, with a bound, until the connection can carry a publish again.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::{Connection, Event};
use tokio::sync::watch;

/// How often a [`Link`] reads its connection's status.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What a connection can do right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Connected; publishes and deliveries flow.
    Up,
    /// Lost; lapin is reconnecting. `reason` is the error that broke it.
    Down {
        /// The error that broke the connection.
        reason: String,
    },
    /// Connected, but the broker refuses to read publishes (a memory or disk alarm).
    Blocked {
        /// The broker's reason, e.g. `low on memory`.
        reason: String,
    },
    /// Closed for good: closed on purpose, or recovery gave up.
    Closed,
}

impl LinkState {
    /// Whether a publish can go out now.
    pub fn is_up(&self) -> bool {
        matches!(self, Self::Up)
    }
}

/// Watches one connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Link {
    state: watch::Receiver<LinkState>,
    connection: Arc<Connection>,
    changed_at: Arc<std::sync::Mutex<std::time::Instant>>,
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

impl Link {
    /// Starts watching `connection`; `name` labels the log lines.
    ///
    /// lapin sends no event when it starts recovering a connection, so besides its events
    /// (blocked, unblocked) the watcher reads the connection's status every
    /// [`POLL_INTERVAL`]: a cheap local read, no traffic.
    pub fn watch(connection: Arc<Connection>, name: String) -> Self {
        let initial = if connection.status().connected() {
            LinkState::Up
        } else {
            LinkState::Closed
        };
        let (tx, rx) = watch::channel(initial);
        let mut events = connection.events_listener();
        // Weak: the watcher must not keep a connection alive that its owner dropped.
        let weak = Arc::downgrade(&connection);
        let changed_at = Arc::new(std::sync::Mutex::new(std::time::Instant::now()));
        let stamp = changed_at.clone();
        tokio::spawn(async move {
            let mut blocked: Option<String> = None;
            let mut last_error = String::from("connection lost");
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Event::ConnectionBlocked(reason)) => blocked = Some(reason),
                        Some(Event::ConnectionUnblocked) => blocked = None,
                        Some(Event::Error(e)) => last_error = e.to_string(),
                        Some(_) => {}
                        None => break,
                    },
                    _ = poll.tick() => {}
                }
                let Some(connection) = weak.upgrade() else {
                    break;
                };
                let status = connection.status();
                let (connected, recovering) = (
                    status.connected(),
                    status.reconnecting() || status.connecting(),
                );
                drop(connection);
                let next = if connected {
                    match &blocked {
                        Some(reason) => LinkState::Blocked {
                            reason: reason.clone(),
                        },
                        None => LinkState::Up,
                    }
                } else if recovering {
                    // A blocked connection that is lost is unblocked by its replacement.
                    blocked = None;
                    LinkState::Down {
                        reason: last_error.clone(),
                    }
                } else {
                    LinkState::Closed
                };
                let changed = tx.send_if_modified(|state| {
                    let differs = std::mem::discriminant(state) != std::mem::discriminant(&next);
                    *state = next.clone();
                    differs
                });
                if changed {
                    *stamp
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        std::time::Instant::now();
                    match &next {
                        LinkState::Up => tracing::info!(connection = %name, "broker connection up"),
                        other => {
                            tracing::warn!(connection = %name, state = %other, "broker connection changed")
                        }
                    }
                }
                if next == LinkState::Closed {
                    break;
                }
            }
            // The connection is gone (dropped or closed for good).
            tx.send_replace(LinkState::Closed);
        });
        Self {
            state: rx,
            connection,
            changed_at,
        }
    }

    /// How long the connection has not been up, or `None` while it is.
    pub fn down_for(&self) -> Option<Duration> {
        if self.state().is_up() {
            return None;
        }
        let since = *self
            .changed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(since.elapsed())
    }

    /// The state now.
    pub fn state(&self) -> LinkState {
        let state = self.state.borrow().clone();
        // Closing on purpose sends no event; the connection's own status knows.
        if state == LinkState::Up && !self.connection.status().connected() {
            let status = self.connection.status();
            if status.closed() || status.errored() {
                return LinkState::Closed;
            }
        }
        state
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.state.clone()
    }

    /// The connection watched.
    pub fn connection(&self) -> &Arc<Connection> {
        &self.connection
    }

    /// Waits until the connection is up, at most `bound`.
    ///
    /// # Errors
    /// [`Unavailable`] when it is still down, blocked or closed after `bound`.
    pub async fn wait_up(&self, bound: Duration) -> Result<(), Unavailable> {
        let mut rx = self.state.clone();
        let settled = |s: &LinkState| s.is_up() || *s == LinkState::Closed;
        let waited = tokio::time::timeout(bound, rx.wait_for(settled)).await;
        match waited {
            Ok(Ok(_)) if self.state().is_up() => Ok(()),
            _ => Err(Unavailable {
                waited: bound,
                state: self.state().to_string(),
            }),
        }
    }
}
