//! What happens to a delivery once its task has been judged: the only code that acks.
//!
//! The order is the delivery contract: first the task's events are appended to the event
//! stream ([`crate::events`]), then everything the outcome publishes (the retry copy, the
//! dead-letter copy, the reply) is confirmed by the broker, then the original is acked. A
//! crash in between means the task is delivered again (at least once), never that it is lost.
//! When a publish fails the delivery is handed back (`nack` with requeue) so that another
//! attempt can settle it; the queue's delivery limit stops that from looping forever. When the
//! broker refuses a publish by closing the channel, the outcome is published again on a channel
//! of its own, and an outcome refused there too is parked with reason `refused` instead of
//! being handed back (it would only be refused again). A reply the broker nacks is not handed
//! back either: the task's work is done, so it is acked without its reply, logged and counted.
//! An event that cannot be appended is a failed publish like any other: the task is handed
//! back (and the failure logged and counted), never acked without its events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;
use warren_shared::delay;
use warren_shared::envelope::{self, DeadMark};
use warren_shared::link::{Link, LinkState};
use warren_shared::pool::{
    self, LinkPool, Publication, PublishError, close_isolated, publish_confirmed,
};
use warren_shared::{ChannelPool, ErrorKind, RawJson, Reply, TaskFailure, TaskId, topology};

use crate::events::Trail;

pub use warren_shared::envelope::DeadReason;

/// The verdict on one delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Final: reply if the caller asked for one, then ack. A result is the handler's JSON
    /// text, published as it is.
    Reply(Reply<RawJson>),
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
    /// Not due yet (`x-warren-run-at` more than a second ahead): the task, unchanged, goes
    /// through the delay levels back to this queue, then is acked. It never waits in a worker.
    Later {
        /// Whole seconds it waits ([`warren_shared::delay::delay_seconds`]).
        seconds: u32,
    },
}

/// The parts of a delivery the outcome needs: its envelope, read once.
pub(crate) type Envelope = envelope::Incoming;

/// Where settling publishes, and how long it may take.
#[derive(Debug, Clone)]
pub(crate) struct Settler {
    /// Channels of the publishing link, following it across reconnects.
    pub(crate) pool: Arc<LinkPool>,
    pub(crate) queue: String,
    pub(crate) dead_queue: String,
    pub(crate) worker_name: String,
    pub(crate) publish_timeout: Duration,
    /// When each delay queue was last declared, by delay (declared again every
    /// [`topology::REDECLARE_RETRY_QUEUE_EVERY`], which keeps it from expiring).
    pub(crate) retry_queues: Arc<Mutex<HashMap<Duration, RetryQueue>>>,
    /// Cancelled when the worker gives up on tasks still running (end of the shutdown grace).
    pub(crate) abort: CancellationToken,
    /// Appends the tasks' events ([`Trail`]s are made from it).
    pub(crate) events: crate::events::Appender,
}

/// Times an outcome publish is tried again after it failed while the link could not publish.
const PUBLISH_TRIES: usize = 4;

/// The last declaration of one delay queue.
pub(crate) type RetryQueue = Arc<tokio::sync::Mutex<Option<std::time::Instant>>>;

/// Where publishing an outcome stopped: at the task's events, at its first publish (the retry
/// or dead-letter copy, or a plain reply), or at the reply after a dead-letter copy went
/// through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Events,
    First,
    Reply,
}

/// Whether the broker closed the channel, and only the channel, under a publish (a soft error
/// such as `406 PRECONDITION_FAILED - message size ... is larger than configured max size`): a
/// refusal that may be of this message's content. Not a timeout, a nack, a lost connection, or
/// a connection-level (hard) error: those close the connection for every task, so publishing
/// again could not tell whose message it was, and the task is handed back instead.
fn refused_by_broker(e: &PublishError, link: &Link) -> bool {
    let PublishError::Channel(e) = e else {
        return false;
    };
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) && link.state().is_up()
        }
        lapin::ErrorKind::InvalidChannelState(..) => link.state().is_up(),
        _ => false,
    }
}

/// Whether a failed publish at `step` is the broker refusing the reply itself (`basic.nack`:
/// its queue at a length limit, say), after the task's work was done and anything else it
/// publishes went through. Handing the task back would run a finished handler again (ten
/// `send_mail`s for one call) and be refused again, so the task is acked without its reply and
/// the caller, who gets no answer, times out. This holds on the first try and on a channel of
/// its own ([`Settler::settle_refused`]).
///
/// A reply whose confirm times out is still handed back: a timeout does not say the broker
/// refused it (the connection may be going, and then the ack is lost and the broker redelivers
/// anyway), and [`Settler::publish_outcome`] has already waited out a link that could not
/// publish.
fn reply_refused(step: Step, e: &PublishError) -> bool {
    step == Step::Reply && matches!(e, PublishError::Nacked { .. })
}

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
    /// The broker refused the task's outcome twice: the task was parked in the dead-letter
    /// queue with reason `refused` instead, then acked (or its ack lost, as for `AckLost`).
    Parked,
}

/// What became of an outcome the broker refused ([`Settler::settle_refused`]).
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// It went through on a channel of its own, or only the reply of a task already parked
    /// with its own reason was refused: settle as usual.
    Published,
    /// Refused again: the task is parked as `refused`.
    Parked,
    /// Neither: hand the task back.
    Failed,
}

impl Settler {
    pub(crate) async fn settle(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
        trail: &mut Trail,
    ) -> Settled {
        if *outcome == Outcome::HandBack {
            self.hand_back(delivery).await;
            return Settled::Requeued;
        }
        let published = self
            .publish_outcome(None, delivery, envelope, outcome, trail, Step::Events)
            .await;
        let parked = match published {
            Ok(()) => false,
            Err((Step::Events, e)) => {
                tracing::warn!(task.id = %envelope.id, error = %e, "could not append the task's event to the event stream; handing the task back (it is not acked without its events)");
                crate::metrics::event_append_failed(&self.queue);
                self.hand_back(delivery).await;
                return Settled::Requeued;
            }
            Err((step, e)) if reply_refused(step, &e) => {
                self.record_reply_refused(envelope, &e);
                false
            }
            Err((step, e)) => {
                let refusal = if refused_by_broker(&e, self.link()) {
                    self.settle_refused(delivery, envelope, outcome, trail, step, &e)
                        .await
                } else {
                    Refusal::Failed
                };
                if refusal == Refusal::Failed {
                    tracing::warn!(task.id = %envelope.id, error = %e, "could not publish the outcome; handing the task back");
                    self.hand_back(delivery).await;
                    return Settled::Requeued;
                }
                refusal == Refusal::Parked
            }
        };
        // Bounded: an ack on a channel that is being recovered must not hold a slot forever.
        let acked = tokio::time::timeout(
            self.publish_timeout,
            delivery.ack(BasicAckOptions::default()),
        )
        .await;
        let acked = matches!(acked, Ok(Ok(true)));
        if !acked {
            tracing::warn!(task.id = %envelope.id, "ack lost with the consumer channel; the broker will redeliver");
        }
        match (parked, acked) {
            (true, _) => Settled::Parked,
            (false, true) => Settled::Acked,
            (false, false) => Settled::AckLost,
        }
    }

    fn record_reply_refused(&self, envelope: &Envelope, e: &PublishError) {
        tracing::warn!(task.id = %envelope.id, error = %e, "the broker refused the task's reply; acking the task without one (running it again would repeat its work)");
        crate::metrics::reply_refused(&self.queue);
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

    /// Publishes what `outcome` publishes, from step `from` on, on `pool` (the publishing
    /// link's current pool when `None`); on failure says at which step. While the link cannot
    /// publish it waits for it rather than handing the task straight back: that would only
    /// bring it back here (or to a worker as blocked) at once.
    async fn publish_outcome(
        &self,
        pool: Option<&ChannelPool>,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
        trail: &mut Trail,
        mut from: Step,
    ) -> Result<(), (Step, PublishError)> {
        let mut tries = 0;
        loop {
            self.wait_publishable().await.map_err(|e| (from, e))?;
            let current = match pool {
                Some(pool) => pool.clone(),
                None => self.pool.pool(),
            };
            match self
                .publish_outcome_once(&current, delivery, envelope, outcome, trail, from)
                .await
            {
                Ok(()) => return Ok(()),
                // Failed because the broker blocked publishers or the connection went: once it
                // publishes again, publish again from the step that failed (a duplicate reply
                // or copy is harmless; a re-run is what this avoids).
                Err((step, e)) if tries + 1 < PUBLISH_TRIES && !self.link().state().is_up() => {
                    tries += 1;
                    from = step;
                    tracing::debug!(task.id = %envelope.id, error = %e, "outcome publish failed while the link could not publish; trying again");
                }
                Err(failed) => return Err(failed),
            }
        }
    }

    /// One try of [`publish_outcome`](Self::publish_outcome) on `pool`.
    async fn publish_outcome_once(
        &self,
        pool: &ChannelPool,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
        trail: &mut Trail,
        from: Step,
    ) -> Result<(), (Step, PublishError)> {
        if from == Step::Events {
            // Before anything the caller or another worker could see: a caller that has its
            // reply can read the final event.
            trail.settle(outcome).await.map_err(|e| (Step::Events, e))?;
        }
        // Borrowed, never cloned: a result can be megabytes.
        let parked;
        let reply = match outcome {
            Outcome::Reply(reply) => reply,
            Outcome::Retry { delay, failure } => {
                return self
                    .retry(pool, delivery, envelope, *delay, failure)
                    .await
                    .map_err(|e| (Step::First, e));
            }
            Outcome::DeadLetter { reason, failure } => {
                if from != Step::Reply {
                    self.dead_letter(pool, delivery, &envelope.id, *reason, failure, false)
                        .await
                        .map_err(|e| (Step::First, e))?;
                }
                parked = Reply::Err(failure.clone());
                &parked
            }
            Outcome::HandBack => return Ok(()),
            Outcome::Later { seconds } => {
                return self
                    .later(pool, delivery, envelope, *seconds)
                    .await
                    .map_err(|e| (Step::First, e));
            }
        };
        if let Some(reply_to) = envelope.reply_to.address() {
            self.reply(pool, envelope, reply_to, reply)
                .await
                .map_err(|e| (Step::Reply, e))?;
        }
        Ok(())
    }

    /// The broker refused a publish of `outcome` at `step` and closed the channel; neighbours'
    /// publishes on that channel failed with it, so the refusal may not be this task's. Publish
    /// again on a channel of its own: if that goes through, settle as usual; if the broker
    /// refuses it again, it is this task's outcome that it refuses, so park the task with
    /// reason `refused` (a copy with Warren's headers only) and answer the caller with a small
    /// error, instead of handing it back to be run again.
    async fn settle_refused(
        &self,
        delivery: &Delivery,
        envelope: &Envelope,
        outcome: &Outcome,
        trail: &mut Trail,
        step: Step,
        first: &PublishError,
    ) -> Refusal {
        tracing::warn!(task.id = %envelope.id, error = %first, "the broker refused an outcome; publishing it again on a channel of its own");
        let alone = pool::isolated(&self.pool.pool(), self.publish_timeout);
        let settled = match self
            .publish_outcome(Some(&alone), delivery, envelope, outcome, trail, step)
            .await
        {
            Ok(()) => Refusal::Published,
            // On its own channel the reply is nacked: as on the first try, the work is done.
            Err((step, e)) if reply_refused(step, &e) => {
                self.record_reply_refused(envelope, &e);
                Refusal::Published
            }
            Err((step, e)) if refused_by_broker(&e, self.link()) => {
                close_isolated(alone.clone()).await;
                let failure = TaskFailure::new(
                    ErrorKind::Refused,
                    envelope::bounded(
                        &format!("the broker refused the task's outcome: {e}"),
                        envelope::MAX_HEADER_TEXT,
                    ),
                );
                tracing::warn!(task.id = %envelope.id, error = %e, "the broker refuses this task's outcome; parking it");
                let already = step == Step::Reply && matches!(outcome, Outcome::DeadLetter { .. });
                let parked = if already {
                    true // already parked with its own reason; only its reply was refused
                } else {
                    let again = pool::isolated(&self.pool.pool(), self.publish_timeout);
                    let parked = self
                        .dead_letter(
                            &again,
                            delivery,
                            &envelope.id,
                            DeadReason::Refused,
                            &failure,
                            true,
                        )
                        .await;
                    close_isolated(again).await;
                    if parked.is_ok() {
                        trail.parked_as_refused(outcome, &failure).await;
                    }
                    parked.is_ok()
                };
                if parked && let Some(reply_to) = envelope.reply_to.address() {
                    let again = pool::isolated(&self.pool.pool(), self.publish_timeout);
                    // The caller may be gone, and the parked task is the record: best effort.
                    let _ = self
                        .reply(&again, envelope, reply_to, &Reply::Err(failure))
                        .await;
                    close_isolated(again).await;
                }
                return match (parked, already) {
                    (false, _) => Refusal::Failed,
                    (true, true) => Refusal::Published,
                    (true, false) => Refusal::Parked,
                };
            }
            Err(_) => Refusal::Failed,
        };
        close_isolated(alone).await;
        settled
    }

    /// The delay queue for `delay`, declared if it was not declared recently.
    async fn retry_queue(&self, delay: Duration) -> Result<String, PublishError> {
        let name = topology::retry_queue_name(&self.queue, delay);
        let entry = {
            let mut queues = self
                .retry_queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            queues.entry(delay).or_default().clone()
        };
        let mut declared = entry.lock().await;
        if declared.is_some_and(|at| at.elapsed() < topology::REDECLARE_RETRY_QUEUE_EVERY) {
            return Ok(name);
        }
        let channel = self
            .pool
            .pool()
            .get()
            .await
            .map_err(|e| PublishError::NoChannel(e.to_string()))?;
        topology::declare_retry_queue(&channel, &self.queue, delay).await?;
        *declared = Some(std::time::Instant::now());
        Ok(name)
    }

    async fn retry(
        &self,
        pool: &ChannelPool,
        delivery: &Delivery,
        envelope: &Envelope,
        delay: Duration,
        failure: &TaskFailure,
    ) -> Result<(), PublishError> {
        // A task with an unusable attempt number is rejected before it runs, so it never gets
        // here; count up without wrapping anyway.
        let next = envelope.attempt.clone().unwrap_or(1).saturating_add(1);
        let properties = envelope::retry_copy(&delivery.properties, &envelope.id, next, failure);
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
        publish_confirmed(pool, publication, self.publish_timeout).await
    }

    /// Sends a copy of the task ([`envelope::later_copy`]) through the delay levels back to
    /// this queue.
    async fn later(
        &self,
        pool: &ChannelPool,
        delivery: &Delivery,
        envelope: &Envelope,
        seconds: u32,
    ) -> Result<(), PublishError> {
        let routing_key = delay::routing_key(seconds, delay::Destination::Queue(&self.queue));
        let publication = Publication {
            exchange: &delay::entry_exchange(),
            routing_key: &routing_key,
            body: &delivery.data,
            properties: envelope::later_copy(&delivery.properties, &envelope.id),
            mandatory: true,
        };
        publish_confirmed(pool, publication, self.publish_timeout).await
    }

    async fn dead_letter(
        &self,
        pool: &ChannelPool,
        delivery: &Delivery,
        id: &TaskId,
        reason: DeadReason,
        failure: &TaskFailure,
        bare: bool,
    ) -> Result<(), PublishError> {
        let mark = DeadMark {
            reason,
            failure,
            by: &self.worker_name,
            at: SystemTime::now(),
        };
        let properties = if bare {
            envelope::bare_dead_copy(&delivery.properties, id, mark)
        } else {
            envelope::dead_copy(&delivery.properties, id, mark)
        };
        let publication = Publication {
            exchange: "",
            routing_key: &self.dead_queue,
            body: &delivery.data,
            properties,
            mandatory: true,
        };
        publish_confirmed(pool, publication, self.publish_timeout).await
    }

    async fn reply(
        &self,
        pool: &ChannelPool,
        envelope: &Envelope,
        reply_to: &str,
        reply: &Reply<RawJson>,
    ) -> Result<(), PublishError> {
        let properties = envelope::reply_properties(envelope);
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
        publish_confirmed(pool, publication, self.publish_timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_nacked_reply_is_acked_without_its_reply() {
        let nacked = || PublishError::Nacked {
            exchange: String::new(),
            routing_key: "warren.reply.x".into(),
        };
        assert!(reply_refused(Step::Reply, &nacked()));
        // A nacked retry or dead-letter copy: the task is not settled, it goes back.
        assert!(!reply_refused(Step::First, &nacked()));
        let timeout = PublishError::Timeout(Duration::from_secs(5));
        assert!(!reply_refused(Step::Reply, &timeout));
    }
}
