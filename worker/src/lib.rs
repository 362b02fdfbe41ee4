//! # warren-worker
//!
//! The worker runtime: it consumes a Warren work queue, runs each task's handler and settles the
//! delivery (reply, dead letter, ack) in that order.
//!
//! - [`handler`]: the [`Handler`] trait a task type implements, [`TaskContext`], [`TaskError`].
//! - [`registry`]: explicit registration of handlers and of the state they share.
//! - `execute`: judging one delivery (decode, check, run isolated, time-limit) into an [`Outcome`].
//! - [`outcome`]: acting on the verdict; the only code that acks.
//! - [`consumer`]: connections, the consumer loop with prefetch = concurrency, shutdown.
//! - [`metrics`] and [`ops`]: the Prometheus series, and the `/metrics`, `/healthz`, `/readyz`
//!   listener.
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
pub mod consumer;
mod execute;
pub mod handler;
pub mod mail;
pub mod metrics;
pub mod ops;
pub mod outcome;
pub mod registry;

pub use builtin::builtin_registry;
pub use consumer::{
    Health, HealthProbe, RunningWorker, WorkerError, WorkerSettings, WorkerState, run, start,
};
pub use handler::{Handler, Retry, TaskContext, TaskError};
pub use mail::Mailer;
pub use outcome::{DeadReason, Outcome};
pub use registry::Registry;
