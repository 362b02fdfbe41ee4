//! What a worker is doing, for logs and health checks, and the counters its parts share.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use warren_shared::link::Link;

/// What a worker is doing, for logs and health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Receiving deliveries.
    Consuming,
    /// Rebuilding its connection, channel or consumer.
    Recovering,
    /// Draining in-flight tasks after a stop request.
    Stopping,
    /// Stopped.
    Stopped,
}

/// A snapshot of a worker's health: cheap to take, meant for a health endpoint.
#[derive(Debug, Clone)]
pub struct Health {
    /// What it is doing.
    pub state: WorkerState,
    /// Since when.
    pub since: Instant,
    /// Tasks running now.
    pub in_flight: usize,
    /// Times the consumer was rebuilt.
    pub recoveries: usize,
    /// Why it last had to recover.
    pub last_problem: Option<String>,
    /// Whether the consuming connection is up now.
    pub consume_up: bool,
    /// Whether the publishing connection (replies, retries, dead letters) is up now.
    pub publish_up: bool,
}

impl Health {
    pub(crate) fn new(state: WorkerState) -> Self {
        Self {
            state,
            since: Instant::now(),
            in_flight: 0,
            recoveries: 0,
            last_problem: None,
            consume_up: true,
            publish_up: true,
        }
    }

    /// Whether it can take work: consuming (not recovering, not starving per the watchdog,
    /// which rebuilds a starving consumer) with both connections up. What `/readyz` answers.
    pub fn is_ready(&self) -> bool {
        self.is_healthy() && self.consume_up && self.publish_up
    }

    /// Whether its supervisor still runs (anything but stopped). What `/healthz` answers.
    pub fn is_alive(&self) -> bool {
        self.state != WorkerState::Stopped
    }

    /// Whether it is doing its job (consuming, or running tasks while stopping).
    pub fn is_healthy(&self) -> bool {
        matches!(self.state, WorkerState::Consuming)
    }
}

/// Reads a running worker's [`Health`]; cheap to clone, usable after the worker has stopped.
#[derive(Debug, Clone)]
pub struct HealthProbe {
    health: watch::Receiver<Health>,
    shared: Arc<Shared>,
}

impl HealthProbe {
    pub(crate) fn new(health: watch::Receiver<Health>, shared: Arc<Shared>) -> Self {
        Self { health, shared }
    }

    /// The health now.
    pub fn health(&self) -> Health {
        let mut health = self.health.borrow().clone();
        health.in_flight = self.shared.in_flight.load(Ordering::SeqCst);
        let links = self
            .shared
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((consume, publish)) = links.as_ref() {
            health.consume_up = consume.state().is_up();
            health.publish_up = publish.state().is_connected();
        }
        health
    }
}

/// Moves `health` to `state`, counting recoveries and keeping the last problem.
pub(crate) fn set_state(
    health: &watch::Sender<Health>,
    state: WorkerState,
    problem: Option<String>,
) {
    health.send_modify(|h| {
        if h.state != state {
            h.state = state;
            h.since = Instant::now();
        }
        if state == WorkerState::Recovering {
            h.recoveries += 1;
        }
        if problem.is_some() {
            h.last_problem = problem;
        }
    });
}

/// State shared by the supervisor, the watchdog and the task runners.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The worker's links (consume, publish), for health checks.
    links: std::sync::Mutex<Option<(Link, Link)>>,
    pub(crate) in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last delivery.
    last_delivery_ms: AtomicU64,
    epoch: Instant,
    /// Test hook: the consumer takes no deliveries while staying connected (a zombie).
    pub(crate) stalled: watch::Sender<bool>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            links: std::sync::Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            last_delivery_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            stalled: watch::Sender::new(false),
        }
    }
}

impl Shared {
    /// Follows the worker's links (each keeps itself connected, so once is enough).
    pub(crate) fn track(&self, consume: &Link, publish: &Link) {
        *self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((consume.clone(), publish.clone()));
    }

    pub(crate) fn delivered(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_delivery_ms.store(ms, Ordering::SeqCst);
    }

    pub(crate) fn since_last_delivery(&self) -> Duration {
        let last = Duration::from_millis(self.last_delivery_ms.load(Ordering::SeqCst));
        self.epoch.elapsed().saturating_sub(last)
    }
}
