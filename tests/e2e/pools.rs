//! Handler pools (issue 10): task code in PHP (Debian's php-cli), Python and Node, run by
//! supervised processes of a worker, against the real broker. Every pool's processes are killed
//! when the pool is dropped (each kills its process group on drop), also when a test fails.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use warren_client::{CallOptions, Client};
use warren_shared::{ErrorKind, Policy};
use warren_tests::{ChildGuard, TestQueue, binary, eventually, temp_dir};
use warren_worker::{Pool, PoolConfig, Registry, RunningWorker};

/// Backoff between attempts in these tests.
const RETRY: Duration = Duration::from_millis(100);

/// Every function of tests/pools/tasks.php.
const PHP_FUNCTIONS: &[&str] = &[
    "add",
    "pid",
    "context",
    "boom",
    "refuse",
    "exit_first",
    "always_exit",
    "fatal_first",
    "hang_first",
    "spin",
    "grow",
    "garbage_first",
    "sleep",
    "next_waiting",
    "stderr_flood",
    "garbage_once",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn tasks_php() -> String {
    repo()
        .join("tests/pools/tasks.php")
        .to_string_lossy()
        .into_owned()
}

fn php_pool_config(processes: usize) -> PoolConfig {
    PoolConfig {
        name: Some("php".into()),
        functions: PHP_FUNCTIONS.iter().map(|f| (*f).to_owned()).collect(),
        command: vec!["php".into(), tasks_php()],
        processes,
        stop_grace: Duration::from_secs(2),
        ..PoolConfig::default()
    }
}

async fn start_pool(config: PoolConfig) -> Pool {
    match Pool::start(config).await {
        Ok(pool) => pool,
        Err(e) => panic!("pool does not start: {e}"),
    }
}

/// A worker on `q` serving `registry`, 3 attempts 100 ms apart.
async fn worker(q: &TestQueue, registry: Registry, concurrency: u16) -> RunningWorker {
    let mut settings = q.worker_settings(concurrency);
    settings.policy = Policy {
        max_attempts: 3,
        backoff: vec![RETRY],
        time_limit: Duration::from_secs(30),
    };
    settings.shutdown_grace = Duration::from_secs(5);
    q.worker_with(registry, settings).await
}

/// A PHP pool of `processes` behind a worker on a fresh queue.
async fn php_setup(label: &str, config: PoolConfig) -> (TestQueue, Pool, RunningWorker, Client) {
    php_setup_with(label, config, 16).await
}

/// [`php_setup`] with a worker of `concurrency`.
async fn php_setup_with(
    label: &str,
    config: PoolConfig,
    concurrency: u16,
) -> (TestQueue, Pool, RunningWorker, Client) {
    let q = TestQueue::new(label).with_retry_delays(&[RETRY]);
    let pool = start_pool(config).await;
    let w = worker(&q, Registry::new().register_pool(&pool), concurrency).await;
    let client = q.client().await;
    (q, pool, w, client)
}

fn failure_kind(result: &Result<Value, warren_client::Error>) -> Option<ErrorKind> {
    result
        .as_ref()
        .err()
        .and_then(|e| e.failure())
        .map(|f| f.kind)
}

fn pid_of(value: &Value) -> i64 {
    value
        .as_i64()
        .or_else(|| value["pid"].as_i64())
        .unwrap_or_else(|| panic!("no pid in {value}"))
}

fn alive(pid: i32) -> bool {
    // A zombie has exited; it only waits for its (new) parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// The live children of `parent`, from /proc, leaving out the guards of its pool processes
/// (its children too, `warren-pool-guard`; docs/runners.md, "Isolation").
fn children_of(parent: i32) -> Vec<i32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let guard = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| cmdline.starts_with(b"warren-pool-guard\0"));
        if fields.next().and_then(|p| p.parse::<i32>().ok()) == Some(parent)
            && state != "Z"
            && !guard
        {
            children.push(pid);
        }
    }
    children
}

/// 1000 concurrent `add` calls through a PHP pool of `config`, the worker running
/// `concurrency` at once: every answer right, from the pool's own processes, none of them
/// replaced (a frame answering the wrong task would replace its process). Returns the tasks
/// written ahead.
async fn answers_1000_concurrent_calls(label: &str, config: PoolConfig, concurrency: u16) -> u64 {
    let processes = config.processes;
    let (_q, pool, w, client) = php_setup_with(label, config, concurrency).await;
    let pids: HashSet<i64> = pool.stats().pids.iter().map(|p| i64::from(*p)).collect();
    assert_eq!(pids.len(), processes);
    let began = std::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..1000_i64 {
        let client = client.clone();
        calls.spawn(async move {
            let answer = client.call_json("add", json!({"a": i, "b": 2 * i})).await;
            (i, answer)
        });
    }
    let mut served_by = HashSet::new();
    while let Some(done) = calls.join_next().await {
        let (i, answer) = done.unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("call {i} failed: {e}"));
        assert_eq!(answer["sum"], json!(3 * i), "call {i}");
        served_by.insert(pid_of(&answer));
    }
    eprintln!(
        "1000 concurrent calls through {processes} PHP processes: {:?}",
        began.elapsed()
    );
    assert!(served_by.is_subset(&pids), "{served_by:?} not in {pids:?}");
    assert!(served_by.len() > 1, "one process served everything");
    assert_eq!(
        pool.stats().started,
        processes as u64,
        "no process was replaced"
    );
    w.shutdown().await.unwrap();
    pool.shutdown().await;
    assert!(pool.stats().pids.is_empty());
    pool.stats().written_ahead
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_php_pool_of_8_answers_1000_concurrent_calls() {
    let ahead = answers_1000_concurrent_calls("pool-1000", php_pool_config(8), 16).await;
    assert_eq!(ahead, 0, "nothing is written ahead without prefetch");
}

/// The setting docs/runners.md gives for short tasks: one process per core, each written up
/// to 16 tasks ahead, under the worker's 100 tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_2_with_prefetch_16_answers_1000_concurrent_calls() {
    let config = PoolConfig {
        prefetch: 16,
        ..php_pool_config(2)
    };
    let ahead = answers_1000_concurrent_calls("pool-1000-prefetch", config, 100).await;
    eprintln!("{ahead} of 1000 tasks written ahead");
    assert!(ahead > 0, "no task was written ahead");
}

#[tokio::test]
async fn php_exceptions_are_typed_errors_and_the_context_reaches_php() {
    let (q, _pool, _w, client) = php_setup("pool-errors", php_pool_config(2)).await;
    let once = CallOptions::default().max_attempts(1);
    let boom = client.call_json_with("boom", json!({}), &once).await;
    let failure = boom.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::HandlerFailed);
    assert_eq!(failure.message, "RuntimeException: boom");
    // Permanent with a kind of its own: dead-lettered at once, even with attempts left.
    let refused = client.call_json("refuse", json!({})).await;
    let failure = refused.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::InvalidArgs);
    assert_eq!(failure.message, "amount must be positive");
    eventually(
        "both failures dead-lettered",
        Duration::from_secs(5),
        || async { q.dead_count(&client).await == 2 },
    )
    .await;
    let ctx = client
        .call_json_with(
            "context",
            json!(null),
            &CallOptions::default().timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    assert_eq!(ctx["function"], "context");
    assert_eq!(ctx["attempt"], 1);
    assert_eq!(ctx["max_attempts"], 3);
    assert_eq!(ctx["has_deadline"], true);
    assert!(ctx["id"].as_str().is_some_and(|id| !id.is_empty()));
}

#[tokio::test]
async fn exit_and_fatal_errors_are_retried_on_a_fresh_process() {
    // One process: the retry can only run on its replacement.
    let (_q, pool, _w, client) = php_setup("pool-exit", php_pool_config(1)).await;
    let before: HashSet<i64> = pool.stats().pids.iter().map(|p| i64::from(*p)).collect();
    for function in ["exit_first", "fatal_first"] {
        let answer = client
            .call_json(function, json!({}))
            .await
            .unwrap_or_else(|e| panic!("{function}: {e}"));
        let pid = pid_of(&answer);
        assert!(
            !before.contains(&pid),
            "{function}: second attempt ran on an old process"
        );
    }
    // Each death was replaced: 1 + 2 processes started.
    assert_eq!(pool.stats().started, 3);
    assert_eq!(pool.stats().pids.len(), 1);
}

#[tokio::test]
async fn a_task_that_kills_every_process_is_dead_lettered_after_its_attempts() {
    let (q, pool, _w, client) = php_setup("pool-poison", php_pool_config(2)).await;
    let result = client.call_json("always_exit", json!({})).await;
    assert_eq!(
        failure_kind(&result),
        Some(ErrorKind::Crashed),
        "{result:?}"
    );
    let message = &result.as_ref().unwrap_err().failure().unwrap().message;
    assert!(message.contains("exited with status 1"), "{message}");
    eventually(
        "the poison task dead-lettered",
        Duration::from_secs(5),
        || async { q.dead_count(&client).await == 1 },
    )
    .await;
    // Three attempts, three dead processes, all replaced; the pool still serves.
    eventually(
        "the third replacement started",
        Duration::from_secs(5),
        || async { pool.stats().started == 5 && pool.stats().pids.len() == 2 },
    )
    .await;
    let sum = client
        .call_json("add", json!({"a": 1, "b": 1}))
        .await
        .unwrap();
    assert_eq!(sum["sum"], 2);
}

#[tokio::test]
async fn kill_9_of_a_child_mid_task_is_retried_on_a_fresh_process() {
    let (_q, _pool, _w, client) = php_setup("pool-kill9", php_pool_config(2)).await;
    let dir = temp_dir("pool-kill9");
    let pidfile = dir.path().join("pid");
    let call = {
        let client = client.clone();
        let pidfile = pidfile.to_string_lossy().into_owned();
        tokio::spawn(async move {
            client
                .call_json("hang_first", json!({ "pidfile": pidfile }))
                .await
        })
    };
    eventually("the task running", Duration::from_secs(10), || async {
        pidfile.exists()
    })
    .await;
    let victim: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let answer = call.await.unwrap().unwrap();
    assert_ne!(pid_of(&answer), i64::from(victim));
}

#[tokio::test]
async fn an_endless_loop_is_cut_at_the_time_limit_and_the_next_task_succeeds() {
    let config = PoolConfig {
        time_limit: Some(Duration::from_millis(800)),
        stop_grace: Duration::from_millis(500),
        ..php_pool_config(1)
    };
    let (_q, pool, _w, client) = php_setup("pool-spin", config).await;
    let spinner = pool.stats().pids[0];
    let result = client
        .call_json_with("spin", json!({}), &CallOptions::default().max_attempts(1))
        .await;
    assert_eq!(
        failure_kind(&result),
        Some(ErrorKind::Timeout),
        "{result:?}"
    );
    assert!(!alive(spinner), "the spinning process is still there");
    let answer = client.call_json("pid", json!({})).await.unwrap();
    assert_ne!(pid_of(&answer), i64::from(spinner));
}

/// 60 `add` calls on 2 processes with `max_jobs = 5` and `prefetch`: every answer right, no
/// process serving more than 5 tasks, and so at least 12 processes started.
async fn max_jobs_recycling(label: &str, prefetch: usize) {
    let config = PoolConfig {
        max_jobs: Some(5),
        prefetch,
        ..php_pool_config(2)
    };
    let (_q, pool, _w, client) = php_setup(label, config).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..60_i64 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call_json("add", json!({"a": i, "b": 1})).await) });
    }
    let mut served = std::collections::HashMap::<i64, u32>::new();
    while let Some(done) = calls.join_next().await {
        let (i, answer) = done.unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(answer["sum"], json!(i + 1));
        *served.entry(pid_of(&answer)).or_default() += 1;
    }
    assert!(served.values().all(|&n| n <= 5), "{served:?}");
    assert!(served.len() >= 12, "only {} processes served", served.len());
    assert!(pool.stats().started >= 12);
}

#[tokio::test]
async fn max_jobs_recycling_loses_no_task() {
    max_jobs_recycling("pool-maxjobs", 0).await;
}

/// A PHP pool with `prefetch = 1` with one of its processes busy in `next_waiting`.
struct Busy {
    _q: TestQueue,
    _w: RunningWorker,
    _dir: tempfile::TempDir,
    pool: Pool,
    client: Client,
    /// The `next_waiting` call.
    first: tokio::task::JoinHandle<Result<Value, warren_client::Error>>,
}

/// How `next_waiting` ends once the next task's line is on its stdin.
#[derive(Clone, Copy)]
enum Then {
    Answer,
    Exit,
    Fatal,
}

/// Starts a pool of `processes` with `prefetch = 1` and returns once `next_waiting` (waiting
/// `seconds` for a line on its stdin, then ending as `then` says) runs on one of them.
async fn busy_with_prefetch(
    label: &str,
    processes: usize,
    seconds: u64,
    then: Then,
    options: CallOptions,
) -> Busy {
    let config = PoolConfig {
        prefetch: 1,
        ..php_pool_config(processes)
    };
    let (q, pool, w, client) = php_setup(label, config).await;
    let dir = temp_dir(label);
    let started = dir.path().join("started");
    let first = {
        let client = client.clone();
        let args = json!({
            "started": started,
            "seconds": seconds,
            "exit": matches!(then, Then::Exit),
            "fatal": matches!(then, Then::Fatal),
        });
        tokio::spawn(async move { client.call_json_with("next_waiting", args, &options).await })
    };
    eventually("next_waiting running", Duration::from_secs(10), || async {
        started.exists()
    })
    .await;
    Busy {
        _q: q,
        _w: w,
        _dir: dir,
        pool,
        client,
        first,
    }
}

impl Busy {
    /// Calls `add` while `next_waiting` runs: the answers of `next_waiting` and of `add`.
    async fn add_beside(&mut self) -> (Value, Value) {
        let second = self
            .client
            .call_json("add", json!({"a": 2, "b": 3}))
            .await
            .unwrap();
        ((&mut self.first).await.unwrap().unwrap(), second)
    }
}

#[tokio::test]
async fn prefetch_writes_the_next_task_to_a_busy_process_while_it_runs_one() {
    let mut busy =
        busy_with_prefetch("pool-prefetch", 1, 20, Then::Answer, CallOptions::default()).await;
    let (first, second) = busy.add_beside().await;
    // Without prefetch the runner sees nothing on its stdin until it answers.
    assert_eq!(first["waiting"], true, "{first}");
    assert_eq!(second["sum"], 5);
    assert_eq!(second["pid"], first["pid"]);
    assert_eq!(busy.pool.stats().started, 1);
    assert_eq!(busy.pool.stats().written_ahead, 1);
}

#[tokio::test]
async fn prefetch_leaves_a_task_to_an_idle_process() {
    let mut busy = busy_with_prefetch(
        "pool-prefetch-idle",
        2,
        10,
        Then::Answer,
        CallOptions::default(),
    )
    .await;
    let (first, second) = busy.add_beside().await;
    // Nothing was written ahead to the busy process: the other one ran the task.
    assert_eq!(first["waiting"], false, "{first}");
    assert_ne!(second["pid"], first["pid"]);
    assert_eq!(busy.pool.stats().written_ahead, 0);
}

#[tokio::test]
async fn nothing_is_written_ahead_to_a_process_due_for_a_reload() {
    let mut busy = busy_with_prefetch(
        "pool-prefetch-reload",
        1,
        3,
        Then::Answer,
        CallOptions::default(),
    )
    .await;
    // A code deploy while the process runs a task: the next task is for its replacement.
    busy.pool.reload();
    let (first, second) = busy.add_beside().await;
    assert_eq!(first["waiting"], false, "{first}");
    assert_eq!(second["sum"], 5);
    assert_ne!(second["pid"], first["pid"]);
    assert_eq!(busy.pool.stats().started, 2);
    assert_eq!(busy.pool.stats().written_ahead, 0);
}

/// `next_waiting` ends as `then` once a one-attempt `context` is written ahead to its process:
/// `context` still succeeds on its first attempt, on the replacement process, and
/// `next_waiting` is `crashed`.
async fn a_task_written_ahead_survives(label: &str, then: Then) {
    let once = CallOptions::default().max_attempts(1);
    let busy = busy_with_prefetch(label, 1, 20, then, once.clone()).await;
    let second = busy
        .client
        .call_json_with("context", json!({}), &once)
        .await
        .unwrap();
    assert_eq!(second["attempt"], 1, "{second}");
    let first = busy.first.await.unwrap();
    assert_eq!(failure_kind(&first), Some(ErrorKind::Crashed), "{first:?}");
    assert_eq!(busy.pool.stats().started, 2);
}

#[tokio::test]
async fn a_task_written_ahead_that_breaks_the_protocol_before_it_answers_spends_no_attempt() {
    let mut busy = busy_with_prefetch(
        "pool-prefetch-garbage",
        1,
        20,
        Then::Answer,
        CallOptions::default(),
    )
    .await;
    let dir = temp_dir("pool-prefetch-garbage-marker");
    let marker = dir.path().join("marker");
    // Written ahead; once it starts it writes garbage before any frame of its own, so the
    // worker cannot tell it from the task before: it runs again, on the replacement, as the
    // same attempt.
    let once = CallOptions::default().max_attempts(1);
    let second = busy
        .client
        .call_json_with("garbage_once", json!({ "marker": marker }), &once)
        .await
        .unwrap();
    assert_eq!(second["attempt"], 1, "{second}");
    assert!(marker.exists());
    let first = (&mut busy.first).await.unwrap().unwrap();
    assert_eq!(first["waiting"], true, "{first}");
    assert_ne!(second["pid"], first["pid"]);
    assert_eq!(busy.pool.stats().started, 2);
}

#[tokio::test]
async fn a_task_written_ahead_to_a_process_that_dies_runs_on_another_without_spending_an_attempt() {
    a_task_written_ahead_survives("pool-prefetch-crash", Then::Exit).await;
}

#[tokio::test]
async fn a_task_written_ahead_to_a_process_that_answers_then_exits_spends_no_attempt() {
    // The PHP helper answers a fatal error as `crashed` for its task, then PHP exits: the task
    // written ahead was never read.
    a_task_written_ahead_survives("pool-prefetch-fatal", Then::Fatal).await;
}

#[tokio::test]
async fn max_jobs_recycling_with_prefetch_loses_no_task_and_keeps_the_limit() {
    max_jobs_recycling("pool-maxjobs-prefetch", 2).await;
}

#[tokio::test]
async fn max_memory_recycling_loses_no_task() {
    let config = PoolConfig {
        max_memory: Some(48 << 20),
        ..php_pool_config(1)
    };
    let (_q, pool, _w, client) = php_setup("pool-maxmem", config).await;
    let mut pids = Vec::new();
    for n in 0..12 {
        let answer = client
            .call_json_with(
                "grow",
                json!({ "n": n }),
                &CallOptions::default().max_attempts(1),
            )
            .await
            .unwrap_or_else(|e| panic!("grow {n}: {e}"));
        assert_eq!(answer["n"], n);
        pids.push(pid_of(&answer));
    }
    // Each process keeps 8 MB more per task: it crosses 48 MB within a few tasks.
    let distinct: HashSet<_> = pids.iter().collect();
    assert!(distinct.len() >= 2, "never recycled: {pids:?}");
    assert!(pool.stats().started >= 2);
}

#[tokio::test]
async fn a_process_that_starts_above_max_memory_still_serves_a_task_each() {
    // PHP alone is above 1 KiB: each process serves one task, then is replaced.
    let config = PoolConfig {
        max_memory: Some(1024),
        ..php_pool_config(1)
    };
    let (_q, pool, _w, client) = php_setup("pool-maxmem-idle", config).await;
    let mut pids = HashSet::new();
    for n in 0..3 {
        let answer = client
            .call_json_with(
                "add",
                json!({"a": n, "b": 1}),
                &CallOptions::default().max_attempts(1),
            )
            .await
            .unwrap_or_else(|e| panic!("add {n}: {e}"));
        assert_eq!(answer["sum"], json!(n + 1));
        pids.insert(pid_of(&answer));
    }
    assert_eq!(pids.len(), 3, "one task per process: {pids:?}");
    assert!(pool.stats().started >= 3);
}

#[tokio::test]
async fn garbage_on_stdout_replaces_the_process() {
    let (_q, pool, _w, client) = php_setup("pool-garbage", php_pool_config(1)).await;
    let first = pool.stats().pids[0];
    let answer = client.call_json("garbage_first", json!({})).await.unwrap();
    assert_ne!(pid_of(&answer), i64::from(first));
    assert!(!alive(first));
    assert_eq!(pool.stats().started, 2);
}

#[tokio::test]
async fn stderr_too_long_or_not_utf8_is_logged_and_the_process_keeps_writing() {
    let (_q, pool, _w, client) = php_setup("pool-stderr-bytes", php_pool_config(1)).await;
    let first = pool.stats().pids[0];
    let answer = client.call_json("stderr_flood", json!({})).await.unwrap();
    assert_eq!(answer["ok"], true, "a write to stderr failed: {answer}");
    assert_eq!(pid_of(&answer), i64::from(first));
    assert_eq!(pool.stats().started, 1, "the process was replaced");
}

#[tokio::test]
async fn a_php_pool_and_a_rust_handler_serve_different_functions_in_one_worker() {
    let q = TestQueue::new("pool-mixed").with_retry_delays(&[RETRY]);
    let pool = start_pool(php_pool_config(2)).await;
    let registry = Registry::new()
        .register::<warren_shared::tasks::Echo>()
        .register_pool(&pool);
    let _w = worker(&q, registry, 8).await;
    let client = q.client().await;
    let (php, rust) = tokio::join!(
        client.call_json("add", json!({"a": 20, "b": 22})),
        client.call_json("echo", json!({"message": "from rust"})),
    );
    assert_eq!(php.unwrap()["sum"], 42);
    assert_eq!(rust.unwrap()["message"], "from rust");
}

#[tokio::test]
async fn a_pool_whose_processes_do_not_serve_its_functions_does_not_start() {
    let config = PoolConfig {
        functions: vec!["add".into(), "not_in_php".into()],
        ..php_pool_config(1)
    };
    let error = Pool::start(config).await.unwrap_err().to_string();
    assert!(error.contains("does not serve not_in_php"), "{error}");
    let config = PoolConfig {
        command: vec!["/nonexistent/interpreter".into()],
        ..php_pool_config(1)
    };
    let error = Pool::start(config).await.unwrap_err().to_string();
    assert!(error.contains("cannot start"), "{error}");
}

/// `warren-worker --exec` on `queue`, its pool's processes as children, and the built-in
/// `echo` next to them.
fn exec_worker(queue: &str, processes: usize) -> ChildGuard {
    ChildGuard::worker(
        queue,
        &[
            "--builtins",
            "echo",
            "--exec",
            &format!("php {}", tasks_php()),
            "--exec-functions",
            &PHP_FUNCTIONS.join(","),
            "--exec-processes",
            &processes.to_string(),
            "--shutdown-grace",
            "10s",
            "--backoff",
            "100ms",
        ],
    )
}

async fn consumers(client: &Client, queue: &str) -> u32 {
    client
        .queue_stats(queue)
        .await
        .map(|s| s.consumers)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_pool_and_leaves_no_child_behind() {
    let q = TestQueue::new("pool-sigterm").with_retry_delays(&[RETRY]);
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let mut worker = exec_worker(&q.name, 3);
    eventually("worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    let worker_pid = worker.pid().as_raw();
    let children = children_of(worker_pid);
    assert_eq!(children.len(), 3, "{children:?}");
    let dir = temp_dir("pool-sigterm");
    let started = dir.path().join("started");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let client = client.clone();
        let started = started.to_string_lossy().into_owned();
        calls.spawn(async move {
            client
                .call_json("sleep", json!({"ms": 1500, "started": started}))
                .await
        });
    }
    eventually("three tasks running", Duration::from_secs(10), || async {
        std::fs::read_to_string(&started).map_or(0, |t| t.lines().count()) == 3
    })
    .await;
    worker.signal(Signal::SIGTERM);
    while let Some(done) = calls.join_next().await {
        let pid = pid_of(
            &done
                .unwrap()
                .expect("an in-flight task failed during the drain"),
        );
        assert!(children.contains(&i32::try_from(pid).unwrap()));
    }
    let status = worker
        .wait_timeout(Duration::from_secs(15))
        .expect("worker did not exit after draining");
    assert!(status.success(), "{status}");
    for child in children {
        assert!(!alive(child), "pool process {child} outlived the worker");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_worker_leaves_no_orphan() {
    let q = TestQueue::new("pool-orphan");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let mut worker = exec_worker(&q.name, 3);
    eventually("worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    let children = children_of(worker.pid().as_raw());
    assert_eq!(children.len(), 3, "{children:?}");
    worker.signal(Signal::SIGKILL);
    worker.wait_timeout(Duration::from_secs(5)).unwrap();
    eventually("the children gone", Duration::from_secs(5), || async {
        children.iter().all(|c| !alive(*c))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_every_process_with_no_failed_task() {
    let q = TestQueue::new("pool-sighup").with_retry_delays(&[RETRY]);
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let worker = exec_worker(&q.name, 3);
    eventually("worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    let before: HashSet<i32> = children_of(worker.pid().as_raw()).into_iter().collect();
    assert_eq!(before.len(), 3);
    let dir = temp_dir("pool-sighup");
    let started = dir.path().join("started");
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..60 {
        let client = client.clone();
        let started = started.to_string_lossy().into_owned();
        calls.spawn(async move {
            // One attempt: a task failed by the reload would show.
            client
                .call_json_with(
                    "sleep",
                    json!({"ms": 50, "started": started}),
                    &CallOptions::default().max_attempts(1),
                )
                .await
        });
    }
    // Reload while the old processes are busy.
    eventually("tasks running", Duration::from_secs(10), || async {
        std::fs::read_to_string(&started).map_or(0, |t| t.lines().count()) >= 3
    })
    .await;
    worker.signal(Signal::SIGHUP);
    let mut served_by = HashSet::new();
    while let Some(done) = calls.join_next().await {
        let answer = done.unwrap().expect("a task failed across the reload");
        served_by.insert(i32::try_from(pid_of(&answer)).unwrap());
    }
    let worker_pid = worker.pid().as_raw();
    eventually(
        "every process replaced",
        Duration::from_secs(10),
        || async {
            let now: HashSet<i32> = children_of(worker_pid).into_iter().collect();
            now.len() == 3 && now.is_disjoint(&before)
        },
    )
    .await;
    assert!(
        served_by.iter().any(|p| before.contains(p))
            && served_by.iter().any(|p| !before.contains(p)),
        "the reload did not come mid-batch: {served_by:?} vs {before:?}"
    );
    let answer = client.call_json("pid", json!({})).await.unwrap();
    assert!(!before.contains(&i32::try_from(pid_of(&answer)).unwrap()));
}

/// A free loopback port.
use warren_tests::free_port;

fn text_server(port: u16) -> ChildGuard {
    let mut command = Command::new("php");
    command
        .arg(repo().join("tests/pools/text_server.php"))
        .arg(port.to_string());
    ChildGuard::spawn(command)
}

async fn text_server_listening(port: u16) {
    eventually(
        "the text server listening",
        Duration::from_secs(10),
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_protocol_task_server_behind_a_pool_survives_a_restart_mid_batch() {
    let port = free_port();
    let mut server = text_server(port);
    text_server_listening(port).await;
    // The callers' backoff: the worker waits it rounded up to the ladder, in that delay queue.
    let backoff = Duration::from_millis(200);
    let q = TestQueue::new("pool-text")
        .with_retry_delays(&[RETRY, warren_shared::policy::round_up_to_ladder(backoff)]);
    let pool = start_pool(PoolConfig {
        functions: vec!["add".into()],
        connect: Some(format!("text://127.0.0.1:{port}")),
        processes: 4,
        time_limit: Some(Duration::from_secs(5)),
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 8).await;
    let client = q.client().await;
    let answered = Arc::new(AtomicUsize::new(0));
    let options = CallOptions::default()
        .max_attempts(20)
        .backoff(vec![backoff]);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..300_i64 {
        let client = client.clone();
        let answered = answered.clone();
        let options = options.clone();
        calls.spawn(async move {
            let answer = client
                .call_json_with("add", json!({"a": i, "b": 1}), &options)
                .await;
            answered.fetch_add(1, Ordering::SeqCst);
            (i, answer)
        });
    }
    eventually(
        "part of the batch answered",
        Duration::from_secs(20),
        || async { answered.load(Ordering::SeqCst) >= 50 },
    )
    .await;
    // Restart the task server mid-batch.
    server.signal(Signal::SIGKILL);
    server.wait_timeout(Duration::from_secs(5)).unwrap();
    let _server = text_server(port);
    while let Some(done) = calls.join_next().await {
        let (i, answer) = done.unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("call {i}: {e}"));
        assert_eq!(answer["sum"], json!(i + 1), "call {i}");
    }
    let restarts = answered.load(Ordering::SeqCst);
    assert_eq!(restarts, 300);
}

#[tokio::test]
async fn a_text_server_that_does_not_answer_in_time_is_a_timeout_and_a_refusal_is_retried() {
    // A listener that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let _accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let q = TestQueue::new("pool-text-timeout").with_retry_delays(&[RETRY]);
    let pool = start_pool(PoolConfig {
        functions: vec!["add".into()],
        connect: Some(format!("text://127.0.0.1:{port}")),
        processes: 1,
        time_limit: Some(Duration::from_millis(300)),
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let once = CallOptions::default().max_attempts(1);
    let result = client
        .call_json_with("add", json!({"a": 1, "b": 1}), &once)
        .await;
    assert_eq!(
        failure_kind(&result),
        Some(ErrorKind::Timeout),
        "{result:?}"
    );

    // Nothing listens on a fresh port: refused, retried, then dead-lettered after 3 attempts.
    let refused_port = free_port();
    let q2 = TestQueue::new("pool-text-refused").with_retry_delays(&[RETRY]);
    let pool2 = start_pool(PoolConfig {
        functions: vec!["add".into()],
        connect: Some(format!("text://127.0.0.1:{refused_port}")),
        processes: 1,
        ..PoolConfig::default()
    })
    .await;
    let _w2 = worker(&q2, Registry::new().register_pool(&pool2), 4).await;
    let client2 = q2.client().await;
    let result = client2.call_json("add", json!({"a": 1, "b": 1})).await;
    let failure = result.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::HandlerFailed);
    assert!(
        failure.message.contains("cannot connect"),
        "{}",
        failure.message
    );
    eventually(
        "refused task dead-lettered",
        Duration::from_secs(5),
        || async { q2.dead_count(&client2).await == 1 },
    )
    .await;
}

async fn round_trip(label: &str, command: Vec<String>) {
    let q = TestQueue::new(label).with_retry_delays(&[RETRY]);
    let pool = start_pool(PoolConfig {
        name: Some(label.into()),
        functions: vec!["add".into(), "boom".into(), "context".into()],
        command,
        processes: 2,
        // The helper reads its stdin line by line: tasks written ahead reach it whole.
        prefetch: 2,
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 16).await;
    let client = q.client().await;
    let sum = client
        .call_json("add", json!({"a": 2, "b": 3}))
        .await
        .unwrap();
    assert_eq!(sum["sum"], 5, "{label}");
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200_i64 {
        let client = client.clone();
        calls.spawn(async move { (i, client.call_json("add", json!({"a": i, "b": 1})).await) });
    }
    while let Some(done) = calls.join_next().await {
        let (i, answer) = done.unwrap();
        let answer = answer.unwrap_or_else(|e| panic!("{label}: call {i}: {e}"));
        assert_eq!(answer["sum"], json!(i + 1), "{label}");
    }
    assert_eq!(pool.stats().started, 2, "{label}: a process was replaced");
    let ctx = client.call_json("context", json!(null)).await.unwrap();
    assert_eq!(ctx["attempt"], 1, "{label}");
    assert_eq!(ctx["function"], "context", "{label}");
    let boom = client
        .call_json_with("boom", json!({}), &CallOptions::default().max_attempts(1))
        .await;
    let failure = boom.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::HandlerFailed, "{label}");
    assert!(
        failure.message.contains("boom"),
        "{label}: {}",
        failure.message
    );
    let refused = client.call_json("boom", json!({"permanent": true})).await;
    let failure = refused.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::InvalidArgs, "{label}");
    eventually(
        "permanent failure dead-lettered at once",
        Duration::from_secs(5),
        || async { q.dead_count(&client).await == 2 },
    )
    .await;
}

#[tokio::test]
async fn a_python_pool_round_trips() {
    let script = repo().join("tests/pools/tasks.py");
    round_trip(
        "pool-python",
        vec!["python3".into(), script.to_string_lossy().into_owned()],
    )
    .await;
}

/// Python's `json.dumps` writes NaN as `NaN`, which is not JSON: the helper must answer a
/// typed permanent error, not a line the worker takes for garbage (which would replace the
/// process and retry the task as `crashed` until its attempts ran out).
#[tokio::test]
async fn a_python_result_that_is_not_json_is_a_permanent_error() {
    let script = repo().join("tests/pools/tasks.py");
    let q = TestQueue::new("pool-python-nan").with_retry_delays(&[RETRY]);
    let pool = start_pool(PoolConfig {
        functions: vec!["nan".into()],
        command: vec!["python3".into(), script.to_string_lossy().into_owned()],
        processes: 1,
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let answer = client.call_json("nan", json!({})).await;
    let failure = answer.as_ref().unwrap_err().failure().unwrap();
    assert_eq!(failure.kind, ErrorKind::HandlerFailed, "{failure:?}");
    assert!(failure.message.contains("JSON"), "{}", failure.message);
    assert_eq!(pool.stats().started, 1, "the process was replaced");
    eventually("parked at once", Duration::from_secs(5), || async {
        q.dead_count(&client).await == 1
    })
    .await;
}

#[tokio::test]
async fn a_node_pool_round_trips() {
    let script = repo().join("tests/pools/tasks.js");
    round_trip(
        "pool-node",
        vec!["node".into(), script.to_string_lossy().into_owned()],
    )
    .await;
}

#[tokio::test]
async fn the_cli_worker_binary_refuses_a_bad_exec_with_a_clear_error() {
    let output = Command::new(binary("warren-worker"))
        .args(["--exec", "php 'unclosed", "--exec-functions", "a"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot split the command"), "{stderr}");
}

/// Issue 10, point 5: the seed application's `send_mail` messages work unchanged.
#[tokio::test]
async fn the_builtin_send_mail_takes_the_seeds_argument_shape() {
    let q = TestQueue::new("seed-mail");
    let outbox = temp_dir("seed-mail");
    let _w = q
        .worker(
            warren_worker::builtin_registry(warren_worker::Mailer::outbox(outbox.path())),
            4,
        )
        .await;
    let client = q.client().await;
    let receipt = client
        .call_json(
            "send_mail",
            json!({"from": "shop@example.com", "to": "ann@example.com", "contents": "Hello Ann"}),
        )
        .await
        .unwrap();
    // The receipt names the file, not the server's path: `outbox:<task-id>.eml`.
    let name = receipt["delivered_to"]
        .as_str()
        .and_then(|p| p.strip_prefix("outbox:"))
        .unwrap();
    let message = std::fs::read_to_string(outbox.path().join(name)).unwrap();
    assert!(message.contains("To: ann@example.com\r\n"), "{message}");
    assert!(message.ends_with("\r\n\r\nHello Ann"), "{message}");
    let other = client
        .call_json(
            "send_mail",
            json!({"from": "shop@example.com", "to": "ann@example.com", "text": "Hello"}),
        )
        .await;
    assert_eq!(
        failure_kind(&other),
        Some(ErrorKind::InvalidArgs),
        "{other:?}"
    );
}

#[tokio::test]
async fn ttl_recycles_an_idle_process_and_the_pool_keeps_serving() {
    let config = PoolConfig {
        ttl: Some(Duration::from_millis(300)),
        ..php_pool_config(1)
    };
    let (_q, pool, _w, client) = php_setup("pool-ttl", config).await;
    // The first process may already be on its way out (300 ms is short): count starts.
    let before = pool.stats().started;
    eventually(
        "the idle process recycled twice",
        Duration::from_secs(10),
        || async { pool.stats().started >= before + 2 },
    )
    .await;
    let answer = client.call_json("pid", json!({})).await.unwrap();
    let pid = pid_of(&answer);
    assert!(pool.stats().started >= 3);
    // Every process but the current ones has exited.
    let current: Vec<i64> = pool.stats().pids.iter().map(|p| i64::from(*p)).collect();
    assert!(current.len() <= 1, "{current:?}");
    assert!(pid > 0);
}

#[tokio::test]
async fn a_process_that_keeps_dying_at_start_up_is_restarted_with_backoff() {
    // Says it is ready, then exits at once, every time.
    let ready = r#"{"type":"ready","protocol":1,"functions":["x"]}"#;
    let began = std::time::Instant::now();
    let pool = start_pool(PoolConfig {
        functions: vec!["x".into()],
        command: vec!["sh".into(), "-c".into(), format!("echo '{ready}'; exit 3")],
        processes: 1,
        ..PoolConfig::default()
    })
    .await;
    eventually("three restarts", Duration::from_secs(10), || async {
        pool.stats().started >= 4
    })
    .await;
    // 100 ms, 200 ms, 400 ms between the starts, not a busy loop.
    let elapsed = began.elapsed();
    assert!(elapsed >= Duration::from_millis(700), "{elapsed:?}");
    assert!(pool.stats().started < 10);
}

#[tokio::test]
async fn the_cli_reaches_a_php_pool_and_a_rust_handler_in_one_worker_process() {
    let q = TestQueue::new("pool-cli");
    let client = q.client().await;
    client.declare_queue(&q.name).await.unwrap();
    let _worker = exec_worker(&q.name, 2);
    eventually("worker consuming", Duration::from_secs(20), || async {
        consumers(&client, &q.name).await == 1
    })
    .await;
    let warren = |args: &[&str]| {
        let output = Command::new(binary("warren"))
            .args(["call", "--queue", &q.name])
            .args(args)
            .env("AMQP_URL", warren_tests::amqp_url())
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    assert_eq!(warren(&["add", r#"{"a":40,"b":2}"#])["sum"], 42);
    assert_eq!(warren(&["echo", r#"{"x":1}"#]), json!({"x": 1}));
}

/// Arguments pretty-printed by the producer (line breaks between tokens, a bare `\r` among
/// them) as a PHP, Python or Node producer may send them.
fn pretty_printed_args() -> warren_shared::RawJson {
    warren_shared::RawJson::from_string("{\n  \"a\": 2,\r\n  \"b\":\r 3\n}".into()).unwrap()
}

/// A task whose arguments hold line breaks reaches a Python pool as one line: the runner reads
/// one task, not several broken ones.
#[tokio::test]
async fn pretty_printed_args_reach_a_python_pool_as_one_task() {
    let script = repo().join("tests/pools/tasks.py");
    let q = TestQueue::new("pool-python-pretty").with_retry_delays(&[RETRY]);
    let pool = start_pool(PoolConfig {
        functions: vec!["add".into()],
        command: vec!["python3".into(), script.to_string_lossy().into_owned()],
        processes: 1,
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let options = CallOptions::default().max_attempts(1);
    let answer = client
        .call_raw_with("add", pretty_printed_args(), &options)
        .await
        .unwrap();
    let answer: Value = answer.parse().unwrap();
    assert_eq!(answer["sum"], json!(5), "{answer}");
    assert_eq!(pool.stats().started, 1, "the process was never replaced");
}

/// The same for a Text-protocol task server behind a pool.
#[tokio::test]
async fn pretty_printed_args_reach_a_text_protocol_task_server_as_one_line() {
    let port = free_port();
    let _server = text_server(port);
    text_server_listening(port).await;
    let q = TestQueue::new("pool-text-pretty").with_retry_delays(&[RETRY]);
    let pool = start_pool(PoolConfig {
        functions: vec!["add".into()],
        connect: Some(format!("text://127.0.0.1:{port}")),
        processes: 1,
        time_limit: Some(Duration::from_secs(10)),
        ..PoolConfig::default()
    })
    .await;
    let _w = worker(&q, Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let options = CallOptions::default().max_attempts(1);
    let answer = client
        .call_raw_with("add", pretty_printed_args(), &options)
        .await
        .unwrap();
    let answer: Value = answer.parse().unwrap();
    assert_eq!(answer["sum"], json!(5), "{answer}");
}
