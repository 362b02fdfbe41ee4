//! How many connections the gateway holds open, in total and per peer address.
//!
//! Every accepted connection (HTTP, websocket or Text) must be admitted by the [`Gate`] first;
//! the [`Admitted`] ticket it gets is held for the connection's whole life (a websocket keeps
//! the ticket of the HTTP connection it was upgraded from) and frees its place when dropped. A
//! connection over a limit is answered at once with a clear refusal and closed: an HTTP 503
//! with a JSON error body, or one JSON error line on the Text port.
//!
//! Three limits, for two kinds of connection:
//!
//! - every connection counts toward the total (`max_total`);
//! - a connection from outside the trusted networks (loopback by default) also counts toward
//!   its peer's share (`max_per_peer`) and toward the places of all such connections
//!   (`max_unauthenticated`) until it presents the token ([`Admitted::authenticated`]). A
//!   peer is an IPv4 address or an IPv6 /64, the block one host usually holds (an IPv4
//!   address embedded in NAT64's `64:ff9b::/96` is that IPv4 peer).
//!
//! So a Workerman front on the gateway's host, which opens one connection per task, hundreds
//! at once, meets the total only; and strangers who cannot authenticate hold at most
//! `max_per_peer` places per address and `max_unauthenticated` places together (so however
//! many addresses they have, the rest is left to trusted and authenticated connections), each
//! for at most the authentication deadline the connections enforce.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ipnet::IpNet;
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
    max_unauthenticated: usize,
    /// Peers in these networks meet the total only.
    trusted: Vec<IpNet>,
    /// Whether a token is configured (only the refusals' wording depends on it).
    token_set: bool,
    open: Mutex<Open>,
}

/// The limits of a [`Gate`].
#[derive(Debug, Clone)]
pub(crate) struct GateLimits {
    /// All connections.
    pub(crate) max_total: usize,
    /// Untrusted connections that have not authenticated, from one peer.
    pub(crate) max_per_peer: usize,
    /// Untrusted connections that have not authenticated, from all peers.
    pub(crate) max_unauthenticated: usize,
    /// Peers in these networks meet the total only.
    pub(crate) trusted: Vec<IpNet>,
    /// Whether a token is configured.
    pub(crate) token_set: bool,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    /// Connections counted toward a peer's share (the sum of `per_peer`).
    unauthenticated: usize,
    /// Connections counted toward their peer's share, by [`peer_key`].
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection's place; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Admitted {
    gate: Arc<Gate>,
    state: Mutex<Ticket>,
}

#[derive(Debug)]
struct Ticket {
    /// The peer share this connection counts toward ([`peer_key`]), until it authenticates;
    /// `None` for a trusted peer.
    share: Option<IpAddr>,
    /// Whether the connection presented the configured token.
    authenticated: bool,
}

impl Gate {
    /// A gate for `limits`.
    pub(crate) fn new(limits: GateLimits) -> Arc<Self> {
        let GateLimits {
            max_total,
            max_per_peer,
            max_unauthenticated,
            trusted,
            token_set,
        } = limits;
        Arc::new(Self {
            max_total,
            max_per_peer,
            max_unauthenticated,
            trusted,
            token_set,
            open: Mutex::new(Open::default()),
        })
    }

    /// Admits a connection from `peer`, or returns the refusal to answer it with.
    pub(crate) fn admit(self: &Arc<Self>, peer: SocketAddr) -> Result<Admitted, GatewayError> {
        // An IPv4 client on a dual-stack socket is one peer whichever way it is written.
        let ip = peer.ip().to_canonical();
        let share = (!self.trusted.iter().any(|net| net.contains(&ip))).then(|| peer_key(ip));
        let refusal = self.take_place(share).err();
        // Counted with the lock released.
        if let Some(message) = refusal {
            crate::metrics::rejected(Kind::TooManyConnections);
            return Err(GatewayError::new(Kind::TooManyConnections, message));
        }
        Ok(Admitted {
            gate: self.clone(),
            state: Mutex::new(Ticket {
                share,
                authenticated: false,
            }),
        })
    }

    /// Counts a connection in (toward `share` too, if any), or says why there is no place.
    fn take_place(&self, share: Option<IpAddr>) -> Result<(), String> {
        let mut open = self.lock();
        if open.total >= self.max_total {
            return Err(format!(
                "the gateway already has {} open connections; try again later",
                self.max_total
            ));
        }
        if let Some(key) = share {
            let unauthenticated = if self.token_set {
                " that have not presented the token"
            } else {
                ""
            };
            if open.unauthenticated >= self.max_unauthenticated {
                return Err(format!(
                    "the gateway already has {} open connections from outside its trusted \
                     networks{unauthenticated}; try again later",
                    self.max_unauthenticated
                ));
            }
            let from_peer = open.per_peer.entry(key).or_insert(0);
            if *from_peer >= self.max_per_peer {
                return Err(format!(
                    "{} connections from your address{unauthenticated} are already open; \
                     close one first",
                    self.max_per_peer
                ));
            }
            *from_peer += 1;
            open.unauthenticated += 1;
        }
        open.total += 1;
        Ok(())
    }

    /// Gives back one place of `key`'s share.
    fn leave_share(open: &mut Open, key: IpAddr) {
        open.unauthenticated = open.unauthenticated.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_peer.remove(&key);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open connections now.
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.lock().total
    }
}

/// NAT64's well-known prefix (RFC 6052): an IPv4 client reaching an IPv6-only gateway
/// through a NAT64 gateway appears as `64:ff9b::<its IPv4 address>`.
const NAT64: Ipv6Addr = Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0);

/// The key of a peer's share: an IPv4 address, or the /64 of an IPv6 address (a host is
/// usually given a whole /64, so counting each /128 would give one host 2^64 shares). An IPv4
/// address embedded in NAT64's prefix is that IPv4 address: the whole IPv4 Internet shares
/// one /64 there.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) if v6.to_bits() >> 32 == NAT64.to_bits() >> 32 => {
            // The low 32 bits are the IPv4 address; the cast keeps exactly them.
            #[allow(clippy::cast_possible_truncation)]
            let v4 = v6.to_bits() as u32;
            IpAddr::V4(Ipv4Addr::from_bits(v4))
        }
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
    }
}

impl Admitted {
    /// Records that the connection presented the configured token: from now on it counts
    /// toward the total only, and leaves its peer's share to others.
    pub(crate) fn authenticated(&self) {
        let mut ticket = self.ticket();
        ticket.authenticated = true;
        if let Some(key) = ticket.share.take() {
            Gate::leave_share(&mut self.gate.lock(), key);
        }
    }

    /// Whether the connection presented the configured token.
    pub(crate) fn is_authenticated(&self) -> bool {
        self.ticket().authenticated
    }

    fn ticket(&self) -> std::sync::MutexGuard<'_, Ticket> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let share = self.ticket().share.take();
        let mut open = self.gate.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(key) = share {
            Gate::leave_share(&mut open, key);
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

    /// A gate with a token set and no cap on unauthenticated connections in total.
    fn gate(max_total: usize, max_per_peer: usize, trusted: Vec<IpNet>) -> Arc<Gate> {
        Gate::new(GateLimits {
            max_total,
            max_per_peer,
            max_unauthenticated: usize::MAX,
            trusted,
            token_set: true,
        })
    }

    #[test]
    fn unauthenticated_connections_are_capped_in_total_whatever_their_addresses() {
        let gate = Gate::new(GateLimits {
            max_total: 10,
            max_per_peer: 2,
            max_unauthenticated: 3,
            trusted: vec![net("127.0.0.0/8")],
            token_set: true,
        });
        let a = gate.admit(addr("10.0.0.1:1")).expect("first stranger");
        let _b = gate.admit(addr("10.0.0.2:1")).expect("second");
        let _c = gate.admit(addr("[2001:db8::1]:1")).expect("third");
        let refused = gate
            .admit(addr("10.0.0.4:1"))
            .expect_err("a fourth address finds the strangers' places taken");
        assert_eq!(refused.kind, Kind::TooManyConnections);
        assert!(
            refused
                .message
                .contains("3 open connections from outside its trusted networks"),
            "{refused}"
        );
        let local: Vec<_> = (0..5)
            .map(|i| {
                gate.admit(addr(&format!("127.0.0.1:{i}")))
                    .expect("trusted")
            })
            .collect();
        a.authenticated();
        let _d = gate
            .admit(addr("10.0.0.4:2"))
            .expect("an authenticated connection leaves the strangers' places");
        gate.admit(addr("10.0.0.5:1")).expect_err("full again");
        drop(a);
        gate.admit(addr("10.0.0.5:2"))
            .expect_err("dropping an authenticated connection frees no stranger's place");
        assert_eq!(gate.open(), 8);
        drop(local);
    }

    #[test]
    fn without_a_token_refusals_do_not_mention_one() {
        let gate = Gate::new(GateLimits {
            max_total: 10,
            max_per_peer: 1,
            max_unauthenticated: 10,
            trusted: Vec::new(),
            token_set: false,
        });
        let _a = gate.admit(addr("10.0.0.1:1")).expect("first");
        let refused = gate.admit(addr("10.0.0.1:2")).expect_err("per peer");
        assert!(!refused.message.contains("token"), "{refused}");
        assert!(
            refused.message.contains("1 connections from your address"),
            "{refused}"
        );
    }

    #[test]
    fn a_nat64_address_is_its_ipv4_peer() {
        let gate = gate(100, 1, Vec::new());
        let _a = gate
            .admit(addr("[64:ff9b::a00:1]:1"))
            .expect("10.0.0.1 via NAT64");
        gate.admit(addr("10.0.0.1:2"))
            .expect_err("the same IPv4 peer, reached directly");
        let _b = gate
            .admit(addr("[64:ff9b::a00:2]:1"))
            .expect("another IPv4 client behind the same NAT64 prefix");
        assert_eq!(
            peer_key("64:ff9b::c000:221".parse().expect("ip")),
            "192.0.2.33".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn limits_total_and_per_peer_and_frees_on_drop() {
        let gate = gate(3, 2, Vec::new());
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

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network")
    }

    #[test]
    fn ipv6_peers_share_by_64() {
        let gate = gate(100, 2, Vec::new());
        let _a = gate.admit(addr("[2001:db8:1:2::1]:1000")).expect("first");
        let _b = gate
            .admit(addr("[2001:db8:1:2:ffff:ffff:ffff:ffff]:1000"))
            .expect("second from the /64");
        let refused = gate
            .admit(addr("[2001:db8:1:2:abcd::7]:1000"))
            .expect_err("a third address of the same /64 is the same peer");
        assert_eq!(refused.kind, Kind::TooManyConnections);
        let _c = gate
            .admit(addr("[2001:db8:1:3::1]:1000"))
            .expect("the next /64 is another peer");
    }

    #[test]
    fn trusted_networks_meet_the_total_only() {
        let gate = gate(4, 1, vec![net("127.0.0.0/8"), net("::1/128")]);
        let local: Vec<_> = ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3"]
            .into_iter()
            .map(|a| gate.admit(addr(a)).expect("loopback is trusted"))
            .collect();
        let _stranger = gate.admit(addr("10.0.0.1:1")).expect("one stranger");
        let refused = gate
            .admit(addr("127.0.0.1:4"))
            .expect_err("the total binds trusted peers too");
        assert!(refused.message.contains("4 open connections"), "{refused}");
        drop(local);
        assert_eq!(gate.open(), 1);
    }

    #[test]
    fn an_authenticated_connection_leaves_its_peers_share() {
        let gate = gate(10, 2, Vec::new());
        let a = gate.admit(addr("10.0.0.1:1")).expect("first");
        let b = gate.admit(addr("10.0.0.1:2")).expect("second");
        gate.admit(addr("10.0.0.1:3"))
            .expect_err("the share is full");
        assert!(!a.is_authenticated());
        a.authenticated();
        a.authenticated(); // twice is once
        assert!(a.is_authenticated());
        let c = gate
            .admit(addr("10.0.0.1:4"))
            .expect("a's place in the share is free");
        gate.admit(addr("10.0.0.1:5"))
            .expect_err("b and c fill the share");
        drop(a);
        gate.admit(addr("10.0.0.1:6"))
            .expect_err("dropping an authenticated connection frees no share place");
        drop(b);
        let _d = gate.admit(addr("10.0.0.1:7")).expect("b's place");
        assert_eq!(gate.open(), 2);
        drop(c);
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
