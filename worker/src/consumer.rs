//! The worker runtime: connections, the supervised consumer, the watchdog, and shutdown.
//!
//! One connection consumes (so acks keep flowing when the broker blocks publishers), one
//! publishes replies, retries and dead letters through a pool of confirm-mode channels. The
//! consumer's prefetch equals the worker's concurrency, so the broker never hands this process
//! more tasks than it can run at once and the rest stay in the queue for other workers; every
//! delivery runs on its own tokio task, tracked so that shutdown can wait for it.
//!
//! lapin re-establishes a lost connection by itself (and re-registers the consumer). What it
//! does not repair, a supervisor does: when the consumer's stream ends (the queue was deleted,
//! the channel was closed by the broker, recovery gave up) or the watchdog finds the worker
//! starving next to a queue with ready tasks, the session (connections if needed, channel,
//! topology, consumer) is rebuilt, with backoff and jitter between attempts. A worker that is
//! configured to give up exits with an error instead of idling as a zombie.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_shared::broker::{self, BrokerError, BrokerSettings, Purpose};
use warren_shared::link::{Link, LinkState};
use warren_shared::{Policy, pool, topology};

use crate::execute::Executor;
use crate::outcome::{DeadReason, Envelope, Outcome, Settler};
use crate::registry::Registry;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where the broker is, and how to reconnect to it.
    pub broker: BrokerSettings,
    /// The work queue to consume.
    pub queue: String,
    /// Tasks run at once; also the consumer's prefetch.
    pub concurrency: u16,
    /// Attempts, backoff and time limit of functions registered without a policy of their own.
    /// Keep the time limit well below RabbitMQ's `consumer_timeout` (30 minutes by default),
    /// past which the broker closes the consuming channel.
    pub policy: Policy,
    /// Larger bodies are refused as `too_large` without being parsed.
    pub max_body_bytes: usize,
    /// On shutdown, how long in-flight tasks may take to finish before they are handed back.
    pub shutdown_grace: Duration,
    /// Bound on publishing one reply, retry or dead letter, confirm included.
    pub publish_timeout: Duration,
    /// How often the watchdog checks that an idle worker is not starving next to ready tasks.
    pub watchdog_interval: Duration,
    /// How this process appears in the management UI (`warren-worker@host:pid`).
    pub name: String,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            broker: BrokerSettings::default(),
            queue: topology::DEFAULT_QUEUE.to_owned(),
            concurrency: 16,
            policy: Policy::default(),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            watchdog_interval: Duration::from_secs(10),
            name: broker::process_name("warren-worker"),
        }
    }
}

/// Why a worker stopped other than by being asked to.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The settings cannot work.
    #[error("invalid worker settings: {0}")]
    Settings(String),
    /// Connecting or declaring failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The consumer could not be re-established within the configured reconnect attempts.
    /// The process should exit non-zero so its supervisor restarts it.
    #[error("gave up consuming {queue:?} after {attempts} attempts: {reason}")]
    GaveUp {
        /// The queue consumed.
        queue: String,
        /// Rebuild attempts made.
        attempts: usize,
        /// The last error.
        reason: String,
    },
}

/// What a worker is doing, for logs and health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Receiving deliveries.
    Consuming,
    /// Rebuilding its connection, channel or consumer.
    Recovering,
    /// Draining in-flight tasks after a stop request.
    Stopping,
    /// Stopped.
    Stopped,
}

/// A snapshot of a worker's health: cheap to take, meant for a health endpoint.
#[derive(Debug, Clone)]
pub struct Health {
    /// What it is doing.
    pub state: WorkerState,
    /// Since when.
    pub since: Instant,
    /// Tasks running now.
    pub in_flight: usize,
    /// Times the consumer was rebuilt.
    pub recoveries: usize,
    /// Why it last had to recover.
    pub last_problem: Option<String>,
    /// Whether the consuming connection is up now.
    pub consume_up: bool,
    /// Whether the publishing connection (replies, retries, dead letters) is up now.
    pub publish_up: bool,
}

impl Health {
    fn new(state: WorkerState) -> Self {
        Self {
            state,
            since: Instant::now(),
            in_flight: 0,
            recoveries: 0,
            last_problem: None,
            consume_up: true,
            publish_up: true,
        }
    }

    /// Whether it can take work: consuming (not recovering, not starving per the watchdog,
    /// which rebuilds a starving consumer) with both connections up. What `/readyz` answers.
    pub fn is_ready(&self) -> bool {
        self.is_healthy() && self.consume_up && self.publish_up
    }

    /// Whether its supervisor still runs (anything but stopped). What `/healthz` answers.
    pub fn is_alive(&self) -> bool {
        self.state != WorkerState::Stopped
    }

    /// Whether it is doing its job (consuming, or running tasks while stopping).
    pub fn is_healthy(&self) -> bool {
        matches!(self.state, WorkerState::Consuming)
    }
}

/// A started worker: consuming until its shutdown token is cancelled.
#[derive(Debug)]
pub struct RunningWorker {
    shutdown: CancellationToken,
    join: JoinHandle<Result<(), WorkerError>>,
    health: watch::Receiver<Health>,
    shared: Arc<Shared>,
}

impl RunningWorker {
    /// Asks the worker to stop (like SIGTERM) without waiting.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Its health now.
    pub fn health(&self) -> Health {
        self.probe().health()
    }

    /// A cloneable handle that reads its health, for a health endpoint.
    pub fn probe(&self) -> HealthProbe {
        HealthProbe {
            health: self.health.clone(),
            shared: self.shared.clone(),
        }
    }

    /// A receiver that sees every state change.
    pub fn health_changes(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Test hook: the consumer stops taking deliveries while staying connected, the way a
    /// zombie consumer does, so that tests can see the watchdog repair it.
    #[doc(hidden)]
    pub fn simulate_stall(&self) {
        self.shared.stalled.store(true, Ordering::SeqCst);
    }

    /// Waits until the worker has stopped.
    ///
    /// # Errors
    /// The reason the worker stopped on its own, see [`WorkerError`].
    pub async fn wait(self) -> Result<(), WorkerError> {
        match self.join.await {
            Ok(result) => result,
            Err(e) => Err(WorkerError::GaveUp {
                queue: String::new(),
                attempts: 0,
                reason: format!("worker task failed: {e}"),
            }),
        }
    }

    /// Stops the worker and waits for it.
    ///
    /// # Errors
    /// As [`RunningWorker::wait`].
    pub async fn shutdown(self) -> Result<(), WorkerError> {
        self.stop();
        self.wait().await
    }
}

/// Reads a running worker's [`Health`]; cheap to clone, usable after the worker has stopped.
#[derive(Debug, Clone)]
pub struct HealthProbe {
    health: watch::Receiver<Health>,
    shared: Arc<Shared>,
}

impl HealthProbe {
    /// The health now.
    pub fn health(&self) -> Health {
        let mut health = self.health.borrow().clone();
        health.in_flight = self.shared.in_flight.load(Ordering::SeqCst);
        let links = self
            .shared
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((consume, publish)) = links.as_ref() {
            health.consume_up = consume.state().is_up();
            health.publish_up =
                !matches!(publish.state(), LinkState::Down { .. } | LinkState::Closed);
        }
        health
    }
}

/// State shared by the supervisor and the task runners.
#[derive(Debug, Default)]
struct Shared {
    /// The links of the current connections (consume, publish), for health checks.
    links: std::sync::Mutex<Option<(Link, Link)>>,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last delivery.
    last_delivery_ms: std::sync::atomic::AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
    stalled: AtomicBool,
}

impl Shared {
    /// Follows the current connections (after they are opened or replaced).
    fn track(&self, connections: &Connections) {
        *self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
            connections.consume_link.clone(),
            connections.publish_link.clone(),
        ));
    }

    fn epoch(&self) -> Instant {
        *self.epoch.get_or_init(Instant::now)
    }

    fn delivered(&self) {
        let ms = u64::try_from(self.epoch().elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_delivery_ms.store(ms, Ordering::SeqCst);
    }

    fn since_last_delivery(&self) -> Duration {
        let last = Duration::from_millis(self.last_delivery_ms.load(Ordering::SeqCst));
        self.epoch().elapsed().saturating_sub(last)
    }
}

/// Connects, declares the topology and starts consuming; returns once deliveries can flow.
///
/// The worker stops when `shutdown` is cancelled: it cancels its consumer, lets in-flight tasks
/// finish within [`WorkerSettings::shutdown_grace`], and closes its connections; whatever did
/// not finish is redelivered by the broker.
///
/// # Errors
/// [`WorkerError::Settings`] or [`WorkerError::Broker`] when it cannot start.
pub async fn start(
    settings: WorkerSettings,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<RunningWorker, WorkerError> {
    if settings.concurrency == 0 {
        return Err(WorkerError::Settings(
            "concurrency must be at least 1".into(),
        ));
    }
    topology::validate_queue_name(&settings.queue).map_err(WorkerError::Settings)?;

    let connections = Connections::open(&settings).await?;
    let session = Session::open(&connections, &settings).await?;
    tracing::info!(
        queue = %settings.queue,
        concurrency = settings.concurrency,
        functions = ?registry.functions(),
        name = %settings.name,
        "worker consuming"
    );
    let abort = CancellationToken::new();
    let executor = Executor {
        state: registry.state(),
        registry,
        policy: settings.policy.clone(),
        max_body_bytes: settings.max_body_bytes,
        abort: abort.clone(),
    };
    let shared = Arc::new(Shared::default());
    shared.track(&connections);
    crate::metrics::register_functions(&executor.registry.functions());
    shared.delivered();
    let (health_tx, health) = watch::channel(Health::new(WorkerState::Consuming));
    let supervisor = Supervisor {
        settings,
        connections,
        executor,
        abort,
        shared: shared.clone(),
        health: health_tx,
        tracker: TaskTracker::new(),
    };
    let join = tokio::spawn(supervisor.run(session, shutdown.clone()));
    Ok(RunningWorker {
        shutdown,
        join,
        health,
        shared,
    })
}

/// Runs a worker until `shutdown` is cancelled ([`start`], then [`RunningWorker::wait`]).
///
/// # Errors
/// See [`start`] and [`RunningWorker::wait`].
pub async fn run(
    settings: WorkerSettings,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    start(settings, registry, shutdown).await?.wait().await
}

/// The worker's two connections, and their watched states.
struct Connections {
    consume: Arc<Connection>,
    publish: Arc<Connection>,
    consume_link: Link,
    publish_link: Link,
}

/// A connection not up for this many watchdog intervals is taken as stuck in recovery and
/// replaced (lapin's own backoff tops out at 10 s, so a healthy recovery is well within it).
const STUCK_INTERVALS: u32 = 3;

fn usable(connection: &Connection) -> bool {
    let status = connection.status();
    status.connected() || status.reconnecting() || status.connecting()
}

impl Connections {
    async fn open(settings: &WorkerSettings) -> Result<Self, BrokerError> {
        let (consume, consume_link) = Self::connect(settings, Purpose::Consume).await?;
        let (publish, publish_link) = Self::connect(settings, Purpose::Publish).await?;
        Ok(Self {
            consume,
            publish,
            consume_link,
            publish_link,
        })
    }

    async fn connect(
        settings: &WorkerSettings,
        purpose: Purpose,
    ) -> Result<(Arc<Connection>, Link), BrokerError> {
        let details = [
            ("queue", settings.queue.clone()),
            ("concurrency", settings.concurrency.to_string()),
        ];
        let connection = Arc::new(
            broker::connect_as(&settings.broker, &settings.name, purpose, &details).await?,
        );
        let link = Link::watch(connection.clone(), format!("{}/{purpose:?}", settings.name));
        warren_shared::metrics::watch_link(
            &link,
            if purpose == Purpose::Consume {
                "consume"
            } else {
                "publish"
            },
        );
        Ok((connection, link))
    }

    /// Whether a connection was given up on, or has been down for too long.
    fn is_stuck(connection: &Connection, link: &Link, settings: &WorkerSettings) -> bool {
        let limit = settings.watchdog_interval * STUCK_INTERVALS;
        !usable(connection) || link.down_for().is_some_and(|d| d > limit)
    }

    /// Which connection, if any, is stuck.
    fn stuck(&self, settings: &WorkerSettings) -> Option<&'static str> {
        if Self::is_stuck(&self.consume, &self.consume_link, settings) {
            Some("consume")
        } else if Self::is_stuck(&self.publish, &self.publish_link, settings) {
            Some("publish")
        } else {
            None
        }
    }

    /// Replaces whichever connection lapin has given up on or that is stuck recovering.
    async fn repair(&mut self, settings: &WorkerSettings) -> Result<(), BrokerError> {
        if Self::is_stuck(&self.consume, &self.consume_link, settings) {
            let _ = self.consume.close(200, "replaced".into()).await;
            (self.consume, self.consume_link) = Self::connect(settings, Purpose::Consume).await?;
        }
        if Self::is_stuck(&self.publish, &self.publish_link, settings) {
            let _ = self.publish.close(200, "replaced".into()).await;
            (self.publish, self.publish_link) = Self::connect(settings, Purpose::Publish).await?;
        }
        Ok(())
    }

    async fn close(&self) {
        for connection in [&self.consume, &self.publish] {
            let _ = connection.close(200, "worker stopping".into()).await;
        }
    }
}

/// One consumer on one channel, and where its tasks settle.
struct Session {
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    settler: Settler,
}

impl Session {
    async fn open(
        connections: &Connections,
        settings: &WorkerSettings,
    ) -> Result<Self, BrokerError> {
        let channel = connections.consume.create_channel().await?;
        let names = topology::declare(&channel, &settings.queue).await?;
        channel
            .basic_qos(settings.concurrency, BasicQosOptions { global: false })
            .await?;
        let tag = format!(
            "{}/{}/{}",
            settings.name,
            settings.queue,
            uuid::Uuid::new_v4().simple()
        );
        let consumer = channel
            .basic_consume(
                settings.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let settler = Settler {
            pool: pool::channel_pool(
                connections.publish.clone(),
                4,
                settings.publish_timeout,
                None,
            ),
            link: connections.publish_link.clone(),
            queue: settings.queue.clone(),
            dead_queue: names.dead,
            worker_name: settings.name.clone(),
            publish_timeout: settings.publish_timeout,
            retry_queues: Arc::default(),
        };
        Ok(Self {
            channel,
            consumer,
            tag,
            settler,
        })
    }

    async fn close(&self) {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = self.channel.close(200, "consumer replaced".into()).await;
    }
}

/// How a session ended.
enum End {
    Shutdown,
    Lost(String),
}

struct Supervisor {
    settings: WorkerSettings,
    connections: Connections,
    executor: Executor,
    abort: CancellationToken,
    shared: Arc<Shared>,
    health: watch::Sender<Health>,
    tracker: TaskTracker,
}

impl Supervisor {
    fn set_state(&self, state: WorkerState, problem: Option<String>) {
        self.health.send_modify(|h| {
            if h.state != state {
                h.state = state;
                h.since = Instant::now();
            }
            if state == WorkerState::Recovering {
                h.recoveries += 1;
            }
            if problem.is_some() {
                h.last_problem = problem;
            }
        });
    }

    async fn run(
        mut self,
        mut session: Session,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        loop {
            let reason = match self.consume(&mut session, &shutdown).await {
                End::Shutdown => break,
                End::Lost(reason) => reason,
            };
            tracing::warn!(queue = %self.settings.queue, %reason, "consumer lost; rebuilding it");
            self.set_state(WorkerState::Recovering, Some(reason.clone()));
            crate::metrics::recovered(&self.settings.queue);
            session.close().await;
            session = match self.rebuild(&shutdown).await {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    self.drain(None).await;
                    return Err(e);
                }
            };
            self.shared.stalled.store(false, Ordering::SeqCst);
            self.shared.track(&self.connections);
            self.shared.delivered();
            self.set_state(WorkerState::Consuming, None);
            tracing::info!(queue = %self.settings.queue, "consuming again");
        }
        self.drain(Some(&session)).await;
        Ok(())
    }

    /// A new session, retried with backoff; `None` when asked to stop meanwhile.
    async fn rebuild(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Session>, WorkerError> {
        let reconnect = self.settings.broker.reconnect.clone();
        let mut attempt: u32 = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let opened = match self.connections.repair(&self.settings).await {
                Ok(()) => Session::open(&self.connections, &self.settings).await,
                Err(e) => Err(e),
            };
            let reason = match opened {
                Ok(session) => return Ok(Some(session)),
                Err(e) => e.to_string(),
            };
            attempt += 1;
            if reconnect
                .max_attempts
                .is_some_and(|max| attempt as usize >= max)
            {
                tracing::error!(queue = %self.settings.queue, %reason, attempts = attempt, "giving up");
                return Err(WorkerError::GaveUp {
                    queue: self.settings.queue.clone(),
                    attempts: attempt as usize,
                    reason,
                });
            }
            if attempt == 1 {
                tracing::warn!(error = %reason, "cannot consume yet; retrying with backoff");
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(reconnect.delay(attempt)) => {}
            }
        }
    }

    async fn consume(&self, session: &mut Session, shutdown: &CancellationToken) -> End {
        let mut watchdog = tokio::time::interval(self.settings.watchdog_interval);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watchdog.tick().await;
        let mut suspicious = false;
        // Deliveries swallowed while a stall is simulated (a test hook): never run, never acked,
        // given back by the broker when this session's channel closes.
        let mut swallowed = Vec::new();
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => return End::Shutdown,
                _ = watchdog.tick() => {
                    if let Some(which) = self.connections.stuck(&self.settings) {
                        return End::Lost(format!("watchdog: the {which} connection is stuck recovering"));
                    }
                    match self.starving(session).await {
                        Some(problem) if suspicious => return End::Lost(format!("watchdog: {problem}")),
                        Some(_) => suspicious = true,
                        None => suspicious = false,
                    }
                    continue;
                }
                next = session.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) if self.shared.stalled.load(Ordering::SeqCst) => {
                    swallowed.push(delivery)
                }
                Some(Ok(delivery)) => {
                    suspicious = false;
                    self.shared.delivered();
                    self.spawn_task(delivery, session.settler.clone());
                }
                Some(Err(e)) => return End::Lost(e.to_string()),
                None => {
                    return End::Lost(
                        "the broker cancelled the consumer (was the queue deleted?)".into(),
                    );
                }
            }
        }
    }

    fn spawn_task(&self, delivery: lapin::message::Delivery, settler: Settler) {
        let executor = self.executor.clone();
        let shared = self.shared.clone();
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let measure = crate::metrics::TaskMetrics::started(&self.settings.queue, &delivery);
        self.tracker.spawn(async move {
            let envelope = Envelope::of(&delivery);
            let outcome = executor.execute(&delivery, &envelope).await;
            let measure = measure.judged();
            if let Outcome::DeadLetter { reason: DeadReason::Rejected, failure } = &outcome {
                tracing::warn!(task.id = %envelope.id, kind = %failure.kind, error = %failure.message, "rejected task dead-lettered");
            }
            let settled = settler.settle(&delivery, &envelope, &outcome).await;
            measure.settled(&outcome, &settled);
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// `Some(problem)` when this worker has free slots and is connected, and yet receives nothing
    /// while its queue has ready tasks (or its consumer is gone). Tasks still running (or stuck)
    /// do not hide a dead consumer; if the consumer is rebuilt under them, their deliveries come
    /// back as redeliveries. Called on every watchdog tick; the
    /// consumer is rebuilt after two such ticks in a row.
    async fn starving(&self, session: &Session) -> Option<String> {
        // Busy on every slot is not starving; neither is a recent delivery.
        if self.shared.in_flight.load(Ordering::SeqCst) >= usize::from(self.settings.concurrency)
            || self.shared.since_last_delivery() < self.settings.watchdog_interval
        {
            return None;
        }
        let status = self.connections.consume.status();
        if !status.connected() {
            // lapin is reconnecting: not a zombie; a connection it gave up on is.
            return (!usable(&self.connections.consume))
                .then(|| "consume connection closed".to_owned());
        }
        if !session.channel.status().connected() {
            return Some("consume channel closed".to_owned());
        }
        let probe = self.connections.consume.create_channel().await.ok()?;
        let declared = probe
            .queue_declare(
                self.settings.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = probe.close(200, "watchdog probe".into()).await;
        match declared {
            Err(e) => Some(format!("queue check failed: {e}")),
            Ok(q) if q.message_count() > 0 => Some(format!(
                "{} tasks ready but nothing delivered for {:?}",
                q.message_count(),
                self.shared.since_last_delivery()
            )),
            Ok(q) if q.consumer_count() == 0 => {
                Some("the broker lists no consumer on the queue".to_owned())
            }
            Ok(_) => None,
        }
    }

    /// Stops taking deliveries, waits for in-flight tasks within the grace period, then aborts
    /// the rest and closes: the broker requeues whatever was not acked.
    async fn drain(&self, session: Option<&Session>) {
        self.set_state(WorkerState::Stopping, None);
        if let Some(session) = session {
            let _ = session
                .channel
                .basic_cancel(session.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        self.tracker.close();
        if !self.tracker.is_empty() {
            tracing::info!(in_flight = self.tracker.len(), grace = ?self.settings.shutdown_grace, "draining in-flight tasks");
        }
        if tokio::time::timeout(self.settings.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = self.tracker.len(),
                "grace period over; handing unfinished tasks back to the queue"
            );
            self.abort.cancel();
            // Let the aborted tasks send their nacks before the channel closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        if let Some(session) = session {
            let _ = session.channel.close(200, "worker stopping".into()).await;
        }
        self.connections.close().await;
        self.set_state(WorkerState::Stopped, None);
        tracing::info!("worker stopped");
    }
}
