//! The `lookup` scenario: how long finding a task's result takes in a stream of a million
//! events (`docs/benchmarks.md`, "Result lookup").
//!
//! On a stream of its own (deleted at the end), it appends `--lookup-events` synthetic events
//! (a `started` and a `succeeded` per task, as workers append them, with pipelined confirms):
//! half of them first; then, after a pause longer than the lookup's time margin (so that the
//! broker's chunk timestamps tell the target apart from that half), the target task's
//! `started`, `--lookup-between` other events (what the fleet appends while the target runs),
//! its `succeeded`, a `started` of a second task that stays pending, and the other half. Then
//! it times `Client::result` of the target `--lookup-runs` times (p50, max), of the pending
//! task, and of unknown ids: a UUIDv7 made now, one made at the target's time (which must read
//! everything after it), and one that is not a UUIDv7 (read from the first event).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use uuid::Uuid;
use warren_client::{Client, ClientSettings, Outcome};
use warren_shared::events::{self, Event, EventKind, Subject};
use warren_shared::lookup::{self, LookupSettings, TIME_MARGIN};
use warren_shared::{BrokerSettings, RawJson, TaskId};

use super::{Args, percentile_ms};

/// Publishes awaiting their confirm at once while appending.
const WINDOW: usize = 4096;

/// A task's attempt, from which its events are made.
fn subject(task_id: &str) -> Subject {
    Subject {
        task_id: task_id.to_owned(),
        function: "send_mail".to_owned(),
        queue: "warren.tasks".to_owned(),
        attempt: 1,
        worker: "bench-worker".to_owned(),
        batch: None,
        origin: None,
        traceparent: None,
    }
}

/// A `succeeded` event of `task_id` with a mail receipt as its result.
fn succeeded(task_id: &str) -> Result<Event> {
    let mut event = subject(task_id).event(EventKind::Succeeded);
    event.result = Some(RawJson::from_string(format!(
        r#"{{"delivered_to":"outbox:{task_id}.eml","bytes":1432}}"#
    ))?);
    Ok(event)
}

/// Appends events to one stream with pipelined confirms.
struct Appender {
    channel: Channel,
    stream: String,
    in_flight: VecDeque<lapin::PublisherConfirm>,
    appended: usize,
}

impl Appender {
    async fn append(&mut self, event: &Event) -> Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.stream.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &event.to_body(),
                event.properties(),
            )
            .await?;
        self.in_flight.push_back(confirm);
        self.appended += 1;
        if self.in_flight.len() >= WINDOW {
            self.settle(WINDOW / 2).await?;
        }
        Ok(())
    }

    /// Waits until at most `left` appends await their confirm.
    async fn settle(&mut self, left: usize) -> Result<()> {
        while self.in_flight.len() > left {
            let Some(confirm) = self.in_flight.pop_front() else {
                break;
            };
            match confirm.await? {
                Confirmation::Ack(None) => {}
                other => bail!("the stream did not take an event: {other:?}"),
            }
        }
        Ok(())
    }

    /// `n` events of other tasks (a `started` and a `succeeded` each).
    async fn bulk(&mut self, n: usize) -> Result<()> {
        for _ in 0..n.div_ceil(2) {
            let id = TaskId::new();
            self.append(&subject(id.as_str()).event(EventKind::Started))
                .await?;
            self.append(&succeeded(id.as_str())?).await?;
        }
        Ok(())
    }
}

/// One lookup's time and what it found.
async fn timed(client: &Client, id: &TaskId) -> Result<(Duration, Outcome)> {
    let started = Instant::now();
    let found = client.result(id).await?;
    Ok((started.elapsed(), found.outcome))
}

fn state(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Settled { .. } => "settled",
        Outcome::Pending { .. } => "pending",
        Outcome::NotFound { .. } => "not_found",
    }
}

/// Runs the scenario and prints its figures.
pub(crate) async fn run(args: &Args, admin: &Channel) -> Result<()> {
    let stream = format!("bench.events.{}", Uuid::new_v4().simple());
    events::declare_stream(admin, &stream, events::DEFAULT_MAX_AGE, 8 << 30)
        .await
        .with_context(|| format!("declaring the stream {stream}"))?;
    let result = measure(args, &stream).await;
    admin
        .queue_delete(stream.as_str().into(), QueueDeleteOptions::default())
        .await
        .with_context(|| format!("deleting the stream {stream}"))?;
    result
}

async fn measure(args: &Args, stream: &str) -> Result<()> {
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut appender = Appender {
        channel,
        stream: stream.to_owned(),
        in_flight: VecDeque::new(),
        appended: 0,
    };
    let total = args.lookup_events;
    let half = total.saturating_sub(args.lookup_between + 3) / 2;
    println!(
        "warren-bench lookup: {total} events on {stream}, the target among them: {half} before \
         it, {} while it runs, {half} after",
        args.lookup_between
    );

    let appending = Instant::now();
    appender.bulk(half).await?;
    appender.settle(0).await?;
    // The broker seeks by its chunks' timestamps: the target is made past the lookup's margin
    // after the first half, so that reading from its time skips that half.
    tokio::time::sleep(TIME_MARGIN + Duration::from_secs(2)).await;
    let paused = TIME_MARGIN + Duration::from_secs(2);
    let (target, pending) = (TaskId::new(), TaskId::new());
    appender
        .append(&subject(target.as_str()).event(EventKind::Started))
        .await?;
    appender.bulk(args.lookup_between).await?;
    appender.append(&succeeded(target.as_str())?).await?;
    appender
        .append(&subject(pending.as_str()).event(EventKind::Started))
        .await?;
    appender.bulk(half).await?;
    appender.settle(0).await?;
    let took = appending.elapsed() - paused;
    println!(
        "appended {} events in {:.1} s ({:.0}/s, confirmed, one channel, {WINDOW} in flight)",
        appender.appended,
        took.as_secs_f64(),
        appender.appended as f64 / took.as_secs_f64()
    );
    let _ = connection.close(200, "appended".into()).await;

    let client = Client::connect(ClientSettings {
        broker: BrokerSettings::new(args.url.clone()),
        events_stream: stream.to_owned(),
        ..ClientSettings::default()
    })
    .await?;
    let mut times = Vec::new();
    for _ in 0..args.lookup_runs {
        let (time, outcome) = timed(&client, &target).await?;
        if !outcome.succeeded() {
            bail!("the target was not found settled: {outcome:?}");
        }
        times.push(time);
    }
    println!(
        "result(target), settled, {} runs: p50 {:.0} ms, max {:.0} ms (target < 1000 ms)",
        times.len(),
        percentile_ms(&times, 50.0),
        times.iter().max().map_or(0.0, |t| t.as_secs_f64() * 1000.0)
    );
    // The floor: a bare stream consumer reading the same span, from the same time, until the
    // target's `succeeded` arrives (no decoding, no lookup logic), at Warren's prefetch and at
    // a larger one.
    for prefetch in [events::READ_PREFETCH, 2000] {
        let mut times = Vec::new();
        for _ in 0..args.lookup_runs.min(5) {
            times.push(floor(&args.url, stream, &target, prefetch).await?);
        }
        println!(
            "floor: a bare consumer (prefetch {prefetch}) reading from the target's time to its \
             succeeded: p50 {:.0} ms",
            percentile_ms(&times, 50.0)
        );
    }
    let (time, outcome) = timed(&client, &pending).await?;
    println!(
        "result(pending task): {} in {:.0} ms (reads to the end of the stream: the {half} \
         events after it)",
        state(&outcome),
        time.as_secs_f64() * 1000.0
    );
    let (time, outcome) = timed(&client, &TaskId::new()).await?;
    println!(
        "result(unknown UUIDv7 made now): {} in {:.0} ms",
        state(&outcome),
        time.as_secs_f64() * 1000.0
    );
    // Ids that make a lookup read much of the stream: their own catch-up bound.
    let scans = LookupSettings {
        stream: stream.to_owned(),
        catch_up_timeout: Duration::from_secs(600),
        ..LookupSettings::default()
    };
    let as_old = TaskId::from(
        Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            target
                .created_at()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs()),
            0,
        ))
        .to_string(),
    );
    let connection = Connection::connect(&args.url, ConnectionProperties::default()).await?;
    for (what, id) in [
        ("unknown UUIDv7 as old as the target", as_old),
        ("unknown id, not a UUIDv7", TaskId::from("order-17")),
    ] {
        let started = Instant::now();
        let found = lookup::find(&connection, &scans, &id, None, None).await?;
        let time = started.elapsed();
        println!(
            "result({what}): {} in {:.0} ms ({:.0} events/s read)",
            state(&found.outcome),
            time.as_secs_f64() * 1000.0,
            match &found.outcome {
                Outcome::NotFound { .. } if what.starts_with("unknown UUIDv7") => {
                    (half + args.lookup_between) as f64 / time.as_secs_f64()
                }
                _ => total as f64 / time.as_secs_f64(),
            }
        );
    }
    let _ = connection.close(200, "bench done".into()).await;
    client.close().await;
    Ok(())
}

/// How long a bare consumer takes to read `stream` from where a lookup of `target` starts to
/// the target's `succeeded` event, acking every half `prefetch`.
async fn floor(url: &str, stream: &str, target: &TaskId, prefetch: u16) -> Result<Duration> {
    use futures_util::StreamExt;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let started = Instant::now();
    let mut consumer = events::read(
        &channel,
        stream,
        lookup::start_for(target),
        prefetch,
        "floor",
    )
    .await?;
    let mut unacked = 0;
    loop {
        let delivery = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .context("the floor reader got nothing for 60 s")?
            .context("the floor reader ended")??;
        unacked += 1;
        if unacked >= prefetch / 2 {
            delivery
                .ack(lapin::options::BasicAckOptions { multiple: true })
                .await?;
            unacked = 0;
        }
        let ours = delivery
            .properties
            .correlation_id()
            .as_ref()
            .is_some_and(|c| c.as_str() == target.as_str());
        let kind = delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned());
        if ours && kind.as_deref() == Some(EventKind::Succeeded.as_str()) {
            break;
        }
    }
    let took = started.elapsed();
    let _ = connection.close(200, "floor read".into()).await;
    Ok(took)
}
