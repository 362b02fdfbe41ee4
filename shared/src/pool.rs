//! A pool of confirm-mode channels over one long-lived publishing connection.
//!
//! `deadpool` hands out channels, creates them on demand up to a fixed size and drops closed ones
//! on checkout (a channel closed by a soft error stays closed; lapin 4 no longer recovers it).
//! A publisher checks a channel out only to pick an open one and returns it at once: lapin
//! channels take concurrent publishes, so a few channels carry thousands of publishes (and their
//! awaited confirms) in flight.
//!
//! [`publish_confirmed`] is the only way Warren publishes: it waits for the broker's confirm and
//! turns a `basic.nack`, a `basic.return` (mandatory and unroutable) or silence into an error.
//! A channel that nacked a publish is closed, so the pool opens a fresh one: on RabbitMQ 3.10 a
//! channel that first published to a quorum queue while its leader was being elected (a node
//! of the cluster just died) keeps the dead leader and nacks every later publish to that queue,
//! for as long as it lives; a new channel finds the new leader.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

use crate::link::Link;

/// A boxed future, as returned by a [`ChannelSetup`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Runs once on every new pooled channel, after `confirm.select` (e.g. to start a reply consumer).
pub type ChannelSetup = Arc<dyn Fn(Channel) -> BoxFuture<Result<(), lapin::Error>> + Send + Sync>;

/// Creates and recycles confirm-mode channels on one connection.
pub struct ChannelManager {
    connection: Arc<Connection>,
    setup: Option<ChannelSetup>,
}

impl std::fmt::Debug for ChannelManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelManager")
            .field("setup", &self.setup.is_some())
            .finish()
    }
}

impl managed::Manager for ChannelManager {
    type Type = Channel;
    type Error = lapin::Error;

    async fn create(&self) -> Result<Channel, lapin::Error> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        if let Some(setup) = &self.setup {
            setup(channel.clone()).await?;
        }
        Ok(channel)
    }

    async fn recycle(&self, channel: &mut Channel, _: &Metrics) -> RecycleResult<lapin::Error> {
        if channel.status().connected() {
            Ok(())
        } else {
            Err(RecycleError::message("channel is no longer open"))
        }
    }
}

/// A pool of confirm-mode channels; see the module docs.
pub type ChannelPool = managed::Pool<ChannelManager>;

/// Builds a pool of at most `size` channels over `connection`, each prepared by `setup`.
///
/// Waiting for, creating and recycling a channel are bounded by `timeout`.
pub fn channel_pool(
    connection: Arc<Connection>,
    size: usize,
    timeout: Duration,
    setup: Option<ChannelSetup>,
) -> ChannelPool {
    let manager = ChannelManager { connection, setup };
    managed::Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(deadpool::Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .build()
        // `build` fails only when a timeout is set without a runtime; both are set above.
        .unwrap_or_else(|e| unreachable!("deadpool configuration is static: {e}"))
}

/// A channel pool that follows a [`Link`]: one [`ChannelPool`] per connection generation,
/// replaced (and the old one dropped with its channels) when the link reconnects.
pub struct LinkPool {
    link: Link,
    size: usize,
    timeout: Duration,
    setup: Option<ChannelSetup>,
    current: std::sync::Mutex<(u64, ChannelPool)>,
}

impl std::fmt::Debug for LinkPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPool")
            .field("size", &self.size)
            .field("generation", &self.link.generation())
            .finish_non_exhaustive()
    }
}

impl LinkPool {
    /// A pool of at most `size` channels on the link's current connection, each prepared by
    /// `setup`; see [`channel_pool`].
    pub fn new(link: Link, size: usize, timeout: Duration, setup: Option<ChannelSetup>) -> Self {
        let generation = link.generation();
        let pool = channel_pool(link.connection(), size, timeout, setup.clone());
        Self {
            link,
            size,
            timeout,
            setup,
            current: std::sync::Mutex::new((generation, pool)),
        }
    }

    /// The pool of the link's current connection.
    pub fn pool(&self) -> ChannelPool {
        let generation = self.link.generation();
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 != generation {
            let pool = channel_pool(
                self.link.connection(),
                self.size,
                self.timeout,
                self.setup.clone(),
            );
            let old = std::mem::replace(&mut *current, (generation, pool));
            old.1.close();
        }
        current.1.clone()
    }

    /// The link the pool follows.
    pub fn link(&self) -> &Link {
        &self.link
    }
}

/// A pool of one channel over `pool`'s connection, for a publish that must not share its
/// channel with anything else (to tell whether the broker refuses this very message). Close it
/// with [`close_isolated`].
pub fn isolated(pool: &ChannelPool, timeout: Duration) -> ChannelPool {
    let connection = pool.manager().connection.clone();
    channel_pool(connection, 1, timeout, None)
}

/// Closes the channel of a pool made by [`isolated`], if it opened one.
pub async fn close_isolated(pool: ChannelPool) {
    if pool.status().size > 0
        && let Ok(channel) = pool.get().await
        && channel.status().connected()
    {
        let _ = channel.close(200, "isolated publish done".into()).await;
    }
}

/// One message to publish.
#[derive(Debug)]
pub struct Publication<'a> {
    /// Exchange name (`""` is the default exchange).
    pub exchange: &'a str,
    /// Routing key (the queue name for [`crate::topology::EXCHANGE`] and the default exchange).
    pub routing_key: &'a str,
    /// Message body.
    pub body: &'a [u8],
    /// AMQP properties and headers.
    pub properties: BasicProperties,
    /// Ask the broker to return the message when no queue takes it.
    pub mandatory: bool,
}

/// Why a publish did not end in the broker's hands. Cloned when one message carried the
/// publishes of several callers (packed task events): each is told the same failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// No open channel could be had (the connection is closed or recovering).
    #[error("no channel to the broker: {0}")]
    NoChannel(String),
    /// The channel failed while publishing or before confirming.
    #[error("publish failed: {0}")]
    Channel(#[from] lapin::Error),
    /// The broker refused the message (`basic.nack`), e.g. a queue at its length limit.
    #[error("the broker refused the message (nack) for {exchange:?}/{routing_key:?}")]
    Nacked {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// No queue is bound for the routing key (`basic.return`, e.g. 312 NO_ROUTE).
    #[error(
        "no queue takes {exchange:?}/{routing_key:?} ({code} {reason}); is the queue declared?"
    )]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
        /// AMQP reply code.
        code: u16,
        /// AMQP reply text.
        reason: String,
    },
    /// The broker did not confirm in time.
    #[error("the broker did not confirm the publish within {0:?}")]
    Timeout(Duration),
}

/// Closes `channel` in the background (the pool drops closed channels on checkout). Publishes
/// still in flight on it fail as on a closed channel, which publishers resend or hand back.
fn retire(channel: Channel) {
    if channel.status().connected() {
        tokio::spawn(async move {
            tracing::debug!(
                channel = channel.id(),
                "the broker nacked a publish; replacing the channel"
            );
            let _ = channel
                .close(200, "nacked a publish; replaced".into())
                .await;
        });
    }
}

/// Publishes and waits for the broker's confirm, within `timeout` for the whole operation.
///
/// # Errors
/// See [`PublishError`]: anything but a plain confirm is an error.
pub async fn publish_confirmed(
    pool: &ChannelPool,
    publication: Publication<'_>,
    timeout: Duration,
) -> Result<(), PublishError> {
    let started = std::time::Instant::now();
    let (exchange, routing_key) = (publication.exchange, publication.routing_key);
    let result = tokio::time::timeout(timeout, async {
        let (channel, confirm) = send(pool, publication).await?;
        confirmed(channel, confirm, exchange, routing_key).await
    })
    .await
    .unwrap_or(Err(PublishError::Timeout(timeout)));
    crate::metrics::publish_confirmed(started, &result);
    result
}

/// A message handed to the broker whose confirm is still to come: see [`publish_unconfirmed`].
#[must_use = "a publish is not done until it is confirmed"]
pub struct Unconfirmed {
    channel: Channel,
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
    started: std::time::Instant,
    timeout: Duration,
}

impl std::fmt::Debug for Unconfirmed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unconfirmed")
            .field("channel", &self.channel.id())
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl Unconfirmed {
    /// Whether the channel it was sent on is still open: on a closed one (a reconnect since)
    /// its confirm never comes, and it is to be sent again.
    pub fn channel_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Waits for the broker's confirm, at most the publish's `timeout` from now (a confirm that
    /// came meanwhile is taken at once, however long ago the message was sent).
    ///
    /// # Errors
    /// As [`publish_confirmed`].
    pub async fn confirmed(self) -> Result<(), PublishError> {
        let Self {
            channel,
            confirm,
            exchange,
            routing_key,
            started,
            timeout,
        } = self;
        let result = tokio::time::timeout(
            timeout,
            confirmed(channel, confirm, &exchange, &routing_key),
        )
        .await
        .unwrap_or(Err(PublishError::Timeout(timeout)));
        crate::metrics::publish_confirmed(started, &result);
        result
    }
}

/// Publishes without waiting for the confirm: returns once the message is on its way on one
/// channel of `pool`, so that many publishes can be in flight while each is confirmed later
/// ([`Unconfirmed::confirmed`], which treats a nack or a return as [`publish_confirmed`] does).
/// Messages published one after the other on a pool of one channel keep their order.
/// `timeout` bounds the send, and then the wait for the confirm.
///
/// # Errors
/// [`PublishError::NoChannel`], [`PublishError::Channel`] or [`PublishError::Timeout`] when the
/// message could not be sent.
pub async fn publish_unconfirmed(
    pool: &ChannelPool,
    publication: Publication<'_>,
    timeout: Duration,
) -> Result<Unconfirmed, PublishError> {
    let started = std::time::Instant::now();
    let (exchange, routing_key) = (publication.exchange, publication.routing_key);
    let sent = tokio::time::timeout(timeout, send(pool, publication))
        .await
        .unwrap_or(Err(PublishError::Timeout(timeout)));
    match sent {
        Ok((channel, confirm)) => Ok(Unconfirmed {
            channel,
            confirm,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            started,
            timeout,
        }),
        Err(e) => {
            crate::metrics::publish_failed(&e);
            Err(e)
        }
    }
}

/// Sends `p` on an open channel of `pool`; gives the channel and its confirm to come.
async fn send(
    pool: &ChannelPool,
    p: Publication<'_>,
) -> Result<(Channel, PublisherConfirm), PublishError> {
    // Checked out only to pick an open channel: lapin channels take concurrent publishes, and
    // holding the pool object while lapin's I/O thread writes the frame would let at most
    // `size` publishes be on their way at once.
    let channel = Channel::clone(
        &*pool
            .get()
            .await
            .map_err(|e| PublishError::NoChannel(e.to_string()))?,
    );
    let confirm = channel
        .basic_publish(
            p.exchange.into(),
            p.routing_key.into(),
            BasicPublishOptions {
                mandatory: p.mandatory,
                immediate: false,
            },
            p.body,
            p.properties,
        )
        .await?;
    Ok((channel, confirm))
}

/// Waits for the confirm of a message sent on `channel` to `exchange`/`routing_key`.
async fn confirmed(
    channel: Channel,
    confirm: PublisherConfirm,
    exchange: &str,
    routing_key: &str,
) -> Result<(), PublishError> {
    let confirm = confirm.await?;
    if matches!(confirm, Confirmation::Nack(None)) {
        retire(channel);
    }
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                code: returned.reply_code,
                reason: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::NotRequested => {
            // Pooled channels are always in confirm mode; treat the impossible as a failure
            // rather than as a silent success.
            Err(PublishError::NoChannel(
                "channel is not in confirm mode".into(),
            ))
        }
    }
}
