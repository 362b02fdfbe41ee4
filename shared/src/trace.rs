//! W3C Trace Context (`traceparent`, `tracestate`) carried in task headers, so that a caller's
//! trace continues on the worker that runs the task, across retries (a retry copies the
//! headers), following the OpenTelemetry messaging conventions for RabbitMQ: the caller's
//! `send` span is the parent of the worker's `process` span.
//!
//! The `traceparent` and `tracestate` headers are read and written in [`crate::envelope`]
//! (`TaskEnvelope::trace`, `Incoming::trace`), like every other header. The spans themselves are
//! [`TaskSpan`]s, exported over OTLP when [`crate::otel`] is configured.

/// A trace's id: 16 bytes, not all zero, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(u128);

/// A span's id: 8 bytes, not all zero, written as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(u64);

impl TraceId {
    /// A random id (every bit random, as the ratio sampler expects of the low 8 bytes;
    /// not a secret, so a fast generator).
    pub fn random() -> Self {
        Self(fastrand::u128(1..))
    }

    /// The id as a number (big-endian bytes).
    pub fn to_u128(self) -> u128 {
        self.0
    }

    /// The id `value`, if it is not zero.
    pub fn from_u128(value: u128) -> Option<Self> {
        (value != 0).then_some(Self(value))
    }
}

impl SpanId {
    /// A random id.
    pub fn random() -> Self {
        Self(fastrand::u64(1..))
    }

    /// The id as a number (big-endian bytes).
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// The id `value`, if it is not zero.
    pub fn from_u64(value: u64) -> Option<Self> {
        (value != 0).then_some(Self(value))
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::fmt::Debug for SpanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The flag bit that says the trace is sampled (recorded and exported).
pub const SAMPLED: u8 = 1;

/// One span's place in a trace. The ids are numbers: hex only when a header or a log line is
/// written ([`TraceContext::traceparent`], their `Display`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The span this context names.
    pub span_id: SpanId,
    /// Trace flags (bit 0, [`SAMPLED`]: sampled).
    pub flags: u8,
    /// `tracestate`, passed on unchanged.
    pub state: Option<String>,
}

/// The value of each lowercase hex digit, and [`NOT_HEX`] for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut digit = 0;
    while digit < 16 {
        table[b"0123456789abcdef"[digit] as usize] = digit as u8;
        digit += 1;
    }
    table
};

/// What [`HEX_VALUE`] holds for a byte that is not a lowercase hex digit.
const NOT_HEX: u8 = 0xff;

/// `digits` (at most 16 of them) as a lowercase hex number. By table: this runs on every task a
/// worker takes while spans are exported, and `from_str_radix` costs several times as much.
fn hex_u64(digits: &[u8]) -> Option<u64> {
    let mut value = 0u64;
    let mut seen = 0u8;
    for &b in digits {
        let digit = HEX_VALUE[usize::from(b)];
        seen |= digit;
        value = value << 4 | u64::from(digit & 0x0f);
    }
    // Every valid digit is below 16, so one bit above them says some byte was not one.
    (seen & 0xf0 == 0).then_some(value)
}

/// Writes `bytes` as lowercase hex into `out` (twice as long).
fn put_hex(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

impl TraceContext {
    /// A new trace (a root span), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            flags: SAMPLED,
            state: None,
        }
    }

    /// Parses a `traceparent` value (version `00`; later versions are read by their first four
    /// fields, as the spec asks). `None` when it is not valid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        Self::parse_bytes(traceparent.as_bytes(), tracestate)
    }

    /// [`TraceContext::parse`] of the header's bytes as they came: its fields must be ASCII
    /// lowercase hex and dashes (what follows them in a later version is not read).
    pub fn parse_bytes(traceparent: &[u8], tracestate: Option<&str>) -> Option<Self> {
        // `vv-{32 hex}-{16 hex}-ff`, then only for a later version more fields after a `-`.
        let text = traceparent.trim_ascii();
        let (version, dashes) = (text.get(..2)?, [2, 35, 52]);
        if text.len() < 55
            || dashes.iter().any(|&at| text[at] != b'-')
            || version == b"ff"
            || (text.len() > 55 && (version == b"00" || text[55] != b'-'))
        {
            return None;
        }
        let trace_high = hex_u64(&text[3..19])?;
        let trace_low = hex_u64(&text[19..35])?;
        let trace_id = TraceId::from_u128(u128::from(trace_high) << 64 | u128::from(trace_low))?;
        let span_id = SpanId::from_u64(hex_u64(&text[36..52])?)?;
        let flags = u8::try_from(hex_u64(&text[53..55])?).ok()?;
        hex_u64(version)?;
        Some(Self {
            trace_id,
            span_id,
            flags,
            state: tracestate.map(str::to_owned).filter(|s| !s.is_empty()),
        })
    }

    /// A new span in the same trace, child of this one, with the same flags.
    pub fn child(&self) -> Self {
        Self {
            span_id: SpanId::random(),
            ..self.clone()
        }
    }

    /// Whether the trace is sampled (flag bit 0).
    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// The `traceparent` value naming this span: `00-{trace id}-{span id}-{flags}`.
    pub fn traceparent(&self) -> String {
        self.traceparent_bytes()
            .iter()
            .copied()
            .map(char::from)
            .collect()
    }

    /// [`TraceContext::traceparent`] as the bytes of a header value.
    pub fn traceparent_bytes(&self) -> [u8; 55] {
        // By hand rather than `format!`: written on every task a client sends while exporting.
        let mut text = *b"00-________________________________-________________-__";
        put_hex(&mut text[3..35], &self.trace_id.0.to_be_bytes());
        put_hex(&mut text[36..52], &self.span_id.0.to_be_bytes());
        put_hex(&mut text[53..55], &[self.flags]);
        text
    }
}

/// Which end of the queue a [`TaskSpan`] is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// The caller publishing the task (`send {queue}`, span kind producer).
    Send,
    /// A worker running one attempt of it (`process {queue}`, span kind consumer).
    Process,
}

impl Operation {
    /// The operation's name in span names and `messaging.operation.*` attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Process => "process",
        }
    }
}

/// What a [`TaskSpan`] is about: the messaging attributes of its task.
#[derive(Debug, Clone, Copy)]
pub struct SpanTask<'a> {
    /// The queue (the routing key): the span is named `{operation} {queue}`.
    pub queue: &'a str,
    /// The task id (`messaging.message.id`).
    pub task_id: &'a str,
    /// The function (`warren.task.function`).
    pub function: &'a str,
    /// The attempt (`warren.task.attempt`), on the worker.
    pub attempt: Option<u32>,
}

/// The span of one task at one end of the queue: the caller's `send {queue}` or the worker's
/// `process {queue}` (OpenTelemetry messaging conventions), child of `parent`.
///
/// When spans are exported ([`crate::otel::init`] found an endpoint) it is always started, as a
/// new trace when the task came without one. The sampler (`OTEL_TRACES_SAMPLER`) decides first:
/// a sampled span is recorded and exported when [ended](TaskSpan::end); an unsampled one is
/// only ids (its flags say "not sampled", so the other end drops it too), built without the
/// exporter: no name, attributes or allocations beyond the `tracestate`. Without export it
/// exists only when the task carries a trace (there is a `parent`), as ids for the task's
/// headers and log lines.
#[derive(Debug)]
pub struct TaskSpan {
    context: TraceContext,
    parent_span_id: Option<SpanId>,
    #[cfg(feature = "otlp")]
    exported: Option<opentelemetry_sdk::trace::Span>,
}

impl TaskSpan {
    /// Starts the span of `operation` on `task`, child of `parent`; `None` when there is no
    /// trace to continue and nothing is exported.
    pub fn start(
        operation: Operation,
        task: SpanTask<'_>,
        parent: Option<&TraceContext>,
    ) -> Option<Self> {
        #[cfg(feature = "otlp")]
        if let Some(export) = crate::otel::export::installed() {
            return Some(Self::exported(export, operation, task, parent));
        }
        #[cfg(not(feature = "otlp"))]
        let _ = (operation, task);
        parent.map(|parent| Self {
            context: parent.child(),
            parent_span_id: Some(parent.span_id),
            #[cfg(feature = "otlp")]
            exported: None,
        })
    }

    #[cfg(feature = "otlp")]
    fn exported(
        export: &crate::otel::export::Installed,
        operation: Operation,
        task: SpanTask<'_>,
        parent: Option<&TraceContext>,
    ) -> Self {
        use crate::otel::export::{attribute, int_attribute};
        let trace_id = parent.map_or_else(TraceId::random, |p| p.trace_id);
        let parent_span_id = parent.map(|p| p.span_id);
        if !export.samples(parent, trace_id) {
            // Ids only: what the SDK would make of a dropped span, without the SDK.
            return Self {
                context: TraceContext {
                    trace_id,
                    span_id: SpanId::random(),
                    flags: parent.map_or(0, |p| p.flags) & !SAMPLED,
                    state: parent.and_then(|p| p.state.clone()),
                },
                parent_span_id,
                exported: None,
            };
        }
        let op = operation.as_str();
        let queue: std::sync::Arc<str> = task.queue.into();
        let mut attributes = vec![
            attribute("messaging.system", "rabbitmq"),
            attribute("messaging.operation.type", op),
            attribute("messaging.operation.name", op),
            attribute("messaging.destination.name", queue.clone()),
            attribute("messaging.rabbitmq.destination.routing_key", queue),
            attribute("messaging.message.id", task.task_id.to_owned()),
            attribute(
                "warren.task.function",
                crate::envelope::bounded(task.function, 200).into_owned(),
            ),
        ];
        if let Some(attempt) = task.attempt {
            attributes.push(int_attribute("warren.task.attempt", i64::from(attempt)));
        }
        let (context, span) = export.start(
            format!("{op} {}", task.queue),
            operation == Operation::Send,
            parent,
            trace_id,
            attributes,
        );
        Self {
            context,
            parent_span_id,
            exported: span,
        }
    }

    /// This span's place in the trace: what the task's `traceparent` names on the caller, and
    /// the worker's log lines carry.
    pub fn context(&self) -> &TraceContext {
        &self.context
    }

    /// The parent span's id, when the span continues a trace.
    pub fn parent_span_id(&self) -> Option<SpanId> {
        self.parent_span_id
    }

    /// Whether this span is recorded and exported (sampled while spans are exported).
    pub fn is_exported(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.exported.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// Ends the span (exporting it, when it is exported), as failed with `error` if given.
    pub fn end(self, error: Option<String>) {
        #[cfg(feature = "otlp")]
        if let Some(span) = self.exported {
            crate::otel::export::end(span, error);
        }
        #[cfg(not(feature = "otlp"))]
        let _ = error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceContext::parse(text, Some("congo=t61rcWkgMzE"))
            .unwrap_or_else(TraceContext::new_root);
        assert_eq!(parsed.traceparent(), text);
        let child = parsed.child();
        assert_eq!(child.trace_id, parsed.trace_id);
        assert_ne!(child.span_id, parsed.span_id);
        assert_eq!(
            TraceContext::parse(&child.traceparent(), child.state.as_deref()),
            Some(child)
        );
    }

    #[test]
    fn the_hex_table_reads_every_byte_as_from_str_radix_does_lowercase() {
        for b in 0..=u8::MAX {
            let expected = char::from(b)
                .to_digit(16)
                .filter(|_| !b.is_ascii_uppercase())
                .map(u64::from);
            assert_eq!(hex_u64(&[b]), expected, "byte {b}");
            assert_eq!(hex_u64(&[b'f', b, b'1']), expected.map(|d| 0xf01 | d << 4));
        }
        assert_eq!(hex_u64(b"ffffffffffffffff"), Some(u64::MAX));
        assert_eq!(hex_u64(b"0123456789abcdef"), Some(0x0123_4567_89ab_cdef));
    }

    #[test]
    fn the_hand_written_hex_is_the_formatted_hex() {
        for flags in [0, 1, 0x0f, 0xff] {
            let context = TraceContext {
                flags,
                ..TraceContext::new_root()
            };
            let text = context.traceparent();
            let expected = format!(
                "00-{:032x}-{:016x}-{flags:02x}",
                context.trace_id.to_u128(),
                context.span_id.to_u64()
            );
            assert_eq!(text, expected);
            assert_eq!(TraceContext::parse(&text, None), Some(context));
        }
    }

    #[test]
    fn without_an_exporter_only_a_traced_task_gets_a_span() {
        let task = SpanTask {
            queue: "q",
            task_id: "t",
            function: "echo",
            attempt: None,
        };
        assert!(TaskSpan::start(Operation::Send, task, None).is_none());
        let parent = TraceContext::new_root();
        let span = TaskSpan::start(Operation::Process, task, Some(&parent));
        let span = span.unwrap_or_else(|| panic!("a traced task has a span"));
        assert_eq!(span.context().trace_id, parent.trace_id);
        assert_eq!(span.parent_span_id(), Some(parent.span_id));
        assert!(!span.is_exported());
        span.end(None);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736x00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b/-01",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        let mut not_utf8 = *b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for at in [0, 10, 40, 54] {
            let kept = not_utf8[at];
            not_utf8[at] = 0xc3;
            assert_eq!(TraceContext::parse_bytes(&not_utf8, None), None, "at {at}");
            not_utf8[at] = kept;
        }
        assert!(TraceContext::parse_bytes(&not_utf8, None).is_some());
        assert!(
            TraceContext::parse_bytes(
                b" \t00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n",
                None
            )
            .is_some()
        );
        let root = TraceContext::new_root();
        assert!(TraceContext::parse(&root.traceparent(), None).is_some());
        // A later version: its first four fields, whatever follows.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        let parsed = TraceContext::parse(later, None);
        assert_eq!(
            parsed.map(|c| c.span_id.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
    }
}
