//! `warren demo`: the scenario Warren exists for. A service has to mail 1000 users; instead of
//! blocking on it, it hands each mail to workers as a concurrent call and collects the results
//! as they arrive.
//!
//! The demo makes sure someone works the queue: when no worker consumes it, it starts a local
//! pool of `warren-worker` processes (the binary next to `warren`) and stops them at the end.
//! "No worker" means none seen over a short window ([`DemoOptions::worker_wait`]), not a
//! single look: workers that are reconnecting have no consumer for a moment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use warren_shared::tasks::SendMail;

use warren_client::{CallOptions, Client};

/// Mails the demo sends unless told otherwise.
pub const DEFAULT_TASKS: usize = 1000;
/// Worker processes the demo starts (when none consume the queue) unless told otherwise.
pub const DEFAULT_WORKERS: usize = 4;
/// Outbox of the workers the demo starts unless told otherwise.
pub const DEFAULT_OUTBOX: &str = "outbox";
/// How long each demo call may wait unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Broker URL handed to the workers the demo starts.
    pub amqp_url: String,
    /// Work queue.
    pub queue: String,
    /// How many mails to send.
    pub tasks: usize,
    /// How many worker processes to start when none consume the queue.
    pub workers: usize,
    /// Outbox of the workers the demo starts.
    pub outbox: PathBuf,
    /// How long each call may wait.
    pub timeout: Duration,
    /// How long to look for a consumer before deciding that no worker serves the queue.
    pub worker_wait: Duration,
}

/// How often the consumer count is read while looking for workers.
const WORKER_POLL: Duration = Duration::from_millis(200);

/// How the demo went.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Tasks sent.
    pub tasks: usize,
    /// Tasks that ended in an error.
    pub failures: usize,
    /// From the first publish to the last result.
    pub wall: Duration,
    /// Median call latency.
    pub p50: Duration,
    /// 99th percentile call latency.
    pub p99: Duration,
    /// Where the mail went (a directory or a relay) and how many went there.
    pub destinations: BTreeMap<String, usize>,
    /// Failures by error kind.
    pub errors: BTreeMap<String, usize>,
}

/// Runs the demo and prints its progress and summary.
///
/// # Errors
/// When workers cannot be started or the queue cannot be reached; task failures are counted in
/// the summary instead.
pub async fn run(client: &Client, options: &DemoOptions) -> anyhow::Result<Summary> {
    client.declare_queue(&options.queue).await?;
    let consumers = consumers_within(client, &options.queue, options.worker_wait).await?;
    let mut pool = None;
    if consumers == 0 {
        eprintln!(
            "No worker consumes {:?}; starting {} local warren-worker processes.",
            options.queue, options.workers
        );
        pool = Some(WorkerPool::start(client, options).await?);
    } else {
        eprintln!(
            "{consumers} worker(s) already consume {:?}; using them.",
            options.queue
        );
    }
    let summary = send_mail(client, options).await;
    if let Some(pool) = pool {
        pool.stop().await;
    }
    let summary = summary?;
    print_summary(&summary);
    Ok(summary)
}

/// The queue's consumer count, as soon as it is not zero, or zero once `window` has passed
/// without one (a worker that is reconnecting has no consumer for a moment).
async fn consumers_within(client: &Client, queue: &str, window: Duration) -> anyhow::Result<u32> {
    let until = tokio::time::Instant::now() + window;
    loop {
        let consumers = client.queue_stats(queue).await?.consumers;
        if consumers > 0 || tokio::time::Instant::now() >= until {
            return Ok(consumers);
        }
        tokio::time::sleep(WORKER_POLL).await;
    }
}

async fn send_mail(client: &Client, options: &DemoOptions) -> anyhow::Result<Summary> {
    let bar = ProgressBar::new(options.tasks as u64).with_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} mails  {per_sec}  {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let call_options = CallOptions::default()
        .queue(options.queue.clone())
        .timeout(options.timeout);
    let started = Instant::now();
    let mut calls = JoinSet::new();
    for i in 0..options.tasks {
        let client = client.clone();
        let call_options = call_options.clone();
        let mail = SendMail {
            from: "Warren Shop <noreply@shop.example>".to_owned(),
            to: format!("user{i:04}@example.com"),
            subject: format!("Your weekly digest, user {i}"),
            body: format!("Hello user {i},\n\nhere is what happened this week.\n"),
        };
        calls.spawn(async move {
            let sent = Instant::now();
            let result = client.call_with(&mail, &call_options).await;
            (sent.elapsed(), result)
        });
    }
    let mut latencies = Vec::with_capacity(options.tasks);
    let mut destinations = BTreeMap::new();
    let mut errors = BTreeMap::new();
    let mut failures = 0;
    while let Some(joined) = calls.join_next().await {
        let (latency, result) = joined.context("a call task panicked")?;
        latencies.push(latency);
        match result {
            Ok(receipt) => {
                *destinations
                    .entry(destination(&receipt.delivered_to))
                    .or_insert(0) += 1;
            }
            Err(e) => {
                failures += 1;
                let kind = e
                    .failure()
                    .map_or_else(|| e.to_string(), |f| f.kind.to_string());
                *errors.entry(kind).or_insert(0) += 1;
                bar.set_message(format!("{failures} failed"));
            }
        }
        bar.inc(1);
    }
    let wall = started.elapsed();
    bar.finish();
    latencies.sort_unstable();
    Ok(Summary {
        tasks: options.tasks,
        failures,
        wall,
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        destinations,
        errors,
    })
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// `outbox:x.eml` becomes `outbox`, `file:///dir/x.eml` (older workers) becomes `/dir/`; a
/// relay URL stays as it is.
fn destination(delivered_to: &str) -> String {
    if delivered_to.starts_with("outbox:") {
        return "outbox".to_owned();
    }
    match delivered_to.strip_prefix("file://") {
        Some(path) => Path::new(path)
            .parent()
            .map_or_else(|| path.to_owned(), |d| format!("{}/", d.display())),
        None => delivered_to.to_owned(),
    }
}

fn print_summary(s: &Summary) {
    let secs = s.wall.as_secs_f64();
    println!();
    println!("Warren demo: mail to {} users", s.tasks);
    println!("  tasks      {}", s.tasks);
    println!("  failures   {}", s.failures);
    println!("  wall time  {secs:.2} s");
    println!(
        "  throughput {:.0} tasks/s",
        if secs > 0.0 {
            s.tasks as f64 / secs
        } else {
            0.0
        }
    );
    println!(
        "  latency    p50 {:.1} ms, p99 {:.1} ms",
        ms(s.p50),
        ms(s.p99)
    );
    for (place, count) in &s.destinations {
        println!("  mail       {count} messages -> {place}");
    }
    for (kind, count) in &s.errors {
        println!("  error      {count} x {kind}");
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Worker processes started by the demo; killed if the demo ends abruptly.
struct WorkerPool {
    children: Vec<Child>,
}

impl WorkerPool {
    async fn start(client: &Client, options: &DemoOptions) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot locate the warren binary")?;
        let worker = exe.with_file_name("warren-worker");
        if !worker.exists() {
            bail!(
                "{} not found; build both binaries with `cargo build --release --bins`",
                worker.display()
            );
        }
        std::fs::create_dir_all(&options.outbox)
            .with_context(|| format!("cannot create outbox {}", options.outbox.display()))?;
        let log = std::env::temp_dir().join("warren-demo-workers.log");
        let mut pool = Self {
            children: Vec::new(),
        };
        for _ in 0..options.workers {
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let child = Command::new(&worker)
                .arg("--queue")
                .arg(&options.queue)
                .arg("--outbox")
                .arg(&options.outbox)
                .env("AMQP_URL", &options.amqp_url)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", worker.display()))?;
            pool.children.push(child);
        }
        // Wait for the broker to see them consuming, so the calls are spread over all of them.
        let wait_until = Instant::now() + Duration::from_secs(30);
        loop {
            let consumers = client.queue_stats(&options.queue).await?.consumers as usize;
            if consumers >= options.workers {
                break;
            }
            for child in &mut pool.children {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "a worker exited during start-up ({status}); see {}",
                        log.display()
                    );
                }
            }
            if Instant::now() > wait_until {
                bail!(
                    "workers did not start consuming within 30 s; see {}",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "{} workers consuming; writing mail to {}/",
            options.workers,
            options.outbox.display()
        );
        Ok(pool)
    }

    /// SIGTERM, then wait for the graceful exit (SIGKILL after 15 s).
    async fn stop(mut self) {
        for child in &self.children {
            if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(15), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        eprintln!(
            "Stopped the {} workers the demo started.",
            self.children.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let samples: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 99), Duration::from_millis(99));
        assert_eq!(percentile(&samples[..1], 99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 50), Duration::ZERO);
    }

    #[test]
    fn destinations_group_files_by_directory() {
        assert_eq!(destination("file:///tmp/outbox/a.eml"), "/tmp/outbox/");
        assert_eq!(destination("smtp://relay:25"), "smtp://relay:25");
        assert_eq!(destination("outbox:a.eml"), "outbox");
    }
}
