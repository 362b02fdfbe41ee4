//! Judging one delivery: decode it, check it, run its handler in isolation, and say what the
//! [`Outcome`] is. Nothing here talks to the broker; `outcome.rs` acts on the verdict.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_shared::protocol::{self, headers};
use warren_shared::{ErrorKind, Reply, Request, TaskFailure};

use crate::handler::{StateMap, TaskContext};
use crate::outcome::{Envelope, Outcome};
use crate::registry::{HandlerFailure, Registry};

/// What the executor needs besides the delivery.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    pub(crate) registry: Registry,
    pub(crate) state: Arc<StateMap>,
    pub(crate) time_limit: Duration,
    pub(crate) max_body_bytes: usize,
    /// Cancelled when the worker gives up on running tasks (forced shutdown).
    pub(crate) abort: CancellationToken,
}

impl std::fmt::Debug for StateMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateMap")
    }
}

impl Executor {
    /// Judges `delivery`; the returned span covers the task's whole life in the logs.
    pub(crate) async fn execute(&self, delivery: &Delivery, envelope: &Envelope) -> Outcome {
        let h = delivery.properties.headers().as_ref();
        let attempt = protocol::header_int(h, headers::ATTEMPT)
            .and_then(|a| u32::try_from(a).ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1);

        if let Some(version) = protocol::header_int(h, headers::PROTOCOL)
            && version != protocol::PROTOCOL_VERSION
        {
            return Outcome::DeadLetter(TaskFailure::new(
                ErrorKind::UnsupportedVersion,
                format!(
                    "protocol version {version} is not supported; this worker speaks {}",
                    protocol::PROTOCOL_VERSION
                ),
            ));
        }
        if delivery.data.len() > self.max_body_bytes {
            return Outcome::DeadLetter(TaskFailure::new(
                ErrorKind::TooLarge,
                format!(
                    "body is {} bytes; this worker accepts at most {}",
                    delivery.data.len(),
                    self.max_body_bytes
                ),
            ));
        }
        let request = match Request::decode(&delivery.data) {
            Ok(r) => r,
            Err(failure) => return Outcome::DeadLetter(failure),
        };
        let deadline = protocol::header_int(h, headers::DEADLINE).map(protocol::from_epoch_millis);
        let span = tracing::info_span!(
            "task",
            task.id = %envelope.id,
            task.function = %request.function,
            attempt,
        );
        async {
            if let Some(deadline) = deadline
                && deadline <= SystemTime::now()
            {
                tracing::info!("deadline passed before the task started; not running it");
                return Outcome::Reply(Reply::Err(TaskFailure::new(
                    ErrorKind::Expired,
                    "the task's deadline passed before a worker could start it",
                )));
            }
            let Some(handler) = self.registry.get(&request.function) else {
                return Outcome::DeadLetter(TaskFailure::new(
                    ErrorKind::UnknownFunction,
                    format!(
                        "no handler for {:?} on this worker (it serves {})",
                        request.function,
                        self.registry.functions().join(", ")
                    ),
                ));
            };
            let cancel = self.abort.child_token();
            let ctx = TaskContext {
                id: envelope.id.clone(),
                function: request.function.as_str().into(),
                attempt,
                redelivered: delivery.redelivered,
                deadline,
                cancel: cancel.clone(),
                state: self.state.clone(),
            };
            let started = std::time::Instant::now();
            // Its own tokio task: a panic stays there and comes back as a JoinError.
            let mut run = tokio::spawn(handler(request.args, ctx).in_current_span());
            let outcome = tokio::select! {
                joined = &mut run => match joined {
                    Ok(Ok(value)) => Outcome::Reply(Reply::Ok(value)),
                    Ok(Err(HandlerFailure::InvalidArgs(m))) => {
                        Outcome::DeadLetter(TaskFailure::new(ErrorKind::InvalidArgs, m))
                    }
                    Ok(Err(failure)) => Outcome::Reply(Reply::Err(failure.to_failure())),
                    Err(e) if e.is_panic() => Outcome::Reply(Reply::Err(TaskFailure::new(
                        ErrorKind::Panicked,
                        format!("handler panicked: {}", panic_message(e.into_panic())),
                    ))),
                    Err(e) => Outcome::Reply(Reply::Err(TaskFailure::new(
                        ErrorKind::HandlerFailed,
                        format!("handler was cancelled: {e}"),
                    ))),
                },
                () = self.abort.cancelled() => {
                    run.abort();
                    tracing::info!("worker stopping; handing the unfinished task back");
                    return Outcome::HandBack;
                }
                () = tokio::time::sleep(self.time_limit) => {
                    cancel.cancel();
                    run.abort();
                    Outcome::Reply(Reply::Err(TaskFailure::new(
                        ErrorKind::Timeout,
                        format!("handler ran past its time limit of {:?}", self.time_limit),
                    )))
                }
            };
            match &outcome {
                Outcome::Reply(Reply::Ok(_)) => {
                    tracing::debug!(
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "task done"
                    );
                }
                Outcome::Reply(Reply::Err(f)) | Outcome::DeadLetter(f) => {
                    tracing::warn!(kind = %f.kind, error = %f.message, "task failed");
                }
                Outcome::HandBack => {}
            }
            outcome
        }
        .instrument(span)
        .await
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(non-string panic payload)".to_owned(),
        },
    }
}
