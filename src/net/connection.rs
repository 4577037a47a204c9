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
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, watch},
};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpConnectInfo;
use tower::Service;

use super::{BoxError, ClientName, ConnectionLimits, tls::HANDSHAKE_TIMEOUT};
use crate::metrics::Metrics;

/// Serves one accepted connection until it closes; with `tls`, once its
/// handshake is done.
#[allow(clippy::too_many_arguments)]
pub(super) async fn serve<S, B>(
    stream: TcpStream,
    peer: SocketAddr,
    service: S,
    limits: Arc<ConnectionLimits>,
    metrics: Arc<Metrics>,
    tls: Option<TlsAcceptor>,
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
    let info = TcpConnectInfo {
        local_addr: stream.local_addr().ok(),
        remote_addr: Some(peer),
    };
    let Some(tls) = tls else {
        let tracked = Tracked::new(service, info, None, &limits);
        return serve_http(stream, peer, tracked, &limits, draining).await;
    };
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%peer, %error, "TLS handshake failed");
                metrics.tls_handshake_failed();
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake took too long");
                metrics.tls_handshake_failed();
                return;
            }
        },
        _ = super::draining_begins(&mut draining) => return,
    };
    let client = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(<[_]>::first)
        .and_then(super::tls::client_name)
        .map(|name| ClientName(name.into()));
    let tracked = Tracked::new(service, info, client, &limits);
    serve_http(stream, peer, tracked, &limits, draining).await;
}

/// Serves HTTP/2 (gRPC) or HTTP/1.1 (gRPC-Web), whichever the client
/// speaks, on `io` until the connection closes.
async fn serve_http<I, S, B>(
    io: I,
    peer: SocketAddr,
    tracked: Tracked<S>,
    limits: &ConnectionLimits,
    mut draining: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let activity = Arc::clone(&tracked.activity);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A browser's headers must arrive within the keepalive timeout.
        .header_read_timeout(limits.keepalive_timeout)
        .max_buf_size((limits.max_header_list_bytes as usize).max(MIN_HTTP1_BUFFER));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_header_list_size(limits.max_header_list_bytes)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(limits.keepalive_interval)
        .keep_alive_timeout(limits.keepalive_timeout);
    let connection = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(tracked));
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

/// The smallest read buffer hyper's HTTP/1.1 allows.
const MIN_HTTP1_BUFFER: usize = 8192;

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
/// addresses (and client certificate's name) and counts the calls in
/// progress.
#[derive(Debug, Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    info: TcpConnectInfo,
    client: Option<ClientName>,
    max_http1_body: usize,
    http1_body_timeout: Duration,
}

impl<S> Tracked<S> {
    fn new(
        inner: S,
        info: TcpConnectInfo,
        client: Option<ClientName>,
        limits: &ConnectionLimits,
    ) -> Self {
        Self {
            inner,
            activity: Arc::new(Activity::new()),
            info,
            client,
            max_http1_body: limits.max_http1_body_bytes,
            http1_body_timeout: limits.http1_body_timeout,
        }
    }
}

/// The body of an HTTP/1.1 request, shared by the call and by the
/// connection, which reads what the call left unread.
#[derive(Debug, Clone)]
struct SharedBody(Arc<Mutex<Incoming>>);

impl Body for SharedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut body = self.0.lock().expect("request body lock");
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().expect("request body lock").is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().expect("request body lock").size_hint()
    }
}

impl SharedBody {
    /// Reads and drops what is left of the body, at most `max` bytes within
    /// `timeout`: a call answered from its headers alone (UNAUTHENTICATED)
    /// would otherwise have its connection closed under a client still
    /// sending the body. Nothing is kept; past the limits the connection
    /// closes as it would have.
    async fn drain(self, max: usize, timeout: Duration) {
        use http_body_util::BodyExt;
        if self.is_end_stream() {
            return;
        }
        let mut body = self;
        let mut read = 0;
        let _ = tokio::time::timeout(timeout, async {
            while read <= max {
                match body.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    _ => return,
                }
            }
        })
        .await;
    }
}

impl<S, B> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
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
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(self.info.clone());
        if let Some(client) = &self.client {
            parts.extensions.insert(client.clone());
        }
        if parts.version == http::Version::HTTP_2 {
            let response = self
                .inner
                .call(Request::from_parts(parts, tonic::body::Body::new(body)));
            return Box::pin(async move {
                Ok(response.await?.map(|inner| TrackedBody::new(inner, guard)))
            });
        }
        let inner = &mut self.inner;
        let (max, timeout) = (self.max_http1_body, self.http1_body_timeout);
        let body = SharedBody(Arc::new(Mutex::new(body)));
        let response = inner.call(Request::from_parts(
            parts,
            tonic::body::Body::new(body.clone()),
        ));
        Box::pin(async move {
            let response = response.await?;
            body.drain(max, timeout).await;
            Ok(response.map(|inner| TrackedBody::new(inner, guard)))
        })
    }
}

/// A response body that ends its call when it ends.
#[derive(Debug)]
pub(super) struct TrackedBody<B> {
    inner: B,
    _guard: CallGuard,
}

impl<B> TrackedBody<B> {
    fn new(inner: B, guard: CallGuard) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
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
