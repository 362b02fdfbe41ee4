//! Warren against broker faults: connections cut and frozen by a relay, a broker restart, a
//! queue deleted under a worker, a memory alarm. Tests here take turns (a broker restart or an
//! alarm affects every connection), and each restores the broker even when it fails.

// A failed unwrap is how a test says what went wrong.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use tokio::sync::Mutex;
use warren_client::{CallOptions, Client, ClientSettings, Error, ReplyMode};
use warren_shared::BrokerSettings;
use warren_shared::tasks::{Echo, Sleep};
use warren_tests::relay::Relay;
use warren_tests::tasks::Record;
use warren_tests::{TestQueue, amqp_url, enqueue_records, eventually, read_runs, temp_dir};
use warren_worker::{Registry, RunningWorker, WorkerSettings, WorkerState};

/// One fault at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn broker_addr() -> SocketAddr {
    let url: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    format!(
        "{}:{}",
        url.authority.host.replace("localhost", "127.0.0.1"),
        url.authority.port
    )
    .parse()
    .unwrap()
}

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

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The broker's relative memory high watermark now (e.g. `0.4`), to put back after an alarm.
fn watermark() -> String {
    let out = Command::new("rabbitmqctl")
        .args(["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        text.parse::<f64>().is_ok(),
        "unexpected watermark {text:?}; refusing to change it"
    );
    text
}

/// Runs `restore` when dropped, so that a failing test still gives the broker back.
struct Restore(Option<Box<dyn FnOnce()>>);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(restore) = self.0.take() {
            restore();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_lose_no_task_and_nobody_restarts() {
    let _serial = SERIAL.lock().await;
    const TASKS: u64 = 1000;
    let relay = Relay::start(broker_addr()).await;
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
    let relay = Relay::start(broker_addr()).await;
    let q = TestQueue::new("half-open");
    let heartbeat = 1;
    let url = relay.url(heartbeat);
    let worker = worker_at(&q, &url, 4).await;
    let client = client_at(&q, &url, |_| {}).await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));

    let frozen = Instant::now();
    relay.stall();
    eventually(
        "the client to notice the dead peer",
        Duration::from_secs(10),
        || async { !client.link_state().is_up() },
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
    let relay = Relay::start(broker_addr()).await;
    let q = TestQueue::new("inflight-cut");
    // The worker talks to the broker directly; only the caller's connection is cut.
    let worker = q.worker(registry(), 2).await;
    let client = client_at(&q, &relay.url(5), |_| {}).await;

    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .call_with(
                    &Sleep { ms: 3_000 },
                    &CallOptions::default().timeout(Duration::from_secs(30)),
                )
                .await;
            (started.elapsed(), result)
        })
    };
    eventually(
        "the call to reach the worker",
        Duration::from_secs(10),
        || async { worker.health().in_flight == 1 },
    )
    .await;
    relay.cut();
    let (elapsed, result) = call.await.unwrap();
    assert!(matches!(result, Err(Error::ConnectionLost)), "{result:?}");
    assert!(
        elapsed < Duration::from_secs(3),
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
    let relay = Relay::start(broker_addr()).await;
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
    let _serial = SERIAL.lock().await;
    const TASKS: u64 = 1000;
    let q = TestQueue::new("restart");
    let dir = temp_dir("restart");
    let log = dir.path().join("runs.log");
    let worker = q.worker(registry(), 8).await;
    let client = q.client().await;
    enqueue_records(&client, &log, 0..TASKS, 5, None).await;

    eventually(
        "a third of the batch done",
        Duration::from_secs(60),
        || async { read_runs(&log).len() as u64 >= TASKS / 3 },
    )
    .await;
    let _restore = Restore(Some(Box::new(|| {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    })));
    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);

    eventually("every task to run", Duration::from_secs(120), || async {
        read_runs(&log).len() as u64 == TASKS
    })
    .await;
    let duplicates = read_runs(&log).values().filter(|r| r.len() > 1).count();
    eprintln!("broker restart over {TASKS} tasks: all ran; {duplicates} ran more than once");
    assert_eq!(worker.health().state, WorkerState::Consuming);
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
    let _serial = SERIAL.lock().await;
    let q = TestQueue::new("alarm");
    let dir = temp_dir("alarm");
    let log = dir.path().join("runs.log");
    let client = q
        .client_with(|s: &mut ClientSettings| {
            s.reconnect_wait = Duration::from_secs(2);
            s.publish_timeout = Duration::from_secs(2);
        })
        .await;
    client.declare_queue(&q.name).await.unwrap();
    // Work queued before the alarm, slow enough to still be running during it.
    enqueue_records(&client, &log, 0..40, 100, None).await;
    let worker = q.worker(registry(), 1).await;

    let original = watermark();
    let _restore = Restore(Some(Box::new({
        let original = original.clone();
        move || {
            let _ = Command::new("rabbitmqctl")
                .args(["set_vm_memory_high_watermark", &original])
                .output();
        }
    })));
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
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
    // Consumers on their own connection kept running and acking meanwhile.
    assert!(
        read_runs(&log).len() > done_at_alarm,
        "no task completed during the alarm"
    );

    // A producer faster than the broker accepts is held at its bound of publishes in flight
    // (the rest wait their turn), not buffered without limit.
    let bounded = q
        .client_with(|s: &mut ClientSettings| {
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

    rabbitmqctl(&["set_vm_memory_high_watermark", &original]);
    let client = q.client().await;
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
    let relay = Relay::start(broker_addr()).await;
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
    let relay = Relay::start(broker_addr()).await;
    let q = TestQueue::new("client-replace");
    let worker = q.worker(registry(), 2).await;
    let client = client_at(&q, &relay.url(5), |s| {
        // lapin tries once, then gives up: the client's own supervisor must take over.
        s.broker.reconnect.max_attempts = Some(1);
        // Long enough for the supervisor's backoff (up to 10 s between attempts) twice over.
        s.reconnect_wait = Duration::from_secs(60);
    })
    .await;
    assert_eq!(client.call(&Echo(json!(1))).await.unwrap(), json!(1));

    relay.refuse();
    relay.cut();
    eventually(
        "lapin to give up on the connection",
        Duration::from_secs(30),
        || async { client.link_state() == warren_shared::link::LinkState::Closed },
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
    let relay = Relay::start(broker_addr()).await;
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
