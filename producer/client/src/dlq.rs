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
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::Value;
use warren_shared::broker::BrokerError;
use warren_shared::envelope::{self, DeadInfo};
use warren_shared::pool::{Publication, publish_confirmed};
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
            Some(t) => s.serialize_i64(warren_shared::envelope::epoch_millis(*t)),
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

impl DeadLetter {
    fn of(properties: &BasicProperties, data: &[u8]) -> Self {
        let info = DeadInfo::read(properties);
        let body = serde_json::from_slice::<Value>(data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(data).into_owned()));
        let function = body
            .get("function")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self {
            id: info.id.unwrap_or_else(|| "-".to_owned()),
            function,
            reason: info.reason.unwrap_or_else(|| "unknown".to_owned()),
            kind: info.kind,
            error: info.error,
            attempts: info.attempts,
            dead_by: info.dead_by,
            dead_at: info.dead_at,
            body,
        }
    }
}

/// Whether the broker answered `404 NOT_FOUND` (a passive declare of a missing queue).
pub(crate) use warren_shared::broker::is_not_found as not_found;

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
    /// The names of work queue `queue` and how many tasks are parked for it, once its
    /// dead-letter queue is known to exist: looking at parked tasks never declares anything,
    /// so a mistyped `--queue` creates no queues.
    async fn parked_for(&self, queue: &str) -> Result<(QueueNames, u32), Error> {
        topology::validate_queue_name(queue).map_err(Error::InvalidQueue)?;
        let names = QueueNames::new(queue);
        match self.queue_stats(&names.dead).await {
            Ok(stats) => Ok((names, stats.ready)),
            Err(Error::Broker(BrokerError::Amqp(e))) if not_found(&e) => {
                Err(Error::NoSuchQueue(names.dead))
            }
            Err(e) => Err(e),
        }
    }

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
    /// [`Error::NoSuchQueue`] when the dead-letter queue does not exist (nothing is declared),
    /// [`Error::Broker`] when the broker cannot be read.
    pub async fn dead_letters(&self, queue: &str, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let (names, _) = self.parked_for(queue).await?;
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
    /// [`Error::NoSuchQueue`], [`Error::Broker`] or [`Error::Publish`]; a task whose copy was
    /// not confirmed stays parked.
    pub async fn replay_dead_letters(&self, queue: &str, which: &Replay) -> Result<usize, Error> {
        // What is parked now; copies parked again during the replay queue up behind these.
        let (names, parked) = self.parked_for(queue).await?;
        let channel = self.reading_channel().await?;
        let mut replayed = 0;
        let mut sent_back = std::collections::HashSet::new();
        let result = async {
            for _ in 0..parked {
                let Some(delivery) = next_dead(&channel, &names).await? else {
                    break;
                };
                let id = DeadInfo::read(&delivery.properties).id;
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
                let properties = envelope::replay_copy(&delivery.properties);
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
    /// [`Error::NoSuchQueue`] or [`Error::Broker`].
    pub async fn purge_dead_letters(&self, queue: &str) -> Result<u32, Error> {
        let (names, _) = self.parked_for(queue).await?;
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
    use lapin::types::FieldTable;
    use warren_shared::envelope::{headers, set_header_str};

    #[test]
    fn broker_dead_letters_report_the_broker_reason() {
        let mut h = FieldTable::default();
        set_header_str(&mut h, "x-first-death-reason", "delivery_limit");
        let props = BasicProperties::default()
            .with_headers(h)
            .with_message_id("t1".into());
        let dead = DeadLetter::of(&props, br#"{"function":"crash","args":{}}"#);
        assert_eq!(dead.reason, "delivery_limit");
        assert_eq!(dead.function.as_deref(), Some("crash"));
        assert_eq!(dead.id, "t1");
    }

    #[test]
    fn worker_dead_letters_report_warren_s_reason() {
        let mut h = FieldTable::default();
        set_header_str(&mut h, headers::DEAD_REASON, "rejected");
        set_header_str(&mut h, headers::DEAD_KIND, "bad_request");
        let dead = DeadLetter::of(&BasicProperties::default().with_headers(h), b"not json");
        assert_eq!(dead.reason, "rejected");
        assert_eq!(dead.kind.as_deref(), Some("bad_request"));
        assert_eq!(dead.id, "-");
        assert_eq!(dead.body, Value::String("not json".into()));
    }
}
