//! Logging through `tracing`: text for people, JSON for machines; and,
//! with `--otlp-endpoint`, distributed traces exported over OTLP/gRPC.
//!
//! Lines are formatted on the thread that logs and written to stderr by a
//! thread of their own, in batches: a call never waits for a `write(2)`,
//! and many lines cost one. The queue between them blocks rather than drops
//! when stderr cannot keep up, so no line is lost.
//!
//! The span of a call, and of a batch statement serving many calls, are
//! made with the OpenTelemetry API itself ([`tracer`]): one of them comes
//! with every call, and through `tracing` a span costs about three times as
//! much (the registry's slot, a builder, attribute strings copied, and work
//! at every poll of the call). Each such span's context is attached while
//! its work runs, so that `tracing` spans opened inside (the database work,
//! its statements) become its children through tracing-opentelemetry.
//! Those spans have their own target, [`TRACE_TARGET`]: only they are
//! exported, and log lines never show them. Without an endpoint nothing
//! listens to that target, and a span costs a callsite check.

use std::{
    io::{BufWriter, IsTerminal},
    sync::OnceLock,
};

use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, TextMapPropagator},
    trace::TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    resource::{EnvResourceDetector, SdkProvidedResourceDetector, TelemetryResourceDetector},
    trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider},
};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

/// The target of the spans that are exported as traces.
pub const TRACE_TARGET: &str = "users_service::trace";

/// The tracer of the exported spans, once [`init`] has made the exporter.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

/// The tracer, when spans are exported.
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// What the process holds for its logs and traces until it ends.
#[must_use = "dropping it stops the log writer"]
#[derive(Debug)]
pub struct Telemetry {
    _logs: WorkerGuard,
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued (at most 5 s) and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.traces {
            // It blocks until the exporter's thread answers.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; `RUST_LOG` filters the log lines
/// (default `info`). With `otlp_endpoint`, spans go there too, unless
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. Must run inside
/// the Tokio runtime (the exporter's connection lives there).
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive(
            format!("{TRACE_TARGET}=off")
                .parse()
                .expect("valid directive"),
        );
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let traces = otlp_endpoint
        .filter(|_| traces_enabled())
        .map(provider)
        .transpose()?;
    let exported = traces.as_ref().map(|provider| {
        let _ = TRACER.set(provider.tracer("users-service"));
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("users-service"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            // A span with no `tracing` parent is the child of the current
            // OpenTelemetry context (a call's, a batch's) all the same;
            // entering a span need not make it current too.
            .with_context_activation(false)
            .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(exported)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(Telemetry {
        _logs: guard,
        traces,
    })
}

/// Whether the standard variables leave traces on.
fn traces_enabled() -> bool {
    let var = |name| std::env::var(name).unwrap_or_default().to_ascii_lowercase();
    var("OTEL_SDK_DISABLED") != "true" && var("OTEL_TRACES_EXPORTER") != "none"
}

/// The exporter to `endpoint`, batching on a thread of its own. The SDK
/// reads the other OTEL_* variables itself: OTEL_EXPORTER_OTLP_TIMEOUT,
/// _HEADERS and _COMPRESSION, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*,
/// OTEL_SPAN_*_COUNT_LIMIT, OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME.
fn provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("--otlp-endpoint: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_resource(resource())
        .build())
}

/// `service.name` users-service and the version, under what
/// OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME say.
fn resource() -> Resource {
    let mut builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", "users-service"),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    // Without the variable it would name the service "unknown_service".
    if std::env::var("OTEL_SERVICE_NAME").is_ok_and(|name| !name.is_empty()) {
        builder = builder.with_detector(Box::new(SdkProvidedResourceDetector));
    }
    builder.build()
}

/// The caller's span that `headers` name (W3C `traceparent` and
/// `tracestate`) as the parent of a call's span; an empty context (the call
/// starts a trace) when they name none.
pub fn caller_context(headers: &http::HeaderMap) -> Context {
    static PROPAGATOR: std::sync::LazyLock<TraceContextPropagator> =
        std::sync::LazyLock::new(TraceContextPropagator::new);
    if !headers.contains_key("traceparent") {
        return Context::new();
    }
    PROPAGATOR.extract(&HeaderExtractor(headers))
}

/// The current OpenTelemetry context (a call's span, while the call runs),
/// when spans are exported.
pub fn current_context() -> Option<Context> {
    tracer().map(|_| Context::current())
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// An error and the chain of its causes, on one line (for command-line
/// messages, where there is no log to hold the rest).
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A log line that repeats, written at most once a period: the first time
/// at once, later ones as one line with how many happened since. During an
/// outage every failing call would otherwise log its cause.
#[derive(Debug)]
pub struct Summarized {
    period: std::time::Duration,
    state: std::sync::Mutex<SummaryState>,
}

#[derive(Debug)]
struct SummaryState {
    last: Option<std::time::Instant>,
    /// Occurrences since the last line written.
    since: u64,
}

impl Summarized {
    pub const fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            state: std::sync::Mutex::new(SummaryState {
                last: None,
                since: 0,
            }),
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due, `n` being the
    /// occurrences it stands for (this one included).
    pub fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().expect("summary lock");
        state.since += 1;
        let now = std::time::Instant::now();
        if state.last.is_some_and(|last| now - last < self.period) {
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_line_is_written_once_a_period_with_its_count() {
        let summary = Summarized::new(std::time::Duration::from_millis(200));
        assert_eq!(summary.due(), Some(1));
        for _ in 0..99 {
            assert_eq!(summary.due(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(220));
        assert_eq!(summary.due(), Some(100));
        assert_eq!(summary.due(), None);
    }
}
