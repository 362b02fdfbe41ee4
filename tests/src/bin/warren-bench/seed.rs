//! The `seed` scenario: the seed's own pattern, without PHP, against its floor.
//!
//! The seed hands `send_mail` to Workerman task processes over the Text protocol. Here the same
//! traffic goes, in alternating rounds, to:
//!
//! - **Warren**: the release `warren-gateway` next to this binary (Text bridge and websocket on
//!   loopback) and `--seed-workers` release `warren-worker` processes serving `send_mail` into
//!   an outbox on a queue of this run's own (`--queue`; their functions exchange is this run's too);
//! - **the floor**: `--seed-floor-processes` minimal Text task servers without a broker
//!   (`floor.rs`), doing the same work, as the seed's `TaskWorker` processes do.
//!
//! Load patterns, each measured and reported on its own:
//!
//! - `conn`: `--seed-clients` clients each opening a new TCP connection per task, sending one
//!   line, reading the answer and closing (Workerman's `AsyncTcpConnection`);
//! - `pipelined`: the same tasks over one Text connection, `--seed-window` lines in flight;
//! - `ws`: the same over the gateway's websocket (Warren only: the seed has no such port);
//! - `seq`: one call at a time over one Text connection, and in the same run a raw lapin RPC
//!   through a quorum queue and direct reply-to (`RawSide`), to show what the bridge adds to the
//!   broker's own round trip (target: at most 0.2 ms).
//!
//! For each: tasks/s, p50/p99 latency and CPU per task of each process (`/proc/<pid>/stat`):
//! gateway, workers, broker, floor servers and this bench client. Every answer is checked, and
//! the outbox must hold exactly one `.eml` per task after each run. `--kill-worker` then runs the
//! `conn` pattern once more on each side and SIGKILLs one worker (one floor process) after a
//! third of the tasks are answered, and counts the mails lost. See `docs/benchmarks.md`.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use lapin::Channel;
use lapin::options::ExchangeDeleteOptions;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;
use warren_shared::topology;
use warren_tests::ChildGuard;

use super::{Args, RawSide, delete_queues, median, percentile_ms, process_cpu_seconds};

/// The load patterns, in the order they run.
pub(crate) const PATTERNS: [&str; 4] = ["conn", "pipelined", "ws", "seq"];

/// Bound on waiting for one answer, so that a lost task fails the run instead of hanging it.
/// Above the gateway's call timeout (60 s), so a task that never ran is answered `timeout`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(90);

/// Bound on start-up (processes listening, workers consuming).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The seed's task arguments for task `i`.
fn mail_args(i: usize) -> Value {
    json!({
        "from": "shop@example.com",
        "to": format!("user{i}@example.com"),
        "contents": format!("Hello user {i}, your order has shipped. Thanks for shopping with us!"),
    })
}

/// The seed's request line for task `i`, `\n` included.
fn task_line(function: &str, i: usize) -> String {
    let mut line = json!({ "function": function, "args": mail_args(i) }).to_string();
    line.push('\n');
    line
}

/// Where a measured run is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Warren,
    Floor,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Warren => "Warren",
            Side::Floor => "floor",
        }
    }
}

/// CPU seconds of each component (a sample, or the difference of two).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    gateway: f64,
    workers: f64,
    broker: f64,
    floor: f64,
    client: f64,
}

impl Cpu {
    fn minus(self, before: Cpu) -> Cpu {
        Cpu {
            gateway: self.gateway - before.gateway,
            workers: self.workers - before.workers,
            broker: self.broker - before.broker,
            floor: self.floor - before.floor,
            client: self.client - before.client,
        }
    }

    fn per_task_ms(self, tasks: usize) -> Cpu {
        let f = 1e3 / tasks as f64;
        Cpu {
            gateway: self.gateway * f,
            workers: self.workers * f,
            broker: self.broker * f,
            floor: self.floor * f,
            client: self.client * f,
        }
    }
}

/// The processes whose CPU is read.
struct Pids {
    gateway: String,
    workers: Vec<String>,
    broker: Option<String>,
    floor: Vec<String>,
}

impl Pids {
    fn sample(&self) -> Cpu {
        let sum = |pids: &[String]| pids.iter().map(|p| process_cpu_seconds(p)).sum::<f64>();
        Cpu {
            gateway: process_cpu_seconds(&self.gateway),
            workers: sum(&self.workers),
            broker: self.broker.as_deref().map_or(f64::NAN, process_cpu_seconds),
            floor: sum(&self.floor),
            client: process_cpu_seconds("self"),
        }
    }
}

/// What the clients of one run saw.
#[derive(Debug, Default)]
struct Outcome {
    /// Send-to-answer time of every answered task.
    latencies: Vec<Duration>,
    /// The outbox file named by every successful answer (`delivered_to: "outbox:<name>"`).
    files: Vec<String>,
    /// Answers that were errors, and tasks that got no answer (connection failed or closed).
    errors: usize,
    unanswered: usize,
    /// The first failure seen, for the report.
    first_failure: Option<String>,
}

impl Outcome {
    fn failed(&mut self, answered: bool, what: String) {
        if answered {
            self.errors += 1;
        } else {
            self.unanswered += 1;
        }
        self.first_failure.get_or_insert(what);
    }

    fn merge(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.files.extend(other.files);
        self.errors += other.errors;
        self.unanswered += other.unanswered;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }

    /// Fails unless all `n` tasks were answered successfully.
    fn all_ok(&self, n: usize, what: &str) -> Result<()> {
        if self.files.len() != n || self.errors + self.unanswered > 0 {
            bail!(
                "{what}: {} of {n} tasks answered ok, {} errors, {} unanswered; first failure: {}",
                self.files.len(),
                self.errors,
                self.unanswered,
                self.first_failure.as_deref().unwrap_or("none")
            );
        }
        Ok(())
    }
}

/// The file a successful `send_mail` answer names, or the failure.
fn receipt_file(answer: &Value) -> Result<String, String> {
    if let Some(error) = answer.get("error") {
        return Err(format!("error answer: {error}"));
    }
    answer
        .get("delivered_to")
        .and_then(Value::as_str)
        .and_then(|d| d.strip_prefix("outbox:"))
        .map(str::to_owned)
        .ok_or_else(|| format!("not a send_mail receipt: {answer}"))
}

/// A SIGKILL to send once `at` tasks have been answered.
#[derive(Clone)]
struct Kill {
    at: usize,
    pid: Pid,
    answered: Arc<AtomicUsize>,
}

impl Kill {
    fn answered_one(&self) {
        if self.answered.fetch_add(1, Ordering::SeqCst) + 1 == self.at {
            let _ = kill(self.pid, Signal::SIGKILL);
        }
    }
}

/// Pattern `conn`: `clients` loops, each task on a new connection; with `kill`, a failure is
/// counted instead of ending the run.
async fn conn_per_task(
    addr: SocketAddr,
    n: usize,
    clients: usize,
    kill: Option<Kill>,
) -> Result<Outcome> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..clients.max(1) {
        let (next, kill) = (next.clone(), kill.clone());
        loops.spawn(async move {
            let mut outcome = Outcome::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return outcome;
                }
                let start = Instant::now();
                match one_connection(addr, &task_line("send_mail", i)).await {
                    Ok(answer) => match receipt_file(&answer) {
                        Ok(file) => {
                            outcome.latencies.push(start.elapsed());
                            outcome.files.push(file);
                            if let Some(kill) = &kill {
                                kill.answered_one();
                            }
                        }
                        Err(e) => outcome.failed(true, e),
                    },
                    Err(e) => outcome.failed(false, format!("{e:#}")),
                }
                if kill.is_none() && outcome.first_failure.is_some() {
                    return outcome;
                }
            }
        });
    }
    let mut outcome = Outcome::default();
    while let Some(joined) = loops.join_next().await {
        outcome.merge(joined.context("a client loop panicked")?);
    }
    Ok(outcome)
}

/// One task on a connection of its own: connect, send the line, read the answer, close.
async fn one_connection(addr: SocketAddr, line: &str) -> Result<Value> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    stream.get_mut().write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    let read = tokio::time::timeout(ANSWER_TIMEOUT, stream.read_line(&mut answer))
        .await
        .context("no answer in time")??;
    if read == 0 {
        bail!("connection closed without an answer");
    }
    Ok(serde_json::from_str(&answer)?)
}

/// Pattern `pipelined`: every task over one connection, at most `window` unanswered.
async fn pipelined(addr: SocketAddr, n: usize, window: usize) -> Result<Outcome> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let window = Arc::new(Semaphore::new(window.max(1)));
    let (sent_tx, mut sent_rx) = mpsc::unbounded_channel();
    let writer = {
        let window = window.clone();
        tokio::spawn(async move {
            for i in 0..n {
                window.acquire().await?.forget();
                let _ = sent_tx.send(Instant::now());
                write
                    .write_all(task_line("send_mail", i).as_bytes())
                    .await?;
            }
            // Kept open until the answers are read.
            Ok::<_, anyhow::Error>(write)
        })
    };
    let mut lines = BufReader::new(read).lines();
    let mut outcome = Outcome::default();
    for _ in 0..n {
        let line = tokio::time::timeout(ANSWER_TIMEOUT, lines.next_line())
            .await
            .context("no answer in time")??
            .context("the connection closed before every answer")?;
        let sent = sent_rx.recv().await.context("answer to nothing sent")?;
        outcome.latencies.push(sent.elapsed());
        window.add_permits(1);
        match receipt_file(&serde_json::from_str(&line)?) {
            Ok(file) => outcome.files.push(file),
            Err(e) => outcome.failed(true, e),
        }
    }
    drop(writer.await.context("the writer panicked")??);
    Ok(outcome)
}

/// Pattern `ws`: every task over one websocket, at most `window` without a result.
async fn websocket(http: SocketAddr, n: usize, window: usize) -> Result<Outcome> {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{http}/ws"))
        .await
        .context("connecting to the websocket")?;
    let (mut sink, mut stream) = socket.split();
    let window = Arc::new(Semaphore::new(window.max(1)));
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; n]));
    let writer = {
        let (window, sent) = (window.clone(), sent.clone());
        tokio::spawn(async move {
            for i in 0..n {
                window.acquire().await?.forget();
                let message = json!({ "id": i, "function": "send_mail", "args": mail_args(i) });
                sent.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(Instant::now());
                sink.send(Message::text(message.to_string())).await?;
            }
            Ok::<_, anyhow::Error>(sink)
        })
    };
    let mut outcome = Outcome::default();
    let mut results = 0;
    while results < n {
        let message = tokio::time::timeout(ANSWER_TIMEOUT, stream.next())
            .await
            .context("no result in time")?
            .context("the websocket closed before every result")??;
        let Message::Text(text) = message else {
            continue;
        };
        let answer: Value = serde_json::from_str(&text)?;
        if answer.get("status").is_some() {
            continue; // "enqueued"
        }
        results += 1;
        window.add_permits(1);
        let started = answer
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|i| {
                sent.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_mut(usize::try_from(i).ok()?)?
                    .take()
            })
            .with_context(|| format!("a result for no task sent: {answer}"))?;
        outcome.latencies.push(started.elapsed());
        match answer.get("ok") {
            Some(Value::Bool(true)) => {
                match receipt_file(answer.get("result").unwrap_or(&Value::Null)) {
                    Ok(file) => outcome.files.push(file),
                    Err(e) => outcome.failed(true, e),
                }
            }
            _ => outcome.failed(true, format!("error result: {answer}")),
        }
    }
    let mut sink = writer.await.context("the writer panicked")??;
    let _ = sink.close().await;
    Ok(outcome)
}

/// Pattern `seq`: `n` calls of `function`, one at a time, over one Text connection.
async fn sequential(addr: SocketAddr, function: &str, n: usize) -> Result<Outcome> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut stream = BufReader::new(stream);
    let mut outcome = Outcome::default();
    let mut answer = String::new();
    for i in 0..n {
        let line = task_line(function, i);
        let start = Instant::now();
        stream.get_mut().write_all(line.as_bytes()).await?;
        answer.clear();
        let read = tokio::time::timeout(ANSWER_TIMEOUT, stream.read_line(&mut answer))
            .await
            .context("no answer in time")??;
        if read == 0 {
            bail!("the connection closed without an answer");
        }
        outcome.latencies.push(start.elapsed());
        let answer: Value = serde_json::from_str(&answer)?;
        if function == "echo" {
            if answer != mail_args(i) {
                outcome.failed(true, format!("echo answered {answer}"));
            }
        } else {
            match receipt_file(&answer) {
                Ok(file) => outcome.files.push(file),
                Err(e) => outcome.failed(true, e),
            }
        }
    }
    Ok(outcome)
}

/// One pattern's figures on one side in one round.
#[derive(Debug, Clone, Copy)]
struct Figures {
    tasks_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms: Cpu,
}

/// The release binary `name` next to this executable.
fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()
        .context("locating warren-bench")?
        .with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p warren-gateway -p warren-worker --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback address (bound, read and released; nothing else here takes it meanwhile).
fn free_addr() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The broker's process: `--broker-pid`, else the one `beam.smp` on this host (or the one
/// whose home is `/var/lib/rabbitmq` when there are several, e.g. next to test nodes).
fn broker_pid(args: &Args) -> Option<String> {
    if let Some(pid) = args.broker_pid {
        return Some(pid.to_string());
    }
    let output = Command::new("pgrep")
        .args(["-f", "beam.smp"])
        .output()
        .ok()?;
    let pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    match pids.as_slice() {
        [one] => Some(one.clone()),
        _ => pids.into_iter().find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("/var/lib/rabbitmq"))
                .unwrap_or(false)
        }),
    }
}

/// The `.eml` files in `dir` (not the `.tmp` files of an unfinished write).
fn eml_files(dir: &Path) -> Result<HashSet<String>> {
    let mut names = HashSet::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".eml") && !name.starts_with('.') {
            names.insert(name);
        }
    }
    Ok(names)
}

/// Removes every file in `dir`.
fn clear(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::fs::remove_file(entry?.path())?;
    }
    Ok(())
}

/// Fails unless `dir` holds exactly the files the answers named, one per task.
fn verify_outbox(dir: &Path, outcome: &Outcome, n: usize, what: &str) -> Result<()> {
    let files = eml_files(dir)?;
    let named: HashSet<&str> = outcome.files.iter().map(String::as_str).collect();
    let missing = named.iter().filter(|f| !files.contains(**f)).count();
    if files.len() != n || named.len() != n || missing > 0 {
        bail!(
            "{what}: the outbox holds {} .eml files for {n} tasks; {} distinct files answered, {missing} of them missing",
            files.len(),
            named.len()
        );
    }
    Ok(())
}

/// Everything a run started; dropping it stops the processes.
struct Deployment {
    _gateway: ChildGuard,
    text: SocketAddr,
    http: SocketAddr,
    workers: Vec<ChildGuard>,
    floor: Vec<ChildGuard>,
    floor_addr: SocketAddr,
    warren_outbox: PathBuf,
    floor_outbox: PathBuf,
    pids: Pids,
}

impl Deployment {
    async fn start(
        args: &Args,
        admin: &Channel,
        queue: &str,
        functions: &str,
        dir: &Path,
    ) -> Result<Self> {
        let warren_outbox = dir.join("warren-outbox");
        let floor_outbox = dir.join("floor-outbox");
        std::fs::create_dir_all(&warren_outbox)?;
        std::fs::create_dir_all(&floor_outbox)?;
        let log = |name: &str| -> Result<Stdio> {
            Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
        };

        // Each process's tokio worker threads (tokio reads TOKIO_WORKER_THREADS); 0 leaves
        // tokio's default, one per core.
        let threads = |command: &mut Command| {
            if args.seed_threads > 0 {
                command.env("TOKIO_WORKER_THREADS", args.seed_threads.to_string());
            }
        };
        let worker_binary = sibling_binary("warren-worker")?;
        let mut workers = Vec::new();
        for i in 0..args.seed_workers {
            let mut command = Command::new(&worker_binary);
            threads(&mut command);
            command
                .env("AMQP_URL", &args.url)
                .args(["--queue", queue, "--functions-exchange", functions])
                .args(["--concurrency", &args.worker_concurrency.to_string()])
                .arg("--outbox")
                .arg(&warren_outbox)
                .stdout(Stdio::null())
                .stderr(log(&format!("worker-{i}"))?);
            workers.push(ChildGuard::spawn(command));
        }
        let (text, http) = (free_addr()?, free_addr()?);
        // Room for every client's connection, also while closed ones are being torn down.
        let connections = (4 * args.seed_clients).max(64).to_string();
        let mut command = Command::new(sibling_binary("warren-gateway")?);
        threads(&mut command);
        // No `--queue`: the gateway routes `send_mail` by its name to the workers' queue, as a
        // deployment with the defaults does.
        command
            .env("AMQP_URL", &args.url)
            .args(["--functions-exchange", functions])
            .args(["--text", &text.to_string(), "--http", &http.to_string()])
            .args(["--max-connections-per-peer", &connections])
            .args(["--max-connections", &connections])
            .stdout(Stdio::null())
            .stderr(log("gateway")?);
        let gateway = ChildGuard::spawn(command);

        let floor_addr = free_addr()?;
        let exe = std::env::current_exe()?;
        let mut floor = Vec::new();
        for _ in 0..args.seed_floor_processes {
            let mut command = Command::new(&exe);
            command
                .arg("--seed-floor-serve")
                .arg(floor_addr.to_string())
                .arg("--seed-floor-outbox")
                .arg(&floor_outbox)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            floor.push(ChildGuard::spawn(command));
        }
        for process in &mut floor {
            let stdout = process.take_stdout().context("the floor's stdout")?;
            let ready = tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                    .map(|_| line)
            });
            let line = tokio::time::timeout(START_TIMEOUT, ready)
                .await
                .context("a floor process did not start in time")???;
            if line.trim() != "ready" {
                bail!("a floor process failed to start");
            }
        }

        // The workers consume once they have claimed send_mail; the gateway answers once
        // connected to the broker (the warm-up waits for it).
        let give_up = Instant::now() + START_TIMEOUT;
        loop {
            let consumers = warren_tests::inspect_queue(admin, queue)
                .await?
                .consumer_count();
            if consumers as usize == args.seed_workers {
                break;
            }
            if Instant::now() > give_up {
                bail!(
                    "{consumers} of {} workers consuming after {START_TIMEOUT:?}; see the logs in {}",
                    args.seed_workers,
                    dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pids = Pids {
            gateway: gateway.pid().to_string(),
            workers: workers.iter().map(|w| w.pid().to_string()).collect(),
            broker: broker_pid(args),
            floor: floor.iter().map(|f| f.pid().to_string()).collect(),
        };
        Ok(Self {
            _gateway: gateway,
            text,
            http,
            workers,
            floor,
            floor_addr,
            warren_outbox,
            floor_outbox,
            pids,
        })
    }

    fn outbox(&self, side: Side) -> &Path {
        match side {
            Side::Warren => &self.warren_outbox,
            Side::Floor => &self.floor_outbox,
        }
    }

    fn text_addr(&self, side: Side) -> SocketAddr {
        match side {
            Side::Warren => self.text,
            Side::Floor => self.floor_addr,
        }
    }

    /// One measured run of `pattern` (not `seq`) on `side`, verified.
    async fn measure(&self, args: &Args, pattern: &str, side: Side) -> Result<Figures> {
        let n = args.seed_tasks;
        let addr = self.text_addr(side);
        clear(self.outbox(side))?;
        let before = self.pids.sample();
        let start = Instant::now();
        let outcome = match pattern {
            "conn" => conn_per_task(addr, n, args.seed_clients, None).await?,
            "pipelined" => pipelined(addr, n, args.seed_window).await?,
            "ws" => websocket(self.http, n, args.seed_window).await?,
            other => bail!("no pattern {other}"),
        };
        let elapsed = start.elapsed();
        let cpu = self.pids.sample().minus(before);
        let what = format!("{pattern} on {}", side.name());
        outcome.all_ok(n, &what)?;
        verify_outbox(self.outbox(side), &outcome, n, &what)?;
        Ok(Figures {
            tasks_per_s: n as f64 / elapsed.as_secs_f64(),
            p50_ms: percentile_ms(&outcome.latencies, 50.0),
            p99_ms: percentile_ms(&outcome.latencies, 99.0),
            cpu_ms: cpu.per_task_ms(n),
        })
    }

    /// One sequential run of `function` through `side`'s Text port, verified.
    async fn sequential(&self, args: &Args, function: &str, side: Side) -> Result<Figures> {
        let n = args.seed_seq_calls;
        clear(self.outbox(side))?;
        let before = self.pids.sample();
        let start = Instant::now();
        let outcome = sequential(self.text_addr(side), function, n).await?;
        let elapsed = start.elapsed();
        let cpu = self.pids.sample().minus(before);
        let what = format!("seq {function} on {}", side.name());
        if function == "send_mail" {
            outcome.all_ok(n, &what)?;
            verify_outbox(self.outbox(side), &outcome, n, &what)?;
        } else if let Some(failure) = outcome.first_failure {
            bail!("{what}: {failure}");
        }
        Ok(Figures {
            tasks_per_s: n as f64 / elapsed.as_secs_f64(),
            p50_ms: percentile_ms(&outcome.latencies, 50.0),
            p99_ms: percentile_ms(&outcome.latencies, 99.0),
            cpu_ms: cpu.per_task_ms(n),
        })
    }
}

/// The rows of the report: (pattern label, side label), each with its rounds' figures.
type Rows = Vec<((&'static str, &'static str), Vec<Figures>)>;

fn record(rows: &mut Rows, key: (&'static str, &'static str), figures: Figures) {
    match rows.iter_mut().find(|(k, _)| *k == key) {
        Some((_, all)) => all.push(figures),
        None => rows.push((key, vec![figures])),
    }
}

fn print_round(key: (&str, &str), f: &Figures) {
    println!(
        "    {:<28} {:<16} {:>7.0} tasks/s  p50 {:>8.3} ms  p99 {:>8.3} ms  CPU ms/task: gateway {:.3} workers {:.3} broker {:.3} floor {:.3} client {:.3}",
        key.0,
        key.1,
        f.tasks_per_s,
        f.p50_ms,
        f.p99_ms,
        f.cpu_ms.gateway,
        f.cpu_ms.workers,
        f.cpu_ms.broker,
        f.cpu_ms.floor,
        f.cpu_ms.client
    );
}

/// Runs the scenario and prints its report.
pub(crate) async fn run(args: &Args, admin: &Channel) -> Result<()> {
    for pattern in &args.seed_patterns {
        if !PATTERNS.contains(&pattern.as_str()) {
            bail!("--seed-patterns: {pattern:?} is not one of {PATTERNS:?}");
        }
    }
    let queue = format!("bench.seed.{}", Uuid::new_v4());
    let raw_queue = format!("bench.seed.raw.{}", Uuid::new_v4());
    let functions = warren_tests::functions_exchange_of(&queue);
    let mut dir = tempfile::Builder::new();
    dir.prefix("warren-bench-seed-");
    let dir = match &args.seed_outbox_dir {
        Some(base) => dir.tempdir_in(base)?,
        None => dir.tempdir()?,
    };
    let result = tokio::select! {
        result = async {
            topology::declare(admin, &queue).await?;
            topology::declare(admin, &raw_queue).await?;
            run_declared(args, admin, &queue, &raw_queue, &functions, dir.path()).await
        } => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let names = [
        queue.clone(),
        format!("{queue}.dead"),
        raw_queue.clone(),
        format!("{raw_queue}.dead"),
    ];
    let deleted = delete_queues(admin, &names).await;
    // The per-function exchanges are auto-deleted with their binding to this one.
    let deleted_exchange = admin
        .exchange_delete(functions.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    if result.is_err() {
        // Kept for the post-mortem: the gateway's and workers' logs, and the outboxes.
        eprintln!("the processes' logs are in {}", dir.keep().display());
    }
    result?;
    deleted?;
    deleted_exchange.context("deleting the functions exchange")?;
    Ok(())
}

async fn run_declared(
    args: &Args,
    admin: &Channel,
    queue: &str,
    raw_queue: &str,
    functions: &str,
    dir: &Path,
) -> Result<()> {
    let wants = |p: &str| args.seed_patterns.iter().any(|x| x == p);
    let (load, _) = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_once(' ')
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap_or_default();
    println!(
        "warren-bench seed: tasks={} clients={} window={} seq_calls={} workers={} (concurrency {}) floor processes={} rounds={} patterns={} kill_worker={} threads={} outboxes in {} ({} cores, load average {load} at start)",
        args.seed_tasks,
        args.seed_clients,
        args.seed_window,
        args.seed_seq_calls,
        args.seed_workers,
        args.worker_concurrency,
        args.seed_floor_processes,
        args.rounds,
        args.seed_patterns.join(","),
        args.kill_worker,
        args.seed_threads,
        dir.display(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    let mut deployment = Deployment::start(args, admin, queue, functions, dir).await?;
    if deployment.pids.broker.is_none() {
        println!("  (broker process not found: pass --broker-pid for its CPU)");
    }
    let raw = if wants("seq") {
        Some(RawSide::start(args, raw_queue, true).await?)
    } else {
        None
    };
    let result = async {
        // Warm-up, not measured: connections, pools, the broker's and the page cache.
        let warmup = args.seed_warmup;
        for side in [Side::Warren, Side::Floor] {
            let addr = deployment.text_addr(side);
            conn_per_task(addr, warmup, args.seed_clients, None)
                .await?
                .all_ok(warmup, &format!("warm-up on {}", side.name()))?;
            pipelined(addr, warmup, args.seed_window)
                .await?
                .all_ok(warmup, &format!("warm-up on {}", side.name()))?;
        }
        websocket(deployment.http, warmup, args.seed_window)
            .await?
            .all_ok(warmup, "websocket warm-up")?;
        if let Some(raw) = &raw {
            raw.rpc(warmup, 1, &mail_args(0)).await?;
        }

        let mut rows: Rows = Vec::new();
        for round in 1..=args.rounds {
            println!("  round {round}:");
            for pattern in &args.seed_patterns {
                let label = pattern_label(pattern);
                let sides: &[Side] = match pattern.as_str() {
                    "ws" => &[Side::Warren],
                    _ => &[Side::Warren, Side::Floor],
                };
                if pattern == "seq" {
                    let mut one = |key, f: Figures| {
                        print_round(key, &f);
                        record(&mut rows, key, f);
                    };
                    let f = deployment
                        .sequential(args, "send_mail", Side::Warren)
                        .await?;
                    one((label, "Warren send_mail"), f);
                    let f = deployment.sequential(args, "echo", Side::Warren).await?;
                    one((label, "Warren echo"), f);
                    if let Some(raw) = &raw {
                        let before = deployment.pids.sample();
                        let start = Instant::now();
                        let latencies = raw.sequential(args.seed_seq_calls, &mail_args(0)).await?;
                        let elapsed = start.elapsed();
                        let cpu = deployment.pids.sample().minus(before);
                        one(
                            (label, "raw lapin RPC"),
                            Figures {
                                tasks_per_s: args.seed_seq_calls as f64 / elapsed.as_secs_f64(),
                                p50_ms: percentile_ms(&latencies, 50.0),
                                p99_ms: percentile_ms(&latencies, 99.0),
                                cpu_ms: cpu.per_task_ms(args.seed_seq_calls),
                            },
                        );
                    }
                    let f = deployment
                        .sequential(args, "send_mail", Side::Floor)
                        .await?;
                    one((label, "floor send_mail"), f);
                    continue;
                }
                for &side in sides {
                    let f = deployment.measure(args, pattern, side).await?;
                    print_round((label, side.name()), &f);
                    record(&mut rows, (label, side.name()), f);
                }
            }
        }
        report(&rows);
        if args.kill_worker {
            kill_run(args, admin, queue, &mut deployment).await?;
        }
        Ok(())
    }
    .await;
    if let Some(raw) = raw {
        raw.stop().await;
    }
    drop(deployment);
    result
}

fn pattern_label(pattern: &str) -> &'static str {
    match pattern {
        "conn" => "connection per task",
        "pipelined" => "pipelined, one connection",
        "ws" => "websocket, one connection",
        _ => "sequential, one connection",
    }
}

/// The median of one figure over the rounds.
fn med(all: &[Figures], figure: impl Fn(&Figures) -> f64) -> f64 {
    median(&all.iter().map(figure).collect::<Vec<_>>())
}

fn report(rows: &Rows) {
    println!();
    println!(
        "| pattern (median of rounds) | side | tasks/s | p50 ms | p99 ms | CPU ms/task: gateway | workers | broker | floor servers | bench client | Warren/floor tasks/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let floor_rate = |pattern: &str| {
        rows.iter()
            .find(|((p, s), _)| *p == pattern && s.starts_with("floor"))
            .map(|(_, all)| med(all, |f| f.tasks_per_s))
    };
    let cell = |v: f64| {
        if v.is_nan() || v.abs() < 0.0005 {
            "–".to_owned()
        } else {
            format!("{v:.3}")
        }
    };
    for ((pattern, side), all) in rows {
        let rate = med(all, |f| f.tasks_per_s);
        let ratio = match (
            matches!(*side, "Warren" | "Warren send_mail"),
            floor_rate(pattern),
        ) {
            (true, Some(floor)) => format!("{:.2}", rate / floor),
            _ => String::new(),
        };
        println!(
            "| {pattern} | {side} | {rate:.0} | {:.3} | {:.3} | {} | {} | {} | {} | {} | {ratio} |",
            med(all, |f| f.p50_ms),
            med(all, |f| f.p99_ms),
            cell(med(all, |f| f.cpu_ms.gateway)),
            cell(med(all, |f| f.cpu_ms.workers)),
            cell(med(all, |f| f.cpu_ms.broker)),
            cell(med(all, |f| f.cpu_ms.floor)),
            cell(med(all, |f| f.cpu_ms.client)),
        );
    }
    let p50 = |side: &str| {
        rows.iter()
            .find(|((p, s), _)| p.starts_with("sequential") && *s == side)
            .map(|(_, all)| med(all, |f| f.p50_ms))
    };
    if let (Some(echo), Some(mail), Some(raw)) = (
        p50("Warren echo"),
        p50("Warren send_mail"),
        p50("raw lapin RPC"),
    ) {
        let added = echo - raw;
        println!();
        println!(
            "sequential: the bridge adds {added:.3} ms to the broker's own round trip (Warren echo p50 {echo:.3} ms - raw lapin RPC p50 {raw:.3} ms; target <= 0.2 ms: {}); send_mail through the bridge adds {:.3} ms",
            if added <= 0.2 { "MET" } else { "not met" },
            mail - raw
        );
    }
}

/// `--kill-worker`: the `conn` pattern once more on each side, one worker (one floor process)
/// SIGKILLed after a third of the tasks are answered; Warren must lose no mail and answer
/// every task.
async fn kill_run(
    args: &Args,
    admin: &Channel,
    queue: &str,
    deployment: &mut Deployment,
) -> Result<()> {
    let n = args.seed_tasks;
    println!();
    println!(
        "kill -9 mid-load (connection per task, {n} tasks, {} clients; SIGKILL after {} answers):",
        args.seed_clients,
        n / 3
    );
    for side in [Side::Warren, Side::Floor] {
        let outbox = deployment.outbox(side).to_path_buf();
        let addr = deployment.text_addr(side);
        clear(&outbox)?;
        let victim = match side {
            Side::Warren => deployment.workers.first_mut(),
            Side::Floor => deployment.floor.first_mut(),
        }
        .context("no process to kill")?;
        let kill = Kill {
            at: n / 3,
            pid: victim.pid(),
            answered: Arc::default(),
        };
        let outcome = conn_per_task(addr, n, args.seed_clients, Some(kill.clone())).await?;
        if kill.answered.load(Ordering::SeqCst) < kill.at {
            bail!("{}: the kill never happened", side.name());
        }
        if victim.wait_timeout(Duration::from_secs(5)).is_none() {
            bail!("{}: the killed process is still running", side.name());
        }
        let files = eml_files(&outbox)?;
        let answered_without_file = outcome.files.iter().filter(|f| !files.contains(*f)).count();
        let without_mail = n.saturating_sub(files.len());
        println!(
            "  {:<6}: {} answered ok, {} answered with an error, {} without an answer; {} .eml files; mails lost: {without_mail} (tasks with no .eml), {answered_without_file} answered ok without their .eml{}",
            side.name(),
            outcome.files.len(),
            outcome.errors,
            outcome.unanswered,
            files.len(),
            outcome
                .first_failure
                .as_deref()
                .map(|f| format!("; first failure: {f}"))
                .unwrap_or_default()
        );
        if side == Side::Warren {
            let dead = warren_tests::inspect_queue(admin, &format!("{queue}.dead"))
                .await?
                .message_count();
            if answered_without_file > 0
                || without_mail > 0
                || outcome.errors + outcome.unanswered > 0
                || dead > 0
            {
                bail!("Warren lost mail or answers when a worker was killed ({dead} dead letters)");
            }
        }
    }
    Ok(())
}
