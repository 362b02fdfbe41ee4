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
use warren_shared::envelope::{PolicyOverrides, TaskEnvelope};
use warren_shared::link::LinkState;
use warren_shared::pool::{self, Publication, publish_confirmed};
use warren_shared::trace::{Operation, SpanTask, TaskSpan};
use warren_shared::{PublishError, TaskId, topology};

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

    pub(crate) async fn ensure_queue(&self, queue: &str) -> Result<(), Error> {
        let cell = {
            let mut declared = self
                .inner
                .declared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let generation = self.inner.link.generation();
            if declared.0 != generation {
                *declared = (generation, HashMap::new());
            }
            declared.1.entry(queue.to_owned()).or_default().clone()
        };
        cell.get_or_try_init(|| async {
            topology::validate_queue_name(queue).map_err(Error::InvalidQueue)?;
            if !self.inner.settings.declare {
                return Ok(());
            }
            let channel = self.channel().await?;
            topology::declare(&channel, queue)
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
        let queue = options
            .queue
            .as_deref()
            .unwrap_or(&self.inner.settings.queue);
        self.ensure_queue(queue).await?;
        // The `send {queue}` span: the task's `traceparent` names it, so the worker's
        // `process` span is its child. Only with a trace to continue, or when exporting.
        let span = TaskSpan::start(
            Operation::Send,
            SpanTask {
                queue,
                task_id: id.as_str(),
                function,
                attempt: None,
            },
            options.trace.as_ref(),
        );
        let trace = span.as_ref().map(|s| s.context().clone());
        if let Some(send) = &trace {
            tracing::debug!(task.id = %id, trace_id = %send.trace_id, span_id = %send.span_id, "send {queue}");
        }
        let properties = TaskEnvelope {
            id: id.clone(),
            function: function.to_owned(),
            reply_to: wants_reply.then(|| self.inner.reply_to.clone()),
            deadline,
            overrides: PolicyOverrides {
                max_attempts: options.max_attempts,
                backoff: options.backoff.clone(),
                time_limit: options.time_limit,
            },
            trace,
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
                exchange: topology::EXCHANGE,
                routing_key: queue,
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
            other => other.map_err(Error::from),
        }
    }
}
