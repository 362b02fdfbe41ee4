//! The async client: `call` a task and await its result, or `enqueue` it and move on.
//!
//! One [`Client`] owns one publishing [`Link`] (a connection that it replaces when it is lost;
//! the client's only owner of recovery) and a pool of confirm-mode channels on it, rebuilt on
//! each new connection together with the reply consumers ([`crate::replies`]). Calls waiting
//! for a direct reply fail with [`Error::ConnectionLost`] when the connection goes (their reply
//! can no longer arrive); calls with a reply queue keep waiting. A publish lost with its
//! connection is sent again on the next one ([`crate::publish`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::Value;
use tokio::sync::{OnceCell, Semaphore, oneshot};
use warren_shared::broker::{BrokerError, Purpose};
use warren_shared::link::{Link, LinkState};
use warren_shared::pool::{ChannelSetup, LinkPool};
use warren_shared::protocol::DIRECT_REPLY_TO;
use warren_shared::{ChannelPool, Json, RawJson, Reply, Request, Task, TaskId, envelope, topology};

use crate::error::Error;
use crate::options::{CallOptions, ClientSettings, QueueStats, ReplyMode};
use crate::pending::{Pending, PendingGuard, ProgressSender, Waiter, fail_calls_on_disconnect};
use crate::progress::ProgressCall;
use crate::replies::{start_reply_consumer, start_reply_queue};

/// Queues declared, by name.
pub(crate) type Declared = HashMap<String, Arc<OnceCell<()>>>;

pub(crate) struct Inner {
    pub(crate) settings: ClientSettings,
    /// The `reply_to` of calls: direct reply-to, or this client's reply queue (one name for the
    /// client's whole life, so that replies outlive a replaced connection).
    pub(crate) reply_to: String,
    /// The publishing connection, replaced when lost.
    pub(crate) link: Link,
    /// Channels on the link's current connection.
    pub(crate) pool: LinkPool,
    pub(crate) publishing: Semaphore,
    pub(crate) pending: Arc<Pending>,
    /// Queues declared on the connection of this generation (a new connection may be to another
    /// node, or to a broker that lost them: they are declared again there).
    pub(crate) declared: Mutex<(u64, Declared)>,
}

/// How often a client with a connection lifetime looks for a moment with nothing in flight.
const ROTATION_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

impl Inner {
    fn publishes_in_flight(&self) -> usize {
        self.settings.max_in_flight_publishes.max(1) - self.publishing.available_permits()
    }
}

/// Moves the client to a new connection once the current one has outlived
/// `broker.max_lifetime`, at a moment when no call waits and no publish is in flight, and closes
/// the old connection only once the calls that may still get replies on it have ended (within
/// the call timeout): no call fails because of it.
async fn rotate_when_idle(inner: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(ROTATION_CHECK).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.link.state() == LinkState::Closed {
            return;
        }
        let idle = inner.pending.lock().is_empty() && inner.publishes_in_flight() == 0;
        if !idle || !inner.link.rotation_due() {
            continue;
        }
        let old = match inner.link.rotate().await {
            Ok(Some(old)) => old,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a new connection yet; keeping this one");
                continue;
            }
        };
        // Calls that started between the check and the swap may await replies on the old one.
        let until = tokio::time::Instant::now() + inner.settings.call_timeout;
        while !inner.pending.lock().is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(ROTATION_CHECK).await;
        }
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            old.close(200, "connection lifetime over".into()),
        )
        .await;
    }
}

/// A channel of one short exchange with the broker, closed when dropped, also when the future
/// using it is cancelled, so that an abandoned call leaks no channel.
struct ClosedOnDrop(Channel);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        if self.0.status().connected() {
            let channel = self.0.clone();
            tokio::spawn(async move {
                let _ = channel.close(200, "done".into()).await;
            });
        }
    }
}

/// A handle to Warren: cheap to clone, `Send + Sync`, made for thousands of concurrent calls.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
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
        if let Some(queue) = &settings.queue {
            topology::validate_queue_name(queue).map_err(Error::InvalidQueue)?;
        }
        topology::validate_functions_exchange(&settings.functions_exchange)
            .map_err(Error::InvalidQueue)?;
        let pending = Arc::new(Pending::default());
        let reply_to = match &settings.replies {
            ReplyMode::Direct => DIRECT_REPLY_TO.to_owned(),
            ReplyMode::Queue { .. } => format!(
                "{}{}",
                envelope::REPLY_QUEUE_PREFIX,
                uuid::Uuid::new_v4().simple()
            ),
        };
        // A client reconnects for as long as it lives; giving up is for workers.
        let mut broker = settings.broker.clone();
        broker.reconnect.max_attempts = None;
        let link = Link::open(&broker, &settings.name, Purpose::Publish, &[]).await?;
        let setup = match &settings.replies {
            ReplyMode::Direct => {
                tokio::spawn(fail_calls_on_disconnect(
                    link.subscribe(),
                    Arc::downgrade(&pending),
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
                start_reply_queue(&link, &reply_to, *expires, pending.clone()).await?;
                None
            }
        };
        let pool = LinkPool::new(
            link.clone(),
            settings.channels,
            settings.publish_timeout,
            setup,
        );
        let inner = Arc::new(Inner {
            publishing: Semaphore::new(settings.max_in_flight_publishes.max(1)),
            reply_to,
            settings,
            link,
            pool,
            pending,
            declared: Mutex::new((0, HashMap::new())),
        });
        if inner.settings.broker.max_lifetime.is_some() {
            tokio::spawn(rotate_when_idle(Arc::downgrade(&inner)));
        }
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
        let result = self
            .call_json_with(T::NAME, args, &with_task_queue::<T>(options))
            .await?;
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
    /// broker has confirmed the task (it is then durably queued), before the result arrives
    /// (or with the result, when the reply overtakes the confirm: a reply proves the task was
    /// queued).
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

    /// [`Client::call_json_with`] with the arguments and the result as JSON text, passed on as
    /// they are: never parsed into a tree (which costs up to 40 times the text), the arguments
    /// dropped once the task is encoded. For code that relays JSON (the gateway).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_raw_with(
        &self,
        function: &str,
        args: RawJson,
        options: &CallOptions,
    ) -> Result<RawJson, Error> {
        let body = encode_request(function, args);
        self.call_body(function, body, options, None, None).await
    }

    /// [`Client::call_raw_with`] that tells `published` the task's id once the broker has
    /// confirmed it, as [`Client::call_json_with_ack`] does.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn call_raw_with_ack(
        &self,
        function: &str,
        args: RawJson,
        options: &CallOptions,
        published: oneshot::Sender<TaskId>,
    ) -> Result<RawJson, Error> {
        let body = encode_request(function, args);
        self.call_body(function, body, options, Some(published), None)
            .await
    }

    async fn call_json_inner(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
        published: Option<oneshot::Sender<TaskId>>,
    ) -> Result<Value, Error> {
        let body = encode_request(function, args);
        self.call_body(function, body, options, published, None)
            .await
    }

    /// Calls `function` with `body`, its encoded request. The body is dropped once the broker
    /// has confirmed it: a call waiting for its result holds nothing of its request.
    async fn call_body<T: Returns>(
        &self,
        function: &str,
        body: Vec<u8>,
        options: &CallOptions,
        published: Option<oneshot::Sender<TaskId>>,
        progress: Option<ProgressSender>,
    ) -> Result<T, Error> {
        let timeout = options.timeout.unwrap_or(self.inner.settings.call_timeout);
        // A task due later has its timeout from its run-at time on.
        let due_in = options.delay_from_now();
        let give_up = tokio::time::Instant::now() + due_in + timeout;
        let deadline = SystemTime::now() + due_in + timeout;
        let id = TaskId::new();
        let work = async {
            loop {
                // Register before publishing so that even an instant reply finds the call; and
                // only once the link is up, so that a disconnect fails exactly the calls whose
                // requests were already out.
                self.wait_for_link(give_up).await?;
                let (tx, mut rx) = oneshot::channel();
                let waiter = Waiter {
                    reply: tx,
                    progress: progress.clone(),
                };
                self.inner
                    .pending
                    .lock()
                    .insert(id.as_str().to_owned(), waiter);
                let guard = PendingGuard {
                    pending: &self.inner.pending,
                    id: id.as_str(),
                };
                let publish = self.publish(function, &body, &id, options, Some(deadline), true);
                tokio::pin!(publish);
                // The confirm and the reply are awaited together: the broker often delivers
                // the reply before the request's confirm. A reply proves the task was routed
                // and run, so it ends the call; a nack or return that comes first fails it.
                // (A reply channel closed early, on a disconnect, leaves the publish to say
                // whether to retry.)
                let mut reply_lost = false;
                let first = loop {
                    tokio::select! {
                        biased;
                        published = &mut publish => break Err(published),
                        reply = &mut rx, if !reply_lost => match reply {
                            Ok(reply) => break Ok(reply),
                            Err(_) => reply_lost = true,
                        },
                    }
                };
                match first {
                    Ok(reply) => return Ok((Waiting::Replied(reply), guard)),
                    Err(Ok(())) if reply_lost => return Ok((Waiting::Lost, guard)),
                    Err(Ok(())) => return Ok((Waiting::Reply(rx), guard)),
                    // Lost with its connection: send it again on the next one (a reply to
                    // the first copy, if it arrives, completes the call just the same).
                    Err(Err(e)) if self.lost_with_connection(&e).await => {
                        self.pause_after_lost().await;
                    }
                    Err(Err(e)) => return Err(e),
                }
            }
        };
        let (waiting, _guard) = match tokio::time::timeout_at(give_up, work).await {
            Ok(registered) => registered?,
            Err(_) => return Err(Error::Timeout(timeout)),
        };
        drop(body);
        if let Some(published) = published {
            // The receiver may have gone away; the call goes on regardless.
            let _ = published.send(id.clone());
        }
        let rx = match waiting {
            Waiting::Replied(reply) => return reply_result(&reply),
            Waiting::Lost => return Err(Error::ConnectionLost),
            Waiting::Reply(rx) => rx,
        };
        match tokio::time::timeout_at(give_up, rx).await {
            Ok(Ok(reply)) => reply_result(&reply),
            Ok(Err(_)) => Err(Error::ConnectionLost),
            Err(_) => Err(Error::Timeout(timeout)),
        }
    }

    /// Runs a typed task and follows its progress: see [`ProgressCall`].
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::CallOptions;
    /// use warren_shared::tasks::Sleep;
    ///
    /// let mut call = client.call_with_progress(&Sleep { ms: 2000 }, &CallOptions::default());
    /// while let Some(update) = call.progress().await {
    ///     println!("{:?} {:?}", update.progress.fraction, update.progress.message);
    /// }
    /// let slept = call.await?;
    /// # Ok(()) }
    /// ```
    pub fn call_with_progress<T: Task>(
        &self,
        task: &T,
        options: &CallOptions,
    ) -> ProgressCall<T::Output>
    where
        T::Output: Unpin,
    {
        let options = with_task_queue::<T>(options).into_owned();
        let body = serde_json::to_value(task).map(|args| encode_request(T::NAME, args));
        let client = self.clone();
        ProgressCall::start(move |progress| async move {
            let body = body.map_err(Error::Encode)?;
            let result: Value = client
                .call_body(T::NAME, body, &options, None, Some(progress))
                .await?;
            serde_json::from_value(result).map_err(|e| {
                Error::BadReply(format!("result of {:?} does not decode: {e}", T::NAME))
            })
        })
    }

    /// Runs `function` with JSON `args` and follows its progress: the updates the task reports
    /// while it runs come from [`ProgressCall::progress`], in order, then the result from
    /// awaiting the [`ProgressCall`].
    ///
    /// ```no_run
    /// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
    /// use warren_client::CallOptions;
    ///
    /// let args = serde_json::json!({"file": "big.csv"});
    /// let mut call = client.call_json_with_progress("import", args, &CallOptions::default());
    /// while let Some(update) = call.progress().await {
    ///     if let Some(fraction) = update.progress.fraction {
    ///         println!("{:.0} %", fraction * 100.0);
    ///     }
    /// }
    /// let imported = call.await?;
    /// # Ok(()) }
    /// ```
    pub fn call_json_with_progress(
        &self,
        function: &str,
        args: Value,
        options: &CallOptions,
    ) -> ProgressCall<Value> {
        let body = encode_request(function, args);
        self.start_with_progress(function, body, options, None)
    }

    /// [`Client::call_raw_with_ack`] that follows the task's progress, as
    /// [`Client::call_json_with_progress`] does: for code that relays JSON (the gateway).
    pub fn call_raw_with_progress(
        &self,
        function: &str,
        args: RawJson,
        options: &CallOptions,
        published: oneshot::Sender<TaskId>,
    ) -> ProgressCall<RawJson> {
        let body = encode_request(function, args);
        self.start_with_progress(function, body, options, Some(published))
    }

    fn start_with_progress<T: Returns + Unpin>(
        &self,
        function: &str,
        body: Vec<u8>,
        options: &CallOptions,
        published: Option<oneshot::Sender<TaskId>>,
    ) -> ProgressCall<T> {
        let client = self.clone();
        let function = function.to_owned();
        let options = options.clone();
        ProgressCall::start(move |progress| async move {
            client
                .call_body(&function, body, &options, published, Some(progress))
                .await
        })
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
        self.enqueue_json_with(T::NAME, args, &with_task_queue::<T>(options))
            .await
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
        // A deadline counts from the run-at time of a task due later.
        // A deadline past what the clock can represent is none.
        let deadline = options.timeout.and_then(|t| {
            SystemTime::now()
                .checked_add(options.delay_from_now())?
                .checked_add(t)
        });
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
                // Lost with its connection: send it again on the next one.
                Err(e) if self.lost_with_connection(&e).await => self.pause_after_lost().await,
                Err(e) => return Err(e),
            }
        }
    }

    /// Declares work queue `queue` and its dead-letter queue, once per connection. Calls and
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
        // A channel of its own, never a pooled one: the broker closes the channel of a passive
        // declare that finds no queue, and a pooled channel may still be awaiting confirms and
        // direct replies of calls that used it a moment ago.
        let channel = ClosedOnDrop(
            self.inner
                .link
                .connection()
                .create_channel()
                .await
                .map_err(BrokerError::from)?,
        );
        let q = channel
            .0
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

    /// Closes the connection and stops reconnecting. Calls still waiting fail with
    /// [`Error::ConnectionLost`]; calls and enqueues made afterwards fail at once with
    /// [`Error::Closed`].
    pub async fn close(&self) {
        self.inner.link.close().await;
        self.inner.pending.fail_all();
    }

    /// Publishes sent and not yet confirmed by the broker; never more than
    /// [`ClientSettings::max_in_flight_publishes`].
    pub fn publishes_in_flight(&self) -> usize {
        self.inner.publishes_in_flight()
    }

    /// The reply queue of a client in [`ReplyMode::Queue`].
    pub fn reply_queue(&self) -> Option<&str> {
        (self.inner.settings.replies != ReplyMode::Direct).then_some(self.inner.reply_to.as_str())
    }

    /// The state of the broker connection.
    pub fn link_state(&self) -> LinkState {
        self.inner.link.state()
    }

    /// How many connections this client has had: 1 after connecting, one more each time a lost
    /// connection is replaced. A replacement can take milliseconds, so this is how to tell that
    /// one happened (the link state may be down only briefly).
    pub fn connection_generation(&self) -> u64 {
        self.inner.link.generation()
    }

    /// Waits for the link to be up, until `give_up` and at most `reconnect_wait`.
    pub(crate) async fn wait_for_link(&self, give_up: tokio::time::Instant) -> Result<(), Error> {
        if matches!(self.inner.link.state(), LinkState::Closed) {
            return Err(Error::Closed);
        }
        let bound = give_up
            .saturating_duration_since(tokio::time::Instant::now())
            .min(self.inner.settings.reconnect_wait);
        self.inner
            .link
            .wait_up(bound)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    }

    pub(crate) fn connection(&self) -> Arc<Connection> {
        self.inner.link.connection()
    }

    pub(crate) fn pool(&self) -> ChannelPool {
        self.inner.pool.pool()
    }
}

/// A published call: its reply already in, still to come, or lost with the connection.
enum Waiting {
    Replied(Vec<u8>),
    Reply(oneshot::Receiver<Vec<u8>>),
    Lost,
}

/// The body of a request for `function` with `args`; `args` are dropped here.
fn encode_request<A: Json>(function: &str, args: A) -> Vec<u8> {
    Request {
        function: function.to_owned(),
        args,
    }
    .encode()
}

/// What a call returns: a parsed result, or its JSON text.
trait Returns: Json + Send + 'static {
    fn decode(body: &[u8]) -> Result<Reply<Self>, serde_json::Error>;
}

impl Returns for Value {
    fn decode(body: &[u8]) -> Result<Reply<Self>, serde_json::Error> {
        Reply::decode(body)
    }
}

impl Returns for RawJson {
    fn decode(body: &[u8]) -> Result<Reply<Self>, serde_json::Error> {
        Reply::decode_raw(body)
    }
}

/// A call's result from its reply's body.
fn reply_result<T: Returns>(body: &[u8]) -> Result<T, Error> {
    match T::decode(body) {
        Ok(reply) => reply.into_result().map_err(Error::Failed),
        Err(e) => Err(Error::BadReply(format!("malformed reply body: {e}"))),
    }
}

/// `options`, with the task type's own queue ([`Task::QUEUE`]) when they name none.
fn with_task_queue<T: Task>(options: &CallOptions) -> std::borrow::Cow<'_, CallOptions> {
    match (&options.queue, T::QUEUE) {
        (None, Some(queue)) => std::borrow::Cow::Owned(options.clone().queue(queue)),
        _ => std::borrow::Cow::Borrowed(options),
    }
}

#[cfg(test)]
mod task_queue_tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize)]
    struct Billing;

    impl Task for Billing {
        const NAME: &'static str = "bill";
        const QUEUE: Option<&'static str> = Some("billing");
        type Output = ();
    }

    #[test]
    fn a_task_type_names_its_queue_unless_the_call_does() {
        let none = CallOptions::default();
        assert_eq!(
            with_task_queue::<Billing>(&none).queue.as_deref(),
            Some("billing")
        );
        let other = CallOptions::default().queue("urgent");
        assert_eq!(
            with_task_queue::<Billing>(&other).queue.as_deref(),
            Some("urgent")
        );
        assert_eq!(
            with_task_queue::<warren_shared::tasks::Echo>(&none).queue,
            None
        );
    }
}
