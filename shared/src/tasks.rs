//! Argument types of the built-in tasks every `warren-worker` serves.
//!
//! They live here, not in the worker, so that producers can call them with types too.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Task;

/// `echo`: returns its arguments unchanged. Useful to check that a worker answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Echo(pub Value);

impl Task for Echo {
    const NAME: &'static str = "echo";
    type Output = Value;
}

/// `sleep`: waits `ms` milliseconds without blocking the worker, then returns `{"slept_ms": ms}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sleep {
    /// How long to wait, in milliseconds.
    pub ms: u64,
}

/// The result of [`Sleep`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slept {
    /// How long the handler waited, in milliseconds.
    pub slept_ms: u64,
}

impl Task for Sleep {
    const NAME: &'static str = "sleep";
    type Output = Slept;
}

/// `fail`: always fails with `message` (or a default text). Useful to see error replies.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fail {
    /// The error message the handler returns.
    #[serde(default)]
    pub message: Option<String>,
}

impl Task for Fail {
    const NAME: &'static str = "fail";
    type Output = Value;
}

/// `send_mail`: builds an RFC 5322 message and delivers it (SMTP relay, or the outbox directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMail {
    /// Sender mailbox, e.g. `"Shop <noreply@example.com>"`.
    pub from: String,
    /// Recipient mailbox.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

/// The result of [`SendMail`]: where the message went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailReceipt {
    /// The `Message-ID` header of the message that was written or sent.
    pub message_id: String,
    /// `outbox:<task-id>.eml` (a file in the worker's outbox; the receipt names no server
    /// path) or `smtp://relay:port` (the relay, password hidden).
    pub delivered_to: String,
}

impl Task for SendMail {
    const NAME: &'static str = "send_mail";
    type Output = MailReceipt;
}
