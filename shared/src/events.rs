//! Task events: the life of every task, appended to one RabbitMQ stream per deployment.
//!
//! Workers append an event for each step of a task's life (`started`, `progress`, `succeeded`,
//! `failed`, `dead_lettered`, `expired`, `cancelled`) to the stream `warren.events`, with
//! publisher confirms and before they ack the task. The stream keeps them for its retention
//! (24 h and 4 GiB by default), so a caller that went away can still find a task's result, a
//! websocket that reconnects can resume where it stopped, and an operator can see what the
//! fleet did. This module is the one definition of that format and of how the stream is
//! declared and read; `docs/protocol.md` ("Task events") is the same contract for other
//! languages.
//!
//! A message in the stream has one of two shapes. Alone, an event is one AMQP message: a JSON
//! body ([`Event`]), the event's kind in the AMQP `type` property, the task id in
//! `correlation_id` and `<task id>/<attempt>/<type>[/<seq>]` in `message_id`. Under load a
//! worker packs the events submitted while its previous append was confirming into one message
//! ([`Pack`]): AMQP `type` [`PACK_TYPE`], a JSON array of events as its body, no `message_id`
//! and no `correlation_id` (a stream's cost is per message, not per byte). Every reader splits
//! a message into its events with [`decode`] (or [`split`]), whatever its shape. A worker killed
//! between its append and its ack appends the event again when the task is redelivered:
//! readers dedupe by [`Event::dedupe_key`], per event.

use std::time::{Duration, SystemTime};

use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::RawJson;
use crate::envelope::{APP_ID, CONTENT_TYPE, PERSISTENT, epoch_millis};

/// The format version in every event's `v`.
pub const EVENT_VERSION: u32 = 1;

/// The stream's default name.
pub const DEFAULT_STREAM: &str = "warren.events";

/// How long the stream keeps events by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How many bytes the stream keeps by default (4 GiB); the oldest segments go first.
pub const DEFAULT_MAX_BYTES: u64 = 4 * 1024 * 1024 * 1024;

/// The largest stream segment file: retention removes whole segments, the oldest first
/// ([`segment_bytes`]).
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// The segment size of a stream that keeps `max_bytes`: [`SEGMENT_BYTES`], or a quarter of
/// `max_bytes` when that is less. RabbitMQ keeps the newest segments that fit in `max_bytes`
/// and starts a new segment empty, so a stream no larger than one segment would lose every
/// event each time a segment fills; with four or more, the oldest quarter goes.
pub fn segment_bytes(max_bytes: u64) -> u64 {
    SEGMENT_BYTES.min(max_bytes / 4).max(1)
}

/// The largest result a `succeeded` event carries (64 KiB of JSON text); a larger one is left
/// out and the event is marked `truncated`.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024;

/// The AMQP `type` of a message that packs several events: its body is a JSON array of
/// [`Event`] objects, in the order they were appended.
pub const PACK_TYPE: &str = "events";

/// Most events a writer packs into one message.
pub const MAX_PACK_EVENTS: usize = 64;

/// Most bytes of event JSON a writer packs into one message; an event larger than this goes
/// alone.
pub const MAX_PACK_BYTES: usize = 256 * 1024;

/// The AMQP `type` of a progress message sent to a caller's reply address (the final answer
/// is [`crate::envelope::REPLY_TYPE`]).
pub const PROGRESS_TYPE: &str = "warren.progress";

/// What happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// An attempt began on a worker.
    Started,
    /// The running task reported progress.
    Progress,
    /// Final: the task returned a result.
    Succeeded,
    /// The attempt failed; final unless [`Event::retry`] says when it runs again.
    Failed,
    /// Final: parked in the dead-letter queue ([`Event::reason`] says why).
    DeadLettered,
    /// Final: its deadline passed before it could run.
    Expired,
    /// Final: cancelled before it finished.
    Cancelled,
}

impl EventKind {
    /// Every kind, in the order of a task's life.
    pub const ALL: [EventKind; 7] = [
        Self::Started,
        Self::Progress,
        Self::Succeeded,
        Self::Failed,
        Self::DeadLettered,
        Self::Expired,
        Self::Cancelled,
    ];

    /// The name on the wire (the AMQP `type` and the body's `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Progress => "progress",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Expired => "expired",
            Self::Cancelled => "cancelled",
        }
    }

    /// The kind named `name`, if it is one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress a running task reported: a fraction done, a message, a JSON detail, any of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// How much is done, from 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// What it is doing, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Anything else, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<RawJson>,
}

/// The longest progress message, in bytes: an update with a longer one is dropped.
pub const MAX_PROGRESS_MESSAGE_BYTES: usize = 1024;

/// The largest progress detail, in bytes of JSON text: an update with a larger one is dropped.
pub const MAX_PROGRESS_DETAIL_BYTES: usize = 4 * 1024;

impl Progress {
    /// `fraction` done (0.0 to 1.0), and nothing else.
    pub fn fraction(fraction: f64) -> Self {
        Self::default().with_fraction(fraction)
    }

    /// A message for people, and nothing else.
    pub fn message(message: impl Into<String>) -> Self {
        Self::default().with_message(message)
    }

    /// The same, `fraction` done.
    #[must_use]
    pub fn with_fraction(mut self, fraction: f64) -> Self {
        self.fraction = Some(fraction);
        self
    }

    /// The same, with `message`.
    #[must_use]
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The same, with `detail` as its JSON detail; a value that does not serialize to JSON (a
    /// map with non-string keys) is left out.
    #[must_use]
    pub fn with_detail<T: Serialize + ?Sized>(mut self, detail: &T) -> Self {
        self.detail = RawJson::to_json(detail).ok();
        self
    }

    /// The update as it is passed on: a fraction outside 0..=1 clamped into it, a NaN fraction
    /// left out (the message and detail still count).
    ///
    /// # Errors
    /// [`BadProgress`] for an update with nothing in it, a message over
    /// [`MAX_PROGRESS_MESSAGE_BYTES`] or a detail over [`MAX_PROGRESS_DETAIL_BYTES`].
    pub fn checked(mut self) -> Result<Self, BadProgress> {
        self.fraction = self
            .fraction
            .filter(|f| !f.is_nan())
            .map(|f| f.clamp(0.0, 1.0));
        if let Some(m) = &self.message
            && m.len() > MAX_PROGRESS_MESSAGE_BYTES
        {
            return Err(BadProgress::MessageTooLong(m.len()));
        }
        if let Some(d) = &self.detail
            && d.get().len() > MAX_PROGRESS_DETAIL_BYTES
        {
            return Err(BadProgress::DetailTooLarge(d.get().len()));
        }
        if self.fraction.is_none() && self.message.is_none() && self.detail.is_none() {
            return Err(BadProgress::Empty);
        }
        Ok(self)
    }
}

/// Why a progress update is not passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadProgress {
    /// No fraction (or only a NaN), no message, no detail.
    #[error("a progress update with nothing in it")]
    Empty,
    /// The message is over [`MAX_PROGRESS_MESSAGE_BYTES`].
    #[error("a progress message of {0} bytes; at most {MAX_PROGRESS_MESSAGE_BYTES}")]
    MessageTooLong(usize),
    /// The detail is over [`MAX_PROGRESS_DETAIL_BYTES`].
    #[error("a progress detail of {0} bytes of JSON; at most {MAX_PROGRESS_DETAIL_BYTES}")]
    DetailTooLarge(usize),
}

/// A progress message as a caller receives it on its reply address ([`PROGRESS_TYPE`]): what
/// the task reported, and the attempt that reported it (a retry starts over).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallerProgress {
    /// The attempt that reported it, from 1.
    pub attempt: u32,
    /// What it reported.
    #[serde(flatten)]
    pub progress: Progress,
}

impl CallerProgress {
    /// The message body: the [`Progress`] object with `"attempt"` added.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a progress update always serialises")
    }

    /// Reads a message body written by [`CallerProgress::to_body`] (an `attempt` that is
    /// missing is 0).
    ///
    /// # Errors
    /// A [`serde_json::Error`] when the body is not such an object.
    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Attempt {
            #[serde(default)]
            attempt: u32,
        }
        // serde would read a struct from an array of its fields too.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(serde::de::Error::custom(
                "a progress update is a JSON object",
            ));
        }
        // Twice, small as it is: `flatten` cannot read the detail as raw JSON text.
        let progress: Progress = serde_json::from_slice(body)?;
        let Attempt { attempt } = serde_json::from_slice(body)?;
        Ok(Self { attempt, progress })
    }
}

/// A failure's kind and message, as in a reply's `error`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventError {
    /// The error kind (`handler_error`, `timeout`, ...; see `docs/protocol.md`).
    pub kind: String,
    /// What went wrong, for people.
    pub message: String,
}

/// When a failed attempt runs again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryAt {
    /// The next attempt's number.
    pub attempt: u32,
    /// When it is due, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// One event: the JSON body of a stream message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The format version, [`EVENT_VERSION`].
    pub v: u32,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The task's id.
    pub task_id: String,
    /// The task's function.
    pub function: String,
    /// The queue it was consumed from.
    pub queue: String,
    /// Its attempt, from 1.
    pub attempt: u32,
    /// The worker that appended the event (its `--name`).
    pub worker: String,
    /// When it happened, in milliseconds since the Unix epoch (the worker's clock).
    pub at_ms: i64,
    /// The batch the task belongs to, if any (`x-warren-batch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Who enqueued it, if it said (`x-warren-origin`: a gateway session, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// The task's W3C `traceparent`, if it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// `progress`: its number within the attempt, from 1 (dedupe key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// `progress`: what the task reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// `succeeded`: the result, unless it was over the cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RawJson>,
    /// `succeeded`: the result was over the cap and is left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// `failed`, `dead_lettered`, `expired`, `cancelled`: the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<EventError>,
    /// `failed`: when it runs again; absent when this failure is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryAt>,
    /// `dead_lettered` and `cancelled`: why (`max_attempts`, `permanent`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The fields every event of one attempt shares, from which each event is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The task's id.
    pub task_id: String,
    /// Its function.
    pub function: String,
    /// The queue it came from.
    pub queue: String,
    /// Its attempt.
    pub attempt: u32,
    /// The worker's name.
    pub worker: String,
    /// Its batch, if any.
    pub batch: Option<String>,
    /// Its origin, if any.
    pub origin: Option<String>,
    /// Its traceparent, if any.
    pub traceparent: Option<String>,
}

impl Subject {
    /// An event of `kind` about this attempt, happening now, with no kind-specific fields.
    pub fn event(&self, kind: EventKind) -> Event {
        Event {
            v: EVENT_VERSION,
            kind,
            task_id: self.task_id.clone(),
            function: self.function.clone(),
            queue: self.queue.clone(),
            attempt: self.attempt,
            worker: self.worker.clone(),
            at_ms: epoch_millis(SystemTime::now()),
            batch: self.batch.clone(),
            origin: self.origin.clone(),
            traceparent: self.traceparent.clone(),
            seq: None,
            progress: None,
            result: None,
            truncated: false,
            error: None,
            retry: None,
            reason: None,
        }
    }
}

impl Event {
    /// Whether this event settles the task: no other final event follows it for this task
    /// (`succeeded`, `dead_lettered`, `expired`, `cancelled`, and `failed` without a retry).
    pub fn is_final(&self) -> bool {
        match self.kind {
            EventKind::Started | EventKind::Progress => false,
            EventKind::Failed => self.retry.is_none(),
            _ => true,
        }
    }

    /// What identifies the event across duplicates: `<task id>/<attempt>/<type>`, plus
    /// `/<seq>` for progress. The same text is the message's `message_id`.
    pub fn dedupe_key(&self) -> String {
        match self.seq {
            Some(seq) => format!("{}/{}/{}/{seq}", self.task_id, self.attempt, self.kind),
            None => format!("{}/{}/{}", self.task_id, self.attempt, self.kind),
        }
    }

    /// The AMQP properties the event is appended with.
    pub fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_app_id(APP_ID.into())
            .with_type(self.kind.as_str().into())
            .with_message_id(self.dedupe_key().as_str().into())
            .with_correlation_id(self.task_id.as_str().into())
            .with_timestamp(u64::try_from(self.at_ms / 1000).unwrap_or(0))
    }

    /// The JSON body.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event always serialises")
    }
}

/// Whether one more event body of `next` bytes fits in a pack of `count` events whose body
/// has `bytes` bytes so far: within [`MAX_PACK_EVENTS`] and [`MAX_PACK_BYTES`] (brackets and
/// commas included). The first event always fits: one larger than the bound goes alone.
pub fn pack_fits(count: usize, bytes: usize, next: usize) -> bool {
    count == 0 || (count < MAX_PACK_EVENTS && bytes + 1 + next < MAX_PACK_BYTES)
}

/// Several events packed into one stream message (AMQP `type` [`PACK_TYPE`], a JSON array
/// body), built from their bodies as [`Event::to_body`] wrote them.
#[derive(Debug, Clone, Default)]
pub struct Pack {
    body: Vec<u8>,
    count: usize,
    newest_ms: i64,
}

impl Pack {
    /// An empty pack.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events in it.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no event.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of its body so far (without the closing bracket).
    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    /// Whether an event body of `bytes` fits within [`MAX_PACK_EVENTS`] and
    /// [`MAX_PACK_BYTES`] (the first event always does).
    pub fn fits(&self, bytes: usize) -> bool {
        pack_fits(self.count, self.body.len(), bytes)
    }

    /// Adds an event: its JSON body ([`Event::to_body`]) and its time.
    pub fn push(&mut self, body: &[u8], at_ms: i64) {
        self.body.push(if self.count == 0 { b'[' } else { b',' });
        self.body.extend_from_slice(body);
        self.count += 1;
        self.newest_ms = self.newest_ms.max(at_ms);
    }

    /// The message's properties: [`PACK_TYPE`], JSON, persistent, stamped with its newest
    /// event's time; no `message_id` or `correlation_id` (readers dedupe each event).
    pub fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_app_id(APP_ID.into())
            .with_type(PACK_TYPE.into())
            .with_timestamp(u64::try_from(self.newest_ms / 1000).unwrap_or(0))
    }

    /// The message body: the JSON array of its events.
    pub fn into_body(mut self) -> Vec<u8> {
        if self.count == 0 {
            self.body.push(b'[');
        }
        self.body.push(b']');
        self.body
    }
}

/// The arguments the stream is declared with: a stream queue with retention by age and size,
/// in segments of [`segment_bytes`]. A stream replicates to every node of the cluster by
/// default.
pub fn stream_args(max_age: Duration, max_bytes: u64) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(max_age_text(max_age).into()),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(max_bytes).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(segment_bytes(max_bytes)).unwrap_or(i64::MAX)),
    );
    args
}

/// RabbitMQ's `x-max-age` text (`24h`, `90s`...): the largest whole unit that is exact.
fn max_age_text(age: Duration) -> String {
    let s = age.as_secs().max(1);
    for (unit, size) in [("D", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

/// Declares the stream `name` (durable) with the given retention.
///
/// # Errors
/// The broker's error: `406 PRECONDITION_FAILED - inequivalent arg` when the stream exists with
/// other retention ([`crate::topology::inequivalent_arg`]), `403` without configure permission.
pub async fn declare_stream(
    channel: &Channel,
    name: &str,
    max_age: Duration,
    max_bytes: u64,
) -> Result<(), lapin::Error> {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            stream_args(max_age, max_bytes),
        )
        .await
        .map(drop)
}

/// Whether the stream (or any queue) `name` exists: a passive declaration, which needs no
/// permission and leaves the stream as it is.
///
/// # Errors
/// The broker's error other than `404 NOT_FOUND` (a missing queue, which also closes the
/// channel: use one of its own).
pub async fn stream_exists(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the existing queue `name` is a stream: it is declared again with `x-queue-type:
/// stream` alone, which the broker refuses naming `x-queue-type` when the queue is of another
/// type (and naming another argument when it is a stream with retention arguments). Needs
/// `configure` permission; call it only for a queue known to exist, which it leaves as it is (a
/// missing one would be declared, without retention).
///
/// # Errors
/// The broker's error other than `406 PRECONDITION_FAILED` (which also closes the channel:
/// use one of its own).
pub async fn is_stream(channel: &Channel, name: &str) -> Result<bool, lapin::Error> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    match channel.queue_declare(name.into(), durable, args).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => {
                Ok(!amqp.get_message().as_str().contains("'x-queue-type'"))
            }
            _ => Err(e),
        },
    }
}

/// Whether the broker answered `404 NOT_FOUND`.
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404
    )
}

/// Where a reader starts in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The oldest event still kept.
    First,
    /// Only events appended after the reader attaches.
    Next,
    /// The last chunk already written (its events, then everything after): a follower that
    /// must know its position at once starts here, as the gateway's tail does.
    Last,
    /// At this offset (the event with it, and everything after).
    Offset(u64),
    /// At the first chunk written at or after this time (whole seconds, the broker's clock;
    /// a chunk holds many events, so a few earlier events may come too).
    Time(SystemTime),
}

impl Start {
    fn argument(self) -> AMQPValue {
        match self {
            Self::First => AMQPValue::LongString("first".into()),
            Self::Next => AMQPValue::LongString("next".into()),
            Self::Last => AMQPValue::LongString("last".into()),
            Self::Offset(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
            Self::Time(t) => AMQPValue::Timestamp(
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
        }
    }
}

/// How many events a reader may hold unacknowledged (a stream consumer must set a prefetch;
/// its acks are credit, not removal).
pub const READ_PREFETCH: u16 = 500;

/// Starts reading the stream `name` from `start` on `channel` (its prefetch is set to
/// `prefetch`, which must not be 0). Ack each delivery (acks are credit); decode it with
/// [`decode`] (a delivery may carry several events).
///
/// # Errors
/// [`ReadError::NoPrefetch`] for a prefetch of 0; the broker's error otherwise (`404` when the
/// stream does not exist, which closes the channel).
pub async fn read(
    channel: &Channel,
    name: &str,
    start: Start,
    prefetch: u16,
    consumer_tag: &str,
) -> Result<Consumer, ReadError> {
    if prefetch == 0 {
        return Err(ReadError::NoPrefetch);
    }
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), start.argument());
    Ok(channel
        .basic_consume(
            name.into(),
            consumer_tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?)
}

/// Why reading the stream could not start, or an event could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// A stream consumer needs a prefetch above 0 (RabbitMQ refuses it otherwise).
    #[error("a stream reader needs a prefetch above 0")]
    NoPrefetch,
    /// The broker refused (no such stream, no permission...).
    #[error("could not read the event stream: {0}")]
    Broker(#[from] lapin::Error),
    /// A delivery without its `x-stream-offset` header: not from a stream.
    #[error("a delivery without an x-stream-offset header: the queue is not a stream")]
    NoOffset,
    /// A message in the stream that is not a Warren event (nor a pack of them).
    #[error("offset {offset}: not a Warren event: {error}")]
    NotAnEvent {
        /// Where it is.
        offset: u64,
        /// What is wrong with it.
        error: serde_json::Error,
    },
}

/// The stream offset of a delivery from a stream reader.
pub fn offset_of(properties: &BasicProperties) -> Option<u64> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from("x-stream-offset"))? {
        AMQPValue::LongLongInt(o) => u64::try_from(*o).ok(),
        AMQPValue::LongUInt(o) => Some(u64::from(*o)),
        AMQPValue::LongInt(o) => u64::try_from(*o).ok(),
        _ => None,
    }
}

/// Whether a message with these properties packs several events ([`PACK_TYPE`]).
pub fn is_pack(properties: &BasicProperties) -> bool {
    properties
        .kind()
        .as_ref()
        .is_some_and(|k| k.as_str() == PACK_TYPE)
}

/// The JSON text of each event of a message, in order, without decoding the events: the body
/// itself for a message of one event, each element of the array for a pack ([`PACK_TYPE`]).
///
/// # Errors
/// A [`serde_json::Error`] when a pack's body is not a JSON array.
pub fn split<'a>(
    properties: &BasicProperties,
    body: &'a [u8],
) -> Result<Vec<&'a RawValue>, serde_json::Error> {
    if is_pack(properties) {
        serde_json::from_slice(body)
    } else {
        serde_json::from_slice(body).map(|one| vec![one])
    }
}

/// The events of one stream message, in order, each with its JSON text as appended.
pub type MessageEvents<'a> = Vec<(Event, &'a RawValue)>;

/// Every event of a delivery from a stream reader, in order, with its offset: one for a
/// message of one event, several for a pack ([`PACK_TYPE`]). Each comes with its index in the
/// message (its position in the list) and its JSON text as appended. The one way Warren
/// reads the stream's messages.
///
/// # Errors
/// [`ReadError::NoOffset`] without an offset header; [`ReadError::NotAnEvent`] when the body
/// is not an event or a pack of them (the offset is still known: skip it and go on).
pub fn decode<'a>(
    properties: &BasicProperties,
    body: &'a [u8],
) -> Result<(u64, MessageEvents<'a>), ReadError> {
    let offset = offset_of(properties).ok_or(ReadError::NoOffset)?;
    let not_an_event = |error| ReadError::NotAnEvent { offset, error };
    let events = split(properties, body)
        .map_err(not_an_event)?
        .into_iter()
        .map(|raw| Ok((serde_json::from_str(raw.get())?, raw)))
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(not_an_event)?;
    Ok((offset, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            task_id: "0193a1b2-0000-7000-8000-000000000000".into(),
            function: "send_mail".into(),
            queue: "mail".into(),
            attempt: 2,
            worker: "w1".into(),
            batch: None,
            origin: Some("s1".into()),
            traceparent: None,
        }
    }

    #[test]
    fn an_event_round_trips_and_leaves_out_empty_fields() {
        let mut e = subject().event(EventKind::Succeeded);
        e.result = Some(RawJson::from_string("{\"sent\":true}".into()).unwrap());
        let text = String::from_utf8(e.to_body()).unwrap();
        assert!(text.contains("\"type\":\"succeeded\""), "{text}");
        assert!(
            !text.contains("truncated") && !text.contains("retry"),
            "{text}"
        );
        let back: Event = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert!(back.is_final());
    }

    #[test]
    fn a_failure_with_a_retry_is_not_final() {
        let mut e = subject().event(EventKind::Failed);
        e.retry = Some(RetryAt {
            attempt: 3,
            at_ms: 1,
        });
        assert!(!e.is_final());
        e.retry = None;
        assert!(e.is_final());
    }

    #[test]
    fn dedupe_keys_name_the_attempt_and_progress_number() {
        let mut e = subject().event(EventKind::Progress);
        e.seq = Some(4);
        assert_eq!(
            e.dedupe_key(),
            "0193a1b2-0000-7000-8000-000000000000/2/progress/4"
        );
        let s = subject().event(EventKind::Started);
        assert_eq!(
            s.dedupe_key(),
            "0193a1b2-0000-7000-8000-000000000000/2/started"
        );
        assert_eq!(s.properties().kind().as_ref().unwrap().as_str(), "started");
    }

    #[test]
    fn progress_is_clamped_and_bounded() {
        let p = Progress::fraction(1.5)
            .with_message("resizing")
            .checked()
            .unwrap();
        assert_eq!(p.fraction, Some(1.0));
        assert_eq!(
            Progress::fraction(-2.0).checked().unwrap().fraction,
            Some(0.0)
        );
        // A NaN fraction is left out; with nothing else, there is nothing to pass on.
        assert_eq!(
            Progress::fraction(f64::NAN).checked(),
            Err(BadProgress::Empty)
        );
        let p = Progress::fraction(f64::NAN)
            .with_message("m")
            .checked()
            .unwrap();
        assert_eq!(p.fraction, None);
        let long = "x".repeat(MAX_PROGRESS_MESSAGE_BYTES + 1);
        assert_eq!(
            Progress::message(long).checked(),
            Err(BadProgress::MessageTooLong(MAX_PROGRESS_MESSAGE_BYTES + 1))
        );
        let big = "y".repeat(MAX_PROGRESS_DETAIL_BYTES);
        assert!(matches!(
            Progress::default().with_detail(&big).checked(),
            Err(BadProgress::DetailTooLarge(_))
        ));
        assert!(Progress::message("é".repeat(512)).checked().is_ok());
    }

    #[test]
    fn a_caller_progress_body_is_the_progress_with_its_attempt() {
        let update = CallerProgress {
            attempt: 2,
            progress: Progress::fraction(0.25)
                .with_message("page 1")
                .with_detail(&serde_json::json!({"pages": 4})),
        };
        let body = update.to_body();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"attempt": 2, "fraction": 0.25, "message": "page 1", "detail": {"pages": 4}})
        );
        assert_eq!(CallerProgress::decode(&body).unwrap(), update);
        assert!(CallerProgress::decode(b"[1]").is_err());
    }

    fn delivered(properties: BasicProperties, offset: i64) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("x-stream-offset".into(), AMQPValue::LongLongInt(offset));
        properties.with_headers(headers)
    }

    #[test]
    fn a_pack_and_a_single_event_decode_alike() {
        let started = subject().event(EventKind::Started);
        let mut done = subject().event(EventKind::Succeeded);
        done.at_ms += 1500;
        done.result = Some(RawJson::from_string("[1, 2]".into()).unwrap());
        let mut pack = Pack::new();
        for e in [&started, &done] {
            assert!(pack.fits(e.to_body().len()));
            pack.push(&e.to_body(), e.at_ms);
        }
        assert_eq!(pack.len(), 2);
        let properties = delivered(pack.properties(), 7);
        assert!(is_pack(&properties));
        assert!(properties.message_id().is_none() && properties.correlation_id().is_none());
        assert_eq!(
            properties.timestamp(),
            &Some(u64::try_from(done.at_ms / 1000).unwrap())
        );
        let body = pack.into_body();
        let (offset, events) = decode(&properties, &body).unwrap();
        assert_eq!(offset, 7);
        let got: Vec<&Event> = events.iter().map(|(e, _)| e).collect();
        assert_eq!(got, [&started, &done]);
        assert_eq!(events[1].1.get().as_bytes(), done.to_body().as_slice());

        let one = delivered(started.properties(), 9);
        let alone = started.to_body();
        let (offset, events) = decode(&one, &alone).unwrap();
        assert_eq!((offset, events.len()), (9, 1));
        assert_eq!(events[0].0, started);
        // A pack whose body is no array, and an event body that is an array, are not events.
        assert!(decode(&properties, &started.to_body()).is_err());
        assert!(decode(&one, b"[]").is_err());
    }

    #[test]
    fn a_pack_is_bounded_by_count_and_bytes_and_takes_one_large_event() {
        let mut pack = Pack::new();
        assert!(pack.fits(MAX_PACK_BYTES * 2), "the first event always fits");
        pack.push(b"{}", 0);
        assert!(!pack.fits(MAX_PACK_BYTES));
        for _ in 1..MAX_PACK_EVENTS {
            assert!(pack.fits(2));
            pack.push(b"{}", 0);
        }
        assert!(!pack.fits(2));
        assert_eq!(Pack::new().into_body(), b"[]");
    }

    #[test]
    fn kinds_parse_their_own_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(EventKind::parse("done"), None);
    }

    #[test]
    fn a_stream_keeps_at_least_four_segments_of_at_most_64_mib() {
        assert_eq!(segment_bytes(DEFAULT_MAX_BYTES), SEGMENT_BYTES);
        assert_eq!(segment_bytes(4 * SEGMENT_BYTES), SEGMENT_BYTES);
        assert_eq!(segment_bytes(2 * SEGMENT_BYTES), SEGMENT_BYTES / 2);
        assert_eq!(segment_bytes(16 * 1024), 4 * 1024);
        assert_eq!(segment_bytes(3), 1);
        let args = stream_args(DEFAULT_MAX_AGE, 16 * 1024);
        assert_eq!(
            args.inner()
                .get(&ShortString::from("x-stream-max-segment-size-bytes")),
            Some(&AMQPValue::LongLongInt(4 * 1024))
        );
    }

    #[test]
    fn max_age_uses_the_largest_exact_unit() {
        assert_eq!(max_age_text(Duration::from_secs(86_400)), "1D");
        assert_eq!(max_age_text(Duration::from_secs(7200)), "2h");
        assert_eq!(max_age_text(Duration::from_secs(90)), "90s");
        assert_eq!(max_age_text(Duration::from_secs(600)), "10m");
    }
}
