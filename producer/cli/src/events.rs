//! `warren events`: what the fleet did lately, from the task event stream, filtered by task,
//! function, queue and kind; one line per event (or the event's JSON body as it was appended),
//! until caught up with the stream or, with `--follow`, as events come.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::Args;
use lapin::BasicProperties;
use warren_client::Client;
use warren_shared::envelope::from_epoch_millis;
use warren_shared::events::{self, Event, EventKind, Start};
use warren_shared::lookup::{self, Step};

use crate::shown;

/// How far back `warren events` starts unless told otherwise.
pub const DEFAULT_SINCE: Duration = Duration::from_secs(10 * 60);

/// Longest detail on a text line, in characters (results and messages are cut).
const DETAIL_CHARS: usize = 120;

/// The event stream flags of `warren events` and `warren result`.
#[derive(Debug, Clone, Args)]
pub struct StreamArgs {
    /// The task event stream (the workers' `--events-stream`).
    #[arg(long, env = "WARREN_EVENTS_STREAM", default_value = events::DEFAULT_STREAM)]
    pub events_stream: String,
    /// How long that stream keeps events (the workers' `--events-max-age`): what `result`
    /// says of a task it does not find.
    #[arg(long, env = "WARREN_EVENTS_MAX_AGE", default_value = shown(events::DEFAULT_MAX_AGE),
          value_parser = humantime::parse_duration)]
    pub events_max_age: Duration,
}

/// Which events `warren events` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this task's.
    pub task: Option<String>,
    /// Only this function's.
    pub function: Option<String>,
    /// Only this queue's.
    pub queue: Option<String>,
    /// Only these kinds (all when empty).
    pub kinds: Vec<EventKind>,
}

impl Filter {
    /// Whether a message may be wanted, from its properties alone (the task id is its
    /// `correlation_id`, the kind its `type`): the others are skipped undecoded.
    fn may_want(&self, properties: &BasicProperties) -> bool {
        let task_ok = self.task.as_deref().is_none_or(|task| {
            properties
                .correlation_id()
                .as_ref()
                .is_some_and(|c| c.as_str() == task)
        });
        let kind_ok = self.kinds.is_empty()
            || properties
                .kind()
                .as_ref()
                .and_then(|k| EventKind::parse(k.as_str()))
                .is_some_and(|k| self.kinds.contains(&k));
        task_ok && kind_ok
    }

    /// Whether `event` is wanted.
    pub fn wants(&self, event: &Event) -> bool {
        self.task.as_deref().is_none_or(|t| event.task_id == t)
            && self.function.as_deref().is_none_or(|f| event.function == f)
            && self.queue.as_deref().is_none_or(|q| event.queue == q)
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
    }
}

/// A `--kind` value: one of the event kinds.
///
/// # Errors
/// The kinds there are, when `name` is none of them.
pub fn parse_kind(name: &str) -> Result<EventKind, String> {
    EventKind::parse(name.trim()).ok_or_else(|| {
        let kinds: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("no event kind {name:?}; kinds: {}", kinds.join(", "))
    })
}

/// Where `warren events` starts: `since` ago; or, without `since` and with a `--task` whose id
/// carries its time, where a lookup of that task starts; or [`DEFAULT_SINCE`] ago.
pub fn start(since: Option<Duration>, task: Option<&str>) -> Start {
    match (since, task) {
        (Some(since), _) => Start::Time(
            SystemTime::now()
                .checked_sub(since)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        ),
        (None, Some(task)) if warren_shared::TaskId::from(task).created_at().is_some() => {
            lookup::start_for(&task.into())
        }
        (None, _) => Start::Time(SystemTime::now() - DEFAULT_SINCE),
    }
}

/// Prints the events `filter` wants from `start` on, until caught up with the stream, or
/// forever with `follow` (until Ctrl-C). With `json`, each event's body as it was appended,
/// one per line; else one line of text per event ([`line`]).
///
/// # Errors
/// What went wrong, for stderr: the stream cannot be read, stdout is gone.
pub async fn show(
    client: &Client,
    start: Start,
    filter: &Filter,
    follow: bool,
    json: bool,
) -> Result<(), String> {
    if let Some(task) = &filter.task {
        lookup::check_task_id(task).map_err(|e| format!("bad --task: {e}"))?;
    }
    let mut reader = client.read_events(start).await.map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let shown = loop {
        let step = tokio::select! {
            step = reader.next(|p| filter.may_want(p)) => step.map_err(|e| e.to_string()),
            _ = tokio::signal::ctrl_c() => break Ok(()),
        };
        let entry = match step {
            Ok(Step::Event(entry)) => entry,
            Ok(Step::CaughtUp) if follow => continue,
            Ok(Step::CaughtUp) => break Ok(()),
            Err(e) => break Err(e),
        };
        if !filter.wants(&entry.event) {
            continue;
        }
        let written = if json {
            out.write_all(&entry.body)
                .and_then(|()| out.write_all(b"\n"))
        } else {
            writeln!(out, "{}", line(&entry.event))
        };
        match written.and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader had enough (`warren events | head`): stop, quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break Ok(()),
            Err(e) => break Err(format!("cannot write to stdout: {e}")),
        }
    };
    drop(out);
    reader.close().await;
    shown
}

/// One line for an event: time, kind, task id, function, queue, attempt, worker, and what
/// happened (a result, an error, progress), cut to a line.
pub fn line(event: &Event) -> String {
    let at = humantime::format_rfc3339_millis(from_epoch_millis(event.at_ms));
    format!(
        "{at}  {:<13}  {}  {}  {}  #{}  {}  {}",
        event.kind.as_str(),
        event.task_id,
        event.function,
        event.queue,
        event.attempt,
        event.worker,
        cut(&detail(event)),
    )
    .trim_end()
    .to_owned()
}

/// What happened, for people: the result, the error and whether it is retried, the progress.
pub fn detail(event: &Event) -> String {
    let error = event
        .error
        .as_ref()
        .map(|e| format!("{}: {}", e.kind, e.message));
    match event.kind {
        EventKind::Started => String::new(),
        EventKind::Progress => {
            let Some(p) = &event.progress else {
                return String::new();
            };
            let parts = [
                p.fraction.map(|f| format!("{:.0}%", f * 100.0)),
                p.message.clone(),
                p.detail.as_ref().map(|d| d.get().to_owned()),
            ];
            parts.into_iter().flatten().collect::<Vec<_>>().join(" ")
        }
        EventKind::Succeeded if event.truncated => "(result over the size kept)".to_owned(),
        EventKind::Succeeded => event
            .result
            .as_ref()
            .map_or_else(String::new, |r| r.get().to_owned()),
        EventKind::Failed => {
            let then = match &event.retry {
                Some(retry) => format!(
                    "retry: attempt {} at {}",
                    retry.attempt,
                    humantime::format_rfc3339_seconds(from_epoch_millis(retry.at_ms))
                ),
                None => "final".to_owned(),
            };
            format!("{} ({then})", error.unwrap_or_default())
        }
        EventKind::DeadLettered | EventKind::Expired | EventKind::Cancelled => {
            [event.reason.clone(), error]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(": ")
        }
    }
}

/// `text` cut to [`DETAIL_CHARS`] characters on one line.
fn cut(text: &str) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(DETAIL_CHARS) {
        Some((at, _)) => format!("{}...", &one_line[..at]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_shared::RawJson;
    use warren_shared::events::{EventError, Progress, RetryAt, Subject};

    fn event(kind: EventKind) -> Event {
        Subject {
            task_id: "t1".into(),
            function: "send_mail".into(),
            queue: "mail".into(),
            attempt: 2,
            worker: "w1".into(),
            batch: None,
            origin: None,
            traceparent: None,
        }
        .event(kind)
    }

    #[test]
    fn a_line_names_the_event_and_says_what_happened() {
        let mut e = event(EventKind::Succeeded);
        e.at_ms = 1_700_000_000_123;
        e.result = Some(RawJson::from_string("{\"sent\":\ntrue}".into()).unwrap());
        assert_eq!(
            line(&e),
            "2023-11-14T22:13:20.123Z  succeeded      t1  send_mail  mail  #2  w1  {\"sent\": true}"
        );
        let mut f = event(EventKind::Failed);
        f.error = Some(EventError {
            kind: "handler_error".into(),
            message: "smtp down".into(),
        });
        f.retry = Some(RetryAt {
            attempt: 3,
            at_ms: 1_700_000_060_000,
        });
        assert_eq!(
            detail(&f),
            "handler_error: smtp down (retry: attempt 3 at 2023-11-14T22:14:20Z)"
        );
        f.retry = None;
        assert!(detail(&f).ends_with("(final)"));
        let mut p = event(EventKind::Progress);
        p.progress = Some(Progress {
            fraction: Some(0.4),
            message: Some("40 of 100".into()),
            detail: None,
        });
        assert_eq!(detail(&p), "40% 40 of 100");
        let mut long = event(EventKind::Succeeded);
        long.result = Some(RawJson::from_string(format!("\"{}\"", "é".repeat(500))).unwrap());
        assert!(line(&long).ends_with("..."));
        assert!(line(&event(EventKind::Started)).ends_with("w1"));
    }

    #[test]
    fn kinds_are_checked_and_filters_combine() {
        assert_eq!(parse_kind("succeeded"), Ok(EventKind::Succeeded));
        let bad = parse_kind("done").unwrap_err();
        assert!(bad.contains("dead_lettered"), "{bad}");
        let filter = Filter {
            function: Some("send_mail".into()),
            kinds: vec![EventKind::Failed, EventKind::Succeeded],
            ..Filter::default()
        };
        assert!(filter.wants(&event(EventKind::Succeeded)));
        assert!(!filter.wants(&event(EventKind::Started)));
        let other_queue = Filter {
            queue: Some("other".into()),
            ..Filter::default()
        };
        assert!(!other_queue.wants(&event(EventKind::Succeeded)));
        let e = event(EventKind::Started);
        assert!(Filter::default().may_want(&e.properties()));
        assert!(!filter.may_want(&e.properties()), "a kind left out");
    }

    #[test]
    fn events_start_at_since_or_at_the_tasks_time() {
        let id = warren_shared::TaskId::new();
        assert_eq!(start(None, Some(id.as_str())), lookup::start_for(&id));
        match start(None, Some("order-17")) {
            Start::Time(t) => {
                let ago = SystemTime::now().duration_since(t).unwrap();
                assert!(ago >= DEFAULT_SINCE && ago < DEFAULT_SINCE + Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            start(Some(Duration::from_secs(1)), Some(id.as_str())),
            Start::Time(_)
        ));
    }
}
