//! The Prometheus series recorded by code every Warren process shares (publish confirms,
//! connection recovery). `docs/operations.md` describes each one.
//!
//! Recording goes through the `metrics` facade: without an installed recorder (a process started
//! without `--metrics`) every call here is a cheap no-op. The worker and the gateway install
//! the recorder and serve it; their own series live in their `metrics` modules.

use std::sync::OnceLock;
use std::time::Instant;

pub use metrics_exporter_prometheus::{BuildError, PrometheusHandle};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::link::{Link, LinkState};
use crate::pool::PublishError;

/// Histogram: publish to broker confirm, in seconds (successful publishes only).
pub const PUBLISH_CONFIRM_SECONDS: &str = "warren_publish_confirm_duration_seconds";
/// Counter: publishes that did not end in a confirm, by `reason`.
pub const PUBLISH_FAILURES: &str = "warren_publish_failures_total";
/// Counter: times a connection came back up after being lost, by `connection`.
pub const RECONNECTS: &str = "warren_reconnects_total";

/// Histogram buckets (seconds) of every `_seconds` histogram: 5 ms to 30 min.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often buffered histogram samples are folded into buckets when nobody scrapes.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// Until then, nothing is recorded.
///
/// # Errors
/// [`BuildError`] when another recorder is already installed in this process.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    // One installer at a time: two first callers would both try to set the global recorder.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)?
        .install_recorder()?;
    // Histogram samples are buffered until folded into their buckets: by a scrape, or by this
    // upkeep, so that memory stays bounded when nobody scrapes.
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms fold on scrape only");
    }
    metrics::describe_histogram!(
        PUBLISH_CONFIRM_SECONDS,
        metrics::Unit::Seconds,
        "Publish to broker confirm."
    );
    metrics::describe_counter!(
        PUBLISH_FAILURES,
        "Publishes that did not end in a confirm, by reason."
    );
    metrics::describe_counter!(RECONNECTS, "Times a lost connection came back up.");
    // Every failure reason from 0, so that rates and alerts see the first one.
    for reason in FAILURE_REASONS {
        metrics::counter!(PUBLISH_FAILURES, "reason" => reason).increment(0);
    }
    Ok(HANDLE.get_or_init(|| handle).clone())
}

/// Whether [`install`] has run: label values that cost work to compute are skipped otherwise.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// The `reason` label values of [`PUBLISH_FAILURES`].
const FAILURE_REASONS: [&str; 5] = ["timeout", "no_channel", "nacked", "unroutable", "channel"];

/// Records one [`crate::pool::publish_confirmed`] call.
pub fn publish_confirmed(started: Instant, result: &Result<(), PublishError>) {
    match result {
        Ok(()) => {
            if !enabled() {
                return;
            }
            // Looked up in the registry once, not on every publish.
            static CONFIRMS: OnceLock<metrics::Histogram> = OnceLock::new();
            CONFIRMS
                .get_or_init(|| metrics::histogram!(PUBLISH_CONFIRM_SECONDS))
                .record(started.elapsed().as_secs_f64());
        }
        Err(e) => publish_failed(e),
    }
}

/// Records a publish that failed before it could be confirmed.
pub fn publish_failed(e: &PublishError) {
    let reason = FAILURE_REASONS[match e {
        PublishError::Timeout(_) => 0,
        PublishError::NoChannel(_) => 1,
        PublishError::Nacked { .. } => 2,
        PublishError::Unroutable { .. } => 3,
        PublishError::Channel(_) => 4,
    }];
    metrics::counter!(PUBLISH_FAILURES, "reason" => reason).increment(1);
}

/// Counts the reconnects of `link` under `connection` (e.g. `consume`, `publish`) for as long
/// as the link lives: every time it comes back up after being down.
pub fn watch_link(link: &Link, connection: &'static str) {
    // From 0, so that `increase()` sees the first reconnect.
    metrics::counter!(RECONNECTS, "connection" => connection).increment(0);
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
