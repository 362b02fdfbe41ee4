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
    // Under load a worker packs events of several tasks into one message: the lookup reads
    // each. A worker killed between append and ack appends `started` again: one event all
    // the same.
    let other = TaskId::new();
    stream
        .append_packed(&[
            subject(other.as_str(), "other", 1).event(EventKind::Started),
            started.clone(),
            succeeded(other.as_str(), "other", "1"),
        ])
        .await;
    stream.append(&started).await;
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

/// Runs the built `warren` with `args`.
fn warren(args: &[&str]) -> std::process::Output {
    std::process::Command::new(warren_tests::binary("warren"))
        .args(args)
        .env("AMQP_URL", amqp_url())
        .output()
        .unwrap_or_else(|e| panic!("cannot run warren: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A final failure of `id`: `handler_error: boom`.
fn failed_for_good(id: &str) -> warren_shared::events::Event {
    let mut failed = subject(id, "f", 1).event(EventKind::Failed);
    failed.error = Some(warren_shared::events::EventError {
        kind: "handler_error".into(),
        message: "boom".into(),
    });
    failed
}

#[tokio::test]
async fn cli_result_prints_each_outcome_with_its_exit_status() {
    let stream = TestStream::new("cli-result").await;
    let (ok, failed, pending) = (TaskId::new(), TaskId::new(), TaskId::new());
    stream
        .append_all(&[
            subject(ok.as_str(), "f", 1).event(EventKind::Started),
            succeeded(ok.as_str(), "f", r#"{"x":1}"#),
            failed_for_good(failed.as_str()),
            subject(pending.as_str(), "f", 1).event(EventKind::Started),
        ])
        .await;
    let s = stream.name.as_str();

    let out = warren(&["result", ok.as_str(), "--events-stream", s]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"x\":1}\n");
    let out = warren(&["result", ok.as_str(), "--events-stream", s, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "settled");
    assert_eq!(json["task_id"], ok.as_str());
    assert_eq!(json["event"]["result"], serde_json::json!({"x": 1}));

    let out = warren(&["result", failed.as_str(), "--events-stream", s]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "error: handler_error: boom\n");

    let out = warren(&["result", pending.as_str(), "--events-stream", s]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let line = text(&out.stdout);
    assert!(
        line.starts_with("pending: ") && line.contains(" started "),
        "{line}"
    );

    let unknown = TaskId::new();
    for (id, age, shown) in [
        (unknown.as_str(), "24h", "(24h)"),
        ("order-17", "90m", "(90m)"),
    ] {
        let out = warren(&["result", id, "--events-stream", s, "--events-max-age", age]);
        assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
        let stderr = text(&out.stderr);
        assert!(stderr.starts_with("error: not_found: "), "{stderr}");
        assert!(stderr.contains(shown), "{stderr}");
    }

    // Bad input never reaches the broker; a missing stream is named.
    let out = warren(&["result", "", "--events-stream", s]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("the task id is empty"),
        "{}",
        text(&out.stderr)
    );
    let missing = format!("{s}.missing");
    let out = warren(&["result", ok.as_str(), "--events-stream", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains(&format!("no event stream {missing}")),
        "{}",
        text(&out.stderr)
    );
    let out = warren(&["result", ok.as_str(), "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(2), "--timeout needs --wait");
    stream.delete().await;
}

/// Reads `reader` line by line on a thread, into a channel.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(100);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// The next line from `lines` that `wanted` accepts (within the stream bound).
async fn line_where(
    lines: &mut tokio::sync::mpsc::Receiver<String>,
    wanted: impl Fn(&str) -> bool,
) -> String {
    loop {
        let line = tokio::time::timeout(STREAM_WAIT, lines.recv())
            .await
            .expect("a line in time")
            .expect("the process is still writing");
        if wanted(&line) {
            return line;
        }
    }
}

#[tokio::test]
async fn cli_result_wait_returns_when_the_final_event_is_appended() {
    let stream = TestStream::new("cli-wait").await;
    let id = TaskId::new();
    stream
        .append(&subject(id.as_str(), "slow", 1).event(EventKind::Started))
        .await;
    let mut command = std::process::Command::new(warren_tests::binary("warren"));
    command
        .args(["result", id.as_str(), "--wait", "--timeout", "60s"])
        .args(["--events-stream", &stream.name])
        .env("AMQP_URL", amqp_url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = warren_tests::ChildGuard::spawn(command);
    let mut stderr = lines_of(child.take_stderr().unwrap());
    let mut stdout = lines_of(child.take_stdout().unwrap());
    // It has read the stream to its end and says what it waits for.
    let waiting = line_where(&mut stderr, |l| l.starts_with("waiting up to 1m: ")).await;
    assert!(
        waiting.contains("pending: ") && waiting.contains(id.as_str()),
        "{waiting}"
    );
    stream
        .append(&succeeded(id.as_str(), "slow", r#""done""#))
        .await;
    assert_eq!(line_where(&mut stdout, |_| true).await, r#""done""#);
    let status = tokio::task::spawn_blocking(move || child.wait_timeout(STREAM_WAIT))
        .await
        .unwrap()
        .expect("exits");
    assert_eq!(status.code(), Some(0));

    // A wait that times out says the task is not settled.
    let out = warren(&[
        "result",
        TaskId::new().as_str(),
        "--wait",
        "--timeout",
        "300ms",
        "--events-stream",
        &stream.name,
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    stream.delete().await;
}

#[tokio::test]
async fn cli_events_filters_by_task_function_queue_and_kind_and_prints_bodies_as_json() {
    let stream = TestStream::new("cli-events").await;
    let (a, b) = (TaskId::new(), TaskId::new());
    let mut on_other_queue = subject(b.as_str(), "resize", 1).event(EventKind::Started);
    on_other_queue.queue = "images".into();
    let appended = [
        subject(a.as_str(), "send_mail", 1).event(EventKind::Started),
        on_other_queue,
        succeeded(a.as_str(), "send_mail", r#"{"sent":true}"#),
        failed_for_good(b.as_str()),
    ];
    // The first alone, the others packed into one message as a worker packs them under load:
    // every filter and --json see each event.
    stream.append(&appended[0]).await;
    stream.append_packed(&appended[1..]).await;
    let s = stream.name.as_str();
    let events = |extra: &[&str]| {
        let out = warren(&[&["events", "--events-stream", s][..], extra].concat());
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    };

    let all = events(&[]);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 4, "{all}");
    assert!(
        lines[0].contains(&format!("  started        {a}  send_mail  q  #1  w1")),
        "{all}"
    );
    assert!(lines[2].ends_with(r#"{"sent":true}"#), "{all}");
    assert!(lines[3].ends_with("handler_error: boom (final)"), "{all}");

    let by_function = events(&["--function", "send_mail"]);
    assert_eq!(by_function.lines().count(), 2, "{by_function}");
    assert!(!by_function.contains(b.as_str()), "{by_function}");
    let by_queue = events(&["--queue", "images"]);
    assert_eq!(by_queue.lines().count(), 1, "{by_queue}");
    assert!(by_queue.contains("resize"), "{by_queue}");
    let by_kind = events(&["--kind", "succeeded,failed"]);
    assert_eq!(by_kind.lines().count(), 2, "{by_kind}");
    let by_kinds = events(&[
        "--kind",
        "started",
        "--kind",
        "failed",
        "--task",
        b.as_str(),
    ]);
    assert_eq!(by_kinds.lines().count(), 2, "{by_kinds}");
    assert!(!by_kinds.contains(a.as_str()), "{by_kinds}");
    assert_eq!(
        events(&["--since", "1h", "--task", a.as_str()])
            .lines()
            .count(),
        2
    );

    // --json: each event's body, as it was appended.
    let json = events(&["--json"]);
    let bodies: Vec<String> = appended
        .iter()
        .map(|e| String::from_utf8(e.to_body()).unwrap())
        .collect();
    assert_eq!(json.lines().collect::<Vec<_>>(), bodies);

    let out = warren(&["events", "--events-stream", s, "--kind", "done"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("dead_lettered"),
        "{}",
        text(&out.stderr)
    );
    let out = warren(&["events", "--events-stream", s, "--task", ""]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad --task"),
        "{}",
        text(&out.stderr)
    );
    stream.delete().await;
}

#[tokio::test]
async fn cli_events_follow_shows_events_as_they_are_appended() {
    let stream = TestStream::new("cli-follow").await;
    let id = TaskId::new();
    let mut command = std::process::Command::new(warren_tests::binary("warren"));
    command
        .args(["events", "--follow", "--task", id.as_str()])
        .args(["--events-stream", &stream.name])
        .env("AMQP_URL", amqp_url())
        .stdout(std::process::Stdio::piped());
    let mut child = warren_tests::ChildGuard::spawn(command);
    let mut stdout = lines_of(child.take_stdout().unwrap());
    stream
        .append(&subject(id.as_str(), "f", 1).event(EventKind::Started))
        .await;
    let first = line_where(&mut stdout, |_| true).await;
    assert!(first.contains(" started "), "{first}");
    // Another task's event is not shown; this task's next one is.
    noise(&stream, 3).await;
    stream.append(&succeeded(id.as_str(), "f", "7")).await;
    let second = line_where(&mut stdout, |_| true).await;
    assert!(
        second.contains(" succeeded ") && second.ends_with("  7"),
        "{second}"
    );
    drop(child);
    stream.delete().await;
}

/// `GET url` with an optional bearer token: the status and the body as JSON.
async fn get_json(url: String, bearer: Option<&str>) -> (u16, serde_json::Value) {
    let bearer = bearer.map(|t| format!("Bearer {t}"));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(STREAM_WAIT))
            .build()
            .into();
        let mut request = agent.get(&url);
        if let Some(bearer) = &bearer {
            request = request.header("Authorization", bearer);
        }
        let mut response = request.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
        (status, json)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_gateway_answers_results_over_http_and_the_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    const TOKEN: &str = "results-token";
    let stream = TestStream::new("gateway").await;
    let (done, running) = (TaskId::new(), TaskId::new());
    stream
        .append_all(&[
            succeeded(done.as_str(), "echo", r#"{"x":1}"#),
            subject(running.as_str(), "echo", 1).event(EventKind::Started),
        ])
        .await;
    let client = client_of(&stream).await;
    let listen =
        || warren_gateway::listen(([127, 0, 0, 1], 0).into(), 128).expect("bind a loopback port");
    let (http, text) = (listen(), listen());
    let addr = http.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let settings = warren_gateway::GatewaySettings {
        limits: warren_gateway::Limits {
            token: Some(TOKEN.into()),
            ..warren_gateway::Limits::default()
        },
        ..warren_gateway::GatewaySettings::default()
    };
    let gateway = tokio::spawn(warren_gateway::serve(
        settings,
        client.clone(),
        http,
        text,
        stop.clone(),
    ));
    let url = |id: &str| {
        format!(
            "http://{addr}/api/tasks/{}",
            warren_tests::percent_encode(id)
        )
    };

    // HTTP: the token as on /api/*; 200 with the outcome, 404 naming the retention, 400.
    let (status, body) = get_json(url(done.as_str()), None).await;
    assert_eq!(
        (status, &body["error"]["kind"]),
        (401, &"unauthorized".into())
    );
    let (status, body) = get_json(url(done.as_str()), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "settled");
    assert_eq!(body["task_id"], done.as_str());
    assert_eq!(body["event"]["result"], serde_json::json!({"x": 1}));
    let (status, body) = get_json(url(running.as_str()), Some(TOKEN)).await;
    assert_eq!((status, &body["state"]), (200, &"pending".into()), "{body}");
    assert_eq!(body["event"]["type"], "started");
    let (status, body) = get_json(url(TaskId::new().as_str()), Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["kind"], "not_found");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("(24h)"),
        "{body}"
    );
    for bad in ["x".repeat(300), "a\nb".to_owned()] {
        let (status, body) = get_json(url(&bad), Some(TOKEN)).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["kind"], "bad_request");
    }

    // The websocket: {"result": "<task id>"} -> {"result": {...}}.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("ws connects");
    let mut ask = async |message: serde_json::Value| -> serde_json::Value {
        ws.send(Message::text(message.to_string())).await.unwrap();
        loop {
            let answer = tokio::time::timeout(STREAM_WAIT, ws.next())
                .await
                .expect("an answer in time")
                .expect("open")
                .expect("a message");
            if let Message::Text(text) = answer {
                return serde_json::from_str(&text).unwrap();
            }
        }
    };
    assert_eq!(
        ask(serde_json::json!({"auth": TOKEN})).await,
        serde_json::json!({"auth": "ok"})
    );
    let answer = ask(serde_json::json!({"result": done.as_str()})).await;
    assert_eq!(answer["result"]["state"], "settled", "{answer}");
    assert_eq!(
        answer["result"]["event"]["result"],
        serde_json::json!({"x": 1})
    );
    let answer = ask(serde_json::json!({"result": running.as_str()})).await;
    assert_eq!(answer["result"]["state"], "pending", "{answer}");
    let unknown = TaskId::new();
    let answer = ask(serde_json::json!({"result": unknown.as_str()})).await;
    assert_eq!(answer["result"]["state"], "not_found", "{answer}");
    assert_eq!(answer["result"]["task_id"], unknown.as_str());
    assert_eq!(answer["result"]["retention_s"], 86_400);
    for bad in [serde_json::json!(5), serde_json::json!("")] {
        let answer = ask(serde_json::json!({ "result": bad })).await;
        assert_eq!(answer["result"]["task_id"], bad, "{answer}");
        assert_eq!(answer["result"]["error"]["kind"], "bad_request", "{answer}");
    }
    let _ = ws.close(None).await;

    stop.cancel();
    tokio::time::timeout(STREAM_WAIT, gateway)
        .await
        .expect("the gateway stops")
        .unwrap();
    client.close().await;
    stream.delete().await;
}
