//! Stopping: no new deliveries, in-flight tasks finish within the grace period, the rest are
//! handed back, then both connections close.

use std::time::Duration;

use lapin::options::BasicCancelOptions;

use crate::consumer::Session;
use crate::health::WorkerState;
use crate::supervisor::Supervisor;

impl Supervisor {
    /// Stops taking deliveries, waits for in-flight tasks within the grace period, then aborts
    /// the rest and closes: the broker requeues whatever was not acked.
    pub(crate) async fn drain(&self, session: Option<&Session>) {
        self.set_state(WorkerState::Stopping, None);
        if let Some(session) = session {
            let _ = session
                .channel
                .basic_cancel(session.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        self.tracker.close();
        if !self.tracker.is_empty() {
            tracing::info!(in_flight = self.tracker.len(), grace = ?self.settings.shutdown_grace, "draining in-flight tasks");
        }
        if tokio::time::timeout(self.settings.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                unfinished = self.tracker.len(),
                "grace period over; handing unfinished tasks back to the queue"
            );
            self.abort.cancel();
            // Let the aborted tasks send their nacks before the channel closes.
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        }
        if let Some(session) = session {
            let _ = session.channel.close(200, "worker stopping".into()).await;
        }
        self.consume.close().await;
        self.publish.close().await;
        self.set_state(WorkerState::Stopped, None);
        tracing::info!("worker stopped");
    }
}
