//! The gateway (issue 5) against the real broker and a real in-process worker: the websocket
//! endpoint, the Workerman Text bridge, their limits, and the page in headless Chromium.
//!
//! Every test gets its own queue (`test.gw.<uuid>`), worker, gateway on `127.0.0.1:0` and
//! outbox through [`spawn`]; [`Env::finish`] stops them, and the [`Env`] guard's queue
//! (a `TestQueue`) and outbox (a temp dir) are removed when it drops, also when a test fails
//! before reaching `finish`.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use warren_client::{Client, ClientSettings};
use warren_gateway::{Allowlist, GatewaySettings, Limits};
use warren_shared::broker::BrokerSettings;
use warren_tests::{TestQueue, amqp_url, eventually, temp_dir};
use warren_worker::{Mailer, RunningWorker, WorkerSettings, builtin_registry};

/// Bound on any single wait in these tests, so that a bug fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

/// A running gateway with its worker, on a queue of its own.
struct Env {
    /// The work queue, deleted (with its dead-letter queue) when dropped.
    queue: TestQueue,
    http: SocketAddr,
    text: SocketAddr,
    client: Client,
    /// Removed when dropped.
    outbox: tempfile::TempDir,
    worker: Option<RunningWorker>,
    stop: CancellationToken,
    gateway: Option<JoinHandle<()>>,
}

/// Starts a worker and a gateway with `limits` on a fresh queue.
async fn spawn(limits: Limits) -> Env {
    spawn_with(GatewaySettings {
        limits,
        call_timeout: Duration::from_secs(30),
        shutdown_grace: Duration::from_secs(5),
        ..GatewaySettings::default()
    })
    .await
}

async fn spawn_with(settings: GatewaySettings) -> Env {
    warren_shared::telemetry::init("warn");
    let queue = TestQueue::new("gw");
    let outbox = temp_dir("gw-outbox");
    let broker = BrokerSettings::new(amqp_url());
    let worker = queue
        .try_worker_with(
            builtin_registry(Mailer::outbox(outbox.path())),
            WorkerSettings {
                // Tests abandon long sleeps on purpose; don't wait for them when stopping.
                shutdown_grace: Duration::from_secs(1),
                ..queue.worker_settings(64)
            },
        )
        .await
        .expect("worker starts (is RabbitMQ up? deploy/ensure-broker.sh)");
    let client = Client::connect(ClientSettings {
        broker,
        queue: Some(queue.name.clone()),
        functions_exchange: queue.functions_exchange(),
        ..ClientSettings::default()
    })
    .await
    .expect("client connects");
    // Bound as the binary binds them, with the default listen backlog.
    let listen = |what: &str| {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        warren_gateway::listen(any_port, warren_gateway::DEFAULT_LISTEN_BACKLOG)
            .unwrap_or_else(|e| panic!("bind {what}: {e}"))
    };
    let (http, text) = (listen("http"), listen("text"));
    let (http_addr, text_addr) = (
        http.local_addr().expect("http addr"),
        text.local_addr().expect("text addr"),
    );
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(warren_gateway::serve(
        settings,
        client.clone(),
        http,
        text,
        stop.clone(),
    ));
    Env {
        queue,
        http: http_addr,
        text: text_addr,
        client,
        outbox,
        worker: Some(worker),
        stop,
        gateway: Some(gateway),
    }
}

fn limits_allowing(functions: &[&str]) -> Limits {
    Limits {
        allow: Allowlist::of(functions),
        ..Limits::default()
    }
}

impl Env {
    /// Stops the gateway and the worker, deletes the queues and the outbox.
    async fn finish(mut self) {
        self.stop.cancel();
        if let Some(gateway) = self.gateway.take() {
            tokio::time::timeout(WAIT, gateway)
                .await
                .expect("gateway stops")
                .expect("gateway task");
        }
        if let Some(worker) = self.worker.take() {
            worker.shutdown().await.expect("worker stops cleanly");
        }
        self.client.close().await;
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.http)
    }

    /// Waits until the client has no call pending (bounded by [`WAIT`]).
    async fn no_pending_calls(&self) {
        eventually("no call pending", WAIT, || async {
            self.client.pending_calls() == 0
        })
        .await;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.gateway.is_none() {
            return; // finished normally
        }
        // A test failed before `finish`: stop what runs (the queues and the outbox go when
        // their guards drop).
        self.stop.cancel();
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// websocket helpers

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn ws_connect(env: &Env) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(env.ws_url())
        .await
        .expect("websocket connects");
    ws
}

async fn ws_send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string()))
        .await
        .expect("websocket send");
}

/// The next JSON message; fails on a close.
async fn ws_next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a websocket message within the wait bound")
            .expect("the websocket is still open")
            .expect("a websocket message");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }
}

/// Reads until the server closes; returns its close code and reason, and the JSON messages
/// that came before.
async fn ws_until_close(ws: &mut Ws) -> (Option<(CloseCode, String)>, Vec<Value>) {
    let mut before = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("the server closes within the wait bound");
        match next {
            Some(Ok(Message::Text(text))) => {
                before.push(serde_json::from_str(&text).expect("JSON message"));
            }
            Some(Ok(Message::Close(frame))) => {
                return (
                    frame.map(|f| (f.code, f.reason.as_str().to_owned())),
                    before,
                );
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (None, before),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text bridge helpers

struct Text {
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

async fn text_connect(env: &Env) -> Text {
    let stream = TcpStream::connect(env.text).await.expect("text connects");
    let (read, write) = stream.into_split();
    Text {
        lines: BufReader::new(read).lines(),
        write,
    }
}

impl Text {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.write.write_all(bytes).await.expect("text write");
    }

    /// Sends `request` as one line, as Workerman's Text protocol does.
    async fn send(&mut self, request: Value) {
        let mut line = request.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await;
    }

    /// The next answer line as JSON; `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("an answer within the wait bound")
            .ok()??;
        Some(serde_json::from_str(&line).expect("the answer is one JSON line"))
    }

    /// The next answer line exactly as sent, without its `\n`.
    async fn raw_answer(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("an answer within the wait bound")
            .expect("text read")
            .expect("an answer, not a closed connection")
    }

    async fn answer(&mut self) -> Value {
        self.next()
            .await
            .expect("an answer, not a closed connection")
    }
}

fn error_kind(answer: &Value) -> &str {
    answer["error"]["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("expected an error object, got {answer}"))
}

// ---------------------------------------------------------------------------------------------
// websocket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_thousand_tasks_on_one_connection_get_their_results_by_id() {
    let env = spawn(Limits::default()).await;
    let mut ws = ws_connect(&env).await;
    // 500 single messages and one batch of 500: both forms, one connection.
    for i in 0..500 {
        ws_send(
            &mut ws,
            json!({"id": format!("t{i}"), "function": "echo", "args": {"n": i}}),
        )
        .await;
    }
    let batch: Vec<Value> = (500..1000)
        .map(|i| json!({"id": format!("t{i}"), "function": "echo", "args": {"n": i}}))
        .collect();
    ws_send(&mut ws, Value::Array(batch)).await;

    let mut enqueued = std::collections::HashSet::new();
    let mut results = std::collections::HashMap::new();
    while results.len() < 1000 {
        let message = ws_next(&mut ws).await;
        let id = message["id"].as_str().expect("string id").to_owned();
        if message["status"] == "enqueued" {
            assert!(message["task_id"].is_string(), "{message}");
            assert!(enqueued.insert(id), "one acknowledgement per task");
        } else {
            assert_eq!(message["ok"], true, "{message}");
            assert!(
                enqueued.contains(&id),
                "the acknowledgement of {id} comes before its result"
            );
            assert!(results.insert(id, message["result"].clone()).is_none());
        }
    }
    for i in 0..1000 {
        assert_eq!(results[&format!("t{i}")], json!({"n": i}));
    }
    assert_eq!(enqueued.len(), 1000);
    ws.close(None).await.expect("close");
    env.no_pending_calls().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_answers_task_errors_and_bad_messages_with_typed_errors() {
    let env = spawn(limits_allowing(&["echo", "fail", "sleep"])).await;
    let mut ws = ws_connect(&env).await;

    ws_send(
        &mut ws,
        json!({"id": 1, "function": "fail", "args": {"message": "boom"}}),
    )
    .await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    let failed = ws_next(&mut ws).await;
    assert_eq!(failed["id"], 1);
    assert_eq!(failed["ok"], false);
    assert_eq!(
        failed["error"],
        json!({"kind": "handler_failed", "message": "boom"})
    );

    ws_send(
        &mut ws,
        json!({"id": "x", "function": "send_mail", "args": {}}),
    )
    .await;
    let forbidden = ws_next(&mut ws).await;
    assert_eq!(forbidden["id"], "x");
    assert_eq!(forbidden["error"]["kind"], "forbidden");

    ws.send(Message::text("{not json")).await.expect("send");
    let malformed = ws_next(&mut ws).await;
    assert_eq!(malformed["id"], Value::Null);
    assert_eq!(malformed["error"]["kind"], "bad_request");

    ws_send(&mut ws, json!({"id": "nofn", "args": 1})).await;
    let no_function = ws_next(&mut ws).await;
    assert_eq!(no_function["id"], "nofn");
    assert_eq!(no_function["error"]["kind"], "bad_request");

    // A batch element that is not an object is refused on its own, an array too (serde would
    // read one as the task's fields in order and run it).
    ws_send(&mut ws, json!([["echo", "hi"], 5])).await;
    for _ in 0..2 {
        let refused = ws_next(&mut ws).await;
        assert_eq!(refused["id"], Value::Null, "{refused}");
        assert_eq!(refused["error"]["kind"], "bad_request", "{refused}");
    }

    // Without a token configured, any `auth` is ok: `false` is PHP's json_encode of an unset
    // variable.
    ws_send(&mut ws, json!({"auth": false})).await;
    assert_eq!(ws_next(&mut ws).await, json!({"auth": "ok"}));

    ws.send(Message::binary(vec![0xff, 0x00, 0x13]))
        .await
        .expect("send");
    assert_eq!(ws_next(&mut ws).await["error"]["kind"], "bad_request");

    // Results arrive in completion order, not request order.
    ws_send(
        &mut ws,
        json!([
            {"id": "slow", "function": "sleep", "args": {"ms": 1500}},
            {"id": "fast", "function": "echo", "args": "hi"}
        ]),
    )
    .await;
    let mut results = Vec::new();
    while results.len() < 2 {
        let message = ws_next(&mut ws).await;
        if message.get("ok").is_some() {
            results.push(message["id"].clone());
        }
    }
    assert_eq!(results, [json!("fast"), json!("slow")]);

    // The connection is still good after all of that.
    ws_send(
        &mut ws,
        json!({"id": "after", "function": "echo", "args": 7}),
    )
    .await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    assert_eq!(ws_next(&mut ws).await["result"], 7);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_client_that_disconnects_leaves_no_pending_calls() {
    let env = spawn(limits_allowing(&["sleep"])).await;
    let mut ws = ws_connect(&env).await;
    let batch: Vec<Value> = (0..5)
        .map(|i| json!({"id": i, "function": "sleep", "args": {"ms": 5_000}}))
        .collect();
    ws_send(&mut ws, Value::Array(batch)).await;
    for _ in 0..5 {
        assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    }
    assert_eq!(env.client.pending_calls(), 5);
    drop(ws); // no close handshake: the TCP connection just goes away
    env.no_pending_calls().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_limits_busy_token_size_and_idle() {
    let env = spawn(Limits {
        allow: Allowlist::of(["echo", "sleep"]),
        token: Some("s3cret".into()),
        max_message_bytes: 4096,
        max_in_flight: 2,
        idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;

    // No token: the first task is refused and the connection closed (policy).
    let mut ws = ws_connect(&env).await;
    ws_send(&mut ws, json!({"id": 1, "function": "echo"})).await;
    let (close, before) = ws_until_close(&mut ws).await;
    assert_eq!(before[0]["error"]["kind"], "unauthorized");
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Policy));
    // So is a first message that is not JSON, or not text at all.
    for first in [Message::text("hello"), Message::binary(vec![1, 2, 3])] {
        let mut ws = ws_connect(&env).await;
        ws.send(first.clone()).await.expect("websocket send");
        let (close, before) = ws_until_close(&mut ws).await;
        assert_eq!(before[0]["error"]["kind"], "unauthorized", "{first:?}");
        assert_eq!(close.map(|c| c.0), Some(CloseCode::Policy), "{first:?}");
    }

    // A wrong token in the header: the upgrade itself is refused.
    let mut request = env.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("authorization", "Bearer nope".parse().expect("header"));
    let refused = tokio_tungstenite::connect_async(request).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401),
        "{refused:?}"
    );

    // The right token in the header works.
    let mut request = env.ws_url().into_client_request().expect("request");
    request
        .headers_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connects");
    ws_send(&mut ws, json!({"id": "h", "function": "echo", "args": 1})).await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    assert_eq!(ws_next(&mut ws).await["result"], 1);
    drop(ws);

    // The token as a first message (what a browser does), then the in-flight limit.
    let mut ws = ws_connect(&env).await;
    ws_send(&mut ws, json!({"auth": "s3cret"})).await;
    assert_eq!(ws_next(&mut ws).await, json!({"auth": "ok"}));
    ws_send(
        &mut ws,
        json!([
            {"id": "a", "function": "sleep", "args": {"ms": 1000}},
            {"id": "b", "function": "sleep", "args": {"ms": 1000}},
            {"id": "c", "function": "sleep", "args": {"ms": 1000}}
        ]),
    )
    .await;
    let busy = ws_next(&mut ws).await;
    assert_eq!(busy["id"], "c", "the third task is refused at once: {busy}");
    assert_eq!(busy["error"]["kind"], "busy");
    let mut done = 0;
    while done < 2 {
        if ws_next(&mut ws).await["ok"] == true {
            done += 1;
        }
    }
    // Once the first two are done, there is room again.
    ws_send(&mut ws, json!({"id": "d", "function": "echo", "args": 2})).await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    assert_eq!(ws_next(&mut ws).await["result"], 2);

    // Idle with nothing in flight: closed with a reason.
    let (close, _) = ws_until_close(&mut ws).await;
    assert_eq!(close, Some((CloseCode::Normal, "idle timeout".to_owned())));

    // Oversized message: closed with 1009 (message too big).
    let mut ws = ws_connect(&env).await;
    ws_send(&mut ws, json!({"auth": "s3cret"})).await;
    assert_eq!(ws_next(&mut ws).await, json!({"auth": "ok"}));
    let big = "x".repeat(10_000);
    ws_send(
        &mut ws,
        json!({"id": "big", "function": "echo", "args": big}),
    )
    .await;
    let (close, _) = ws_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Size));
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Text bridge

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_single_request_gets_the_bare_result() {
    let env = spawn(Limits::default()).await;
    let mut text = text_connect(&env).await;
    // Exactly what Workerman's AsyncTcpConnection('Text://...') sends for
    // json_encode(['function' => 'echo', 'args' => [...]]).
    text.send_raw(b"{\"function\":\"echo\",\"args\":{\"to\":\"a@b.c\",\"n\":[1,2]}}\n")
        .await;
    assert_eq!(text.answer().await, json!({"to": "a@b.c", "n": [1, 2]}));
    // The motivating task, with a CRLF line end for good measure.
    text.send_raw(
        json!({"function": "send_mail", "args": {
            "from": "Shop <noreply@shop.example>", "to": "user@example.com",
            "subject": "Hi", "body": "Hello"}})
        .to_string()
        .as_bytes(),
    )
    .await;
    text.send_raw(b"\r\n").await;
    let receipt = text.answer().await;
    // The receipt names the outbox file, never a server path (issue 8).
    assert!(
        receipt["delivered_to"]
            .as_str()
            .is_some_and(|d| d.starts_with("outbox:") && !d.contains('/')),
        "{receipt}"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_results_keep_the_order_of_their_keys() {
    // A PHP caller may compare the answer's text or rely on the order of an object's keys:
    // the result comes back as the task wrote it, not with its keys sorted.
    let env = spawn(Limits::default()).await;
    let mut text = text_connect(&env).await;
    let args = r#"{"zeta":1,"alpha":{"y":[2,{"b":1,"a":0}],"x":3},"mid":"m"}"#;
    text.send_raw(format!("{{\"function\":\"echo\",\"args\":{args}}}\n").as_bytes())
        .await;
    assert_eq!(text.raw_answer().await, args);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_pipelined_requests_are_answered_in_request_order() {
    let env = spawn(limits_allowing(&["echo", "sleep"])).await;
    let mut text = text_connect(&env).await;
    // Later requests finish first; the answers must still come in request order.
    let mut batch = String::new();
    for (i, ms) in [900u64, 600, 300, 0].iter().enumerate() {
        batch.push_str(&json!({"function": "sleep", "args": {"ms": ms}}).to_string());
        batch.push('\n');
        batch.push_str(&json!({"function": "echo", "args": i}).to_string());
        batch.push('\n');
    }
    let started = std::time::Instant::now();
    text.send_raw(batch.as_bytes()).await;
    for (i, ms) in [900u64, 600, 300, 0].iter().enumerate() {
        assert_eq!(text.answer().await, json!({"slept_ms": ms}));
        assert_eq!(text.answer().await, json!(i));
    }
    // They ran concurrently: about the longest, not the sum (1.8 s).
    assert!(
        started.elapsed() < Duration::from_millis(1700),
        "{:?}",
        started.elapsed()
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_bad_lines_get_error_objects_and_the_connection_goes_on() {
    let env = spawn(Limits {
        max_message_bytes: 1024,
        ..Limits::default()
    })
    .await;
    let mut text = text_connect(&env).await;
    text.send_raw(b"{not json\n").await;
    assert_eq!(error_kind(&text.answer().await), "bad_request");
    text.send_raw(b"[1,2]\n").await;
    assert_eq!(error_kind(&text.answer().await), "bad_request");
    // Binary garbage, invalid UTF-8 included.
    text.send_raw(&[0xff, 0xfe, 0x00, 0x01, 0x9c, b'\n']).await;
    assert_eq!(error_kind(&text.answer().await), "bad_request");
    // Oversized line: too_large, and the next line is still served.
    let big = json!({"function": "echo", "args": "x".repeat(5000)}).to_string();
    text.send_raw(format!("{big}\n").as_bytes()).await;
    assert_eq!(error_kind(&text.answer().await), "too_large");
    // Not on the allowlist.
    text.send(json!({"function": "sleep", "args": {"ms": 1}}))
        .await;
    assert_eq!(error_kind(&text.answer().await), "forbidden");
    // Blank lines are not requests and get no answer.
    text.send_raw(b"\n\r\n").await;
    text.send(json!({"function": "echo", "args": "still here"}))
        .await;
    assert_eq!(text.answer().await, json!("still here"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_unknown_function_is_reported_by_the_worker() {
    let env = spawn(limits_allowing(&["*"])).await;
    let mut text = text_connect(&env).await;
    text.send(json!({"function": "no_such_function", "args": {}}))
        .await;
    let answer = text.answer().await;
    assert_eq!(error_kind(&answer), "unknown_function");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no_such_function")),
        "{answer}"
    );
    text.send(json!({"function": "fail"})).await;
    assert_eq!(error_kind(&text.answer().await), "handler_failed");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_connection_closed_mid_request() {
    let env = spawn(limits_allowing(&["echo", "sleep"])).await;

    // Half a request, then the client goes away: nothing runs, nothing is answered.
    let mut text = text_connect(&env).await;
    text.send_raw(b"{\"function\":\"echo\",\"ar").await;
    text.write.shutdown().await.expect("shutdown");
    assert_eq!(text.next().await, None, "an incomplete line gets no answer");

    // A whole request, then the client closes its sending side: it still gets its answer.
    let mut text = text_connect(&env).await;
    text.send(json!({"function": "sleep", "args": {"ms": 200}}))
        .await;
    text.write.shutdown().await.expect("shutdown");
    assert_eq!(text.answer().await, json!({"slept_ms": 200}));
    assert_eq!(text.next().await, None);

    // Requests in flight, then the client drops the connection: the calls are abandoned.
    let mut text = text_connect(&env).await;
    for _ in 0..3 {
        text.send(json!({"function": "sleep", "args": {"ms": 5_000}}))
            .await;
    }
    eventually("the calls to start", WAIT, || async {
        env.client.pending_calls() >= 3
    })
    .await;
    drop(text);
    env.no_pending_calls().await;

    // Other connections never noticed.
    let mut text = text_connect(&env).await;
    text.send(json!({"function": "echo", "args": 1})).await;
    assert_eq!(text.answer().await, json!(1));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_limits_token_busy_and_slowloris() {
    let env = spawn(Limits {
        allow: Allowlist::of(["echo", "sleep"]),
        token: Some("s3cret".into()),
        max_message_bytes: 4096,
        max_in_flight: 1,
        idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;

    // Without the token: unauthorized, then closed.
    let mut text = text_connect(&env).await;
    text.send(json!({"function": "echo", "args": 1})).await;
    assert_eq!(error_kind(&text.answer().await), "unauthorized");
    assert_eq!(text.next().await, None);

    // With a wrong token: the same.
    let mut text = text_connect(&env).await;
    text.send(json!({"auth": "guess"})).await;
    assert_eq!(error_kind(&text.answer().await), "unauthorized");
    assert_eq!(text.next().await, None);

    // With the token (no answer to the auth line itself), then over the in-flight limit.
    let mut text = text_connect(&env).await;
    text.send(json!({"auth": "s3cret"})).await;
    text.send(json!({"function": "sleep", "args": {"ms": 300}}))
        .await;
    text.send(json!({"function": "echo", "args": 2})).await;
    assert_eq!(text.answer().await, json!({"slept_ms": 300}));
    assert_eq!(error_kind(&text.answer().await), "busy");
    text.send(json!({"function": "echo", "args": 3})).await;
    assert_eq!(text.answer().await, json!(3), "room again once answered");

    // Slowloris: a line that never ends is closed by the idle timeout, while another
    // connection is served normally meanwhile.
    let mut slow = text_connect(&env).await;
    slow.send_raw(b"{\"auth\":\"s3cret\"}\n{\"function\":\"echo\",\"args\":\"")
        .await;
    text.send(json!({"function": "echo", "args": 4})).await;
    assert_eq!(text.answer().await, json!(4));
    assert_eq!(slow.next().await, None, "the slow client is disconnected");

    // The HTTP port too: a request whose headers never end is dropped.
    let mut http = TcpStream::connect(env.http).await.expect("connect");
    http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, http.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the server closes a slow HTTP request");
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP endpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_serves_the_page_and_the_queue_depth() {
    let env = spawn(Limits::default()).await;
    let page = http_get(env.http, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("<title>Warren"), "the page is served");
    let info = http_get(env.http, "/api/info").await;
    assert!(
        info.contains(&format!("\"queue\":\"{}\"", env.queue.name)),
        "{info}"
    );
    // The depth appears once the poller has read it; the worker is consuming.
    eventually("the queue depth to be served", WAIT, || async {
        http_get(env.http, "/api/queue")
            .await
            .starts_with("HTTP/1.1 200")
    })
    .await;
    let depth = http_get(env.http, "/api/queue").await;
    assert!(depth.contains("\"consumers\":1"), "{depth}");
    env.finish().await;
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    http_get_with(addr, path, &[]).await
}

async fn http_get_with(addr: SocketAddr, path: &str, headers: &[&str]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for header in headers {
        request.push_str(header);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("response within the wait bound")
        .expect("read");
    response
}

// ---------------------------------------------------------------------------------------------
// The page, in headless Chromium

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_runs_the_1000_mail_demo_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !std::path::Path::new(&chromium).exists() && !in_ci {
        println!(
            "SKIPPED page_runs_the_1000_mail_demo_in_chromium: {chromium} is absent \
             (apt-get install chromium, or run deploy/test.sh, which installs it)"
        );
        return;
    }
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned();
    let browser_dir = workspace.join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: npm ci --prefix tests/browser (deploy/test.sh does it)"
    );
    let output_dir = workspace.join("target/test-output");
    std::fs::create_dir_all(&output_dir).expect("create target/test-output");
    let screenshot = output_dir.join("gateway-page.png");
    let _ = std::fs::remove_file(&screenshot);

    // With a token, as a public gateway runs: the page asks for it and uses it for /api/info
    // and the websocket.
    let env = spawn(Limits {
        token: Some("page-s3cret".into()),
        ..Limits::default()
    })
    .await;
    let url = format!("http://{}/", env.http);
    let run = tokio::process::Command::new("node")
        .arg(browser_dir.join("page.mjs"))
        .arg(&url)
        .arg(&screenshot)
        .env("CHROMIUM", &chromium)
        .env("WARREN_TOKEN", "page-s3cret")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser run ends within 4 minutes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "page.mjs failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("demo: 1000 results, 0 failures"),
        "{stdout}"
    );
    assert!(
        screenshot.exists(),
        "screenshot saved to {}",
        screenshot.display()
    );
    let mails = std::fs::read_dir(env.outbox.path())
        .expect("the worker wrote an outbox")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
        })
        .count();
    assert_eq!(mails, 1000, "each mail was written once");
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_delivers_results_in_flight_then_closes() {
    let env = spawn(limits_allowing(&["sleep"])).await;
    let mut ws = ws_connect(&env).await;
    let mut text = text_connect(&env).await;
    ws_send(
        &mut ws,
        json!({"id": 1, "function": "sleep", "args": {"ms": 500}}),
    )
    .await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    text.send(json!({"function": "sleep", "args": {"ms": 500}}))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.client.pending_calls() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    env.stop.cancel();
    let (close, mut before) = ws_until_close(&mut ws).await;
    for message in &mut before {
        // Every message about a task carries one (see tests/e2e/resume.rs).
        message.as_object_mut().map(|m| m.remove("resume_token"));
    }
    assert_eq!(
        before,
        [json!({"id": 1, "ok": true, "result": {"slept_ms": 500}})]
    );
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Away));
    assert_eq!(text.answer().await, json!({"slept_ms": 500}));
    assert_eq!(text.next().await, None);
    assert!(
        TcpStream::connect(env.text).await.is_err(),
        "no new connections after shutdown"
    );
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Secure defaults and connection limits (issue 8 point 6)

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_endpoints_require_the_token_when_one_is_set() {
    let env = spawn(Limits {
        token: Some("s3cret".into()),
        ..Limits::default()
    })
    .await;
    for path in ["/api/info", "/api/queue"] {
        let refused = http_get(env.http, path).await;
        assert!(refused.starts_with("HTTP/1.1 401"), "{path}: {refused}");
        assert!(refused.contains("\"unauthorized\""), "{refused}");
        let wrong = http_get_with(env.http, path, &["Authorization: Bearer s3cres"]).await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{path}: {wrong}");
    }
    let info = http_get_with(env.http, "/api/info", &["Authorization: Bearer s3cret"]).await;
    assert!(info.starts_with("HTTP/1.1 200"), "{info}");
    assert!(info.contains("\"auth_required\":true"), "{info}");
    // The page itself is public: it is what asks for the token.
    assert!(http_get(env.http, "/").await.starts_with("HTTP/1.1 200"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_public_address_without_a_token() {
    for (flags, expect) in [
        (
            &["--http", "0.0.0.0:0", "--text", "127.0.0.1:0"][..],
            "--http",
        ),
        (
            &["--http", "127.0.0.1:0", "--text", "0.0.0.0:0"][..],
            "--text",
        ),
    ] {
        let output = tokio::process::Command::new(warren_tests::binary("warren-gateway"))
            .args(flags)
            .env("AMQP_URL", amqp_url())
            .env_remove("WARREN_GATEWAY_TOKEN")
            .env_remove("WARREN_GATEWAY_INSECURE_PUBLIC")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .expect("the gateway exits at once")
            .expect("the gateway runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?} was accepted: {stderr}");
        assert!(
            stderr.contains(expect) && stderr.contains("without a token"),
            "{stderr}"
        );
        assert!(stderr.contains("--insecure-public"), "{stderr}");
    }
    // The policy behind it: loopback by default, every interface with a token or when asked.
    let (http, text) = (
        warren_gateway::DEFAULT_HTTP_PORT,
        warren_gateway::DEFAULT_TEXT_PORT,
    );
    let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
    assert_eq!(
        warren_gateway::listen_addr(None, http, false, false),
        Ok(addr("127.0.0.1:8080"))
    );
    assert_eq!(
        warren_gateway::listen_addr(None, text, true, false),
        Ok(addr("0.0.0.0:12345"))
    );
    assert_eq!(
        warren_gateway::listen_addr(Some(addr("0.0.0.0:9")), http, false, true),
        Ok(addr("0.0.0.0:9"))
    );
    assert!(warren_gateway::listen_addr(Some(addr("[::]:9")), http, false, false).is_err());
}

/// A connection to `to` from the local address `from` (any 127.x.y.z works on Linux).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind the source address");
    socket.connect(to).await.expect("connect")
}

/// A Text connection from `from` and the answer to one echo: the echoed value, or the error a
/// refused connection gets.
async fn text_echo_from(from: &str, env: &Env) -> (Value, Text) {
    let (read, write) = connect_from(from, env.text).await.into_split();
    let mut text = Text {
        lines: BufReader::new(read).lines(),
        write,
    };
    text.send(json!({"function": "echo", "args": "hi"})).await;
    let answer = text.answer().await;
    (answer, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_in_total_and_per_peer_address() {
    let env = spawn_with(GatewaySettings {
        limits: limits_allowing(&["echo"]),
        max_connections: 3,
        max_connections_per_peer: 2,
        // Not half the total, the default: this test is about the other two caps.
        max_unauthenticated: Some(3),
        // The test's peers are on loopback, which is trusted (total cap only) by default.
        trusted_networks: Vec::new(),
        ..GatewaySettings::default()
    })
    .await;
    // Process-wide: other tests of this binary count into it too.
    let metrics = warren_gateway::metrics::install().expect("the metrics recorder");
    let refusals = || {
        let text = metrics.render();
        let series = r#"warren_gateway_rejected_total{reason="too_many_connections"} "#;
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {series}in:\n{text}"))
    };
    let refused_before = refusals();
    // Two from one address are served; a third from it is refused with a JSON line, then
    // closed.
    let (a1, _t1) = text_echo_from("127.0.0.1", &env).await;
    let (a2, _t2) = text_echo_from("127.0.0.1", &env).await;
    assert_eq!((a1, a2), (json!("hi"), json!("hi")));
    let (refused, mut t3) = text_echo_from("127.0.0.1", &env).await;
    assert_eq!(error_kind(&refused), "too_many_connections", "{refused}");
    assert_eq!(t3.next().await, None, "a refused connection is closed");

    // Another address still gets the last place in total...
    let (b1, _u1) = text_echo_from("127.0.0.2", &env).await;
    assert_eq!(b1, json!("hi"));
    // ...after which everyone is refused: Text with a line, HTTP and websocket with a 503.
    let (refused, _) = text_echo_from("127.0.0.3", &env).await;
    assert_eq!(error_kind(&refused), "too_many_connections", "{refused}");
    let response = http_get(env.http, "/api/info").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("too_many_connections"), "{response}");
    let ws = tokio_tungstenite::connect_async(env.ws_url()).await;
    assert!(
        matches!(&ws, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503),
        "{ws:?}"
    );
    // Four refusals: counted as the gateway's own, with their reason.
    assert!(refusals() - refused_before >= 4, "{}", metrics.render());

    // A place freed is a place again.
    drop(_u1);
    warren_tests::eventually("a freed place is reused", WAIT, || async {
        text_echo_from("127.0.0.3", &env).await.0 == json!("hi")
    })
    .await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_client_that_never_reads_is_closed_by_the_write_timeout() {
    let env = spawn_with(GatewaySettings {
        limits: Limits {
            allow: Allowlist::of(["echo"]),
            idle_timeout: Duration::from_millis(500),
            ..Limits::default()
        },
        call_timeout: Duration::from_secs(30),
        // The websocket holds the only place: a Text connection is admitted only once the
        // gateway has closed it.
        max_connections: 1,
        ..GatewaySettings::default()
    })
    .await;
    // A small receive buffer, and far more answer bytes than the socket buffers hold.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(env.http).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(env.ws_url(), MaybeTlsStream::Plain(stream))
        .await
        .expect("websocket handshake");
    let big = "x".repeat(900 * 1024);
    for id in 0..24 {
        let task = json!({"id": id, "function": "echo", "args": big}).to_string();
        if ws.send(Message::text(task)).await.is_err() {
            break; // the gateway may close it already while we are still sending
        }
    }
    // Never read `ws` again: the gateway must give up on it and free its place.
    warren_tests::eventually("the gateway closes the stalled websocket", WAIT, || async {
        let Ok(stream) = TcpStream::connect(env.text).await else {
            return false;
        };
        let (read, write) = stream.into_split();
        let mut text = Text {
            lines: BufReader::new(read).lines(),
            write,
        };
        text.send(json!({"function": "echo", "args": 1})).await;
        text.next().await == Some(json!(1))
    })
    .await;
    drop(ws);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_pings_do_not_count_as_activity() {
    let env = spawn(Limits {
        idle_timeout: Duration::from_millis(500),
        ..Limits::default()
    })
    .await;
    let mut ws = ws_connect(&env).await;
    let started = tokio::time::Instant::now();
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let close = loop {
        tokio::select! {
            _ = every.tick() => {
                if ws.send(Message::Ping(vec![1].into())).await.is_err() {
                    break None;
                }
            }
            next = ws.next() => match next {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            },
            () = tokio::time::sleep_until(started + WAIT) => {
                panic!("a client that only pings was never closed");
            }
        }
    };
    let close = close.map(|f| (f.code, f.reason.as_str().to_owned()));
    assert_eq!(close, Some((CloseCode::Normal, "idle timeout".to_owned())));
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// Bursts, strangers and browsers (issue 24 points 1, 3 and 5)

/// The `.eml` files the worker wrote to the outbox.
fn mails_in(env: &Env) -> usize {
    std::fs::read_dir(env.outbox.path())
        .map(|dir| {
            dir.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// The backlog of the socket listening on `addr`, as the kernel reports it (`ss`'s Send-Q
/// column of a listening socket).
fn listen_backlog(addr: SocketAddr) -> u32 {
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .expect("ss runs (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.contains(&addr.to_string()))
        .unwrap_or_else(|| panic!("no listening socket {addr} in:\n{text}"));
    row.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no Send-Q in {row:?}"))
}

/// TcpExt ListenOverflows of this network namespace (every process's, so only informative).
fn listen_overflows() -> Option<u64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut rows = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (rows.next()?, rows.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// A Workerman front relays each websocket message over a Text connection of its own, all from
/// its own host: a thousand connects at once from 127.0.0.1, one `send_mail` each, must all be
/// served with the default settings (loopback is trusted, so only the total cap applies, and
/// the listen backlog holds the burst instead of dropping SYNs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_burst_of_1000_connections_from_one_address_is_served_with_the_defaults() {
    const BURST: usize = 1000;
    // Each connection is two descriptors in this process (client and gateway side); a 1024
    // soft limit, common elsewhere, would fail the burst for a reason that is not the one
    // under test. The gateway binary raises its own limit the same way.
    let files = warren_gateway::host::raise_open_files_limit().expect("the open-files limit");
    let needed = u64::try_from(2 * BURST).expect("small") + 256;
    if files < needed {
        eprintln!(
            "skipped: this process may open {files} files (hard limit), the burst needs \
             {needed}; raise `ulimit -Hn`"
        );
        return;
    }
    let env = spawn_with(GatewaySettings::default()).await;
    let somaxconn = warren_gateway::host::somaxconn().unwrap_or(u32::MAX);
    let expected = warren_gateway::DEFAULT_LISTEN_BACKLOG.min(somaxconn);
    for addr in [env.text, env.http] {
        assert_eq!(listen_backlog(addr), expected, "the backlog of {addr}");
    }

    let overflows_before = listen_overflows();
    let started = tokio::time::Instant::now();
    let text_addr = env.text;
    let calls: Vec<_> = (0..BURST)
        .map(|i| {
            tokio::spawn(async move {
                let at = tokio::time::Instant::now();
                let stream = TcpStream::connect(text_addr).await.expect("connect");
                let connected = at.elapsed();
                let (read, write) = stream.into_split();
                let mut text = Text {
                    lines: BufReader::new(read).lines(),
                    write,
                };
                text.send(json!({"function": "send_mail", "args": {
                    "from": "Shop <noreply@shop.example>", "to": format!("user{i}@example.com"),
                    "subject": "Hi", "body": "Hello"}}))
                    .await;
                let answer = text.answer().await;
                (answer, connected, at.elapsed())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(BURST);
    let mut slowest_connect = Duration::ZERO;
    for call in calls {
        let (answer, connected, latency) = call.await.expect("client task");
        assert!(
            answer["delivered_to"].is_string(),
            "every connection is served: {answer}"
        );
        latencies.push(latency);
        slowest_connect = slowest_connect.max(connected);
    }
    let wall = started.elapsed();
    latencies.sort();
    let p99 = latencies[BURST * 99 / 100];
    println!(
        "{BURST} Text connections at once, one send_mail each: wall {wall:?}, p50 {:?}, \
         p99 {p99:?}, max {:?}; slowest connect {slowest_connect:?}; ListenOverflows (whole \
         namespace) {:?} -> {:?}",
        latencies[BURST / 2],
        latencies[BURST - 1],
        overflows_before,
        listen_overflows()
    );
    assert_eq!(mails_in(&env), BURST, "each mail written once");
    // The mechanism: a connect completes on the kernel's SYN-ACK, however fast the gateway
    // accepts, as long as the backlog has room; a SYN dropped by a full backlog costs its
    // client a retry after exactly 1 s. So no connect takes a second.
    // Unless the host caps every backlog below the burst, which is no fault of the gateway's.
    if usize::try_from(somaxconn).unwrap_or(usize::MAX) >= BURST {
        assert!(
            slowest_connect < Duration::from_secs(1),
            "a connect took {slowest_connect:?}: a SYN was dropped and retried (backlog \
             {expected})"
        );
    } else {
        eprintln!(
            "net.core.somaxconn {somaxconn} caps every backlog below the burst of {BURST}: \
             connect times not checked (raise it with sysctl to check them)"
        );
    }
    // Generous, not a timing test.
    assert!(p99 < Duration::from_secs(10), "p99 {p99:?}");
    env.finish().await;
}

/// Under systemd's default soft limit of 1024 open files, 1024 connections cannot all be
/// accepted: the binary raises its soft limit to the hard limit at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_raises_its_open_files_limit() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    if hard <= 1024 {
        eprintln!("skipped: the hard open-files limit is {hard}, nothing to raise to");
        return;
    }
    let mut gateway = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile=1024:{hard}"))
        .arg(warren_tests::binary("warren-gateway"))
        .args(["--http", "127.0.0.1:0", "--text", "127.0.0.1:0"])
        .env("AMQP_URL", amqp_url())
        .env_remove("WARREN_GATEWAY_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit (util-linux) runs the gateway");
    let pid = gateway.id().expect("pid");
    let soft_limit = || {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|soft| soft.parse::<u64>().ok())
    };
    // prlimit itself starts with this process's limit: read the gateway's, once it runs.
    let running = || {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() == "warren-gateway")
    };
    eventually(
        "the gateway raises its soft open-files limit",
        WAIT,
        || async { running() && soft_limit() == Some(hard) },
    )
    .await;
    gateway.kill().await.expect("stop the gateway");
}

/// With a token, strangers meet the per-peer cap until they present it, and an address that
/// floods the gateway with connections that never authenticate holds 64 places at most, each
/// until the authentication deadline; connections that did present the token meet the total
/// cap only, so a token holder keeps being served, even from one address with many
/// connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_from_one_address_cannot_take_every_place() {
    const FLOOD: usize = 200;
    const AUTHED: usize = 90;
    let per_peer = warren_gateway::DEFAULT_MAX_CONNECTIONS_PER_PEER;
    let env = spawn_with(GatewaySettings {
        limits: Limits {
            token: Some("s3cret".into()),
            ..limits_allowing(&["echo"])
        },
        // Room for the flood's share and the token holders, not for the whole flood.
        max_connections: per_peer + AUTHED + 6,
        // The test's peers are on loopback, trusted by default: here they are strangers.
        trusted_networks: Vec::new(),
        // Long enough for the token holders to be served while the flood waits for it.
        auth_timeout: Duration::from_secs(20),
        ..GatewaySettings::default()
    })
    .await;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let (read, write) = connect_from("127.0.0.2", env.text).await.into_split();
        flood.push(Text {
            lines: BufReader::new(read).lines(),
            write,
        });
    }
    // Token holders, all from one other address, more than the per-peer cap: each presents
    // the token, then is served, while the flood holds its places.
    let mut holders = Vec::with_capacity(AUTHED);
    for i in 0..AUTHED {
        let (read, write) = connect_from("127.0.0.4", env.text).await.into_split();
        let mut text = Text {
            lines: BufReader::new(read).lines(),
            write,
        };
        text.send(json!({"auth": "s3cret"})).await;
        text.send(json!({"function": "echo", "args": i})).await;
        assert_eq!(text.answer().await, json!(i), "token holder {i}");
        holders.push(text);
    }
    let (read, write) = connect_from("127.0.0.3", env.text).await.into_split();
    let mut late = Text {
        lines: BufReader::new(read).lines(),
        write,
    };
    late.send(json!({"auth": "s3cret"})).await;
    late.send(json!({"function": "echo", "args": "still served"}))
        .await;
    assert_eq!(late.answer().await, json!("still served"));
    // The flood still holds its share: one more connection from its address is refused.
    let (read, write) = connect_from("127.0.0.2", env.text).await.into_split();
    let mut more = Text {
        lines: BufReader::new(read).lines(),
        write,
    };
    let answer = more.answer().await;
    assert_eq!(error_kind(&answer), "too_many_connections", "{answer}");

    // The flood: refused at once past its share; the rest told `unauthorized` at the
    // deadline and closed.
    let answers =
        futures_util::future::join_all(flood.iter_mut().map(|t| async { t.answer().await })).await;
    let kinds: Vec<&str> = answers.iter().map(error_kind).collect();
    let refused = kinds
        .iter()
        .filter(|k| **k == "too_many_connections")
        .count();
    let timed_out = kinds.iter().filter(|k| **k == "unauthorized").count();
    assert_eq!(
        (timed_out, refused),
        (per_peer, FLOOD - per_peer),
        "{kinds:?}"
    );
    for mut text in flood {
        assert_eq!(text.next().await, None, "closed after its answer");
    }
    // The token holders outlive the deadline.
    let last = holders.last_mut().expect("holders");
    last.send(json!({"function": "echo", "args": "after"}))
        .await;
    assert_eq!(last.answer().await, json!("after"));
    env.finish().await;
}

/// With a token, a connection must present it within `auth_timeout`, whatever else it sends:
/// blank lines, an overlong line, websocket pings, keep-alive requests for the public page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_closed_at_the_auth_deadline_whatever_they_send() {
    let env = spawn_with(GatewaySettings {
        limits: Limits {
            token: Some("s3cret".into()),
            ..limits_allowing(&["echo"])
        },
        auth_timeout: Duration::from_secs(1),
        ..GatewaySettings::default()
    })
    .await;
    let mut authed = text_connect(&env).await;
    authed.send(json!({"auth": "s3cret"})).await;

    // Text: blank lines do not count as activity.
    let mut blank = text_connect(&env).await;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    let blank_lines = async {
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let _ = blank.write.write_all(b"\n").await;
                }
                line = blank.lines.next_line() => break line,
            }
        }
    };
    let answer = tokio::time::timeout(WAIT, blank_lines)
        .await
        .expect("blank lines keep an unauthenticated connection open")
        .expect("text read")
        .expect("an answer before the close");
    let answer: Value = serde_json::from_str(&answer).expect("JSON answer");
    assert_eq!(error_kind(&answer), "unauthorized", "{answer}");
    assert_eq!(blank.next().await, None);

    // Text: an overlong line before the token is refused like anything else, at once: on a
    // gateway whose deadline is past the wait bound, so that it is not the deadline's answer.
    let patient = spawn_with(GatewaySettings {
        limits: Limits {
            token: Some("s3cret".into()),
            ..limits_allowing(&["echo"])
        },
        auth_timeout: 2 * WAIT,
        ..GatewaySettings::default()
    })
    .await;
    let mut long = text_connect(&patient).await;
    let mut line = vec![b'x'; 1024 * 1024 + 1];
    line.push(b'\n');
    long.send_raw(&line).await;
    assert_eq!(error_kind(&long.answer().await), "unauthorized");
    assert_eq!(long.next().await, None);
    patient.finish().await;

    // Websocket: pings or nothing, then `unauthorized` and 1008.
    let mut ws = ws_connect(&env).await;
    ws.send(Message::Ping(vec![1].into())).await.expect("ping");
    let (close, before) = ws_until_close(&mut ws).await;
    assert_eq!(close.map(|c| c.0), Some(CloseCode::Policy));
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(error_kind(&before[0]), "unauthorized", "{before:?}");

    // HTTP: keep-alive requests for the public page do not hold the connection.
    let mut http = TcpStream::connect(env.http).await.expect("connect");
    let closed = tokio::time::timeout(WAIT, async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if http
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            // One whole response (headers, then content-length bytes), or the close.
            let mut got = Vec::new();
            loop {
                match http.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                if response_complete(&got) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "a keep-alive HTTP client was never closed");

    // A connection that presented the token is not bound by the deadline.
    authed.send(json!({"function": "echo", "args": 1})).await;
    assert_eq!(authed.answer().await, json!(1));
    env.finish().await;
}

/// Whether `bytes` hold a whole HTTP response with a `content-length` body.
fn response_complete(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    body.len() >= length
}

async fn ws_upgrade_with_origin(
    env: &Env,
    origin: Option<&str>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut request = env.ws_url().into_client_request().expect("request");
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().expect("header value"));
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// Any web page can make a browser open a websocket to the user's loopback; the gateway
/// refuses the upgrade unless the page is its own or on `--allow-origin`. Programs, which
/// send no `Origin`, are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_upgrade_from_another_origin_is_refused() {
    let env = spawn_with(GatewaySettings {
        allowed_origins: vec!["https://app.example".into()],
        ..GatewaySettings::default()
    })
    .await;
    for evil in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let refused = ws_upgrade_with_origin(&env, Some(evil)).await;
        match refused {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 403, "{evil}");
                let body =
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned();
                assert!(
                    body.contains("\"forbidden\"") && body.contains("--allow-origin"),
                    "{body}"
                );
            }
            other => panic!("{evil}: upgrade not refused: {other:?}"),
        }
    }
    let own = format!("http://{}", env.http);
    for ok in [None, Some(own.as_str()), Some("https://app.example")] {
        let mut ws = ws_upgrade_with_origin(&env, ok)
            .await
            .unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        ws_send(&mut ws, json!({"id": 1, "function": "echo", "args": "x"})).await;
        assert_eq!(ws_next(&mut ws).await["status"], "enqueued", "{ok:?}");
        assert_eq!(ws_next(&mut ws).await["result"], "x", "{ok:?}");
    }
    env.finish().await;
}

/// A web page can `fetch()` a POST to the Text port; the connection is closed at its request
/// line, so the body never runs as a task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_port_closes_an_http_request_before_its_body_runs() {
    let env = spawn(Limits::default()).await;
    let body = json!({"function": "send_mail", "args": {
        "from": "evil@evil.example", "to": "victim@example.com",
        "subject": "Hi", "body": "from a web page"}})
    .to_string();
    let request = format!(
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n\n{body}\n",
        env.text.port(),
        body.len() + 2
    );
    let mut text = text_connect(&env).await;
    text.send_raw(request.as_bytes()).await;
    let answer = text.answer().await;
    assert_eq!(error_kind(&answer), "bad_request", "{answer}");
    assert_eq!(text.next().await, None, "closed after the request line");

    // Had the body run, there would be its mail besides this one.
    let mut after = text_connect(&env).await;
    after
        .send(json!({"function": "send_mail", "args": {
            "from": "shop@shop.example", "to": "user@example.com",
            "subject": "Hi", "body": "Hello"}}))
        .await;
    assert!(after.answer().await["delivered_to"].is_string());
    env.no_pending_calls().await;
    assert_eq!(mails_in(&env), 1, "only the real request sent mail");

    // Any request line, however written, after a request was served too: a method in lower
    // case or with a hyphen, HTTP/0.9's bare `GET /`.
    for request_line in ["get / HTTP/1.1", "M-SEARCH * HTTP/1.1", "GET /"] {
        let mut text = text_connect(&env).await;
        text.send(json!({"function": "echo", "args": "first"}))
            .await;
        assert_eq!(text.answer().await, json!("first"));
        text.send_raw(format!("{request_line}\n{body}\n").as_bytes())
            .await;
        let answer = text.answer().await;
        assert_eq!(
            error_kind(&answer),
            "bad_request",
            "{request_line}: {answer}"
        );
        assert_eq!(text.next().await, None, "{request_line}: closed");
    }
    env.no_pending_calls().await;
    assert_eq!(mails_in(&env), 1, "no request line let its body run");
    env.finish().await;
}

/// The head of the response to the raw HTTP `request` (up to its blank line), or what came
/// before the server closed.
async fn http_head(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("a response within the wait bound");
    String::from_utf8_lossy(&got).into_owned()
}

/// DNS rebinding: a page from `http://evil.example:PORT` whose name the attacker then points
/// at 127.0.0.1 sends an `Origin` and a `Host` that match each other. Without a token, the
/// gateway answers only requests for a host that cannot be rebound (an IP literal,
/// `localhost`) or that `--allow-origin` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_host_name_is_refused_without_a_token() {
    let env = spawn_with(GatewaySettings {
        allowed_origins: vec!["https://app.example".into()],
        ..GatewaySettings::default()
    })
    .await;
    let port = env.http.port();
    let upgrade = |host: &str, origin: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    };
    let get = |path: &str, host: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let evil = format!("evil.example:{port}");
    for request in [
        upgrade(&evil, &format!("http://{evil}")),
        get("/api/info", &evil),
        get("/api/queue", &evil),
        get("/", &evil),
    ] {
        let head = http_head(env.http, &request).await;
        assert!(head.starts_with("HTTP/1.1 403"), "{request}\n-> {head}");
    }
    let head = http_head(env.http, &get("/api/info", &evil)).await;
    assert!(head.contains("application/json"), "{head}");
    for (host, origin) in [
        (
            format!("localhost:{port}"),
            format!("http://localhost:{port}"),
        ),
        (
            format!("gw.localhost:{port}"),
            format!("http://gw.localhost:{port}"),
        ),
        (
            format!("127.0.0.1:{port}"),
            format!("http://127.0.0.1:{port}"),
        ),
        (format!("[::1]:{port}"), format!("http://[::1]:{port}")),
        ("app.example".to_owned(), "https://app.example".to_owned()),
    ] {
        let head = http_head(env.http, &upgrade(&host, &origin)).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{host}: {head}");
        let head = http_head(env.http, &get("/", &host)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
    }
    env.finish().await;
}

/// With a token, an HTTP connection that has not completed a request with it by
/// `auth_timeout` is closed, even one that never finishes its first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_that_never_finish_a_request_are_closed_at_the_auth_deadline() {
    let env = spawn_with(GatewaySettings {
        limits: Limits {
            token: Some("s3cret".into()),
            ..limits_allowing(&["echo"])
        },
        auth_timeout: Duration::from_secs(1),
        ..GatewaySettings::default()
    })
    .await;
    let silent = TcpStream::connect(env.http).await.expect("connect");
    let mut half = TcpStream::connect(env.http).await.expect("connect");
    half.write_all(b"GET / HT").await.expect("write");
    // Well under the idle timeout (60 s), which bounds the header read otherwise.
    let bound = Duration::from_secs(10);
    for (what, mut stream) in [("silent", silent), ("half a request line", half)] {
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(bound, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{what}: still open after {bound:?}");
    }
    env.finish().await;
}

/// Settings the types allow but that cannot work are refused at start with the flag named,
/// not met later (every connection closed at once, a backlog of nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_zero_deadlines_zero_backlogs_and_bad_origins() {
    for (flag, value) in [
        ("--auth-timeout", "0s"),
        ("--listen-backlog", "0"),
        ("--allow-origin", "app.example"),
    ] {
        let output = tokio::process::Command::new(warren_tests::binary("warren-gateway"))
            .args([
                "--http",
                "127.0.0.1:0",
                "--text",
                "127.0.0.1:0",
                flag,
                value,
            ])
            .env("AMQP_URL", amqp_url())
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .expect("the gateway exits at once")
            .expect("the gateway runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{flag} {value} was accepted: {stderr}"
        );
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Strangers with many addresses, each within its share, still hold at most
/// `max_unauthenticated` places together; the others stay for trusted connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_from_many_addresses_cannot_take_every_place() {
    let env = spawn_with(GatewaySettings {
        limits: Limits {
            token: Some("s3cret".into()),
            ..limits_allowing(&["echo"])
        },
        max_connections: 10,
        max_connections_per_peer: 2,
        max_unauthenticated: Some(4),
        trusted_networks: vec!["127.0.0.1/32".parse().expect("network")],
        auth_timeout: 2 * WAIT,
        ..GatewaySettings::default()
    })
    .await;
    let mut strangers = Vec::new();
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        strangers.push(connect_from(from, env.text).await);
    }
    let (refused, _) = text_echo_from("127.0.0.4", &env).await;
    assert_eq!(error_kind(&refused), "too_many_connections", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("4 open connections from outside")),
        "{refused}"
    );
    let mut trusted = text_connect(&env).await;
    trusted.send(json!({"auth": "s3cret"})).await;
    trusted
        .send(json!({"function": "echo", "args": "local"}))
        .await;
    assert_eq!(trusted.answer().await, json!("local"));
    drop(strangers);
    env.finish().await;
}

/// A request larger than a whole byte budget (possible when the library is given limits out of
/// order; the binary refuses them at start) is answered `too_large` naming the budget, on both
/// ports, not `busy` forever; a request that fits is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_larger_than_a_whole_byte_budget_is_too_large_not_busy() {
    let env = spawn(Limits {
        max_message_bytes: 4096,
        max_in_flight_bytes: 1000,
        ..Limits::default()
    })
    .await;
    let args = "x".repeat(2000);
    let mut text = text_connect(&env).await;
    text.send(json!({"function": "echo", "args": args})).await;
    let answer = text.answer().await;
    assert_eq!(error_kind(&answer), "too_large", "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("at most 1000") && message.contains("max_in_flight_bytes"),
        "{message}"
    );
    text.send(json!({"function": "echo", "args": "small"}))
        .await;
    assert_eq!(text.answer().await, json!("small"));

    let mut ws = ws_connect(&env).await;
    ws_send(&mut ws, json!({"id": 7, "function": "echo", "args": args})).await;
    let answer = ws_next(&mut ws).await;
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(error_kind(&answer), "too_large", "{answer}");
    env.finish().await;
}

// ---------------------------------------------------------------------------------------------
// run at a time

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_ms_and_run_at_run_tasks_later_on_both_doors_and_bad_ones_are_refused() {
    let env = spawn(Limits::default()).await;
    let late = Duration::from_millis(2500);

    // Text bridge: the answer comes once the task ran, no earlier than its delay.
    let mut text = text_connect(&env).await;
    let sent = std::time::Instant::now();
    text.send(json!({"function": "echo", "args": "later", "delay_ms": 2000}))
        .await;
    assert_eq!(text.answer().await, json!("later"));
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(2) + late,
        "{took:?}"
    );
    for bad in [
        json!({"function": "echo", "args": 1, "delay_ms": "soon"}),
        json!({"function": "echo", "args": 1, "run_at": "tomorrow at nine"}),
        json!({"function": "echo", "args": 1, "delay_ms": 1, "run_at": "2026-12-08T09:00:00Z"}),
    ] {
        text.send(bad.clone()).await;
        assert_eq!(error_kind(&text.answer().await), "bad_request", "{bad}");
    }
    text.send(json!({"function": "echo", "args": "still here"}))
        .await;
    assert_eq!(text.answer().await, json!("still here"));

    // Websocket: enqueued at once, the result once it ran, no earlier than its run-at time.
    let mut ws = ws_connect(&env).await;
    let due = std::time::SystemTime::now() + Duration::from_secs(2);
    let run_at = humantime::format_rfc3339_millis(due).to_string();
    ws_send(
        &mut ws,
        json!({"id": 1, "function": "echo", "args": "ws", "run_at": run_at}),
    )
    .await;
    assert_eq!(ws_next(&mut ws).await["status"], "enqueued");
    let result = ws_next(&mut ws).await;
    assert_eq!(result["result"], "ws", "{result}");
    let after = std::time::SystemTime::now()
        .duration_since(due)
        .expect("not before its time");
    assert!(after < late, "{after:?}");
    ws_send(
        &mut ws,
        json!({"id": 2, "function": "echo", "args": 1, "delay_ms": -5}),
    )
    .await;
    let refused = ws_next(&mut ws).await;
    assert_eq!(refused["id"], 2);
    assert_eq!(error_kind(&refused), "bad_request");
    env.finish().await;
}
