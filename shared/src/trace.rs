//! W3C Trace Context (`traceparent`, `tracestate`) carried in task headers, so that a caller's
//! trace continues on the worker that runs the task, across retries (a retry copies the
//! headers), following the OpenTelemetry messaging conventions for RabbitMQ: the caller's
//! `send` span is the parent of the worker's `process` span.
//!
//! The `traceparent` and `tracestate` headers are read and written in [`crate::envelope`]
//! (`TaskEnvelope::trace`, `Incoming::trace`), like every other header.

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
