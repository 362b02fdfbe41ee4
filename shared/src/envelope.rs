//! The envelope of a task: every AMQP property and `x-warren-*` header Warren writes or reads.
//!
//! This module is the only code that touches them. Callers build a [`TaskEnvelope`] and get the
//! properties of a request; workers read a delivery into an [`Incoming`] and get the properties
//! of their reply ([`reply_properties`]), retry copy ([`retry_copy`]) and dead-letter copy
//! ([`dead_copy`]) from here; the dead-letter tools read a parked task with [`DeadInfo::read`]
//! and replay it with [`replay_copy`]. `docs/protocol.md` describes the same wire format.
//!
//! Everything read here comes from any publisher, so nothing written here can hurt the
//! connection that publishes it:
//!
//! - text Warren writes from input is bounded ([`MAX_HEADER_TEXT`] bytes per header, 255 for
//!   short-string properties), truncated with a marker ([`bounded`]);
//! - a copy carries the original's headers only when they fit in [`MAX_HEADERS_BYTES`], and never
//!   the `CC`/`BCC` sender-selected routing headers (they would route the copy elsewhere);
//! - a reply address is checked the way RabbitMQ decodes it ([`check_reply_to`]), because a
//!   malformed direct reply-to address makes the broker close the publishing connection, and a
//!   worker may restrict queue-name addresses to its reply queues ([`ReplyTo::restricted_to`]);
//! - the attempt number is read as a bounded integer or refused ([`BadAttempt`]), never wrapped;
//!   a deadline that is not an integer is refused too ([`BadDeadline`]), never ignored.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, ShortString};

use crate::policy;
use crate::protocol::{self, TaskFailure, TaskId};
use crate::trace::TraceContext;

/// Header names. All are optional for a sender; a worker reads a missing one as its default.
pub mod headers {
    /// Protocol version (integer). Missing means 1. Any other value is answered
    /// `unsupported_version`.
    pub const PROTOCOL: &str = "x-warren-protocol";
    /// 1-based attempt number (integer from 1 to `u32::MAX`). Missing means 1.
    pub const ATTEMPT: &str = "x-warren-attempt";
    /// Absolute deadline, milliseconds since the Unix epoch (integer). A worker that receives the
    /// task after it answers `expired` without running it; a value that is not an integer is
    /// answered `bad_request`.
    pub const DEADLINE: &str = "x-warren-deadline";
    /// When the task is due, milliseconds since the Unix epoch (integer). A task published
    /// straight to its queue with a time more than a second ahead is put through the delay
    /// levels ([`crate::delay`]) by the worker that receives it, and runs when due; Warren's
    /// own producers send it through the levels themselves. A value that is not an integer is
    /// answered `bad_request`.
    pub const RUN_AT: &str = "x-warren-run-at";
    /// Attempts the task gets in all (integer, the first included); overrides the worker's
    /// policy for this task.
    pub const MAX_ATTEMPTS: &str = "x-warren-max-attempts";
    /// Delays between attempts, comma-separated milliseconds (`"1000,10000"`); overrides the
    /// worker's policy for this task, each delay rounded up to [`crate::policy::BACKOFF_LADDER`].
    pub const BACKOFF: &str = "x-warren-backoff";
    /// Execution time limit of one attempt in milliseconds; overrides the worker's policy.
    pub const TIME_LIMIT: &str = "x-warren-time-limit";
    /// The error of the previous attempt, on a retried copy.
    pub const LAST_ERROR: &str = "x-warren-last-error";
    /// W3C `traceparent` of the sender's `send` span: `00-<trace id>-<span id>-<flags>`.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C `tracestate`: vendor data, passed on unchanged with `traceparent`.
    pub const TRACESTATE: &str = "tracestate";
    /// Why a task was parked in the dead-letter queue: `rejected` (bad input),
    /// `permanent_failure` or `attempts_exhausted`.
    pub const DEAD_REASON: &str = "x-warren-dead-reason";
    /// The error kind of the failure that parked the task (e.g. `bad_request`).
    pub const DEAD_KIND: &str = "x-warren-dead-kind";
    /// The last error message of a dead-lettered task.
    pub const DEAD_ERROR: &str = "x-warren-dead-error";
    /// The worker (connection name) that dead-lettered the task.
    pub const DEAD_BY: &str = "x-warren-dead-by";
    /// When the task was dead-lettered, milliseconds since the Unix epoch.
    pub const DEAD_AT: &str = "x-warren-dead-at";
    /// On a copy whose original headers were too large to carry: their encoded size in bytes.
    pub const HEADERS_DROPPED: &str = "x-warren-headers-dropped";
    /// Who enqueued the task (a short opaque text, a gateway session id say): copied into every
    /// event of the task ([`crate::events::Event::origin`]) so that a reader can pick its own.
    /// At most [`super::MAX_LABEL_BYTES`] bytes.
    pub const ORIGIN: &str = "x-warren-origin";
    /// The batch the task belongs to: copied into every event of the task.
    pub const BATCH: &str = "x-warren-batch";
}

/// Most bytes of text Warren writes into one header from input (an error message, say).
/// Longer text is cut at a character boundary and ends with [`TRUNCATED`].
pub const MAX_HEADER_TEXT: usize = 1024;

/// Most bytes the headers of a task may take on the wire. A copy of a task whose headers are
/// larger carries only Warren's own headers, so that it always fits in one AMQP frame with the
/// headers Warren adds; a worker rejects such a task as `too_large`.
pub const MAX_HEADERS_BYTES: usize = 16 * 1024;

/// Marker that ends truncated text.
pub const TRUNCATED: &str = "…[truncated]";

/// `content_type` of every request and reply.
pub const CONTENT_TYPE: &str = "application/json";

/// `app_id` of requests published by Warren.
pub const APP_ID: &str = "warren";

/// `type` property of replies (requests carry the function name there).
pub const REPLY_TYPE: &str = "warren.reply";

/// `delivery_mode` of everything Warren publishes but progress updates: persistent.
pub const PERSISTENT: u8 = 2;

/// `delivery_mode` of a progress update to a caller: transient.
pub const TRANSIENT: u8 = 1;

/// The `reply_to` value that asks RabbitMQ for direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// What the name of every reply queue of Warren's own client starts with
/// (`warren.reply.<uuid>`, `ReplyMode::Queue`); workers reply to queues named so by default.
pub const REPLY_QUEUE_PREFIX: &str = "warren.reply.";

/// AMQP short strings (most properties, header names) hold at most this many bytes.
const SHORT_STRING_MAX: usize = 255;

/// Routing headers that RabbitMQ honours on any publish (sender-selected distribution).
const ROUTING_HEADERS: [&str; 2] = ["CC", "BCC"];

/// `text`, cut to at most `max` bytes (at a character boundary) and ending with [`TRUNCATED`]
/// when it was longer.
pub fn bounded(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{TRUNCATED}", &text[..end]))
}

fn short(text: &str) -> ShortString {
    ShortString::from(bounded(text, SHORT_STRING_MAX).as_ref())
}

/// Reads an integer header, whatever integer width the sender chose (or a decimal string).
pub fn header_int(headers: Option<&FieldTable>, name: &str) -> Option<i64> {
    as_int(headers?.inner().get(name)?)
}

fn as_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// A header value as an error message shows it: `2`, `"one"`, `true`, `1.5`, or its AMQP type
/// for values that have no short form (a table, an array, bytes), at most 64 bytes.
fn describe(value: &AMQPValue) -> String {
    let text = match value {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortString(s) => format!("{:?}", s.as_str()),
        AMQPValue::LongString(s) => format!("{:?}", String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::Float(f) => f.to_string(),
        AMQPValue::Double(f) => f.to_string(),
        AMQPValue::DecimalValue(d) => {
            format!("the decimal {} with scale {}", d.value, d.scale)
        }
        AMQPValue::FieldArray(_) => "an array".to_owned(),
        AMQPValue::FieldTable(_) => "a table".to_owned(),
        AMQPValue::ByteArray(_) => "a byte array".to_owned(),
        AMQPValue::Void => "void".to_owned(),
        integer => as_int(integer).map_or_else(|| format!("{integer:?}"), |n| n.to_string()),
    };
    bounded(&text, 64).into_owned()
}

/// Most bytes of a label header ([`headers::ORIGIN`], [`headers::BATCH`]) a worker copies into
/// the task's events; a longer one is cut ([`bounded`]).
pub const MAX_LABEL_BYTES: usize = SHORT_STRING_MAX;

/// A label header (an id, a name), bounded to [`MAX_LABEL_BYTES`]; `None` when missing, empty
/// or not a string.
fn read_label(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    let text = match headers?.inner().get(name)? {
        AMQPValue::ShortString(s) => s.as_str(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?,
        _ => return None,
    };
    (!text.is_empty()).then(|| bounded(text, MAX_LABEL_BYTES).into_owned())
}

/// Reads a string header.
pub fn header_str(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

/// Sets an integer header.
pub fn set_header_int(headers: &mut FieldTable, name: &str, value: i64) {
    headers.insert(ShortString::from(name), AMQPValue::LongLongInt(value));
}

/// Sets a string header, bounded to [`MAX_HEADER_TEXT`] bytes.
pub fn set_header_str(headers: &mut FieldTable, name: &str, value: &str) {
    let value = bounded(value, MAX_HEADER_TEXT);
    headers.insert(
        ShortString::from(name),
        AMQPValue::LongString(value.as_ref().into()),
    );
}

/// Milliseconds since the Unix epoch, as used in deadline headers (saturating).
pub fn epoch_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The [`SystemTime`] of an epoch-milliseconds header value (before the epoch reads as the
/// epoch).
pub fn from_epoch_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The encoded size of a field table on the wire, in bytes (its 4-byte length included).
pub fn table_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(k, v)| 1 + k.as_str().len() + 1 + value_size(v))
        .sum::<usize>()
}

/// The encoded size of `table` without the broker's own headers ([`is_broker_header`]).
fn senders_headers_size(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .filter(|(k, _)| !is_broker_header(k.as_str()))
        .map(|(k, v)| 1 + k.as_str().len() + 1 + value_size(v))
        .sum::<usize>()
}

fn value_size(value: &AMQPValue) -> usize {
    match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => {
            4 + a
                .as_slice()
                .iter()
                .map(|v| 1 + value_size(v))
                .sum::<usize>()
        }
        AMQPValue::FieldTable(t) => table_size(t),
        AMQPValue::Void => 0,
    }
}

/// The trace context a task carries, if it carries a valid one (an invalid one is ignored).
fn read_trace(h: Option<&FieldTable>) -> Option<TraceContext> {
    // The bytes as they came: read on every traced task, so no copy into a `String` first.
    let parent = match h?.inner().get(headers::TRACEPARENT)? {
        AMQPValue::ShortString(s) => s.as_str().as_bytes(),
        AMQPValue::LongString(s) => s.as_bytes(),
        _ => return None,
    };
    let state = header_str(h, headers::TRACESTATE);
    TraceContext::parse_bytes(parent, state.as_deref())
}

/// Makes `context` the parent of whoever processes the message with headers `h`.
fn write_trace(h: &mut FieldTable, context: &TraceContext) {
    h.insert(
        ShortString::from(headers::TRACEPARENT),
        AMQPValue::LongString(context.traceparent_bytes().to_vec().into()),
    );
    if let Some(state) = &context.state {
        set_header_str(h, headers::TRACESTATE, state);
    }
}

/// Per-task policy overrides, as a caller sends them (see [`crate::Policy::overridden_by`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOverrides {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: Option<u32>,
    /// Delays between attempts.
    pub backoff: Option<Vec<Duration>>,
    /// How long one attempt may run (at least 1 ms).
    pub time_limit: Option<Duration>,
}

impl PolicyOverrides {
    /// The overrides in `h`; values out of range, or that do not parse, are left out.
    pub fn read(h: Option<&FieldTable>) -> Self {
        Self {
            max_attempts: header_int(h, headers::MAX_ATTEMPTS)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n >= 1),
            backoff: header_str(h, headers::BACKOFF).and_then(|s| policy::parse_backoff(&s)),
            time_limit: header_int(h, headers::TIME_LIMIT)
                .and_then(|n| u64::try_from(n).ok())
                .filter(|ms| *ms >= 1)
                .map(Duration::from_millis),
        }
    }

    /// Writes the overrides that are set into `h`.
    pub fn write(&self, h: &mut FieldTable) {
        if let Some(n) = self.max_attempts {
            set_header_int(h, headers::MAX_ATTEMPTS, i64::from(n));
        }
        if let Some(backoff) = &self.backoff {
            set_header_str(h, headers::BACKOFF, &policy::format_backoff(backoff));
        }
        if let Some(limit) = self.time_limit {
            set_header_int(h, headers::TIME_LIMIT, duration_millis(limit));
        }
    }
}

/// What a caller publishes with a task: the properties of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnvelope {
    /// The task id: `message_id`, and `correlation_id` when a reply is wanted.
    pub id: TaskId,
    /// The function name, sent in the informational `type` property (cut to 255 bytes).
    pub function: String,
    /// Where the reply goes; `None` for a task nobody waits for.
    pub reply_to: Option<String>,
    /// When the caller stops waiting.
    pub deadline: Option<SystemTime>,
    /// When the task is due, for a task sent through the delay levels.
    pub run_at: Option<SystemTime>,
    /// The caller's retry policy for this task.
    pub overrides: PolicyOverrides,
    /// The caller's `send` span (`traceparent`, `tracestate`), parent of the worker's
    /// `process` span.
    pub trace: Option<TraceContext>,
    /// Who enqueued the task (`x-warren-origin`), cut to [`MAX_LABEL_BYTES`].
    pub origin: Option<String>,
}

impl TaskEnvelope {
    /// The AMQP properties and headers of the request.
    pub fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        set_header_int(&mut h, headers::PROTOCOL, protocol::PROTOCOL_VERSION);
        set_header_int(&mut h, headers::ATTEMPT, 1);
        if let Some(deadline) = self.deadline {
            set_header_int(&mut h, headers::DEADLINE, epoch_millis(deadline));
        }
        if let Some(run_at) = self.run_at {
            set_header_int(&mut h, headers::RUN_AT, epoch_millis(run_at));
        }
        self.overrides.write(&mut h);
        if let Some(trace) = &self.trace {
            write_trace(&mut h, trace);
        }
        if let Some(origin) = &self.origin {
            set_header_str(&mut h, headers::ORIGIN, &bounded(origin, MAX_LABEL_BYTES));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let properties = BasicProperties::default()
            .with_message_id(short(self.id.as_str()))
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_type(short(&self.function))
            .with_timestamp(now.as_secs())
            .with_app_id(APP_ID.into())
            .with_headers(h);
        match &self.reply_to {
            Some(reply_to) => properties
                .with_correlation_id(short(self.id.as_str()))
                .with_reply_to(short(reply_to)),
            None => properties,
        }
    }
}

/// Why a task was parked in the dead-letter queue (the `x-warren-dead-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// The input cannot run as it is (malformed, unknown function, bad arguments, too large...).
    Rejected,
    /// The handler failed with a permanent error.
    PermanentFailure,
    /// Every attempt failed, or no attempt could start before the deadline.
    AttemptsExhausted,
    /// The broker refused the task's outcome (its reply, retry copy or dead-letter copy) for
    /// its content, twice, the second time on a channel of its own.
    Refused,
}

impl DeadReason {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::PermanentFailure => "permanent_failure",
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::Refused => "refused",
        }
    }
}

/// Where a worker may send a task's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyTo {
    /// No `reply_to` (or an empty one): nobody waits; no reply is sent.
    None,
    /// A usable address: a direct reply-to address or a queue name.
    Address(String),
    /// An address the broker would refuse, or that would make it close the connection; the task
    /// is rejected and no reply is sent.
    Invalid {
        /// The address, cut to 255 bytes for messages.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ReplyTo {
    /// The usable address, if any.
    pub fn address(&self) -> Option<&str> {
        match self {
            Self::Address(a) => Some(a),
            Self::None | Self::Invalid { .. } => None,
        }
    }

    /// This address, unless it is a queue name that none of `reply_queues` matches: then an
    /// [`Invalid`](Self::Invalid) one, so that nothing is published to it.
    ///
    /// Direct reply-to addresses ([`is_direct_reply_to`]) are always allowed: the broker
    /// delivers them to the channel that made the call and nowhere else. A queue name is any
    /// queue of the virtual host, so a worker that replied to every name would publish, on a
    /// caller's say-so, into queues that are not replies (a dead-letter queue, another
    /// application's queue). `reply_queues` are patterns in which `*` stands for any run of
    /// characters and everything else for itself ([`reply_queue_matches`]); none allows no
    /// queue name, `*` allows every one.
    #[must_use]
    pub fn restricted_to(self, reply_queues: &[String]) -> Self {
        let Self::Address(address) = self else {
            return self;
        };
        if is_direct_reply_to(&address)
            || reply_queues
                .iter()
                .any(|pattern| reply_queue_matches(pattern, &address))
        {
            return Self::Address(address);
        }
        let allowed = if reply_queues.is_empty() {
            "this worker replies to direct reply-to addresses only".to_owned()
        } else {
            format!(
                "it is not a direct reply-to address, and this worker replies only to queues \
                 named like {}",
                bounded(&reply_queues.join(", "), 200)
            )
        };
        Self::Invalid {
            address: bounded(&address, SHORT_STRING_MAX).into_owned(),
            reason: allowed,
        }
    }
}

/// Whether `address` is a direct reply-to address: the pseudo-queue `amq.rabbitmq.reply-to`
/// or an address the broker issued for it (`amq.rabbitmq.reply-to.<pid>.<key>`; its shape is
/// [`check_reply_to`]'s business).
pub fn is_direct_reply_to(address: &str) -> bool {
    address
        .strip_prefix(DIRECT_REPLY_TO)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Whether queue name `name` matches reply queue pattern `pattern`, in which `*` stands for any
/// run of characters (none included) and every other character for itself:
/// `warren.reply.*` matches `warren.reply.5f2c...` and not `warren.tasks.dead`.
pub fn reply_queue_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.as_bytes(), name.as_bytes());
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and where in `name` its run ends for now.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(c) if Some(c) == name.get(n) => {
                p += 1;
                n += 1;
            }
            _ => match star {
                // Let the last `*` take one more character, and match the rest again.
                Some((at, end)) => {
                    star = Some((at, end + 1));
                    p = at + 1;
                    n = end + 1;
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .unwrap_or_default()
        .iter()
        .all(|c| *c == b'*')
}

/// Checks a reply address before anything is published to it.
///
/// A queue name is fine unless it contains control characters. An address starting with
/// `amq.rabbitmq.reply-to.` is routed by RabbitMQ's direct reply-to code, which decodes it as
/// `<base64 of an Erlang pid>.<key>`; on RabbitMQ 3.10.x (and, for a malformed pid, up to 4.0)
/// an address that does not decode crashes the publisher's channel process and the broker
/// closes the whole connection (`541 INTERNAL_ERROR`). So only the shape the broker itself
/// generates (3.10 and later: `reply@<node hash>` pids) is accepted: canonical padded base64 of
/// `131, 88 (NEW_PID_EXT), 118 (ATOM_UTF8_EXT), u16 length, "reply@<digits>", 12 bytes`, a dot,
/// and a non-empty base64 key.
///
/// # Errors
/// A sentence saying what is wrong with the address.
pub fn check_reply_to(address: &str) -> Result<(), String> {
    if address.chars().any(char::is_control) {
        return Err("it contains control characters".into());
    }
    let Some(rest) = address.strip_prefix("amq.rabbitmq.reply-to.") else {
        return Ok(());
    };
    let bad = |why: &str| -> Result<(), String> {
        Err(format!(
            "it is not a direct reply-to address the broker issued ({why})"
        ))
    };
    let mut parts = rest.split('.');
    let (Some(pid), Some(key), None) = (parts.next(), parts.next(), parts.next()) else {
        return bad("expected amq.rabbitmq.reply-to.<pid>.<key>");
    };
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    {
        return bad("the key is not base64");
    }
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(pid) else {
        return bad("the pid is not canonical base64");
    };
    match raw.as_slice() {
        [131, 88, 118, hi, lo, rest @ ..] => {
            let len = usize::from(*hi) << 8 | usize::from(*lo);
            let node = rest.get(..len).unwrap_or_default();
            let tail = rest.get(len..).unwrap_or_default();
            let hash = node.strip_prefix(b"reply@").unwrap_or_default();
            let node_ok = rest.len() >= len
                && (1..=10).contains(&hash.len())
                && hash.iter().all(u8::is_ascii_digit);
            if node_ok && tail.len() == 12 {
                Ok(())
            } else {
                bad("the pid does not name a reply@<hash> node")
            }
        }
        _ => bad("the pid is not an Erlang pid"),
    }
}

/// Why an `x-warren-attempt` header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "x-warren-attempt must be a whole number from 1 to {}, got {got}",
    u32::MAX
)]
pub struct BadAttempt {
    /// The value as sent (cut to 64 bytes).
    pub got: String,
}

fn read_attempt(h: Option<&FieldTable>) -> Result<u32, BadAttempt> {
    let Some(value) = h.and_then(|h| h.inner().get(headers::ATTEMPT)) else {
        return Ok(1);
    };
    as_int(value)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .ok_or_else(|| BadAttempt {
            got: describe(value),
        })
}

/// Why an `x-warren-deadline` header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("x-warren-deadline must be a whole number of milliseconds since the Unix epoch, got {got}")]
pub struct BadDeadline {
    /// The value as sent, described (cut to 64 bytes).
    pub got: String,
}

fn read_deadline(h: Option<&FieldTable>) -> Result<Option<SystemTime>, BadDeadline> {
    read_time(h, headers::DEADLINE).map_err(|got| BadDeadline { got })
}

/// Why an `x-warren-run-at` header cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("x-warren-run-at must be a whole number of milliseconds since the Unix epoch, got {got}")]
pub struct BadRunAt {
    /// The value as sent, described (cut to 64 bytes).
    pub got: String,
}

/// A time header (milliseconds since the Unix epoch), or the description of a value that is
/// not one.
fn read_time(h: Option<&FieldTable>, name: &str) -> Result<Option<SystemTime>, String> {
    let Some(value) = h.and_then(|h| h.inner().get(name)) else {
        return Ok(None);
    };
    as_int(value)
        .map(|ms| Some(from_epoch_millis(ms)))
        .ok_or_else(|| describe(value))
}

/// `x-warren-protocol` as sent: an integer, or the description of a value that is none (which
/// no worker supports either).
fn read_protocol(h: Option<&FieldTable>) -> Option<Result<i64, String>> {
    let value = h?.inner().get(headers::PROTOCOL)?;
    Some(as_int(value).ok_or_else(|| describe(value)))
}

/// The id of the task with properties `p`: its `message_id`, else its `correlation_id`, else a
/// fresh one.
fn task_id(p: &BasicProperties) -> TaskId {
    p.message_id()
        .as_ref()
        .or(p.correlation_id().as_ref())
        .map_or_else(TaskId::new, |id| TaskId::from(id.to_string()))
}

/// What a worker reads from a delivery before it looks at the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// `message_id`, else `correlation_id`, else a fresh id.
    pub id: TaskId,
    /// `correlation_id` as sent.
    pub correlation_id: Option<String>,
    /// Where the reply goes.
    pub reply_to: ReplyTo,
    /// `x-warren-protocol` when sent: an integer, or the description of a value that is not one.
    pub protocol: Option<Result<i64, String>>,
    /// `x-warren-attempt` (1 when missing).
    pub attempt: Result<u32, BadAttempt>,
    /// `x-warren-deadline` (none when missing).
    pub deadline: Result<Option<SystemTime>, BadDeadline>,
    /// `x-warren-run-at` (none when missing).
    pub run_at: Result<Option<SystemTime>, BadRunAt>,
    /// The per-task policy headers.
    pub overrides: PolicyOverrides,
    /// The encoded size of the headers its senders wrote, in bytes: all but the broker's own
    /// ([`is_broker_header`]), which grow on every trip through the delay levels.
    pub headers_bytes: usize,
    /// The caller's trace context (`traceparent`, `tracestate`), when valid.
    pub trace: Option<TraceContext>,
    /// `x-warren-origin`: who enqueued the task, at most [`MAX_LABEL_BYTES`] of it.
    pub origin: Option<String>,
    /// `x-warren-batch`: the batch it belongs to, at most [`MAX_LABEL_BYTES`] of it.
    pub batch: Option<String>,
}

impl Incoming {
    /// Reads the envelope of `delivery`.
    pub fn of(delivery: &Delivery) -> Self {
        Self::read(&delivery.properties)
    }

    /// Reads an envelope from message properties.
    pub fn read(p: &BasicProperties) -> Self {
        let h = p.headers().as_ref();
        let correlation_id = p.correlation_id().as_ref().map(|s| s.to_string());
        let id = task_id(p);
        let reply_to = match p.reply_to().as_ref().map(ShortString::as_str) {
            None | Some("") => ReplyTo::None,
            Some(address) => match check_reply_to(address) {
                Ok(()) => ReplyTo::Address(address.to_owned()),
                Err(reason) => ReplyTo::Invalid {
                    address: bounded(address, SHORT_STRING_MAX).into_owned(),
                    reason,
                },
            },
        };
        Self {
            id,
            correlation_id,
            reply_to,
            protocol: read_protocol(h),
            attempt: read_attempt(h),
            deadline: read_deadline(h),
            run_at: read_time(h, headers::RUN_AT).map_err(|got| BadRunAt { got }),
            overrides: PolicyOverrides::read(h),
            headers_bytes: h.map_or(0, senders_headers_size),
            trace: read_trace(h),
            origin: read_label(h, headers::ORIGIN),
            batch: read_label(h, headers::BATCH),
        }
    }

    /// The `correlation_id` of the reply: the request's, else its task id.
    pub fn reply_correlation(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(self.id.as_str())
    }
}

/// The headers a copy of `original` starts from: all of them but `CC`/`BCC` when they fit in
/// [`MAX_HEADERS_BYTES`]; otherwise only Warren's small request headers and
/// [`headers::HEADERS_DROPPED`].
fn carried_headers(original: &BasicProperties) -> FieldTable {
    carried(original, false)
}

fn carried(original: &BasicProperties, bare: bool) -> FieldTable {
    let Some(h) = original.headers().as_ref() else {
        return FieldTable::default();
    };
    let size = table_size(h);
    let mut out = FieldTable::default();
    if size <= MAX_HEADERS_BYTES && !bare {
        for (key, value) in h.inner() {
            if !ROUTING_HEADERS.contains(&key.as_str()) {
                out.insert(key.clone(), value.clone());
            }
        }
        return out;
    }
    for name in [
        headers::PROTOCOL,
        headers::ATTEMPT,
        headers::DEADLINE,
        headers::MAX_ATTEMPTS,
        headers::TIME_LIMIT,
    ] {
        if let Some(n) = header_int(Some(h), name) {
            set_header_int(&mut out, name, n);
        }
    }
    set_header_int(
        &mut out,
        headers::HEADERS_DROPPED,
        i64::try_from(size).unwrap_or(i64::MAX),
    );
    out
}

/// The properties of the retry copy of task `id`: the original's without `expiration` and
/// `user_id`, persistent, with `message_id` = `id`, `attempt` (the next one) and the failure
/// that caused the retry.
pub fn retry_copy(
    original: &BasicProperties,
    id: &TaskId,
    attempt: u32,
    failure: &TaskFailure,
) -> BasicProperties {
    let mut h = carried_headers(original);
    set_header_int(&mut h, headers::ATTEMPT, i64::from(attempt));
    set_header_str(&mut h, headers::LAST_ERROR, &failure.to_string());
    copy_properties(original, id, h)
}

/// The properties of a copy of task `id` that the worker publishes (retry, dead letter): the
/// original's with `headers`, persistent, and `message_id` = `id`, so that every attempt and
/// the parked copy keep the id the worker chose (the original's `message_id`, else its
/// `correlation_id`, else a random one). Without `expiration`, which would expire a retry
/// early or make a parked copy vanish from `<queue>.dead`, and without `user_id`, which the
/// broker requires to be the publishing connection's user (the worker's, not the caller's).
fn copy_properties(
    original: &BasicProperties,
    id: &TaskId,
    headers: FieldTable,
) -> BasicProperties {
    let mut copy = BasicProperties::default()
        .with_message_id(short(id.as_str()))
        .with_headers(headers)
        .with_delivery_mode(PERSISTENT);
    if let Some(v) = original.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = original.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = original.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy
}

/// Why and by whom a task is parked: the `x-warren-dead-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct DeadMark<'a> {
    /// Why it is parked.
    pub reason: DeadReason,
    /// The failure that parked it.
    pub failure: &'a TaskFailure,
    /// The worker parking it.
    pub by: &'a str,
    /// When.
    pub at: SystemTime,
}

/// The properties of the dead-letter copy of task `id`: the original's without `expiration`
/// and `user_id`, persistent, with `message_id` = `id` and the dead-letter headers.
pub fn dead_copy(original: &BasicProperties, id: &TaskId, mark: DeadMark<'_>) -> BasicProperties {
    dead_copy_of(original, id, mark, false)
}

/// [`dead_copy`] with none of the original's headers but Warren's small request headers (and
/// [`headers::HEADERS_DROPPED`]): the copy that parks a task whose outcome the broker refused.
pub fn bare_dead_copy(
    original: &BasicProperties,
    id: &TaskId,
    mark: DeadMark<'_>,
) -> BasicProperties {
    dead_copy_of(original, id, mark, true)
}

fn dead_copy_of(
    original: &BasicProperties,
    id: &TaskId,
    mark: DeadMark<'_>,
    bare: bool,
) -> BasicProperties {
    let mut h = carried(original, bare);
    set_header_str(&mut h, headers::DEAD_REASON, mark.reason.as_str());
    set_header_str(&mut h, headers::DEAD_KIND, mark.failure.kind.as_str());
    set_header_str(&mut h, headers::DEAD_ERROR, &mark.failure.message);
    set_header_str(&mut h, headers::DEAD_BY, mark.by);
    set_header_int(&mut h, headers::DEAD_AT, epoch_millis(mark.at));
    copy_properties(original, id, h)
}

/// The properties of a reply to the task read as `incoming`.
pub fn reply_properties(incoming: &Incoming) -> BasicProperties {
    let mut h = FieldTable::default();
    set_header_int(&mut h, headers::PROTOCOL, protocol::PROTOCOL_VERSION);
    BasicProperties::default()
        .with_correlation_id(short(incoming.reply_correlation()))
        .with_message_id(short(incoming.id.as_str()))
        .with_content_type(CONTENT_TYPE.into())
        .with_type(REPLY_TYPE.into())
        .with_delivery_mode(PERSISTENT)
        .with_headers(h)
}

/// The properties of a progress message to the caller of the task read as `incoming`: a
/// reply's (the same `correlation_id`, so that the caller's waiting call finds it), with
/// `type` [`crate::events::PROGRESS_TYPE`] and transient (a progress update is worth nothing
/// after a broker restart).
pub fn progress_properties(incoming: &Incoming) -> BasicProperties {
    reply_properties(incoming)
        .with_type(crate::events::PROGRESS_TYPE.into())
        .with_delivery_mode(TRANSIENT)
}

/// Whether `name` is a header the broker writes itself when it dead-letters or redelivers a
/// message (`x-death`, `x-first-death-*`, `x-last-death-*`, `x-delivery-count`).
pub fn is_broker_header(name: &str) -> bool {
    name.starts_with("x-death")
        || name.starts_with("x-first-death-")
        || name.starts_with("x-last-death-")
        || name == "x-delivery-count"
}

/// The properties of the copy of task `id` that a worker sends through the delay levels
/// because it came early: the original's headers without the broker's bookkeeping
/// ([`is_broker_header`]) and without `CC`/`BCC`, and without `expiration` and `user_id`,
/// persistent, with `message_id` = `id`.
///
/// The broker's `x-death` must go: RabbitMQ treats a message whose `x-death` already names
/// the queue it is about to be dead-lettered to, with only expiries since, as a cycle, and
/// with at-least-once dead-lettering such a message never leaves its level queue.
pub fn later_copy(original: &BasicProperties, id: &TaskId) -> BasicProperties {
    let mut h = FieldTable::default();
    if let Some(original) = original.headers().as_ref() {
        for (key, value) in original.inner() {
            let k = key.as_str();
            if !is_broker_header(k) && !ROUTING_HEADERS.contains(&k) {
                h.insert(key.clone(), value.clone());
            }
        }
    }
    copy_properties(original, id, h)
}

/// The properties of a replayed copy of a parked task: its dead-letter and the broker's
/// bookkeeping headers removed, no deadline, attempt 1, without `expiration` and `user_id`,
/// persistent, with `message_id` = its task id.
pub fn replay_copy(parked: &BasicProperties) -> BasicProperties {
    let mut h = carried_headers(parked);
    let stale: Vec<ShortString> = h
        .inner()
        .keys()
        .filter(|key| {
            let k = key.as_str();
            k.starts_with("x-warren-dead-")
                || is_broker_header(k)
                || k == headers::DEADLINE
                || k == headers::LAST_ERROR
        })
        .cloned()
        .collect();
    let mut kept = FieldTable::default();
    for (key, value) in h.inner() {
        if !stale.contains(key) {
            kept.insert(key.clone(), value.clone());
        }
    }
    h = kept;
    set_header_int(&mut h, headers::ATTEMPT, 1);
    // A copy the broker parked itself may carry `user_id`; one parked by an older worker,
    // `expiration` too.
    copy_properties(parked, &task_id(parked), h)
}

/// Whether a message to a reply address is a progress update ([`progress_properties`]) rather
/// than the reply.
pub fn is_progress(message: &BasicProperties) -> bool {
    message
        .kind()
        .as_ref()
        .is_some_and(|kind| kind.as_str() == crate::events::PROGRESS_TYPE)
}

/// The `correlation_id` of a reply, which names the call it answers.
pub fn reply_correlation_id(reply: &BasicProperties) -> Option<&str> {
    reply.correlation_id().as_ref().map(ShortString::as_str)
}

/// What the dead-letter headers of a parked task say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadInfo {
    /// The task id (`message_id`).
    pub id: Option<String>,
    /// Warren's reason, else the broker's own (`delivery_limit`), else `None`.
    pub reason: Option<String>,
    /// The error kind of the last failure, when a worker parked it.
    pub kind: Option<String>,
    /// The last error message.
    pub error: Option<String>,
    /// The attempt that failed last.
    pub attempts: Option<i64>,
    /// The worker that parked it.
    pub dead_by: Option<String>,
    /// When it was parked.
    pub dead_at: Option<SystemTime>,
}

impl DeadInfo {
    /// Reads the dead-letter headers of `p`.
    pub fn read(p: &BasicProperties) -> Self {
        let h = p.headers().as_ref();
        Self {
            id: p.message_id().as_ref().map(|s| s.to_string()),
            reason: header_str(h, headers::DEAD_REASON).or_else(|| broker_reason(h)),
            kind: header_str(h, headers::DEAD_KIND),
            error: header_str(h, headers::DEAD_ERROR),
            attempts: header_int(h, headers::ATTEMPT),
            dead_by: header_str(h, headers::DEAD_BY),
            dead_at: header_int(h, headers::DEAD_AT).map(from_epoch_millis),
        }
    }
}

/// The broker's reason for a message it dead-lettered itself. `x-death` lists every
/// dead-lettering of the message (a retried task was dead-lettered by its delay queues, reason
/// `expired`, on the way back); the one that parked it is the `delivery_limit` entry, when there
/// is one.
fn broker_reason(h: Option<&FieldTable>) -> Option<String> {
    let deaths = match h?.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let reasons: Vec<String> = deaths
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => header_str(Some(t), "reason"),
            _ => None,
        })
        .collect();
    reasons
        .iter()
        .find(|r| *r == "delivery_limit")
        .cloned()
        .or_else(|| header_str(h, "x-first-death-reason"))
        .or_else(|| reasons.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorKind;

    /// A direct reply-to address as RabbitMQ 3.10+ issues it.
    fn issued_address() -> String {
        let node = b"reply@12345678";
        let mut raw = vec![131, 88, 118, 0, u8::try_from(node.len()).unwrap()];
        raw.extend_from_slice(node);
        raw.extend_from_slice(&[0, 0, 1, 2, 0, 0, 0, 0, 99, 88, 77, 66]);
        let pid = base64::engine::general_purpose::STANDARD.encode(raw);
        format!("amq.rabbitmq.reply-to.{pid}.q2K1cm9mZ2Z2aGtleTE2Yg==")
    }

    #[test]
    fn a_request_round_trips() {
        let sent = TaskEnvelope {
            id: TaskId::from("t-1"),
            function: "send_mail".into(),
            reply_to: Some(issued_address()),
            deadline: Some(UNIX_EPOCH + Duration::from_millis(1_763_700_000_123)),
            run_at: Some(UNIX_EPOCH + Duration::from_millis(1_763_600_000_456)),
            overrides: PolicyOverrides {
                max_attempts: Some(4),
                backoff: Some(vec![Duration::from_millis(250), Duration::from_secs(2)]),
                time_limit: Some(Duration::from_secs(3)),
            },
            trace: crate::trace::TraceContext::parse(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some("congo=t61rcWkgMzE"),
            ),
            origin: Some("session-1".into()),
        };
        let p = sent.properties();
        assert_eq!(
            p.kind().as_ref().map(ShortString::as_str),
            Some("send_mail")
        );
        assert_eq!(p.delivery_mode(), &Some(PERSISTENT));
        let got = Incoming::read(&p);
        assert_eq!(got.id, sent.id);
        assert_eq!(got.correlation_id.as_deref(), Some("t-1"));
        assert_eq!(got.reply_to, ReplyTo::Address(issued_address()));
        assert_eq!(got.attempt, Ok(1));
        assert_eq!(got.protocol, Some(Ok(protocol::PROTOCOL_VERSION)));
        assert_eq!(got.deadline, Ok(sent.deadline));
        assert_eq!(got.run_at, Ok(sent.run_at));
        assert_eq!(got.overrides, sent.overrides);
        assert!(got.trace.is_some());
        assert_eq!(got.trace, sent.trace);
        assert_eq!(
            header_str(p.headers().as_ref(), headers::ORIGIN).as_deref(),
            Some("session-1")
        );
    }

    #[test]
    fn an_origin_is_bounded_and_travels_on_a_retry_copy() {
        let original = TaskEnvelope {
            id: TaskId::from("t"),
            function: "f".into(),
            reply_to: None,
            deadline: None,
            run_at: None,
            overrides: PolicyOverrides::default(),
            trace: None,
            origin: Some("o".repeat(10_000)),
        }
        .properties();
        let sent = header_str(original.headers().as_ref(), headers::ORIGIN).unwrap_or_default();
        assert!(
            sent.len() <= MAX_LABEL_BYTES && sent.ends_with(TRUNCATED),
            "{sent}"
        );
        let failure = TaskFailure::new(ErrorKind::HandlerFailed, "x");
        let copy = retry_copy(&original, &TaskId::from("t"), 2, &failure);
        assert_eq!(
            header_str(copy.headers().as_ref(), headers::ORIGIN),
            Some(sent)
        );
    }

    #[test]
    fn an_enqueued_task_has_no_reply_address() {
        let p = TaskEnvelope {
            id: TaskId::new(),
            function: "echo".into(),
            reply_to: None,
            deadline: None,
            run_at: None,
            overrides: PolicyOverrides::default(),
            trace: None,
            origin: None,
        }
        .properties();
        let got = Incoming::read(&p);
        assert_eq!(got.reply_to, ReplyTo::None);
        assert!(p.correlation_id().is_none());
        assert_eq!(got.overrides, PolicyOverrides::default());
    }

    #[test]
    fn a_huge_function_name_is_cut_to_a_short_string() {
        let p = TaskEnvelope {
            id: TaskId::new(),
            function: "é".repeat(100_000),
            reply_to: None,
            deadline: None,
            run_at: None,
            overrides: PolicyOverrides::default(),
            trace: None,
            origin: None,
        }
        .properties();
        let ty = p
            .kind()
            .as_ref()
            .map(ShortString::as_str)
            .unwrap_or_default();
        assert!(ty.len() <= 255, "{}", ty.len());
        assert!(ty.ends_with(TRUNCATED));
    }

    #[test]
    fn bounded_text_is_cut_at_a_char_boundary_with_a_marker() {
        assert_eq!(bounded("short", 10), "short");
        let long = "ü".repeat(1000);
        let cut = bounded(&long, 101);
        assert!(cut.len() <= 101);
        assert!(cut.ends_with(TRUNCATED));
        assert!(cut.starts_with("üü"));
    }

    #[test]
    fn attempts_are_bounded_integers_or_refused() {
        let with = |v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(headers::ATTEMPT.into(), v);
            read_attempt(Some(&h))
        };
        assert_eq!(read_attempt(None), Ok(1));
        assert_eq!(with(AMQPValue::ShortShortUInt(3)), Ok(3));
        assert_eq!(with(AMQPValue::LongString("7".into())), Ok(7));
        assert_eq!(
            with(AMQPValue::LongLongInt(i64::from(u32::MAX))),
            Ok(u32::MAX)
        );
        for hostile in [
            AMQPValue::LongLongInt(i64::MAX),
            AMQPValue::LongLongInt(i64::MAX - 1),
            AMQPValue::LongLongInt(i64::from(u32::MAX) + 1),
            AMQPValue::LongLongInt(0),
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongLongInt(i64::MIN),
            AMQPValue::LongString("two".into()),
            AMQPValue::Boolean(true),
            AMQPValue::Double(1.5),
        ] {
            assert!(with(hostile.clone()).is_err(), "{hostile:?} accepted");
        }
    }

    #[test]
    fn origin_and_batch_are_read_bounded_and_only_as_text() {
        let mut h = FieldTable::default();
        set_header_str(&mut h, headers::ORIGIN, "session-1");
        h.insert(
            headers::BATCH.into(),
            AMQPValue::LongString("b".repeat(5000).into()),
        );
        let read = Incoming::read(&BasicProperties::default().with_headers(h));
        assert_eq!(read.origin.as_deref(), Some("session-1"));
        let batch = read.batch.unwrap();
        assert!(batch.len() <= MAX_LABEL_BYTES && batch.ends_with(TRUNCATED));
        let mut h = FieldTable::default();
        h.insert(headers::ORIGIN.into(), AMQPValue::LongLongInt(7));
        set_header_str(&mut h, headers::BATCH, "");
        let read = Incoming::read(&BasicProperties::default().with_headers(h));
        assert_eq!((read.origin, read.batch), (None, None));
    }

    #[test]
    fn a_protocol_or_deadline_that_is_not_an_integer_is_kept_as_an_error_not_dropped() {
        let with = |name: &str, v: AMQPValue| {
            let mut h = FieldTable::default();
            h.insert(name.into(), v);
            Incoming::read(&BasicProperties::default().with_headers(h))
        };
        assert_eq!(Incoming::read(&BasicProperties::default()).protocol, None);
        assert_eq!(
            Incoming::read(&BasicProperties::default()).deadline,
            Ok(None)
        );
        assert_eq!(
            with(headers::PROTOCOL, AMQPValue::LongString("1".into())).protocol,
            Some(Ok(1))
        );
        assert_eq!(
            with(headers::DEADLINE, AMQPValue::LongLongInt(1_000)).deadline,
            Ok(Some(UNIX_EPOCH + Duration::from_secs(1)))
        );
        for (value, described) in [
            (AMQPValue::LongString("one".into()), r#""one""#),
            (AMQPValue::Boolean(true), "true"),
            (
                AMQPValue::DecimalValue(lapin::types::DecimalValue { scale: 0, value: 2 }),
                "the decimal 2 with scale 0",
            ),
            (AMQPValue::Double(1.5), "1.5"),
            (AMQPValue::FieldTable(FieldTable::default()), "a table"),
        ] {
            let got = with(headers::PROTOCOL, value.clone()).protocol;
            assert_eq!(got, Some(Err(described.to_owned())), "{value:?}");
            let got = with(headers::DEADLINE, value.clone()).deadline;
            assert_eq!(
                got,
                Err(BadDeadline {
                    got: described.to_owned()
                }),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_retry_copy_counts_up_and_carries_a_bounded_error() {
        let original = TaskEnvelope {
            id: TaskId::from("t"),
            function: "f".into(),
            reply_to: None,
            deadline: None,
            run_at: None,
            overrides: PolicyOverrides::default(),
            trace: None,
            origin: None,
        }
        .properties();
        let failure = TaskFailure::new(ErrorKind::HandlerFailed, "x".repeat(200_000));
        let copy = retry_copy(&original, &TaskId::from("t"), u32::MAX, &failure);
        let h = copy.headers().as_ref();
        assert_eq!(header_int(h, headers::ATTEMPT), Some(i64::from(u32::MAX)));
        let last = header_str(h, headers::LAST_ERROR).unwrap_or_default();
        assert!(last.len() <= MAX_HEADER_TEXT && last.ends_with(TRUNCATED));
        assert!(table_size(copy.headers().as_ref().unwrap()) < 2 * MAX_HEADER_TEXT);
    }

    #[test]
    fn copies_keep_the_chosen_id_and_drop_expiration_and_user_id() {
        let original = BasicProperties::default()
            .with_correlation_id("corr".into())
            .with_reply_to("amq.rabbitmq.reply-to.x".into())
            .with_content_type("application/json".into())
            .with_priority(3)
            .with_app_id("shop".into())
            .with_expiration("60000".into())
            .with_user_id("alice".into());
        // No message_id: the task's id is its correlation_id.
        let id = Incoming::read(&original).id;
        assert_eq!(id.as_str(), "corr");
        let failure = TaskFailure::new(ErrorKind::HandlerFailed, "x");
        let mark = DeadMark {
            reason: DeadReason::PermanentFailure,
            failure: &failure,
            by: "w",
            at: SystemTime::now(),
        };
        for copy in [
            retry_copy(&original, &id, 2, &failure),
            dead_copy(&original, &id, mark),
            bare_dead_copy(&original, &id, mark),
        ] {
            assert_eq!(Incoming::read(&copy).id, id);
            assert_eq!(
                copy.message_id().as_ref().map(ShortString::as_str),
                Some("corr")
            );
            assert_eq!(copy.expiration(), &None);
            assert_eq!(copy.user_id(), &None);
            assert_eq!(copy.delivery_mode(), &Some(PERSISTENT));
            assert_eq!(copy.correlation_id(), original.correlation_id());
            assert_eq!(copy.reply_to(), original.reply_to());
            assert_eq!(copy.content_type(), original.content_type());
            assert_eq!(copy.priority(), &Some(3));
            assert_eq!(copy.app_id(), original.app_id());
        }
    }

    #[test]
    fn a_dead_copy_is_bounded_and_drops_routing_and_oversized_headers() {
        let mut h = FieldTable::default();
        set_header_int(&mut h, headers::ATTEMPT, 2);
        h.insert(
            "CC".into(),
            AMQPValue::FieldArray(vec![AMQPValue::LongString("elsewhere".into())].into()),
        );
        h.insert("custom".into(), AMQPValue::LongString("keep me".into()));
        let original = BasicProperties::default().with_headers(h.clone());
        let failure = TaskFailure::new(ErrorKind::UnknownFunction, "f".repeat(200_000));
        let mark = DeadMark {
            reason: DeadReason::Rejected,
            failure: &failure,
            by: "w",
            at: SystemTime::now(),
        };
        let copy = dead_copy(&original, &TaskId::from("t"), mark);
        let out = copy.headers().as_ref();
        assert!(out.is_some_and(|t| !t.inner().contains_key("CC")));
        assert_eq!(header_str(out, "custom").as_deref(), Some("keep me"));
        let info = DeadInfo::read(&copy);
        assert_eq!(info.reason.as_deref(), Some("rejected"));
        assert_eq!(info.kind.as_deref(), Some("unknown_function"));
        assert_eq!(info.attempts, Some(2));
        assert!(info.error.is_some_and(|e| e.len() <= MAX_HEADER_TEXT));

        // Headers too large to carry: only Warren's own survive, with a note of the size.
        h.insert(
            "junk".into(),
            AMQPValue::LongString("j".repeat(100_000).into()),
        );
        let copy = dead_copy(
            &BasicProperties::default().with_headers(h),
            &TaskId::from("t"),
            mark,
        );
        let out = copy.headers().as_ref();
        assert!(out.is_some_and(|t| !t.inner().contains_key("junk")));
        assert!(header_int(out, headers::HEADERS_DROPPED).is_some_and(|n| n > 100_000));
        assert_eq!(header_int(out, headers::ATTEMPT), Some(2));
        assert!(table_size(out.unwrap()) < 2 * MAX_HEADER_TEXT);
    }

    #[test]
    fn a_copy_sent_back_through_the_levels_drops_the_brokers_bookkeeping() {
        let mut h = FieldTable::default();
        set_header_int(&mut h, headers::RUN_AT, 5);
        set_header_str(&mut h, "custom", "keep me");
        set_header_str(&mut h, "CC", "elsewhere");
        set_header_str(&mut h, "x-first-death-queue", "warren.run-at.0");
        set_header_str(&mut h, "x-last-death-reason", "expired");
        set_header_int(&mut h, "x-delivery-count", 1);
        h.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        let original = BasicProperties::default()
            .with_headers(h)
            .with_expiration("1000".into())
            .with_user_id("someone".into())
            .with_correlation_id("c".into());
        let copy = later_copy(&original, &TaskId::from("t"));
        assert!(copy.expiration().is_none());
        assert!(copy.user_id().is_none());
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("t"));
        assert_eq!(
            copy.correlation_id().as_ref().map(|m| m.as_str()),
            Some("c")
        );
        let out = copy.headers().as_ref();
        assert_eq!(header_int(out, headers::RUN_AT), Some(5));
        assert_eq!(header_str(out, "custom").as_deref(), Some("keep me"));
        for gone in [
            "CC",
            "x-death",
            "x-first-death-queue",
            "x-last-death-reason",
            "x-delivery-count",
        ] {
            assert!(out.is_some_and(|t| !t.inner().contains_key(gone)), "{gone}");
        }
    }

    #[test]
    fn the_brokers_headers_do_not_count_against_the_header_limit() {
        let mut death = FieldTable::default();
        set_header_str(&mut death, "queue", &"warren.run-at.1".repeat(40));
        let deaths = vec![AMQPValue::FieldTable(death); 28];
        let mut h = FieldTable::default();
        set_header_str(&mut h, "custom", "small");
        h.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
        assert!(table_size(&h) > MAX_HEADERS_BYTES);
        let read = Incoming::read(&BasicProperties::default().with_headers(h));
        assert!(read.headers_bytes < 100, "{}", read.headers_bytes);
    }

    #[test]
    fn replayed_copies_start_over() {
        let mut h = FieldTable::default();
        set_header_int(&mut h, headers::ATTEMPT, 3);
        set_header_int(&mut h, headers::DEADLINE, 1);
        set_header_str(&mut h, headers::DEAD_REASON, "attempts_exhausted");
        set_header_str(&mut h, "x-first-death-reason", "delivery_limit");
        set_header_int(&mut h, headers::PROTOCOL, 1);
        let out = replay_copy(&BasicProperties::default().with_headers(h));
        let out = out.headers().as_ref();
        assert_eq!(header_int(out, headers::ATTEMPT), Some(1));
        assert_eq!(header_int(out, headers::PROTOCOL), Some(1));
        assert!(header_int(out, headers::DEADLINE).is_none());
        assert!(header_str(out, headers::DEAD_REASON).is_none());
        assert!(header_str(out, "x-first-death-reason").is_none());
    }

    #[test]
    fn a_delivery_limit_after_retries_is_reported_as_such() {
        let death = |reason: &str| {
            let mut t = FieldTable::default();
            set_header_str(&mut t, "reason", reason);
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        set_header_str(&mut h, "x-first-death-reason", "expired");
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("delivery_limit"), death("expired")].into()),
        );
        assert_eq!(broker_reason(Some(&h)).as_deref(), Some("delivery_limit"));
    }

    #[test]
    fn reply_properties_answer_the_caller() {
        let p = BasicProperties::default()
            .with_message_id("m".into())
            .with_reply_to("my.replies".into());
        let incoming = Incoming::read(&p);
        assert_eq!(incoming.reply_to.address(), Some("my.replies"));
        let reply = reply_properties(&incoming);
        assert_eq!(
            reply.correlation_id().as_ref().map(ShortString::as_str),
            Some("m")
        );
        assert_eq!(
            reply.kind().as_ref().map(ShortString::as_str),
            Some(REPLY_TYPE)
        );
        // Progress goes to the same call, told apart by its type.
        let progress = progress_properties(&incoming);
        assert_eq!(progress.correlation_id(), reply.correlation_id());
        assert_eq!(
            progress.kind().as_ref().map(ShortString::as_str),
            Some(crate::events::PROGRESS_TYPE)
        );
        assert_eq!(*progress.delivery_mode(), Some(TRANSIENT));
        assert!(is_progress(&progress) && !is_progress(&reply));
    }

    #[test]
    fn reply_addresses_the_broker_would_choke_on_are_refused() {
        assert_eq!(check_reply_to(&issued_address()), Ok(()));
        assert_eq!(check_reply_to("my.reply.queue"), Ok(()));
        assert_eq!(check_reply_to(DIRECT_REPLY_TO), Ok(()));
        let issued = issued_address();
        let pid = issued
            .trim_start_matches("amq.rabbitmq.reply-to.")
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let forged_node = {
            let node = b"rabbit@host";
            let mut raw = vec![131, 88, 118, 0, u8::try_from(node.len()).unwrap()];
            raw.extend_from_slice(node);
            raw.extend_from_slice(&[0; 12]);
            base64::engine::general_purpose::STANDARD.encode(raw)
        };
        for hostile in [
            "amq.rabbitmq.reply-to.AAAA.x".to_owned(),
            "amq.rabbitmq.reply-to.x".to_owned(),
            "amq.rabbitmq.reply-to.".to_owned(),
            format!("amq.rabbitmq.reply-to.{pid}"),
            format!("amq.rabbitmq.reply-to.{pid}.key.more"),
            format!("amq.rabbitmq.reply-to.{pid}."),
            format!("amq.rabbitmq.reply-to.{pid}.k!y"),
            format!("amq.rabbitmq.reply-to.{}.key", pid.trim_end_matches('=')),
            format!("amq.rabbitmq.reply-to.{forged_node}.key"),
            "amq.rabbitmq.reply-to.%%%%.key".to_owned(),
            "bad\u{1}reply".to_owned(),
        ] {
            assert!(check_reply_to(&hostile).is_err(), "{hostile} accepted");
            let incoming =
                Incoming::read(&BasicProperties::default().with_reply_to(hostile.as_str().into()));
            assert!(
                matches!(incoming.reply_to, ReplyTo::Invalid { .. }),
                "{hostile}"
            );
            assert_eq!(incoming.reply_to.address(), None);
        }
    }

    #[test]
    fn reply_queue_patterns_match_whole_names_with_stars() {
        let m = reply_queue_matches;
        assert!(m("warren.reply.*", "warren.reply.5f2c"));
        assert!(m("warren.reply.*", "warren.reply."));
        assert!(!m("warren.reply.*", "warren.replyx"));
        assert!(!m("warren.reply.*", "warren.tasks.dead"));
        assert!(!m("warren.reply.*", "xwarren.reply.1"));
        assert!(m("*", "anything at all"));
        assert!(m("app.*.replies", "app.eu.west.replies"));
        assert!(!m("app.*.replies", "app.eu.replies.dead"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "aXbYbZ"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(!m("", "x"));
        assert!(m("é*", "éa"));
    }

    #[test]
    fn only_direct_addresses_and_matching_queues_stay_reply_addresses() {
        let patterns = vec![format!("{REPLY_QUEUE_PREFIX}*")];
        let restricted = |address: &str, patterns: &[String]| {
            Incoming::read(&BasicProperties::default().with_reply_to(address.into()))
                .reply_to
                .restricted_to(patterns)
        };
        for allowed in [
            issued_address(),
            DIRECT_REPLY_TO.to_owned(),
            "warren.reply.0123abcd".to_owned(),
        ] {
            assert_eq!(
                restricted(&allowed, &patterns),
                ReplyTo::Address(allowed.clone())
            );
        }
        for refused in ["warren.tasks.dead", "other-app.orders", "warren.replyx"] {
            let got = restricted(refused, &patterns);
            assert!(
                matches!(&got, ReplyTo::Invalid { address, reason }
                    if address == refused && reason.contains("warren.reply.*")),
                "{got:?}"
            );
            assert_eq!(got.address(), None);
        }
        // No patterns: direct reply-to only; `*`: any queue.
        assert_eq!(
            restricted(&issued_address(), &[]),
            ReplyTo::Address(issued_address())
        );
        assert!(matches!(
            restricted("warren.reply.1", &[]),
            ReplyTo::Invalid { .. }
        ));
        assert_eq!(
            restricted("any.queue", &["*".to_owned()]),
            ReplyTo::Address("any.queue".into())
        );
        // An address already unusable stays so, and none stays none.
        assert!(matches!(
            restricted("amq.rabbitmq.reply-to.AAAA.x", &["*".to_owned()]),
            ReplyTo::Invalid { .. }
        ));
        assert_eq!(ReplyTo::None.restricted_to(&patterns), ReplyTo::None);
        assert!(!is_direct_reply_to("amq.rabbitmq.reply-tox"));
    }

    #[test]
    fn table_size_matches_the_encoding() {
        let mut h = FieldTable::default();
        set_header_int(&mut h, "ab", 1);
        set_header_str(&mut h, "c", "xyz");
        // 4 (table length) + [1+2 name, 1 tag, 8] + [1+1 name, 1 tag, 4+3]
        assert_eq!(table_size(&h), 4 + 12 + 10);
    }
}
