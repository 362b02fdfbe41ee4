//! The `scale` scenario: how throughput grows with `warren-worker` processes.
//!
//! For each worker count, a backlog of `--scale-tasks` tasks is enqueued on a fresh queue first;
//! then that many `warren-worker` processes (the release binary next to `warren-bench`) are
//! started with `--metrics` on loopback. The clock runs from the moment every worker answers
//! `/readyz` until their `warren_worker_tasks_total` counters add up to the backlog, so start-up
//! is not measured and nothing competes with the workers but the broker. Meanwhile the workers'
//! CPU time (`/proc/<pid>/stat`) and resident memory (`/proc/<pid>/status`) are read, and the
//! broker's CPU when `--broker-pid` names it. See `docs/scaling.md`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::Channel;
use serde_json::{Value, json};
use uuid::Uuid;
use warren_shared::topology;
use warren_tests::ChildGuard;

use super::{Args, client_for, delete_queues, fan_out, process_cpu_seconds};

/// How often the workers' counters and memory are read during a run.
const POLL: Duration = Duration::from_millis(25);

/// One worker count's figures.
struct Run {
    workers: usize,
    tasks_per_second: f64,
    /// CPU of one worker, in cores (1.0 = one core busy), averaged over the workers.
    worker_cores: f64,
    /// CPU time of all workers per task, in microseconds.
    worker_us_per_task: f64,
    broker_cores: f64,
    /// Largest resident set of any worker during the run, MiB.
    peak_rss_mib: f64,
    /// Resident set of a worker when ready, before the backlog, MiB (the smallest).
    idle_rss_mib: f64,
}

/// Runs the scenario for every `--workers` count and prints the table.
pub(crate) async fn run(args: &Args, admin: &Channel) -> Result<()> {
    let worker_binary = worker_binary()?;
    let (function, task_args) = match args.scale_function.as_str() {
        "echo" => (
            "echo",
            json!({ "user": 42, "pad": "x".repeat(args.payload_bytes) }),
        ),
        "sleep" => ("sleep", json!({ "ms": args.sleep_ms })),
        other => bail!("--scale-function must be echo or sleep, not {other:?}"),
    };
    println!(
        "warren-bench scale: function={function} args={task_args} tasks={} worker concurrency={} workers={:?} ({} cores here)",
        args.scale_tasks,
        args.worker_concurrency,
        args.workers,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut runs = Vec::new();
    for &workers in &args.workers {
        let queue = format!("bench.scale.{}", Uuid::new_v4());
        topology::declare(admin, &queue)
            .await
            .with_context(|| format!("declaring {queue}"))?;
        let run = one_count(args, &worker_binary, &queue, workers, function, &task_args).await;
        delete_queues(admin, &super::warren_names(&queue)).await?;
        let run = run?;
        println!(
            "  {:>2} workers: {:>7.0} tasks/s, {:.2} cores per worker, {:.0} us worker CPU per task, broker {:.2} cores, worker RSS {:.1} MiB idle, {:.1} MiB peak",
            run.workers,
            run.tasks_per_second,
            run.worker_cores,
            run.worker_us_per_task,
            run.broker_cores,
            run.idle_rss_mib,
            run.peak_rss_mib
        );
        runs.push(run);
    }
    println!();
    println!(
        "| workers | tasks/s | vs 1 worker | CPU per worker (cores) | worker CPU per task (us) | broker CPU (cores) | worker RSS idle / peak (MiB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let base = runs.first().map_or(f64::NAN, |r| r.tasks_per_second);
    for run in &runs {
        println!(
            "| {} | {:.0} | {:.2}x | {:.2} | {:.0} | {:.2} | {:.1} / {:.1} |",
            run.workers,
            run.tasks_per_second,
            run.tasks_per_second / base,
            run.worker_cores,
            run.worker_us_per_task,
            run.broker_cores,
            run.idle_rss_mib,
            run.peak_rss_mib
        );
    }
    Ok(())
}

/// `warren-worker` next to this executable (`cargo build --release --workspace --bins`).
fn worker_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating warren-bench")?;
    let path = exe.with_file_name("warren-worker");
    if !path.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// A worker process of the run and its metrics address.
struct Worker {
    process: ChildGuard,
    metrics: String,
}

impl Worker {
    fn start(
        binary: &PathBuf,
        url: &str,
        queue: &str,
        concurrency: u16,
        events: &str,
    ) -> Result<Self> {
        // A free loopback port: bound, read and released (nothing else here takes it meanwhile).
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics = format!("127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command
            .env("AMQP_URL", url)
            .env("WARREN_QUEUE", queue)
            // The bench sends by queue name: claim no functions.
            .env("WARREN_FUNCTIONS_EXCHANGE", "")
            .env("WARREN_CONCURRENCY", concurrency.to_string())
            .env("WARREN_METRICS_ADDR", &metrics)
            .env("WARREN_EVENTS", events)
            .env("WARREN_EVENTS_STREAM", super::events_stream(queue))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        Ok(Self {
            process: ChildGuard::spawn(command),
            metrics,
        })
    }

    fn pid(&self) -> String {
        self.process.pid().to_string()
    }

    fn ready(&self) -> bool {
        ureq::get(format!("http://{}/readyz", self.metrics))
            .call()
            .is_ok()
    }

    /// Tasks this worker has finished, whatever their outcome.
    fn finished(&self) -> Result<f64> {
        let text = ureq::get(format!("http://{}/metrics", self.metrics))
            .call()?
            .body_mut()
            .read_to_string()?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("warren_worker_tasks_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

async fn one_count(
    args: &Args,
    binary: &PathBuf,
    queue: &str,
    workers: usize,
    function: &'static str,
    task_args: &Value,
) -> Result<Run> {
    // The backlog, before any worker consumes.
    let client = client_for(&args.url, queue).await?;
    let enqueuing = {
        let (client, task_args) = (client.clone(), task_args.clone());
        fan_out(args.scale_tasks, args.enqueue_in_flight, move |_| {
            let (client, task_args) = (client.clone(), task_args.clone());
            async move {
                client.enqueue_json(function, task_args).await?;
                Ok(())
            }
        })
    };
    enqueuing.await.context("enqueuing the backlog")?;
    client.close().await;

    let started: Vec<Worker> = (0..workers)
        .map(|_| {
            Worker::start(
                binary,
                &args.url,
                queue,
                args.worker_concurrency,
                &args.events,
            )
        })
        .collect::<Result<_>>()?;
    let give_up = Instant::now() + Duration::from_secs(60);
    while !started.iter().all(Worker::ready) {
        if Instant::now() > give_up {
            bail!("the workers were not ready within 60 s");
        }
        tokio::time::sleep(POLL).await;
    }
    let t0 = Instant::now();
    let done0 = total_finished(&started)?;
    let pids: Vec<String> = started.iter().map(Worker::pid).collect();
    let cpu0: f64 = pids.iter().map(|p| process_cpu_seconds(p)).sum();
    let broker_pid = args.broker_pid.map(|p| p.to_string());
    let broker0 = broker_pid.as_deref().map_or(f64::NAN, process_cpu_seconds);
    let idle_rss = pids
        .iter()
        .map(|p| rss_kib(p, "VmRSS"))
        .fold(f64::MAX, f64::min);
    let target = args.scale_tasks as f64;
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut done = done0;
    while done < target {
        if Instant::now() > give_up {
            bail!("only {done} of {target} tasks finished within 600 s");
        }
        tokio::time::sleep(POLL).await;
        done = total_finished(&started)?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = pids.iter().map(|p| process_cpu_seconds(p)).sum::<f64>() - cpu0;
    let broker = broker_pid.as_deref().map_or(f64::NAN, process_cpu_seconds) - broker0;
    let peak_rss = pids.iter().map(|p| rss_kib(p, "VmHWM")).fold(0.0, f64::max);
    let measured = target - done0;
    drop(started);
    Ok(Run {
        workers,
        tasks_per_second: measured / elapsed,
        worker_cores: cpu / elapsed / workers as f64,
        worker_us_per_task: cpu / measured * 1e6,
        broker_cores: broker / elapsed,
        peak_rss_mib: peak_rss / 1024.0,
        idle_rss_mib: idle_rss / 1024.0,
    })
}

fn total_finished(workers: &[Worker]) -> Result<f64> {
    workers.iter().map(Worker::finished).sum()
}

/// A memory figure of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB; `NaN` if unreadable.
fn rss_kib(pid: &str, field: &str) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return f64::NAN;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}
