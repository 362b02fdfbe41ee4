//! A plain AMQP peer with no Warren code on its path: it publishes whatever bytes and
//! properties a test wants (bad input, foreign clients) and collects direct replies.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer};
use warren_shared::Reply;
use warren_shared::protocol::DIRECT_REPLY_TO;

use crate::amqp_url;

/// A raw publisher with a direct reply-to consumer on the same channel.
pub struct RawPeer {
    connection: Connection,
    channel: Channel,
    replies: Consumer,
}

impl std::fmt::Debug for RawPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPeer").finish_non_exhaustive()
    }
}

impl RawPeer {
    /// Connects and starts consuming direct replies.
    pub async fn connect() -> Self {
        let connection =
            match Connection::connect(&amqp_url(), ConnectionProperties::default()).await {
                Ok(c) => c,
                Err(e) => panic!("raw peer cannot connect: {e}"),
            };
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            let replies = channel
                .basic_consume(
                    DIRECT_REPLY_TO.into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((channel, replies))
        };
        match setup.await {
            Ok((channel, replies)) => Self {
                connection,
                channel,
                replies,
            },
            Err(e) => panic!("raw peer cannot set up: {e}"),
        }
    }

    /// Publishes `body` with `properties` to `queue` through the default exchange and waits
    /// for the broker's confirm.
    pub async fn publish(&self, queue: &str, body: &[u8], properties: BasicProperties) {
        match self
            .confirm("", queue, BasicPublishOptions::default(), body, properties)
            .await
        {
            Ok(c) if c.is_ack() => {}
            other => panic!("raw publish to {queue} not confirmed: {other:?}"),
        }
    }

    /// Publishes `body` with `properties` to `exchange` with `routing_key`, `mandatory`, and
    /// waits for the broker's confirm: `true` when the broker routed it to a queue, `false`
    /// when it came back unroutable.
    pub async fn publish_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> bool {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        match self
            .confirm(exchange, routing_key, options, body, properties)
            .await
        {
            Ok(Confirmation::Ack(returned)) => returned.is_none(),
            other => panic!("raw publish to {exchange}/{routing_key} not confirmed: {other:?}"),
        }
    }

    async fn confirm(
        &self,
        exchange: &str,
        routing_key: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmation, lapin::Error> {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                body,
                properties,
            )
            .await?
            .await
    }

    /// Publishes a call (reply to this peer, correlation id `id`).
    pub async fn call(&self, queue: &str, id: &str, body: &[u8], properties: BasicProperties) {
        let properties = properties
            .with_reply_to(DIRECT_REPLY_TO.into())
            .with_correlation_id(id.into())
            .with_message_id(id.into());
        self.publish(queue, body, properties).await;
    }

    /// The next reply: its correlation id and decoded body. Panics after `timeout`.
    pub async fn next_reply(&mut self, timeout: Duration) -> (String, Reply) {
        let next = tokio::time::timeout(timeout, self.replies.next()).await;
        let delivery = match next {
            Ok(Some(Ok(d))) => d,
            other => panic!("no reply within {timeout:?}: {other:?}"),
        };
        let id = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        match Reply::decode(&delivery.data) {
            Ok(reply) => (id, reply),
            Err(e) => panic!(
                "malformed reply {:?}: {e}",
                String::from_utf8_lossy(&delivery.data)
            ),
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "raw peer done".into()).await;
    }
}
