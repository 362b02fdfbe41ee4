//! The broker flags every binary shares beyond `--amqp-url`: the URL from a file (so the
//! password is not in the process's argv) and the TLS certificates for `amqps://`.
//!
//! Flattened into the worker's, the gateway's and the CLI's arguments, so the three spell and
//! document them the same way. Behind the `cli` feature (clap), which libraries need not pull in.

use std::path::PathBuf;

use crate::broker::{BrokerError, BrokerSettings, TlsSettings};

/// `--amqp-url-file`, `--tls-ca`, `--tls-cert`, `--tls-key` and their environment variables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BrokerArgs {
    /// File holding the broker URL (overrides --amqp-url); keeps the password out of argv and
    /// the environment. Surrounding whitespace and the trailing newline are ignored.
    #[arg(long, global = true, env = "WARREN_AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,
    /// PEM file of CA certificates that sign the broker's certificate, trusted in addition to
    /// the system's roots (`amqps://` only).
    #[arg(long, global = true, env = "WARREN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for a broker that requires one (`amqps://` only; needs --tls-key).
    #[arg(long, global = true, env = "WARREN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (unencrypted).
    #[arg(long, global = true, env = "WARREN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl BrokerArgs {
    /// `settings` with the URL read from `--amqp-url-file` (when given) and the TLS files set.
    ///
    /// # Errors
    /// [`BrokerError::SecretFile`] when the URL file cannot be read or is empty.
    pub fn apply(&self, settings: BrokerSettings) -> Result<BrokerSettings, BrokerError> {
        let settings = match &self.amqp_url_file {
            Some(path) => settings.with_url_file(path)?,
            None => settings,
        };
        Ok(BrokerSettings {
            tls: TlsSettings {
                ca_file: self.tls_ca.clone(),
                cert_file: self.tls_cert.clone(),
                key_file: self.tls_key.clone(),
            },
            ..settings
        })
    }
}
