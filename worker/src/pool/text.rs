//! A pool that forwards its functions to an existing Text-protocol task server (Workerman's
//! `Worker('Text://0.0.0.0:12345')`): one JSON line `{"function": ..., "args": ...}` in, one
//! line out, which is the task's result (JSON, or the raw text when it is not JSON).
//!
//! At most `processes` connections are open at once, each carrying one task at a time; an idle
//! connection is reused. A refused connection and a connection cut mid-task are retryable
//! failures; no answer within the time limit is a `timeout` (the connection is dropped so that a
//! late answer cannot be taken for the next task's).

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use warren_shared::ErrorKind;
use warren_shared::RawJson;

use super::protocol::MAX_FRAME_BYTES;
use super::supervisor::crashed;
use crate::handler::{Retry, TaskError};

/// How long connecting to the task server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The forwarder of one pool.
#[derive(Debug)]
pub(crate) struct TextForwarder {
    /// `host:port`.
    address: String,
    permits: Semaphore,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
    time_limit: Option<Duration>,
}

impl TextForwarder {
    /// A forwarder to `address` (`host:port`) over at most `connections` connections.
    pub(crate) fn new(address: String, connections: usize, time_limit: Option<Duration>) -> Self {
        Self {
            address,
            permits: Semaphore::new(connections),
            idle: Mutex::default(),
            time_limit,
        }
    }

    /// Drops the idle connections (a reload: the next tasks connect afresh).
    pub(crate) fn reload(&self) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Closes the forwarder: tasks not yet sent fail as retryable.
    pub(crate) fn shutdown(&self) {
        self.permits.close();
        self.reload();
    }

    /// An idle connection that the server has not closed, if there is one.
    fn reuse(&self) -> Option<BufReader<TcpStream>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(connection) = idle.pop() {
            let mut byte = [0u8; 1];
            // Alive and quiet is WouldBlock; end of stream (the server restarted) or stray
            // bytes make it unusable.
            if connection.buffer().is_empty()
                && matches!(connection.get_ref().try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            {
                return Some(connection);
            }
        }
        None
    }

    /// Forwards one task and returns the server's answer.
    ///
    /// # Errors
    /// Retryable when the server cannot be reached or cuts the connection, `timeout` past the
    /// time limit.
    pub(crate) async fn call(&self, function: &str, args: RawJson) -> Result<RawJson, TaskError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| crashed("the pool stopped before running the task"))?;
        let mut connection = match self.reuse() {
            Some(connection) => connection,
            None => {
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.address))
                        .await
                        .map_err(|_| {
                            TaskError::retryable(format!(
                                "connecting to the task server text://{} timed out after {CONNECT_TIMEOUT:?}",
                                self.address
                            ))
                        })?
                        .map_err(|e| {
                            TaskError::retryable(format!(
                                "cannot connect to the task server text://{}: {e}",
                                self.address
                            ))
                        })?;
                let _ = stream.set_nodelay(true);
                BufReader::new(stream)
            }
        };
        let line = super::protocol::into_line(
            warren_shared::Request {
                function: function.to_owned(),
                args,
            }
            .encode(),
        );
        let exchange = async {
            connection.get_mut().write_all(&line).await?;
            let mut answer = String::new();
            let limit = u64::try_from(MAX_FRAME_BYTES).unwrap_or(u64::MAX);
            let read = (&mut connection).take(limit).read_line(&mut answer).await?;
            Ok::<_, std::io::Error>((read, answer))
        };
        let outcome = match self.time_limit {
            Some(limit) => tokio::time::timeout(limit, exchange).await.map_err(|_| {
                TaskError::with_kind(
                    ErrorKind::Timeout,
                    Retry::Retryable,
                    format!(
                        "the task server text://{} did not answer within {limit:?}",
                        self.address
                    ),
                )
            })?,
            None => exchange.await,
        };
        let answer = match outcome {
            Ok((0, _)) => {
                return Err(crashed(format!(
                    "the task server text://{} closed the connection before answering",
                    self.address
                )));
            }
            Ok((_, answer)) if !answer.ends_with('\n') => {
                return Err(crashed(format!(
                    "the task server text://{} cut the connection mid-answer",
                    self.address
                )));
            }
            Ok((_, mut answer)) => {
                answer.truncate(answer.trim_end_matches(['\r', '\n']).len());
                answer
            }
            Err(e) => {
                return Err(crashed(format!(
                    "the connection to the task server text://{} failed mid-task: {e}",
                    self.address
                )));
            }
        };
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(connection);
        // Kept as text, as a child's result is; an answer that is not JSON is a string.
        if serde_json::from_str::<serde::de::IgnoredAny>(&answer).is_ok() {
            RawJson::from_string(answer)
        } else {
            RawJson::to_json(&answer)
        }
        .map_err(|e| TaskError::permanent(format!("cannot keep the answer: {e}")))
    }
}
