//! The websocket endpoint (`GET /ws`): many tasks in flight per connection, results pushed in
//! completion order, each tagged with the client's own id.
//!
//! A client sends `{"id": ..., "function": ..., "args": ...}` (or a JSON array of them, a
//! batch of at most `max_batch`; its refusals are written one by one as they are made, so the
//! write timeout and TCP push back on a client that does not read them). For each task it gets
//! `{"id": ..., "status": "enqueued", "task_id": ...}` once the broker holds the task, then
//! `{"id": ..., "ok": true, "result": ...}` or
//! `{"id": ..., "ok": false, "error": {"kind": ..., "message": ...}}`. `docs/gateway.md` has
//! the whole protocol, including `{"auth": ...}`, `{"watch": "queue"}` and
//! `{"result": "<task id>"}` (a task's outcome from the event stream, `crate::results`).
//!
//! Ids and arguments are kept as JSON text, never parsed into trees, and every call holds its
//! bytes of the connection's and the gateway's budgets until its result is written.
//!
//! Every call runs on a task of the connection's [`JoinSet`]; when the client goes away the set
//! is dropped, which aborts the calls and removes them from the client's pending map, so a
//! disconnect leaks nothing.
//!
//! Browsers let any web page open a websocket to any address, the user's own loopback
//! included, and they say which page did in `Origin`. So an upgrade whose `Origin` is neither
//! the gateway's own (its `Host`) nor allowed (`--allow-origin`) is refused; programs send no
//! `Origin` and are not affected ([`browser`](super::browser)).

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use warren_shared::RawJson;

use super::admission::Admitted;
use super::browser;
use super::budget::{Budget, Held};
use super::limits::{GatewayError, Kind, MAX_ID_BYTES};
use super::resume::{About, Session};
use super::{Shared, bearer, error_response};

/// `GET /ws`: checks the `Origin` and an `Authorization: Bearer` header if one is sent, then
/// upgrades. The websocket keeps the HTTP connection's place among the open connections.
pub(super) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Extension(admitted): Extension<Arc<Admitted>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if let Err(refused) = browser::check_origin(&headers, &shared.settings.allowed_origins) {
        tracing::debug!(error = %refused, "ws: upgrade refused");
        return error_response(StatusCode::FORBIDDEN, &refused);
    }
    let authed = match bearer(&headers) {
        Some(token) if shared.limits().token_matches(token) => {
            if shared.limits().token.is_some() {
                admitted.authenticated();
            }
            true
        }
        Some(_) => {
            return error_response(StatusCode::UNAUTHORIZED, &GatewayError::unauthorized());
        }
        None => shared.limits().token.is_none(),
    };
    let max = shared.limits().max_message_bytes;
    let connections = shared.connections.clone();
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            connections.track_future(Connection::new(shared, authed, admitted).run(socket))
        })
}

/// The fields of a websocket message (or batch element) the gateway reads, as JSON text;
/// anything else is skipped without a tree. A field sent as `null` is `Some("null")`, and a
/// repeated field keeps its last value, as a parse into a `Value` would.
#[derive(Default)]
struct Fields<'a> {
    auth: Option<&'a RawValue>,
    watch: Option<&'a RawValue>,
    /// `{"result": "<task id>"}`: a task's outcome ([`crate::results`]).
    result: Option<&'a RawValue>,
    /// `{"resume": token}` ([`crate::resume`]).
    resume: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    function: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
    /// `run_at` / `delay_ms`: when the task is due ([`crate::due::Due`]).
    run_at: Option<&'a RawValue>,
    delay_ms: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Fields<'de>, M::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "auth" => &mut fields.auth,
                        "watch" => &mut fields.watch,
                        "result" => &mut fields.result,
                        "resume" => &mut fields.resume,
                        "id" => &mut fields.id,
                        "function" => &mut fields.function,
                        "args" => &mut fields.args,
                        "run_at" => &mut fields.run_at,
                        "delay_ms" => &mut fields.delay_ms,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value()?);
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl<'a> Fields<'a> {
    /// The fields of `message`, when it is a JSON object.
    fn of(message: &'a RawValue) -> Option<Self> {
        if !message.get().starts_with('{') {
            return None;
        }
        serde_json::from_str(message.get()).ok()
    }
}

/// The elements of a batch, at most `max` of them; `None` when there are more (nothing of the
/// batch is run then).
fn batch(message: &RawValue, max: usize) -> Option<Vec<&RawValue>> {
    /// Collects elements, and stops at the first one past `max`.
    struct Elements<'b> {
        max: usize,
        too_long: &'b std::cell::Cell<bool>,
    }
    impl<'de> serde::de::Visitor<'de> for Elements<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<S: serde::de::SeqAccess<'de>>(
            self,
            mut seq: S,
        ) -> Result<Self::Value, S::Error> {
            let mut elements = Vec::new();
            while let Some(element) = seq.next_element::<&RawValue>()? {
                if elements.len() == self.max {
                    self.too_long.set(true);
                    return Err(serde::de::Error::custom("batch too long"));
                }
                elements.push(element);
            }
            Ok(elements)
        }
    }
    let too_long = std::cell::Cell::new(false);
    let mut deserializer = serde_json::Deserializer::from_str(message.get());
    let elements = serde::Deserializer::deserialize_seq(
        &mut deserializer,
        Elements {
            max,
            too_long: &too_long,
        },
    );
    // The message was checked to be JSON: only a batch too long fails here.
    elements.ok().filter(|_| !too_long.get())
}

/// Something to write to the socket and, for a call's result, the bytes the call holds until
/// it is written; and what it says about its task, for resume's books.
struct Event {
    text: String,
    held: Option<Held>,
    about: About,
}

/// One websocket connection.
struct Connection {
    shared: Arc<Shared>,
    authed: bool,
    /// Whether the client asked for queue depth updates.
    watching: bool,
    /// The calls in flight; dropping the set aborts them.
    calls: JoinSet<()>,
    /// One permit per call in flight, up to the limit.
    permits: Arc<Semaphore>,
    /// Bytes this connection's calls hold.
    budget: Arc<Budget>,
    /// Events from the calls (acknowledgements and results), to be written to the socket.
    events: mpsc::Sender<Event>,
    inbox: mpsc::Receiver<Event>,
    /// Set when the connection must close once the current replies are written.
    closing: Option<CloseFrame>,
    /// This connection's place among the gateway's open connections.
    admitted: Arc<Admitted>,
    /// Its origin, resume tokens and replays.
    resume: Session,
}

impl Connection {
    fn new(shared: Arc<Shared>, authed: bool, admitted: Arc<Admitted>) -> Self {
        let limits = shared.limits();
        let (events, inbox) = mpsc::channel(limits.max_in_flight.clamp(16, 1024));
        let permits = Arc::new(Semaphore::new(limits.max_in_flight));
        let budget = Budget::new(limits.max_in_flight_bytes);
        let resume = Session::new(shared.tail.clone(), &shared.settings.resume);
        Self {
            shared,
            authed,
            watching: false,
            calls: JoinSet::new(),
            permits,
            budget,
            events,
            inbox,
            closing: None,
            resume,
            admitted,
        }
    }

    fn in_flight(&self) -> usize {
        self.shared.limits().max_in_flight - self.permits.available_permits()
    }

    /// Runs the connection until the client leaves, it idles out, stops reading (a write that
    /// makes no progress for the idle timeout), does not present a required token within the
    /// authentication deadline, or the gateway shuts down. Pings and pongs keep nothing alive:
    /// only messages and answers are activity.
    async fn run(mut self, mut socket: WebSocket) {
        let _open = crate::metrics::connection_opened("websocket");
        let limits = self.shared.limits().clone();
        let write_timeout = limits.idle_timeout;
        let shutdown = self.shared.shutdown.clone();
        let mut queue = self.shared.queue.clone();
        let mut last_activity = Instant::now();
        let mut drain_until: Option<Instant> = None;
        // From the upgrade (the HTTP request before it took little time, or met hyper's
        // header timeout); only the token ends the wait for it.
        let auth_deadline = Instant::now() + self.shared.settings.auth_timeout;
        let close_frame = loop {
            if let Some(frame) = self.closing.take() {
                break Some(frame);
            }
            if drain_until.is_some() && self.in_flight() == 0 && self.inbox.is_empty() {
                break Some(close(close_code::AWAY, "gateway shutting down"));
            }
            let idle_at = last_activity + limits.idle_timeout;
            let idle = self.in_flight() == 0 && drain_until.is_none();
            tokio::select! {
                biased;
                Some(event) = self.inbox.recv() => {
                    let texts = self.resume.call_message(event.about, event.text);
                    if !send_all(&mut socket, texts, write_timeout).await {
                        break None;
                    }
                    // Written: a result's bytes are free.
                    drop(event.held);
                    last_activity = Instant::now();
                }
                text = self.resume.next() => {
                    if !send(&mut socket, Message::text(text), write_timeout).await {
                        break None;
                    }
                    last_activity = Instant::now();
                }
                received = socket.recv(), if drain_until.is_none() => match received {
                    Some(Ok(Message::Text(text))) => {
                        last_activity = Instant::now();
                        if !self.on_text(&mut socket, &text, write_timeout).await {
                            return;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        last_activity = Instant::now();
                        let reply = self.on_binary();
                        if !send(&mut socket, Message::text(reply), write_timeout).await {
                            break None;
                        }
                    }
                    // Answered by the websocket layer; not activity (a client that only pings
                    // must not hold a connection forever).
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => break None,
                    Some(Err(e)) => break read_error_close(e, limits.max_message_bytes),
                },
                Ok(()) = queue.changed(), if self.watching => {
                    let event = queue_event(&queue.borrow_and_update());
                    if let Some(event) = event
                        && !send(&mut socket, Message::text(event), write_timeout).await
                    {
                        break None;
                    }
                }
                () = shutdown.cancelled(), if drain_until.is_none() => {
                    drain_until = Some(Instant::now() + self.shared.settings.shutdown_grace);
                }
                () = super::sleep_until_some(drain_until), if drain_until.is_some() => {
                    break Some(close(close_code::AWAY, "gateway shutting down"));
                }
                () = tokio::time::sleep_until(idle_at), if idle => {
                    break Some(close(close_code::NORMAL, "idle timeout"));
                }
                () = tokio::time::sleep_until(auth_deadline), if !self.authed => {
                    tracing::debug!("ws: no token in time; closing");
                    let refusal = self.unauthorized();
                    if !send(&mut socket, Message::text(refusal), write_timeout).await {
                        break None;
                    }
                }
            }
        };
        if let Some(frame) = close_frame {
            let _ = send(&mut socket, Message::Close(Some(frame)), write_timeout).await;
        }
        // Resume keeps the ids of the calls left unanswered (before they are aborted, so that
        // a resume that comes once they are gone finds them).
        self.resume.close();
        // Aborting the calls still running drops their futures, which removes them from the
        // client's pending map: a client that leaves leaks nothing.
        self.calls.abort_all();
    }

    /// Handles one text message, writing its immediate replies (errors, auth) in order as they
    /// are made, each under the write timeout: a batch of refusals is never held in memory.
    /// False when the socket is broken or the client stopped reading.
    async fn on_text(&mut self, socket: &mut WebSocket, text: &str, limit: Duration) -> bool {
        // Checked as the Text port checks a line: a number out of range or a lone surrogate
        // is not JSON here either (kept as text, it would fail once written back).
        let message = warren_shared::protocol::check_json(text.as_bytes())
            .and_then(|()| serde_json::from_str::<&RawValue>(text));
        let fields = message.as_ref().ok().and_then(|m| Fields::of(m));
        if let Some(token) = fields.as_ref().and_then(|f| f.auth) {
            let reply = self.on_auth(token);
            return send(socket, Message::text(reply), limit).await;
        }
        // Before the token, anything else is refused alike, JSON or not (docs/gateway.md).
        if !self.authed {
            let reply = self.unauthorized();
            return send(socket, Message::text(reply), limit).await;
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                let error = GatewayError::new(Kind::BadRequest, format!("not valid JSON: {e}"));
                return send(socket, Message::text(error_event(NULL, &error)), limit).await;
            }
        };
        if let Some(token) = fields.as_ref().and_then(|f| f.resume) {
            return match self.resume.resume(token) {
                Ok(()) => true,
                Err(refused) => {
                    send(socket, Message::text(error_event(NULL, &refused)), limit).await
                }
            };
        }
        if fields
            .as_ref()
            .and_then(|f| f.watch)
            .is_some_and(|watch| watch.get() == "\"queue\"")
        {
            self.watching = true;
            let event = queue_event(&self.shared.queue.borrow());
            return match event {
                Some(event) => send(socket, Message::text(event), limit).await,
                None => true,
            };
        }
        if let Some(task) = fields.as_ref().and_then(|f| f.result) {
            return match self.look_up(task) {
                Some(refusal) => send(socket, Message::text(refusal), limit).await,
                None => true,
            };
        }
        if message.get().starts_with('[') {
            let max = self.shared.limits().max_batch;
            let Some(tasks) = batch(message, max) else {
                let error = GatewayError::new(
                    Kind::BadRequest,
                    format!(
                        "a batch holds at most {max} tasks (max_batch); nothing of this one was \
                         run"
                    ),
                );
                return send(socket, Message::text(error_event(NULL, &error)), limit).await;
            };
            for task in tasks {
                if let Some(refusal) = self.submit(task)
                    && !send(socket, Message::text(refusal), limit).await
                {
                    return false;
                }
            }
            return true;
        }
        match self.submit(message) {
            Some(refusal) => send(socket, Message::text(refusal), limit).await,
            None => true,
        }
    }

    /// Handles one binary message: refused, as anything else before the token.
    fn on_binary(&mut self) -> String {
        if !self.authed {
            return self.unauthorized();
        }
        let error = GatewayError::new(
            Kind::BadRequest,
            "binary messages are not accepted; send JSON text",
        );
        error_event(NULL, &error)
    }

    /// The `unauthorized` answer; the socket closes with `1008` after it.
    fn unauthorized(&mut self) -> String {
        self.closing = Some(close(close_code::POLICY, "unauthorized"));
        error_event(NULL, &GatewayError::unauthorized())
    }

    fn on_auth(&mut self, token: &RawValue) -> String {
        // A value that is not a string is an empty token, as on the Text bridge: ok without a
        // token configured (`false` is PHP's `json_encode` of an unset variable), wrong with one
        // (a configured token is never empty).
        let token = serde_json::from_str::<String>(token.get()).unwrap_or_default();
        if !self.shared.limits().token_matches(&token) {
            return self.unauthorized();
        }
        self.authed = true;
        if self.shared.limits().token.is_some() {
            self.admitted.authenticated();
        }
        json!({"auth": "ok"}).to_string()
    }

    /// Starts looking a task's outcome up, a call in flight until it is answered; or returns
    /// the refusal to answer at once.
    fn look_up(&mut self, task: &RawValue) -> Option<String> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let busy = GatewayError::busy(self.shared.limits().max_in_flight);
            return Some(crate::results::ws_error(task, &busy));
        };
        let mut held = match Held::take(&self.budget, &self.shared.budget, task.get().len()) {
            Ok(held) => held,
            Err(spent) => {
                return Some(crate::results::ws_error(
                    task,
                    &GatewayError::busy_bytes(spent),
                ));
            }
        };
        let (shared, events, task) = (self.shared.clone(), self.events.clone(), task.to_owned());
        self.calls.spawn(async move {
            let text = crate::results::ws_answer(&shared, &task).await;
            held.add(text.len());
            let _ = events
                .send(Event {
                    text,
                    held: Some(held),
                    about: About::Nothing,
                })
                .await;
            drop(permit);
        });
        while self.calls.try_join_next().is_some() {}
        None
    }

    /// Starts one task, or returns the error to answer at once.
    fn submit(&mut self, task: &RawValue) -> Option<String> {
        // Only an object is a task (serde would read a struct from an array of its fields in
        // order, too).
        let Some(fields) = Fields::of(task) else {
            return Some(error_event(
                NULL,
                &GatewayError::new(
                    Kind::BadRequest,
                    "expected {\"id\": ..., \"function\": ..., \"args\": ...}",
                ),
            ));
        };
        let id = fields.id.unwrap_or(NULL);
        if id.get().len() > MAX_ID_BYTES {
            return Some(error_event(
                NULL,
                &GatewayError::new(
                    Kind::BadRequest,
                    format!("\"id\" is longer than {MAX_ID_BYTES} bytes of JSON"),
                ),
            ));
        }
        let refuse = |error: GatewayError| Some(error_event(id, &error));
        let function = match fields.function {
            None => {
                return refuse(GatewayError::new(
                    Kind::BadRequest,
                    "not a task {\"id\", \"function\", \"args\"}: no \"function\"",
                ));
            }
            Some(raw) => match serde_json::from_str::<String>(raw.get()) {
                Ok(function) if !function.is_empty() => function,
                Ok(_) => {
                    return refuse(GatewayError::new(Kind::BadRequest, "\"function\" is empty"));
                }
                Err(_) => {
                    return refuse(GatewayError::new(
                        Kind::BadRequest,
                        "not a task {\"id\", \"function\", \"args\"}: \"function\" is not a string",
                    ));
                }
            },
        };
        if let Err(forbidden) = self.shared.limits().check_function(&function) {
            return refuse(forbidden);
        }
        let mut options = match crate::due::Due::of_fields(fields.run_at, fields.delay_ms)
            .and_then(|due| self.shared.options_due(&due))
        {
            Ok(options) => options,
            Err(bad) => return refuse(bad),
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return refuse(GatewayError::busy(self.shared.limits().max_in_flight));
        };
        let held = match Held::take(&self.budget, &self.shared.budget, task.get().len()) {
            Ok(held) => held,
            Err(spent) => return refuse(GatewayError::busy_bytes(spent)),
        };
        let task = Task {
            id: id.to_owned(),
            function,
            args: fields.args.map_or_else(RawJson::null, RawJson::from),
        };
        options.origin = self.resume.origin_for_task();
        self.calls.spawn(call(
            self.shared.clone(),
            task,
            options,
            self.events.clone(),
            permit,
            held,
        ));
        // Reap finished calls so the set does not grow with the connection's lifetime.
        while self.calls.try_join_next().is_some() {}
        None
    }
}

/// One task as a websocket client sent it, its id and arguments kept as JSON text.
struct Task {
    id: Box<RawValue>,
    function: String,
    args: RawJson,
}

/// Runs one call: "enqueued" once the broker confirms, then the result or the error.
async fn call(
    shared: Arc<Shared>,
    task: Task,
    options: warren_client::CallOptions,
    events: mpsc::Sender<Event>,
    permit: OwnedSemaphorePermit,
    mut held: Held,
) {
    let Task { id, function, args } = task;
    let (published_tx, mut published) = oneshot::channel();
    let mut call = shared
        .client
        .call_raw_with_progress(&function, args, &options, published_tx);
    let enqueued = |task_id: &warren_shared::TaskId| Event {
        text: enqueued_event(&id, task_id),
        held: None,
        about: About::Enqueued {
            task_id: task_id.as_str().to_owned(),
            id: id.clone(),
        },
    };
    // "enqueued" first, then the task's progress, then its answer.
    let mut acknowledged = false;
    let mut enqueued_as = None;
    loop {
        tokio::select! {
            biased;
            confirmed = &mut published, if !acknowledged => {
                acknowledged = true;
                if let Ok(task_id) = confirmed {
                    let _ = events.send(enqueued(&task_id)).await;
                    enqueued_as = Some(task_id);
                }
            }
            update = call.progress() => {
                let Some(update) = update else { break };
                // Lossy: a client that is behind (or out of room) gets fewer updates, never a
                // later answer.
                let text = progress_event(&id, &update);
                if let Some(bytes) = held.try_more(text.len()) {
                    let _ = events.try_send(Event { text, held: Some(bytes), about: About::Nothing });
                }
            }
        }
    }
    // The confirm and the reply came in one poll: acknowledge first all the same.
    if !acknowledged && let Ok(task_id) = published.try_recv() {
        let _ = events.send(enqueued(&task_id)).await;
        enqueued_as = Some(task_id);
    }
    let result = call.await;
    crate::metrics::task_finished(
        crate::metrics::function_label(&shared.limits().allow, &function),
        &result,
    );
    let text = match result {
        Ok(result) => result_event(&id, &result),
        Err(e) => error_event(&id, &GatewayError::from(e)),
    };
    held.add(text.len());
    let about = enqueued_as.map_or(About::Nothing, |task_id| About::Settled {
        task_id: task_id.as_str().to_owned(),
    });
    let _ = events
        .send(Event {
            text,
            held: Some(held),
            about,
        })
        .await;
    drop(permit);
}

/// Sends `message`; false when the socket is broken or the client has not taken it within
/// `limit` (it stopped reading: the connection is then closed, as on the Text port).
async fn send(socket: &mut WebSocket, message: Message, limit: Duration) -> bool {
    match tokio::time::timeout(limit, socket.send(message)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::debug!(after = ?limit, "ws: client stopped reading; closing");
            false
        }
    }
}

/// Sends `messages` in order; false as soon as one cannot be sent (see [`send`]).
async fn send_all(socket: &mut WebSocket, messages: Vec<String>, limit: Duration) -> bool {
    for message in messages {
        if !send(socket, Message::text(message), limit).await {
            return false;
        }
    }
    true
}

/// `{"id": ..., "ok": true, "result": ...}`, the result written as the worker wrote it.
fn result_event(id: &RawValue, result: &RawJson) -> String {
    #[derive(serde::Serialize)]
    struct ResultEvent<'a> {
        id: &'a RawValue,
        ok: bool,
        result: &'a RawJson,
    }
    // Two pieces of JSON text and a bool always serialize.
    serde_json::to_string(&ResultEvent {
        id,
        ok: true,
        result,
    })
    .unwrap_or_default()
}

/// `{"id": ..., "progress": {"attempt": ..., "fraction": ..., "message": ..., "detail": ...}}`,
/// the id as the client wrote it.
fn progress_event(id: &RawValue, update: &warren_client::CallerProgress) -> String {
    #[derive(serde::Serialize)]
    struct ProgressEvent<'a> {
        id: &'a RawValue,
        progress: &'a warren_client::CallerProgress,
    }
    // JSON text and a progress update always serialize.
    serde_json::to_string(&ProgressEvent {
        id,
        progress: update,
    })
    .unwrap_or_default()
}

/// `{"id": ..., "status": "enqueued", "task_id": ...}`, the id as the client wrote it.
fn enqueued_event(id: &RawValue, task_id: &warren_shared::TaskId) -> String {
    #[derive(serde::Serialize)]
    struct EnqueuedEvent<'a> {
        id: &'a RawValue,
        status: &'static str,
        task_id: &'a warren_shared::TaskId,
    }
    // JSON text, a string and an id always serialize.
    serde_json::to_string(&EnqueuedEvent {
        id,
        status: "enqueued",
        task_id,
    })
    .unwrap_or_default()
}

/// `{"id": ..., "ok": false, "error": {...}}`, the id as the client wrote it.
fn error_event(id: &RawValue, error: &GatewayError) -> String {
    #[derive(serde::Serialize)]
    struct ErrorEvent<'a> {
        id: &'a RawValue,
        ok: bool,
        error: &'a GatewayError,
    }
    // JSON text, a bool and a typed error always serialize.
    serde_json::to_string(&ErrorEvent {
        id,
        ok: false,
        error,
    })
    .unwrap_or_default()
}

/// The JSON `null`: the id of an answer to a message whose id is unknown.
const NULL: &RawValue = RawValue::NULL;

/// `{"queue": {"name": ..., "ready": ..., "consumers": ...}}`, once the depth is known.
fn queue_event(snapshot: &Option<super::QueueSnapshot>) -> Option<String> {
    snapshot.as_ref().map(|s| json!({ "queue": s }).to_string())
}

fn close(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }
}

/// The close frame for a read error: 1009 for an oversized message, none otherwise (the
/// socket is broken, so there is no one to tell).
fn read_error_close(error: axum::Error, limit: usize) -> Option<CloseFrame> {
    let too_large = matches!(
        error.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    );
    if too_large {
        crate::metrics::rejected(Kind::TooLarge);
        tracing::debug!(limit, "ws: message over the size limit; closing");
        Some(CloseFrame {
            code: close_code::SIZE,
            reason: Utf8Bytes::from(format!("too_large: message larger than {limit} bytes")),
        })
    } else {
        None
    }
}
