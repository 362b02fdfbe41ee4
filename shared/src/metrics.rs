//! The Prometheus series recorded by code every Warren process shares (publish confirms,
//! connection recovery). `docs/operations.md` describes each one.
//!
//! Recording goes through the `metrics` facade: without an installed recorder (a process started
//! without `--metrics`) every call here is a cheap no-op. The worker and the gateway install
//! the recorder and serve it; their own series live in their `metrics` modules.

use std::time::Instant;

use crate::link::{Link, LinkState};
use crate::pool::PublishError;

/// Histogram: publish to broker confirm, in seconds (successful publishes only).
pub const PUBLISH_CONFIRM_SECONDS: &str = "warren_publish_confirm_duration_seconds";
/// Counter: publishes that did not end in a confirm, by `reason`.
pub const PUBLISH_FAILURES: &str = "warren_publish_failures_total";
/// Counter: times a connection came back up after being lost, by `connection`.
pub const RECONNECTS: &str = "warren_reconnects_total";

/// Records one [`crate::pool::publish_confirmed`] call.
pub fn publish_confirmed(started: Instant, result: &Result<(), PublishError>) {
    match result {
        Ok(()) => {
            metrics::histogram!(PUBLISH_CONFIRM_SECONDS).record(started.elapsed().as_secs_f64());
        }
        Err(e) => {
            let reason = match e {
                PublishError::Timeout(_) => "timeout",
                PublishError::NoChannel(_) => "no_channel",
                PublishError::Nacked { .. } => "nacked",
                PublishError::Unroutable { .. } => "unroutable",
                PublishError::Channel(_) => "channel",
            };
            metrics::counter!(PUBLISH_FAILURES, "reason" => reason).increment(1);
        }
    }
}

/// Counts the reconnects of `link` under `connection` (e.g. `consume`, `publish`) for as long
/// as the link lives: every time it comes back up after being down.
pub fn watch_link(link: &Link, connection: &'static str) {
    let mut states = link.subscribe();
    tokio::spawn(async move {
        // Blocked by an alarm is still connected: only Down (or Closed) to Up is a reconnect.
        let connected =
            |state: &LinkState| matches!(state, LinkState::Up | LinkState::Blocked { .. });
        let mut was_up = connected(&states.borrow());
        while states.changed().await.is_ok() {
            let up = connected(&states.borrow_and_update());
            if up && !was_up {
                metrics::counter!(RECONNECTS, "connection" => connection).increment(1);
            }
            was_up = up;
        }
    });
}
