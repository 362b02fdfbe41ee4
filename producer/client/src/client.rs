//! The async client: `call` a task and await its result, or `enqueue` it and move on.
//!
//! One [`Client`] owns one publishing connection and a pool of confirm-mode channels on it. Each
//! pooled channel also consumes `amq.rabbitmq.reply-to` (direct reply-to needs requests and the
//! reply consumer on the same channel), and a dispatcher per channel hands each reply to the
//! call waiting for its correlation id. A call registers its id *before* publishing, so even an
//! instant reply finds it, and removes it when it returns, times out or is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore, oneshot, watch};
use warren_shared::broker::{self, BrokerError, BrokerSettings, Purpose};
use warren_shared::link::{Link, LinkState};
use warren_shared::policy;
use warren_shared::pool::{self, ChannelSetup, Publication, publish_confirmed};
use warren_shared::protocol::{self, DIRECT_REPLY_TO, headers};
use warren_shared::{ChannelPool, PublishError, Reply, Request, Task, TaskId, topology};

use crate::error::Error;

/// How a client connects and behaves by default.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Where the broker is.
    pub broker: BrokerSettings,
    /// Queue used when a call does not name one.
    pub queue: String,
    /// How long `call` waits for a reply unless told otherwise.
    pub call_timeout: Duration,
    /// Bound on one publish, broker confirm included.
    pub publish_timeout: Duration,
    /// Pooled channels on the publishing connection.
    pub channels: usize,
    /// How long a call or enqueue waits for a lost (or blocked) broker connection to come back
    /// before failing with [`Error::Unavailable`]. A call also never waits past its timeout.
    pub reconnect_wait: Duration,
    /// Publishes awaiting the broker's confirm at once; more wait their turn, so a caller that
    /// publishes faster than the broker accepts is slowed down instead of buffered without end.
    pub max_in_flight_publishes: usize,
    /// How this process appears in the management UI.
    pub name: String,
    /// A connection that lapin's recovery has not brought back within this long is replaced by
    /// a new one (lapin's recovery can stall; seen after broker restarts).
    pub stuck_after: Duration,
    /// Where replies to calls go.
    pub replies: ReplyMode,
}

/// Where the replies to a client's calls go, and what a dropped connection does to calls in
/// flight.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReplyMode {
    /// RabbitMQ's direct reply-to: no queue at all, the fastest. Replies are addressed to the
    /// connection, so when it drops, every call waiting for a reply fails at once with
    /// [`Error::ConnectionLost`] (the task itself may still run).
    #[default]
    Direct,
    /// A durable queue of this client's own, `warren.reply.<uuid>`, that outlives a dropped
    /// connection or a broker restart: calls in flight get their replies after the client
    /// reconnects. The broker deletes the queue once it has had no consumer for `expires`.
    Queue {
        /// How long the queue outlives its client.
        expires: Duration,
    },
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            broker: BrokerSettings::default(),
            queue: topology::DEFAULT_QUEUE.to_owned(),
            call_timeout: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            channels: 4,
            reconnect_wait: Duration::from_secs(30),
            max_in_flight_publishes: 1024,
            replies: ReplyMode::Direct,
            stuck_after: Duration::from_secs(30),
            name: broker::process_name("warren-client"),
        }
    }
}

/// Per-call options; unset fields take the client's defaults.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// The queue to send to.
    pub queue: Option<String>,
    /// For `call`: how long to wait for the reply. For both `call` and `enqueue`: the task's
    /// deadline is now + this, and a worker that gets it later answers `expired` instead of
    /// running it. `enqueue` sets no deadline unless this is set.
    pub timeout: Option<Duration>,
    /// Attempts the task gets in all (overrides the worker's policy for this task).
    pub max_attempts: Option<u32>,
    /// Delays between attempts (overrides the worker's policy for this task).
    pub backoff: Option<Vec<Duration>>,
    /// Execution time limit of one attempt (overrides the worker's policy for this task).
    pub time_limit: Option<Duration>,
    /// The caller's trace context: the task carries a `traceparent` naming a `send` span that
    /// is its child, so the worker's `process` span joins the same trace (and keeps it across
    /// retries).
    pub trace: Option<warren_shared::trace::TraceContext>,
}

impl CallOptions {
    /// Continues the trace `context` on the worker (see [`CallOptions::trace`]).
    #[must_use]
    pub fn trace(mut self, context: warren_shared::trace::TraceContext) -> Self {
        self.trace = Some(context);
        self
    }

    /// Gives the task `attempts` attempts in all.
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = Some(attempts);
        self
    }

    /// Waits `backoff[n-1]` before attempt n+1 (the last delay repeats).
    #[must_use]
    pub fn backoff(mut self, backoff: Vec<Duration>) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Lets one attempt run at most `limit`.
    #[must_use]
    pub fn time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }

    /// Sends to `queue`.
    #[must_use]
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Waits at most `timeout` (and sets the deadline accordingly).
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

type ReplySender = oneshot::Sender<Result<Reply, String>>;

/// Calls waiting for their reply, by correlation id.
#[derive(Debug, Default)]
struct Pending(Mutex<HashMap<String, ReplySender>>);

impl Pending {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, ReplySender>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops every waiting call's sender: each call ends with [`Error::ConnectionLost`].
    fn fail_all(&self) -> usize {
        let mut map = self.lock();
        let n = map.len();
        map.clear();
        n
    }

    fn deliver(&self, correlation_id: &str, reply: Result<Reply, String>) {
        match self.lock().remove(correlation_id) {
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(correlation_id, "reply for a call that is no longer waiting"),
        }
    }
}

/// Removes a call's entry when the call ends, however it ends.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(self.id);
    }
}

struct Inner {
    settings: ClientSettings,
    /// The `reply_to` of calls: direct reply-to, or this client's reply queue (one name for the
    /// client's whole life, so that replies outlive a replaced connection).
    reply_to: String,
    /// The current connection; replaced by the supervisor when it is stuck recovering.
    session: std::sync::RwLock<Arc<Session>>,
    publishing: Semaphore,
    pending: Arc<Pending>,
    declared: Mutex<HashMap<String, Arc<OnceCell<()>>>>,
    closed: std::sync::atomic::AtomicBool,
}

/// One connection of a client, with what hangs off it.
struct Session {
    connection: Arc<Connection>,
    link: Link,
    pool: ChannelPool,
}

impl Session {
    async fn open(
        settings: &ClientSettings,
        reply_to: &str,
        pending: &Arc<Pending>,
    ) -> Result<Self, Error> {
        let connection =
            Arc::new(broker::connect(&settings.broker, &settings.name, Purpose::Publish).await?);
        let link = Link::watch(connection.clone(), settings.name.clone());
        let setup = match &settings.replies {
            ReplyMode::Direct => {
                tokio::spawn(fail_calls_on_disconnect(
                    link.subscribe(),
                    Arc::downgrade(pending),
                ));
                // Direct reply-to needs its consumer on the channel that publishes the request:
                // every pooled channel gets one.
                let setup: ChannelSetup = {
                    let pending = pending.clone();
                    Arc::new(move |channel: Channel| {
                        let pending = pending.clone();
                        Box::pin(async move { start_reply_consumer(channel, pending).await })
                    })
                };
                Some(setup)
            }
            ReplyMode::Queue { expires } => {
                start_reply_queue(&connection, reply_to, *expires, pending.clone()).await?;
                None
            }
        };
        let pool = pool::channel_pool(
            connection.clone(),
            settings.channels,
            settings.publish_timeout,
            setup,
        );
        Ok(Self {
            connection,
            link,
            pool,
        })
    }
}

/// How often the client checks that its connection is not stuck recovering.
const SUPERVISE_EVERY: Duration = Duration::from_secs(1);

/// Replaces the client's connection when lapin's recovery has not brought it back within
/// `stuck_after` (or gave up), retrying with backoff, for as long as the client lives.
async fn supervise(inner: std::sync::Weak<Inner>) {
    let mut failures = 0;
    loop {
        tokio::time::sleep(SUPERVISE_EVERY).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let current = inner.current();
        let stuck = current.link.state() == LinkState::Closed
            || current
                .link
                .down_for()
                .is_some_and(|d| d > inner.settings.stuck_after);
        if !stuck {
            failures = 0;
            continue;
        }
        if failures == 0 {
            tracing::warn!(state = %current.link.state(), "broker connection stuck; replacing it");
        }
        match Session::open(&inner.settings, &inner.reply_to, &inner.pending).await {
            Ok(session) => {
                *inner
                    .session
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(session);
                tracing::info!("broker connection replaced");
                failures = 0;
                let old = current.connection.clone();
                tokio::spawn(async move {
                    let _ = old.close(200, "replaced".into()).await;
                });
            }
            Err(e) => {
                failures += 1;
                tracing::debug!(error = %e, "replacing the broker connection failed; retrying");
                tokio::time::sleep(inner.settings.broker.reconnect.delay(failures)).await;
            }
        }
    }
}

impl Inner {
    fn current(&self) -> Arc<Session> {
        self.session
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// A handle to Warren: cheap to clone, `Send + Sync`, made for thousands of concurrent calls.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("settings", &self.inner.settings)
            .field("pending_calls", &self.pending_calls())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the broker. Queues are declared on first use.
    ///
    /// # Errors
    /// [`Error::Broker`] when the broker cannot be reached, naming it and what to do;
    /// [`Error::InvalidQueue`] for an unusable default queue.
    pub async fn connect(settings: ClientSettings) -> Result<Self, Error> {
        topology::validate_queue_name(&settings.queue).map_err(Error::InvalidQueue)?;
        let pending = Arc::new(Pending::default());
        let reply_to = match &settings.replies {
            ReplyMode::Direct => DIRECT_REPLY_TO.to_owned(),
            ReplyMode::Queue { .. } => format!("warren.reply.{}", uuid::Uuid::new_v4().simple()),
        };
        let session = Session::open(&settings, &reply_to, &pending).await?;
        let inner = Arc::new(Inner {
            publishing: Semaphore::new(settings.max_in_flight_publishes.max(1)),
            reply_to,
            settings,
            session: std::sync::RwLock::new(Arc::new(session)),
            pending,
            declared: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(supervise(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The settings this client was made with.
    pub fn settings(&self) -> &ClientSettings {
        &self.inner.settings
    }

    /// Calls awaiting a reply right now.
    pub fn pending_calls(&self) -> usize {
        self.inner.pending.lock().len()
    }

    /// Runs a typed task and returns its result.
    ///
    /// # Errors
    /// See [`Error`]: a worker's failure, a timeout, a publish the broker did not accept.
    pub async fn call<T: Task>(&self, task: &T) -> Result<T::Output, Error> {
        self.call_with(task, &CallOptions::default()).await
    }

    /// [`Client::call`] with options.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_with<T: Task>(
        &self,
        task: &T,
        options: &CallOptions,
    ) -> Result<T::Output, Error> {
        let args = serde_json::to_value(task).map_err(Error::Encode)?;
        let result = self.call_json_with(T::NAME, args, options).await?;
        serde_json::from_value(result)
            .map_err(|e| Error::BadReply(format!("result of {:?} does not decode: {e}", T::NAME)))
    }

    /// Runs `function` with JSON `args` and returns its JSON result.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_json(&self, function: &str, args: Value) -> Result<Value, Error> {
        self.call_json_with(function, args, &CallOptions::default())
            .await
    }

    /// [`Client::call_json`] with options.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_json_with(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
    ) -> Result<Value, Error> {
        self.call_json_inner(function, args, options, None).await
    }

    /// [`Client::call_json_with`] that also tells `published` the task's id as soon as the
    /// broker has confirmed the task (it is then durably queued), before the result arrives.
    ///
    /// `published` is dropped without a value when the call fails before the confirm. This is
    /// what lets the gateway acknowledge "enqueued" and later push the result.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_json_with_ack(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
        published: oneshot::Sender<TaskId>,
    ) -> Result<Value, Error> {
        self.call_json_inner(function, args, options, Some(published))
            .await
    }

    async fn call_json_inner(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
        published: Option<oneshot::Sender<TaskId>>,
    ) -> Result<Value, Error> {
        let timeout = options.timeout.unwrap_or(self.inner.settings.call_timeout);
        let give_up = tokio::time::Instant::now() + timeout;
        let deadline = SystemTime::now() + timeout;
        let id = TaskId::new();
        let request = Request {
            function: function.to_owned(),
            args,
        };
        let body = request.encode();
        let work = async {
            loop {
                // Register before publishing so that even an instant reply finds the call; and
                // only once the link is up, so that a disconnect fails exactly the calls whose
                // requests were already out.
                self.wait_for_link(give_up).await?;
                let (tx, rx) = oneshot::channel();
                self.inner.pending.lock().insert(id.as_str().to_owned(), tx);
                let guard = PendingGuard {
                    pending: &self.inner.pending,
                    id: id.as_str(),
                };
                match self
                    .publish(&request.function, &body, &id, options, Some(deadline), true)
                    .await
                {
                    Ok(()) => return Ok((rx, guard)),
                    Err(e) if self.retry_after(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        let (rx, _guard) = match tokio::time::timeout_at(give_up, work).await {
            Ok(registered) => registered?,
            Err(_) => return Err(Error::Timeout(timeout)),
        };
        if let Some(published) = published {
            // The receiver may have gone away; the call goes on regardless.
            let _ = published.send(id.clone());
        }
        match tokio::time::timeout_at(give_up, rx).await {
            Ok(Ok(Ok(reply))) => reply.into_result().map_err(Error::Failed),
            Ok(Ok(Err(malformed))) => Err(Error::BadReply(malformed)),
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Queues a typed task without waiting for it to run. Returns once the broker has
    /// confirmed it holds the task durably.
    ///
    /// # Errors
    /// As [`Client::enqueue_json`].
    pub async fn enqueue<T: Task>(&self, task: &T) -> Result<TaskId, Error> {
        self.enqueue_with(task, &CallOptions::default()).await
    }

    /// [`Client::enqueue`] with options.
    ///
    /// # Errors
    /// As [`Client::enqueue_json`].
    pub async fn enqueue_with<T: Task>(
        &self,
        task: &T,
        options: &CallOptions,
    ) -> Result<TaskId, Error> {
        let args = serde_json::to_value(task).map_err(Error::Encode)?;
        self.enqueue_json_with(T::NAME, args, options).await
    }

    /// Queues `function` with JSON `args`; see [`Client::enqueue`].
    ///
    /// # Errors
    /// [`Error::Publish`] when the broker did not confirm the task, [`Error::Broker`] when the
    /// queue could not be declared, [`Error::InvalidQueue`].
    pub async fn enqueue_json(&self, function: &str, args: Value) -> Result<TaskId, Error> {
        self.enqueue_json_with(function, args, &CallOptions::default())
            .await
    }

    /// [`Client::enqueue_json`] with options.
    ///
    /// # Errors
    /// As [`Client::enqueue_json`].
    pub async fn enqueue_json_with(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
    ) -> Result<TaskId, Error> {
        let id = TaskId::new();
        let deadline = options.timeout.map(|t| SystemTime::now() + t);
        let request = Request {
            function: function.to_owned(),
            args,
        };
        let body = request.encode();
        let give_up = tokio::time::Instant::now() + self.inner.settings.reconnect_wait;
        loop {
            self.wait_for_link(give_up).await?;
            match self
                .publish(&request.function, &body, &id, options, deadline, false)
                .await
            {
                Ok(()) => return Ok(id),
                Err(e) if self.retry_after(&e) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Declares work queue `queue` and its dead-letter queue, once per client. Calls and
    /// enqueues do this themselves; use it to create a queue before anything is sent to it.
    ///
    /// # Errors
    /// [`Error::Broker`] (for instance when the queue exists with other arguments) or
    /// [`Error::InvalidQueue`].
    pub async fn declare_queue(&self, queue: &str) -> Result<(), Error> {
        self.ensure_queue(queue).await
    }

    /// Ready messages and consumers of an existing queue right now (a passive declare).
    ///
    /// # Errors
    /// [`Error::Broker`] when the queue does not exist or the broker cannot be asked.
    pub async fn queue_stats(&self, queue: &str) -> Result<QueueStats, Error> {
        let channel = self.channel().await?;
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        Ok(QueueStats {
            ready: q.message_count(),
            consumers: q.consumer_count(),
        })
    }

    /// Closes the connection. Calls still waiting fail with [`Error::ConnectionLost`].
    pub async fn close(&self) {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.connection().close(200, "client closing".into()).await;
    }

    /// Publishes sent and not yet confirmed by the broker; never more than
    /// [`ClientSettings::max_in_flight_publishes`].
    pub fn publishes_in_flight(&self) -> usize {
        self.inner.settings.max_in_flight_publishes.max(1)
            - self.inner.publishing.available_permits()
    }

    /// The reply queue of a client in [`ReplyMode::Queue`].
    pub fn reply_queue(&self) -> Option<&str> {
        (self.inner.settings.replies != ReplyMode::Direct).then_some(self.inner.reply_to.as_str())
    }

    /// The state of the broker connection.
    pub fn link_state(&self) -> LinkState {
        self.inner.current().link.state()
    }

    /// Waits for the link to be up, until `give_up` and at most `reconnect_wait`; follows the
    /// client to a replacement connection.
    async fn wait_for_link(&self, give_up: tokio::time::Instant) -> Result<(), Error> {
        let bound = give_up
            .saturating_duration_since(tokio::time::Instant::now())
            .min(self.inner.settings.reconnect_wait);
        let until = tokio::time::Instant::now() + bound;
        loop {
            let link = self.inner.current().link.clone();
            if link.state().is_up() {
                return Ok(());
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(
                    warren_shared::link::Unavailable {
                        waited: bound,
                        state: link.state().to_string(),
                    }
                    .to_string(),
                ));
            }
            // In steps, so that a connection replaced meanwhile is noticed.
            let _ = link.wait_up(left.min(SUPERVISE_EVERY)).await;
        }
    }

    /// Whether a failed publish is worth another try once the link is back: only failures of
    /// the connection, never a refusal by the broker.
    fn retry_after(&self, error: &Error) -> bool {
        let connection_failure = matches!(
            error,
            Error::Publish(PublishError::NoChannel(_) | PublishError::Channel(_))
        );
        connection_failure && !self.inner.current().link.state().is_up()
    }

    pub(crate) fn connection(&self) -> Arc<Connection> {
        self.inner.current().connection.clone()
    }

    pub(crate) fn pool(&self) -> ChannelPool {
        self.inner.current().pool.clone()
    }

    async fn channel(&self) -> Result<deadpool::managed::Object<pool::ChannelManager>, Error> {
        self.pool()
            .get()
            .await
            .map_err(|e| Error::Publish(warren_shared::PublishError::NoChannel(e.to_string())))
    }

    async fn ensure_queue(&self, queue: &str) -> Result<(), Error> {
        let cell = {
            let mut declared = self
                .inner
                .declared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            declared.entry(queue.to_owned()).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            topology::validate_queue_name(queue).map_err(Error::InvalidQueue)?;
            let channel = self.channel().await?;
            topology::declare(&channel, queue)
                .await
                .map_err(BrokerError::from)?;
            Ok::<(), Error>(())
        })
        .await?;
        Ok(())
    }

    async fn publish(
        &self,
        function: &str,
        body: &[u8],
        id: &TaskId,
        options: &CallOptions,
        deadline: Option<SystemTime>,
        wants_reply: bool,
    ) -> Result<(), Error> {
        let queue = options
            .queue
            .as_deref()
            .unwrap_or(&self.inner.settings.queue);
        self.ensure_queue(queue).await?;
        let mut h = FieldTable::default();
        protocol::set_header_int(&mut h, headers::PROTOCOL, protocol::PROTOCOL_VERSION);
        protocol::set_header_int(&mut h, headers::ATTEMPT, 1);
        if let Some(deadline) = deadline {
            protocol::set_header_int(&mut h, headers::DEADLINE, protocol::epoch_millis(deadline));
        }
        if let Some(n) = options.max_attempts {
            protocol::set_header_int(&mut h, headers::MAX_ATTEMPTS, i64::from(n));
        }
        if let Some(backoff) = &options.backoff {
            protocol::set_header_str(&mut h, headers::BACKOFF, &policy::format_backoff(backoff));
        }
        if let Some(limit) = options.time_limit {
            let ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
            protocol::set_header_int(&mut h, headers::TIME_LIMIT, ms);
        }
        if let Some(send) = options
            .trace
            .as_ref()
            .map(warren_shared::trace::TraceContext::child)
        {
            tracing::debug!(task.id = %id, trace_id = %send.trace_id, span_id = %send.span_id, "send {queue}");
            warren_shared::trace::write(&mut h, &send);
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut properties = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_content_type(protocol::CONTENT_TYPE.into())
            .with_delivery_mode(2)
            .with_type(function.into())
            .with_timestamp(now.as_secs())
            .with_app_id("warren".into())
            .with_headers(h);
        if wants_reply {
            properties = properties
                .with_correlation_id(id.as_str().into())
                .with_reply_to(self.inner.reply_to.as_str().into());
        }
        // Bounded publishes in flight: past the limit, callers wait here.
        let _permit = self
            .inner
            .publishing
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("client closed".into()))?;
        let published = publish_confirmed(
            &self.inner.current().pool,
            Publication {
                exchange: topology::EXCHANGE,
                routing_key: queue,
                body,
                properties,
                mandatory: true,
            },
            self.inner.settings.publish_timeout,
        )
        .await;
        match published {
            // A broker that blocks publishers never confirms: say so rather than "timeout".
            Err(PublishError::Timeout(_))
                if matches!(self.inner.current().link.state(), LinkState::Blocked { .. }) =>
            {
                Err(Error::Unavailable(
                    self.inner.current().link.state().to_string(),
                ))
            }
            other => other.map_err(Error::from),
        }
    }
}

/// A queue's depth and consumers, from a passive declare (exact, unlike the management API's
/// sampled numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages ready for delivery (not counting those delivered and not yet acked).
    pub ready: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Starts the direct reply-to consumer of a new pooled channel and its dispatcher.
async fn start_reply_consumer(channel: Channel, pending: Arc<Pending>) -> Result<(), lapin::Error> {
    let mut replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(next) = replies.next().await {
            let delivery = match next {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "reply consumer failed");
                    break;
                }
            };
            let Some(correlation_id) = delivery.properties.correlation_id().as_ref() else {
                tracing::warn!("reply without correlation_id ignored");
                continue;
            };
            let reply =
                Reply::decode(&delivery.data).map_err(|e| format!("malformed reply body: {e}"));
            pending.deliver(correlation_id.as_str(), reply);
        }
        tracing::debug!(channel = channel.id(), "reply consumer ended");
    });
    Ok(())
}

/// Ends every waiting call with [`Error::ConnectionLost`] when the connection drops: their
/// direct replies were addressed to the lost connection and can never arrive.
async fn fail_calls_on_disconnect(
    mut link: watch::Receiver<LinkState>,
    pending: std::sync::Weak<Pending>,
) {
    while link.changed().await.is_ok() {
        let state = link.borrow_and_update().clone();
        if matches!(state, LinkState::Down { .. } | LinkState::Closed) {
            let Some(pending) = pending.upgrade() else {
                return;
            };
            let failed = pending.fail_all();
            if failed > 0 {
                tracing::warn!(
                    calls = failed,
                    "connection lost: failing the calls waiting for a reply"
                );
            }
        }
    }
}

/// Declares this client's reply queue and consumes it for as long as the client lives.
///
/// The queue is durable (replies are persistent, so they survive a broker restart), not
/// exclusive (an exclusive queue dies with its connection), and expires once unused. lapin's
/// recovery re-registers the consumer after a reconnect; should the consumer end for another
/// reason, it is started again.
async fn start_reply_queue(
    connection: &Arc<Connection>,
    queue: &str,
    expires: Duration,
    pending: Arc<Pending>,
) -> Result<(), Error> {
    let consume = move |connection: Arc<Connection>, queue: String| async move {
        let channel = connection.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            lapin::types::AMQPValue::LongLongInt(
                i64::try_from(expires.as_millis()).unwrap_or(i64::MAX),
            ),
        );
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::durable(), args)
            .await?;
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>(consumer)
    };
    let mut replies = consume(connection.clone(), queue.to_owned())
        .await
        .map_err(BrokerError::from)?;
    let weak = Arc::downgrade(connection);
    let queue = queue.to_owned();
    tokio::spawn(async move {
        loop {
            while let Some(next) = replies.next().await {
                let Ok(delivery) = next else { break };
                if let Some(correlation_id) = delivery.properties.correlation_id().as_ref() {
                    let reply = Reply::decode(&delivery.data)
                        .map_err(|e| format!("malformed reply body: {e}"));
                    pending.deliver(correlation_id.as_str(), reply);
                }
                // Acked once handed over (or found to be for nobody): a reply is read once.
                let _ = delivery
                    .ack(lapin::options::BasicAckOptions::default())
                    .await;
            }
            // The consumer ended: start it again while the client (its connection) lives.
            let mut attempt = 0;
            replies = loop {
                let Some(connection) = weak.upgrade() else {
                    return;
                };
                if connection.status().closed() || connection.status().errored() {
                    return;
                }
                match consume(connection, queue.clone()).await {
                    Ok(consumer) => break consumer,
                    Err(e) => {
                        attempt += 1;
                        if attempt == 1 {
                            tracing::warn!(error = %e, queue = %queue, "reply consumer lost; restarting it");
                        }
                        let delay = warren_shared::broker::Reconnect::default().delay(attempt);
                        tokio::time::sleep(delay).await;
                    }
                }
            };
        }
    });
    Ok(())
}
