//! Progress from inside a running task, to the caller waiting for it: Rust handlers and the
//! PHP, Python and Node runners report it, the worker coalesces it and sends it to the reply
//! address before the result; the client, `warren call` and the gateway's websocket show it,
//! and calls that do not follow progress are not disturbed by it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use warren_client::{CallOptions, CallerProgress, Client, ProgressCall, ReplyMode};
use warren_gateway::{Allowlist, GatewaySettings, Limits};
use warren_shared::Task;
use warren_tests::{TestQueue, binary};
use warren_worker::progress::INTERVAL;
use warren_worker::{Pool, PoolConfig, Progress, Registry, RunningWorker, TaskContext, TaskError};

/// Bound on any single wait, so that a bug fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

/// Reports `steps` updates, `pause_ms` apart: fraction `i/steps`, message `step i`, detail
/// `{"step": i}`. Returns `steps`.
#[derive(Debug, Serialize, Deserialize)]
struct Steps {
    steps: u32,
    pause_ms: u64,
}

impl Task for Steps {
    const NAME: &'static str = "steps";
    type Output = u32;
}

async fn steps(args: Steps, ctx: TaskContext) -> Result<u32, TaskError> {
    for i in 1..=args.steps {
        ctx.progress(
            Progress::fraction(f64::from(i) / f64::from(args.steps))
                .with_message(format!("step {i}"))
                .with_detail(&json!({ "step": i })),
        );
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    Ok(args.steps)
}

/// Reports `n` fractions (with `report`; computes them only without) in a loop that never
/// yields, on a blocking thread as CPU-bound work should run; returns how long the loop took,
/// in µs.
#[derive(Debug, Serialize, Deserialize)]
struct Flood {
    n: u32,
    report: bool,
}

impl Task for Flood {
    const NAME: &'static str = "flood";
    type Output = u64;
}

async fn flood(args: Flood, ctx: TaskContext) -> Result<u64, TaskError> {
    let took = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut sum = 0.0;
        for i in 1..=args.n {
            let fraction = f64::from(i) / f64::from(args.n);
            if args.report {
                ctx.progress_fraction(fraction);
            }
            sum += fraction;
        }
        std::hint::black_box(sum);
        started.elapsed()
    })
    .await?;
    Ok(u64::try_from(took.as_micros()).unwrap_or(u64::MAX))
}

fn registry() -> Registry {
    Registry::new().register_fn(steps).register_fn(flood)
}

/// Every update of `call`, in order, then its result.
async fn follow<T: Unpin>(
    mut call: ProgressCall<T>,
) -> (Vec<CallerProgress>, Result<T, warren_client::Error>) {
    let mut updates = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        while let Some(update) = call.progress().await {
            updates.push(update);
        }
        call.await
    })
    .await
    .expect("the call ends within the wait bound");
    (updates, result)
}

fn fractions(updates: &[CallerProgress]) -> Vec<f64> {
    updates
        .iter()
        .map(|u| u.progress.fraction.unwrap_or(f64::NAN))
        .collect()
}

/// Asserts `updates` are in the order they were reported, from attempt 1, ending with
/// fraction 1.0.
fn assert_in_order_ending_at_one(updates: &[CallerProgress]) {
    assert!(!updates.is_empty(), "no progress reached the caller");
    let fractions = fractions(updates);
    assert!(
        fractions.windows(2).all(|w| w[0] < w[1]),
        "out of order: {fractions:?}"
    );
    assert_eq!(fractions.last(), Some(&1.0), "{fractions:?}");
    assert!(updates.iter().all(|u| u.attempt == 1), "{updates:?}");
}

async fn progress_reaches_the_caller(label: &str, replies: ReplyMode) {
    let q = TestQueue::new(label);
    let w = q.worker(registry(), 4).await;
    let client = q.client_with(|s| s.replies = replies.clone()).await;
    if let Some(reply_queue) = client.reply_queue() {
        q.also_delete(reply_queue);
    }
    // Reports 300 ms apart, past the coalescing interval: every one is sent.
    let args = Steps {
        steps: 4,
        pause_ms: 300,
    };
    let (updates, result) = follow(client.call_with_progress(&args, &CallOptions::default())).await;
    assert_eq!(result.unwrap(), 4);
    assert_in_order_ending_at_one(&updates);
    let last = updates.last().unwrap();
    assert_eq!(last.progress.message.as_deref(), Some("step 4"));
    assert_eq!(
        last.progress.detail.as_ref().map(|d| d.get()),
        Some(r#"{"step":4}"#)
    );
    assert!(updates.len() >= 2, "{updates:?}");

    // A call that does not follow progress gets its result, not the first progress message.
    let plain = client.call(&args).await.unwrap();
    assert_eq!(plain, 4);
    let json = client
        .call_json("steps", json!({"steps": 3, "pause_ms": 50}))
        .await
        .unwrap();
    assert_eq!(json, json!(3));
    assert_eq!(client.pending_calls(), 0);
    client.close().await;
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_progress_reaches_the_caller_in_order_before_the_result_with_direct_reply_to() {
    progress_reaches_the_caller("progress-direct", ReplyMode::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_progress_reaches_the_caller_in_order_before_the_result_with_a_reply_queue() {
    let replies = ReplyMode::Queue {
        expires: Duration::from_secs(60),
    };
    progress_reaches_the_caller("progress-queue", replies).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_loop_of_progress_is_coalesced_and_not_slowed() {
    let q = TestQueue::new("progress-flood");
    let w = q.worker(registry(), 4).await;
    let client = q.client().await;
    let n = 100_000;
    let started = Instant::now();
    let (updates, result) = follow(client.call_json_with_progress(
        "flood",
        json!({"n": n, "report": true}),
        &CallOptions::default(),
    ))
    .await;
    let elapsed = started.elapsed();
    let loop_us = result.unwrap().as_u64().unwrap();
    // At most four a second, plus the first and the last.
    let bound = 2 + (elapsed.as_secs_f64() / INTERVAL.as_secs_f64()).floor() as usize;
    assert!(
        updates.len() <= bound,
        "{} updates in {elapsed:?}",
        updates.len()
    );
    assert_in_order_ending_at_one(&updates);
    // A reporter that published each update (even without waiting for confirms) would spend
    // seconds on 100,000 of them; storing the latest takes microseconds each.
    assert!(
        loop_us < 5_000_000,
        "100,000 reports took {loop_us} µs in the handler"
    );
    let quiet = client
        .call_json("flood", json!({"n": n, "report": false}))
        .await
        .unwrap();
    eprintln!(
        "flood: {n} reports in {loop_us} µs ({quiet} µs without reporting), {} updates sent in \
         {elapsed:?}",
        updates.len()
    );
    client.close().await;
    w.shutdown().await.unwrap();
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A runner's `ctx.progress` (fixtures in tests/pools: `progress` reports `steps` updates in a
/// tight loop, then answers `steps`) reaches the caller, its last update before the result.
async fn a_runners_progress_reaches_the_caller(label: &str, command: &[&str], script: &str) {
    let q = TestQueue::new(label);
    let mut argv: Vec<String> = command.iter().map(|c| (*c).to_owned()).collect();
    argv.push(repo().join(script).to_string_lossy().into_owned());
    let pool = match Pool::start(PoolConfig {
        functions: vec!["progress".into()],
        command: argv,
        processes: 1,
        stop_grace: Duration::from_secs(2),
        ..PoolConfig::default()
    })
    .await
    {
        Ok(pool) => pool,
        Err(e) => panic!("pool does not start: {e}"),
    };
    let w = q.worker(Registry::new().register_pool(&pool), 4).await;
    let client = q.client().await;
    let (updates, result) = follow(client.call_json_with_progress(
        "progress",
        json!({"steps": 5}),
        &CallOptions::default(),
    ))
    .await;
    assert_eq!(result.unwrap(), json!(5));
    assert_in_order_ending_at_one(&updates);
    assert_eq!(
        updates.last().unwrap().progress.message.as_deref(),
        Some("step 5")
    );
    client.close().await;
    w.shutdown().await.unwrap();
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn php_ctx_progress_in_percent_reaches_the_caller() {
    a_runners_progress_reaches_the_caller("progress-php", &["php"], "tests/pools/tasks.php").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_ctx_progress_reaches_the_caller() {
    a_runners_progress_reaches_the_caller("progress-py", &["python3"], "tests/pools/tasks.py")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ctx_progress_reaches_the_caller() {
    a_runners_progress_reaches_the_caller("progress-node", &["node"], "tests/pools/tasks.js").await;
}

/// A gateway in front of a worker with [`registry`], on a queue of its own.
struct Gateway {
    http: SocketAddr,
    text: SocketAddr,
    stop: CancellationToken,
    serving: tokio::task::JoinHandle<()>,
    client: Client,
    worker: RunningWorker,
    _queue: TestQueue,
}

impl Gateway {
    async fn start() -> Self {
        let queue = TestQueue::new("progress-gw");
        let worker = queue.worker(registry(), 8).await;
        let client = queue.client().await;
        let listen = || {
            warren_gateway::listen(
                SocketAddr::from(([127, 0, 0, 1], 0)),
                warren_gateway::DEFAULT_LISTEN_BACKLOG,
            )
            .expect("a listener")
        };
        let (http, text) = (listen(), listen());
        let (http_addr, text_addr) = (http.local_addr().unwrap(), text.local_addr().unwrap());
        let stop = CancellationToken::new();
        let settings = GatewaySettings {
            limits: Limits {
                allow: Allowlist::Any,
                ..Limits::default()
            },
            shutdown_grace: Duration::from_secs(5),
            ..GatewaySettings::default()
        };
        let serving = tokio::spawn(warren_gateway::serve(
            settings,
            client.clone(),
            http,
            text,
            stop.clone(),
        ));
        Self {
            http: http_addr,
            text: text_addr,
            stop,
            serving,
            client,
            worker,
            _queue: queue,
        }
    }

    async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.serving)
            .await
            .expect("the gateway stops")
            .unwrap();
        self.client.close().await;
        self.worker.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_forwards_progress_on_the_websocket_and_not_on_the_text_port() {
    let gw = Gateway::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.http))
        .await
        .expect("websocket connects");
    let task = json!({"id": "t1", "function": "steps", "args": {"steps": 3, "pause_ms": 300}});
    ws.send(Message::text(task.to_string())).await.unwrap();
    let mut messages = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message within the wait bound")
            .expect("the websocket is open")
            .expect("a message");
        let Message::Text(text) = message else {
            continue;
        };
        let value: Value = serde_json::from_str(&text).unwrap();
        let done = value.get("ok").is_some();
        messages.push(value);
        if done {
            break;
        }
    }
    assert_eq!(messages[0]["status"], "enqueued", "{messages:?}");
    let last = messages.last().unwrap();
    assert_eq!((&last["id"], &last["result"]), (&json!("t1"), &json!(3)));
    let progress: Vec<&Value> = messages[1..messages.len() - 1].iter().collect();
    assert!(
        !progress.is_empty() && progress.iter().all(|m| m["id"] == "t1"),
        "{messages:?}"
    );
    let fractions: Vec<f64> = progress
        .iter()
        .map(|m| m["progress"]["fraction"].as_f64().unwrap())
        .collect();
    assert!(fractions.windows(2).all(|w| w[0] < w[1]), "{fractions:?}");
    assert_eq!(
        progress.last().unwrap()["progress"],
        json!({"attempt": 1, "fraction": 1.0, "message": "step 3", "detail": {"step": 3}})
    );
    let _ = ws.close(None).await;

    // The Text port answers each line with the result alone.
    let stream = tokio::net::TcpStream::connect(gw.text).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let request = json!({"function": "steps", "args": {"steps": 3, "pause_ms": 300}});
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("an answer within the wait bound")
        .unwrap()
        .unwrap();
    assert_eq!(answer, "3");
    drop(write);
    gw.finish().await;
}

async fn warren_call(queue: &str, extra: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(binary("warren"));
    command
        .args([
            "call",
            "steps",
            r#"{"steps":3,"pause_ms":300}"#,
            "--queue",
            queue,
        ])
        .args(extra)
        .env("AMQP_URL", warren_tests::amqp_url())
        .kill_on_drop(true);
    tokio::time::timeout(WAIT, command.output())
        .await
        .expect("warren call ends within the wait bound")
        .expect("warren runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warren_call_prints_progress_lines_when_asked_and_nothing_off_a_terminal() {
    let q = TestQueue::new("progress-cli");
    let w = q.worker(registry(), 4).await;

    let out = warren_call(&q.name, &["--progress", "lines"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(!lines.is_empty(), "no progress lines");
    assert_eq!(
        lines.last().unwrap()["progress"],
        json!({"attempt": 1, "fraction": 1.0, "message": "step 3", "detail": {"step": 3}})
    );

    // stderr is a pipe here: `auto` draws nothing, and the result is as before.
    let out = warren_call(&q.name, &[]).await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    w.shutdown().await.unwrap();
}
