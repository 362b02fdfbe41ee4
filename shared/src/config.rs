//! Layered configuration for the binaries: defaults < TOML file < environment < flags.
//!
//! A binary describes its settings once, as one struct that is at the same time its command
//! line (`clap::Args`: `--flag`, `env = "WARREN_..."`, the doc comment is the help) and its file
//! format (serde, `deny_unknown_fields`). The struct's `Default` is built from the library's own
//! settings defaults (`WorkerSettings::default()`, `Limits::default()`, ...), which are the only
//! place a default value is written: [`command`] copies them into clap, so `--help` shows them,
//! and [`load_from`] layers
//!
//! 1. those defaults,
//! 2. the TOML file named by `--config FILE` or [`CONFIG_ENV`] (a missing file is an error),
//! 3. the environment variables of the flags (clap's `env`), and
//! 4. the flags,
//!
//! with figment, each layer only where it says something. The environment and the flags are the
//! values clap reports as coming from the environment or the command line, never its defaults,
//! so a file is not overridden by a default. Environment variables are named per flag (they
//! stay as documented, e.g. `AMQP_URL`, `WARREN_GATEWAY_HTTP`), so an unrelated `WARREN_*`
//! variable never breaks a start.
//!
//! Keys in the file are the struct's field names (`max_attempts`), durations are humantime
//! strings (`"30s"`, `"5m"`), and an unknown key or a bad value is a [`ConfigError::Setting`]
//! that names the key and the file.
//!
//! Adding a setting: add one field (doc comment, `#[arg(long, env = ...)]`, serde attributes for
//! its type) to the binary's config struct, and let the compiler show the two conversions (from
//! the library defaults, into the library settings) that must map it. Field names are the flag
//! ids and the file keys at once: never rename one on only one side.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{Resettable, StyledStr};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::broker::{BrokerError, BrokerSettings, Reconnect};
use crate::cli::BrokerArgs;

/// Re-exported for the config structs' duration fields:
/// `#[serde(with = "warren_shared::config::humantime_serde")]`.
pub use humantime_serde;

/// The environment variable that names the configuration file, like `--config`.
pub const CONFIG_ENV: &str = "WARREN_CONFIG";

/// The id (and long name) of the `--config` flag.
const CONFIG_ARG: &str = "config";

/// A binary's settings: its flags, its file format and its defaults, in one struct.
///
/// Implemented for every type that is `clap::Args + Serialize + DeserializeOwned + Default`.
pub trait Layered: clap::Args + Serialize + DeserializeOwned + Default {}

impl<T> Layered for T where T: clap::Args + Serialize + DeserializeOwned + Default {}

/// Why settings could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The command line is wrong, or asked for `--help` or `--version`: clap's own error,
    /// which prints itself and exits with the right status (`clap::Error::exit`).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// A setting is unknown or has a bad value.
    #[error("{origin}: {}{message}", keyed(.key))]
    Setting {
        /// Where it was set: the file's path, or the layer's name.
        origin: String,
        /// The key, dotted for nested tables (`broker.heartbeat`); empty for the whole file.
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn keyed(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("key `{key}`: ")
    }
}

impl ConfigError {
    fn from_figment(error: figment::Error) -> Self {
        let origin = match &error.metadata {
            Some(md) => match md.source.as_ref().and_then(|s| s.file_path()) {
                Some(path) => path.display().to_string(),
                None => md.name.to_string(),
            },
            None => "settings".to_owned(),
        };
        let mut path = error.path.clone();
        let message = match &error.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!("unknown key (known keys here: {})", expected.join(", "))
            }
            kind => kind.to_string().trim_end().to_owned(),
        };
        Self::Setting {
            origin,
            key: path.join("."),
            message,
        }
    }
}

/// `cmd` with the flags of `C`, the `--config FILE` flag, and `C::default()`'s values as the
/// flags' defaults (so that `--help` shows them).
pub fn command<C: Layered>(cmd: Command) -> Command {
    // The config struct's doc comment is for Rust readers; the program keeps its own about.
    let (about, long_about) = (cmd.get_about().cloned(), cmd.get_long_about().cloned());
    let mut cmd = C::augment_args(cmd);
    cmd = cmd
        .about(resettable(about))
        .long_about(resettable(long_about));
    let cmd = cmd.arg(
        Arg::new(CONFIG_ARG)
            .long(CONFIG_ARG)
            .env(CONFIG_ENV)
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help("TOML file of settings (keys are the flags' names with `_`); the environment and flags override it"),
    );
    let mut leaves = Vec::new();
    collect_leaves(to_json(&C::default()), &mut leaves);
    leaves.into_iter().fold(cmd, |cmd, (id, value)| {
        if !has_arg(&cmd, &id) {
            return cmd;
        }
        match value {
            Value::String(s) => cmd.mut_arg(id, |a| a.default_value(s).required(false)),
            Value::Number(n) => cmd.mut_arg(id, |a| a.default_value(n.to_string()).required(false)),
            Value::Bool(b) => cmd.mut_arg(id, |a| a.default_value(b.to_string()).required(false)),
            Value::Array(items) if !items.is_empty() => {
                let items: Vec<String> = items.iter().map(scalar_text).collect();
                cmd.mut_arg(id, |a| a.default_values(items).required(false))
            }
            _ => cmd,
        }
    })
}

/// Loads `C` from the process's command line, environment and configuration file.
///
/// # Errors
/// As [`load_from`].
pub fn load<C: Layered>(cmd: Command) -> Result<C, ConfigError> {
    load_from(cmd, std::env::args_os())
}

/// Loads `C` from `args` (the program name first), the environment and the configuration file
/// they name, layered as the [module](self) describes.
///
/// # Errors
/// [`ConfigError::Cli`] for a bad command line (and `--help`/`--version`),
/// [`ConfigError::Setting`] for a missing or unreadable file, an unknown key or a bad value.
pub fn load_from<C, I, T>(cmd: Command, args: I) -> Result<C, ConfigError>
where
    C: Layered,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cmd = command::<C>(cmd);
    let matches = cmd.clone().try_get_matches_from(args)?;
    let given = given_only(&cmd, &matches, to_json(&C::from_arg_matches(&matches)?));
    let mut figment = Figment::from(Serialized::defaults(C::default()));
    if let Some(file) = matches.get_one::<PathBuf>(CONFIG_ARG) {
        figment = figment.merge(Toml::file_exact(file));
    }
    figment
        .merge(Serialized::defaults(given))
        .extract()
        .map_err(ConfigError::from_figment)
}

fn to_json<T: Serialize>(value: &T) -> Value {
    // Settings structs serialize to JSON objects; anything else has no defaults to show.
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn resettable(text: Option<StyledStr>) -> Resettable<StyledStr> {
    text.map_or(Resettable::Reset, Resettable::Value)
}

fn has_arg(cmd: &Command, id: &str) -> bool {
    cmd.get_arguments().any(|a| a.get_id() == id)
}

/// Every non-table value of `value`, by its key (nested tables are the flattened arg groups).
fn collect_leaves(value: Value, out: &mut Vec<(String, Value)>) {
    if let Value::Object(map) = value {
        for (key, value) in map {
            if value.is_object() {
                collect_leaves(value, out);
            } else {
                out.push((key, value));
            }
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The parts of `value` (the parsed command line) that came from a flag or its environment
/// variable, not from a default.
fn given_only(cmd: &Command, matches: &ArgMatches, value: Value) -> Value {
    let Value::Object(map) = value else {
        return Value::Object(serde_json::Map::new());
    };
    let kept: serde_json::Map<String, Value> = map
        .into_iter()
        .filter_map(|(key, value)| {
            if has_arg(cmd, &key) {
                matches!(
                    matches.value_source(&key),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
                .then_some((key, value))
            } else if value.is_object() {
                let inner = given_only(cmd, matches, value);
                let empty = inner.as_object().is_none_or(serde_json::Map::is_empty);
                (!empty).then_some((key, inner))
            } else {
                None
            }
        })
        .collect();
    Value::Object(kept)
}

/// A retry backoff schedule: delays between attempts, written `1s,10s` on the command line and
/// as `"1s,10s"` or `["1s", "10s"]` in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff(pub Vec<Duration>);

impl FromStr for Backoff {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.split(',')
            .map(|part| {
                humantime::parse_duration(part.trim()).map_err(|e| format!("{part:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }
}

impl fmt::Display for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Serialize for Backoff {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Backoff {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            List(Vec<String>),
        }
        let text = match Form::deserialize(deserializer)? {
            Form::Text(text) => text,
            Form::List(parts) => parts.join(","),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The broker settings every binary shares: `--amqp-url` and how connections are kept.
///
/// In a file they are the `[broker]` table.
#[derive(Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Broker URL (the vhost `/` is `%2f`), or several separated by commas (cluster nodes,
    /// tried in a shuffled order on connect and every reconnect); `amqps://` for TLS,
    /// `?heartbeat=N` overrides --heartbeat.
    #[arg(long, env = "AMQP_URL", hide_env_values = true)]
    pub amqp_url: String,
    /// Heartbeat interval when the URL sets none; a dead peer is noticed after two misses.
    #[arg(long, env = "WARREN_HEARTBEAT", value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde")]
    pub heartbeat: Duration,
    /// Bound on establishing one connection (TCP, TLS, AMQP handshake).
    #[arg(long, env = "WARREN_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde")]
    pub connect_timeout: Duration,
    /// First delay between reconnection attempts (doubling, with jitter).
    #[arg(long, env = "WARREN_RECONNECT_MIN_DELAY", value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde")]
    pub reconnect_min_delay: Duration,
    /// Largest delay between reconnection attempts.
    #[arg(long, env = "WARREN_RECONNECT_MAX_DELAY", value_parser = humantime::parse_duration)]
    #[serde(with = "crate::config::humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// Give up (exit non-zero) after this many failed attempts to reconnect; default: never.
    #[arg(long, env = "WARREN_RECONNECT_MAX_ATTEMPTS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconnect_max_attempts: Option<usize>,
    /// Replace a broker connection older than about this (e.g. `30m`), between tasks, by one
    /// to a random address, so connections spread back to a cluster node that returned;
    /// default: keep a connection until it is lost.
    #[arg(long, env = "WARREN_CONNECTION_LIFETIME", value_parser = humantime::parse_duration)]
    #[serde(
        with = "crate::config::humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_lifetime: Option<Duration>,
    /// File holding the broker URL (overrides amqp_url); keeps the password out of argv and
    /// the environment. Surrounding whitespace and the trailing newline are ignored.
    #[arg(long, env = "WARREN_AMQP_URL_FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp_url_file: Option<PathBuf>,
    /// PEM file of CA certificates that sign the broker's certificate, trusted in addition to
    /// the system's roots (`amqps://` only).
    #[arg(long, env = "WARREN_TLS_CA")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for a broker that requires one (`amqps://` only; needs tls_key).
    #[arg(long, env = "WARREN_TLS_CERT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of tls_cert (unencrypted).
    #[arg(long, env = "WARREN_TLS_KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let BrokerSettings {
            url,
            heartbeat,
            connect_timeout,
            reconnect,
            max_lifetime,
            tls,
            ..
        } = BrokerSettings::default();
        Self {
            amqp_url: url,
            heartbeat,
            connect_timeout,
            reconnect_min_delay: reconnect.min_delay,
            reconnect_max_delay: reconnect.max_delay,
            reconnect_max_attempts: reconnect.max_attempts,
            connection_lifetime: max_lifetime,
            amqp_url_file: None,
            tls_ca: tls.ca_file,
            tls_cert: tls.cert_file,
            tls_key: tls.key_file,
        }
    }
}

impl fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // BrokerSettings hides the password.
        fmt::Debug::fmt(&self.base_settings(), f)
    }
}

impl BrokerConfig {
    /// The library's broker settings, with the URL read from `amqp_url_file` when one is set
    /// and the TLS files applied.
    ///
    /// # Errors
    /// [`BrokerError::SecretFile`] when the URL file cannot be read or is empty.
    pub fn to_settings(&self) -> Result<BrokerSettings, BrokerError> {
        BrokerArgs {
            amqp_url_file: self.amqp_url_file.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
        .apply(self.base_settings())
    }

    /// The settings without reading any file (for `Debug`).
    fn base_settings(&self) -> BrokerSettings {
        let Self {
            amqp_url,
            heartbeat,
            connect_timeout,
            reconnect_min_delay,
            reconnect_max_delay,
            reconnect_max_attempts,
            connection_lifetime,
            amqp_url_file: _,
            tls_ca: _,
            tls_cert: _,
            tls_key: _,
        } = self.clone();
        BrokerSettings {
            url: amqp_url,
            heartbeat,
            connect_timeout,
            reconnect: Reconnect {
                min_delay: reconnect_min_delay,
                max_delay: reconnect_max_delay,
                max_attempts: reconnect_max_attempts,
            },
            max_lifetime: connection_lifetime,
            ..BrokerSettings::default()
        }
    }
}

#[cfg(test)]
mod tests {
    // A failed unwrap is how a test says what went wrong; figment::Jail's closures return
    // figment's own (large) error type.
    #![allow(clippy::unwrap_used, clippy::result_large_err)]

    use std::path::Path;

    use figment::Jail;

    use super::*;

    /// A binary's settings in miniature: a nested broker table and one field of each kind.
    #[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        #[command(flatten)]
        broker: BrokerConfig,
        #[arg(long, env = "WARREN_CONFIG_TEST_NAME")]
        name: String,
        #[arg(long, env = "WARREN_CONFIG_TEST_COUNT")]
        count: u32,
        #[arg(long, env = "WARREN_CONFIG_TEST_LIMIT", value_parser = humantime::parse_duration)]
        #[serde(with = "crate::config::humantime_serde")]
        limit: Duration,
        #[arg(long, env = "WARREN_CONFIG_TEST_BACKOFF")]
        backoff: Backoff,
        #[arg(long, env = "WARREN_CONFIG_TEST_LOUD")]
        loud: bool,
        #[arg(long, env = "WARREN_CONFIG_TEST_CA")]
        #[serde(skip_serializing_if = "Option::is_none")]
        ca: Option<PathBuf>,
    }

    impl Default for Demo {
        fn default() -> Self {
            Self {
                broker: BrokerConfig::default(),
                name: "default-name".into(),
                count: 7,
                limit: Duration::from_secs(90),
                backoff: Backoff(vec![Duration::from_secs(1), Duration::from_secs(10)]),
                loud: false,
                ca: None,
            }
        }
    }

    fn load(args: &[&str]) -> Result<Demo, ConfigError> {
        load_from(
            Command::new("demo"),
            std::iter::once("demo").chain(args.iter().copied()),
        )
    }

    fn setting_error(result: Result<Demo, ConfigError>) -> (String, String, String) {
        match result {
            Err(ConfigError::Setting {
                origin,
                key,
                message,
            }) => (origin, key, message),
            other => panic!("expected a setting error, got {other:?}"),
        }
    }

    #[test]
    fn file_overrides_defaults_env_overrides_file_flags_override_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "warren.toml",
                "name = \"from-file\"\ncount = 1\nlimit = \"1m\"\n\n[broker]\nheartbeat = \"5s\"\n",
            )?;
            jail.set_env("WARREN_CONFIG_TEST_COUNT", "2");
            jail.set_env("WARREN_CONFIG_TEST_LIMIT", "2m");
            let demo = load(&["--config", "warren.toml", "--limit", "3m"]).unwrap();
            assert_eq!(demo.name, "from-file", "file over default");
            assert_eq!(demo.count, 2, "environment over file");
            assert_eq!(
                demo.limit,
                Duration::from_secs(180),
                "flag over environment"
            );
            assert_eq!(
                demo.broker.heartbeat,
                Duration::from_secs(5),
                "nested table"
            );
            assert_eq!(demo.backoff, Demo::default().backoff, "untouched default");
            assert_eq!(
                demo.broker.connect_timeout,
                BrokerSettings::default().connect_timeout
            );

            // The file may also come from WARREN_CONFIG.
            jail.set_env(CONFIG_ENV, "warren.toml");
            assert_eq!(load(&[]).unwrap().name, "from-file");
            Ok(())
        });
    }

    #[test]
    fn switches_and_optional_paths_layer_like_the_rest() {
        Jail::expect_with(|jail| {
            jail.create_file("on.toml", "loud = true\nca = \"/etc/ca.pem\"\n")?;
            let demo = load(&["--config", "on.toml"]).unwrap();
            assert!(demo.loud, "an absent switch leaves the file's value");
            assert_eq!(demo.ca.as_deref(), Some(Path::new("/etc/ca.pem")));
            let demo = load(&["--config", "on.toml", "--ca", "/tmp/other.pem"]).unwrap();
            assert_eq!(demo.ca.as_deref(), Some(Path::new("/tmp/other.pem")));
            assert!(load(&["--loud"]).unwrap().loud);
            let demo = load(&[]).unwrap();
            assert!(!demo.loud && demo.ca.is_none());
            Ok(())
        });
    }

    #[test]
    fn help_shows_the_defaults_of_the_library() {
        let cmd = command::<Demo>(Command::new("demo"));
        let default_of = |id: &str| -> Vec<String> {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap()
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(default_of("limit"), ["1m 30s"]);
        assert_eq!(default_of("backoff"), ["1s,10s"]);
        assert_eq!(default_of("count"), ["7"]);
        assert_eq!(default_of("heartbeat"), ["15s"]);
        assert!(
            default_of("reconnect_max_attempts").is_empty(),
            "unset means never"
        );
        let help = cmd.clone().render_long_help().to_string();
        assert!(help.contains("[default: \"1m 30s\"]"), "{help}");
    }

    #[test]
    fn an_unknown_key_is_named_with_its_file() {
        Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "[broker]\nheartbeet = \"1s\"\n")?;
            let (origin, key, message) = setting_error(load(&["--config", "typo.toml"]));
            assert!(origin.ends_with("typo.toml"), "{origin}");
            assert_eq!(key, "broker.heartbeet");
            assert!(
                message.contains("heartbeat"),
                "lists the known keys: {message}"
            );

            jail.create_file("top.toml", "nmae = \"x\"\n")?;
            let error = load(&["--config", "top.toml"]).unwrap_err().to_string();
            assert!(
                error.contains("top.toml") && error.contains("`nmae`"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_bad_duration_names_its_key() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "limit = \"soon\"\n")?;
            let (origin, key, message) = setting_error(load(&["--config", "bad.toml"]));
            assert!(origin.ends_with("bad.toml"), "{origin}");
            assert_eq!(key, "limit");
            assert!(message.contains("soon"), "{message}");
            Ok(())
        });
    }

    #[test]
    fn a_missing_file_and_a_bad_flag_are_errors() {
        Jail::expect_with(|_| {
            let (origin, _, _) = setting_error(load(&["--config", "nowhere.toml"]));
            assert!(origin.ends_with("nowhere.toml"), "{origin}");
            assert!(matches!(
                load(&["--count", "many"]),
                Err(ConfigError::Cli(_))
            ));
            Ok(())
        });
    }

    #[test]
    fn backoff_reads_both_forms_and_prints_the_flag_form() {
        Jail::expect_with(|jail| {
            jail.create_file("list.toml", "backoff = [\"250ms\", \"1m\"]\n")?;
            let demo = load(&["--config", "list.toml"]).unwrap();
            let expected = Backoff(vec![Duration::from_millis(250), Duration::from_secs(60)]);
            assert_eq!(demo.backoff, expected);
            assert_eq!(expected.to_string(), "250ms,1m");
            assert_eq!("250ms, 1m".parse::<Backoff>().unwrap(), expected);
            assert!("1s,later".parse::<Backoff>().is_err());
            Ok(())
        });
    }
}
