//! Task code kept away from the worker's secrets and processes, with real PHP, Python and Node
//! pool processes (tests/pools/tasks.*) against the real broker: a minimal environment, the
//! whole process group killed with the worker (even by `kill -9`) and at the time limit, a
//! child's exit noticed while a subprocess holds its pipes, and the protocol's pipes out of
//! subprocesses' reach. Every `sleep 600` a test starts is killed when the test ends, however it
//! ends; pools kill their groups when dropped, and worker binaries are stopped by `ChildGuard`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use warren_client::{CallOptions, Client};
use warren_shared::{ErrorKind, Policy};
use warren_tests::{
    ChildGuard, TestQueue, amqp_url, binary, eventually, functions_exchange_of, temp_dir,
};
use warren_worker::{Pool, PoolConfig, Registry, RunningWorker};

#[derive(Debug, Clone, Copy)]
enum Lang {
    Php,
    Python,
    Node,
}

const LANGS: [Lang; 3] = [Lang::Php, Lang::Python, Lang::Node];

impl Lang {
    fn command(self) -> Vec<String> {
        let (interpreter, file) = match self {
            Self::Php => ("php", "tasks.php"),
            Self::Python => ("python3", "tasks.py"),
            Self::Node => ("node", "tasks.js"),
        };
        let script = repo().join("tests/pools").join(file);
        vec![interpreter.into(), script.to_string_lossy().into_owned()]
    }

    fn label(self) -> &'static str {
        match self {
            Self::Php => "php",
            Self::Python => "python",
            Self::Node => "node",
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// SIGKILLs the `sleep`s task code started when dropped, so that none outlives a failed test;
/// a pid that is gone, or now belongs to another program, is left alone.
#[derive(Default)]
struct Reap(Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            let is_sleep = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.starts_with(b"sleep\0"));
            if alive(*pid) && is_sleep {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
        }
    }
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

fn pid_in(value: &Value) -> i32 {
    value
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid in {value}"))
}

fn failure_kind(result: &Result<Value, warren_client::Error>) -> Option<ErrorKind> {
    result
        .as_ref()
        .err()
        .and_then(|e| e.failure())
        .map(|f| f.kind)
}

/// A pool of one `lang` process serving `functions`, behind an in-process worker on a fresh
/// queue (one attempt 100 ms apart, a 30 s worker time limit).
async fn setup(
    label: &str,
    lang: Lang,
    functions: &[&str],
    adjust: impl FnOnce(&mut PoolConfig),
) -> (TestQueue, Pool, RunningWorker, Client) {
    let mut config = PoolConfig {
        name: Some(lang.label().into()),
        functions: functions.iter().map(|f| (*f).to_owned()).collect(),
        command: lang.command(),
        processes: 1,
        stop_grace: Duration::from_millis(500),
        ..PoolConfig::default()
    };
    adjust(&mut config);
    let q = TestQueue::new(&format!("{label}-{}", lang.label()))
        .with_retry_delays(&[Duration::from_millis(100)]);
    let pool = match Pool::start(config).await {
        Ok(pool) => pool,
        Err(e) => panic!("{lang:?}: the pool does not start: {e}"),
    };
    let mut settings = q.worker_settings(8);
    settings.policy = Policy {
        max_attempts: 3,
        backoff: vec![Duration::from_millis(100)],
        time_limit: Duration::from_secs(30),
    };
    let w = q
        .worker_with(Registry::new().register_pool(&pool), settings)
        .await;
    let client = q.client().await;
    (q, pool, w, client)
}

/// `warren-worker` on `queue` with `args`, its environment the test's plus `env`.
fn worker_binary(queue: &str, args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
    let mut command = Command::new(binary("warren-worker"));
    command
        .args(["--queue", queue])
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange_of(queue))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null());
    ChildGuard::spawn(command)
}

async fn consuming(client: &Client, queue: &str) {
    client.declare_queue(queue).await.unwrap();
    eventually("the worker consuming", Duration::from_secs(20), || async {
        client
            .queue_stats(queue)
            .await
            .is_ok_and(|stats| stats.consumers == 1)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_children_see_no_worker_secret_and_only_what_the_pool_passes() {
    for lang in LANGS {
        let q = TestQueue::new(&format!("pool-env-{}", lang.label()));
        let client = q.client().await;
        let dir = temp_dir("pool-env");
        let config = dir.path().join("worker.toml");
        let command = lang
            .command()
            .iter()
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "[[pool]]\nfunctions = [\"env\"]\ncommand = [{command}]\nprocesses = 1\n\
                 env = {{ APP_ENV = \"test\" }}\nenv_pass = [\"DATABASE_URL\"]\n"
            ),
        )
        .unwrap();
        let _worker = worker_binary(
            &q.name,
            &["--config", &config.to_string_lossy()],
            &[
                (
                    "WARREN_SMTP_URL",
                    "smtp://mailer:smtp-password@127.0.0.1:25",
                ),
                ("WARREN_GATEWAY_TOKEN", "gateway-token"),
                ("DATABASE_URL", "postgres://app@db/app"),
                ("LC_TIME", "C"),
            ],
        );
        consuming(&client, &q.name).await;
        let names = [
            "AMQP_URL",
            "WARREN_SMTP_URL",
            "WARREN_GATEWAY_TOKEN",
            "WARREN_FUNCTIONS_EXCHANGE",
            "RUST_LOG",
            "DATABASE_URL",
            "APP_ENV",
            "LC_TIME",
            "PATH",
            "WARREN_POOL",
            "WARREN_RUNNER_PROTOCOL",
        ];
        let seen = client
            .call_json("env", json!({ "names": names }))
            .await
            .unwrap_or_else(|e| panic!("{lang:?}: {e}"));
        for secret in [
            "AMQP_URL",
            "WARREN_SMTP_URL",
            "WARREN_GATEWAY_TOKEN",
            "WARREN_FUNCTIONS_EXCHANGE",
            "RUST_LOG",
        ] {
            assert_eq!(seen[secret], Value::Null, "{lang:?} sees {secret}: {seen}");
        }
        assert_eq!(seen["DATABASE_URL"], "postgres://app@db/app", "{lang:?}");
        assert_eq!(seen["APP_ENV"], "test", "{lang:?}");
        assert_eq!(seen["LC_TIME"], "C", "{lang:?}");
        assert!(seen["PATH"].is_string(), "{lang:?}: {seen}");
        assert_eq!(seen["WARREN_POOL"], "env", "{lang:?}");
        assert_eq!(seen["WARREN_RUNNER_PROTOCOL"], "1", "{lang:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_worker_takes_what_task_code_started_with_it() {
    for lang in LANGS {
        let q = TestQueue::new(&format!("pool-kill9-group-{}", lang.label()));
        let client = q.client().await;
        // Split like a shell would by the worker: quoted, for a checkout path with spaces.
        let command = lang
            .command()
            .iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut worker = worker_binary(
            &q.name,
            &[
                "--exec",
                &command,
                "--exec-functions",
                "spawn_sleep",
                "--exec-processes",
                "1",
            ],
            &[],
        );
        consuming(&client, &q.name).await;
        let mut reap = Reap::default();
        let sleep = pid_in(
            &client
                .call_json("spawn_sleep", json!({}))
                .await
                .unwrap_or_else(|e| panic!("{lang:?}: {e}")),
        );
        reap.0.push(sleep);
        assert!(alive(sleep), "{lang:?}: the subprocess is not running");
        worker.signal(Signal::SIGKILL);
        worker.wait_timeout(Duration::from_secs(5)).unwrap();
        eventually(
            &format!("{lang:?}: the subprocess gone with the worker"),
            Duration::from_secs(10),
            || async { !alive(sleep) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_limit_kill_takes_what_task_code_started_with_it() {
    for lang in LANGS {
        let (_q, _pool, _w, client) = setup("pool-limit-group", lang, &["spawn_sleep"], |c| {
            c.time_limit = Some(Duration::from_secs(1));
        })
        .await;
        let dir = temp_dir("pool-limit-group");
        let pidfile = dir.path().join("pid");
        let mut reap = Reap::default();
        let result = client
            .call_json_with(
                "spawn_sleep",
                json!({"hang": true, "pidfile": pidfile}),
                &CallOptions::default().max_attempts(1),
            )
            .await;
        assert_eq!(failure_kind(&result), Some(ErrorKind::Timeout), "{lang:?}");
        let sleep: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        reap.0.push(sleep);
        eventually(
            &format!("{lang:?}: the subprocess gone with its process"),
            Duration::from_secs(5),
            || async { !alive(sleep) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_noticed_while_a_subprocess_holds_the_childs_pipes() {
    for lang in LANGS {
        // Without the exit noticed, the crash would wait for the time limit.
        let (_q, pool, _w, client) = setup("pool-crash-held", lang, &["spawn_sleep", "die"], |c| {
            c.time_limit = Some(Duration::from_secs(20));
        })
        .await;
        let mut reap = Reap::default();
        // It inherits the process's fds 0, 1 and 2, and lives on.
        let sleep = pid_in(
            &client
                .call_json("spawn_sleep", json!({}))
                .await
                .unwrap_or_else(|e| panic!("{lang:?}: {e}")),
        );
        reap.0.push(sleep);
        let began = Instant::now();
        let result = client
            .call_json_with("die", json!({}), &CallOptions::default().max_attempts(1))
            .await;
        assert_eq!(
            failure_kind(&result),
            Some(ErrorKind::Crashed),
            "{lang:?}: {result:?}"
        );
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{lang:?}: the crash took {:?} to be noticed",
            began.elapsed()
        );
        // The replacement serves; the crashed process's group went with it.
        eventually(
            &format!("{lang:?}: a replacement started"),
            Duration::from_secs(10),
            || async { pool.stats().started == 2 && pool.stats().pids.len() == 1 },
        )
        .await;
        eventually(
            &format!("{lang:?}: the subprocess gone"),
            Duration::from_secs(5),
            || async { !alive(sleep) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subprocess_reading_stdin_takes_no_task_written_ahead() {
    for lang in LANGS {
        let (_q, pool, _w, client) = setup("pool-stdin", lang, &["read_stdin", "env"], |c| {
            c.prefetch = 4;
        })
        .await;
        let dir = temp_dir("pool-stdin");
        let (started, go) = (dir.path().join("started"), dir.path().join("go"));
        let once = CallOptions::default()
            .max_attempts(1)
            .timeout(Duration::from_secs(15));
        let reader = {
            let client = client.clone();
            let once = once.clone();
            let args = json!({"started": started, "go": go});
            tokio::spawn(async move { client.call_json_with("read_stdin", args, &once).await })
        };
        eventually(
            &format!("{lang:?}: read_stdin running"),
            Duration::from_secs(10),
            || async { started.exists() },
        )
        .await;
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..3 {
            let client = client.clone();
            let once = once.clone();
            calls.spawn(async move {
                let names = [format!("NOT_SET_{i}")];
                client
                    .call_json_with("env", json!({ "names": names }), &once)
                    .await
            });
        }
        eventually(
            &format!("{lang:?}: three tasks written ahead"),
            Duration::from_secs(10),
            || async { pool.stats().written_ahead >= 3 },
        )
        .await;
        std::fs::write(&go, "").unwrap();
        let read = reader
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{lang:?}: {e}"));
        assert_eq!(
            read["go"], true,
            "{lang:?}: `cat` ran before the tasks were written"
        );
        assert_eq!(read["read"], 0, "{lang:?}: the subprocess read task lines");
        while let Some(done) = calls.join_next().await {
            done.unwrap()
                .unwrap_or_else(|e| panic!("{lang:?}: a task written ahead was lost: {e}"));
        }
        assert_eq!(
            pool.stats().started,
            1,
            "{lang:?}: the process was replaced"
        );
    }
}

/// Touching `process.stdout` makes fd 1 non-blocking; a write then takes what the pipe has room
/// for. A worker that reads fast can mask a cut of a small result, so the result is 15 MiB
/// (under the 16 MiB frame limit): written with one `writeSync`, it is cut every time.
#[tokio::test]
async fn a_node_result_over_64_kib_arrives_whole_after_process_stdout_is_touched() {
    let (_q, pool, _w, client) = setup("pool-node-big", Lang::Node, &["big"], |c| {
        c.time_limit = Some(Duration::from_secs(10));
    })
    .await;
    let n = 15 << 20;
    let big = client
        .call_json_with(
            "big",
            json!({ "n": n }),
            &CallOptions::default().max_attempts(1),
        )
        .await
        .unwrap();
    assert_eq!(big.as_str().map(str::len), Some(n));
    assert_eq!(pool.stats().started, 1);
}

/// The processes running `warren-pool-guard` (its `argv[0]`) whose working directory is `dir`.
fn guards_in(dir: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.starts_with(b"warren-pool-guard\0"))
                && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir)
                && alive(*pid)
        })
        .collect()
}

/// Field `n` (1-based, as in proc(5)) of `/proc/<pid>/stat`.
fn stat_field(pid: i32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_is_the_workers_child_and_a_failed_start_leaves_none_behind() {
    let q = TestQueue::new("pool-guard-start");
    let client = q.client().await;
    let dir = temp_dir("pool-guard-start");
    // The worker's working directory: it tells its guards from every other worker's.
    let dir_path = std::fs::canonicalize(dir.path()).unwrap();
    let runner = dir_path.join("run.sh");
    let script = &Lang::Python.command()[1];
    std::fs::write(&runner, format!("#!/bin/sh\nexec python3 '{script}'\n")).unwrap();
    let mode = |m| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o755);
    let mut command = Command::new(binary("warren-worker"));
    command
        .current_dir(&dir_path)
        .args(["--queue", &q.name, "--exec"])
        .arg(&runner)
        .args(["--exec-functions", "add,children", "--exec-processes", "1"])
        .env("AMQP_URL", amqp_url())
        .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange_of(&q.name))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut worker = ChildGuard::spawn(command);
    // Counts the failed starts the worker logs (its stderr is read to its end).
    let failed_starts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stderr = worker.take_stderr().unwrap();
    let counter = failed_starts.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("{line}");
            if line.contains("pool process failed to start") {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    consuming(&client, &q.name).await;

    let pid = pid_in(
        &client
            .call_json("add", json!({"a": 1, "b": 2}))
            .await
            .unwrap()["pid"],
    );
    // Task code sees no child it did not start.
    let children = client.call_json("children", json!({})).await.unwrap();
    assert_eq!(children, json!([]), "the pool process has children");
    let guards = guards_in(&dir_path);
    assert_eq!(guards.len(), 1, "one guard: {guards:?}");
    let guard = guards[0];
    assert_eq!(
        stat_field(guard, 4),
        Some(worker.pid().as_raw()),
        "its parent"
    );
    assert_eq!(stat_field(guard, 5), Some(pid), "its process group");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{guard}/comm"))
            .unwrap()
            .trim(),
        "warren-guard"
    );

    // Every start from now on fails at exec (EACCES), as during a botched deploy.
    mode(0o644);
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    eventually("four failed starts", Duration::from_secs(20), || async {
        failed_starts.load(std::sync::atomic::Ordering::Relaxed) >= 4
    })
    .await;
    let left = guards_in(&dir_path);
    assert!(
        left.is_empty(),
        "guards left behind by failed starts: {left:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_noticed_while_a_subprocess_holds_the_protocol_output() {
    // A subprocess that holds the very pipe the worker reads frames from (what a runner without
    // the helpers hands its subprocesses): its end comes only with the subprocess.
    let (_q, pool, _w, client) = setup(
        "pool-crash-output",
        Lang::Python,
        &["spawn_holder", "die", "answer_and_exit"],
        |c| c.time_limit = Some(Duration::from_secs(20)),
    )
    .await;
    let mut reap = Reap::default();
    let holder = pid_in(&client.call_json("spawn_holder", json!({})).await.unwrap());
    reap.0.push(holder);
    let began = Instant::now();
    let once = CallOptions::default().max_attempts(1);
    let result = client.call_json_with("die", json!({}), &once).await;
    assert_eq!(
        failure_kind(&result),
        Some(ErrorKind::Crashed),
        "{result:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the crash took {:?} to be noticed",
        began.elapsed()
    );
    eventually("the holder gone", Duration::from_secs(5), || async {
        !alive(holder)
    })
    .await;

    // A result written just before the exit is still read, though the pipe stays open.
    let dir = temp_dir("pool-crash-output");
    let pidfile = dir.path().join("pid");
    let answered = client
        .call_json_with("answer_and_exit", json!({"pidfile": pidfile}), &once)
        .await;
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        reap.0.extend(pid.trim().parse::<i32>());
    }
    assert_eq!(answered.unwrap(), "answered");
    eventually("a replacement started", Duration::from_secs(10), || async {
        pool.stats().started == 3 && pool.stats().pids.len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_exits_while_it_is_written_a_long_task_fails_at_once() {
    // A runner that leaves a subprocess holding its stdin, reads one byte of the task, and
    // exits: the rest of a task line longer than a pipe holds can never be written. (`sh` gives
    // a background command /dev/null as stdin unless it is redirected from another fd.)
    let dir = temp_dir("pool-exit-mid-write");
    let runner = dir.path().join("runner.sh");
    let pidfile = dir.path().join("sleep.pid");
    std::fs::write(
        &runner,
        "printf '%s\\n' '{\"type\":\"ready\",\"protocol\":1,\"functions\":[\"hold\"]}'\n\
         exec 3<&0\n\
         sleep 600 <&3 >/dev/null 2>&1 3<&- &\n\
         echo $! > \"$1\"\n\
         dd bs=1 count=1 of=/dev/null status=none\n\
         exit 3\n",
    )
    .unwrap();
    let config = PoolConfig {
        name: Some("exit-mid-write".into()),
        functions: vec!["hold".into()],
        command: vec![
            "sh".into(),
            runner.to_string_lossy().into_owned(),
            pidfile.to_string_lossy().into_owned(),
        ],
        processes: 1,
        time_limit: Some(Duration::from_secs(20)),
        stop_grace: Duration::from_millis(500),
        ..PoolConfig::default()
    };
    let q = TestQueue::new("pool-exit-mid-write");
    let pool = Pool::start(config).await.unwrap();
    let _w = q.worker(Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let mut reap = Reap::default();
    if let Ok(pid) = std::fs::read_to_string(&pidfile) {
        reap.0.extend(pid.trim().parse::<i32>());
    }
    let began = Instant::now();
    let result = client
        .call_json_with(
            "hold",
            json!({ "pad": "x".repeat(1 << 20) }),
            &CallOptions::default().max_attempts(1),
        )
        .await;
    assert_eq!(
        failure_kind(&result),
        Some(ErrorKind::Crashed),
        "{result:?}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "the exit took {:?} to be noticed",
        began.elapsed()
    );
}

#[tokio::test]
async fn the_node_helper_serves_a_task_file_on_stdin_outside_the_worker() {
    let dir = temp_dir("node-by-hand");
    let tasks = dir.path().join("tasks.jsonl");
    std::fs::write(
        &tasks,
        "{\"type\":\"task\",\"id\":\"t1\",\"function\":\"add\",\"args\":{\"a\":1,\"b\":2}}\n",
    )
    .unwrap();
    let command = Lang::Node.command();
    let run = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::fs::File::open(&tasks).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("node did not finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let frames: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(frames.len(), 2, "{stdout}");
    assert_eq!(frames[0]["type"], "ready");
    assert_eq!(frames[1]["id"], "t1");
    assert_eq!(frames[1]["result"]["sum"], 3);
}
