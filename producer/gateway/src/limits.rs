//! What the gateway lets strangers do on a public port, and the errors it answers them with.
//!
//! Both front doors (the websocket and the Workerman Text bridge) apply the same [`Limits`]:
//! an allowlist of functions, an optional bearer token, a maximum message size, a maximum number
//! of tasks in flight per connection and an idle timeout. A request that breaks one gets a
//! [`GatewayError`] with a stable `kind`, never a hang, and never affects other connections.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::ser::Serializer;
use warren_shared::ErrorKind;

use warren_client::Error;

/// Longest `id` (its JSON text) a websocket task may carry: the id is echoed in every answer,
/// so a longer one is refused as `bad_request`.
pub const MAX_ID_BYTES: usize = 256;

/// The functions the gateway exposes when not told otherwise: enough for the page's demo.
pub const DEMO_FUNCTIONS: &[&str] = &["echo", "send_mail"];

/// Which functions callers may run through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowlist {
    /// Every function (`--allow '*'`): only for trusted networks.
    Any,
    /// Only these functions.
    Only(BTreeSet<String>),
}

impl Allowlist {
    /// An allowlist of exactly `functions`; `*` among them allows any function.
    pub fn of<I, S>(functions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut names = BTreeSet::new();
        for f in functions {
            let f = f.as_ref().trim();
            if f == "*" {
                return Self::Any;
            }
            if !f.is_empty() {
                names.insert(f.to_owned());
            }
        }
        Self::Only(names)
    }

    /// Whether `function` may be called.
    pub fn allows(&self, function: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only(names) => names.contains(function),
        }
    }

    /// The allowed names, or `["*"]` for any; for the page and `/api/info`.
    pub fn names(&self) -> Vec<String> {
        match self {
            Self::Any => vec!["*".to_owned()],
            Self::Only(names) => names.iter().cloned().collect(),
        }
    }
}

impl Default for Allowlist {
    fn default() -> Self {
        Self::of(DEMO_FUNCTIONS)
    }
}

/// The per-connection limits shared by the websocket and the Text bridge.
#[derive(Clone, PartialEq, Eq)]
pub struct Limits {
    /// Functions callers may run; anything else is answered `forbidden`.
    pub allow: Allowlist,
    /// When set, a connection must present this bearer token (an `Authorization: Bearer`
    /// header on the websocket upgrade, or a first message `{"auth": "<token>"}`) before it
    /// may call anything.
    pub token: Option<String>,
    /// Largest websocket message or Text line, in bytes; larger ones are answered `too_large`.
    pub max_message_bytes: usize,
    /// Tasks one connection may have in flight; more are answered `busy`.
    pub max_in_flight: usize,
    /// Tasks one websocket batch may hold; a longer batch is refused whole with one
    /// `bad_request`, before any of it runs.
    pub max_batch: usize,
    /// Bytes one connection's calls may hold: their requests, and their results until written.
    /// A request that does not fit is answered `busy`.
    pub max_in_flight_bytes: usize,
    /// A connection that sends no complete message for this long while it has nothing in
    /// flight is closed (this is also what ends a slowloris client).
    pub idle_timeout: Duration,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("allow", &self.allow)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_batch", &self.max_batch)
            .field("max_in_flight_bytes", &self.max_in_flight_bytes)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            allow: Allowlist::default(),
            token: None,
            max_message_bytes: 1024 * 1024,
            max_in_flight: 1000,
            max_batch: 1000,
            max_in_flight_bytes: 16 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Whether `presented` is the configured token (always true when none is configured).
    ///
    /// Compared in constant time: the time depends only on the length of `presented` (which
    /// the caller knows anyway), never on the configured token's length or content.
    pub fn token_matches(&self, presented: &str) -> bool {
        match &self.token {
            None => true,
            Some(expected) => constant_time_eq(expected.as_bytes(), presented.as_bytes()),
        }
    }

    /// Checks that `function` may be called.
    ///
    /// # Errors
    /// [`Kind::Forbidden`] when it is not on the allowlist.
    pub fn check_function(&self, function: &str) -> Result<(), GatewayError> {
        if self.allow.allows(function) {
            Ok(())
        } else {
            crate::metrics::rejected(Kind::Forbidden);
            Err(GatewayError::new(
                Kind::Forbidden,
                format!("function {function:?} is not exposed by this gateway"),
            ))
        }
    }
}

/// Whether `expected == presented`, in time that depends only on `presented.len()`.
///
/// `subtle`'s slice comparison returns early on a length mismatch, which would reveal the
/// token's length; so every byte of `presented` is compared with the token's bytes, cycled,
/// and the length check is folded in at the end with `subtle`'s constant-time primitives.
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    if expected.is_empty() {
        return presented.is_empty();
    }
    let mut diff = 0u8;
    for (i, byte) in presented.iter().enumerate() {
        diff |= byte ^ expected[i % expected.len()];
    }
    let same_len = (expected.len() as u64).ct_eq(&(presented.len() as u64));
    bool::from(same_len & diff.ct_eq(&0))
}

/// The `kind` of an error answered by the gateway.
///
/// Gateway-level kinds are the gateway's own refusals; [`Kind::Task`] carries a worker's
/// failure kind unchanged (`unknown_function`, `invalid_args`, `handler_failed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// The message is not valid JSON, or not a task request.
    BadRequest,
    /// The function is not on the gateway's allowlist, or a web page from an origin the
    /// gateway does not allow asked for a websocket.
    Forbidden,
    /// The connection already has the maximum number of tasks in flight, or its calls (or the
    /// gateway's) hold the most bytes they may.
    Busy,
    /// A token is required and was missing or wrong.
    Unauthorized,
    /// The message is larger than the gateway accepts.
    TooLarge,
    /// The gateway already has its maximum number of open connections, in total or from this
    /// peer address; the connection is refused at once.
    TooManyConnections,
    /// No result came within the call timeout.
    Timeout,
    /// The broker could not take the task (down, refusing, or the connection was lost), or the
    /// task event stream could not be read.
    Unavailable,
    /// No event of the task within the event stream's retention.
    NotFound,
    /// A worker ran (or refused) the task and reported this.
    Task(ErrorKind),
}

impl Kind {
    /// The wire name, e.g. `busy` or `handler_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Forbidden => "forbidden",
            Self::Busy => "busy",
            Self::Unauthorized => "unauthorized",
            Self::TooLarge => "too_large",
            Self::TooManyConnections => "too_many_connections",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::NotFound => "not_found",
            Self::Task(kind) => kind.as_str(),
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Kind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// An error answered to a gateway caller: `{"kind": "...", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct GatewayError {
    /// What went wrong, for programs.
    pub kind: Kind,
    /// What went wrong, for people.
    pub message: String,
}

impl GatewayError {
    /// An error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The `busy` answer for a connection at its in-flight limit.
    pub fn busy(limit: usize) -> Self {
        crate::metrics::rejected(Kind::Busy);
        Self::new(
            Kind::Busy,
            format!("this connection already has {limit} tasks in flight; wait for results"),
        )
    }

    /// The answer for a request whose bytes do not fit in what the connection's calls (or the
    /// whole gateway's) may hold: `busy`, or `too_large` when it is larger than the whole budget
    /// and would never fit.
    pub(crate) fn busy_bytes(spent: crate::budget::Spent) -> Self {
        use crate::budget::Spent;
        let (kind, message) = match spent {
            Spent::Exceeds {
                bytes,
                limit,
                setting,
            } => (
                Kind::TooLarge,
                format!("the request is {bytes} bytes; calls may hold at most {limit} ({setting})"),
            ),
            Spent::Connection(limit) => (
                Kind::Busy,
                format!(
                    "this connection's calls already hold up to {limit} bytes \
                     (max_in_flight_bytes); wait for results"
                ),
            ),
            Spent::Gateway(limit) => (
                Kind::Busy,
                format!(
                    "the gateway's calls already hold up to {limit} bytes \
                     (max_gateway_in_flight_bytes); try again shortly"
                ),
            ),
        };
        crate::metrics::rejected(kind);
        Self::new(kind, message)
    }

    /// The `too_large` answer for a message over the size limit.
    pub fn too_large(limit: usize) -> Self {
        crate::metrics::rejected(Kind::TooLarge);
        Self::new(Kind::TooLarge, format!("message larger than {limit} bytes"))
    }

    /// The `unauthorized` answer.
    pub fn unauthorized() -> Self {
        crate::metrics::rejected(Kind::Unauthorized);
        Self::new(
            Kind::Unauthorized,
            "a bearer token is required: send {\"auth\": \"<token>\"} first \
             (or an Authorization: Bearer header on the websocket upgrade)",
        )
    }
}

impl From<Error> for GatewayError {
    fn from(error: Error) -> Self {
        match error {
            Error::Failed(failure) => Self::new(Kind::Task(failure.kind), failure.message),
            Error::Timeout(limit) => Self::new(
                Kind::Timeout,
                format!("no result within {limit:?} (are workers consuming the queue?)"),
            ),
            other => Self::new(Kind::Unavailable, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use warren_shared::TaskFailure;

    #[test]
    fn allowlist_star_allows_anything() {
        assert_eq!(Allowlist::of(["echo", "*"]), Allowlist::Any);
        assert!(Allowlist::Any.allows("rm_rf"));
        let demo = Allowlist::default();
        assert!(demo.allows("send_mail") && demo.allows("echo"));
        assert!(!demo.allows("sleep"));
        assert_eq!(Allowlist::of([" a ", "", "b"]).names(), ["a", "b"]);
    }

    #[test]
    fn token_is_checked_only_when_configured() {
        let open = Limits::default();
        assert!(open.token_matches("anything"));
        let closed = Limits {
            token: Some("s3cret".into()),
            ..Limits::default()
        };
        assert!(closed.token_matches("s3cret"));
        assert!(!closed.token_matches("s3cre"));
        assert!(!closed.token_matches("s3cres"));
        assert!(
            !closed.token_matches("s3crets3cret"),
            "a repeated token is not the token"
        );
        assert!(!closed.token_matches(""));
        assert!(!format!("{closed:?}").contains("s3cret"));
    }

    #[test]
    fn client_errors_map_to_stable_kinds() {
        let failed = Error::Failed(TaskFailure::new(ErrorKind::UnknownFunction, "no handler"));
        assert_eq!(
            serde_json::to_value(GatewayError::from(failed)).expect("test value"),
            json!({"kind": "unknown_function", "message": "no handler"})
        );
        let timeout = GatewayError::from(Error::Timeout(Duration::from_secs(1)));
        assert_eq!(timeout.kind.as_str(), "timeout");
        let lost = GatewayError::from(Error::ConnectionLost);
        assert_eq!(lost.kind.as_str(), "unavailable");
        assert_eq!(
            GatewayError::busy(3).kind.to_string(),
            "busy",
            "busy is a gateway kind"
        );
    }
}
