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
///
/// Its arguments come in two shapes: `{"from", "to", "subject", "body"}`, and the seed
/// application's `{"from", "to", "contents"}` (with `subject` optional, empty by default).
/// Anything else (unknown fields, both `body` and `contents`, neither) is rejected with a message
/// that says which.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SendMailArgs")]
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

/// Every field either shape of [`SendMail`]'s arguments may have.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMailArgs {
    from: String,
    to: String,
    subject: Option<String>,
    body: Option<String>,
    contents: Option<String>,
}

impl TryFrom<SendMailArgs> for SendMail {
    type Error = String;

    fn try_from(args: SendMailArgs) -> Result<Self, String> {
        let SendMailArgs {
            from,
            to,
            subject,
            body,
            contents,
        } = args;
        match (body, contents, subject) {
            (Some(body), None, Some(subject)) => Ok(Self {
                from,
                to,
                subject,
                body,
            }),
            (Some(_), None, None) => Err("missing field `subject` (required with `body`)".into()),
            (None, Some(contents), subject) => Ok(Self {
                from,
                to,
                subject: subject.unwrap_or_default(),
                body: contents,
            }),
            (Some(_), Some(_), _) => {
                Err("give either `body` (with `subject`) or `contents`, not both".into())
            }
            (None, None, _) => Err("missing field `body` (or the seed's `contents`)".into()),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode(args: Value) -> Result<SendMail, String> {
        serde_json::from_value(args).map_err(|e| e.to_string())
    }

    #[test]
    fn send_mail_takes_the_seeds_shape_with_an_optional_subject() {
        let seed =
            decode(json!({"from": "a@example.com", "to": "b@example.com", "contents": "hi"}));
        assert_eq!(
            seed,
            Ok(SendMail {
                from: "a@example.com".into(),
                to: "b@example.com".into(),
                subject: String::new(),
                body: "hi".into(),
            })
        );
        let with_subject = decode(json!({"from": "a@example.com", "to": "b@example.com",
            "subject": "S", "contents": "hi"}));
        assert_eq!(with_subject.map(|m| m.subject), Ok("S".to_owned()));
        let today = decode(json!({"from": "a@example.com", "to": "b@example.com",
            "subject": "S", "body": "hi"}));
        assert_eq!(today.map(|m| m.body), Ok("hi".to_owned()));
    }

    #[test]
    fn send_mail_rejects_other_shapes_saying_why() {
        let cases = [
            (json!({"from": "a", "to": "b", "body": "x"}), "subject"),
            (json!({"from": "a", "to": "b", "subject": "s"}), "contents"),
            (
                json!({"from": "a", "to": "b", "body": "x", "subject": "s", "contents": "y"}),
                "not both",
            ),
            (
                json!({"from": "a", "to": "b", "contents": "y", "cc": "c"}),
                "unknown field `cc`",
            ),
            (json!({"to": "b", "contents": "y"}), "missing field `from`"),
            (json!("a string"), "invalid type"),
        ];
        for (args, says) in cases {
            let err = decode(args.clone()).unwrap_err();
            assert!(err.contains(says), "{args}: {err}");
        }
    }

    #[test]
    fn send_mail_serializes_in_todays_shape() {
        let mail = SendMail {
            from: "a".into(),
            to: "b".into(),
            subject: "s".into(),
            body: "x".into(),
        };
        let value = serde_json::to_value(&mail).unwrap();
        assert_eq!(
            value,
            json!({"from": "a", "to": "b", "subject": "s", "body": "x"})
        );
        assert_eq!(decode(value), Ok(mail));
    }
}
