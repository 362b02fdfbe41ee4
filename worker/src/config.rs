//! The `warren-worker` binary's settings: its flags, its `--config` file and their defaults.
//!
//! [`WorkerConfig`] is the one description of every setting of the binary: a field is a flag
//! (`--max-attempts`), an environment variable (`WARREN_MAX_ATTEMPTS`) and a key of the TOML
//! file (`max_attempts = 3`) at once, and its default comes from [`WorkerSettings::default`] (or
//! the type that owns the setting). `warren_shared::config` layers defaults < file <
//! environment < flags; `deploy/warren-worker.toml` is a commented example.

use std::fmt;
use std::num::{NonZeroU16, NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use warren_shared::Policy;
use warren_shared::config::{Backoff, BrokerConfig};

use crate::cron::ScheduleConfig;
use crate::events::EventSettings;
use crate::mail::Mailer;
use crate::pool::{self, PoolConfig, PoolError};
use crate::settings::{WorkerError, WorkerSettings};

/// Where `send_mail` writes `.eml` files when no SMTP relay is set.
pub const DEFAULT_OUTBOX: &str = "outbox";

/// A setting that is `on` or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

impl From<bool> for Switch {
    fn from(on: bool) -> Self {
        if on { Self::On } else { Self::Off }
    }
}

/// Every setting of `warren-worker`; see the [module](self).
#[derive(Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// The broker (`[broker]` in the file).
    #[command(flatten)]
    pub broker: BrokerConfig,
    /// Work queue to consume (`<queue>.dead` and `<queue>.delay.*` go with it).
    #[arg(long, env = "WARREN_QUEUE")]
    pub queue: String,
    /// The exchange through which callers reach this worker's functions by name; the worker
    /// claims them for its queue there. Empty: reached by queue name only. See
    /// docs/protocol.md, "Routing by function".
    #[arg(long, env = "WARREN_FUNCTIONS_EXCHANGE")]
    pub functions_exchange: String,
    /// Queues a task's reply may go to besides direct reply-to addresses, comma-separated
    /// patterns where `*` stands for any run of characters (`*` alone: any queue; an empty
    /// value: direct reply-to only; blanks around a pattern are dropped). A task whose `reply_to` names another queue is rejected
    /// as `bad_request` and not run. See docs/protocol.md §2, "Reply queues".
    #[arg(long, env = "WARREN_REPLY_QUEUES", value_delimiter = ',')]
    pub reply_queues: Vec<String>,
    /// Tasks run at once (and the consumer's prefetch).
    #[arg(long, env = "WARREN_CONCURRENCY")]
    pub concurrency: NonZeroU16,
    /// Attempts a task gets in all, unless its caller or its registration says otherwise.
    #[arg(long, env = "WARREN_MAX_ATTEMPTS")]
    pub max_attempts: NonZeroU32,
    /// Delays between attempts, comma-separated (e.g. `1s,10s,1m`); the last one repeats.
    #[arg(long, env = "WARREN_BACKOFF")]
    pub backoff: Backoff,
    /// Execution time limit of one attempt (e.g. `30s`, `5m`). Keep it below RabbitMQ's
    /// consumer_timeout (30 min by default).
    #[arg(long, env = "WARREN_TIME_LIMIT", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub time_limit: Duration,
    /// On SIGTERM, how long in-flight tasks may take to finish before they are handed back.
    #[arg(long, env = "WARREN_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often an idle worker checks that it is not starving next to ready tasks.
    #[arg(long, env = "WARREN_WATCHDOG_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub watchdog_interval: Duration,
    /// Largest task body accepted, in bytes; larger ones are refused as `too_large`.
    #[arg(long, env = "WARREN_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Largest result (its JSON text) a handler may return, in bytes; a larger one fails the
    /// task for good as `too_large` (unless nobody waits for it: then it is dropped).
    #[arg(long, env = "WARREN_MAX_RESULT_BYTES")]
    pub max_result_bytes: usize,
    /// Directory where send_mail writes .eml files when no SMTP relay is set.
    #[arg(long, env = "WARREN_OUTBOX")]
    pub outbox: PathBuf,
    /// SMTP relay for send_mail, e.g. `smtp://relay:25` or `smtps://user:pass@host:465`.
    #[arg(long, env = "WARREN_SMTP_URL", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_url: Option<String>,
    /// Serve functions with a pool of processes running this command (split like a shell
    /// would, no shell runs), e.g. `php tasks.php`; see docs/runners.md. SIGHUP replaces every
    /// process after its current task. A `text://host:port` URL instead forwards the functions
    /// to that Workerman-style Text task server (`--exec-processes` connections).
    #[arg(long, env = "WARREN_EXEC", requires = "exec_functions")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exec: Option<String>,
    /// The functions the `--exec` pool serves, comma-separated.
    #[arg(
        long,
        env = "WARREN_EXEC_FUNCTIONS",
        value_delimiter = ',',
        requires = "exec"
    )]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exec_functions: Vec<String>,
    /// Built-in functions to serve (echo, sleep, fail, send_mail), comma-separated, or `all`.
    /// Default: all of them, unless the worker has handler pools (`--exec`, `[[pool]]`), whose
    /// workers serve their pools' functions only. Every function served is claimed for the
    /// queue (see `functions_exchange`).
    #[arg(long, env = "WARREN_BUILTINS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builtins: Option<Vec<String>>,
    /// Processes of the `--exec` pool.
    #[arg(long, env = "WARREN_EXEC_PROCESSES")]
    pub exec_processes: NonZeroUsize,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`) on this
    /// address, e.g. `127.0.0.1:9464`. Off by default; see docs/operations.md.
    #[arg(long, env = "WARREN_METRICS_ADDR", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Append every task's events (started, succeeded, failed, ...) to the event stream, with
    /// confirms and before the task is acked: `on` or `off`. Off, this worker appends nothing
    /// (results cannot be looked up, nor progress resumed): for a firehose queue whose tasks
    /// nobody looks up. See docs/operations.md, "Task events".
    #[arg(
        long,
        env = "WARREN_EVENTS",
        value_name = "on|off",
        hide_possible_values = true
    )]
    pub events: Switch,
    /// The event stream (a RabbitMQ stream queue, declared by the worker if missing); every
    /// worker, gateway and `warren` of a deployment use the same one.
    #[arg(long, env = "WARREN_EVENTS_STREAM", value_name = "NAME")]
    pub events_stream: String,
    /// How long the event stream keeps events (`24h`, `7d`), when this worker declares it.
    /// An existing stream keeps its own retention (a mismatch is logged).
    #[arg(long, env = "WARREN_EVENTS_MAX_AGE", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub events_max_age: Duration,
    /// How many bytes the event stream keeps (the oldest segments go first: 64 MiB each, or a
    /// quarter of this when less), when this worker declares it.
    #[arg(long, env = "WARREN_EVENTS_MAX_BYTES", value_name = "BYTES")]
    pub events_max_bytes: u64,
    /// Largest result (its JSON text, in bytes) a `succeeded` event carries; a larger one is
    /// left out and the event marked `truncated` (the caller's reply still has it).
    #[arg(long, env = "WARREN_EVENTS_MAX_RESULT_BYTES", value_name = "BYTES")]
    pub events_max_result_bytes: usize,
    /// Handler process pools (`[[pool]]` tables in the file; see docs/runners.md).
    #[arg(skip)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pool: Vec<PoolConfig>,
    /// Cron schedules (`[[schedule]]` tables in the file; see docs/operations.md,
    /// "Schedules").
    #[arg(skip)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<ScheduleConfig>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let WorkerSettings {
            broker: _,
            queue,
            concurrency,
            policy,
            max_body_bytes,
            max_result_bytes,
            shutdown_grace,
            watchdog_interval,
            functions_exchange,
            reply_queues,
            events,
            ..
        } = WorkerSettings::default();
        Self {
            broker: BrokerConfig::default(),
            queue,
            functions_exchange,
            reply_queues,
            concurrency: NonZeroU16::new(concurrency).unwrap_or(NonZeroU16::MIN),
            max_attempts: NonZeroU32::new(policy.max_attempts).unwrap_or(NonZeroU32::MIN),
            backoff: Backoff(policy.backoff),
            time_limit: policy.time_limit,
            shutdown_grace,
            watchdog_interval,
            max_body_bytes,
            max_result_bytes,
            outbox: PathBuf::from(DEFAULT_OUTBOX),
            smtp_url: None,
            exec: None,
            exec_functions: Vec::new(),
            builtins: None,
            exec_processes: NonZeroUsize::new(pool::DEFAULT_PROCESSES).unwrap_or(NonZeroUsize::MIN),
            metrics: None,
            events: events.enabled.into(),
            events_stream: events.stream,
            events_max_age: events.max_age,
            events_max_bytes: events.max_bytes,
            events_max_result_bytes: events.max_result_bytes,
            pool: Vec::new(),
            schedule: Vec::new(),
        }
    }
}

impl fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the SMTP URL may hold a password.
        f.debug_struct("WorkerConfig")
            .field("broker", &self.broker)
            .field("queue", &self.queue)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl WorkerConfig {
    /// The handler process pools: the file's `[[pool]]` tables, then the `--exec` one.
    ///
    /// # Errors
    /// [`PoolError`] for an `--exec` command line that does not parse.
    pub fn pools(&self) -> Result<Vec<PoolConfig>, PoolError> {
        let mut pools = self.pool.clone();
        if let Some(command) = &self.exec {
            pools.push(PoolConfig::exec(
                command,
                self.exec_functions.clone(),
                self.exec_processes.get(),
            )?);
        }
        Ok(pools)
    }

    /// The built-in functions to serve: `builtins` as set (`all` for every one), else all of
    /// them when there are no handler pools and none when there are.
    pub fn builtin_names(&self) -> Vec<String> {
        let all = || crate::builtin::BUILTINS.map(str::to_owned).to_vec();
        match &self.builtins {
            Some(names) if names.iter().any(|n| n == "all") => all(),
            Some(names) => names.iter().filter(|n| !n.is_empty()).cloned().collect(),
            None if self.exec.is_none() && self.pool.is_empty() => all(),
            None => Vec::new(),
        }
    }

    /// The runtime's settings.
    ///
    /// # Errors
    /// [`WorkerError::Broker`] when the broker URL file cannot be read;
    /// [`WorkerError::Schedule`] for a `[[schedule]]` table that cannot work.
    pub fn settings(&self) -> Result<WorkerSettings, WorkerError> {
        let Self {
            broker,
            queue,
            functions_exchange,
            reply_queues,
            concurrency,
            max_attempts,
            backoff,
            time_limit,
            shutdown_grace,
            watchdog_interval,
            max_body_bytes,
            max_result_bytes,
            outbox: _,
            smtp_url: _,
            exec: _,
            exec_functions: _,
            builtins: _,
            exec_processes: _,
            metrics: _,
            events,
            events_stream,
            events_max_age,
            events_max_bytes,
            events_max_result_bytes,
            pool: _,
            schedule,
        } = self.clone();
        Ok(WorkerSettings {
            broker: broker.to_settings()?,
            queue,
            concurrency: concurrency.get(),
            policy: Policy {
                max_attempts: max_attempts.get(),
                backoff: backoff.0,
                time_limit,
            },
            max_body_bytes,
            max_result_bytes,
            shutdown_grace,
            watchdog_interval,
            functions_exchange,
            // `a.*, b` means `b`, not ` b`, which no reply queue would match.
            reply_queues: reply_queues
                .iter()
                .map(|p| p.trim())
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            events: EventSettings {
                enabled: events == Switch::On,
                stream: events_stream,
                max_age: events_max_age,
                max_bytes: events_max_bytes,
                max_result_bytes: events_max_result_bytes,
            },
            schedules: crate::cron::check_all(&schedule)?,
            ..WorkerSettings::default()
        })
    }

    /// The mailer of the built-in `send_mail`: the SMTP relay if one is set, else the outbox.
    ///
    /// # Errors
    /// The SMTP URL does not parse.
    pub fn mailer(&self) -> Result<Mailer, String> {
        match &self.smtp_url {
            Some(url) => Mailer::smtp(url),
            None => Ok(Mailer::outbox(&self.outbox)),
        }
    }
}

#[cfg(test)]
mod tests {
    // A failed unwrap is how a test says what went wrong.
    #![allow(clippy::unwrap_used)]

    use clap::Command;
    use warren_shared::config::load_from;

    use super::*;

    fn load(file: &str, flags: &[&str]) -> WorkerConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, file).unwrap();
        let mut args = vec![
            "warren-worker".to_owned(),
            "--config".to_owned(),
            path.display().to_string(),
        ];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        load_from(Command::new("warren-worker"), args).unwrap()
    }

    #[test]
    fn defaults_are_the_runtimes() {
        let settings = WorkerConfig::default().settings().unwrap();
        let library = WorkerSettings::default();
        assert_eq!(settings.policy, library.policy);
        assert_eq!(settings.policy, Policy::default());
        assert_eq!(settings.concurrency, library.concurrency);
        assert_eq!(settings.queue, library.queue);
        assert_eq!(settings.functions_exchange, library.functions_exchange);
        assert_eq!(settings.shutdown_grace, library.shutdown_grace);
        assert_eq!(settings.watchdog_interval, library.watchdog_interval);
        assert_eq!(settings.max_body_bytes, library.max_body_bytes);
        assert_eq!(settings.reply_queues, library.reply_queues);
        assert_eq!(settings.events, library.events);
        assert_eq!(
            format!("{:?}", settings.broker),
            format!("{:?}", library.broker)
        );
    }

    #[test]
    fn a_file_sets_the_policy_and_a_flag_wins_over_it() {
        let config = load(
            "max_attempts = 5\nbackoff = [\"2s\", \"1m\"]\ntime_limit = \"90s\"\n",
            &["--max-attempts", "6"],
        );
        let policy = config.settings().unwrap().policy;
        assert_eq!(policy.max_attempts, 6);
        assert_eq!(
            policy.backoff,
            [Duration::from_secs(2), Duration::from_secs(60)]
        );
        assert_eq!(policy.time_limit, Duration::from_secs(90));
    }

    #[test]
    fn pool_tables_and_exec_become_the_pools() {
        let config = load(
            "[[pool]]\nfunctions = [\"resize\"]\ncommand = [\"php\", \"tasks.php\"]\nprocesses = 2\n\n[[pool]]\nfunctions = [\"mail\"]\nconnect = \"text://127.0.0.1:12345\"\n",
            &["--exec", "python3 tasks.py", "--exec-functions", "a,b"],
        );
        let pools = config.pools().unwrap();
        assert_eq!(pools.len(), 3);
        assert_eq!(pools[0].command, ["php", "tasks.php"]);
        assert_eq!(pools[0].processes, 2);
        assert_eq!(pools[1].connect.as_deref(), Some("text://127.0.0.1:12345"));
        assert_eq!(pools[2].functions, ["a", "b"]);
        assert_eq!(pools[2].processes, pool::DEFAULT_PROCESSES);
        assert!(config.settings().is_ok());
    }

    #[test]
    fn pools_replace_the_builtins_unless_asked_for() {
        let all = crate::builtin::BUILTINS.map(str::to_owned).to_vec();
        assert_eq!(load("", &[]).builtin_names(), all);
        let pooled = ["--exec", "php tasks.php", "--exec-functions", "a"];
        assert!(load("", &pooled).builtin_names().is_empty());
        let mut flags = pooled.to_vec();
        flags.extend(["--builtins", "echo,send_mail"]);
        assert_eq!(load("", &flags).builtin_names(), ["echo", "send_mail"]);
        assert_eq!(load("builtins = [\"all\"]\n", &pooled).builtin_names(), all);
    }

    #[test]
    fn reply_queues_come_from_the_file_or_a_flag_and_empty_means_direct_only() {
        let default = load("", &[]).settings().unwrap().reply_queues;
        assert_eq!(default, ["warren.reply.*"]);
        let file = load("reply_queues = [\"app.replies.*\"]\n", &[]);
        assert_eq!(file.settings().unwrap().reply_queues, ["app.replies.*"]);
        let flag = load("", &["--reply-queues", "a.*,b"]);
        assert_eq!(flag.settings().unwrap().reply_queues, ["a.*", "b"]);
        let spaced = load("", &["--reply-queues", "a.*, b ,"]);
        assert_eq!(spaced.settings().unwrap().reply_queues, ["a.*", "b"]);
        let file = load("reply_queues = [\" app.replies.* \"]\n", &[]);
        assert_eq!(file.settings().unwrap().reply_queues, ["app.replies.*"]);
        let none = load("", &["--reply-queues", ""]);
        assert!(none.settings().unwrap().reply_queues.is_empty());
    }

    #[test]
    fn events_can_be_turned_off_and_pointed_at_another_stream() {
        let on = load("", &[]).settings().unwrap().events;
        assert!(on.enabled);
        assert_eq!(on.stream, warren_shared::events::DEFAULT_STREAM);
        let file = load(
            "events = \"off\"\nevents_max_age = \"2h\"\n",
            &[
                "--events-stream",
                "app.events",
                "--events-max-bytes",
                "1000",
            ],
        );
        let events = file.settings().unwrap().events;
        assert!(!events.enabled);
        assert_eq!(events.stream, "app.events");
        assert_eq!(events.max_age, Duration::from_secs(7200));
        assert_eq!(events.max_bytes, 1000);
        let flag = load("events = \"off\"\n", &["--events", "on"]);
        assert!(flag.settings().unwrap().events.enabled);
    }

    #[test]
    fn schedule_tables_become_checked_schedules() {
        let config = load(
            "[[schedule]]\nname = \"nightly\"\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Paris\"\nfunction = \"echo\"\nargs = { to = \"ops\" }\nmisfire = \"once\"\n\n[[schedule]]\nname = \"beat\"\ncron = \"*/10 * * * * *\"\nfunction = \"echo\"\nqueue = \"beats\"\n",
            &[],
        );
        let schedules = config.settings().unwrap().schedules;
        assert_eq!(schedules.len(), 2);
        assert_eq!(schedules[0].zone, chrono_tz::Europe::Paris);
        assert_eq!(schedules[0].args, serde_json::json!({"to": "ops"}));
        assert_eq!(schedules[0].misfire, crate::cron::Misfire::Once);
        assert_eq!(schedules[1].zone, chrono_tz::UTC);
        assert_eq!(schedules[1].args, serde_json::json!({}));
        assert_eq!(schedules[1].queue.as_deref(), Some("beats"));
        let bad = load(
            "[[schedule]]\nname = \"x\"\ncron = \"0 3 * *\"\nfunction = \"echo\"\n",
            &[],
        );
        let error = bad.settings().unwrap_err().to_string();
        assert!(
            error.contains("schedule \"x\"") && error.contains("fields"),
            "{error}"
        );
    }

    #[test]
    fn a_misspelt_key_of_a_schedule_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(
            &path,
            "[[schedule]]\nname = \"x\"\ncron = \"0 3 * * *\"\nfunction = \"echo\"\nmisfyre = \"once\"\n",
        )
        .unwrap();
        let error = load_from::<WorkerConfig, _, _>(
            Command::new("warren-worker"),
            ["warren-worker", "--config", path.to_str().unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("misfyre"), "{error}");
    }

    #[test]
    fn a_zero_concurrency_in_the_file_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, "concurrency = 0\n").unwrap();
        let error = load_from::<WorkerConfig, _, _>(
            Command::new("warren-worker"),
            ["warren-worker", "--config", path.to_str().unwrap()],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("`concurrency`"), "{error}");
    }
}
