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
    pub fn watch(connection: Arc<Connection>, name: String) -> Self {
        let initial = if connection.status().connected() {
            LinkState::Up
        } else {
            LinkState::Closed
        };
        let (tx, rx) = watch::channel(initial);
        let mut events = connection.events_listener();
        // Weak: the watcher must not keep a connection alive that its owner dropped.
        let status_of = Arc::downgrade(&connection);
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let next = match event {
                    Event::Connected => LinkState::Up,
                    Event::ConnectionUnblocked => LinkState::Up,
                    Event::ConnectionBlocked(reason) => LinkState::Blocked { reason },
                    Event::Error(e) => {
                        let Some(connection) = status_of.upgrade() else {
                            break;
                        };
                        let status = connection.status();
                        if status.reconnecting() || status.connecting() {
                            LinkState::Down {
                                reason: e.to_string(),
                            }
                        } else if status.connected() {
                            // A channel-level error reported on the connection: still up.
                            continue;
                        } else {
                            LinkState::Closed
                        }
                    }
                    _ => continue,
                };
                let changed = tx.send_if_modified(|state| {
                    let differs = std::mem::discriminant(state) != std::mem::discriminant(&next);
                    *state = next.clone();
                    differs
                });
                if changed {
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
        }
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
