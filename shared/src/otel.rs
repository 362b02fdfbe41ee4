//! OTLP export of Warren's spans (the caller's `send {queue}` and the worker's
//! `process {queue}`, [`crate::trace::TaskSpan`]) to an OpenTelemetry collector, configured by
//! the standard variables:
//!
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   (`/v1/traces` appended): export is on when either is set, off otherwise;
//! - `OTEL_SERVICE_NAME` (default: the binary's name), `OTEL_RESOURCE_ATTRIBUTES`;
//! - `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`,
//!   `OTEL_TRACES_SAMPLER` and the other `OTEL_*` variables the SDK reads;
//! - `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off.
//!
//! The protocol is OTLP over HTTP with protobuf bodies (`http/protobuf`, port 4318 on a
//! collector), to `http://` or `https://` endpoints; gRPC is not built in.
//!
//! When export is off, no provider exists: starting a span costs one atomic load
//! ([`exporting`]), and a task that carries no `traceparent` gets no span at all. The
//! OpenTelemetry crates are in the build only with the `otlp` feature (on by default in the
//! binaries); without it, a set endpoint is ignored with a warning.

/// How long [`Exporter::shutdown`] waits for the last spans to be exported.
pub const SHUTDOWN_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// The variables that turn export on, the signal's own first.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The endpoint variable in force, if export is asked for (set, non-empty, not disabled).
fn requested() -> Option<&'static str> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    if is("OTEL_SDK_DISABLED", "true") || is("OTEL_TRACES_EXPORTER", "none") {
        return None;
    }
    ENDPOINT_VARIABLES.into_iter().find(|name| set(name))
}

/// The installed exporter: flush it with [`Exporter::shutdown`] before the process exits.
/// Inert when export is off.
#[derive(Debug)]
pub struct Exporter {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry export ({variable}): {message}")]
pub struct ExportError {
    variable: &'static str,
    message: String,
}

/// Installs the process-wide OTLP exporter when the `OTEL_*` variables ask for one, with
/// `service.name` = `default_service_name` unless `OTEL_SERVICE_NAME` (or
/// `OTEL_RESOURCE_ATTRIBUTES`) names it. Must run inside a tokio runtime: the batch processor
/// exports from a task of it. Later calls change nothing.
///
/// # Errors
/// [`ExportError`] when the variables are set but unusable (an endpoint that is not a URL, a
/// protocol other than `http/protobuf`).
pub fn init(default_service_name: &str) -> Result<Exporter, ExportError> {
    let Some(variable) = requested() else {
        return Ok(Exporter::off());
    };
    #[cfg(feature = "otlp")]
    {
        export::install(variable, default_service_name)
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = default_service_name;
        tracing::warn!(
            "{variable} is set, but this build has no OTLP exporter (the `otlp` feature); no \
             spans are exported"
        );
        Ok(Exporter::off())
    }
}

/// Runs `work` with the exporter [`init`] sets up, then flushes it ([`Exporter::shutdown`]):
/// what a binary's `main` wraps around its work.
///
/// # Errors
/// [`ExportError`] from [`init`], before `work` starts.
pub async fn exporting_while<T>(
    default_service_name: &str,
    work: impl Future<Output = T>,
) -> Result<T, ExportError> {
    let exporter = init(default_service_name)?;
    let result = work.await;
    exporter.shutdown().await;
    Ok(result)
}

/// Whether spans are exported (an exporter is installed in this process).
pub fn exporting() -> bool {
    #[cfg(feature = "otlp")]
    {
        export::tracer().is_some()
    }
    #[cfg(not(feature = "otlp"))]
    {
        false
    }
}

impl Exporter {
    fn off() -> Self {
        Self {
            #[cfg(feature = "otlp")]
            provider: None,
        }
    }

    /// Whether this process exports spans.
    pub fn is_on(&self) -> bool {
        #[cfg(feature = "otlp")]
        {
            self.provider.is_some()
        }
        #[cfg(not(feature = "otlp"))]
        {
            false
        }
    }

    /// Exports the spans still buffered and stops the exporter, waiting at most
    /// [`SHUTDOWN_BOUND`] (an unreachable collector must not hold the process up). Spans started
    /// afterwards are not exported.
    pub async fn shutdown(self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider {
            // The SDK blocks its thread until its batch task (on this runtime) has exported.
            let done = tokio::task::spawn_blocking(move || provider.shutdown());
            match tokio::time::timeout(SHUTDOWN_BOUND, done).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "exporting the last spans failed"),
                Ok(Err(e)) => tracing::warn!(error = %e, "exporting the last spans failed"),
                Err(_) => tracing::warn!(
                    "the last spans were not exported within {SHUTDOWN_BOUND:?}; giving up on them"
                ),
            }
        }
    }
}

#[cfg(feature = "otlp")]
pub(crate) mod export {
    //! The OpenTelemetry SDK side: provider, exporter, and the spans themselves.

    use std::sync::OnceLock;
    use std::time::Duration;

    use opentelemetry::trace::{
        Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags,
        TraceId, TraceState, Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, Span};

    use super::{ExportError, Exporter};
    use crate::trace::TraceContext;

    static TRACER: OnceLock<SdkTracer> = OnceLock::new();

    /// The installed tracer, if any: one atomic load.
    pub(crate) fn tracer() -> Option<&'static SdkTracer> {
        TRACER.get()
    }

    /// The request timeout of one export (the OTLP default).
    const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

    pub(super) fn install(
        variable: &'static str,
        default_service_name: &str,
    ) -> Result<Exporter, ExportError> {
        let error = |message: String| ExportError { variable, message };
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Ok(protocol) = std::env::var(name)
                && !protocol.trim().is_empty()
                && protocol.trim() != "http/protobuf"
            {
                return Err(error(format!(
                    "{name}={protocol}: Warren exports over http/protobuf only"
                )));
            }
        }
        // http:// and https:// (rustls with ring and the system's roots, like the broker's).
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| error(format!("cannot read the system's root certificates: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = opentelemetry_http::hyper::HyperClient::new(connector, EXPORT_TIMEOUT, None);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(client)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        let mut resource = Resource::builder();
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name"));
        if !named {
            resource = resource.with_service_name(default_service_name.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                resource
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("warren");
        if TRACER.set(tracer).is_err() {
            // Installed already: keep the first, and let this provider go.
            let _ = provider.shutdown();
            return Ok(Exporter { provider: None });
        }
        tracing::info!(variable, "exporting spans over OTLP");
        Ok(Exporter {
            provider: Some(provider),
        })
    }

    /// The caller's context as a remote parent, if its ids parse.
    fn parent_context(parent: &TraceContext) -> Option<Context> {
        let state = parent
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            TraceId::from_hex(&parent.trace_id).ok()?,
            SpanId::from_hex(&parent.span_id).ok()?,
            TraceFlags::new(parent.flags),
            true,
            state,
        );
        Some(Context::new().with_remote_span_context(context))
    }

    /// Starts an exported span named `name`, child of `parent` (a new trace without one), and
    /// returns it with its ids as a [`TraceContext`] (the parent's `tracestate` carried on).
    pub(crate) fn start(
        tracer: &SdkTracer,
        name: String,
        producer: bool,
        parent: Option<&TraceContext>,
        attributes: Vec<KeyValue>,
    ) -> (TraceContext, Span) {
        let parent_cx = parent.and_then(parent_context).unwrap_or_default();
        let kind = if producer {
            SpanKind::Producer
        } else {
            SpanKind::Consumer
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent_cx);
        let ids = span.span_context();
        let context = TraceContext {
            trace_id: format!("{:032x}", ids.trace_id()),
            span_id: format!("{:016x}", ids.span_id()),
            flags: ids.trace_flags().to_u8(),
            state: parent.and_then(|p| p.state.clone()),
        };
        (context, span)
    }

    /// Ends `span`, as failed with `error` when there is one.
    pub(crate) fn end(mut span: Span, error: Option<String>) {
        if let Some(message) = error {
            span.set_status(Status::error(message));
        }
        span.end();
    }

    /// A string attribute.
    pub(crate) fn attribute(key: &'static str, value: impl Into<String>) -> KeyValue {
        KeyValue::new(key, value.into())
    }

    /// An integer attribute.
    pub(crate) fn int_attribute(key: &'static str, value: i64) -> KeyValue {
        KeyValue::new(key, value)
    }
}
