//! An in-process TCP relay between Warren and RabbitMQ that can cut or freeze the connections
//! passing through it: broker failures for tests, touching no one else's connections (the
//! technique of lapin's own `tests/recovery_qos.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A relay listening on a loopback port, forwarding to the broker.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    cut: Arc<Mutex<CancellationToken>>,
    stall: Arc<Mutex<CancellationToken>>,
    refusing: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
}

fn current(token: &Mutex<CancellationToken>) -> CancellationToken {
    token
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// Fires the current token and installs a fresh one for connections made from now on.
fn fire(token: &Mutex<CancellationToken>) {
    let mut guard = token
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    guard.cancel();
    *guard = CancellationToken::new();
}

impl Relay {
    /// Starts a relay to the broker at `target` (e.g. `127.0.0.1:5672`).
    pub async fn start(target: SocketAddr) -> Self {
        let listener = match TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("relay cannot listen: {e}"),
        };
        let addr = listener.local_addr().unwrap_or(target);
        let relay = Self {
            addr,
            cut: Arc::default(),
            stall: Arc::default(),
            refusing: Arc::default(),
            refused: Arc::default(),
            stop: CancellationToken::new(),
        };
        let (cut, stall, stop) = (relay.cut.clone(), relay.stall.clone(), relay.stop.clone());
        let (refusing, refused) = (relay.refusing.clone(), relay.refused.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                if refusing.load(std::sync::atomic::Ordering::SeqCst) {
                    // The broker is "down": the connection is closed at once.
                    refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                let (cut, stall, stop) = (current(&cut), current(&stall), stop.clone());
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (ur, uw) = upstream.into_split();
                    tokio::select! {
                        () = cut.cancelled() => {}
                        () = stop.cancelled() => {}
                        () = async { tokio::join!(pump(cr, uw, stall.clone()), pump(ur, cw, stall)); } => {}
                    }
                    // Dropping the halves closes both sockets.
                });
            }
        });
        relay
    }

    /// The broker URL through this relay, with a heartbeat of `heartbeat_secs`.
    pub fn url(&self, heartbeat_secs: u16) -> String {
        format!(
            "amqp://guest:guest@{}/%2f?heartbeat={heartbeat_secs}",
            self.addr
        )
    }

    /// Closes every connection open through the relay now; new ones go through.
    pub fn cut(&self) {
        fire(&self.cut);
    }

    /// Closes new connections at once (and, with [`Relay::cut`], makes the broker look down)
    /// until [`Relay::accept`].
    pub fn refuse(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections refused so far.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forwards new connections again.
    pub fn accept(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops forwarding on every connection open now, without closing them (a half-open
    /// connection: the peer vanished without a FIN); new ones go through.
    pub fn stall(&self) {
        fire(&self.stall);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies bytes one way until EOF, an error, or a stall (after which it holds the socket open
/// and forwards nothing).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, stall: CancellationToken) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            () = stall.cancelled() => {
                std::future::pending::<()>().await;
                return;
            }
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
