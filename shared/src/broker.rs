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
//!
//! `amqps://` URLs are TLS (lapin's rustls backend, the `tls` feature, on by default): the
//! broker's certificate is verified against the system's roots plus an optional CA file, and a
//! client certificate is presented when one is configured ([`TlsSettings`], [`tls_config`]). A
//! build without the feature refuses `amqps://` ([`BrokerError::TlsUnsupported`]) rather than
//! connecting in plaintext.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPScheme, AMQPUri};
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
    /// Certificates for `amqps://` URLs (ignored for `amqp://`).
    pub tls: TlsSettings,
}

/// Certificates for `amqps://` connections. All files are PEM, read each time [`connect`] opens
/// a connection (lapin's recovery of that connection reuses what was read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificates trusted to sign the broker's certificate, in addition to the system's
    /// roots (for a broker with a private CA). `--tls-ca`, `WARREN_TLS_CA`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (chain) presented to a broker that requires one; needs `key_file`.
    /// `--tls-cert`, `WARREN_TLS_CERT`.
    pub cert_file: Option<PathBuf>,
    /// Private key of `cert_file` (PKCS#8, PKCS#1 or SEC1, unencrypted). `--tls-key`,
    /// `WARREN_TLS_KEY`.
    pub key_file: Option<PathBuf>,
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
            tls: TlsSettings::default(),
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
            .field("tls", &self.tls)
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

    /// Replaces the URL with the contents of `path` (surrounding whitespace and the trailing
    /// newline removed), so that the password need not be on the command line
    /// (`--amqp-url-file`, `WARREN_AMQP_URL_FILE`).
    ///
    /// # Errors
    /// [`BrokerError::SecretFile`] when the file cannot be read or is empty.
    pub fn with_url_file(mut self, path: &Path) -> Result<Self, BrokerError> {
        self.url = read_secret_file(path)?;
        Ok(self)
    }
}

/// The contents of a file holding one secret (a broker URL, a token), trimmed of surrounding
/// whitespace and the trailing newline that editors and `echo` add.
///
/// # Errors
/// [`BrokerError::SecretFile`] when the file cannot be read or holds only whitespace.
pub fn read_secret_file(path: &Path) -> Result<String, BrokerError> {
    let text = std::fs::read_to_string(path).map_err(|source| BrokerError::SecretFile {
        path: path.to_owned(),
        reason: source.to_string(),
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(BrokerError::SecretFile {
            path: path.to_owned(),
            reason: "the file is empty".into(),
        });
    }
    Ok(secret.to_owned())
}

/// Reads the certificate files of `tls` into lapin's TLS configuration.
///
/// # Errors
/// [`BrokerError::TlsFile`] when a file cannot be read or holds no PEM certificate (or key),
/// or when only one of `cert_file` and `key_file` is set.
pub fn tls_config(tls: &TlsSettings) -> Result<OwnedTLSConfig, BrokerError> {
    let read = |path: &Path, what: &'static str, marker: &str| {
        let text = std::fs::read_to_string(path).map_err(|e| BrokerError::TlsFile {
            path: path.to_owned(),
            what,
            reason: e.to_string(),
        })?;
        if !text.contains(marker) {
            return Err(BrokerError::TlsFile {
                path: path.to_owned(),
                what,
                reason: format!("no PEM block containing {marker:?}"),
            });
        }
        Ok(text)
    };
    let cert_chain = match &tls.ca_file {
        Some(path) => Some(read(path, "CA certificate", "-----BEGIN CERTIFICATE-----")?),
        None => None,
    };
    let identity = match (&tls.cert_file, &tls.key_file) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert, "client certificate", "-----BEGIN CERTIFICATE-----")?.into_bytes(),
            key: read(key, "client key", "PRIVATE KEY-----")?.into_bytes(),
        }),
        (Some(path), None) | (None, Some(path)) => {
            return Err(BrokerError::TlsFile {
                path: path.clone(),
                what: "client certificate",
                reason: "a client certificate needs both --tls-cert and --tls-key".into(),
            });
        }
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
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
    /// The broker refused the login: wrong user or password, no access to the vhost, or
    /// `guest` from another host than localhost.
    #[error(
        "RabbitMQ at {url} refused the login of user {user:?}: the user does \
         not exist, the password is wrong, or the user has no permissions on the URL's vhost. Note \
         that the default user `guest` may only log in from localhost; create a user for remote \
         access (see deploy/rabbitmq/users.sh). Broker said: {source}"
    )]
    LoginRefused {
        /// The URL, password hidden.
        url: String,
        /// The user name from the URL.
        user: String,
        /// lapin's error (boxed: it is large, and this error is rare).
        #[source]
        source: Box<lapin::Error>,
    },
    /// The TLS handshake with an `amqps://` broker failed.
    #[error(
        "TLS handshake with {url} failed: {source}. Check that the port is the broker's TLS \
         listener (usually 5671, not the plaintext 5672), that its certificate names the host in \
         the URL and is signed by a system root or by the CA given with --tls-ca \
         (WARREN_TLS_CA), and, if the broker requires client certificates, --tls-cert and \
         --tls-key"
    )]
    Tls {
        /// The URL, password hidden.
        url: String,
        /// lapin's error (the TLS or socket error inside).
        #[source]
        source: lapin::Error,
    },
    /// An `amqps://` URL, but this build has no TLS (built without warren-shared's `tls`
    /// feature). Warren refuses rather than connect in plaintext.
    #[error(
        "{url} asks for TLS, but this build of Warren has no TLS support (built without the \
         `tls` feature of warren-shared); rebuild with default features, or use amqp://"
    )]
    TlsUnsupported {
        /// The URL, password hidden.
        url: String,
    },
    /// A TLS certificate or key file cannot be used.
    #[error("cannot use {what} file {}: {reason}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Which file it is (CA certificate, client certificate, client key).
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file that should hold a secret (`--amqp-url-file`, `--token-file`) cannot be used.
    #[error("cannot read the secret file {}: {reason}", path.display())]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The broker refused an operation for lack of a permission (403 ACCESS_REFUSED), for
    /// instance declaring a queue as a user without `configure` permission.
    #[error(
        "the broker refused user {user:?} `{permission}` access to {resource}: grant it (see \
         deploy/rabbitmq/users.sh for the permissions producers and workers need){hint}. \
         Broker said: {message}"
    )]
    AccessRefused {
        /// `configure`, `write` or `read`.
        permission: String,
        /// What was refused, e.g. `queue 'warren.tasks' in vhost '/'`.
        resource: String,
        /// The broker user.
        user: String,
        /// How else to avoid the error, if anything (starts with `, or`); may be empty.
        hint: &'static str,
        /// The broker's message.
        message: String,
    },
    /// An AMQP operation failed after connecting (declaring topology, opening a channel, ...).
    #[error("broker operation failed: {0}")]
    Amqp(lapin::Error),
}

impl From<lapin::Error> for BrokerError {
    /// A 403 ACCESS_REFUSED becomes [`BrokerError::AccessRefused`] with the permission, resource
    /// and user read from the broker's message; anything else is [`BrokerError::Amqp`].
    fn from(error: lapin::Error) -> Self {
        let Some(message) = access_refused(&error) else {
            return Self::Amqp(error);
        };
        match parse_refusal(&message) {
            Some((permission, resource, user)) => Self::AccessRefused {
                hint: hint_for(permission.as_deref()),
                permission: permission.unwrap_or_else(|| "configure, write or read".into()),
                resource,
                user,
                message,
            },
            None => Self::Amqp(error),
        }
    }
}

fn hint_for(permission: Option<&str>) -> &'static str {
    match permission {
        Some("configure") => {
            ", or, when the topology already exists, stop declaring it (--no-declare, \
             WARREN_NO_DECLARE=true, ClientSettings::declare = false)"
        }
        _ => "",
    }
}

impl BrokerError {
    /// Names the permission of an [`BrokerError::AccessRefused`] whose broker message did not
    /// (RabbitMQ 3.10 omits it for declarations): the caller knows what it was doing, e.g.
    /// `needing("configure")` after a failed declare. Other errors are returned unchanged.
    #[must_use]
    pub fn needing(self, permission: &str) -> Self {
        match self {
            Self::AccessRefused {
                resource,
                user,
                message,
                ..
            } if parse_refusal(&message).is_some_and(|(named, _, _)| named.is_none()) => {
                Self::AccessRefused {
                    hint: hint_for(Some(permission)),
                    permission: permission.to_owned(),
                    resource,
                    user,
                    message,
                }
            }
            other => other,
        }
    }
}

/// The broker's message when `error` is a 403 ACCESS_REFUSED.
fn access_refused(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403 => {
            Some(e.get_message().to_string())
        }
        _ => None,
    }
}

/// Whether the broker answered `404 NOT_FOUND`: a passive declare, a consumer or a `get` on a
/// queue (or stream) that does not exist. It closes the channel.
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(
        error.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::NOTFOUND)
            )
    )
}

/// RabbitMQ's wording, `[configure ]access to queue 'q' in vhost '/' refused for user 'u'`,
/// becomes `(Some("configure"), "queue 'q' in vhost '/'", "u")`. RabbitMQ 3.10 names the
/// permission only for some operations; the caller knows it for the others
/// ([`BrokerError::needing`]).
fn parse_refusal(message: &str) -> Option<(Option<String>, String, String)> {
    let message = message.strip_prefix("ACCESS_REFUSED - ").unwrap_or(message);
    let (permission, rest) = match message.split_once("access to ") {
        Some(("", rest)) => (None, rest),
        Some((permission, rest)) => (Some(permission.trim().to_owned()), rest),
        None => return None,
    };
    let (resource, user) = rest.split_once(" refused for user ")?;
    Some((
        permission,
        resource.trim().to_owned(),
        user.trim().trim_matches('\'').to_owned(),
    ))
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
    details: &[(String, String)],
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
    properties.extend(details.iter().cloned());
    properties
}

/// The heartbeat in whole seconds, as AMQP negotiates it: a part of a second rounds up, so that
/// `500ms` is a 1 s heartbeat rather than none (0 turns heartbeats off, and only `0s` asks for
/// that).
fn heartbeat_secs(heartbeat: Duration) -> u16 {
    let secs = heartbeat.as_secs() + u64::from(heartbeat.subsec_nanos() > 0);
    u16::try_from(secs).unwrap_or(u16::MAX)
}

/// Opens a named connection with a heartbeat to the broker at `address` (one URL of
/// [`BrokerSettings::url`]). lapin's auto-recovery is left off: the caller's
/// [`Link`](crate::link::Link) replaces the connection when it is lost.
///
/// `name` is what the management UI shows as the connection's name (see [`process_name`]); the
/// purpose is appended. `details` (e.g. `queue`, `concurrency`) are added to the client
/// properties the management UI shows beside the product (`Warren`), version, role, host and
/// pid. This is the only place Warren opens a broker connection.
///
/// An `amqps://` URL is TLS with the certificates of [`BrokerSettings::tls`].
///
/// # Errors
/// [`BrokerError::InvalidUrl`], [`BrokerError::Unreachable`], [`BrokerError::Connect`],
/// [`BrokerError::ConnectTimeout`], [`BrokerError::LoginRefused`], [`BrokerError::Tls`],
/// [`BrokerError::TlsFile`] or [`BrokerError::TlsUnsupported`], each naming the broker with the
/// password hidden.
pub async fn connect(
    settings: &BrokerSettings,
    address: &str,
    name: &str,
    purpose: Purpose,
    details: &[(String, String)],
) -> Result<Connection, BrokerError> {
    let url = redact_url(address);
    let mut uri: AMQPUri = address
        .parse()
        .map_err(|reason: String| BrokerError::InvalidUrl {
            url: url.clone(),
            reason,
        })?;
    let tls = match &uri.scheme {
        AMQPScheme::AMQPS if !cfg!(feature = "tls") => {
            return Err(BrokerError::TlsUnsupported { url });
        }
        AMQPScheme::AMQPS => tls_config(&settings.tls)?,
        AMQPScheme::AMQP => OwnedTLSConfig::default(),
    };
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat_secs(settings.heartbeat));
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
    let runtime = lapin::runtime::default_runtime().map_err(BrokerError::Amqp)?;
    // Likewise for a TLS handshake that fails (plaintext port, unknown CA, missing client
    // certificate): lapin would retry it until the timeout and report only "timed out". The
    // probe opens TLS the way lapin does and sends the AMQP protocol header: a broker answers
    // with its first frame, while an endpoint that refuses the client's certificate (which
    // TLS 1.3 reports only after the handshake) sends an alert or closes.
    if uri.scheme == AMQPScheme::AMQPS {
        let probe = async {
            use futures_lite::{AsyncReadExt, AsyncWriteExt};
            let mut stream =
                lapin::tcp::AMQPUriTcpExt::connect_with_config_async(&uri, tls.as_ref(), &runtime)
                    .await?;
            stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
            stream.flush().await?;
            let mut first = [0u8; 1];
            match stream.read(&mut first).await? {
                0 => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "the server closed the connection right after the TLS handshake (does it \
                     require a client certificate?)",
                )),
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(settings.connect_timeout, probe).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BrokerError::Tls {
                    url,
                    source: e.into(),
                });
            }
            Err(_) => {
                return Err(BrokerError::ConnectTimeout {
                    url,
                    timeout: settings.connect_timeout,
                });
            }
        }
    }
    let properties = client_properties(name, purpose, details)
        .into_iter()
        .fold(ConnectionProperties::default(), |p, (key, value)| {
            p.with_client_property(key.into(), value.into())
        });
    let tls_url = uri.scheme == AMQPScheme::AMQPS;
    let user = uri.authority.userinfo.username.clone();
    match tokio::time::timeout(
        settings.connect_timeout,
        Connection::connect_uri_with_config(uri, properties, tls, runtime),
    )
    .await
    {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) if access_refused(&source).is_some() => Err(BrokerError::LoginRefused {
            url,
            user,
            source: Box::new(source),
        }),
        Ok(Err(source)) if tls_url && source.is_io_error() => Err(BrokerError::Tls { url, source }),
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
    fn a_part_of_a_second_of_heartbeat_rounds_up_and_only_zero_is_off() {
        assert_eq!(heartbeat_secs(Duration::ZERO), 0);
        assert_eq!(heartbeat_secs(Duration::from_millis(1)), 1);
        assert_eq!(heartbeat_secs(Duration::from_millis(500)), 1);
        assert_eq!(heartbeat_secs(Duration::from_secs(15)), 15);
        assert_eq!(heartbeat_secs(Duration::from_millis(15_001)), 16);
        assert_eq!(heartbeat_secs(Duration::from_secs(1 << 20)), u16::MAX);
    }

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
    fn refusals_name_permission_resource_and_user() {
        assert_eq!(
            parse_refusal(
                "ACCESS_REFUSED - configure access to queue 'warren.tasks' in vhost '/' refused \
                 for user 'app'"
            ),
            Some((
                Some("configure".into()),
                "queue 'warren.tasks' in vhost '/'".into(),
                "app".into()
            ))
        );
        assert_eq!(
            parse_refusal(
                "ACCESS_REFUSED - access to exchange 'warren' in vhost '/' refused for user 'app'"
            ),
            Some((None, "exchange 'warren' in vhost '/'".into(), "app".into()))
        );
        assert_eq!(parse_refusal("ACCESS_REFUSED - something else"), None);
    }

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("warren-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("url");
        std::fs::write(&file, "amqp://u:p@h/%2f\n").expect("write");
        let s = BrokerSettings::default()
            .with_url_file(&file)
            .expect("readable");
        assert_eq!(s.url, "amqp://u:p@h/%2f");
        std::fs::write(&file, "\n").expect("write");
        assert!(matches!(
            read_secret_file(&file),
            Err(BrokerError::SecretFile { .. })
        ));
        assert!(matches!(
            read_secret_file(&dir.join("missing")),
            Err(BrokerError::SecretFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let tls = TlsSettings {
            cert_file: Some("/nonexistent/cert.pem".into()),
            ..TlsSettings::default()
        };
        assert!(matches!(tls_config(&tls), Err(BrokerError::TlsFile { .. })));
        assert_eq!(
            tls_config(&TlsSettings::default()).ok(),
            Some(OwnedTLSConfig::default())
        );
    }

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn a_build_without_tls_refuses_amqps() {
        let s = BrokerSettings::new("amqps://guest:guest@127.0.0.1:5671/%2f");
        assert!(matches!(
            connect(&s, &s.url, "test", Purpose::Publish, &[]).await,
            Err(BrokerError::TlsUnsupported { .. })
        ));
    }

    #[test]
    fn client_properties_name_the_process() {
        let properties = client_properties(
            "warren-worker@box:42",
            Purpose::Consume,
            &[("queue".to_owned(), "q".to_owned())],
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
