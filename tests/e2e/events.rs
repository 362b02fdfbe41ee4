//! Task events (docs/protocol.md §9): what workers append to the event stream, with which
//! fields, in which order relative to the reply and the ack, and what happens when the stream is
//! missing, deleted, or events are off. Each test appends to a stream of its own
//! (`<queue>.events`), deleted with its queue.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use warren_client::{CallOptions, Client};
use warren_shared::envelope::{self, headers};
use warren_shared::events::{self, Event, EventKind, Start};
use warren_shared::{BrokerSettings, Task, TaskId};
use warren_tests::tasks::Flaky;
use warren_tests::{TestQueue, amqp_url, binary, eventually, raw_channel, temp_dir};
use warren_worker::{
    Mailer, Registry, RunningWorker, TaskContext, TaskError, WorkerError, WorkerSettings,
    builtin_registry,
};

use crate::access::BrokerUser;

/// How long a test waits for what should come at once.
const WAIT: Duration = Duration::from_secs(20);

/// The settings of a worker on `q` that appends to a stream of the test's own, deleted with `q`.
fn with_stream(q: &TestQueue, concurrency: u16) -> WorkerSettings {
    let stream = format!("{}.events", q.name);
    q.also_delete(&stream);
    let mut settings = q.worker_settings(concurrency);
    settings.events.stream = stream;
    settings
}

fn registry(dir: &tempfile::TempDir) -> Registry {
    builtin_registry(Mailer::outbox(dir.path())).register::<Flaky>()
}

/// A queue of the test's own, a worker on it appending to a stream of its own, and a client.
struct Deployment {
    q: TestQueue,
    stream: String,
    /// The worker's name, as its events carry it.
    name: String,
    worker: RunningWorker,
    client: Client,
    dir: tempfile::TempDir,
}

impl Deployment {
    /// Built-ins and `flaky`, settings adjusted by `adjust`.
    async fn start(label: &str, adjust: impl FnOnce(&mut WorkerSettings)) -> Self {
        Self::start_with(label, registry, adjust).await
    }

    async fn start_with(
        label: &str,
        registry: impl FnOnce(&tempfile::TempDir) -> Registry,
        adjust: impl FnOnce(&mut WorkerSettings),
    ) -> Self {
        let dir = temp_dir(label);
        let q = TestQueue::new(label);
        let mut settings = with_stream(&q, 2);
        adjust(&mut settings);
        let (stream, name) = (settings.events.stream.clone(), settings.name.clone());
        let worker = q.worker_with(registry(&dir), settings).await;
        let client = q.client().await;
        Self {
            q,
            stream,
            name,
            worker,
            client,
            dir,
        }
    }

    /// Calls `flaky`, which succeeds on attempt `succeed_on`.
    async fn flaky(&self, succeed_on: u32) -> (TaskId, Result<Value, warren_client::Error>) {
        let args = json!({ "succeed_on": succeed_on });
        call(&self.client, Flaky::NAME, args, &CallOptions::default()).await
    }

    /// The events of `task`, up to its final one.
    async fn settled(&self, task: &TaskId) -> Vec<Read> {
        events_of(&self.stream, task.as_str(), settled).await
    }

    async fn stop(self) {
        self.client.close().await;
        self.worker.shutdown().await.unwrap();
    }
}

/// Retries at once.
fn at_once(settings: &mut WorkerSettings) {
    settings.policy.backoff = vec![Duration::ZERO];
}

/// One event read from the stream, with its offset and message properties.
#[derive(Debug)]
struct Read {
    offset: u64,
    properties: BasicProperties,
    event: Event,
}

fn kinds(read: &[Read]) -> Vec<(EventKind, u32)> {
    read.iter()
        .map(|r| (r.event.kind, r.event.attempt))
        .collect()
}

fn settled(read: &[Read]) -> bool {
    read.iter().any(|r| r.event.is_final())
}

/// The events of `task` in `stream`, in stream order, read from the start until `done` holds
/// (panics after [`WAIT`]).
async fn events_of(stream: &str, task: &str, done: impl Fn(&[Read]) -> bool) -> Vec<Read> {
    let (connection, channel) = raw_channel().await;
    let mut reader = events::read(&channel, stream, Start::First, 100, "test-reader")
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while !done(&got) {
        let delivery = match tokio::time::timeout_at(until, reader.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            other => panic!(
                "reading {stream}: {other:?}; events of {task} so far: {:?}",
                kinds(&got)
            ),
        };
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let (offset, decoded) = events::decode(&delivery.properties, &delivery.data).unwrap();
        for (event, _) in decoded {
            if event.task_id == task {
                got.push(Read {
                    offset,
                    properties: delivery.properties.clone(),
                    event,
                });
            }
        }
    }
    let _ = connection.close(200, "read".into()).await;
    got
}

/// Appends a marker to `stream` (confirmed) and reads the stream up to it: everything appended
/// before now, as (offset, event); the marker's offset last.
async fn appended_so_far(stream: &str) -> (Vec<(u64, Event)>, u64) {
    let (connection, channel) = raw_channel().await;
    let marker = uuid::Uuid::new_v4().to_string();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirm = channel
        .basic_publish(
            "".into(),
            stream.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"{\"marker\":true}",
            BasicProperties::default().with_message_id(marker.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    let mut reader = events::read(&channel, stream, Start::First, 100, "test-marker")
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    loop {
        let delivery = match tokio::time::timeout_at(until, reader.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            other => panic!("reading {stream} up to the marker: {other:?}"),
        };
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let offset = events::offset_of(&delivery.properties).unwrap();
        if delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str())
            == Some(marker.as_str())
        {
            let _ = connection.close(200, "read".into()).await;
            return (got, offset);
        }
        let (_, decoded) = events::decode(&delivery.properties, &delivery.data).unwrap();
        got.extend(decoded.into_iter().map(|(event, _)| (offset, event)));
    }
}

/// Calls `function` and gives the task's id with the outcome.
async fn call(
    client: &Client,
    function: &str,
    args: Value,
    options: &CallOptions,
) -> (TaskId, Result<Value, warren_client::Error>) {
    let (tx, rx) = oneshot::channel();
    let outcome = client.call_json_with_ack(function, args, options, tx).await;
    (rx.await.expect("the task was published"), outcome)
}

/// Publishes a task to `queue` on `channel` (in confirm mode), its reply to `reply_to`.
async fn publish_task(
    channel: &Channel,
    queue: &str,
    body: &Value,
    h: FieldTable,
    reply_to: &str,
) -> TaskId {
    let id = TaskId::new();
    let properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_correlation_id(id.as_str().into())
        .with_reply_to(reply_to.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(h);
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &serde_json::to_vec(body).unwrap(),
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    id
}

/// A foreign caller: a channel in confirm mode, and a reply queue of its own (`warren.reply.*`,
/// which workers reply to by default) with a consumer on it.
async fn raw_caller(q: &TestQueue) -> (lapin::Connection, Channel, String, lapin::Consumer) {
    let (connection, channel) = raw_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let name = format!("warren.reply.{}", uuid::Uuid::new_v4().simple());
    q.also_delete(&name);
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "test-replies".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (connection, channel, name, consumer)
}

async fn next_reply(replies: &mut lapin::Consumer) -> Value {
    match tokio::time::timeout(WAIT, replies.next()).await {
        Ok(Some(Ok(delivery))) => serde_json::from_slice(&delivery.data).unwrap(),
        other => panic!("no reply: {other:?}"),
    }
}

fn millis_now() -> i64 {
    envelope::epoch_millis(SystemTime::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_success_appends_started_then_succeeded_with_the_tasks_fields() {
    let d = Deployment::start("events-success", |_| {}).await;
    let (connection, channel, reply_to, mut replies) = raw_caller(&d.q).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut h = FieldTable::default();
    envelope::set_header_int(&mut h, headers::ATTEMPT, 1);
    envelope::set_header_str(&mut h, headers::ORIGIN, "session-42");
    envelope::set_header_str(&mut h, headers::BATCH, "batch-7");
    envelope::set_header_str(&mut h, headers::TRACEPARENT, traceparent);
    let before = millis_now();
    let body = json!({"function": "echo", "args": {"hello": "world"}});
    let id = publish_task(&channel, &d.q.name, &body, h, &reply_to).await;
    let reply = next_reply(&mut replies).await;
    assert_eq!(reply, json!({"ok": true, "result": {"hello": "world"}}));
    let after = millis_now();

    let read = d.settled(&id).await;
    assert_eq!(
        kinds(&read),
        [(EventKind::Started, 1), (EventKind::Succeeded, 1)]
    );
    assert!(read[0].offset < read[1].offset);
    for r in &read {
        let e = &r.event;
        assert_eq!(e.v, events::EVENT_VERSION);
        assert_eq!(
            (e.task_id.as_str(), e.function.as_str(), e.queue.as_str()),
            (id.as_str(), "echo", d.q.name.as_str())
        );
        assert_eq!(e.worker, d.name);
        assert_eq!(e.origin.as_deref(), Some("session-42"));
        assert_eq!(e.batch.as_deref(), Some("batch-7"));
        assert_eq!(e.traceparent.as_deref(), Some(traceparent));
        assert!(e.at_ms >= before && e.at_ms <= after, "{e:?}");
        let p = &r.properties;
        assert_eq!(p.kind().as_ref().unwrap().as_str(), e.kind.as_str());
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            e.dedupe_key().as_str()
        );
        assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), id.as_str());
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(*p.delivery_mode(), Some(2));
    }
    assert!(read[0].event.result.is_none());
    let result = read[1].event.result.as_ref().unwrap().get();
    assert_eq!(
        serde_json::from_str::<Value>(result).unwrap(),
        json!({"hello": "world"})
    );
    assert!(!read[1].event.truncated);
    let _ = connection.close(200, "done".into()).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_appends_failed_with_its_retry_then_succeeds() {
    let d = Deployment::start("events-retry", at_once).await;
    let (id, outcome) = d.flaky(2).await;
    assert_eq!(outcome.unwrap(), json!(2));

    let read = d.settled(&id).await;
    assert_eq!(
        kinds(&read),
        [
            (EventKind::Started, 1),
            (EventKind::Failed, 1),
            (EventKind::Started, 2),
            (EventKind::Succeeded, 2),
        ]
    );
    let failed = &read[1].event;
    let error = failed.error.as_ref().unwrap();
    assert!(
        error.message.contains("attempt 1 fails on purpose"),
        "{error:?}"
    );
    let retry = failed.retry.unwrap();
    assert_eq!(retry.attempt, 2);
    assert!(retry.at_ms >= failed.at_ms && retry.at_ms < failed.at_ms + 1000);
    assert!(!failed.is_final());
    assert_eq!(read[3].event.result.as_ref().unwrap().get(), "2");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_and_a_last_attempt_append_dead_lettered_with_the_reason() {
    let d = Deployment::start("events-dead", |s| {
        at_once(s);
        s.policy.max_attempts = 2;
    })
    .await;

    let (id, outcome) = call(
        &d.client,
        "fail",
        json!({"message": "nope"}),
        &CallOptions::default(),
    )
    .await;
    assert!(outcome.is_err());
    let read = d.settled(&id).await;
    assert_eq!(
        kinds(&read),
        [(EventKind::Started, 1), (EventKind::DeadLettered, 1)]
    );
    let dead = &read[1].event;
    assert_eq!(dead.reason.as_deref(), Some("permanent_failure"));
    assert_eq!(dead.error.as_ref().unwrap().message, "nope");
    assert!(dead.retry.is_none());

    let (id, outcome) = d.flaky(99).await;
    assert!(outcome.is_err());
    let read = d.settled(&id).await;
    assert_eq!(
        kinds(&read),
        [
            (EventKind::Started, 1),
            (EventKind::Failed, 1),
            (EventKind::Started, 2),
            (EventKind::DeadLettered, 2),
        ]
    );
    assert_eq!(read[1].event.retry.unwrap().attempt, 2);
    let dead = &read[3].event;
    assert_eq!(dead.reason.as_deref(), Some("attempts_exhausted"));
    assert!(
        dead.error
            .as_ref()
            .unwrap()
            .message
            .contains("attempt 2 fails on purpose")
    );
    d.stop().await;
}

/// Tasks settled without running: one whose deadline passed, one that names no function of the
/// worker. Each has its final event and no `started`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_settled_without_running_append_only_their_final_event() {
    let d = Deployment::start("events-unrun", |_| {}).await;
    let (connection, channel, reply_to, mut replies) = raw_caller(&d.q).await;

    let mut h = FieldTable::default();
    envelope::set_header_int(&mut h, headers::DEADLINE, millis_now() - 1000);
    let body = json!({"function": "echo", "args": 1});
    let expired = publish_task(&channel, &d.q.name, &body, h, &reply_to).await;
    let reply = next_reply(&mut replies).await;
    assert_eq!(reply["error"]["kind"], "expired", "{reply}");
    let read = d.settled(&expired).await;
    assert_eq!(kinds(&read), [(EventKind::Expired, 1)]);
    assert_eq!(read[0].event.function, "echo");
    assert_eq!(read[0].event.error.as_ref().unwrap().kind, "expired");

    let body = json!({"function": "no_such_function"});
    let unknown = publish_task(&channel, &d.q.name, &body, FieldTable::default(), &reply_to).await;
    let reply = next_reply(&mut replies).await;
    assert_eq!(reply["error"]["kind"], "unknown_function", "{reply}");
    let read = d.settled(&unknown).await;
    assert_eq!(kinds(&read), [(EventKind::DeadLettered, 1)]);
    assert_eq!(read[0].event.reason.as_deref(), Some("rejected"));
    assert_eq!(read[0].event.function, "no_such_function");
    assert_eq!(
        read[0].event.error.as_ref().unwrap().kind,
        "unknown_function"
    );
    let _ = connection.close(200, "done".into()).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_over_the_cap_is_left_out_and_marked_truncated() {
    let d = Deployment::start("events-truncated", |s| s.events.max_result_bytes = 16).await;

    let big = "x".repeat(100);
    let (id, outcome) = call(&d.client, "echo", json!(big), &CallOptions::default()).await;
    // The caller still gets the whole result.
    assert_eq!(outcome.unwrap(), json!(big));
    let read = d.settled(&id).await;
    let succeeded = &read.last().unwrap().event;
    assert_eq!(succeeded.kind, EventKind::Succeeded);
    assert!(succeeded.truncated && succeeded.result.is_none());

    // Sixteen bytes of JSON are carried.
    let (id, outcome) = call(
        &d.client,
        "echo",
        json!("12345678901234"),
        &CallOptions::default(),
    )
    .await;
    assert_eq!(outcome.unwrap(), json!("12345678901234"));
    let read = d.settled(&id).await;
    let succeeded = &read.last().unwrap().event;
    assert!(!succeeded.truncated);
    assert_eq!(
        succeeded.result.as_ref().unwrap().get(),
        "\"12345678901234\""
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_events_off_appends_nothing() {
    let d = Deployment::start("events-off", |s| s.events.enabled = false).await;
    // Not declared by this worker; the stream exists (another worker of the deployment declared
    // it), and nothing goes there.
    let (connection, channel) = raw_channel().await;
    events::declare_stream(&channel, &d.stream, Duration::from_secs(600), 1 << 20)
        .await
        .unwrap();
    let (_, outcome) = call(&d.client, "echo", json!("quiet"), &CallOptions::default()).await;
    assert_eq!(outcome.unwrap(), json!("quiet"));
    let (_, outcome) = d.flaky(1).await;
    assert_eq!(outcome.unwrap(), json!(1));
    let (_, outcome) = call(&d.client, "fail", json!(null), &CallOptions::default()).await;
    assert!(outcome.is_err());
    let (appended, _) = appended_so_far(&d.stream).await;
    assert!(appended.is_empty(), "{appended:?}");
    let _ = connection.close(200, "done".into()).await;
    d.stop().await;
}

/// The order the reply and the event are published in: when a caller has its reply, the final
/// event is in the stream. Many calls at once, each checked as its reply comes in by appending a
/// marker after it: the task's final event must come before the marker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_caller_has_the_reply_the_final_event_is_already_in_the_stream() {
    let d = Deployment::start("events-order", |s| s.concurrency = 16).await;
    let (client, stream) = (&d.client, &d.stream);
    let (connection, marks) = raw_channel().await;
    marks
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..40 {
        let client = client.clone();
        let (marks, stream) = (marks.clone(), stream.clone());
        calls.spawn(async move {
            let (id, outcome) = call(&client, "echo", json!(i), &CallOptions::default()).await;
            assert_eq!(outcome.unwrap(), json!(i));
            // As soon as the reply is in hand: a marker after everything appended so far.
            let marker = format!("marker-{}", id.as_str());
            let confirm = marks
                .basic_publish(
                    "".into(),
                    stream.as_str().into(),
                    BasicPublishOptions::default(),
                    b"{}",
                    BasicProperties::default().with_message_id(marker.as_str().into()),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
            id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = calls.join_next().await {
        ids.push(id.unwrap());
    }
    // Read everything up to a last marker, noting where each task's final event and marker are.
    let (reader_connection, reader) = raw_channel().await;
    let mut consumer = events::read(&reader, stream, Start::First, 200, "order")
        .await
        .unwrap();
    let mut finals = std::collections::HashMap::new();
    let mut markers = std::collections::HashMap::new();
    while markers.len() < ids.len() {
        let delivery = match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("reading {stream}: {other:?}"),
        };
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let offset = events::offset_of(&delivery.properties).unwrap();
        // A pack of events has no message id.
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        if let Some(task) = message_id.strip_prefix("marker-") {
            markers.insert(task.to_owned(), offset);
        } else {
            let (_, decoded) = events::decode(&delivery.properties, &delivery.data).unwrap();
            for (event, _) in decoded {
                if event.is_final() {
                    finals.insert(event.task_id.clone(), offset);
                }
            }
        }
    }
    for id in &ids {
        let marker = markers[id.as_str()];
        let last = finals
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id}: no final event before its caller's marker"));
        assert!(
            *last < marker,
            "{id}: final event at {last}, after the marker at {marker}"
        );
    }
    let _ = reader_connection.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    d.stop().await;
}

/// Under concurrent load the worker packs the events submitted while an append confirms into
/// one message (AMQP `type` `events`, a JSON array): some messages are packs, and after dedupe
/// every task has exactly its `started` and `succeeded`, each once. A lookup reads its result
/// out of a pack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_events_are_packed_and_every_event_is_there_once() {
    const TASKS: usize = 200;
    let d = Deployment::start("events-pack", |s| s.concurrency = 16).await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..TASKS {
        let client = d.client.clone();
        calls.spawn(async move {
            let (id, outcome) = call(&client, "echo", json!(i), &CallOptions::default()).await;
            assert_eq!(outcome.unwrap(), json!(i));
            id
        });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(id) = calls.join_next().await {
        ids.insert(id.unwrap().as_str().to_owned());
    }
    // Every reply is in hand, so every final event is in the stream: read up to a marker.
    let (connection, channel) = raw_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let marker = uuid::Uuid::new_v4().to_string();
    let confirm = channel
        .basic_publish(
            "".into(),
            d.stream.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_message_id(marker.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    let mut reader = events::read(&channel, &d.stream, Start::First, 200, "pack-reader")
        .await
        .unwrap();
    let (mut packs, mut messages) = (0, 0);
    let mut packed_task = None;
    let mut seen = std::collections::HashSet::new();
    let mut per_task: std::collections::HashMap<String, Vec<EventKind>> =
        std::collections::HashMap::new();
    loop {
        let delivery = match tokio::time::timeout(WAIT, reader.next()).await {
            Ok(Some(Ok(delivery))) => delivery,
            other => panic!("reading {}: {other:?}", d.stream),
        };
        delivery.ack(BasicAckOptions::default()).await.unwrap();
        let properties = &delivery.properties;
        if properties.message_id().as_ref().map(|m| m.as_str()) == Some(marker.as_str()) {
            break;
        }
        messages += 1;
        let (_, decoded) = events::decode(properties, &delivery.data).unwrap();
        if events::is_pack(properties) {
            assert_eq!(
                properties.kind().as_ref().map(|k| k.as_str()),
                Some(events::PACK_TYPE)
            );
            assert!(
                (2..=events::MAX_PACK_EVENTS).contains(&decoded.len()),
                "{}",
                decoded.len()
            );
            packs += 1;
        } else {
            assert_eq!(decoded.len(), 1);
        }
        for (event, _) in decoded {
            assert!(ids.contains(&event.task_id), "{event:?}");
            if events::is_pack(properties) && event.kind == EventKind::Succeeded {
                packed_task = Some(event.task_id.clone());
            }
            if seen.insert(event.dedupe_key()) {
                per_task.entry(event.task_id).or_default().push(event.kind);
            }
        }
    }
    assert!(packs > 0, "no packed message among {messages}");
    assert_eq!(per_task.len(), TASKS);
    for (task, kinds) in &per_task {
        assert_eq!(
            kinds,
            &[EventKind::Started, EventKind::Succeeded],
            "task {task}"
        );
    }
    assert!(
        messages < 2 * TASKS,
        "{messages} messages for {} events",
        2 * TASKS
    );
    // A lookup finds a result that came in a pack.
    let task = packed_task.expect("a succeeded event in a pack");
    let lookup = Client::connect(warren_client::ClientSettings {
        broker: BrokerSettings::new(amqp_url()),
        events_stream: d.stream.clone(),
        ..warren_client::ClientSettings::default()
    })
    .await
    .unwrap();
    let found = lookup.result(&TaskId::from(task.as_str())).await.unwrap();
    assert!(found.outcome.succeeded(), "{found:?}");
    lookup.close().await;
    let _ = connection.close(200, "done".into()).await;
    d.stop().await;
}

/// A worker whose broker user may not declare the event stream: with the stream missing it does
/// not start, and says which stream and what to do (the binary exits non-zero); once the stream
/// exists it starts and appends (through the default exchange, with no write permission on the
/// stream). The stream its profile names (`users.sh ... WARREN_EVENTS_STREAM`) it declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_may_not_declare_a_missing_stream_does_not_start_and_says_why() {
    let dir = temp_dir("events-missing");
    let q = TestQueue::new("events-missing");
    let own = format!("{}.events", q.name);
    let missing = format!("{}.other-events", q.name);
    q.also_delete(&own);
    q.also_delete(&missing);
    let user = BrokerUser::create_with_events("worker", &q.name, &own, &dir);
    let as_user = |stream: &str| {
        let mut settings = q.worker_settings(2);
        settings.broker = BrokerSettings::new(user.url());
        settings.events.stream = stream.to_owned();
        settings
    };

    let err = warren_worker::start(as_user(&missing), registry(&dir), Default::default())
        .await
        .expect_err("no stream, no permission to declare it");
    assert!(
        matches!(&err, WorkerError::EventStream { stream, .. } if *stream == missing),
        "{err:?}"
    );
    let text = err.to_string();
    for says in [
        missing.as_str(),
        "does not exist",
        "`configure`",
        &user.name,
        "--events off",
    ] {
        assert!(text.contains(says), "{says:?} not in: {text}");
    }

    // The binary: a clear line on stderr and a non-zero exit.
    let mut command = std::process::Command::new(binary("warren-worker"));
    command
        .args(["--queue", &q.name, "--events-stream", &missing])
        .env("AMQP_URL", user.url())
        .env("WARREN_FUNCTIONS_EXCHANGE", q.functions_exchange())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&missing) && stderr.contains("--events off"),
        "{stderr}"
    );

    // Declared by someone who may: the same worker starts and appends.
    let (connection, channel) = raw_channel().await;
    events::declare_stream(&channel, &missing, Duration::from_secs(600), 1 << 20)
        .await
        .unwrap();
    let worker = q.worker_with(registry(&dir), as_user(&missing)).await;
    let client = q.client().await;
    let (id, outcome) = call(&client, "echo", json!(1), &CallOptions::default()).await;
    assert_eq!(outcome.unwrap(), json!(1));
    let read = events_of(&missing, id.as_str(), settled).await;
    assert_eq!(
        kinds(&read),
        [(EventKind::Started, 1), (EventKind::Succeeded, 1)]
    );
    worker.shutdown().await.unwrap();

    // The stream of its own profile, it declares.
    let worker = q.worker_with(registry(&dir), as_user(&own)).await;
    assert!(
        warren_tests::inspect_queue(&channel, &own).await.is_ok(),
        "{own} was not declared"
    );
    worker.shutdown().await.unwrap();
    client.close().await;
    let _ = connection.close(200, "done".into()).await;
}

/// A stream declared with other retention (by an operator, or by workers with other settings)
/// is used as it is; a queue of the stream's name that is not a stream is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_other_retention_is_used_and_a_queue_that_is_no_stream_is_refused() {
    let dir = temp_dir("events-existing");
    let q = TestQueue::new("events-existing");
    let mut settings = with_stream(&q, 2);
    let stream = settings.events.stream.clone();
    let (connection, channel) = raw_channel().await;
    events::declare_stream(&channel, &stream, Duration::from_secs(600), 1 << 20)
        .await
        .unwrap();
    let worker = q.worker_with(registry(&dir), settings.clone()).await;
    let client = q.client().await;
    let (id, outcome) = call(&client, "echo", json!(1), &CallOptions::default()).await;
    assert_eq!(outcome.unwrap(), json!(1));
    let read = events_of(&stream, id.as_str(), settled).await;
    assert_eq!(
        kinds(&read),
        [(EventKind::Started, 1), (EventKind::Succeeded, 1)]
    );
    worker.shutdown().await.unwrap();

    let classic = format!("{}.classic", stream);
    q.also_delete(&classic);
    channel
        .queue_declare(
            classic.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    settings.events.stream = classic.clone();
    let err = warren_worker::start(settings, registry(&dir), Default::default())
        .await
        .expect_err("a classic queue is no event stream");
    assert!(
        matches!(&err, WorkerError::EventStream { stream, .. } if *stream == classic),
        "{err:?}"
    );
    assert!(err.to_string().contains("is not a stream"), "{err}");
    client.close().await;
    let _ = connection.close(200, "done".into()).await;
}

/// Counts its runs; succeeds.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Counted {}

impl Task for Counted {
    const NAME: &'static str = "counted";
    type Output = ();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_under_a_running_worker_leaves_its_tasks_unacked_and_counts_it() {
    // Process-wide; other tests of this binary record into it too, under queues of their own.
    let metrics = warren_worker::metrics::install().expect("the metrics recorder");
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let counting = move |dir: &tempfile::TempDir| {
        registry(dir).register_fn(move |_: Counted, _ctx: TaskContext| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                Ok::<(), TaskError>(())
            }
        })
    };
    let d = Deployment::start_with("events-deleted", counting, |_| {}).await;
    let (q, client) = (&d.q, &d.client);
    let (_, outcome) = call(client, "echo", json!("before"), &CallOptions::default()).await;
    assert_eq!(outcome.unwrap(), json!("before"));

    let (connection, channel) = raw_channel().await;
    channel
        .queue_delete(d.stream.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    client.enqueue(&Counted {}).await.unwrap();
    let failed_appends = || {
        let text = metrics.render();
        let series = format!(
            "warren_worker_event_appends_failed_total{{queue=\"{}\"}} ",
            q.name
        );
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually("a failed append counted", WAIT, || async {
        failed_appends() >= 1
    })
    .await;
    // Run, not acked, delivered again.
    eventually("the task delivered again", WAIT, || async {
        runs.load(Ordering::SeqCst) >= 2
    })
    .await;
    let Deployment {
        q, worker, client, ..
    } = d;
    worker.shutdown().await.unwrap();
    // Never acked: it is still in the queue, or parked by the broker's delivery limit.
    eventually("the task kept by the broker", WAIT, || async {
        let ready = client.queue_stats(&q.name).await.unwrap().ready;
        ready + q.dead_count(&client).await == 1
    })
    .await;
    client.close().await;
    let _ = connection.close(200, "done".into()).await;
}

/// The offset of the oldest event `stream` still keeps.
async fn first_offset(stream: &str) -> u64 {
    let (connection, channel) = raw_channel().await;
    let mut reader = events::read(&channel, stream, Start::First, 1, "test-first")
        .await
        .unwrap();
    let offset = match tokio::time::timeout(WAIT, reader.next()).await {
        Ok(Some(Ok(delivery))) => events::offset_of(&delivery.properties).unwrap(),
        other => panic!("reading the first event of {stream}: {other:?}"),
    };
    let _ = connection.close(200, "read".into()).await;
    offset
}

/// Retention (docs/protocol.md, "Task events"): a stream kept to 16 KiB, in segments of 4 KiB,
/// loses its oldest segments to newer events. The stream itself stays with its newer events,
/// new appends succeed, and a lookup of a task whose events went answers not found, naming the
/// retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_removes_the_oldest_events_and_never_the_stream() {
    // RabbitMQ removes whole segments, the oldest first, once the stream holds more than
    // MAX_BYTES; the worker declares segments of a quarter of that.
    const MAX_BYTES: u64 = 16 * 1024;
    let max_age = Duration::from_secs(3600);
    let d = Deployment::start("events-retention", |s| {
        s.events.max_bytes = MAX_BYTES;
        s.events.max_age = max_age;
    })
    .await;
    let lookups =
        d.q.client_with(|c| {
            c.events_stream = d.stream.clone();
            c.events_max_age = max_age;
        })
        .await;
    // Results of 1 KiB: a segment holds the events of about three tasks.
    let payload = "r".repeat(1024);
    let echo = |n: usize| json!({ "n": n, "payload": payload });
    let run = |n: usize| {
        let (client, args) = (d.client.clone(), echo(n));
        async move {
            let (id, outcome) = call(&client, "echo", args.clone(), &CallOptions::default()).await;
            // The task is acked only after its events are confirmed: an append that failed
            // would hand it back, and the call would not be answered like this.
            assert_eq!(outcome.unwrap(), args);
            id
        }
    };

    let first = run(0).await;
    assert!(lookups.result(&first).await.unwrap().outcome.succeeded());
    let first_events = d.settled(&first).await;
    let last_of_first = first_events.iter().map(|r| r.offset).max().unwrap();

    // More tasks, until retention has removed the first task's events.
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut tasks = 1;
    loop {
        for _ in 0..10 {
            run(tasks).await;
            tasks += 1;
        }
        let oldest = first_offset(&d.stream).await;
        if oldest > last_of_first {
            eprintln!("after {tasks} tasks the oldest event kept is at offset {oldest}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "after {tasks} tasks the stream still keeps offset {oldest}"
        );
    }

    // The stream is still there (a passive declaration finds it) ...
    let (connection, channel) = raw_channel().await;
    assert!(events::stream_exists(&channel, &d.stream).await.unwrap());
    let _ = connection.close(200, "checked".into()).await;
    // ... new appends succeed, and the stream keeps the newer tasks with the newest ...
    let before_last = run(tasks).await;
    let last = run(tasks + 1).await;
    for id in [&before_last, &last] {
        let found = lookups.result(id).await.unwrap();
        assert!(found.outcome.succeeded(), "{found:?}");
    }
    // ... and the first task is no longer found, with the retention named.
    let gone = lookups.result(&first).await.unwrap();
    let json = serde_json::to_value(&gone).unwrap();
    assert_eq!(json["state"], "not_found", "{json}");
    assert_eq!(json["retention_s"], 3600, "{json}");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("(1h)"), "{message}");

    lookups.close().await;
    d.stop().await; // the queue's guard deletes the stream with it
}

/// A Python program written from docs/protocol.md alone, its example run verbatim: it prints a
/// task's events, deduplicated, up to the final one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_reader_written_from_the_protocol_prints_a_tasks_events() {
    // Debian's pika is for Debian's Python, which another `python3` on PATH may hide.
    let python3 = ["python3", "/usr/bin/python3"].into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import pika"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python3) = python3 else {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !in_ci,
            "CI runs this test: deploy/test.sh installs python3-pika"
        );
        println!(
            "SKIPPED a_python_reader_written_from_the_protocol_prints_a_tasks_events: needs \
             python3 with pika (apt-get install python3-pika, or run deploy/test.sh)"
        );
        return;
    };
    let d = Deployment::start("events-python", at_once).await;
    let (id, outcome) = d.flaky(2).await;
    assert_eq!(outcome.unwrap(), json!(2));

    let script = d.dir.path().join("warren_events.py");
    std::fs::write(
        &script,
        protocol_example("### Python (pika): read a task's events"),
    )
    .unwrap();
    let out = run_reader(python3, &script, id.as_str(), &d.stream, 5).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<(&str, u64)> = printed
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["attempt"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [
            ("started", 1),
            ("failed", 1),
            ("started", 2),
            ("succeeded", 2)
        ]
    );
    assert!(printed.iter().all(|e| e["task_id"] == id.as_str()));
    assert_eq!(printed[1]["retry"]["attempt"], 2);
    assert_eq!(printed[3]["result"], 2);

    // Under load the events come packed, several to a message, among other tasks' events and
    // after a duplicate sent alone: the reader prints each event of its task once.
    let packed = TaskId::new();
    let subject = events::Subject {
        task_id: packed.as_str().to_owned(),
        function: "echo".into(),
        queue: d.q.name.clone(),
        attempt: 1,
        worker: d.name.clone(),
        batch: None,
        origin: None,
        traceparent: None,
    };
    let other = events::Subject {
        task_id: TaskId::new().as_str().to_owned(),
        ..subject.clone()
    };
    let started = subject.event(EventKind::Started);
    let mut done = subject.event(EventKind::Succeeded);
    done.result = Some(warren_shared::RawJson::from_string("\"packed\"".into()).unwrap());
    append_to(&d.stream, std::slice::from_ref(&started)).await;
    append_to(
        &d.stream,
        &[
            other.event(EventKind::Started),
            started,
            done,
            other.event(EventKind::Expired),
        ],
    )
    .await;
    let out = run_reader(python3, &script, packed.as_str(), &d.stream, 5).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<(&str, &str)> = printed
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["task_id"].as_str().unwrap()))
        .collect();
    assert_eq!(
        steps,
        [("started", packed.as_str()), ("succeeded", packed.as_str())]
    );
    assert_eq!(printed[1]["result"], "packed");

    // A task it cannot find: it says so and fails.
    let out = run_reader(python3, &script, TaskId::new().as_str(), &d.stream, 1).await;
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no final event"));
    d.stop().await;
}

/// Appends `events` to `stream` as a worker does: one alone as a message of its own, several
/// packed into one message. Waits for the confirm.
async fn append_to(stream: &str, appended: &[Event]) {
    let (connection, channel) = raw_channel().await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (properties, body) = if let [one] = appended {
        (one.properties(), one.to_body())
    } else {
        let mut pack = events::Pack::new();
        for event in appended {
            pack.push(&event.to_body(), event.at_ms);
        }
        (pack.properties(), pack.into_body())
    };
    let confirm = channel
        .basic_publish(
            "".into(),
            stream.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "{confirm:?}"
    );
    let _ = connection.close(200, "appended".into()).await;
}

/// Runs the reader `script` for `task` on `stream`, waiting `wait_s` for more events, at most 60 s.
async fn run_reader(
    python3: &str,
    script: &std::path::Path,
    task: &str,
    stream: &str,
    wait_s: u32,
) -> std::process::Output {
    let mut command = tokio::process::Command::new(python3);
    command
        .arg(script)
        .arg(task)
        .env("AMQP_URL", amqp_url())
        .env("WARREN_EVENTS_STREAM", stream)
        .env("WARREN_EVENTS_WAIT", wait_s.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the reader ends")
        .unwrap()
}

/// The code block that follows `heading` in docs/protocol.md.
fn protocol_example(heading: &str) -> String {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md"),
    )
    .unwrap();
    let code: Vec<&str> = doc
        .lines()
        .skip_while(|l| !l.starts_with(heading))
        .skip_while(|l| *l != "```python")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    assert!(
        !code.is_empty(),
        "docs/protocol.md has no block under {heading:?}"
    );
    code.join("\n") + "\n"
}
