//! Appending every task's events to the deployment's event stream (`warren.events` unless
//! [`EventSettings::stream`] says otherwise), in the format of [`warren_shared::events`].
//!
//! For each delivery the worker keeps a [`Trail`]: when the handler begins it hands `started`
//! to the writer (without waiting for its confirm: the handler is not held up), and when the
//! task is judged [`Trail::settle`] sends the attempt's last event (`succeeded`, `failed`,
//! `dead_lettered`, `expired`) and waits until the broker has confirmed both. `outcome.rs` calls it before it
//! publishes the reply, the retry copy or the dead-letter copy, and acks only after it: a task is
//! never acked without its events, and a caller that has its reply can already read the final
//! event. An append that fails (a nack, a return because the stream is gone, a timeout) fails
//! the settlement like a failed reply would: the task is handed back.
//!
//! Cheap by construction ("group commit"): a stream's cost is per message, so each appender
//! has one writer that keeps one message in flight on one confirm-mode channel of the
//! publishing connection. Events submitted while that message is confirming wait in a queue;
//! when its confirm comes, the writer publishes everything queued as ONE message (a pack,
//! [`format::Pack`], at most [`format::MAX_PACK_EVENTS`] events and
//! [`format::MAX_PACK_BYTES`]; a larger event goes alone), and so on. With nothing in flight
//! an event goes at once, as a message of its own: at low load nothing changes. Each submitter
//! awaits the confirm of the message that carried its event; a failure of that message (a nack,
//! a return, a timeout, a lost channel) fails every event in it. The queue is first in, first
//! out, and one message is in flight at a time, so events keep the order they were submitted
//! in. A task pays one confirm round trip (its final event's) before its reply, plus the wait
//! for the message ahead of it; the queue holds a few events per running task (its `started`,
//! one progress event, its final event), so it is bounded by the worker's concurrency.
//!
//! Progress events ([`Appender::progress`]) are appended without the task waiting for them, in
//! the order reported, and always before the attempt's final event. A progress event that
//! cannot be appended is logged and counted, not retried: the task's outcome does not depend
//! on it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warren_shared::broker::BrokerError;
use warren_shared::envelope::{self, epoch_millis};
use warren_shared::events::{
    self as format, DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_MAX_RESULT_BYTES, DEFAULT_STREAM,
    Event, EventError, EventKind, Pack, Progress, RetryAt, Subject,
};
use warren_shared::link::Link;
use warren_shared::pool::{LinkPool, Publication, PublishError, Unconfirmed, publish_unconfirmed};
use warren_shared::{ErrorKind, Reply, TaskFailure, topology};

use crate::outcome::{Envelope, Outcome};
use crate::settings::WorkerError;

/// Most bytes of an error message or a progress message an event carries; longer ones are cut
/// ([`envelope::bounded`]). The reply and the dead-letter copy keep the whole text.
pub const MAX_EVENT_TEXT: usize = 4 * 1024;

/// Most bytes of a function name an event carries (a task may name any function).
const MAX_FUNCTION_BYTES: usize = 255;

/// How long the handler's start waits for its `started` event to be on its way when it goes
/// as a message of its own (it takes microseconds; a connection the broker has blocked takes
/// longer). Past it the handler starts anyway; the event stays with the writer.
const STARTED_SEND_WAIT: Duration = Duration::from_millis(250);

/// Where and how a worker appends task events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSettings {
    /// Append events at all. Off: this worker appends nothing and does not declare the stream
    /// (for a firehose queue whose tasks nobody looks up).
    pub enabled: bool,
    /// The stream's name ([`DEFAULT_STREAM`]).
    pub stream: String,
    /// How long the stream keeps events, when this worker declares it ([`DEFAULT_MAX_AGE`]).
    pub max_age: Duration,
    /// How many bytes the stream keeps, when this worker declares it ([`DEFAULT_MAX_BYTES`]).
    pub max_bytes: u64,
    /// The largest result a `succeeded` event carries ([`DEFAULT_MAX_RESULT_BYTES`]); a larger
    /// one is left out and the event marked `truncated`.
    pub max_result_bytes: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            stream: DEFAULT_STREAM.to_owned(),
            max_age: DEFAULT_MAX_AGE,
            max_bytes: DEFAULT_MAX_BYTES,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }
}

impl EventSettings {
    /// Checks what cannot work.
    ///
    /// # Errors
    /// [`WorkerError::Settings`] naming the setting.
    pub fn validate(&self) -> Result<(), WorkerError> {
        if !self.enabled {
            return Ok(());
        }
        topology::validate_queue_name(&self.stream)
            .map_err(|e| WorkerError::Settings(format!("events_stream: {e}")))?;
        if self.max_age < Duration::from_secs(1) {
            return Err(WorkerError::Settings(
                "events_max_age must be at least 1s".into(),
            ));
        }
        if self.max_bytes == 0 {
            return Err(WorkerError::Settings(
                "events_max_bytes must be more than 0".into(),
            ));
        }
        Ok(())
    }
}

/// Declares the event stream, or, when the broker refuses (no `configure` permission, or the
/// stream exists with other retention), checks that it exists and uses it as it is. Nothing
/// when events are off.
///
/// # Errors
/// [`WorkerError::EventStream`] when the stream is missing and this worker may not declare it,
/// or a queue of that name is not a stream; [`WorkerError::Broker`] for anything else.
pub(crate) async fn declare(link: &Link, settings: &EventSettings) -> Result<(), WorkerError> {
    if !settings.enabled {
        return Ok(());
    }
    let stream = settings.stream.as_str();
    let channel = link
        .connection()
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let declared =
        format::declare_stream(&channel, stream, settings.max_age, settings.max_bytes).await;
    let refusal = match declared {
        Ok(()) => {
            let _ = channel.close(200, "declared".into()).await;
            return Ok(());
        }
        Err(e) => e,
    };
    let other_arguments = topology::inequivalent_arg(&refusal);
    let refused = other_arguments.is_some() || amqp_code(&refusal) == Some(403);
    if !refused {
        return Err(BrokerError::from(refusal).into());
    }
    // The refusal closed that channel: look on one of its own.
    let look = link
        .connection()
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let exists = format::stream_exists(&look, stream)
        .await
        .map_err(BrokerError::from)?;
    if !exists {
        return Err(WorkerError::EventStream {
            stream: stream.to_owned(),
            problem: format!(
                "it does not exist, and this worker may not declare it: {}",
                BrokerError::from(refusal).needing("configure")
            ),
        });
    }
    let Some(detail) = other_arguments else {
        // Without `configure` permission the worker cannot tell a stream from another queue
        // of the name: it trusts whoever declared it.
        let _ = look.close(200, "checked".into()).await;
        tracing::debug!(
            stream,
            "may not declare the event stream; it exists: using it"
        );
        return Ok(());
    };
    // Other arguments: a stream with other retention, or a queue of another type (whose
    // refusal may name another argument first).
    let stream_type = !detail.contains("'x-queue-type'")
        && format::is_stream(&look, stream)
            .await
            .map_err(BrokerError::from)?;
    if !stream_type {
        return Err(WorkerError::EventStream {
            stream: stream.to_owned(),
            problem: "a queue of that name exists and is not a stream".to_owned(),
        });
    }
    let _ = look.close(200, "checked".into()).await;
    tracing::warn!(stream, %detail, "the event stream exists with other retention than this worker's settings; using it as it is");
    Ok(())
}

/// The AMQP reply code of a broker error (`403`, `404`, `406`...).
fn amqp_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Appends events to the stream: cloned into every task, cheap to clone. Off, it appends
/// nothing.
#[derive(Debug, Clone)]
pub(crate) struct Appender {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// One channel of the publishing link: events sent one after the other keep their order.
    pool: LinkPool,
    stream: String,
    queue: String,
    worker: String,
    max_result_bytes: usize,
    timeout: Duration,
    /// The attempts running here, by (task id, attempt): the last of their progress appends.
    attempts: Mutex<HashMap<(String, u32), Running>>,
    /// Events submitted and not yet published, for the writer.
    pending: Mutex<Queue>,
}

/// The writer's queue; see the [module](self).
#[derive(Debug, Default)]
struct Queue {
    events: VecDeque<Queued>,
    /// Whether a writer runs: it publishes until the queue is empty, then ends.
    writing: bool,
}

/// An event waiting for the writer.
#[derive(Debug)]
struct Queued {
    /// Its JSON body.
    body: Vec<u8>,
    /// Its properties, when it goes alone.
    properties: BasicProperties,
    at_ms: i64,
    /// Told the outcome of the message that carries it.
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// An event handed to the writer: [`Confirming::confirmed`] waits for the confirm of the
/// message that carries it.
#[derive(Debug)]
struct Confirming(oneshot::Receiver<Result<(), PublishError>>);

impl Confirming {
    async fn confirmed(self) -> Result<(), PublishError> {
        self.0.await.unwrap_or_else(|_| {
            Err(PublishError::NoChannel(
                "the event writer stopped before appending the event".into(),
            ))
        })
    }
}

/// Ends a writer: lets the next submission start another, and, when the writer panicked, fails
/// what it left queued (dropping their senders) rather than leaving them waiting.
struct WriterGuard<'a>(&'a Inner);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let mut queue = self
            .0
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queue.writing = false;
        if std::thread::panicking() {
            queue.events.clear();
        }
    }
}

/// One attempt running on this worker, as far as its progress events go.
#[derive(Debug, Default)]
struct Running {
    /// Trails of this attempt (two when a task was sent twice with the same id).
    holders: usize,
    /// Its last progress append, which waits for the one before it.
    last: Option<JoinHandle<()>>,
}

impl Appender {
    /// Appends to `settings.stream` over `publish`, as worker `worker` consuming `queue`.
    pub(crate) fn new(
        settings: &EventSettings,
        publish: &Link,
        queue: &str,
        worker: &str,
        timeout: Duration,
    ) -> Self {
        if !settings.enabled {
            return Self::off();
        }
        Self {
            inner: Some(Arc::new(Inner {
                pool: LinkPool::new(publish.clone(), 1, timeout, None),
                stream: settings.stream.clone(),
                queue: queue.to_owned(),
                worker: worker.to_owned(),
                max_result_bytes: settings.max_result_bytes,
                timeout,
                attempts: Mutex::default(),
                pending: Mutex::default(),
            })),
        }
    }

    /// An appender that appends nothing.
    pub(crate) fn off() -> Self {
        Self { inner: None }
    }

    /// The trail of one delivery, read from its envelope; its function and attempt are set by
    /// [`Trail::identify`] once the body is read.
    pub(crate) fn trail(&self, envelope: &Envelope) -> Trail {
        let subject = self.inner.as_ref().map(|inner| Subject {
            task_id: envelope.id.as_str().to_owned(),
            function: String::new(),
            queue: inner.queue.clone(),
            attempt: envelope.attempt.clone().unwrap_or(1),
            worker: inner.worker.clone(),
            batch: envelope.batch.clone(),
            origin: envelope.origin.clone(),
            traceparent: envelope.trace.as_ref().map(|t| t.traceparent()),
        });
        Trail {
            appender: self.clone(),
            subject,
            started: Started::No,
            registered: false,
        }
    }

    /// Appends progress event number `seq` (from 1, per attempt) of the running attempt
    /// `subject`, without waiting: the append runs on its own, after the attempt's earlier
    /// progress events and before its final event. Ignored when events are off, and after
    /// the attempt's final event (a report that came too late). A message longer than
    /// [`MAX_EVENT_TEXT`] is cut, and a detail larger than the result cap
    /// ([`EventSettings::max_result_bytes`]) is left out. A failed append is logged and
    /// counted in `warren_worker_event_appends_failed_total`; the task is not affected.
    ///
    /// Must be called from within the tokio runtime.
    pub(crate) fn progress(&self, subject: &Subject, seq: u32, progress: Progress) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut event = subject.event(EventKind::Progress);
        event.seq = Some(seq);
        event.progress = Some(bounded_progress(progress, inner.max_result_bytes));
        let mut attempts = inner
            .attempts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(running) = attempts.get_mut(&(subject.task_id.clone(), subject.attempt)) else {
            tracing::debug!(task.id = %subject.task_id, seq, "progress after the attempt's final event; not appended");
            return;
        };
        let before = running.last.take();
        let inner = inner.clone();
        running.last = Some(tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            if let Err(e) = inner.append(&event).await {
                tracing::warn!(task.id = %event.task_id, seq, stream = %inner.stream, error = %e, "could not append a progress event");
                crate::metrics::event_append_failed(&inner.queue);
            }
        }));
    }
}

impl Inner {
    /// Appends `event` and waits for the confirm of the message that carried it.
    async fn append(self: &Arc<Self>, event: &Event) -> Result<(), PublishError> {
        self.submit(event).0.confirmed().await
    }

    /// Hands `event` to the writer, after every event submitted before it; its confirm is to
    /// be awaited. When no writer runs (nothing in flight), starts one, which publishes the
    /// event at once as a message of its own; the receiver given then says when it is on its
    /// way.
    fn submit(self: &Arc<Self>, event: &Event) -> (Confirming, Option<oneshot::Receiver<()>>) {
        let (done, confirming) = oneshot::channel();
        let queued = Queued {
            body: event.to_body(),
            properties: event.properties(),
            at_ms: event.at_ms,
            done,
        };
        let start = {
            let mut queue = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            queue.events.push_back(queued);
            !std::mem::replace(&mut queue.writing, true)
        };
        if !start {
            return (Confirming(confirming), None);
        }
        let (sent, on_its_way) = oneshot::channel();
        tokio::spawn(self.clone().write(sent));
        (Confirming(confirming), Some(on_its_way))
    }

    /// The writer: publishes what is queued as one message, tells `sent` once the first is on
    /// its way, waits for its confirm, tells every submitter of it, and again, until the queue
    /// is empty.
    async fn write(self: Arc<Self>, sent: oneshot::Sender<()>) {
        let _guard = WriterGuard(&self);
        let mut sent = Some(sent);
        loop {
            let message = {
                let mut queue = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                let (mut message, mut bytes) = (Vec::new(), 0);
                while let Some(next) = queue.events.front()
                    && format::pack_fits(message.len(), bytes, next.body.len())
                {
                    bytes += 1 + next.body.len();
                    message.extend(queue.events.pop_front());
                }
                if message.is_empty() {
                    queue.writing = false;
                    return;
                }
                message
            };
            let result = match self.publish(&message).await {
                Ok(unconfirmed) => {
                    if let Some(sent) = sent.take() {
                        let _ = sent.send(());
                    }
                    unconfirmed.confirmed().await
                }
                Err(e) => Err(e),
            };
            sent = None;
            for queued in message {
                let _ = queued.done.send(result.clone());
            }
        }
    }

    /// Publishes `events` as one message, its confirm to be awaited: an event alone as
    /// itself, several as a pack.
    async fn publish(&self, events: &[Queued]) -> Result<Unconfirmed, PublishError> {
        let (properties, packed);
        let body = if let [one] = events {
            properties = one.properties.clone();
            one.body.as_slice()
        } else {
            let mut pack = Pack::new();
            for queued in events {
                pack.push(&queued.body, queued.at_ms);
            }
            properties = pack.properties();
            packed = pack.into_body();
            packed.as_slice()
        };
        let publication = Publication {
            exchange: "",
            routing_key: &self.stream,
            body,
            properties,
            mandatory: true,
        };
        publish_unconfirmed(&self.pool.pool(), publication, self.timeout).await
    }

    fn register(&self, subject: &Subject) {
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        attempts
            .entry((subject.task_id.clone(), subject.attempt))
            .or_default()
            .holders += 1;
    }

    /// Ends a trail's hold on its attempt; gives the attempt's last progress append, unless
    /// another trail of the same attempt still runs.
    fn release(&self, subject: &Subject) -> Option<JoinHandle<()>> {
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        let key = (subject.task_id.clone(), subject.attempt);
        let running = attempts.get_mut(&key)?;
        running.holders = running.holders.saturating_sub(1);
        if running.holders > 0 {
            return None;
        }
        attempts.remove(&key).and_then(|r| r.last)
    }
}

/// `progress` with its message cut to [`MAX_EVENT_TEXT`] and, when larger than
/// `max_detail_bytes`, without its detail.
fn bounded_progress(mut progress: Progress, max_detail_bytes: usize) -> Progress {
    if let Some(message) = &mut progress.message
        && message.len() > MAX_EVENT_TEXT
    {
        *message = envelope::bounded(message, MAX_EVENT_TEXT).into_owned();
    }
    if progress
        .detail
        .as_ref()
        .is_some_and(|d| d.get().len() > max_detail_bytes)
    {
        progress.detail = None;
    }
    progress
}

/// The attempt's last event for `outcome`, if it has one; a result larger than
/// `max_result_bytes` is left out and the event marked `truncated`.
fn final_event(subject: &Subject, outcome: &Outcome, max_result_bytes: usize) -> Option<Event> {
    let failed = |kind: EventKind, failure: &TaskFailure| {
        let mut event = subject.event(kind);
        event.error = Some(EventError {
            kind: failure.kind.as_str().to_owned(),
            message: envelope::bounded(&failure.message, MAX_EVENT_TEXT).into_owned(),
        });
        event
    };
    match outcome {
        Outcome::Reply(Reply::Ok(result)) => {
            let mut event = subject.event(EventKind::Succeeded);
            if result.get().len() <= max_result_bytes {
                event.result = Some(result.clone());
            } else {
                event.truncated = true;
            }
            Some(event)
        }
        Outcome::Reply(Reply::Err(failure)) if failure.kind == ErrorKind::Expired => {
            Some(failed(EventKind::Expired, failure))
        }
        Outcome::Reply(Reply::Err(failure)) => Some(failed(EventKind::Failed, failure)),
        Outcome::Retry { delay, failure } => {
            let mut event = failed(EventKind::Failed, failure);
            event.retry = Some(RetryAt {
                attempt: subject.attempt.saturating_add(1),
                at_ms: epoch_millis(SystemTime::now() + *delay),
            });
            Some(event)
        }
        Outcome::DeadLetter { reason, failure } => {
            let mut event = failed(EventKind::DeadLettered, failure);
            event.reason = Some(reason.as_str().to_owned());
            Some(event)
        }
        Outcome::HandBack | Outcome::Later { .. } => None,
    }
}

/// Where a trail's `started` event is.
#[derive(Debug, Default)]
enum Started {
    /// Not sent: the handler has not begun (or events are off).
    #[default]
    No,
    /// Submitted at `at_ms`; its confirm is to come.
    Sent { at_ms: i64, sent: Confirming },
    /// Made at `at_ms` but not sent, or not confirmed: to be sent again before the final event.
    Unsent { at_ms: i64 },
}

/// The events of one delivery, from its start to its settlement; see the [module](self).
#[derive(Debug)]
pub(crate) struct Trail {
    appender: Appender,
    /// `None` when events are off.
    subject: Option<Subject>,
    started: Started,
    /// Whether it holds its attempt in the appender (from `started` until settled or dropped).
    registered: bool,
}

impl Trail {
    /// A trail that appends nothing.
    #[cfg(test)]
    pub(crate) fn off() -> Self {
        Appender::off().trail(&Envelope::read(&lapin::BasicProperties::default()))
    }

    /// The task's function and attempt, once read.
    pub(crate) fn identify(&mut self, function: &str, attempt: u32) {
        if let Some(subject) = &mut self.subject {
            function.clone_into(&mut subject.function);
            if subject.function.len() > MAX_FUNCTION_BYTES {
                subject.function =
                    envelope::bounded(&subject.function, MAX_FUNCTION_BYTES).into_owned();
            }
            subject.attempt = attempt;
        }
    }

    /// Where this attempt's progress events go ([`Appender::progress`]): `None` when events
    /// are off.
    pub(crate) fn progress_events(&self) -> Option<(Appender, Subject)> {
        self.appender.inner.as_ref()?;
        Some((self.appender.clone(), self.subject.clone()?))
    }

    /// The handler begins: hands `started` to the writer, without waiting for its confirm
    /// (which [`Trail::settle`] awaits). With nothing in flight it goes at once, as a message
    /// of its own, before the handler starts (at most [`STARTED_SEND_WAIT`]); else it waits
    /// for the next message, and the handler starts meanwhile. One that fails is appended
    /// again by `settle`.
    pub(crate) async fn started(&mut self) {
        let (Some(inner), Some(subject)) = (&self.appender.inner, &self.subject) else {
            return;
        };
        if !self.registered {
            inner.register(subject);
            self.registered = true;
        }
        let event = subject.event(EventKind::Started);
        let (sent, on_its_way) = inner.submit(&event);
        self.started = Started::Sent {
            at_ms: event.at_ms,
            sent,
        };
        if let Some(on_its_way) = on_its_way {
            let _ = tokio::time::timeout(STARTED_SEND_WAIT, on_its_way).await;
        }
    }

    /// Appends the attempt's last event for `outcome` (none for a hand-back or a task not due
    /// yet) after its progress events, and waits until the broker has confirmed it and
    /// `started`. Safe to call again after a failure: what was not confirmed is sent again.
    ///
    /// # Errors
    /// The append that failed.
    pub(crate) async fn settle(&mut self, outcome: &Outcome) -> Result<(), PublishError> {
        let (Some(inner), Some(subject)) = (self.appender.inner.clone(), self.subject.as_ref())
        else {
            return Ok(());
        };
        if self.registered {
            self.registered = false;
            if let Some(last) = inner.release(subject) {
                // Progress is best effort: a chain stuck on a broken link does not hold the
                // settlement longer than one publish may take.
                let _ = tokio::time::timeout(inner.timeout, last).await;
            }
        }
        // Once more if a channel closed under it (the publishing link reconnected): the events
        // go again on the new one.
        match self.send_last(&inner, outcome).await {
            Err(PublishError::Channel(e)) => {
                tracing::debug!(error = %e, "the events' channel closed; appending them again");
                self.send_last(&inner, outcome).await
            }
            done => done,
        }
    }

    /// In order through the writer: `started` (again, if it was not confirmed), then the final
    /// event (often in the same message); then both confirms.
    async fn send_last(
        &mut self,
        inner: &Arc<Inner>,
        outcome: &Outcome,
    ) -> Result<(), PublishError> {
        let Some(subject) = &self.subject else {
            return Ok(());
        };
        let started = match std::mem::take(&mut self.started) {
            Started::No => None,
            Started::Sent { at_ms, sent } => Some((at_ms, sent)),
            Started::Unsent { at_ms } => {
                let mut event = subject.event(EventKind::Started);
                event.at_ms = at_ms;
                Some((at_ms, inner.submit(&event).0))
            }
        };
        let last = final_event(subject, outcome, inner.max_result_bytes)
            .map(|event| inner.submit(&event).0);
        let mut result = Ok(());
        if let Some((at_ms, sent)) = started
            && let Err(e) = sent.confirmed().await
        {
            self.started = Started::Unsent { at_ms };
            result = Err(e);
        }
        if let Some(last) = last {
            result = result.and(last.confirmed().await);
        }
        result
    }

    /// The task was parked with reason `refused` after its outcome's own event, which was not
    /// final (a retry the broker would not take): appends `dead_lettered` so that the task
    /// still ends with a final event. Best effort: the task is parked whatever happens here.
    pub(crate) async fn parked_as_refused(&mut self, outcome: &Outcome, failure: &TaskFailure) {
        let (Some(inner), Some(subject)) = (&self.appender.inner, &self.subject) else {
            return;
        };
        if !matches!(outcome, Outcome::Retry { .. }) {
            return; // its own event was already final
        }
        let parked = Outcome::DeadLetter {
            reason: envelope::DeadReason::Refused,
            failure: failure.clone(),
        };
        let Some(event) = final_event(subject, &parked, inner.max_result_bytes) else {
            return;
        };
        if let Err(e) = inner.append(&event).await {
            tracing::warn!(task.id = %subject.task_id, stream = %inner.stream, error = %e, "could not append the dead_lettered event of a task parked as refused");
            crate::metrics::event_append_failed(&inner.queue);
        }
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        // A trail dropped unsettled (a task handed back) lets its attempt go; its progress
        // appends finish on their own.
        if self.registered
            && let (Some(inner), Some(subject)) = (&self.appender.inner, &self.subject)
        {
            drop(inner.release(subject));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use warren_shared::RawJson;
    use warren_shared::envelope::DeadReason;

    fn subject() -> Subject {
        Subject {
            task_id: "0193a1b2-0000-7000-8000-000000000000".into(),
            function: "resize".into(),
            queue: "images".into(),
            attempt: 2,
            worker: "w1".into(),
            batch: Some("b1".into()),
            origin: None,
            traceparent: None,
        }
    }

    fn raw(text: &str) -> RawJson {
        RawJson::from_string(text.to_owned()).unwrap()
    }

    #[test]
    fn a_result_within_the_cap_is_carried_and_a_larger_one_marked_truncated() {
        let ok = Outcome::Reply(Reply::Ok(raw("\"12345678\"")));
        let event = final_event(&subject(), &ok, 10).unwrap();
        assert_eq!(event.kind, EventKind::Succeeded);
        assert_eq!(event.result.unwrap().get(), "\"12345678\"");
        assert!(!event.truncated);
        let event = final_event(&subject(), &ok, 9).unwrap();
        assert!(event.result.is_none() && event.truncated);
        assert!(event.is_final());
    }

    #[test]
    fn a_retry_says_which_attempt_runs_when() {
        let before = epoch_millis(SystemTime::now());
        let retry = Outcome::Retry {
            delay: Duration::from_secs(10),
            failure: TaskFailure::new(ErrorKind::HandlerFailed, "x".repeat(10_000)),
        };
        let event = final_event(&subject(), &retry, 10).unwrap();
        assert_eq!(event.kind, EventKind::Failed);
        let at = event.retry.unwrap();
        assert_eq!(at.attempt, 3);
        assert!(at.at_ms >= before + 10_000 && at.at_ms < before + 20_000);
        let error = event.error.unwrap();
        assert_eq!(error.kind, "handler_failed");
        assert!(error.message.len() <= MAX_EVENT_TEXT);
        assert!(!final_event(&subject(), &retry, 10).unwrap().is_final());
    }

    #[test]
    fn each_outcome_has_its_kind() {
        let failure = || TaskFailure::new(ErrorKind::Expired, "late");
        let expired = Outcome::Reply(Reply::Err(failure()));
        let event = final_event(&subject(), &expired, 10).unwrap();
        assert_eq!(event.kind, EventKind::Expired);
        assert_eq!(event.error.unwrap().kind, "expired");
        let parked = Outcome::DeadLetter {
            reason: DeadReason::AttemptsExhausted,
            failure: TaskFailure::new(ErrorKind::Timeout, "slow"),
        };
        let event = final_event(&subject(), &parked, 10).unwrap();
        assert_eq!(event.kind, EventKind::DeadLettered);
        assert_eq!(event.reason.as_deref(), Some("attempts_exhausted"));
        assert_eq!(event.batch.as_deref(), Some("b1"));
        assert!(final_event(&subject(), &Outcome::HandBack, 10).is_none());
        assert!(final_event(&subject(), &Outcome::Later { seconds: 5 }, 10).is_none());
    }

    #[test]
    fn progress_is_bounded() {
        let progress = Progress {
            fraction: Some(0.5),
            message: Some("é".repeat(5000)),
            detail: Some(raw("[1,2,3]")),
        };
        let kept = bounded_progress(progress.clone(), 7);
        assert!(kept.message.as_ref().unwrap().len() <= MAX_EVENT_TEXT);
        assert_eq!(kept.detail.unwrap().get(), "[1,2,3]");
        assert!(bounded_progress(progress, 6).detail.is_none());
    }
}
