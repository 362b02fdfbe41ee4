//! Function claims, for operators: which queue owns a function, and giving a claim back.
//!
//! A worker claims each function it serves for its queue by declaring the function's exchange
//! (`<functions exchange>.<function>`) with `alternate-exchange = <queue>` and binding it
//! (`warren_shared::topology::claim_function`). The claim outlives the workers: after a
//! worker on queue `test` served the built-ins once and stopped, `test` keeps `echo` for good
//! and a worker of any other queue that serves `echo` refuses to start. [`Client::release_function`]
//! deletes the function's exchange, and with it both of its bindings, so that the next worker
//! to start claims the function for its own queue. It refuses while the owner queue has
//! consumers or ready tasks (they would stop receiving the function's tasks, or wait for a
//! worker that no longer gets new ones), unless forced.
//!
//! AMQP cannot list exchanges; `warren functions` lists the claims from the management API.
//! Here the owner is read the way a refused worker reads it: a declaration of the function's
//! exchange with another owner is refused with the current owner's name
//! ([`topology::claimed_by`]).

use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use serde::Serialize;
use warren_shared::broker::BrokerError;
use warren_shared::topology;

use crate::client::Client;
use crate::dlq::not_found;
use crate::error::Error;

/// Why a function's claim was not released.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReleaseError {
    /// No queue claims the function on this functions exchange: nothing to release.
    #[error("function {function:?} is not claimed on exchange {exchange:?}: no queue serves it")]
    NotClaimed {
        /// The function.
        function: String,
        /// The functions exchange.
        exchange: String,
    },
    /// The queue that owns the function is in use.
    #[error(
        "function {function:?} is served by queue {queue:?}, which has {consumers} consumer(s) \
         and {ready} ready task(s): stop its workers (and let them drain it) first, or pass \
         --force to release it anyway (its tasks then stay in {queue:?}, and new ones go to \
         the next queue that claims the function)"
    )]
    InUse {
        /// The function.
        function: String,
        /// Its owner.
        queue: String,
        /// Consumers of the owner queue.
        consumers: u32,
        /// Tasks ready in the owner queue.
        ready: u32,
    },
    /// The function name cannot be routed by name, so it cannot be claimed either.
    #[error("invalid function name: {0}")]
    InvalidFunction(String),
    /// The broker refused or could not be asked (`configure` permission on the function's
    /// exchange is needed, as a worker has it).
    #[error(transparent)]
    Client(#[from] Error),
}

impl From<lapin::Error> for ReleaseError {
    fn from(e: lapin::Error) -> Self {
        Self::Client(Error::Broker(BrokerError::from(e)))
    }
}

/// A claim that was released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Released {
    /// The function.
    pub function: String,
    /// The queue that owned it, when the broker named one.
    pub queue: String,
    /// Consumers the queue had when it was released (more than 0 only when forced).
    pub consumers: u32,
    /// Tasks ready in the queue then (they stay there).
    pub ready: u32,
}

impl Client {
    /// The queue that owns `function` on this client's functions exchange, or `None` when no
    /// queue claims it.
    ///
    /// Needs `configure` on the function's exchange (a non-passive declaration is how the
    /// broker names the owner; it never changes an existing claim).
    ///
    /// # Errors
    /// [`ReleaseError::InvalidFunction`], or the broker's error.
    pub async fn function_owner(&self, function: &str) -> Result<Option<String>, ReleaseError> {
        topology::validate_function_name(function).map_err(ReleaseError::InvalidFunction)?;
        let exchange = topology::function_exchange(&self.settings().functions_exchange, function);
        // A passive declaration first: the probe below would create a missing exchange.
        let probe = self.own_channel().await?;
        let passive = probe
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(probe).await;
        match passive {
            Ok(()) => {}
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        // A claim for no queue (the empty name, which no work queue has) is refused with the
        // owner's name.
        let probe = self.own_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        let declared = probe
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: true,
                    ..Default::default()
                },
                args,
            )
            .await;
        match declared {
            Err(e) => {
                close(probe).await;
                topology::claimed_by(&e)
                    .map(Some)
                    .ok_or_else(|| ReleaseError::from(e))
            }
            Ok(()) => {
                // Deleted since the passive look, and created by the probe: take it back.
                let _ = probe
                    .exchange_delete(
                        exchange.as_str().into(),
                        ExchangeDeleteOptions {
                            if_unused: true,
                            ..Default::default()
                        },
                    )
                    .await;
                close(probe).await;
                Ok(None)
            }
        }
    }

    /// Releases `function`'s claim: deletes its exchange on this client's functions exchange,
    /// so that it is routed nowhere until a worker claims it again, for whatever queue that
    /// worker consumes. Refused with [`ReleaseError::InUse`] while the owner queue has
    /// consumers or ready tasks, unless `force`.
    ///
    /// # Errors
    /// [`ReleaseError`].
    pub async fn release_function(
        &self,
        function: &str,
        force: bool,
    ) -> Result<Released, ReleaseError> {
        let functions_exchange = self.settings().functions_exchange.clone();
        let Some(queue) = self.function_owner(function).await? else {
            return Err(ReleaseError::NotClaimed {
                function: function.to_owned(),
                exchange: functions_exchange,
            });
        };
        // A claim whose queue was deleted has no consumers and no tasks.
        let (consumers, ready): (u32, u32) = self.queue_in_use(&queue).await?.unwrap_or_default();
        if (consumers > 0 || ready > 0) && !force {
            return Err(ReleaseError::InUse {
                function: function.to_owned(),
                queue,
                consumers,
                ready,
            });
        }
        let channel = self.own_channel().await?;
        let deleted = channel
            .exchange_delete(
                topology::function_exchange(&functions_exchange, function)
                    .as_str()
                    .into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
        close(channel).await;
        deleted?;
        Ok(Released {
            function: function.to_owned(),
            queue,
            consumers,
            ready,
        })
    }

    /// Consumers and ready tasks of `queue`, `None` when it does not exist.
    async fn queue_in_use(&self, queue: &str) -> Result<Option<(u32, u32)>, ReleaseError> {
        let channel = self.own_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(channel).await;
        match declared {
            Ok(q) => Ok(Some((q.consumer_count(), q.message_count()))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A channel of its own: the broker closes the channel of a refused declaration.
    async fn own_channel(&self) -> Result<Channel, ReleaseError> {
        Ok(self.connection().create_channel().await?)
    }
}

async fn close(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}
