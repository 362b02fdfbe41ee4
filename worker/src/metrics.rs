//! The worker's Prometheus series: every name, label and recording call in one place, so that
//! the call sites elsewhere stay one line each. `docs/operations.md` describes each series.
//!
//! Recording goes through the `metrics` facade. Until [`install`] has run (the binary's
//! `--metrics` flag) there is no recorder: every call is a no-op, and the function name is
//! not even read from the body.
//!
//! Label cardinality is bounded: no task ids; `function` is one of the functions registered on
//! this worker or `other` (a caller can put any string in a task).

use std::collections::HashSet;
use std::sync::{OnceLock, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lapin::message::Delivery;
use warren_shared::ErrorKind;
use warren_shared::metrics::{BuildError, PrometheusHandle};
use warren_shared::protocol::Reply;

use crate::consumer::Health;
use crate::outcome::{Outcome, Settled};

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

/// The `function` label of a delivery: its function if registered here, else `other`. Read
/// from the AMQP `type` property, which Warren's client sets to the function, without parsing
/// the body; from the body when a foreign client did not set it.
fn function_label(delivery: &Delivery) -> String {
    if let Some(kind) = delivery.properties.kind()
        && registered(kind.as_str())
    {
        return kind.as_str().to_owned();
    }
    function_in_body(&delivery.data)
}

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
    describe_gauge!(CONNECTION_UP, "1 while the connection is up.");
}

/// One task being measured, from delivery to settlement.
#[derive(Debug)]
pub(crate) struct TaskMetrics {
    labels: Option<(String, String)>,
    started: Instant,
}

impl TaskMetrics {
    /// A delivery arrived for `queue`: records its queue latency and whether it is redelivered.
    pub(crate) fn started(queue: &str, delivery: &Delivery) -> Self {
        let started = Instant::now();
        if !enabled() {
            return Self {
                labels: None,
                started,
            };
        }
        let function = function_label(delivery);
        if delivery.redelivered {
            metrics::counter!(REDELIVERIES, "queue" => queue.to_owned()).increment(1);
        }
        // The AMQP timestamp has whole seconds: the latency is over-estimated by under 1 s.
        if let Some(sent) = *delivery.properties.timestamp()
            && let Ok(now) = SystemTime::now().duration_since(UNIX_EPOCH)
        {
            #[allow(clippy::cast_precision_loss)] // seconds since 1970 fit an f64 exactly
            let latency = (now.as_secs_f64() - sent as f64).max(0.0);
            metrics::histogram!(QUEUE_LATENCY_SECONDS, "queue" => queue.to_owned(), "function" => function.clone())
                .record(latency);
        }
        Self {
            labels: Some((queue.to_owned(), function)),
            started,
        }
    }

    /// The task has its verdict: records its run time.
    pub(crate) fn judged(self) -> Self {
        if let Some((queue, function)) = &self.labels {
            metrics::histogram!(TASK_SECONDS, "queue" => queue.clone(), "function" => function.clone())
                .record(self.started.elapsed().as_secs_f64());
        }
        self
    }

    /// The delivery is settled: counts the task under what actually happened to it.
    pub(crate) fn settled(self, outcome: &Outcome, settled: &Settled) {
        let Some((queue, function)) = self.labels else {
            return;
        };
        let (outcome, reason) = match (outcome, settled) {
            (_, Settled::Requeued) | (Outcome::HandBack, _) => ("handed_back", None),
            (Outcome::Reply(Reply::Ok(_)), _) => ("ok", None),
            (Outcome::Reply(Reply::Err(f)), _) if f.kind == ErrorKind::Expired => ("expired", None),
            (Outcome::Reply(Reply::Err(_)), _) => ("failed", None),
            (Outcome::Retry { .. }, _) => ("retried", None),
            (Outcome::DeadLetter { reason, .. }, _) => ("dead_lettered", Some(reason.as_str())),
        };
        match reason {
            Some(reason) => metrics::counter!(TASKS, "queue" => queue, "function" => function, "outcome" => outcome, "reason" => reason).increment(1),
            None => metrics::counter!(TASKS, "queue" => queue, "function" => function, "outcome" => outcome).increment(1),
        }
    }
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
    metrics::gauge!(READY, "queue" => queue).set(if health.is_ready() { 1.0 } else { 0.0 });
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
