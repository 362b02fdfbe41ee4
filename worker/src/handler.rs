//! What a task handler is, what it is given and what it may return.
//!
//! A handler is registered *for* a task type, so the type may live in another crate (a shared
//! `myapp-tasks` crate that producers use too): an `async fn` or closure
//! ([`Registry::register_fn`](crate::Registry::register_fn)), or a struct that owns its typed
//! state and implements [`Handler<T>`] ([`Registry::register_handler`](crate::Registry::register_handler)).
//! A task type of the worker's own crate may also run itself ([`Run`]).

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use warren_shared::events::Progress;
use warren_shared::{ErrorKind, Policy, Task, TaskFailure, TaskId};

use crate::progress::Reporter;

/// Runs tasks of type `T`. Implement it for a struct that owns what the handler needs (a
/// connection pool, a mailer, settings): the state is typed and in place when the registry is
/// built, so a wiring mistake does not compile instead of failing at run time.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use warren_shared::Task;
/// use warren_worker::{Handler, Registry, TaskContext, TaskError};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add { a: i64, b: i64 }
///
/// impl Task for Add {
///     const NAME: &'static str = "add";
///     type Output = i64;
/// }
///
/// /// Adds, refusing results above its limit.
/// struct Adder { limit: i64 }
///
/// impl Handler<Add> for Adder {
///     async fn run(&self, args: Add, _ctx: TaskContext) -> Result<i64, TaskError> {
///         let sum = args.a.checked_add(args.b).ok_or_else(|| TaskError::invalid_args("overflow"))?;
///         if sum > self.limit {
///             return Err(TaskError::invalid_args(format!("{sum} is above {}", self.limit)));
///         }
///         Ok(sum)
///     }
/// }
///
/// let registry = Registry::new().register_handler::<Add>(Adder { limit: 100 });
/// # assert_eq!(registry.functions(), ["add"]);
/// ```
pub trait Handler<T: Task>: Send + Sync + 'static {
    /// Runs one task. The future runs on its own tokio task: a panic in it becomes a `panicked`
    /// reply, and it is dropped when the execution time limit passes (after `ctx.cancelled()`
    /// fires, for handlers that want to stop cleanly). Put CPU-heavy work in
    /// `tokio::task::spawn_blocking` so heartbeats and acks keep flowing.
    fn run(
        &self,
        args: T,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<T::Output, TaskError>> + Send;
}

/// A handler made of an `async fn` or closure `(args, ctx) -> Result<Output, TaskError>`; see
/// [`handler_fn`] and [`Registry::register_fn`](crate::Registry::register_fn).
#[derive(Clone, Copy)]
pub struct HandlerFn<F>(F);

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn")
    }
}

/// Makes a [`Handler`] of a function, for
/// [`Registry::register_handler_with`](crate::Registry::register_handler_with) (a function
/// with a policy of its own).
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn(f)
}

impl<T, F, Fut> Handler<T> for HandlerFn<F>
where
    T: Task,
    F: Fn(T, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T::Output, TaskError>> + Send + 'static,
{
    fn run(
        &self,
        args: T,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<T::Output, TaskError>> + Send {
        (self.0)(args, ctx)
    }
}

/// A task type that runs itself, for task types defined in the worker's own crate:
/// `impl Run for Add { async fn run(self, ctx) ... }` and
/// [`Registry::register::<Add>()`](crate::Registry::register). A type from another crate
/// cannot implement it (the orphan rule): register a [`Handler`] for it instead.
pub trait Run: Task {
    /// Runs the task; as [`Handler::run`].
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

/// A handler's failure: a message, whether to retry, the error kind the caller sees, and the
/// error that caused it.
///
/// Any `std::error::Error` converts into a *retryable* `TaskError`, so handlers use `?` on I/O,
/// HTTP, database or JSON errors; say `permanent` explicitly ([`TaskError::permanent`],
/// [`TaskError::into_permanent`], or [`ResultExt::permanent`] on a `Result`). Like
/// `anyhow::Error`, and for the same reason (that blanket conversion), `TaskError` does not
/// implement `std::error::Error` itself; [`TaskError::source`] gives the cause.
///
/// ```
/// use warren_worker::{ResultExt, Retry, TaskError};
///
/// fn read(path: &str) -> Result<String, TaskError> {
///     Ok(std::fs::read_to_string(path)?) // retryable: the file may appear
/// }
/// fn parse(text: &str) -> Result<u32, TaskError> {
///     text.trim().parse::<u32>().permanent() // the same text never parses
/// }
/// assert_eq!(read("/no/such/file").unwrap_err().retry(), Retry::Retryable);
/// assert_eq!(parse("x").unwrap_err().retry(), Retry::Permanent);
/// ```
#[derive(Clone)]
pub struct TaskError {
    retry: Retry,
    kind: ErrorKind,
    message: String,
    source: Option<Arc<dyn StdError + Send + Sync + 'static>>,
}

impl TaskError {
    /// A transient failure; the caller sees `handler_failed`.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::new(Retry::Retryable, ErrorKind::HandlerFailed, message)
    }

    /// A failure that will not go away; the caller sees `handler_failed`.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::new(Retry::Permanent, ErrorKind::HandlerFailed, message)
    }

    /// The arguments decoded but are not acceptable (an invalid address, a negative size...);
    /// permanent; the caller sees `invalid_args`.
    pub fn invalid_args(message: impl fmt::Display) -> Self {
        Self::new(Retry::Permanent, ErrorKind::InvalidArgs, message)
    }

    fn new(retry: Retry, kind: ErrorKind, message: impl fmt::Display) -> Self {
        Self {
            retry,
            kind,
            message: message.to_string(),
            source: None,
        }
    }

    /// Keeps `source` as the cause of this error (its text is added to the message).
    #[must_use]
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.message = format!("{}: {}", self.message, chain(&source));
        self.source = Some(Arc::new(source));
        self
    }

    /// The same failure, marked permanent (no more attempts).
    #[must_use]
    pub fn into_permanent(mut self) -> Self {
        self.retry = Retry::Permanent;
        self
    }

    /// A failure of any `kind` (`crashed` and `timeout` for a pool's process, a kind reported
    /// by a runner...), with its retry advice.
    pub fn with_kind(kind: ErrorKind, retry: Retry, message: impl fmt::Display) -> Self {
        Self::new(retry, kind, message)
    }

    /// Whether the task is worth running again.
    pub fn retry(&self) -> Retry {
        self.retry
    }

    /// The error kind the caller sees.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message the caller sees.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The error this one was made from, if any.
    pub fn source(&self) -> Option<&(dyn StdError + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The failure as the caller sees it.
    pub fn to_failure(&self) -> TaskFailure {
        TaskFailure::new(self.kind, self.message.clone())
    }
}

/// `error: its source: its source's source`, as one line.
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

/// Any error is a retryable failure whose message is the error's chain, keeping the error as
/// its source.
impl<E: StdError + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        Self {
            retry: Retry::Retryable,
            kind: ErrorKind::HandlerFailed,
            message: chain(&error),
            source: Some(Arc::new(error)),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("retry", &self.retry)
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("source", &self.source)
            .finish()
    }
}

impl PartialEq for TaskError {
    /// Equal when what the caller and the retry decision see is equal (the sources are not
    /// compared).
    fn eq(&self, other: &Self) -> bool {
        self.retry == other.retry && self.kind == other.kind && self.message == other.message
    }
}

/// Marks an error of a `Result` as permanent or as invalid arguments, on its way to `?`.
pub trait ResultExt<T> {
    /// `Err(e)` becomes a permanent [`TaskError`] with `e` as its source.
    ///
    /// # Errors
    /// The error of `self`, converted.
    fn permanent(self) -> Result<T, TaskError>;

    /// `Err(e)` becomes an `invalid_args` [`TaskError`] with `e` as its source.
    ///
    /// # Errors
    /// The error of `self`, converted.
    fn invalid_args(self) -> Result<T, TaskError>;
}

impl<T, E: Into<TaskError>> ResultExt<T> for Result<T, E> {
    fn permanent(self) -> Result<T, TaskError> {
        self.map_err(|e| e.into().into_permanent())
    }

    fn invalid_args(self) -> Result<T, TaskError> {
        self.map_err(|e| {
            let mut e = e.into().into_permanent();
            e.kind = ErrorKind::InvalidArgs;
            e
        })
    }
}

/// Everything a handler may want to know about the task it runs.
///
/// The worker builds one per attempt; a unit test builds its own with [`TaskContext::new`] and
/// calls the handler directly, with no broker:
///
/// ```
/// # use warren_worker::TaskContext;
/// # use warren_shared::TaskId;
/// let ctx = TaskContext::new(TaskId::new(), "add").with_attempt(3, 3);
/// assert_eq!((ctx.attempt(), ctx.max_attempts()), (3, 3));
/// ```
#[derive(Debug, Clone)]
pub struct TaskContext {
    id: TaskId,
    function: Arc<str>,
    attempt: u32,
    max_attempts: u32,
    redelivered: bool,
    deadline: Option<SystemTime>,
    cancel: CancellationToken,
    progress: Reporter,
}

impl TaskContext {
    /// The context of a first attempt of task `id` sent to `function`, out of the default
    /// [`Policy`]'s attempts, not redelivered, with no deadline, never cancelled.
    pub fn new(id: TaskId, function: &str) -> Self {
        Self {
            id,
            function: function.into(),
            attempt: 1,
            max_attempts: Policy::default().max_attempts,
            redelivered: false,
            deadline: None,
            cancel: CancellationToken::new(),
            progress: Reporter::discard(),
        }
    }

    /// Attempt `attempt` (1 for the first) of `max_attempts`.
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32, max_attempts: u32) -> Self {
        self.attempt = attempt;
        self.max_attempts = max_attempts;
        self
    }

    /// Whether the broker delivered this message before.
    #[must_use]
    pub fn with_redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// The caller's deadline.
    #[must_use]
    pub fn with_deadline(mut self, deadline: Option<SystemTime>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The token whose cancellation [`TaskContext::cancelled`] reports.
    #[must_use]
    pub fn with_cancellation(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Where this attempt's progress goes.
    #[must_use]
    pub(crate) fn with_progress(mut self, progress: Reporter) -> Self {
        self.progress = progress;
        self
    }

    /// This attempt's progress reporter (a pool passes its task code's reports to it).
    pub(crate) fn reporter(&self) -> &Reporter {
        &self.progress
    }

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

    /// Reports how far the task has got: a fraction done, a message, a JSON detail, any of
    /// them ([`Progress`]). The caller waiting for the result sees it (`Client`'s progress
    /// stream, `warren call`'s bar, the gateway's `progress` message).
    ///
    /// It never waits and never fails: the update is stored as the latest, and at most four
    /// updates a second are sent (the first at once, then the latest every 250 ms if it
    /// changed; the last one before the result), so a handler may report in a tight loop.
    /// They are sent by a tokio task of their own: from a loop that never awaits (CPU-bound
    /// work, which belongs in `spawn_blocking`, where reporting works as well), only the
    /// last one may get out before the result.
    /// A fraction outside 0..=1 is clamped into it and a NaN one left out; an update with a
    /// message over 1 KiB or a detail over 4 KiB of JSON
    /// ([`MAX_PROGRESS_MESSAGE_BYTES`](warren_shared::events::MAX_PROGRESS_MESSAGE_BYTES),
    /// [`MAX_PROGRESS_DETAIL_BYTES`](warren_shared::events::MAX_PROGRESS_DETAIL_BYTES)), or
    /// with nothing in it, is dropped (logged at debug). Without a caller waiting, or in a
    /// context made by [`TaskContext::new`], it goes nowhere.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use warren_shared::Task;
    /// use warren_worker::{Progress, TaskContext, TaskError};
    ///
    /// #[derive(Serialize, Deserialize)]
    /// struct Import { rows: u32 }
    ///
    /// impl Task for Import {
    ///     const NAME: &'static str = "import";
    ///     type Output = u32;
    /// }
    ///
    /// async fn import(args: Import, ctx: TaskContext) -> Result<u32, TaskError> {
    ///     ctx.progress_message("reading the file");
    ///     for row in 0..args.rows {
    ///         // ... import one row ...
    ///         ctx.progress(
    ///             Progress::fraction(f64::from(row + 1) / f64::from(args.rows))
    ///                 .with_message(format!("row {} of {}", row + 1, args.rows))
    ///                 .with_detail(&serde_json::json!({ "row": row + 1 })),
    ///         );
    ///     }
    ///     Ok(args.rows)
    /// }
    /// # let registry = warren_worker::Registry::new().register_fn(import);
    /// ```
    pub fn progress(&self, progress: Progress) {
        self.progress.report(progress);
    }

    /// [`TaskContext::progress`] with a fraction done (0.0 to 1.0) only.
    pub fn progress_fraction(&self, fraction: f64) {
        self.progress(Progress::fraction(fraction));
    }

    /// [`TaskContext::progress`] with a message only.
    pub fn progress_message(&self, message: impl Into<String>) {
        self.progress(Progress::message(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn any_error_converts_to_a_retryable_failure_that_keeps_its_source() {
        fn io() -> Result<(), TaskError> {
            Err(Outer(std::io::Error::other("disk on fire")))?
        }
        let e = io().unwrap_err();
        assert_eq!(e.retry(), Retry::Retryable);
        assert_eq!(e.kind(), ErrorKind::HandlerFailed);
        assert_eq!(e.message(), "outer: disk on fire");
        assert!(e.source().is_some_and(|s| s.is::<Outer>()));
    }

    #[test]
    fn permanent_and_invalid_args_are_said_explicitly() {
        let e = "x".parse::<u32>().permanent().unwrap_err();
        assert_eq!(e.retry(), Retry::Permanent);
        assert_eq!(e.kind(), ErrorKind::HandlerFailed);
        let e = "x".parse::<u32>().invalid_args().unwrap_err();
        assert_eq!(
            (e.retry(), e.kind()),
            (Retry::Permanent, ErrorKind::InvalidArgs)
        );
        let e = TaskError::retryable("relay down").with_source(std::io::Error::other("reset"));
        assert_eq!(e.message(), "relay down: reset");
        assert_eq!(e.into_permanent().retry(), Retry::Permanent);
    }
}
