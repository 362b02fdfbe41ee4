//! Progress from inside a running task, on its way to whoever waits for it.
//!
//! A handler reports with [`TaskContext::progress`](crate::TaskContext::progress) (a pool's
//! task code with the runner protocol's `progress` frame); the report is checked
//! ([`Progress::checked`]) and stored as the attempt's latest update, which never waits: a
//! handler that reports in a tight loop runs as fast as without. A coalescer, a tokio task
//! started at the attempt's first report, hands on the latest update at most every
//! [`INTERVAL`] (four a second): the first at once, then the latest if it changed. When the
//! handler is done, [`Reporter::finish`] hands on the update still pending and waits until the
//! broker has it, so that the caller sees the last progress before the result.
//!
//! [`Sink::hand_on`] is the one place an update goes: to the task-event stream (a `progress`
//! event, when events are on) and to the task's reply address (when a caller waits).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::BasicProperties;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use warren_shared::envelope::{self, Incoming};
use warren_shared::events::Subject;
use warren_shared::events::{CallerProgress, Progress};
use warren_shared::pool::{LinkPool, Publication, publish_confirmed};

use crate::events::Appender;

/// The shortest time between two updates of one attempt handed on (at most four a second);
/// the last one, at the end of the attempt, may come sooner.
pub const INTERVAL: Duration = Duration::from_millis(250);

/// One coalesced progress update of one attempt, as [`Sink::hand_on`] gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    /// Its number within the attempt, from 1, one more for each update handed on.
    pub seq: u32,
    /// What the task reported (checked).
    pub progress: Progress,
}

/// Whose updates they are, and where they go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The task's (restricted) reply address, if its caller waits.
    pub(crate) reply_to: Option<String>,
    /// The properties of a progress message to that address.
    pub(crate) properties: BasicProperties,
    /// The attempt reporting, from 1.
    pub(crate) attempt: u32,
    /// The task-event appender and the attempt's subject, when events are on.
    pub(crate) events: Option<(Appender, Subject)>,
}

/// Where the coalesced updates of every attempt are handed on: the worker's publishing pool.
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) pool: Arc<LinkPool>,
    pub(crate) publish_timeout: Duration,
}

impl Sink {
    /// The reporter of one attempt of the task read as `incoming`, or one that discards what
    /// it is given when nothing would be handed on (nobody waits for the result and events
    /// are off).
    pub(crate) fn reporter(
        self: &Arc<Self>,
        incoming: &Incoming,
        attempt: u32,
        events: Option<(Appender, Subject)>,
    ) -> Reporter {
        let reply_to = incoming.reply_to.address();
        if reply_to.is_none() && events.is_none() {
            return Reporter::discard();
        }
        let target = Arc::new(Target {
            reply_to: reply_to.map(str::to_owned),
            properties: envelope::progress_properties(incoming),
            attempt,
            events,
        });
        let sink = self.clone();
        let hand_on: HandOn = Box::new(move |update| {
            let sink = sink.clone();
            let target = target.clone();
            Box::pin(async move { sink.hand_on(&target, update).await })
        });
        Reporter::new(hand_on, INTERVAL)
    }

    /// **The hook**: hands on one coalesced update of the attempt `target`, in order (the next
    /// one waits until this returns). Today it publishes the update to the task's reply
    /// address, as a [`CallerProgress`] body with the reply's correlation id and the type
    /// `warren.progress`, and waits for the broker's confirm (bounded by the publish timeout)
    /// so that nothing later overtakes it; a failure is logged and never fails the task. The
    /// task-event appender gets its `progress` event (with [`Update::seq`]) first, without
    /// waiting ([`Appender::progress`] keeps it before the attempt's final event).
    pub(crate) async fn hand_on(&self, target: &Target, update: Update) {
        if let Some((appender, subject)) = &target.events {
            appender.progress(subject, update.seq, update.progress.clone());
        }
        let Some(reply_to) = target.reply_to.as_deref() else {
            return;
        };
        let body = CallerProgress {
            attempt: target.attempt,
            progress: update.progress,
        }
        .to_body();
        let publication = Publication {
            exchange: "",
            routing_key: reply_to,
            body: &body,
            properties: target.properties.clone(),
            // As a reply: a caller that has gone has nobody to be told.
            mandatory: false,
        };
        if let Err(e) =
            publish_confirmed(&self.pool.pool(), publication, self.publish_timeout).await
        {
            tracing::debug!(error = %e, seq = update.seq, "could not send a progress update to the caller");
        }
    }
}

/// A boxed future of a hand-on.
type Handing = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a coalescer calls with each update ([`Sink::hand_on`] for a running task).
type HandOn = Box<dyn FnMut(Update) -> Handing + Send>;

/// The progress reporter of one attempt: cheap to clone, never waits. Made by
/// [`Sink::reporter`]; [`Reporter::discard`] for a context without a worker.
#[derive(Clone, Default)]
pub(crate) struct Reporter(Option<Arc<Inner>>);

struct Inner {
    /// The latest update, not yet handed on when it has changed since the coalescer looked.
    latest: watch::Sender<Option<Progress>>,
    /// Set by [`Reporter::finish`]: later reports are dropped.
    finished: AtomicBool,
    /// Set once the coalescer runs: reports then only store their update.
    running: AtomicBool,
    coalescer: Mutex<Coalescer>,
    stop: CancellationToken,
    runtime: tokio::runtime::Handle,
    /// The shortest time between two updates handed on ([`INTERVAL`]).
    interval: Duration,
}

enum Coalescer {
    /// Not started: no report yet.
    Idle(HandOn),
    Running(JoinHandle<()>),
    Done,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("discards", &self.0.is_none())
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// A reporter that drops what it is given.
    pub(crate) fn discard() -> Self {
        Self(None)
    }

    /// A reporter whose updates go to `hand_on`, at most one every `interval`; one that
    /// discards outside a tokio runtime.
    pub(crate) fn new(hand_on: HandOn, interval: Duration) -> Self {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Self::discard();
        };
        Self(Some(Arc::new(Inner {
            latest: watch::Sender::new(None),
            finished: AtomicBool::new(false),
            running: AtomicBool::new(false),
            coalescer: Mutex::new(Coalescer::Idle(hand_on)),
            stop: CancellationToken::new(),
            runtime,
            interval,
        })))
    }

    /// Stores `progress` as the attempt's latest update, checked ([`Progress::checked`]: an
    /// update that is over its bounds or empty is dropped, logged at debug). Never waits.
    pub(crate) fn report(&self, progress: Progress) {
        let Some(inner) = &self.0 else { return };
        if inner.finished.load(Ordering::Acquire) {
            tracing::debug!("progress reported after the task's handler returned; dropped");
            return;
        }
        let progress = match progress.checked() {
            Ok(progress) => progress,
            Err(e) => {
                tracing::debug!(error = %e, "progress update dropped");
                return;
            }
        };
        inner.latest.send_replace(Some(progress));
        if !inner.running.load(Ordering::Acquire) {
            inner.start();
        }
    }

    /// Ends the attempt's reporting: hands on the update still pending and waits until the
    /// coalescer is done with it (the broker has it, or its publish failed), so that nothing
    /// of this attempt comes after what follows it (the reply). Reports made afterwards are
    /// dropped.
    pub(crate) async fn finish(&self) {
        let Some(inner) = &self.0 else { return };
        inner.finished.store(true, Ordering::Release);
        let coalescer = std::mem::replace(&mut *inner.lock(), Coalescer::Done);
        inner.stop.cancel();
        if let Coalescer::Running(handle) = coalescer {
            // Each hand-on is bounded (the publish timeout); a panic in one is the
            // coalescer's, never the task's.
            let _ = handle.await;
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Coalescer> {
        // Replaced whole under the lock: a panic cannot leave it half-written.
        self.coalescer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the coalescer if it has not started (and the attempt is not over).
    fn start(&self) {
        let mut coalescer = self.lock();
        if !matches!(*coalescer, Coalescer::Idle(_)) {
            return;
        }
        let Coalescer::Idle(hand_on) = std::mem::replace(&mut *coalescer, Coalescer::Done) else {
            return;
        };
        // The report that starts it is stored already, and new to the coalescer.
        let mut latest = self.latest.subscribe();
        latest.mark_changed();
        let handle =
            self.runtime
                .spawn(coalesce(latest, self.stop.clone(), hand_on, self.interval));
        *coalescer = Coalescer::Running(handle);
        self.running.store(true, Ordering::Release);
    }
}

/// Hands on the latest update of `latest` whenever it changes, at most every `interval`,
/// until `stop` (then the update still pending, at once) or until every reporter is gone.
async fn coalesce(
    mut latest: watch::Receiver<Option<Progress>>,
    stop: CancellationToken,
    mut hand_on: HandOn,
    interval: Duration,
) {
    let mut seq: u32 = 0;
    let mut last: Option<Instant> = None;
    loop {
        let ending = tokio::select! {
            biased;
            () = stop.cancelled() => true,
            changed = latest.changed() => changed.is_err(),
        };
        if !ending && let Some(last) = last {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = tokio::time::sleep_until(last + interval) => {}
            }
        }
        // `changed` saw a new update (and marked it seen); when ending, only one it did not
        // see is new. (Once every reporter is gone, nobody waits for one.)
        let new = !ending || latest.has_changed().unwrap_or(false);
        let progress = if new {
            latest.borrow_and_update().clone()
        } else {
            None
        };
        if let Some(progress) = progress {
            seq = seq.saturating_add(1);
            last = Some(Instant::now());
            hand_on(Update { seq, progress }).await;
        }
        if ending {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A reporter with `interval` that records what it hands on, and when.
    fn recording(interval: Duration) -> (Reporter, mpsc::UnboundedReceiver<(Instant, Update)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let hand_on: HandOn = Box::new(move |update| {
            let _ = tx.send((Instant::now(), update));
            Box::pin(async {})
        });
        (Reporter::new(hand_on, interval), rx)
    }

    fn fraction(update: &Update) -> f64 {
        update.progress.fraction.unwrap_or(f64::NAN)
    }

    fn coalescer(reporter: &Reporter) -> std::sync::MutexGuard<'_, Coalescer> {
        reporter.0.as_ref().expect("a live reporter").lock()
    }

    #[tokio::test]
    async fn the_first_update_goes_at_once_then_the_latest_once_an_interval_is_over() {
        let interval = Duration::from_millis(300);
        let (reporter, mut handed) = recording(interval);
        reporter.report(Progress::fraction(0.1));
        let (first_at, first) = handed.recv().await.unwrap();
        assert_eq!((first.seq, fraction(&first)), (1, 0.1));
        // Many reports within one interval: only the latest goes, an interval after the first.
        for i in 2..=9 {
            reporter.report(Progress::fraction(f64::from(i) / 10.0));
        }
        let (second_at, second) = handed.recv().await.unwrap();
        assert_eq!((second.seq, fraction(&second)), (2, 0.9));
        assert!(second_at - first_at >= interval);
        // Nothing new: nothing handed on.
        tokio::time::sleep(interval * 2).await;
        assert!(handed.try_recv().is_err());
        reporter.report(Progress::message("late"));
        let (_, third) = handed.recv().await.unwrap();
        assert_eq!(third.seq, 3);
        reporter.finish().await;
        assert!(handed.try_recv().is_err());
    }

    #[tokio::test]
    async fn finish_hands_on_the_pending_update_without_waiting_and_drops_later_ones() {
        // An interval no test waits out.
        let (reporter, mut handed) = recording(Duration::from_secs(3600));
        reporter.report(Progress::fraction(0.5));
        reporter.report(Progress::fraction(0.75));
        let held_by_the_task = reporter.clone();
        tokio::time::timeout(Duration::from_secs(60), reporter.finish())
            .await
            .expect("finish does not wait out the interval");
        let handed: Vec<_> = std::iter::from_fn(|| handed.try_recv().ok()).collect();
        let fractions: Vec<_> = handed.iter().map(|(_, u)| fraction(u)).collect();
        assert!(
            fractions == [0.75] || fractions == [0.5, 0.75],
            "{fractions:?}"
        );
        let seqs: Vec<_> = handed.iter().map(|(_, u)| u.seq).collect();
        assert_eq!(
            seqs,
            (1..=u32::try_from(handed.len()).unwrap()).collect::<Vec<_>>()
        );
        held_by_the_task.report(Progress::fraction(1.0));
        assert!(matches!(*coalescer(&held_by_the_task), Coalescer::Done));
    }

    #[tokio::test]
    async fn a_bad_or_empty_report_is_dropped_and_starts_nothing() {
        let (reporter, mut handed) = recording(INTERVAL);
        reporter.report(Progress::default());
        reporter.report(Progress::message("x".repeat(2000)));
        reporter.report(Progress::fraction(f64::NAN));
        assert!(matches!(*coalescer(&reporter), Coalescer::Idle(_)));
        reporter.report(Progress::fraction(7.0));
        let (_, update) = handed.recv().await.unwrap();
        assert_eq!(fraction(&update), 1.0);
        reporter.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tight_loop_of_reports_is_coalesced_and_ends_on_its_last_value() {
        let (reporter, mut handed) = recording(INTERVAL);
        let started = std::time::Instant::now();
        let task = reporter.clone();
        let n = 200_000u32;
        tokio::task::spawn_blocking(move || {
            for i in 1..=n {
                task.report(Progress::fraction(f64::from(i) / f64::from(n)));
            }
        })
        .await
        .unwrap();
        reporter.finish().await;
        let elapsed = started.elapsed();
        let handed: Vec<_> = std::iter::from_fn(|| handed.try_recv().ok()).collect();
        // The first at once, one per interval, and the last at the end.
        let bound = 2 + (elapsed.as_secs_f64() / INTERVAL.as_secs_f64()).floor() as usize;
        assert!(
            handed.len() <= bound,
            "{} updates in {elapsed:?}",
            handed.len()
        );
        assert_eq!(fraction(&handed.last().unwrap().1), 1.0);
        let fractions: Vec<_> = handed.iter().map(|(_, u)| fraction(u)).collect();
        assert!(fractions.is_sorted(), "{fractions:?}");
    }

    #[test]
    fn outside_a_runtime_a_reporter_discards() {
        let reporter = Reporter::new(Box::new(|_| Box::pin(async {})), INTERVAL);
        assert!(reporter.0.is_none());
        reporter.report(Progress::fraction(0.5));
    }
}
