//! Run at a time: tasks wait in the broker's fixed ladder of delay levels, never in a worker,
//! and run no earlier than their time; a task nothing can route is parked, never dropped.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use warren_client::CallOptions;
use warren_shared::BrokerSettings;
use warren_shared::protocol::headers;
use warren_shared::{Task, delay, topology};
use warren_tests::node::BrokerNode;
use warren_tests::raw::RawPeer;
use warren_tests::{TestQueue, inspect_queue};
use warren_worker::{Handler, Registry, TaskContext, TaskError};

/// Reports when it runs.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    label: u32,
}

impl Task for Stamp {
    const NAME: &'static str = "stamp";
    type Output = u32;
}

struct Stamps(mpsc::UnboundedSender<(u32, SystemTime)>);

impl Handler<Stamp> for Stamps {
    async fn run(&self, args: Stamp, _ctx: TaskContext) -> Result<u32, TaskError> {
        let _ = self.0.send((args.label, SystemTime::now()));
        Ok(args.label)
    }
}

fn stamps() -> (Registry, mpsc::UnboundedReceiver<(u32, SystemTime)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Registry::new().register_handler::<Stamp>(Stamps(tx)), rx)
}

/// How late a task may run after its time in these tests: the levels' 1 s resolution plus
/// delivery lag, generously (the design target is 1 s plus the normal delivery lag).
const LATE: Duration = Duration::from_millis(2500);

/// The queues and exchanges of the delay ladder and of queue `queue`, from the management API.
async fn broker_objects(queue: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for kind in ["queues", "exchanges"] {
        let url = format!("http://127.0.0.1:15672/api/{kind}/%2f?columns=name");
        let body = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into();
            agent
                .get(&url)
                .header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
                .call()
                .and_then(|mut r| r.body_mut().read_to_string())
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("management API: {e}"));
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        names.extend(
            list.iter()
                .filter_map(|o| o["name"].as_str())
                .filter(|n| n.starts_with(delay::DELIVERY) || n.contains(queue))
                .map(|n| format!("{kind}/{n}")),
        );
    }
    names
}

#[tokio::test]
async fn tasks_of_distinct_delays_run_on_time_through_the_same_broker_objects() {
    let q = TestQueue::new("runat");
    let (registry, mut runs) = stamps();
    let worker = q.worker(registry, 8).await;
    let by_queue = q.client().await;
    let by_function = q.client_with(|s| s.queue = None).await;
    let before = broker_objects(&q.name).await;
    assert!(before.contains(&format!("queues/{}", delay::PARKED)));

    // Distinct delays, through queue routing and function routing alike.
    let delays = [1u64, 2, 3, 5, 6, 7];
    let mut due = Vec::new();
    for (label, secs) in (0u32..).zip(delays) {
        let options = CallOptions::default().delay(Duration::from_secs(secs));
        due.push(options.run_at.unwrap());
        let client = if label % 2 == 0 {
            &by_queue
        } else {
            &by_function
        };
        client
            .enqueue_with(&Stamp { label }, &options)
            .await
            .unwrap();
    }
    let mut late = Vec::new();
    for _ in &delays {
        let (label, ran) = tokio::time::timeout(Duration::from_secs(20), runs.recv())
            .await
            .expect("every delayed task runs")
            .unwrap();
        let due = due[label as usize];
        let after = ran.duration_since(due).unwrap_or_else(|early| {
            panic!("task {label} ran {:?} before its time", early.duration())
        });
        assert!(after < LATE, "task {label} ran {after:?} after its time");
        late.push(after);
    }
    late.sort();
    eprintln!("run-at lateness (sorted): {late:?}");

    assert_eq!(
        broker_objects(&q.name).await,
        before,
        "delays use no broker objects of their own"
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_deadline_of_a_delayed_call_counts_from_its_run_at_time() {
    let q = TestQueue::new("runat-deadline");
    let (registry, mut runs) = stamps();
    let worker = q.worker(registry, 2).await;
    let client = q.client().await;

    // Due in 3 s with 2 s to run: counted from now it would have expired before it was due.
    let options = CallOptions::default()
        .delay(Duration::from_secs(3))
        .timeout(Duration::from_secs(2));
    let due = options.run_at.unwrap();
    assert_eq!(
        client
            .call_with(&Stamp { label: 4 }, &options)
            .await
            .unwrap(),
        4
    );
    let (_, ran) = runs.recv().await.unwrap();
    assert!(
        ran >= due,
        "ran {:?} before its time",
        due.duration_since(ran)
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_foreign_client_delays_a_task_with_the_run_at_header_alone() {
    let q = TestQueue::new("runat-header");
    let (registry, mut runs) = stamps();
    let worker = q.worker(registry, 2).await;
    let peer = RawPeer::connect().await;

    // Published straight to the work queue, as any AMQP client does, with only the header.
    let due = SystemTime::now() + Duration::from_secs(2);
    let mut h = FieldTable::default();
    let ms = due
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    h.insert(
        headers::RUN_AT.into(),
        AMQPValue::LongLongInt(i64::try_from(ms).unwrap()),
    );
    let body = json!({"function": "stamp", "args": {"label": 8}}).to_string();
    peer.publish(
        &q.name,
        body.as_bytes(),
        BasicProperties::default().with_headers(h),
    )
    .await;

    let (label, ran) = tokio::time::timeout(Duration::from_secs(15), runs.recv())
        .await
        .expect("the task runs")
        .unwrap();
    assert_eq!(label, 8);
    let after = ran
        .duration_since(due)
        .unwrap_or_else(|early| panic!("ran {:?} before its time", early.duration()));
    assert!(after < LATE, "ran {after:?} after its time");
    peer.close().await;
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_delayed_task_nothing_is_bound_for_is_parked_with_its_route_not_dropped() {
    // On a private node: the parked queue is shared by every queue of a broker, and this test
    // must neither hold other tasks parked there nor leave its own behind.
    let node = BrokerNode::start("runat-unbound").await;
    let q = TestQueue::new("runat-unbound");
    let connection = lapin::Connection::connect(&node.url(), Default::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    delay::declare_levels(&channel).await.unwrap();
    // The work queue exists, but nothing bound it to the ladder's delivery exchange (no worker
    // ever ran on it; the producer may not declare).
    topology::declare(&channel, &q.name).await.unwrap();
    let url = node.url();
    let client = q
        .client_with(move |s| {
            s.broker = BrokerSettings::new(url);
            s.declare = false;
        })
        .await;
    let id = client
        .enqueue_with(
            &Stamp { label: 1 },
            &CallOptions::default().delay(Duration::from_secs(1)),
        )
        .await
        .unwrap();

    let mut parked = channel
        .basic_consume(
            delay::PARKED.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let found = tokio::time::timeout(Duration::from_secs(15), parked.next())
        .await
        .expect("the task is parked")
        .expect("the consumer stays open")
        .unwrap();
    found.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(
        found.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(id.as_str())
    );
    // The reason: its routing key names the destination nothing was bound for, and x-death
    // records the level it left.
    let key = found.routing_key.as_str();
    assert!(
        key.ends_with(&format!(".q.{}", q.name)),
        "routing key {key}"
    );
    let death = match found
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned())
    {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => death.clone(),
            other => panic!("x-death entry: {other:?}"),
        },
        other => panic!("x-death: {other:?}"),
    };
    let text = |name: &str| match death.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("x-death {name}: {other:?}"),
    };
    assert_eq!(text("queue"), delay::level_name(0));
    assert_eq!(text("reason"), "expired");
    assert_eq!(
        inspect_queue(&channel, &q.name)
            .await
            .unwrap()
            .message_count(),
        0
    );
    client.close().await;
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn warren_enqueue_in_and_at_run_the_task_then_and_refuse_what_cannot_wait() {
    let q = TestQueue::new("runat-cli");
    let (registry, mut runs) = stamps();
    let worker = q.worker(registry, 2).await;
    let warren = |args: Vec<String>| {
        tokio::process::Command::new(warren_tests::binary("warren"))
            .args(["--queue", &q.name, "enqueue", "stamp"])
            .args(args)
            .env("AMQP_URL", warren_tests::amqp_url())
            .output()
    };

    let due = SystemTime::now() + Duration::from_secs(1);
    let out = warren(vec![r#"{"label":1}"#.into(), "--in".into(), "1s".into()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (label, ran) = tokio::time::timeout(Duration::from_secs(15), runs.recv())
        .await
        .expect("the task runs")
        .unwrap();
    assert_eq!(label, 1);
    assert!(ran >= due, "ran before its time");

    // --at, whole seconds in UTC: the next whole second at least 2 s ahead.
    let at = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3));
    let due = humantime::parse_rfc3339(&at.to_string()).unwrap();
    let out = warren(vec![r#"{"label":2}"#.into(), "--at".into(), at.to_string()])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (label, ran) = tokio::time::timeout(Duration::from_secs(15), runs.recv())
        .await
        .expect("the task runs")
        .unwrap();
    assert_eq!(label, 2);
    let after = ran.duration_since(due).expect("not before its time");
    assert!(after < LATE, "{after:?}");

    // Past the longest delay: a typed error, exit 1, nothing queued.
    let out = warren(vec!["{}".into(), "--in".into(), "9years".into()])
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot delay the task"), "{stderr}");
    worker.shutdown().await.unwrap();
}

/// Fails until attempt `succeed_on`, reporting when each attempt ran.
#[derive(Debug, Serialize, Deserialize)]
struct FlakyStamp {
    succeed_on: u32,
}

impl Task for FlakyStamp {
    const NAME: &'static str = "flaky_stamp";
    type Output = u32;
}

impl Handler<FlakyStamp> for Stamps {
    async fn run(&self, args: FlakyStamp, ctx: TaskContext) -> Result<u32, TaskError> {
        let _ = self.0.send((ctx.attempt(), SystemTime::now()));
        if ctx.attempt() < args.succeed_on {
            return Err(TaskError::retryable("not yet"));
        }
        Ok(ctx.attempt())
    }
}

#[tokio::test]
async fn a_delayed_task_is_retried_like_any_other_after_its_time() {
    let backoff = Duration::from_millis(500);
    let q = TestQueue::new("runat-retry").with_retry_delays(&[backoff]);
    let (tx, mut runs) = mpsc::unbounded_channel();
    let worker = q
        .worker(
            Registry::new().register_handler::<FlakyStamp>(Stamps(tx)),
            2,
        )
        .await;
    let client = q.client().await;

    // Celery #10111: delayed tasks stuck after more than two retries. The delay is longer
    // than the gap allowed between attempts, so a retry that waited it again would show.
    let options = CallOptions::default()
        .delay(Duration::from_secs(3))
        .max_attempts(4)
        .backoff(vec![backoff]);
    let due = options.run_at.unwrap();
    let attempts = client
        .call_with(&FlakyStamp { succeed_on: 4 }, &options)
        .await
        .unwrap();
    assert_eq!(attempts, 4);
    let mut seen = Vec::new();
    while let Ok((attempt, ran)) = runs.try_recv() {
        seen.push((attempt, ran));
    }
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert!(seen[0].1 >= due, "the first attempt ran before its time");
    for pair in seen.windows(2) {
        let gap = pair[1].1.duration_since(pair[0].1).unwrap_or_default();
        // The retries wait their backoff, not the run-at delay again.
        assert!(
            gap >= backoff && gap < backoff + Duration::from_secs(1),
            "{gap:?}"
        );
    }
    worker.shutdown().await.unwrap();
}

/// A queue whose name the ladder cannot route (a `*` word) is told at worker start: the
/// worker says delayed delivery is unavailable for it, and still runs.
#[tokio::test]
async fn a_worker_on_a_queue_the_ladder_cannot_route_says_so_at_start() {
    let q = TestQueue::new("runat-star");
    let queue = format!("{}.*", q.name);
    q.also_delete(&queue);
    q.also_delete(&format!("{queue}.dead"));
    let metrics = warren_tests::free_addr();
    let mut worker = std::process::Command::new(warren_tests::binary("warren-worker"));
    worker
        .args(["--queue", &queue, "--metrics", &metrics.to_string()])
        .env("AMQP_URL", warren_tests::amqp_url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let _worker = warren_tests::ChildGuard::spawn(worker);
    let series = format!("warren_worker_delayed_delivery_available{{queue=\"{queue}\"}} 0");
    warren_tests::eventually(
        "the worker to report delayed delivery unavailable",
        Duration::from_secs(30),
        || async {
            warren_tests::http_get(format!("http://{metrics}/metrics"))
                .await
                .is_some_and(|(status, body)| status == 200 && body.contains(&series))
        },
    )
    .await;
}
