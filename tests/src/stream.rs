//! A task event stream of one test's own, and events appended to it as a worker appends them
//! (`Event::properties`, the JSON body, the default exchange with the stream's name as routing
//! key, mandatory, confirmed).

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use warren_shared::events::{self, Event, EventKind, Subject};

use crate::amqp_url;

/// A stream `test.events.<label>.<uuid>`, declared with the default retention, deleted by
/// [`TestStream::delete`] or, when a test fails before, when dropped.
pub struct TestStream {
    /// The stream's name.
    pub name: String,
    connection: Option<Connection>,
    channel: Channel,
}

impl std::fmt::Debug for TestStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestStream")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestStream {
    /// Declares a fresh stream for the test `label`.
    ///
    /// # Panics
    /// When the broker cannot be reached or refuses the stream.
    pub async fn new(label: &str) -> Self {
        crate::init_tracing();
        let name = format!("test.events.{label}.{}", uuid::Uuid::new_v4().simple());
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the test broker: {e}"));
        let channel = connection
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("cannot open a channel: {e}"));
        events::declare_stream(&channel, &name, events::DEFAULT_MAX_AGE, 1 << 30)
            .await
            .unwrap_or_else(|e| panic!("cannot declare the stream {name}: {e}"));
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cannot select confirms: {e}"));
        Self {
            name,
            connection: Some(connection),
            channel,
        }
    }

    /// Appends `event` and waits for the broker's confirm.
    ///
    /// # Panics
    /// When the broker does not confirm it.
    pub async fn append(&self, event: &Event) {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &event.to_body(),
                event.properties(),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", self.name))
            .await
            .unwrap_or_else(|e| panic!("no confirm from {}: {e}", self.name));
        assert!(
            matches!(confirm, Confirmation::Ack(None)),
            "{} did not take the event: {confirm:?}",
            self.name
        );
    }

    /// Appends each of `events`, in order.
    pub async fn append_all(&self, events: &[Event]) {
        for event in events {
            self.append(event).await;
        }
    }

    /// Appends `events` as ONE message, packed as a worker packs them under load
    /// ([`events::Pack`]), and waits for the broker's confirm.
    ///
    /// # Panics
    /// When the broker does not confirm it.
    pub async fn append_packed(&self, events: &[Event]) {
        let mut pack = events::Pack::new();
        for event in events {
            pack.push(&event.to_body(), event.at_ms);
        }
        let properties = pack.properties();
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.name.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &pack.into_body(),
                properties,
            )
            .await
            .unwrap_or_else(|e| panic!("cannot append to {}: {e}", self.name))
            .await
            .unwrap_or_else(|e| panic!("no confirm from {}: {e}", self.name));
        assert!(
            matches!(confirm, Confirmation::Ack(None)),
            "{} did not take the pack: {confirm:?}",
            self.name
        );
    }
}

impl TestStream {
    /// Deletes the stream and closes the connection (what every test does at its end; a
    /// test that fails before has the stream deleted when it drops).
    pub async fn delete(mut self) {
        let deleted = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
        if deleted.is_ok() {
            self.name.clear();
        }
        if let Some(connection) = self.connection.take() {
            let _ = connection.close(200, "test done".into()).await;
        }
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        if !self.name.is_empty() {
            crate::delete_now(vec![self.name.clone()], Vec::new());
        }
    }
}

/// The attempt `attempt` of task `task_id` (function `f`, queue `q`, worker `w1`), to make
/// its events with [`Subject::event`].
pub fn subject(task_id: &str, function: &str, attempt: u32) -> Subject {
    Subject {
        task_id: task_id.to_owned(),
        function: function.to_owned(),
        queue: "q".to_owned(),
        attempt,
        worker: "w1".to_owned(),
        batch: None,
        origin: None,
        traceparent: None,
    }
}

/// A `succeeded` event of `task_id` with `result` (JSON text).
///
/// # Panics
/// When `result` is not JSON.
pub fn succeeded(task_id: &str, function: &str, result: &str) -> Event {
    let mut event = subject(task_id, function, 1).event(EventKind::Succeeded);
    event.result = Some(
        warren_shared::RawJson::from_string(result.to_owned())
            .unwrap_or_else(|e| panic!("not JSON: {e}")),
    );
    event
}

/// A bound on a test's waits on the stream.
pub const STREAM_WAIT: Duration = Duration::from_secs(30);
