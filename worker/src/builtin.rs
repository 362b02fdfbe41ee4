//! Handlers of the built-in tasks: `echo`, `sleep`, `fail` (and `send_mail`, in `mail.rs`).

use std::time::Duration;

use serde_json::Value;
use warren_shared::tasks::{Echo, Fail, SendMail, Sleep, Slept};

use crate::handler::{Handler, TaskContext, TaskError};
use crate::mail::Mailer;
use crate::registry::Registry;

impl Handler for Echo {
    async fn run(self, _ctx: TaskContext) -> Result<Value, TaskError> {
        Ok(self.0)
    }
}

impl Handler for Sleep {
    async fn run(self, _ctx: TaskContext) -> Result<Slept, TaskError> {
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
        Ok(Slept { slept_ms: self.ms })
    }
}

impl Handler for Fail {
    async fn run(self, _ctx: TaskContext) -> Result<Value, TaskError> {
        Err(TaskError::permanent(
            self.message
                .unwrap_or_else(|| "failed on purpose".to_owned()),
        ))
    }
}

/// A registry with every built-in task, mailing through `mailer`.
pub fn builtin_registry(mailer: Mailer) -> Registry {
    Registry::new()
        .register::<Echo>()
        .register::<Sleep>()
        .register::<Fail>()
        .register::<SendMail>()
        .with_state(mailer)
}
