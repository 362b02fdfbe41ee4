//! Reading the event stream up to its end, and finding a task's outcome there.
//!
//! Two questions every reader of `warren.events` asks: "what happened to task X?" (a caller that
//! went away, `warren result`, the gateway's `GET /api/tasks/<id>`) and "what happened lately?"
//! (`warren events`). Both read the stream with [`events::read`] and [`events::decode`] (a
//! message holds one event, or several packed together); this module adds what they share:
//! where to start, when the reader has caught up with the end of the stream, and dropping
//! duplicate events.
//!
//! **Where to start.** A UUIDv7 task id carries the time it was made ([`TaskId::created_at`]):
//! a lookup starts at the chunk written [`TIME_MARGIN`] before it, so it reads the task's own
//! events and what came after them, not the whole stream. Any other id is read from the oldest
//! event kept. A lookup stops at the task's final event.
//!
//! **When the reader has caught up.** A stream consumer never says "this was the last one": it
//! waits for the next event. So before reading, a [`Reader`] looks at the stream's last chunk
//! (a reader at `last`, closed again) to learn the tail's offset. It has caught up when it has
//! read past that offset and then either nothing more arrives for [`DEFAULT_QUIET`] or an event
//! stamped after the read began arrives (on a busy stream the quiet never comes). A pause in
//! deliveries before the tail (a broker that is slow to read its segments) does not end it. A
//! reader that starts after the tail (a task id made after the last event) has nothing to read
//! and ends after the quiet period (or, when the stamps cannot tell, after [`TAIL_WAIT`] without
//! a first delivery); so does one on an empty stream, after [`TAIL_WAIT`] for the last chunk.
//! Callers bound the whole with a timeout.
//!
//! **Duplicates.** A worker killed between its append and its ack appends an event again;
//! [`Seen`] drops events whose [`Event::dedupe_key`] it has seen, remembering a bounded number
//! of bytes of keys.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::{BasicProperties, Channel, Connection, Consumer};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::TaskId;
use crate::broker::is_not_found;
use crate::events::{self, Event, EventKind, Progress, ReadError, Start};

/// How far before a UUIDv7 id's time a lookup starts reading (clocks of callers and brokers
/// differ a little, and the broker's seek goes by whole seconds).
pub const TIME_MARGIN: Duration = Duration::from_secs(5);

/// How long a reader past the stream's tail waits for another event before it decides it has
/// caught up.
pub const DEFAULT_QUIET: Duration = Duration::from_millis(200);

/// How long a reader waits for the stream's last chunk before it takes the stream to be empty.
pub const TAIL_WAIT: Duration = Duration::from_secs(1);

/// How long a lookup that does not wait may take to catch up with the stream before it gives
/// up ([`LookupError::TooSlow`]).
pub const DEFAULT_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest task id looked up: what an AMQP `correlation_id` holds.
pub const MAX_TASK_ID_BYTES: usize = 255;

/// How many bytes of dedupe keys a [`Seen`] keeps by default (the oldest go first).
pub const DEFAULT_SEEN_BYTES: usize = 4 * 1024 * 1024;

/// Where a lookup reads, and what it tells about retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupSettings {
    /// The event stream ([`events::DEFAULT_STREAM`]).
    pub stream: String,
    /// How long the stream keeps events ([`events::DEFAULT_MAX_AGE`]): a task not found was
    /// never seen, or is older than this.
    pub retention: Duration,
    /// See [`DEFAULT_QUIET`].
    pub quiet: Duration,
    /// See [`DEFAULT_CATCH_UP_TIMEOUT`].
    pub catch_up_timeout: Duration,
}

impl Default for LookupSettings {
    fn default() -> Self {
        Self {
            stream: events::DEFAULT_STREAM.to_owned(),
            retention: events::DEFAULT_MAX_AGE,
            quiet: DEFAULT_QUIET,
            catch_up_timeout: DEFAULT_CATCH_UP_TIMEOUT,
        }
    }
}

/// A task id that cannot be looked up; refused before anything is asked of the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadTaskId {
    /// The id is empty.
    #[error("the task id is empty")]
    Empty,
    /// The id is longer than [`MAX_TASK_ID_BYTES`].
    #[error("the task id is {0} bytes long; task ids have at most {MAX_TASK_ID_BYTES}")]
    TooLong(usize),
    /// The id holds control characters (a newline, say).
    #[error("the task id holds control characters")]
    Control,
}

/// Checks that `id` can be a task id: not empty, at most [`MAX_TASK_ID_BYTES`], no control
/// characters.
///
/// # Errors
/// The [`BadTaskId`] that says what is wrong.
pub fn check_task_id(id: &str) -> Result<(), BadTaskId> {
    if id.is_empty() {
        return Err(BadTaskId::Empty);
    }
    if id.len() > MAX_TASK_ID_BYTES {
        return Err(BadTaskId::TooLong(id.len()));
    }
    if id.chars().any(char::is_control) {
        return Err(BadTaskId::Control);
    }
    Ok(())
}

/// Where a lookup of `id` starts: [`TIME_MARGIN`] before a UUIDv7 id's time, else the oldest
/// event kept.
pub fn start_for(id: &TaskId) -> Start {
    match id.created_at() {
        Some(at) => Start::Time(
            at.checked_sub(TIME_MARGIN)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        ),
        None => Start::First,
    }
}

/// Why the stream could not be read to the end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The task id cannot be one.
    #[error("bad task id: {0}")]
    BadId(#[from] BadTaskId),
    /// The stream does not exist.
    #[error(
        "no event stream {0}: workers declare it when they start (is the name right? see \
         --events-stream)"
    )]
    NoStream(String),
    /// The broker refused or the connection failed.
    #[error("cannot read the event stream {stream}: {error}")]
    Broker {
        /// The stream.
        stream: String,
        /// The broker's error.
        error: lapin::Error,
    },
    /// The reader could not start (see [`ReadError`]).
    #[error(transparent)]
    Read(ReadError),
    /// The reader was cancelled by the broker (the stream was deleted while it was read).
    #[error("the event stream {0} stopped delivering (deleted while it was read?)")]
    Ended(String),
    /// Catching up with the stream took longer than allowed.
    #[error("still reading the event stream {stream} after {after:?} ({read} events read)")]
    TooSlow {
        /// The stream.
        stream: String,
        /// How long it read.
        after: Duration,
        /// How many events it had read.
        read: u64,
    },
}

impl LookupError {
    fn of(stream: &str, error: ReadError) -> Self {
        match error {
            ReadError::Broker(error) => Self::broker(stream, error),
            other => Self::Read(other),
        }
    }

    fn broker(stream: &str, error: lapin::Error) -> Self {
        if is_not_found(&error) {
            return Self::NoStream(stream.to_owned());
        }
        Self::Broker {
            stream: stream.to_owned(),
            error,
        }
    }
}

/// The dedupe keys of events already seen, bounded by bytes: past the bound, the oldest keys
/// are forgotten (a duplicate follows its original closely: it comes from the redelivery of a
/// task whose worker died).
#[derive(Debug)]
pub struct Seen {
    keys: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    bytes: usize,
    max_bytes: usize,
}

impl Default for Seen {
    fn default() -> Self {
        Self::new(DEFAULT_SEEN_BYTES)
    }
}

impl Seen {
    /// Memory a key costs besides its text (two pointers, the set's slot).
    const OVERHEAD: usize = 48;

    /// Remembers at most `max_bytes` of keys.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            keys: HashSet::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// True the first time `event` is seen, false for a duplicate.
    pub fn first_time(&mut self, event: &Event) -> bool {
        let key: Arc<str> = event.dedupe_key().into();
        if self.keys.contains(&key) {
            return false;
        }
        self.bytes += key.len() + Self::OVERHEAD;
        self.order.push_back(key.clone());
        self.keys.insert(key);
        while self.bytes > self.max_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.bytes -= old.len() + Self::OVERHEAD;
            self.keys.remove(&old);
        }
        true
    }
}

/// An event read from the stream.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The offset of the message that carried it.
    pub offset: u64,
    /// Its place in that message, from 0 (a message packs several events under load).
    pub index: u32,
    /// The event.
    pub event: Event,
    /// The event's JSON text as it was appended, for readers that pass it on as it is.
    pub body: Vec<u8>,
}

/// What [`Reader::next`] found.
#[derive(Debug)]
pub enum Step {
    /// An event (not a duplicate).
    Event(Box<Entry>),
    /// The reader has caught up with the end of the stream as it was when reading began; said
    /// once. Later calls return the events appended since, as they come.
    CaughtUp,
}

/// Where the stream ended when a reader began, as far as the reader is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// The reader must read up to this offset before a pause may end it.
    At(u64),
    /// Nothing to read up to: the stream is empty, or the reader starts after its tail.
    Behind,
}

/// A reader of the event stream that knows when it has caught up ([`Step::CaughtUp`]) and
/// drops duplicates. Its channel is its own, closed when the reader is dropped.
#[derive(Debug)]
pub struct Reader {
    stream: String,
    channel: Channel,
    consumer: Consumer,
    tail: Tail,
    /// The read began in this second (events are stamped in whole seconds).
    began_s: u64,
    quiet: Duration,
    caught_up: bool,
    /// Events read and not returned yet: the rest of a message that packed several, or what a
    /// delivery that showed the reader had caught up carried.
    held: VecDeque<Box<Entry>>,
    last_offset: Option<u64>,
    /// Deliveries not acked yet, and the tag of the last.
    unacked: u16,
    last_tag: u64,
    prefetch: u16,
    read: u64,
    seen: Seen,
    /// Closed by [`Reader::close`]: nothing left for the drop to do.
    closed: bool,
}

impl Reader {
    /// Starts reading `stream` from `start` on a channel of its own on `connection`; `quiet` is
    /// the pause after the tail that means "caught up" ([`DEFAULT_QUIET`]).
    ///
    /// # Errors
    /// [`LookupError::NoStream`] when the stream does not exist; [`LookupError::Broker`].
    pub async fn open(
        connection: &Connection,
        stream: &str,
        start: Start,
        quiet: Duration,
    ) -> Result<Self, LookupError> {
        let began = SystemTime::now();
        let tail = tail(connection, stream, start).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| LookupError::broker(stream, e))?;
        let tag = format!("warren-read-{}", uuid::Uuid::new_v4().simple());
        let consumer =
            match events::read(&channel, stream, start, events::READ_PREFETCH, &tag).await {
                Ok(consumer) => consumer,
                Err(e) => {
                    let _ = channel.close(200, "done".into()).await;
                    return Err(LookupError::of(stream, e));
                }
            };
        Ok(Self {
            stream: stream.to_owned(),
            channel,
            consumer,
            tail,
            began_s: unix_seconds(began),
            quiet,
            caught_up: false,
            held: VecDeque::new(),
            last_offset: None,
            unacked: 0,
            last_tag: 0,
            prefetch: events::READ_PREFETCH,
            read: 0,
            seen: Seen::default(),
            closed: false,
        })
    }

    /// Messages read so far (duplicates and other messages included; a message may pack
    /// several events).
    pub fn read_count(&self) -> u64 {
        self.read
    }

    /// The offset of the last message read.
    pub fn last_offset(&self) -> Option<u64> {
        self.last_offset
    }

    /// The next event whose message's AMQP properties `wants` accepts (others are skipped
    /// without decoding their bodies), or [`Step::CaughtUp`] once. A message that packs several
    /// events ([`events::PACK_TYPE`]) is always decoded: its properties do not name a task, so
    /// the caller filters its events. Messages that are not events are skipped.
    ///
    /// # Errors
    /// [`LookupError::Broker`] when the connection or channel fails; [`LookupError::Ended`]
    /// when the broker cancels the reader.
    pub async fn next<F: Fn(&BasicProperties) -> bool>(
        &mut self,
        wants: F,
    ) -> Result<Step, LookupError> {
        if let Some(entry) = self.held.pop_front() {
            return Ok(Step::Event(entry));
        }
        loop {
            let may_end = !self.caught_up
                && match self.tail {
                    Tail::Behind => true,
                    Tail::At(tail) => self.last_offset.is_some_and(|o| o >= tail),
                };
            // A reader that has nothing at all after TAIL_WAIT starts past the tail (its
            // time is later than the last chunk's, by less than the stamps could tell): the
            // broker delivers the first chunk of a seek at once.
            let pause = if may_end {
                Some(self.quiet)
            } else if !self.caught_up && self.last_offset.is_none() {
                Some(TAIL_WAIT.max(self.quiet))
            } else {
                None
            };
            let delivery = if let Some(pause) = pause {
                match tokio::time::timeout(pause, self.consumer.next()).await {
                    Ok(delivery) => delivery,
                    Err(_) => {
                        self.caught_up = true;
                        return Ok(Step::CaughtUp);
                    }
                }
            } else {
                self.consumer.next().await
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(LookupError::broker(&self.stream, e)),
                None => return Err(LookupError::Ended(self.stream.clone())),
            };
            self.read += 1;
            self.credit(delivery.delivery_tag).await?;
            let Some(offset) = events::offset_of(&delivery.properties) else {
                continue;
            };
            self.last_offset = Some(offset);
            // Stamped after the read began: everything before it has been read (a busy
            // stream never pauses).
            let fresh = may_end
                && delivery
                    .properties
                    .timestamp()
                    .is_some_and(|t| t > self.began_s);
            if wants(&delivery.properties) || events::is_pack(&delivery.properties) {
                match events::decode(&delivery.properties, &delivery.data) {
                    Ok((offset, decoded)) => {
                        for (index, (event, raw)) in (0_u32..).zip(decoded) {
                            if self.seen.first_time(&event) {
                                self.held.push_back(Box::new(Entry {
                                    offset,
                                    index,
                                    event,
                                    body: raw.get().as_bytes().to_vec(),
                                }));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(stream = %self.stream, error = %e, "skipping a message");
                    }
                }
            }
            if fresh {
                self.caught_up = true;
                return Ok(Step::CaughtUp);
            }
            if let Some(entry) = self.held.pop_front() {
                return Ok(Step::Event(entry));
            }
        }
    }

    /// Acks (grants credit for) deliveries up to `tag`, one ack for every half prefetch.
    async fn credit(&mut self, tag: u64) -> Result<(), LookupError> {
        self.unacked += 1;
        self.last_tag = tag;
        if self.unacked >= self.prefetch / 2 {
            self.unacked = 0;
            self.channel
                .basic_ack(self.last_tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| LookupError::broker(&self.stream, e))?;
        }
        Ok(())
    }

    /// Closes the reader's channel (dropping the reader does too, in the background).
    pub async fn close(self) {
        let channel = self.channel.clone();
        drop(self);
        let _ =
            tokio::time::timeout(Duration::from_secs(5), channel.close(200, "done".into())).await;
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if !self.closed && self.channel.status().connected() {
            let channel = self.channel.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = channel.close(200, "done".into()).await;
                });
            }
        }
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where the stream ends now, for a reader starting at `start`: the offset of the first event
/// of its last chunk, read by a reader at `last` on a channel of its own.
async fn tail(connection: &Connection, stream: &str, start: Start) -> Result<Tail, LookupError> {
    if start == Start::Next {
        return Ok(Tail::Behind);
    }
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| LookupError::broker(stream, e))?;
    let tag = format!("warren-tail-{}", uuid::Uuid::new_v4().simple());
    let found = async {
        let mut consumer = events::read(&channel, stream, Start::Last, 1, &tag)
            .await
            .map_err(|e| LookupError::of(stream, e))?;
        match tokio::time::timeout(TAIL_WAIT, consumer.next()).await {
            // Nothing at all: an empty stream.
            Err(_) => Ok(None),
            Ok(Some(Ok(delivery))) => Ok(Some(delivery.properties)),
            Ok(Some(Err(e))) => Err(LookupError::broker(stream, e)),
            Ok(None) => Err(LookupError::Ended(stream.to_owned())),
        }
    }
    .await;
    let _ = channel.close(200, "done".into()).await;
    let Some(last) = found? else {
        return Ok(Tail::Behind);
    };
    let Some(tail) = events::offset_of(&last) else {
        return Ok(Tail::Behind);
    };
    let behind = match start {
        Start::Offset(offset) => offset > tail,
        // The last chunk was written before the reader's time (with a second to spare: the
        // event's stamp is the worker's clock, the chunk's the broker's): nothing to read.
        Start::Time(at) => last
            .timestamp()
            .is_some_and(|stamped| stamped + 1 < unix_seconds(at)),
        Start::First | Start::Last | Start::Next => false,
    };
    Ok(if behind { Tail::Behind } else { Tail::At(tail) })
}

/// What became of a task, as far as the event stream tells.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Outcome {
    /// The task is settled: `event` is its final event (`succeeded` with its result, or
    /// marked `truncated`; `failed` with no retry; `dead_lettered`; `expired`; `cancelled`).
    Settled {
        /// The final event.
        event: Box<Event>,
    },
    /// The task has events but no final one yet: queued for a retry, or running.
    Pending {
        /// The last event seen (`started`, `progress`, or `failed` with a retry).
        event: Box<Event>,
        /// The last progress reported by the latest attempt, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<Progress>,
    },
    /// No event of the task in the stream: an id that was never enqueued, a task not started
    /// yet, or one older than the stream's retention.
    NotFound {
        /// How long the stream keeps events, in seconds.
        retention_s: u64,
        /// The same, for people.
        message: String,
    },
}

impl Outcome {
    fn not_found(retention: Duration) -> Self {
        Self::NotFound {
            retention_s: retention.as_secs(),
            message: format!(
                "no event of this task within the events kept ({}): the id is unknown, the \
                 task has not started yet, or it is older than that",
                span_text(retention)
            ),
        }
    }

    /// Whether the task is settled and succeeded.
    pub fn succeeded(&self) -> bool {
        matches!(self, Self::Settled { event } if event.kind == EventKind::Succeeded)
    }

    /// The final or last event, if any.
    pub fn event(&self) -> Option<&Event> {
        match self {
            Self::Settled { event } | Self::Pending { event, .. } => Some(event),
            Self::NotFound { .. } => None,
        }
    }
}

/// A task's [`Outcome`] with its id: `{"task_id": ..., "state": ..., ...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskOutcome {
    /// The task's id.
    pub task_id: String,
    /// What became of it.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// `24h`, `90m`, `45s`: a retention for people.
fn span_text(span: Duration) -> String {
    let s = span.as_secs();
    match s {
        0 => "0s".to_owned(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The events of one task, as they are read.
#[derive(Debug, Default)]
struct Tracker {
    last: Option<Box<Event>>,
    /// The last progress of the attempt of `last`.
    progress: Option<(u32, Progress)>,
}

impl Tracker {
    fn push(&mut self, event: Box<Event>) -> Option<Outcome> {
        if event.is_final() {
            return Some(Outcome::Settled { event });
        }
        if let Some(progress) = &event.progress
            && event.kind == EventKind::Progress
        {
            self.progress = Some((event.attempt, progress.clone()));
        }
        self.last = Some(event);
        None
    }

    fn outcome(&self, retention: Duration) -> Outcome {
        match &self.last {
            Some(event) => Outcome::Pending {
                progress: self
                    .progress
                    .as_ref()
                    .filter(|(attempt, _)| *attempt == event.attempt)
                    .map(|(_, p)| p.clone()),
                event: event.clone(),
            },
            None => Outcome::not_found(retention),
        }
    }
}

/// Finds what became of task `id` in the event stream, over `connection`.
///
/// Without `wait`, it reads until the task's final event or until it has caught up with the
/// stream (at most [`LookupSettings::catch_up_timeout`]) and answers settled, pending or not
/// found. With `wait`, it keeps following the stream for new events until the final one, for
/// at most `wait` in all, and then answers what it knows (pending or not found); `caught_up`
/// is told what it knew when it caught up with the stream and began to wait (a caller can show
/// it meanwhile).
///
/// # Errors
/// [`LookupError::BadId`] before asking the broker anything; [`LookupError::NoStream`];
/// [`LookupError::TooSlow`] when it could not catch up in time (without `wait`);
/// [`LookupError::Broker`], [`LookupError::Ended`].
pub async fn find(
    connection: &Connection,
    settings: &LookupSettings,
    id: &TaskId,
    wait: Option<Duration>,
    mut caught_up: Option<oneshot::Sender<TaskOutcome>>,
) -> Result<TaskOutcome, LookupError> {
    check_task_id(id.as_str())?;
    let began = tokio::time::Instant::now();
    let give_up = began + wait.unwrap_or(settings.catch_up_timeout);
    let mut reader =
        Reader::open(connection, &settings.stream, start_for(id), settings.quiet).await?;
    let wanted = id.as_str();
    let wants = |p: &BasicProperties| {
        p.correlation_id()
            .as_ref()
            .is_some_and(|c| c.as_str() == wanted)
    };
    let mut tracker = Tracker::default();
    let outcome = loop {
        let step = match tokio::time::timeout_at(give_up, reader.next(wants)).await {
            Ok(step) => step?,
            Err(_) if wait.is_some() => break tracker.outcome(settings.retention),
            Err(_) => {
                return Err(LookupError::TooSlow {
                    stream: settings.stream.clone(),
                    after: began.elapsed(),
                    read: reader.read_count(),
                });
            }
        };
        match step {
            Step::Event(entry) if entry.event.task_id == wanted => {
                if let Some(settled) = tracker.push(Box::new(entry.event)) {
                    break settled;
                }
            }
            Step::Event(_) => {}
            Step::CaughtUp if wait.is_none() => break tracker.outcome(settings.retention),
            Step::CaughtUp => {
                if let Some(tell) = caught_up.take() {
                    let _ = tell.send(TaskOutcome {
                        task_id: wanted.to_owned(),
                        outcome: tracker.outcome(settings.retention),
                    });
                }
            }
        }
    };
    reader.close().await;
    Ok(TaskOutcome {
        task_id: id.as_str().to_owned(),
        outcome,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{RetryAt, Subject};

    fn subject(attempt: u32) -> Subject {
        Subject {
            task_id: "t1".into(),
            function: "f".into(),
            queue: "q".into(),
            attempt,
            worker: "w".into(),
            batch: None,
            origin: None,
            traceparent: None,
        }
    }

    #[test]
    fn bad_ids_are_refused_with_what_is_wrong() {
        assert_eq!(check_task_id(""), Err(BadTaskId::Empty));
        assert_eq!(
            check_task_id(&"x".repeat(256)),
            Err(BadTaskId::TooLong(256))
        );
        assert_eq!(check_task_id("a\nb"), Err(BadTaskId::Control));
        assert_eq!(check_task_id(&"x".repeat(255)), Ok(()));
        assert_eq!(check_task_id("order-17"), Ok(()));
    }

    #[test]
    fn a_v7_id_is_read_from_its_time_less_the_margin_others_from_the_first() {
        let id = TaskId::new();
        let made = id.created_at().unwrap();
        assert_eq!(start_for(&id), Start::Time(made - TIME_MARGIN));
        assert_eq!(start_for(&TaskId::from("order-17")), Start::First);
    }

    #[test]
    fn the_tracker_settles_on_a_final_event_and_keeps_the_attempts_progress() {
        let mut t = Tracker::default();
        assert!(
            t.push(Box::new(subject(1).event(EventKind::Started)))
                .is_none()
        );
        let mut p = subject(1).event(EventKind::Progress);
        p.seq = Some(1);
        p.progress = Some(Progress {
            fraction: Some(0.4),
            ..Progress::default()
        });
        assert!(t.push(Box::new(p)).is_none());
        let mut failed = subject(1).event(EventKind::Failed);
        failed.retry = Some(RetryAt {
            attempt: 2,
            at_ms: 1,
        });
        assert!(t.push(Box::new(failed)).is_none());
        assert!(
            t.push(Box::new(subject(2).event(EventKind::Started)))
                .is_none()
        );
        match t.outcome(Duration::from_secs(3600)) {
            Outcome::Pending { event, progress } => {
                assert_eq!((event.kind, event.attempt), (EventKind::Started, 2));
                assert_eq!(progress, None, "the progress was attempt 1's");
            }
            other => panic!("{other:?}"),
        }
        let mut t = Tracker::default();
        let settled = t.push(Box::new(subject(1).event(EventKind::Succeeded)));
        assert!(settled.is_some_and(|o| o.succeeded()));
    }

    #[test]
    fn not_found_names_the_retention() {
        let json = serde_json::to_value(TaskOutcome {
            task_id: "t1".into(),
            outcome: Tracker::default().outcome(Duration::from_secs(86_400)),
        })
        .unwrap();
        assert_eq!(json["state"], "not_found");
        assert_eq!(json["task_id"], "t1");
        assert_eq!(json["retention_s"], 86_400);
        let message = json["message"].as_str().unwrap();
        assert!(message.contains("(24h)"), "{message}");
    }

    #[test]
    fn seen_drops_duplicates_and_forgets_the_oldest_past_its_bound() {
        let mut seen = Seen::new(200);
        let a = subject(1).event(EventKind::Started);
        assert!(seen.first_time(&a));
        assert!(!seen.first_time(&a));
        for attempt in 2..10 {
            assert!(seen.first_time(&subject(attempt).event(EventKind::Started)));
        }
        assert!(seen.bytes <= 200);
        assert!(seen.first_time(&a), "forgotten past the bound");
    }
}
