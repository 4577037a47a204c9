//! One HTTP/2 connection: its settings, its calls, and when it closes.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, watch},
};
use tonic::transport::server::TcpConnectInfo;
use tower::Service;

use super::{BoxError, ConnectionLimits};
use crate::metrics::Metrics;

/// Serves one accepted connection until it closes.
pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    limits: Arc<ConnectionLimits>,
    metrics: Arc<Metrics>,
    mut draining: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) where
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let _open = metrics.connection_opened();
    // Small writes (a response's trailers) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let tracked = Tracked {
        inner: service,
        activity: Arc::clone(&activity),
        info: TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: Some(peer),
        },
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(tracked));
    tokio::pin!(connection);
    let mut idle_check = tokio::time::interval(
        (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5)),
    );
    let mut closing = false;
    // An idle connection whose peer does not finish closing (or never sent
    // the HTTP/2 preface) is dropped this long after GOAWAY.
    let mut give_up: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                break;
            }
            _ = super::draining_begins(&mut draining), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
            _ = idle_check.tick(), if !closing => {
                if activity.idle_for().is_some_and(|idle| idle >= limits.idle_timeout) {
                    closing = true;
                    give_up = Some(tokio::time::Instant::now() + limits.keepalive_timeout);
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(tokio::time::Instant::now)), if give_up.is_some() => {
                tracing::debug!(%peer, "idle connection did not close after GOAWAY; dropping it");
                break;
            }
        }
    }
}

/// Per-stream receive window: how much of a request a client may send
/// before the server reads it.
const STREAM_WINDOW: u32 = 256 * 1024;
/// Per-connection receive window.
const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Calls in progress on a connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    calls: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            calls: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    /// How long the connection has had no call; `None` while it has one.
    fn idle_for(&self) -> Option<Duration> {
        if self.calls.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.idle_since.lock().expect("activity lock").elapsed())
    }
}

/// Held for as long as a call is in progress: from its headers until its
/// response body ends or is dropped.
#[derive(Debug)]
struct CallGuard(Arc<Activity>);

impl CallGuard {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.calls.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(activity))
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.calls.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock().expect("activity lock") = Instant::now();
        }
    }
}

/// The service of one connection: gives every request the connection's
/// addresses and counts the calls in progress.
#[derive(Debug, Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: TcpConnectInfo,
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let guard = CallGuard::start(&self.activity);
        let mut request = request.map(tonic::body::Body::new);
        request.extensions_mut().insert(self.info.clone());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        })
    }
}

/// A response body that ends its call when it ends.
#[derive(Debug)]
pub(super) struct TrackedBody<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner)
            .poll_frame(cx)
            .map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Logs refused connections at most once a second, with how many.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    since_log: u64,
    last_log: Option<Instant>,
}

impl Refusals {
    pub(super) fn note(&mut self, max_connections: usize) {
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                refused = self.since_log,
                max_connections,
                "connection limit reached: closing new connections"
            );
            self.since_log = 0;
            self.last_log = Some(Instant::now());
        }
    }
}
