//! The worker runtime: connections, the consumer loop, and shutdown.
//!
//! One connection consumes (so acks keep flowing when the broker blocks publishers), one
//! publishes replies and dead letters through a pool of confirm-mode channels. The consumer's
//! prefetch equals the worker's concurrency, so the broker never hands this process more tasks
//! than it can run at once and the rest stay in the queue for other workers; every delivery
//! is run on its own tokio task, tracked so that shutdown can wait for it.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_shared::broker::{self, BrokerError, BrokerSettings, Purpose};
use warren_shared::{Policy, pool, topology};

use crate::execute::Executor;
use crate::outcome::{DeadReason, Envelope, Outcome, Settler};
use crate::registry::Registry;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Where the broker is.
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
    /// Bound on publishing one reply or dead letter, confirm included.
    pub publish_timeout: Duration,
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
    /// The consumer stopped receiving deliveries (channel closed, queue deleted, connection
    /// lost for good). The process should exit non-zero so its supervisor restarts it.
    #[error("consumer on {queue:?} ended: {reason}")]
    ConsumerEnded {
        /// The queue consumed.
        queue: String,
        /// What ended it.
        reason: String,
    },
}

/// A started worker: consuming until its shutdown token is cancelled.
#[derive(Debug)]
pub struct RunningWorker {
    shutdown: CancellationToken,
    join: JoinHandle<Result<(), WorkerError>>,
}

impl RunningWorker {
    /// Asks the worker to stop (like SIGTERM) without waiting.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the worker has stopped.
    ///
    /// # Errors
    /// The reason the worker stopped on its own, see [`WorkerError`].
    pub async fn wait(self) -> Result<(), WorkerError> {
        match self.join.await {
            Ok(result) => result,
            Err(e) => Err(WorkerError::ConsumerEnded {
                queue: String::new(),
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

    let consume_conn = broker::connect(&settings.broker, &settings.name, Purpose::Consume).await?;
    let publish_conn =
        Arc::new(broker::connect(&settings.broker, &settings.name, Purpose::Publish).await?);
    let consume_conn = Arc::new(consume_conn);
    let channel = consume_conn
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let names = topology::declare(&channel, &settings.queue)
        .await
        .map_err(BrokerError::from)?;
    channel
        .basic_qos(settings.concurrency, BasicQosOptions { global: false })
        .await
        .map_err(BrokerError::from)?;
    let tag = format!("{}/{}", settings.name, settings.queue);
    let consumer = channel
        .basic_consume(
            settings.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
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
    let settler = Settler {
        pool: pool::channel_pool(publish_conn.clone(), 4, settings.publish_timeout, None),
        queue: settings.queue.clone(),
        dead_queue: names.dead,
        retry_queues: Arc::default(),
        worker_name: settings.name.clone(),
        publish_timeout: settings.publish_timeout,
    };
    let loop_state = ConsumeLoop {
        channel,
        consumer,
        tag,
        executor,
        settler,
        abort,
        grace: settings.shutdown_grace,
        queue: settings.queue,
        connections: [consume_conn, publish_conn],
    };
    let join = tokio::spawn(loop_state.run(shutdown.clone()));
    Ok(RunningWorker { shutdown, join })
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

struct ConsumeLoop {
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    executor: Executor,
    settler: Settler,
    abort: CancellationToken,
    grace: Duration,
    queue: String,
    connections: [Arc<Connection>; 2],
}

impl ConsumeLoop {
    async fn run(mut self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let tracker = TaskTracker::new();
        let ended = loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break None,
                next = self.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let executor = self.executor.clone();
                    let settler = self.settler.clone();
                    tracker.spawn(async move {
                        let envelope = Envelope::of(&delivery);
                        let outcome = executor.execute(&delivery, &envelope).await;
                        if let Outcome::DeadLetter { reason: DeadReason::Rejected, failure } = &outcome {
                            tracing::warn!(task.id = %envelope.id, kind = %failure.kind, error = %failure.message, "rejected task dead-lettered");
                        }
                        settler.settle(&delivery, &envelope, &outcome).await;
                    });
                }
                Some(Err(e)) => break Some(e.to_string()),
                None => break Some("the broker cancelled the consumer".to_owned()),
            }
        };
        self.drain(tracker).await;
        match ended {
            None => Ok(()),
            Some(reason) => {
                tracing::error!(queue = %self.queue, %reason, "consumer ended");
                Err(WorkerError::ConsumerEnded {
                    queue: self.queue,
                    reason,
                })
            }
        }
    }

    /// Stops taking deliveries, waits for in-flight tasks within the grace period, then aborts
    /// the rest and closes: the broker requeues whatever was not acked.
    async fn drain(&self, tracker: TaskTracker) {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        tracker.close();
        if !tracker.is_empty() {
            tracing::info!(in_flight = tracker.len(), grace = ?self.grace, "draining in-flight tasks");
        }
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = tracker.len(),
                "grace period over; handing unfinished tasks back to the queue"
            );
            self.abort.cancel();
            // Let the aborted tasks send their nacks before the channel closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
        }
        let _ = self.channel.close(200, "worker stopping".into()).await;
        for connection in &self.connections {
            let _ = connection.close(200, "worker stopping".into()).await;
        }
        tracing::info!("worker stopped");
    }
}
