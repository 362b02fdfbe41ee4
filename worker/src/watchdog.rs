//! The watchdog: an idle worker next to a queue with ready tasks has a dead consumer.

use std::sync::atomic::Ordering;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::consumer::Session;
use crate::supervisor::Supervisor;

impl Supervisor {
    /// `Some(problem)` when this worker has free slots and is connected, and yet receives nothing
    /// while its queue has ready tasks (or its consumer is gone). Tasks still running (or stuck)
    /// do not hide a dead consumer; if the consumer is rebuilt under them, their deliveries come
    /// back as redeliveries. Called on every watchdog tick; the consumer is rebuilt after two
    /// such ticks in a row.
    pub(crate) async fn starving(&self, session: &Session) -> Option<String> {
        // Busy on every slot is not starving; neither is a recent delivery.
        if self.shared.in_flight.load(Ordering::SeqCst) >= usize::from(self.settings.concurrency)
            || self.shared.since_last_delivery() < self.settings.watchdog_interval
        {
            return None;
        }
        let connection = self.consume.connection();
        if !connection.status().connected() {
            // The link is replacing it; the consumer loop sees the new generation.
            return None;
        }
        if !session.channel.status().connected() {
            return Some("consume channel closed".to_owned());
        }
        let probe = connection.create_channel().await.ok()?;
        let declared = probe
            .queue_declare(
                self.settings.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = probe.close(200, "watchdog probe".into()).await;
        match declared {
            Err(e) => Some(format!("queue check failed: {e}")),
            Ok(q) if q.message_count() > 0 => Some(format!(
                "{} tasks ready but nothing delivered for {:?}",
                q.message_count(),
                self.shared.since_last_delivery()
            )),
            Ok(q) if q.consumer_count() == 0 => {
                Some("the broker lists no consumer on the queue".to_owned())
            }
            Ok(_) => None,
        }
    }
}
