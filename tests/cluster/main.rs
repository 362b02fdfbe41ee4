//! Warren on a RabbitMQ cluster and on other hosts (issue 12 points 3, 4 and 6): a 3-node cluster
//! losing the node its clients use and then the event stream's leader (with the queue's, when
//! one node leads both), and workers in network
//! namespaces of their own whose link is cut. Both set the broker up from
//! `deploy/rabbitmq/definitions.json` and connect as its non-guest users.
//!
//! Its own test binary, so that nothing else shares the two cores while it measures failover
//! times; its tests take turns.

// A failed unwrap is how a test says what went wrong.
#![allow(clippy::unwrap_used)]

mod failover;
mod hosts;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use tokio::sync::Mutex;
use warren_tests::{ChildGuard, binary};

/// One test at a time: each measures times on a shared machine.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Execution slots of each test worker, and so its prefetch: what a worker that is lost can
/// hold unacknowledged (and what may run twice for it).
const CONCURRENCY: u16 = 4;

/// Starts `command` (a `warren-test-worker`, maybe wrapped by `ip netns exec`) on the
/// definitions' work queue with `urls` as `AMQP_URL`; see [`start_workers`].
fn spawn_worker(mut command: Command, urls: &str, concurrency: u16) -> ChildGuard {
    command
        .args(["--queue", warren_tests::deploy::QUEUE])
        .args([
            "--functions-exchange",
            warren_tests::deploy::FUNCTIONS_EXCHANGE,
        ])
        .args(["--concurrency", &concurrency.to_string()])
        .env("AMQP_URL", urls)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null());
    ChildGuard::spawn(command)
}

/// Starts one worker per `(command, urls)` and waits until `count_consumers` sees them all:
/// the first alone until it consumes (it declares the quorum queues), then the others at once.
/// Returns them with their process ids.
///
/// Why not all at once: RabbitMQ 3.10.8 crashes the channel of a `basic.consume` that reaches
/// a new quorum queue declared by another client before the queue's Raft member has started
/// (`{badmatch,{error,noproc}}` in `rabbit_quorum_queue:consume`, `541 INTERNAL_ERROR`), and a
/// worker whose first consume fails exits non-zero (its supervisor restarts it). That race is
/// the broker's, not what these tests are about.
async fn start_workers(
    workers: Vec<(Command, String)>,
    concurrency: u16,
    count_consumers: impl Fn() -> usize,
) -> (Vec<ChildGuard>, Vec<u32>) {
    let total = workers.len();
    let mut started = Vec::with_capacity(total);
    for (command, urls) in workers {
        started.push(spawn_worker(command, &urls, concurrency));
        if started.len() == 1 || started.len() == total {
            let expected = started.len();
            eventually_eq(
                "the workers consuming",
                std::time::Duration::from_secs(60),
                &expected,
                &count_consumers,
            )
            .await;
        }
    }
    let pids = started
        .iter()
        .map(|w| u32::try_from(w.pid().as_raw()).unwrap_or_default())
        .collect();
    (started, pids)
}

/// `warren-test-worker`: the worker binary with the test's `record` task.
fn test_worker_path() -> std::path::PathBuf {
    binary("warren-test-worker")
}

/// Passwords the test gave the definitions' users.
struct Passwords {
    worker: String,
    producer: String,
}

/// Gives the definitions' worker and producer users fresh passwords on `node` with `users.sh`,
/// as deploy/README.md tells an operator to after importing the definitions.
fn give_passwords(node: &warren_tests::node::BrokerNode) -> Passwords {
    let passwords = Passwords {
        worker: uuid::Uuid::new_v4().simple().to_string(),
        producer: uuid::Uuid::new_v4().simple().to_string(),
    };
    blocking(|| {
        let set = warren_tests::deploy::set_password;
        set(node, "worker", "warren-worker", &passwords.worker);
        set(node, "producer", "warren-app", &passwords.producer);
    });
    passwords
}

/// A client of the definitions' work queue as the producer user at `urls`: it declares
/// nothing (the producer may not), and names its connection `name`.
async fn producer_client(urls: String, name: &str) -> warren_client::Client {
    let settings = warren_client::ClientSettings {
        broker: warren_shared::BrokerSettings::new(urls),
        queue: Some(warren_tests::deploy::QUEUE.to_owned()),
        functions_exchange: warren_tests::deploy::FUNCTIONS_EXCHANGE.to_owned(),
        declare: false,
        name: name.to_owned(),
        ..warren_client::ClientSettings::default()
    };
    match warren_client::Client::connect(settings).await {
        Ok(client) => client,
        Err(e) => panic!("the producer cannot connect: {e}"),
    }
}

/// Waits until the broker (asked through `ctl`) holds exactly the connections of these
/// processes, two per worker (consume and publish), one (publish) for each of `publishers`
/// and two (consume: the event stream's tail; publish) for each of `gateways` (process names),
/// nothing else; then checks one consumer of the work queue per worker.
async fn expect_own_connections(
    ctl: impl Fn(&[&str]) -> String,
    worker_pids: &[u32],
    publishers: &[String],
    gateways: &[String],
    timeout: std::time::Duration,
) {
    let mut expected: BTreeMap<String, Vec<String>> = worker_pids
        .iter()
        .map(|pid| (worker_name(*pid), vec!["consume".into(), "publish".into()]))
        .collect();
    for name in publishers {
        expected.insert(name.clone(), vec!["publish".into()]);
    }
    for name in gateways {
        expected.insert(name.clone(), vec!["consume".into(), "publish".into()]);
    }
    eventually_eq(
        "every process back to exactly its own connections",
        timeout,
        &expected,
        || connections_by_process(&connections(&ctl)),
    )
    .await;
    assert_eq!(blocking(|| consumers(&ctl)), worker_pids.len());
}

/// A broker connection as `rabbitmqctl list_connections pid peer_host client_properties`
/// shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Connection {
    /// The node that holds it.
    node: String,
    /// The client's address.
    peer_host: String,
    /// Its client-given name (`warren-worker@host:pid/consume`), empty when it has none.
    name: String,
}

/// The connections of the whole cluster (or node) that `ctl` asks, with their names.
fn connections(ctl: impl Fn(&[&str]) -> String) -> Vec<Connection> {
    let out = ctl(&[
        "list_connections",
        "pid",
        "peer_host",
        "client_properties",
        "--no-table-headers",
        "-q",
    ]);
    out.lines()
        .filter_map(|line| {
            // `<warren-x@localhost.1700.1.0>\t127.0.0.1\t[...,{"connection_name","..."},...]`
            let mut columns = line.splitn(3, '\t');
            let (pid, peer_host, properties) = (columns.next()?, columns.next()?, columns.next()?);
            let (node, rest) = pid.trim_start_matches('<').split_once('@')?;
            let host = rest.split(['.', '>']).next().unwrap_or_default();
            let marker = "{\"connection_name\",\"";
            let name = properties
                .split_once(marker)
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(name, _)| name.to_owned())
                .unwrap_or_default();
            Some(Connection {
                node: format!("{node}@{host}"),
                peer_host: peer_host.to_owned(),
                name,
            })
        })
        .collect()
}

/// How many connections each process holds: name without the `/consume` or `/publish`
/// suffix -> purposes, sorted.
fn connections_by_process(connections: &[Connection]) -> BTreeMap<String, Vec<String>> {
    let mut by_process: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in connections {
        let (process, purpose) = c.name.rsplit_once('/').unwrap_or((&c.name, ""));
        by_process
            .entry(process.to_owned())
            .or_default()
            .push(purpose.to_owned());
    }
    for purposes in by_process.values_mut() {
        purposes.sort();
    }
    by_process
}

/// Consumers of the definitions' work queue that `ctl` lists.
fn consumers(ctl: impl Fn(&[&str]) -> String) -> usize {
    ctl(&[
        "list_consumers",
        "-p",
        warren_tests::deploy::VHOST,
        "queue_name",
        "--no-table-headers",
        "-q",
    ])
    .lines()
    .filter(|line| line.trim() == warren_tests::deploy::QUEUE)
    .count()
}

/// The name a worker process with `pid` gives its connections, without the purpose.
fn worker_name(pid: u32) -> String {
    let host = gethostname();
    format!("warren-worker@{host}:{pid}")
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Polls `read` (a blocking broker query) until it returns `expected`; panics with what it
/// last returned after `timeout`.
async fn eventually_eq<T: PartialEq + std::fmt::Debug>(
    what: &str,
    timeout: std::time::Duration,
    expected: &T,
    mut read: impl FnMut() -> T,
) {
    let until = std::time::Instant::now() + timeout;
    loop {
        let now = blocking(&mut read);
        if now == *expected {
            return;
        }
        assert!(
            std::time::Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}: expected {expected:?}, got {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Runs a blocking `rabbitmqctl` (about a second of CPU) without stalling the in-process
/// client's tasks on this runtime thread.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The longest time, in ms, in which no task started, within `[from, to]` (task start times in
/// ms since the epoch): how long processing stopped around a failure at `from`.
fn longest_pause(starts: &[u64], from: u64, to: u64) -> u64 {
    let mut within: Vec<u64> = starts
        .iter()
        .copied()
        .filter(|t| (from..=to).contains(t))
        .collect();
    within.sort_unstable();
    let mut previous = from;
    let mut longest = 0;
    for t in within.into_iter().chain(std::iter::once(to)) {
        longest = longest.max(t.saturating_sub(previous));
        previous = t;
    }
    longest
}

#[test]
fn longest_pause_counts_from_the_start_to_the_end_of_the_window() {
    assert_eq!(longest_pause(&[], 100, 200), 100);
    assert_eq!(longest_pause(&[110, 120, 190], 100, 200), 70);
    assert_eq!(longest_pause(&[50, 101, 250], 100, 200), 99);
}
