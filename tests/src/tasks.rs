//! Task types that only tests need: they record where and how often they ran, fail on purpose,
//! or kill their process. `warren-test-worker` serves them next to the built-ins.

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_shared::Task;
use warren_worker::{Run, TaskContext, TaskError};

/// Appends `"<key> <pid> <attempt> <redelivered> <started> <finished>"` to the file `log` after
/// `work_ms` (the times in milliseconds since the Unix epoch; read back with
/// [`read_run_log`](crate::read_run_log)).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// What the test counts.
    pub key: u64,
    /// The log file (one line per run; short appends are atomic).
    pub log: String,
    /// Simulated work before recording.
    #[serde(default)]
    pub work_ms: u64,
    /// When set, the key is also appended to this file as the handler starts, so that a test
    /// can tell when the task is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
}

fn append(path: &str, line: &str) -> Result<(), TaskError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| TaskError::retryable(format!("cannot append to {path}: {e}")))
}

impl Task for Record {
    const NAME: &'static str = "record";
    type Output = u64;
}

/// Now, in milliseconds since the Unix epoch (comparable across processes on one machine).
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Run for Record {
    async fn run(self, ctx: TaskContext) -> Result<u64, TaskError> {
        let started_at = unix_millis();
        if let Some(started) = &self.started {
            append(started, &format!("{}\n", self.key))?;
        }
        if self.work_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.work_ms)).await;
        }
        let line = format!(
            "{} {} {} {} {started_at} {}\n",
            self.key,
            std::process::id(),
            ctx.attempt(),
            ctx.redelivered(),
            unix_millis()
        );
        append(&self.log, &line)?;
        Ok(self.key)
    }
}

/// Kills the worker process that runs it, every time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Crash {}

impl Task for Crash {
    const NAME: &'static str = "crash";
    type Output = ();
}

impl Run for Crash {
    async fn run(self, _ctx: TaskContext) -> Result<(), TaskError> {
        std::process::abort()
    }
}

/// Fails with a retryable error until attempt `succeed_on`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flaky {
    /// The attempt that succeeds (never, when larger than the attempt budget).
    pub succeed_on: u32,
}

impl Task for Flaky {
    const NAME: &'static str = "flaky";
    type Output = u32;
}

impl Run for Flaky {
    async fn run(self, ctx: TaskContext) -> Result<u32, TaskError> {
        if ctx.attempt() >= self.succeed_on {
            Ok(ctx.attempt())
        } else {
            Err(TaskError::retryable(format!(
                "attempt {} fails on purpose",
                ctx.attempt()
            )))
        }
    }
}
