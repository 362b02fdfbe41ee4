//! # warren-worker
//!
//! The worker runtime: it consumes a Warren work queue, runs each task's handler and settles the
//! delivery (reply, dead letter, ack) in that order.
//!
//! - [`handler`]: the [`Handler`] trait a task type implements, [`TaskContext`], [`TaskError`].
//! - [`registry`]: explicit registration of handlers and of the state they share.
//! - `execute`: judging one delivery (decode, check, run isolated, time-limit) into an [`Outcome`].
//! - [`outcome`]: acting on the verdict; the only code that acks.
//! - [`settings`]: [`WorkerSettings`] and [`WorkerError`].
//! - [`supervisor`]: [`start`] and [`run`]: the worker's two links (consume, publish) and the
//!   one recovery path that rebuilds its consumer on each new connection.
//! - `consumer`: the consumer loop with prefetch = concurrency, held while outcomes cannot be
//!   published; `watchdog`: the starving check; `drain`: shutdown.
//! - [`health`]: [`Health`] and [`WorkerState`].
//! - [`config`]: the `warren-worker` binary's flags, `--config` file and defaults.
//! - [`builtin`] and [`mail`]: the `echo`, `sleep`, `fail` and `send_mail` tasks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_worker::WorkerError> {
//! use tokio_util::sync::CancellationToken;
//! use warren_worker::{Mailer, WorkerSettings, builtin_registry};
//!
//! let shutdown = CancellationToken::new();
//! let registry = builtin_registry(Mailer::outbox("outbox"));
//! warren_worker::run(WorkerSettings::default(), registry, shutdown).await
//! # }
//! ```

pub mod builtin;
pub mod config;
mod consumer;
mod drain;
mod execute;
pub mod handler;
pub mod health;
pub mod mail;
pub mod outcome;
pub mod registry;
pub mod settings;
pub mod supervisor;
mod watchdog;

pub use builtin::builtin_registry;
pub use config::WorkerConfig;
pub use handler::{Handler, Retry, TaskContext, TaskError};
pub use health::{Health, WorkerState};
pub use mail::Mailer;
pub use outcome::{DeadReason, Outcome};
pub use registry::Registry;
pub use settings::{WorkerError, WorkerSettings};
pub use supervisor::{RunningWorker, run, start};
