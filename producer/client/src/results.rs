//! Results after the caller has gone: what became of a task, looked up by its id in the task
//! event stream ([`warren_shared::lookup`]), whoever enqueued it, within the stream's retention.

use std::time::Duration;

use tokio::sync::oneshot;

use warren_shared::TaskId;
use warren_shared::events::Start;
use warren_shared::lookup::{self, LookupSettings, Reader, TaskOutcome};

use crate::client::Client;
use crate::error::Error;

impl Client {
    /// What became of task `id`: settled (its final event, with the result), pending (its
    /// last event and progress), or not found within the stream's retention. Reads the event
    /// stream from the time in the id (a UUIDv7, as [`Client::enqueue`] makes) to the task's
    /// final event or the end of the stream.
    ///
    /// # Errors
    /// [`Error::Lookup`]: a bad id (refused before asking the broker), no event stream (named),
    /// a stream that could not be read to its end in time; [`Error::Closed`],
    /// [`Error::Unavailable`].
    pub async fn result(&self, id: &TaskId) -> Result<TaskOutcome, Error> {
        self.lookup(id, None, None).await
    }

    /// [`Client::result`] that waits, at most `timeout`, for a task that is not settled yet
    /// (or has no event yet) to settle. After the timeout it answers what it knows: pending
    /// or not found.
    ///
    /// # Errors
    /// As [`Client::result`].
    pub async fn wait_result(&self, id: &TaskId, timeout: Duration) -> Result<TaskOutcome, Error> {
        self.lookup(id, Some(timeout), None).await
    }

    /// [`Client::wait_result`] that also tells `caught_up` what the stream said when the
    /// lookup had read it to its end and began to wait for new events (pending or not found;
    /// nothing when the task was settled before). `warren result --wait` shows it meanwhile.
    ///
    /// # Errors
    /// As [`Client::result`].
    pub async fn wait_result_reporting(
        &self,
        id: &TaskId,
        timeout: Duration,
        caught_up: oneshot::Sender<TaskOutcome>,
    ) -> Result<TaskOutcome, Error> {
        self.lookup(id, Some(timeout), Some(caught_up)).await
    }

    async fn lookup(
        &self,
        id: &TaskId,
        wait: Option<Duration>,
        caught_up: Option<oneshot::Sender<TaskOutcome>>,
    ) -> Result<TaskOutcome, Error> {
        lookup::check_task_id(id.as_str()).map_err(lookup::LookupError::from)?;
        self.wait_for_link(tokio::time::Instant::now() + self.settings().reconnect_wait)
            .await?;
        let settings = self.lookup_settings();
        Ok(lookup::find(&self.connection(), &settings, id, wait, caught_up).await?)
    }

    /// A reader of the task event stream from `start`, on a channel of its own: events in
    /// order, duplicates dropped, and a [`Step::CaughtUp`](lookup::Step::CaughtUp) when it has
    /// read to the end of the stream as it was (`warren events`).
    ///
    /// # Errors
    /// [`Error::Lookup`] (no event stream, named; the broker refused); [`Error::Closed`],
    /// [`Error::Unavailable`].
    pub async fn read_events(&self, start: Start) -> Result<Reader, Error> {
        self.wait_for_link(tokio::time::Instant::now() + self.settings().reconnect_wait)
            .await?;
        let settings = self.lookup_settings();
        Ok(Reader::open(&self.connection(), &settings.stream, start, settings.quiet).await?)
    }

    /// Where this client looks results up: its events stream and retention.
    pub fn lookup_settings(&self) -> LookupSettings {
        let settings = self.settings();
        LookupSettings {
            stream: settings.events_stream.clone(),
            retention: settings.events_max_age,
            ..LookupSettings::default()
        }
    }
}
