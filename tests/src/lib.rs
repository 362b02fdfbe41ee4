//! # warren-tests
//!
//! Helpers for Warren's integration tests and benchmarks, which talk to a real RabbitMQ
//! (`AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`):
//!
//! - unique queue names per test, deleted again by a guard even when the test fails; task event
//!   streams of their own ([`stream`]) with events appended as workers append them;
//! - in-process workers and clients on those queues;
//! - the built binaries (`warren`, `warren-worker`) as child processes that are always stopped;
//! - a private RabbitMQ node ([`node`]) for tests that stop a broker or raise an alarm, a
//!   cluster of them ([`cluster`]), and network namespaces that play other hosts ([`netns`]);
//! - the broker set-up of `deploy/rabbitmq` applied as an operator would ([`deploy`]);
//! - a test CA and a TLS endpoint in front of the broker ([`tls`]) for `amqps://`;
//! - polling a real broker condition with a bound, for the few places where no event exists.

pub mod cluster;
pub mod deploy;
pub mod netns;
pub mod node;
pub mod raw;
pub mod relay;
pub mod smtp;
pub mod stream;
pub mod tasks;
pub mod tls;

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use warren_client::{Client, ClientSettings};
use warren_shared::BrokerSettings;
use warren_shared::broker::DEFAULT_AMQP_URL;
use warren_worker::{Health, Registry, RunningWorker, WorkerError, WorkerSettings, WorkerState};

/// The broker under test.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_owned())
}

/// The shared broker's TCP address (for relays put in front of it).
///
/// # Panics
///
/// When `AMQP_URL` does not parse or names no IP address.
pub fn broker_addr() -> std::net::SocketAddr {
    let url: lapin::uri::AMQPUri = amqp_url().parse().expect("AMQP_URL parses");
    format!(
        "{}:{}",
        url.authority.host.replace("localhost", "127.0.0.1"),
        url.authority.port
    )
    .parse()
    .expect("AMQP_URL names an IP address or localhost")
}

/// Installs a test subscriber once (`RUST_LOG` to see worker logs).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A queue name of its own for one test, deleted (with its `.dead` queue) when dropped.
///
/// The in-process workers it started ([`TestQueue::worker`]) are stopped first, whether or not
/// the test shut them down, so that none of them declares the queues again once they are gone.
#[derive(Debug)]
pub struct TestQueue {
    /// The work queue's name, `test.<label>.<uuid>`.
    pub name: String,
    retry_delays: std::sync::Mutex<Vec<Duration>>,
    extra: std::sync::Mutex<Vec<String>>,
    workers: std::sync::Mutex<Vec<Started>>,
}

/// An in-process worker a [`TestQueue`] started: how to stop it and see it stopped.
#[derive(Debug)]
struct Started {
    stop: CancellationToken,
    health: tokio::sync::watch::Receiver<Health>,
    /// Bound on its stopping: its grace for in-flight tasks, then time to hand them back and
    /// close its connections.
    stops_within: Duration,
}

impl TestQueue {
    /// A fresh name for the test `label`.
    pub fn new(label: &str) -> Self {
        init_tracing();
        Self {
            name: format!("test.{label}.{}", uuid::Uuid::new_v4().simple()),
            retry_delays: std::sync::Mutex::default(),
            extra: std::sync::Mutex::default(),
            workers: std::sync::Mutex::default(),
        }
    }

    /// Also deletes queue `name` at the end (a client's reply queue, say).
    pub fn also_delete(&self, name: &str) {
        self.extra
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(name.to_owned());
    }

    /// Also deletes the delay queues of these backoff delays at the end.
    pub fn with_retry_delays(self, delays: &[Duration]) -> Self {
        self.retry_delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(delays);
        self
    }

    /// Every queue Warren may declare for this work queue.
    pub fn all_names(&self) -> Vec<String> {
        let mut names = vec![self.name.clone(), format!("{}.dead", self.name)];
        let delays = self
            .retry_delays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.extend(
            delays
                .iter()
                .map(|d| warren_shared::topology::retry_queue_name(&self.name, *d)),
        );
        let extra = self
            .extra
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.extend(extra.iter().cloned());
        names
    }

    /// The functions exchange of this test's deployment ([`functions_exchange_of`]).
    pub fn functions_exchange(&self) -> String {
        functions_exchange_of(&self.name)
    }

    /// A client whose default queue is this one.
    pub async fn client(&self) -> Client {
        self.client_with(|_| {}).await
    }

    /// A client whose default queue is this one, with settings adjusted by `adjust`.
    pub async fn client_with(&self, adjust: impl FnOnce(&mut ClientSettings)) -> Client {
        let mut settings = ClientSettings {
            broker: BrokerSettings::new(amqp_url()),
            queue: Some(self.name.clone()),
            functions_exchange: self.functions_exchange(),
            ..ClientSettings::default()
        };
        adjust(&mut settings);
        match Client::connect(settings).await {
            Ok(client) => client,
            Err(e) => panic!("test client cannot connect: {e}"),
        }
    }

    /// Worker settings for this queue.
    pub fn worker_settings(&self, concurrency: u16) -> WorkerSettings {
        WorkerSettings {
            broker: BrokerSettings::new(amqp_url()),
            queue: self.name.clone(),
            concurrency,
            functions_exchange: self.functions_exchange(),
            ..WorkerSettings::default()
        }
    }

    /// Starts an in-process worker on this queue; it is consuming when this returns.
    pub async fn worker(&self, registry: Registry, concurrency: u16) -> RunningWorker {
        self.worker_with(registry, self.worker_settings(concurrency))
            .await
    }

    /// Starts an in-process worker with explicit settings.
    pub async fn worker_with(&self, registry: Registry, settings: WorkerSettings) -> RunningWorker {
        match self.try_worker_with(registry, settings).await {
            Ok(worker) => worker,
            Err(e) => panic!("test worker cannot start: {e}"),
        }
    }

    /// Starts an in-process worker with explicit settings, or says why it cannot start (for
    /// tests of a refused start). A worker that starts is stopped when this queue is dropped.
    ///
    /// # Errors
    /// Why [`warren_worker::start`] refused it.
    pub async fn try_worker_with(
        &self,
        registry: Registry,
        settings: WorkerSettings,
    ) -> Result<RunningWorker, WorkerError> {
        let stop = CancellationToken::new();
        let stops_within = settings.shutdown_grace + Duration::from_secs(30);
        let worker = warren_worker::start(settings, registry, stop.clone()).await?;
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Started {
                stop,
                health: worker.health_changes(),
                stops_within,
            });
        Ok(worker)
    }

    /// Messages ready in the dead-letter queue.
    pub async fn dead_count(&self, client: &Client) -> u32 {
        match client.queue_stats(&format!("{}.dead", self.name)).await {
            Ok(stats) => stats.ready,
            Err(e) => panic!("cannot read the dead-letter queue: {e}"),
        }
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let names = self.all_names();
        let functions_exchange = self.functions_exchange();
        let mut workers = std::mem::take(
            &mut *self
                .workers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for worker in &workers {
            worker.stop.cancel();
        }
        let flavor = tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.runtime_flavor());
        if flavor == Some(tokio::runtime::RuntimeFlavor::CurrentThread) {
            // Its workers run on this thread, which they cannot have while this blocks, nor
            // after the test ends: waiting would only time out. Cancelled now, a worker that
            // runs again (the test goes on) stops without declaring anything.
            workers.clear();
        }
        // Drop cannot be async and may run inside a runtime: wait for the workers to stop
        // from a thread of its own, then delete, so that none of them declares the queues
        // again.
        let cleanup = move || {
            let stopped = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    for mut worker in workers {
                        let stopped = worker.health.wait_for(|h| h.state == WorkerState::Stopped);
                        // Err: its supervisor is gone, stopped too.
                        let _ = tokio::time::timeout(worker.stops_within, stopped).await;
                    }
                });
            });
            let _ = stopped.join();
            delete_now(names, vec![functions_exchange]);
        };
        if flavor == Some(tokio::runtime::RuntimeFlavor::MultiThread) {
            // Hands this thread's runtime work to another thread while it waits, so that the
            // workers' tasks cannot be stuck behind it.
            tokio::task::block_in_place(cleanup);
        } else {
            cleanup();
        }
    }
}

/// Deletes `queues` (streams too) and `exchanges` now, each on a channel of its own (deleting a
/// missing one is fine, but an error would close a shared channel), on a fresh connection
/// from a thread and runtime of their own: what a guard's `drop` does, which cannot be async
/// and may run inside a runtime whose thread it blocks.
pub fn delete_now(queues: Vec<String>, exchanges: Vec<String>) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async move {
            let props = lapin::ConnectionProperties::default();
            let Ok(conn) = lapin::Connection::connect(&amqp_url(), props).await else {
                return;
            };
            for name in queues {
                if let Ok(channel) = conn.create_channel().await {
                    let _ = channel
                        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
            }
            for name in exchanges {
                if let Ok(channel) = conn.create_channel().await {
                    let _ = channel
                        .exchange_delete(
                            name.as_str().into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        });
    });
    let _ = cleanup.join();
}

/// The functions exchange a test whose queue is `queue` routes by function through, so that
/// tests running at once each have their own functions (a function is served by one queue per
/// functions exchange). The per-function exchanges behind it go with the queue; the test queue
/// deletes this one.
pub fn functions_exchange_of(queue: &str) -> String {
    format!("{queue}.functions")
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("no free loopback port: {e}"),
    }
}

/// A loopback address nobody listens on now (a [`free_port`]).
pub fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// `GET url`: the status and body, whatever the status (none when nothing answers within 5 s).
pub async fn http_get(url: String) -> Option<(u16, String)> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut response = agent.get(&url).call().ok()?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().ok()?;
        Some((status, body))
    })
    .await
    .unwrap_or_else(|e| panic!("GET {e}"))
}

/// `text` percent-encoded for a URL path segment or query value (unreserved bytes kept).
pub fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain connection to the test broker and a channel on it, for what a test does as an
/// operator or a foreign client would (declare, delete).
pub async fn raw_channel() -> (lapin::Connection, lapin::Channel) {
    let props = lapin::ConnectionProperties::default();
    let connection = match lapin::Connection::connect(&amqp_url(), props).await {
        Ok(connection) => connection,
        Err(e) => panic!("cannot connect to the test broker: {e}"),
    };
    match connection.create_channel().await {
        Ok(channel) => (connection, channel),
        Err(e) => panic!("cannot open a channel: {e}"),
    }
}

/// Queue `name` as the broker reports it now (messages ready, consumers), read with a passive
/// declare on `channel`; an error when it does not exist, which also closes `channel`.
pub async fn inspect_queue(channel: &lapin::Channel, name: &str) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
}

/// A new empty directory `warren-<label>-XXXX` under the system's temp dir, removed when
/// the returned guard is dropped.
pub fn temp_dir(label: &str) -> tempfile::TempDir {
    match tempfile::Builder::new()
        .prefix(&format!("warren-{label}-"))
        .tempdir()
    {
        Ok(dir) => dir,
        Err(e) => panic!("cannot create a temp dir for {label}: {e}"),
    }
}

/// A built binary of the workspace (`warren`, `warren-worker`), next to the test executable's
/// target directory. `deploy/test.sh` builds them before running the tests.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/e2e-<hash> -> target/debug/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, as deploy/test.sh does)",
        path.display()
    );
    path
}

/// A child process that is stopped when dropped: SIGTERM, then SIGKILL if it lingers.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `command` with stdin closed.
    pub fn spawn(mut command: Command) -> Self {
        command.stdin(Stdio::null());
        match command.spawn() {
            Ok(child) => Self { child: Some(child) },
            Err(e) => panic!("cannot start {command:?}: {e}"),
        }
    }

    /// Starts `warren-worker` on `queue` with extra arguments; logs go to the test's stderr.
    pub fn worker(queue: &str, extra: &[&str]) -> Self {
        let mut command = Command::new(binary("warren-worker"));
        command
            .args(["--queue", queue])
            .args(extra)
            .env("AMQP_URL", amqp_url())
            .env("WARREN_FUNCTIONS_EXCHANGE", functions_exchange_of(queue))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null());
        Self::spawn(command)
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        let id = self.child.as_ref().map_or(0, Child::id);
        Pid::from_raw(i32::try_from(id).unwrap_or(0))
    }

    /// The process's standard output, once, when its command piped it (`Stdio::piped()`).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The process's standard error, once, when its command piped it (`Stdio::piped()`).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut()?.stderr.take()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// Waits for the process to exit, at most `timeout`; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let until = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let _ = kill(
                    Pid::from_raw(i32::try_from(child.id()).unwrap_or(0)),
                    Signal::SIGTERM,
                );
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// One run of a [`tasks::Record`] task, as its log line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedRun {
    /// The task's key.
    pub key: u64,
    /// The worker process that ran it.
    pub pid: u32,
    /// The attempt number.
    pub attempt: u32,
    /// Whether the broker had delivered this message before.
    pub redelivered: bool,
    /// When the handler started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When it finished (and logged), in milliseconds since the Unix epoch.
    pub finished_ms: u64,
}

/// Every run recorded by [`tasks::Record`] in `log`, in the order they finished.
pub fn read_run_log(log: &std::path::Path) -> Vec<RecordedRun> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split(' ').collect();
            let [key, pid, attempt, redelivered, started, finished] = parts[..] else {
                return None;
            };
            Some(RecordedRun {
                key: key.parse().ok()?,
                pid: pid.parse().ok()?,
                attempt: attempt.parse().ok()?,
                redelivered: redelivered == "true",
                started_ms: started.parse().ok()?,
                finished_ms: finished.parse().ok()?,
            })
        })
        .collect()
}

/// Runs recorded by [`tasks::Record`] in `log`: key -> (pid, redelivered) of every run.
pub fn read_runs(log: &std::path::Path) -> std::collections::HashMap<u64, Vec<(u32, bool)>> {
    let mut runs: std::collections::HashMap<u64, Vec<(u32, bool)>> = Default::default();
    for run in read_run_log(log) {
        runs.entry(run.key)
            .or_default()
            .push((run.pid, run.redelivered));
    }
    runs
}

/// Enqueues `record` tasks for `keys`, each confirmed; with `started`, each task appends its key
/// there as it starts running.
pub async fn enqueue_records(
    client: &warren_client::Client,
    log: &std::path::Path,
    keys: std::ops::Range<u64>,
    work_ms: u64,
    started: Option<&std::path::Path>,
) {
    let mut enqueues = tokio::task::JoinSet::new();
    for key in keys {
        let client = client.clone();
        let task = tasks::Record {
            key,
            log: log.to_string_lossy().into_owned(),
            work_ms,
            started: started.map(|p| p.to_string_lossy().into_owned()),
        };
        enqueues.spawn(async move { client.enqueue(&task).await });
    }
    while let Some(done) = enqueues.join_next().await {
        match done {
            Ok(Ok(_)) => {}
            other => panic!("an enqueue failed: {other:?}"),
        }
    }
}

/// Polls `condition` every 20 ms until it holds, for broker state that has no event to await
/// (a consumer count, a queue depth). Panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < until,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
