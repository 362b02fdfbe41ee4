//! What a client is made with ([`ClientSettings`], [`ReplyMode`]) and what one call may
//! override ([`CallOptions`]).

use std::time::{Duration, SystemTime};

use warren_shared::broker::{self, BrokerSettings};
use warren_shared::{delay, events, topology};

/// How a client connects and behaves by default.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Where the broker is (one address or several). The client reconnects for as long as it
    /// lives: `broker.reconnect.max_attempts` is for workers and is not used here.
    pub broker: BrokerSettings,
    /// Where tasks go when a call names no queue. `None` (the default): by function name,
    /// through [`ClientSettings::functions_exchange`], to the queue whose workers serve the
    /// function; a function nobody serves fails at once with an `unknown_function`
    /// [`Error::Failed`](crate::Error::Failed). `Some(queue)`: to that queue whatever its
    /// workers serve (protocol v1's routing, routing key = queue name).
    pub queue: Option<String>,
    /// The exchange that routes tasks by function name (the workers' `functions_exchange`).
    pub functions_exchange: String,
    /// How long `call` waits for a reply unless told otherwise.
    pub call_timeout: Duration,
    /// Bound on one publish, broker confirm included.
    pub publish_timeout: Duration,
    /// Pooled channels on the publishing connection.
    pub channels: usize,
    /// How long a call or enqueue waits for a lost (or blocked) broker connection to come back
    /// before failing with [`Error::Unavailable`]. A call also never waits past its timeout.
    pub reconnect_wait: Duration,
    /// Publishes awaiting the broker's confirm at once; more wait their turn, so a caller that
    /// publishes faster than the broker accepts is slowed down instead of buffered without end.
    pub max_in_flight_publishes: usize,
    /// How this process appears in the management UI.
    pub name: String,
    /// Where replies to calls go.
    pub replies: ReplyMode,
    /// Whether the client declares the exchange and the work and dead-letter queues before it
    /// first sends to a queue (idempotent). Turn it off to run as a broker user without
    /// `configure` permission, once a worker (or an operator) has declared them; a task sent to
    /// a queue that does not exist then fails as unroutable. With it on, a user who lacks the
    /// permission gets [`warren_shared::BrokerError::AccessRefused`] naming it.
    pub declare: bool,
    /// The task event stream results are looked up in ([`warren_shared::events::DEFAULT_STREAM`]).
    pub events_stream: String,
    /// How long that stream keeps events ([`warren_shared::events::DEFAULT_MAX_AGE`]): what a
    /// task that is not found is told about retention.
    pub events_max_age: Duration,
}

/// Where the replies to a client's calls go, and what a dropped connection does to calls in
/// flight.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// RabbitMQ's direct reply-to: no queue at all, the fastest. Replies are addressed to the
    /// connection, so when it drops, every call waiting for a reply fails at once with
    /// [`Error::ConnectionLost`] (the task itself may still run).
    #[default]
    Direct,
    /// A durable queue of this client's own, `warren.reply.<uuid>`, that outlives a dropped
    /// connection or a broker restart: calls in flight get their replies after the client
    /// reconnects. The broker deletes the queue once it has had no consumer for `expires`.
    Queue {
        /// How long the queue outlives its client.
        expires: Duration,
    },
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            broker: BrokerSettings::default(),
            queue: None,
            functions_exchange: topology::FUNCTIONS_EXCHANGE.to_owned(),
            call_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            channels: 4,
            reconnect_wait: Duration::from_secs(30),
            max_in_flight_publishes: 1024,
            replies: ReplyMode::Direct,
            name: broker::process_name("warren-client"),
            declare: true,
            events_stream: events::DEFAULT_STREAM.to_owned(),
            events_max_age: events::DEFAULT_MAX_AGE,
        }
    }
}

/// Per-call options; unset fields take the client's defaults.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The queue to send to, whatever function its workers serve; unset: the client's
    /// [`ClientSettings::queue`], or routing by function when that is unset too.
    pub queue: Option<String>,
    /// For `call`: how long to wait for the reply. For both `call` and `enqueue`: the task's
    /// deadline is now + this, and a worker that gets it later answers `expired` instead of
    /// running it. `enqueue` sets no deadline unless this is set. For a task that runs later
    /// ([`CallOptions::run_at`]) both count from its run-at time, not from now.
    pub timeout: Option<Duration>,
    /// When the task is due: it waits in the broker's delay levels (never in a worker) and
    /// runs no earlier than this, within about a second after (whole seconds, rounded up).
    /// Unset, or a time already past: it runs as soon as a worker is free. The caller's clock
    /// decides: the delay is measured when the task is sent.
    pub run_at: Option<SystemTime>,
    /// Attempts the task gets in all (overrides the worker's policy for this task).
    pub max_attempts: Option<u32>,
    /// Delays between attempts (overrides the worker's policy for this task).
    pub backoff: Option<Vec<Duration>>,
    /// Execution time limit of one attempt (overrides the worker's policy for this task).
    pub time_limit: Option<Duration>,
    /// The caller's trace context: the task carries a `traceparent` naming a `send` span that
    /// is its child, so the worker's `process` span joins the same trace (and keeps it across
    /// retries).
    pub trace: Option<warren_shared::trace::TraceContext>,
    /// Who enqueues the task (`x-warren-origin`, at most
    /// [`MAX_LABEL_BYTES`](warren_shared::envelope::MAX_LABEL_BYTES)): copied into every
    /// event of the task, so that the caller can find its own tasks in the event stream (the
    /// gateway sets its websocket session's id).
    pub origin: Option<String>,
}

impl CallOptions {
    /// Continues the trace `context` on the worker (see [`CallOptions::trace`]).
    #[must_use]
    pub fn trace(mut self, context: warren_shared::trace::TraceContext) -> Self {
        self.trace = Some(context);
        self
    }

    /// Gives the task `attempts` attempts in all.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Waits `backoff[n-1]` before attempt n+1 (the last delay repeats).
    #[must_use]
    pub fn backoff(mut self, backoff: Vec<Duration>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Lets one attempt run at most `limit`.
    #[must_use]
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    /// Sends to `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Runs the task no earlier than `at` (see [`CallOptions::run_at`]); at most
    /// [`warren_shared::delay::MAX_DELAY`] ahead.
    #[must_use]
    pub fn run_at(mut self, at: SystemTime) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Runs the task `delay` from now: [`CallOptions::run_at`] now + `delay`. A delay past
    /// what the clock can represent becomes one just past [`delay::MAX_DELAY`], which sending
    /// refuses ([`crate::Error::InvalidDelay`]), like any delay past the longest.
    #[must_use]
    pub fn delay(mut self, delay: Duration) -> Self {
        let now = SystemTime::now();
        self.run_at = Some(
            now.checked_add(delay)
                .unwrap_or_else(|| now + delay::MAX_DELAY + Duration::from_secs(1)),
        );
        self
    }

    /// The time from now until the task is due (zero when it is due now or unset).
    pub(crate) fn delay_from_now(&self) -> Duration {
        self.run_at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
    }

    /// Marks the task as enqueued by `origin` (see [`CallOptions::origin`]).
    #[must_use]
    pub fn origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = Some(origin.into());
        self
    }

    /// Waits at most `timeout` (and sets the deadline accordingly).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A queue's depth and consumers, from a passive declare (exact, unlike the management API's
/// sampled numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages ready for delivery (not counting those delivered and not yet acked).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_past_the_clock_is_refused_not_a_panic() {
        let options = CallOptions::default().delay(Duration::MAX);
        assert!(options.delay_from_now() > delay::MAX_DELAY);
        assert!(delay::delay_seconds(options.delay_from_now()).is_err());
    }
}
