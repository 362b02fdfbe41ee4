//! Broker settings and named connections.
//!
//! Every process opens its connections here, so they all get the same treatment: a name the
//! management UI shows (`warren-worker@host:pid/consume`), a heartbeat (15 s unless the URL says
//! otherwise), a bounded connect time, and an error that names the broker (password hidden) and
//! says what to do. lapin's own auto-recovery is off: a lost connection is replaced by its
//! [`Link`](crate::link::Link), the one owner of recovery in a process.
//!
//! A broker may be given as several addresses (the nodes of a cluster): `url` holds one AMQP URL
//! or several separated by commas, each with its own credentials, vhost and TLS server name.
//! Each process shuffles them once ([`BrokerSettings::shuffled_addresses`]) and its link tries
//! them in turn, on the first connect and on every reconnect.

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
    /// `amqp://user:password@host:port/vhost[?heartbeat=N]`, or several such URLs separated by
    /// commas (the nodes of a cluster, tried in shuffled order; a comma inside a password is
    /// written `%2C`). Never logged with its password.
    pub url: String,
    /// Used when the URL has no `heartbeat` parameter.
    pub heartbeat: Duration,
    /// Bound on establishing one connection (TCP, TLS, AMQP handshake).
    pub connect_timeout: Duration,
    /// How a lost connection is re-established.
    pub reconnect: Reconnect,
    /// When set, a connection older than a jittered 75-100 % of this is replaced, between
    /// tasks and without failing a call, by one to a random address of the list, so that
    /// connections spread back over a cluster after a node returns. `None` (the default): a
    /// connection lives until it is lost.
    pub max_lifetime: Option<Duration>,
}

/// Reconnection after a lost connection: exponential backoff with jitter between attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconnect {
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Give up after this many attempts (`None`: never). A worker that gives up exits non-zero
    /// so that its supervisor (systemd, Kubernetes) restarts it; a client never gives up.
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
    /// The delays between reconnect attempts: exponential from `min_delay`, capped at
    /// `max_delay`, with jitter so that a fleet of workers does not reconnect in lockstep, and
    /// ending after `max_attempts` (never, when it is `None`).
    pub fn delays(&self) -> impl Iterator<Item = Duration> + Send + 'static {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_jitter();
        let builder = match self.max_attempts {
            Some(n) => builder.with_max_times(n),
            None => builder.without_max_times(),
        };
        backon::BackoffBuilder::build(builder)
    }
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            url: DEFAULT_AMQP_URL.to_owned(),
            heartbeat: DEFAULT_HEARTBEAT,
            connect_timeout: Duration::from_secs(10),
            reconnect: Reconnect::default(),
            max_lifetime: None,
        }
    }
}

impl std::fmt::Debug for BrokerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSettings")
            .field("url", &self.redacted_url())
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("reconnect", &self.reconnect)
            .field("max_lifetime", &self.max_lifetime)
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

    /// Settings for several addresses of one broker cluster, other fields default.
    pub fn from_urls<I, S>(urls: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        Self::new(urls.join(","))
    }

    /// The URL (every address) with passwords replaced by `***`, safe to print.
    pub fn redacted_url(&self) -> String {
        self.urls()
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The addresses in `url`, in the order given (empty entries skipped).
    pub fn urls(&self) -> Vec<String> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The addresses in a random order, for one process: a fleet given the same list spreads
    /// over the nodes instead of all connecting to the first.
    ///
    /// # Errors
    /// [`BrokerError::InvalidUrl`] when the list is empty or an address does not parse.
    pub fn shuffled_addresses(&self) -> Result<Vec<String>, BrokerError> {
        let mut urls = self.urls();
        if urls.is_empty() {
            return Err(BrokerError::InvalidUrl {
                url: self.redacted_url(),
                reason: "no broker address given".into(),
            });
        }
        for url in &urls {
            url.parse::<AMQPUri>()
                .map_err(|reason| BrokerError::InvalidUrl {
                    url: redact_url(url),
                    reason,
                })?;
        }
        fastrand::shuffle(&mut urls);
        Ok(urls)
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

/// Opens a named connection with a heartbeat to the broker at `address` (one URL of
/// [`BrokerSettings::url`]). lapin's auto-recovery is left off: the caller's
/// [`Link`](crate::link::Link) replaces the connection when it is lost.
///
/// `name` is what the management UI shows as the connection's name (see [`process_name`]); the
/// purpose is appended. This is the only place Warren opens a broker connection.
///
/// # Errors
/// [`BrokerError::InvalidUrl`], [`BrokerError::Unreachable`], [`BrokerError::Connect`] or
/// [`BrokerError::ConnectTimeout`], each naming the broker with the password hidden.
pub async fn connect(
    settings: &BrokerSettings,
    address: &str,
    name: &str,
    purpose: Purpose,
) -> Result<Connection, BrokerError> {
    let url = redact_url(address);
    let mut uri: AMQPUri = address
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
    // Fail fast when nothing listens, with an error that says so.
    let tcp_address = (uri.authority.host.clone(), uri.authority.port);
    match tokio::time::timeout(
        settings.connect_timeout,
        tokio::net::TcpStream::connect(tcp_address),
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
    let properties = ConnectionProperties::default()
        .with_connection_name(format!("{name}/{}", purpose.as_str()).into());
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
        let s = BrokerSettings::new("amqp://u:hunter2@h:5672/%2f,amqp://v:swordfish@g/%2f");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s:?}").contains("swordfish"));
    }

    #[test]
    fn reconnect_delays_grow_stay_under_the_cap_and_end_when_told() {
        let r = Reconnect::default();
        let delays: Vec<Duration> = r.delays().take(50).collect();
        assert_eq!(delays.len(), 50, "no attempt limit by default");
        // Jitter adds up to one delay's worth on top of the exponential step.
        assert!(delays[0] >= Duration::from_millis(200) && delays[0] <= Duration::from_millis(400));
        assert!(
            delays[2] >= Duration::from_millis(800) && delays[2] <= Duration::from_millis(1600)
        );
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(20)));
        let limited = Reconnect {
            max_attempts: Some(3),
            ..Reconnect::default()
        };
        assert_eq!(limited.delays().count(), 3);
    }

    #[test]
    fn several_addresses_are_split_shuffled_and_redacted() {
        let s = BrokerSettings::new("amqp://a:pa@h1:5672/%2f, amqp://b:pb@h2:5673/v,");
        assert_eq!(
            s.urls(),
            vec!["amqp://a:pa@h1:5672/%2f", "amqp://b:pb@h2:5673/v"]
        );
        assert_eq!(
            s.redacted_url(),
            "amqp://a:***@h1:5672/%2f,amqp://b:***@h2:5673/v"
        );
        let mut shuffled = s.shuffled_addresses().unwrap();
        shuffled.sort();
        assert_eq!(shuffled, s.urls());
        assert_eq!(BrokerSettings::from_urls(s.urls()).urls(), s.urls());
        assert!(matches!(
            BrokerSettings::new(" , ").shuffled_addresses(),
            Err(BrokerError::InvalidUrl { .. })
        ));
        assert!(matches!(
            BrokerSettings::new("amqp://h1,nonsense://x:y:z").shuffled_addresses(),
            Err(BrokerError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn process_names_carry_role_and_pid() {
        let name = process_name("warren-worker");
        assert!(name.starts_with("warren-worker@"));
        assert!(name.ends_with(&format!(":{}", std::process::id())));
    }
}
