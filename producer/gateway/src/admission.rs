//! How many connections the gateway holds open, in total and per peer address.
//!
//! Every accepted connection (HTTP, websocket or Text) must be admitted by the [`Gate`] first;
//! the [`Admitted`] ticket it gets is held for the connection's whole life (a websocket keeps
//! the ticket of the HTTP connection it was upgraded from) and frees its place when dropped. A
//! connection over a limit is answered at once with a clear refusal and closed: an HTTP 503
//! with a JSON error body, or one JSON error line on the Text port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::limits::{GatewayError, Kind};

/// How long a refused connection may take to receive its refusal (and to close), so that a
/// flood of refused connections costs little.
const REFUSAL_BOUND: Duration = Duration::from_secs(1);

/// Counts open connections against the two limits.
#[derive(Debug)]
pub(crate) struct Gate {
    max_total: usize,
    max_per_peer: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Admitted {
    gate: Arc<Gate>,
    peer: IpAddr,
}

impl Gate {
    pub(crate) fn new(max_total: usize, max_per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer,
            open: Mutex::new(Open::default()),
        })
    }

    /// Admits a connection from `peer`, or returns the refusal to answer it with.
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admitted, GatewayError> {
        // An IPv4 client on a dual-stack socket is one peer whichever way it is written.
        let ip = peer.ip().to_canonical();
        let refusal = self.take_place(ip).err();
        // Counted with the lock released.
        if let Some(message) = refusal {
            crate::metrics::rejected(Kind::TooManyConnections);
            return Err(GatewayError::new(Kind::TooManyConnections, message));
        }
        Ok(Admitted {
            gate: self.clone(),
            peer: ip,
        })
    }

    /// Counts a connection from `ip` in, or says why there is no place for it.
    fn take_place(&self, ip: IpAddr) -> Result<(), String> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max_total {
            return Err(format!(
                "the gateway already has {} open connections; try again later",
                self.max_total
            ));
        }
        let from_peer = open.per_peer.entry(ip).or_insert(0);
        if *from_peer >= self.max_per_peer {
            return Err(format!(
                "{} connections from your address are already open; close one first",
                self.max_per_peer
            ));
        }
        *from_peer += 1;
        open.total += 1;
        Ok(())
    }

    /// Open connections now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .gate
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The bytes an HTTP client over the limit gets: `503 Service Unavailable`, a JSON error body,
/// `Connection: close`.
pub(crate) fn http_refusal(error: &GatewayError) -> Vec<u8> {
    let body = json!({ "error": error }).to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The line a Text client over the limit gets: `{"error": {...}}`.
pub(crate) fn text_refusal(error: &GatewayError) -> Vec<u8> {
    let mut line = json!({ "error": error }).to_string();
    line.push('\n');
    line.into_bytes()
}

/// Writes `refusal` and closes, within [`REFUSAL_BOUND`].
///
/// What the client already sent is read and discarded before closing: closing a socket with
/// unread data makes the kernel send a reset, which can destroy the refusal before the client
/// reads it.
pub(crate) async fn refuse(mut stream: TcpStream, refusal: Vec<u8>) {
    let _ = tokio::time::timeout(REFUSAL_BOUND, async {
        stream.write_all(&refusal).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut discarded = 0usize;
        while discarded < 64 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => discarded += n,
            }
        }
        std::io::Result::Ok(())
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn limits_total_and_per_peer_and_frees_on_drop() {
        let gate = Gate::new(3, 2);
        let a1 = gate.admit(addr("10.0.0.1:1000")).expect("first");
        let a2 = gate.admit(addr("10.0.0.1:1001")).expect("second");
        let refused = gate
            .admit(addr("10.0.0.1:1002"))
            .expect_err("third from one peer");
        assert_eq!(refused.kind, Kind::TooManyConnections);
        let b1 = gate
            .admit(addr("[::ffff:10.0.0.2]:1000"))
            .expect("another peer");
        let refused = gate
            .admit(addr("10.0.0.3:1000"))
            .expect_err("over the total");
        assert!(refused.message.contains("3 open connections"), "{refused}");
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _a3 = gate.admit(addr("10.0.0.1:1003")).expect("room again");
        drop((a2, b1));
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn refusals_are_clear() {
        let error = GatewayError::new(Kind::TooManyConnections, "m");
        let http = String::from_utf8(http_refusal(&error)).expect("utf8");
        assert!(http.starts_with("HTTP/1.1 503 "), "{http}");
        assert!(http.ends_with(r#"{"error":{"kind":"too_many_connections","message":"m"}}"#));
        assert_eq!(
            text_refusal(&error),
            b"{\"error\":{\"kind\":\"too_many_connections\",\"message\":\"m\"}}\n"
        );
    }
}
