//! Handler pools: task code in any language, run by supervised long-lived processes (or by an
//! existing Text-protocol task server), serving some of the worker's functions next to its Rust
//! handlers.
//!
//! - [`PoolConfig`]: what a `[[pool]]` table of the config file (or `--exec`) says.
//! - [`Pool`]: a started pool; [`Registry::register_pool`] routes its functions to it.
//! - `protocol`: the runner protocol's frames (docs/runners.md).
//! - `process`: one child (process group, parent-death signal, environment, stderr to the log).
//! - `guard`: what kills a child's process group when the worker dies ([`serve_if_guard`]).
//! - `supervisor`: the slots that run children one task at a time and replace them.
//! - `text`: the forwarder to a Workerman-style Text task server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use warren_worker::pool::{Pool, PoolConfig};
//!
//! let config = PoolConfig::exec("php tasks.php", vec!["send_mail".into()], 4)?;
//! let pool = Pool::start(config).await?;
//! let registry = warren_worker::Registry::new().register_pool(&pool);
//! # Ok(()) }
//! ```

mod guard;
mod process;
pub mod protocol;
mod supervisor;
mod text;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;
use warren_shared::RawJson;
use warren_shared::protocol::epoch_millis;

use crate::handler::{TaskContext, TaskError};
use crate::registry::{DynamicHandler, Registry};
use supervisor::{Job, Supervisor, crashed};
use text::TextForwarder;

pub use guard::serve_if_guard;
pub use process::INHERITED_ENV;

/// Processes of a pool when the configuration does not say.
pub const DEFAULT_PROCESSES: usize = 4;
/// How long a process has to exit after its stdin is closed (or after SIGTERM) before SIGKILL.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a new process has to send its ready line.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// One pool, as a `[[pool]]` table of the worker's config file says it:
///
/// ```toml
/// [[pool]]
/// functions = ["send_mail", "resize_image"]
/// command = ["php", "tasks.php"]        # or: connect = "text://127.0.0.1:12345"
/// cwd = "/srv/app"
/// env = { APP_ENV = "prod" }
/// env_pass = ["DATABASE_URL"]
/// processes = 8
/// time_limit = "30s"
/// max_jobs = 1000
/// max_memory = "256MiB"
/// ttl = "1h"
/// prefetch = 1
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name in logs; the first function's name when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// The functions the pool serves; its processes must list each in their ready line.
    pub functions: Vec<String>,
    /// The command (argv) of each process, e.g. `["php", "tasks.php"]`. Exactly one of
    /// `command` and `connect`.
    #[serde(default)]
    pub command: Vec<String>,
    /// Forward to a Text-protocol task server instead, `text://host:port`.
    #[serde(default)]
    pub connect: Option<String>,
    /// Working directory of the processes (the worker's when absent).
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Variables set for the processes. They start from a minimal environment, not the
    /// worker's: [`INHERITED_ENV`] and `LC_*`, then `env_pass`, then these.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of variables of the worker's environment passed through to the processes (when
    /// set), beyond [`INHERITED_ENV`]; nothing else of it reaches task code.
    #[serde(default)]
    pub env_pass: Vec<String>,
    /// Processes (or, with `connect`, connections) at once: tasks run at once on this pool.
    #[serde(default = "default_processes")]
    pub processes: usize,
    /// A task running longer has its process terminated (SIGTERM, SIGKILL after `stop_grace`)
    /// and fails as `timeout`. The worker's own time limit applies too (the shorter wins).
    #[serde(default, with = "humantime_serde")]
    pub time_limit: Option<Duration>,
    /// Replace a process after this many tasks (between tasks).
    #[serde(default)]
    pub max_jobs: Option<u64>,
    /// Replace a process whose resident memory is above this many bytes after a task; an
    /// integer, or a string with a unit (`"256MiB"`, `"512MB"`, `"1G"`).
    #[serde(default, deserialize_with = "bytes::deserialize")]
    pub max_memory: Option<u64>,
    /// Replace a process this long after its start (between tasks).
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Grace of a stopping process before SIGKILL.
    #[serde(default = "default_stop_grace", with = "humantime_serde")]
    pub stop_grace: Duration,
    /// How long a new process has to say it is ready.
    #[serde(default = "default_start_timeout", with = "humantime_serde")]
    pub start_timeout: Duration,
    /// Tasks written ahead to a busy process, beyond the one it runs, while no process of the
    /// pool is idle (0: the next task only after the answer). It spares short tasks the wait
    /// between an answer and the next task; a task written ahead waits for the one before it
    /// even if another process frees up first. Only for runners that read their stdin line by
    /// line, as the bundled helpers do (docs/runners.md).
    #[serde(default)]
    pub prefetch: usize,
}

fn default_processes() -> usize {
    DEFAULT_PROCESSES
}

fn default_stop_grace() -> Duration {
    DEFAULT_STOP_GRACE
}

fn default_start_timeout() -> Duration {
    DEFAULT_START_TIMEOUT
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            name: None,
            functions: Vec::new(),
            command: Vec::new(),
            connect: None,
            cwd: None,
            env: BTreeMap::new(),
            env_pass: Vec::new(),
            processes: DEFAULT_PROCESSES,
            time_limit: None,
            max_jobs: None,
            max_memory: None,
            ttl: None,
            stop_grace: DEFAULT_STOP_GRACE,
            start_timeout: DEFAULT_START_TIMEOUT,
            prefetch: 0,
        }
    }
}

impl PoolConfig {
    /// The `--exec` short form: `command_line` split like a POSIX shell would (no shell runs),
    /// serving `functions` with `processes` processes; or, when it is a `text://host:port` URL,
    /// a forwarder to that Text-protocol task server over `processes` connections.
    ///
    /// # Errors
    /// [`PoolError::Config`] when the command line does not split (an open quote) or is empty.
    pub fn exec(
        command_line: &str,
        functions: Vec<String>,
        processes: usize,
    ) -> Result<Self, PoolError> {
        let trimmed = command_line.trim();
        let is_url = trimmed
            .get(..7)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("text://"));
        let (command, connect) = if is_url {
            (Vec::new(), Some(trimmed.to_owned()))
        } else {
            let command = shlex::split(command_line).ok_or_else(|| {
                PoolError::Config(format!("cannot split the command {command_line:?}"))
            })?;
            (command, None)
        };
        let config = Self {
            functions,
            command,
            connect,
            processes,
            ..Self::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// The pool's name in logs.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.functions.first().cloned())
            .unwrap_or_else(|| "pool".to_owned())
    }

    /// Checks what must hold before anything starts.
    ///
    /// # Errors
    /// [`PoolError::Config`] saying what is wrong.
    pub fn validate(&self) -> Result<(), PoolError> {
        let name = self.name();
        let bad = |m: String| Err(PoolError::Config(format!("pool {name:?}: {m}")));
        if self.functions.is_empty() {
            return bad("names no functions".into());
        }
        if let Some(f) = self.functions.iter().find(|f| f.trim().is_empty()) {
            return bad(format!("has an empty function name {f:?}"));
        }
        if self.processes == 0 {
            return bad("needs at least one process".into());
        }
        match (self.command.is_empty(), &self.connect) {
            (true, None) => {
                return bad("needs a command (or connect = \"text://host:port\")".into());
            }
            (false, Some(_)) => return bad("has both a command and connect; give one".into()),
            (_, Some(url)) => {
                text_address(url).map_err(|m| PoolError::Config(format!("pool {name:?}: {m}")))?;
                if self.prefetch > 0 {
                    return bad("prefetch applies to processes, not to connect".into());
                }
            }
            (false, None) => {}
        }
        if self.time_limit == Some(Duration::ZERO) {
            return bad("time_limit must be above zero".into());
        }
        if self.max_jobs == Some(0) {
            return bad("max_jobs must be at least 1".into());
        }
        let bad_name = |n: &String| n.is_empty() || n.contains(['=', '\0']);
        if let Some(n) = self
            .env_pass
            .iter()
            .chain(self.env.keys())
            .find(|n| bad_name(n))
        {
            return bad(format!("{n:?} is not an environment variable name"));
        }
        Ok(())
    }
}

/// `host:port` of a `text://host:port` URL (the scheme in any case, as Workerman writes it).
fn text_address(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("connect {url:?} is not a text://host:port URL"))?;
    if !scheme.eq_ignore_ascii_case("text") {
        return Err(format!(
            "connect {url:?}: only the text:// scheme is supported"
        ));
    }
    let address = rest.trim_end_matches('/');
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(address.to_owned())
        }
        _ => Err(format!("connect {url:?} needs a host and a port")),
    }
}

/// Why a pool cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The configuration cannot work.
    #[error("invalid pool configuration: {0}")]
    Config(String),
    /// A process could not start, did not say it was ready in time, or does not serve the
    /// configured functions.
    #[error("pool {pool:?} cannot start: {reason}")]
    Start {
        /// The pool's name.
        pool: String,
        /// What went wrong with its first process.
        reason: String,
    },
}

#[derive(Debug)]
enum Backend {
    Processes(Supervisor),
    Text(TextForwarder),
}

#[derive(Debug)]
struct Inner {
    name: String,
    functions: Vec<String>,
    backend: Backend,
}

/// A started pool. Cheap to clone; its processes are stopped by [`Pool::shutdown`], and killed
/// (with their process groups) when the last clone is dropped or the worker dies.
#[derive(Debug, Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// What a pool has been doing, for health checks and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStats {
    /// The pids of its processes now (empty for a Text forwarder).
    pub pids: Vec<i32>,
    /// Processes started since the pool started, replacements included.
    pub started: u64,
    /// Tasks written ahead to a busy process (`prefetch`) since the pool started.
    pub written_ahead: u64,
}

impl Pool {
    /// Starts the pool: with a command, every process is started and has said it is ready
    /// (serving the configured functions) when this returns; with `connect`, connections are
    /// made on demand.
    ///
    /// # Errors
    /// [`PoolError::Config`] for a configuration that cannot work, [`PoolError::Start`] when a
    /// first process cannot start or does not serve the configured functions.
    pub async fn start(config: PoolConfig) -> Result<Self, PoolError> {
        config.validate()?;
        let name = config.name();
        let functions = config.functions.clone();
        let backend = match &config.connect {
            Some(url) => Backend::Text(TextForwarder::new(
                text_address(url).map_err(PoolError::Config)?,
                config.processes,
                config.time_limit,
            )),
            None => {
                let spec = process::Spec {
                    pool: name.as_str().into(),
                    argv: config.command.clone(),
                    cwd: config.cwd.clone(),
                    env: config.env.clone(),
                    env_pass: config.env_pass.clone(),
                };
                let withheld = spec.withheld(std::env::vars_os());
                if !withheld.is_empty() {
                    // Names only: the values are what is kept from task code.
                    tracing::info!(
                        pool = %name,
                        withheld = %withheld.join(" "),
                        "worker variables not passed to the pool's processes (name them in env_pass to pass them)"
                    );
                }
                let supervisor =
                    Supervisor::start(spec, config)
                        .await
                        .map_err(|reason| PoolError::Start {
                            pool: name.clone(),
                            reason,
                        })?;
                Backend::Processes(supervisor)
            }
        };
        tracing::info!(pool = %name, ?functions, "pool started");
        Ok(Self {
            inner: Arc::new(Inner {
                name,
                functions,
                backend,
            }),
        })
    }

    /// The pool's name in logs.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The functions it serves.
    pub fn functions(&self) -> &[String] {
        &self.inner.functions
    }

    /// Runs one task on the pool.
    ///
    /// # Errors
    /// The [`TaskError`] the task code reported, or a retryable `crashed` error when its
    /// process died (or the pool stopped) under it, or `timeout` past the pool's time limit.
    pub async fn call(
        &self,
        function: &str,
        args: Value,
        ctx: &TaskContext,
    ) -> Result<Value, TaskError> {
        let args = RawJson::to_json(&args)
            .map_err(|e| TaskError::permanent(format!("cannot encode the arguments: {e}")))?;
        let result = self.call_raw(function, args, ctx).await?;
        result
            .parse()
            .map_err(|e| TaskError::permanent(format!("the result is not JSON: {e}")))
    }

    /// [`Pool::call`] on JSON text: the arguments are written to the task code as they are,
    /// and the result comes back as the task code wrote it, neither parsed.
    ///
    /// # Errors
    /// As [`Pool::call`].
    pub async fn call_raw(
        &self,
        function: &str,
        args: RawJson,
        ctx: &TaskContext,
    ) -> Result<RawJson, TaskError> {
        match &self.inner.backend {
            Backend::Text(forwarder) => forwarder.call(function, args).await,
            Backend::Processes(supervisor) => {
                let (reply, answer) = oneshot::channel();
                let job = Job {
                    id: ctx.id().as_str().to_owned(),
                    function: function.to_owned(),
                    args,
                    attempt: ctx.attempt(),
                    max_attempts: ctx.max_attempts(),
                    redelivered: ctx.redelivered(),
                    deadline: ctx
                        .deadline()
                        .and_then(|d| u64::try_from(epoch_millis(d)).ok()),
                    spared: false,
                    reply,
                    progress: ctx.reporter().clone(),
                };
                if !supervisor.submit(job) {
                    return Err(crashed("the pool stopped before running the task"));
                }
                answer
                    .await
                    .unwrap_or_else(|_| Err(crashed("the pool stopped before answering")))
            }
        }
    }

    /// Replaces every process gracefully after its current task (a code deploy); a Text
    /// forwarder drops its idle connections.
    pub fn reload(&self) {
        tracing::info!(pool = %self.inner.name, "reloading: replacing every process after its current task");
        match &self.inner.backend {
            Backend::Processes(supervisor) => supervisor.reload(),
            Backend::Text(forwarder) => forwarder.reload(),
        }
    }

    /// Stops the pool: each process after its current task (closing its stdin, then SIGTERM,
    /// then SIGKILL after the grace). Call it after the worker has drained.
    pub async fn shutdown(&self) {
        match &self.inner.backend {
            Backend::Processes(supervisor) => supervisor.shutdown().await,
            Backend::Text(forwarder) => forwarder.shutdown(),
        }
        tracing::info!(pool = %self.inner.name, "pool stopped");
    }

    /// Its processes now, how many it has started and how many tasks it has written ahead.
    pub fn stats(&self) -> PoolStats {
        match &self.inner.backend {
            Backend::Processes(supervisor) => PoolStats {
                pids: supervisor.pids(),
                started: supervisor.started(),
                written_ahead: supervisor.written_ahead(),
            },
            Backend::Text(_) => PoolStats {
                pids: Vec::new(),
                started: 0,
                written_ahead: 0,
            },
        }
    }
}

/// Starts every pool of `configs` (the `[[pool]]` tables of a config file, or the `--exec`
/// short form), refusing a function claimed by two pools. On an error the pools already started
/// are stopped again.
///
/// # Errors
/// [`PoolError::Config`] for an invalid table or a function in two pools, [`PoolError::Start`]
/// when a pool's processes cannot start.
pub async fn start_all(configs: Vec<PoolConfig>) -> Result<Vec<Pool>, PoolError> {
    let mut owner: BTreeMap<&str, String> = BTreeMap::new();
    for config in &configs {
        config.validate()?;
        for function in &config.functions {
            if let Some(other) = owner.insert(function, config.name()) {
                return Err(PoolError::Config(format!(
                    "function {function:?} is served by two pools ({other:?} and {:?})",
                    config.name()
                )));
            }
        }
    }
    let mut pools = Vec::with_capacity(configs.len());
    for config in configs {
        match Pool::start(config).await {
            Ok(pool) => pools.push(pool),
            Err(e) => {
                shutdown_all(&pools).await;
                return Err(e);
            }
        }
    }
    Ok(pools)
}

/// Stops every pool (see [`Pool::shutdown`]); call it once the worker has drained.
pub async fn shutdown_all(pools: &[Pool]) {
    for pool in pools {
        pool.shutdown().await;
    }
}

/// Reloads every pool on each SIGHUP received on `hangup` (see [`Pool::reload`]): a code
/// deploy without a restart. Without pools, a SIGHUP is logged and ignored. Runs until the
/// process exits; spawn it.
///
/// `hangup` is taken rather than made here so that a process can listen before it starts its
/// pools: from then on SIGHUP no longer has its default action (terminating the process).
pub async fn reload_on_sighup(mut hangup: tokio::signal::unix::Signal, pools: Vec<Pool>) {
    while hangup.recv().await.is_some() {
        if pools.is_empty() {
            tracing::info!("SIGHUP: no handler pools to reload; ignored");
        }
        for pool in &pools {
            pool.reload();
        }
    }
}

impl Registry {
    /// Serves every function of `pool` by running it there: the raw JSON arguments go to the
    /// pool, its result or typed error comes back, under the worker's default policy (attempts,
    /// backoff, time limit), so a task that crashes its process is retried and then
    /// dead-lettered like any failed task. Rust handlers and pools mix freely in one registry.
    #[must_use]
    pub fn register_pool(self, pool: &Pool) -> Self {
        pool.functions().iter().fold(self, |registry, function| {
            let pool = pool.clone();
            let run: DynamicHandler = Arc::new(move |args: RawJson, ctx: TaskContext| {
                let pool = pool.clone();
                Box::pin(async move { pool.call_raw(ctx.function(), args, &ctx).await })
            });
            // The registry keys functions by &'static str; pools are registered once at
            // start-up, so leaking their few names is bounded.
            let name: &'static str = Box::leak(function.clone().into_boxed_str());
            registry.insert_dynamic(name, run)
        })
    }
}

/// Byte sizes in the config file: an integer, or a number with a unit.
mod bytes {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<Size>::deserialize(d)? {
            None => Ok(None),
            Some(Size::Bytes(n)) => Ok(Some(n)),
            Some(Size::Text(text)) => parse(&text).map(Some).map_err(serde::de::Error::custom),
        }
    }

    pub(super) fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size like \"256MiB\""))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            other => return Err(format!("unknown size unit {other:?} in {text:?}")),
        };
        number
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_table_deserializes_with_units() {
        let config: PoolConfig = serde_json::from_value(serde_json::json!({
            "functions": ["send_mail"],
            "command": ["php", "tasks.php"],
            "env": {"APP_ENV": "prod"},
            "processes": 8,
            "time_limit": "30s",
            "max_jobs": 1000,
            "max_memory": "256MiB",
            "ttl": "1h",
            "prefetch": 1,
        }))
        .unwrap();
        assert_eq!(config.time_limit, Some(Duration::from_secs(30)));
        assert_eq!(config.prefetch, 1);
        assert_eq!(config.max_memory, Some(256 << 20));
        assert_eq!(config.ttl, Some(Duration::from_secs(3600)));
        assert_eq!(config.stop_grace, DEFAULT_STOP_GRACE);
        assert_eq!(config.name(), "send_mail");
        config.validate().unwrap();
        let unknown = serde_json::from_value::<PoolConfig>(serde_json::json!({
            "functions": ["a"], "command": ["x"], "procesess": 2
        }));
        assert!(unknown.unwrap_err().to_string().contains("procesess"));
    }

    #[test]
    fn bad_pools_are_refused_saying_why() {
        let exec = |cmd: &str, functions: &[&str], n| {
            PoolConfig::exec(cmd, functions.iter().map(|f| (*f).to_owned()).collect(), n)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(
            exec("php 'tasks.php", &["a"], 1)
                .unwrap_err()
                .contains("split")
        );
        assert!(exec("", &["a"], 1).unwrap_err().contains("needs a command"));
        assert!(
            exec("php t.php", &[], 1)
                .unwrap_err()
                .contains("no functions")
        );
        assert!(
            exec("php t.php", &["a"], 0)
                .unwrap_err()
                .contains("at least one")
        );
        assert_eq!(
            PoolConfig::exec("Text://127.0.0.1:12345", vec!["a".into()], 2)
                .unwrap()
                .connect
                .as_deref(),
            Some("Text://127.0.0.1:12345")
        );
        assert_eq!(
            PoolConfig::exec("php 'my tasks.php'", vec!["a".into()], 1)
                .unwrap()
                .command,
            ["php", "my tasks.php"]
        );
        let text = |url: &str| {
            PoolConfig {
                functions: vec!["a".into()],
                connect: Some(url.into()),
                ..PoolConfig::default()
            }
            .validate()
            .map_err(|e| e.to_string())
        };
        assert!(text("Text://127.0.0.1:12345").is_ok());
        assert!(text("http://x:1").unwrap_err().contains("text://"));
        assert!(
            text("text://nohost")
                .unwrap_err()
                .contains("host and a port")
        );
        let forwarder = PoolConfig {
            functions: vec!["a".into()],
            connect: Some("text://127.0.0.1:12345".into()),
            prefetch: 1,
            ..PoolConfig::default()
        };
        assert!(
            forwarder
                .validate()
                .unwrap_err()
                .to_string()
                .contains("prefetch applies to processes")
        );
        assert_eq!(bytes::parse("1G"), Ok(1_000_000_000));
    }

    #[test]
    fn env_and_env_pass_take_variable_names_only() {
        let pool = |env_pass: &[&str], env: &[(&str, &str)]| PoolConfig {
            functions: vec!["a".into()],
            command: vec!["x".into()],
            env_pass: env_pass.iter().map(|n| (*n).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..PoolConfig::default()
        };
        assert!(
            pool(&["DATABASE_URL"], &[("APP_ENV", "a=b")])
                .validate()
                .is_ok()
        );
        for bad in [
            pool(&["A=B"], &[]),
            pool(&[""], &[]),
            pool(&[], &[("X=", "1")]),
        ] {
            let error = bad.validate().unwrap_err().to_string();
            assert!(
                error.contains("not an environment variable name"),
                "{error}"
            );
        }
        let table: PoolConfig = serde_json::from_value(serde_json::json!({
            "functions": ["a"], "command": ["x"], "env_pass": ["DATABASE_URL"]
        }))
        .unwrap();
        assert_eq!(table.env_pass, ["DATABASE_URL"]);
    }

    #[tokio::test]
    async fn a_function_in_two_pools_is_refused_before_anything_starts() {
        let pool = |name: &str, functions: &[&str]| PoolConfig {
            name: Some(name.into()),
            functions: functions.iter().map(|f| (*f).to_owned()).collect(),
            // Would fail to start: the check must come first.
            command: vec!["/nonexistent".into()],
            ..PoolConfig::default()
        };
        let error = start_all(vec![pool("php", &["a", "b"]), pool("py", &["c", "b"])])
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("\"b\" is served by two pools"), "{error}");
        assert!(bytes::parse("12 parsecs").is_err());
    }
}
