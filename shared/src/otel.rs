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
        export::installed().is_some()
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

    use std::cell::Cell;

    use opentelemetry::trace::{
        Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceState,
        Tracer as _, TracerProvider as _,
    };
    use opentelemetry::{Context, KeyValue, StringValue};
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{
        IdGenerator, Sampler, SamplingDecision, SdkTracer, SdkTracerProvider, ShouldSample as _,
        Span,
    };

    use super::{ExportError, Exporter};
    use crate::trace::{SpanId, TraceContext, TraceId};

    /// The exporter's tracer and the sampler it was built with.
    #[derive(Debug)]
    pub(crate) struct Installed {
        tracer: SdkTracer,
        sampling: Sampling,
    }

    static INSTALLED: OnceLock<Installed> = OnceLock::new();

    /// The installed exporter, if any: one atomic load.
    pub(crate) fn installed() -> Option<&'static Installed> {
        INSTALLED.get()
    }

    /// `OTEL_TRACES_SAMPLER` (and `_ARG`), read as the SDK reads them, so that Warren can decide
    /// before building a span, with the very sampler the SDK then applies to it.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) struct Sampling {
        /// A parent's sampled flag decides, when there is a parent.
        parent_based: bool,
        /// What decides otherwise: always (1.0), never (0.0), or the trace id ratio.
        ratio: f64,
    }

    impl Sampling {
        /// From the variables' values (the SDK's default, `parentbased_always_on`, when unset).
        pub(crate) fn from_values(sampler: Option<&str>, arg: Option<&str>) -> Self {
            let ratio = || {
                arg.and_then(|a| a.trim().parse::<f64>().ok())
                    .unwrap_or_else(|| {
                        tracing::warn!(
                            "OTEL_TRACES_SAMPLER_ARG is missing or not a number; sampling every trace"
                        );
                        1.0
                    })
            };
            let (parent_based, ratio) = match sampler.map(str::trim) {
                None | Some("" | "parentbased_always_on") => (true, 1.0),
                Some("always_on") => (false, 1.0),
                Some("always_off") => (false, 0.0),
                Some("traceidratio") => (false, ratio()),
                Some("parentbased_always_off") => (true, 0.0),
                Some("parentbased_traceidratio") => (true, ratio()),
                Some(other) => {
                    tracing::warn!(
                        sampler = other,
                        "OTEL_TRACES_SAMPLER names a sampler Warren does not have; using \
                         parentbased_always_on"
                    );
                    (true, 1.0)
                }
            };
            Self {
                parent_based,
                ratio,
            }
        }

        fn from_env() -> Self {
            let sampler = std::env::var("OTEL_TRACES_SAMPLER").ok();
            let arg = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok();
            Self::from_values(sampler.as_deref(), arg.as_deref())
        }

        fn root(&self) -> Sampler {
            Sampler::TraceIdRatioBased(self.ratio)
        }

        /// The SDK's sampler for the same decisions.
        fn sdk(&self) -> Sampler {
            if self.parent_based {
                Sampler::ParentBased(Box::new(self.root()))
            } else {
                self.root()
            }
        }

        /// Whether a span in trace `trace_id`, child of `parent`, is sampled: what [`Self::sdk`]
        /// decides for it (a parent from a header is remote: its flag decides when parent
        /// based), without a `Context`, a name or attributes.
        pub(crate) fn samples(&self, parent: Option<&TraceContext>, trace_id: TraceId) -> bool {
            if self.parent_based
                && let Some(parent) = parent
            {
                return parent.is_sampled();
            }
            let id = opentelemetry::trace::TraceId::from(trace_id.to_u128());
            let kind = SpanKind::Internal;
            let result = self.root().should_sample(None, id, "", &kind, &[], &[]);
            result.decision == SamplingDecision::RecordAndSample
        }
    }

    thread_local! {
        /// The trace id [`Ids`] hands the SDK for the next root span started on this thread:
        /// the one the sampler was asked about.
        static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
    }

    /// The SDK's id generator: random ids, except a root span's trace id, which Warren chose
    /// (and sampled on) before starting it.
    #[derive(Debug)]
    struct Ids;

    impl IdGenerator for Ids {
        fn new_trace_id(&self) -> opentelemetry::trace::TraceId {
            let id = NEXT_TRACE_ID.take().unwrap_or_else(TraceId::random);
            opentelemetry::trace::TraceId::from(id.to_u128())
        }

        fn new_span_id(&self) -> opentelemetry::trace::SpanId {
            opentelemetry::trace::SpanId::from(SpanId::random().to_u64())
        }
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
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| names_the_service(&v));
        if !named {
            resource = resource.with_service_name(default_service_name.to_owned());
        }
        let sampling = Sampling::from_env();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampling.sdk())
            .with_id_generator(Ids)
            .with_resource(
                resource
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("warren");
        if INSTALLED.set(Installed { tracer, sampling }).is_err() {
            // Installed already: keep the first, and let this provider go.
            let _ = provider.shutdown();
            return Ok(Exporter { provider: None });
        }
        tracing::info!(variable, "exporting spans over OTLP");
        Ok(Exporter {
            provider: Some(provider),
        })
    }

    /// The caller's context as a remote parent.
    fn parent_context(parent: &TraceContext) -> Context {
        let state = parent
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        let context = SpanContext::new(
            opentelemetry::trace::TraceId::from(parent.trace_id.to_u128()),
            opentelemetry::trace::SpanId::from(parent.span_id.to_u64()),
            TraceFlags::new(parent.flags),
            true,
            state,
        );
        Context::new().with_remote_span_context(context)
    }

    impl Installed {
        /// Whether a span in trace `trace_id`, child of `parent`, is sampled.
        pub(crate) fn samples(&self, parent: Option<&TraceContext>, trace_id: TraceId) -> bool {
            self.sampling.samples(parent, trace_id)
        }

        /// Starts an exported span named `name` in trace `trace_id` (the parent's, or a new
        /// root's that [`Installed::samples`] said yes to), child of `parent`, and returns it
        /// with its ids as a [`TraceContext`] (the parent's `tracestate` carried on). No span
        /// when the SDK made none (it is shut down): then only ids, not sampled.
        pub(crate) fn start(
            &self,
            name: String,
            producer: bool,
            parent: Option<&TraceContext>,
            trace_id: TraceId,
            attributes: Vec<KeyValue>,
        ) -> (TraceContext, Option<Span>) {
            let parent_cx = match parent {
                Some(parent) => parent_context(parent),
                None => {
                    NEXT_TRACE_ID.set(Some(trace_id));
                    Context::new()
                }
            };
            let kind = if producer {
                SpanKind::Producer
            } else {
                SpanKind::Consumer
            };
            let span = self
                .tracer
                .span_builder(name)
                .with_kind(kind)
                .with_attributes(attributes)
                .start_with_context(&self.tracer, &parent_cx);
            NEXT_TRACE_ID.set(None);
            let ids = span.span_context();
            let state = parent.and_then(|p| p.state.clone());
            let (Some(trace_id), Some(span_id)) = (
                TraceId::from_u128(u128::from_be_bytes(ids.trace_id().to_bytes())),
                SpanId::from_u64(u64::from_be_bytes(ids.span_id().to_bytes())),
            ) else {
                let context = TraceContext {
                    trace_id,
                    span_id: SpanId::random(),
                    flags: 0,
                    state,
                };
                return (context, None);
            };
            let context = TraceContext {
                trace_id,
                span_id,
                flags: ids.trace_flags().to_u8(),
                state,
            };
            (context, Some(span))
        }
    }

    /// Ends `span`, as failed with `error` when there is one.
    pub(crate) fn end(mut span: Span, error: Option<String>) {
        if let Some(message) = error {
            span.set_status(Status::error(message));
        }
        span.end();
    }

    /// Whether `OTEL_RESOURCE_ATTRIBUTES` (`key=value,...`, as the SDK reads it) sets
    /// `service.name`; `service.namespace` and the like do not.
    fn names_the_service(attributes: &str) -> bool {
        attributes.split(',').any(|pair| {
            pair.split_once('=').is_some_and(|(key, value)| {
                key.trim() == "service.name" && !value.trim().is_empty()
            })
        })
    }

    /// A string attribute.
    pub(crate) fn attribute(key: &'static str, value: impl Into<StringValue>) -> KeyValue {
        KeyValue::new(key, opentelemetry::Value::String(value.into()))
    }

    /// An integer attribute.
    pub(crate) fn int_attribute(key: &'static str, value: i64) -> KeyValue {
        KeyValue::new(key, value)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn parent(sampled: bool) -> TraceContext {
            TraceContext {
                flags: u8::from(sampled),
                ..TraceContext::new_root()
            }
        }

        #[test]
        fn only_a_service_name_attribute_names_the_service() {
            assert!(names_the_service("service.name=shop"));
            assert!(names_the_service("a=b, service.name = shop ,c=d"));
            assert!(!names_the_service("service.namespace=shop"));
            assert!(!names_the_service("service.name.x=shop,deployment=eu"));
            assert!(!names_the_service("service.name="));
            assert!(!names_the_service(""));
        }

        #[test]
        fn the_variables_are_read_as_the_sdk_reads_them() {
            let read = |sampler, arg| {
                let s = Sampling::from_values(sampler, arg);
                (s.parent_based, s.ratio)
            };
            assert_eq!(read(None, None), (true, 1.0));
            assert_eq!(read(Some("always_on"), None), (false, 1.0));
            assert_eq!(read(Some("always_off"), None), (false, 0.0));
            assert_eq!(read(Some("traceidratio"), Some("0.25")), (false, 0.25));
            assert_eq!(read(Some("traceidratio"), Some("x")), (false, 1.0));
            assert_eq!(read(Some("parentbased_always_off"), None), (true, 0.0));
            assert_eq!(
                read(Some("parentbased_traceidratio"), Some("0.01")),
                (true, 0.01)
            );
            assert_eq!(read(Some("xray"), None), (true, 1.0));
        }

        #[test]
        fn a_parent_decides_when_parent_based_and_the_ratio_otherwise() {
            let never = Sampling::from_values(Some("parentbased_always_off"), None);
            let sampled = parent(true);
            assert!(never.samples(Some(&sampled), sampled.trace_id));
            assert!(!never.samples(None, TraceId::random()));
            let always = Sampling::from_values(None, None);
            let unsampled = parent(false);
            assert!(!always.samples(Some(&unsampled), unsampled.trace_id));
            assert!(always.samples(None, TraceId::random()));
            let ratio = Sampling::from_values(Some("traceidratio"), Some("0"));
            assert!(!ratio.samples(Some(&sampled), sampled.trace_id));
        }

        #[test]
        fn warrens_decision_is_the_sdks_and_new_trace_ids_sample_at_the_ratio() {
            let half = Sampling::from_values(Some("parentbased_traceidratio"), Some("0.5"));
            let sdk = half.sdk();
            let mut sampled = 0;
            for _ in 0..10_000 {
                let id = TraceId::random();
                let ours = half.samples(None, id);
                let otel_id = opentelemetry::trace::TraceId::from(id.to_u128());
                let theirs = sdk
                    .should_sample(
                        Some(&Context::new()),
                        otel_id,
                        "send q",
                        &SpanKind::Producer,
                        &[],
                        &[],
                    )
                    .decision
                    == SamplingDecision::RecordAndSample;
                assert_eq!(ours, theirs, "{id}");
                sampled += usize::from(ours);
            }
            assert!((4_000..6_000).contains(&sampled), "{sampled} of 10000");
        }
    }
}
