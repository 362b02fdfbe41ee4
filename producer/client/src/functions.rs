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
    /// The broker named the owner only in part: its error texts are cut at 255 bytes (the name
    /// then ends in `...`), or it named none (`?`). Whether that queue is in use cannot be
    /// checked, so the claim is released only when forced.
    #[error(
        "function {function:?} is claimed by a queue the broker names only as {reported:?} \
         (its error texts are cut at 255 bytes), so whether that queue is in use cannot be \
         checked: make the management API reachable (--management-url), which names the queue \
         in full, or pass --force to release the claim anyway"
    )]
    OwnerUnknown {
        /// The function.
        function: String,
        /// What the broker named.
        reported: String,
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
    /// The queue that owned it; only when forced, it may be the broker's partial name (ending
    /// in `...`, or `?`: see [`ReleaseError::OwnerUnknown`]).
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
        match self.exchange_exists(&exchange).await? {
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
            // The broker checks `read` on the exchange and `write` on its alternate exchange
            // (`amq.default` here) only when it creates the exchange, so an operator
            // (`configure` on the functions' exchanges, no more) is refused when the exchange
            // was deleted since the passive look; nothing was created then. A refused
            // `configure` leaves the exchange in place: another passive look tells them apart.
            Err(e) if access_refused(&e) => {
                close(probe).await;
                match self.exchange_exists(&exchange).await? {
                    Err(gone) if not_found(&gone) => Ok(None),
                    _ => Err(e.into()),
                }
            }
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
    /// The owner is the broker's answer to [`Client::function_owner`], which names a long queue
    /// only in part: such a claim is refused with [`ReleaseError::OwnerUnknown`] unless `force`.
    /// [`Client::release_function_owned_by`] takes the owner's full name from elsewhere.
    ///
    /// # Errors
    /// [`ReleaseError`].
    pub async fn release_function(
        &self,
        function: &str,
        force: bool,
    ) -> Result<Released, ReleaseError> {
        self.release(function, None, force).await
    }

    /// [`Client::release_function`], knowing the owner's full name `listed` (the management
    /// API's `alternate-exchange` argument of the function's exchange). The broker's answer
    /// still decides: `listed` is used only where that answer is cut and agrees with it.
    ///
    /// # Errors
    /// [`ReleaseError`].
    pub async fn release_function_owned_by(
        &self,
        function: &str,
        listed: &str,
        force: bool,
    ) -> Result<Released, ReleaseError> {
        self.release(function, Some(listed), force).await
    }

    async fn release(
        &self,
        function: &str,
        listed: Option<&str>,
        force: bool,
    ) -> Result<Released, ReleaseError> {
        let functions_exchange = self.settings().functions_exchange.clone();
        let Some(reported) = self.function_owner(function).await? else {
            return Err(ReleaseError::NotClaimed {
                function: function.to_owned(),
                exchange: functions_exchange,
            });
        };
        let (queue, consumers, ready) = match whole_owner(&reported, listed) {
            Some(queue) => {
                // A claim whose queue was deleted has no consumers and no tasks.
                let (consumers, ready) = self.queue_in_use(&queue).await?.unwrap_or_default();
                (queue, consumers, ready)
            }
            None if force => (reported, 0, 0),
            None => {
                return Err(ReleaseError::OwnerUnknown {
                    function: function.to_owned(),
                    reported,
                });
            }
        };
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

    /// A passive look at fanout `exchange` on a channel of its own: the broker's answer
    /// (`NOT_FOUND` when it does not exist), or an error opening the channel.
    async fn exchange_exists(
        &self,
        exchange: &str,
    ) -> Result<Result<(), lapin::Error>, ReleaseError> {
        let probe = self.own_channel().await?;
        let passive = probe
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        close(probe).await;
        Ok(passive)
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

/// Whether the broker refused `error`'s operation for lack of a permission.
fn access_refused(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED)
            )
    )
}

/// The owner's full name: the broker's `reported` one when it is whole, else `listed` when
/// that agrees with what the broker reported of it; `None` when the owner is unknown.
fn whole_owner(reported: &str, listed: Option<&str>) -> Option<String> {
    let cut = reported.strip_suffix("...");
    if reported != topology::UNNAMED_OWNER && cut.is_none() {
        return Some(reported.to_owned());
    }
    let listed = listed.filter(|l| !l.is_empty())?;
    let agrees = cut.is_none_or(|start| listed.starts_with(start) && listed != start);
    agrees.then(|| listed.to_owned())
}

async fn close(channel: Channel) {
    if channel.status().connected() {
        let _ = channel.close(200, "done".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_or_missing_owner_name_is_unknown_unless_listed_in_full() {
        let long = format!("deployment.{}.work", "q".repeat(200));
        // AMQP cuts the broker's error text: the owner's name ends in `...`.
        let reported = format!("{}...", &long[..100]);
        assert_eq!(whole_owner(&reported, None), None);
        assert_eq!(whole_owner(&reported, Some(&long)), Some(long.clone()));
        // A listed name that does not start with what the broker reported is another queue.
        assert_eq!(whole_owner(&reported, Some("other")), None);
        assert_eq!(whole_owner(&reported, Some("")), None);
        // Cut before the name, or no name at all.
        assert_eq!(whole_owner("?", None), None);
        assert_eq!(whole_owner("?", Some(&long)), Some(long.clone()));
        // A whole name is the broker's, whatever was listed (the broker's answer is current).
        assert_eq!(whole_owner("test", None), Some("test".to_owned()));
        assert_eq!(whole_owner("test", Some("older")), Some("test".to_owned()));
    }
}
