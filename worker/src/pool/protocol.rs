//! The runner protocol, version 1 (docs/runners.md): newline-delimited JSON frames between the
//! worker and a pool's child process, over the child's stdin (worker to child) and stdout (child
//! to worker). stderr is the child's log and carries no frames.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio_util::bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, LinesCodecError};
use warren_shared::events::Progress;
use warren_shared::{ErrorKind, RawJson};

use crate::handler::{Retry, TaskError};

/// The runner protocol version this worker speaks, also given to the child in the environment
/// variable [`PROTOCOL_ENV`].
pub const RUNNER_PROTOCOL: u32 = 1;

/// The environment variable that tells a child which runner protocol version to speak.
pub const PROTOCOL_ENV: &str = "WARREN_RUNNER_PROTOCOL";

/// Longest frame line accepted from a child; a longer one is a protocol violation.
pub(crate) const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Splits a child's stdout into lines of at most `max` bytes (`\n` ends a line, a `\r` before
/// it is dropped), as [`LinesCodec`](tokio_util::codec::LinesCodec) does, except that a long
/// line is handed over in the buffer it was read into rather than copied: a result of
/// megabytes is in memory once on its way to [`parse`].
#[derive(Debug)]
pub(crate) struct FrameLines {
    max: usize,
    /// Where to look for the next `\n`: the bytes before it have been searched.
    next_index: usize,
    /// Dropping the rest of an overlong line.
    discarding: bool,
}

impl FrameLines {
    /// Lines past this length get a buffer of their own instead of a copy.
    const HAND_OVER: usize = 64 * 1024;

    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            next_index: 0,
            discarding: false,
        }
    }

    /// The line that ends at `end` (the `\n`'s index).
    fn take_line(&mut self, buf: &mut BytesMut, end: usize) -> Result<String, LinesCodecError> {
        self.next_index = 0;
        let mut line = buf.split_to(end + 1);
        line.truncate(end);
        if line.last() == Some(&b'\r') {
            line.truncate(end - 1);
        }
        let bytes = if line.len() > Self::HAND_OVER {
            // The rest moves to a buffer of its own, so that the line owns its allocation and
            // becomes a `Vec` without a copy.
            *buf = BytesMut::from(&buf[..]);
            Vec::from(line)
        } else {
            line.to_vec()
        };
        String::from_utf8(bytes).map_err(|_| {
            LinesCodecError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "a stdout line is not valid UTF-8",
            ))
        })
    }
}

impl Decoder for FrameLines {
    type Item = String;
    type Error = LinesCodecError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<String>, LinesCodecError> {
        loop {
            // A line of `max` bytes has its `\n` at `max` at the latest.
            let read_to = buf.len().min(self.max.saturating_add(1));
            let newline = buf[self.next_index.min(read_to)..read_to]
                .iter()
                .position(|b| *b == b'\n')
                .map(|offset| offset + self.next_index);
            match (self.discarding, newline) {
                (true, Some(end)) => {
                    buf.advance(end + 1);
                    self.discarding = false;
                    self.next_index = 0;
                }
                (true, None) => {
                    buf.advance(read_to);
                    self.next_index = 0;
                    if buf.is_empty() {
                        return Ok(None);
                    }
                }
                (false, Some(end)) => return self.take_line(buf, end).map(Some),
                (false, None) if buf.len() > self.max => {
                    self.discarding = true;
                    return Err(LinesCodecError::MaxLineLengthExceeded);
                }
                (false, None) => {
                    self.next_index = read_to;
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<String>, LinesCodecError> {
        if let Some(line) = self.decode(buf)? {
            return Ok(Some(line));
        }
        if buf.is_empty() || self.discarding {
            buf.clear();
            return Ok(None);
        }
        // An unterminated last line, as `LinesCodec` hands it over.
        let end = buf.len();
        buf.extend_from_slice(b"\n");
        self.take_line(buf, end).map(Some)
    }
}

/// Makes `json`, one JSON value written by `serde_json`, a line: every `\n` and `\r` in it
/// becomes a space, then a `\n` ends it.
///
/// Arguments are passed on as the producer wrote them, and pretty-printed JSON (PHP's
/// `JSON_PRETTY_PRINT`, Python's `indent=`) has line breaks between its tokens; a runner reading
/// lines (a bare `\r` ends one for Python and Node too) would see one task as several. In valid
/// JSON a raw line break can only be whitespace between tokens (inside a string it is escaped),
/// so a space there means the same value.
pub(crate) fn into_line(mut json: Vec<u8>) -> Vec<u8> {
    for byte in &mut json {
        if matches!(*byte, b'\n' | b'\r') {
            *byte = b' ';
        }
    }
    json.push(b'\n');
    json
}

/// Worker to child: run this task.
#[derive(Debug, Serialize)]
pub(crate) struct TaskFrame<'a> {
    #[serde(rename = "type")]
    pub(crate) kind: &'static str,
    pub(crate) id: &'a str,
    pub(crate) function: &'a str,
    pub(crate) args: &'a RawJson,
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
    /// The task `id` succeeded. Read by [`parse`] apart from the other frames: the result is
    /// kept as text.
    #[serde(skip_deserializing)]
    Result { id: String, result: RawJson },
    /// The task `id` failed.
    Error { id: String, error: ErrorBody },
    /// The task `id` made progress: its fields are read by [`progress_of`].
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

/// What a `progress` frame's fields report (docs/runners.md, "Progress"): `fraction` (a
/// number, 0 to 1) or, without it, `percent` (a number, 0 to 100); `message` (a string);
/// `detail` (any JSON but `null`). Other fields, and these with another type, are ignored; the
/// update is then checked as any handler's ([`Progress::checked`]).
pub(crate) fn progress_of(fields: &serde_json::Map<String, Value>) -> Progress {
    let number = |name: &str| fields.get(name).and_then(Value::as_f64);
    Progress {
        fraction: number("fraction").or_else(|| number("percent").map(|p| p / 100.0)),
        message: fields
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
        detail: fields
            .get("detail")
            .filter(|d| !d.is_null())
            .and_then(|d| RawJson::to_json(d).ok()),
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
///
/// A result is kept as JSON text, cut out of the line in place: it can be as long as a frame,
/// and a tree of it up to 40 times that (serde cannot keep text inside a tagged enum, so its
/// frame is read apart).
pub(crate) fn parse(line: impl Into<String>) -> Result<Frame, NotAFrame> {
    let line: String = line.into();
    /// Only the `type` of a frame.
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    /// A `result` frame, its result borrowed from the line.
    #[derive(Deserialize)]
    struct ResultFrame<'a> {
        id: String,
        #[serde(borrow, default)]
        result: Option<&'a RawValue>,
    }
    let not_a_frame = |e: serde_json::Error| NotAFrame {
        reason: e.to_string(),
        excerpt: line.chars().take(200).collect(),
    };
    let is_result = matches!(
        serde_json::from_str::<Tag<'_>>(&line),
        Ok(Tag { kind: Some(kind) }) if kind == "result"
    );
    if is_result {
        let frame: ResultFrame<'_> = serde_json::from_str(&line).map_err(not_a_frame)?;
        let id = frame.id;
        let Some(result) = frame.result else {
            return Ok(Frame::Result {
                id,
                result: RawJson::null(),
            });
        };
        // Where the result lies in the line; the line becomes the result, without a copy.
        let start = result.get().as_ptr() as usize - line.as_ptr() as usize;
        let end = start + result.get().len();
        let mut text = line;
        text.truncate(end);
        text.drain(..start);
        let result = RawJson::from_string(text).map_err(|e| NotAFrame {
            reason: e.to_string(),
            excerpt: String::new(),
        })?;
        return Ok(Frame::Result { id, result });
    }
    serde_json::from_str(&line).map_err(|e| NotAFrame {
        reason: e.to_string(),
        excerpt: line.chars().take(200).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_with_pretty_printed_args_is_one_line_meaning_the_same() {
        let args =
            RawJson::from_string("{\r\n  \"a\": \"x\\ny\",\r  \"b\": [\n    1\n  ]\n}".into())
                .unwrap();
        let frame = TaskFrame {
            kind: "task",
            id: "t",
            function: "f",
            args: &args,
            attempt: 1,
            max_attempts: 1,
            redelivered: false,
            deadline: None,
        };
        let line = into_line(serde_json::to_vec(&frame).unwrap());
        assert_eq!(
            line.iter().filter(|&&b| b == b'\n' || b == b'\r').count(),
            1
        );
        assert_eq!(line.last(), Some(&b'\n'));
        let sent: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(sent["args"], serde_json::json!({"a": "x\ny", "b": [1]}));
    }

    #[test]
    fn frames_parse_and_garbage_does_not() {
        assert!(matches!(
            parse(r#"{"type":"ready","protocol":1,"functions":["a"]}"#),
            Ok(Frame::Ready { functions, .. }) if functions == ["a"]
        ));
        assert!(matches!(
            parse(r#"{"type":"result","id":"x","result":{"n":1}}"#),
            Ok(Frame::Result { id, result }) if id == "x" && result.get() == r#"{"n":1}"#
        ));
        assert!(matches!(
            parse(r#"{"type":"result","result": [1, 2] ,"id":"y"}"#),
            Ok(Frame::Result { id, result }) if id == "y" && result.get() == "[1, 2]"
        ));
        assert!(matches!(
            parse(r#"{"type":"result","id":"z"}"#),
            Ok(Frame::Result { result, .. }) if result.get() == "null"
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

    fn lines(codec: &mut FrameLines, input: &[u8]) -> Vec<Result<String, String>> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match codec.decode_eof(&mut buf) {
                Ok(Some(line)) => out.push(Ok(line)),
                Ok(None) => return out,
                Err(e) => out.push(Err(e.to_string())),
            }
        }
    }

    #[test]
    fn stdout_is_split_into_lines_as_lines_codec_would() {
        let mut codec = FrameLines::new(8);
        let long = "y".repeat(100_000);
        assert_eq!(
            lines(&mut codec, b"a\r\nbb\n12345678\n123456789\nok\nlast"),
            [
                Ok("a".to_owned()),
                Ok("bb".to_owned()),
                Ok("12345678".to_owned()),
                Err("max line length exceeded".to_owned()),
                Ok("ok".to_owned()),
                Ok("last".to_owned()),
            ]
        );
        let mut codec = FrameLines::new(200_000);
        let input = format!("{long}\nnext\n");
        assert_eq!(
            lines(&mut codec, input.as_bytes()),
            [Ok(long), Ok("next".to_owned())],
            "a long line is handed over whole, and the rest goes on"
        );
        assert!(lines(&mut FrameLines::new(8), b"\xff\n")[0].is_err());
    }

    #[test]
    fn progress_frames_map_to_progress() {
        let progress = |line: &str| match parse(line) {
            Ok(Frame::Progress { rest, .. }) => progress_of(&rest),
            other => panic!("{other:?}"),
        };
        let p = progress(
            r#"{"type":"progress","id":"x","fraction":0.25,"message":"page 1","detail":{"pages":4},"eta":9}"#,
        );
        assert_eq!(p.fraction, Some(0.25));
        assert_eq!(p.message.as_deref(), Some("page 1"));
        assert_eq!(p.detail.as_ref().map(RawJson::get), Some(r#"{"pages":4}"#));
        // percent when there is no fraction; fraction first when both come.
        assert_eq!(
            progress(r#"{"type":"progress","id":"x","percent":40}"#).fraction,
            Some(0.4)
        );
        assert_eq!(
            progress(r#"{"type":"progress","id":"x","percent":40,"fraction":0.9}"#).fraction,
            Some(0.9)
        );
        // Fields of another type are ignored, as are unknown ones.
        let p = progress(
            r#"{"type":"progress","id":"x","fraction":"half","message":7,"detail":null,"step":3}"#,
        );
        assert_eq!(p, Progress::default());
        assert!(p.checked().is_err());
        // Out of range: clamped when checked.
        let p = progress(r#"{"type":"progress","id":"x","percent":250}"#);
        assert_eq!(p.checked().unwrap().fraction, Some(1.0));
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
