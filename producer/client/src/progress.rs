//! Following a call's progress: the updates a running task reports, then its result.
//!
//! A worker sends a task's progress to the call's reply address with the call's correlation
//! id and the AMQP `type` `warren.progress` (docs/protocol.md); the reply consumers hand such
//! a message to a call that follows its progress and never end a call with one. A call made
//! with [`Client::call_json_with_progress`](crate::Client::call_json_with_progress) (or
//! [`call_with_progress`](crate::Client::call_with_progress),
//! [`call_raw_with_progress`](crate::Client::call_raw_with_progress)) is a [`ProgressCall`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use warren_shared::events::CallerProgress;

use crate::error::Error;
use crate::pending::ProgressSender;

/// Progress updates a call holds before its caller reads them; past this the newest are
/// dropped (a worker sends at most four a second per task).
pub const PROGRESS_BUFFER: usize = 64;

/// A call whose progress is followed while it runs.
///
/// [`ProgressCall::progress`] gives each update in the order the worker sent it, and `None`
/// once the result is in: every update sent before the result comes first. Awaiting the
/// `ProgressCall` itself gives the result, as the call without progress would (updates not
/// read by then are dropped). Dropping it abandons the call.
///
/// ```no_run
/// # async fn demo(client: warren_client::Client) -> Result<(), warren_client::Error> {
/// use warren_client::CallOptions;
///
/// let mut call = client.call_json_with_progress("resize", serde_json::json!({"id": 7}), &CallOptions::default());
/// while let Some(update) = call.progress().await {
///     // update.attempt: a retry starts its progress over.
///     println!("attempt {}: {:?}", update.attempt, update.progress);
/// }
/// let result = call.await?;
/// # Ok(()) }
/// ```
pub struct ProgressCall<T> {
    /// The call, until its result is in.
    call: Option<Running<T>>,
    /// Its result, once in and before it is taken.
    result: Option<Result<T, Error>>,
    updates: mpsc::Receiver<CallerProgress>,
}

/// A call on its way to its result.
type Running<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send>>;

impl<T> std::fmt::Debug for ProgressCall<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressCall")
            .field("done", &self.call.is_none())
            .field("unread_updates", &self.updates.len())
            .finish()
    }
}

impl<T: Send + 'static> ProgressCall<T> {
    /// Runs the call `make` builds around the sender of its progress updates.
    pub(crate) fn start<F, Fut>(make: F) -> Self
    where
        F: FnOnce(ProgressSender) -> Fut,
        Fut: Future<Output = Result<T, Error>> + Send + 'static,
    {
        let (tx, updates) = mpsc::channel(PROGRESS_BUFFER);
        Self {
            call: Some(Box::pin(make(tx))),
            result: None,
            updates,
        }
    }
}

impl<T> ProgressCall<T> {
    /// The next progress update; `None` once the call has its result (or failed), after every
    /// update that came before it. Runs the call while it waits. Cancel-safe: dropping the
    /// future loses nothing.
    pub async fn progress(&mut self) -> Option<CallerProgress> {
        std::future::poll_fn(|cx| self.poll_progress(cx)).await
    }

    fn poll_progress(&mut self, cx: &mut Context<'_>) -> Poll<Option<CallerProgress>> {
        // Updates that came before the result first; they are in the channel before the
        // result is (the consumer hands them over in the order they arrive).
        if let Ok(update) = self.updates.try_recv() {
            return Poll::Ready(Some(update));
        }
        if let Some(call) = self.call.as_mut()
            && let Poll::Ready(result) = call.as_mut().poll(cx)
        {
            self.result = Some(result);
            self.call = None;
        }
        match self.updates.poll_recv(cx) {
            Poll::Ready(Some(update)) => Poll::Ready(Some(update)),
            // The call ended (its sender is gone) or the result is in: nothing more comes.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if self.call.is_none() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: Unpin> Future for ProgressCall<T> {
    type Output = Result<T, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(result) = this.result.take() {
            return Poll::Ready(result);
        }
        match this.call.as_mut() {
            Some(call) => {
                let result = std::task::ready!(call.as_mut().poll(cx));
                this.call = None;
                Poll::Ready(result)
            }
            None => Poll::Ready(Err(Error::BadReply(
                "the call's result was taken already".into(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_shared::events::Progress;

    fn update(attempt: u32, fraction: f64) -> CallerProgress {
        CallerProgress {
            attempt,
            progress: Progress::fraction(fraction),
        }
    }

    #[tokio::test]
    async fn updates_before_the_result_come_first_then_none_then_the_result() {
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let mut call = ProgressCall::start(|progress| async move {
            progress.send(update(1, 0.5)).await.unwrap();
            progress.send(update(1, 1.0)).await.unwrap();
            let _ = go.await;
            Ok::<_, Error>(42)
        });
        assert_eq!(call.progress().await, Some(update(1, 0.5)));
        go_tx.send(()).unwrap();
        assert_eq!(call.progress().await, Some(update(1, 1.0)));
        assert_eq!(call.progress().await, None);
        assert_eq!(call.progress().await, None);
        assert_eq!(call.await.unwrap(), 42);
    }

    #[tokio::test]
    async fn a_call_awaited_without_reading_progress_gives_its_result() {
        let call = ProgressCall::start(|progress| async move {
            progress.send(update(2, 0.1)).await.unwrap();
            Err::<u8, _>(Error::ConnectionLost)
        });
        assert!(matches!(call.await, Err(Error::ConnectionLost)));
    }
}
