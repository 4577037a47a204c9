//! Authentication and per-caller rate limiting of `users.v1` calls.
//!
//! Every call to a `users.v1` service needs `authorization: Bearer <token>`.
//! The verified caller goes into the request's extensions as a
//! [`Principal`](crate::auth::Principal); a call without valid credentials is
//! answered UNAUTHENTICATED here and reaches no handler and no query. Health
//! and reflection pass through untouched.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tonic::{Status, transport::server::TcpConnectInfo};

use crate::net::ClientName;
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::call_log::{CallerInfo, CallerSlot};
use crate::auth::{
    Principal,
    authenticator::{AuthFailure, Authenticator},
};
use crate::metrics::{Metrics, Rejection};
use crate::quota::CallerQuotas;

type RateLimits = CallerQuotas;

/// Paths that need a caller.
const PROTECTED_PREFIX: &str = "/users.v1.";

#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
    limits: Option<Arc<RateLimits>>,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    /// `limits` is `None` when per-caller limiting is switched off.
    pub fn new(
        authenticator: Arc<Authenticator>,
        limits: Option<Arc<RateLimits>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            authenticator,
            limits,
            metrics,
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if !request.uri().path().starts_with(PROTECTED_PREFIX) {
            return Box::pin(self.inner.call(request));
        }
        // The clone that was made ready goes with this call (tower's rule).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            let peer = request
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
                .map(|addr| addr.ip());
            let client = request
                .extensions()
                .get::<ClientName>()
                .map(|ClientName(name)| name.as_ref());
            let outcome = layer.authenticator.authenticate(header, peer, client).await;
            match outcome {
                Ok(authenticated) => {
                    if let Some(slot) = request.extensions().get::<CallerSlot>() {
                        slot.set(caller_info(&authenticated.principal));
                    }
                    if let Some(wait) = layer
                        .over_quota(
                            || authenticated.principal.rate_key(),
                            authenticated.rate_limit_per_second,
                        )
                        .await
                    {
                        return Ok(exhausted(wait));
                    }
                    request.extensions_mut().insert(authenticated.principal);
                    inner.call(request).await
                }
                Err(AuthFailure::Throttled(wait)) => {
                    layer.metrics.rejected(Rejection::AuthFailures);
                    Ok(exhausted(wait))
                }
                Err(failure) => {
                    // Unauthenticated callers share a quota per address, which
                    // bounds how fast anyone can guess.
                    let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
                    if let Some(wait) = layer.over_quota(|| format!("peer:{peer}"), None).await {
                        return Ok(exhausted(wait));
                    }
                    let status = match failure {
                        AuthFailure::Unavailable(error) => error.into(),
                        AuthFailure::Unauthenticated | AuthFailure::Throttled(_) => {
                            Status::unauthenticated("missing or invalid credentials")
                        }
                    };
                    Ok(status.into_http())
                }
            }
        })
    }
}

impl AuthLayer {
    /// `caller` names the quota's owner; it is built only when limits are on.
    async fn over_quota(
        &self,
        caller: impl FnOnce() -> String,
        own: Option<std::num::NonZeroU32>,
    ) -> Option<Duration> {
        let wait = self.limits.as_ref()?.check(caller(), own).await.err()?;
        self.metrics.rejected(Rejection::RateLimit);
        Some(wait)
    }
}

fn caller_info(principal: &Principal) -> CallerInfo {
    CallerInfo {
        id: principal.id(),
        tenant: match principal {
            Principal::Tenant { tenant_id, .. } => Some(*tenant_id),
            Principal::Admin { .. } | Principal::User { .. } => None,
        },
    }
}

/// RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` (never HTTP 429, which
/// gRPC clients would turn into UNAVAILABLE and retry at once).
fn exhausted(wait: Duration) -> http::Response<tonic::body::Body> {
    // Round up so a client that waits exactly this long gets through.
    let wait = Duration::from_millis(wait.as_millis() as u64 + 1);
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "rate limit exceeded, retry after the delay in RetryInfo",
        ErrorDetails::with_retry_info(Some(wait)),
    )
    .into_http()
}
