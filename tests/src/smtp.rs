//! A minimal SMTP relay on loopback that accepts mail and keeps it in memory, so that
//! `send_mail`'s SMTP path is tested against a real SMTP conversation. Recipients whose local
//! part is `refuse` get a permanent 550; `later` gets a transient 451.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The relay; it stops when dropped.
#[derive(Debug)]
pub struct SmtpSink {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl SmtpSink {
    /// Starts listening on a free loopback port.
    pub async fn start() -> Self {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("smtp sink cannot listen: {e}"),
        };
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no local address: {e}"));
        let sink = Self {
            addr,
            received: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (received, stop) = (sink.received.clone(), sink.stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((socket, _)) = accepted else { continue };
                let received = received.clone();
                tokio::spawn(async move {
                    let _ = converse(socket, received).await;
                });
            }
        });
        sink
    }

    /// `smtp://127.0.0.1:<port>`: plain SMTP, as lettre reads it.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.addr)
    }

    /// The messages accepted so far (the DATA of each, as text).
    pub fn messages(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn converse(
    socket: tokio::net::TcpStream,
    received: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    write.write_all(b"220 sink ESMTP ready\r\n").await?;
    while let Some(line) = lines.next_line().await? {
        let upper = line.to_ascii_uppercase();
        let answer: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250 sink\r\n"
        } else if upper.starts_with("RCPT TO") && upper.contains("<REFUSE@") {
            b"550 5.1.1 no such user\r\n"
        } else if upper.starts_with("RCPT TO") && upper.contains("<LATER@") {
            b"451 4.3.0 try again later\r\n"
        } else if upper.starts_with("DATA") {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut data = String::new();
            while let Some(line) = lines.next_line().await? {
                if line == "." {
                    break;
                }
                data.push_str(&line);
                data.push('\n');
            }
            received
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(data);
            b"250 2.0.0 queued\r\n"
        } else if upper.starts_with("QUIT") {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"250 OK\r\n"
        };
        write.write_all(answer).await?;
    }
    Ok(())
}
