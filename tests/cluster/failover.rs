//! Issue 12.3 and 12.6: a 3-node cluster set up from `deploy/rabbitmq/definitions.json`, three
//! worker processes, a client and the gateway given all three addresses; during a batch of
//! tasks that lasts until both failures are over and two streams of calls, the node with the most of their connections is
//! stopped and started again, then the event stream's leader is killed and restarted (the work
//! queue's leader with it, when one node leads both). In the end every task that ran has its
//! final event in the stream, and no task was acked without it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;
use warren_client::{CallOptions, Client, Error};
use warren_shared::TaskId;
use warren_shared::events::{self, Event, EventKind, Start};
use warren_shared::tasks::Echo;
use warren_tests::cluster::Cluster;
use warren_tests::deploy::{self, QUEUE, VHOST};
use warren_tests::node::NodeOptions;
use warren_tests::tasks::{Record, unix_millis};
use warren_tests::{ChildGuard, RecordedRun, binary, eventually, read_run_log, temp_dir};

use super::{
    CONCURRENCY, SERIAL, blocking, connections, consumers, expect_own_connections, give_passwords,
    longest_pause, producer_client, start_workers, test_worker_path,
};

/// Runs before the first failure, and between the first node's return and the second failure:
/// the producer keeps sending until both failures are over, so that the load lasts through
/// them however fast the machine runs the tasks.
const RUNS_BEFORE_FAILURE: u64 = 2_000;
/// A bound on the batch, should the failures never end.
const MAX_TASKS: u64 = 40_000;
/// Reading the event stream after the batch: its end is where nothing more comes for this long.
const STREAM_END_QUIET: Duration = Duration::from_secs(5);
const WORKERS: usize = 3;
/// Each task's work: 3 workers x 4 slots / 50 ms, about 240 tasks/s at most, so that the batch
/// lasts through both failures.
const WORK_MS: u64 = 50;
/// Enqueues awaiting their confirms at once.
const PUBLISHES_IN_FLIGHT: usize = 64;
/// Tasks confirmed but not yet run, at most: the producer waits for the workers beyond it, so
/// that calls queue behind a bounded backlog (calls and bulk share the queue here).
const BACKLOG: usize = 250;
/// Processing must resume within this after each failure.
const RESUME_BOUND: Duration = Duration::from_secs(5);
/// Processing must resume within this after a failure that kills the event stream's leader:
/// an append in flight to the dead leader may wait out the worker's publish timeout (10 s)
/// before its task is handed back.
const STREAM_RESUME_BOUND: Duration = Duration::from_secs(15);
/// The event stream the workers append to: the definitions' (and the workers' default) name.
const STREAM: &str = events::DEFAULT_STREAM;

/// What one call (through the client or the gateway) came to.
#[derive(Debug, Clone)]
struct CallRecord {
    started_ms: u64,
    ended_ms: u64,
    /// `None` for a result, else the error's kind.
    error: Option<String>,
    /// The error's message.
    message: String,
}

/// Two failures, measured.
#[derive(Debug)]
struct Failure {
    what: &'static str,
    /// Every worker takes tasks again within this.
    bound: Duration,
    at_ms: u64,
    observed_until_ms: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_loses_no_task_when_the_clients_node_and_then_the_queue_leader_fail() {
    let _serial = SERIAL.lock().await;
    warren_tests::init_tracing();
    let began = Instant::now();
    let mut cluster = Cluster::start(
        "cluster",
        3,
        NodeOptions {
            config: deploy::load_definitions_config(),
            ..NodeOptions::default()
        },
    )
    .await;
    let booted = began.elapsed();
    // Where the time goes (the whole binary must stay well within CI's budget).
    let phase = |what: &str| {
        eprintln!(
            "cluster test +{:.1} s: {what}",
            began.elapsed().as_secs_f64()
        )
    };

    // The definitions were loaded at boot (no guest user: the node seeds none when it loads
    // definitions); the operator then gives the users passwords with users.sh.
    let first = &cluster.nodes()[0];
    blocking(|| {
        let users = deploy::users(first);
        for user in ["warren-app", "warren-worker", "warren-ops"] {
            assert!(users.iter().any(|u| u == user), "{user} missing: {users:?}");
        }
        assert!(!users.iter().any(|u| u == "guest"), "{users:?}");
    });
    let passwords = give_passwords(first);
    let worker_urls = cluster.urls_as("warren-worker", &passwords.worker, VHOST);
    let producer_urls = cluster.urls_as("warren-app", &passwords.producer, VHOST);

    let dir = temp_dir("cluster");
    let log = dir.path().join("runs.log");
    // Each worker serves its metrics: `warren_worker_event_appends_failed_total` is judged
    // in the end.
    let metrics: Vec<SocketAddr> = (0..WORKERS).map(|_| free_port()).collect();
    let workers = metrics
        .iter()
        .map(|addr| {
            let mut command = Command::new(test_worker_path());
            command.args(["--metrics", &addr.to_string()]);
            (command, worker_urls.clone())
        })
        .collect();
    let (mut workers, worker_pids) =
        start_workers(workers, CONCURRENCY, || consumers(|a| cluster.ctl_any(a))).await;
    // Warren's quorum queue has a member on every node, and the definitions' policy applies.
    let members = blocking(|| cluster.queue_members(VHOST, QUEUE, "members"));
    assert_eq!(members, cluster.names());
    let policy = blocking(|| cluster.queue_item(VHOST, QUEUE, "policy"));
    assert_eq!(policy, json!("warren-leaders"));
    // The workers declared the event stream (they may: the definitions let them configure
    // it), with a replica on every node.
    let stream_type = blocking(|| cluster.queue_item(VHOST, STREAM, "type"));
    assert_eq!(stream_type, json!("stream"));
    let replicas = blocking(|| cluster.queue_members(VHOST, STREAM, "members"));
    assert_eq!(replicas, cluster.names());

    // The caller: an in-process client, as the producer user, declaring nothing.
    let client_name = format!("cluster-client-{}", uuid::Uuid::new_v4().simple());
    let client = producer_client(producer_urls.clone(), &client_name).await;
    // The gateway binary, as the producer user too.
    let (gateway, text_addr) = start_gateway(&producer_urls).await;
    let gateway_pid = u32::try_from(gateway.pid().as_raw()).unwrap();
    let ready = Instant::now();

    // The load: the batch, calls through the client, calls through the gateway.
    let ran = Arc::new(AtomicUsize::new(0));
    let stop_calls = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_runs(log.clone(), ran.clone(), stop_calls.clone()));
    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = tokio::spawn(produce(
        client.clone(),
        log.clone(),
        ran.clone(),
        stop_producing.clone(),
    ));
    let client_calls = tokio::spawn(call_stream(client.clone(), stop_calls.clone()));
    let gateway_calls = tokio::spawn(text_call_stream(text_addr, stop_calls.clone()));

    // Failure 1: stop the node that holds most of the processes' connections (not the queue
    // leader: a leader dies in failure 2), then start it again.
    eventually(
        "the first runs of the batch",
        Duration::from_secs(120),
        || async { ran.load(Ordering::SeqCst) as u64 >= RUNS_BEFORE_FAILURE },
    )
    .await;
    let leader = blocking(|| cluster.queue_leader(VHOST, QUEUE));
    let on_each_node = blocking(|| connections(|a| cluster.ctl_any(a)));
    let busiest = cluster
        .nodes()
        .iter()
        .map(|n| n.name().to_owned())
        .filter(|n| *n != leader)
        .max_by_key(|n| on_each_node.iter().filter(|c| &c.node == n).count())
        .unwrap();
    let moved = on_each_node.iter().filter(|c| c.node == busiest).count();
    assert!(moved > 0, "no connection on a follower: {on_each_node:?}");
    let victim = cluster.index_of(&busiest).unwrap();
    phase("failure 1");
    let stopped_at = unix_millis();
    blocking(|| cluster.nodes()[victim].stop_app());
    let first_failure = observe_resumption(
        "node stopped",
        RESUME_BOUND,
        stopped_at,
        &log,
        &worker_pids,
        &cluster,
    )
    .await;
    phase("failure 1: resumed");
    blocking(|| cluster.nodes()[victim].start_app());
    eventually(
        "the node's queue member and stream replica back online",
        Duration::from_secs(60),
        || async {
            blocking(|| {
                cluster.queue_members(VHOST, QUEUE, "online") == cluster.names()
                    && cluster.queue_members(VHOST, STREAM, "online") == cluster.names()
            })
        },
    )
    .await;

    // Failure 2: kill the event stream leader's node (a crash) mid-load, then boot it again.
    // When that node leads the work queue too, both elect new leaders; when not, the queue
    // keeps its leader (it lost a follower) and only the stream elects one.
    let back = ran.load(Ordering::SeqCst) as u64;
    eventually(
        "more runs of the batch",
        Duration::from_secs(120),
        || async { ran.load(Ordering::SeqCst) as u64 >= back + RUNS_BEFORE_FAILURE },
    )
    .await;
    let leader = blocking(|| cluster.queue_leader(VHOST, QUEUE));
    let stream_leader = blocking(|| cluster.queue_leader(VHOST, STREAM));
    let both = stream_leader == leader;
    let victim = cluster.index_of(&stream_leader).unwrap();
    phase("failure 2");
    let killed_at = unix_millis();
    cluster.node_mut(victim).kill();
    let second_failure = observe_resumption(
        if both {
            "queue and stream leader killed"
        } else {
            "stream leader killed"
        },
        STREAM_RESUME_BOUND,
        killed_at,
        &log,
        &worker_pids,
        &cluster,
    )
    .await;
    let new_leader = blocking(|| cluster.queue_leader(VHOST, QUEUE));
    let new_stream_leader = blocking(|| cluster.queue_leader(VHOST, STREAM));
    assert_ne!(new_stream_leader, stream_leader);
    if both {
        assert_ne!(new_leader, leader);
    } else {
        assert_eq!(new_leader, leader, "the queue's leader did not fail");
    }
    phase("failure 2: resumed");
    cluster.node_mut(victim).restart().await;
    phase("failure 2: node booted again");
    // It booted with the definitions settings again; skip_if_unchanged kept the passwords.
    blocking(|| {
        let rebooted = &cluster.nodes()[victim];
        rebooted.ctl_ok(&["authenticate_user", "warren-worker", &passwords.worker]);
    });
    eventually(
        "every queue member and stream replica online again",
        Duration::from_secs(60),
        || async {
            blocking(|| {
                cluster.queue_members(VHOST, QUEUE, "online") == cluster.names()
                    && cluster.queue_members(VHOST, STREAM, "online") == cluster.names()
            })
        },
    )
    .await;

    // The end of the batch: every confirmed task ran.
    phase("failures over; the rest of the batch");
    stop_producing.store(true, Ordering::SeqCst);
    let (confirmed, confirmed_ids, failed_enqueues, tasks) = producer.await.unwrap();
    assert_eq!(
        confirmed.len() as u64,
        tasks,
        "every task confirmed in the end"
    );
    eventually(
        "every confirmed task to run",
        Duration::from_secs(120),
        || async {
            let done: HashSet<u64> = read_run_log(&log).iter().map(|r| r.key).collect();
            confirmed.iter().all(|k| done.contains(k))
        },
    )
    .await;
    stop_calls.store(true, Ordering::SeqCst);
    let client_calls = client_calls.await.unwrap();
    let gateway_calls = gateway_calls.await.unwrap();
    watcher.await.unwrap();

    // Every task settled (nothing ready or unacked): each acked task's final event was
    // confirmed before its ack, so the stream now holds all of them.
    eventually(
        "the work queue to drain",
        Duration::from_secs(60),
        || async { blocking(|| cluster.queue_item(VHOST, QUEUE, "messages")) == json!(0) },
    )
    .await;
    phase("the queue drained");
    let read_began = Instant::now();
    let stream =
        read_stream(&cluster.nodes()[0].url_as("warren-app", &passwords.producer, VHOST)).await;
    let read_took = read_began.elapsed();
    phase("the stream read");
    let appends_failed: Vec<f64> = metrics
        .iter()
        .map(|addr| scrape(*addr, "warren_worker_event_appends_failed_total", &[]))
        .collect();
    let ok = |addr: &SocketAddr| scrape(*addr, "warren_worker_tasks_total", &[("outcome", "ok")]);
    let acked_ok: f64 = metrics.iter().map(ok).sum();
    let redelivered: f64 = metrics
        .iter()
        .map(|addr| scrape(*addr, "warren_worker_redeliveries_total", &[]))
        .sum();
    let handed_back: f64 = metrics
        .iter()
        .map(|addr| {
            scrape(
                *addr,
                "warren_worker_tasks_total",
                &[("outcome", "handed_back")],
            )
        })
        .sum();

    // Every process is back to exactly its own connections and consumers.
    let gateway_name = format!("warren-gateway@{}:{gateway_pid}", super::gethostname());
    expect_own_connections(
        |a| cluster.ctl_any(a),
        &worker_pids,
        std::slice::from_ref(&client_name),
        &[gateway_name],
        Duration::from_secs(30),
    )
    .await;
    for worker in &mut workers {
        assert!(
            worker.wait_timeout(Duration::ZERO).is_none(),
            "a worker process exited"
        );
    }

    // The figures.
    let runs = read_run_log(&log);
    let report = Report::new(&runs, &worker_pids, &confirmed, &failed_enqueues);
    let failures = [&first_failure, &second_failure];
    eprintln!(
        "cluster of 3 up in {booted:?}, processes ready after {:?}, whole test {:?}",
        ready - began,
        began.elapsed()
    );
    eprintln!(
        "failure 1 moved {moved} connections off {busiest}; failure 2 killed stream leader \
         {stream_leader}, new stream leader {new_stream_leader}; queue leader {leader} before, \
         {new_leader} after"
    );
    let bound = duplicate_bound(
        &failed_enqueues,
        failures.len(),
        appends_failed.iter().sum(),
    );
    report.print(bound);
    eprintln!(
        "event stream: {} messages read by the producer user in {read_took:?}, {} events \
         without duplicates, {} tasks; {} succeeded events appended for {acked_ok} tasks \
         acked ok; appends failed per worker {appends_failed:?}, tasks handed back \
         {handed_back}, redelivered {redelivered}",
        stream.read,
        stream.unique,
        stream.tasks.len(),
        stream.succeeded_appended,
    );
    stream.check(&runs, &confirmed_ids);
    // The counters are read: each worker answered with its tasks.
    assert!(acked_ok >= tasks as f64, "{acked_ok} tasks acked ok");
    // No task acked without its event: each `ok` settlement appended a confirmed `succeeded`
    // event before its ack (a duplicate when the ack was lost and the task ran again).
    assert!(
        stream.succeeded_appended as f64 >= acked_ok,
        "{acked_ok} tasks acked ok, only {} succeeded events in the stream",
        stream.succeeded_appended
    );
    // A failed append hands its task back (and the task ran again: every run has its event,
    // checked above).
    let failed: f64 = appends_failed.iter().sum();
    assert!(
        failed <= handed_back,
        "{failed} failed appends, {handed_back} tasks handed back"
    );
    assert!(
        failed <= redelivered,
        "{failed} failed appends, {redelivered} tasks redelivered"
    );
    for failure in &failures {
        let pauses = failure.pauses(&runs, &worker_pids);
        let calls = call_resumption(&client_calls, failure.at_ms);
        let text = call_resumption(&gateway_calls, failure.at_ms);
        eprintln!(
            "{}: processing paused at most {} ms (whole fleet {} ms, per worker {:?}); first \
             answered call started after it: client {calls:?} ms, gateway {text:?} ms after",
            failure.what,
            pauses.iter().max().unwrap(),
            failure.fleet_pause(&runs),
            pauses,
        );
        for pause in &pauses {
            assert!(
                Duration::from_millis(*pause) <= failure.bound,
                "{}: a worker stopped processing for {pause} ms",
                failure.what
            );
        }
    }
    for (what, calls) in [("client", &client_calls), ("gateway", &gateway_calls)] {
        let errors: BTreeMap<&str, usize> =
            calls
                .iter()
                .filter_map(|c| c.error.as_deref())
                .fold(BTreeMap::new(), |mut m, e| {
                    *m.entry(e).or_default() += 1;
                    m
                });
        eprintln!(
            "{what}: {} calls, {} answered with a result, errors {errors:?}",
            calls.len(),
            calls.iter().filter(|c| c.error.is_none()).count()
        );
        for c in calls.iter().filter(|c| c.error.is_some()).take(5) {
            eprintln!(
                "  {} ms after the start: {:?} {}",
                c.started_ms - calls[0].started_ms,
                c.error,
                c.message
            );
        }
        assert!(calls.len() > 20, "{what}: too few calls to judge");
        // Every call got its answer within its timeout plus a margin: none hung.
        let longest = calls.iter().map(|c| c.ended_ms - c.started_ms).max();
        assert!(
            longest.unwrap_or(0) <= 25_000,
            "{what}: a call took {longest:?} ms"
        );
        for error in errors.keys() {
            assert!(
                ["connection_lost", "unavailable", "timeout", "nacked"].contains(error),
                "{what}: unexpected error kind {error}"
            );
        }
    }
    assert!(
        report.duplicates <= bound,
        "{} duplicates (bound {bound})",
        report.duplicates
    );
    assert!(
        began.elapsed() < Duration::from_secs(180),
        "the cluster test took {:?}; CI gives it 3 minutes",
        began.elapsed()
    );
    client.close().await;
}

/// At most this many extra runs: per failure, every worker's in-flight deliveries
/// (`CONCURRENCY`, when its connection or its queue leader goes) and every unconfirmed publish
/// of the producer (sent again on its next connection); each enqueue that failed for a lost
/// connection and was sent again (a nacked one was not taken); and each task handed back
/// because its event could not be appended (`appends_failed`).
fn duplicate_bound(
    failed_enqueues: &BTreeMap<String, usize>,
    failures: usize,
    appends_failed: f64,
) -> usize {
    let resent: usize = failed_enqueues
        .iter()
        .filter(|(kind, _)| kind.as_str() != "nacked")
        .map(|(_, n)| n)
        .sum();
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a count
    let handed_back = appends_failed as usize;
    failures * (WORKERS * usize::from(CONCURRENCY) + PUBLISHES_IN_FLIGHT) + resent + handed_back
}

/// Counts runs in the log into `ran` until `stop`.
async fn watch_runs(log: std::path::PathBuf, ran: Arc<AtomicUsize>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let count = tokio::task::spawn_blocking({
            let log = log.clone();
            move || read_run_log(&log).len()
        })
        .await
        .unwrap_or(0);
        ran.store(count, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Enqueues the batch, at most [`PUBLISHES_IN_FLIGHT`] at once and at most [`BACKLOG`] ahead
/// of the workers, and enqueues again what the broker did not confirm, as a careful producer
/// does; returns the keys confirmed, the confirmed tasks' keys and ids, and the failed
/// enqueues, by error.
async fn produce(
    client: Client,
    log: std::path::PathBuf,
    ran: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (Vec<u64>, Vec<(u64, TaskId)>, BTreeMap<String, usize>, u64) {
    let mut confirmed = Vec::new();
    let mut ids = Vec::new();
    let mut failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut again = std::collections::VecDeque::new();
    let mut in_flight = JoinSet::new();
    let mut next = 0u64;
    loop {
        while in_flight.len() < PUBLISHES_IN_FLIGHT
            && confirmed.len() + in_flight.len() < ran.load(Ordering::SeqCst) + BACKLOG
        {
            let key = match again.pop_front() {
                Some(key) => key,
                None if next < MAX_TASKS && !stop.load(Ordering::SeqCst) => {
                    next += 1;
                    next - 1
                }
                None => break,
            };
            let client = client.clone();
            let task = Record {
                key,
                log: log.to_string_lossy().into_owned(),
                work_ms: WORK_MS,
                started: None,
            };
            in_flight.spawn(async move { (key, client.enqueue(&task).await) });
        }
        if in_flight.is_empty() {
            if (next == MAX_TASKS || stop.load(Ordering::SeqCst)) && again.is_empty() {
                return (confirmed, ids, failed, next);
            }
            // Waiting for the workers to catch up with the backlog.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        match in_flight.join_next().await {
            Some(Ok((key, Ok(id)))) => {
                confirmed.push(key);
                ids.push((key, id));
            }
            Some(Ok((key, Err(e)))) => {
                *failed.entry(error_kind(&e)).or_default() += 1;
                again.push_back(key);
            }
            Some(Err(e)) => panic!("an enqueue panicked: {e}"),
            None => {}
        }
    }
}

/// The kind of an enqueue's or a call's error.
fn error_kind(error: &Error) -> String {
    match error {
        Error::Publish(warren_shared::PublishError::Nacked { .. }) => "nacked".into(),
        Error::ConnectionLost => "connection_lost".into(),
        Error::Unavailable(_) => "unavailable".into(),
        Error::Timeout(_) => "timeout".into(),
        other => format!("{other:?}"),
    }
}

/// Calls `echo` one after another until `stop`, each with a 15 s timeout.
async fn call_stream(client: Client, stop: Arc<AtomicBool>) -> Vec<CallRecord> {
    let options = CallOptions::default().timeout(Duration::from_secs(15));
    let mut calls = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let started_ms = unix_millis();
        let result = client.call_with(&Echo(json!(i)), &options).await;
        let (error, message) = match result {
            Ok(value) => {
                assert_eq!(value, json!(i), "a call got another call's answer");
                (None, String::new())
            }
            Err(e) => (Some(error_kind(&e)), e.to_string()),
        };
        calls.push(CallRecord {
            started_ms,
            ended_ms: unix_millis(),
            error,
            message,
        });
        i += 1;
    }
    calls
}

/// Sends `echo` requests one after another over one Workerman Text connection to the gateway
/// until `stop`, reading each answer line.
async fn text_call_stream(addr: SocketAddr, stop: Arc<AtomicBool>) -> Vec<CallRecord> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut calls = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let started_ms = unix_millis();
        let request = json!({"function": "echo", "args": i});
        write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("the gateway answers every request")
            .unwrap()
            .expect("an answer line");
        let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
        let error = if answer == json!(i) {
            None
        } else {
            let kind = answer["error"]["kind"].as_str();
            Some(
                kind.unwrap_or_else(|| panic!("neither result nor error: {line}"))
                    .to_owned(),
            )
        };
        calls.push(CallRecord {
            started_ms,
            ended_ms: unix_millis(),
            error,
            message: answer["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        });
        i += 1;
    }
    calls
}

/// A loopback address with a port that was free a moment ago.
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
}

/// Starts the gateway binary on free loopback ports and waits until its Text port accepts.
async fn start_gateway(urls: &str) -> (ChildGuard, SocketAddr) {
    let (http, text) = (free_port(), free_port());
    let mut command = std::process::Command::new(binary("warren-gateway"));
    command
        .args(["--queue", QUEUE, "--no-declare"])
        .args(["--http", &http.to_string(), "--text", &text.to_string()])
        .args(["--call-timeout", "15s"])
        .env("AMQP_URL", urls)
        .env_remove("WARREN_GATEWAY_TOKEN")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let gateway = ChildGuard::spawn(command);
    eventually("the gateway to listen", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(text).await.is_ok()
    })
    .await;
    (gateway, text)
}

/// Waits until every worker has started a task more than [`RESUME_BOUND`] after the failure
/// at `at_ms` (so that its pause, however long, is over) and returns the window to judge.
///
/// # Panics
///
/// After a minute, with what each worker did since the failure and what `cluster` says.
async fn observe_resumption(
    what: &'static str,
    bound: Duration,
    at_ms: u64,
    log: &std::path::Path,
    worker_pids: &[u32],
    cluster: &Cluster,
) -> Failure {
    let timeout = Duration::from_secs(60);
    let mark = at_ms + u64::try_from(RESUME_BOUND.as_millis()).unwrap_or(u64::MAX);
    let until = Instant::now() + timeout;
    loop {
        let runs = read_run_log(log);
        let resumed = |pid: &u32| runs.iter().any(|r| r.pid == *pid && r.started_ms > mark);
        if worker_pids.iter().all(resumed) {
            break;
        }
        if Instant::now() > until {
            let since: Vec<(u32, usize, Option<u64>)> = worker_pids
                .iter()
                .map(|pid| {
                    let after: Vec<u64> = runs
                        .iter()
                        .filter(|r| r.pid == *pid && r.started_ms >= at_ms)
                        .map(|r| r.started_ms - at_ms)
                        .collect();
                    (*pid, after.len(), after.iter().max().copied())
                })
                .collect();
            let error = format!(
                "{what}: not every worker resumed within {timeout:?}; (pid, tasks started \
                 since, last start in ms after the failure): {since:?}; {} runs in all",
                runs.len()
            );
            blocking(|| fail_with_cluster_state(cluster, &error));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Failure {
        what,
        bound,
        at_ms,
        observed_until_ms: unix_millis(),
    }
}

/// Panics with `error` and what the cluster says about the queue, its consumers and connections.
fn fail_with_cluster_state(cluster: &Cluster, error: &str) -> ! {
    let queues = cluster.ctl_any(&[
        "list_queues",
        "-p",
        VHOST,
        "name",
        "type",
        "leader",
        "members",
        "online",
        "messages",
        "messages_unacknowledged",
        "consumers",
        "state",
    ]);
    let consumers = cluster.ctl_any(&["list_consumers", "-p", VHOST]);
    let connections = cluster.ctl_any(&["list_connections", "pid", "peer_port", "state"]);
    panic!("{error}\nqueues:\n{queues}\nconsumers:\n{consumers}\nconnections:\n{connections}");
}

impl Failure {
    /// Each worker's longest time without starting a task, from the failure until it was seen
    /// working again.
    fn pauses(&self, runs: &[RecordedRun], worker_pids: &[u32]) -> Vec<u64> {
        worker_pids
            .iter()
            .map(|pid| {
                let starts: Vec<u64> = runs
                    .iter()
                    .filter(|r| r.pid == *pid)
                    .map(|r| r.started_ms)
                    .collect();
                let last = starts
                    .iter()
                    .copied()
                    .filter(|t| *t <= self.observed_until_ms)
                    .max()
                    .unwrap_or(self.observed_until_ms);
                longest_pause(&starts, self.at_ms, last)
            })
            .collect()
    }

    /// The longest time in which no worker at all started a task.
    fn fleet_pause(&self, runs: &[RecordedRun]) -> u64 {
        let starts: Vec<u64> = runs.iter().map(|r| r.started_ms).collect();
        longest_pause(&starts, self.at_ms, self.observed_until_ms)
    }
}

/// How long after `at_ms` the first call that started after it was answered with a result.
fn call_resumption(calls: &[CallRecord], at_ms: u64) -> Option<u64> {
    calls
        .iter()
        .filter(|c| c.started_ms >= at_ms && c.error.is_none())
        .map(|c| c.ended_ms - at_ms)
        .min()
}

/// The batch's outcome.
struct Report {
    confirmed: usize,
    failed_enqueues: BTreeMap<String, usize>,
    ran: usize,
    duplicates: usize,
    per_worker: Vec<usize>,
}

impl Report {
    fn new(
        runs: &[RecordedRun],
        worker_pids: &[u32],
        confirmed: &[u64],
        failed_enqueues: &BTreeMap<String, usize>,
    ) -> Self {
        let mut times: BTreeMap<u64, usize> = BTreeMap::new();
        for run in runs {
            *times.entry(run.key).or_default() += 1;
        }
        let lost: Vec<&u64> = confirmed
            .iter()
            .filter(|k| !times.contains_key(k))
            .collect();
        assert!(lost.is_empty(), "confirmed tasks lost: {lost:?}");
        Self {
            confirmed: confirmed.len(),
            failed_enqueues: failed_enqueues.clone(),
            ran: times.len(),
            duplicates: times.values().map(|n| n - 1).sum(),
            per_worker: worker_pids
                .iter()
                .map(|pid| runs.iter().filter(|r| r.pid == *pid).count())
                .collect(),
        }
    }

    fn print(&self, bound: usize) {
        eprintln!(
            "{} tasks confirmed, enqueues failed and sent again {:?}, {} ran, {} extra \
             runs (duplicates; bound {}), runs per worker {:?}",
            self.confirmed, self.failed_enqueues, self.ran, self.duplicates, bound, self.per_worker
        );
    }
}

/// The sum of the samples of counter `name` whose labels include `labels`, in the Prometheus
/// text a worker serves on `addr` (0 when it has none: a counter appears once counted).
fn scrape(addr: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = ureq::get(format!("http://{addr}/metrics"))
        .call()
        .unwrap_or_else(|e| panic!("the worker's metrics on {addr}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// What the event stream holds, read from its first event to its end.
struct StreamRead {
    /// Messages read, duplicates included.
    read: u64,
    /// `succeeded` events read, duplicates included: one per `ok` settlement.
    succeeded_appended: u64,
    /// Events without duplicates (by task id, attempt and type).
    unique: usize,
    /// Every task with an event.
    tasks: HashSet<String>,
    /// Each task's first final event.
    finals: HashMap<String, Event>,
}

/// Reads the whole event stream as the producer user at `url` (the definitions let it read the
/// stream) with a plain stream consumer, splitting packed messages with [`events::decode`] and
/// counting every `succeeded` event, duplicates included. Called once the work queue is empty:
/// every event was appended before its task's ack, so the stream's end is reached when nothing
/// more comes for [`STREAM_END_QUIET`].
async fn read_stream(url: &str) -> StreamRead {
    use futures_util::StreamExt;
    let connection = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("the producer user cannot connect to read the stream: {e}"));
    let channel = connection.create_channel().await.expect("a channel");
    let mut deliveries = events::read(
        &channel,
        STREAM,
        Start::First,
        events::READ_PREFETCH,
        "cluster-test",
    )
    .await
    .unwrap_or_else(|e| panic!("the producer user cannot read the stream: {e}"));
    let mut read = 0u64;
    let mut succeeded = 0u64;
    let mut keys = HashSet::new();
    let mut tasks = HashSet::new();
    let mut finals = HashMap::new();
    let mut unacked = 0u16;
    while let Ok(delivery) = tokio::time::timeout(STREAM_END_QUIET, deliveries.next()).await {
        let delivery = delivery
            .expect("the stream consumer ends only when cancelled")
            .unwrap_or_else(|e| panic!("reading the stream: {e}"));
        read += 1;
        unacked += 1;
        if unacked >= events::READ_PREFETCH / 2 {
            delivery
                .ack(lapin::options::BasicAckOptions { multiple: true })
                .await
                .expect("credit");
            unacked = 0;
        }
        let (_, decoded) = events::decode(&delivery.properties, &delivery.data)
            .unwrap_or_else(|e| panic!("a message in the stream is no event: {e}"));
        for (event, _) in decoded {
            if event.kind == EventKind::Succeeded {
                succeeded += 1;
            }
            if !keys.insert((event.task_id.clone(), event.attempt, event.kind)) {
                continue;
            }
            tasks.insert(event.task_id.clone());
            if event.is_final() {
                finals.entry(event.task_id.clone()).or_insert(event);
            }
        }
    }
    let _ = connection.close(200, "read".into()).await;
    StreamRead {
        read,
        succeeded_appended: succeeded,
        unique: keys.len(),
        tasks,
        finals,
    }
}

impl StreamRead {
    /// Every confirmed task, and every task that ran (the run log's keys), has its final
    /// `succeeded` event with its key as the result; no task in the stream lacks a final event
    /// (the work queue is empty: each task was settled).
    fn check(&self, runs: &[RecordedRun], confirmed: &[(u64, TaskId)]) {
        let key_of = |event: &Event| -> Option<u64> {
            let result = event.result.as_ref()?;
            (event.function == "record" && event.kind == EventKind::Succeeded)
                .then(|| serde_json::from_str(result.get()).ok())
                .flatten()
        };
        let missing: Vec<(u64, &str, Option<EventKind>)> = confirmed
            .iter()
            .filter_map(|(key, id)| match self.finals.get(id.as_str()) {
                Some(event) if key_of(event) == Some(*key) => None,
                other => Some((*key, id.as_str(), other.map(|e| e.kind))),
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{} confirmed tasks without their succeeded event (key, id, final kind): {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
        let succeeded: HashSet<u64> = self.finals.values().filter_map(key_of).collect();
        let mut lost: Vec<u64> = runs
            .iter()
            .map(|r| r.key)
            .filter(|k| !succeeded.contains(k))
            .collect();
        lost.sort_unstable();
        lost.dedup();
        assert!(
            lost.is_empty(),
            "{} tasks ran without a succeeded event: keys {:?}",
            lost.len(),
            &lost[..lost.len().min(20)]
        );
        let unsettled: Vec<&String> = self
            .tasks
            .iter()
            .filter(|t| !self.finals.contains_key(*t))
            .collect();
        assert!(
            unsettled.is_empty(),
            "{} tasks with events but no final event: {:?}",
            unsettled.len(),
            &unsettled[..unsettled.len().min(20)]
        );
    }
}
