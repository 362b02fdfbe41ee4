//! The gateway's one reader of the event stream: it follows `warren.events` from its end and
//! hands each websocket session the events of its own tasks, in stream order.
//!
//! One consumer per gateway process, on a connection of its own (a [`Link`] for consuming: a
//! broker alarm that blocks the publishing connection does not stop it), attached at the last
//! chunk ([`Start::Last`]) so that it knows its position at once, and after a lost connection
//! again right after the last message it handled, so a reconnect loses nothing. A message
//! holds one event or, under load, several packed together ([`events::split`]): the tail
//! handles all of a message's events at once, and hands each on with its [`Place`] (the
//! message's offset and the event's index in it). For each event it reads only the `origin`;
//! an event of an origin no session here has is dropped unparsed.
//!
//! A session registers its origin with an [`Inbox`]: the tail pushes the session's events into
//! it (bounded by bytes; past the bound it marks the inbox overflowed and pushes no more, and
//! the session catches up by reading the stream itself, see `resume.rs`). The tail's position
//! (the offset of the last message it handled, all its events) is stored under the same lock as the routes, after
//! the pushes: so a session that registers, or resets its inbox, and reads the position under
//! that lock knows that every later event reaches its inbox, and one that reads the position
//! before draining its inbox knows that every event up to it is in what it drained.
//!
//! The tail also keeps, for a while, the client ids of the calls a closed session left
//! unanswered ([`Tail::park`]), so that a resume on this gateway can name them.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use lapin::{BasicProperties, Channel, Connection};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use warren_shared::broker::{BrokerSettings, Purpose, Reconnect};
use warren_shared::events::{self, Event, Start};
use warren_shared::link::Link;

/// The consumer tag of the tail.
const TAIL_TAG: &str = "warren-gateway-tail";

/// Bound on cancelling a stream consumer and closing its channel.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// No position yet (stored in the atomics as this value).
const UNKNOWN: u64 = u64::MAX;

/// Deliveries acknowledged together (a stream's acks are credit: one per many is enough).
pub(crate) const ACK_EVERY: u64 = 64;

/// How long the tail reads from the last chunk with nothing coming before it takes the stream
/// for empty (the last chunk of a stream that has one comes at once).
const SETTLE: Duration = Duration::from_secs(5);

/// Read a little before a time taken on this machine: the broker's clock may differ.
pub(crate) const CLOCK_SLACK: Duration = Duration::from_secs(10);

/// How long a closed session's unanswered client ids are kept for a resume on this gateway.
const PARK_FOR: Duration = Duration::from_secs(600);

/// Most client ids kept for closed sessions, all sessions together.
const MAX_PARKED_IDS: usize = 65_536;

/// Where an event is in the stream: the offset of the message that carried it and its index in
/// that message (from 0). Places order as the stream does; [`Place::whole`] stands for every
/// event of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Place {
    /// The message's offset.
    pub(crate) offset: u64,
    /// The event's index in it ([`u32::MAX`]: its last, whatever their number).
    pub(crate) index: u32,
}

impl Place {
    /// The last event of the message at `offset`: at or before it is the whole message.
    pub(crate) fn whole(offset: u64) -> Self {
        Self {
            offset,
            index: u32::MAX,
        }
    }

    /// Whether it stands for the whole of its message.
    pub(crate) fn is_whole(self) -> bool {
        self.index == u32::MAX
    }

    /// Where a reader starts to read what comes after this place: the next message, or this
    /// one again when only part of it is behind.
    pub(crate) fn next_start(self) -> Start {
        if self.is_whole() {
            Start::Offset(self.offset + 1)
        } else {
            Start::Offset(self.offset)
        }
    }
}

/// The client ids (`task id -> id`) of a session's calls.
pub(crate) type Ids = HashMap<String, Box<RawValue>>;

/// The events of one session, pushed by the tail and drained by the session.
#[derive(Debug)]
pub(crate) struct Inbox {
    queue: Mutex<Queued>,
    /// Rung (without waiting) after each push; the session waits on the other end.
    bell: mpsc::Sender<()>,
    max_bytes: usize,
}

#[derive(Debug, Default)]
struct Queued {
    events: VecDeque<(Place, Arc<Event>)>,
    bytes: usize,
    /// Set when an event did not fit: the inbox misses events from then on.
    overflowed: bool,
}

/// What a session drained from its inbox.
pub(crate) struct Drained {
    /// The events, in stream order.
    pub(crate) events: Vec<(Place, Arc<Event>)>,
    /// Whether events were left out for lack of room.
    pub(crate) overflowed: bool,
}

impl Inbox {
    /// An inbox holding at most `max_bytes` of event bodies, and the bell it rings.
    pub(crate) fn new(max_bytes: usize) -> (Arc<Self>, mpsc::Receiver<()>) {
        let (bell, rings) = mpsc::channel(1);
        let inbox = Arc::new(Self {
            queue: Mutex::new(Queued::default()),
            bell,
            max_bytes,
        });
        (inbox, rings)
    }

    fn push(&self, place: Place, event: &Arc<Event>, bytes: usize) {
        {
            let mut queue = lock(&self.queue);
            if queue.overflowed {
                return;
            }
            if queue.bytes + bytes > self.max_bytes && !queue.events.is_empty() {
                queue.overflowed = true;
            } else {
                queue.bytes += bytes;
                queue.events.push_back((place, event.clone()));
            }
        }
        let _ = self.bell.try_send(());
    }

    /// Everything queued, and whether some did not fit.
    pub(crate) fn drain(&self) -> Drained {
        let mut queue = lock(&self.queue);
        let queued = std::mem::take(&mut *queue);
        Drained {
            events: queued.events.into(),
            overflowed: queued.overflowed,
        }
    }

    fn clear(&self) {
        *lock(&self.queue) = Queued::default();
    }
}

/// Which inboxes want the events of which origin, and the tail's position.
#[derive(Debug, Default)]
struct Routes {
    by_origin: HashMap<String, Vec<(u64, Arc<Inbox>)>>,
    next_id: u64,
}

/// A session's place in the routes; dropping it removes the session.
#[derive(Debug)]
pub(crate) struct Registration {
    tail: Arc<Tail>,
    origin: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut routes = lock(&self.tail.routes);
        if let Some(inboxes) = routes.by_origin.get_mut(&self.origin) {
            inboxes.retain(|(id, _)| *id != self.id);
            if inboxes.is_empty() {
                routes.by_origin.remove(&self.origin);
            }
        }
    }
}

/// Client ids left by closed sessions, per origin, oldest first.
#[derive(Debug, Default)]
struct Parked {
    by_origin: HashMap<String, (Instant, Ids)>,
    order: VecDeque<(Instant, String)>,
    count: usize,
}

/// The gateway's follower of the event stream; see the [module](self).
#[derive(Debug)]
pub(crate) struct Tail {
    stream: String,
    routes: Mutex<Routes>,
    /// The offset of the last message handled ([`UNKNOWN`] before the first).
    position: AtomicU64,
    /// The offset of the first message handled since the gateway started.
    first: AtomicU64,
    /// The worker's time (`at_ms`) of the last event handled.
    last_at_ms: AtomicU64,
    /// Since when the tail has been reading (none while it is not).
    reading_since: Mutex<Option<Instant>>,
    /// When it last stopped reading before it had a position (it reads again from then).
    stopped_at: Mutex<Option<SystemTime>>,
    /// Whether it has ever read the stream: from then on it reads every event.
    attached: watch::Sender<bool>,
    /// The consuming connection, once open: replays read the stream on it too.
    link: watch::Sender<Option<Link>>,
    /// One permit per replay running.
    pub(crate) replays: Arc<Semaphore>,
    parked: Mutex<Parked>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data (plain inserts).
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `origin` and time of an event, read without building the event.
#[derive(Deserialize)]
pub(crate) struct Peek<'a> {
    #[serde(borrow, default)]
    pub(crate) origin: Option<Cow<'a, str>>,
    #[serde(default)]
    at_ms: i64,
}

/// The origin and time of an event body, when it is JSON.
pub(crate) fn peek(body: &[u8]) -> Option<Peek<'_>> {
    serde_json::from_slice::<Peek<'_>>(body).ok()
}

impl Tail {
    /// A tail of `stream` allowing `max_replays` replays at once; [`Tail::run`] follows it.
    pub(crate) fn new(stream: &str, max_replays: usize) -> Arc<Self> {
        Arc::new(Self {
            stream: stream.to_owned(),
            routes: Mutex::new(Routes::default()),
            position: AtomicU64::new(UNKNOWN),
            first: AtomicU64::new(UNKNOWN),
            last_at_ms: AtomicU64::new(0),
            reading_since: Mutex::new(None),
            stopped_at: Mutex::new(None),
            attached: watch::Sender::new(false),
            link: watch::Sender::new(None),
            replays: Arc::new(Semaphore::new(max_replays.max(1))),
            parked: Mutex::new(Parked::default()),
        })
    }

    /// The stream's name.
    pub(crate) fn stream(&self) -> &str {
        &self.stream
    }

    /// The offset of the last event handled, if any.
    pub(crate) fn position(&self) -> Option<u64> {
        known(self.position.load(Ordering::Acquire))
    }

    /// The offset of the first event handled, if any.
    pub(crate) fn first(&self) -> Option<u64> {
        known(self.first.load(Ordering::Acquire))
    }

    /// The worker's time of the last event handled (0 before the first).
    pub(crate) fn last_at_ms(&self) -> i64 {
        i64::try_from(self.last_at_ms.load(Ordering::Acquire)).unwrap_or(i64::MAX)
    }

    /// Whether the stream has had no event since the tail began to read it, a while ago: it is
    /// empty (the tail reads from the last chunk, which comes at once when there is one).
    pub(crate) fn is_empty(&self) -> bool {
        self.position().is_none()
            && lock(&self.reading_since).is_some_and(|since| since.elapsed() >= SETTLE)
    }

    /// Whether the tail reads every event appended from now on: it has read the stream once
    /// (after a lost connection it reads again from where it stopped). Before that it will
    /// start from the stream's last chunk, and a session must read what comes before itself.
    pub(crate) fn covers_from_now(&self) -> bool {
        *self.attached.borrow()
    }

    /// Waits until the tail has read the stream once, at most `bound`; whether it has.
    pub(crate) async fn wait_attached(&self, bound: Duration) -> bool {
        let mut attached = self.attached.subscribe();
        tokio::time::timeout(bound, attached.wait_for(|a| *a))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The consuming connection, waiting at most `bound` for it to be open.
    pub(crate) async fn link(&self, bound: Duration) -> Option<Link> {
        let mut links = self.link.subscribe();
        let link = tokio::time::timeout(bound, links.wait_for(Option::is_some)).await;
        link.ok()?.ok()?.clone()
    }

    /// Routes the events of `origin` to `inbox` from now on. Returns the registration (drop it
    /// to stop) and the position at that moment: every event after it reaches the inbox.
    pub(crate) fn register(
        self: &Arc<Self>,
        origin: &str,
        inbox: Arc<Inbox>,
    ) -> (Registration, Option<u64>) {
        let mut routes = lock(&self.routes);
        let id = routes.next_id;
        routes.next_id += 1;
        routes
            .by_origin
            .entry(origin.to_owned())
            .or_default()
            .push((id, inbox));
        let position = self.position();
        drop(routes);
        let registration = Registration {
            tail: self.clone(),
            origin: origin.to_owned(),
            id,
        };
        (registration, position)
    }

    /// Empties `inbox` (and forgets that it overflowed) and returns the position: every event
    /// after it reaches the inbox from now on.
    pub(crate) fn reset(&self, inbox: &Inbox) -> Option<u64> {
        let _routes = lock(&self.routes);
        inbox.clear();
        self.position()
    }

    /// Keeps the client ids of a closed session's unanswered calls for a resume here.
    pub(crate) fn park(&self, origin: &str, ids: Ids) {
        if ids.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut parked = lock(&self.parked);
        parked.count += ids.len();
        if let Some((_, old)) = parked.by_origin.insert(origin.to_owned(), (now, ids)) {
            parked.count -= old.len();
        }
        parked.order.push_back((now, origin.to_owned()));
        // The oldest go first: past their time, or when there are too many.
        while let Some((at, origin)) = parked.order.front().cloned() {
            if parked.count <= MAX_PARKED_IDS && at.elapsed() < PARK_FOR {
                break;
            }
            parked.order.pop_front();
            if parked.by_origin.get(&origin).is_some_and(|(t, _)| *t == at)
                && let Some((_, ids)) = parked.by_origin.remove(&origin)
            {
                parked.count -= ids.len();
            }
        }
    }

    /// The client ids parked for `origin`, taken.
    pub(crate) fn unpark(&self, origin: &str) -> Ids {
        let mut parked = lock(&self.parked);
        match parked.by_origin.remove(origin) {
            Some((at, ids)) if at.elapsed() < PARK_FOR => {
                parked.count -= ids.len();
                ids
            }
            Some((_, ids)) => {
                parked.count -= ids.len();
                Ids::new()
            }
            None => Ids::new(),
        }
    }

    /// Hands the events of one message to the sessions of their origins, then moves the
    /// position to it.
    fn handle(&self, offset: u64, properties: &BasicProperties, body: &[u8]) {
        if self.position().is_some_and(|p| offset <= p) {
            return; // read again from the start of its chunk
        }
        let raws = events::split(properties, body).unwrap_or_else(|e| {
            tracing::debug!(offset, error = %e, "tail: not a Warren event; skipped");
            Vec::new()
        });
        let mut newest = None;
        let mut routes = lock(&self.routes);
        for (index, raw) in (0_u32..).zip(&raws) {
            let peeked = peek(raw.get().as_bytes());
            if let Some(peeked) = &peeked {
                newest = newest.max(Some(peeked.at_ms));
            }
            let Some(inboxes) = peeked
                .as_ref()
                .and_then(|p| p.origin.as_deref())
                .and_then(|origin| routes.by_origin.get_mut(origin))
            else {
                continue;
            };
            match serde_json::from_str::<Event>(raw.get()) {
                Ok(event) => {
                    let event = Arc::new(event);
                    for (_, inbox) in inboxes.iter() {
                        inbox.push(Place { offset, index }, &event, raw.get().len());
                    }
                }
                Err(e) => tracing::debug!(offset, error = %e, "tail: not a Warren event; skipped"),
            }
        }
        if self.first.load(Ordering::Relaxed) == UNKNOWN {
            self.first.store(offset, Ordering::Release);
        }
        // Under the routes lock: see the module.
        self.position.store(offset, Ordering::Release);
        drop(routes);
        if let Some(at_ms) = newest {
            self.last_at_ms
                .store(u64::try_from(at_ms).unwrap_or(0), Ordering::Release);
        }
    }

    /// Follows the stream until `shutdown`: opens the consuming connection (retrying until the
    /// broker answers), reads from the last chunk, and after a lost connection or channel from
    /// right after the last event handled.
    pub(crate) async fn run(
        self: Arc<Self>,
        broker: BrokerSettings,
        name: String,
        shutdown: CancellationToken,
    ) {
        let mut delays = Reconnect::default().delays();
        let link = loop {
            let opened = tokio::select! {
                () = shutdown.cancelled() => return,
                opened = Link::open(&broker, &name, Purpose::Consume, &[]) => opened,
            };
            match opened {
                Ok(link) => break link,
                Err(e) => {
                    tracing::warn!(error = %e, stream = %self.stream, "tail: cannot connect; retrying");
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        self.link.send_replace(Some(link.clone()));
        let mut generations = link.generations();
        let mut delays = Reconnect::default().delays();
        let mut failures = 0_u32;
        loop {
            let connection = generations.borrow_and_update().connection.clone();
            // After the last event read; with none read yet, from when it stopped reading (a
            // little before: clocks differ), or the first time from the last chunk.
            let stopped = *lock(&self.stopped_at);
            let start = match (self.position(), stopped) {
                (Some(p), _) => Start::Offset(p + 1),
                (None, Some(at)) => Start::Time(at - CLOCK_SLACK),
                (None, None) => Start::Last,
            };
            match self
                .follow(&connection, start, &shutdown, &mut generations)
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(error = %e, stream = %self.stream, "tail: cannot read the event stream; retrying (resume waits for it)");
                    } else {
                        tracing::debug!(error = %e, stream = %self.stream, "tail: still cannot read the event stream");
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                () = shutdown.cancelled() => break,
                changed = generations.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.link.send_replace(None);
        link.close().await;
    }

    /// Reads the stream from `start` on a channel of `connection` until shutdown (`Ok`), or the
    /// channel, consumer or connection fails, or a new connection replaces this one (`Err`).
    async fn follow(
        &self,
        connection: &Connection,
        start: Start,
        shutdown: &CancellationToken,
        generations: &mut watch::Receiver<warren_shared::link::Generation>,
    ) -> Result<(), TailError> {
        let channel = connection.create_channel().await?;
        let result = self.consume(&channel, start, shutdown, generations).await;
        if lock(&self.reading_since).take().is_some() && self.position().is_none() {
            *lock(&self.stopped_at) = Some(SystemTime::now());
        }
        stop_reading(&channel, TAIL_TAG).await;
        result
    }

    async fn consume(
        &self,
        channel: &Channel,
        start: Start,
        shutdown: &CancellationToken,
        generations: &mut watch::Receiver<warren_shared::link::Generation>,
    ) -> Result<(), TailError> {
        let mut deliveries = events::read(
            channel,
            &self.stream,
            start,
            events::READ_PREFETCH,
            TAIL_TAG,
        )
        .await?;
        *lock(&self.reading_since) = Some(Instant::now());
        self.attached.send_replace(true);
        tracing::info!(stream = %self.stream, ?start, "tail: following the event stream");
        let mut unacked = 0_u64;
        loop {
            let delivery = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                changed = generations.changed() => {
                    return if changed.is_err() { Ok(()) } else { Err(TailError::NewConnection) };
                }
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(TailError::Ended),
                },
            };
            match events::offset_of(&delivery.properties) {
                Some(offset) => self.handle(offset, &delivery.properties, &delivery.data),
                None => tracing::debug!("tail: a delivery without an offset; skipped"),
            }
            unacked += 1;
            if unacked >= ACK_EVERY {
                unacked = 0;
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?;
            }
        }
    }
}

/// Stops a stream consumer, then closes its channel (each bounded): cancelled first, so that
/// no delivery reaches a closing channel (lapin takes one for a connection error).
pub(crate) async fn stop_reading(channel: &Channel, tag: &str) {
    if !channel.status().connected() {
        return;
    }
    let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
    let _ = tokio::time::timeout(CLOSE_WAIT, cancel).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, channel.close(200, "done reading".into())).await;
}

fn known(value: u64) -> Option<u64> {
    (value != UNKNOWN).then_some(value)
}

/// Why the tail stopped reading for now (it reads again after a backoff).
#[derive(Debug, thiserror::Error)]
enum TailError {
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Read(#[from] events::ReadError),
    #[error("the consumer ended (the stream was deleted?)")]
    Ended,
    #[error("a new connection replaced the old one")]
    NewConnection,
}
