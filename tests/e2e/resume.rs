//! Resume after a reconnect (docs/gateway.md, "Resume"), against the real broker: a websocket
//! client that comes back, to the same gateway, another instance or one started after a
//! restart, gets exactly the events of its tasks it missed, in order, then the live ones, and
//! never a second final answer for a task it saw settled.
//!
//! Each test has its own work queue and event stream (`test.resume.<uuid>` and
//! `test.resume.<uuid>.events`, both deleted when its [`Rig`] drops) and its own gateways.
//! No worker runs here: the test plays the worker's part itself, so that it decides the order
//! of replies and events. It takes each task from the queue (reading its `x-warren-origin` as a
//! worker does), appends the task's events to the stream in the contract's format
//! ([`Event::properties`], JSON body, default exchange, routing key = the stream, confirmed)
//! and publishes the reply when the test wants it.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use warren_client::{Client, ClientSettings};
use warren_gateway::{GatewaySettings, Limits, ResumeSettings};
use warren_shared::RawJson;
use warren_shared::broker::BrokerSettings;
use warren_shared::envelope::{self, Incoming, headers};
use warren_shared::events::{
    self, Event, EventError, EventKind, Progress, RetryAt, Start, Subject,
};
use warren_shared::protocol::Reply;
use warren_tests::{TestQueue, amqp_url, eventually};

/// Bound on any single wait, so that a bug fails a test instead of hanging it.
const WAIT: Duration = Duration::from_secs(30);

/// A test's queue, stream, connection for playing the worker, and gateways.
struct Rig {
    queue: TestQueue,
    stream: String,
    connection: Connection,
    /// In confirm mode: appends and replies.
    channel: Channel,
    gateways: Vec<Gateway>,
}

/// One running gateway.
struct Gateway {
    http: SocketAddr,
    client: Client,
    stop: CancellationToken,
    handle: Option<JoinHandle<()>>,
}

/// A task the test took from the queue, as a worker would.
struct Taken {
    task_id: String,
    origin: Option<String>,
    properties: BasicProperties,
}

impl Rig {
    /// A queue and a stream keeping at most `max_bytes` of events.
    async fn new(max_bytes: u64) -> Self {
        let queue = TestQueue::new("resume");
        let stream = format!("{}.events", queue.name);
        queue.also_delete(&stream);
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("the test connects (is RabbitMQ up? deploy/ensure-broker.sh)");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        events::declare_stream(&channel, &stream, Duration::from_secs(3600), max_bytes)
            .await
            .expect("the test's stream is declared");
        let rig = Self {
            queue,
            stream,
            connection,
            channel,
            gateways: Vec::new(),
        };
        // A deployment's stream is seldom empty: an event of someone else's first.
        rig.append(&succeeded("genesis", "someone-else", &json!(0)))
            .await;
        rig
    }

    /// Starts a gateway on the rig's queue and stream with `resume` limits; returns its index.
    async fn start_gateway(&mut self, resume: ResumeSettings) -> usize {
        let client = Client::connect(ClientSettings {
            broker: BrokerSettings::new(amqp_url()),
            queue: Some(self.queue.name.clone()),
            functions_exchange: self.queue.functions_exchange(),
            ..ClientSettings::default()
        })
        .await
        .expect("client connects");
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let http = warren_gateway::listen(any_port, 64).expect("bind http");
        let text = warren_gateway::listen(any_port, 64).expect("bind text");
        let addr = http.local_addr().expect("http addr");
        let stop = CancellationToken::new();
        let settings = GatewaySettings {
            // The demo's functions and the real workers' `gated`.
            limits: Limits {
                allow: warren_gateway::Allowlist::of(["echo", "send_mail", "gated"]),
                ..Limits::default()
            },
            call_timeout: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(1),
            resume: ResumeSettings {
                stream: Some(self.stream.clone()),
                ..resume
            },
            ..GatewaySettings::default()
        };
        let handle = tokio::spawn(warren_gateway::serve(
            settings,
            client.clone(),
            http,
            text,
            stop.clone(),
        ));
        self.gateways.push(Gateway {
            http: addr,
            client,
            stop,
            handle: Some(handle),
        });
        self.gateways.len() - 1
    }

    /// Stops gateway `index` and waits for it.
    async fn stop_gateway(&mut self, index: usize) {
        let gateway = &mut self.gateways[index];
        gateway.stop.cancel();
        if let Some(handle) = gateway.handle.take() {
            tokio::time::timeout(WAIT, handle)
                .await
                .expect("the gateway stops")
                .expect("gateway task");
        }
        gateway.client.close().await;
    }

    /// Stops everything; the queue and the stream go when the rig drops.
    async fn finish(mut self) {
        for i in 0..self.gateways.len() {
            self.stop_gateway(i).await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }

    async fn connect(&self, gateway: usize) -> Ws {
        let url = format!("ws://{}/ws", self.gateways[gateway].http);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        ws
    }

    /// Waits until gateway `index` has no call in flight (its closed sockets' calls gone).
    async fn no_calls(&self, index: usize) {
        let client = &self.gateways[index].client;
        eventually("no call in flight", WAIT, || async {
            client.pending_calls() == 0
        })
        .await;
    }

    /// Waits until gateway `index` has read every event appended so far: a witness socket's
    /// event, appended last, reaches it (the tail reads in stream order). The queue must have
    /// no other task waiting.
    async fn sync_tail(&self, index: usize) {
        let mut witness = self.connect(index).await;
        let _ = submit(&mut witness, &["witness"]).await;
        let origin = self.take().await.origin.expect("origin");
        self.append(&succeeded("witness-sync", &origin, &json!(0)))
            .await;
        // (A witness that came before the tail read anything catches up from the stream
        // first, which may say more than its event.)
        while next(&mut witness).await["task_id"] != "witness-sync" {}
    }

    /// Takes the next task from the queue, as a worker would.
    async fn take(&self) -> Taken {
        let until = tokio::time::Instant::now() + WAIT;
        let message = loop {
            let got = self
                .channel
                .basic_get(
                    self.queue.name.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .expect("basic.get");
            if let Some(got) = got {
                break got.delivery;
            }
            assert!(tokio::time::Instant::now() < until, "no task in the queue");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let incoming = Incoming::read(&message.properties);
        Taken {
            task_id: incoming.id.as_str().to_owned(),
            origin: envelope::header_str(message.properties.headers().as_ref(), headers::ORIGIN),
            properties: message.properties,
        }
    }

    /// Appends `event` to the stream as a worker does, and waits for the confirm.
    async fn append(&self, event: &Event) {
        self.publish(&self.stream, event.to_body(), event.properties())
            .await;
    }

    /// Appends `events` as ONE message, packed as a worker packs them under load.
    async fn append_packed(&self, events: &[Event]) {
        let mut pack = events::Pack::new();
        for event in events {
            pack.push(&event.to_body(), event.at_ms);
        }
        let properties = pack.properties();
        self.publish(&self.stream, pack.into_body(), properties)
            .await;
    }

    /// Replies to `task` with `result`, as a worker does.
    async fn reply(&self, task: &Taken, result: Value) {
        let incoming = Incoming::read(&task.properties);
        let address = task
            .properties
            .reply_to()
            .as_ref()
            .expect("a call has a reply address")
            .as_str()
            .to_owned();
        let body = Reply::Ok(result).encode();
        self.publish(&address, body, envelope::reply_properties(&incoming))
            .await;
    }

    async fn publish(&self, routing_key: &str, body: Vec<u8>, properties: BasicProperties) {
        self.channel
            .basic_publish(
                "".into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
    }

    /// The offset of the first event the stream keeps (none when none comes within a moment:
    /// right after retention removed a segment, the one left may hold no event yet).
    async fn first_kept(&self) -> Option<u64> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut deliveries = events::read(&channel, &self.stream, Start::First, 1, "probe")
            .await
            .expect("read the stream");
        let delivery = tokio::time::timeout(Duration::from_secs(2), deliveries.next()).await;
        let offset = delivery
            .ok()
            .flatten()
            .and_then(Result::ok)
            .and_then(|d| events::offset_of(&d.properties));
        // Cancelled before the close: lapin takes a delivery to a closing channel for a
        // connection error.
        channel
            .basic_cancel(
                "probe".into(),
                lapin::options::BasicCancelOptions::default(),
            )
            .await
            .expect("cancel");
        let _ = channel.close(200, "probed".into()).await;
        offset
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // A failed test: stop the gateways (the queue and stream go with `queue`).
        for gateway in &self.gateways {
            gateway.stop.cancel();
        }
    }
}

/// An event of `kind` about `task_id`, from `origin`.
fn event(kind: EventKind, task_id: &str, origin: &str) -> Event {
    Subject {
        task_id: task_id.to_owned(),
        function: "echo".into(),
        queue: "test".into(),
        attempt: 1,
        worker: "test-worker".into(),
        batch: None,
        origin: Some(origin.to_owned()),
        traceparent: None,
    }
    .event(kind)
}

fn progress(task_id: &str, origin: &str, seq: u32, fraction: f64) -> Event {
    let mut e = event(EventKind::Progress, task_id, origin);
    e.seq = Some(seq);
    e.progress = Some(Progress {
        fraction: Some(fraction),
        message: Some(format!("step {seq}")),
        detail: None,
    });
    e
}

fn succeeded(task_id: &str, origin: &str, result: &Value) -> Event {
    let mut e = event(EventKind::Succeeded, task_id, origin);
    e.result = Some(RawJson::from_string(result.to_string()).expect("JSON"));
    e
}

fn failed(task_id: &str, origin: &str, retry: bool) -> Event {
    let mut e = event(EventKind::Failed, task_id, origin);
    e.error = Some(EventError {
        kind: "handler_failed".into(),
        message: "it broke".into(),
    });
    e.retry = retry.then_some(RetryAt {
        attempt: 2,
        at_ms: 0,
    });
    e
}

// ---------------------------------------------------------------------------------------------
// websocket helpers

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::text(message.to_string()))
        .await
        .expect("websocket send");
}

/// The next JSON message.
async fn next(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a websocket message within the wait bound")
            .expect("the websocket is open")
            .expect("a websocket message");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON message"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a JSON text message, got {other:?}"),
        }
    }
}

/// The resume token of `message`.
fn token(message: &Value) -> String {
    message["resume_token"]
        .as_str()
        .unwrap_or_else(|| panic!("a resume token in {message}"))
        .to_owned()
}

/// Sends tasks `ids` (echo) as one batch; returns each id's task id, in `ids` order, and the
/// token of the last acknowledgement.
async fn submit(ws: &mut Ws, ids: &[&str]) -> (Vec<String>, String) {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "function": "echo", "args": {"n": id}}))
        .collect();
    send(ws, Value::Array(batch)).await;
    let mut task_ids = vec![String::new(); ids.len()];
    let mut last = String::new();
    for _ in ids {
        let ack = next(ws).await;
        assert_eq!(ack["status"], "enqueued", "{ack}");
        let at = ids
            .iter()
            .position(|id| ack["id"] == *id)
            .expect("one of ours");
        task_ids[at] = ack["task_id"].as_str().expect("task id").to_owned();
        last = token(&ack);
    }
    (task_ids, last)
}

/// Resumes with `token` on a new socket; returns the socket and the messages before
/// `resumed` (and `resumed` itself last).
async fn resume(rig: &Rig, gateway: usize, token: &str) -> (Ws, Vec<Value>) {
    let mut ws = rig.connect(gateway).await;
    send(&mut ws, json!({ "resume": token })).await;
    let mut messages = Vec::new();
    loop {
        let message = next(&mut ws).await;
        let done = message.get("resumed").is_some();
        messages.push(message);
        if done {
            return (ws, messages);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The page reloads: the same gateway replays, in order, exactly what the closed socket
/// missed (progress and final answers, with the client's ids, the worker's start and a
/// failure that will be retried left out as on a live socket), then the live events follow,
/// duplicates dropped; the last token replays nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_gets_exactly_the_missed_events_in_order_then_live_ones() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(gw).await;
    let (tasks, token1) = submit(&mut ws, &["a", "b", "c"]).await;
    let mut origins = Vec::new();
    for _ in 0..3 {
        origins.push(
            rig.take()
                .await
                .origin
                .expect("the gateway stamps an origin"),
        );
    }
    let origin = origins[0].clone();
    assert!(origins.iter().all(|o| *o == origin), "{origins:?}");
    assert_eq!(
        uuid::Uuid::parse_str(&origin).map(|u| u.get_version_num()),
        Ok(4)
    );
    drop(ws);
    rig.no_calls(gw).await;

    let (a, b, c) = (&tasks[0], &tasks[1], &tasks[2]);
    let other = uuid::Uuid::new_v4().to_string();
    rig.append(&event(EventKind::Started, a, &origin)).await;
    rig.append(&progress(a, &origin, 1, 0.5)).await;
    rig.append(&succeeded("x-1", &other, &json!("not ours")))
        .await;
    rig.append(&succeeded(a, &origin, &json!({"sent": "a"})))
        .await;
    rig.append(&progress(b, &origin, 1, 0.25)).await;
    rig.append(&failed(b, &origin, true)).await;
    rig.append(&failed(b, &origin, false)).await;
    rig.append(&event(EventKind::Started, c, &origin)).await;
    rig.sync_tail(gw).await;

    let (mut ws, replayed) = resume(&rig, gw, &token1).await;
    let shape: Vec<Value> = replayed
        .iter()
        .map(|m| {
            json!({
                "id": m.get("id"), "task_id": m.get("task_id"), "ok": m.get("ok"),
                "fraction": m.pointer("/progress/fraction"), "result": m.get("result"),
                "error": m.pointer("/error/kind"), "resumed": m.get("resumed"),
            })
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            json!({"id": "a", "task_id": a, "ok": null, "fraction": 0.5, "result": null, "error": null, "resumed": null}),
            json!({"id": "a", "task_id": a, "ok": true, "fraction": null, "result": {"sent": "a"}, "error": null, "resumed": null}),
            json!({"id": "b", "task_id": b, "ok": null, "fraction": 0.25, "result": null, "error": null, "resumed": null}),
            json!({"id": "b", "task_id": b, "ok": false, "fraction": null, "result": null, "error": "handler_failed", "resumed": null}),
            json!({"id": null, "task_id": null, "ok": null, "fraction": null, "result": null, "error": null, "resumed": {"replayed": 4}}),
        ],
        "{replayed:#?}"
    );
    assert!(replayed.iter().all(|m| m.get("resume_token").is_some()));

    // Live: c's progress and answer; a's duplicates (a worker killed before its ack appends
    // them again) are dropped, as the sentinel after them shows.
    rig.append(&progress(c, &origin, 1, 0.9)).await;
    rig.append(&succeeded(c, &origin, &json!({"sent": "c"})))
        .await;
    rig.append(&progress(a, &origin, 1, 0.5)).await;
    rig.append(&succeeded(a, &origin, &json!({"sent": "a"})))
        .await;
    rig.append(&succeeded("sentinel-1", &origin, &json!(1)))
        .await;
    let live = next(&mut ws).await;
    assert_eq!(
        (&live["id"], live.pointer("/progress/fraction")),
        (&json!("c"), Some(&json!(0.9))),
        "{live}"
    );
    let live = next(&mut ws).await;
    assert_eq!(
        (&live["id"], &live["result"]),
        (&json!("c"), &json!({"sent": "c"})),
        "{live}"
    );
    let sentinel = next(&mut ws).await;
    assert_eq!(sentinel["task_id"], "sentinel-1", "{sentinel}");
    assert!(
        sentinel.get("id").is_none(),
        "an unknown task has no client id: {sentinel}"
    );
    drop(ws);

    // The last token stands for everything: nothing is replayed, and live events still come.
    let (mut ws, replayed) = resume(&rig, gw, &token(&sentinel)).await;
    assert_eq!(
        replayed,
        vec![json!({"resumed": {"replayed": 0}, "resume_token": replayed[0]["resume_token"]})]
    );
    rig.append(&succeeded("sentinel-2", &origin, &json!(2)))
        .await;
    assert_eq!(next(&mut ws).await["task_id"], "sentinel-2");
    drop(ws);
    rig.finish().await;
}

/// Behind a load balancer the client comes back to another instance: it replays from the
/// stream (the ids are this process's own knowledge: only task ids here), and tasks sent on
/// the new socket carry the adopted origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_to_another_gateway_instance_replays_from_the_stream() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let one = rig.start_gateway(ResumeSettings::default()).await;
    let two = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(one).await;
    let (tasks, token1) = submit(&mut ws, &["x"]).await;
    let origin = rig.take().await.origin.expect("origin");
    drop(ws);
    rig.no_calls(one).await;
    rig.append(&progress(&tasks[0], &origin, 1, 0.5)).await;
    rig.append(&succeeded(&tasks[0], &origin, &json!("done")))
        .await;
    rig.sync_tail(two).await;

    let (mut ws, replayed) = resume(&rig, two, &token1).await;
    assert_eq!(replayed.len(), 3, "{replayed:#?}");
    assert_eq!(replayed[0]["task_id"], tasks[0].as_str());
    assert_eq!(replayed[0].pointer("/progress/fraction"), Some(&json!(0.5)));
    assert_eq!(
        (&replayed[1]["ok"], &replayed[1]["result"]),
        (&json!(true), &json!("done"))
    );
    assert!(replayed[1].get("id").is_none(), "{}", replayed[1]);
    assert_eq!(replayed[2]["resumed"]["replayed"], 2);

    let _ = submit(&mut ws, &["y"]).await;
    assert_eq!(rig.take().await.origin.as_deref(), Some(origin.as_str()));
    drop(ws);
    rig.finish().await;
}

/// A deploy: the gateway stops, events are appended while none runs, a new one starts; the
/// client resumes on it with the token the old one gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_a_gateway_restart_replays_what_happened_meanwhile() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let old = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(old).await;
    let (tasks, token1) = submit(&mut ws, &["m1", "m2"]).await;
    let origin = rig.take().await.origin.expect("origin");
    let _ = rig.take().await;
    rig.append(&succeeded(&tasks[0], &origin, &json!(1))).await;
    // m1 is a call in flight there: its answer waits for its reply, which the gateway's
    // shutdown cuts off; the client never saw it.
    rig.stop_gateway(old).await;
    drop(ws);
    rig.append(&succeeded(&tasks[1], &origin, &json!(2))).await;

    let new = rig.start_gateway(ResumeSettings::default()).await;
    rig.sync_tail(new).await;
    let (ws, replayed) = resume(&rig, new, &token1).await;
    let results: Vec<(Value, Value)> = replayed
        .iter()
        .filter(|m| m.get("ok").is_some())
        .map(|m| (m["task_id"].clone(), m["result"].clone()))
        .collect();
    assert_eq!(
        results,
        vec![(json!(tasks[0]), json!(1)), (json!(tasks[1]), json!(2))],
        "{replayed:#?}"
    );
    assert_eq!(replayed.last().unwrap()["resumed"]["replayed"], 2);
    drop(ws);
    rig.finish().await;
}

/// The race: a result reaches the client by reply before the gateway read its final event
/// (the worker appends, then replies; the reply path is faster). Neither the live socket nor a
/// resume from that result's token shows it twice. The other order (the event read first, the
/// reply late) gives the reply's answer, once, and nothing after it overtakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_a_second_final_for_a_task_seen_settled() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(gw).await;
    let (tasks, _) = submit(&mut ws, &["r"]).await;
    let task = rig.take().await;
    assert_eq!(task.task_id, tasks[0]);
    let origin = task.origin.clone().expect("origin");
    // Reply first.
    rig.reply(&task, json!({"by": "reply"})).await;
    let answer = next(&mut ws).await;
    assert_eq!(
        (&answer["id"], &answer["result"]),
        (&json!("r"), &json!({"by": "reply"}))
    );
    let token_r = token(&answer);
    // Then its event, and a sentinel.
    rig.append(&succeeded(&tasks[0], &origin, &json!({"by": "reply"})))
        .await;
    rig.append(&succeeded("s1", &origin, &json!("s1"))).await;
    let sentinel = next(&mut ws).await;
    assert_eq!(
        sentinel["task_id"], "s1",
        "no second answer for r: {sentinel}"
    );

    // The event first: the reply's answer is the one written, once, and s2 does not overtake it.
    let (tasks, _) = submit(&mut ws, &["e"]).await;
    let late = rig.take().await;
    rig.append(&succeeded(&tasks[0], &origin, &json!({"by": "stream"})))
        .await;
    rig.append(&succeeded("s2", &origin, &json!("s2"))).await;
    // Another session's event, read by the same tail after those: once it arrives, the tail
    // has handed them over.
    let mut witness = rig.connect(gw).await;
    let _ = submit(&mut witness, &["w"]).await;
    let witness_origin = rig.take().await.origin.expect("origin");
    rig.append(&succeeded("w1", &witness_origin, &json!("w")))
        .await;
    assert_eq!(next(&mut witness).await["task_id"], "w1");
    rig.reply(&late, json!({"by": "reply"})).await;
    let answer = next(&mut ws).await;
    assert_eq!(
        (&answer["id"], &answer["result"]),
        (&json!("e"), &json!({"by": "reply"})),
        "{answer}"
    );
    let sentinel = next(&mut ws).await;
    assert_eq!(sentinel["task_id"], "s2", "{sentinel}");
    drop(ws);
    drop(witness);
    rig.no_calls(gw).await;

    // From the token of r's answer: r's event lies after its position, and is left out.
    let (ws, replayed) = resume(&rig, gw, &token_r).await;
    let replayed_tasks: Vec<&Value> = replayed.iter().filter_map(|m| m.get("task_id")).collect();
    assert_eq!(
        replayed_tasks,
        vec![&json!("s1"), &json!(tasks[0]), &json!("s2")],
        "{replayed:#?}"
    );
    assert_eq!(
        replayed[1]["result"],
        json!({"by": "stream"}),
        "e was never answered on the socket r's token came from"
    );
    drop(ws);
    // From the token of s2: nothing.
    let (ws, replayed) = resume(&rig, gw, &token(&sentinel)).await;
    assert_eq!(replayed.len(), 1, "{replayed:#?}");
    drop(ws);
    rig.finish().await;
}

/// Under load a worker packs several events into one stream message: a replay hands them on
/// one by one, a token written within such a message resumes after exactly its event, and a
/// live call's final event in the middle of one holds back only what follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_events_are_replayed_and_resumed_event_by_event() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(gw).await;
    let (tasks, token1) = submit(&mut ws, &["a", "b"]).await;
    let origin = rig.take().await.origin.expect("origin");
    let _ = rig.take().await;
    drop(ws);
    rig.no_calls(gw).await;
    let (a, b) = (&tasks[0], &tasks[1]);
    let other = uuid::Uuid::new_v4().to_string();
    rig.append_packed(&[
        progress(a, &origin, 1, 0.5),
        succeeded(a, &origin, &json!("a")),
        succeeded("x-1", &other, &json!("not ours")),
        failed(b, &origin, false),
    ])
    .await;
    rig.sync_tail(gw).await;

    let (ws, replayed) = resume(&rig, gw, &token1).await;
    let shape: Vec<(Value, Value, Value)> = replayed
        .iter()
        .map(|m| (m["task_id"].clone(), m["ok"].clone(), m["resumed"].clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (json!(a), Value::Null, Value::Null),
            (json!(a), json!(true), Value::Null),
            (json!(b), json!(false), Value::Null),
            (Value::Null, Value::Null, json!({"replayed": 3})),
        ],
        "{replayed:#?}"
    );
    drop(ws);
    rig.no_calls(gw).await;

    // The token of a's answer lies within the pack: only what follows it comes again.
    let (ws, again) = resume(&rig, gw, &token(&replayed[1])).await;
    let shape: Vec<(Value, Value)> = again
        .iter()
        .map(|m| (m["task_id"].clone(), m["resumed"].clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (json!(b), Value::Null),
            (Value::Null, json!({"replayed": 1}))
        ],
        "{again:#?}"
    );
    drop(ws);

    // A call in flight whose final event comes first in a pack: its answer is the reply's,
    // and the event packed after it still comes, once.
    let mut ws = rig.connect(gw).await;
    let (tasks, _) = submit(&mut ws, &["e"]).await;
    let late = rig.take().await;
    let origin = late.origin.clone().expect("origin");
    rig.append_packed(&[
        succeeded(&tasks[0], &origin, &json!({"by": "stream"})),
        succeeded("s2", &origin, &json!("s2")),
    ])
    .await;
    let mut witness = rig.connect(gw).await;
    let _ = submit(&mut witness, &["w"]).await;
    let witness_origin = rig.take().await.origin.expect("origin");
    rig.append(&succeeded("w1", &witness_origin, &json!("w")))
        .await;
    assert_eq!(next(&mut witness).await["task_id"], "w1");
    rig.reply(&late, json!({"by": "reply"})).await;
    let answer = next(&mut ws).await;
    assert_eq!(
        (&answer["id"], &answer["result"]),
        (&json!("e"), &json!({"by": "reply"})),
        "{answer}"
    );
    let sentinel = next(&mut ws).await;
    assert_eq!(sentinel["task_id"], "s2", "{sentinel}");
    drop(ws);
    drop(witness);
    rig.finish().await;
}

/// A token older than what the stream keeps: `resume_expired` names the offsets that are
/// gone, then what is kept is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_older_than_retention_gets_resume_expired() {
    let mut rig = Rig::new(64 * 1024).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(gw).await;
    let (tasks, _) = submit(&mut ws, &["old"]).await;
    let origin = rig.take().await.origin.expect("origin");
    rig.append(&progress(&tasks[0], &origin, 1, 0.1)).await;
    // The token of a message about an event carries a position in the stream.
    rig.append(&succeeded("probe", &origin, &json!("probe")))
        .await;
    let probe = next(&mut ws).await;
    assert_eq!(probe["task_id"], "probe");
    let token1 = token(&probe);
    drop(ws);
    rig.no_calls(gw).await;
    let first_before = rig
        .first_kept()
        .await
        .expect("the stream keeps its first events");
    // Others' events push the oldest segments out.
    let other = uuid::Uuid::new_v4().to_string();
    let padding = "x".repeat(1000);
    let mut n = 0;
    while rig
        .first_kept()
        .await
        .is_none_or(|first| first <= first_before + 5)
    {
        for _ in 0..20 {
            n += 1;
            let mut e = progress(&format!("other-{n}"), &other, 1, 0.0);
            e.progress.as_mut().unwrap().message = Some(padding.clone());
            rig.append(&e).await;
        }
        assert!(n < 5000, "retention never removed a segment");
    }
    rig.append(&succeeded(&tasks[0], &origin, &json!("kept")))
        .await;
    rig.sync_tail(gw).await;
    let (ws, replayed) = resume(&rig, gw, &token1).await;
    assert_eq!(replayed.len(), 3, "{replayed:#?}");
    let expired = &replayed[0]["resume_expired"];
    assert_eq!(expired["reason"], "retention", "{replayed:#?}");
    let (from, to) = (
        expired["from_offset"].as_u64().unwrap(),
        expired["to_offset"].as_u64().unwrap(),
    );
    assert!(
        from <= to && Some(to + 1) == rig.first_kept().await,
        "{expired}"
    );
    assert_eq!(replayed[1]["result"], "kept");
    assert_eq!(replayed[2]["resumed"]["replayed"], 1);
    drop(ws);
    rig.finish().await;
}

/// A client too far behind for `max_replay_events` gets `resume_expired` for the rest and
/// goes on from the live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reads_at_most_its_limit() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig
        .start_gateway(ResumeSettings {
            max_replay_events: 10,
            ..ResumeSettings::default()
        })
        .await;
    let mut ws = rig.connect(gw).await;
    let (tasks, token1) = submit(&mut ws, &["far"]).await;
    let origin = rig.take().await.origin.expect("origin");
    drop(ws);
    rig.no_calls(gw).await;
    let other = uuid::Uuid::new_v4().to_string();
    for n in 0..30 {
        rig.append(&succeeded(&format!("other-{n}"), &other, &json!(n)))
            .await;
    }
    rig.append(&succeeded(&tasks[0], &origin, &json!("too late")))
        .await;
    rig.sync_tail(gw).await;
    let (mut ws, replayed) = resume(&rig, gw, &token1).await;
    assert_eq!(replayed.len(), 2, "{replayed:#?}");
    assert_eq!(replayed[0]["resume_expired"]["reason"], "too_far_behind");
    rig.append(&succeeded("live", &origin, &json!("live")))
        .await;
    assert_eq!(next(&mut ws).await["task_id"], "live");
    drop(ws);
    rig.finish().await;
}

/// A session whose events come faster than it may hold reads them from the stream instead:
/// all of them, in order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_over_its_buffer_catches_up_from_the_stream() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig
        .start_gateway(ResumeSettings {
            max_buffer_bytes: 1,
            ..ResumeSettings::default()
        })
        .await;
    let mut ws = rig.connect(gw).await;
    let _ = submit(&mut ws, &["own"]).await;
    let origin = rig.take().await.origin.expect("origin");
    for seq in 1..=40 {
        rig.append(&progress("f", &origin, seq, f64::from(seq) / 40.0))
            .await;
    }
    rig.append(&succeeded("f", &origin, &json!("f"))).await;
    let mut seen = Vec::new();
    loop {
        let m = next(&mut ws).await;
        if m.get("ok").is_some() {
            assert_eq!(m["task_id"], "f", "{m}");
            break;
        }
        seen.push(m.pointer("/progress/message").cloned().unwrap_or_default());
    }
    let expected: Vec<Value> = (1..=40).map(|seq| json!(format!("step {seq}"))).collect();
    assert_eq!(seen, expected);
    drop(ws);
    rig.finish().await;
}

/// What is not a resume is refused as `bad_request`, and the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_resume_is_a_bad_request() {
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut ws = rig.connect(gw).await;
    for garbage in [
        json!("garbage!"),
        json!(""),
        json!(42),
        json!("A".repeat(5000)),
        json!("AQ"),
    ] {
        send(&mut ws, json!({ "resume": garbage })).await;
        let answer = next(&mut ws).await;
        assert_eq!(
            answer["error"]["kind"], "bad_request",
            "{garbage}: {answer}"
        );
    }
    // After a task, a resume is refused too: the connection already has its origin.
    let (_, token1) = submit(&mut ws, &["t"]).await;
    send(&mut ws, json!({ "resume": token1 })).await;
    let answer = next(&mut ws).await;
    assert_eq!(answer["error"]["kind"], "bad_request", "{answer}");
    // Twice on a connection: the second is refused.
    let mut again = rig.connect(gw).await;
    send(&mut again, json!({ "resume": token1 })).await;
    assert!(next(&mut again).await.get("resumed").is_some());
    send(&mut again, json!({ "resume": token1 })).await;
    assert_eq!(next(&mut again).await["error"]["kind"], "bad_request");
    drop(ws);
    drop(again);
    rig.finish().await;
}

// ---------------------------------------------------------------------------------------------
// The page, in headless Chromium

/// Plays the workers for the page test: takes each task, appends its `succeeded` event (with
/// the task's origin), then replies, then acks, as a worker does. After `pause_after` tasks it
/// waits for the page to write `signal` (it is about to reload), answers `while_away` more at
/// once, waits for the page to write `resumed` there (it is back), then answers the rest a
/// little apart, so that the page shows them coming.
async fn stand_in_workers(
    connection: &Connection,
    queue: &str,
    stream: &str,
    signal: &std::path::Path,
    pause_after: usize,
    while_away: usize,
    stop: CancellationToken,
) {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    channel
        .basic_qos(64, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut tasks = channel
        .basic_consume(
            queue.into(),
            "stand-in".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the queue");
    let mut handled = 0;
    loop {
        let task = tokio::select! {
            () = stop.cancelled() => return,
            task = tasks.next() => match task {
                Some(Ok(task)) => task,
                _ => return,
            },
        };
        if handled == pause_after {
            let reloading = eventually("the page to reload", Duration::from_secs(120), || async {
                signal.exists()
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = reloading => {}
            }
        }
        let incoming = Incoming::read(&task.properties);
        let origin = envelope::header_str(task.properties.headers().as_ref(), headers::ORIGIN)
            .expect("the gateway stamps an origin");
        let result = json!({"sent": true});
        let event = succeeded(incoming.id.as_str(), &origin, &result);
        let confirm = channel
            .basic_publish(
                "".into(),
                stream.into(),
                BasicPublishOptions::default(),
                &event.to_body(),
                event.properties(),
            )
            .await
            .expect("append");
        confirm.await.expect("appended");
        if let Some(reply_to) = task.properties.reply_to() {
            let _ = channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &Reply::Ok(result).encode(),
                    envelope::reply_properties(&incoming),
                )
                .await;
        }
        task.ack(BasicAckOptions::default()).await.expect("ack");
        handled += 1;
        if handled == pause_after + while_away {
            let back = eventually("the page to be back", Duration::from_secs(120), || async {
                std::fs::read_to_string(signal).is_ok_and(|s| s == "resumed")
            });
            tokio::select! {
                () = stop.cancelled() => return,
                () = back => {}
            }
        } else if handled > pause_after + while_away {
            tokio::time::sleep(Duration::from_millis(3)).await; // pacing, not synchronisation
        }
    }
}

/// The issue's user: the page mails 1000 users and the person reloads it in the middle. The
/// page resumes with its saved token and the demo goes on: the count starts from where it
/// was, only rises, and reaches 1000 with nothing counted twice (tests/browser/resume.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reloaded_mid_demo_continues_in_chromium() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !std::path::Path::new(&chromium).exists() && !in_ci {
        println!(
            "SKIPPED the_page_reloaded_mid_demo_continues_in_chromium: {chromium} is absent \
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
    let screenshot = output_dir.join("gateway-page-resumed.png");
    let _ = std::fs::remove_file(&screenshot);
    let dir = warren_tests::temp_dir("resume-page");
    let signal = dir.path().join("reloading");

    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    rig.gateways[gw]
        .client
        .declare_queue(&rig.queue.name)
        .await
        .expect("the work queue is declared");
    let stop_workers = CancellationToken::new();
    let workers = {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect");
        let (queue, stream, signal) = (rig.queue.name.clone(), rig.stream.clone(), signal.clone());
        let stop = stop_workers.clone();
        tokio::spawn(async move {
            stand_in_workers(&connection, &queue, &stream, &signal, 400, 200, stop).await;
            let _ = connection.close(200, "test done".into()).await;
        })
    };
    let url = format!("http://{}/", rig.gateways[gw].http);
    let run = tokio::process::Command::new("node")
        .arg(browser_dir.join("resume.mjs"))
        .arg(&url)
        .arg(&screenshot)
        .env("CHROMIUM", &chromium)
        .env("RESUME_SIGNAL", &signal)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run).await;
    stop_workers.cancel();
    let _ = tokio::time::timeout(WAIT, workers).await;
    let output = output
        .expect("the browser run ends within 4 minutes")
        .expect("node runs (is Node.js installed?)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "resume.mjs failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("to 1000 results, 0 failures, 0 duplicates"),
        "{stdout}"
    );
    rig.finish().await;
}

/// Held until the test of real workers lets it go: the tasks of `gated` wait on it.
static GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);

/// A mail that reports half-way progress, then waits for [`GATE`]; returns `n`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Gated {
    n: u32,
}

impl warren_shared::Task for Gated {
    const NAME: &'static str = "gated";
    type Output = u32;
}

async fn gated(
    args: Gated,
    ctx: warren_worker::TaskContext,
) -> Result<u32, warren_worker::TaskError> {
    ctx.progress(events::Progress::fraction(0.5));
    GATE.acquire()
        .await
        .expect("the gate is never closed")
        .forget();
    Ok(args.n)
}

/// The page of the seed's demo reloads while a real worker runs its mails: the worker appends
/// progress and results while no socket is open; the resumed socket gets, for every mail, its
/// missed progress before its one answer (with the page's ids), and nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_while_real_workers_run_gets_each_missed_answer_once_after_its_progress() {
    const MAILS: u32 = 8;
    const CONCURRENCY: u16 = 4;
    let mut rig = Rig::new(events::DEFAULT_MAX_BYTES).await;
    let gw = rig.start_gateway(ResumeSettings::default()).await;
    let mut settings = rig.queue.worker_settings(CONCURRENCY);
    settings.events.stream = rig.stream.clone();
    let worker = rig
        .queue
        .worker_with(warren_worker::Registry::new().register_fn(gated), settings)
        .await;

    let mut ws = rig.connect(gw).await;
    let ids: Vec<String> = (0..MAILS).map(|i| format!("mail-{i}")).collect();
    let batch: Vec<Value> = (0..MAILS)
        .map(|i| json!({"id": ids[i as usize], "function": "gated", "args": {"n": i}}))
        .collect();
    send(&mut ws, Value::Array(batch)).await;
    // The acknowledgements, then the progress of the mails that started (as many as the
    // worker runs at once); the last message seen gives the token.
    let mut acks = 0;
    let mut started = std::collections::HashSet::new();
    let mut last = Value::Null;
    while acks < MAILS || started.len() < usize::from(CONCURRENCY) {
        let message = next(&mut ws).await;
        if message["status"] == "enqueued" {
            acks += 1;
        } else if message.get("progress").is_some() {
            started.insert(message["id"].as_str().expect("the page's id").to_owned());
        } else {
            panic!("no answer can come before the gate opens: {message}");
        }
        last = message;
    }
    let token1 = token(&last);
    drop(ws);
    rig.no_calls(gw).await;

    // With no socket open, every mail runs to its end.
    GATE.add_permits(MAILS as usize);
    let (mut ws, replayed) = resume(&rig, gw, &token1).await;
    let mut messages = replayed;
    let answers = |messages: &[Value]| messages.iter().filter(|m| m.get("ok").is_some()).count();
    while answers(&messages) < MAILS as usize {
        messages.push(next(&mut ws).await);
    }
    // One more mail: its answer comes after anything the stream still held for the others.
    send(
        &mut ws,
        json!({"id": "witness", "function": "gated", "args": {"n": 99}}),
    )
    .await;
    GATE.add_permits(1);
    loop {
        let message = next(&mut ws).await;
        let done = message["id"] == "witness" && message.get("ok").is_some();
        messages.push(message);
        if done {
            break;
        }
    }

    for (i, id) in ids.iter().enumerate() {
        let mine: Vec<&Value> = messages.iter().filter(|m| m["id"] == *id).collect();
        let finals: Vec<&&Value> = mine.iter().filter(|m| m.get("ok").is_some()).collect();
        assert_eq!(finals.len(), 1, "{id}: {mine:#?}");
        assert_eq!(
            (&finals[0]["ok"], &finals[0]["result"]),
            (&json!(true), &json!(i)),
            "{id}"
        );
        // Whatever progress of it the socket got came before its answer.
        let answer_at = mine.iter().position(|m| m.get("ok").is_some()).unwrap();
        assert!(
            mine[answer_at + 1..]
                .iter()
                .all(|m| m.get("progress").is_none()),
            "{id}: progress after the answer: {mine:#?}"
        );
        assert!(
            mine.iter().all(|m| m.get("resume_token").is_some()),
            "{mine:#?}"
        );
    }
    // The mails that had not started when the page closed: their progress was replayed.
    for id in ids.iter().filter(|id| !started.contains(*id)) {
        assert!(
            messages
                .iter()
                .any(|m| m["id"] == *id && m.get("progress").is_some()),
            "{id}: no progress: {messages:#?}"
        );
    }
    drop(ws);
    worker.stop();
    worker.wait().await.expect("the worker stops cleanly");
    rig.finish().await;
}
