//! Starting a worker and keeping its consumer alive: the one owner of the worker's recovery.
//!
//! A worker holds two [`Link`]s: one consumes (so acks keep flowing when the broker blocks
//! publishers), one publishes replies, retries and dead letters. Each link replaces its own lost
//! connection (lapin's auto-recovery is off). The supervisor builds a session (channel, qos,
//! topology, consumer) on the consuming link's current connection and builds a new one whenever
//! that connection is replaced, the consumer ends, or the watchdog finds it starving; the old
//! session is closed first, so the worker holds exactly two connections and one consumer. A
//! worker that cannot reconnect within [`Reconnect::max_attempts`] stops with
//! [`WorkerError::GaveUp`] instead of idling as a zombie.
//!
//! [`Reconnect::max_attempts`]: warren_shared::broker::Reconnect::max_attempts

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_shared::broker::{BrokerError, Purpose};
use warren_shared::link::{Link, LinkState};
use warren_shared::pool::LinkPool;
use warren_shared::topology;

use crate::consumer::{End, Session};
use crate::events::Appender;
use crate::execute::Executor;
use crate::health::{self, Health, HealthProbe, Shared, WorkerState};
use crate::outcome::Settler;
use crate::registry::Registry;
use crate::settings::{WorkerError, WorkerSettings};

/// Closes a connection a rotation replaced (nothing is in flight on it), bounded.
async fn retire(rotated: Result<Option<Arc<lapin::Connection>>, warren_shared::BrokerError>) {
    match rotated {
        Ok(Some(old)) => {
            let closing = old.close(200, "connection lifetime over".into());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), closing).await;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "cannot open a new connection yet; keeping this one"),
    }
}

/// Channels in the pool that publishes outcomes.
const PUBLISH_CHANNELS: usize = 4;

/// A started worker: consuming until its shutdown token is cancelled.
#[derive(Debug)]
pub struct RunningWorker {
    shutdown: CancellationToken,
    join: JoinHandle<Result<(), WorkerError>>,
    /// Fires the schedules while this worker is the cron leader.
    cron: Option<JoinHandle<()>>,
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
        HealthProbe::new(self.health.clone(), self.shared.clone())
    }

    /// A receiver that sees every state change.
    pub fn health_changes(&self) -> watch::Receiver<Health> {
        self.health.clone()
    }

    /// Test hook: the consumer stops taking deliveries while staying connected, the way a
    /// zombie consumer does, so that tests can see the watchdog repair it.
    #[doc(hidden)]
    pub fn simulate_stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Waits until the worker has stopped.
    ///
    /// # Errors
    /// The reason the worker stopped on its own, see [`WorkerError`].
    ///
    /// # Panics
    /// When the worker's supervisor panicked (a bug), the panic is resumed here.
    pub async fn wait(self) -> Result<(), WorkerError> {
        let joined = self.join.await;
        if let Some(cron) = self.cron {
            // It ends with the worker's shutdown or its links (bounded: a publish in flight).
            self.shutdown.cancel();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(15), cron).await;
        }
        match joined {
            Ok(result) => result,
            Err(e) => Err(WorkerError::Panicked(match e.try_into_panic() {
                Ok(payload) => crate::execute::panic_message(payload),
                Err(e) => e.to_string(),
            })),
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
    if settings.watchdog_interval.is_zero() {
        return Err(WorkerError::Settings(
            "watchdog_interval must be more than 0 (the default is 10s)".into(),
        ));
    }
    topology::validate_queue_name(&settings.queue).map_err(WorkerError::Settings)?;
    topology::validate_functions_exchange(&settings.functions_exchange)
        .map_err(WorkerError::Settings)?;
    settings.events.validate()?;

    let details = [
        ("queue".to_owned(), settings.queue.clone()),
        ("concurrency".to_owned(), settings.concurrency.to_string()),
    ];
    let consume = Link::open(&settings.broker, &settings.name, Purpose::Consume, &details).await?;
    let publish = Link::open(&settings.broker, &settings.name, Purpose::Publish, &details).await?;
    warren_shared::metrics::watch_link(&consume, "consume");
    warren_shared::metrics::watch_link(&publish, "publish");
    let (session, names) = Session::open(&consume, &settings, &registry.functions()).await?;
    let cron = match settings.schedules.as_slice() {
        [] => None,
        schedules => {
            let cron_settings = crate::cron::CronSettings {
                schedules: schedules.to_vec(),
                queue: settings.queue.clone(),
                functions_exchange: settings.functions_exchange.clone(),
                log: settings.cron_log.clone(),
                role: settings.cron_role.clone(),
                election: warren_shared::election::ElectionSettings {
                    renew_every: settings.election_renew_every,
                    publish_timeout: settings.publish_timeout,
                    name: settings.name.clone(),
                },
                publish_timeout: settings.publish_timeout,
            };
            Some(crate::cron::start(&consume, cron_settings, shutdown.clone()).await?)
        }
    };
    tracing::info!(
        queue = %settings.queue,
        concurrency = settings.concurrency,
        functions = ?registry.functions(),
        name = %settings.name,
        "worker consuming"
    );
    let abort = CancellationToken::new();
    let publishing = Arc::new(LinkPool::new(
        publish.clone(),
        PUBLISH_CHANNELS,
        settings.publish_timeout,
        None,
    ));
    let executor = Executor {
        queue: settings.queue.as_str().into(),
        registry,
        policy: settings.policy.clone(),
        max_body_bytes: settings.max_body_bytes,
        max_result_bytes: settings.max_result_bytes,
        reply_queues: settings.reply_queues.iter().cloned().collect(),
        abort: abort.clone(),
        progress: Some(Arc::new(crate::progress::Sink {
            pool: publishing.clone(),
            publish_timeout: settings.publish_timeout,
        })),
    };
    let settler = Settler {
        pool: publishing,
        queue: settings.queue.clone(),
        dead_queue: names.dead,
        worker_name: settings.name.clone(),
        publish_timeout: settings.publish_timeout,
        retry_queues: Arc::default(),
        abort: abort.clone(),
        events: Appender::new(
            &settings.events,
            &publish,
            &settings.queue,
            &settings.name,
            settings.publish_timeout,
        ),
    };
    let shared = Arc::new(Shared::default());
    shared.track(&consume, &publish);
    crate::metrics::register_functions(&executor.registry.functions());
    shared.delivered();
    let (health_tx, health) = watch::channel(Health::new(WorkerState::Consuming));
    let supervisor = Supervisor {
        settings,
        consume,
        publish,
        executor,
        settler,
        abort,
        shared: shared.clone(),
        health: health_tx,
        tracker: TaskTracker::new(),
    };
    let join = tokio::spawn(supervisor.run(session, shutdown.clone()));
    Ok(RunningWorker {
        shutdown,
        join,
        cron,
        health,
        shared,
    })
}

/// [`WorkerError::QueueMismatch`] when the broker refused a queue's declaration because the
/// queue exists with other arguments; the error unchanged otherwise.
pub(crate) fn queue_mismatch(queue: &str, error: BrokerError) -> WorkerError {
    match &error {
        BrokerError::Amqp(e) => match topology::inequivalent_arg(e) {
            Some(detail) => WorkerError::QueueMismatch {
                queue: topology::inequivalent_queue(&detail)
                    .unwrap_or(queue)
                    .to_owned(),
                detail,
            },
            None => error.into(),
        },
        _ => error.into(),
    }
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

/// The worker's parts, owned by its supervising task.
pub(crate) struct Supervisor {
    pub(crate) settings: WorkerSettings,
    /// Consumes and acks.
    pub(crate) consume: Link,
    /// Publishes outcomes (through `settler`).
    pub(crate) publish: Link,
    pub(crate) executor: Executor,
    pub(crate) settler: Settler,
    pub(crate) abort: CancellationToken,
    pub(crate) shared: Arc<Shared>,
    pub(crate) health: watch::Sender<Health>,
    pub(crate) tracker: TaskTracker,
}

impl Supervisor {
    pub(crate) fn set_state(&self, state: WorkerState, problem: Option<String>) {
        health::set_state(&self.health, state, problem);
    }

    async fn run(
        mut self,
        mut session: Session,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        loop {
            let reason = match self.consume(&mut session, &shutdown).await {
                End::Shutdown => break,
                End::Rotate => {
                    if self.rotate(&mut session, &shutdown).await? {
                        continue;
                    }
                    break;
                }
                End::Lost(reason) => reason,
            };
            tracing::warn!(queue = %self.settings.queue, %reason, "consumer lost; rebuilding it");
            self.set_state(WorkerState::Recovering, Some(reason.clone()));
            crate::metrics::recovered(&self.settings.queue);
            if !session.close().await && self.consume.state().is_up() {
                // The old consumer could not be cancelled on a connection that looks fine:
                // replace the connection, so no consumer is left behind on it.
                self.consume.reset();
            }
            session = match self.rebuild(&shutdown).await {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(e) => {
                    self.drain(None).await;
                    return Err(e);
                }
            };
            self.shared.stalled.send_replace(false);
            self.shared.delivered();
            self.set_state(WorkerState::Consuming, None);
            tracing::info!(queue = %self.settings.queue, "consuming again");
        }
        self.drain(Some(&session)).await;
        Ok(())
    }

    /// Moves whichever connection has outlived its lifetime to a new one, between tasks (nothing
    /// is in flight): the publishing one directly, the consuming one with a new session on it.
    /// `false` when asked to stop meanwhile.
    async fn rotate(
        &mut self,
        session: &mut Session,
        shutdown: &CancellationToken,
    ) -> Result<bool, WorkerError> {
        if self.publish.rotation_due() {
            retire(self.publish.rotate().await).await;
        }
        if self.consume.rotation_due() {
            session.close().await;
            retire(self.consume.rotate().await).await;
            match self.rebuild(shutdown).await {
                Ok(Some(new)) => *session = new,
                Ok(None) => return Ok(false),
                Err(e) => {
                    self.drain(None).await;
                    return Err(e);
                }
            }
            self.shared.delivered();
        }
        Ok(true)
    }

    /// The error of a link that stopped reconnecting.
    pub(crate) fn gave_up(&self) -> Option<WorkerError> {
        let reason = self.consume.gave_up().or_else(|| self.publish.gave_up())?;
        Some(WorkerError::GaveUp {
            queue: self.settings.queue.clone(),
            attempts: self.settings.broker.reconnect.max_attempts.unwrap_or(0),
            reason,
        })
    }

    /// A new session once the consuming link is up, retried with backoff; `None` when asked to
    /// stop meanwhile.
    async fn rebuild(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Session>, WorkerError> {
        let reconnect = self.settings.broker.reconnect.clone();
        let mut delays = reconnect.delays();
        let mut attempts = 0usize;
        loop {
            // Wait for a connection that is really there: the link may not have noticed yet
            // that the one the old session died with is gone.
            let mut state = self.consume.subscribe();
            let mut generations = self.consume.generations();
            loop {
                let now = state.borrow_and_update().clone();
                if now == LinkState::Closed
                    || (now.is_up() && self.consume.connection().status().connected())
                {
                    break;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    _ = state.changed() => {}
                    _ = generations.changed() => {}
                }
            }
            // Asked to stop meanwhile: declare nothing, its queue may be gone on purpose.
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            if let Some(gave_up) = self.gave_up() {
                tracing::error!(queue = %self.settings.queue, error = %gave_up, "giving up");
                return Err(gave_up);
            }
            let reason = if self.consume.state() == LinkState::Closed {
                "the consuming connection closed".to_owned()
            } else {
                let functions = self.executor.registry.functions();
                match Session::open(&self.consume, &self.settings, &functions).await {
                    Ok((session, _)) => return Ok(Some(session)),
                    // Another queue took a function while this worker was away (its queue was
                    // deleted meanwhile): retrying cannot help, and consuming without the claim
                    // would hide it. Stop, as at start-up, naming the owner.
                    // So is an event stream that is gone and may not be declared again: running
                    // tasks without their events would lose them.
                    Err(
                        claimed @ (WorkerError::FunctionClaimed { .. }
                        | WorkerError::EventStream { .. }),
                    ) => {
                        tracing::error!(queue = %self.settings.queue, error = %claimed, "giving up");
                        return Err(claimed);
                    }
                    Err(e) => e.to_string(),
                }
            };
            attempts += 1;
            if reconnect.max_attempts.is_some_and(|max| attempts >= max) {
                tracing::error!(queue = %self.settings.queue, %reason, attempts, "giving up");
                return Err(WorkerError::GaveUp {
                    queue: self.settings.queue.clone(),
                    attempts,
                    reason,
                });
            }
            if attempts == 1 {
                tracing::warn!(error = %reason, "cannot consume yet; retrying with backoff");
            }
            let delay = delays.next().unwrap_or(reconnect.max_delay);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_supervisor_is_reported_as_a_panic() {
        let (_tx, health) = watch::channel(Health::new(WorkerState::Consuming));
        let worker = RunningWorker {
            shutdown: CancellationToken::new(),
            join: tokio::spawn(async { panic!("supervisor bug") }),
            cron: None,
            health,
            shared: Arc::default(),
        };
        match worker.wait().await {
            Err(WorkerError::Panicked(message)) => assert_eq!(message, "supervisor bug"),
            other => panic!("expected Panicked, got {other:?}"),
        }
    }
}
