//! Wire protocol v1: what travels between callers and workers.
//!
//! A task is an AMQP message whose body is `{"function": "...", "args": ...}` (the shape a
//! Workerman task client sends) and whose properties and headers carry the task id, the reply
//! address, the attempt and the deadline. A reply is `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": {"kind": "...", "message": "..."}}`. `docs/protocol.md` is the
//! normative description; this module implements the bodies and error kinds, and
//! [`crate::envelope`] the properties and headers. Their unit tests pin the encodings down.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

/// The protocol version this build speaks, sent in [`headers::PROTOCOL`].
pub const PROTOCOL_VERSION: i64 = 1;

// The envelope (properties and headers) lives in `envelope`; these names stay reachable here.
pub use crate::envelope::{
    CONTENT_TYPE, DIRECT_REPLY_TO, REPLY_TYPE, epoch_millis, from_epoch_millis, header_int,
    header_str, headers, set_header_int, set_header_str,
};

/// A task's id: the AMQP `message_id` (and, for calls, the `correlation_id`).
///
/// Warren generates UUIDv7 ids, which carry the time they were made: a lookup of a task's
/// events reads the event stream from there ([`TaskId::created_at`]). Tasks published by
/// other clients may carry any string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// A fresh id: a UUIDv7 (time-ordered, 74 random bits).
    pub fn new() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// When the id was made, if it is a UUIDv7 (millisecond precision).
    pub fn created_at(&self) -> Option<std::time::SystemTime> {
        let uuid = Uuid::parse_str(&self.0).ok()?;
        if uuid.get_version_num() != 7 {
            return None;
        }
        let (secs, nanos) = uuid.get_timestamp()?.to_unix();
        Some(std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

/// JSON text kept as text: checked to be one JSON value, never expanded into a tree.
///
/// A parsed [`Value`] of number-heavy JSON costs up to 40 times its text; what only passes
/// JSON through (the gateway's arguments, a worker's results) keeps it as this instead, and
/// writes it out unchanged.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RawJson(Box<RawValue>);

impl RawJson {
    /// `null`.
    pub fn null() -> Self {
        Self(RawValue::NULL.to_owned())
    }

    /// Checks that `text` is one JSON value and keeps it.
    ///
    /// # Errors
    /// A [`serde_json::Error`] when `text` is not JSON.
    pub fn from_string(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(Self)
    }

    /// Serializes `value` straight to text (no intermediate tree).
    ///
    /// # Errors
    /// A [`serde_json::Error`] when `value` does not serialize to JSON (a map with non-string
    /// keys, say).
    pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Self)
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parses the text into `T` (a [`Value`], or a typed result).
    ///
    /// # Errors
    /// A [`serde_json::Error`] when the JSON does not fit `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.get())
    }
}

impl From<Box<RawValue>> for RawJson {
    fn from(raw: Box<RawValue>) -> Self {
        Self(raw)
    }
}

impl From<&RawValue> for RawJson {
    fn from(raw: &RawValue) -> Self {
        Self(raw.to_owned())
    }
}

impl Default for RawJson {
    fn default() -> Self {
        Self::null()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// The JSON that requests and replies carry: a parsed [`Value`] or raw text ([`RawJson`]).
/// Sealed: both always serialize.
pub trait Json: Serialize + serde::de::DeserializeOwned + Default + sealed::Sealed {}

impl Json for Value {}
impl Json for RawJson {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for serde_json::Value {}
    impl Sealed for super::RawJson {}
}

/// A request body: which function to run, with which arguments.
///
/// `Request` (the default) parses the arguments; `Request<RawJson>` only checks them, for code
/// that passes them on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request<A = Value> {
    /// The registered function name, e.g. `send_mail`.
    pub function: String,
    /// The function's arguments; any JSON value. Missing means `null`.
    #[serde(default)]
    pub args: A,
}

impl<A: Json> Request<A> {
    /// Serializes the request body.
    pub fn encode(&self) -> Vec<u8> {
        // A String and a `Json` always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Request {
    /// Parses a request body, saying precisely what is wrong with one that does not parse.
    ///
    /// # Errors
    /// [`ErrorKind::BadRequest`] when the body is not JSON, not an object, or has no string
    /// `function`.
    pub fn decode(body: &[u8]) -> Result<Self, TaskFailure> {
        decode_request(body)
    }
}

impl Request<RawJson> {
    /// [`Request::decode`], keeping the arguments as text: they are checked to be JSON, not
    /// parsed into a tree.
    ///
    /// # Errors
    /// As [`Request::decode`].
    pub fn decode_raw(body: &[u8]) -> Result<Self, TaskFailure> {
        decode_request(body)
    }
}

/// Parses a request body; only the arguments are kept as `A`, the rest is read without a tree.
fn decode_request<A: Json>(body: &[u8]) -> Result<Request<A>, TaskFailure> {
    let bad = |message: String| TaskFailure::new(ErrorKind::BadRequest, message);
    // Checked as a parse into a tree would check it (nesting depth included), without the tree.
    let not_json = |e: serde_json::Error| bad(format!("body is not valid JSON: {e}"));
    check_json(body).map_err(not_json)?;
    let body: &RawValue = serde_json::from_slice(body).map_err(not_json)?;
    let kind = raw_json_type(body);
    if kind != "an object" {
        return Err(bad(format!(
            "body must be a JSON object {{\"function\": ..., \"args\": ...}}, got {kind}"
        )));
    }
    let fields: Fields<'_> =
        serde_json::from_str(body.get()).map_err(|e| bad(format!("body is not a request: {e}")))?;
    let function = match fields.function {
        None => return Err(bad("body has no \"function\" field".to_owned())),
        Some(raw) if raw_json_type(raw) != "a string" => {
            return Err(bad(format!(
                "\"function\" must be a string, got {}",
                raw_json_type(raw)
            )));
        }
        Some(raw) => serde_json::from_str::<String>(raw.get())
            .map_err(|e| bad(format!("\"function\" is not a string: {e}")))?,
    };
    if function.is_empty() {
        return Err(bad("\"function\" is empty".to_owned()));
    }
    let args = match fields.args {
        None => A::default(),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|e| bad(format!("\"args\" do not parse: {e}")))?,
    };
    Ok(Request { function, args })
}

/// The fields a request is read for, as text; anything else is skipped. A repeated field
/// keeps its last value, as a parse into a [`Value`] does.
#[derive(Default)]
struct Fields<'a> {
    function: Option<&'a RawValue>,
    args: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Fields<'de>, M::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "function" => fields.function = Some(map.next_value()?),
                        "args" => fields.args = Some(map.next_value()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// Checks that `text` is one JSON value as a parse into a [`Value`] would (numbers in range,
/// strings valid, nesting depth limited), without building the tree.
///
/// Reading JSON as a [`RawValue`] only skips over it: `1e400` or a lone `"\ud800"` pass, and
/// fail later where the text is parsed or re-serialized. Run this first on text taken from
/// outside and kept as text.
///
/// # Errors
/// The [`serde_json::Error`] the parse into a [`Value`] would give.
pub fn check_json(text: &[u8]) -> Result<(), serde_json::Error> {
    serde_json::from_slice::<Checked>(text).map(|Checked| ())
}

/// Any JSON value, read as a parse into a [`Value`] reads it (strings decoded, nesting depth
/// limited) and dropped as it goes: no tree is built.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Checked;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_unit<E>(self) -> Result<Checked, E> {
                Ok(Checked)
            }
            fn visit_seq<S: serde::de::SeqAccess<'de>>(
                self,
                mut seq: S,
            ) -> Result<Checked, S::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<Checked, M::Error> {
                while map.next_key::<Checked>()?.is_some() {
                    map.next_value::<Checked>()?;
                }
                Ok(Checked)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// What JSON type `raw` holds (`"an object"`, `"a number"`...), from its first byte.
fn raw_json_type(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Machine-readable reason of a failed task, the `kind` of an error reply.
///
/// New kinds may be added in later protocol versions; an older client reads them as
/// [`ErrorKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The body is not a JSON object with a string `function`.
    BadRequest,
    /// No handler is registered for the function on the worker that received it.
    UnknownFunction,
    /// The arguments do not match what the function takes (or fail its own validation).
    InvalidArgs,
    /// The handler ran and returned an error.
    HandlerFailed,
    /// The handler panicked; the worker caught it and goes on serving.
    Panicked,
    /// The handler ran past its execution time limit.
    Timeout,
    /// The process running the task (a handler pool's child) exited, was killed or broke the
    /// runner protocol while it held the task; retried like any transient failure.
    Crashed,
    /// The task's deadline had passed before a worker could start it.
    Expired,
    /// The body is larger than the worker accepts.
    TooLarge,
    /// The `x-warren-protocol` header names a version this worker does not speak.
    UnsupportedVersion,
    /// The broker refused the task's outcome for its content (a result larger than its
    /// `max_message_size`, say); the task is parked with reason `refused`.
    Refused,
    /// A kind this build does not know (sent by a newer worker).
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The wire name, e.g. `unknown_function`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownFunction => "unknown_function",
            Self::InvalidArgs => "invalid_args",
            Self::HandlerFailed => "handler_failed",
            Self::Panicked => "panicked",
            Self::Timeout => "timeout",
            Self::Crashed => "crashed",
            Self::Expired => "expired",
            Self::TooLarge => "too_large",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Refused => "refused",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed task as reported by a worker: a kind and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct TaskFailure {
    /// What went wrong, for programs.
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
}

impl TaskFailure {
    /// A failure of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// A reply body: the result, or the failure.
///
/// `Reply` (the default) holds a parsed result; a worker replies with `Reply<RawJson>`, the
/// result as its handler's JSON text.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<T = Value> {
    /// The task succeeded with this result.
    Ok(T),
    /// The task failed.
    Err(TaskFailure),
}

/// A reply on the wire, serialized from borrowed parts (a result is never copied to be sent).
#[derive(Serialize)]
struct WireReplyRef<'a, T> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a T>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a TaskFailure>,
}

#[derive(Deserialize)]
#[serde(bound = "T: Json")]
struct WireReply<T> {
    ok: bool,
    #[serde(default)]
    result: Option<T>,
    #[serde(default)]
    error: Option<TaskFailure>,
}

impl<T: Json> Reply<T> {
    /// Serializes the reply body.
    pub fn encode(&self) -> Vec<u8> {
        let wire = match self {
            Self::Ok(result) => WireReplyRef {
                ok: true,
                result: Some(result),
                error: None,
            },
            Self::Err(failure) => WireReplyRef {
                ok: false,
                result: None,
                error: Some(failure),
            },
        };
        // A `Json` and a `TaskFailure` always serialize.
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// `Ok(result)` or `Err(failure)`.
    pub fn into_result(self) -> Result<T, TaskFailure> {
        match self {
            Self::Ok(v) => Ok(v),
            Self::Err(f) => Err(f),
        }
    }
}

/// Parses a reply body, its result as `T`.
fn decode_reply<T: Json>(body: &[u8]) -> Result<Reply<T>, serde_json::Error> {
    let wire: WireReply<T> = serde_json::from_slice(body)?;
    match (wire.ok, wire.error) {
        (true, _) => Ok(Reply::Ok(wire.result.unwrap_or_default())),
        (false, Some(failure)) => Ok(Reply::Err(failure)),
        (false, None) => Err(serde::de::Error::missing_field("error")),
    }
}

impl Reply<RawJson> {
    /// [`Reply::decode`], keeping the result as text: checked to be JSON, not parsed into a
    /// tree.
    ///
    /// # Errors
    /// As [`Reply::decode`].
    pub fn decode_raw(body: &[u8]) -> Result<Self, serde_json::Error> {
        decode_reply(body)
    }
}

impl Reply {
    /// Parses a reply body.
    ///
    /// # Errors
    /// A [`serde_json::Error`] when the body is not a reply (not JSON, no `ok`, or `ok: false`
    /// without an `error`).
    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        decode_reply(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_carry_their_time_and_others_do_not() {
        let before = std::time::SystemTime::now() - std::time::Duration::from_millis(2);
        let at = TaskId::new().created_at().expect("a v7 id has a time");
        assert!(at >= before && at <= std::time::SystemTime::now(), "{at:?}");
        assert_eq!(TaskId::from("order-17").created_at(), None);
        assert_eq!(TaskId::from(Uuid::new_v4().to_string()).created_at(), None);
    }
    use lapin::types::{AMQPValue, FieldTable};
    use proptest::strategy::Strategy;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn request_round_trips_in_workerman_shape() {
        let req = Request {
            function: "send_mail".into(),
            args: json!({"to": "a@b.c"}),
        };
        let body = req.encode();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"function": "send_mail", "args": {"to": "a@b.c"}})
        );
        assert_eq!(Request::decode(&body).unwrap(), req);
    }

    #[test]
    fn a_raw_request_keeps_its_arguments_as_text_and_says_what_is_wrong_alike() {
        let body = br#"{"args": [1, 2.50, {"a":null}], "x": {"function": 1}, "function":"echo"}"#;
        let raw = Request::decode_raw(body).unwrap();
        assert_eq!(raw.function, "echo");
        assert_eq!(raw.args.get(), r#"[1, 2.50, {"a":null}]"#, "text, as sent");
        assert_eq!(
            serde_json::from_slice::<Value>(&raw.encode()).unwrap(),
            json!({"function": "echo", "args": [1, 2.5, {"a": null}]})
        );
        assert_eq!(
            Request::decode_raw(br#"{"function":"ping"}"#).unwrap().args,
            RawJson::null()
        );
        // A repeated key keeps its last value, as a parse into a `Value` does.
        let twice = br#"{"function":"echo","function":"sleep","args":1,"args":2}"#;
        assert_eq!(Request::decode_raw(twice).unwrap().function, "sleep");
        assert_eq!(Request::decode(twice).unwrap().args, json!(2));
        for body in [
            &b"{not json"[..],
            b"[1]",
            br#"{"function": 7}"#,
            br#"{"function": ""}"#,
        ] {
            assert_eq!(
                Request::decode_raw(body).unwrap_err(),
                Request::decode(body).unwrap_err()
            );
        }
    }

    #[test]
    fn a_raw_reply_is_written_as_its_text() {
        let result = RawJson::from_string("[0,0, 0]".to_owned()).unwrap();
        let body = Reply::Ok(result).encode();
        assert_eq!(body, br#"{"ok":true,"result":[0,0, 0]}"#);
        assert_eq!(Reply::decode(&body).unwrap(), Reply::Ok(json!([0, 0, 0])));
        assert!(RawJson::from_string("[0,".to_owned()).is_err());
    }

    #[test]
    fn request_without_args_means_null() {
        let req = Request::decode(br#"{"function":"ping"}"#).unwrap();
        assert_eq!(req.args, Value::Null);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"{not json", "not valid JSON"),
            (b"[1,2]", "got an array"),
            (b"\"echo\"", "got a string"),
            (br#"{"args": {}}"#, "no \"function\""),
            (br#"{"function": 7}"#, "must be a string, got a number"),
            (br#"{"function": ""}"#, "is empty"),
        ];
        for (body, needle) in cases {
            let err = Request::decode(body).unwrap_err();
            assert_eq!(err.kind, ErrorKind::BadRequest);
            assert!(
                err.message.contains(needle),
                "{:?} -> {}",
                body,
                err.message
            );
        }
    }

    #[test]
    fn ok_reply_round_trips_including_null() {
        for result in [json!({"x": 1}), Value::Null, json!([1, "two"])] {
            let reply = Reply::Ok(result.clone());
            let body = reply.encode();
            assert_eq!(
                serde_json::from_slice::<Value>(&body).unwrap(),
                json!({"ok": true, "result": result})
            );
            assert_eq!(Reply::decode(&body).unwrap(), reply);
        }
    }

    #[test]
    fn error_reply_round_trips_with_snake_case_kind() {
        let reply = Reply::Err(TaskFailure::new(
            ErrorKind::UnknownFunction,
            "no handler for \"x\"",
        ));
        let body = reply.encode();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"ok": false, "error": {"kind": "unknown_function", "message": "no handler for \"x\""}})
        );
        assert_eq!(Reply::decode(&body).unwrap(), reply);
    }

    #[test]
    fn unknown_error_kind_from_a_newer_worker_is_other() {
        let reply = Reply::decode(br#"{"ok":false,"error":{"kind":"rate_limited","message":"m"}}"#);
        assert_eq!(
            reply.unwrap(),
            Reply::Err(TaskFailure::new(ErrorKind::Other, "m"))
        );
    }

    #[test]
    fn error_reply_without_error_is_rejected() {
        assert!(Reply::decode(br#"{"ok":false}"#).is_err());
        assert!(Reply::decode(b"garbage").is_err());
    }

    #[test]
    fn every_kind_serializes_as_its_wire_name() {
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::UnknownFunction,
            ErrorKind::InvalidArgs,
            ErrorKind::HandlerFailed,
            ErrorKind::Panicked,
            ErrorKind::Timeout,
            ErrorKind::Expired,
            ErrorKind::TooLarge,
            ErrorKind::UnsupportedVersion,
            ErrorKind::Refused,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), json!(kind.as_str()));
        }
    }

    #[test]
    fn integer_headers_of_any_width_are_read() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::ShortShortUInt(3));
        h.insert("b".into(), AMQPValue::LongInt(-4));
        h.insert("c".into(), AMQPValue::LongString("12".into()));
        set_header_int(&mut h, "d", 1_700_000_000_000);
        assert_eq!(header_int(Some(&h), "a"), Some(3));
        assert_eq!(header_int(Some(&h), "b"), Some(-4));
        assert_eq!(header_int(Some(&h), "c"), Some(12));
        assert_eq!(header_int(Some(&h), "d"), Some(1_700_000_000_000));
        assert_eq!(header_int(Some(&h), "missing"), None);
        assert_eq!(header_int(None, "a"), None);
    }

    proptest::proptest! {
        // The decoding path meets arbitrary bytes from the network: it must answer, not panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Err(failure) = Request::decode(&body) {
                proptest::prop_assert_eq!(failure.kind, ErrorKind::BadRequest);
            }
            let _ = Reply::decode(&body);
        }

        #[test]
        fn any_request_round_trips(function in "[a-z_]{1,20}", n in proptest::num::i64::ANY, s in ".{0,40}") {
            let req = Request { function, args: json!({"n": n, "s": s}) };
            proptest::prop_assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }

        #[test]
        fn json_shaped_garbage_gets_bad_request_or_parses(
            function in proptest::option::of(proptest::prop_oneof![
                proptest::strategy::Just(json!(null)), proptest::strategy::Just(json!(1)),
                proptest::strategy::Just(json!("")), "[a-z]{1,8}".prop_map(Value::from),
                proptest::strategy::Just(json!(["x"])),
            ]),
            args in proptest::option::of(proptest::prop_oneof![
                proptest::strategy::Just(json!(null)), proptest::strategy::Just(json!({})), ".{0,10}".prop_map(Value::from),
            ]),
        ) {
            let mut object = serde_json::Map::new();
            if let Some(f) = function.clone() { object.insert("function".into(), f); }
            if let Some(a) = args { object.insert("args".into(), a); }
            let body = serde_json::to_vec(&Value::Object(object)).unwrap();
            match (Request::decode(&body), function) {
                (Ok(req), Some(Value::String(f))) => proptest::prop_assert_eq!(req.function, f),
                (Ok(req), other) => proptest::prop_assert!(false, "accepted {req:?} from function {other:?}"),
                (Err(e), _) => proptest::prop_assert_eq!(e.kind, ErrorKind::BadRequest),
            }
        }
    }

    #[test]
    fn deadline_millis_round_trip() {
        let t = UNIX_EPOCH + Duration::from_millis(1_763_700_000_123);
        assert_eq!(from_epoch_millis(epoch_millis(t)), t);
    }
}
