//! The delivery contract where a worker process dies or is told to stop: workers here are
//! `warren-test-worker` processes, killed with SIGKILL or stopped with SIGTERM by the test.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use warren_client::Client;
use warren_tests::tasks::Crash;
use warren_tests::{ChildGuard, TestQueue, amqp_url, enqueue_records, eventually, temp_dir};

fn test_worker(queue: &str, concurrency: u16, grace: &str) -> ChildGuard {
    let mut command = Command::new(env!("CARGO_BIN_EXE_warren-test-worker"));
    command
        .args([
            "--queue",
            queue,
            "--concurrency",
            &concurrency.to_string(),
            "--shutdown-grace",
            grace,
        ])
        .env("AMQP_URL", amqp_url())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
        );
    ChildGuard::spawn(command)
}

/// How many `record` tasks have started (see [`enqueue_records`]).
fn started(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn runs(log: &Path) -> HashMap<u64, Vec<(u32, bool)>> {
    warren_tests::read_runs(log)
}

async fn consumers(client: &Client, queue: &str) -> u32 {
    client
        .queue_stats(queue)
        .await
        .map(|s| s.consumers)
        .unwrap_or(0)
}

async fn ready(client: &Client, queue: &str) -> u32 {
    client
        .queue_stats(queue)
        .await
        .map(|s| s.ready)
        .unwrap_or(u32::MAX)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_workers_mid_batch_loses_no_task() {
    const TASKS: u64 = 1000;
    const CONCURRENCY: u16 = 8;
    let q = TestQueue::new("kill9");
    let dir = temp_dir("kill9");
    let log = dir.path().join("runs.log");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();

    let mut a = test_worker(&q.name, CONCURRENCY, "10s");
    let mut b = test_worker(&q.name, CONCURRENCY, "10s");
    let _c = test_worker(&q.name, CONCURRENCY, "10s");
    eventually(
        "three workers consuming",
        Duration::from_secs(20),
        || async { consumers(&client, &q.name).await == 3 },
    )
    .await;
    enqueue_records(&client, &log, 0..TASKS, 3, None).await;

    // Kill one worker while the others keep running, then start a replacement for it.
    eventually(
        "a third of the batch done",
        Duration::from_secs(30),
        || async { runs(&log).len() as u64 >= TASKS / 3 },
    )
    .await;
    a.signal(Signal::SIGKILL);
    assert!(
        a.wait_timeout(Duration::from_secs(5)).is_some(),
        "worker a survived SIGKILL"
    );
    let _a2 = test_worker(&q.name, CONCURRENCY, "10s");

    // Kill a second one and do not replace it.
    eventually(
        "two thirds of the batch done",
        Duration::from_secs(30),
        || async { runs(&log).len() as u64 >= 2 * TASKS / 3 },
    )
    .await;
    b.signal(Signal::SIGKILL);
    assert!(
        b.wait_timeout(Duration::from_secs(5)).is_some(),
        "worker b survived SIGKILL"
    );

    eventually("every task to run", Duration::from_secs(60), || async {
        runs(&log).len() as u64 == TASKS
    })
    .await;
    eventually("the queue to drain", Duration::from_secs(30), || async {
        ready(&client, &q.name).await == 0
    })
    .await;

    let runs = runs(&log);
    let duplicates: Vec<_> = runs
        .iter()
        .filter(|(_, r)| r.len() > 1)
        .map(|(k, _)| *k)
        .collect();
    eprintln!(
        "kill -9 x2 over {TASKS} tasks: every task ran; {} ran twice: {duplicates:?}",
        duplicates.len()
    );
    assert!((0..TASKS).all(|k| runs.contains_key(&k)));
    // Only a killed worker's in-flight tasks can run again.
    assert!(
        duplicates.len() <= 2 * CONCURRENCY as usize,
        "{} duplicates",
        duplicates.len()
    );
    assert_eq!(q.dead_count(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_kills_every_worker_ends_in_the_dead_letter_queue() {
    let q = TestQueue::new("crashloop");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    client.enqueue(&Crash {}).await.unwrap();

    // A supervisor, as systemd or Kubernetes would be: restart the worker whenever it dies.
    let started = Instant::now();
    let mut worker = test_worker(&q.name, 1, "1s");
    let mut restarts = 0;
    while q.dead_count(&client).await == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "still not dead-lettered after {restarts} restarts"
        );
        if worker.wait_timeout(Duration::from_millis(50)).is_some() {
            restarts += 1;
            worker = test_worker(&q.name, 1, "1s");
        }
    }
    let dead = client.dead_letters(&q.name, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "delivery_limit");
    assert_eq!(dead[0].function.as_deref(), Some("crash"));
    // The queue's delivery limit (10) let it kill a worker at most 11 times, not forever.
    assert!((1..=11).contains(&restarts), "{restarts} restarts");
    assert_eq!(ready(&client, &q.name).await, 0);
    eprintln!("crash loop: dead-lettered after {restarts} worker deaths");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_tasks_finish_then_exits_zero() {
    let q = TestQueue::new("sigterm");
    let dir = temp_dir("sigterm");
    let log = dir.path().join("runs.log");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();

    let mut worker = test_worker(&q.name, 4, "10s");
    eventually("the worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    let start_log = dir.path().join("started.log");
    enqueue_records(&client, &log, 0..4, 1500, Some(&start_log)).await;
    eventually(
        "all four tasks running",
        Duration::from_secs(10),
        || async { started(&start_log) == 4 },
    )
    .await;

    let signalled = Instant::now();
    worker.signal(Signal::SIGTERM);
    let status = worker
        .wait_timeout(Duration::from_secs(10))
        .expect("worker did not exit within its grace period");
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(10));

    let runs = runs(&log);
    assert_eq!(
        runs.len(),
        4,
        "in-flight tasks did not all finish: {runs:?}"
    );
    assert!(runs.values().all(|r| r.len() == 1));
    // Nothing handed back: every task was acked before the worker left.
    assert_eq!(ready(&client, &q.name).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_still_running_at_the_end_of_the_grace_period_goes_to_another_worker() {
    let q = TestQueue::new("handback");
    let dir = temp_dir("handback");
    let log = dir.path().join("runs.log");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();

    let mut first = test_worker(&q.name, 1, "300ms");
    eventually(
        "the first worker consuming",
        Duration::from_secs(20),
        || async { consumers(&client, &q.name).await == 1 },
    )
    .await;
    let start_log = dir.path().join("started.log");
    enqueue_records(&client, &log, 7..8, 2500, Some(&start_log)).await;
    eventually("the task running", Duration::from_secs(10), || async {
        started(&start_log) == 1
    })
    .await;

    let second = test_worker(&q.name, 1, "10s");
    eventually(
        "the second worker consuming",
        Duration::from_secs(20),
        || async { consumers(&client, &q.name).await == 2 },
    )
    .await;
    first.signal(Signal::SIGTERM);
    let status = first
        .wait_timeout(Duration::from_secs(5))
        .expect("first worker did not exit after its grace period");
    assert!(status.success(), "exit status {status}");

    eventually(
        "the handed-back task to run",
        Duration::from_secs(15),
        || async { runs(&log).contains_key(&7) },
    )
    .await;
    let runs = runs(&log);
    let second_pid = second.pid().as_raw() as u32;
    assert_eq!(
        runs[&7],
        vec![(second_pid, true)],
        "expected one run, on the second worker, as a redelivery"
    );
}

/// A queue another application declared plainly (a classic queue, no arguments) cannot be
/// Warren's work queue: the worker exits at once, non-zero, naming the queue, the differing
/// argument and the fix, instead of retrying forever.
#[tokio::test]
async fn a_worker_exits_once_naming_the_fix_when_its_queue_exists_with_other_arguments() {
    let q = TestQueue::new("plain");
    {
        let (connection, channel) = warren_tests::raw_channel().await;
        channel
            .queue_declare(
                q.name.as_str().into(),
                lapin::options::QueueDeclareOptions::durable(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "declared".into()).await;
    }
    let child = tokio::process::Command::new(warren_tests::binary("warren-worker"))
        .args(["--queue", &q.name])
        .env("AMQP_URL", amqp_url())
        .env(
            "WARREN_FUNCTIONS_EXCHANGE",
            warren_tests::functions_exchange_of(&q.name),
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the worker kept running on a queue it cannot use")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(stderr.contains(&format!("queue {:?}", q.name)), "{stderr}");
    assert!(stderr.contains("inequivalent arg 'x-"), "{stderr}");
    assert!(
        stderr.contains(&format!("rabbitmqctl delete_queue {}", q.name)),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("warren-worker: error").count(),
        1,
        "one error, once: {stderr}"
    );
}

/// The seed's `kill -9` of a task process, through the gateway (issue 13 point 4): a worker
/// process is SIGKILLed while `send_mail` tasks arrive over the Text bridge, each on a new
/// connection as a Workerman front opens them. Every task is still answered with its receipt,
/// and every answered mail is in the outbox: none is lost (the killed worker's unacknowledged
/// tasks go back to the queue when its connection drops, and another worker runs them; a mail
/// file is named by its task id, so a rerun rewrites its own file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_worker_mid_load_of_send_mail_through_the_gateway_loses_no_mail() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    const TASKS: usize = 600;
    const CLIENTS: usize = 10;
    let q = TestQueue::new("kill9-mail");
    let outbox = temp_dir("kill9-mail");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let out = outbox.path().to_string_lossy().into_owned();
    let worker_flags = ["--outbox", out.as_str(), "--concurrency", "8"];
    let mut victim = ChildGuard::worker(&q.name, &worker_flags);
    let _others: Vec<ChildGuard> = (0..2)
        .map(|_| ChildGuard::worker(&q.name, &worker_flags))
        .collect();
    eventually(
        "three workers consuming",
        Duration::from_secs(20),
        || async { consumers(&client, &q.name).await == 3 },
    )
    .await;

    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let text = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = text.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let gateway = tokio::spawn(warren_gateway::serve(
        warren_gateway::GatewaySettings {
            call_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(1),
            ..Default::default()
        },
        client.clone(),
        http,
        text,
        stop.clone(),
    ));

    // CLIENTS loops, one new connection per task; the worker dies after a third are answered.
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let victim_pid = victim.pid();
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (next, answered) = (next.clone(), answered.clone());
        loops.spawn(async move {
            let mut answers = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= TASKS {
                    return answers;
                }
                let line = serde_json::json!({"function": "send_mail", "args": {
                    "from": "shop@example.com",
                    "to": format!("user{i}@example.com"),
                    "contents": "Your order has shipped.",
                }});
                let mut stream =
                    BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
                stream
                    .get_mut()
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .unwrap();
                let mut answer = String::new();
                tokio::time::timeout(Duration::from_secs(60), stream.read_line(&mut answer))
                    .await
                    .expect("an answer within 60 s")
                    .unwrap();
                if answered.fetch_add(1, Ordering::SeqCst) + 1 == TASKS / 3 {
                    let _ = nix::sys::signal::kill(victim_pid, Signal::SIGKILL);
                }
                answers.push((i, answer));
            }
        });
    }
    let mut answers = Vec::new();
    while let Some(joined) = loops.join_next().await {
        answers.extend(joined.unwrap());
    }
    assert!(
        victim.wait_timeout(Duration::from_secs(5)).is_some(),
        "the worker survived SIGKILL"
    );
    stop.cancel();
    gateway.await.unwrap();

    // Every task answered with its receipt, and every receipt's file in the outbox.
    assert_eq!(answers.len(), TASKS);
    let files: std::collections::HashSet<String> = std::fs::read_dir(outbox.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".eml") && !name.starts_with('.'))
        .collect();
    let mut lost = Vec::new();
    for (i, answer) in &answers {
        let receipt: serde_json::Value = serde_json::from_str(answer)
            .unwrap_or_else(|e| panic!("task {i}: answer {answer:?} is not JSON: {e}"));
        let file = receipt["delivered_to"]
            .as_str()
            .and_then(|d| d.strip_prefix("outbox:"))
            .unwrap_or_else(|| panic!("task {i} was not delivered: {receipt}"));
        if !files.contains(file) {
            lost.push(*i);
        }
    }
    eprintln!(
        "kill -9 of 1 of 3 workers over {TASKS} send_mail tasks through the gateway: {} answered, {} .eml files, mails lost: {}",
        answers.len(),
        files.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "answered but not in the outbox: {lost:?}");
    assert_eq!(files.len(), TASKS, "one .eml per task");
    assert_eq!(q.dead_count(&client).await, 0);
    client.close().await;
}

/// SIGHUP is a pool reload (or a closed terminal), never a stop, also for a worker without
/// pools. Sent before SIGTERM, it is delivered first (Linux delivers pending standard signals
/// lowest number first): had it stopped the worker, the worker would be killed by SIGHUP
/// instead of draining on SIGTERM and exiting 0. Then the worker answers a call after the
/// SIGHUP alone.
#[tokio::test]
async fn sighup_does_not_stop_a_worker_without_pools() {
    let q = TestQueue::new("sighup-plain");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let mut worker = ChildGuard::worker(&q.name, &[]);
    eventually("the worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    worker.signal(Signal::SIGHUP);
    let echoed = client
        .call_json("echo", serde_json::json!({"x": 1}))
        .await
        .unwrap();
    assert_eq!(echoed, serde_json::json!({"x": 1}));
    worker.signal(Signal::SIGHUP);
    worker.signal(Signal::SIGTERM);
    let status = worker
        .wait_timeout(Duration::from_secs(20))
        .expect("the worker did not exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
}
