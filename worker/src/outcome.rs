//! What happens to a delivery once its task has been judged: the only code that acks.
//!
//! The order is the delivery contract: first everything the outcome publishes (the retry copy,
//! the dead-letter copy, the reply) is confirmed by the broker, then the original is acked. A
//! crash in between means the task is delivered again (at least once), never that it is lost.
//! When a publish fails the delivery is handed back (`nack` with requeue) so that another
//! attempt can settle it; the queue's delivery limit stops that from looping forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use warren_shared::link::{Link, LinkState};
use warren_shared::pool::{LinkPool, Publication, PublishError, publish_confirmed};
use warren_shared::protocol::{self, headers};
use warren_shared::{Reply, TaskFailure, TaskId, topology};

/// Why a task was parked in the dead-letter queue (the `x-warren-dead-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadReason {
    /// The input cannot run as it is (malformed, unknown function, bad arguments, too large...).
    Rejected,
    /// The handler failed with a permanent error.
    PermanentFailure,
    /// Every attempt failed, or no attempt could start before the deadline.
    AttemptsExhausted,
}

impl DeadReason {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::PermanentFailure => "permanent_failure",
            Self::AttemptsExhausted => "attempts_exhausted",
        }
    }
}

/// The verdict on one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Final: reply if the caller asked for one, then ack.
    Reply(Reply),
    /// Run it again after `delay`: a copy with the attempt incremented goes to the delay queue;
    /// the caller keeps waiting.
    Retry {
        /// The backoff delay.
        delay: Duration,
        /// Why this attempt failed.
        failure: TaskFailure,
    },
    /// Final failure: park a copy in the dead-letter queue with the reason, reply with the
    /// failure if possible, then ack.
    DeadLetter {
        /// Why it is parked.
        reason: DeadReason,
        /// The last failure.
        failure: TaskFailure,
    },
    /// The worker is stopping and gave up on the task before it finished: hand it back to the
    /// queue (`nack` with requeue) for another worker, without replying.
    HandBack,
}

/// The parts of a delivery the outcome needs.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    pub(crate) id: TaskId,
    pub(crate) reply_to: Option<String>,
    pub(crate) correlation_id: Option<String>,
}

impl Envelope {
    pub(crate) fn of(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let message_id = p.message_id().as_ref().map(|s| s.to_string());
        let correlation_id = p.correlation_id().as_ref().map(|s| s.to_string());
        let id = message_id
            .or_else(|| correlation_id.clone())
            .map_or_else(TaskId::new, TaskId::from);
        let reply_to = p
            .reply_to()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|r| !r.is_empty() && !r.chars().any(char::is_control));
        Self {
            id,
            reply_to,
            correlation_id,
        }
    }
}

/// Where settling publishes, and how long it may take.
#[derive(Debug, Clone)]
pub(crate) struct Settler {
    /// Channels of the publishing link, following it across reconnects.
    pub(crate) pool: Arc<LinkPool>,
    pub(crate) queue: String,
    pub(crate) dead_queue: String,
    pub(crate) worker_name: String,
    pub(crate) publish_timeout: Duration,
    /// Delay queues declared so far, by delay.
    pub(crate) retry_queues: Arc<Mutex<HashMap<Duration, Arc<OnceCell<String>>>>>,
    /// Cancelled when the worker gives up on tasks still running (end of the shutdown grace).
    pub(crate) abort: CancellationToken,
}

/// Times an outcome publish is tried again after it failed while the link could not publish.
const PUBLISH_TRIES: usize = 4;

/// How settling ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked.
    Acked,
    /// The ack did not reach the broker (the channel closed or was recovered); the broker
    /// redelivers the task.
    AckLost,
    /// Handed back to the queue, on purpose or because a publish failed.
    Requeued,
}

impl Settler {
    pub(crate) async fn settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
    ) -> Settled {
        if *outcome == Outcome::HandBack {
            self.hand_back(delivery).await;
            return Settled::Requeued;
        }
        if let Err(e) = self.publish_outcome(delivery, envelope, outcome).await {
            tracing::warn!(task.id = %envelope.id, error = %e, "could not publish the outcome; handing the task back");
            self.hand_back(delivery).await;
            return Settled::Requeued;
        }
        // Bounded: an ack on a channel that is being recovered must not hold a slot forever.
        let acked = tokio::time::timeout(
            self.publish_timeout,
            delivery.ack(BasicAckOptions::default()),
        )
        .await;
        match acked {
            Ok(Ok(true)) => Settled::Acked,
            Ok(Ok(false) | Err(_)) | Err(_) => {
                tracing::warn!(task.id = %envelope.id, "ack lost with the consumer channel; the broker will redeliver");
                Settled::AckLost
            }
        }
    }

    /// `nack` with requeue, bounded in time. `Ok(false)`, an error or silence all mean the
    /// channel is gone, and the broker requeues the delivery anyway.
    async fn hand_back(&self, delivery: &Delivery) {
        let nack = delivery.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        });
        let _ = tokio::time::timeout(self.publish_timeout, nack).await;
    }

    fn link(&self) -> &Link {
        self.pool.link()
    }

    /// Waits until the publishing link can publish: without bound while the broker blocks
    /// publishers (an alarm ends; handing the task back would only run it again), at most
    /// `publish_timeout` while the link reconnects, not at all once it is closed.
    async fn wait_publishable(&self) -> Result<(), PublishError> {
        let mut state = self.link().subscribe();
        let reconnect_until = tokio::time::Instant::now() + self.publish_timeout;
        loop {
            let now = state.borrow_and_update().clone();
            let bounded = match &now {
                LinkState::Up => return Ok(()),
                LinkState::Closed => return Err(PublishError::NoChannel(now.to_string())),
                LinkState::Blocked { .. } => false,
                LinkState::Down { .. } => true,
            };
            tokio::select! {
                () = self.abort.cancelled() => return Err(PublishError::NoChannel(now.to_string())),
                () = tokio::time::sleep_until(reconnect_until), if bounded => {
                    return Err(PublishError::NoChannel(now.to_string()));
                }
                changed = state.changed() => {
                    if changed.is_err() {
                        return Err(PublishError::NoChannel(now.to_string()));
                    }
                }
            }
        }
    }

    async fn publish_outcome(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
    ) -> Result<(), PublishError> {
        let mut tries = 0;
        loop {
            // While the link cannot publish, wait for it rather than handing the task straight
            // back: that would only bring it back here (or to a worker as blocked) at once.
            self.wait_publishable().await?;
            match self.publish_outcome_once(delivery, envelope, outcome).await {
                Ok(()) => return Ok(()),
                // Failed because the broker blocked publishers or the connection went: once it
                // publishes again, publish again (a duplicate reply or copy is harmless; a
                // re-run is what this avoids).
                Err(e) if tries + 1 < PUBLISH_TRIES && !self.link().state().is_up() => {
                    tries += 1;
                    tracing::debug!(task.id = %envelope.id, error = %e, "outcome publish failed while the link could not publish; trying again");
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn publish_outcome_once(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
    ) -> Result<(), PublishError> {
        let reply = match outcome {
            Outcome::Reply(reply) => reply.clone(),
            Outcome::Retry { delay, failure } => {
                return self.retry(delivery, *delay, failure).await;
            }
            Outcome::DeadLetter { reason, failure } => {
                self.dead_letter(delivery, *reason, failure).await?;
                Reply::Err(failure.clone())
            }
            Outcome::HandBack => return Ok(()),
        };
        if let Some(reply_to) = &envelope.reply_to {
            self.reply(envelope, reply_to, &reply).await?;
        }
        Ok(())
    }

    async fn retry_queue(&self, delay: Duration) -> Result<String, PublishError> {
        let cell = {
            let mut queues = self
                .retry_queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queues.entry(delay).or_default().clone()
        };
        let name = cell
            .get_or_try_init(|| async {
                let channel = self
                    .pool
                    .pool()
                    .get()
                    .await
                    .map_err(|e| PublishError::NoChannel(e.to_string()))?;
                Ok::<_, PublishError>(
                    topology::declare_retry_queue(&channel, &self.queue, delay).await?,
                )
            })
            .await?;
        Ok(name.clone())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        delay: Duration,
        failure: &TaskFailure,
    ) -> Result<(), PublishError> {
        let mut h = delivery.properties.headers().clone().unwrap_or_default();
        let attempt = protocol::header_int(Some(&h), headers::ATTEMPT)
            .unwrap_or(1)
            .max(1);
        protocol::set_header_int(&mut h, headers::ATTEMPT, attempt + 1);
        protocol::set_header_str(&mut h, headers::LAST_ERROR, &failure.to_string());
        let properties = delivery
            .properties
            .clone()
            .with_headers(h)
            .with_delivery_mode(2);
        let (exchange, routing_key) = if delay.is_zero() {
            (topology::EXCHANGE.to_owned(), self.queue.clone())
        } else {
            (String::new(), self.retry_queue(delay).await?)
        };
        let publication = Publication {
            exchange: &exchange,
            routing_key: &routing_key,
            body: &delivery.data,
            properties,
            mandatory: true,
        };
        publish_confirmed(&self.pool.pool(), publication, self.publish_timeout).await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: DeadReason,
        failure: &TaskFailure,
    ) -> Result<(), PublishError> {
        let mut h = delivery.properties.headers().clone().unwrap_or_default();
        protocol::set_header_str(&mut h, headers::DEAD_REASON, reason.as_str());
        protocol::set_header_str(&mut h, headers::DEAD_KIND, failure.kind.as_str());
        protocol::set_header_str(&mut h, headers::DEAD_ERROR, &failure.message);
        protocol::set_header_str(&mut h, headers::DEAD_BY, &self.worker_name);
        protocol::set_header_int(
            &mut h,
            headers::DEAD_AT,
            protocol::epoch_millis(SystemTime::now()),
        );
        let properties = delivery
            .properties
            .clone()
            .with_headers(h)
            .with_delivery_mode(2);
        let publication = Publication {
            exchange: "",
            routing_key: &self.dead_queue,
            body: &delivery.data,
            properties,
            mandatory: true,
        };
        publish_confirmed(&self.pool.pool(), publication, self.publish_timeout).await
    }

    async fn reply(
        &self,
        envelope: &Envelope,
        reply_to: &str,
        reply: &Reply,
    ) -> Result<(), PublishError> {
        let correlation = envelope
            .correlation_id
            .as_deref()
            .unwrap_or(envelope.id.as_str());
        let mut h = FieldTable::default();
        protocol::set_header_int(&mut h, headers::PROTOCOL, protocol::PROTOCOL_VERSION);
        let properties = BasicProperties::default()
            .with_correlation_id(correlation.into())
            .with_message_id(envelope.id.as_str().into())
            .with_content_type(protocol::CONTENT_TYPE.into())
            .with_type(protocol::REPLY_TYPE.into())
            .with_delivery_mode(2)
            .with_headers(h);
        // Not mandatory: RabbitMQ 3.10 returns direct replies it has delivered, and a reply to a
        // caller that has gone away has nobody to be returned to anyway.
        let body = reply.encode();
        let publication = Publication {
            exchange: "",
            routing_key: reply_to,
            body: &body,
            properties,
            mandatory: false,
        };
        publish_confirmed(&self.pool.pool(), publication, self.publish_timeout).await
    }
}
