//! No message can hurt the connection or its neighbours: hostile headers, names, addresses and
//! attempt numbers are bounded or rejected before anything is published, and untrusted backoff
//! values create a bounded number of delay queues that expire.
//!
//! Each hostile task runs next to a batch of unrelated calls: when an outcome of the hostile
//! task made the broker close the worker's publishing connection, the neighbours' outcomes in
//! flight failed and they ran again; here each must run exactly once, the hostile task is parked
//! once with Warren's reason, and the worker never had to recover.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::json;
use warren_client::Client;
use warren_shared::envelope::{self, headers};
use warren_shared::policy::BACKOFF_LADDER;
use warren_shared::tasks::SendMail;
use warren_shared::{ErrorKind, Reply, Task, topology};
use warren_tests::raw::RawPeer;
use warren_tests::{TestQueue, eventually, temp_dir};
use warren_worker::{Mailer, Registry, RunningWorker, TaskContext, TaskError};

/// Runs of each task, by key.
#[derive(Default)]
struct Runs(Mutex<HashMap<String, u32>>);

impl Runs {
    fn count(&self, key: &str) -> u32 {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    fn record(&self, key: &str) {
        *self.0.lock().unwrap().entry(key.to_owned()).or_default() += 1;
    }
}

/// An unrelated task: records its run, works `ms`, answers its key.
#[derive(Debug, Serialize, Deserialize)]
struct Neighbour {
    key: u64,
    ms: u64,
}

impl Task for Neighbour {
    const NAME: &'static str = "neighbour";
    type Output = u64;
}

/// Registers [`Neighbour`], counting its runs in `runs`.
fn with_neighbour(registry: Registry, runs: &Arc<Runs>) -> Registry {
    let runs = runs.clone();
    registry.register_fn(move |args: Neighbour, _ctx: TaskContext| {
        let runs = runs.clone();
        async move {
            runs.record(&format!("neighbour-{}", args.key));
            tokio::time::sleep(Duration::from_millis(args.ms)).await;
            Ok::<_, TaskError>(args.key)
        }
    })
}

/// `send_mail` with a run counter in front of the real mailer.
#[derive(Debug, Serialize, Deserialize)]
struct CountedMail(SendMail);

impl Task for CountedMail {
    const NAME: &'static str = "send_mail";
    type Output = warren_shared::tasks::MailReceipt;
}

/// Registers [`CountedMail`]: `mailer`, its runs counted in `runs`.
fn with_counted_mail(registry: Registry, runs: &Arc<Runs>, mailer: Mailer) -> Registry {
    let (runs, mailer) = (runs.clone(), Arc::new(mailer));
    registry.register_fn(move |args: CountedMail, ctx: TaskContext| {
        let (runs, mailer) = (runs.clone(), mailer.clone());
        async move {
            runs.record("send_mail");
            mailer.send(ctx.id().as_str(), args.0).await
        }
    })
}

const NEIGHBOURS: u64 = 16;

/// A worker serving the neighbours and the counted mailer, and a client.
async fn setup(
    q: &TestQueue,
    runs: &Arc<Runs>,
    outbox: &tempfile::TempDir,
) -> (RunningWorker, Client) {
    let registry = with_counted_mail(
        with_neighbour(Registry::new(), runs),
        runs,
        Mailer::outbox(outbox.path()),
    );
    let worker = q.worker(registry, 24).await;
    let client = q.client().await;
    (worker, client)
}

/// Starts the neighbours' calls, spread over about a second.
fn start_neighbours(client: &Client) -> tokio::task::JoinSet<u64> {
    let mut calls = tokio::task::JoinSet::new();
    for key in 0..NEIGHBOURS {
        let client = client.clone();
        calls.spawn(async move {
            client
                .call(&Neighbour {
                    key,
                    ms: 60 * key + 20,
                })
                .await
                .unwrap()
        });
    }
    calls
}

/// Every neighbour answered and ran exactly once; the worker never recovered.
async fn assert_no_harm(mut calls: tokio::task::JoinSet<u64>, runs: &Runs, worker: &RunningWorker) {
    let mut answered = 0;
    while let Some(done) = calls.join_next().await {
        done.unwrap();
        answered += 1;
    }
    assert_eq!(answered, NEIGHBOURS);
    for key in 0..NEIGHBOURS {
        assert_eq!(
            runs.count(&format!("neighbour-{key}")),
            1,
            "neighbour {key}"
        );
    }
    let health = worker.health();
    assert_eq!(health.recoveries, 0, "{:?}", health.last_problem);
    assert!(health.last_problem.is_none(), "{:?}", health.last_problem);
}

/// The one parked task: Warren's reason, and its error header bounded.
async fn assert_parked_once(q: &TestQueue, client: &Client, reason: &str, kind: ErrorKind) {
    eventually("the task parked", Duration::from_secs(10), || async {
        q.dead_count(client).await >= 1
    })
    .await;
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, reason);
    assert_eq!(dead[0].kind.as_deref(), Some(kind.as_str()));
    assert_eq!(dead[0].attempts, Some(1));
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        !error.is_empty() && error.len() <= envelope::MAX_HEADER_TEXT,
        "{} bytes",
        error.len()
    );
}

#[tokio::test]
async fn a_200_kb_function_name_is_parked_once_and_harms_no_neighbour() {
    let q = TestQueue::new("huge-function");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("huge-function");
    let (worker, client) = setup(&q, &runs, &outbox).await;

    let neighbours = start_neighbours(&client);
    let name = "f".repeat(200 * 1024);
    let err = client.call_json(&name, json!({})).await.unwrap_err();
    assert_eq!(
        err.failure().map(|f| f.kind),
        Some(ErrorKind::UnknownFunction)
    );
    assert_no_harm(neighbours, &runs, &worker).await;
    assert_parked_once(&q, &client, "rejected", ErrorKind::UnknownFunction).await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_200_kb_mail_address_runs_once_is_parked_and_harms_no_neighbour() {
    let q = TestQueue::new("huge-address");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("huge-address");
    let (worker, client) = setup(&q, &runs, &outbox).await;

    let neighbours = start_neighbours(&client);
    let args = json!({
        "from": "shop@example.com",
        "to": format!("{}@example.com", "a".repeat(200 * 1024)),
        "subject": "s",
        "body": "b",
    });
    let err = client.call_json("send_mail", args).await.unwrap_err();
    assert_eq!(err.failure().map(|f| f.kind), Some(ErrorKind::InvalidArgs));
    assert_no_harm(neighbours, &runs, &worker).await;
    assert_parked_once(&q, &client, "permanent_failure", ErrorKind::InvalidArgs).await;
    assert_eq!(runs.count("send_mail"), 1);
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_reply_address_the_broker_would_choke_on_is_parked_unanswered() {
    let q = TestQueue::new("bad-reply-to");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("bad-reply-to");
    let (worker, client) = setup(&q, &runs, &outbox).await;
    let peer = RawPeer::connect().await;

    let neighbours = start_neighbours(&client);
    let hostile = BasicProperties::default()
        .with_message_id("bad-reply".into())
        .with_correlation_id("bad-reply".into())
        .with_reply_to("amq.rabbitmq.reply-to.AAAA.x".into());
    let body = json!({"function": "neighbour", "args": {"key": 999, "ms": 1}}).to_string();
    peer.publish(&q.name, body.as_bytes(), hostile).await;
    assert_no_harm(neighbours, &runs, &worker).await;

    eventually("the task parked", Duration::from_secs(10), || async {
        q.dead_count(&client).await >= 1
    })
    .await;
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "rejected");
    assert_eq!(dead[0].kind.as_deref(), Some("bad_request"));
    assert!(
        dead[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("reply_to")),
        "{dead:?}"
    );
    assert_eq!(runs.count("neighbour-999"), 0, "a rejected task never runs");
    worker.shutdown().await.unwrap();
    peer.close().await;
}

#[tokio::test]
async fn a_reply_to_naming_a_queue_that_is_no_reply_queue_is_parked_unrun_and_unanswered() {
    let q = TestQueue::new("foreign-reply-to");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("foreign-reply-to");
    let (worker, client) = setup(&q, &runs, &outbox).await;
    let peer = RawPeer::connect().await;
    // Another application's queue in the same virtual host, which the caller may not write to.
    let victim = format!("{}.victim", q.name);
    q.also_delete(&victim);
    let (_connection, channel) = warren_tests::raw_channel().await;
    channel
        .queue_declare(
            victim.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let neighbours = start_neighbours(&client);
    let foreign = BasicProperties::default()
        .with_message_id("foreign-reply".into())
        .with_correlation_id("foreign-reply".into())
        .with_reply_to(victim.as_str().into());
    let body = json!({"function": "neighbour", "args": {"key": 998, "ms": 1}}).to_string();
    peer.publish(&q.name, body.as_bytes(), foreign).await;
    assert_no_harm(neighbours, &runs, &worker).await;

    eventually("the task parked", Duration::from_secs(10), || async {
        q.dead_count(&client).await >= 1
    })
    .await;
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "rejected");
    assert_eq!(dead[0].kind.as_deref(), Some("bad_request"));
    let error = dead[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("reply_to") && error.contains("warren.reply.*"),
        "{error}"
    );
    assert_eq!(runs.count("neighbour-998"), 0, "a rejected task never runs");
    // The worker is done with the task (parked and acked): nothing went to the victim.
    worker.shutdown().await.unwrap();
    let victim_depth = warren_tests::inspect_queue(&channel, &victim)
        .await
        .unwrap()
        .message_count();
    assert_eq!(victim_depth, 0, "the worker published into {victim}");
    peer.close().await;
}

#[tokio::test]
async fn a_reply_the_broker_refuses_does_not_run_a_finished_task_again() {
    let q = TestQueue::new("refused-reply");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("refused-reply");
    let (worker, client) = setup(&q, &runs, &outbox).await;
    let peer = RawPeer::connect().await;
    // A reply queue (named as Warren's are) that refuses every message: the reply is nacked.
    let full = format!(
        "{}{}",
        envelope::REPLY_QUEUE_PREFIX,
        uuid::Uuid::new_v4().simple()
    );
    q.also_delete(&full);
    let (_connection, channel) = warren_tests::raw_channel().await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(full.as_str().into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();

    let properties = BasicProperties::default()
        .with_message_id("refused-reply".into())
        .with_correlation_id("refused-reply".into())
        .with_reply_to(full.as_str().into());
    let body = json!({"function": "neighbour", "args": {"key": 997, "ms": 1}}).to_string();
    peer.publish(&q.name, body.as_bytes(), properties).await;
    eventually("the task ran", Duration::from_secs(10), || async {
        runs.count("neighbour-997") >= 1
    })
    .await;
    eventually("the task settled", Duration::from_secs(10), || async {
        worker.health().in_flight == 0
    })
    .await;
    // Stopping drains whatever the worker still holds; a handed-back task would wait in the
    // queue or have run again by now.
    worker.shutdown().await.unwrap();
    assert_eq!(runs.count("neighbour-997"), 1, "a finished task ran again");
    let ready = warren_tests::inspect_queue(&channel, &q.name)
        .await
        .unwrap()
        .message_count();
    assert_eq!(ready, 0, "the task was handed back");
    assert_eq!(q.dead_count(&client).await, 0);
    peer.close().await;
}

#[tokio::test]
async fn an_attempt_number_near_i64_max_is_rejected_without_wrapping() {
    let q = TestQueue::new("attempt-max");
    let runs = Arc::new(Runs::default());
    let outbox = temp_dir("attempt-max");
    let (worker, client) = setup(&q, &runs, &outbox).await;
    let mut peer = RawPeer::connect().await;

    let hostile: [(&str, AMQPValue); 4] = [
        ("max", AMQPValue::LongLongInt(i64::MAX)),
        ("max-1", AMQPValue::LongLongInt(i64::MAX - 1)),
        ("negative", AMQPValue::LongLongInt(-1)),
        ("text", AMQPValue::LongString("9223372036854775807".into())),
    ];
    for (id, attempt) in &hostile {
        let mut h = FieldTable::default();
        h.insert(headers::ATTEMPT.into(), attempt.clone());
        let body = json!({"function": "neighbour", "args": {"key": 7, "ms": 1}}).to_string();
        peer.call(
            &q.name,
            id,
            body.as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    for _ in 0..hostile.len() {
        let (id, reply) = peer.next_reply(Duration::from_secs(10)).await;
        let Reply::Err(failure) = reply else {
            panic!("{id}: expected an error reply, got {reply:?}")
        };
        assert_eq!(failure.kind, ErrorKind::BadRequest, "{id}");
        assert!(
            failure.message.contains("x-warren-attempt"),
            "{id}: {failure:?}"
        );
    }
    eventually(
        "every hostile task parked",
        Duration::from_secs(10),
        || async { q.dead_count(&client).await as usize == hostile.len() },
    )
    .await;
    assert_eq!(runs.count("neighbour-7"), 0);
    // The worker still serves.
    assert_eq!(client.call(&Neighbour { key: 1, ms: 1 }).await.unwrap(), 1);
    worker.shutdown().await.unwrap();
    peer.close().await;
}

/// Always fails, so that each task is retried once through its delay queue.
#[derive(Debug, Serialize, Deserialize)]
struct Flaky;

impl Task for Flaky {
    const NAME: &'static str = "flaky";
    type Output = ();
}

/// Registers [`Flaky`], counting its runs by attempt in `runs`.
fn with_flaky(registry: Registry, runs: &Arc<Runs>) -> Registry {
    let runs = runs.clone();
    registry.register_fn(move |_args: Flaky, ctx: TaskContext| {
        let runs = runs.clone();
        async move {
            runs.record(&format!("flaky-{}", ctx.attempt()));
            Err::<(), _>(TaskError::retryable("try later"))
        }
    })
}

/// Whether queue `name` exists (a passive declare on a channel of its own).
async fn exists(connection: &lapin::Connection, name: &str) -> Option<u32> {
    let channel = connection.create_channel().await.ok()?;
    let declared = warren_tests::inspect_queue(&channel, name)
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = channel.close(200, "checked".into()).await;
    declared
}

#[tokio::test]
async fn hostile_backoff_values_create_at_most_the_ladder_of_expiring_delay_queues() {
    let q = TestQueue::new("backoff-ladder").with_retry_delays(&BACKOFF_LADDER);
    let runs = Arc::new(Runs::default());
    let worker = q.worker(with_flaky(Registry::new(), &runs), 8).await;
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let peer = RawPeer::connect().await;

    // 50 distinct delays from 7 ms to about 23 hours, each asked for by one task.
    let delays: Vec<u64> = (0..50u64).map(|i| 7 + i * i * i * 670 + i * 13).collect();
    for ms in &delays {
        let mut h = FieldTable::default();
        envelope::set_header_str(&mut h, headers::BACKOFF, &ms.to_string());
        envelope::set_header_int(&mut h, headers::MAX_ATTEMPTS, 2);
        peer.publish(
            &q.name,
            br#"{"function":"flaky"}"#,
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    eventually("50 first attempts", Duration::from_secs(20), || async {
        runs.count("flaky-1") == 50
    })
    .await;

    let connection = lapin::Connection::connect(
        &warren_tests::amqp_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    // Every retry copy is either waiting in a delay queue, or back and parked after attempt 2.
    let waiting = || async {
        let mut n = 0;
        for rung in BACKOFF_LADDER {
            n += exists(&connection, &topology::retry_queue_name(&q.name, rung))
                .await
                .unwrap_or(0);
        }
        n + q.dead_count(&client).await
    };
    eventually("50 retry copies", Duration::from_secs(20), || async {
        waiting().await == 50
    })
    .await;
    let mut queues = Vec::new();
    for rung in BACKOFF_LADDER {
        let name = topology::retry_queue_name(&q.name, rung);
        if exists(&connection, &name).await.is_some() {
            queues.push(name);
        }
    }
    assert!(
        !queues.is_empty() && queues.len() <= BACKOFF_LADDER.len(),
        "{queues:?}"
    );
    for ms in &delays {
        let raw = topology::retry_queue_name(&q.name, Duration::from_millis(*ms));
        let rounded = topology::retry_queue_name(
            &q.name,
            warren_shared::policy::round_up_to_ladder(Duration::from_millis(*ms)),
        );
        assert!(
            raw == rounded || exists(&connection, &raw).await.is_none(),
            "{raw} was declared"
        );
    }

    // A delay queue has x-expires: declaring it without that argument is refused.
    let delay = BACKOFF_LADDER
        .iter()
        .copied()
        .find(|d| queues.contains(&topology::retry_queue_name(&q.name, *d)))
        .unwrap();
    let args = topology::retry_queue_args(&q.name, delay);
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            topology::retry_queue_name(&q.name, delay).as_str().into(),
            QueueDeclareOptions::durable(),
            args.clone(),
        )
        .await
        .unwrap();
    let mut without = FieldTable::default();
    for (key, value) in args.inner() {
        if key.as_str() != "x-expires" {
            without.insert(key.clone(), value.clone());
        }
    }
    let refused = channel
        .queue_declare(
            topology::retry_queue_name(&q.name, delay).as_str().into(),
            QueueDeclareOptions::durable(),
            without,
        )
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("x-expires"), "{refused}");
    let _ = connection.close(200, "done".into()).await;
    worker.shutdown().await.unwrap();
    peer.close().await;
}

/// Answers a string of `bytes` bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Big {
    bytes: usize,
}

impl Task for Big {
    const NAME: &'static str = "big";
    type Output = String;
}

/// Registers [`Big`], counting its runs in `runs`.
fn with_big(registry: Registry, runs: &Arc<Runs>) -> Registry {
    let runs = runs.clone();
    registry.register_fn(move |args: Big, _ctx: TaskContext| {
        let runs = runs.clone();
        async move {
            runs.record("big");
            Ok::<_, TaskError>("b".repeat(args.bytes))
        }
    })
}

/// A result larger than the broker's `max_message_size`: the broker refuses the reply and
/// closes the worker's channel under it and its neighbours. The neighbours' outcomes go through
/// again on channels of their own; the big one is refused there too and is parked as `refused`
/// instead of running again and again. On a private node, whose `max_message_size` is lowered.
#[tokio::test]
async fn an_outcome_the_broker_refuses_is_parked_as_refused_not_rerun() {
    let node = warren_tests::node::BrokerNode::start("refused").await;
    node.ctl_ok(&[
        "eval",
        "application:set_env(rabbit, max_message_size, 1048576).",
    ]);
    let q = TestQueue::new("refused");
    // Process-wide; other tests of this binary record into it too, under queues of their own.
    let metrics = warren_worker::metrics::install().expect("the metrics recorder");
    let runs = Arc::new(Runs::default());
    let registry = with_big(with_neighbour(Registry::new(), &runs), &runs);
    let settings = warren_worker::WorkerSettings {
        broker: warren_shared::BrokerSettings::new(node.url()),
        ..q.worker_settings(24)
    };
    let worker = q.worker_with(registry, settings).await;
    let client = q
        .client_with(|s| s.broker = warren_shared::BrokerSettings::new(node.url()))
        .await;

    let neighbours = start_neighbours(&client);
    let err = client.call(&Big { bytes: 2_000_000 }).await.unwrap_err();
    let failure = err.failure().expect("the worker's answer").clone();
    assert_eq!(failure.kind, ErrorKind::Refused, "{failure:?}");
    assert!(failure.message.contains("max size"), "{failure:?}");
    let mut answered = 0;
    let mut neighbours = neighbours;
    while let Some(done) = neighbours.join_next().await {
        done.unwrap();
        answered += 1;
    }
    assert_eq!(answered, NEIGHBOURS);
    for key in 0..NEIGHBOURS {
        assert_eq!(
            runs.count(&format!("neighbour-{key}")),
            1,
            "neighbour {key}"
        );
    }
    assert_eq!(runs.count("big"), 1, "the refused task ran again");
    eventually("the task parked", Duration::from_secs(10), || async {
        q.dead_count(&client).await >= 1
    })
    .await;
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "refused");
    assert_eq!(dead[0].kind.as_deref(), Some("refused"));
    // Counted as what happened to it: parked as `refused`, not as the reply it could not send.
    let big = format!(
        r#"warren_worker_tasks_total{{queue="{}",function="big",outcome="dead_lettered",reason="refused"}} 1"#,
        q.name
    );
    // Counted once settled, which ends after the caller's answer: wait for it.
    let queue_label = format!(r#"queue="{}",function="big""#, q.name);
    let counted = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("warren_worker_tasks_total") && l.contains(&queue_label))
            .count()
    };
    eventually("the big task counted", Duration::from_secs(10), || async {
        counted(&metrics.render()) > 0
    })
    .await;
    let text = metrics.render();
    assert!(
        text.lines().any(|line| line == big),
        "{big} not in:\n{text}"
    );
    assert_eq!(counted(&text), 1, "the big task is counted once: {text}");
    worker.shutdown().await.unwrap();
    client.close().await;
}

/// A foreign publisher's task without `message_id` and with a per-message `expiration`, failed
/// on both of its 2 attempts: the ids its attempts ran under, the parked copy's id as
/// `warren dlq` lists it, and the parked copy's properties.
async fn parked_copy_of(
    label: &str,
    properties: BasicProperties,
) -> (Vec<String>, String, BasicProperties) {
    let q = TestQueue::new(label).with_retry_delays(&[Duration::from_millis(50)]);
    let client = q.client().await;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let registry = Registry::new().register_fn({
        let seen = seen.clone();
        move |_: warren_tests::tasks::Flaky, ctx: TaskContext| {
            seen.lock().unwrap().push(ctx.id().to_string());
            async move { Err::<u32, _>(TaskError::retryable("fails on purpose")) }
        }
    });
    let settings = warren_worker::WorkerSettings {
        policy: warren_shared::Policy {
            max_attempts: 2,
            backoff: vec![Duration::from_millis(50)],
            ..warren_shared::Policy::default()
        },
        ..q.worker_settings(4)
    };
    let _worker = q.worker_with(registry, settings).await;
    let peer = RawPeer::connect().await;
    let body = json!({"function": "flaky", "args": {"succeed_on": 99}}).to_string();
    peer.publish(
        &q.name,
        body.as_bytes(),
        properties.with_expiration("600000".into()),
    )
    .await;

    eventually("the task parked", Duration::from_secs(20), || async {
        q.dead_count(&client).await >= 1
    })
    .await;
    let seen = seen.lock().unwrap().clone();
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "attempts_exhausted");

    let (_connection, channel) = warren_tests::raw_channel().await;
    let parked = channel
        .basic_get(
            format!("{}.dead", q.name).as_str().into(),
            lapin::options::BasicGetOptions::default(),
        )
        .await
        .unwrap()
        .expect("the parked copy");
    (seen, dead[0].id.clone(), parked.delivery.properties.clone())
}

/// Every attempt and the parked copy keep one id, and the copies the worker publishes carry no
/// `expiration`, which would cut a retry's delay short or make the parked copy vanish from
/// `.dead`.
#[tokio::test]
async fn retry_and_dead_letter_copies_keep_the_id_and_drop_expiration() {
    // No ids at all: the worker picks one at the first attempt.
    let (seen, dead_id, parked) = parked_copy_of("copy-props", BasicProperties::default()).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], seen[1], "the retry ran under another id");
    assert_eq!(dead_id, seen[0]);
    assert_eq!(
        parked.message_id().as_ref().map(|id| id.as_str()),
        Some(seen[0].as_str())
    );
    assert_eq!(parked.expiration(), &None);

    // A correlation_id and no message_id: the correlation_id is the task id throughout.
    let properties = BasicProperties::default().with_correlation_id("corr-copy-props".into());
    let (seen, dead_id, parked) = parked_copy_of("copy-props-corr", properties).await;
    assert_eq!(seen, ["corr-copy-props", "corr-copy-props"]);
    assert_eq!(dead_id, "corr-copy-props");
    assert_eq!(
        parked.message_id().as_ref().map(|id| id.as_str()),
        Some("corr-copy-props")
    );
    assert_eq!(parked.expiration(), &None);
}
