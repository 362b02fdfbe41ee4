//! The client's errors: every way a call or an enqueue can end other than with a result.

use std::time::Duration;

use warren_shared::{PublishError, TaskFailure, broker::BrokerError};

/// Why `call` or `enqueue` did not return a result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A worker ran (or refused) the task and answered with this failure.
    #[error("task failed: {0}")]
    Failed(TaskFailure),
    /// No answer came within the call's timeout. The task may still run later (a worker that
    /// starts it after its deadline answers `expired` instead).
    #[error("no reply within {0:?} (is a worker consuming the queue?)")]
    Timeout(Duration),
    /// The broker did not take the task (not confirmed, unroutable, refused, or no channel).
    #[error("the broker did not accept the task: {0}")]
    Publish(#[from] PublishError),
    /// Connecting, or declaring the queue, failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The task cannot wait until its run-at time: too far ahead, or a destination whose name
    /// cannot be routed through the delay levels.
    #[error("cannot delay the task: {0}")]
    InvalidDelay(String),
    /// The queue name cannot be used.
    #[error("invalid queue name: {0}")]
    InvalidQueue(String),
    /// A queue that is only read (the dead-letter commands) does not exist: nothing was sent to
    /// its work queue yet and no worker consumed it, or the name is wrong. Never created by
    /// reading.
    #[error(
        "no queue {0}: no task was sent to its work queue and no worker consumed it yet, or the \
         queue name is wrong"
    )]
    NoSuchQueue(String),
    /// The arguments do not serialize to JSON.
    #[error("cannot encode the arguments: {0}")]
    Encode(serde_json::Error),
    /// The reply is not a Warren reply, or its result does not match the task's output type.
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// The broker could not be reached (or blocked publishers) for longer than the client waits.
    #[error("{0}")]
    Unavailable(String),
    /// [`Client::close`](crate::Client::close) was called: this client sends nothing more.
    #[error("the client is closed")]
    Closed,
    /// Looking a task's result up in the event stream failed: a bad task id, no stream, or a
    /// stream that could not be read in time.
    #[error(transparent)]
    Lookup(#[from] warren_shared::lookup::LookupError),
    /// The connection carrying the call's reply was lost; the reply cannot arrive.
    #[error("connection to the broker lost while waiting for the reply")]
    ConnectionLost,
}

impl Error {
    /// The worker's failure, when the task itself failed.
    pub fn failure(&self) -> Option<&TaskFailure> {
        match self {
            Self::Failed(f) => Some(f),
            _ => None,
        }
    }
}
