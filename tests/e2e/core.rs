//! The core promise: a task published by a caller runs on a worker and its result (or typed
//! error) comes back to the caller that awaits it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use warren_client::{CallOptions, Error};
use warren_shared::tasks::{Echo, SendMail};
use warren_shared::{ErrorKind, Policy, Task};
use warren_tests::{TestQueue, temp_dir};
use warren_worker::{Handler, Mailer, Registry, Run, TaskContext, TaskError, builtin_registry};

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

impl Task for Add {
    const NAME: &'static str = "add";
    type Output = i64;
}

impl Run for Add {
    async fn run(self, _ctx: TaskContext) -> Result<i64, TaskError> {
        self.a
            .checked_add(self.b)
            .ok_or_else(|| TaskError::invalid_args("overflow"))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Explode;

impl Task for Explode {
    const NAME: &'static str = "explode";
    type Output = Value;
}

impl Run for Explode {
    async fn run(self, _ctx: TaskContext) -> Result<Value, TaskError> {
        panic!("boom on purpose")
    }
}

/// Counts runs per task key, and wakes the test when the expected total is reached.
#[derive(Default)]
struct Tally {
    runs: Mutex<HashMap<u64, u32>>,
    by_worker: Mutex<HashMap<String, u32>>,
    total: std::sync::atomic::AtomicUsize,
    done: Notify,
}

impl Tally {
    async fn wait_for(&self, total: usize, timeout: Duration) {
        let wait = async {
            loop {
                let notified = self.done.notified();
                if self.total.load(std::sync::atomic::Ordering::SeqCst) >= total {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            panic!(
                "only {} of {total} tasks ran within {timeout:?}",
                self.total.load(std::sync::atomic::Ordering::SeqCst)
            );
        }
    }
}

/// The name of the worker a [`Count`] ran on (state of that worker).
struct WorkerName(String);

#[derive(Debug, Serialize, Deserialize)]
struct Count {
    key: u64,
    #[serde(default)]
    work_ms: u64,
}

impl Task for Count {
    const NAME: &'static str = "count";
    type Output = ();
}

/// Runs `Count` tasks for one named worker: a handler that owns its typed state.
struct Counter {
    tally: Arc<Tally>,
    worker: WorkerName,
}

impl Handler<Count> for Counter {
    async fn run(&self, args: Count, _ctx: TaskContext) -> Result<(), TaskError> {
        if args.work_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.work_ms)).await;
        }
        let tally = &self.tally;
        *tally.runs.lock().unwrap().entry(args.key).or_default() += 1;
        *tally
            .by_worker
            .lock()
            .unwrap()
            .entry(self.worker.0.clone())
            .or_default() += 1;
        tally
            .total
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tally.done.notify_waiters();
        Ok(())
    }
}

fn counting_registry(tally: &Arc<Tally>, name: &str) -> Registry {
    Registry::new().register_handler::<Count>(Counter {
        tally: tally.clone(),
        worker: WorkerName(name.to_owned()),
    })
}

#[tokio::test]
async fn typed_call_round_trips() {
    let q = TestQueue::new("typed");
    let worker = q
        .worker(Registry::new().register::<Add>().register::<Echo>(), 4)
        .await;
    let client = q.client().await;

    assert_eq!(client.call(&Add { a: 40, b: 2 }).await.unwrap(), 42);
    assert_eq!(
        client.call(&Echo(json!({"nested": [1, 2]}))).await.unwrap(),
        json!({"nested": [1, 2]})
    );
    let overflow = client.call(&Add { a: i64::MAX, b: 1 }).await.unwrap_err();
    assert_eq!(
        overflow.failure().map(|f| f.kind),
        Some(ErrorKind::InvalidArgs)
    );

    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn untyped_call_round_trips() {
    let q = TestQueue::new("untyped");
    let worker = q
        .worker(Registry::new().register::<Add>().register::<Echo>(), 4)
        .await;
    let client = q.client().await;

    assert_eq!(
        client
            .call_json("add", json!({"a": 1, "b": 2}))
            .await
            .unwrap(),
        json!(3)
    );
    assert_eq!(
        client.call_json("echo", json!("text")).await.unwrap(),
        json!("text")
    );
    assert_eq!(
        client.call_json("echo", Value::Null).await.unwrap(),
        Value::Null
    );

    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_thousand_concurrent_calls_each_get_their_own_result() {
    let q = TestQueue::new("thousand");
    let worker = q.worker(Registry::new().register::<Echo>(), 64).await;
    let client = q.client().await;

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000u32 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call_json("echo", json!({"i": i})).await) });
    }
    let mut seen = vec![false; 1000];
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        assert_eq!(
            result.unwrap(),
            json!({"i": i}),
            "call {i} got someone else's result"
        );
        seen[i as usize] = true;
    }
    assert!(seen.iter().all(|s| *s));
    assert_eq!(client.pending_calls(), 0);

    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn asking_for_a_missing_queue_disturbs_no_call_in_flight() {
    // The gateway polls a queue's depth while it serves calls; a passive declare of a queue
    // that does not exist closes its channel, which must not be one that calls are using.
    let q = TestQueue::new("stats");
    let worker = q.worker(Registry::new().register::<Echo>(), 64).await;
    let client = q.client().await;
    let missing = format!("{}.missing", q.name);

    let stop = tokio_util::sync::CancellationToken::new();
    let poller = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let mut refused = 0;
            while !stop.is_cancelled() {
                let stats = client.queue_stats(&missing).await;
                assert!(matches!(stats, Err(Error::Broker(_))), "{stats:?}");
                refused += 1;
            }
            refused
        }
    });
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..2000u32 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call_json("echo", json!({"i": i})).await) });
    }
    while let Some(joined) = calls.join_next().await {
        let (i, result) = joined.unwrap();
        assert_eq!(result.unwrap(), json!({"i": i}), "call {i}");
    }
    stop.cancel();
    let refused = poller.await.unwrap();
    assert!(
        refused > 0,
        "no stats were asked while calls were in flight"
    );
    assert_eq!(client.pending_calls(), 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn enqueued_tasks_each_run_exactly_once_on_one_worker() {
    let q = TestQueue::new("enqueue");
    let tally = Arc::new(Tally::default());
    let client = q.client().await;

    // Enqueue before any worker exists: the tasks wait durably in the queue.
    for key in 0..500u64 {
        client.enqueue(&Count { key, work_ms: 0 }).await.unwrap();
    }
    assert_eq!(client.queue_stats(&q.name).await.unwrap().ready, 500);

    let worker = q.worker(counting_registry(&tally, "only"), 16).await;
    tally.wait_for(500, Duration::from_secs(30)).await;
    worker.shutdown().await.unwrap();

    let runs = tally.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 500);
    assert!(
        runs.values().all(|n| *n == 1),
        "some task ran twice: {runs:?}"
    );
    assert_eq!(client.queue_stats(&q.name).await.unwrap().ready, 0);
}

#[tokio::test]
async fn two_workers_on_one_queue_share_the_work() {
    let q = TestQueue::new("share");
    let tally = Arc::new(Tally::default());
    let a = q.worker(counting_registry(&tally, "a"), 2).await;
    let b = q.worker(counting_registry(&tally, "b"), 2).await;
    let client = q.client().await;

    for key in 0..200u64 {
        client.enqueue(&Count { key, work_ms: 5 }).await.unwrap();
    }
    tally.wait_for(200, Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();

    let by_worker = tally.by_worker.lock().unwrap();
    let (ran_a, ran_b) = (
        by_worker.get("a").copied().unwrap_or(0),
        by_worker.get("b").copied().unwrap_or(0),
    );
    assert_eq!(ran_a + ran_b, 200);
    // Prefetch = concurrency keeps the split fair: neither worker hoards the queue.
    assert!(
        ran_a >= 50 && ran_b >= 50,
        "unfair split: a={ran_a} b={ran_b}"
    );
}

#[tokio::test]
async fn unknown_function_and_bad_arguments_fail_fast_with_typed_errors() {
    let q = TestQueue::new("typed-errors");
    let worker = q.worker(Registry::new().register::<Add>(), 4).await;
    let client = q.client().await;
    let patient = CallOptions::default().timeout(Duration::from_secs(30));

    let started = Instant::now();
    let unknown = client
        .call_json_with("no_such_function", json!({}), &patient)
        .await
        .unwrap_err();
    let bad_args = client
        .call_json_with("add", json!({"a": "one"}), &patient)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();

    let unknown = unknown.failure().expect("a worker's failure").clone();
    assert_eq!(unknown.kind, ErrorKind::UnknownFunction);
    assert!(
        unknown.message.contains("no_such_function"),
        "{}",
        unknown.message
    );
    let bad_args = bad_args.failure().expect("a worker's failure").clone();
    assert_eq!(bad_args.kind, ErrorKind::InvalidArgs);
    assert!(bad_args.message.contains("\"add\""), "{}", bad_args.message);
    assert!(
        elapsed < Duration::from_secs(5),
        "typed errors took {elapsed:?}"
    );

    // Both were parked for an operator rather than dropped.
    assert_eq!(q.dead_count(&client).await, 2);
    // And the worker still serves.
    assert_eq!(client.call(&Add { a: 2, b: 2 }).await.unwrap(), 4);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_call_with_no_worker_times_out_and_leaves_nothing_pending() {
    let q = TestQueue::new("no-worker");
    let client = q.client().await;

    let started = Instant::now();
    let err = client
        .call_json_with(
            "echo",
            json!(1),
            &CallOptions::default().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout(t) if t == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(client.pending_calls(), 0);

    // A call abandoned by its caller (the future dropped) cleans up too.
    let abandoned = tokio::time::timeout(
        Duration::from_millis(100),
        client.call_json("echo", json!(2)),
    )
    .await;
    assert!(abandoned.is_err());
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn a_panicking_handler_gets_an_error_reply_and_the_worker_keeps_serving() {
    let q = TestQueue::new("panic");
    // One attempt: a panic is a failed attempt like any other, and would otherwise be retried.
    let once = Policy {
        max_attempts: 1,
        ..Policy::default()
    };
    let worker = q
        .worker(
            Registry::new()
                .register_with::<Explode>(once)
                .register::<Echo>(),
            1,
        )
        .await;
    let client = q.client().await;

    let err = client.call(&Explode).await.unwrap_err();
    let failure = err.failure().expect("a worker's failure");
    assert_eq!(failure.kind, ErrorKind::Panicked);
    assert!(
        failure.message.contains("boom on purpose"),
        "{}",
        failure.message
    );

    assert_eq!(
        client.call(&Echo(json!("still here"))).await.unwrap(),
        json!("still here")
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn send_mail_writes_a_parseable_message_to_the_outbox() {
    let q = TestQueue::new("mail");
    let outbox = temp_dir("outbox");
    let worker = q
        .worker(builtin_registry(Mailer::outbox(outbox.path())), 4)
        .await;
    let client = q.client().await;

    let receipt = client
        .call(&SendMail {
            from: "Shop <noreply@shop.example>".into(),
            to: "Ada <ada@example.com>".into(),
            subject: "Your order ✓".into(),
            body: "Thanks for your order.\nIt ships today.".into(),
        })
        .await
        .unwrap();
    let name = receipt
        .delivered_to
        .strip_prefix("outbox:")
        .expect("an outbox receipt");
    assert!(!name.contains('/'), "the receipt names no server path");
    let raw = std::fs::read(outbox.path().join(name)).unwrap();
    let parsed = mailparse::parse_mail(&raw).unwrap();
    let header = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.get_key_ref() == name)
            .map(|h| h.get_value())
    };
    assert_eq!(header("To").as_deref(), Some("Ada <ada@example.com>"));
    assert_eq!(
        header("From").as_deref(),
        Some("Shop <noreply@shop.example>")
    );
    assert_eq!(header("Subject").as_deref(), Some("Your order ✓"));
    assert_eq!(header("Message-ID"), Some(receipt.message_id.clone()));
    // RFC 5322 lines end in CRLF.
    assert_eq!(
        parsed.get_body().unwrap().trim_end(),
        "Thanks for your order.\r\nIt ships today."
    );

    // An invalid address is a typed, permanent error, not a retry loop.
    let err = client
        .call(&SendMail {
            from: "x@y.z".into(),
            to: "not-an-address".into(),
            subject: "s".into(),
            body: "b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.failure().map(|f| f.kind), Some(ErrorKind::InvalidArgs));
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn send_mail_goes_through_an_smtp_relay_and_maps_its_refusals() {
    let sink = warren_tests::smtp::SmtpSink::start().await;
    let q = TestQueue::new("smtp");
    let mailer = Mailer::smtp(&sink.url()).unwrap();
    let policy = Policy {
        max_attempts: 2,
        backoff: vec![Duration::from_millis(100)],
        ..Policy::default()
    };
    let q = q.with_retry_delays(&policy.backoff);
    let registry = Registry::new().register_handler_with::<SendMail>(mailer, policy);
    let worker = q.worker(registry, 2).await;
    let client = q.client().await;
    let mail = |to: &str| SendMail {
        from: "Shop <noreply@shop.example>".into(),
        to: to.into(),
        subject: "Relayed".into(),
        body: "Through SMTP.".into(),
    };

    let receipt = client.call(&mail("ada@example.com")).await.unwrap();
    assert_eq!(receipt.delivered_to, sink.url());
    let messages = sink.messages();
    assert_eq!(messages.len(), 1);
    assert!(
        messages[0].contains("To: ada@example.com"),
        "{}",
        messages[0]
    );
    assert!(
        messages[0].contains(&format!("Message-ID: {}", receipt.message_id)),
        "{}",
        messages[0]
    );
    assert!(messages[0].contains("Through SMTP."));

    // A permanent refusal (5xx) is not retried; a transient one (4xx) is, then parked.
    let refused = client.call(&mail("refuse@example.com")).await.unwrap_err();
    assert!(
        refused.failure().unwrap().message.contains("refused"),
        "{refused}"
    );
    let later = client.call(&mail("later@example.com")).await.unwrap_err();
    assert!(
        later.failure().unwrap().message.contains("failed"),
        "{later}"
    );
    let mut reasons: Vec<String> = client
        .dead_letters(&q.name, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.reason)
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["attempts_exhausted", "permanent_failure"]);
    assert_eq!(sink.messages().len(), 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_with_its_own_reply_queue_gets_its_results_there() {
    use warren_client::ReplyMode;
    let q = TestQueue::new("reply-queue");
    let worker = q.worker(Registry::new().register::<Add>(), 4).await;
    let client = q
        .client_with(|s| {
            s.replies = ReplyMode::Queue {
                expires: Duration::from_secs(30),
            }
        })
        .await;
    let reply_queue = client.reply_queue().expect("a reply queue").to_owned();
    q.also_delete(&reply_queue);
    assert!(reply_queue.starts_with("warren.reply."));

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..100i64 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call(&Add { a: i, b: 1 }).await) });
    }
    while let Some(done) = calls.join_next().await {
        let (i, result) = done.unwrap();
        assert_eq!(result.unwrap(), i + 1);
    }
    let stats = client.queue_stats(&reply_queue).await.unwrap();
    assert_eq!(
        (stats.ready, stats.consumers),
        (0, 1),
        "replies consumed from the client's queue"
    );
    assert_eq!(client.pending_calls(), 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_call_after_close_fails_at_once_with_closed() {
    let q = TestQueue::new("closed");
    let client = q.client().await;
    client.close().await;
    let started = std::time::Instant::now();
    let err = client.call(&Echo(json!(1))).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    let err = client.enqueue(&Echo(json!(1))).await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err:?}");
    // Not after waiting out reconnect_wait for a link that will never come back.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// A call whose request the broker returns (no queue bound for it) fails with the broker's
/// refusal: awaiting the confirm and the reply together does not let it wait for a reply that
/// cannot come.
#[tokio::test]
async fn a_call_whose_request_is_returned_fails_as_unroutable() {
    let q = TestQueue::new("returned");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    // Deleted behind the client's back: it declared the queue once and does not again.
    let connection = lapin::Connection::connect(
        &warren_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(q.name.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "deleted".into()).await;

    let started = std::time::Instant::now();
    let err = client.call(&Echo(json!(1))).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Publish(warren_shared::PublishError::Unroutable { .. })
        ),
        "{err:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A channel that nacked a publish is replaced: the next publish goes out on a fresh channel
/// (on RabbitMQ 3.10 a channel that first published to a quorum queue during its leader
/// election keeps nacking every publish to it; `cluster` shows that case on a real cluster).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_that_nacked_a_publish_is_replaced() {
    use lapin::types::{AMQPValue, FieldTable};
    use warren_shared::pool::{Publication, channel_pool, publish_confirmed};

    let q = TestQueue::new("nacked");
    let connection = lapin::Connection::connect(
        &warren_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    // A queue that refuses every message: length limit 0, overflow reject-publish (a nack).
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let setup = connection.create_channel().await.unwrap();
    setup
        .queue_declare(q.name.as_str().into(), Default::default(), args)
        .await
        .unwrap();
    let pool = channel_pool(Arc::new(connection), 1, Duration::from_secs(5), None);
    let first = pool.get().await.unwrap().id();
    let publish = || {
        publish_confirmed(
            &pool,
            Publication {
                exchange: "",
                routing_key: &q.name,
                body: b"refused",
                properties: Default::default(),
                mandatory: false,
            },
            Duration::from_secs(5),
        )
    };
    let refused = publish().await;
    assert!(
        matches!(refused, Err(warren_shared::PublishError::Nacked { .. })),
        "{refused:?}"
    );
    warren_tests::eventually(
        "the nacking channel replaced",
        Duration::from_secs(5),
        || async { pool.get().await.unwrap().id() != first },
    )
    .await;
}
