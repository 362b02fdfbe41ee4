//! What happens to a delivery once its task has been judged: the only code that acks.
//!
//! The order is the delivery contract: first everything the outcome publishes (the dead-letter
//! copy, the reply) is confirmed by the broker, then the original is acked. A crash in between
//! means the task is delivered again (at least once), never that it is lost. When a publish
//! fails the delivery is handed back (`nack` with requeue) so that another attempt can settle it.

use std::time::{Duration, SystemTime};

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::FieldTable;
use warren_shared::pool::{Publication, PublishError, publish_confirmed};
use warren_shared::protocol::{self, headers};
use warren_shared::{ChannelPool, Reply, TaskFailure, TaskId};

/// The verdict on one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task ran (or could not run for a reason that is final, such as an expired deadline):
    /// reply if the caller asked for one, then ack.
    Reply(Reply),
    /// The task must not run as it is (bad input): park a copy in the dead-letter queue with the
    /// reason, reply with the failure if possible, then ack.
    DeadLetter(TaskFailure),
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
            .filter(|r| !r.is_empty());
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
    pub(crate) pool: ChannelPool,
    pub(crate) dead_queue: String,
    pub(crate) worker_name: String,
    pub(crate) publish_timeout: Duration,
}

/// How settling ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Acked.
    Acked,
    /// The ack did not reach the broker (the channel closed or was recovered); the broker
    /// redelivers the task.
    AckLost,
    /// A publish failed; the delivery was handed back to the queue.
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
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await;
            return Settled::Requeued;
        }
        if let Err(e) = self.publish_outcome(delivery, envelope, outcome).await {
            tracing::warn!(error = %e, "could not publish the outcome; handing the task back");
            // Ok(false) or Err both mean the channel is gone: the broker requeues it anyway.
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await;
            return Settled::Requeued;
        }
        match delivery.ack(BasicAckOptions::default()).await {
            Ok(true) => Settled::Acked,
            Ok(false) | Err(_) => {
                tracing::warn!("ack lost with the consumer channel; the broker will redeliver");
                Settled::AckLost
            }
        }
    }

    async fn publish_outcome(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
    ) -> Result<(), PublishError> {
        let reply = match outcome {
            Outcome::Reply(reply) => reply.clone(),
            Outcome::HandBack => return Ok(()),
            Outcome::DeadLetter(failure) => {
                self.dead_letter(delivery, failure).await?;
                Reply::Err(failure.clone())
            }
        };
        if let Some(reply_to) = &envelope.reply_to {
            self.reply(envelope, reply_to, &reply).await?;
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        failure: &TaskFailure,
    ) -> Result<(), PublishError> {
        let mut h = delivery.properties.headers().clone().unwrap_or_default();
        protocol::set_header_str(&mut h, headers::DEAD_REASON, failure.kind.as_str());
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
        publish_confirmed(
            &self.pool,
            Publication {
                exchange: "",
                routing_key: &self.dead_queue,
                body: &delivery.data,
                properties,
                mandatory: true,
            },
            self.publish_timeout,
        )
        .await
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
        publish_confirmed(
            &self.pool,
            Publication {
                exchange: "",
                routing_key: reply_to,
                body: &reply.encode(),
                properties,
                mandatory: false,
            },
            self.publish_timeout,
        )
        .await
    }
}
