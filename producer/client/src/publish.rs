//! Publishing a task: the queue declared once per connection, the `x-warren-*` headers and
//! properties, a bound on publishes in flight, and the confirm awaited.
//!
//! A publish that fails because the connection went (lost, or closed under it while the
//! publish or its confirm was on its way) is not a refusal by the broker: callers resend it on
//! the link's next connection ([`lost_connection`]), or report the connection lost.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use lapin::ErrorKind;
use warren_shared::broker::BrokerError;
use warren_shared::delay::{self, Destination};
use warren_shared::envelope::{PolicyOverrides, TaskEnvelope};
use warren_shared::link::LinkState;
use warren_shared::pool::{self, Publication, publish_confirmed};
use warren_shared::trace::{Operation, SpanTask, TaskSpan};
use warren_shared::{PublishError, TaskFailure, TaskId, topology};

use crate::client::Client;
use crate::error::Error;
use crate::options::CallOptions;

/// After a publish lost with its connection, how long to wait for the link to notice before
/// trying again (it reads its connection's state every 100 ms).
const RESEND_PAUSE: Duration = Duration::from_millis(250);

/// Whether a failed publish failed with its connection or channel (lost, closed, or raced a
/// forced close), worth resending once the link is up; never a refusal by the broker (a nack,
/// a return, a soft channel error such as a missing exchange).
pub(crate) fn lost_connection(error: &Error) -> bool {
    match error {
        Error::ConnectionLost | Error::Publish(PublishError::NoChannel(_)) => true,
        Error::Publish(PublishError::Channel(e)) => match e.kind() {
            ErrorKind::ProtocolError(_) => e.is_amqp_hard_error(),
            ErrorKind::IOError(_)
            | ErrorKind::InvalidConnectionState(_)
            | ErrorKind::InvalidChannelState(..)
            | ErrorKind::InvalidChannel(_)
            | ErrorKind::MissingHeartbeatError => true,
            _ => false,
        },
        _ => false,
    }
}

impl Client {
    /// Waits a little for the link to notice a lost connection, so that the next attempt
    /// waits for the new one instead of failing on the old one again.
    pub(crate) async fn pause_after_lost(&self) {
        let mut state = self.inner.link.subscribe();
        state.borrow_and_update();
        let _ = tokio::time::timeout(RESEND_PAUSE, state.changed()).await;
    }

    /// Whether a failed publish went with its connection ([`lost_connection`]), or was nacked
    /// by a broker that then dropped the connection: a node being stopped refuses what its
    /// queues can no longer take just before it closes its connections, and that refusal is
    /// the node going away, not the task being refused. A nack on a connection that stays up
    /// is a refusal, reported after at most [`RESEND_PAUSE`].
    pub(crate) async fn lost_with_connection(&self, error: &Error) -> bool {
        if lost_connection(error) {
            return true;
        }
        if !matches!(error, Error::Publish(PublishError::Nacked { .. })) {
            return false;
        }
        // `wait_for` looks at the current state first.
        let mut state = self.inner.link.subscribe();
        let departing =
            |state: &LinkState| matches!(state, LinkState::Down { .. } | LinkState::Closed);
        matches!(
            tokio::time::timeout(RESEND_PAUSE, state.wait_for(departing)).await,
            Ok(Ok(_))
        )
    }

    pub(crate) async fn channel(
        &self,
    ) -> Result<deadpool::managed::Object<pool::ChannelManager>, Error> {
        self.inner
            .pool
            .pool()
            .get()
            .await
            .map_err(|e| Error::Publish(PublishError::NoChannel(e.to_string())))
    }

    /// The once-per-connection cell of a declaration named `what`.
    fn declared_cell(&self, what: &str) -> std::sync::Arc<tokio::sync::OnceCell<()>> {
        let mut declared = self
            .inner
            .declared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let generation = self.inner.link.generation();
        if declared.0 != generation {
            *declared = (generation, HashMap::new());
        }
        declared.1.entry(what.to_owned()).or_default().clone()
    }

    pub(crate) async fn ensure_queue(&self, queue: &str) -> Result<(), Error> {
        topology::validate_queue_name(queue).map_err(Error::InvalidQueue)?;
        self.declare_once(format!("queue {queue}"), |channel| async move {
            topology::declare(&channel, queue).await.map(drop)
        })
        .await
    }

    /// Runs `declare` on a pooled channel once per connection for `key`; nothing when the
    /// client declares nothing.
    async fn declare_once<F, Fut>(&self, key: String, declare: F) -> Result<(), Error>
    where
        F: FnOnce(lapin::Channel) -> Fut,
        Fut: Future<Output = Result<(), lapin::Error>>,
    {
        let cell = self.declared_cell(&key);
        cell.get_or_try_init(|| async {
            if !self.inner.settings.declare {
                return Ok(());
            }
            // The pooled channel stays checked out until the declaration is over: a refusal
            // closes it, and no other caller's publish may be on it then.
            let pooled = self.channel().await?;
            declare((*pooled).clone())
                .await
                .map_err(|e| BrokerError::from(e).needing("configure"))?;
            Ok::<(), Error>(())
        })
        .await?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn publish(
        &self,
        function: &str,
        body: &[u8],
        id: &TaskId,
        options: &CallOptions,
        deadline: Option<SystemTime>,
        wants_reply: bool,
    ) -> Result<(), Error> {
        // A task due later waits in the delay levels: whole seconds, rounded up.
        let wait = match options.delay_from_now() {
            d if d.is_zero() => None,
            d => Some(delay::delay_seconds(d).map_err(|e| Error::InvalidDelay(e.to_string()))?),
        };
        let route = match options
            .queue
            .as_deref()
            .or(self.inner.settings.queue.as_deref())
        {
            Some(queue) => {
                self.ensure_queue(queue).await?;
                Route::Queue(queue)
            }
            None => {
                let exchange = self.inner.settings.functions_exchange.as_str();
                topology::validate_function_name(function)
                    .map_err(|e| unknown_function(function, exchange, &e))?;
                self.ensure_functions_exchange(exchange).await?;
                Route::Function(exchange)
            }
        };
        let destination = route.destination(function);
        let delayed_key = match wait {
            Some(seconds) => {
                let function_exchange;
                let to = match route {
                    Route::Queue(queue) => Destination::Queue(queue),
                    Route::Function(exchange) => {
                        function_exchange = topology::function_exchange(exchange, function);
                        Destination::Function(&function_exchange)
                    }
                };
                to.validate().map_err(Error::InvalidDelay)?;
                self.ensure_delay_levels(to).await?;
                Some(delay::routing_key(seconds, to))
            }
            None => None,
        };
        let entry = delay::entry_exchange();
        // The `send {destination}` span (the queue, or the function when routed by name): the
        // task's `traceparent` names it, so the worker's `process` span is its child. Only with
        // a trace to continue, or when exporting.
        let span = TaskSpan::start(
            Operation::Send,
            SpanTask {
                queue: destination,
                task_id: id.as_str(),
                function,
                attempt: None,
            },
            options.trace.as_ref(),
        );
        let trace = span.as_ref().map(|s| s.context().clone());
        if let Some(send) = &trace {
            tracing::debug!(task.id = %id, trace_id = %send.trace_id, span_id = %send.span_id, "send {destination}");
        }
        let properties = TaskEnvelope {
            id: id.clone(),
            function: function.to_owned(),
            reply_to: wants_reply.then(|| self.inner.reply_to.clone()),
            deadline,
            run_at: wait.and(options.run_at),
            overrides: PolicyOverrides {
                max_attempts: options.max_attempts,
                backoff: options.backoff.clone(),
                time_limit: options.time_limit,
            },
            trace,
            origin: options.origin.clone(),
        }
        .properties();
        // Bounded publishes in flight: past the limit, callers wait here.
        let _permit = self
            .inner
            .publishing
            .acquire()
            .await
            .map_err(|_| Error::Unavailable("client closed".into()))?;
        let generation = self.inner.link.generation();
        let published = publish_confirmed(
            &self.inner.pool.pool(),
            Publication {
                exchange: if delayed_key.is_some() {
                    &entry
                } else {
                    route.exchange()
                },
                routing_key: delayed_key.as_deref().unwrap_or(destination),
                body,
                properties,
                mandatory: true,
            },
            self.inner.settings.publish_timeout,
        )
        .await;
        if let Some(span) = span {
            span.end(published.as_ref().err().map(ToString::to_string));
        }
        let link = &self.inner.link;
        match published {
            // A broker that blocks publishers never confirms: say so rather than "timeout".
            Err(PublishError::Timeout(_)) if matches!(link.state(), LinkState::Blocked { .. }) => {
                Err(Error::Unavailable(link.state().to_string()))
            }
            // The connection went while the confirm was awaited: the task may or may not be
            // in the broker's hands, which is what "connection lost" says.
            Err(PublishError::Timeout(_))
                if !link.state().is_up() || link.generation() != generation =>
            {
                Err(Error::ConnectionLost)
            }
            // Nothing is bound to the function's name: no worker has ever served it (or its
            // queue was deleted). Say so now rather than let the caller wait for a reply.
            Err(PublishError::Unroutable { .. }) if matches!(route, Route::Function(_)) => {
                let exchange = route.exchange();
                Err(unknown_function(function, exchange, "no queue serves it"))
            }
            other => other.map_err(Error::from),
        }
    }

    /// Declares the delay levels, and binds a destination queue to their delivery exchange,
    /// once per connection (unless the client declares nothing: then the workers have).
    async fn ensure_delay_levels(&self, to: Destination<'_>) -> Result<(), Error> {
        self.declare_once("delay levels".to_owned(), |channel| async move {
            delay::declare_levels(&channel).await
        })
        .await?;
        if let Destination::Queue(queue) = to {
            self.declare_once(format!("delay binding {queue}"), |channel| async move {
                delay::bind_queue(&channel, queue).await
            })
            .await?;
        }
        Ok(())
    }

    /// Declares the functions exchange once per connection (unless the client declares
    /// nothing), so that an unserved function comes back unroutable instead of closing the
    /// channel on a missing exchange.
    async fn ensure_functions_exchange(&self, exchange: &str) -> Result<(), Error> {
        self.declare_once(format!("exchange {exchange}"), |channel| async move {
            topology::declare_functions_exchange(&channel, exchange).await
        })
        .await
    }
}

/// How one task is routed.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// To this queue by name (routing key = queue, exchange `warren`).
    Queue(&'a str),
    /// By function name through this exchange.
    Function(&'a str),
}

impl<'a> Route<'a> {
    fn exchange(self) -> &'a str {
        match self {
            Self::Queue(_) => topology::EXCHANGE,
            Self::Function(exchange) => exchange,
        }
    }

    /// The routing key: the queue, or the function.
    fn destination(self, function: &'a str) -> &'a str {
        match self {
            Self::Queue(queue) => queue,
            Self::Function(_) => function,
        }
    }
}

/// The typed error of a function that no queue serves.
fn unknown_function(function: &str, exchange: &str, why: &str) -> Error {
    let shown: String = function.chars().take(100).collect();
    Error::Failed(TaskFailure::new(
        warren_shared::ErrorKind::UnknownFunction,
        format!("no worker serves function {shown:?} (exchange {exchange:?}): {why}"),
    ))
}
