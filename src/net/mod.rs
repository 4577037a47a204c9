//! The network side of the server: accepting TCP connections and serving
//! HTTP/2 on each, with the limits a service that every other service calls
//! needs to stay up.
//!
//! - At most `max_connections` connections are open at once; one more is
//!   closed as soon as it is accepted (and counted), so a flood of idle
//!   connections cannot exhaust memory or file descriptors.
//! - Accept errors that mean the process is out of something (file
//!   descriptors, memory) pause accepting with exponential back-off instead
//!   of retrying in a tight loop.
//! - Each connection advertises `max_concurrent_streams`, caps its header
//!   list, pings its peer (`keepalive_interval`, closed after
//!   `keepalive_timeout` without an answer) and is closed with GOAWAY once
//!   it has had no call for `idle_timeout`.
//! - On shutdown the listener closes at once (new connections are refused
//!   by the kernel, so clients move to another replica) and every
//!   connection gets GOAWAY; calls in progress finish. Dropping the future
//!   of [`serve`] ends every connection.
//! - HTTP/2 carries gRPC; HTTP/1.1 carries only gRPC-Web (browsers). What
//!   an HTTP/1.1 call leaves of its request body (a call refused from its
//!   headers) is read and dropped once it is answered, within
//!   `max_http1_body_bytes` and `http1_body_timeout`: the connection would
//!   otherwise close under a client still sending it. Nothing is buffered,
//!   and nothing is read before the caller is known.
//! - With TLS, each connection's handshake runs in its own task, bounded by
//!   [`tls::HANDSHAKE_TIMEOUT`]; a client certificate's name goes with
//!   every call of the connection as a [`ClientName`].

mod connection;
pub mod tls;

use std::{convert::Infallible, io, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
    task::JoinSet,
};
use tower::Service;

use crate::metrics::Metrics;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Limits on connections and on what each may hold.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Most of an HTTP/1.1 (gRPC-Web) call's request body read and dropped
    /// after its answer.
    pub max_http1_body_bytes: usize,
    /// Longest wait for that.
    pub http1_body_timeout: Duration,
}

/// The name in the certificate a client presented (mutual TLS): its
/// subject's common name, else a URI or DNS subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientName(pub Arc<str>);

/// First pause after an accept error that is not about one connection.
const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts while they keep failing.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `service` on every connection `listener` accepts, until `draining`
/// turns true; then stops accepting, asks every connection to close
/// (GOAWAY), and returns once they all have.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    tls: Option<Arc<tls::Tls>>,
    draining: watch::Receiver<bool>,
) where
    S: Service<Request<tonic::body::Body>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = MIN_BACKOFF;
    let mut refused = connection::Refusals::default();
    let mut stop = draining.clone();
    loop {
        tokio::select! {
            biased;
            _ = draining_begins(&mut stop) => break,
            Some(_) = connections.join_next() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    backoff = MIN_BACKOFF;
                    let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                        // Closing it at once tells the client to go elsewhere.
                        drop(stream);
                        metrics.connection_refused();
                        refused.note(limits.max_connections);
                        continue;
                    };
                    connections.spawn(connection::serve(
                        stream,
                        peer,
                        service.clone(),
                        Arc::clone(&limits),
                        Arc::clone(&metrics),
                        tls.as_ref().map(|tls| tls.acceptor()),
                        draining.clone(),
                        permit,
                    ));
                }
                Err(error) if is_about_one_connection(&error) => {}
                Err(error) => {
                    tracing::warn!(%error, pause = ?backoff, "cannot accept connections; pausing");
                    let mut stop = draining.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = draining_begins(&mut stop) => break,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            },
        }
    }
    // New connections are refused by the kernel from here on.
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Completes once `draining` is true (or its sender is gone).
async fn draining_begins(draining: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not be held across an await.
    let _ = draining.wait_for(|draining| *draining).await.map(|_| ());
}

/// Accept errors that concern only the connection being accepted (it was
/// reset before we took it): the next accept can go ahead at once.
fn is_about_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
