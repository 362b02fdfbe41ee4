//! Tracing set-up for Warren's binaries: `RUST_LOG`-style filtering with a default directive,
//! human-readable output by default and JSON lines when `WARREN_LOG_FORMAT=json`. Logs go to
//! stderr so that a command's result on stdout stays machine-readable.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `default_directive` applies when `RUST_LOG` is unset, e.g.
/// `"info"` or `"warn,warren_worker=info"`. Calling it twice is harmless (the second call is
/// ignored), which keeps tests simple.
///
/// Unless `RUST_LOG` says otherwise, lapin's own log lines are off: it logs every failed
/// reconnect attempt at error level, while Warren logs each change of connection state once.
/// `RUST_LOG=info,lapin=warn` brings them back.
pub fn init(default_directive: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_directive},lapin=off")));
    let json = std::env::var("WARREN_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
