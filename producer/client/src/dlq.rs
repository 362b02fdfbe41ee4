//! The dead-letter queue, for operators: list, show, replay and purge the tasks parked in
//! `<queue>.dead`.
//!
//! Reading is non-destructive: messages are fetched with `basic.get` on a channel of their own
//! and not acked, so closing that channel puts them back. Replaying republishes a copy to the
//! work queue with a fresh attempt budget (attempt 1, no deadline, the dead-letter headers
//! removed), waits for the broker's confirm, and only then acks the parked message.

use std::time::SystemTime;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::Value;
use warren_shared::broker::BrokerError;
use warren_shared::pool::{Publication, publish_confirmed};
use warren_shared::protocol::{self, headers};
use warren_shared::topology::{self, QueueNames};

use crate::client::Client;
use crate::error::Error;

/// A task parked in a dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// The task id (`message_id`).
    pub id: String,
    /// The function it called, when the body says.
    pub function: Option<String>,
    /// Why it was parked: `rejected`, `permanent_failure`, `attempts_exhausted`, or the broker's
    /// own reason (`delivery_limit` when workers kept dying on it).
    pub reason: String,
    /// The error kind of the last failure, when a worker parked it.
    pub kind: Option<String>,
    /// The last error message.
    pub error: Option<String>,
    /// The attempt that failed last.
    pub attempts: Option<i64>,
    /// The worker that gave up on it.
    pub dead_by: Option<String>,
    /// When it was parked.
    #[serde(with = "epoch_ms")]
    pub dead_at: Option<SystemTime>,
    /// The request body: JSON when it parses, else the bytes as lossy text.
    pub body: Value,
}

mod epoch_ms {
    use std::time::SystemTime;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_i64(warren_shared::protocol::epoch_millis(*t)),
            None => s.serialize_none(),
        }
    }
}

/// Which parked tasks to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replay {
    /// The task with this id.
    One(String),
    /// Every parked task.
    All,
}

fn header_text(h: Option<&FieldTable>, name: &str) -> Option<String> {
    protocol::header_str(h, name)
}

impl DeadLetter {
    fn of(properties: &BasicProperties, data: &[u8]) -> Self {
        let h = properties.headers().as_ref();
        let body = serde_json::from_slice::<Value>(data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(data).into_owned()));
        let function = body
            .get("function")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let reason = header_text(h, headers::DEAD_REASON)
            .or_else(|| broker_reason(h))
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            id: properties
                .message_id()
                .as_ref()
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            function,
            reason,
            kind: header_text(h, headers::DEAD_KIND),
            error: header_text(h, headers::DEAD_ERROR),
            attempts: protocol::header_int(h, headers::ATTEMPT),
            dead_by: header_text(h, headers::DEAD_BY),
            dead_at: protocol::header_int(h, headers::DEAD_AT).map(protocol::from_epoch_millis),
            body,
        }
    }
}

/// The broker's reason for a message it dead-lettered itself. `x-death` lists every
/// dead-lettering of the message (a retried task was dead-lettered by its delay queues, reason
/// `expired`, on the way back); the one that parked it is the `delivery_limit` entry, when there is
/// one.
fn broker_reason(h: Option<&FieldTable>) -> Option<String> {
    let deaths = match h?.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let reasons: Vec<String> = deaths
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => header_text(Some(t), "reason"),
            _ => None,
        })
        .collect();
    reasons
        .iter()
        .find(|r| *r == "delivery_limit")
        .cloned()
        .or_else(|| header_text(h, "x-first-death-reason"))
        .or_else(|| reasons.into_iter().next())
}

/// Headers of a replayed copy: the dead-letter and broker bookkeeping removed, attempt 1.
fn replay_headers(original: Option<&FieldTable>) -> FieldTable {
    let mut h = FieldTable::default();
    if let Some(original) = original {
        for (key, value) in original.inner() {
            let k = key.as_str();
            let drop = k.starts_with("x-warren-dead-")
                || k.starts_with("x-death")
                || k.starts_with("x-first-death-")
                || k.starts_with("x-last-death-")
                || k == "x-delivery-count"
                || k == headers::DEADLINE
                || k == headers::LAST_ERROR;
            if !drop {
                h.insert(key.clone(), value.clone());
            }
        }
    }
    h.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
    h
}

/// The next parked message, fetched without acking it (closing `channel` puts it back).
async fn next_dead(channel: &Channel, names: &QueueNames) -> Result<Option<Delivery>, Error> {
    let got = channel
        .basic_get(
            names.dead.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(BrokerError::from)?;
    Ok(got.map(|message| message.delivery))
}

impl Client {
    async fn reading_channel(&self) -> Result<Channel, Error> {
        Ok(self
            .connection()
            .create_channel()
            .await
            .map_err(BrokerError::from)?)
    }

    /// Up to `limit` tasks parked for work queue `queue`, oldest first; they stay parked.
    ///
    /// # Errors
    /// [`Error::Broker`] when the queue does not exist or the broker cannot be read.
    pub async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        self.declare_queue(queue).await?;
        let names = QueueNames::new(queue);
        let channel = self.reading_channel().await?;
        let mut found = Vec::new();
        while found.len() < limit {
            let Some(delivery) = next_dead(&channel, &names).await? else {
                break;
            };
            found.push(DeadLetter::of(&delivery.properties, &delivery.data));
        }
        // Not acked: closing the channel puts every message back.
        let _ = channel.close(200, "dead letters read".into()).await;
        Ok(found)
    }

    /// Sends parked tasks back to work queue `queue` with a fresh attempt budget; returns how
    /// many were replayed.
    ///
    /// Only the tasks parked when the replay starts are looked at: the dead-letter queue's
    /// depth is read first and at most that many messages are fetched, and a message whose id
    /// this replay already sent back ends it. A replayed task that fails again and is parked
    /// again during the replay therefore stays parked, instead of being replayed in a loop.
    ///
    /// # Errors
    /// [`Error::Broker`] or [`Error::Publish`]; a task whose copy was not confirmed stays parked.
    pub async fn replay_dead_letters(&self, queue: &str, which: &Replay) -> Result<usize, Error> {
        self.declare_queue(queue).await?;
        let names = QueueNames::new(queue);
        // What is parked now; copies parked again during the replay queue up behind these.
        let parked = self.queue_stats(&names.dead).await?.ready;
        let channel = self.reading_channel().await?;
        let mut replayed = 0;
        let mut sent_back = std::collections::HashSet::new();
        let result = async {
            for _ in 0..parked {
                let Some(delivery) = next_dead(&channel, &names).await? else {
                    break;
                };
                let id = delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string());
                if id.as_ref().is_some_and(|id| sent_back.contains(id)) {
                    // Replayed by this run and parked again: left parked (not acked, so
                    // closing the channel puts it back).
                    break;
                }
                if let Replay::One(wanted) = which
                    && id.as_deref() != Some(wanted.as_str())
                {
                    continue;
                }
                let properties = delivery
                    .properties
                    .clone()
                    .with_headers(replay_headers(delivery.properties.headers().as_ref()));
                let publication = Publication {
                    exchange: topology::EXCHANGE,
                    routing_key: &names.work,
                    body: &delivery.data,
                    properties,
                    mandatory: true,
                };
                publish_confirmed(&self.pool(), publication, self.settings().publish_timeout)
                    .await?;
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BrokerError::from)?;
                replayed += 1;
                sent_back.extend(id);
                if matches!(which, Replay::One(_)) {
                    break;
                }
            }
            Ok::<(), Error>(())
        }
        .await;
        let _ = channel.close(200, "replay done".into()).await;
        result.map(|()| replayed)
    }

    /// Deletes every task parked for `queue`; returns how many there were.
    ///
    /// # Errors
    /// [`Error::Broker`].
    pub async fn purge_dead_letters(&self, queue: &str) -> Result<u32, Error> {
        self.declare_queue(queue).await?;
        let names = QueueNames::new(queue);
        let channel = self.reading_channel().await?;
        let purged = channel
            .queue_purge(names.dead.as_str().into(), QueuePurgeOptions::default())
            .await
            .map_err(BrokerError::from)?;
        let _ = channel.close(200, "purged".into()).await;
        Ok(purged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayed_copies_start_over() {
        let mut h = FieldTable::default();
        protocol::set_header_int(&mut h, headers::ATTEMPT, 3);
        protocol::set_header_int(&mut h, headers::DEADLINE, 1);
        protocol::set_header_str(&mut h, headers::DEAD_REASON, "attempts_exhausted");
        protocol::set_header_str(&mut h, "x-first-death-reason", "delivery_limit");
        protocol::set_header_int(&mut h, headers::PROTOCOL, 1);
        let out = replay_headers(Some(&h));
        assert_eq!(protocol::header_int(Some(&out), headers::ATTEMPT), Some(1));
        assert_eq!(protocol::header_int(Some(&out), headers::PROTOCOL), Some(1));
        assert!(protocol::header_int(Some(&out), headers::DEADLINE).is_none());
        assert!(protocol::header_str(Some(&out), headers::DEAD_REASON).is_none());
        assert!(protocol::header_str(Some(&out), "x-first-death-reason").is_none());
    }

    #[test]
    fn a_delivery_limit_after_retries_is_reported_as_such() {
        let death = |reason: &str| {
            let mut t = FieldTable::default();
            protocol::set_header_str(&mut t, "reason", reason);
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        protocol::set_header_str(&mut h, "x-first-death-reason", "expired");
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![death("delivery_limit"), death("expired")].into()),
        );
        assert_eq!(broker_reason(Some(&h)).as_deref(), Some("delivery_limit"));
    }

    #[test]
    fn broker_dead_letters_report_the_broker_reason() {
        let mut h = FieldTable::default();
        protocol::set_header_str(&mut h, "x-first-death-reason", "delivery_limit");
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id("t1".into());
        let dead = DeadLetter::of(&props, br#"{"function":"crash","args":{}}"#);
        assert_eq!(dead.reason, "delivery_limit");
        assert_eq!(dead.function.as_deref(), Some("crash"));
        assert_eq!(dead.id, "t1");
    }
}
