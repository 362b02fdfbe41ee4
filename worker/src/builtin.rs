//! Handlers of the built-in tasks: `echo`, `sleep`, `fail` (and `send_mail`, in `mail.rs`).
//!
//! Compiled with the `builtins` feature (on by default); an application that embeds the runtime
//! with `default-features = false` registers only its own tasks and does not build the mailer.

use std::time::Duration;

use serde_json::Value;
use warren_shared::tasks::{Echo, Fail, SendMail, Sleep, Slept};

use crate::handler::{Run, TaskContext, TaskError};
use crate::mail::Mailer;
use crate::registry::Registry;

/// `echo`: returns its arguments.
///
/// # Errors
/// Never.
pub async fn echo(args: Echo, _ctx: TaskContext) -> Result<Value, TaskError> {
    Ok(args.0)
}

/// `sleep`: waits without blocking the worker.
///
/// # Errors
/// Never.
pub async fn sleep(args: Sleep, _ctx: TaskContext) -> Result<Slept, TaskError> {
    tokio::time::sleep(Duration::from_millis(args.ms)).await;
    Ok(Slept { slept_ms: args.ms })
}

/// `fail`: fails for good, with the given message.
///
/// # Errors
/// Always, a permanent [`TaskError`].
pub async fn fail(args: Fail, _ctx: TaskContext) -> Result<Value, TaskError> {
    Err(TaskError::permanent(
        args.message
            .unwrap_or_else(|| "failed on purpose".to_owned()),
    ))
}

// So that `Registry::register::<Echo>()` (and `Sleep`, `Fail`) keeps working.
impl Run for Echo {
    async fn run(self, ctx: TaskContext) -> Result<Value, TaskError> {
        echo(self, ctx).await
    }
}

impl Run for Sleep {
    async fn run(self, ctx: TaskContext) -> Result<Slept, TaskError> {
        sleep(self, ctx).await
    }
}

impl Run for Fail {
    async fn run(self, ctx: TaskContext) -> Result<Value, TaskError> {
        fail(self, ctx).await
    }
}

/// The names of the built-in tasks.
pub const BUILTINS: [&str; 4] = ["echo", "sleep", "fail", "send_mail"];

/// A registry with the built-in tasks named in `names`, mailing through `mailer`.
///
/// # Errors
/// A name that is not one of [`BUILTINS`].
pub fn builtin_registry_of(mailer: Mailer, names: &[String]) -> Result<Registry, String> {
    if let Some(unknown) = names.iter().find(|n| !BUILTINS.contains(&n.as_str())) {
        return Err(format!(
            "{unknown:?} is not a built-in function (they are {})",
            BUILTINS.join(", ")
        ));
    }
    Ok(builtin_registry(mailer).retain(|function| names.iter().any(|n| n == function)))
}

/// A registry with every built-in task, mailing through `mailer`.
pub fn builtin_registry(mailer: Mailer) -> Registry {
    Registry::new()
        .register_fn(echo)
        .register_fn(sleep)
        .register_fn(fail)
        .register_handler::<SendMail>(mailer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_shared::TaskId;

    /// A handler is a function: tested by calling it, with no broker.
    #[tokio::test]
    async fn builtins_run_without_a_broker() {
        let ctx = TaskContext::new(TaskId::new(), "echo");
        let out = echo(Echo(serde_json::json!({"a": 1})), ctx.clone()).await;
        assert_eq!(out, Ok(serde_json::json!({"a": 1})));
        let err = fail(Fail::default(), ctx.clone()).await.unwrap_err();
        assert_eq!(err.retry(), crate::Retry::Permanent);
        assert_eq!(err.message(), "failed on purpose");
        assert_eq!(sleep(Sleep { ms: 1 }, ctx).await, Ok(Slept { slept_ms: 1 }));
    }

    #[test]
    fn a_worker_may_serve_some_builtins_only() {
        let mailer = || Mailer::outbox("outbox");
        let some = builtin_registry_of(mailer(), &["echo".into(), "send_mail".into()]).unwrap();
        assert_eq!(some.functions(), ["echo", "send_mail"]);
        assert_eq!(
            builtin_registry_of(mailer(), &[])
                .unwrap()
                .functions()
                .len(),
            0
        );
        let error = builtin_registry_of(mailer(), &["resize".into()]).unwrap_err();
        assert!(error.contains("\"resize\" is not a built-in"), "{error}");
    }
}
