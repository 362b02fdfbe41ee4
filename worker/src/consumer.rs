//! The consumer loop: one consumer on one channel of the consuming connection, prefetch equal
//! to the worker's concurrency, every delivery run on its own tracked tokio task.
//!
//! The loop holds new deliveries (it stops taking them; the broker sends no more than the
//! prefetch) while the publishing link cannot publish, during a broker memory or disk alarm
//! for instance: tasks already running wait to publish their outcome and are acked once
//! publishing works again, instead of being handed back and re-run in a loop. The loop ends when
//! the consuming connection is replaced, the consumer is cancelled, or the watchdog finds the
//! worker starving; the supervisor then builds a new session.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::Channel;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use warren_shared::broker::BrokerError;
use warren_shared::delay;
use warren_shared::link::{Link, LinkState};
use warren_shared::topology;

use crate::metrics;
use crate::outcome::{DeadReason, Envelope, Outcome};
use crate::settings::{WorkerError, WorkerSettings};
use crate::supervisor::Supervisor;
use crate::supervisor::queue_mismatch;

/// Bound on cancelling a consumer and closing its channel.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Claims `functions` for the worker's queue on its functions exchange (see
/// [`topology::claim_function`]); nothing when that is off.
async fn claim(
    link: &Link,
    channel: &Channel,
    settings: &WorkerSettings,
    functions: &[&str],
) -> Result<Vec<String>, WorkerError> {
    let exchange = settings.functions_exchange.as_str();
    if exchange.is_empty() {
        return Ok(Vec::new());
    }
    topology::declare_functions_exchange(channel, exchange)
        .await
        .map_err(|e| BrokerError::from(e).needing("configure"))?;
    // Claim every function before routing any, so that a refused claim leaves nothing routed
    // to this queue (a caller of a half-claimed worker's function would wait for nobody).
    let mut claimed = Vec::with_capacity(functions.len());
    for function in functions {
        topology::validate_function_name(function).map_err(|e| {
            WorkerError::Settings(format!("cannot route {function:?} by name: {e}"))
        })?;
        // A refused claim closes its channel: each gets a channel of its own, so that the
        // error names its function.
        let claim_channel = link
            .connection()
            .create_channel()
            .await
            .map_err(BrokerError::from)?;
        let outcome =
            topology::claim_function(&claim_channel, exchange, function, &settings.queue).await;
        let _ = claim_channel.close(200, "claimed".into()).await;
        if let Err(e) = outcome {
            for earlier in claimed {
                let _ = topology::release_unbound_claim(channel, exchange, earlier).await;
            }
            return Err(match topology::claimed_by(&e) {
                Some(owner) => WorkerError::FunctionClaimed {
                    function: (*function).to_owned(),
                    queue: settings.queue.clone(),
                    owner,
                    exchange: topology::function_exchange(exchange, function),
                },
                None => BrokerError::from(e).needing("configure").into(),
            });
        }
        claimed.push(*function);
    }
    for function in &claimed {
        topology::route_function(channel, exchange, function, &settings.queue)
            .await
            .map_err(|e| BrokerError::from(e).needing("configure"))?;
    }
    Ok(claimed
        .into_iter()
        .map(|function| topology::function_exchange(exchange, function))
        .collect())
}

/// One consumer on one channel of one connection generation.
pub(crate) struct Session {
    pub(crate) channel: Channel,
    consumer: lapin::Consumer,
    pub(crate) tag: String,
    /// The consuming link's generation the session was built on.
    generation: u64,
}

/// Declares the delay levels, and binds `queue` and the exchanges of its claimed functions to
/// their delivery exchange, so that tasks due later (from any producer, or deferred here)
/// reach it. On a channel of its own: a refusal
/// (a user on an older permission profile, levels declared with other arguments) closes only
/// that channel, and is logged and shown as [`metrics::DELAYED_DELIVERY`] = 0 instead of
/// stopping the worker, whose tasks due now keep flowing.
async fn declare_delayed_delivery(link: &Link, queue: &str, function_exchanges: &[String]) {
    if let Err(reason) = delay::Destination::Queue(queue).validate() {
        tracing::warn!(
            queue,
            %reason,
            "delayed delivery is unavailable for this queue: its name cannot be routed through \
             the delay levels; tasks due later sent to it are parked in warren.run-at.parked"
        );
        metrics::delayed_delivery(queue, false);
        return;
    }
    let declared = async {
        let channel = link.connection().create_channel().await?;
        delay::declare_levels(&channel).await?;
        delay::bind_queue(&channel, queue).await?;
        for function_exchange in function_exchanges {
            delay::bind_function(&channel, function_exchange).await?;
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok::<(), lapin::Error>(())
    }
    .await;
    let available = match declared {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                queue,
                error = %BrokerError::from(e).needing("configure"),
                "delayed delivery is unavailable: cannot declare the delay levels \
                 (`warren.run-at*`); tasks due now still run, tasks due later that reach this \
                 worker early are not deferred"
            );
            false
        }
    };
    metrics::delayed_delivery(queue, available);
}

impl Session {
    /// Opens a channel on the link's current connection, declares the topology and the event
    /// stream, claims the `functions` for the queue (unless routing by function is off), sets
    /// the prefetch and starts consuming.
    pub(crate) async fn open(
        link: &Link,
        settings: &WorkerSettings,
        functions: &[&str],
    ) -> Result<(Self, topology::QueueNames), WorkerError> {
        let generation = link.generation();
        let channel = link
            .connection()
            .create_channel()
            .await
            .map_err(BrokerError::from)?;
        let names = topology::declare(&channel, &settings.queue)
            .await
            .map_err(|e| {
                queue_mismatch(&settings.queue, BrokerError::from(e).needing("configure"))
            })?;
        crate::events::declare(link, &settings.events).await?;
        let function_exchanges = claim(link, &channel, settings, functions).await?;
        declare_delayed_delivery(link, &settings.queue, &function_exchanges).await;
        channel
            .basic_qos(settings.concurrency, BasicQosOptions { global: false })
            .await
            .map_err(BrokerError::from)?;
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
            .await
            .map_err(BrokerError::from)?;
        Ok((
            Self {
                channel,
                consumer,
                tag,
                generation,
            },
            names,
        ))
    }

    /// Cancels the consumer and closes the channel, bounded. `false` when the channel was open
    /// and could not be closed (the consumer may still be registered).
    pub(crate) async fn close(&self) -> bool {
        if !self.channel.status().connected() {
            return true;
        }
        let closed = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self
                .channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await;
            self.channel.close(200, "consumer replaced".into()).await
        })
        .await;
        matches!(closed, Ok(Ok(())))
    }
}

/// How a session ended.
pub(crate) enum End {
    Shutdown,
    Lost(String),
    /// A connection's lifetime is over and nothing is in flight: time to move it.
    Rotate,
}

impl Supervisor {
    /// Runs `session` until it ends.
    pub(crate) async fn consume(&self, session: &mut Session, shutdown: &CancellationToken) -> End {
        let mut consume_state = self.consume.subscribe();
        let mut publish_state = self.publish.subscribe();
        let mut stalled = self.shared.stalled.subscribe();
        let mut watchdog = tokio::time::interval(self.settings.watchdog_interval);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        watchdog.tick().await;
        let mut suspicious = false;
        let mut holding = false;
        loop {
            if self.consume.generation() != session.generation {
                return End::Lost("the consuming connection was replaced".into());
            }
            match self.consume.state() {
                LinkState::Down { reason } => return End::Lost(reason),
                LinkState::Closed => return End::Lost("the consuming connection closed".into()),
                LinkState::Up | LinkState::Blocked { .. } => {}
            }
            let publishing = self.publish.state();
            if publishing == LinkState::Closed && self.publish.gave_up().is_some() {
                // Holding would wait forever: the rebuild that follows finds the give-up and
                // ends the worker, as when the consuming link gives up.
                return End::Lost("the publishing connection stopped reconnecting".into());
            }
            let cannot_publish = !publishing.is_up();
            if holding != cannot_publish {
                holding = cannot_publish;
                if holding {
                    tracing::warn!(queue = %self.settings.queue, state = %publishing, "cannot publish outcomes; taking no new tasks until publishing works again");
                } else {
                    tracing::info!(queue = %self.settings.queue, "publishing works again; taking tasks");
                    self.shared.delivered();
                }
            }
            let take = !holding && !*stalled.borrow_and_update();
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => return End::Shutdown,
                _ = consume_state.changed() => continue,
                _ = publish_state.changed() => continue,
                _ = stalled.changed() => continue,
                _ = watchdog.tick() => {
                    if holding {
                        continue;
                    }
                    if self.shared.in_flight.load(Ordering::SeqCst) == 0
                        && (self.consume.rotation_due() || self.publish.rotation_due())
                    {
                        return End::Rotate;
                    }
                    match self.starving(session).await {
                        Some(problem) if suspicious => return End::Lost(format!("watchdog: {problem}")),
                        Some(_) => suspicious = true,
                        None => suspicious = false,
                    }
                    continue;
                }
                next = session.consumer.next(), if take => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    suspicious = false;
                    self.shared.delivered();
                    self.spawn_task(delivery);
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

    fn spawn_task(&self, delivery: lapin::message::Delivery) {
        let executor = self.executor.clone();
        let settler = self.settler.clone();
        let shared = self.shared.clone();
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let measure = crate::metrics::TaskMetrics::started(&self.settings.queue, &delivery);
        let task = async move {
            let mut envelope = Envelope::of(&delivery);
            envelope.reply_to = envelope.reply_to.restricted_to(&executor.reply_queues);
            let mut trail = settler.events.trail(&envelope);
            let outcome = executor.execute(&delivery, &envelope, &mut trail).await;
            let measure = measure.judged();
            if let Outcome::DeadLetter {
                reason: DeadReason::Rejected,
                failure,
            } = &outcome
            {
                tracing::warn!(task.id = %envelope.id, kind = %failure.kind, error = %failure.message, "rejected task dead-lettered");
            }
            let settled = settler
                .settle(&delivery, &envelope, &outcome, &mut trail)
                .await;
            measure.settled(&outcome, &settled);
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        };
        // The task's state machine is about 5 KB (execute and settle, with lapin's publish and
        // confirm futures inside); boxed, tokio moves a pointer instead of copying it into the
        // task cell and again when the task finishes.
        self.tracker.spawn(Box::pin(task));
    }
}
