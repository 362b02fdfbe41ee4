//! # warren-producer
//!
//! The caller's side of Warren.
//!
//! - [`client`]: [`Client`], to `call` a task and await its result or `enqueue` it
//!   fire-and-forget, with typed tasks ([`warren_shared::Task`]) or plain JSON.
//! - [`error`]: [`Error`], every way a call can end without a result.
//! - [`cli`]: the `warren` command line (`call`, `enqueue`, `demo`).
//! - [`dlq`]: list, show, replay and purge tasks parked in a dead-letter queue.
//! - [`demo`]: the motivating scenario, mail to 1000 users without blocking.
//! - [`gateway`]: the websocket gateway, its web page and the Workerman Text protocol bridge
//!   (the `warren-gateway` binary).
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_producer::Error> {
//! use warren_producer::{Client, ClientSettings};
//!
//! let client = Client::connect(ClientSettings::default()).await?;
//! let echoed = client.call_json("echo", serde_json::json!({"x": 1})).await?;
//! assert_eq!(echoed, serde_json::json!({"x": 1}));
//! # Ok(()) }
//! ```

pub mod cli;
pub mod client;
pub mod demo;
pub mod dlq;
pub mod error;
pub mod gateway;

pub use client::{CallOptions, Client, ClientSettings, QueueStats, ReplyMode};
pub use dlq::{DeadLetter, Replay};
pub use error::Error;
