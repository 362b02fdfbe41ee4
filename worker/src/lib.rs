//! # warren-worker
//!
//! The worker runtime: it consumes a Warren work queue, runs each task's handler and settles the
//! delivery (reply, dead letter, ack) in that order.
//!
//! - [`handler`]: [`Handler<T>`] (a struct owning its state runs tasks of type `T`), functions as
//!   handlers, [`Run`] (a task type that runs itself), [`TaskContext`], [`TaskError`].
//! - [`registry`]: explicit, typed registration of handlers.
//! - `execute`: judging one delivery (decode, check, run isolated, time-limit) into an [`Outcome`].
//! - [`outcome`]: acting on the verdict; the only code that acks.
//! - [`settings`]: [`WorkerSettings`] and [`WorkerError`].
//! - [`supervisor`]: [`start`] and [`run`]: the worker's two links (consume, publish) and the
//!   one recovery path that rebuilds its consumer on each new connection.
//! - `consumer`: the consumer loop with prefetch = concurrency, held while outcomes cannot be
//!   published; `watchdog`: the starving check; `drain`: shutdown.
//! - [`events`]: appending each task's events to the event stream ([`EventSettings`]), before
//!   its ack.
//! - [`health`]: [`Health`], [`HealthProbe`] and [`WorkerState`].
//! - [`metrics`] and [`ops`]: the Prometheus series, and the `/metrics`, `/healthz`, `/readyz`
//!   listener (`--metrics ADDR`).
//! - [`cron`]: `[[schedule]]` tables fired by the one worker elected for role `cron`, each
//!   tick a task with the id `<name>@<tick>`, recorded in `warren.cron.log`.
//! - [`config`]: the `warren-worker` binary's flags, `--config` file and defaults.
//! - `builtin` and `mail`: the `echo`, `sleep`, `fail` and `send_mail` tasks (feature
//!   `builtins`, on by default; without it the mailer, lettre, is not compiled).
//! - [`pool`]: handler pools, task code in any language run by supervised processes.
//! - [`progress`]: a running task's progress ([`TaskContext::progress`]), coalesced and sent
//!   to the caller.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_worker::WorkerError> {
//! use tokio_util::sync::CancellationToken;
//! use warren_shared::tasks::Echo;
//! use warren_worker::{Registry, TaskContext, WorkerSettings};
//!
//! let shutdown = CancellationToken::new();
//! // or warren_worker::builtin_registry(Mailer::outbox("outbox")), with the `builtins` feature
//! let registry = Registry::new().register_fn(|args: Echo, _ctx: TaskContext| async move { Ok(args.0) });
//! warren_worker::run(WorkerSettings::default(), registry, shutdown).await
//! # }
//! ```

#[cfg(feature = "builtins")]
pub mod builtin;
// The `warren-worker` binary's settings, built-ins and mailer included.
#[cfg(feature = "builtins")]
pub mod config;
mod consumer;
pub mod cron;
mod drain;
pub mod events;
mod execute;
pub mod handler;
pub mod health;
#[cfg(feature = "builtins")]
pub mod mail;
pub mod metrics;
pub mod ops;
pub mod outcome;
pub mod pool;
pub mod progress;
pub mod registry;
pub mod settings;
pub mod supervisor;
mod watchdog;

#[cfg(feature = "builtins")]
pub use builtin::builtin_registry;
#[cfg(feature = "builtins")]
pub use config::WorkerConfig;
pub use events::EventSettings;
pub use handler::{Handler, HandlerFn, ResultExt, Retry, Run, TaskContext, TaskError, handler_fn};
pub use health::{Health, HealthProbe, WorkerState};
#[cfg(feature = "builtins")]
pub use mail::Mailer;
pub use outcome::{DeadReason, Outcome};
pub use pool::{Pool, PoolConfig, PoolError};
pub use registry::Registry;
pub use settings::{DEFAULT_MAX_RESULT_BYTES, WorkerError, WorkerSettings};
pub use supervisor::{RunningWorker, run, start};
pub use warren_shared::events::Progress;
