//! The deadline of every call: the client's (`grpc-timeout`), capped by
//! `--max-call-duration`. A call still running then is dropped (which
//! cancels its statement in Postgres) and answered DEADLINE_EXCEEDED.
//!
//! A call still running when the server gives up on it at the end of its
//! shutdown grace is answered UNAVAILABLE the same way, so that its client
//! retries elsewhere instead of seeing its connection break.
//!
//! The deadline also goes into the request's extensions as a
//! [`CallDeadline`], so that a streaming handler, whose work outlives the
//! response headers, can bound the rest of its stream by it.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tower::{Layer, Service};

/// When a call must be done by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline(pub Instant);

#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    max: Duration,
    abandon: watch::Receiver<bool>,
}

impl DeadlineLayer {
    /// `abandon` turns true when the server gives up on the calls still
    /// running.
    pub fn new(max_call_duration: Duration, abandon: watch::Receiver<bool>) -> Self {
        Self {
            max: max_call_duration,
            abandon,
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            max: self.max,
            abandon: self.abandon.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    max: Duration,
    abandon: watch::Receiver<bool>,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let client = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| parse_grpc_timeout(value.as_bytes()));
        let (allowed, by_client) = match client {
            Some(client) if client < self.max => (client, true),
            _ => (self.max, false),
        };
        let deadline = Instant::now() + allowed;
        request.extensions_mut().insert(CallDeadline(deadline));
        let response = self.inner.call(request);
        let mut abandon = self.abandon.clone();
        Box::pin(async move {
            let given_up = async {
                let _ = abandon.wait_for(|abandoned| *abandoned).await.map(|_| ());
            };
            let outcome = tokio::select! {
                outcome = tokio::time::timeout_at(deadline, response) => outcome,
                () = given_up => {
                    return Ok(tonic::Status::unavailable(
                        "the server is shutting down; retry on another replica",
                    )
                    .into_http());
                }
            };
            match outcome {
                Ok(response) => response,
                Err(_) => {
                    let message = if by_client {
                        "deadline exceeded".to_owned()
                    } else {
                        format!(
                            "the call ran longer than the server allows ({} s)",
                            allowed.as_secs_f64()
                        )
                    };
                    Ok(tonic::Status::deadline_exceeded(message).into_http())
                }
            }
        })
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        assert_eq!(parse_grpc_timeout(b"5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout(b"250m"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout(b"99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [&b""[..], b"S", b"5", b"5s", b"123456789S", b"-1S", b"1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
