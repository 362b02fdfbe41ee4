//! Issue 12.4 and 12.6: worker processes on "other hosts" (network namespaces of their own,
//! each with its own address on a veth link to the broker's host), connecting as the worker
//! user of `deploy/rabbitmq/definitions.json` imported with `rabbitmqctl import_definitions`.
//! One host's link is cut silently mid-batch and restored.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use warren_tests::deploy::{self, VHOST};
use warren_tests::netns::{self, NetHost};
use warren_tests::node::{BrokerNode, NodeOptions};
use warren_tests::tasks::unix_millis;
use warren_tests::{enqueue_records, eventually, read_run_log, temp_dir};

use super::{
    CONCURRENCY, SERIAL, blocking, connections, consumers, expect_own_connections, give_passwords,
    producer_client, start_workers, test_worker_path, worker_name,
};

const HOSTS: usize = 3;
/// The workers' heartbeat (`?heartbeat=` in their URL): the broker gives up on a silent
/// connection after missing about two.
const HEARTBEAT_SECS: u64 = 2;
const FIRST_BATCH: u64 = 2_000;
const SECOND_BATCH: u64 = 300;
const WORK_MS: u64 = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_host_cut_off_mid_batch_hands_its_tasks_over_and_rejoins_with_its_own_connections()
{
    let _serial = SERIAL.lock().await;
    if let Err(why) = netns::available() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "CI runs as root with iproute2, and this test must run there: {why}"
        );
        eprintln!("skipped: cannot make network namespaces ({why}); run as root with iproute2");
        return;
    }
    let began = Instant::now();
    let hosts = NetHost::create(HOSTS);
    // The broker listens on loopback and on the host's end of each link, nowhere else.
    let node = BrokerNode::start_with(
        "hosts",
        NodeOptions {
            listen: hosts.iter().map(|h| IpAddr::V4(h.host_ip())).collect(),
            ..NodeOptions::default()
        },
    )
    .await;
    // Set up as deploy/README.md says: import the definitions, then give the users passwords.
    blocking(|| deploy::import_definitions(&node));
    eventually(
        "the definitions' users",
        Duration::from_secs(30),
        || async { blocking(|| deploy::users(&node)).contains(&"warren-worker".to_owned()) },
    )
    .await;
    let passwords = give_passwords(&node);

    let dir = temp_dir("hosts");
    let log = dir.path().join("runs.log");
    let workers = hosts
        .iter()
        .map(|host| {
            let url = format!(
                "amqp://warren-worker:{}@{}:{}/{VHOST}?heartbeat={HEARTBEAT_SECS}",
                passwords.worker,
                host.host_ip(),
                node.port()
            );
            (host.command(test_worker_path()), url)
        })
        .collect();
    let (workers, pids) =
        start_workers(workers, CONCURRENCY, || consumers(|a| node.ctl_ok(a))).await;
    // Each worker connects from its own host's address.
    let seen = blocking(|| connections(|a| node.ctl_ok(a)));
    for (host, pid) in hosts.iter().zip(&pids) {
        let own: Vec<_> = seen
            .iter()
            .filter(|c| c.name.starts_with(&format!("{}/", worker_name(*pid))))
            .collect();
        assert_eq!(own.len(), 2, "{seen:?}");
        assert!(
            own.iter().all(|c| c.peer_host == host.ip().to_string()),
            "{own:?}"
        );
    }

    // The producer runs on the broker's host and connects over loopback.
    let client_name = format!("hosts-client-{}", uuid::Uuid::new_v4().simple());
    let producer_url = node.url_as("warren-app", &passwords.producer, VHOST);
    let client = producer_client(producer_url, &client_name).await;
    let producer = {
        let (client, log) = (client.clone(), log.clone());
        tokio::spawn(async move {
            enqueue_records(&client, &log, 0..FIRST_BATCH, WORK_MS, None).await;
        })
    };

    // Cut the first host off mid-batch, while it runs tasks.
    let (cut_host, cut_pid) = (&hosts[0], pids[0]);
    eventually(
        "a quarter of the batch",
        Duration::from_secs(60),
        || async { read_run_log(&log).len() as u64 >= FIRST_BATCH / 4 },
    )
    .await;
    let cut_at = unix_millis();
    cut_host.cut();
    // Its unacknowledged tasks go to the other hosts once the broker has missed its heartbeats:
    // tasks it was running (their acks lost with the link) and tasks on their way to it. The
    // only redeliveries of the test: (key, start, whether it had run on the cut host).
    let handed_over = || {
        let runs = read_run_log(&log);
        let by_cut_host: HashSet<u64> = runs
            .iter()
            .filter(|r| r.pid == cut_pid)
            .map(|r| r.key)
            .collect();
        runs.into_iter()
            .filter(|r| r.pid != cut_pid && r.redelivered && r.started_ms >= cut_at)
            .map(|r| (r.key, r.started_ms, by_cut_host.contains(&r.key)))
            .collect::<Vec<_>>()
    };
    let until = Instant::now() + Duration::from_secs(30);
    while handed_over().is_empty() {
        if Instant::now() > until {
            let runs = read_run_log(&log);
            let there: Vec<_> = runs
                .iter()
                .filter(|r| r.pid == cut_pid && r.finished_ms + 1000 >= cut_at)
                .map(|r| (r.key, r.started_ms as i64 - cut_at as i64))
                .collect();
            let again: Vec<_> = runs
                .iter()
                .filter(|r| r.redelivered)
                .map(|r| (r.key, r.pid, r.started_ms as i64 - cut_at as i64))
                .collect();
            panic!(
                "the cut host's tasks were not redelivered to the others within 30 s: {} runs; \
                 runs there around the cut (key, start ms after the cut): {there:?}; \
                 redelivered runs (key, pid, start): {again:?}",
                runs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let redelivered_after = handed_over()
        .iter()
        .map(|(_, started, _)| started - cut_at)
        .min()
        .unwrap();

    // Restore the link: the host reconnects and takes work again.
    let restored_at = Instant::now();
    cut_host.restore();
    expect_own_connections(
        |a| node.ctl_ok(a),
        &pids,
        std::slice::from_ref(&client_name),
        &[],
        Duration::from_secs(40),
    )
    .await;
    let rejoined_after = restored_at.elapsed();
    let rejoined = blocking(|| connections(|a| node.ctl_ok(a)));
    assert!(
        rejoined
            .iter()
            .filter(|c| c.name.starts_with(&format!("{}/", worker_name(cut_pid))))
            .all(|c| c.peer_host == cut_host.ip().to_string()),
        "{rejoined:?}"
    );

    // A second batch after the return: the host that was cut off takes its share.
    producer.await.unwrap();
    let second_from = unix_millis();
    enqueue_records(
        &client,
        &log,
        FIRST_BATCH..FIRST_BATCH + SECOND_BATCH,
        WORK_MS,
        None,
    )
    .await;
    eventually(
        "every task of both batches to run",
        Duration::from_secs(60),
        || async {
            let done: HashSet<u64> = read_run_log(&log).iter().map(|r| r.key).collect();
            (0..FIRST_BATCH + SECOND_BATCH).all(|k| done.contains(&k))
        },
    )
    .await;
    let runs = read_run_log(&log);
    let after_return = runs
        .iter()
        .filter(|r| r.pid == cut_pid && r.started_ms >= second_from)
        .count();
    assert!(
        after_return > 0,
        "the host that was cut off took no task after its return"
    );
    let handed: Vec<_> = handed_over();
    let mut keys: BTreeMap<u64, usize> = BTreeMap::new();
    for run in &runs {
        *keys.entry(run.key).or_default() += 1;
    }
    let duplicates: usize = keys.values().map(|n| n - 1).sum();
    eprintln!(
        "link of 1 of {HOSTS} worker hosts cut (heartbeat {HEARTBEAT_SECS} s): {} of its tasks \
         redelivered to the others ({} had run there, acks lost), the first {redelivered_after} \
         ms after the cut; host back with exactly its own connections {rejoined_after:?} after \
         the link returned; {duplicates} duplicates over {} tasks; {after_return} tasks of the \
         second batch ran there; whole test {:?}",
        handed.len(),
        handed.iter().filter(|(_, _, ran_there)| *ran_there).count(),
        FIRST_BATCH + SECOND_BATCH,
        began.elapsed()
    );
    // Redelivery waits for the missed heartbeats (the cut is silent), and no longer than a few.
    let heartbeat_ms = HEARTBEAT_SECS * 1000;
    assert!(
        (heartbeat_ms..=4 * heartbeat_ms + 3000).contains(&redelivered_after),
        "redelivered {redelivered_after} ms after the cut"
    );
    // Only what the host held unacknowledged (its prefetch) ran twice.
    assert!(
        !handed.is_empty() && handed.len() <= usize::from(CONCURRENCY),
        "{handed:?}"
    );
    assert!(duplicates <= usize::from(CONCURRENCY), "{duplicates}");
    client.close().await;
    drop(workers);
}
