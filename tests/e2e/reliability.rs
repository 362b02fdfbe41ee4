//! Nothing lost: retries with backoff, dead letters and replay, deadlines, time limits, and bad
//! input that never crashes or blocks a worker. Workers run in-process here; the tests that
//! kill or signal a worker process are in `processes.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warren_client::{CallOptions, Replay};
use warren_shared::protocol::{self, headers};
use warren_shared::tasks::{Echo, Sleep};
use warren_shared::{ErrorKind, Policy, Reply, Task};
use warren_tests::raw::RawPeer;
use warren_tests::{TestQueue, eventually};
use warren_worker::{Handler, Registry, Run, TaskContext, TaskError, WorkerSettings};

/// Fails until attempt `succeed_on`, recording when each attempt started.
#[derive(Debug, Serialize, Deserialize)]
struct TimedFlaky {
    succeed_on: u32,
}

#[derive(Default)]
struct Attempts(Mutex<Vec<(u32, Instant, bool)>>);

impl Task for TimedFlaky {
    const NAME: &'static str = "timed_flaky";
    type Output = u32;
}

impl Handler<TimedFlaky> for Arc<Attempts> {
    async fn run(&self, args: TimedFlaky, ctx: TaskContext) -> Result<u32, TaskError> {
        self.0
            .lock()
            .unwrap()
            .push((ctx.attempt(), Instant::now(), ctx.redelivered()));
        if ctx.attempt() >= args.succeed_on {
            Ok(ctx.attempt())
        } else {
            Err(TaskError::retryable(format!(
                "attempt {} fails",
                ctx.attempt()
            )))
        }
    }
}

#[tokio::test]
async fn a_retryable_failure_succeeds_on_the_third_attempt_after_the_backoff_delays() {
    let backoff = vec![Duration::from_millis(300), Duration::from_millis(900)];
    let q = TestQueue::new("retry").with_retry_delays(&backoff);
    let attempts = Arc::new(Attempts::default());
    let policy = Policy {
        max_attempts: 3,
        backoff: backoff.clone(),
        ..Policy::default()
    };
    let registry = Registry::new().register_handler_with::<TimedFlaky>(attempts.clone(), policy);
    let worker = q.worker(registry, 2).await;
    let client = q.client().await;

    // The caller keeps waiting through the retries and gets the final outcome.
    let result = client.call(&TimedFlaky { succeed_on: 3 }).await.unwrap();
    assert_eq!(result, 3);

    let seen = attempts.0.lock().unwrap().clone();
    let numbers: Vec<u32> = seen.iter().map(|a| a.0).collect();
    assert_eq!(numbers, [1, 2, 3]);
    for (i, expected) in backoff.iter().enumerate() {
        let observed = seen[i + 1].1 - seen[i].1;
        // Never early; late by at most 400 ms of broker expiry and scheduling.
        assert!(
            observed >= *expected && observed < *expected + Duration::from_millis(400),
            "delay before attempt {} was {observed:?}, expected {expected:?}",
            i + 2
        );
    }
    assert!(
        seen.iter().all(|a| !a.2),
        "a retry is a new message, not a redelivery"
    );
    assert_eq!(q.dead_count(&client).await, 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn exhausted_attempts_are_dead_lettered_with_the_reason_and_replay_runs_them() {
    let backoff = [Duration::from_millis(100)];
    let q = TestQueue::new("exhaust").with_retry_delays(&backoff);
    let attempts = Arc::new(Attempts::default());
    let policy = |max_attempts| Policy {
        max_attempts,
        backoff: backoff.to_vec(),
        ..Policy::default()
    };
    let registry = |max_attempts| {
        Registry::new().register_handler_with::<TimedFlaky>(attempts.clone(), policy(max_attempts))
    };
    let worker = q.worker(registry(2), 2).await;
    let client = q.client().await;

    // Succeeds only on attempt 3, but the budget is 2: the caller gets the error reply.
    let err = client
        .call(&TimedFlaky { succeed_on: 3 })
        .await
        .unwrap_err();
    let failure = err.failure().expect("the worker's failure").clone();
    assert_eq!(failure.kind, ErrorKind::HandlerFailed);
    assert!(
        failure.message.contains("attempt 2 fails"),
        "{}",
        failure.message
    );

    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.reason, "attempts_exhausted");
    assert_eq!(d.kind.as_deref(), Some("handler_failed"));
    assert_eq!(d.attempts, Some(2));
    assert_eq!(d.function.as_deref(), Some("timed_flaky"));
    assert!(
        d.error
            .as_deref()
            .is_some_and(|e| e.contains("attempt 2 fails"))
    );
    assert!(
        d.dead_by
            .as_deref()
            .is_some_and(|w| w.starts_with("warren-worker@"))
    );
    assert!(d.dead_at.is_some());
    // Listing does not consume (the broker puts the listed messages back).
    eventually(
        "the listed dead letter back in its queue",
        Duration::from_secs(5),
        || async { q.dead_count(&client).await == 1 },
    )
    .await;

    // Replay starts a fresh budget; a worker that allows three attempts now runs it to success.
    worker.shutdown().await.unwrap();
    let worker = q.worker(registry(3), 2).await;
    let replayed = client
        .replay_dead_letters(&q.name, &Replay::One(d.id.clone()))
        .await
        .unwrap();
    assert_eq!(replayed, 1);
    eventually(
        "the replayed task to succeed",
        Duration::from_secs(10),
        || async { attempts.0.lock().unwrap().len() == 5 },
    )
    .await;
    let numbers: Vec<u32> = attempts.0.lock().unwrap().iter().map(|a| a.0).collect();
    assert_eq!(
        numbers,
        [1, 2, 1, 2, 3],
        "replay must start again at attempt 1"
    );
    assert_eq!(q.dead_count(&client).await, 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_deadline_is_answered_expired_without_running_the_handler() {
    let q = TestQueue::new("expired");
    let attempts = Arc::new(Attempts::default());
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();

    let mut peer = RawPeer::connect().await;
    let mut h = FieldTable::default();
    let past = std::time::SystemTime::now() - Duration::from_secs(1);
    protocol::set_header_int(&mut h, headers::DEADLINE, protocol::epoch_millis(past));
    let body = br#"{"function":"timed_flaky","args":{"succeed_on":1}}"#;
    peer.call(
        &q.name,
        "late-1",
        body,
        BasicProperties::default().with_headers(h),
    )
    .await;

    let worker = q
        .worker(
            Registry::new().register_handler::<TimedFlaky>(attempts.clone()),
            1,
        )
        .await;
    let (id, reply) = peer.next_reply(Duration::from_secs(10)).await;
    assert_eq!(id, "late-1");
    let Reply::Err(failure) = reply else {
        panic!("expected an error reply, got {reply:?}")
    };
    assert_eq!(failure.kind, ErrorKind::Expired);
    assert!(attempts.0.lock().unwrap().is_empty(), "the handler ran");
    worker.shutdown().await.unwrap();
    peer.close().await;
}

/// Waits until told to stop, and says whether it saw its cancellation.
#[derive(Debug, Serialize, Deserialize)]
struct Overrun;

#[derive(Default)]
struct SawCancel(std::sync::atomic::AtomicBool);

impl Task for Overrun {
    const NAME: &'static str = "overrun";
    type Output = ();
}

impl Handler<Overrun> for Arc<SawCancel> {
    async fn run(&self, _args: Overrun, ctx: TaskContext) -> Result<(), TaskError> {
        ctx.cancelled().await;
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        // A cooperative handler stops here; the worker stops waiting either way.
        std::future::pending::<()>().await;
        Ok(())
    }
}

#[tokio::test]
async fn an_overrunning_handler_gets_timeout_and_sees_its_cancellation() {
    let q = TestQueue::new("overrun");
    let saw = Arc::new(SawCancel::default());
    let policy = Policy {
        max_attempts: 1,
        time_limit: Duration::from_millis(200),
        ..Policy::default()
    };
    let registry = Registry::new()
        .register_handler_with::<Overrun>(saw.clone(), policy)
        .register::<Sleep>();
    let worker = q.worker(registry, 2).await;
    let client = q.client().await;

    let started = Instant::now();
    let err = client.call(&Overrun).await.unwrap_err();
    assert_eq!(err.failure().map(|f| f.kind), Some(ErrorKind::Timeout));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        saw.0.load(std::sync::atomic::Ordering::SeqCst),
        "the handler never saw its cancellation"
    );

    // The caller can set the limit per task too.
    let options = CallOptions::default()
        .time_limit(Duration::from_millis(100))
        .max_attempts(1);
    let err = client
        .call_with(&Sleep { ms: 5_000 }, &options)
        .await
        .unwrap_err();
    assert_eq!(err.failure().map(|f| f.kind), Some(ErrorKind::Timeout));
    assert_eq!(q.dead_count(&client).await, 2);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_typed_errors_and_dead_letters_and_never_stops_the_worker() {
    let q = TestQueue::new("bad-input");
    let settings = WorkerSettings {
        max_body_bytes: 1024,
        ..q.worker_settings(2)
    };
    let worker = q
        .worker_with(
            Registry::new().register::<Echo>().register::<Sleep>(),
            settings,
        )
        .await;
    let client = q.client().await;
    let mut peer = RawPeer::connect().await;

    let mut v2 = FieldTable::default();
    protocol::set_header_int(&mut v2, headers::PROTOCOL, 2);
    let big = format!(r#"{{"function":"echo","args":"{}"}}"#, "x".repeat(2000));
    let cases: Vec<(&str, Vec<u8>, BasicProperties, ErrorKind)> = vec![
        (
            "malformed",
            b"{\"function\": ".to_vec(),
            BasicProperties::default(),
            ErrorKind::BadRequest,
        ),
        (
            "binary",
            vec![0xff, 0x00, 0xfe, 0x7f],
            BasicProperties::default(),
            ErrorKind::BadRequest,
        ),
        (
            "not-object",
            b"[\"echo\"]".to_vec(),
            BasicProperties::default(),
            ErrorKind::BadRequest,
        ),
        (
            "no-function",
            br#"{"args":{}}"#.to_vec(),
            BasicProperties::default(),
            ErrorKind::BadRequest,
        ),
        (
            "unknown",
            br#"{"function":"nope"}"#.to_vec(),
            BasicProperties::default(),
            ErrorKind::UnknownFunction,
        ),
        (
            "wrong-args",
            br#"{"function":"sleep","args":{"ms":"soon"}}"#.to_vec(),
            BasicProperties::default(),
            ErrorKind::InvalidArgs,
        ),
        (
            "too-large",
            big.into_bytes(),
            BasicProperties::default(),
            ErrorKind::TooLarge,
        ),
        (
            "version",
            br#"{"function":"echo"}"#.to_vec(),
            BasicProperties::default().with_headers(v2),
            ErrorKind::UnsupportedVersion,
        ),
    ];
    for (id, body, props, _) in &cases {
        peer.call(&q.name, id, body, props.clone()).await;
    }
    let mut kinds = std::collections::HashMap::new();
    for _ in 0..cases.len() {
        let (id, reply) = peer.next_reply(Duration::from_secs(10)).await;
        let Reply::Err(failure) = reply else {
            panic!("{id}: expected an error reply, got {reply:?}")
        };
        kinds.insert(id, failure.kind);
    }
    for (id, _, _, kind) in &cases {
        assert_eq!(kinds.get(*id), Some(kind), "case {id}");
    }

    // No reply address at all, and a garbage one: parked, nothing to answer.
    peer.publish(
        &q.name,
        b"garbage without reply_to",
        BasicProperties::default(),
    )
    .await;
    let garbage = BasicProperties::default().with_reply_to("bad\u{1}reply".into());
    peer.publish(&q.name, br#"{"function":"echo"}"#, garbage)
        .await;

    eventually("every bad task parked", Duration::from_secs(10), || async {
        q.dead_count(&client).await as usize == cases.len() + 2
    })
    .await;
    let dead = client.dead_letters(&q.name, 100).await.unwrap();
    assert!(dead.iter().all(|d| d.reason == "rejected"), "{dead:?}");

    // The worker still answers a good task.
    assert_eq!(
        client.call(&Echo(json!({"ok": true}))).await.unwrap(),
        json!({"ok": true})
    );
    worker.shutdown().await.unwrap();
    peer.close().await;
}

#[tokio::test]
async fn the_handler_context_exposes_id_attempt_and_redelivery() {
    #[derive(Debug, Serialize, Deserialize)]
    struct Introspect;
    impl Task for Introspect {
        const NAME: &'static str = "introspect";
        type Output = Value;
    }
    impl Run for Introspect {
        async fn run(self, ctx: TaskContext) -> Result<Value, TaskError> {
            Ok(json!({
                "id": ctx.id().as_str(),
                "attempt": ctx.attempt(),
                "max_attempts": ctx.max_attempts(),
                "redelivered": ctx.redelivered(),
                "function": ctx.function(),
            }))
        }
    }
    let q = TestQueue::new("context");
    let worker = q.worker(Registry::new().register::<Introspect>(), 1).await;
    let client = q.client().await;
    let seen = client
        .call_with(&Introspect, &CallOptions::default().max_attempts(5))
        .await
        .unwrap();
    assert_eq!(seen["attempt"], json!(1));
    assert_eq!(seen["max_attempts"], json!(5));
    assert_eq!(seen["redelivered"], json!(false));
    assert_eq!(seen["function"], json!("introspect"));
    assert!(uuid::Uuid::parse_str(seen["id"].as_str().unwrap()).is_ok());
    worker.shutdown().await.unwrap();
}
