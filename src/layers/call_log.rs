//! One log line and the metrics of every call: method, gRPC code, duration,
//! caller and tenant, request id.
//!
//! A failed call usually carries its `grpc-status` in the response headers
//! (a trailers-only response), but a successful one sends it in the trailers
//! after the body; so the call is recorded when the status is seen, wherever
//! it comes. A call that ends before that (the client reset it, or its
//! connection broke, before an answer or in the middle of a stream) is
//! recorded when it is dropped, as DEADLINE_EXCEEDED if the client's
//! deadline had passed and CANCELLED otherwise: what the client saw. Every
//! call is recorded exactly once.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};
use opentelemetry::{
    Context as TraceContext, KeyValue,
    context::FutureExt as _,
    trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _},
};
use tonic::Code;
use tower::{Layer, Service};
use uuid::Uuid;

use super::deadline::parse_grpc_timeout;
use crate::code::code_name;
use crate::methods::{self, Method};
use crate::metrics::{CallLabels, Metrics};
use crate::net::ClientName;
use crate::telemetry;

/// Header that carries the request id, in and out.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Who made a call, filled in by the authentication layer for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerInfo {
    /// Key id or end-user id; never a secret.
    pub id: String,
    pub tenant: Option<Uuid>,
}

/// Put into every request's extensions; the auth layer sets it once.
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(Arc<OnceLock<CallerInfo>>);

impl CallerSlot {
    pub fn set(&self, caller: CallerInfo) {
        let _ = self.0.set(caller);
    }
}

#[derive(Debug, Clone)]
pub struct CallLogLayer {
    metrics: Arc<Metrics>,
}

impl CallLogLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for CallLogLayer {
    type Service = CallLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLog {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallLog<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| is_safe_request_id(id))
            .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned);
        let caller = CallerSlot::default();
        request.extensions_mut().insert(caller.clone());
        let method = methods::lookup(request.uri().path());
        let started = Instant::now();
        // The call's span in the caller's trace (no request data in it).
        let trace = telemetry::tracer().map(|tracer| {
            let parent = telemetry::caller_context(request.headers());
            let mut span = tracer
                .span_builder(method.path.trim_start_matches('/'))
                .with_kind(SpanKind::Server);
            // Room for the status code, set when the call ends.
            let mut attributes = Vec::with_capacity(4);
            attributes.extend([
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", method.service.as_str()),
                KeyValue::new("rpc.method", method.name.as_str()),
            ]);
            span.attributes = Some(attributes);
            let span = span.start_with_context(tracer, &parent);
            // What the work of the call sees as its current span.
            let context = parent.with_remote_span_context(span.span_context().clone());
            (span, context)
        });
        let (span, context) = trace.unzip();
        let call = Call {
            span,
            client: request.extensions().get::<ClientName>().cloned(),
            labels: self.metrics.call_started(method),
            method,
            request_id,
            caller,
            started,
            client_deadline: request
                .headers()
                .get("grpc-timeout")
                .and_then(|value| parse_grpc_timeout(value.as_bytes()))
                .map(|timeout| started + timeout - deadline_slack(timeout)),
            metrics: Arc::clone(&self.metrics),
        };
        // The call's span is the current context wherever its work runs.
        let response = {
            let _current = context.clone().map(TraceContext::attach);
            self.inner.call(request)
        };
        Box::pin(async move {
            // Recorded on drop if the call ends before its response.
            let mut pending = Pending(Some(call));
            let mut response = match context {
                Some(context) => response.with_context(context).await?,
                None => response.await?,
            };
            let call = pending.0.take().expect("the call is pending");
            if let Ok(value) = HeaderValue::from_str(&call.request_id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            let pending = match status_code(response.headers()) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(response.map(|inner| LoggedBody {
                inner,
                pending: Pending(pending),
            }))
        })
    }
}

/// How much earlier than this server's reckoning a client's deadline may
/// pass: the client started counting when it sent the call, before the
/// call reached this layer (transit, a busy server), and resets the call
/// when its own count runs out. A tenth of the timeout, at most 100 ms, so
/// that a call its client dropped at its deadline is counted as
/// DEADLINE_EXCEEDED rather than CANCELLED.
fn deadline_slack(timeout: std::time::Duration) -> std::time::Duration {
    (timeout / 10).min(std::time::Duration::from_millis(100))
}

/// A client's request id is echoed and logged only if it is short and plain.
fn is_safe_request_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug)]
struct Call {
    /// The call's span, when spans are exported; ends when the call does.
    span: Option<opentelemetry_sdk::trace::Span>,
    method: &'static Method,
    labels: CallLabels,
    request_id: String,
    caller: CallerSlot,
    /// The name in the client's certificate (mutual TLS).
    client: Option<ClientName>,
    started: Instant,
    /// When the client stops waiting, if it said, less
    /// [`deadline_slack`].
    client_deadline: Option<Instant>,
    metrics: Arc<Metrics>,
}

/// A call not recorded yet; recorded when dropped, as the client saw it end.
#[derive(Debug)]
struct Pending(Option<Call>);

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(call) = self.0.take() {
            let code = match call.client_deadline {
                Some(deadline) if Instant::now() >= deadline => Code::DeadlineExceeded,
                _ => Code::Cancelled,
            };
            call.finish(code);
        }
    }
}

impl Call {
    fn finish(self, code: Code) {
        if let Some(mut span) = self.span {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", code as i64));
            // The codes that say the server failed (OpenTelemetry's RPC
            // conventions); the others leave the status unset.
            if matches!(
                code,
                Code::Unknown
                    | Code::DeadlineExceeded
                    | Code::Unimplemented
                    | Code::Internal
                    | Code::Unavailable
                    | Code::DataLoss
            ) {
                span.set_status(Status::error(code_name(code)));
            }
            span.end();
        }
        let elapsed = self.started.elapsed();
        self.metrics.call_handled(self.labels, code, elapsed);
        // Milliseconds with microsecond resolution.
        let duration_ms = (elapsed.as_micros() as f64) / 1000.0;
        let method = self.method.path.as_str();
        let code = code_name(code);
        let caller = self.caller.0.get();
        let caller_id = caller.map_or("", |c| c.id.as_str());
        let tenant = caller
            .and_then(|c| c.tenant)
            .map(|t| t.to_string())
            .unwrap_or_default();
        let request_id = self.request_id.as_str();
        let client = self.client.as_ref().map_or("", |ClientName(name)| name);
        // One event, at a level that says whether the service failed.
        macro_rules! call {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    grpc.method = method,
                    grpc.code = code,
                    duration_ms,
                    caller.id = caller_id,
                    tenant.id = tenant,
                    client.name = client,
                    request.id = request_id,
                    "call"
                )
            };
        }
        match code {
            "INTERNAL" | "UNKNOWN" | "DATA_LOSS" => call!(tracing::Level::ERROR),
            _ => call!(tracing::Level::INFO),
        }
    }
}

fn status_code(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

/// The response body, watched for the trailers that carry the status.
#[derive(Debug)]
pub struct LoggedBody<B> {
    inner: B,
    pending: Pending,
}

impl<B: Body + Unpin> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(code) = frame.trailers_ref().and_then(status_code)
            && let Some(call) = self.pending.0.take()
        {
            call.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
