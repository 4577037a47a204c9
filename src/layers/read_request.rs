//! Reads the request message of every call whose client sends one message
//! (unary and server-streaming methods), within `--request-read-timeout`
//! and `--max-request-bytes`, before the call goes on to take an in-flight
//! slot.
//!
//! A call whose client sends headers but no body (or a body that trickles)
//! thus waits here holding nothing shared: it cannot keep other callers'
//! calls out by occupying the in-flight limit, and it is answered
//! DEADLINE_EXCEEDED once the read timeout passes. Client-streaming and
//! bidirectional methods (reflection) read as they go, as before.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use tonic::Status;
use tower::{Layer, Service};

use crate::methods;

/// The length prefix gRPC puts before each message.
const FRAME_HEADER: usize = 5;

#[derive(Debug, Clone)]
pub struct ReadRequestLayer {
    timeout: Duration,
    max_message_bytes: usize,
}

impl ReadRequestLayer {
    pub fn new(timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            timeout,
            max_message_bytes,
        }
    }
}

impl<S> Layer<S> for ReadRequestLayer {
    type Service = ReadRequest<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadRequest {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadRequest<S> {
    inner: S,
    layer: ReadRequestLayer,
}

impl<S> Service<http::Request<tonic::body::Body>> for ReadRequest<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let method = methods::lookup(request.uri().path());
        if !method.is_known() || method.kind.streams_requests() {
            return Box::pin(self.inner.call(request));
        }
        // The clone that was made ready goes with this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let limit = layer.max_message_bytes + FRAME_HEADER;
            let status = match tokio::time::timeout(layer.timeout, read(body, limit)).await {
                Ok(Ok(bytes)) => {
                    let body = tonic::body::Body::new(http_body_util::Full::new(bytes));
                    return inner.call(http::Request::from_parts(parts, body)).await;
                }
                Ok(Err(Unread::TooLarge)) => Status::out_of_range(format!(
                    "the request message is larger than the server accepts ({} bytes)",
                    layer.max_message_bytes
                )),
                Ok(Err(Unread::Broken)) => Status::cancelled("the request stream was reset"),
                Err(_) => Status::deadline_exceeded(format!(
                    "the request message did not arrive within {} s",
                    layer.timeout.as_secs_f64()
                )),
            };
            Ok(status.into_http())
        })
    }
}

/// Why a request body was not read.
enum Unread {
    TooLarge,
    Broken,
}

/// The whole body, if it ends within `limit` bytes.
async fn read(mut body: tonic::body::Body, limit: usize) -> Result<Bytes, Unread> {
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Unread::Broken)?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(Unread::TooLarge);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes.freeze())
}
