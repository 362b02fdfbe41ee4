//! Resume after a reconnect: a websocket client that comes back, to this gateway or another,
//! after a reload or a restart, gets every event of its tasks it missed, in order, then the
//! live ones, and never a second final answer for a task it saw settled.
//!
//! Each websocket session has an origin: a random UUID, stamped on each of its tasks as
//! `x-warren-origin`, which the workers copy into every event they append to the event stream.
//! Every message about a task carries a resume token (`"resume_token"`, base64url) that says:
//!
//! - the origin;
//! - the stream position up to which the client has been sent everything of its origin (every
//!   event of the origin at or before it was either written to the socket or stood for by an
//!   answer the client already had): a message's offset, and the index of an event in it when
//!   the position lies within a message that packs several events ([`Place`]);
//! - the tasks (an 8-byte hash of each id) whose final answer the client got by the reply path,
//!   which is faster than the stream, while their final event lies after that position. The
//!   workers append the final event before they reply, so the gateway's tail reads it moments
//!   later and the task leaves the list; at most [`ResumeSettings::max_unconfirmed`] are kept
//!   (the oldest go first, see `docs/gateway.md`);
//! - when the session began, for a token written before the gateway had read any event.
//!
//! `{"resume": "<token>"}` as the first request of a connection adopts the origin (new tasks
//! carry it too), reads the stream from just after the token's position on a consumer of its
//! own ([`replay`]), writes the origin's events it finds as websocket messages (those of the
//! token's list and of tasks already answered left out), and hands over to the live events the
//! [tail](crate::tail) gathered meanwhile, by offset: nothing twice, nothing missed. Events
//! older than the stream keeps are reported as `resume_expired`.
//!
//! Messages are rendered with their token when they are made: the token of a message stands for
//! what was written before it and itself, never for what is still queued behind it.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;
use warren_shared::RawJson;
use warren_shared::envelope::epoch_millis;
use warren_shared::events::{self, Event, EventKind, Progress, Start};

use crate::limits::{GatewayError, Kind};
use crate::tail::{self, CLOCK_SLACK, Ids, Inbox, Place, Registration, Tail};

/// The default of [`ResumeSettings::max_replays`].
pub const DEFAULT_MAX_REPLAYS: usize = 16;
/// The default of [`ResumeSettings::max_buffer_bytes`]: 1 MiB.
pub const DEFAULT_MAX_BUFFER_BYTES: usize = 1024 * 1024;
/// The default of [`ResumeSettings::max_replay_events`].
pub const DEFAULT_MAX_REPLAY_EVENTS: u64 = 1_000_000;
/// The default of [`ResumeSettings::max_unconfirmed`].
pub const DEFAULT_MAX_UNCONFIRMED: usize = 64;
/// The most tasks a token can list (its count is one byte).
pub const MAX_UNCONFIRMED: usize = 255;

/// Task ids (and progress keys) a session remembers having answered, to drop a later copy.
const MAX_RECENT: usize = 4096;
/// How long a replay waits for the consuming connection before it retries.
const LINK_WAIT: Duration = Duration::from_secs(30);
/// How long a replay waits for the first event kept, to tell a gap from retention.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// The consumer tags of a replay and of its look at the stream's first event.
const REPLAY_TAG: &str = "warren-gateway-replay";
const PROBE_TAG: &str = "warren-gateway-probe";
/// How often a replay that reads nothing checks whether there is anything left to read.
const QUIET_CHECK: Duration = Duration::from_secs(1);
/// Events a replay hands to its session ahead of it.
const REPLAY_AHEAD: usize = 256;

/// Resume after a reconnect: the stream the gateway follows and what resuming may cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeSettings {
    /// The event stream the workers append to (their `--events-stream`); `None` turns resume
    /// off: no tail, no tokens, and `{"resume": ...}` is answered `unavailable`.
    pub stream: Option<String>,
    /// Replays running at once on this gateway; more wait for a place (their sessions go on
    /// meanwhile, answers of new calls included).
    pub max_replays: usize,
    /// Bytes of events one session holds: those the tail gathers while it replays, or that it
    /// has not handled yet. Past them the session drops what it holds and reads the stream
    /// itself from where it is (a replay of its own), so nothing is lost, only read twice.
    pub max_buffer_bytes: usize,
    /// Events one replay reads at most (of all origins); a token further behind gets
    /// `resume_expired` for the rest and continues from the live events.
    pub max_replay_events: u64,
    /// Tasks a token lists as answered by reply before their final event was read (at most
    /// [`MAX_UNCONFIRMED`]). Past it the oldest leave the list: a resume may then repeat
    /// their final answer, if their event is appended after all (see `docs/gateway.md`).
    pub max_unconfirmed: usize,
}

impl Default for ResumeSettings {
    fn default() -> Self {
        Self {
            stream: Some(events::DEFAULT_STREAM.to_owned()),
            max_replays: DEFAULT_MAX_REPLAYS,
            max_buffer_bytes: DEFAULT_MAX_BUFFER_BYTES,
            max_replay_events: DEFAULT_MAX_REPLAY_EVENTS,
            max_unconfirmed: DEFAULT_MAX_UNCONFIRMED,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The token

/// The version byte of a token whose position is a whole message (its offset alone).
const TOKEN_VERSION: u8 = 1;
/// The version byte of a token whose position lies within a message: its offset and the
/// index of the last event accounted for in it.
const TOKEN_VERSION_PLACE: u8 = 2;
/// Bytes of a version 1 token before its list: version, origin, since, flags, position, count.
const TOKEN_HEAD: usize = 1 + 16 + 8 + 1 + 8 + 1;
/// The same for version 2, which adds the index (4 bytes) after the position.
const TOKEN_HEAD_PLACE: usize = TOKEN_HEAD + 4;
/// The longest token text read (a full list is about 2,770 characters).
const MAX_TOKEN_CHARS: usize = 4096;

/// What a resume token says; see the [module](self).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    origin: Uuid,
    /// When the session began, milliseconds since the Unix epoch.
    since_ms: u64,
    /// Everything of the origin at or before this place has been sent.
    position: Option<Place>,
    /// Hashes of tasks answered whose final event is after `position`.
    settled: Vec<u64>,
}

impl Token {
    fn encode(&self) -> String {
        let count = self.settled.len().min(MAX_UNCONFIRMED);
        // Version 1 when the position is a whole message: gateways that know no other read it.
        let within = self.position.filter(|p| !p.is_whole());
        let mut bytes = Vec::with_capacity(TOKEN_HEAD_PLACE + 8 * count);
        bytes.push(if within.is_some() {
            TOKEN_VERSION_PLACE
        } else {
            TOKEN_VERSION
        });
        bytes.extend_from_slice(self.origin.as_bytes());
        bytes.extend_from_slice(&self.since_ms.to_be_bytes());
        bytes.push(u8::from(self.position.is_some()));
        bytes.extend_from_slice(&self.position.map_or(0, |p| p.offset).to_be_bytes());
        if let Some(place) = within {
            bytes.extend_from_slice(&place.index.to_be_bytes());
        }
        bytes.push(u8::try_from(count).unwrap_or(u8::MAX));
        // The newest, when there are more than a token holds.
        for hash in &self.settled[self.settled.len() - count..] {
            bytes.extend_from_slice(&hash.to_be_bytes());
        }
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn decode(text: &str) -> Result<Self, BadToken> {
        if text.len() > MAX_TOKEN_CHARS {
            return Err(BadToken("longer than any token"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| BadToken("not base64url"))?;
        let head = match bytes.first() {
            Some(&TOKEN_VERSION) => TOKEN_HEAD,
            Some(&TOKEN_VERSION_PLACE) => TOKEN_HEAD_PLACE,
            Some(_) => return Err(BadToken("unknown version")),
            None => return Err(BadToken("too short")),
        };
        if bytes.len() < head {
            return Err(BadToken("too short"));
        }
        let u64_at = |at: usize| {
            let mut word = [0; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(word)
        };
        let mut origin = [0; 16];
        origin.copy_from_slice(&bytes[1..17]);
        let since_ms = u64_at(17);
        let index = if head == TOKEN_HEAD_PLACE {
            let mut word = [0; 4];
            word.copy_from_slice(&bytes[34..38]);
            u32::from_be_bytes(word)
        } else {
            u32::MAX
        };
        let position = match bytes[25] {
            0 => None,
            1 => Some(Place {
                offset: u64_at(26),
                index,
            }),
            _ => return Err(BadToken("bad flags")),
        };
        let count = usize::from(bytes[head - 1]);
        if bytes.len() != head + 8 * count {
            return Err(BadToken("wrong length"));
        }
        let settled = (0..count).map(|i| u64_at(head + 8 * i)).collect();
        Ok(Self {
            origin: Uuid::from_bytes(origin),
            since_ms,
            position,
            settled,
        })
    }
}

/// Why a resume token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a resume token ({0})")]
struct BadToken(&'static str);

/// The 8-byte hash a token lists a task by (FNV-1a 64 of its id: stable across gateways and
/// versions; a collision would only hide one replayed answer, at odds of 2^-64).
fn task_hash(task_id: &str) -> u64 {
    task_id.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------------
// The session

/// What a message from a call says about its task, for the session's books.
#[derive(Debug)]
pub(crate) enum About {
    /// Nothing the books need (a progress update, a refusal before the task existed).
    Nothing,
    /// The task is enqueued as `task_id`, for the client's `id`.
    Enqueued {
        /// The task's id.
        task_id: String,
        /// The client's id of it.
        id: Box<RawValue>,
    },
    /// The final answer for the task: its result, or an error after it was enqueued.
    Settled {
        /// The task's id.
        task_id: String,
    },
}

/// What a replay hands its session.
#[derive(Debug)]
enum ReplayItem {
    /// An event of the origin.
    Event(Place, Box<Event>),
    /// Events from `from` to `to` (offsets) could not be replayed.
    Expired {
        from: u64,
        to: Option<u64>,
        reason: &'static str,
    },
    /// Everything up to `upto` is replayed (nothing was there to read: none); live events
    /// take over after it.
    Done { upto: Option<Place> },
    /// Reading failed; the replay tries again from where it stopped.
    Failed(String),
}

/// A replay under way.
struct Replaying {
    items: mpsc::Receiver<ReplayItem>,
    task: JoinHandle<()>,
    /// Messages it made.
    replayed: u64,
    /// Whether the client asked for it (and hears `resumed` at its end); a catch-up after an
    /// overflow is silent.
    announced: bool,
    /// Whether the client was told that reading failed.
    told_failure: bool,
}

/// A bounded set that forgets its oldest entries.
#[derive(Debug, Default)]
struct Recent {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl Recent {
    /// Adds `key`; false when it was there.
    fn insert(&mut self, key: String) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() == MAX_RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        true
    }

    fn contains(&self, key: &str) -> bool {
        self.set.contains(key)
    }
}

/// A websocket session's side of resume; see the [module](self).
pub(crate) struct Session {
    tail: Option<Arc<Tail>>,
    settings: ResumeSettings,
    origin: Uuid,
    origin_text: String,
    since_ms: u64,
    /// The session's place in the tail's routes, once it has tasks (or resumed).
    registration: Option<Registration>,
    inbox: Arc<Inbox>,
    rings: mpsc::Receiver<()>,
    /// Everything of the origin at or before this place is accounted for.
    position: Option<Place>,
    /// Hashes of tasks answered whose final event is after `position`, oldest first.
    unconfirmed: VecDeque<u64>,
    /// Tasks whose final answer the client has had.
    settled: Recent,
    /// Progress events written.
    seen: Recent,
    /// Calls in flight on this socket: their progress and answer come by the reply path.
    live: HashSet<String>,
    /// The client's ids of its tasks not answered yet.
    ids: Ids,
    replaying: Option<Replaying>,
    /// Waiting for the reply of this call, whose final event was read.
    paused: Option<String>,
    /// Events read while paused, in stream order.
    pending: VecDeque<(Place, Arc<Event>)>,
    /// Messages made and not yet written, each with its token.
    outbox: VecDeque<String>,
    /// A task was submitted (a resume must come first).
    submitted: bool,
    resumed: bool,
}

impl Session {
    /// A session of a new connection: a fresh origin, resume off without a `tail`.
    pub(crate) fn new(tail: Option<Arc<Tail>>, settings: &ResumeSettings) -> Self {
        let (inbox, rings) = Inbox::new(settings.max_buffer_bytes);
        let origin = Uuid::new_v4();
        Self {
            tail,
            settings: settings.clone(),
            origin,
            origin_text: origin.hyphenated().to_string(),
            since_ms: u64::try_from(epoch_millis(SystemTime::now())).unwrap_or(0),
            registration: None,
            inbox,
            rings,
            position: None,
            unconfirmed: VecDeque::new(),
            settled: Recent::default(),
            seen: Recent::default(),
            live: HashSet::new(),
            ids: Ids::new(),
            replaying: None,
            paused: None,
            pending: VecDeque::new(),
            outbox: VecDeque::new(),
            submitted: false,
            resumed: false,
        }
    }

    /// The origin to stamp on a task about to be submitted (none with resume off). The
    /// session follows its origin's events from here on.
    pub(crate) fn origin_for_task(&mut self) -> Option<String> {
        let tail = self.tail.clone()?;
        self.submitted = true;
        if self.registration.is_none() {
            let (registration, position) = tail.register(&self.origin_text, self.inbox.clone());
            self.registration = Some(registration);
            // A fresh origin has no event at or before the tail's position. Before the tail
            // first reads (it starts from the stream's last chunk), the session reads the
            // stream itself up to the tail's first event.
            self.position = position.map(Place::whole);
            if position.is_none() && !tail.covers_from_now() {
                self.start_replay(&tail, None, false);
            }
        }
        Some(self.origin_text.clone())
    }

    /// `{"resume": token}`: adopts the token's origin and starts replaying what the client
    /// missed.
    ///
    /// # Errors
    /// `bad_request` for a token that is not one, or a resume after a task or another resume
    /// on this connection; `unavailable` with resume off.
    pub(crate) fn resume(&mut self, token: &RawValue) -> Result<(), GatewayError> {
        let Some(tail) = self.tail.clone() else {
            return Err(GatewayError::new(
                Kind::Unavailable,
                "resume is off on this gateway (it follows no event stream)",
            ));
        };
        if self.submitted || self.resumed {
            return Err(GatewayError::new(
                Kind::BadRequest,
                "\"resume\" must be a connection's first request, and come once",
            ));
        }
        let text = serde_json::from_str::<&str>(token.get()).map_err(|_| {
            GatewayError::new(
                Kind::BadRequest,
                "\"resume\" takes a resume token (a string)",
            )
        })?;
        let token =
            Token::decode(text).map_err(|e| GatewayError::new(Kind::BadRequest, e.to_string()))?;
        self.resumed = true;
        self.origin = token.origin;
        self.origin_text = token.origin.hyphenated().to_string();
        self.since_ms = token.since_ms;
        self.position = token.position;
        self.unconfirmed = token.settled.into_iter().collect();
        self.ids = tail.unpark(&self.origin_text);
        let (registration, target) = tail.register(&self.origin_text, self.inbox.clone());
        self.registration = Some(registration);
        tracing::debug!(origin = %self.origin_text, position = ?self.position, ?target, "resume");
        self.start_replay(&tail, target, true);
        Ok(())
    }

    /// Reads the stream from just after the position up to `target` (the tail's position when
    /// the inbox began to gather), unless there is nothing to read.
    fn start_replay(&mut self, tail: &Arc<Tail>, target: Option<u64>, announced: bool) {
        let nothing_to_read = match (self.position, target) {
            (Some(position), Some(target)) => Place::whole(target) <= position,
            // No position: everything of the origin since the session began. The tail's last
            // event before it means there is none up to the target.
            (None, Some(_)) => {
                let since = i64::try_from(self.since_ms).unwrap_or(i64::MAX);
                tail.last_at_ms() < since.saturating_sub(millis(CLOCK_SLACK))
            }
            // The tail has read nothing yet: read up to the first event it reads, unless the
            // stream is empty.
            (_, None) => tail.is_empty(),
        };
        if nothing_to_read {
            self.position = self.position.max(target.map(Place::whole));
            if announced {
                self.push_resumed(0);
            }
            return;
        }
        let (sender, items) = mpsc::channel(REPLAY_AHEAD);
        let start = match self.position {
            Some(position) => position.next_start(),
            None => Start::Time(
                SystemTime::UNIX_EPOCH + Duration::from_millis(self.since_ms)
                    - CLOCK_SLACK.min(Duration::from_millis(self.since_ms)),
            ),
        };
        let job = Replay {
            tail: tail.clone(),
            origin: self.origin_text.clone(),
            start,
            after: self.position,
            target,
            max_events: self.settings.max_replay_events,
            items: sender,
        };
        self.replaying = Some(Replaying {
            items,
            task: tokio::spawn(job.run()),
            replayed: 0,
            announced,
            told_failure: false,
        });
    }

    /// The next message to write about the origin's tasks: replayed, or gathered by the tail
    /// for tasks that are not calls in flight here. Cancel-safe: waits only between messages.
    pub(crate) async fn next(&mut self) -> String {
        loop {
            if let Some(message) = self.outbox.pop_front() {
                return message;
            }
            if self.pump() {
                continue;
            }
            if self.paused.is_some() {
                // Until the call's reply is written (the connection's other branch).
                std::future::pending::<()>().await;
            }
            let item = match &mut self.replaying {
                Some(replaying) => Some(replaying.items.recv().await),
                None => {
                    if self.rings.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                    None
                }
            };
            match item {
                Some(Some(item)) => self.on_replay_item(item),
                // The replay ended without `Done` (it panicked): read again from here.
                Some(None) => self.restart_replay(),
                None => {}
            }
        }
    }

    /// Drops what the inbox holds and reads the stream from the position instead.
    fn restart_replay(&mut self) {
        let Some(tail) = self.tail.clone() else {
            return;
        };
        let announced = self.replaying.take().is_some_and(|r| r.announced);
        let target = tail.reset(&self.inbox);
        self.start_replay(&tail, target, announced);
    }

    /// Handles what is ready without waiting; true when something was.
    fn pump(&mut self) -> bool {
        let Some(tail) = self.tail.clone() else {
            return false;
        };
        if self.paused.is_some() {
            return false;
        }
        let mut handled = false;
        while let Some((place, event)) = self.pending.pop_front() {
            if !self.on_event(place, &event) {
                self.pending.push_front((place, event));
                return true;
            }
            handled = true;
        }
        if let Some(replaying) = &mut self.replaying {
            return match replaying.items.try_recv() {
                Ok(item) => {
                    self.on_replay_item(item);
                    true
                }
                Err(_) => handled,
            };
        }
        if self.registration.is_none() {
            return handled;
        }
        // The position first, then the inbox: every event up to it is in what is drained.
        let position = tail.position();
        let drained = self.inbox.drain();
        handled |= !drained.events.is_empty();
        for (place, event) in drained.events {
            if self.paused.is_some() || !self.on_event(place, &event) {
                self.pending.push_back((place, event));
            }
        }

        if drained.overflowed {
            // Events were left out: read them from the stream instead (after the pause).
            self.restart_replay();
            return true;
        }
        if self.pending.is_empty()
            && let Some(position) = position
        {
            self.position = self.position.max(Some(Place::whole(position)));
        }
        handled
    }

    fn on_replay_item(&mut self, item: ReplayItem) {
        match item {
            ReplayItem::Event(place, event) => {
                let before = self.outbox.len();
                let event = Arc::from(event);
                if !self.on_event(place, &event) {
                    self.pending.push_back((place, event));
                }
                if let Some(replaying) = &mut self.replaying {
                    replaying.replayed += (self.outbox.len() - before) as u64;
                }
            }
            ReplayItem::Expired { from, to, reason } => {
                if let Some(to) = to {
                    self.position = self.position.max(Some(Place::whole(to)));
                }
                self.push(Envelope {
                    resume_expired: Some(Expired {
                        from_offset: from,
                        to_offset: to,
                        reason,
                    }),
                    ..Envelope::default()
                });
            }
            ReplayItem::Failed(error) => {
                // Only a client that asked to resume hears of it (once).
                if let Some(replaying) = &mut self.replaying
                    && replaying.announced
                    && !replaying.told_failure
                {
                    replaying.told_failure = true;
                    let error = GatewayError::new(
                        Kind::Unavailable,
                        format!("resume: cannot read the event stream ({error}); retrying"),
                    );
                    self.push(Envelope {
                        id: Some(RawValue::NULL),
                        ok: Some(false),
                        error: Some(ErrorOut::Gateway(&error)),
                        ..Envelope::default()
                    });
                }
            }
            ReplayItem::Done { upto } => {
                self.position = self.position.max(upto);
                if let Some(replaying) = self.replaying.take() {
                    replaying.task.abort();
                    if replaying.announced {
                        self.push_resumed(replaying.replayed);
                    }
                }
                // The live events gathered meanwhile come next (pump drains them).
            }
        }
    }

    fn push_resumed(&mut self, replayed: u64) {
        self.push(Envelope {
            resumed: Some(Resumed { replayed }),
            ..Envelope::default()
        });
    }

    /// One event of the stream (replayed or live), in stream order. False when it is the
    /// final event of a call in flight here: its answer comes by reply, with the whole result
    /// (an event leaves out a large one), so the session holds everything after it (and its
    /// position before it) until that answer is written.
    fn on_event(&mut self, place: Place, event: &Event) -> bool {
        if self.position.is_some_and(|p| place <= p) {
            return true;
        }
        if event.origin.as_deref() != Some(self.origin_text.as_str()) {
            self.position = Some(place);
            return true;
        }
        let task = event.task_id.as_str();
        let hash = task_hash(task);
        if event.is_final() {
            if let Some(i) = self.unconfirmed.iter().position(|h| *h == hash) {
                // Answered by reply already: its event is read now.
                self.unconfirmed.remove(i);
                self.settled.insert(task.to_owned());
            } else if self.live.contains(task) {
                self.paused = Some(task.to_owned());
                return false;
            } else if self.settled.insert(task.to_owned()) {
                let id = self.ids.remove(task);
                self.push_event(place, event, id.as_deref());
            }
        } else if event.kind == EventKind::Progress {
            // A call in flight here has its progress by reply.
            let answered = self.settled.contains(task) || self.unconfirmed.contains(&hash);
            if !answered && !self.live.contains(task) && self.seen.insert(event.dedupe_key()) {
                let id = self.ids.get(task).cloned();
                self.push_event(place, event, id.as_deref());
            }
        }
        self.position = Some(place);
        true
    }

    /// The messages to write for a message from a call: those made before it first (they
    /// come earlier), then it with its token, unless it is a second answer for its task.
    pub(crate) fn call_message(&mut self, about: About, text: String) -> Vec<String> {
        let mut out: Vec<String> = self.outbox.drain(..).collect();
        if self.tail.is_none() || self.registration.is_none() {
            out.push(text);
            return out;
        }
        match about {
            About::Nothing => {}
            About::Enqueued { task_id, id } => {
                self.live.insert(task_id.clone());
                self.ids.insert(task_id, id);
            }
            About::Settled { task_id } => {
                if self.paused.as_deref() == Some(task_id.as_str()) {
                    // Its final event waits in `pending`, and everything after it.
                    self.paused = None;
                }
                self.live.remove(&task_id);
                self.ids.remove(&task_id);
                if !self.settled.insert(task_id.clone()) {
                    tracing::debug!(task.id = %task_id, "resume: answered from the stream already; reply dropped");
                    return out;
                }
                // Its final event is in the stream (workers append it before they reply) but
                // not read yet: the token lists it until then.
                self.unconfirmed.push_back(task_hash(&task_id));
                let max = self.settings.max_unconfirmed.min(MAX_UNCONFIRMED);
                while self.unconfirmed.len() > max {
                    self.unconfirmed.pop_front();
                }
            }
        }
        out.push(with_token(text, &self.token()));
        out
    }

    /// The token for a message written now.
    fn token(&self) -> String {
        Token {
            origin: self.origin,
            since_ms: self.since_ms,
            position: self.position,
            settled: self.unconfirmed.iter().copied().collect(),
        }
        .encode()
    }

    /// Queues `message` with the token of this moment.
    fn push(&mut self, message: Envelope<'_>) {
        let token = self.token();
        let message = Envelope {
            resume_token: Some(&token),
            ..message
        };
        // Strings, numbers and JSON text always serialize.
        self.outbox
            .push_back(serde_json::to_string(&message).unwrap_or_default());
    }

    /// A replayed or tailed event as the message a live call would have had, its token
    /// taking the session to the event's place.
    fn push_event(&mut self, place: Place, event: &Event, id: Option<&RawValue>) {
        self.position = Some(place);
        let mut message = Envelope {
            id,
            task_id: Some(&event.task_id),
            ..Envelope::default()
        };
        let none = Progress::default();
        match event.kind {
            EventKind::Progress => {
                message.progress = Some(ProgressOut {
                    progress: event.progress.as_ref().unwrap_or(&none),
                    attempt: event.attempt,
                });
            }
            EventKind::Succeeded => {
                message.ok = Some(true);
                message.result = event.result.as_ref();
                message.truncated = event.truncated;
            }
            _ => {
                let (kind, text) = match &event.error {
                    Some(e) => (e.kind.as_str(), e.message.as_str()),
                    None => (event.kind.as_str(), event.reason.as_deref().unwrap_or("")),
                };
                message.ok = Some(false);
                message.error = Some(ErrorOut::Event {
                    kind,
                    message: text,
                });
            }
        }
        self.push(message);
    }
}

impl Session {
    /// Ends the session: stops its replay and its routes, and parks the client ids of its
    /// unanswered tasks for a resume on this gateway. The connection calls it before it
    /// aborts its calls; dropping the session does it too.
    pub(crate) fn close(&mut self) {
        if let Some(replaying) = self.replaying.take() {
            replaying.task.abort();
        }
        self.registration = None;
        if let Some(tail) = &self.tail {
            tail.park(&self.origin_text, std::mem::take(&mut self.ids));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

// ---------------------------------------------------------------------------------------------
// The replay

/// Reads the stream for one session, from just after its position up to a target offset, and
/// hands it the events of its origin.
struct Replay {
    tail: Arc<Tail>,
    origin: String,
    start: Start,
    /// The last place accounted for (events at or before it are skipped).
    after: Option<Place>,
    /// Read up to this offset (the tail's position when the session's inbox began to
    /// gather); unknown: up to just before the first event the tail read.
    target: Option<u64>,
    max_events: u64,
    items: mpsc::Sender<ReplayItem>,
}

/// How a replay's reading ended.
enum Read {
    /// It handed over `Done` (or its session is gone).
    Finished,
    /// Reading failed; try again from where it stopped.
    Failed(String),
}

impl Replay {
    /// Waits for a place among the replays, then reads until done, retrying (with backoff)
    /// from where it stopped when reading fails.
    async fn run(mut self) {
        // Nothing to read before the tail reads the stream (it may not exist yet).
        while !self.tail.wait_attached(LINK_WAIT).await {
            let failed = ReplayItem::Failed("the gateway is not reading the event stream".into());
            if self.items.send(failed).await.is_err() {
                return;
            }
        }
        let Ok(_permit) = self.tail.replays.clone().acquire_owned().await else {
            return;
        };
        let mut delays = warren_shared::broker::Reconnect::default().delays();
        let mut read = 0_u64;
        let mut gap_checked = false;
        loop {
            match self.read(&mut read, &mut gap_checked).await {
                Read::Finished => return,
                Read::Failed(error) => {
                    tracing::debug!(origin = %self.origin, %error, "resume: replay failed; retrying");
                    if self.items.send(ReplayItem::Failed(error)).await.is_err() {
                        return;
                    }
                }
            }
            if let Some(after) = self.after {
                self.start = after.next_start();
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(10))).await;
        }
    }

    /// Where to stop: the target, or when the tail knew no position at registration, just
    /// before the first event it read (everything after that reached the inbox).
    fn target(&self) -> Option<u64> {
        self.target
            .or_else(|| self.tail.first().map(|first| first.saturating_sub(1)))
    }

    /// With no event coming: whether there is nothing more to read, and up to where. The
    /// stream is empty (the tail read nothing since it began, from the last chunk); or a
    /// replay from a time has read nothing and the newest event the tail read is older than
    /// that time, so that the events up to the target all are.
    fn nothing_more(&self) -> Option<Option<Place>> {
        match self.target() {
            None if self.tail.is_empty() => Some(self.after),
            Some(target) => match (self.after, self.start) {
                (None, Start::Time(from)) => {
                    let from = from
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, millis);
                    (self.tail.last_at_ms() < from).then_some(Some(Place::whole(target)))
                }
                _ => None,
            },
            None => None,
        }
    }

    /// One consumer's worth of reading.
    async fn read(&mut self, read: &mut u64, gap_checked: &mut bool) -> Read {
        let Some(link) = self.tail.link(LINK_WAIT).await else {
            return Read::Failed("no connection to the broker".into());
        };
        let connection = link.connection();
        let channel = match connection.create_channel().await {
            Ok(channel) => channel,
            Err(e) => return Read::Failed(e.to_string()),
        };
        let stream = self.tail.stream().to_owned();
        tracing::debug!(origin = %self.origin, start = ?self.start, target = ?self.target, "resume: replaying");
        let result = async {
            let mut deliveries = events::read(
                &channel,
                &stream,
                self.start,
                events::READ_PREFETCH,
                REPLAY_TAG,
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut unacked = 0_u64;
            let mut quiet = tokio::time::interval(QUIET_CHECK);
            loop {
                let delivery = tokio::select! {
                    delivery = deliveries.next() => match delivery {
                        Some(delivery) => delivery.map_err(|e| e.to_string())?,
                        None => break,
                    },
                    _ = quiet.tick() => {
                        if let Some(upto) = self.nothing_more() {
                            let _ = self.items.send(ReplayItem::Done { upto }).await;
                            return Ok(());
                        }
                        continue;
                    }
                };
                unacked += 1;
                if unacked >= tail::ACK_EVERY {
                    unacked = 0;
                    let acked = delivery.acker.ack(BasicAckOptions { multiple: true }).await;
                    acked.map_err(|e| e.to_string())?;
                }
                let Some(offset) = events::offset_of(&delivery.properties) else {
                    continue;
                };
                if self.after.is_some_and(|after| Place::whole(offset) <= after) {
                    continue;
                }
                if !*gap_checked {
                    *gap_checked = true;
                    let next = self.after.map(|after| match after.next_start() {
                        Start::Offset(next) => next,
                        _ => after.offset,
                    });
                    if let Some(next) = next
                        && offset > next
                        && let Some(first) = first_kept(&connection, &stream).await
                        && first > next
                    {
                        let expired = ReplayItem::Expired {
                            from: next,
                            to: Some(first - 1),
                            reason: "retention",
                        };
                        if self.items.send(expired).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                *read += 1;
                if *read > self.max_events {
                    let to = self.target();
                    let expired = ReplayItem::Expired {
                        from: offset,
                        to,
                        reason: "too_far_behind",
                    };
                    let upto = to.unwrap_or(offset).max(offset);
                    let _ = self.items.send(expired).await;
                    let done = ReplayItem::Done {
                        upto: Some(Place::whole(upto)),
                    };
                    let _ = self.items.send(done).await;
                    return Ok(());
                }
                let raws = events::split(&delivery.properties, &delivery.data).unwrap_or_else(|e| {
                    tracing::debug!(offset, error = %e, "resume: not a Warren event; skipped");
                    Vec::new()
                });
                for (index, raw) in (0_u32..).zip(raws) {
                    let place = Place { offset, index };
                    let ours = tail::peek(raw.get().as_bytes())
                        .and_then(|p| p.origin)
                        .is_some_and(|o| o == self.origin);
                    if !ours || self.after.is_some_and(|after| place <= after) {
                        continue;
                    }
                    match serde_json::from_str::<Event>(raw.get()) {
                        Ok(event) => {
                            let item = ReplayItem::Event(place, Box::new(event));
                            if self.items.send(item).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => tracing::debug!(offset, error = %e, "resume: not a Warren event; skipped"),
                    }
                }
                self.after = Some(Place::whole(offset));
                if self.target().is_some_and(|target| offset >= target) {
                    let done = ReplayItem::Done {
                        upto: Some(Place::whole(offset)),
                    };
                    let _ = self.items.send(done).await;
                    return Ok(());
                }
            }
            Err("the stream consumer ended".to_owned())
        }
        .await;
        tail::stop_reading(&channel, REPLAY_TAG).await;
        match result {
            Ok(()) => Read::Finished,
            Err(error) => Read::Failed(error),
        }
    }
}

/// The offset of the first event the stream keeps (none if it has none within a moment).
async fn first_kept(connection: &lapin::Connection, stream: &str) -> Option<u64> {
    let channel = connection.create_channel().await.ok()?;
    let first = async {
        let mut deliveries = events::read(&channel, stream, Start::First, 1, PROBE_TAG)
            .await
            .ok()?;
        let delivery = tokio::time::timeout(PROBE_WAIT, deliveries.next())
            .await
            .ok()??
            .ok()?;
        events::offset_of(&delivery.properties)
    }
    .await;
    tail::stop_reading(&channel, PROBE_TAG).await;
    first
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// `text` (a JSON object) with `"resume_token"` added at its end.
fn with_token(mut text: String, token: &str) -> String {
    if !text.ends_with('}') {
        return text;
    }
    text.pop();
    if !text.ends_with('{') {
        text.push(',');
    }
    // base64url needs no escaping in JSON.
    text.push_str("\"resume_token\":\"");
    text.push_str(token);
    text.push_str("\"}");
    text
}

/// Every message resume writes; absent fields are left out.
#[derive(Default, Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    task_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    progress: Option<ProgressOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a RawJson>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_expired: Option<Expired>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<Resumed>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_token: Option<&'a str>,
}

/// `"progress"`: what the task reported, and its attempt.
#[derive(Serialize)]
struct ProgressOut<'a> {
    #[serde(flatten)]
    progress: &'a Progress,
    attempt: u32,
}

/// `"error"` of a replayed failure, or of the gateway.
#[derive(Serialize)]
#[serde(untagged)]
enum ErrorOut<'a> {
    Gateway(&'a GatewayError),
    Event { kind: &'a str, message: &'a str },
}

/// `"resume_expired"`: offsets that could not be replayed, and why.
#[derive(Serialize)]
struct Expired {
    from_offset: u64,
    to_offset: Option<u64>,
    reason: &'static str,
}

/// `"resumed"`: the replay is over; live messages follow.
#[derive(Serialize)]
struct Resumed {
    replayed: u64,
}

#[cfg(test)]
mod tests {
    // A failed unwrap is how a test says what went wrong.
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_token_round_trips_and_keeps_the_newest_of_a_long_list() {
        let token = Token {
            origin: Uuid::new_v4(),
            since_ms: 1_763_700_000_123,
            position: Some(Place::whole(4_000_000_000_123)),
            settled: vec![1, 2, u64::MAX],
        };
        assert_eq!(Token::decode(&token.encode()), Ok(token.clone()));
        // A position within a packed message keeps the event's index (version 2).
        let within = Token {
            position: Some(Place {
                offset: 17,
                index: 3,
            }),
            ..token.clone()
        };
        let text = within.encode();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(&text).unwrap()[0],
            TOKEN_VERSION_PLACE
        );
        assert_eq!(Token::decode(&text), Ok(within));
        assert_eq!(
            URL_SAFE_NO_PAD.decode(token.encode()).unwrap()[0],
            TOKEN_VERSION,
            "a whole message's position is written as before"
        );
        let none = Token {
            position: None,
            settled: Vec::new(),
            ..token.clone()
        };
        assert_eq!(Token::decode(&none.encode()), Ok(none));
        let long = Token {
            settled: (0..300).collect(),
            ..token
        };
        let back = Token::decode(&long.encode()).unwrap();
        assert_eq!(back.settled, (45..300).collect::<Vec<u64>>());
        assert!(long.encode().len() < MAX_TOKEN_CHARS);
    }

    #[test]
    fn garbage_is_refused_never_a_panic() {
        let good = Token {
            origin: Uuid::new_v4(),
            since_ms: 1,
            position: Some(Place::whole(7)),
            settled: vec![9],
        }
        .encode();
        let bytes = URL_SAFE_NO_PAD.decode(&good).unwrap();
        let mut flags = bytes.clone();
        flags[25] = 7;
        let mut version = bytes.clone();
        version[0] = 3;
        let mut shorter = bytes.clone();
        shorter[0] = TOKEN_VERSION_PLACE;
        let mut count = bytes.clone();
        count[34] = 200;
        let cases = [
            String::new(),
            "not a token!".to_owned(),
            "A".repeat(MAX_TOKEN_CHARS + 1),
            URL_SAFE_NO_PAD.encode(&bytes[..TOKEN_HEAD - 1]),
            URL_SAFE_NO_PAD.encode(&bytes[..bytes.len() - 1]),
            URL_SAFE_NO_PAD.encode(flags),
            URL_SAFE_NO_PAD.encode(version),
            URL_SAFE_NO_PAD.encode(shorter),
            URL_SAFE_NO_PAD.encode(count),
            format!("{good}=="),
        ];
        for case in cases {
            assert!(Token::decode(&case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn the_token_is_added_to_any_object() {
        assert_eq!(
            with_token("{\"id\":1,\"ok\":true}".into(), "abc"),
            "{\"id\":1,\"ok\":true,\"resume_token\":\"abc\"}"
        );
        assert_eq!(with_token("{}".into(), "abc"), "{\"resume_token\":\"abc\"}");
        assert_eq!(with_token("[1]".into(), "abc"), "[1]");
    }

    #[test]
    fn task_hashes_are_stable() {
        // FNV-1a 64 test vectors: tokens written by one gateway are read by another.
        assert_eq!(task_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(task_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(task_hash("t1"), task_hash("t2"));
    }
}
