//! Broker settings and named connections.
//!
//! Every process opens its connections here, so they all get the same treatment: a name the
//! management UI shows (`warren-worker@host:pid/consume`), a heartbeat (15 s unless the URL says
//! otherwise), lapin's auto-recovery, a bounded connect time, and an error that names the broker
//! (password hidden) and says what to do.

use std::time::Duration;

use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

/// The broker URL used when `AMQP_URL` is not set. The vhost `/` is written `%2f`.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Heartbeat interval when the URL does not set one. RabbitMQ recommends 5 to 20 s; a dead peer
/// is noticed after two missed heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(15);

/// How to reach the broker.
#[derive(Clone)]
pub struct BrokerSettings {
    /// `amqp://user:password@host:port/vhost[?heartbeat=N]`. Never logged with its password.
    pub url: String,
    /// Used when the URL has no `heartbeat` parameter.
    pub heartbeat: Duration,
    /// Bound on establishing one connection (TCP, TLS, AMQP handshake).
    pub connect_timeout: Duration,
    /// How a lost connection is re-established.
    pub reconnect: Reconnect,
}

/// Reconnection after a lost connection: exponential backoff with jitter between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Give up after this many attempts (`None`: never). A worker that gives up exits non-zero
    /// so that its supervisor (systemd, Kubernetes) restarts it.
    pub max_attempts: Option<usize>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
            max_attempts: None,
        }
    }
}

impl Reconnect {
    /// The delay before attempt `attempt` (1-based): exponential, capped, with up to 50 % jitter
    /// so that a fleet of workers does not reconnect in lockstep.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponential = self
            .min_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(20)));
        let capped = exponential.min(self.max_delay);
        let jitter = capped.mul_f64(0.5 * fastrand_fraction());
        capped.saturating_sub(jitter)
    }
}

/// A fraction in [0, 1) from the clock's low bits: enough to spread reconnects apart.
fn fastrand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_AMQP_URL.to_owned(),
            heartbeat: DEFAULT_HEARTBEAT,
            connect_timeout: Duration::from_secs(10),
            reconnect: Reconnect::default(),
        }
    }
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &redact_url(&self.url))
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .finish()
    }
}

impl BrokerSettings {
    /// Settings for `url`, other fields default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The URL with its password replaced by `***`, safe to print.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The URL does not parse.
    #[error("invalid broker URL {url}: {reason} (expected amqp://user:password@host:5672/%2f)")]
    InvalidUrl {
        /// The URL, password hidden.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// The broker did not accept a connection.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source}. Is the broker running? Start one with \
         `deploy/ensure-broker.sh`, or point AMQP_URL at yours"
    )]
    Connect {
        /// The URL, password hidden.
        url: String,
        /// lapin's error.
        #[source]
        source: lapin::Error,
    },
    /// Nothing accepts TCP connections at the broker's address.
    #[error(
        "cannot reach RabbitMQ at {url}: {source}. Is the broker running? Start one with \
         `deploy/ensure-broker.sh`, or point AMQP_URL at yours"
    )]
    Unreachable {
        /// The URL, password hidden.
        url: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The broker did not answer in time.
    #[error(
        "timed out after {timeout:?} connecting to RabbitMQ at {url}. Is the broker running and \
         reachable? Start one with `deploy/ensure-broker.sh`, or point AMQP_URL at yours"
    )]
    ConnectTimeout {
        /// The URL, password hidden.
        url: String,
        /// The bound that ran out.
        timeout: Duration,
    },
    /// An AMQP operation failed after connecting (declaring topology, opening a channel, ...).
    #[error("broker operation failed: {0}")]
    Amqp(#[from] lapin::Error),
}

/// `amqp://user:secret@host/` becomes `amqp://user:***@host/`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    match userinfo.find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &userinfo[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// What a connection is for, part of its name in the management UI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Consumes deliveries and acks them.
    Consume,
    /// Publishes tasks or replies (and receives direct replies).
    Publish,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Self::Consume => "consume",
            Self::Publish => "publish",
        }
    }
}

/// `role@host:pid`, how this process shows up in the management UI.
pub fn process_name(role: &str) -> String {
    let host = gethostname::gethostname();
    format!("{role}@{}:{}", host.to_string_lossy(), std::process::id())
}

/// The client properties of a connection named `name` (see [`process_name`]): its name, what
/// it is, and who runs it, for the management UI's Connections page and `warren status`.
fn client_properties(
    name: &str,
    purpose: Purpose,
    details: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut properties = vec![
        (
            "connection_name".to_owned(),
            format!("{name}/{}", purpose.as_str()),
        ),
        ("product".to_owned(), "Warren".to_owned()),
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("purpose".to_owned(), purpose.as_str().to_owned()),
    ];
    if let Some((role, place)) = name.split_once('@') {
        properties.push(("role".to_owned(), role.to_owned()));
        if let Some((host, pid)) = place.rsplit_once(':') {
            properties.push(("host".to_owned(), host.to_owned()));
            properties.push(("pid".to_owned(), pid.to_owned()));
        }
    }
    properties.extend(details.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    properties
}

/// Opens a named connection with heartbeat and auto-recovery.
///
/// `name` is what the management UI shows as the connection's name (see [`process_name`]); the
/// purpose is appended.
///
/// # Errors
/// [`BrokerError::InvalidUrl`], [`BrokerError::Connect`] or [`BrokerError::ConnectTimeout`], each
/// naming the broker with the password hidden.
pub async fn connect(
    settings: &BrokerSettings,
    name: &str,
    purpose: Purpose,
) -> Result<Connection, BrokerError> {
    connect_as(settings, name, purpose, &[]).await
}

/// As [`connect`], with `details` (e.g. `queue`, `concurrency`) added to the client properties
/// the management UI shows beside the product (`Warren`), version, role, host and pid.
///
/// # Errors
/// As [`connect`].
pub async fn connect_as(
    settings: &BrokerSettings,
    name: &str,
    purpose: Purpose,
    details: &[(&str, String)],
) -> Result<Connection, BrokerError> {
    let url = settings.redacted_url();
    let mut uri: AMQPUri =
        settings
            .url
            .parse()
            .map_err(|reason: String| BrokerError::InvalidUrl {
                url: url.clone(),
                reason,
            })?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(u16::try_from(settings.heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    if uri.query.connection_timeout.is_none() {
        uri.query.connection_timeout =
            Some(u64::try_from(settings.connect_timeout.as_millis()).unwrap_or(u64::MAX));
    }
    // Fail fast when nothing listens: lapin's recovery would otherwise retry the first
    // connect until the timeout runs out.
    let address = (uri.authority.host.clone(), uri.authority.port);
    match tokio::time::timeout(
        settings.connect_timeout,
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Ok(Ok(_probe)) => {}
        Ok(Err(e)) => {
            return Err(BrokerError::Unreachable { url, source: e });
        }
        Err(_) => {
            return Err(BrokerError::ConnectTimeout {
                url,
                timeout: settings.connect_timeout,
            });
        }
    }
    let reconnect = settings.reconnect.clone();
    let properties = client_properties(name, purpose, details)
        .into_iter()
        .fold(ConnectionProperties::default(), |p, (key, value)| {
            p.with_client_property(key.into(), value.into())
        })
        .enable_auto_recover()
        .configure_backoff(|b| {
            let b = b
                .with_min_delay(reconnect.min_delay)
                .with_max_delay(reconnect.max_delay)
                .with_jitter();
            match reconnect.max_attempts {
                Some(n) => b.with_max_times(n),
                None => b.without_max_times(),
            }
        });
    match tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri(uri, properties),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(BrokerError::Connect { url, source }),
        Err(_) => Err(BrokerError::ConnectTimeout {
            url,
            timeout: settings.connect_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url(DEFAULT_AMQP_URL),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_url("amqps://u:p%40ss@h/v?x=1"),
            "amqps://u:***@h/v?x=1"
        );
        assert_eq!(redact_url("amqp://host:5672/%2f"), "amqp://host:5672/%2f");
        assert_eq!(redact_url("amqp://user@host"), "amqp://user@host");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn debug_output_hides_the_password() {
        let s = BrokerSettings::new("amqp://u:hunter2@h:5672/%2f");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn reconnect_delays_grow_and_stay_under_the_cap() {
        let r = Reconnect::default();
        assert!(
            r.delay(1) <= Duration::from_millis(200) && r.delay(1) >= Duration::from_millis(100)
        );
        assert!(
            r.delay(3) <= Duration::from_millis(800) && r.delay(3) >= Duration::from_millis(400)
        );
        assert!(r.delay(50) <= Duration::from_secs(10) && r.delay(50) >= Duration::from_secs(5));
    }

    #[test]
    fn client_properties_name_the_process() {
        let properties = client_properties(
            "warren-worker@box:42",
            Purpose::Consume,
            &[("queue", "q".to_owned())],
        );
        let get = |key: &str| {
            properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("connection_name"), Some("warren-worker@box:42/consume"));
        assert_eq!(get("product"), Some("Warren"));
        assert_eq!(get("role"), Some("warren-worker"));
        assert_eq!(get("host"), Some("box"));
        assert_eq!(get("pid"), Some("42"));
        assert_eq!(get("queue"), Some("q"));
    }

    #[test]
    fn process_names_carry_role_and_pid() {
        let name = process_name("warren-worker");
        assert!(name.starts_with("warren-worker@"));
        assert!(name.ends_with(&format!(":{}", std::process::id())));
    }
}
