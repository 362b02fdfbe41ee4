//! The `warren-gateway` binary's settings: its flags, its `--config` file and their defaults.
//!
//! [`GatewayConfig`] is the one description of every setting of the binary: a field is a flag
//! (`--max-in-flight`), an environment variable (`WARREN_GATEWAY_MAX_IN_FLIGHT`) and a key of
//! the TOML file (`max_in_flight = 1000`) at once, and its default comes from
//! [`GatewaySettings::default`] and [`Limits::default`] (the addresses from the constants
//! below). `warren_shared::config` layers defaults < file < environment < flags;
//! `deploy/warren-gateway.toml` is a commented example.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use warren_client::ClientSettings;
use warren_shared::broker::{BrokerError, read_secret_file};
use warren_shared::config::BrokerConfig;
use warren_shared::topology;

use crate::browser::{BadOrigin, normalize_origin};
use crate::{
    Allowlist, DEFAULT_HTTP_PORT, DEFAULT_LISTEN_BACKLOG, DEFAULT_TEXT_PORT, GatewaySettings,
    Limits, ListenError, ResumeSettings, listen_addr,
};

/// Every setting of `warren-gateway`; see the [module](self).
#[derive(Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The broker (`[broker]` in the file).
    #[command(flatten)]
    pub broker: BrokerConfig,
    /// Send every task to this work queue, whatever function it names. Unset (the default):
    /// each task goes by its function's name to the queue whose workers serve it, and a
    /// function nobody serves is answered `unknown_function` at once.
    #[arg(long, env = "WARREN_QUEUE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The exchange that routes tasks by function name (the workers' `functions_exchange`).
    #[arg(long, env = "WARREN_FUNCTIONS_EXCHANGE")]
    pub functions_exchange: String,
    /// Address of the web page (/) and the websocket endpoint (/ws). Default: 127.0.0.1:8080,
    /// or 0.0.0.0:8080 when a token is set (or with --insecure-public). A non-loopback
    /// address needs a token or --insecure-public.
    #[arg(long, env = "WARREN_GATEWAY_HTTP")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// Address of the Workerman Text protocol bridge. Default: 127.0.0.1:12345, or
    /// 0.0.0.0:12345 when a token is set (or with --insecure-public).
    #[arg(long, env = "WARREN_GATEWAY_TEXT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<SocketAddr>,
    /// Allow listening on a non-loopback address without a token: anyone who reaches the
    /// ports may run the allowed functions. Only for trusted networks.
    #[arg(long, env = "WARREN_GATEWAY_INSECURE_PUBLIC")]
    pub insecure_public: bool,
    /// Functions callers may run, comma-separated; `*` allows any (trusted networks only).
    #[arg(long, env = "WARREN_GATEWAY_ALLOW", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Bearer token callers must present (Authorization header or a first {"auth": ...}
    /// message). No token: anyone who reaches the port may call the allowed functions.
    #[arg(long, env = "WARREN_GATEWAY_TOKEN", hide_env_values = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// File holding the token (read at start-up, overrides token); keeps it out of argv and the
    /// environment. Surrounding whitespace and the trailing newline are ignored.
    #[arg(long, env = "WARREN_GATEWAY_TOKEN_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Do not declare the exchange and queues (they must exist): lets the gateway run as a
    /// broker user without `configure` permission.
    #[arg(long, env = "WARREN_NO_DECLARE")]
    pub no_declare: bool,
    /// Largest websocket message or Text line, in bytes.
    #[arg(long, env = "WARREN_GATEWAY_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: usize,
    /// Tasks one connection may have in flight; more are answered `busy`.
    #[arg(long, env = "WARREN_GATEWAY_MAX_IN_FLIGHT")]
    pub max_in_flight: NonZeroUsize,
    /// Tasks one websocket batch may hold; a longer batch is refused whole (`bad_request`).
    #[arg(long, env = "WARREN_GATEWAY_MAX_BATCH")]
    pub max_batch: NonZeroUsize,
    /// Bytes one connection's calls may hold (requests, and results until written); a request
    /// that does not fit is answered `busy`.
    #[arg(long, env = "WARREN_GATEWAY_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: usize,
    /// Bytes the calls of all connections together may hold; a request that does not fit is
    /// answered `busy`.
    #[arg(long, env = "WARREN_GATEWAY_MAX_GATEWAY_IN_FLIGHT_BYTES")]
    pub max_gateway_in_flight_bytes: usize,
    /// Close connections that send nothing for this long with nothing in flight.
    #[arg(long, env = "WARREN_GATEWAY_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub idle_timeout: Duration,
    /// How long a task may take, publish to result, before the caller gets `timeout`.
    #[arg(long, env = "WARREN_GATEWAY_CALL_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub call_timeout: Duration,
    /// On SIGTERM, how long calls in flight may take to deliver their results.
    #[arg(long, env = "WARREN_GATEWAY_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub shutdown_grace: Duration,
    /// Connections (HTTP, websocket and Text together) held open at most; more are refused.
    #[arg(long, env = "WARREN_GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: NonZeroUsize,
    /// Connections one peer (an IPv4 address or an IPv6 /64) outside --trusted-networks may
    /// hold open at most before they present the token; more are refused.
    #[arg(long, env = "WARREN_GATEWAY_MAX_CONNECTIONS_PER_PEER")]
    pub max_connections_per_peer: NonZeroUsize,
    /// Connections from outside --trusted-networks that have not presented the token (all of
    /// them without a token), from all peers together, held open at most; more are refused.
    /// Default: half of --max-connections.
    #[arg(long, env = "WARREN_GATEWAY_MAX_UNAUTHENTICATED")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_unauthenticated: Option<NonZeroUsize>,
    /// Networks whose connections meet --max-connections only, not the per-peer cap
    /// (comma-separated CIDR blocks). They must still present the token when one is set.
    #[arg(long, env = "WARREN_GATEWAY_TRUSTED_NETWORKS", value_delimiter = ',')]
    pub trusted_networks: Vec<IpNet>,
    /// With a token: how long a connection may take to present it before it is closed.
    #[arg(long, env = "WARREN_GATEWAY_AUTH_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub auth_timeout: Duration,
    /// Origins (besides the gateway's own) whose web pages may open the websocket,
    /// comma-separated, e.g. https://app.example.com; `*` allows any.
    #[arg(long, env = "WARREN_GATEWAY_ALLOW_ORIGIN", value_delimiter = ',')]
    pub allow_origin: Vec<String>,
    /// Listen backlog of both ports: connections the kernel queues before the gateway accepts
    /// them (capped by net.core.somaxconn).
    #[arg(long, env = "WARREN_GATEWAY_LISTEN_BACKLOG")]
    pub listen_backlog: u32,
    /// The task event stream that `GET /api/tasks/<id>` and `{"result": ...}` read (the
    /// workers' `--events-stream`).
    #[arg(long, env = "WARREN_EVENTS_STREAM")]
    pub events_stream: String,
    /// How long that stream keeps events (the workers' `--events-max-age`): what the answer
    /// for a task not found says.
    #[arg(long, env = "WARREN_EVENTS_MAX_AGE", value_parser = humantime::parse_duration)]
    #[serde(with = "warren_shared::config::humantime_serde")]
    pub events_max_age: Duration,
    /// Turn resume off: no resume tokens, no reader of the event stream.
    #[arg(long, env = "WARREN_GATEWAY_NO_RESUME")]
    pub no_resume: bool,
    /// Resume replays running at once; more wait for a place.
    #[arg(long, env = "WARREN_GATEWAY_RESUME_MAX_REPLAYS")]
    pub resume_max_replays: NonZeroUsize,
    /// Bytes of events one websocket session holds while it replays or writes; past them it
    /// reads the stream again rather than hold more.
    #[arg(long, env = "WARREN_GATEWAY_RESUME_BUFFER_BYTES")]
    pub resume_buffer_bytes: usize,
    /// Events one resume reads at most; a client further behind gets resume_expired for
    /// the rest.
    #[arg(long, env = "WARREN_GATEWAY_RESUME_MAX_REPLAY_EVENTS")]
    pub resume_max_replay_events: u64,
    /// Tasks a resume token lists as answered before their event was read (at most 255).
    #[arg(long, env = "WARREN_GATEWAY_RESUME_MAX_UNCONFIRMED")]
    pub resume_max_unconfirmed: usize,
    /// Serve Prometheus metrics (`/metrics`) and health checks (`/healthz`, `/readyz`: ready
    /// while the broker connection is up, an alarm blocking it included) on this address, e.g.
    /// `127.0.0.1:9465`. Off by default; see docs/operations.md.
    #[arg(long, env = "WARREN_METRICS_ADDR", value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let GatewaySettings {
            limits,
            call_timeout,
            shutdown_grace,
            max_connections,
            max_connections_per_peer,
            max_gateway_in_flight_bytes,
            max_unauthenticated,
            trusted_networks,
            auth_timeout,
            allowed_origins,
            resume,
            ..
        } = GatewaySettings::default();
        let Limits {
            allow,
            token,
            max_message_bytes,
            max_in_flight,
            max_batch,
            max_in_flight_bytes,
            idle_timeout,
        } = limits;
        let client = ClientSettings::default();
        Self {
            broker: BrokerConfig::default(),
            queue: None,
            functions_exchange: topology::FUNCTIONS_EXCHANGE.to_owned(),
            http: None,
            text: None,
            insecure_public: false,
            allow: allow.names(),
            token,
            token_file: None,
            no_declare: !client.declare,
            max_message_bytes,
            max_in_flight: NonZeroUsize::new(max_in_flight).unwrap_or(NonZeroUsize::MIN),
            max_batch: NonZeroUsize::new(max_batch).unwrap_or(NonZeroUsize::MIN),
            max_in_flight_bytes,
            max_gateway_in_flight_bytes,
            idle_timeout,
            call_timeout,
            shutdown_grace,
            max_connections: NonZeroUsize::new(max_connections).unwrap_or(NonZeroUsize::MIN),
            max_connections_per_peer: NonZeroUsize::new(max_connections_per_peer)
                .unwrap_or(NonZeroUsize::MIN),
            max_unauthenticated: max_unauthenticated.and_then(NonZeroUsize::new),
            trusted_networks,
            auth_timeout,
            allow_origin: allowed_origins,
            listen_backlog: DEFAULT_LISTEN_BACKLOG,
            events_stream: client.events_stream,
            events_max_age: client.events_max_age,
            metrics: None,
            no_resume: false,
            resume_max_replays: NonZeroUsize::new(resume.max_replays).unwrap_or(NonZeroUsize::MIN),
            resume_buffer_bytes: resume.max_buffer_bytes,
            resume_max_replay_events: resume.max_replay_events,
            resume_max_unconfirmed: resume.max_unconfirmed,
        }
    }
}

impl fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the token is a secret.
        f.debug_struct("GatewayConfig")
            .field("broker", &self.broker)
            .field("queue", &self.queue)
            .field("http", &self.http)
            .field("text", &self.text)
            .finish_non_exhaustive()
    }
}

/// A setting of `warren-gateway` the binary refuses at start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// `--auth-timeout 0s`: with a token, every connection would be closed as it opens.
    #[error(
        "--auth-timeout must be longer than 0s: with a token, every connection would be closed \
         as it opens"
    )]
    ZeroAuthTimeout,
    /// `--listen-backlog 0`: the kernel would queue (almost) no connection.
    #[error("--listen-backlog must be at least 1 (the default is {DEFAULT_LISTEN_BACKLOG})")]
    ZeroListenBacklog,
    /// A byte limit of 0: nothing would ever be accepted.
    #[error("--{0} must be at least 1 byte")]
    ZeroBytes(&'static str),
    /// Byte limits out of order: a request the size limit lets in would never fit in a budget.
    #[error(
        "--max-message-bytes ({message}) must not exceed --max-in-flight-bytes ({connection}), \
         nor that --max-gateway-in-flight-bytes ({gateway}): a message allowed in must fit in \
         what calls may hold"
    )]
    BytesOutOfOrder {
        /// `--max-message-bytes`.
        message: usize,
        /// `--max-in-flight-bytes`.
        connection: usize,
        /// `--max-gateway-in-flight-bytes`.
        gateway: usize,
    },
    /// `--resume-max-unconfirmed` above what a token can list.
    #[error(
        "--resume-max-unconfirmed {0} is more than a resume token lists (at most {max})",
        max = crate::resume::MAX_UNCONFIRMED
    )]
    TooManyUnconfirmed(usize),
    /// An `--allow-origin` entry that is not `scheme://host[:port]` or `*`.
    #[error(transparent)]
    BadOrigin(#[from] BadOrigin),
}

impl GatewayConfig {
    /// Checks what the types do not: no zero durations, backlog or byte limits, byte limits in
    /// order (message <= connection <= gateway), origins that are origins.
    /// The binary calls it once at start-up.
    ///
    /// # Errors
    /// The first [`SettingsError`] found.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.auth_timeout.is_zero() {
            return Err(SettingsError::ZeroAuthTimeout);
        }
        if self.listen_backlog == 0 {
            return Err(SettingsError::ZeroListenBacklog);
        }
        let (message, connection, gateway) = (
            self.max_message_bytes,
            self.max_in_flight_bytes,
            self.max_gateway_in_flight_bytes,
        );
        for (bytes, flag) in [
            (message, "max-message-bytes"),
            (connection, "max-in-flight-bytes"),
            (gateway, "max-gateway-in-flight-bytes"),
        ] {
            if bytes == 0 {
                return Err(SettingsError::ZeroBytes(flag));
            }
        }
        if message > connection || connection > gateway {
            return Err(SettingsError::BytesOutOfOrder {
                message,
                connection,
                gateway,
            });
        }
        for origin in &self.allow_origin {
            normalize_origin(origin)?;
        }
        if self.resume_buffer_bytes == 0 {
            return Err(SettingsError::ZeroBytes("resume-buffer-bytes"));
        }
        if self.resume_max_unconfirmed > crate::resume::MAX_UNCONFIRMED {
            return Err(SettingsError::TooManyUnconfirmed(
                self.resume_max_unconfirmed,
            ));
        }
        Ok(())
    }

    /// The gateway's settings.
    pub fn settings(&self) -> GatewaySettings {
        let Self {
            broker: _,
            queue: _,
            functions_exchange: _,
            http: _,
            text: _,
            insecure_public: _,
            allow,
            token,
            token_file: _,
            no_declare: _,
            max_message_bytes,
            max_in_flight,
            max_batch,
            max_in_flight_bytes,
            max_gateway_in_flight_bytes,
            idle_timeout,
            call_timeout,
            shutdown_grace,
            max_connections,
            max_connections_per_peer,
            max_unauthenticated,
            trusted_networks,
            auth_timeout,
            allow_origin,
            listen_backlog: _,
            events_stream,
            events_max_age: _,
            metrics: _,
            no_resume,
            resume_max_replays,
            resume_buffer_bytes,
            resume_max_replay_events,
            resume_max_unconfirmed,
        } = self.clone();
        GatewaySettings {
            limits: Limits {
                allow: Allowlist::of(&allow),
                token: token.filter(|t| !t.is_empty()),
                max_message_bytes,
                max_in_flight: max_in_flight.get(),
                max_batch: max_batch.get(),
                max_in_flight_bytes,
                idle_timeout,
            },
            call_timeout,
            shutdown_grace,
            max_connections: max_connections.get(),
            max_connections_per_peer: max_connections_per_peer.get(),
            max_gateway_in_flight_bytes,
            max_unauthenticated: max_unauthenticated.map(NonZeroUsize::get),
            trusted_networks,
            auth_timeout,
            allowed_origins: allow_origin
                .into_iter()
                .map(|o| normalize_origin(&o).unwrap_or_else(|_| o.trim().to_owned()))
                .filter(|o| !o.is_empty())
                .collect(),
            resume: ResumeSettings {
                stream: (!no_resume).then_some(events_stream),
                max_replays: resume_max_replays.get(),
                max_buffer_bytes: resume_buffer_bytes,
                max_replay_events: resume_max_replay_events,
                max_unconfirmed: resume_max_unconfirmed,
            },
            ..GatewaySettings::default()
        }
    }

    /// Where the page and the websocket listen: `http`, or the default of [`listen_addr`]
    /// (loopback unless a token is set or `insecure_public`).
    ///
    /// # Errors
    ///
    /// [`ListenError`] for a non-loopback address without a token or `insecure_public`.
    pub fn http_addr(&self) -> Result<SocketAddr, ListenError> {
        listen_addr(
            self.http,
            DEFAULT_HTTP_PORT,
            self.token_set(),
            self.insecure_public,
        )
    }

    /// Where the Text bridge listens; the same rules as [`http_addr`](Self::http_addr).
    ///
    /// # Errors
    ///
    /// [`ListenError`] for a non-loopback address without a token or `insecure_public`.
    pub fn text_addr(&self) -> Result<SocketAddr, ListenError> {
        listen_addr(
            self.text,
            DEFAULT_TEXT_PORT,
            self.token_set(),
            self.insecure_public,
        )
    }

    fn token_set(&self) -> bool {
        self.token.as_deref().is_some_and(|t| !t.is_empty())
    }

    /// Reads the secrets given as files (`token_file`) into the settings; the binary calls it
    /// once at start-up, before [`settings`](Self::settings) and the listen addresses use the
    /// token.
    ///
    /// # Errors
    /// [`BrokerError::SecretFile`] when the file cannot be read or is empty.
    pub fn read_secret_files(mut self) -> Result<Self, BrokerError> {
        if let Some(path) = self.token_file.take() {
            self.token = Some(read_secret_file(&path)?);
        }
        Ok(self)
    }

    /// The settings of the gateway's [`Client`](warren_client::Client).
    ///
    /// # Errors
    /// [`BrokerError::SecretFile`] when the broker URL file cannot be read or is empty.
    pub fn client_settings(&self) -> Result<ClientSettings, BrokerError> {
        Ok(ClientSettings {
            broker: self.broker.to_settings()?,
            declare: !self.no_declare,
            queue: self.queue.clone(),
            functions_exchange: self.functions_exchange.clone(),
            name: warren_shared::broker::process_name("warren-gateway"),
            events_stream: self.events_stream.clone(),
            events_max_age: self.events_max_age,
            ..ClientSettings::default()
        })
    }
}

#[cfg(test)]
mod tests {
    // A failed unwrap is how a test says what went wrong.
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeSet;

    use clap::Command;
    use warren_shared::config::load_from;

    use super::*;

    fn load(file: Option<&str>, flags: &[&str]) -> GatewayConfig {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["warren-gateway".to_owned()];
        if let Some(text) = file {
            let path = dir.path().join("gateway.toml");
            std::fs::write(&path, text).unwrap();
            args.extend(["--config".to_owned(), path.display().to_string()]);
        }
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        load_from(Command::new("warren-gateway"), args).unwrap()
    }

    #[test]
    fn defaults_are_the_libraries() {
        let config = GatewayConfig::default();
        assert_eq!(config.settings().limits, Limits::default());
        assert_eq!(
            config.settings().call_timeout,
            GatewaySettings::default().call_timeout
        );
        assert_eq!(config.http, None);
        let (http, text) = (config.http_addr().unwrap(), config.text_addr().unwrap());
        assert!(http.ip().is_loopback() && text.ip().is_loopback());
        assert_eq!(
            (http.port(), text.port()),
            (DEFAULT_HTTP_PORT, DEFAULT_TEXT_PORT)
        );
        let client = config.client_settings().unwrap();
        assert_eq!(client.queue, None, "routes by function");
        assert_eq!(client.functions_exchange, topology::FUNCTIONS_EXCHANGE);
    }

    #[test]
    fn trusted_networks_and_origins_come_from_the_file_or_the_flags() {
        let defaults = GatewayConfig::default().settings();
        let loopback: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert_eq!(defaults.trusted_networks, loopback);
        assert!(defaults.allowed_origins.is_empty());
        assert_eq!(
            GatewayConfig::default().listen_backlog,
            DEFAULT_LISTEN_BACKLOG
        );
        let file = "trusted_networks = [\"10.0.0.0/8\"]\nallow_origin = [\"https://app.example\"]\n\
                    auth_timeout = \"3s\"\nlisten_backlog = 4096\n";
        let config = load(Some(file), &[]);
        let settings = config.settings();
        assert_eq!(
            settings.trusted_networks,
            ["10.0.0.0/8".parse::<IpNet>().unwrap()]
        );
        assert_eq!(settings.allowed_origins, ["https://app.example"]);
        assert_eq!(settings.auth_timeout, Duration::from_secs(3));
        assert_eq!(config.listen_backlog, 4096);
        let config = load(
            Some(file),
            &[
                "--trusted-networks",
                "192.168.0.0/16,fd00::/8",
                "--allow-origin",
                "*",
            ],
        );
        assert_eq!(config.settings().trusted_networks.len(), 2);
        assert_eq!(config.settings().allowed_origins, ["*"]);
    }

    #[test]
    fn unauthenticated_connections_default_to_half_the_total() {
        let defaults = GatewayConfig::default();
        assert_eq!(defaults.max_unauthenticated, None);
        assert_eq!(
            defaults.settings().max_unauthenticated(),
            crate::DEFAULT_MAX_CONNECTIONS / 2
        );
        let config = load(None, &["--max-connections", "100"]);
        assert_eq!(config.settings().max_unauthenticated(), 50);
        let config = load(
            Some("max_unauthenticated = 7\n"),
            &["--max-connections", "100"],
        );
        assert_eq!(config.settings().max_unauthenticated(), 7);
    }

    #[test]
    fn zero_deadlines_zero_backlogs_and_bad_origins_are_refused_at_start() {
        assert_eq!(GatewayConfig::default().validate(), Ok(()));
        let refused = |flags: &[&str]| load(None, flags).validate().unwrap_err();
        assert_eq!(
            refused(&["--auth-timeout", "0s"]),
            SettingsError::ZeroAuthTimeout
        );
        assert_eq!(
            refused(&["--listen-backlog", "0"]),
            SettingsError::ZeroListenBacklog
        );
        assert_eq!(
            refused(&["--max-in-flight-bytes", "0"]),
            SettingsError::ZeroBytes("max-in-flight-bytes")
        );
        assert_eq!(
            refused(&["--max-message-bytes", "0"]),
            SettingsError::ZeroBytes("max-message-bytes")
        );
        let order = refused(&["--max-gateway-in-flight-bytes", "1000"]);
        assert!(
            matches!(order, SettingsError::BytesOutOfOrder { gateway: 1000, .. }),
            "{order:?}"
        );
        assert!(
            order
                .to_string()
                .contains("--max-in-flight-bytes (16777216)"),
            "{order}"
        );
        assert_eq!(
            load(
                None,
                &[
                    "--max-message-bytes",
                    "100",
                    "--max-in-flight-bytes",
                    "100",
                    "--max-gateway-in-flight-bytes",
                    "100"
                ]
            )
            .validate(),
            Ok(())
        );
        let bad = refused(&["--allow-origin", "https://ok.example,app.example"]);
        assert!(
            bad.to_string().contains("\"app.example\"") && bad.to_string().contains("scheme://"),
            "{bad}"
        );
        let config = load(None, &["--allow-origin", "https://App.example:443/,*"]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            config.settings().allowed_origins,
            ["https://app.example", "*"]
        );
    }

    #[test]
    fn the_allowlist_is_a_list_in_the_file_and_comma_separated_on_the_command_line() {
        let only = |names: &[&str]| {
            Allowlist::Only(
                names
                    .iter()
                    .map(|n| (*n).to_owned())
                    .collect::<BTreeSet<_>>(),
            )
        };
        let file = "allow = [\"echo\", \"resize\"]\nmax_in_flight = 7\n";
        let config = load(Some(file), &[]);
        assert_eq!(config.settings().limits.allow, only(&["echo", "resize"]));
        assert_eq!(config.settings().limits.max_in_flight, 7);
        let config = load(Some(file), &["--allow", "a,b"]);
        assert_eq!(config.settings().limits.allow, only(&["a", "b"]));
        assert_eq!(
            load(None, &["--allow", "*"]).settings().limits.allow,
            Allowlist::Any
        );
    }
}
