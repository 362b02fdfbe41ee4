//! The runner protocol, version 1 (docs/runners.md): newline-delimited JSON frames between the
//! worker and a pool's child process, over the child's stdin (worker to child) and stdout (child
//! to worker). stderr is the child's log and carries no frames.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use warren_shared::ErrorKind;

use crate::handler::{Retry, TaskError};

/// The runner protocol version this worker speaks, also given to the child in the environment
/// variable [`PROTOCOL_ENV`].
pub const RUNNER_PROTOCOL: u32 = 1;

/// The environment variable that tells a child which runner protocol version to speak.
pub const PROTOCOL_ENV: &str = "WARREN_RUNNER_PROTOCOL";

/// Longest frame line accepted from a child; a longer one is a protocol violation.
pub(crate) const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Worker to child: run this task.
#[derive(Debug, Serialize)]
pub(crate) struct TaskFrame<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) id: &'a str,
    pub(crate) function: &'a str,
    pub(crate) args: &'a Value,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) redelivered: bool,
    /// The caller's deadline in milliseconds since the Unix epoch, if any.
    pub(crate) deadline: Option<u64>,
}

/// The error a child reports for a task.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ErrorBody {
    /// A wire error kind (`handler_failed` when absent).
    #[serde(default)]
    pub(crate) kind: Option<String>,
    #[serde(default)]
    pub(crate) message: String,
    /// Whether another attempt may succeed (`true` when absent).
    #[serde(default = "yes")]
    pub(crate) retryable: bool,
}

fn yes() -> bool {
    true
}

impl ErrorBody {
    /// The error as the worker's retry path sees it. Kinds this worker does not know become
    /// `handler_failed`, with the child's kind kept in the message.
    pub(crate) fn into_task_error(self) -> TaskError {
        let retry = if self.retryable {
            Retry::Retryable
        } else {
            Retry::Permanent
        };
        let Some(kind) = self.kind.filter(|k| !k.is_empty()) else {
            return TaskError::with_kind(ErrorKind::HandlerFailed, retry, self.message);
        };
        match serde_json::from_value::<ErrorKind>(Value::String(kind.clone())) {
            Ok(ErrorKind::Other) | Err(_) => TaskError::with_kind(
                ErrorKind::HandlerFailed,
                retry,
                format!("{kind}: {}", self.message),
            ),
            Ok(known) => TaskError::with_kind(known, retry, self.message),
        }
    }
}

/// Child to worker.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(crate) enum Frame {
    /// The child has started and serves these functions.
    Ready {
        #[serde(default)]
        protocol: Option<u32>,
        #[serde(default)]
        functions: Vec<String>,
    },
    /// The task `id` succeeded.
    Result {
        id: String,
        #[serde(default)]
        result: Value,
    },
    /// The task `id` failed.
    Error { id: String, error: ErrorBody },
    /// The task `id` made progress (reserved: logged, not yet forwarded to callers).
    Progress {
        id: String,
        #[serde(flatten)]
        rest: serde_json::Map<String, Value>,
    },
    /// A frame type of a later protocol version: ignored.
    #[serde(other)]
    Unknown,
}

impl Frame {
    /// The frame as a log line or an error message names it: `a result for task "…"`.
    pub(crate) fn describe(&self) -> String {
        let task = |id: &str| {
            format!(
                "{:?}",
                warren_shared::envelope::bounded(id, MAX_DESCRIBED_ID)
            )
        };
        match self {
            Self::Ready { .. } => "a ready line".to_owned(),
            Self::Result { id, .. } => format!("a result for task {}", task(id)),
            Self::Error { id, .. } => format!("an error for task {}", task(id)),
            Self::Progress { id, .. } => format!("progress for task {}", task(id)),
            Self::Unknown => "a frame of a later protocol version".to_owned(),
        }
    }
}

/// Longest task id quoted by [`Frame::describe`].
const MAX_DESCRIBED_ID: usize = 100;

/// Why a line from a child's stdout is not a frame.
#[derive(Debug, thiserror::Error)]
#[error("not a runner frame ({reason}): {excerpt:?}")]
pub(crate) struct NotAFrame {
    reason: String,
    excerpt: String,
}

/// Parses one stdout line. A line must be a JSON object with a string `type`; the fields of a
/// known type must be right; an unknown type is [`Frame::Unknown`].
pub(crate) fn parse(line: &str) -> Result<Frame, NotAFrame> {
    serde_json::from_str(line).map_err(|e| NotAFrame {
        reason: e.to_string(),
        excerpt: line.chars().take(200).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_and_garbage_does_not() {
        assert!(matches!(
            parse(r#"{"type":"ready","protocol":1,"functions":["a"]}"#),
            Ok(Frame::Ready { functions, .. }) if functions == ["a"]
        ));
        assert!(matches!(
            parse(r#"{"type":"result","id":"x","result":{"n":1}}"#),
            Ok(Frame::Result { id, .. }) if id == "x"
        ));
        assert!(matches!(
            parse(r#"{"type":"progress","id":"x","percent":50}"#),
            Ok(Frame::Progress { .. })
        ));
        assert!(matches!(
            parse(r#"{"type":"heartbeat"}"#),
            Ok(Frame::Unknown)
        ));
        for garbage in ["hello", "{}", "[1]", r#"{"type":"result"}"#, "Warning: x"] {
            assert!(parse(garbage).is_err(), "{garbage}");
        }
    }

    #[test]
    fn frames_are_described_without_their_contents() {
        let described = |line: &str| parse(line).unwrap().describe();
        assert_eq!(
            described(r#"{"type":"result","id":"x","result":"secret"}"#),
            r#"a result for task "x""#
        );
        assert_eq!(
            described(r#"{"type":"error","id":"y","error":{}}"#),
            r#"an error for task "y""#
        );
        assert_eq!(described(r#"{"type":"ready"}"#), "a ready line");
        let long = format!(r#"{{"type":"progress","id":"{}"}}"#, "i".repeat(5000));
        assert!(described(&long).len() < 200);
    }

    #[test]
    fn error_kinds_map_to_typed_errors() {
        let error = |json: &str| -> TaskError {
            serde_json::from_str::<ErrorBody>(json)
                .unwrap()
                .into_task_error()
        };
        let e = error(r#"{"message":"boom"}"#);
        assert_eq!(e.retry(), Retry::Retryable);
        assert_eq!(e.to_failure().kind, ErrorKind::HandlerFailed);
        let e = error(r#"{"kind":"invalid_args","message":"no","retryable":false}"#);
        assert_eq!(e.retry(), Retry::Permanent);
        assert_eq!(e.to_failure().kind, ErrorKind::InvalidArgs);
        let e = error(r#"{"kind":"RuntimeException","message":"x"}"#);
        assert_eq!(e.to_failure().kind, ErrorKind::HandlerFailed);
        assert_eq!(e.to_failure().message, "RuntimeException: x");
    }
}
