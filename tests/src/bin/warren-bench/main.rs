//! `warren-bench`: Warren against a raw lapin baseline doing the same AMQP traffic.
//!
//! Three scenarios, each run for Warren and for raw lapin, alternately, a few rounds; the median
//! of each is printed with the ratio Warren/raw (for latencies: raw latency / Warren latency, so
//! that 1.0 means "as good as raw" everywhere and the 0.85 target reads the same way):
//!
//! - `rpc`: calls per second with `--in-flight` calls outstanding at all times;
//! - `seq`: one call at a time, p50 and p99 latency;
//! - `fire`: `--tasks` tasks enqueued with confirms (`--enqueue-in-flight` outstanding) until
//!   the worker has run and acked them all.
//!
//! A fourth scenario, `scale` (run on its own), measures how throughput grows with
//! `warren-worker` processes: see `scale.rs` and `docs/scaling.md`. A fifth, `seed` (also on
//! its own), reproduces the seed's Workerman pattern through `warren-gateway` against a
//! broker-less floor: see `seed.rs` and `floor.rs`. A sixth, `lookup` (on its own),
//! times finding a task's result among a million task events: see `lookup.rs`.
//!
//! The Warren side is an in-process `warren_worker` and a `warren_client::Client`; the raw side
//! is lapin only, on its own queue with the same arguments, the same properties, headers and
//! bodies, confirms and prefetch. It mirrors Warren's design, so a third side, the floor, runs
//! the same raw code without publisher confirms (requests, enqueues and replies are published
//! and not waited on, as in RabbitMQ's RPC tutorial): the least the broker allows. The table
//! gives Warren's ratio to both. See `docs/benchmarks.md`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use warren_client::{CallOptions, Client, ClientSettings};
use warren_shared::{BrokerSettings, Task, topology};
use warren_worker::pool::{Pool, PoolConfig};
use warren_worker::{Handler, Registry, TaskContext, TaskError, WorkerSettings};

mod floor;
mod lookup;
mod scale;
mod seed;

/// Measures Warren against raw lapin on the same broker; see `docs/benchmarks.md`.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Broker URL (loopback only: the numbers mean nothing across a network you share).
    #[arg(long, env = "AMQP_URL", default_value = warren_shared::broker::DEFAULT_AMQP_URL)]
    url: String,
    /// Rounds per scenario and side; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Worker concurrency, which is also the consumer prefetch (both sides).
    #[arg(long, default_value_t = 100)]
    concurrency: u16,
    /// Calls outstanding at once in the `rpc` scenario.
    #[arg(long, default_value_t = 100)]
    in_flight: usize,
    /// Calls per round in the `rpc` scenario.
    #[arg(long, default_value_t = 30_000)]
    rpc_calls: usize,
    /// Calls per round in the `seq` scenario.
    #[arg(long, default_value_t = 2_000)]
    seq_calls: usize,
    /// Tasks per round in the `fire` scenario.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Enqueues awaiting their confirm at once in the `fire` scenario.
    #[arg(long, default_value_t = 100)]
    enqueue_in_flight: usize,
    /// Calls and tasks per side before the first round (not measured).
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Bytes of padding in the task arguments.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Channels the raw caller publishes on (each with its own direct reply-to consumer), and
    /// channels the raw consumer replies on. 4 matches Warren's default pools.
    #[arg(long, default_value_t = 4)]
    raw_channels: usize,
    /// Scenarios to run (comma separated): rpc, seq, fire, and `pool` (a handler pool against
    /// the Rust handler, see `--pool-command`); or `scale` alone; or `seed` alone; or `lookup`
    /// alone (finding a task's result among a million events, see `lookup.rs`).
    #[arg(long, value_delimiter = ',', default_value = "rpc,seq,fire")]
    scenarios: Vec<String>,
    /// The `pool` scenario's task processes: a no-op `echo` and `bench_count` in any language
    /// (run from the repository root for the default).
    #[arg(long, default_value = "php tests/pools/bench.php")]
    pool_command: String,
    /// Processes of the `pool` scenario's pool (default: one per CPU available to this
    /// process, 1 if unknown; the size for short CPU-bound tasks, which a no-op handler is).
    #[arg(long, default_value_t = cores())]
    pool_processes: usize,
    /// The `pool` scenario's `prefetch`: tasks written ahead to a busy process (16, with one
    /// process per CPU the setting for pools of short tasks; 0 for the pool's default).
    #[arg(long, default_value_t = 16)]
    pool_prefetch: usize,
    /// `scale`: the worker process counts to measure, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    workers: Vec<usize>,
    /// `scale`: tasks in the backlog for each worker count.
    #[arg(long, default_value_t = 20_000)]
    scale_tasks: usize,
    /// `scale`: the built-in function the tasks run, `echo` (CPU-bound: Warren's own work) or
    /// `sleep` (I/O-bound: waits `--sleep-ms`).
    #[arg(long, default_value = "echo")]
    scale_function: String,
    /// `scale`: how long each `sleep` task waits, in milliseconds.
    #[arg(long, default_value_t = 50)]
    sleep_ms: u64,
    /// `scale` and `seed`: each worker process's concurrency (the `warren-worker` default is 16).
    #[arg(long, default_value_t = 16)]
    worker_concurrency: u16,
    /// `scale` and `seed`: the broker's process id on this host (e.g. `pgrep -f beam.smp`), to
    /// report its CPU too; `seed` looks for `beam.smp` itself when it is not given.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// `seed`: tasks per round of the `conn`, `pipelined` and `ws` patterns.
    #[arg(long, default_value_t = 5_000)]
    seed_tasks: usize,
    /// `seed`: concurrent clients of the `conn` pattern, each opening a new connection per
    /// task.
    #[arg(long, default_value_t = 10)]
    seed_clients: usize,
    /// `seed`: tasks in flight on the one connection of the `pipelined` and `ws` patterns
    /// (below the gateway's `--max-in-flight`, 1000).
    #[arg(long, default_value_t = 500)]
    seed_window: usize,
    /// `seed`: calls per round of the `seq` pattern (each side, and the raw lapin RPC).
    #[arg(long, default_value_t = 500)]
    seed_seq_calls: usize,
    /// `seed`: tasks per side and pattern before the first round (not measured).
    #[arg(long, default_value_t = 200)]
    seed_warmup: usize,
    /// `seed`: `warren-worker` processes serving `send_mail`.
    #[arg(long, default_value_t = 4)]
    seed_workers: usize,
    /// `seed`: processes of the floor (the seed's TaskWorker count).
    #[arg(long, default_value_t = 4)]
    seed_floor_processes: usize,
    /// `seed`: the load patterns to run: conn, pipelined, ws, seq.
    #[arg(long, value_delimiter = ',', default_value = "conn,pipelined,ws,seq")]
    seed_patterns: Vec<String>,
    /// `seed`: after the rounds, run the `conn` pattern once more on each side, SIGKILL one
    /// worker (one floor process) after a third of the tasks are answered, and count the mails
    /// lost; fails if Warren loses any.
    #[arg(long)]
    kill_worker: bool,
    /// `seed`: where the run's outboxes (and the processes' logs) go, in a directory of its own
    /// (default: the system's temporary directory). Creating files costs what the file system
    /// makes it cost: on an ext4 directory tree with much recent churn, inode allocation alone
    /// can exceed Warren's own cost per task; `/dev/shm` measures Warren and not the disk.
    #[arg(long)]
    seed_outbox_dir: Option<std::path::PathBuf>,
    /// `seed`: tokio worker threads of each `warren-worker` and of the gateway (their
    /// `TOKIO_WORKER_THREADS`); 0 for tokio's default, one per core. One, like the seed's
    /// single-threaded PHP processes: several processes per host need no more each, and
    /// fewer threads mean fewer wake-ups handing each message from thread to thread.
    #[arg(long, default_value_t = 1)]
    seed_threads: usize,
    /// Run one floor process of the `seed` scenario on this address (what `seed` starts).
    #[arg(long, hide = true, requires = "seed_floor_outbox")]
    seed_floor_serve: Option<std::net::SocketAddr>,
    /// The floor process's outbox.
    #[arg(long, hide = true)]
    seed_floor_outbox: Option<std::path::PathBuf>,
    /// Measure what metrics and tracing cost: instead of the Warren/raw comparison, run the
    /// Warren side in each of `--ops-modes` (e.g. off, and on: Prometheus recorder installed
    /// and every task's `send`/`process` spans exported over OTLP to a sink in this process),
    /// in turn in child processes, `--rounds` rounds each, and report the medians.
    #[arg(long, conflicts_with = "ops_side")]
    ops_cost: bool,
    /// `--ops-cost`: the modes compared, the first being the reference the others' cost is
    /// measured against: `off` (neither), `metrics` (the recorder only), `tracing` (OTLP
    /// export only), `on` (both).
    #[arg(long, value_delimiter = ',', default_value = "off,on", value_parser = OPS_MODES)]
    ops_modes: Vec<String>,
    /// Task events on the Warren side's workers (in process, and the `scale` scenario's
    /// processes): `on` as shipped, or `off`. They go to a stream of the run's own
    /// (`<queue>.events`), deleted with the queue. `--ops-cost --ops-modes events-off,events-on`
    /// measures what they cost.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    events: String,
    /// `lookup`: events appended to the bench stream in all.
    #[arg(long, default_value_t = 1_000_000)]
    lookup_events: usize,
    /// `lookup`: events of other tasks appended between the target's `started` and its
    /// `succeeded` (what a lookup of the target reads past its own events).
    #[arg(long, default_value_t = 20_000)]
    lookup_between: usize,
    /// `lookup`: timed lookups of the target.
    #[arg(long, default_value_t = 10)]
    lookup_runs: usize,
    /// One measured round of the Warren side only, in one of the `--ops-modes`, printed as
    /// one JSON line: what `--ops-cost` runs in its child processes.
    #[arg(long, value_parser = OPS_MODES, hide = true)]
    ops_side: Option<String>,
}

/// What `--ops-modes` and `--ops-side` accept: metrics and tracing off, on, or one of them
/// (with `--events` as given), or both off with task events off or on.
const OPS_MODES: [&str; 6] = ["off", "metrics", "tracing", "on", "events-off", "events-on"];

/// The queues Warren declares for `queue` in a run (the work and dead-letter queues, and the
/// run's own event stream), to delete after it.
fn warren_names(queue: &str) -> [String; 3] {
    [
        queue.to_owned(),
        format!("{queue}.dead"),
        events_stream(queue),
    ]
}

/// The event stream of the run on `queue`.
fn events_stream(queue: &str) -> String {
    format!("{queue}.events")
}

/// The CPUs this process may use (`available_parallelism`: affinity and cgroup quota count),
/// 1 when it cannot tell.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The ratio every scenario should reach.
const TARGET: f64 = 0.85;

/// Bound on one measured round, so that a lost message fails the run instead of hanging it.
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let (Some(addr), Some(outbox)) = (args.seed_floor_serve, &args.seed_floor_outbox) {
        // One event loop on one thread, like a PHP task process.
        return floor::serve(addr, outbox.clone());
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run_args(args))
}

async fn run_args(args: Args) -> Result<()> {
    if args.ops_cost {
        return ops_cost::run(&args).await;
    }
    if let Some(side) = &args.ops_side {
        return ops_cost::side(&args, ops_cost::Mode::parse(side)).await;
    }
    let warren_queue = format!("bench.{}", Uuid::new_v4());
    let raw_queue = format!("bench.{}", Uuid::new_v4());
    let floor_queue = format!("bench.{}", Uuid::new_v4());
    let pool_queue = format!("bench.{}", Uuid::new_v4());
    let queues = [&warren_queue, &raw_queue, &floor_queue, &pool_queue];

    let admin = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("connecting to the broker")?;
    let admin_channel = admin.create_channel().await?;
    if let Some(alone) = ["scale", "seed", "lookup"]
        .into_iter()
        .find(|alone| args.scenarios.iter().any(|s| s == alone))
    {
        if args.scenarios.len() > 1 {
            bail!("--scenarios {alone} runs on its own");
        }
        let result = if alone == "seed" {
            // Handles Ctrl-C itself, so that it still deletes its queues.
            seed::run(&args, &admin_channel).await
        } else if alone == "lookup" {
            // Deletes its stream whatever happened, Ctrl-C aside.
            lookup::run(&args, &admin_channel).await
        } else {
            tokio::select! {
                result = scale::run(&args, &admin_channel) => result,
                _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            }
        };
        let _ = admin.close(200, "bench done".into()).await;
        return result;
    }
    let result = tokio::select! {
        result = run(&args, &admin_channel, queues) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    // Clean up whatever happened above, on a fresh connection if the broker dropped ours
    // (a broker restart mid-run must not leave durable quorum queues behind).
    let names: Vec<String> = queues.iter().flat_map(|q| warren_names(q)).collect();
    if delete_queues(&admin_channel, &names).await.is_err() {
        let _ = admin.close(200, "bench done".into()).await;
        cleanup_on_new_connection(&args.url, &names).await;
    } else {
        let _ = admin.close(200, "bench done".into()).await;
    }
    result
}

/// Deletes `names`; fails on the first error that is not "already gone".
async fn delete_queues(channel: &Channel, names: &[String]) -> Result<()> {
    for name in names {
        channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await
            .with_context(|| format!("deleting queue {name}"))?;
    }
    Ok(())
}

/// Retries the clean-up on new connections for up to a minute.
async fn cleanup_on_new_connection(url: &str, names: &[String]) {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            let deleted = delete_queues(&channel, names).await;
            let _ = connection.close(200, "bench done".into()).await;
            deleted
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(())) => return,
            Ok(Err(e)) if Instant::now() >= give_up => {
                eprintln!("warning: could not delete the bench queues {names:?}: {e:#}");
                return;
            }
            Err(_) if Instant::now() >= give_up => {
                eprintln!("warning: could not delete the bench queues {names:?}: timed out");
                return;
            }
            _ => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn run(args: &Args, admin: &Channel, queues: [&String; 4]) -> Result<()> {
    let [warren_queue, raw_queue, floor_queue, pool_queue] = queues;
    for queue in queues {
        topology::declare(admin, queue)
            .await
            .with_context(|| format!("declaring {queue}"))?;
    }
    let args_value = json!({ "user": 42, "pad": "x".repeat(args.payload_bytes) });

    let warren = WarrenSide::start(args, warren_queue, None).await?;
    let raw = RawSide::start(args, raw_queue, true).await?;
    let floor = RawSide::start(args, floor_queue, false).await?;
    let mut result = measure(args, &warren, &raw, &floor, &args_value).await;
    if result.is_ok() && args.scenarios.iter().any(|s| s == "pool") {
        result = measure_pool(args, &warren, pool_queue, &args_value).await;
    }
    warren.stop().await;
    raw.stop().await;
    floor.stop().await;
    result
}

/// The `pool` scenario: fire-and-forget tasks/s and RPC calls/s through a pool of
/// `--pool-processes` processes running a no-op handler, against the Rust handler in the same
/// run and at the same concurrency, the pool processes' CPU per task, and this process's CPU per
/// task on both sides (the worker's and the caller's share of what the pool costs).
async fn measure_pool(args: &Args, rust: &WarrenSide, queue: &str, payload: &Value) -> Result<()> {
    let config = PoolConfig {
        prefetch: args.pool_prefetch,
        ..PoolConfig::exec(
            &args.pool_command,
            vec![POOL_ECHO.into(), BenchCount::NAME.into()],
            args.pool_processes,
        )
        .context("the pool command")?
    };
    let pool = Pool::start(config).await.context("starting the pool")?;
    let pooled = WarrenSide::start(args, queue, Some(pool.clone())).await?;
    println!(
        "pool: {:?}, {} processes, prefetch {}, worker concurrency {}, {} calls in flight",
        args.pool_command,
        args.pool_processes,
        args.pool_prefetch,
        args.concurrency,
        args.in_flight
    );
    pooled.rpc(args.warmup, args.in_flight, payload).await?;
    pooled
        .fire(args.warmup, args.enqueue_in_flight, payload)
        .await?;
    // Per scenario (RPC, fire-and-forget), per round: the Rust handler's figures and the pool's.
    let mut rounds: [Vec<(PoolFigures, PoolFigures)>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        // Whichever side runs second inherits the broker's deferred work from the first (a
        // quorum queue's log and segment writes after a burst): odd rounds run the Rust handler
        // first, even rounds the pool, so that neither side always pays it.
        let pool_first = round % 2 == 0;
        for (scenario, fire) in [false, true].into_iter().enumerate() {
            let figures = if pool_first {
                let pool = PoolFigures::measure(args, &pooled, fire, payload).await?;
                (PoolFigures::measure(args, rust, fire, payload).await?, pool)
            } else {
                let rust = PoolFigures::measure(args, rust, fire, payload).await?;
                (
                    rust,
                    PoolFigures::measure(args, &pooled, fire, payload).await?,
                )
            };
            rounds[scenario].push(figures);
        }
        let [(rust_rpc, pool_rpc), (rust_fire, pool_fire)] = [&rounds[0], &rounds[1]]
            .map(|r| r.last().expect("this round's figures were just pushed"));
        println!(
            "  pool  round {round} ({} first): rpc rust {:>7.0}/s pool {:>7.0}/s ({:.0} us pool \
             CPU/call)  fire rust {:>7.0}/s pool {:>7.0}/s ({:.0} us pool CPU/task)",
            if pool_first { "pool" } else { "rust" },
            rust_rpc.rate,
            pool_rpc.rate,
            pool_rpc.children_us,
            rust_fire.rate,
            pool_fire.rate,
            pool_fire.children_us,
        );
        println!(
            "              bench process CPU per call/task: rpc rust {:.0} us pool {:.0} us, \
             fire rust {:.0} us pool {:.0} us",
            rust_rpc.own_us, pool_rpc.own_us, rust_fire.own_us, pool_fire.own_us,
        );
    }
    pooled.stop().await;
    pool.shutdown().await;
    let [rpc, fire] = rounds.map(|rounds| {
        let rust: Vec<PoolFigures> = rounds.iter().map(|(rust, _)| *rust).collect();
        let pool: Vec<PoolFigures> = rounds.iter().map(|(_, pool)| *pool).collect();
        (PoolFigures::median(&rust), PoolFigures::median(&pool))
    });
    println!();
    println!(
        "{:<34} {:>10} {:>10} {:>7}  target {POOL_TARGET} (pool/rust)",
        "pool scenario (median of rounds)", "rust", "pool", "ratio"
    );
    let mut met = true;
    for (name, (rust, pool)) in [("RPC calls/s", rpc), ("fire-and-forget tasks/s", fire)] {
        let ratio = pool.rate / rust.rate;
        met &= ratio >= POOL_TARGET;
        let verdict = if ratio >= POOL_TARGET {
            "MET"
        } else {
            "not met"
        };
        println!(
            "{name:<34} {:>10.0} {:>10.0} {ratio:>7.3}  {verdict}",
            rust.rate, pool.rate
        );
    }
    println!(
        "pool processes' CPU per task: {:.0} us (RPC), {:.0} us (fire-and-forget)",
        rpc.1.children_us, fire.1.children_us
    );
    println!(
        "bench process CPU per task (worker and caller): RPC rust {:.0} us, pool {:.0} us; \
         fire-and-forget rust {:.0} us, pool {:.0} us",
        rpc.0.own_us, rpc.1.own_us, fire.0.own_us, fire.1.own_us
    );
    if !met {
        println!("pool target NOT met");
    }
    Ok(())
}

/// One timed run of the `pool` scenario's RPC or fire-and-forget on one side.
#[derive(Debug, Clone, Copy)]
struct PoolFigures {
    /// Calls or tasks per second.
    rate: f64,
    /// This process's CPU per call or task, µs.
    own_us: f64,
    /// The pool processes' CPU per call or task, µs (about 0 for the Rust handler).
    children_us: f64,
}

impl PoolFigures {
    async fn measure(args: &Args, side: &WarrenSide, fire: bool, payload: &Value) -> Result<Self> {
        let n = if fire { args.tasks } else { args.rpc_calls };
        let children = children_cpu_seconds();
        let (elapsed, own) = if fire {
            timed(side.fire(n, args.enqueue_in_flight, payload)).await?
        } else {
            timed(side.rpc(n, args.in_flight, payload)).await?
        };
        let n = n as f64;
        Ok(Self {
            rate: n / elapsed.as_secs_f64(),
            own_us: own / n * 1e6,
            children_us: (children_cpu_seconds() - children) / n * 1e6,
        })
    }

    /// Each figure's median over `rounds`, separately.
    fn median(rounds: &[Self]) -> Self {
        let of = |pick: fn(&Self) -> f64| median(&rounds.iter().map(pick).collect::<Vec<_>>());
        Self {
            rate: of(|f| f.rate),
            own_us: of(|f| f.own_us),
            children_us: of(|f| f.children_us),
        }
    }
}

/// The ratio a handler pool should reach against the Rust handler.
const POOL_TARGET: f64 = 0.8;

/// The function the `rpc` and `seq` scenarios call.
const POOL_ECHO: &str = "echo";

/// CPU seconds used so far by this process's live children (the pool's processes), from
/// `/proc/<pid>/stat` of every process whose parent is this one; `NaN` without `/proc`.
fn children_cpu_seconds() -> f64 {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return f64::NAN;
    };
    entries
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
            // After the command name: state, ppid, ...; utime and stime are the 12th and 13th.
            (fields.get(1) == Some(&me.as_str())).then(|| stat_cpu(&fields))?
        })
        .sum()
}

/// utime + stime of a `/proc/<pid>/stat` line's fields after the command name, in seconds.
fn stat_cpu(fields: &[&str]) -> Option<f64> {
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// One row of the final table.
struct Row {
    name: &'static str,
    unit: &'static str,
    warren: f64,
    raw: f64,
    /// The floor: raw lapin without publisher confirms.
    floor: f64,
    /// Larger is better (throughput) or smaller is better (latency, CPU).
    higher_is_better: bool,
    /// Whether the 0.85 target applies (CPU cost rows are for information).
    targeted: bool,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.ratio_to(self.raw)
    }

    /// Warren against `other`, 1.0 = as good.
    fn ratio_to(&self, other: f64) -> f64 {
        if self.higher_is_better {
            self.warren / other
        } else {
            other / self.warren
        }
    }
}

async fn measure(
    args: &Args,
    warren: &WarrenSide,
    raw: &RawSide,
    floor: &RawSide,
    payload: &Value,
) -> Result<()> {
    let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
    println!(
        "warren-bench: rounds={} concurrency(prefetch)={} in_flight={} rpc_calls={} seq_calls={} \
         tasks={} enqueue_in_flight={} payload_bytes={} raw_channels={}",
        args.rounds,
        args.concurrency,
        args.in_flight,
        args.rpc_calls,
        args.seq_calls,
        args.tasks,
        args.enqueue_in_flight,
        args.payload_bytes,
        args.raw_channels
    );

    // Warm-up: connections, channel pools, queue-declare caches, the JIT-less broker's caches.
    println!("warming up ({} calls and tasks per side)...", args.warmup);
    if wants("rpc") || wants("seq") {
        warren.rpc(args.warmup, args.in_flight, payload).await?;
        raw.rpc(args.warmup, args.in_flight, payload).await?;
        floor.rpc(args.warmup, args.in_flight, payload).await?;
    }
    if wants("fire") {
        warren
            .fire(args.warmup, args.enqueue_in_flight, payload)
            .await?;
        raw.fire(args.warmup, args.enqueue_in_flight, payload)
            .await?;
        floor
            .fire(args.warmup, args.enqueue_in_flight, payload)
            .await?;
    }

    let mut rows = Vec::new();
    let mut cpu_rows = Vec::new();
    if wants("rpc") {
        let (mut w, mut r, mut wc, mut rc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut f, mut fc) = (Vec::new(), Vec::new());
        let n = args.rpc_calls as f64;
        for round in 1..=args.rounds {
            let (d, cpu) = timed(warren.rpc(args.rpc_calls, args.in_flight, payload)).await?;
            w.push(n / d.as_secs_f64());
            wc.push(cpu / n * 1e6);
            let (d, cpu) = timed(raw.rpc(args.rpc_calls, args.in_flight, payload)).await?;
            r.push(n / d.as_secs_f64());
            rc.push(cpu / n * 1e6);
            let (d, cpu) = timed(floor.rpc(args.rpc_calls, args.in_flight, payload)).await?;
            f.push(n / d.as_secs_f64());
            fc.push(cpu / n * 1e6);
            println!(
                "  rpc   round {round}: warren {:>8.0}/s ({:.0} us CPU/call)  raw {:>8.0}/s ({:.0} us CPU/call)  floor {:>8.0}/s ({:.0} us CPU/call)",
                w[round - 1],
                wc[round - 1],
                r[round - 1],
                rc[round - 1],
                f[round - 1],
                fc[round - 1]
            );
        }
        rows.push(Row {
            name: "(a) RPC calls/s, in flight",
            unit: "calls/s",
            warren: median(&w),
            raw: median(&r),
            floor: median(&f),
            higher_is_better: true,
            targeted: true,
        });
        cpu_rows.push(Row {
            name: "(a) bench-process CPU per call",
            unit: "us",
            warren: median(&wc),
            raw: median(&rc),
            floor: median(&fc),
            higher_is_better: false,
            targeted: false,
        });
    }
    if wants("seq") {
        let (mut w50, mut w99, mut r50, mut r99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut f50, mut f99) = (Vec::new(), Vec::new());
        for round in 1..=args.rounds {
            let lat = bounded(warren.sequential(args.seq_calls, payload)).await?;
            w50.push(percentile_ms(&lat, 50.0));
            w99.push(percentile_ms(&lat, 99.0));
            let lat = bounded(raw.sequential(args.seq_calls, payload)).await?;
            r50.push(percentile_ms(&lat, 50.0));
            r99.push(percentile_ms(&lat, 99.0));
            let lat = bounded(floor.sequential(args.seq_calls, payload)).await?;
            f50.push(percentile_ms(&lat, 50.0));
            f99.push(percentile_ms(&lat, 99.0));
            println!(
                "  seq   round {round}: warren p50 {:.3} ms p99 {:.3} ms  raw p50 {:.3} ms p99 {:.3} ms  floor p50 {:.3} ms p99 {:.3} ms",
                w50[round - 1],
                w99[round - 1],
                r50[round - 1],
                r99[round - 1],
                f50[round - 1],
                f99[round - 1]
            );
        }
        rows.push(Row {
            name: "(b) sequential call p50",
            unit: "ms",
            warren: median(&w50),
            raw: median(&r50),
            floor: median(&f50),
            higher_is_better: false,
            targeted: true,
        });
        rows.push(Row {
            name: "(b) sequential call p99",
            unit: "ms",
            warren: median(&w99),
            raw: median(&r99),
            floor: median(&f99),
            higher_is_better: false,
            targeted: true,
        });
    }
    if wants("fire") {
        let (mut w, mut r, mut wc, mut rc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut f, mut fc) = (Vec::new(), Vec::new());
        let n = args.tasks as f64;
        for round in 1..=args.rounds {
            let (d, cpu) = timed(warren.fire(args.tasks, args.enqueue_in_flight, payload)).await?;
            w.push(n / d.as_secs_f64());
            wc.push(cpu / n * 1e6);
            let (d, cpu) = timed(raw.fire(args.tasks, args.enqueue_in_flight, payload)).await?;
            r.push(n / d.as_secs_f64());
            rc.push(cpu / n * 1e6);
            let (d, cpu) = timed(floor.fire(args.tasks, args.enqueue_in_flight, payload)).await?;
            f.push(n / d.as_secs_f64());
            fc.push(cpu / n * 1e6);
            println!(
                "  fire  round {round}: warren {:>8.0}/s ({:.0} us CPU/task)  raw {:>8.0}/s ({:.0} us CPU/task)  floor {:>8.0}/s ({:.0} us CPU/task)",
                w[round - 1],
                wc[round - 1],
                r[round - 1],
                rc[round - 1],
                f[round - 1],
                fc[round - 1]
            );
        }
        rows.push(Row {
            name: "(c) fire-and-forget tasks/s, end to end",
            unit: "tasks/s",
            warren: median(&w),
            raw: median(&r),
            floor: median(&f),
            higher_is_better: true,
            targeted: true,
        });
        cpu_rows.push(Row {
            name: "(c) bench-process CPU per task",
            unit: "us",
            warren: median(&wc),
            raw: median(&rc),
            floor: median(&fc),
            higher_is_better: false,
            targeted: false,
        });
    }

    if rows.is_empty() && cpu_rows.is_empty() {
        return Ok(());
    }
    println!();
    println!(
        "{:<42} {:>12} {:>12} {:>12} {:>8}  {:>6}  {:>6}  target {TARGET} (vs raw)",
        "scenario (median of rounds)", "warren", "raw lapin", "floor", "unit", "ratio", "/floor"
    );
    let mut all_met = true;
    rows.extend(cpu_rows);
    for row in &rows {
        let ratio = row.ratio();
        let met = ratio >= TARGET;
        if row.targeted {
            all_met &= met;
        }
        let precision = if row.unit == "ms" { 3 } else { 0 };
        println!(
            "{:<42} {:>12.*} {:>12.*} {:>12.*} {:>8}  {:>6.3}  {:>6.3}  {}",
            row.name,
            precision,
            row.warren,
            precision,
            row.raw,
            precision,
            row.floor,
            row.unit,
            ratio,
            row.ratio_to(row.floor),
            match (row.targeted, met) {
                (false, _) => "(information)",
                (true, true) => "MET",
                (true, false) => "BELOW TARGET",
            }
        );
    }
    println!(
        "ratio = Warren/raw for throughput, raw/Warren for latency and CPU (1.0 = as good as raw lapin); \
         /floor = the same against the floor (raw lapin without publisher confirms)."
    );
    println!(
        "{}",
        if all_met {
            "every ratio meets the 0.85 target"
        } else {
            "NOT every ratio meets the 0.85 target"
        }
    );
    Ok(())
}

async fn bounded<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(ROUND_TIMEOUT, work)
        .await
        .with_context(|| format!("a round took longer than {ROUND_TIMEOUT:?}"))?
}

/// Wall time and this process's CPU time (all threads, user + system) of `work`.
async fn timed(work: impl Future<Output = Result<()>>) -> Result<(Duration, f64)> {
    let cpu = process_cpu_seconds("self");
    let start = Instant::now();
    bounded(work).await?;
    Ok((start.elapsed(), process_cpu_seconds("self") - cpu))
}

/// CPU seconds process `pid` (or `self`) has used so far (Linux `/proc/<pid>/stat`, 10 ms
/// resolution); `NaN` where that is not available.
fn process_cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return f64::NAN;
    };
    // Fields after the command name (which may contain spaces) start at field 3, `state`;
    // utime and stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    stat_cpu(&fields).unwrap_or(f64::NAN)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Nearest-rank percentile, in milliseconds.
fn percentile_ms(latencies: &[Duration], p: f64) -> f64 {
    let mut v = latencies.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1].as_secs_f64() * 1e3
}

/// A Warren client whose default queue is `queue`.
async fn client_for(url: &str, queue: &str) -> Result<Client> {
    Client::connect(ClientSettings {
        broker: BrokerSettings::new(url.to_owned()),
        queue: Some(queue.to_owned()),
        ..ClientSettings::default()
    })
    .await
    .context("connecting the Warren client")
}

/// Runs `work(i)` for i in 0..n with `parallel` loops pulling from a shared counter.
async fn fan_out<F, Fut>(n: usize, parallel: usize, work: F) -> Result<()>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let next = next.clone();
        let work = work.clone();
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                work(i).await?;
            }
        });
    }
    while let Some(joined) = set.join_next().await {
        joined.context("a bench task panicked")??;
    }
    Ok(())
}

/// Counts completed tasks and wakes the waiter when a target is reached.
#[derive(Debug, Default)]
struct Completions {
    done: AtomicU64,
    notify: Notify,
    target: AtomicU64,
}

impl Completions {
    fn reset(&self, target: usize) {
        self.done.store(0, Ordering::SeqCst);
        self.target.store(target as u64, Ordering::SeqCst);
    }

    fn complete_one(&self) {
        let done = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        if done == self.target.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.done.load(Ordering::SeqCst) >= self.target.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

/// The task the `fire` scenario enqueues on the Warren side: counts its runs.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct BenchCount(Value);

impl Task for BenchCount {
    const NAME: &'static str = "bench_count";
    type Output = ();
}

impl Handler<BenchCount> for Arc<Completions> {
    async fn run(&self, _args: BenchCount, _ctx: TaskContext) -> Result<(), TaskError> {
        self.complete_one();
        Ok(())
    }
}

/// `echo`, served by a handler pool.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct PoolEcho(Value);

impl Task for PoolEcho {
    const NAME: &'static str = POOL_ECHO;
    type Output = Value;
}

impl Handler<PoolEcho> for Pool {
    async fn run(&self, args: PoolEcho, ctx: TaskContext) -> Result<Value, TaskError> {
        self.call(POOL_ECHO, args.0, &ctx).await
    }
}

/// `bench_count` run by a handler pool, counted once the pool has answered.
struct PoolCount {
    pool: Pool,
    completions: Arc<Completions>,
}

impl Handler<BenchCount> for PoolCount {
    async fn run(&self, args: BenchCount, ctx: TaskContext) -> Result<(), TaskError> {
        self.pool.call(BenchCount::NAME, args.0, &ctx).await?;
        self.completions.complete_one();
        Ok(())
    }
}

/// Warren: an in-process worker and a client.
struct WarrenSide {
    client: Client,
    worker: warren_worker::RunningWorker,
    completions: Arc<Completions>,
    queue: String,
}

impl WarrenSide {
    /// The Rust handlers, or with `pool` the same functions served by the pool's processes.
    async fn start(args: &Args, queue: &str, pool: Option<Pool>) -> Result<Self> {
        let completions = Arc::new(Completions::default());
        let registry = match pool {
            None => Registry::new()
                .register::<warren_shared::tasks::Echo>()
                .register_handler::<BenchCount>(completions.clone()),
            Some(pool) => Registry::new()
                .register_handler::<PoolEcho>(pool.clone())
                .register_handler::<BenchCount>(PoolCount {
                    pool,
                    completions: completions.clone(),
                }),
        };
        let mut settings = WorkerSettings {
            broker: BrokerSettings::new(args.url.clone()),
            queue: queue.to_owned(),
            concurrency: args.concurrency,
            // Benchmarks send by queue name and claim no functions.
            functions_exchange: String::new(),
            ..Default::default()
        };
        settings.events.enabled = args.events == "on";
        settings.events.stream = events_stream(queue);
        let worker = warren_worker::start(settings, registry, CancellationToken::new())
            .await
            .context("starting the Warren worker")?;
        let client = client_for(&args.url, queue).await?;
        Ok(Self {
            client,
            worker,
            completions,
            queue: queue.to_owned(),
        })
    }

    async fn stop(self) {
        self.client.close().await;
        if let Err(e) = self.worker.shutdown().await {
            eprintln!("warning: Warren worker stopped with an error: {e}");
        }
    }

    async fn rpc(&self, n: usize, in_flight: usize, payload: &Value) -> Result<()> {
        let client = self.client.clone();
        let options = Arc::new(CallOptions::default().queue(self.queue.clone()));
        let payload = payload.clone();
        fan_out(n, in_flight, move |_| {
            let client = client.clone();
            let options = options.clone();
            let args = payload.clone();
            async move {
                let result = client
                    .call_json_with("echo", args.clone(), &options)
                    .await?;
                if result != args {
                    bail!("echo returned {result}, expected {args}");
                }
                Ok(())
            }
        })
        .await
    }

    async fn sequential(&self, n: usize, payload: &Value) -> Result<Vec<Duration>> {
        let options = CallOptions::default().queue(self.queue.clone());
        let mut latencies = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            self.client
                .call_json_with("echo", payload.clone(), &options)
                .await?;
            latencies.push(start.elapsed());
        }
        Ok(latencies)
    }

    async fn fire(&self, n: usize, in_flight: usize, payload: &Value) -> Result<()> {
        self.completions.reset(n);
        let client = self.client.clone();
        let options = Arc::new(CallOptions::default().queue(self.queue.clone()));
        let payload = payload.clone();
        fan_out(n, in_flight, move |_| {
            let client = client.clone();
            let options = options.clone();
            let args = payload.clone();
            async move {
                client
                    .enqueue_json_with(BenchCount::NAME, args, &options)
                    .await?;
                Ok(())
            }
        })
        .await?;
        self.completions.wait().await;
        Ok(())
    }
}

/// Replies waiting for their caller, by correlation id (raw side).
type RawPending = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// Raw lapin: the same traffic, no Warren code on the hot path.
struct RawSide {
    /// Caller connection: requests, enqueues and the direct reply-to consumer.
    caller: Connection,
    caller_channels: Arc<[Channel]>,
    pending: RawPending,
    /// Consumer connection, and the publishing connection for replies.
    consume: Connection,
    publish: Connection,
    completions: Arc<Completions>,
    queue: String,
    consumer_task: tokio::task::JoinHandle<()>,
    reply_channels: Vec<Channel>,
    /// Whether requests, enqueues and replies wait for publisher confirms (the mirror of
    /// Warren) or not (the floor: RabbitMQ's RPC tutorial).
    confirms: bool,
}

fn props_headers(deadline: Option<SystemTime>) -> FieldTable {
    let mut h = FieldTable::default();
    h.insert("x-warren-protocol".into(), AMQPValue::LongLongInt(1));
    h.insert("x-warren-attempt".into(), AMQPValue::LongLongInt(1));
    if let Some(deadline) = deadline {
        let ms = deadline
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        h.insert(
            "x-warren-deadline".into(),
            AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
        );
    }
    h
}

/// The request properties Warren sends, built with lapin alone.
fn raw_request_properties(id: &str, function: &str, wants_reply: bool) -> BasicProperties {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let deadline = wants_reply.then(|| SystemTime::now() + Duration::from_secs(30));
    let p = BasicProperties::default()
        .with_message_id(id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(function.into())
        .with_timestamp(now.as_secs())
        .with_app_id("warren".into())
        .with_headers(props_headers(deadline));
    if wants_reply {
        p.with_correlation_id(id.into())
            .with_reply_to("amq.rabbitmq.reply-to".into())
    } else {
        p
    }
}

impl RawSide {
    async fn start(args: &Args, queue: &str, confirms: bool) -> Result<Self> {
        let props = |name: &str| ConnectionProperties::default().with_connection_name(name.into());
        let consume = Connection::connect(&args.url, props("warren-bench/raw-consume")).await?;
        let publish = Connection::connect(&args.url, props("warren-bench/raw-publish")).await?;
        let caller = Connection::connect(&args.url, props("warren-bench/raw-caller")).await?;

        // Consumer: prefetch = concurrency; replies go out on a confirm channel of `publish`.
        let channel = consume.create_channel().await?;
        channel
            .basic_qos(args.concurrency, BasicQosOptions { global: false })
            .await?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "raw-consumer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut reply_channels = Vec::new();
        for _ in 0..args.raw_channels.max(1) {
            let channel = publish.create_channel().await?;
            if confirms {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            reply_channels.push(channel);
        }
        let completions = Arc::new(Completions::default());
        let consumer_task = {
            let completions = completions.clone();
            let reply_channels = reply_channels.clone();
            tokio::spawn(async move {
                let mut turn = 0usize;
                while let Some(Ok(delivery)) = consumer.next().await {
                    turn = turn.wrapping_add(1);
                    let reply_channel = reply_channels[turn % reply_channels.len()].clone();
                    let completions = completions.clone();
                    tokio::spawn(async move {
                        if let Err(e) =
                            raw_handle(delivery, &reply_channel, &completions, confirms).await
                        {
                            eprintln!("raw consumer: {e:#}");
                        }
                    });
                }
            })
        };

        // Caller: confirm channels, each with a no-ack direct reply-to consumer on it.
        let pending: RawPending = Arc::default();
        let mut caller_channels = Vec::new();
        for _ in 0..args.raw_channels.max(1) {
            let channel = caller.create_channel().await?;
            if confirms {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
            }
            let mut replies = channel
                .basic_consume(
                    "amq.rabbitmq.reply-to".into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let pending = pending.clone();
            tokio::spawn(async move {
                while let Some(Ok(delivery)) = replies.next().await {
                    let Some(id) = delivery.properties.correlation_id().as_ref() else {
                        continue;
                    };
                    let Ok(body) = serde_json::from_slice::<Value>(&delivery.data) else {
                        continue;
                    };
                    let waiter = pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(id.as_str());
                    if let Some(tx) = waiter {
                        let _ = tx.send(body);
                    }
                }
            });
            caller_channels.push(channel);
        }
        Ok(Self {
            caller,
            caller_channels: caller_channels.into(),
            pending,
            consume,
            publish,
            completions,
            queue: queue.to_owned(),
            consumer_task,
            reply_channels,
            confirms,
        })
    }

    async fn stop(self) {
        // Channels first: closing a connection with several open channels makes lapin log a
        // spurious "invalid channel state: Closing" error.
        for channel in self
            .caller_channels
            .iter()
            .chain(self.reply_channels.iter())
        {
            let _ = channel.close(200, "bench done".into()).await;
        }
        for c in [&self.caller, &self.consume, &self.publish] {
            let _ = c.close(200, "bench done".into()).await;
        }
        // The consumer stream ends with its connection.
        let _ = self.consumer_task.await;
    }

    /// One call: register, publish (mandatory, persistent), await the confirm, await the reply.
    async fn call(
        channel: &Channel,
        pending: &RawPending,
        queue: &str,
        payload: &Value,
        confirms: bool,
    ) -> Result<Value> {
        let id = Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.clone(), tx);
        let body = serde_json::to_vec(&json!({ "function": "echo", "args": payload }))?;
        publish(
            channel,
            queue,
            &body,
            raw_request_properties(&id, "echo", true),
            confirms,
        )
        .await?;
        let reply = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .context("raw call timed out")?
            .context("raw reply consumer ended")?;
        match reply {
            Value::Object(mut o) if o.get("ok") == Some(&Value::Bool(true)) => {
                Ok(o.remove("result").unwrap_or(Value::Null))
            }
            other => bail!("raw call failed: {other}"),
        }
    }

    async fn rpc(&self, n: usize, in_flight: usize, payload: &Value) -> Result<()> {
        let channels = self.caller_channels.clone();
        let pending = self.pending.clone();
        let queue: Arc<str> = self.queue.as_str().into();
        let payload = payload.clone();
        let confirms = self.confirms;
        fan_out(n, in_flight, move |i| {
            let channel = channels[i % channels.len()].clone();
            let pending = pending.clone();
            let queue = queue.clone();
            let args = payload.clone();
            async move {
                let result = Self::call(&channel, &pending, &queue, &args, confirms).await?;
                if result != args {
                    bail!("raw echo returned {result}, expected {args}");
                }
                Ok(())
            }
        })
        .await
    }

    async fn sequential(&self, n: usize, payload: &Value) -> Result<Vec<Duration>> {
        let mut latencies = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            Self::call(
                &self.caller_channels[0],
                &self.pending,
                &self.queue,
                payload,
                self.confirms,
            )
            .await?;
            latencies.push(start.elapsed());
        }
        Ok(latencies)
    }

    async fn fire(&self, n: usize, in_flight: usize, payload: &Value) -> Result<()> {
        self.completions.reset(n);
        let channels = self.caller_channels.clone();
        let queue: Arc<str> = self.queue.as_str().into();
        let payload = payload.clone();
        let confirms = self.confirms;
        fan_out(n, in_flight, move |i| {
            let channel = channels[i % channels.len()].clone();
            let queue = queue.clone();
            let args = payload.clone();
            async move {
                let id = Uuid::new_v4().to_string();
                let body =
                    serde_json::to_vec(&json!({ "function": BenchCount::NAME, "args": args }))?;
                publish(
                    &channel,
                    &queue,
                    &body,
                    raw_request_properties(&id, BenchCount::NAME, false),
                    confirms,
                )
                .await
            }
        })
        .await?;
        self.completions.wait().await;
        Ok(())
    }
}

/// Publishes to the `warren` exchange with `mandatory`, and awaits a clean confirm when
/// `confirms` (the floor does not wait: its channels are not in confirm mode).
async fn publish(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
    confirms: bool,
) -> Result<()> {
    let published = channel
        .basic_publish(
            topology::EXCHANGE.into(),
            ShortString::from(queue),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await?;
    if !confirms {
        return Ok(());
    }
    match published.await? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("raw publish not confirmed: {other:?}"),
    }
}

/// The raw consumer's work on one delivery: parse, reply (confirmed) if asked to, then ack.
async fn raw_handle(
    delivery: lapin::message::Delivery,
    reply_channel: &Channel,
    completions: &Completions,
    confirms: bool,
) -> Result<()> {
    let mut request: Value = serde_json::from_slice(&delivery.data)?;
    let reply_to = delivery.properties.reply_to().as_ref();
    if let Some(reply_to) = reply_to {
        let args = request
            .get_mut("args")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let body = serde_json::to_vec(&json!({ "ok": true, "result": args }))?;
        let mut h = FieldTable::default();
        h.insert("x-warren-protocol".into(), AMQPValue::LongLongInt(1));
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_type("warren.reply".into())
            .with_delivery_mode(2)
            .with_headers(h);
        if let Some(c) = delivery.properties.correlation_id() {
            properties = properties.with_correlation_id(c.clone());
        }
        if let Some(m) = delivery.properties.message_id() {
            properties = properties.with_message_id(m.clone());
        }
        // Not mandatory, like Warren: RabbitMQ 3.10 returns direct replies it delivered.
        let published = reply_channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?;
        if confirms {
            let confirm = published.await?;
            if !matches!(confirm, Confirmation::Ack(None)) {
                bail!("raw reply not confirmed: {confirm:?}");
            }
        }
    }
    if !delivery.ack(BasicAckOptions::default()).await? {
        bail!("raw ack lost");
    }
    if reply_to.is_none() {
        completions.complete_one();
    }
    Ok(())
}

/// `--ops-cost`: the Warren side in each of `--ops-modes` (metrics and tracing off, on, or one
/// of them), in child processes (the recorder and the exporter are process-wide and cannot be
/// taken back), rotating which goes first in each round so that none always runs on a warmer or
/// quieter machine.
mod ops_cost {
    use std::process::Stdio;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use anyhow::{Context, Result, bail};
    use serde_json::{Value, json};
    use uuid::Uuid;

    use super::{Args, WarrenSide, bounded, median, percentile_ms, timed};

    /// The scenario figures of one child, by name (`rpc_per_s`, `rpc_cpu_us`, ...).
    type Figures = serde_json::Map<String, Value>;

    /// Which operations a child runs with.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) struct Mode {
        metrics: bool,
        tracing: bool,
        /// Task events on or off; `None`: as `--events` says.
        events: Option<bool>,
    }

    impl Mode {
        /// One of [`super::OPS_MODES`] (clap has checked it).
        pub(super) fn parse(name: &str) -> Self {
            Self {
                metrics: matches!(name, "metrics" | "on"),
                tracing: matches!(name, "tracing" | "on"),
                events: match name {
                    "events-off" => Some(false),
                    "events-on" => Some(true),
                    _ => None,
                },
            }
        }

        fn name(self) -> &'static str {
            match (self.metrics, self.tracing, self.events) {
                (false, false, Some(false)) => "events-off",
                (false, false, Some(true)) => "events-on",
                (false, false, _) => "off",
                (true, false, _) => "metrics",
                (false, true, _) => "tracing",
                (true, true, _) => "on",
            }
        }
    }

    /// One round of the Warren side in this process, with the operations of `mode`; prints
    /// its figures as one JSON line.
    pub(super) async fn side(args: &Args, mode: Mode) -> Result<()> {
        if mode.metrics {
            warren_worker::metrics::install().context("installing the metrics recorder")?;
        }
        let exporter = if mode.tracing {
            let exporter = warren_shared::otel::init("warren-bench")?;
            if !exporter.is_on() {
                bail!(
                    "--ops-side {} needs OTEL_EXPORTER_OTLP_ENDPOINT",
                    mode.name()
                );
            }
            Some(exporter)
        } else {
            None
        };
        let queue = format!("bench.{}", Uuid::new_v4());
        let admin = lapin::Connection::connect(&args.url, lapin::ConnectionProperties::default())
            .await
            .context("connecting to the broker")?;
        let channel = admin.create_channel().await?;
        warren_shared::topology::declare(&channel, &queue).await?;
        let result = async {
            let warren = WarrenSide::start(args, &queue, None).await?;
            let figures = measure(args, &warren).await;
            warren.stop().await;
            figures
        }
        .await;
        let names = super::warren_names(&queue);
        if super::delete_queues(&channel, &names).await.is_err() {
            super::cleanup_on_new_connection(&args.url, &names).await;
        }
        let _ = admin.close(200, "bench done".into()).await;
        if let Some(exporter) = exporter {
            exporter.shutdown().await;
        }
        println!("{}", Value::Object(result?));
        Ok(())
    }

    async fn measure(args: &Args, warren: &WarrenSide) -> Result<Figures> {
        let wants = |s: &str| args.scenarios.iter().any(|x| x == s);
        let payload = json!({ "user": 42, "pad": "x".repeat(args.payload_bytes) });
        let mut figures = Figures::new();
        if wants("rpc") || wants("seq") {
            warren.rpc(args.warmup, args.in_flight, &payload).await?;
        }
        if wants("fire") {
            warren
                .fire(args.warmup, args.enqueue_in_flight, &payload)
                .await?;
        }
        if wants("rpc") {
            let n = args.rpc_calls as f64;
            let (d, cpu) = timed(warren.rpc(args.rpc_calls, args.in_flight, &payload)).await?;
            figures.insert("rpc_per_s".into(), json!(n / d.as_secs_f64()));
            figures.insert("rpc_cpu_us".into(), json!(cpu / n * 1e6));
        }
        if wants("seq") {
            let latencies = bounded(warren.sequential(args.seq_calls, &payload)).await?;
            figures.insert("seq_p50_ms".into(), json!(percentile_ms(&latencies, 50.0)));
            figures.insert("seq_p99_ms".into(), json!(percentile_ms(&latencies, 99.0)));
        }
        if wants("fire") {
            let n = args.tasks as f64;
            let (d, cpu) = timed(warren.fire(args.tasks, args.enqueue_in_flight, &payload)).await?;
            figures.insert("fire_per_s".into(), json!(n / d.as_secs_f64()));
            figures.insert("fire_cpu_us".into(), json!(cpu / n * 1e6));
        }
        Ok(figures)
    }

    /// What the OTLP sink received.
    #[derive(Debug, Default)]
    struct Received {
        requests: AtomicU64,
        bytes: AtomicU64,
    }

    /// An OTLP/HTTP sink on loopback: answers 200 to every `POST /v1/traces` and counts them.
    async fn sink() -> Result<(std::net::SocketAddr, Arc<Received>)> {
        let received = Arc::new(Received::default());
        let counts = received.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let counts = counts.clone();
                async move {
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((addr, received))
    }

    /// The flags a child runs with: this run's, for one round.
    fn child_args(args: &Args, mode: Mode) -> Vec<String> {
        let flag = |name: &str, value: String| [format!("--{name}"), value];
        [
            flag("url", args.url.clone()),
            flag("concurrency", args.concurrency.to_string()),
            flag("in-flight", args.in_flight.to_string()),
            flag("rpc-calls", args.rpc_calls.to_string()),
            flag("seq-calls", args.seq_calls.to_string()),
            flag("tasks", args.tasks.to_string()),
            flag("enqueue-in-flight", args.enqueue_in_flight.to_string()),
            flag("warmup", args.warmup.to_string()),
            flag("payload-bytes", args.payload_bytes.to_string()),
            flag("scenarios", args.scenarios.join(",")),
            flag("ops-side", mode.name().to_owned()),
            flag(
                "events",
                match mode.events {
                    Some(true) => "on".to_owned(),
                    Some(false) => "off".to_owned(),
                    None => args.events.clone(),
                },
            ),
        ]
        .concat()
    }

    async fn child(args: &Args, mode: Mode, sink: std::net::SocketAddr) -> Result<Figures> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .args(child_args(args, mode))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        if mode.tracing {
            command
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{sink}"))
                .env("OTEL_SERVICE_NAME", "warren-bench");
        }
        let output = command.output().await.context("running a bench child")?;
        if !output.status.success() {
            bail!(
                "the bench child (ops {}) failed: {}",
                mode.name(),
                output.status
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        match serde_json::from_str(line) {
            Ok(Value::Object(figures)) => Ok(figures),
            _ => bail!("the bench child printed no figures: {stdout}"),
        }
    }

    /// What each figure is, and whether larger is better.
    const FIGURES: [(&str, &str, bool); 6] = [
        ("rpc_per_s", "(a) RPC calls/s", true),
        ("rpc_cpu_us", "(a) CPU per call, us", false),
        ("seq_p50_ms", "(b) sequential p50, ms", false),
        ("seq_p99_ms", "(b) sequential p99, ms", false),
        ("fire_per_s", "(c) fire-and-forget tasks/s", true),
        ("fire_cpu_us", "(c) CPU per task, us", false),
    ];

    /// The cost of `value` against `base`: the share of throughput lost, or of latency or CPU
    /// added.
    fn cost(value: f64, base: f64, higher_is_better: bool) -> f64 {
        if higher_is_better {
            1.0 - value / base
        } else {
            value / base - 1.0
        }
    }

    pub(super) async fn run(args: &Args) -> Result<()> {
        let modes: Vec<Mode> = args.ops_modes.iter().map(|m| Mode::parse(m)).collect();
        if modes.len() < 2 {
            bail!("--ops-modes needs a reference and at least one mode to compare with it");
        }
        let (addr, received) = sink().await?;
        println!(
            "warren-bench --ops-cost: {} rounds of the Warren side with operations {} (child \
             processes, rotating order); rpc_calls={} seq_calls={} tasks={} concurrency={} \
             in_flight={} OTEL_TRACES_SAMPLER={:?} OTEL_TRACES_SAMPLER_ARG={:?}",
            args.rounds,
            args.ops_modes.join(", "),
            args.rpc_calls,
            args.seq_calls,
            args.tasks,
            args.concurrency,
            args.in_flight,
            std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default(),
            std::env::var("OTEL_TRACES_SAMPLER_ARG").unwrap_or_default(),
        );
        let mut rounds: Vec<Vec<Figures>> = vec![Vec::new(); modes.len()];
        for round in 1..=args.rounds {
            for i in 0..modes.len() {
                let at = (i + round - 1) % modes.len();
                let figures = child(args, modes[at], addr).await?;
                println!(
                    "  round {round} ops {:<7}: {}",
                    modes[at].name(),
                    Value::Object(figures.clone())
                );
                rounds[at].push(figures);
            }
        }
        println!();
        print!("{:<32}", "figure (median of rounds)");
        for (i, mode) in modes.iter().enumerate() {
            print!(" {:>10}", mode.name());
            if i > 0 {
                print!(" {:>8}", "cost");
            }
        }
        println!();
        let pick = |rounds: &[Figures], key: &str| -> Vec<f64> {
            rounds.iter().filter_map(|f| f.get(key)?.as_f64()).collect()
        };
        for (key, name, higher_is_better) in FIGURES {
            let medians: Vec<f64> = rounds.iter().map(|r| median(&pick(r, key))).collect();
            if medians.iter().any(|m| m.is_nan()) {
                continue;
            }
            let precision = if key.ends_with("_ms") { 3 } else { 0 };
            print!("{name:<32}");
            for (i, value) in medians.iter().enumerate() {
                print!(" {value:>10.precision$}");
                if i > 0 {
                    let cost = cost(*value, medians[0], higher_is_better);
                    print!(" {:>7.1}%", cost * 100.0);
                }
            }
            println!();
        }
        // The machine drifts over a run (a round late in it can be a fifth slower than the
        // first, whatever the mode), so the medians above can hide a cost or invent one. Each
        // round runs every mode back to back: its own pairs are the steadier comparison.
        println!();
        print!("{:<32}", "cost (median of per-round pairs)");
        for mode in &modes[1..] {
            print!(" {:>10}", mode.name());
        }
        println!();
        for (key, name, higher_is_better) in FIGURES {
            let figure = |f: &Figures| f.get(key).and_then(Value::as_f64);
            let costs: Vec<f64> = rounds[1..]
                .iter()
                .map(|r| {
                    // Round by round; a round missing either figure is left out.
                    let pairs: Vec<f64> = r
                        .iter()
                        .zip(&rounds[0])
                        .filter_map(|(f, base)| Some((figure(f)?, figure(base)?)))
                        .map(|(value, base)| cost(value, base, higher_is_better))
                        .collect();
                    median(&pairs)
                })
                .collect();
            if costs.iter().any(|c| c.is_nan()) {
                continue;
            }
            print!("{name:<32}");
            for cost in costs {
                print!(" {:>9.1}%", cost * 100.0);
            }
            println!();
        }
        println!(
            "the OTLP sink received {} export requests ({} bytes) from the tracing rounds",
            received.requests.load(Ordering::Relaxed),
            received.bytes.load(Ordering::Relaxed)
        );
        Ok(())
    }
}
