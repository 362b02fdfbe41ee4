//! The worker's Prometheus series: every name, label and recording call in one place, so that
//! the call sites elsewhere stay one line each. `docs/operations.md` describes each series.
//!
//! Recording goes through the `metrics` facade. Until [`install`] has run (the binary's
//! `--metrics` flag) there is no recorder: every call is a no-op, and the function name is
//! not even read from the body.
//!
//! Label cardinality is bounded: no task ids; `function` is one of the functions registered on
//! this worker or `other` (a caller can put any string in a task).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use warren_shared::ErrorKind;
use warren_shared::envelope;
use warren_shared::metrics::{BuildError, PrometheusHandle};
use warren_shared::protocol::{Reply, headers};

use crate::health::Health;
use crate::outcome::{DeadReason, Outcome, Settled};

/// Counter: tasks finished, by `queue`, `function`, `outcome` (and `reason` when dead-lettered).
pub const TASKS: &str = "warren_worker_tasks_total";
/// Histogram: handler run time (decode to verdict), by `queue` and `function`, in seconds.
pub const TASK_SECONDS: &str = "warren_worker_task_duration_seconds";
/// Histogram: enqueue (the message timestamp) to start, by `queue` and `function`, in seconds.
pub const QUEUE_LATENCY_SECONDS: &str = "warren_worker_queue_latency_seconds";
/// Counter: deliveries flagged as redelivered by the broker, by `queue`.
pub const REDELIVERIES: &str = "warren_worker_redeliveries_total";
/// Gauge: tasks running now, by `queue`.
pub const IN_FLIGHT: &str = "warren_worker_tasks_in_flight";
/// Gauge: free task slots (concurrency minus tasks running), by `queue`.
pub const SLOTS_FREE: &str = "warren_worker_slots_free";
/// Gauge: 1 while the worker consumes and its connections are up (as `/readyz`), by `queue`.
pub const READY: &str = "warren_worker_ready";
/// Counter: times the consumer was rebuilt by the supervisor, by `queue`.
pub const RECOVERIES: &str = "warren_worker_recoveries_total";
/// Counter: replies the broker refused (nacked) for finished tasks, acked without a reply, by
/// `queue`.
pub const REPLIES_REFUSED: &str = "warren_worker_replies_refused_total";
/// Gauge: 1 when the worker declared the delay levels at its last (re)start, 0 when the
/// broker refused them (tasks due later cannot be deferred), by `queue`.
pub const DELAYED_DELIVERY: &str = "warren_worker_delayed_delivery_available";
/// Counter: task events the worker could not append to the event stream (nacked, returned
/// because the stream is gone, not confirmed in time), by `queue`. A task whose `started` or
/// final event failed is handed back, not acked.
pub const EVENT_APPENDS_FAILED: &str = "warren_worker_event_appends_failed_total";
/// Gauge: 1 when the connection is up, by `connection` (`consume`, `publish`).
pub const CONNECTION_UP: &str = "warren_worker_connection_up";

static FUNCTIONS: OnceLock<RwLock<HashSet<String>>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder and describes the worker's series.
///
/// # Errors
/// [`BuildError`] when another recorder is already installed in this process.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = warren_shared::metrics::install()?;
    describe();
    Ok(handle)
}

fn enabled() -> bool {
    warren_shared::metrics::enabled()
}

/// Makes `functions` label values (any other function is counted as `other`).
pub(crate) fn register_functions(functions: &[&str]) {
    let set = FUNCTIONS.get_or_init(RwLock::default);
    let mut set = set
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    set.extend(functions.iter().map(|f| (*f).to_owned()));
}

fn registered(function: &str) -> bool {
    FUNCTIONS.get().is_some_and(|set| {
        set.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(function)
    })
}

/// The function named in the body, if registered here; else `other` (a foreign client that
/// did not set the AMQP `type` property to the function).
fn function_in_body(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        function: std::borrow::Cow<'a, str>,
    }
    let Ok(head) = serde_json::from_slice::<Head<'_>>(body) else {
        return "other".to_owned();
    };
    if registered(&head.function) {
        head.function.into_owned()
    } else {
        "other".to_owned()
    }
}

/// The `# HELP` lines.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        TASKS,
        "Tasks finished, by outcome (ok, failed, retried, dead_lettered with reason, expired, handed_back)."
    );
    describe_histogram!(
        TASK_SECONDS,
        Unit::Seconds,
        "Task run time, decode to verdict."
    );
    describe_histogram!(
        QUEUE_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from enqueue (message timestamp, whole seconds) to start."
    );
    describe_counter!(
        REDELIVERIES,
        "Deliveries the broker flagged as redelivered."
    );
    describe_gauge!(IN_FLIGHT, "Tasks running now.");
    describe_gauge!(
        SLOTS_FREE,
        "Free task slots: concurrency minus tasks running."
    );
    describe_gauge!(
        READY,
        "1 while consuming with both connections up (as /readyz)."
    );
    describe_counter!(RECOVERIES, "Times the supervisor rebuilt the consumer.");
    describe_counter!(
        REPLIES_REFUSED,
        "Replies the broker refused (nacked); their tasks were acked without a reply."
    );
    describe_counter!(
        EVENT_APPENDS_FAILED,
        "Task events that could not be appended to the event stream; their tasks were handed back."
    );
    describe_gauge!(CONNECTION_UP, "1 while the connection is up.");
    describe_gauge!(
        DELAYED_DELIVERY,
        "1 when the delay levels were declared; 0 when the broker refused them."
    );
}

/// The series of one (queue, function), looked up in the registry once and then shared: the
/// per-task cost is an atomic add, not a label lookup.
struct Handles {
    queue: String,
    function: String,
    latency: metrics::Histogram,
    duration: metrics::Histogram,
    redeliveries: metrics::Counter,
    outcomes: Mutex<Vec<(Verdict, metrics::Counter)>>,
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handles")
            .field("queue", &self.queue)
            .field("function", &self.function)
            .finish_non_exhaustive()
    }
}

/// `outcome` and, when dead-lettered, `reason`.
type Verdict = (&'static str, Option<&'static str>);

type HandleMap = HashMap<String, HashMap<String, Arc<Handles>>>;
static HANDLES: OnceLock<RwLock<HandleMap>> = OnceLock::new();

fn handles(queue: &str, function: &str) -> Arc<Handles> {
    let map = HANDLES.get_or_init(RwLock::default);
    if let Some(found) = map
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(queue)
        .and_then(|by_function| by_function.get(function))
    {
        return found.clone();
    }
    let mut map = map
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.entry(queue.to_owned())
        .or_default()
        .entry(function.to_owned())
        .or_insert_with(|| {
            let (q, f) = (queue.to_owned(), function.to_owned());
            Arc::new(Handles {
                latency: metrics::histogram!(QUEUE_LATENCY_SECONDS, "queue" => q.clone(), "function" => f.clone()),
                duration: metrics::histogram!(TASK_SECONDS, "queue" => q.clone(), "function" => f.clone()),
                redeliveries: metrics::counter!(REDELIVERIES, "queue" => q.clone()),
                outcomes: Mutex::default(),
                queue: q,
                function: f,
            })
        })
        .clone()
}

impl Handles {
    fn outcome(&self, verdict: Verdict) -> metrics::Counter {
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, counter)) = outcomes.iter().find(|(v, _)| *v == verdict) {
            return counter.clone();
        }
        let (queue, function) = (self.queue.clone(), self.function.clone());
        let counter = match verdict {
            (outcome, Some(reason)) => {
                metrics::counter!(TASKS, "queue" => queue, "function" => function, "outcome" => outcome, "reason" => reason)
            }
            (outcome, None) => {
                metrics::counter!(TASKS, "queue" => queue, "function" => function, "outcome" => outcome)
            }
        };
        outcomes.push((verdict, counter.clone()));
        counter
    }
}

/// One task being measured, from delivery to settlement.
#[derive(Debug)]
pub(crate) struct TaskMetrics {
    handles: Option<Arc<Handles>>,
    started: Instant,
}

/// Seconds from when a task became ready (its AMQP timestamp, or its `x-warren-run-at` when
/// later: a task due later is not late while it waits) to `now`; `None` without a timestamp.
/// The AMQP timestamp has whole seconds: the latency is over-estimated by under 1 s.
fn queue_latency(properties: &lapin::BasicProperties, now: SystemTime) -> Option<f64> {
    let sent = (*properties.timestamp())?;
    let now = now.duration_since(UNIX_EPOCH).ok()?;
    #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit an f64 exactly
    let sent = sent as f64;
    #[allow(clippy::cast_precision_loss)] // milliseconds since 1970 fit an f64 exactly
    let due = envelope::header_int(properties.headers().as_ref(), headers::RUN_AT)
        .map_or(sent, |ms| (ms as f64 / 1000.0).max(sent));
    Some((now.as_secs_f64() - due).max(0.0))
}

impl TaskMetrics {
    /// A delivery arrived for `queue`: records its queue latency and whether it is redelivered.
    pub(crate) fn started(queue: &str, delivery: &Delivery) -> Self {
        let started = Instant::now();
        if !enabled() {
            return Self {
                handles: None,
                started,
            };
        }
        let handles = match delivery.properties.kind() {
            Some(kind) if registered(kind.as_str()) => self::handles(queue, kind.as_str()),
            _ => self::handles(queue, &function_in_body(&delivery.data)),
        };
        if delivery.redelivered {
            handles.redeliveries.increment(1);
        }
        if let Some(latency) = queue_latency(&delivery.properties, SystemTime::now()) {
            handles.latency.record(latency);
        }
        Self {
            handles: Some(handles),
            started,
        }
    }

    /// The task has its verdict: records its run time.
    pub(crate) fn judged(self) -> Self {
        if let Some(handles) = &self.handles {
            handles
                .duration
                .record(self.started.elapsed().as_secs_f64());
        }
        self
    }

    /// The delivery is settled: counts the task under what actually happened to it.
    pub(crate) fn settled(self, outcome: &Outcome, settled: &Settled) {
        let Some(handles) = self.handles else {
            return;
        };
        let verdict = match (outcome, settled) {
            (_, Settled::Requeued) | (Outcome::HandBack, _) => ("handed_back", None),
            (_, Settled::Parked) => ("dead_lettered", Some(DeadReason::Refused.as_str())),
            (Outcome::Reply(Reply::Ok(_)), _) => ("ok", None),
            (Outcome::Reply(Reply::Err(f)), _) if f.kind == ErrorKind::Expired => ("expired", None),
            (Outcome::Reply(Reply::Err(_)), _) => ("failed", None),
            (Outcome::Retry { .. }, _) => ("retried", None),
            (Outcome::Later { .. }, _) => ("delayed", None),
            (Outcome::DeadLetter { reason, .. }, _) => ("dead_lettered", Some(reason.as_str())),
        };
        handles.outcome(verdict).increment(1);
    }
}

/// The broker refused (nacked) the reply of a finished task, which was acked without it.
pub(crate) fn reply_refused(queue: &str) {
    metrics::counter!(REPLIES_REFUSED, "queue" => queue.to_owned()).increment(1);
}

/// A task event could not be appended ([`EVENT_APPENDS_FAILED`]).
pub(crate) fn event_append_failed(queue: &str) {
    metrics::counter!(EVENT_APPENDS_FAILED, "queue" => queue.to_owned()).increment(1);
}

/// Whether the delay levels were declared ([`DELAYED_DELIVERY`]).
pub(crate) fn delayed_delivery(queue: &str, available: bool) {
    metrics::gauge!(DELAYED_DELIVERY, "queue" => queue.to_owned()).set(if available {
        1.0
    } else {
        0.0
    });
}

/// The consumer was rebuilt.
pub(crate) fn recovered(queue: &str) {
    metrics::counter!(RECOVERIES, "queue" => queue.to_owned()).increment(1);
}

/// Sets the gauges from a health snapshot; called on every scrape of `/metrics`.
pub(crate) fn refresh(queue: &str, concurrency: u16, health: &Health) {
    let queue = queue.to_owned();
    #[allow(clippy::cast_precision_loss)] // small counts
    let in_flight = health.in_flight as f64;
    metrics::gauge!(IN_FLIGHT, "queue" => queue.clone()).set(in_flight);
    metrics::gauge!(SLOTS_FREE, "queue" => queue.clone())
        .set((f64::from(concurrency) - in_flight).max(0.0));
    metrics::gauge!(READY, "queue" => queue.clone()).set(if health.is_ready() { 1.0 } else { 0.0 });
    // Shown from 0, so that `increase()` sees the first recovery (and the first failed append).
    metrics::counter!(RECOVERIES, "queue" => queue.clone()).increment(0);
    metrics::counter!(EVENT_APPENDS_FAILED, "queue" => queue).increment(0);
    for (connection, up) in [
        ("consume", health.consume_up),
        ("publish", health.publish_up),
    ] {
        metrics::gauge!(CONNECTION_UP, "connection" => connection).set(if up { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn queue_latency_counts_from_the_run_at_time_of_a_task_due_later() {
        let now = UNIX_EPOCH + Duration::from_secs(161);
        let sent = lapin::BasicProperties::default().with_timestamp(100);
        assert_eq!(queue_latency(&sent, now), Some(61.0));
        let mut h = lapin::types::FieldTable::default();
        envelope::set_header_int(&mut h, headers::RUN_AT, 160_000);
        assert_eq!(queue_latency(&sent.clone().with_headers(h), now), Some(1.0));
        // A run-at time before the timestamp changes nothing.
        let mut h = lapin::types::FieldTable::default();
        envelope::set_header_int(&mut h, headers::RUN_AT, 50_000);
        assert_eq!(queue_latency(&sent.with_headers(h), now), Some(61.0));
        assert_eq!(queue_latency(&lapin::BasicProperties::default(), now), None);
    }

    #[test]
    fn only_registered_functions_become_labels() {
        register_functions(&["echo"]);
        assert_eq!(
            function_in_body(br#"{"function":"echo","args":[1]}"#),
            "echo"
        );
        assert_eq!(
            function_in_body(br#"{"args":1,"function":"x\u0041"}"#),
            "other"
        );
        assert_eq!(function_in_body(b"not json"), "other");
    }
}
