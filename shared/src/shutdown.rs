//! Signals for Warren's long-running binaries: the first SIGTERM or SIGINT asks for a graceful
//! stop (the caller's cancellation token), a second one exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` on the first SIGTERM or SIGINT, logging `stopping` (what the process does
/// now), and exits the process with status 130 on the second. For a worker, whatever was not
/// acked by then is redelivered by the broker.
pub async fn on_signals(shutdown: CancellationToken, stopping: &'static str) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop this process with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("stopping: {stopping} (signal again to force)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}
