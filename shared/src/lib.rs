//! # warren-shared
//!
//! What producers and workers must agree on, in one place:
//!
//! - [`protocol`]: the wire format (request and reply bodies, headers, error kinds), version 1.
//!   `docs/protocol.md` is the same contract written for people using other languages.
//! - [`delay`]: run at a time: the fixed ladder of 28 binary delay levels and its routing keys.
//! - [`events`]: task events: their format on the `warren.events` stream, how the stream is
//!   declared and read.
//! - [`lookup`]: reading the event stream to its end (duplicates dropped) and finding a task's
//!   outcome there, from the time in its id.
//! - [`envelope`]: the only code that writes or reads the AMQP properties and `x-warren-*`
//!   headers of tasks, replies, retry and dead-letter copies; it bounds what it writes.
//! - [`task`]: the [`Task`] trait that names a task type and its result, and the built-in task
//!   argument types ([`tasks`]).
//! - [`topology`]: exchange and queue names, and the one idempotent declaration both sides run.
//! - [`broker`]: broker settings (one address or several) and named connections with
//!   heartbeats, TLS for `amqps://`, and errors that say what to fix.
//! - `cli` (feature `cli`): the broker flags the binaries share (URL file, TLS certificates).
//! - [`link`]: the one owner of recovery: a connection that is replaced when lost (to the next
//!   broker address, with jittered backoff), its generations and its live state (up, down,
//!   blocked, closed), for publishers that must wait for it and for whoever rebuilds channels and
//!   consumers on each new connection.
//! - [`election`]: one election mechanism for the elected roles (cron firing): a baton held
//!   unacked on a single-active-consumer quorum queue `warren.leader.<role>`; a
//!   [`election::Leadership`] that is cancelled the moment it is lost.
//! - [`pool`]: a `deadpool` pool of confirm-mode channels over one publishing connection (and
//!   [`pool::LinkPool`], one such pool per generation of a link), and the
//!   only publish path ([`pool::publish_confirmed`]) that treats a nack or a return as an error.
//! - [`policy`]: attempts, backoff and time limit of a task, and their per-task headers.
//! - `config` (feature `config`): the binaries' layered settings (defaults < TOML file <
//!   environment < flags).
//! - [`shutdown`]: SIGTERM/SIGINT handling of the binaries (graceful first, forced second).
//! - [`telemetry`]: tracing set-up shared by the binaries.
//! - [`trace`]: W3C trace context (`traceparent`) carried in task headers, and the task spans.
//! - [`otel`]: OTLP export of those spans when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (feature
//!   `otlp`).
//! - [`metrics`]: the Prometheus series every process records (publish confirms, reconnects).
//!
//! This crate is `warren-shared`, the project's own library; it is not the team notes folder.

pub mod broker;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "config")]
pub mod config;
pub mod delay;
pub mod election;
pub mod envelope;
pub mod events;
pub mod link;
pub mod lookup;
pub mod metrics;
pub mod otel;
pub mod policy;
pub mod pool;
pub mod protocol;
pub mod shutdown;
pub mod task;
pub mod tasks;
pub mod telemetry;
pub mod topology;
pub mod trace;

pub use broker::{BrokerError, BrokerSettings};
pub use policy::Policy;
pub use pool::{ChannelPool, PublishError};
pub use protocol::{ErrorKind, Json, RawJson, Reply, Request, TaskFailure, TaskId};
pub use task::Task;

/// The lapin version Warren is built on, re-exported so users need not pin it themselves.
pub use lapin;
