//! The consumers that hand replies to waiting calls.
//!
//! [`ReplyMode::Direct`](crate::ReplyMode::Direct): every pooled channel consumes
//! `amq.rabbitmq.reply-to` (direct reply-to needs requests and the reply consumer on the same
//! channel); the pool is rebuilt on each new connection, and its consumers with it.
//! [`ReplyMode::Queue`](crate::ReplyMode::Queue): one consumer on the client's own reply queue,
//! started again on each new connection of the client's link.

use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::watch;
use warren_shared::broker::{BrokerError, Reconnect};
use warren_shared::envelope;
use warren_shared::link::{Generation, Link};
use warren_shared::protocol::DIRECT_REPLY_TO;

use crate::pending::Pending;

/// Starts the direct reply-to consumer of a new pooled channel and its dispatcher.
pub(crate) async fn start_reply_consumer(
    channel: Channel,
    pending: Arc<Pending>,
) -> Result<(), lapin::Error> {
    let mut replies = channel
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
    tokio::spawn(async move {
        while let Some(next) = replies.next().await {
            let mut delivery = match next {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "reply consumer failed");
                    break;
                }
            };
            let Some(correlation_id) = envelope::reply_correlation_id(&delivery.properties) else {
                tracing::warn!("reply without correlation_id ignored");
                continue;
            };
            // Decoded by the call, into what it returns.
            let body = std::mem::take(&mut delivery.data);
            pending.deliver(
                correlation_id,
                envelope::is_progress(&delivery.properties),
                body,
            );
        }
        tracing::debug!(channel = channel.id(), "reply consumer ended");
    });
    Ok(())
}

/// Declares the reply queue on `connection` and consumes it.
///
/// The queue is durable (replies are persistent, so they survive a broker restart), not
/// exclusive (an exclusive queue dies with its connection), and expires once unused.
async fn consume_reply_queue(
    connection: &Connection,
    queue: &str,
    expires: Duration,
) -> Result<lapin::Consumer, lapin::Error> {
    let channel = connection.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
    );
    channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), args)
        .await?;
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Declares this client's reply queue, consumes it, and keeps consuming it on every new
/// connection of `link`, for as long as the link lives.
pub(crate) async fn start_reply_queue(
    link: &Link,
    queue: &str,
    expires: Duration,
    pending: Arc<Pending>,
) -> Result<(), BrokerError> {
    let consumer = consume_reply_queue(&link.connection(), queue, expires).await?;
    let mut generations = link.generations();
    generations.borrow_and_update();
    tokio::spawn(follow_reply_queue(
        generations,
        queue.to_owned(),
        expires,
        pending,
        consumer,
    ));
    Ok(())
}

async fn follow_reply_queue(
    mut generations: watch::Receiver<Generation>,
    queue: String,
    expires: Duration,
    pending: Arc<Pending>,
    mut replies: lapin::Consumer,
) {
    loop {
        loop {
            let next = tokio::select! {
                changed = generations.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                next = replies.next() => next,
            };
            let Some(Ok(mut delivery)) = next else { break };
            if let Some(correlation_id) = envelope::reply_correlation_id(&delivery.properties) {
                let body = std::mem::take(&mut delivery.data);
                pending.deliver(
                    correlation_id,
                    envelope::is_progress(&delivery.properties),
                    body,
                );
            }
            // Acked once handed over (or found to be for nobody): a reply is read once.
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        // A new connection, or the consumer ended: consume again on the current connection.
        let mut delays = Reconnect::default().delays();
        let mut attempt = 0;
        replies = loop {
            let connection = generations.borrow_and_update().connection.clone();
            let failed = if connection.status().connected() {
                match consume_reply_queue(&connection, &queue, expires).await {
                    Ok(consumer) => break consumer,
                    Err(e) => Some(e),
                }
            } else {
                None
            };
            drop(connection);
            attempt += 1;
            if let Some(e) = failed
                && attempt == 1
            {
                tracing::warn!(error = %e, queue = %queue, "reply consumer lost; restarting it");
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                changed = generations.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(delay) => {}
            }
        };
    }
}
