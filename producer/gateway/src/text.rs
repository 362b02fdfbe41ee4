//! The Workerman Text protocol bridge: a drop-in replacement for a Workerman task worker.
//!
//! A Workerman application hands heavy work to task processes with
//! `new AsyncTcpConnection('Text://host:12345')` and
//! `send(json_encode(['function' => ..., 'args' => ...]))`: one JSON document per line. The
//! bridge speaks exactly that, and answers each request with one line, as a task worker would:
//! the task's JSON result on success, `{"error": {"kind": "...", "message": "..."}}` otherwise.
//!
//! Requests pipelined on one connection run concurrently, but their answers are written in
//! request order (a [`FuturesOrdered`] bounded by the in-flight limit), because a Text client
//! has nothing but the order to match answers to requests.
//!
//! Two checks come before a line runs. A line that starts with a letter (no request does;
//! every HTTP request and header line does) is answered `bad_request` once and closes the
//! connection: a web page can make a browser send a POST to this port, and its body must never
//! run as a task. With a token configured, a connection must present it within the
//! authentication deadline; until then only the `{"auth"}` line counts as activity, blank lines
//! are ignored, and anything else is answered `unauthorized` and closed.

use std::io;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::bytes::{Bytes, BytesMut};
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, Decoder, FramedRead};
use warren_shared::{RawJson, Request};

use super::Shared;
use super::admission::{self, Admitted};
use super::budget::{Budget, Held};
use super::limits::{GatewayError, Kind};

/// Accepts Text connections until shutdown; one over the connection limits gets a
/// `too_many_connections` error line and is closed.
pub(super) async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    super::accept_failed(&e).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let admitted = match shared.gate.admit(peer) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                tracing::debug!(%peer, error = %refusal, "text: connection refused");
                let line = admission::text_refusal(&refusal);
                shared.connections.spawn(admission::refuse(stream, line));
                continue;
            }
        };
        shared
            .connections
            .spawn(Connection::new(shared.clone(), admitted).run(stream));
    }
}

/// One decoded unit of the Text protocol.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n` (and without a trailing `\r`).
    Line(Bytes),
    /// A line longer than the limit; its bytes were discarded up to the next `\n`.
    TooLong,
}

/// Splits a byte stream into lines of at most `max` bytes.
///
/// An overlong line becomes [`Frame::TooLong`] and the stream goes on with the next line, so
/// the client gets a `too_large` answer in order instead of a dropped connection; its bytes are
/// discarded as they arrive, never buffered. An unterminated line at end of stream is an
/// incomplete request and is dropped, as Workerman drops an incomplete package.
#[derive(Debug)]
pub struct TextCodec {
    lines: AnyDelimiterCodec,
    max: usize,
}

impl TextCodec {
    /// A codec for lines of at most `max` bytes (the `\n` and a `\r` before it not counted).
    pub fn new(max: usize) -> Self {
        Self {
            // One byte more for the `\r` of a `\r\n`, checked once it is gone.
            lines: AnyDelimiterCodec::new_with_max_length(
                b"\n".to_vec(),
                Vec::new(),
                max.saturating_add(1),
            ),
            max,
        }
    }
}

impl Decoder for TextCodec {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, io::Error> {
        match self.lines.decode(buf) {
            Ok(Some(mut line)) => {
                if line.last() == Some(&b'\r') {
                    line.truncate(line.len() - 1);
                }
                if line.len() > self.max {
                    return Ok(Some(Frame::TooLong));
                }
                Ok(Some(Frame::Line(line)))
            }
            Ok(None) => Ok(None),
            Err(AnyDelimiterCodecError::MaxChunkLengthExceeded) => Ok(Some(Frame::TooLong)),
            Err(AnyDelimiterCodecError::Io(e)) => Err(e),
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, io::Error> {
        let frame = self.decode(buf)?;
        if frame.is_none() && !buf.is_empty() {
            tracing::debug!(
                bytes = buf.len(),
                "text: dropping an unterminated line at end of stream"
            );
            buf.clear();
        }
        Ok(frame)
    }
}

/// One answer line and, when it ends a call (rather than being an immediate refusal), the
/// bytes the call holds until the line is written.
struct Answer {
    line: String,
    call: Option<Held>,
}
type PendingAnswer = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// One bridge connection.
struct Connection {
    shared: Arc<Shared>,
    authed: bool,
    /// Answers not yet written, in request order.
    answers: FuturesOrdered<PendingAnswer>,
    /// How many of `answers` are calls (the in-flight count the limit applies to).
    calls: usize,
    /// Bytes this connection's calls hold.
    budget: Arc<Budget>,
    /// When the last complete line was read or answer written, once authenticated.
    last_activity: Instant,
    /// This connection's place among the gateway's open connections.
    admitted: Admitted,
}

impl Connection {
    fn new(shared: Arc<Shared>, admitted: Admitted) -> Self {
        Self {
            authed: shared.limits().token.is_none(),
            answers: FuturesOrdered::new(),
            calls: 0,
            budget: Budget::new(shared.limits().max_in_flight_bytes),
            shared,
            last_activity: Instant::now(),
            admitted,
        }
    }

    async fn run(mut self, stream: TcpStream) {
        let _open = crate::metrics::connection_opened("text");
        let limits = self.shared.limits().clone();
        let (read, mut write) = stream.into_split();
        let mut lines = FramedRead::new(read, TextCodec::new(limits.max_message_bytes));
        // Refusals (`busy`) queue up behind calls; past this many unanswered requests the
        // bridge stops reading and TCP pushes back, so memory stays bounded.
        let backlog = limits.max_in_flight.saturating_mul(2).max(16);
        let shutdown = self.shared.shutdown.clone();
        let mut reading = true;
        let mut drain_until: Option<Instant> = None;
        // Fixed when the connection opens: only the token itself ends the wait for it.
        let auth_deadline = Instant::now() + self.shared.settings.auth_timeout;
        loop {
            if !reading && self.answers.is_empty() {
                break;
            }
            let idle_at = self.last_activity + limits.idle_timeout;
            tokio::select! {
                biased;
                Some(Answer { line, call }) = self.answers.next(), if !self.answers.is_empty() => {
                    if call.is_some() {
                        self.calls -= 1;
                    }
                    let written =
                        tokio::time::timeout(limits.idle_timeout, write.write_all(line.as_bytes()))
                            .await;
                    // Written (or never to be): the call's bytes are free.
                    drop(call);
                    if !matches!(written, Ok(Ok(()))) {
                        tracing::debug!("text: client stopped reading; closing");
                        return;
                    }
                    self.last_activity = Instant::now();
                }
                frame = lines.next(), if reading && self.answers.len() < backlog => match frame {
                    Some(Ok(frame)) => {
                        if !self.on_frame(frame, &mut write).await {
                            return;
                        }
                        // Before the token, nothing a client sends keeps it here.
                        if self.authed {
                            self.last_activity = Instant::now();
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "text: read failed");
                        return;
                    }
                    // End of the client's stream: answer what it asked, then close.
                    None => reading = false,
                },
                () = shutdown.cancelled(), if drain_until.is_none() => {
                    reading = false;
                    drain_until = Some(Instant::now() + self.shared.settings.shutdown_grace);
                }
                () = super::sleep_until_some(drain_until), if drain_until.is_some() => break,
                () = tokio::time::sleep_until(idle_at), if reading && self.answers.is_empty() => {
                    tracing::debug!(after = ?limits.idle_timeout, "text: idle connection closed");
                    break;
                }
                () = tokio::time::sleep_until(auth_deadline), if !self.authed => {
                    tracing::debug!(
                        after = ?self.shared.settings.auth_timeout,
                        "text: no token in time; closing"
                    );
                    write_unauthorized(&mut write, limits.idle_timeout).await;
                    break;
                }
            }
        }
        let _ = write.shutdown().await;
    }

    /// Handles one frame; returns false when the connection must close.
    async fn on_frame(&mut self, frame: Frame, write: &mut (impl AsyncWriteExt + Unpin)) -> bool {
        let limits = self.shared.limits();
        let line = match frame {
            Frame::TooLong if !self.authed => {
                write_unauthorized(write, limits.idle_timeout).await;
                return false;
            }
            Frame::TooLong => {
                let limit = limits.max_message_bytes;
                self.refuse(&GatewayError::too_large(limit));
                return true;
            }
            Frame::Line(line) => line,
        };
        if looks_like_http(&line) {
            tracing::debug!("text: an HTTP request on the Text port; closing");
            crate::metrics::rejected(Kind::BadRequest);
            let error = GatewayError::new(
                Kind::BadRequest,
                "this is the Workerman Text protocol port (one JSON request per line), not HTTP",
            );
            let _ = tokio::time::timeout(
                limits.idle_timeout,
                write.write_all(error_line(&error).as_bytes()),
            )
            .await;
            return false;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return true; // a blank line is not a request (nor an answerable one)
        }
        if let Some(token) = auth_line(&line) {
            if limits.token_matches(&token) {
                self.authed = true;
                if limits.token.is_some() {
                    self.admitted.authenticated();
                }
                return true;
            }
            write_unauthorized(write, limits.idle_timeout).await;
            return false;
        }
        if !self.authed {
            write_unauthorized(write, limits.idle_timeout).await;
            return false;
        }
        // The line's bytes are held from here until its answer is written; one that does not
        // fit is not even parsed.
        let mut held = match Held::take(&self.budget, &self.shared.budget, line.len()) {
            Ok(held) => held,
            Err(spent) => {
                self.refuse(&GatewayError::busy_bytes(spent));
                return true;
            }
        };
        // The arguments stay JSON text, passed on as they are.
        let request = match Request::decode_raw(&line) {
            Ok(request) => request,
            Err(failure) => {
                self.refuse(&GatewayError::new(Kind::BadRequest, failure.message));
                return true;
            }
        };
        // Its timing fields, read before the line goes.
        let due = crate::due::Due::of_line(&line);
        drop(line);
        if let Err(forbidden) = limits.check_function(&request.function) {
            self.refuse(&forbidden);
            return true;
        }
        let options = match due.and_then(|due| self.shared.options_due(&due)) {
            Ok(options) => options,
            Err(bad) => {
                self.refuse(&bad);
                return true;
            }
        };
        if self.calls >= limits.max_in_flight {
            self.refuse(&GatewayError::busy(limits.max_in_flight));
            return true;
        }
        let client = self.shared.client.clone();
        let label = crate::metrics::function_label(&limits.allow, &request.function);
        self.calls += 1;
        self.answers.push_back(Box::pin(async move {
            let result = client
                .call_raw_with(&request.function, request.args, &options)
                .await;
            crate::metrics::task_finished(label, &result);
            let line = match result {
                Ok(result) => result_line(&result),
                Err(e) => error_line(&GatewayError::from(e)),
            };
            held.add(line.len());
            Answer {
                line,
                call: Some(held),
            }
        }));
        true
    }

    /// Queues an immediate error answer behind the answers already pending.
    fn refuse(&mut self, error: &GatewayError) {
        let line = error_line(error);
        self.answers
            .push_back(Box::pin(std::future::ready(Answer { line, call: None })));
    }
}

/// Writes `unauthorized` before closing, bounded like every write.
async fn write_unauthorized(write: &mut (impl AsyncWriteExt + Unpin), limit: std::time::Duration) {
    let line = error_line(&GatewayError::unauthorized());
    let _ = tokio::time::timeout(limit, write.write_all(line.as_bytes())).await;
}

/// Whether `line` cannot be a Text request but can be HTTP: its first non-blank byte is a
/// letter. A request is a JSON object (`{`), and no JSON document the bridge answers starts
/// with a letter, while every HTTP request line (`POST / HTTP/1.1`, `get /`, `M-SEARCH * ...`,
/// HTTP/0.9's `GET /`) and header line (`Host: ...`) does: what a browser sends when a web
/// page points `fetch()` or a form at this port.
fn looks_like_http(line: &[u8]) -> bool {
    line.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(u8::is_ascii_alphabetic)
}

/// The token of an `{"auth": "<token>"}` line.
fn auth_line(line: &[u8]) -> Option<String> {
    // Cheap pre-check so that ordinary requests are parsed once only.
    if !line.windows(6).any(|w| w == b"\"auth\"") {
        return None;
    }
    match serde_json::from_slice::<Value>(line).ok()? {
        Value::Object(mut o) if !o.contains_key("function") => match o.remove("auth")? {
            Value::String(token) => Some(token),
            _ => Some(String::new()),
        },
        _ => None,
    }
}

/// A success answer: the bare JSON result, as a Workerman task worker sends it, as the worker
/// wrote it. A line break in JSON text can only be whitespace between tokens (one in a string
/// is escaped), so any is dropped: the answer stays one line.
fn result_line(result: &RawJson) -> String {
    let text = result.get();
    let mut line = String::with_capacity(text.len() + 1);
    if text.contains(['\n', '\r']) {
        line.extend(text.chars().filter(|c| !matches!(c, '\n' | '\r')));
    } else {
        line.push_str(text);
    }
    line.push('\n');
    line
}

/// A failure answer: `{"error": {"kind": "...", "message": "..."}}`.
fn error_line(error: &GatewayError) -> String {
    let mut line = json!({ "error": error }).to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(codec: &mut TextCodec, input: &[u8], eof: bool) -> Vec<Frame> {
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).expect("test value") {
            out.push(frame);
        }
        if eof {
            while let Some(frame) = codec.decode_eof(&mut buf).expect("test value") {
                out.push(frame);
            }
        }
        out
    }

    #[test]
    fn lines_are_split_and_crlf_trimmed() {
        let mut codec = TextCodec::new(64);
        assert_eq!(
            frames(&mut codec, b"{\"a\":1}\r\n{\"b\":2}\n", false),
            [
                Frame::Line(Bytes::from_static(b"{\"a\":1}")),
                Frame::Line(Bytes::from_static(b"{\"b\":2}"))
            ]
        );
    }

    #[test]
    fn an_overlong_line_is_reported_once_and_the_next_line_survives() {
        let mut codec = TextCodec::new(8);
        let mut input = vec![b'x'; 100];
        input.extend_from_slice(b"\nshort\n");
        assert_eq!(
            frames(&mut codec, &input, false),
            [Frame::TooLong, Frame::Line(Bytes::from_static(b"short"))]
        );
    }

    #[test]
    fn the_limit_counts_neither_the_newline_nor_a_carriage_return_before_it() {
        let mut codec = TextCodec::new(8);
        assert_eq!(
            frames(
                &mut codec,
                b"12345678\r\n12345678\n123456789\n123456789\r\nok\n",
                false
            ),
            [
                Frame::Line(Bytes::from_static(b"12345678")),
                Frame::Line(Bytes::from_static(b"12345678")),
                Frame::TooLong,
                Frame::TooLong,
                Frame::Line(Bytes::from_static(b"ok")),
            ]
        );
    }

    #[test]
    fn an_unterminated_line_at_eof_is_dropped() {
        let mut codec = TextCodec::new(64);
        assert_eq!(
            frames(&mut codec, b"{\"function\":\"echo\"", true),
            Vec::<Frame>::new()
        );
    }

    #[test]
    fn http_request_lines_and_host_headers_are_recognised() {
        for http in [
            &b"POST / HTTP/1.1"[..],
            b"GET /index.html?x=1 HTTP/1.0",
            b"OPTIONS * HTTP/1.1",
            b"PRI * HTTP/2.0",
            b"Host: 127.0.0.1:12345",
            b"host:x",
            b"post / HTTP/1.1",
            b"M-SEARCH * HTTP/1.1",
            b"GET /",
            b"POST / HTTP/1.1 extra",
            b"POST  HTTP/1.1",
            b"hostname",
            b"  \tGET / HTTP/1.1",
        ] {
            assert!(looks_like_http(http), "{}", String::from_utf8_lossy(http));
        }
        for not_http in [
            &br#"{"function":"echo","args":"POST / HTTP/1.1"}"#[..],
            br#"  {"auth":"t"}"#,
            b"",
            b"  ",
            b"[1,2]",
            b"{not json",
            b"\xff\xfe",
            b"42",
        ] {
            assert!(
                !looks_like_http(not_http),
                "{}",
                String::from_utf8_lossy(not_http)
            );
        }
    }

    #[test]
    fn auth_lines_are_recognised() {
        assert_eq!(auth_line(br#"{"auth":"t"}"#), Some("t".to_owned()));
        assert_eq!(auth_line(br#"{"auth":5}"#), Some(String::new()));
        assert_eq!(
            auth_line(br#"{"function":"echo","args":{"auth":"t"}}"#),
            None
        );
        assert_eq!(auth_line(br#"{"function":"echo"}"#), None);
    }

    #[test]
    fn answers_are_single_lines() {
        let raw = |text: &str| RawJson::from_string(text.to_owned()).expect("test value");
        assert_eq!(result_line(&raw(r#""a\nb""#)), "\"a\\nb\"\n");
        assert_eq!(
            result_line(&raw("{\r\n  \"a\": [1,\n 2]\n}")),
            "{  \"a\": [1, 2]}\n",
            "a pretty-printed result from another worker is still one line"
        );
        assert_eq!(
            error_line(&GatewayError::new(Kind::Busy, "m")),
            "{\"error\":{\"kind\":\"busy\",\"message\":\"m\"}}\n"
        );
    }
}
