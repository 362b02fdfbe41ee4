//! Cron schedules (`[[schedule]]` in the worker's file), fired by exactly one worker.
//!
//! Every worker that has schedules joins the election of role `cron` in its virtual host
//! ([`warren_shared::election`]); the leader fires each tick as a task (confirmed, mandatory),
//! published on the connection its baton is held on, with the deterministic id
//! `<name>@<tick, RFC 3339 UTC>`, so that any duplicate is recognisable. Each fired tick is then
//! appended (confirmed) to the stream [`LOG_STREAM`]; only then is it fired, as far as Warren is
//! concerned.
//!
//! A new leader first reads the log to its end (it appends a marker of its own and reads from
//! the oldest record up to that marker) to learn each schedule's last fired tick, then applies
//! the schedule's [`Misfire`] policy: `skip` fires only ticks due from now on; `once` fires the
//! latest tick missed since the last fired one, then goes on. A tick at or before the last fired
//! one is never fired again. The one window left is a leader that dies between a tick's publish
//! and its log record: its successor fires that tick again, with the same task id.
//!
//! The leader appends a snapshot of every schedule's last tick when it takes over and every
//! hour, so that a rarely firing schedule's last tick survives the log's retention
//! ([`LOG_MAX_AGE`], [`LOG_MAX_BYTES`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use futures_lite::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_shared::broker::BrokerError;
use warren_shared::election::{Election, ElectionSettings, Leadership};
use warren_shared::envelope::{self, PolicyOverrides, TaskEnvelope};
use warren_shared::events::{self, Start};
use warren_shared::link::Link;
use warren_shared::pool::{self, ChannelPool, Publication, PublishError};
use warren_shared::{Request, TaskId, topology};

/// The election role of the process that fires schedules.
pub const ROLE: &str = "cron";

/// The stream that records every fired tick.
pub const LOG_STREAM: &str = "warren.cron.log";

/// How long the log keeps records (snapshots every hour keep every schedule's last tick).
pub const LOG_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many bytes the log keeps; a new leader reads all of it.
pub const LOG_MAX_BYTES: u64 = 8 * 1024 * 1024;

/// How often the leader appends a snapshot of every schedule's last tick.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(3600);

/// Bound on reading the log to its end when taking over.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a leader that could not fire waits before trying again.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// The longest schedule name, in bytes (it is part of every tick's task id).
pub const MAX_NAME: usize = 100;

/// What a new leader does with ticks that were due while no worker fired them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Misfire {
    /// Fire only ticks due from now on.
    #[default]
    Skip,
    /// Fire the latest missed tick once, then go on.
    Once,
}

fn utc() -> String {
    "UTC".to_owned()
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

/// One `[[schedule]]` table of the worker's file, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The schedule's name, unique among the worker's schedules; part of each tick's task id.
    pub name: String,
    /// A 5-field (minute granularity) or 6-field (seconds first) cron expression.
    pub cron: String,
    /// The IANA time zone the expression is read in (`Europe/Paris`); `UTC` by default.
    #[serde(default = "utc")]
    pub timezone: String,
    /// The function each tick runs.
    pub function: String,
    /// The function's arguments (any TOML value; `{}` by default).
    #[serde(default = "empty_object")]
    pub args: serde_json::Value,
    /// `skip` (the default) or `once`; see [`Misfire`].
    #[serde(default)]
    pub misfire: Misfire,
    /// Send the tasks to this queue by name; by default they are routed by function name
    /// through the worker's functions exchange (or to its own queue when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// A schedule that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("schedule {name:?}: {problem}")]
pub struct ScheduleError {
    /// The schedule's name.
    pub name: String,
    /// What is wrong.
    pub problem: String,
}

/// A checked schedule, ready to fire.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    /// The parsed expression.
    pub cron: Cron,
    /// The zone it is read in.
    pub zone: Tz,
    /// The function each tick runs.
    pub function: String,
    /// The arguments.
    pub args: serde_json::Value,
    /// What a new leader does with missed ticks.
    pub misfire: Misfire,
    /// Send to this queue by name rather than by function.
    pub queue: Option<String>,
}

impl ScheduleConfig {
    /// Checks the table and parses its expression and zone.
    ///
    /// # Errors
    /// [`ScheduleError`] naming the schedule and what is wrong.
    pub fn check(&self) -> Result<Schedule, ScheduleError> {
        let fail = |problem: String| ScheduleError {
            name: self.name.clone(),
            problem,
        };
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return Err(fail(format!("a name takes 1 to {MAX_NAME} bytes")));
        }
        if self.name.chars().any(|c| c.is_control() || c == '@') {
            return Err(fail("a name holds no control characters and no `@`".into()));
        }
        let cron = parse_cron(&self.cron).map_err(fail)?;
        let zone: Tz = self.timezone.parse().map_err(|_| {
            fail(format!(
                "unknown time zone {:?} (an IANA name such as `UTC` or `Europe/Paris`)",
                self.timezone
            ))
        })?;
        topology::validate_function_name(&self.function).map_err(fail)?;
        if let Some(queue) = &self.queue {
            topology::validate_queue_name(queue).map_err(fail)?;
        }
        Ok(Schedule {
            name: self.name.clone(),
            cron,
            zone,
            function: self.function.clone(),
            args: self.args.clone(),
            misfire: self.misfire,
            queue: self.queue.clone(),
        })
    }
}

/// Parses a 5- or 6-field cron expression (a sixth field comes first and is the seconds).
fn parse_cron(text: &str) -> Result<Cron, String> {
    let fields = text.split_whitespace().count();
    let nickname = text.trim_start().starts_with('@');
    if !nickname && !(5..=6).contains(&fields) {
        return Err(format!(
            "cron {text:?} has {fields} fields; write 5 (minute hour day month weekday) or 6 \
             (second first)"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("cron {text:?} does not parse: {e}"))
}

/// Checks every table: each must work, and names must be unique.
///
/// # Errors
/// The first [`ScheduleError`].
pub fn check_all(tables: &[ScheduleConfig]) -> Result<Vec<Schedule>, ScheduleError> {
    let mut names = std::collections::HashSet::new();
    let mut schedules = Vec::with_capacity(tables.len());
    for table in tables {
        if !names.insert(table.name.as_str()) {
            return Err(ScheduleError {
                name: table.name.clone(),
                problem: "two schedules have this name".into(),
            });
        }
        schedules.push(table.check()?);
    }
    Ok(schedules)
}

/// The task id of `schedule`'s tick at `tick`: `<name>@<RFC 3339 UTC>`.
pub fn tick_id(schedule: &str, tick: DateTime<Utc>) -> String {
    format!(
        "{schedule}@{}",
        tick.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// The tick to fire first after taking over, given the last fired one: for `once`, the latest
/// tick missed since `last` (if any), else the first tick after `now` (and after `last`).
pub fn first_tick(
    schedule: &Schedule,
    last: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&schedule.zone);
    if schedule.misfire == Misfire::Once
        && let Some(last) = last
        && let Ok(missed) = schedule.cron.find_previous_occurrence(&local, true)
    {
        let missed = missed.with_timezone(&Utc);
        if missed > last {
            return Some(missed);
        }
    }
    let from = match last {
        Some(last) if last > now => last.with_timezone(&schedule.zone),
        _ => local,
    };
    next_after(schedule, from.with_timezone(&Utc))
}

/// The first tick strictly after `after`.
fn next_after(schedule: &Schedule, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    schedule
        .cron
        .find_next_occurrence(&after.with_timezone(&schedule.zone), false)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Record {
    /// A tick fired (its task published and confirmed).
    Fired {
        schedule: String,
        tick: DateTime<Utc>,
        by: String,
    },
    /// Every schedule's last fired tick, as its leader knew them.
    Snapshot {
        last: BTreeMap<String, DateTime<Utc>>,
        by: String,
    },
    /// Where a new leader's read of the log ends.
    Marker { id: String },
}

/// Why the cron leader stopped leading (it joins the election again unless stopping).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CronError {
    /// The broker refused or failed (a 403 names the permission on `warren.cron.log`).
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A publish (task or log record) was not confirmed.
    #[error("cannot publish to {what}: {source}")]
    Publish {
        /// The task or the log.
        what: String,
        /// Why.
        #[source]
        source: PublishError,
    },
    /// The log could not be read to its end in time.
    #[error("cannot read {LOG_STREAM} to its end within {READ_TIMEOUT:?}")]
    ReadTimeout,
    /// The log's consumer ended.
    #[error("reading {LOG_STREAM} ended: {0}")]
    Read(String),
}

/// Where and how a worker's schedules fire.
#[derive(Debug, Clone)]
pub struct CronSettings {
    /// The schedules.
    pub schedules: Vec<Schedule>,
    /// The worker's queue (tasks go there when there is no functions exchange).
    pub queue: String,
    /// The worker's functions exchange (empty: none).
    pub functions_exchange: String,
    /// The log stream ([`LOG_STREAM`]).
    pub log: String,
    /// The election role ([`ROLE`]).
    pub role: String,
    /// The election (its renew period and this process's name).
    pub election: ElectionSettings,
    /// Bound on one publish, confirm included.
    pub publish_timeout: Duration,
}

/// Joins the election of `settings.role` ([`ROLE`]) on `link` and fires the schedules whenever this process
/// leads, until `shutdown` (then it resigns) or the link closes.
///
/// # Errors
/// The election's error when it cannot be joined.
pub async fn start(
    link: &Link,
    settings: CronSettings,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, warren_shared::election::ElectionError> {
    let election = Election::join(link, &settings.role, settings.election.clone()).await?;
    tracing::info!(
        schedules = settings.schedules.len(),
        "schedules: in the election of the cron leader"
    );
    Ok(tokio::spawn(run(election, Arc::new(settings), shutdown)))
}

async fn run(mut election: Election, settings: Arc<CronSettings>, shutdown: CancellationToken) {
    loop {
        let leadership = tokio::select! {
            () = shutdown.cancelled() => break,
            leading = election.leading() => match leading {
                Ok(leadership) => leadership,
                Err(_) => return,
            },
        };
        tracing::info!(
            term = leadership.term(),
            "firing the schedules (cron leader)"
        );
        let led = lead(&leadership, &settings, &shutdown).await;
        match led {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!("no longer the cron leader"),
            Err(e) => {
                // Still the leader, perhaps: try again after a pause (a permission granted,
                // the broker back), rather than spin.
                tracing::error!(error = %e, "cannot fire the schedules; trying again in 5 s");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RETRY_PAUSE) => {}
                }
            }
        }
    }
    election.resign().await;
}

/// Fires the schedules while `leadership` holds; `Ok` when it is lost or on shutdown.
async fn lead(
    leadership: &Leadership,
    settings: &CronSettings,
    shutdown: &CancellationToken,
) -> Result<(), CronError> {
    let connection = leadership.connection().clone();
    let channels = pool::channel_pool(connection.clone(), 2, settings.publish_timeout, None);
    let ended = tokio::select! {
        () = leadership.lost() => Ok(()),
        () = shutdown.cancelled() => Ok(()),
        led = fire_while_leading(leadership, settings, &connection, &channels) => led,
    };
    pool::close_isolated(channels).await;
    ended
}

async fn fire_while_leading(
    leadership: &Leadership,
    settings: &CronSettings,
    connection: &Arc<Connection>,
    channels: &ChannelPool,
) -> Result<(), CronError> {
    declare_log(connection, &settings.log).await?;
    let mut last = read_log(connection, channels, settings).await?;
    last.retain(|name, _| settings.schedules.iter().any(|s| &s.name == name));
    let by = settings.election.name.clone();
    append(
        channels,
        settings,
        &Record::Snapshot {
            last: last.clone(),
            by: by.clone(),
        },
    )
    .await?;
    let now = Utc::now();
    let mut next: Vec<Option<DateTime<Utc>>> = settings
        .schedules
        .iter()
        .map(|s| first_tick(s, last.get(&s.name).copied(), now))
        .collect();
    let mut snapshot = tokio::time::interval(SNAPSHOT_EVERY);
    snapshot.tick().await;
    loop {
        let Some((index, due)) = next
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.map(|t| (i, t)))
            .min_by_key(|(_, t)| *t)
        else {
            // No schedule has a tick left (an expression that matches no future time).
            leadership.lost().await;
            return Ok(());
        };
        let wait = (due - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = snapshot.tick() => {
                append(channels, settings, &Record::Snapshot { last: last.clone(), by: by.clone() }).await?;
                continue;
            }
        }
        // The wall clock may lag the monotonic one a little: wake again until it is due.
        if Utc::now() < due {
            continue;
        }
        let schedule = &settings.schedules[index];
        let seen = last.get(&schedule.name).copied();
        if seen.is_none_or(|seen| due > seen) {
            if !leadership.is_held() {
                return Ok(());
            }
            match fire(channels, settings, schedule, due).await {
                Ok(()) => {}
                // Refused for this schedule alone (no queue takes it, or the queue is full):
                // the tick is lost, the other schedules go on.
                Err(CronError::Publish {
                    what,
                    source: source @ (PublishError::Unroutable { .. } | PublishError::Nacked { .. }),
                }) => {
                    tracing::error!(schedule = %schedule.name, error = %source, to = %what, "tick not fired: the broker refused its task");
                    next[index] = next_after(schedule, due);
                    continue;
                }
                Err(e) => return Err(e),
            }
            append(
                channels,
                settings,
                &Record::Fired {
                    schedule: schedule.name.clone(),
                    tick: due,
                    by: by.clone(),
                },
            )
            .await?;
            last.insert(schedule.name.clone(), due);
        }
        // A leader that fell behind fires the ticks it is late for one after the other.
        next[index] = next_after(schedule, due);
    }
}

/// Publishes the task of `schedule`'s tick at `tick`, as `Client::enqueue` would.
async fn fire(
    channels: &ChannelPool,
    settings: &CronSettings,
    schedule: &Schedule,
    tick: DateTime<Utc>,
) -> Result<(), CronError> {
    let id = TaskId::from(tick_id(&schedule.name, tick));
    let body = Request {
        function: schedule.function.clone(),
        args: schedule.args.clone(),
    }
    .encode();
    let properties = TaskEnvelope {
        id: id.clone(),
        function: schedule.function.clone(),
        reply_to: None,
        deadline: None,
        run_at: None,
        overrides: PolicyOverrides::default(),
        trace: None,
        origin: Some(format!("cron:{}", schedule.name)),
    }
    .properties();
    let (exchange, routing_key) = match (&schedule.queue, settings.functions_exchange.as_str()) {
        (Some(queue), _) => (topology::EXCHANGE, queue.as_str()),
        (None, "") => (topology::EXCHANGE, settings.queue.as_str()),
        (None, exchange) => (exchange, schedule.function.as_str()),
    };
    pool::publish_confirmed(
        channels,
        Publication {
            exchange,
            routing_key,
            body: &body,
            properties,
            mandatory: true,
        },
        settings.publish_timeout,
    )
    .await
    .map_err(|source| CronError::Publish {
        what: format!("{exchange:?}/{routing_key:?} (task {id})"),
        source,
    })?;
    tracing::info!(schedule = %schedule.name, task.id = %id, function = %schedule.function, "tick fired");
    Ok(())
}

/// Declares the log stream (idempotent; an existing one keeps its retention).
async fn declare_log(connection: &Connection, log: &str) -> Result<(), CronError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let declared = events::declare_stream(&channel, log, LOG_MAX_AGE, LOG_MAX_BYTES).await;
    let _ = channel.close(200, "declared".into()).await;
    match declared {
        Ok(()) => Ok(()),
        // Declared by someone else with other retention: use it as it is.
        Err(e) if topology::inequivalent_arg(&e).is_some() => Ok(()),
        Err(e) => Err(BrokerError::from(e).needing("configure").into()),
    }
}

/// Appends `record` to the log, confirmed.
async fn append(
    channels: &ChannelPool,
    settings: &CronSettings,
    record: &Record,
) -> Result<(), CronError> {
    let body = serde_json::to_vec(record).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_delivery_mode(envelope::PERSISTENT)
        .with_content_type(envelope::CONTENT_TYPE.into())
        .with_app_id(envelope::APP_ID.into());
    pool::publish_confirmed(
        channels,
        Publication {
            exchange: "",
            routing_key: &settings.log,
            body: &body,
            properties,
            mandatory: true,
        },
        settings.publish_timeout,
    )
    .await
    .map_err(|source| match source {
        PublishError::Channel(e) => BrokerError::from(e).needing("write").into(),
        source => CronError::Publish {
            what: settings.log.clone(),
            source,
        },
    })
}

/// Every schedule's last fired tick in the log: appends a marker, then reads from the oldest
/// record kept up to it.
async fn read_log(
    connection: &Connection,
    channels: &ChannelPool,
    settings: &CronSettings,
) -> Result<BTreeMap<String, DateTime<Utc>>, CronError> {
    let marker = uuid::Uuid::new_v4().to_string();
    append(channels, settings, &Record::Marker { id: marker.clone() }).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::from)?;
    let tag = format!("warren-cron-read-{}", uuid::Uuid::new_v4().simple());
    let read = async {
        let mut consumer = events::read(
            &channel,
            &settings.log,
            Start::First,
            events::READ_PREFETCH,
            &tag,
        )
        .await
        .map_err(|e| match e {
            events::ReadError::Broker(e) => CronError::from(BrokerError::from(e).needing("read")),
            other => CronError::Read(other.to_string()),
        })?;
        let mut last: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        let mut keep = |name: String, tick: DateTime<Utc>| {
            let entry = last.entry(name).or_insert(tick);
            *entry = (*entry).max(tick);
        };
        loop {
            let delivery = match consumer.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(CronError::Read(e.to_string())),
                None => return Err(CronError::Read("the broker cancelled the reader".into())),
            };
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| CronError::Read(e.to_string()))?;
            match serde_json::from_slice::<Record>(&delivery.data) {
                Ok(Record::Fired { schedule, tick, .. }) => keep(schedule, tick),
                Ok(Record::Snapshot { last, .. }) => last.into_iter().for_each(|(n, t)| keep(n, t)),
                Ok(Record::Marker { id }) if id == marker => break,
                Ok(Record::Marker { .. }) => {}
                Err(e) => tracing::debug!(error = %e, "skipping a record of the cron log"),
            }
        }
        Ok(last)
    };
    let result = tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .unwrap_or(Err(CronError::ReadTimeout));
    let _ = channel.close(200, "read".into()).await;
    result
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn schedule(cron: &str, misfire: Misfire) -> Schedule {
        ScheduleConfig {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: "Europe/Paris".into(),
            function: "echo".into(),
            args: empty_object(),
            misfire,
            queue: None,
        }
        .check()
        .unwrap()
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn five_and_six_fields_parse_others_do_not() {
        assert!(parse_cron("0 3 * * *").is_ok());
        assert!(parse_cron("*/5 0 3 * * *").is_ok());
        assert!(parse_cron("0 3 * *").is_err());
        assert!(parse_cron("0 0 3 * * * 2030").is_err());
        assert!(parse_cron("0 61 * * *").is_err());
    }

    #[test]
    fn bad_tables_are_named() {
        let mut table = ScheduleConfig {
            name: "x".into(),
            cron: "0 3 * * *".into(),
            timezone: "Mars/Olympus".into(),
            function: "echo".into(),
            args: empty_object(),
            misfire: Misfire::Skip,
            queue: None,
        };
        assert!(table.check().unwrap_err().problem.contains("time zone"));
        table.timezone = "UTC".into();
        table.name = "a@b".into();
        assert!(table.check().is_err());
        table.name = "x".into();
        assert!(check_all(&[table.clone(), table]).is_err());
    }

    #[test]
    fn ticks_are_read_in_their_zone_and_ids_are_utc() {
        // 03:00 in Paris is 01:00 UTC in winter.
        let s = schedule("0 3 * * *", Misfire::Skip);
        let tick = first_tick(&s, None, at("2026-12-07T12:00:00Z")).unwrap();
        assert_eq!(tick, at("2026-12-08T02:00:00Z"));
        assert_eq!(tick_id("nightly", tick), "nightly@2026-12-08T02:00:00Z");
    }

    #[test]
    fn skip_fires_from_now_once_fires_the_latest_missed_tick() {
        let last = Some(at("2026-12-05T02:00:00Z"));
        let now = at("2026-12-07T12:00:00Z");
        let skip = schedule("0 3 * * *", Misfire::Skip);
        assert_eq!(
            first_tick(&skip, last, now),
            Some(at("2026-12-08T02:00:00Z"))
        );
        let once = schedule("0 3 * * *", Misfire::Once);
        assert_eq!(
            first_tick(&once, last, now),
            Some(at("2026-12-07T02:00:00Z"))
        );
        // Nothing missed: the next tick.
        let recent = Some(at("2026-12-07T02:00:00Z"));
        assert_eq!(
            first_tick(&once, recent, now),
            Some(at("2026-12-08T02:00:00Z"))
        );
        // Never fired before: nothing is missed.
        assert_eq!(
            first_tick(&once, None, now),
            Some(at("2026-12-08T02:00:00Z"))
        );
    }

    #[test]
    fn records_round_trip() {
        let record = Record::Fired {
            schedule: "nightly".into(),
            tick: at("2026-12-08T02:00:00Z"),
            by: "w".into(),
        };
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains("\"kind\":\"fired\""), "{text}");
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), record);
    }
}
