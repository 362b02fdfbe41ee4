//! Calls waiting for their reply, by correlation id.
//!
//! A call registers its id *before* publishing, so even an instant reply finds it, and removes
//! it when it returns, times out or is dropped ([`PendingGuard`]). With direct reply-to, a
//! reply is addressed to the connection the request went out on: when that connection is lost,
//! every waiting call fails at once with [`Error::ConnectionLost`](crate::Error::ConnectionLost).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot, watch};
use warren_shared::events::CallerProgress;
use warren_shared::link::LinkState;

/// Hands a call its reply's body, decoded by the call into what it returns.
pub(crate) type ReplySender = oneshot::Sender<Vec<u8>>;

/// Hands a call that follows its progress each update, in order.
pub(crate) type ProgressSender = mpsc::Sender<CallerProgress>;

/// One waiting call.
#[derive(Debug)]
pub(crate) struct Waiter {
    /// Takes the reply, which ends the call.
    pub(crate) reply: ReplySender,
    /// Takes its progress updates, when the call follows them.
    pub(crate) progress: Option<ProgressSender>,
}

/// Calls waiting for their reply, by correlation id.
#[derive(Debug, Default)]
pub(crate) struct Pending(Mutex<HashMap<String, Waiter>>);

impl Pending {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops every waiting call's sender: each call ends with [`Error::ConnectionLost`].
    pub(crate) fn fail_all(&self) -> usize {
        let mut map = self.lock();
        let n = map.len();
        map.clear();
        n
    }

    /// Hands a message to the call `correlation_id` names: a `progress` update (AMQP `type`
    /// `warren.progress`) to a call that follows its progress, anything else as the reply,
    /// which ends the call. A progress update never ends a call: a call that does not follow
    /// its progress drops it.
    pub(crate) fn deliver(&self, correlation_id: &str, progress: bool, body: Vec<u8>) {
        if progress {
            self.deliver_progress(correlation_id, &body);
            return;
        }
        match self.lock().remove(correlation_id) {
            Some(waiter) => {
                let _ = waiter.reply.send(body);
            }
            None => tracing::debug!(correlation_id, "reply for a call that is no longer waiting"),
        }
    }

    fn deliver_progress(&self, correlation_id: &str, body: &[u8]) {
        let follower = self
            .lock()
            .get(correlation_id)
            .and_then(|waiter| waiter.progress.clone());
        let Some(follower) = follower else {
            return;
        };
        match CallerProgress::decode(body) {
            // A caller that does not read its updates loses the newest, never its result.
            Ok(update) => {
                if follower.try_send(update).is_err() {
                    tracing::debug!(
                        correlation_id,
                        "progress update dropped: the call has not read the ones before"
                    );
                }
            }
            Err(e) => {
                tracing::debug!(correlation_id, error = %e, "malformed progress update ignored")
            }
        }
    }
}

/// Removes a call's entry when the call ends, however it ends.
pub(crate) struct PendingGuard<'a> {
    pub(crate) pending: &'a Pending,
    pub(crate) id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(self.id);
    }
}

/// Ends every waiting call with [`Error::ConnectionLost`](crate::Error::ConnectionLost) when the
/// connection drops: their direct replies were addressed to the lost connection and can never
/// arrive. Ends with the link.
pub(crate) async fn fail_calls_on_disconnect(
    mut link: watch::Receiver<LinkState>,
    pending: std::sync::Weak<Pending>,
) {
    while link.changed().await.is_ok() {
        let state = link.borrow_and_update().clone();
        if matches!(state, LinkState::Down { .. } | LinkState::Closed) {
            let Some(pending) = pending.upgrade() else {
                return;
            };
            let failed = pending.fail_all();
            if failed > 0 {
                tracing::warn!(
                    calls = failed,
                    "connection lost: failing the calls waiting for a reply"
                );
            }
        }
    }
}
