//! One log line per call: method, gRPC code and duration.
//!
//! A failed call usually carries its `grpc-status` in the response headers
//! (a trailers-only response), but a successful one sends it in the trailers
//! after the body; so the line is written when the status is seen, wherever
//! it comes, or when the body is dropped without one (the client went away).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use http::HeaderMap;
use http_body::{Body, Frame};
use tonic::Code;
use tower::{Layer, Service};

#[derive(Debug, Clone, Copy, Default)]
pub struct CallLogLayer;

impl<S> Layer<S> for CallLogLayer {
    type Service = CallLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CallLog<S> {
    inner: S,
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

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = Call {
            method: request.uri().path().to_owned(),
            started: Instant::now(),
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let pending = match status_code(response.headers()) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(response.map(|inner| LoggedBody { inner, pending }))
        })
    }
}

#[derive(Debug)]
struct Call {
    method: String,
    started: Instant,
}

impl Call {
    fn finish(&self, code: Code) {
        // Milliseconds with microsecond resolution.
        let duration_ms = (self.started.elapsed().as_micros() as f64) / 1000.0;
        let method = self.method.as_str();
        let code_name = format!("{code:?}");
        match code {
            Code::Internal | Code::Unknown | Code::DataLoss => tracing::error!(
                grpc.method = method,
                grpc.code = code_name,
                duration_ms,
                "call"
            ),
            _ => tracing::info!(
                grpc.method = method,
                grpc.code = code_name,
                duration_ms,
                "call"
            ),
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
    pending: Option<Call>,
}

impl<B: Body + Unpin> Body for LoggedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(code) = frame.trailers_ref().and_then(status_code) {
                if let Some(call) = self.pending.take() {
                    call.finish(code);
                }
            }
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

impl<B> Drop for LoggedBody<B> {
    fn drop(&mut self) {
        // The body ended without a status: the client cancelled or the
        // connection broke.
        if let Some(call) = self.pending.take() {
            call.finish(Code::Cancelled);
        }
    }
}
