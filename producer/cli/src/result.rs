//! `warren result <TASK_ID>`: what became of a task, whoever enqueued it, from the task event
//! stream; with `--wait`, once it settles. The exit status says which ([`exit`]).

use std::time::Duration;

use warren_client::{Client, Outcome, TaskOutcome};
use warren_shared::TaskId;
use warren_shared::events::EventKind;

use crate::events::{detail, line};

/// `warren`'s exit statuses.
pub mod exit {
    /// Done; for `result`: the task succeeded.
    pub const OK: u8 = 0;
    /// An error (printed on stderr); for `result`: also a task that failed, was dead-lettered,
    /// expired or was cancelled.
    pub const FAILED: u8 = 1;
    /// Bad flags or arguments (clap's own status for them too).
    pub const USAGE: u8 = 2;
    /// `result`: no event of the task within the stream's retention.
    pub const NOT_FOUND: u8 = 3;
    /// `result`: the task has events but is not settled (yet, or within `--timeout`).
    pub const PENDING: u8 = 4;
}

/// Looks task `id` up (waiting at most `wait` for it to settle, when given), prints the
/// outcome and returns the exit status: on stdout the result (or with `json` the whole outcome
/// as one JSON line) of a task that succeeded, a line about a pending one; on stderr
/// `error: <kind>: <message>` for a task that failed and `error: not_found: ...`.
///
/// # Errors
/// The lookup failed (bad id, no stream, broker): the message for stderr.
pub async fn show(
    client: &Client,
    id: &str,
    wait: Option<Duration>,
    json: bool,
) -> Result<u8, String> {
    let id = TaskId::from(id);
    let found = match wait {
        None => client.result(&id).await,
        Some(timeout) => {
            let (tx, caught_up) = tokio::sync::oneshot::channel();
            let lookup = client.wait_result_reporting(&id, timeout, tx);
            tokio::pin!(lookup);
            tokio::select! {
                found = &mut lookup => found,
                Ok(now) = caught_up => {
                    eprintln!("waiting up to {}: {}", crate::shown(timeout), summary(&now));
                    lookup.await
                }
            }
        }
    }
    .map_err(|e| e.to_string())?;
    if json {
        let text = serde_json::to_string(&found).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print_text(&found);
    }
    Ok(status(&found.outcome))
}

/// The exit status of an outcome.
pub fn status(outcome: &Outcome) -> u8 {
    match outcome {
        Outcome::Settled { .. } if outcome.succeeded() => exit::OK,
        Outcome::Settled { .. } => exit::FAILED,
        Outcome::Pending { .. } => exit::PENDING,
        Outcome::NotFound { .. } => exit::NOT_FOUND,
    }
}

/// What `warren result` prints without `--json`: the result as `warren call` does, the
/// failure on stderr as `warren call` does, or a line about where the task is.
fn print_text(found: &TaskOutcome) {
    match &found.outcome {
        Outcome::Settled { event } if event.kind == EventKind::Succeeded => match &event.result {
            Some(result) => println!("{}", result.get()),
            None => {
                println!("null");
                eprintln!(
                    "note: the task succeeded; its result was larger than the events keep \
                     (see --json)"
                );
            }
        },
        Outcome::Settled { event } => eprintln!("error: {}", failure(event)),
        Outcome::Pending { .. } => println!("{}", summary(found)),
        Outcome::NotFound { message, .. } => eprintln!("error: not_found: {message}"),
    }
}

/// A failed task's `<kind>: <message>`, as `warren call` prints it.
fn failure(event: &warren_shared::events::Event) -> String {
    match &event.error {
        Some(error) => format!("{}: {}", error.kind, error.message),
        None => format!("{}: {}", event.kind, detail(event)),
    }
}

/// `pending: <the last event's line>` (with the attempt's last progress), or `not found`.
fn summary(found: &TaskOutcome) -> String {
    match &found.outcome {
        Outcome::Pending { event, progress } => {
            let mut text = format!("pending: {}", line(event));
            if event.kind != EventKind::Progress
                && let Some(p) = progress
            {
                let mut shown = event.as_ref().clone();
                shown.kind = EventKind::Progress;
                shown.progress = Some(p.clone());
                text.push_str(&format!(" (last progress: {})", detail(&shown)));
            }
            text
        }
        Outcome::Settled { event } => format!("settled: {}", line(event)),
        Outcome::NotFound { .. } => "no event of the task yet".to_owned(),
    }
}
