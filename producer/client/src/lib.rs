//! # warren-client
//!
//! The caller's side of Warren, as a library with no server or command-line dependencies.
//!
//! - [`client`]: [`Client`], to `call` a task and await its result or `enqueue` it
//!   fire-and-forget, with typed tasks ([`warren_shared::Task`]) or plain JSON; its publishing
//!   link reconnects (to the next broker address) and its channels and reply consumers are
//!   rebuilt on each new connection.
//! - [`options`]: [`ClientSettings`], [`ReplyMode`], [`CallOptions`].
//! - `pending` (calls waiting for replies), `replies` (the reply consumers), `publish` (the
//!   publish path and what counts as a publish lost with its connection).
//! - [`progress`]: [`ProgressCall`], a call that follows the progress its task reports.
//! - [`error`]: [`Error`], every way a call can end without a result.
//! - [`dlq`]: list, show, replay and purge tasks parked in a dead-letter queue.
//! - [`functions`]: which queue owns a function, and releasing a claim.
//! - [`results`]: what became of a task, by its id, after its caller has gone
//!   ([`Client::result`], [`Client::wait_result`]), from the task event stream.
//!
//! The `warren` command line lives in `warren-cli`, the websocket gateway in `warren-gateway`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), warren_client::Error> {
//! use warren_client::{Client, ClientSettings};
//!
//! let client = Client::connect(ClientSettings::default()).await?;
//! let echoed = client.call_json("echo", serde_json::json!({"x": 1})).await?;
//! assert_eq!(echoed, serde_json::json!({"x": 1}));
//! # Ok(()) }
//! ```

pub mod client;
pub mod dlq;
pub mod error;
pub mod functions;
pub mod options;
mod pending;
pub mod progress;
mod publish;
mod replies;
pub mod results;

pub use client::Client;
pub use dlq::{DeadLetter, Replay};
pub use error::Error;
pub use functions::{ReleaseError, Released};
pub use options::{CallOptions, ClientSettings, QueueStats, ReplyMode};
pub use progress::ProgressCall;
pub use warren_shared::events::{CallerProgress, Progress};
pub use warren_shared::lookup::{LookupError, Outcome, TaskOutcome};
