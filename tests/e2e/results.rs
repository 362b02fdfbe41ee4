//! Results after the caller has gone: a task's outcome looked up by id in the task event stream
//! (`Client::result`, `warren result`, `warren events`, the gateway's `GET /api/tasks/<id>` and
//! `{"result": ...}`). Every test appends the events itself, as a worker appends them, to a
//! stream of its own (`TestStream`), deleted at the end.

use std::time::Duration;

use warren_client::{Client, ClientSettings, Error, LookupError, Outcome};
use warren_shared::events::{EventKind, Progress, RetryAt};
use warren_shared::lookup::BadTaskId;
use warren_shared::{BrokerSettings, TaskId};
use warren_tests::amqp_url;
use warren_tests::stream::{STREAM_WAIT, TestStream, subject, succeeded};

/// A client that looks results up in `stream`.
async fn client_of(stream: &TestStream) -> Client {
    Client::connect(ClientSettings {
        broker: BrokerSettings::new(amqp_url()),
        events_stream: stream.name.clone(),
        ..ClientSettings::default()
    })
    .await
    .expect("client connects")
}

/// Events of other tasks around the one a test looks for, so that a lookup must pick its own.
async fn noise(stream: &TestStream, n: usize) {
    for i in 0..n {
        let id = TaskId::new();
        stream
            .append_all(&[
                subject(id.as_str(), "other", 1).event(EventKind::Started),
                succeeded(id.as_str(), "other", &format!("{{\"n\":{i}}}")),
            ])
            .await;
    }
}

#[tokio::test]
async fn a_settled_task_is_found_with_its_result_among_others() {
    let stream = TestStream::new("settled").await;
    noise(&stream, 20).await;
    let id = TaskId::new();
    let started = subject(id.as_str(), "send_mail", 1).event(EventKind::Started);
    // A worker killed between append and ack appends `started` again: one event all the same.
    stream.append_all(&[started.clone(), started]).await;
    noise(&stream, 5).await;
    stream
        .append(&succeeded(id.as_str(), "send_mail", r#"{"sent":true}"#))
        .await;
    noise(&stream, 20).await;
    let client = client_of(&stream).await;

    let found = client.result(&id).await.expect("lookup");
    assert_eq!(found.task_id, id.as_str());
    let Outcome::Settled { event } = &found.outcome else {
        panic!("not settled: {found:?}");
    };
    assert_eq!(event.kind, EventKind::Succeeded);
    assert_eq!(event.function, "send_mail");
    assert_eq!(
        event.result.as_ref().map(|r| r.get().to_owned()),
        Some(r#"{"sent":true}"#.to_owned())
    );
    assert!(found.outcome.succeeded());
    let json = serde_json::to_value(&found).unwrap();
    assert_eq!(json["state"], "settled");
    assert_eq!(json["event"]["result"], serde_json::json!({"sent": true}));

    // A failure that is final settles the task too; one with a retry does not.
    let failing = TaskId::new();
    let mut retried = subject(failing.as_str(), "f", 1).event(EventKind::Failed);
    retried.retry = Some(RetryAt {
        attempt: 2,
        at_ms: 0,
    });
    let last = subject(failing.as_str(), "f", 2).event(EventKind::DeadLettered);
    stream.append_all(&[retried, last]).await;
    let found = client.result(&failing).await.expect("lookup");
    match &found.outcome {
        Outcome::Settled { event } => {
            assert_eq!((event.kind, event.attempt), (EventKind::DeadLettered, 2));
        }
        other => panic!("not settled: {other:?}"),
    }
    assert!(!found.outcome.succeeded());
    client.close().await;
    stream.delete().await;
}

#[tokio::test]
async fn a_truncated_result_is_settled_and_marked() {
    let stream = TestStream::new("truncated").await;
    let id = TaskId::new();
    let mut done = subject(id.as_str(), "big", 1).event(EventKind::Succeeded);
    done.truncated = true;
    stream.append(&done).await;
    let client = client_of(&stream).await;
    let found = client.result(&id).await.expect("lookup");
    let json = serde_json::to_value(&found).unwrap();
    assert_eq!(json["state"], "settled", "{json}");
    assert_eq!(json["event"]["truncated"], true, "{json}");
    assert!(json["event"].get("result").is_none(), "{json}");
    client.close().await;
    stream.delete().await;
}

#[tokio::test]
async fn a_task_still_running_is_pending_with_its_attempt_and_progress() {
    let stream = TestStream::new("pending").await;
    let id = TaskId::new();
    let mut failed = subject(id.as_str(), "f", 1).event(EventKind::Failed);
    failed.retry = Some(RetryAt {
        attempt: 2,
        at_ms: 0,
    });
    let mut progress = subject(id.as_str(), "f", 2).event(EventKind::Progress);
    progress.seq = Some(1);
    progress.progress = Some(Progress {
        fraction: Some(0.4),
        message: Some("40 of 100".into()),
        detail: None,
    });
    stream
        .append_all(&[
            subject(id.as_str(), "f", 1).event(EventKind::Started),
            failed,
            subject(id.as_str(), "f", 2).event(EventKind::Started),
            progress,
        ])
        .await;
    noise(&stream, 10).await;
    let client = client_of(&stream).await;
    let found = client.result(&id).await.expect("lookup");
    match &found.outcome {
        Outcome::Pending { event, progress } => {
            assert_eq!((event.kind, event.attempt), (EventKind::Progress, 2));
            let progress = progress.as_ref().expect("the last progress");
            assert_eq!(progress.fraction, Some(0.4));
            assert_eq!(progress.message.as_deref(), Some("40 of 100"));
        }
        other => panic!("not pending: {other:?}"),
    }
    client.close().await;
    stream.delete().await;
}

#[tokio::test]
async fn unknown_ids_are_not_found_naming_the_retention() {
    let stream = TestStream::new("unknown").await;
    noise(&stream, 10).await;
    // A task whose id is not a UUIDv7 is read from the first event kept.
    stream
        .append(&succeeded("order-17", "legacy", r#""done""#))
        .await;
    let client = client_of(&stream).await;
    for id in [
        TaskId::new(),
        TaskId::from(uuid::Uuid::new_v4().to_string()),
        TaskId::from("order-18"),
    ] {
        let started = std::time::Instant::now();
        let found = client.result(&id).await.expect("lookup");
        let json = serde_json::to_value(&found).unwrap();
        assert_eq!(json["state"], "not_found", "{id}: {json}");
        assert_eq!(json["retention_s"], 86_400, "{json}");
        assert!(
            json["message"].as_str().unwrap().contains("(24h)"),
            "{json}"
        );
        assert!(started.elapsed() < STREAM_WAIT, "{id}: bounded");
    }
    let found = client.result(&TaskId::from("order-17")).await.unwrap();
    assert!(found.outcome.succeeded(), "{found:?}");
    client.close().await;
    stream.delete().await;
}

#[tokio::test]
async fn wait_returns_when_the_final_event_is_appended_later() {
    let stream = TestStream::new("wait").await;
    let id = TaskId::new();
    stream
        .append(&subject(id.as_str(), "slow", 1).event(EventKind::Started))
        .await;
    let client = client_of(&stream).await;
    let (caught_up, waiting) = tokio::sync::oneshot::channel();
    let lookup = tokio::spawn({
        let client = client.clone();
        let id = id.clone();
        async move {
            client
                .wait_result_reporting(&id, STREAM_WAIT, caught_up)
                .await
        }
    });
    // The lookup has read the stream to its end and follows it now.
    let meanwhile = tokio::time::timeout(STREAM_WAIT, waiting)
        .await
        .expect("caught up in time")
        .expect("told");
    assert!(
        matches!(meanwhile.outcome, Outcome::Pending { .. }),
        "{meanwhile:?}"
    );
    assert!(!lookup.is_finished());
    stream.append(&succeeded(id.as_str(), "slow", "42")).await;
    let found = tokio::time::timeout(STREAM_WAIT, lookup)
        .await
        .expect("the wait ends with the final event")
        .unwrap()
        .expect("lookup");
    assert!(found.outcome.succeeded(), "{found:?}");

    // A wait that times out answers what it knows.
    let never = TaskId::new();
    let found = client
        .wait_result(&never, Duration::from_millis(500))
        .await
        .expect("lookup");
    assert!(
        matches!(found.outcome, Outcome::NotFound { .. }),
        "{found:?}"
    );
    client.close().await;
    stream.delete().await;
}

#[tokio::test]
async fn bad_ids_and_a_missing_stream_are_typed_errors() {
    let client = Client::connect(ClientSettings {
        broker: BrokerSettings::new(amqp_url()),
        events_stream: format!("test.events.missing.{}", uuid::Uuid::new_v4().simple()),
        ..ClientSettings::default()
    })
    .await
    .expect("client connects");
    for (id, expected) in [
        ("", BadTaskId::Empty),
        (&*"x".repeat(300), BadTaskId::TooLong(300)),
        ("a\nb", BadTaskId::Control),
    ] {
        match client.result(&TaskId::from(id)).await {
            Err(Error::Lookup(LookupError::BadId(bad))) => assert_eq!(bad, expected),
            other => panic!("{id:?}: {other:?}"),
        }
    }
    match client.result(&TaskId::new()).await {
        Err(e @ Error::Lookup(LookupError::NoStream(_))) => {
            let text = e.to_string();
            assert!(
                text.contains(&client.settings().events_stream),
                "names the stream: {text}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The client goes on working.
    assert!(matches!(
        client.result(&TaskId::from("")).await,
        Err(Error::Lookup(LookupError::BadId(_)))
    ));
    client.close().await;
}
