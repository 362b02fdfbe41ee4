//! The websocket endpoint (`GET /ws`): many tasks in flight per connection, results pushed in
//! completion order, each tagged with the client's own id.
//!
//! A client sends `{"id": ..., "function": ..., "args": ...}` (or a JSON array of them, a
//! batch). For each task it gets `{"id": ..., "status": "enqueued", "task_id": ...}` once the
//! broker holds the task, then `{"id": ..., "ok": true, "result": ...}` or
//! `{"id": ..., "ok": false, "error": {"kind": ..., "message": ...}}`. `docs/gateway.md` has
//! the whole protocol, including `{"auth": ...}` and `{"watch": "queue"}`.
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
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::admission::Admitted;
use super::browser;
use super::limits::{GatewayError, Kind};
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

/// One task as a websocket client sends it.
#[derive(Debug, Deserialize)]
struct TaskMessage {
    function: String,
    #[serde(default)]
    args: Value,
    /// `run_at` / `delay_ms`: when the task is due.
    #[serde(flatten)]
    due: crate::due::Due,
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
    /// Events from the calls (acknowledgements and results), to be written to the socket.
    events: mpsc::Sender<String>,
    inbox: mpsc::Receiver<String>,
    /// Set when the connection must close once the current replies are written.
    closing: Option<CloseFrame>,
    /// This connection's place among the gateway's open connections.
    admitted: Arc<Admitted>,
}

impl Connection {
    fn new(shared: Arc<Shared>, authed: bool, admitted: Arc<Admitted>) -> Self {
        let limits = shared.limits();
        let (events, inbox) = mpsc::channel(limits.max_in_flight.clamp(16, 1024));
        let permits = Arc::new(Semaphore::new(limits.max_in_flight));
        Self {
            shared,
            authed,
            watching: false,
            calls: JoinSet::new(),
            permits,
            events,
            inbox,
            closing: None,
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
                    if !send(&mut socket, Message::text(event), write_timeout).await {
                        break None;
                    }
                    last_activity = Instant::now();
                }
                received = socket.recv(), if drain_until.is_none() => match received {
                    Some(Ok(Message::Text(text))) => {
                        last_activity = Instant::now();
                        for reply in self.on_text(&text) {
                            if !send(&mut socket, Message::text(reply), write_timeout).await {
                                return;
                            }
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
        // Aborting the calls still running drops their futures, which removes them from the
        // client's pending map: a client that leaves leaks nothing.
        self.calls.abort_all();
    }

    /// Handles one text message; returns the immediate replies (errors, auth), in order.
    fn on_text(&mut self, text: &str) -> Vec<String> {
        let message = serde_json::from_str::<Value>(text);
        if let Ok(message) = &message
            && let Some(token) = message.get("auth")
        {
            return self.on_auth(token);
        }
        // Before the token, anything else is refused alike, JSON or not (docs/gateway.md).
        if !self.authed {
            return vec![self.unauthorized()];
        }
        let message = match message {
            Ok(message) => message,
            Err(e) => {
                let error = GatewayError::new(Kind::BadRequest, format!("not valid JSON: {e}"));
                return vec![error_event(&Value::Null, &error)];
            }
        };
        if message.get("watch").and_then(Value::as_str) == Some("queue") {
            self.watching = true;
            return queue_event(&self.shared.queue.borrow())
                .into_iter()
                .collect();
        }
        match message {
            Value::Array(batch) => batch
                .into_iter()
                .filter_map(|task| self.submit(task))
                .collect(),
            task @ Value::Object(_) => self.submit(task).into_iter().collect(),
            _ => {
                let error = GatewayError::new(
                    Kind::BadRequest,
                    "expected {\"id\": ..., \"function\": ..., \"args\": ...} or an array of them",
                );
                vec![error_event(&Value::Null, &error)]
            }
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
        error_event(&Value::Null, &error)
    }

    /// The `unauthorized` answer; the socket closes with `1008` after it.
    fn unauthorized(&mut self) -> String {
        self.closing = Some(close(close_code::POLICY, "unauthorized"));
        error_event(&Value::Null, &GatewayError::unauthorized())
    }

    fn on_auth(&mut self, token: &Value) -> Vec<String> {
        // A value that is not a string is an empty token, as on the Text bridge: ok without a
        // token configured (`false` is PHP's `json_encode` of an unset variable), wrong with one
        // (a configured token is never empty).
        if !self
            .shared
            .limits()
            .token_matches(token.as_str().unwrap_or_default())
        {
            return vec![self.unauthorized()];
        }
        self.authed = true;
        if self.shared.limits().token.is_some() {
            self.admitted.authenticated();
        }
        vec![json!({"auth": "ok"}).to_string()]
    }

    /// Starts one task, or returns the error to answer at once.
    fn submit(&mut self, task: Value) -> Option<String> {
        let id = task.get("id").cloned().unwrap_or(Value::Null);
        let refuse = |error: GatewayError| Some(error_event(&id, &error));
        if !task.is_object() {
            // serde would read a struct from an array of its fields in order, too.
            return refuse(GatewayError::new(
                Kind::BadRequest,
                "expected {\"id\": ..., \"function\": ..., \"args\": ...}",
            ));
        }
        let task: TaskMessage = match serde_json::from_value::<TaskMessage>(task) {
            Ok(task) if !task.function.is_empty() => task,
            Ok(_) => return refuse(GatewayError::new(Kind::BadRequest, "\"function\" is empty")),
            Err(e) => {
                return refuse(GatewayError::new(
                    Kind::BadRequest,
                    format!("not a task {{\"id\", \"function\", \"args\"}}: {e}"),
                ));
            }
        };
        if let Err(forbidden) = self.shared.limits().check_function(&task.function) {
            return refuse(forbidden);
        }
        let options = match self.shared.options_due(&task.due) {
            Ok(options) => options,
            Err(bad) => return refuse(bad),
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return refuse(GatewayError::busy(self.shared.limits().max_in_flight));
        };
        self.calls.spawn(call(
            self.shared.clone(),
            id,
            task,
            options,
            self.events.clone(),
            permit,
        ));
        // Reap finished calls so the set does not grow with the connection's lifetime.
        while self.calls.try_join_next().is_some() {}
        None
    }
}

/// Runs one call: "enqueued" once the broker confirms, then the result or the error.
async fn call(
    shared: Arc<Shared>,
    id: Value,
    task: TaskMessage,
    options: warren_client::CallOptions,
    events: mpsc::Sender<String>,
    permit: OwnedSemaphorePermit,
) {
    let (published_tx, mut published) = oneshot::channel();
    let call = shared
        .client
        .call_json_with_ack(&task.function, task.args, &options, published_tx);
    tokio::pin!(call);
    let enqueued = |task_id: warren_shared::TaskId| {
        json!({"id": id, "status": "enqueued", "task_id": task_id}).to_string()
    };
    let result = tokio::select! {
        biased;
        Ok(task_id) = &mut published => {
            let _ = events.send(enqueued(task_id)).await;
            call.await
        }
        result = &mut call => {
            // The confirm and the reply came in one poll: acknowledge first all the same.
            if let Ok(task_id) = published.try_recv() {
                let _ = events.send(enqueued(task_id)).await;
            }
            result
        }
    };
    crate::metrics::task_finished(
        crate::metrics::function_label(&shared.limits().allow, &task.function),
        &result,
    );
    let event = match result {
        Ok(result) => json!({"id": id, "ok": true, "result": result}).to_string(),
        Err(e) => error_event(&id, &GatewayError::from(e)),
    };
    let _ = events.send(event).await;
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

/// `{"id": ..., "ok": false, "error": {...}}`.
fn error_event(id: &Value, error: &GatewayError) -> String {
    json!({"id": id, "ok": false, "error": error}).to_string()
}

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
