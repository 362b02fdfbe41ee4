//! Judging one delivery: decode it, check it, run its handler in isolation, and decide the
//! [`Outcome`]. Nothing here talks to the broker; `outcome.rs` acts on the verdict.
//!
//! | what happened | outcome |
//! |---|---|
//! | bad input: protocol version, size, `reply_to` (unusable, or a queue not among the worker's `reply_queues`), attempt, deadline or run-at header, body, unknown function, arguments | dead letter (`rejected`) + error reply |
//! | deadline passed before the start | `expired` reply |
//! | handler succeeded | result reply |
//! | retryable failure, panic or time limit, attempts left | retry copy after the backoff delay |
//! | the same with no attempts (or no time before the deadline) left | dead letter (`attempts_exhausted`) + error reply |
//! | permanent failure | dead letter (`permanent_failure`) + error reply |
//! | worker forced to stop mid-task | handed back to the queue |
//! | `x-warren-run-at` a second or more ahead | through the delay levels back to the queue, unrun |

use std::sync::Arc;
use std::time::SystemTime;

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_shared::delay;
use warren_shared::envelope::{self, ReplyTo};
use warren_shared::protocol;
use warren_shared::trace::{Operation, SpanTask, TaskSpan};
use warren_shared::{ErrorKind, Policy, RawJson, Reply, Request, TaskFailure};

use crate::events::Trail;
use crate::handler::{Retry, TaskContext};
use crate::outcome::{DeadReason, Envelope, Outcome};
use crate::progress::{self, Reporter};
use crate::registry::{HandlerFailure, Registry};

/// How long a handler past its time limit has, after its cancellation fires, before the
/// worker drops it.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What the executor needs besides the delivery.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    /// The queue the worker consumes: the `process <queue>` span's name, whatever routing key
    /// (queue or function name) the task was sent with.
    pub(crate) queue: Arc<str>,
    pub(crate) registry: Registry,
    /// Policy of functions registered without one of their own.
    pub(crate) policy: Policy,
    pub(crate) max_body_bytes: usize,
    /// Larger results are not published: the task fails for good as `too_large`.
    pub(crate) max_result_bytes: usize,
    /// The queues replies may go to besides direct reply-to addresses
    /// ([`WorkerSettings::reply_queues`](crate::WorkerSettings::reply_queues)); a delivery's
    /// `reply_to` is [restricted](envelope::ReplyTo::restricted_to) to them before it is judged.
    pub(crate) reply_queues: Arc<[String]>,
    /// Cancelled when the worker gives up on running tasks (forced shutdown).
    pub(crate) abort: CancellationToken,
    /// Where handlers' progress goes (none: dropped).
    pub(crate) progress: Option<Arc<progress::Sink>>,
}

/// A task whose `x-warren-run-at` is at least this far ahead goes through the delay levels
/// rather than run: less would only add a second of delay (and tolerates that much clock skew
/// between hosts).
const NOT_DUE: std::time::Duration = std::time::Duration::from_secs(1);

fn rejected(kind: ErrorKind, message: impl Into<String>) -> Outcome {
    Outcome::DeadLetter {
        reason: DeadReason::Rejected,
        failure: TaskFailure::new(kind, message),
    }
}

/// Checks what must hold before a body is even parsed; gives the attempt number and the
/// deadline.
fn check_envelope(
    delivery: &Delivery,
    envelope: &Envelope,
    max_body_bytes: usize,
) -> Result<(u32, Option<SystemTime>), Outcome> {
    let version = match &envelope.protocol {
        Some(Ok(version)) if *version == protocol::PROTOCOL_VERSION => None,
        Some(Ok(version)) => Some(version.to_string()),
        Some(Err(value)) => Some(value.clone()),
        None => None,
    };
    if let Some(version) = version {
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
    if envelope.headers_bytes > envelope::MAX_HEADERS_BYTES {
        return Err(rejected(
            ErrorKind::TooLarge,
            format!(
                "headers are {} bytes; this worker accepts at most {}",
                envelope.headers_bytes,
                envelope::MAX_HEADERS_BYTES
            ),
        ));
    }
    if let ReplyTo::Invalid { address, reason } = &envelope.reply_to {
        return Err(rejected(
            ErrorKind::BadRequest,
            format!("reply_to {address:?} is unusable: {reason}"),
        ));
    }
    let attempt = envelope
        .attempt
        .clone()
        .map_err(|e| rejected(ErrorKind::BadRequest, e.to_string()))?;
    let deadline = envelope
        .deadline
        .clone()
        .map_err(|e| rejected(ErrorKind::BadRequest, e.to_string()))?;
    let run_at = envelope
        .run_at
        .clone()
        .map_err(|e| rejected(ErrorKind::BadRequest, e.to_string()))?;
    if let Some(ahead) = run_at.and_then(|at| at.duration_since(SystemTime::now()).ok())
        && ahead >= NOT_DUE
    {
        return Err(match delay::delay_seconds(ahead) {
            Ok(seconds) => Outcome::Later { seconds },
            Err(e) => rejected(ErrorKind::BadRequest, e.to_string()),
        });
    }
    Ok((attempt, deadline))
}

/// The span status of `outcome`: the failure of an attempt that did not succeed.
fn failure_of(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Reply(Reply::Err(failure))
        | Outcome::Retry { failure, .. }
        | Outcome::DeadLetter { failure, .. } => {
            Some(format!("{}: {}", failure.kind.as_str(), failure.message))
        }
        Outcome::Reply(Reply::Ok(_)) | Outcome::HandBack | Outcome::Later { .. } => None,
    }
}

/// A function name as quoted in messages and logs: at most 200 bytes of it.
fn quoted(function: &str) -> String {
    format!("{:?}", envelope::bounded(function, 200))
}

impl Executor {
    /// Judges `delivery`, inside a span that names the task; tells `trail` what the task is
    /// and when its handler begins.
    pub(crate) async fn execute(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        trail: &mut Trail,
    ) -> Outcome {
        let (attempt, deadline) = match check_envelope(delivery, envelope, self.max_body_bytes) {
            Ok(checked) => checked,
            Err(outcome) => return outcome,
        };
        // The arguments stay JSON text: a typed handler reads them into its own type, a pool
        // passes them on.
        let request = match Request::decode_raw(&delivery.data) {
            Ok(r) => r,
            Err(failure) => {
                return Outcome::DeadLetter {
                    reason: DeadReason::Rejected,
                    failure,
                };
            }
        };
        trail.identify(&request.function, attempt);
        // OpenTelemetry messaging conventions: a `process {queue}` span, child of the caller's
        // `send` span when the task carries a `traceparent` (a new trace when it does not and
        // spans are exported); the ids go into every log line.
        let trace = TaskSpan::start(
            Operation::Process,
            SpanTask {
                queue: &self.queue,
                task_id: envelope.id.as_str(),
                function: &request.function,
                attempt: Some(attempt),
            },
            envelope.trace.as_ref(),
        );
        let ids = trace.as_ref().map(TaskSpan::context);
        let span = tracing::info_span!(
            "task",
            task.id = %envelope.id,
            task.function = %envelope::bounded(&request.function, 200),
            attempt,
            otel.name = %format!("process {}", self.queue),
            messaging.system = "rabbitmq",
            messaging.operation = "process",
            trace_id = ids.map(|t| tracing::field::display(t.trace_id)),
            span_id = ids.map(|t| tracing::field::display(t.span_id)),
            parent_span_id = trace.as_ref().and_then(TaskSpan::parent_span_id).map(tracing::field::display),
        );
        let outcome = self
            .run(delivery, envelope, trail, request, attempt, deadline)
            .instrument(span)
            .await;
        if let Some(trace) = trace {
            trace.end(failure_of(&outcome));
        }
        outcome
    }

    async fn run(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        trail: &mut Trail,
        request: Request<RawJson>,
        attempt: u32,
        deadline: Option<SystemTime>,
    ) -> Outcome {
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
                    "no handler for {} on this worker (it serves {})",
                    quoted(&request.function),
                    self.registry.functions().join(", ")
                ),
            );
        };
        let policy = entry
            .policy
            .as_ref()
            .unwrap_or(&self.policy)
            .overridden_by(&envelope.overrides);
        let cancel = self.abort.child_token();
        let progress = self
            .progress
            .as_ref()
            .map_or_else(Reporter::discard, |sink| {
                sink.reporter(envelope, attempt, trail.progress_events())
            });
        let ctx = TaskContext::new(envelope.id.clone(), &request.function)
            .with_attempt(attempt, policy.max_attempts)
            .with_redelivered(delivery.redelivered)
            .with_deadline(deadline)
            .with_cancellation(cancel.clone())
            .with_progress(progress.clone());
        trail.started().await;
        // Its own tokio task: a panic stays there and comes back as a JoinError.
        let run = tokio::spawn((entry.run)(request.args, ctx).in_current_span());
        let outcome = self
            .judge_run(run, envelope, &policy, attempt, deadline, &cancel)
            .await;
        // The last progress before the outcome's reply.
        progress.finish().await;
        outcome
    }

    /// Awaits the handler's run, within the policy's time limit, and judges how it ended.
    async fn judge_run(
        &self,
        mut run: tokio::task::JoinHandle<Result<RawJson, HandlerFailure>>,
        envelope: &Envelope,
        policy: &Policy,
        attempt: u32,
        deadline: Option<SystemTime>,
        cancel: &CancellationToken,
    ) -> Outcome {
        let started = std::time::Instant::now();
        // Only a result that would be published is bounded: with nobody waiting, a large one
        // is dropped and the task, which did its work, is done.
        let max_result_bytes = match envelope.reply_to.address() {
            Some(_) => self.max_result_bytes,
            None => usize::MAX,
        };
        let failed = tokio::select! {
            joined = &mut run => match joined {
                Ok(Ok(value)) if value.get().len() > max_result_bytes => (
                    TaskFailure::new(ErrorKind::TooLarge, format!(
                        "the result is {} bytes of JSON; this worker publishes at most {} (max_result_bytes)",
                        value.get().len(), self.max_result_bytes,
                    )),
                    // The same task would make the same result.
                    Retry::Permanent,
                ),
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
        let outcome = after_failure(policy, attempt, deadline, failure, retry);
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

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
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
    use warren_shared::RawJson;
    use warren_shared::envelope::headers;

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

    /// `value` as a handler's result.
    fn raw(value: &serde_json::Value) -> RawJson {
        RawJson::to_json(value).expect("test value")
    }

    fn executor() -> Executor {
        use warren_shared::tasks::{Echo, Sleep, Slept};
        let registry = Registry::new()
            .register_fn(|args: Echo, _| async move { Ok(args.0) })
            .register_fn(|args: Sleep, _| async move {
                tokio::time::sleep(Duration::from_millis(args.ms)).await;
                Ok(Slept { slept_ms: args.ms })
            });
        Executor {
            queue: "q".into(),
            registry,
            policy: Policy {
                time_limit: Duration::from_millis(20),
                ..Policy::default()
            },
            max_body_bytes: 4096,
            max_result_bytes: 4096,
            reply_queues: Arc::from([]),
            abort: CancellationToken::new(),
            progress: None,
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
        runtime.block_on(executor().execute(&delivery, &envelope, &mut Trail::off()))
    }

    /// The seed corpus of hostile bodies (kept in `worker/tests/decode-corpus`): each gets the
    /// verdict listed here, and every file is listed.
    #[test]
    fn the_decode_corpus_is_judged_as_expected() {
        use ErrorKind::{BadRequest, InvalidArgs, Timeout, TooLarge};
        let expected: std::collections::HashMap<&str, ErrorKind> = [
            ("array.json", BadRequest),
            ("binary.bin", BadRequest),
            ("deep-nesting.json", BadRequest),
            ("duplicate-keys.json", InvalidArgs),
            ("empty-function.json", BadRequest),
            ("empty.bin", BadRequest),
            ("huge-sleep.json", Timeout),
            ("large.json", TooLarge),
            ("lone-surrogate.json", BadRequest),
            ("negative-sleep.json", InvalidArgs),
            ("no-function.json", BadRequest),
            ("null.json", BadRequest),
            ("number-function.json", BadRequest),
            ("truncated-args.json", BadRequest),
            ("truncated.json", BadRequest),
        ]
        .into();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/decode-corpus");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let outcome = judge(
                std::fs::read(&path).unwrap(),
                None,
                Some("warren.reply.corpus"),
            );
            let want = *expected
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{name} is not listed in this test"));
            match &outcome {
                // A sleep past the 20 ms time limit is a failed attempt, retried.
                Outcome::Retry { failure, .. } if want == Timeout => {
                    assert_eq!(failure.kind, Timeout, "{name}");
                }
                Outcome::DeadLetter {
                    reason: DeadReason::Rejected,
                    failure,
                } => assert_eq!(failure.kind, want, "{name}: {}", failure.message),
                other => panic!("{name}: expected {want}, got {other:?}"),
            }
            seen += 1;
        }
        assert_eq!(seen, expected.len());
    }

    /// What [`Executor::execute`] must decide for a delivery of the proptest below; `None`
    /// where only the kind of a failed attempt is fixed (a sleep that may or may not overrun).
    ///
    /// `unusable_headers` is the envelope's own verdict on the reply address and the attempt
    /// number (both unit-tested in `warren_shared::envelope`).
    fn expected(
        body: &[u8],
        version: Option<i64>,
        deadline: Option<i64>,
        unusable_headers: bool,
    ) -> Result<Outcome, ErrorKind> {
        if version.is_some_and(|v| v != protocol::PROTOCOL_VERSION) {
            return Ok(rejected(ErrorKind::UnsupportedVersion, ""));
        }
        if unusable_headers {
            return Ok(rejected(ErrorKind::BadRequest, ""));
        }
        let request = match Request::decode(body) {
            Ok(r) => r,
            Err(failure) => return Ok(rejected(failure.kind, "")),
        };
        if deadline.is_some_and(|d| protocol::from_epoch_millis(d) <= SystemTime::now()) {
            return Ok(Outcome::Reply(Reply::Err(TaskFailure::new(
                ErrorKind::Expired,
                "",
            ))));
        }
        match request.function.as_str() {
            "echo" => Ok(Outcome::Reply(Reply::Ok(raw(&request.args)))),
            "sleep" => match serde_json::from_value::<warren_shared::tasks::Sleep>(request.args) {
                Err(_) => Ok(rejected(ErrorKind::InvalidArgs, "")),
                Ok(s) if s.ms == 0 => Ok(Outcome::Reply(Reply::Ok(raw(
                    &serde_json::json!({ "slept_ms": 0 }),
                )))),
                Ok(_) => Err(ErrorKind::Timeout),
            },
            _ => Ok(rejected(ErrorKind::UnknownFunction, "")),
        }
    }

    /// `got` is `want`, messages aside.
    fn same_verdict(got: &Outcome, want: &Result<Outcome, ErrorKind>) -> bool {
        let kind = |reply: &Reply<RawJson>| match reply {
            Reply::Ok(v) => Ok(v.clone()),
            Reply::Err(f) => Err(f.kind),
        };
        match (got, want) {
            (
                Outcome::DeadLetter { reason, failure },
                Ok(Outcome::DeadLetter {
                    reason: want_reason,
                    failure: want_failure,
                }),
            ) => reason == want_reason && failure.kind == want_failure.kind,
            (Outcome::Reply(got), Ok(Outcome::Reply(want))) => kind(got) == kind(want),
            // A sleep of 1 ms or more may overrun the 20 ms limit on a loaded machine.
            (Outcome::Reply(Reply::Ok(_)), Err(ErrorKind::Timeout)) => true,
            (Outcome::Retry { failure, .. }, Err(kind))
            | (
                Outcome::DeadLetter {
                    reason: DeadReason::AttemptsExhausted,
                    failure,
                },
                Err(kind),
            ) => failure.kind == *kind,
            _ => false,
        }
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
            if let Some(v) = version { envelope::set_header_int(&mut h, headers::PROTOCOL, v); }
            if let Some(a) = attempt { envelope::set_header_int(&mut h, headers::ATTEMPT, a); }
            if let Some(d) = deadline { envelope::set_header_int(&mut h, headers::DEADLINE, d); }
            if let Some(b) = &backoff { envelope::set_header_str(&mut h, headers::BACKOFF, b); }
            let mut properties = lapin::BasicProperties::default().with_headers(h.clone());
            if let Some(r) = &reply_to {
                properties = properties.with_reply_to(r.as_str().into());
            }
            let mut probe = Delivery::mock(1, "".into(), "q".into(), false, Vec::new());
            probe.properties = properties;
            let read = Envelope::of(&probe);
            let unusable = matches!(read.reply_to, ReplyTo::Invalid { .. }) || read.attempt.is_err();
            let want = expected(&body, version, deadline, unusable);
            let outcome = judge(body, Some(h), reply_to.as_deref());
            proptest::prop_assert!(same_verdict(&outcome, &want), "got {outcome:?}, want {want:?}");
        }
    }

    fn rejected_as(outcome: &Outcome, kind: ErrorKind) -> bool {
        matches!(outcome, Outcome::DeadLetter { reason: DeadReason::Rejected, failure } if failure.kind == kind)
    }

    #[test]
    fn an_attempt_number_out_of_range_is_rejected_not_wrapped() {
        let body = br#"{"function":"echo","args":1}"#.to_vec();
        for hostile in [
            i64::MAX,
            i64::MAX - 1,
            i64::from(u32::MAX) + 1,
            0,
            -5,
            i64::MIN,
        ] {
            let mut h = FieldTable::default();
            envelope::set_header_int(&mut h, headers::ATTEMPT, hostile);
            let outcome = judge(body.clone(), Some(h), None);
            assert!(
                rejected_as(&outcome, ErrorKind::BadRequest),
                "{hostile}: {outcome:?}"
            );
        }
        let mut h = FieldTable::default();
        envelope::set_header_str(&mut h, headers::ATTEMPT, "third");
        assert!(rejected_as(
            &judge(body.clone(), Some(h), None),
            ErrorKind::BadRequest
        ));
        // The largest attempt there is still runs (and a failure there is never retried).
        let mut h = FieldTable::default();
        envelope::set_header_int(&mut h, headers::ATTEMPT, i64::from(u32::MAX));
        assert_eq!(
            judge(body, Some(h), None),
            Outcome::Reply(Reply::Ok(raw(&serde_json::json!(1))))
        );
        assert!(matches!(
            after_failure(&policy(), u32::MAX, None, failure(), Retry::Retryable),
            Outcome::DeadLetter {
                reason: DeadReason::AttemptsExhausted,
                ..
            }
        ));
    }

    #[test]
    fn a_protocol_or_deadline_header_that_is_not_an_integer_is_refused_not_ignored() {
        use lapin::types::AMQPValue;
        let body = br#"{"function":"echo","args":1}"#.to_vec();
        let with = |name: &str, value: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(name.into(), value);
            judge(body.clone(), Some(h), None)
        };
        for value in [
            AMQPValue::LongString("one".into()),
            AMQPValue::Boolean(true),
            AMQPValue::Double(1.0),
        ] {
            let outcome = with(headers::PROTOCOL, value.clone());
            assert!(
                rejected_as(&outcome, ErrorKind::UnsupportedVersion),
                "{value:?}: {outcome:?}"
            );
            let outcome = with(headers::DEADLINE, value.clone());
            let Outcome::DeadLetter { reason, failure } = &outcome else {
                panic!("{value:?}: {outcome:?}")
            };
            assert_eq!(
                (*reason, failure.kind),
                (DeadReason::Rejected, ErrorKind::BadRequest),
                "{value:?}"
            );
            assert!(
                failure.message.contains("x-warren-deadline"),
                "{}",
                failure.message
            );
        }
        // The forms that are integers still work: a decimal string, any integer width.
        assert_eq!(
            with(headers::PROTOCOL, AMQPValue::ShortString("1".into())),
            Outcome::Reply(Reply::Ok(raw(&serde_json::json!(1))))
        );
        assert!(matches!(
            with(headers::DEADLINE, AMQPValue::LongLongInt(1)),
            Outcome::Reply(Reply::Err(TaskFailure {
                kind: ErrorKind::Expired,
                ..
            }))
        ));
    }

    #[test]
    fn a_result_over_max_result_bytes_fails_for_good_as_too_large() {
        let mut executor = executor();
        executor.max_result_bytes = 10;
        let judge_to = |executor: &Executor, args: &str, reply_to: Option<&str>| {
            let body = format!(r#"{{"function":"echo","args":{args}}}"#).into_bytes();
            let mut delivery = Delivery::mock(1, "".into(), "q".into(), false, body);
            if let Some(reply_to) = reply_to {
                delivery.properties =
                    lapin::BasicProperties::default().with_reply_to(reply_to.into());
            }
            let envelope = Envelope::of(&delivery);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime")
                .block_on(executor.execute(&delivery, &envelope, &mut Trail::off()))
        };
        let judge_with =
            |executor: &Executor, args: &str| judge_to(executor, args, Some("my.replies"));
        // Ten bytes of JSON are published; eleven are not.
        assert_eq!(
            judge_with(&executor, r#""12345678""#),
            Outcome::Reply(Reply::Ok(raw(&serde_json::json!("12345678"))))
        );
        let outcome = judge_with(&executor, r#""123456789""#);
        let Outcome::DeadLetter { reason, failure } = &outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(*reason, DeadReason::PermanentFailure);
        assert_eq!(failure.kind, ErrorKind::TooLarge);
        assert!(
            failure.message.contains("11 bytes") && failure.message.contains("at most 10"),
            "{}",
            failure.message
        );
        // With nobody waiting nothing is published: the task did its work and is done.
        assert_eq!(
            judge_to(&executor, r#""123456789""#, None),
            Outcome::Reply(Reply::Ok(raw(&serde_json::json!("123456789"))))
        );
    }

    #[test]
    fn a_reply_address_the_broker_would_choke_on_is_rejected() {
        let body = br#"{"function":"echo","args":1}"#.to_vec();
        let outcome = judge(body.clone(), None, Some("amq.rabbitmq.reply-to.AAAA.x"));
        assert!(rejected_as(&outcome, ErrorKind::BadRequest), "{outcome:?}");
        assert_eq!(
            judge(body, None, Some("my.replies")),
            Outcome::Reply(Reply::Ok(raw(&serde_json::json!(1))))
        );
    }

    #[test]
    fn oversized_headers_are_rejected_as_too_large() {
        let mut h = FieldTable::default();
        envelope::set_header_int(&mut h, headers::ATTEMPT, 1);
        for i in 0..20 {
            h.insert(
                format!("pad-{i}").into(),
                lapin::types::AMQPValue::LongString("p".repeat(1000).into()),
            );
        }
        let outcome = judge(br#"{"function":"echo"}"#.to_vec(), Some(h), None);
        assert!(rejected_as(&outcome, ErrorKind::TooLarge), "{outcome:?}");
    }

    #[test]
    fn a_huge_unknown_function_name_is_quoted_briefly() {
        let body = serde_json::to_vec(&serde_json::json!({"function": "f".repeat(3_000)})).unwrap();
        let Outcome::DeadLetter { failure, .. } = judge(body, None, None) else {
            panic!("not rejected")
        };
        assert_eq!(failure.kind, ErrorKind::UnknownFunction);
        assert!(failure.message.len() < 1000, "{}", failure.message.len());
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
