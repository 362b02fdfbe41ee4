//! Warren against broker faults: connections cut and frozen by a relay, a broker restart, a
//! queue deleted under a worker, a memory alarm, a node of several going away. Tests that stop
//! a broker or raise an alarm do it on a private node of their own ([`BrokerNode`]), never on
//! the shared broker; relay tests take turns.

// A failed unwrap is how a test says what went wrong.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use tokio::sync::Mutex;
use warren_client::{CallOptions, Client, ClientSettings, Error, ReplyMode};
use warren_shared::BrokerSettings;
use warren_shared::tasks::{Echo, Sleep};
use warren_tests::node::BrokerNode;
use warren_tests::relay::Relay;
use warren_tests::tasks::Record;
use warren_tests::{
    TestQueue, amqp_url, enqueue_records, eventually, free_addr, http_get, read_runs, temp_dir,
};
use warren_worker::{Registry, RunningWorker, WorkerSettings, WorkerState};

/// One fault at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn registry() -> Registry {
    Registry::new()
        .register::<Record>()
        .register::<Echo>()
        .register::<Sleep>()
}

async fn worker_at(q: &TestQueue, url: &str, concurrency: u16) -> RunningWorker {
    let settings = WorkerSettings {
        broker: BrokerSettings::new(url),
        watchdog_interval: Duration::from_millis(500),
        ..q.worker_settings(concurrency)
    };
    q.worker_with(registry(), settings).await
}

/// A client of `q` talking to the broker at `url`, with settings adjusted by `adjust`.
async fn client_at(q: &TestQueue, url: &str, adjust: impl FnOnce(&mut ClientSettings)) -> Client {
    let url = url.to_owned();
    q.client_with(move |s: &mut ClientSettings| {
        s.broker = BrokerSettings::new(url);
        adjust(s);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_lose_no_task_and_nobody_restarts() {
    let _serial = SERIAL.lock().await;
    const TASKS: u64 = 1000;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("cut");
    let dir = temp_dir("cut");
    let log = dir.path().join("runs.log");
    let url = relay.url(5);
    let a = worker_at(&q, &url, 8).await;
    let b = worker_at(&q, &url, 8).await;
    let client = client_at(&q, &url, |_| {}).await;

    let producer = {
        let (client, log) = (client.clone(), log.clone());
        tokio::spawn(async move { enqueue_records(&client, &log, 0..TASKS, 2, None).await })
    };
    for fraction in [0.2, 0.5, 0.8] {
        let target = (TASKS as f64 * fraction) as usize;
        eventually(
            "progress before the next cut",
            Duration::from_secs(60),
            || async { read_runs(&log).len() >= target },
        )
        .await;
        relay.cut();
    }
    producer.await.unwrap();
    eventually("every task to run", Duration::from_secs(90), || async {
        read_runs(&log).len() as u64 == TASKS
    })
    .await;

    let runs = read_runs(&log);
    let duplicates = runs.values().filter(|r| r.len() > 1).count();
    eprintln!("3 cuts over {TASKS} tasks: all ran; {duplicates} ran more than once");
    // The same worker objects are still consuming, and the same client still calls.
    for w in [&a, &b] {
        let health = w.health();
        assert_eq!(health.state, WorkerState::Consuming, "{health:?}");
    }
    assert_eq!(
        client.call(&Echo(json!("after the cuts"))).await.unwrap(),
        json!("after the cuts")
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_detected_and_recovered() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("half-open");
    let heartbeat = 1;
    let url = relay.url(heartbeat);
    let worker = worker_at(&q, &url, 4).await;
    let client = client_at(&q, &url, |_| {}).await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));

    // Noticing the dead peer replaces the connection within milliseconds, so the link may be
    // down only between two polls: count the connections instead.
    let first = client.connection_generation();
    let frozen = Instant::now();
    relay.stall();
    eventually(
        "the client to notice the dead peer",
        Duration::from_secs(10),
        || async { client.connection_generation() > first },
    )
    .await;
    let detected = frozen.elapsed();
    eprintln!("half-open connection detected after {detected:?} (heartbeat {heartbeat}s)");
    // Two missed heartbeats, plus scheduling slack.
    assert!(
        detected <= Duration::from_secs(2 * u64::from(heartbeat)) + Duration::from_millis(1500),
        "{detected:?}"
    );

    // Both sides reconnect through the relay (new connections are not frozen) and work again.
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    assert_eq!(
        client.call_with(&Echo(json!(2)), &options).await.unwrap(),
        json!(2)
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_across_a_cut_fails_fast() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("inflight-cut");
    // The worker talks to the broker directly; only the caller's connection is cut.
    let worker = q.worker(registry(), 2).await;
    let client = client_at(&q, &relay.url(5), |_| {}).await;

    // Long enough that the cut always comes before the reply could, however slowly this
    // test sees the task start on a loaded machine (with 3 s, a run once cut just after the
    // reply had come through).
    let task_time = Duration::from_secs(10);
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .call_with(
                    &Sleep {
                        ms: u64::try_from(task_time.as_millis()).unwrap(),
                    },
                    &CallOptions::default().timeout(Duration::from_secs(30)),
                )
                .await;
            (started.elapsed(), result)
        })
    };
    eventually(
        "the call to reach the worker",
        Duration::from_secs(5),
        || async { worker.health().in_flight == 1 },
    )
    .await;
    relay.cut();
    let (elapsed, result) = call.await.unwrap();
    assert!(matches!(result, Err(Error::ConnectionLost)), "{result:?}");
    assert!(
        elapsed < task_time,
        "the call waited {elapsed:?} for a reply that could not come"
    );
    assert_eq!(client.pending_calls(), 0);

    // The next call goes through once the client has reconnected.
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    assert_eq!(
        client
            .call_with(&Echo(json!("again")), &options)
            .await
            .unwrap(),
        json!("again")
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_in_flight_across_a_cut_gets_its_reply_when_it_has_a_reply_queue() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("inflight-queue");
    let worker = q.worker(registry(), 2).await;
    let client = client_at(&q, &relay.url(5), |s| {
        s.replies = ReplyMode::Queue {
            expires: Duration::from_secs(60),
        };
    })
    .await;
    q.also_delete(client.reply_queue().unwrap());

    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .call_with(
                    &Sleep { ms: 1_500 },
                    &CallOptions::default().timeout(Duration::from_secs(30)),
                )
                .await
        })
    };
    eventually(
        "the call to reach the worker",
        Duration::from_secs(10),
        || async { worker.health().in_flight == 1 },
    )
    .await;
    relay.cut();
    // The reply waits in the client's queue until the client is back, then completes the call.
    let slept = call.await.unwrap().unwrap();
    assert_eq!(slept.slept_ms, 1_500);
    assert_eq!(client.pending_calls(), 0);
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_queue_is_redeclared_and_consumption_resumes() {
    let _serial = SERIAL.lock().await;
    let q = TestQueue::new("deleted");
    let worker = q.worker(registry(), 2).await;
    let client = q.client().await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));

    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete(q.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;

    let mut health = worker.health_changes();
    tokio::time::timeout(
        Duration::from_secs(10),
        health.wait_for(|h| h.recoveries >= 1 && h.state == WorkerState::Consuming),
    )
    .await
    .expect("the worker did not rebuild its consumer")
    .unwrap();
    // The queue exists again (the worker declared it) and tasks flow.
    assert_eq!(client.queue_stats(&q.name).await.unwrap().consumers, 1);
    assert_eq!(client.call(&Echo(json!(2))).await.unwrap(), json!(2));
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_repairs_a_worker_that_stopped_receiving() {
    let _serial = SERIAL.lock().await;
    let q = TestQueue::new("zombie");
    let worker = worker_at(&q, &amqp_url(), 2).await;
    let client = q.client().await;
    worker.simulate_stall();
    let started = Instant::now();
    // The stalled consumer swallows what the broker pushes to it (its prefetch of 2); the third
    // task waits in the queue next to an idle worker: a zombie, until the watchdog repairs it.
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..3 {
        let (client, options) = (client.clone(), options.clone());
        calls.spawn(async move { client.call_with(&Echo(json!(i)), &options).await });
    }
    while let Some(done) = calls.join_next().await {
        done.unwrap().unwrap();
    }
    let health = worker.health();
    assert!(health.recoveries >= 1, "{health:?}");
    assert!(
        health
            .last_problem
            .as_deref()
            .is_some_and(|p| p.starts_with("watchdog")),
        "{health:?}"
    );
    eprintln!(
        "watchdog repaired the stalled consumer after {:?}",
        started.elapsed()
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_batch_loses_no_task() {
    const TASKS: u64 = 1000;
    let node = BrokerNode::start("restart").await;
    let q = TestQueue::new("restart");
    let dir = temp_dir("restart");
    let log = dir.path().join("runs.log");
    let worker = worker_at(&q, &node.url(), 8).await;
    let client = client_at(&q, &node.url(), |_| {}).await;
    enqueue_records(&client, &log, 0..TASKS, 5, None).await;

    eventually(
        "a third of the batch done",
        Duration::from_secs(60),
        || async { read_runs(&log).len() as u64 >= TASKS / 3 },
    )
    .await;
    node.stop_app();
    node.start_app();

    eventually("every task to run", Duration::from_secs(120), || async {
        read_runs(&log).len() as u64 == TASKS
    })
    .await;
    let duplicates = read_runs(&log).values().filter(|r| r.len() > 1).count();
    eprintln!("broker restart over {TASKS} tasks: all ran; {duplicates} ran more than once");
    // Every task has run; the last outcomes may still be on their way out.
    eventually(
        "the worker back to consuming",
        Duration::from_secs(30),
        || async { worker.health().state == WorkerState::Consuming },
    )
    .await;
    let options = CallOptions::default().timeout(Duration::from_secs(30));
    assert_eq!(
        client
            .call_with(&Echo(json!("back")), &options)
            .await
            .unwrap(),
        json!("back")
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_fails_publishes_clearly_while_consumers_keep_acking() {
    let node = BrokerNode::start("alarm").await;
    let q = TestQueue::new("alarm");
    let dir = temp_dir("alarm");
    let log = dir.path().join("runs.log");
    let client = client_at(&q, &node.url(), |s| {
        s.reconnect_wait = Duration::from_secs(2);
        s.publish_timeout = Duration::from_secs(2);
    })
    .await;
    client.declare_queue(&q.name).await.unwrap();
    // A gateway on the same broker: an alarm blocks its connection, but it stays ready. Started
    // first, so that its start does not eat into the work below.
    let (ops, text) = (free_addr(), free_addr());
    let mut command = std::process::Command::new(warren_tests::binary("warren-gateway"));
    command
        .args(["--queue", &q.name, "--allow", "echo"])
        .args(["--http", &free_addr().to_string()])
        .args(["--text", &text.to_string()])
        .args(["--metrics", &ops.to_string()])
        .env("AMQP_URL", node.url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let _gateway = warren_tests::ChildGuard::spawn(command);
    eventually("the gateway ready", Duration::from_secs(20), || async {
        http_get(format!("http://{ops}/readyz"))
            .await
            .map(|(s, _)| s)
            == Some(200)
    })
    .await;
    // Work queued before the alarm, slow enough to still be running during it.
    enqueue_records(&client, &log, 0..40, 100, None).await;
    // Task events off: with them on, a task's final event is a publish, which the alarm blocks,
    // so no task completes during it (docs/operations.md); what is under test here is that a
    // consumer's own connection keeps acking.
    let worker = q
        .worker_with(
            registry(),
            WorkerSettings {
                broker: BrokerSettings::new(node.url()),
                watchdog_interval: Duration::from_millis(500),
                events: warren_worker::EventSettings {
                    enabled: false,
                    ..warren_worker::EventSettings::default()
                },
                ..q.worker_settings(1)
            },
        )
        .await;

    let original = "0.4";
    node.ctl_ok(&["set_vm_memory_high_watermark", "0.0000001"]);
    let done_at_alarm = read_runs(&log).len();

    let started = Instant::now();
    let blocked = client.enqueue(&Echo(json!("during the alarm"))).await;
    let waited = started.elapsed();
    eprintln!("enqueue during the alarm: {blocked:?} after {waited:?}");
    match &blocked {
        Err(Error::Unavailable(message)) => {
            assert!(message.contains("blocks publishers"), "{message}")
        }
        other => panic!("expected a clear unavailable error, got {other:?}"),
    }
    assert!(waited < Duration::from_secs(6), "waited {waited:?}");
    // The broker blocks a connection when it publishes: a call through the gateway. Then the
    // gateway says why, and is still ready: its connection is there, and every gateway of the
    // deployment shares this broker, so none would be better to route to.
    let mut caller = tokio::net::TcpStream::connect(text).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut caller,
        b"{\"function\":\"echo\",\"args\":\"during the alarm\"}\n",
    )
    .await
    .unwrap();
    eventually(
        "the gateway to see the alarm",
        Duration::from_secs(10),
        || async {
            http_get(format!("http://{ops}/readyz"))
                .await
                .is_some_and(|(status, body)| {
                    status == 200 && body.contains("the broker blocks publishers")
                })
        },
    )
    .await;
    let (_, metrics) = http_get(format!("http://{ops}/metrics")).await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "warren_gateway_connection_up 1"),
        "{metrics}"
    );
    drop(caller);
    // Consumers on their own connection kept running and acking meanwhile.
    assert!(
        read_runs(&log).len() > done_at_alarm,
        "no task completed during the alarm"
    );

    // A producer faster than the broker accepts is held at its bound of publishes in flight
    // (the rest wait their turn), not buffered without limit.
    let bounded = client_at(&q, &node.url(), |s| {
        s.max_in_flight_publishes = 4;
        s.publish_timeout = Duration::from_secs(1);
    })
    .await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..20 {
        let bounded = bounded.clone();
        flood.spawn(async move { bounded.enqueue(&Echo(json!(i))).await });
    }
    eventually(
        "the bound of publishes in flight reached",
        Duration::from_secs(5),
        || async { bounded.publishes_in_flight() == 4 },
    )
    .await;
    while let Some(done) = flood.join_next().await {
        assert!(bounded.publishes_in_flight() <= 4);
        assert!(
            done.unwrap().is_err(),
            "an enqueue succeeded during the alarm"
        );
    }

    node.ctl_ok(&["set_vm_memory_high_watermark", original]);
    let client = client_at(&q, &node.url(), |_| {}).await;
    let options = CallOptions::default().timeout(Duration::from_secs(20));
    assert_eq!(
        client
            .call_with(&Echo(json!("after")), &options)
            .await
            .unwrap(),
        json!("after")
    );
    eventually(
        "the queued work to finish",
        Duration::from_secs(30),
        || async { read_runs(&log).len() == 40 },
    )
    .await;
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_waits_for_a_broker_that_comes_back_and_fails_clearly_for_one_that_does_not() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("outage");
    let client = client_at(&q, &relay.url(5), |s| {
        s.reconnect_wait = Duration::from_secs(3);
    })
    .await;
    client.declare_queue(&q.name).await.unwrap();

    // Down for longer than the client waits: a clear `unavailable` error, nothing enqueued.
    relay.refuse();
    relay.cut();
    eventually(
        "the client to see the outage",
        Duration::from_secs(10),
        || async { !client.link_state().is_up() },
    )
    .await;
    let started = Instant::now();
    let err = client.enqueue(&Echo(json!(0))).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3) && started.elapsed() < Duration::from_secs(6)
    );
    eprintln!("enqueue during an outage: {err}");

    // Back within the bound: the enqueue waits for the reconnect, then is confirmed. (A client
    // of its own, whose reconnect backoff has not grown during the long outage above.)
    relay.accept();
    let patient = client_at(&q, &relay.url(5), |s| {
        s.reconnect_wait = Duration::from_secs(20);
    })
    .await;
    relay.refuse();
    relay.cut();
    eventually(
        "the second client to see the outage",
        Duration::from_secs(10),
        || async { !patient.link_state().is_up() },
    )
    .await;
    let enqueue = {
        let patient = patient.clone();
        tokio::spawn(async move { patient.enqueue(&Echo(json!(1))).await })
    };
    // The outage goes on until the client has been turned away while the enqueue waits.
    let refused = relay.refused();
    eventually("a refused reconnect", Duration::from_secs(10), || async {
        relay.refused() > refused
    })
    .await;
    assert!(!enqueue.is_finished());
    relay.accept();
    let id = enqueue.await.unwrap().unwrap();
    assert!(!id.as_str().is_empty());
    assert_eq!(patient.queue_stats(&q.name).await.unwrap().ready, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_replaces_a_connection_whose_recovery_gave_up() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("client-replace");
    let worker = q.worker(registry(), 2).await;
    let client = client_at(&q, &relay.url(5), |s| {
        // An attempt limit is for workers: a client keeps reconnecting for as long as it lives.
        s.broker.reconnect.max_attempts = Some(1);
        // Long enough for the supervisor's backoff (up to 10 s between attempts) twice over.
        s.reconnect_wait = Duration::from_secs(60);
    })
    .await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));

    relay.refuse();
    relay.cut();
    eventually(
        "the client to see the connection lost",
        Duration::from_secs(30),
        || async { !client.link_state().is_up() },
    )
    .await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.call(&Echo(json!(2))).await })
    };
    let refused = relay.refused();
    eventually(
        "a refused replacement attempt",
        Duration::from_secs(30),
        || async { relay.refused() > refused },
    )
    .await;
    relay.accept();
    assert_eq!(call.await.unwrap().unwrap(), json!(2));
    assert!(client.link_state().is_up());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_configured_to_give_up_exits_with_an_error() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("give-up");
    let mut settings = WorkerSettings {
        broker: BrokerSettings::new(relay.url(5)),
        watchdog_interval: Duration::from_millis(300),
        ..q.worker_settings(2)
    };
    settings.broker.reconnect.max_attempts = Some(2);
    let worker = q.worker_with(registry(), settings).await;

    relay.refuse();
    relay.cut();
    let ended = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    let result = ended.expect("the worker kept trying past its configured attempts");
    assert!(
        matches!(result, Err(warren_worker::WorkerError::GaveUp { .. })),
        "{result:?}"
    );
}

/// Only the publishing connection lost, and it cannot come back: the worker gives up and ends
/// with an error, as when its consuming connection gives up, instead of holding its tasks
/// forever on a consumer that still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_publishing_link_gives_up_exits_with_an_error() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::start(warren_tests::broker_addr()).await;
    let q = TestQueue::new("give-up-publish");
    let name = format!("give-up-publish-{}", uuid::Uuid::new_v4());
    let mut settings = WorkerSettings {
        broker: BrokerSettings::new(relay.url(5)),
        name: name.clone(),
        ..q.worker_settings(2)
    };
    settings.broker.reconnect.max_attempts = Some(2);
    let worker = q.worker_with(registry(), settings).await;

    relay.refuse();
    // Closed by the broker, through its management API (which lists a new connection after
    // its next statistics round, up to 5 s): RabbitMQ's name for it is `name`, the one Warren
    // gave it `user_provided_name`.
    let publishing = format!("{name}/publish");
    let api = "http://127.0.0.1:15672/api/connections";
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let auth = "Basic Z3Vlc3Q6Z3Vlc3Q="; // guest:guest
    let find = {
        let agent = agent.clone();
        move || -> Option<String> {
            let listed: serde_json::Value = agent
                .get(api)
                .header("authorization", auth)
                .call()
                .ok()?
                .body_mut()
                .read_json()
                .ok()?;
            let connection = listed
                .as_array()?
                .iter()
                .find(|c| c["user_provided_name"] == publishing.as_str())?;
            connection["name"].as_str().map(str::to_owned)
        }
    };
    let found = std::sync::Arc::new(std::sync::Mutex::new(None));
    eventually(
        "the publishing connection in the management API",
        Duration::from_secs(20),
        || {
            let (find, found) = (find.clone(), found.clone());
            async move {
                let name = tokio::task::spawn_blocking(find).await.unwrap();
                let listed = name.is_some();
                *found.lock().unwrap() = name;
                listed
            }
        },
    )
    .await;
    let broker_name = found.lock().unwrap().take().unwrap();
    tokio::task::spawn_blocking(move || {
        let url = format!("{api}/{}", warren_tests::percent_encode(&broker_name));
        agent
            .delete(&url)
            .header("authorization", auth)
            .call()
            .expect("closing the publishing connection");
    })
    .await
    .unwrap();

    let ended = tokio::time::timeout(Duration::from_secs(30), worker.wait()).await;
    let result = ended.expect("the worker held its tasks forever on a dead publishing link");
    assert!(
        matches!(result, Err(warren_worker::WorkerError::GaveUp { .. })),
        "{result:?}"
    );
}

/// The private-node helper itself: a node of the test's own boots, refuses connections while
/// its application is stopped, and serves again after it is started.
#[tokio::test]
async fn private_node_stops_and_starts() {
    let node = warren_tests::node::BrokerNode::start("selftest").await;
    let props = lapin::ConnectionProperties::default;
    let connection = lapin::Connection::connect(&node.url(), props())
        .await
        .unwrap();
    assert!(connection.status().connected());
    node.stop_app();
    assert!(
        lapin::Connection::connect(&node.url(), props())
            .await
            .is_err(),
        "a stopped node must refuse connections"
    );
    node.start_app();
    let again = lapin::Connection::connect(&node.url(), props())
        .await
        .unwrap();
    assert!(again.status().connected());
    let _ = again.close(200, "done".into()).await;
}

/// The client properties of the connections on `node` whose client-given name (the process
/// name given in settings, see `connection_name`) contains `prefix`, one line each.
fn connections_named(node: &BrokerNode, prefix: &str) -> Vec<String> {
    node.ctl_ok(&[
        "list_connections",
        "client_properties",
        "--no-table-headers",
        "-q",
    ])
    .lines()
    .filter(|line| line.contains(prefix))
    .map(str::to_owned)
    .collect()
}

/// Consumers on `node` of the queue `queue`.
fn consumers_of(node: &BrokerNode, queue: &str) -> usize {
    node.ctl_ok(&["list_consumers", "queue_name", "--no-table-headers", "-q"])
        .lines()
        .filter(|line| line.trim() == queue)
        .count()
}

/// A name of the test's own for a process's connections, so they can be counted on the node.
fn unique_name(role: &str) -> String {
    format!("fault-{role}-{}", uuid::Uuid::new_v4().simple())
}

/// Sends one Workerman Text request to the gateway at `addr` and reads its one-line answer.
async fn text_call(addr: SocketAddr, request: serde_json::Value) -> serde_json::Value {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(read).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the gateway answers")
        .unwrap()
        .expect("an answer line");
    serde_json::from_str(&line).unwrap()
}

/// Issue 8.2: after a 45 s broker outage and 40 s of settling, a worker, a client and the
/// gateway each hold exactly their own connections (worker: consume + publish; client: one
/// publish connection; gateway: publish + the event stream tail's consume) and the queue exactly one consumer, and 40 new tasks
/// are all answered (none stuck on a zombie consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_long_outage_each_process_holds_exactly_its_own_connections_and_consumers() {
    let node = BrokerNode::start("outage45").await;
    let q = TestQueue::new("outage45");
    let (worker_name, client_name, gateway_name) = (
        unique_name("worker"),
        unique_name("client"),
        unique_name("gateway"),
    );
    let worker = q
        .worker_with(
            registry(),
            WorkerSettings {
                broker: BrokerSettings::new(node.url()),
                watchdog_interval: Duration::from_secs(2),
                name: worker_name.clone(),
                ..q.worker_settings(4)
            },
        )
        .await;
    let client = client_at(&q, &node.url(), |s| s.name = client_name.clone()).await;
    let gateway_client = client_at(&q, &node.url(), |s| s.name = gateway_name.clone()).await;
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text_addr = text.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_gateway = stop.clone().drop_guard();
    let gateway = tokio::spawn(warren_gateway::serve(
        warren_gateway::GatewaySettings::default(),
        gateway_client.clone(),
        http,
        text,
        stop.clone(),
    ));
    let call = json!({"function": "echo", "args": "before"});
    assert_eq!(text_call(text_addr, call).await, json!("before"));
    assert_eq!(client.call(&Echo(json!(0))).await.unwrap(), json!(0));

    node.stop_app();
    // The outage itself (what is under test), then the time the issue gives processes to settle.
    tokio::time::sleep(Duration::from_secs(45)).await;
    node.start_app();
    tokio::time::sleep(Duration::from_secs(40)).await;

    let options = CallOptions::default().timeout(Duration::from_secs(30));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let (client, options) = (client.clone(), options.clone());
        calls.spawn(async move { client.call_with(&Echo(json!(i)), &options).await });
    }
    let mut answered = 0;
    while let Some(done) = calls.join_next().await {
        done.unwrap().unwrap();
        answered += 1;
    }
    assert_eq!(answered, 40);
    let call = json!({"function": "echo", "args": "after"});
    assert_eq!(text_call(text_addr, call).await, json!("after"));

    let worker_connections = connections_named(&node, &worker_name);
    assert_eq!(worker_connections.len(), 2, "{worker_connections:?}");
    assert!(worker_connections.iter().any(|c| c.contains("/consume")));
    assert!(worker_connections.iter().any(|c| c.contains("/publish")));
    assert_eq!(connections_named(&node, &client_name).len(), 1);
    // The gateway: its client's publish connection and the event stream tail's (resume).
    let gateway_connections = connections_named(&node, &gateway_name);
    assert_eq!(gateway_connections.len(), 2, "{gateway_connections:?}");
    assert!(gateway_connections.iter().any(|c| c.contains("/consume")));
    assert!(gateway_connections.iter().any(|c| c.contains("/publish")));
    assert_eq!(consumers_of(&node, &q.name), 1);
    assert_eq!(worker.health().state, WorkerState::Consuming);

    stop.cancel();
    let _ = gateway.await;
    worker.shutdown().await.unwrap();
}

/// Issue 12.1: a worker and a client given two addresses skip one that does not answer, and
/// move to the other node when the one they use is stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_and_a_client_with_two_addresses_move_to_the_live_node() {
    let a = BrokerNode::start("addr-a").await;
    let b = BrokerNode::start("addr-b").await;
    // Only `a` serves at first: whichever order each process shuffles the list into, both end
    // up on `a`, past the address that refuses.
    b.stop_app();
    let q = TestQueue::new("two-addresses");
    let urls = BrokerSettings::from_urls([a.url(), b.url()]);
    let (worker_name, client_name) = (unique_name("worker"), unique_name("client"));
    let worker = q
        .worker_with(
            registry(),
            WorkerSettings {
                broker: urls.clone(),
                name: worker_name.clone(),
                ..q.worker_settings(2)
            },
        )
        .await;
    let client = client_at(&q, &urls.url, |s| s.name = client_name.clone()).await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));
    assert_eq!(connections_named(&a, &worker_name).len(), 2);
    assert_eq!(connections_named(&a, &client_name).len(), 1);

    b.start_app();
    let stopped = Instant::now();
    a.stop_app();
    let options = CallOptions::default().timeout(Duration::from_secs(30));
    assert_eq!(
        client.call_with(&Echo(json!(2)), &options).await.unwrap(),
        json!(2)
    );
    eprintln!(
        "answered on the other node {:?} after the first stopped",
        stopped.elapsed()
    );
    assert_eq!(connections_named(&b, &worker_name).len(), 2);
    assert_eq!(connections_named(&b, &client_name).len(), 1);
    assert_eq!(consumers_of(&b, &q.name), 1);
    worker.shutdown().await.unwrap();
}

/// Issue 8.8: publishes in flight when the broker force-closes the connection are sent again on
/// the next connection (or reported as a lost connection), never as "the broker did not accept
/// the task".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_racing_a_forced_close_are_resent_not_refused() {
    let node = BrokerNode::start("forced-close").await;
    let q = TestQueue::new("forced-close");
    let client = client_at(&q, &node.url(), |_| {}).await;
    client.declare_queue(&q.name).await.unwrap();
    let confirmed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut enqueues = tokio::task::JoinSet::new();
    for i in 0..600 {
        let (client, confirmed) = (client.clone(), confirmed.clone());
        enqueues.spawn(async move {
            let result = client.enqueue(&Echo(json!(i))).await;
            if result.is_ok() {
                confirmed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            result
        });
    }
    eventually(
        "some enqueues confirmed",
        Duration::from_secs(30),
        || async { confirmed.load(std::sync::atomic::Ordering::SeqCst) >= 50 },
    )
    .await;
    node.ctl_ok(&["close_all_connections", "forced by the test"]);
    let (mut ok, mut lost) = (0, 0);
    while let Some(done) = enqueues.join_next().await {
        match done.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::ConnectionLost | Error::Unavailable(_)) => lost += 1,
            Err(other) => panic!("a publish racing the close was reported as {other:?}"),
        }
    }
    eprintln!("forced close during 600 enqueues: {ok} confirmed, {lost} reported lost");
    assert_eq!(ok + lost, 600);
    // Every confirmed task is in the queue (resent copies may add a few more).
    let ready = client.queue_stats(&q.name).await.unwrap().ready;
    assert!(ready as usize >= ok, "{ready} ready, {ok} confirmed");
}

/// Issue 8.4: during a 60 s memory alarm, a worker whose replies cannot be published stops
/// taking tasks and publishes once the alarm ends: no task runs more than twice, none is
/// parked, and every caller gets its one reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_settle_during_an_alarm_holds_its_tasks_instead_of_rerunning_them() {
    const CALLS: u64 = 20;
    let node = BrokerNode::start("alarm-settle").await;
    let q = TestQueue::new("alarm-settle");
    let dir = temp_dir("alarm-settle");
    let log = dir.path().join("runs.log");
    let worker = worker_at(&q, &node.url(), 4).await;
    let client = client_at(&q, &node.url(), |_| {}).await;
    let options = CallOptions::default().timeout(Duration::from_secs(150));
    let mut calls = tokio::task::JoinSet::new();
    for key in 0..CALLS {
        let (client, options) = (client.clone(), options.clone());
        let task = Record {
            key,
            log: log.to_string_lossy().into_owned(),
            work_ms: 500,
            started: None,
        };
        calls.spawn(async move { (key, client.call_with(&task, &options).await) });
    }
    eventually(
        "the first tasks to run",
        Duration::from_secs(30),
        || async { !read_runs(&log).is_empty() },
    )
    .await;
    node.ctl_ok(&["set_vm_memory_high_watermark", "0.00001"]);
    // The alarm itself (what is under test).
    tokio::time::sleep(Duration::from_secs(60)).await;
    node.ctl_ok(&["set_vm_memory_high_watermark", "0.4"]);

    let mut answered = std::collections::HashSet::new();
    while let Some(done) = calls.join_next().await {
        let (key, result) = done.unwrap();
        assert_eq!(result.unwrap(), key);
        assert!(answered.insert(key), "two answers for {key}");
    }
    assert_eq!(answered.len() as u64, CALLS);
    let runs = read_runs(&log);
    let most = runs.values().map(Vec::len).max().unwrap_or(0);
    eprintln!("60 s alarm over {CALLS} calls: the most runs of one task: {most}");
    assert!(most <= 2, "a task ran {most} times: {runs:?}");
    assert_eq!(q.dead_count(&client).await, 0);
    worker.shutdown().await.unwrap();
}

/// The peer ports of the connections on `node` named `prefix` (a new connection, a new port).
fn connection_ports(node: &BrokerNode, prefix: &str) -> std::collections::HashSet<String> {
    node.ctl_ok(&[
        "list_connections",
        "peer_port",
        "client_properties",
        "--no-table-headers",
        "-q",
    ])
    .lines()
    .filter(|line| line.contains(prefix))
    .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
    .collect()
}

/// Issue 12.2: with a connection lifetime, a worker and a client move to new connections between
/// tasks (so that connections spread back to a node that returned), and no call fails for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_move_on_after_their_lifetime_without_failing_a_call() {
    let node = BrokerNode::start("lifetime").await;
    let q = TestQueue::new("lifetime");
    let mut broker = BrokerSettings::new(node.url());
    broker.max_lifetime = Some(Duration::from_secs(1));
    let (worker_name, client_name) = (unique_name("worker"), unique_name("client"));
    let worker = q
        .worker_with(
            registry(),
            WorkerSettings {
                broker: broker.clone(),
                watchdog_interval: Duration::from_millis(200),
                name: worker_name.clone(),
                ..q.worker_settings(2)
            },
        )
        .await;
    let client = client_at(&q, &node.url(), |s| {
        s.broker = broker.clone();
        s.name = client_name.clone();
    })
    .await;
    assert_eq!(client.call(&Echo(json!(0))).await.unwrap(), json!(0));
    let (worker_before, client_before) = (
        connection_ports(&node, &worker_name),
        connection_ports(&node, &client_name),
    );
    assert_eq!((worker_before.len(), client_before.len()), (2, 1));

    // Two callers, each a call then a short pause, for a few lifetimes.
    let until = Instant::now() + Duration::from_secs(6);
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..2 {
        let client = client.clone();
        callers.spawn(async move {
            let mut calls = 0u32;
            while Instant::now() < until {
                let echoed = client.call(&Echo(json!([caller, calls]))).await;
                assert_eq!(echoed.unwrap(), json!([caller, calls]));
                calls += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            calls
        });
    }
    let mut calls = 0;
    while let Some(done) = callers.join_next().await {
        calls += done.unwrap();
    }
    eventually(
        "every connection replaced after its lifetime",
        Duration::from_secs(20),
        || async {
            let worker_now = connection_ports(&node, &worker_name);
            let client_now = connection_ports(&node, &client_name);
            worker_now.len() == 2
                && client_now.len() == 1
                && worker_now.is_disjoint(&worker_before)
                && client_now.is_disjoint(&client_before)
        },
    )
    .await;
    eprintln!("{calls} calls over 6 s of 1 s connection lifetimes: none failed");
    // The consumer moves with its connection every second: between the old connection's close
    // and the new one's consume there is none, so look until one is there (two would stay).
    eventually("exactly one consumer", Duration::from_secs(20), || async {
        consumers_of(&node, &q.name) == 1
    })
    .await;
    assert_eq!(
        client.call(&Echo(json!("end"))).await.unwrap(),
        json!("end")
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_tasks_survive_a_broker_kill_and_run_no_earlier_than_their_time() {
    const TASKS: u64 = 20;
    let mut node = BrokerNode::start("runat-kill").await;
    let q = TestQueue::new("runat-kill");
    let dir = temp_dir("runat-kill");
    let log = dir.path().join("runs.log");
    // Task events off: what is under test is the delay levels. (On this private node, killed,
    // the event stream's queue record kept pointing at the dead process for minutes, "home
    // node down"; a worker with events on takes no task while its stream is unavailable.)
    let worker = q
        .worker_with(
            registry(),
            WorkerSettings {
                broker: BrokerSettings::new(node.url()),
                watchdog_interval: Duration::from_millis(500),
                events: warren_worker::EventSettings {
                    enabled: false,
                    ..warren_worker::EventSettings::default()
                },
                ..q.worker_settings(8)
            },
        )
        .await;
    let client = client_at(&q, &node.url(), |_| {}).await;
    let mut due_ms = std::collections::HashMap::new();
    for key in 0..TASKS {
        let options = CallOptions::default().delay(Duration::from_secs(20 + key % 5));
        let due = options.run_at.unwrap();
        due_ms.insert(
            key,
            u64::try_from(
                due.duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis(),
            )
            .unwrap(),
        );
        let task = warren_tests::tasks::Record {
            key,
            log: log.to_string_lossy().into_owned(),
            work_ms: 0,
            started: None,
        };
        client.enqueue_with(&task, &options).await.unwrap();
    }

    // Killed (SIGKILL) and booted again with its data, while every task waits in the levels.
    let killed = Instant::now();
    node.restart().await;
    let down = killed.elapsed();
    eprintln!("broker killed and booted again in {down:?}");

    let every: std::collections::BTreeSet<u64> = (0..TASKS).collect();
    eventually(
        "every delayed task to run",
        Duration::from_secs(120),
        || async {
            read_runs(&log)
                .keys()
                .copied()
                .collect::<std::collections::BTreeSet<u64>>()
                == every
        },
    )
    .await;
    let mut late = Vec::new();
    for run in warren_tests::read_run_log(&log) {
        let due = due_ms[&run.key];
        assert!(
            run.started_ms >= due,
            "task {} ran {} ms before its time",
            run.key,
            due - run.started_ms
        );
        late.push(run.started_ms - due);
    }
    late.sort_unstable();
    eprintln!("run-at lateness after a broker kill (ms, sorted): {late:?}");
    worker.shutdown().await.unwrap();
}

/// A task that already went through the delay levels once carries the broker's `x-death`; a
/// worker that gets it early again must send it on without that record, or the broker takes
/// the next hop for a dead-lettering cycle and the task never leaves its level. On a private
/// node, so that a task stuck in a level cannot hold the shared broker's ladder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_task_with_an_x_death_from_an_earlier_trip_through_the_levels_still_runs() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, FieldArray, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    use warren_shared::delay;
    use warren_shared::protocol::headers;

    let node = BrokerNode::start("runat-xdeath").await;
    let q = TestQueue::new("runat-xdeath");
    let dir = temp_dir("runat-xdeath");
    let log = dir.path().join("runs.log");
    let worker = worker_at(&q, &node.url(), 2).await;

    let connection = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // As the broker records a task that expired out of level 0 (the 1 s level) earlier.
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert("reason".into(), AMQPValue::LongString("expired".into()));
    death.insert(
        "queue".into(),
        AMQPValue::LongString(delay::level_name(0).into()),
    );
    death.insert(
        "exchange".into(),
        AMQPValue::LongString(delay::level_name(0).into()),
    );
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            format!("q.{}", q.name).into(),
        )])),
    );
    let mut h = FieldTable::default();
    h.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    h.insert(
        "x-first-death-queue".into(),
        AMQPValue::LongString(delay::level_name(0).into()),
    );
    h.insert(
        "x-first-death-reason".into(),
        AMQPValue::LongString("expired".into()),
    );
    // Three seconds ahead: through levels 1 (2 s) and 0 (1 s), so level 1 dead-letters it
    // into level 0, the queue its x-death names.
    let due = std::time::SystemTime::now() + Duration::from_secs(3);
    let due_ms = i64::try_from(
        due.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    h.insert(headers::RUN_AT.into(), AMQPValue::LongLongInt(due_ms));
    let task = Record {
        key: 7,
        log: log.to_string_lossy().into_owned(),
        work_ms: 0,
        started: None,
    };
    let body = serde_json::to_vec(&json!({"function": "record", "args": task})).unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            q.name.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_headers(h),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());

    eventually("the task to run", Duration::from_secs(30), || async {
        read_runs(&log).len() == 1
    })
    .await;
    let run = &warren_tests::read_run_log(&log)[0];
    assert_eq!(run.key, 7);
    assert!(
        i64::try_from(run.started_ms).unwrap() >= due_ms,
        "ran before its time"
    );
    let _ = connection.close(200, "done".into()).await;
    worker.shutdown().await.unwrap();
}
