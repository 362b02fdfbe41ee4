//! What a task handler is given and what it may return.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use warren_shared::{ErrorKind, Task, TaskFailure, TaskId};

/// Runs one task type. Implement it for the task's argument type and register the type with
/// [`Registry::register`](crate::Registry::register).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use warren_shared::Task;
/// use warren_worker::{Handler, TaskContext, TaskError};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// impl Task for Add {
///     const NAME: &'static str = "add";
///     type Output = i64;
/// }
///
/// impl Handler for Add {
///     async fn run(self, _ctx: TaskContext) -> Result<i64, TaskError> {
///         self.a.checked_add(self.b).ok_or_else(|| TaskError::invalid_args("overflow"))
///     }
/// }
/// ```
pub trait Handler: Task {
    /// Runs the task. The future runs on its own tokio task: a panic in it becomes a `panicked`
    /// reply, and it is dropped when the execution time limit passes (after `ctx.cancelled()`
    /// fires, for handlers that want to stop cleanly). Put CPU-heavy work in
    /// `tokio::task::spawn_blocking` so heartbeats and acks keep flowing.
    fn run(self, ctx: TaskContext) -> impl Future<Output = Result<Self::Output, TaskError>> + Send;
}

/// Whether a failed task is worth running again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Retry {
    /// A transient failure (a timeout talking to another service, a 4xx SMTP answer...).
    Retryable,
    /// Running it again cannot succeed.
    Permanent,
}

/// A handler's failure: a message, whether to retry, and the error kind the caller sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    retry: Retry,
    kind: ErrorKind,
    message: String,
}

impl TaskError {
    /// A transient failure; the caller sees `handler_failed`.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            retry: Retry::Retryable,
            kind: ErrorKind::HandlerFailed,
            message: message.to_string(),
        }
    }

    /// A failure that will not go away; the caller sees `handler_failed`.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            retry: Retry::Permanent,
            kind: ErrorKind::HandlerFailed,
            message: message.to_string(),
        }
    }

    /// The arguments decoded but are not acceptable (an invalid address, a negative size...);
    /// permanent; the caller sees `invalid_args`.
    pub fn invalid_args(message: impl fmt::Display) -> Self {
        Self {
            retry: Retry::Permanent,
            kind: ErrorKind::InvalidArgs,
            message: message.to_string(),
        }
    }

    /// A failure of any `kind` (`crashed` and `timeout` for a pool's process, a kind reported
    /// by a runner...), with its retry advice.
    pub fn with_kind(kind: ErrorKind, retry: Retry, message: impl fmt::Display) -> Self {
        Self {
            retry,
            kind,
            message: message.to_string(),
        }
    }

    /// Whether the task is worth running again.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The failure as the caller sees it.
    pub fn to_failure(&self) -> TaskFailure {
        TaskFailure::new(self.kind, self.message.clone())
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for TaskError {}

/// Shared state handed to handlers, one value per type (see
/// [`Registry::with_state`](crate::Registry::with_state)).
#[derive(Default, Clone)]
pub(crate) struct StateMap(HashMap<TypeId, Arc<dyn Any + Send + Sync>>);

impl StateMap {
    pub(crate) fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Arc::new(value));
    }

    fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.0.get(&TypeId::of::<T>()).cloned()?.downcast().ok()
    }
}

/// Everything a handler may want to know about the task it runs.
#[derive(Clone)]
pub struct TaskContext {
    pub(crate) id: TaskId,
    pub(crate) function: Arc<str>,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) redelivered: bool,
    pub(crate) deadline: Option<SystemTime>,
    pub(crate) cancel: CancellationToken,
    pub(crate) state: Arc<StateMap>,
}

impl fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskContext")
            .field("id", &self.id)
            .field("function", &self.function)
            .field("attempt", &self.attempt)
            .field("max_attempts", &self.max_attempts)
            .field("redelivered", &self.redelivered)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl TaskContext {
    /// The task's id (the AMQP `message_id`): use it as an idempotency key.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// The function name the task was sent to.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// 1 for the first attempt.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts this task gets in all; `attempt() == max_attempts()` is the last one.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// True when the broker delivered this message before (a worker died or lost its
    /// connection holding it): the task may already have run, fully or in part.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The caller's deadline, if it set one.
    pub fn deadline(&self) -> Option<SystemTime> {
        self.deadline
    }

    /// Resolves when the worker gives up on this task (time limit or forced shutdown).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Shared state of type `T`, registered with
    /// [`Registry::with_state`](crate::Registry::with_state).
    ///
    /// # Errors
    /// A permanent [`TaskError`] naming the type when none was registered (a wiring mistake).
    pub fn state<T: Send + Sync + 'static>(&self) -> Result<Arc<T>, TaskError> {
        self.state.get::<T>().ok_or_else(|| {
            TaskError::permanent(format!(
                "worker misconfigured: no state of type {} registered",
                std::any::type_name::<T>()
            ))
        })
    }
}
