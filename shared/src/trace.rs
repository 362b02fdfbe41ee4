//! W3C Trace Context (`traceparent`, `tracestate`) carried in task headers, so that a caller's
//! trace continues on the worker that runs the task, across retries (a retry copies the
//! headers), following the OpenTelemetry messaging conventions for RabbitMQ: the caller's
//! `send` span is the parent of the worker's `process` span.
//!
//! The `traceparent` and `tracestate` headers are read and written in [`crate::envelope`]
//! (`TaskEnvelope::trace`, `Incoming::trace`), like every other header. The spans themselves are
//! [`TaskSpan`]s, exported over OTLP when [`crate::otel`] is configured.

/// One span's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, not all zero.
    pub trace_id: String,
    /// 16 lowercase hex digits, not all zero: the span this context names.
    pub span_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, passed on unchanged.
    pub state: Option<String>,
}

fn is_hex_id(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && text.bytes().any(|b| b != b'0')
}

fn random_hex(bytes: usize) -> String {
    let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
    let text = format!("{a:016x}{b:016x}");
    text[..bytes * 2].to_owned()
}

impl TraceContext {
    /// A new trace (a root span), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_hex(16),
            span_id: random_hex(8),
            flags: 1,
            state: None,
        }
    }

    /// Parses a `traceparent` value (version `00`; later versions are read by their first four
    /// fields, as the spec asks). `None` when it is not valid.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let trace_id = parts.next()?;
        let span_id = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_hex_id(trace_id, 32) || !is_hex_id(span_id, 16) || flags.len() != 2 {
            return None;
        }
        Some(Self {
            trace_id: trace_id.to_owned(),
            span_id: span_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
            state: tracestate.map(str::to_owned).filter(|s| !s.is_empty()),
        })
    }

    /// A new span in the same trace, child of this one.
    pub fn child(&self) -> Self {
        Self {
            span_id: random_hex(8),
            ..self.clone()
        }
    }

    /// The `traceparent` value naming this span.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
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
/// new trace when the task came without one, and exported when [ended](TaskSpan::end); its ids
/// are the exported span's. Otherwise it exists only when the task carries a trace (there is a
/// `parent`), as ids for the task's headers and log lines: nothing else is done or allocated.
#[derive(Debug)]
pub struct TaskSpan {
    context: TraceContext,
    parent_span_id: Option<String>,
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
        if let Some(tracer) = crate::otel::export::tracer() {
            return Some(Self::exported(tracer, operation, task, parent));
        }
        #[cfg(not(feature = "otlp"))]
        let _ = (operation, task);
        parent.map(|parent| Self {
            context: parent.child(),
            parent_span_id: Some(parent.span_id.clone()),
            #[cfg(feature = "otlp")]
            exported: None,
        })
    }

    #[cfg(feature = "otlp")]
    fn exported(
        tracer: &opentelemetry_sdk::trace::SdkTracer,
        operation: Operation,
        task: SpanTask<'_>,
        parent: Option<&TraceContext>,
    ) -> Self {
        use crate::otel::export::{attribute, int_attribute};
        let op = operation.as_str();
        let mut attributes = vec![
            attribute("messaging.system", "rabbitmq"),
            attribute("messaging.operation.type", op),
            attribute("messaging.operation.name", op),
            attribute("messaging.destination.name", task.queue),
            attribute("messaging.rabbitmq.destination.routing_key", task.queue),
            attribute("messaging.message.id", task.task_id),
            attribute(
                "warren.task.function",
                crate::envelope::bounded(task.function, 200),
            ),
        ];
        if let Some(attempt) = task.attempt {
            attributes.push(int_attribute("warren.task.attempt", i64::from(attempt)));
        }
        let (context, span) = crate::otel::export::start(
            tracer,
            format!("{op} {}", task.queue),
            operation == Operation::Send,
            parent,
            attributes,
        );
        Self {
            context,
            parent_span_id: parent.map(|p| p.span_id.clone()),
            exported: Some(span),
        }
    }

    /// This span's place in the trace: what the task's `traceparent` names on the caller, and
    /// the worker's log lines carry.
    pub fn context(&self) -> &TraceContext {
        &self.context
    }

    /// The parent span's id, when the span continues a trace.
    pub fn parent_span_id(&self) -> Option<&str> {
        self.parent_span_id.as_deref()
    }

    /// Ends the span (exporting it, when spans are exported), as failed with `error` if given.
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
        assert_eq!(span.parent_span_id(), Some(parent.span_id.as_str()));
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
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad}");
        }
        let root = TraceContext::new_root();
        assert!(TraceContext::parse(&root.traceparent(), None).is_some());
    }
}
