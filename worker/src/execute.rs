//! Judging one delivery: decode it, check it, run its handler in isolation, and decide the
//! [`Outcome`]. Nothing here talks to the broker; `outcome.rs` acts on the verdict.
//!
//! | what happened | outcome |
//! |---|---|
//! | bad input: protocol version, size, body, `reply_to`, unknown function, arguments | dead letter (`rejected`) + error reply |
//! | deadline passed before the start | `expired` reply |
//! | handler succeeded | result reply |
//! | retryable failure, panic or time limit, attempts left | retry copy after the backoff delay |
//! | the same with no attempts (or no time before the deadline) left | dead letter (`attempts_exhausted`) + error reply |
//! | permanent failure | dead letter (`permanent_failure`) + error reply |
//! | worker forced to stop mid-task | handed back to the queue |

use std::sync::Arc;
use std::time::SystemTime;

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_shared::protocol::{self, headers};
use warren_shared::{ErrorKind, Policy, Reply, Request, TaskFailure};

use crate::handler::{Retry, StateMap, TaskContext};
use crate::outcome::{DeadReason, Envelope, Outcome};
use crate::registry::{HandlerFailure, Registry};

/// How long a handler past its time limit has, after its cancellation fires, before the
/// worker drops it.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What the executor needs besides the delivery.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    pub(crate) registry: Registry,
    pub(crate) state: Arc<StateMap>,
    /// Policy of functions registered without one of their own.
    pub(crate) policy: Policy,
    pub(crate) max_body_bytes: usize,
    /// Cancelled when the worker gives up on running tasks (forced shutdown).
    pub(crate) abort: CancellationToken,
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMap")
    }
}

fn rejected(kind: ErrorKind, message: impl Into<String>) -> Outcome {
    Outcome::DeadLetter {
        reason: DeadReason::Rejected,
        failure: TaskFailure::new(kind, message),
    }
}

/// Checks what must hold before a body is even parsed.
fn check_envelope(delivery: &Delivery, max_body_bytes: usize) -> Result<(), Outcome> {
    let h = delivery.properties.headers().as_ref();
    if let Some(version) = protocol::header_int(h, headers::PROTOCOL)
        && version != protocol::PROTOCOL_VERSION
    {
        return Err(rejected(
            ErrorKind::UnsupportedVersion,
            format!(
                "protocol version {version} is not supported; this worker speaks {}",
                protocol::PROTOCOL_VERSION
            ),
        ));
    }
    if delivery.data.len() > max_body_bytes {
        return Err(rejected(
            ErrorKind::TooLarge,
            format!(
                "body is {} bytes; this worker accepts at most {max_body_bytes}",
                delivery.data.len()
            ),
        ));
    }
    if let Some(reply_to) = delivery.properties.reply_to().as_ref()
        && reply_to.as_str().chars().any(char::is_control)
    {
        return Err(rejected(
            ErrorKind::BadRequest,
            "reply_to contains control characters",
        ));
    }
    Ok(())
}

impl Executor {
    /// Judges `delivery`, inside a span that names the task.
    pub(crate) async fn execute(&self, delivery: &Delivery, envelope: &Envelope) -> Outcome {
        let h = delivery.properties.headers().as_ref();
        let attempt = protocol::header_int(h, headers::ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1);
        if let Err(outcome) = check_envelope(delivery, self.max_body_bytes) {
            return outcome;
        }
        let request = match Request::decode(&delivery.data) {
            Ok(r) => r,
            Err(failure) => {
                return Outcome::DeadLetter {
                    reason: DeadReason::Rejected,
                    failure,
                };
            }
        };
        // OpenTelemetry messaging conventions: a `process {queue}` span, child of the caller's
        // `send` span when the task carries a `traceparent`; the ids go into every log line.
        let trace = warren_shared::trace::read(h).map(|parent| (parent.child(), parent.span_id));
        let span = tracing::info_span!(
            "task",
            task.id = %envelope.id,
            task.function = %request.function,
            attempt,
            otel.name = %format!("process {}", delivery.routing_key),
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            trace_id = trace.as_ref().map(|(t, _)| t.trace_id.as_str()),
            span_id = trace.as_ref().map(|(t, _)| t.span_id.as_str()),
            parent_span_id = trace.as_ref().map(|(_, parent)| parent.as_str()),
        );
        self.run(delivery, envelope, request, attempt)
            .instrument(span)
            .await
    }

    async fn run(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        request: Request,
        attempt: u32,
    ) -> Outcome {
        let h = delivery.properties.headers().as_ref();
        let deadline = protocol::header_int(h, headers::DEADLINE).map(protocol::from_epoch_millis);
        if let Some(deadline) = deadline
            && deadline <= SystemTime::now()
        {
            tracing::info!("deadline passed before the task started; not running it");
            return Outcome::Reply(Reply::Err(TaskFailure::new(
                ErrorKind::Expired,
                "the task's deadline passed before a worker could start it",
            )));
        }
        let Some(entry) = self.registry.get(&request.function) else {
            return rejected(
                ErrorKind::UnknownFunction,
                format!(
                    "no handler for {:?} on this worker (it serves {})",
                    request.function,
                    self.registry.functions().join(", ")
                ),
            );
        };
        let policy = entry
            .policy
            .as_ref()
            .unwrap_or(&self.policy)
            .overridden_by(h);
        let cancel = self.abort.child_token();
        let ctx = TaskContext {
            id: envelope.id.clone(),
            function: request.function.as_str().into(),
            attempt,
            max_attempts: policy.max_attempts,
            redelivered: delivery.redelivered,
            deadline,
            cancel: cancel.clone(),
            state: self.state.clone(),
        };
        let started = std::time::Instant::now();
        // Its own tokio task: a panic stays there and comes back as a JoinError.
        let mut run = tokio::spawn((entry.run)(request.args, ctx).in_current_span());
        let failed = tokio::select! {
            joined = &mut run => match joined {
                Ok(Ok(value)) => {
                    tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "task done");
                    return Outcome::Reply(Reply::Ok(value));
                }
                Ok(Err(HandlerFailure::InvalidArgs(m))) => {
                    return rejected(ErrorKind::InvalidArgs, m);
                }
                Ok(Err(HandlerFailure::Task(e))) => (e.to_failure(), e.retry()),
                Err(e) if e.is_panic() => (
                    TaskFailure::new(ErrorKind::Panicked, format!("handler panicked: {}", panic_message(e.into_panic()))),
                    Retry::Retryable,
                ),
                Err(e) => (TaskFailure::new(ErrorKind::HandlerFailed, format!("handler was cancelled: {e}")), Retry::Retryable),
            },
            () = self.abort.cancelled() => {
                run.abort();
                tracing::info!("worker stopping; handing the unfinished task back");
                return Outcome::HandBack;
            }
            () = tokio::time::sleep(policy.time_limit) => {
                // Tell a cooperative handler, give it a moment to stop, then drop it.
                cancel.cancel();
                let _ = tokio::time::timeout(CANCEL_GRACE, &mut run).await;
                run.abort();
                (
                    TaskFailure::new(ErrorKind::Timeout, format!("handler ran past its time limit of {:?}", policy.time_limit)),
                    Retry::Retryable,
                )
            }
        };
        let (failure, retry) = failed;
        let outcome = after_failure(&policy, attempt, deadline, failure, retry);
        match &outcome {
            Outcome::Retry { delay, failure } => {
                tracing::warn!(kind = %failure.kind, error = %failure.message, retry_in = ?delay, "attempt failed; retrying");
            }
            Outcome::DeadLetter { reason, failure } => {
                tracing::warn!(kind = %failure.kind, error = %failure.message, reason = reason.as_str(), "task failed for good");
            }
            _ => {}
        }
        outcome
    }
}

/// Retry, or give up: the retry decision in one pure function.
pub(crate) fn after_failure(
    policy: &Policy,
    attempt: u32,
    deadline: Option<SystemTime>,
    failure: TaskFailure,
    retry: Retry,
) -> Outcome {
    if retry == Retry::Permanent {
        return Outcome::DeadLetter {
            reason: DeadReason::PermanentFailure,
            failure,
        };
    }
    if attempt >= policy.max_attempts {
        return Outcome::DeadLetter {
            reason: DeadReason::AttemptsExhausted,
            failure,
        };
    }
    let delay = policy.delay_after(attempt);
    if let Some(deadline) = deadline
        && SystemTime::now() + delay >= deadline
    {
        // The next attempt would start after the caller stopped waiting.
        return Outcome::DeadLetter {
            reason: DeadReason::AttemptsExhausted,
            failure,
        };
    }
    Outcome::Retry { delay, failure }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(non-string panic payload)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldTable;
    use proptest::strategy::Strategy;
    use std::time::Duration;

    fn failure() -> TaskFailure {
        TaskFailure::new(ErrorKind::HandlerFailed, "nope")
    }

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            backoff: vec![Duration::from_millis(100), Duration::from_millis(500)],
            ..Policy::default()
        }
    }

    #[test]
    fn retryable_failures_retry_on_schedule_until_the_budget_is_spent() {
        let p = policy();
        assert_eq!(
            after_failure(&p, 1, None, failure(), Retry::Retryable),
            Outcome::Retry {
                delay: Duration::from_millis(100),
                failure: failure()
            }
        );
        assert_eq!(
            after_failure(&p, 2, None, failure(), Retry::Retryable),
            Outcome::Retry {
                delay: Duration::from_millis(500),
                failure: failure()
            }
        );
        assert_eq!(
            after_failure(&p, 3, None, failure(), Retry::Retryable),
            Outcome::DeadLetter {
                reason: DeadReason::AttemptsExhausted,
                failure: failure()
            }
        );
    }

    #[test]
    fn permanent_failures_are_dead_lettered_at_once() {
        assert_eq!(
            after_failure(&policy(), 1, None, failure(), Retry::Permanent),
            Outcome::DeadLetter {
                reason: DeadReason::PermanentFailure,
                failure: failure()
            }
        );
    }

    fn executor() -> Executor {
        let registry = Registry::new()
            .register::<warren_shared::tasks::Echo>()
            .register::<warren_shared::tasks::Sleep>();
        Executor {
            state: registry.state(),
            registry,
            policy: Policy {
                time_limit: Duration::from_millis(20),
                ..Policy::default()
            },
            max_body_bytes: 4096,
            abort: CancellationToken::new(),
        }
    }

    fn judge(data: Vec<u8>, h: Option<FieldTable>, reply_to: Option<&str>) -> Outcome {
        let mut delivery = Delivery::mock(1, "".into(), "q".into(), false, data);
        let mut properties = lapin::BasicProperties::default();
        if let Some(h) = h {
            properties = properties.with_headers(h);
        }
        if let Some(r) = reply_to {
            properties = properties.with_reply_to(r.into());
        }
        delivery.properties = properties;
        let envelope = Envelope::of(&delivery);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(executor().execute(&delivery, &envelope))
    }

    /// The seed corpus of hostile bodies (kept in `worker/tests/decode-corpus`): each is judged
    /// without a panic, and none is handed back to loop in the queue.
    #[test]
    fn the_decode_corpus_is_judged_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/decode-corpus");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let outcome = judge(
                std::fs::read(&path).unwrap(),
                None,
                Some("amq.rabbitmq.reply-to.x"),
            );
            assert!(
                !matches!(outcome, Outcome::HandBack),
                "{}: {outcome:?}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 10);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        #[test]
        fn arbitrary_deliveries_get_a_verdict(
            body in proptest::prop_oneof![
                proptest::collection::vec(proptest::num::u8::ANY, 0..300),
                ("[a-z_]{0,8}", ".{0,30}").prop_map(|(f, a)| {
                    serde_json::to_vec(&serde_json::json!({"function": f, "args": a})).unwrap()
                }),
                proptest::num::u64::ANY.prop_map(|ms| format!(r#"{{"function":"sleep","args":{{"ms":{ms}}}}}"#).into_bytes()),
            ],
            version in proptest::option::of(proptest::num::i64::ANY),
            attempt in proptest::option::of(proptest::num::i64::ANY),
            deadline in proptest::option::of(proptest::num::i64::ANY),
            backoff in proptest::option::of(".{0,20}"),
            reply_to in proptest::option::of(".{0,40}"),
        ) {
            let mut h = FieldTable::default();
            if let Some(v) = version { protocol::set_header_int(&mut h, headers::PROTOCOL, v); }
            if let Some(a) = attempt { protocol::set_header_int(&mut h, headers::ATTEMPT, a); }
            if let Some(d) = deadline { protocol::set_header_int(&mut h, headers::DEADLINE, d); }
            if let Some(b) = &backoff { protocol::set_header_str(&mut h, headers::BACKOFF, b); }
            let outcome = judge(body, Some(h), reply_to.as_deref());
            proptest::prop_assert!(!matches!(outcome, Outcome::HandBack));
        }
    }

    #[test]
    fn no_retry_past_the_deadline() {
        let soon = SystemTime::now() + Duration::from_millis(50);
        assert_eq!(
            after_failure(&policy(), 1, Some(soon), failure(), Retry::Retryable),
            Outcome::DeadLetter {
                reason: DeadReason::AttemptsExhausted,
                failure: failure()
            }
        );
        let later = SystemTime::now() + Duration::from_secs(60);
        assert!(matches!(
            after_failure(&policy(), 1, Some(later), failure(), Retry::Retryable),
            Outcome::Retry { .. }
        ));
    }
}
