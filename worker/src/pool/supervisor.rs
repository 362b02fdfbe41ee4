//! The supervisor of a process pool: one slot per process, each running its child through the
//! runner protocol one task at a time, and replacing it when it dies, breaks the protocol, runs
//! past the time limit, or is due for recycling.
//!
//! Every slot takes tasks from one shared queue, so a free process takes the next task. With
//! `prefetch`, a busy process is also written its next tasks while no slot is idle; those it
//! never answered go back to the queue once its process is gone. A task whose process dies
//! under it is answered as a retryable `crashed` failure: the worker's normal retry path runs
//! it again (on a fresh process) and dead-letters it after its attempts.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_shared::{ErrorKind, RawJson};

use super::PoolConfig;
use super::process::{Output, Process, Spec};
use super::protocol::{self, Frame, RUNNER_PROTOCOL, TaskFrame};
use crate::handler::{Retry, TaskError};
use crate::progress::Reporter;

/// First delay before restarting a process that keeps dying at start-up; doubles up to
/// [`MAX_RESTART_DELAY`].
const FIRST_RESTART_DELAY: Duration = Duration::from_millis(100);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// How long to wait for an exited child's status, to name it in the error.
const REAP_WAIT: Duration = Duration::from_secs(1);

/// One task for a pool process.
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) function: String,
    pub(crate) args: RawJson,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) redelivered: bool,
    pub(crate) deadline: Option<u64>,
    /// Put back in the queue once already, without an attempt, after the process it was
    /// written ahead to went before answering it (see [`release`]).
    pub(crate) spared: bool,
    pub(crate) reply: oneshot::Sender<Result<RawJson, TaskError>>,
    /// Where the task code's progress frames go.
    pub(crate) progress: Reporter,
}

/// A task failed because its process died or broke the protocol: retried like any transient
/// failure.
pub(crate) fn crashed(message: impl std::fmt::Display) -> TaskError {
    TaskError::with_kind(ErrorKind::Crashed, Retry::Retryable, message)
}

#[derive(Debug)]
struct Shared {
    spec: Spec,
    config: PoolConfig,
    /// The tasks waiting for a process; every idle slot waits on it, and one of them takes
    /// each task.
    queue: flume::Receiver<Job>,
    stop: CancellationToken,
    generation: watch::Sender<u64>,
    pids: Mutex<BTreeMap<usize, i32>>,
    started: AtomicU64,
    /// Tasks written ahead to a busy process (`prefetch`).
    written_ahead: AtomicU64,
    /// Slots waiting for a task: a busy process takes its next task early only when this is 0.
    idle: AtomicUsize,
    /// Puts back a task taken for a busy process that could not be written to it, or that it
    /// went without answering.
    requeue: flume::Sender<Job>,
}

/// The running pool of processes.
#[derive(Debug)]
pub(crate) struct Supervisor {
    /// Dropped on shutdown, so that no task is queued for slots that have stopped.
    jobs: Mutex<Option<flume::Sender<Job>>>,
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

/// Why a slot let go of its process.
enum End {
    /// The pool is stopping.
    Stop,
    /// Due for replacement between tasks (max_jobs, max_memory, ttl, reload).
    Recycle(String),
    /// It died, broke the protocol or was killed; `startup` when it never served a task.
    Broken { reason: String, startup: bool },
}

impl Supervisor {
    /// Starts `config.processes` processes and waits until each has said it is ready.
    ///
    /// # Errors
    /// A message naming the first process that could not start or did not serve the
    /// configured functions; the pool is stopped again.
    pub(crate) async fn start(spec: Spec, config: PoolConfig) -> Result<Self, String> {
        let (jobs, queue) = flume::unbounded();
        let shared = Arc::new(Shared {
            spec,
            queue,
            requeue: jobs.clone(),
            idle: AtomicUsize::new(0),
            stop: CancellationToken::new(),
            generation: watch::Sender::new(0),
            pids: Mutex::default(),
            started: AtomicU64::new(0),
            written_ahead: AtomicU64::new(0),
            config,
        });
        let tracker = TaskTracker::new();
        let mut firsts = Vec::new();
        for slot in 0..shared.config.processes {
            let (tx, rx) = oneshot::channel();
            firsts.push(rx);
            tracker.spawn(run_slot(shared.clone(), slot, tx));
        }
        tracker.close();
        let supervisor = Self {
            jobs: Mutex::new(Some(jobs)),
            shared,
            tracker,
        };
        for first in firsts {
            let result = first
                .await
                .unwrap_or_else(|_| Err("the pool stopped while starting".to_owned()));
            if let Err(e) = result {
                supervisor.shutdown().await;
                return Err(e);
            }
        }
        Ok(supervisor)
    }

    /// Queues `job` for the next free process; `false` when the pool has stopped (the job is
    /// dropped, and its caller sees its reply channel closed).
    pub(crate) fn submit(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        jobs.as_ref().is_some_and(|jobs| jobs.send(job).is_ok())
    }

    /// Replaces every process after its current task.
    pub(crate) fn reload(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// The pids of the processes running now.
    pub(crate) fn pids(&self) -> Vec<i32> {
        self.shared
            .pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .copied()
            .collect()
    }

    /// Processes started since the pool started (replacements included).
    pub(crate) fn started(&self) -> u64 {
        self.shared.started.load(Ordering::Relaxed)
    }

    /// Tasks written ahead to a busy process since the pool started.
    pub(crate) fn written_ahead(&self) -> u64 {
        self.shared.written_ahead.load(Ordering::Relaxed)
    }

    /// Stops every process (each after its current task), waits for them, and fails the tasks
    /// still queued as `crashed` (retried elsewhere).
    pub(crate) async fn shutdown(&self) {
        self.shared.stop.cancel();
        self.tracker.wait().await;
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        while let Ok(job) = self.shared.queue.try_recv() {
            let _ = job
                .reply
                .send(Err(crashed("the pool stopped before running the task")));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Slots stop their processes; a runtime that goes away drops them, and each process
        // kills its group on drop.
        self.shared.stop.cancel();
    }
}

async fn run_slot(shared: Arc<Shared>, slot: usize, first: oneshot::Sender<Result<(), String>>) {
    let mut first = Some(first);
    let mut failures: u32 = 0;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        if failures > 0 {
            let delay = FIRST_RESTART_DELAY
                .saturating_mul(2u32.saturating_pow(failures - 1))
                .min(MAX_RESTART_DELAY);
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shared.stop.cancelled() => return,
            }
        }
        let mut process = match start_process(&shared).await {
            Ok(process) => process,
            Err(e) => {
                failures = failures.saturating_add(1);
                tracing::error!(pool = %shared.spec.pool, slot, failures, error = %e, "pool process failed to start");
                if let Some(first) = first.take() {
                    let _ = first.send(Err(e));
                }
                continue;
            }
        };
        if let Some(first) = first.take() {
            let _ = first.send(Ok(()));
        }
        shared
            .pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(slot, process.pid());
        let mut held = VecDeque::new();
        let end = serve(&shared, &mut process, &mut held).await;
        shared
            .pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&slot);
        let pid = process.pid();
        match end {
            End::Stop => {
                process.stop(shared.config.stop_grace).await;
                release(&shared, held);
                return;
            }
            End::Recycle(reason) => {
                tracing::info!(pool = %shared.spec.pool, pid, jobs = process.jobs, %reason, "recycling pool process");
                process.stop(shared.config.stop_grace).await;
                release(&shared, held);
                failures = 0;
            }
            End::Broken { reason, startup } => {
                tracing::warn!(pool = %shared.spec.pool, pid, jobs = process.jobs, %reason, "pool process replaced");
                // Reaps it (and its group) if it is not gone already.
                process.terminate(shared.config.stop_grace).await;
                // Only now: a process gone for good cannot start a task it was written.
                release(&shared, held);
                failures = if startup {
                    failures.saturating_add(1)
                } else {
                    0
                };
            }
        }
    }
}

/// Starts a process and waits for its ready line, checking its protocol version and functions.
async fn start_process(shared: &Shared) -> Result<Process, String> {
    let spec = &shared.spec;
    let mut process =
        Process::spawn(spec).map_err(|e| format!("cannot start {:?}: {e}", spec.argv.join(" ")))?;
    shared.started.fetch_add(1, Ordering::Relaxed);
    let pid = process.pid();
    let ready = tokio::time::timeout(shared.config.start_timeout, async {
        loop {
            match process.next().await {
                Output::Frame(Frame::Ready {
                    protocol,
                    functions,
                }) => return Ok((protocol, functions)),
                Output::Frame(Frame::Unknown) => {}
                Output::Frame(other) => {
                    return Err(format!(
                        "process {pid} sent {} before its ready line",
                        other.describe()
                    ));
                }
                Output::Garbage(g) => return Err(format!("process {pid} wrote {g}")),
                Output::Closed => {
                    let how = process.exit_description(REAP_WAIT).await;
                    return Err(format!("process {pid} {how} before it was ready"));
                }
            }
        }
    })
    .await;
    let result = match ready {
        Err(_) => Err(format!(
            "process {pid} did not send its ready line within {:?}",
            shared.config.start_timeout
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok((Some(v), _))) if v != RUNNER_PROTOCOL => Err(format!(
            "process {pid} speaks runner protocol {v}; this worker speaks {RUNNER_PROTOCOL}"
        )),
        Ok(Ok((_, served))) => {
            let missing: Vec<&str> = shared
                .config
                .functions
                .iter()
                .filter(|f| !served.contains(f))
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "process {pid} does not serve {} (it serves: {})",
                    missing.join(", "),
                    served.join(", ")
                ))
            }
        }
    };
    match result {
        Ok(()) => {
            tracing::debug!(pool = %spec.pool, pid, "pool process ready");
            Ok(process)
        }
        Err(e) => {
            process.terminate(shared.config.stop_grace).await;
            Err(e)
        }
    }
}

/// Why `process` is due for replacement between tasks, if it is.
fn recycle_reason(shared: &Shared, process: &Process, generation: u64) -> Option<String> {
    let config = &shared.config;
    if *shared.generation.borrow() != generation {
        return Some("reload requested".to_owned());
    }
    if let Some(max) = config.max_jobs
        && process.jobs >= max
    {
        return Some(format!("served max_jobs = {max} tasks"));
    }
    if let Some(ttl) = config.ttl
        && process.started.elapsed() >= ttl
    {
        return Some(format!("older than ttl = {ttl:?}"));
    }
    // After a task only (docs/runners.md): a process that starts above the limit still serves
    // one task before it is replaced, instead of being restarted in a loop without serving any.
    if let Some(max) = config.max_memory
        && process.jobs > 0
        && let Some(rss) = process.rss_bytes()
        && rss > max
    {
        return Some(format!("RSS of {rss} bytes is above max_memory = {max}"));
    }
    None
}

/// Counts a slot as idle while it lives.
struct Idle<'a>(&'a AtomicUsize);

impl<'a> Idle<'a> {
    fn new(idle: &'a AtomicUsize) -> Self {
        idle.fetch_add(1, Ordering::Relaxed);
        Self(idle)
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs tasks on `process` until it must go. `held`: the tasks written ahead to it (`prefetch`),
/// oldest first; whatever is left there when it goes is for [`release`].
async fn serve(shared: &Shared, process: &mut Process, held: &mut VecDeque<Job>) -> End {
    let mut generation_changes = shared.generation.subscribe();
    let generation = *generation_changes.borrow_and_update();
    loop {
        let (job, ahead) = match held.pop_front() {
            Some(job) => (job, true),
            None => {
                if let Some(reason) = recycle_reason(shared, process, generation) {
                    return End::Recycle(reason);
                }
                let ttl = shared.config.ttl.map(|ttl| process.started + ttl);
                let idle = Idle::new(&shared.idle);
                let job = tokio::select! {
                    // Stopping and reloading come before the next task.
                    biased;
                    () = shared.stop.cancelled() => return End::Stop,
                    changed = generation_changes.changed() => {
                        if changed.is_err() {
                            return End::Stop;
                        }
                        continue;
                    }
                    () = sleep_until(ttl) => continue,
                    output = process.next() => match output {
                        Output::Frame(Frame::Unknown | Frame::Progress { .. }) => continue,
                        Output::Frame(other) => return End::Broken {
                            reason: format!("sent {} between tasks", other.describe()),
                            startup: false,
                        },
                        Output::Garbage(g) => return End::Broken { reason: format!("wrote {g}"), startup: false },
                        Output::Closed => {
                            drop(idle);
                            let how = process.exit_description(REAP_WAIT).await;
                            return End::Broken { reason: format!("{how} between tasks"), startup: process.jobs == 0 };
                        }
                    },
                    job = shared.queue.recv_async() => match job {
                        Ok(job) => job,
                        Err(flume::RecvError::Disconnected) => return End::Stop,
                    },
                };
                (job, false)
            }
        };
        if let Some(end) = run_job(shared, process, job, ahead, generation, held).await {
            return end;
        }
    }
}

/// Settles the tasks written ahead to a process that has gone for good without answering them.
/// Nothing says whether it started them: each goes back to the queue once without spending an
/// attempt (a process that exits right after answering the task before never read it); a task
/// spared once already is a `crashed` attempt, so a task that kills every process it reaches
/// still ends in the dead letters.
fn release(shared: &Shared, held: VecDeque<Job>) {
    for mut job in held {
        if job.spared {
            let _ = job.reply.send(Err(crashed(
                "its pool process went before answering it, a second time after it was written \
                 ahead",
            )));
        } else {
            job.spared = true;
            requeue(shared, job);
        }
    }
}

/// Settles `job` after its process went under it (exited, or broke the protocol and was
/// terminated): a `crashed` attempt with `message` once the process had started it; a task
/// written ahead of which no frame has come may not even have been read (a runner that exits
/// right after answering the task before), so it goes with the other held tasks to
/// [`release`].
fn gone_during(job: Job, started: bool, held: &mut VecDeque<Job>, message: String) {
    if started {
        let _ = job.reply.send(Err(crashed(message)));
    } else {
        held.push_front(job);
    }
}

/// Puts `job` back at the end of the pool's queue. The send cannot fail: the queue's receiver
/// lives in `shared` too.
fn requeue(shared: &Shared, job: Job) {
    let _ = shared.requeue.send(job);
}

async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The line that gives `job` to a runner, or the permanent error when it cannot be encoded.
fn task_line(job: &Job) -> Result<Vec<u8>, TaskError> {
    let frame = TaskFrame {
        kind: "task",
        id: &job.id,
        function: &job.function,
        args: &job.args,
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        redelivered: job.redelivered,
        deadline: job.deadline,
    };
    let json = serde_json::to_vec(&frame)
        .map_err(|e| TaskError::permanent(format!("cannot encode the task for the runner: {e}")))?;
    Ok(protocol::into_line(json))
}

/// Whether `process`, running a task and holding `held` more, may be written one more: below
/// `prefetch`, not exited, every slot busy (an idle process would start it sooner), and nothing
/// due after its current task (stopping, a reload, recycling by `max_jobs` or `ttl`) that would
/// leave the task unstarted. `max_memory` is [`below_max_memory`], kept apart because it reads `/proc`.
fn wants_next(shared: &Shared, process: &Process, generation: u64, held: usize) -> bool {
    let config = &shared.config;
    held < config.prefetch
        && !process.exit_seen()
        && shared.idle.load(Ordering::Relaxed) == 0
        && !shared.stop.is_cancelled()
        && *shared.generation.borrow() == generation
        && config
            .max_jobs
            .is_none_or(|max| process.jobs + 2 + held as u64 <= max)
        && config.ttl.is_none_or(|ttl| process.started.elapsed() < ttl)
}

/// Whether `process` is within `max_memory` (or the pool has none).
fn below_max_memory(shared: &Shared, process: &Process) -> bool {
    shared
        .config
        .max_memory
        .is_none_or(|max| process.rss_bytes().is_none_or(|rss| rss <= max))
}

/// At the start of a task: writes `process` the queue's next tasks while [`wants_next`] allows.
/// The runner reads each when it has answered the task before, without waiting for the worker to
/// see that answer.
async fn take_next(
    shared: &Shared,
    process: &mut Process,
    generation: u64,
    held: &mut VecDeque<Job>,
    blocked: &mut bool,
) {
    if !wants_next(shared, process, generation, held.len()) || !below_max_memory(shared, process) {
        return;
    }
    while let Ok(job) = shared.queue.try_recv() {
        hold(shared, process, job, held, blocked).await;
        if *blocked || !wants_next(shared, process, generation, held.len()) {
            return;
        }
    }
}

/// Writes `job` ahead to `process` if the pipe takes its line whole at once; otherwise puts it
/// back in the queue for another process and sets `blocked`, so that nothing more is written
/// ahead during the current task.
async fn hold(
    shared: &Shared,
    process: &mut Process,
    job: Job,
    held: &mut VecDeque<Job>,
    blocked: &mut bool,
) {
    match task_line(&job) {
        Ok(line) if write_now(process, &line).await => {
            shared.written_ahead.fetch_add(1, Ordering::Relaxed);
            held.push_back(job);
        }
        Ok(_) => {
            requeue(shared, job);
            *blocked = true;
        }
        Err(e) => {
            let _ = job.reply.send(Err(e));
        }
    }
}

/// Writes `line` if the pipe takes it whole without waiting. A write of at most PIPE_BUF bytes
/// is atomic, the whole line or nothing, so a write that would wait is dropped without leaving
/// half a line behind.
async fn write_now(process: &mut Process, line: &[u8]) -> bool {
    line.len() <= PIPE_BUF
        && matches!(
            futures_lite::future::poll_once(process.send(line)).await,
            Some(Ok(()))
        )
}

/// Bytes a pipe write takes whole or not at all (POSIX `PIPE_BUF`, 4096 on Linux).
const PIPE_BUF: usize = 4096;

/// Runs one task on `process`; `Some` when the process cannot go on. `ahead`: its line was
/// written ahead (it is in the process's stdin already).
async fn run_job(
    shared: &Shared,
    process: &mut Process,
    mut job: Job,
    ahead: bool,
    generation: u64,
    held: &mut VecDeque<Job>,
) -> Option<End> {
    let pid = process.pid();
    let time_limit = shared.config.time_limit;
    let limit = sleep_until(time_limit.map(|t| std::time::Instant::now() + t));
    tokio::pin!(limit);
    // The task stays named in the log lines until the next one starts: its stderr is read
    // concurrently with its answer, and may still be on its way.
    if ahead {
        process.set_task(&job.id);
    } else {
        if job.reply.is_closed() {
            // Its caller gave up while it waited for a process.
            return None;
        }
        if process.has_exited() {
            // Gone just as it was given the task: the task is for another process.
            requeue(shared, job);
            let how = process.exit_description(REAP_WAIT).await;
            return Some(End::Broken {
                reason: format!("{how} between tasks"),
                startup: process.jobs == 0,
            });
        }
        let line = match task_line(&job) {
            Ok(line) => line,
            Err(e) => {
                let _ = job.reply.send(Err(e));
                return None;
            }
        };
        process.set_task(&job.id);
        // A child that does not read its stdin must not hold the slot past the limits either.
        let sent = tokio::select! {
            sent = process.send_or_exit(&line) => sent.map_err(|e| format!("could not take the task ({e})")),
            () = &mut limit => Err("did not read the task within the time limit".to_owned()),
            () = job.reply.closed() => Err("did not read the task before the worker gave up on it".to_owned()),
        };
        if let Err(problem) = sent {
            process.terminate(shared.config.stop_grace).await;
            let how = process.exit_description(REAP_WAIT).await;
            let reason = format!("{problem}; it {how}");
            let _ = job
                .reply
                .send(Err(crashed(format!("pool process {pid} {reason}"))));
            return Some(End::Broken {
                reason,
                startup: process.jobs == 0,
            });
        }
    }
    let mut blocked = false;
    take_next(shared, process, generation, held, &mut blocked).await;
    // A frame of this task has come: the process has started it.
    let mut started = !ahead;
    let grace = shared.config.stop_grace;
    loop {
        let more = !blocked && wants_next(shared, process, generation, held.len());
        tokio::select! {
            next = shared.queue.recv_async(), if more => match next {
                // Checked again: the state may have changed while this waited.
                Ok(next) if wants_next(shared, process, generation, held.len())
                    && below_max_memory(shared, process) => {
                    hold(shared, process, next, held, &mut blocked).await;
                }
                Ok(next) => {
                    requeue(shared, next);
                    blocked = true;
                }
                Err(flume::RecvError::Disconnected) => blocked = true,
            },
            output = process.next() => match output {
                Output::Frame(Frame::Result { id, result }) if id == job.id => {
                    process.jobs += 1;
                    let _ = job.reply.send(Ok(result));
                    return None;
                }
                Output::Frame(Frame::Error { id, error }) if id == job.id => {
                    process.jobs += 1;
                    let _ = job.reply.send(Err(error.into_task_error()));
                    return None;
                }
                Output::Frame(Frame::Progress { id, rest }) if id == job.id => {
                    started = true;
                    job.progress.report(protocol::progress_of(&rest));
                }
                Output::Frame(Frame::Progress { id, .. }) => {
                    let id = warren_shared::envelope::bounded(&id, 100);
                    tracing::debug!(pool = %shared.spec.pool, pid, task = %id, "progress for a task this process is not running; ignored");
                }
                Output::Frame(Frame::Unknown) => {}
                Output::Frame(other) => {
                    let reason = format!("sent {} while running task {}", other.describe(), job.id);
                    // Gone before the task is failed: its retry cannot meet it.
                    process.terminate(grace).await;
                    gone_during(job, started, held, format!("pool process {pid} {reason}; it was replaced"));
                    return Some(End::Broken { reason, startup: false });
                }
                Output::Garbage(g) => {
                    let reason = format!("wrote {g}");
                    process.terminate(grace).await;
                    gone_during(job, started, held, format!("pool process {pid} {reason}; it was replaced"));
                    return Some(End::Broken { reason, startup: false });
                }
                Output::Closed => {
                    let how = process.exit_description(REAP_WAIT).await;
                    let reason = format!("{how} while running task {}", job.id);
                    gone_during(job, started, held, format!("pool process {pid} {reason}"));
                    return Some(End::Broken { reason, startup: false });
                }
            },
            () = &mut limit => {
                let limit = time_limit.unwrap_or_default();
                process.terminate(grace).await;
                let _ = job.reply.send(Err(TaskError::with_kind(
                    ErrorKind::Timeout,
                    Retry::Retryable,
                    format!("task ran past the pool's time limit of {limit:?}; its process {pid} was terminated"),
                )));
                return Some(End::Broken { reason: format!("ran past the time limit of {limit:?}"), startup: false });
            }
            () = job.reply.closed() => {
                // The worker gave up on the task (its own time limit, or a forced shutdown):
                // the process may still be running it, so it goes.
                process.terminate(grace).await;
                return Some(End::Broken { reason: format!("the worker gave up on task {}", job.id), startup: false });
            }
        }
    }
}
