//! `send_mail`: a real RFC 5322 message, delivered to an SMTP relay or written to an outbox.
//!
//! The outbox is the default so that the demo works on a machine with no mail server: each
//! message is written atomically as `<outbox>/<task-id>.eml`. Naming the file after the task id
//! makes a redelivered task overwrite its own file instead of mailing twice.

use std::path::{Path, PathBuf};

use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use warren_shared::broker::redact_url;
use warren_shared::tasks::{MailReceipt, SendMail};

use crate::handler::{Handler, TaskContext, TaskError};

/// Where `send_mail` delivers; it is the `send_mail` handler
/// (`Registry::new().register_handler::<SendMail>(mailer)`).
#[derive(Clone)]
pub enum Mailer {
    /// Write `.eml` files into this directory.
    Outbox(PathBuf),
    /// Send through this SMTP relay.
    Smtp {
        /// The connection pool to the relay.
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// The relay URL with its password hidden, reported in receipts.
        url: String,
    },
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Outbox(dir) => f.debug_tuple("Outbox").field(dir).finish(),
            Self::Smtp { url, .. } => f.debug_struct("Smtp").field("url", url).finish(),
        }
    }
}

impl Mailer {
    /// Writes messages into `dir` (created on first use).
    pub fn outbox(dir: impl Into<PathBuf>) -> Self {
        Self::Outbox(dir.into())
    }

    /// Sends through the relay at `url`: `smtp://host:25` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS) or `smtps://user:password@host:465` (TLS), as lettre's `from_url` reads them.
    ///
    /// # Errors
    /// The URL does not parse, with the password hidden in the message.
    pub fn smtp(url: &str) -> Result<Self, String> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("invalid SMTP URL {}: {e}", redact_url(url)))?
            .build();
        Ok(Self::Smtp {
            transport,
            url: redact_url(url),
        })
    }

    /// Builds and delivers one message.
    ///
    /// # Errors
    /// `invalid_args` for addresses that do not parse; a retryable error for transient SMTP
    /// and file system failures; a permanent one for permanent SMTP refusals.
    pub async fn send(&self, task_id: &str, mail: SendMail) -> Result<MailReceipt, TaskError> {
        let message_id = format!("<{}@warren>", sanitize(task_id));
        let message = build_message(&mail, &message_id)?;
        match self {
            Self::Outbox(dir) => {
                let path = write_to_outbox(dir, task_id, message.formatted()).await?;
                // The file name only: a receipt goes back to callers (through the gateway, to
                // strangers), who must not learn the server's paths.
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                Ok(MailReceipt {
                    message_id,
                    delivered_to: format!("outbox:{name}"),
                })
            }
            Self::Smtp { transport, url } => {
                transport.send(message).await.map_err(|e| {
                    if e.is_permanent() {
                        TaskError::permanent(format!("relay {url} refused the message: {e}"))
                    } else {
                        TaskError::retryable(format!("relay {url} failed: {e}"))
                    }
                })?;
                Ok(MailReceipt {
                    message_id,
                    delivered_to: url.clone(),
                })
            }
        }
    }
}

fn build_message(mail: &SendMail, message_id: &str) -> Result<Message, TaskError> {
    let mailbox = |field: &str, value: &str| {
        value.parse::<Mailbox>().map_err(|e| {
            TaskError::invalid_args(format!("{field} {value:?} is not a valid address: {e}"))
        })
    };
    Message::builder()
        .from(mailbox("from", &mail.from)?)
        .to(mailbox("to", &mail.to)?)
        .subject(mail.subject.as_str())
        .message_id(Some(message_id.to_owned()))
        .header(ContentType::TEXT_PLAIN)
        .body(mail.body.clone())
        .map_err(|e| TaskError::invalid_args(format!("cannot build the message: {e}")))
}

/// Keeps file names and message ids to a safe alphabet whatever a foreign client sent as id.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect()
}

/// Mails up to this size are written on the worker's own thread; larger ones in tokio's
/// blocking pool.
///
/// Writing a mail of a few KiB into the page cache (create, write, rename; no sync) takes tens of
/// microseconds, within tokio's budget between two awaits; the hop to the blocking pool and back
/// costs more CPU than that (0.05 to 0.09 ms per task in the `seed` benchmark, a quarter to a
/// third of the worker's whole cost per `send_mail`). The broker connections live on lapin's own
/// threads, so even a disk that stalls delays this worker's other tasks, never its heartbeats.
const INLINE_WRITE_MAX: usize = 64 * 1024;

/// Writes `bytes` as `<dir>/<task-id>.eml`, atomically (a temporary file renamed into place),
/// creating `dir` when it is missing.
async fn write_to_outbox(dir: &Path, task_id: &str, bytes: Vec<u8>) -> Result<PathBuf, TaskError> {
    let dir = dir.to_owned();
    let name = sanitize(task_id);
    let inline = bytes.len() <= INLINE_WRITE_MAX;
    let write = move || {
        let io = |what: &str, e: std::io::Error| {
            TaskError::retryable(format!("{what} {}: {e}", dir.display()))
        };
        let path = dir.join(format!("{name}.eml"));
        let tmp = dir.join(format!(".{name}.eml.tmp"));
        if let Err(e) = std::fs::write(&tmp, &bytes) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io("cannot write into outbox", e));
            }
            std::fs::create_dir_all(&dir).map_err(|e| io("cannot create outbox", e))?;
            std::fs::write(&tmp, &bytes).map_err(|e| io("cannot write into outbox", e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot write into outbox", e))?;
        Ok(path)
    };
    if inline {
        return write();
    }
    tokio::task::spawn_blocking(write)
        .await
        .unwrap_or_else(|e| Err(TaskError::retryable(format!("outbox write failed: {e}"))))
}

impl Handler<SendMail> for Mailer {
    async fn run(&self, mail: SendMail, ctx: TaskContext) -> Result<MailReceipt, TaskError> {
        self.send(ctx.id().as_str(), mail).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(to: &str) -> SendMail {
        SendMail {
            from: "Shop <noreply@example.com>".into(),
            to: to.into(),
            subject: "Your order".into(),
            body: "Thanks!".into(),
        }
    }

    #[test]
    fn invalid_addresses_are_invalid_args() {
        let err = build_message(&mail("not an address"), "<x@warren>").unwrap_err();
        assert_eq!(err.to_failure().kind, warren_shared::ErrorKind::InvalidArgs);
        assert!(err.to_failure().message.contains("to \"not an address\""));
    }

    #[tokio::test]
    async fn a_large_mail_is_written_whole_through_the_blocking_pool() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let bytes = vec![b'x'; INLINE_WRITE_MAX * 3];
        let path = write_to_outbox(&dir, "big", bytes.clone()).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[tokio::test]
    async fn outbox_message_is_rfc5322_and_named_by_task() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("outbox");
        let ctx = TaskContext::new(warren_shared::TaskId::from("task/1"), "send_mail");
        let receipt = Mailer::outbox(&dir)
            .run(mail("user@example.com"), ctx)
            .await
            .unwrap();
        let path = dir.canonicalize().unwrap().join("task_1.eml");
        assert_eq!(receipt.delivered_to, "outbox:task_1.eml", "no server path");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("To: user@example.com\r\n"));
        assert!(text.contains("Message-ID: <task_1@warren>\r\n"));
        assert!(text.contains("\r\n\r\nThanks!"));
    }
}
