//! The floor of the `seed` scenario: a minimal direct Text task server with no broker, as the
//! seed's Workerman `TaskWorker` is.
//!
//! `warren-bench --seed-floor-serve ADDR --seed-floor-outbox DIR` runs one such process (the
//! `seed` scenario starts `--seed-floor-processes` of them, 4 like the seed's TaskWorker count,
//! all listening on the same loopback port with `SO_REUSEPORT`, so the kernel spreads the
//! connections over them). Each is a single-threaded tokio runtime, like a PHP process is one
//! event loop, and does for every line what the seed's `onMessage` does for `send_mail`: parse
//! the JSON, build the mail (the same `lettre` builder and headers as the worker's
//! `worker/src/mail.rs`), write it to `<outbox>/<uuid>.eml` with one blocking write (PHP's
//! `file_put_contents`), and answer one JSON line, the same receipt Warren's `send_mail`
//! returns. Nothing is durable: a killed process loses what it was doing and its connections.
//! The lines of one connection are handled in order; answers to lines that arrived together
//! are written together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result};
use lettre::Message;
use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use uuid::Uuid;
use warren_shared::tasks::{MailReceipt, SendMail};

/// Runs one floor process until it is killed: binds `addr` with `SO_REUSEPORT`, prints
/// `ready` on stdout once listening, then serves.
///
/// # Errors
/// The address cannot be bound or the runtime cannot start.
pub(crate) fn serve(addr: SocketAddr, outbox: PathBuf) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the floor's runtime")?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseport(true)?;
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .with_context(|| format!("binding the floor to {addr}"))?;
        let listener = socket.listen(1024)?;
        println!("ready");
        let outbox = Rc::new(outbox);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let outbox = outbox.clone();
            tokio::task::spawn_local(async move {
                // A connection that fails ends; the client sees it closed.
                let _ = connection(stream, &outbox).await;
            });
        }
    })
}

/// What the seed's `TaskWorker` reads from a line.
#[derive(Deserialize)]
struct Request {
    function: String,
    #[serde(default)]
    args: Value,
}

async fn connection(stream: TcpStream, outbox: &Path) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let mut answers = Vec::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            // An unterminated last line is an incomplete request, dropped.
            return Ok(());
        }
        let answer = handle(line.trim_end(), outbox);
        answers.extend_from_slice(answer.to_string().as_bytes());
        answers.push(b'\n');
        // Answer once nothing more has arrived.
        if read.buffer().is_empty() {
            write.write_all(&answers).await?;
            answers.clear();
        }
    }
}

/// One request line to its answer: the receipt, or `{"error": {...}}` like Warren's bridge.
fn handle(line: &str, outbox: &Path) -> Value {
    let failure =
        |kind: &str, message: String| json!({ "error": { "kind": kind, "message": message } });
    let request: Request = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(e) => return failure("bad_request", e.to_string()),
    };
    if request.function != "send_mail" {
        return failure("unknown_function", request.function);
    }
    let mail: SendMail = match serde_json::from_value(request.args) {
        Ok(mail) => mail,
        Err(e) => return failure("invalid_args", e.to_string()),
    };
    let id = Uuid::new_v4().to_string();
    let message_id = format!("<{id}@warren-floor>");
    let message = match build(&mail, &message_id) {
        Ok(message) => message,
        Err(e) => return failure("invalid_args", e),
    };
    let name = format!("{id}.eml");
    if let Err(e) = std::fs::write(outbox.join(&name), message.formatted()) {
        return failure("handler_failed", e.to_string());
    }
    json!(MailReceipt {
        message_id,
        delivered_to: format!("outbox:{name}"),
    })
}

/// The message `worker/src/mail.rs` builds.
fn build(mail: &SendMail, message_id: &str) -> Result<Message, String> {
    let mailbox = |value: &str| {
        value
            .parse::<Mailbox>()
            .map_err(|e| format!("{value:?}: {e}"))
    };
    Message::builder()
        .from(mailbox(&mail.from)?)
        .to(mailbox(&mail.to)?)
        .subject(mail.subject.as_str())
        .message_id(Some(message_id.to_owned()))
        .header(ContentType::TEXT_PLAIN)
        .body(mail.body.clone())
        .map_err(|e| e.to_string())
}
