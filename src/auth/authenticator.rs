//! Verifies bearer tokens. API keys are looked up in the database at most
//! once per key and cache period (so a revoked key stops working within that
//! period on every replica); JWTs are verified locally.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use moka::future::Cache;

use super::{Authenticated, Principal, Role, api_key::ApiKeyToken, jwt::JwtVerifier};
use crate::error::Error;
use crate::grpc::Clock;
use crate::store::{api_keys, db::DbPool};

/// Why a call is not authenticated.
#[derive(Debug)]
pub enum AuthFailure {
    /// Missing, malformed, unknown, revoked or expired credentials: all the
    /// same to the caller.
    Unauthenticated,
    /// The key could not be checked (database down).
    Unavailable(Error),
}

/// What the cache keeps of a key: enough to verify and authorize, or `None`
/// for an unknown id (so guessing ids does not reach the database each time).
#[derive(Debug, Clone)]
struct CachedKey {
    secret_sha256: Vec<u8>,
    revoked: bool,
    authenticated: Authenticated,
}

pub struct Authenticator {
    pool: DbPool,
    jwt: Option<JwtVerifier>,
    keys: Cache<String, Option<Arc<CachedKey>>>,
    clock: Clock,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(pool: DbPool, jwt: Option<JwtVerifier>, cache_ttl: Duration, clock: Clock) -> Self {
        Self {
            pool,
            jwt,
            keys: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cache_ttl)
                .build(),
            clock,
        }
    }

    /// Verifies the value of an `authorization` header.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Authenticated, AuthFailure> {
        let token = header
            .and_then(bearer_token)
            .ok_or(AuthFailure::Unauthenticated)?;
        if let Some(key) = ApiKeyToken::parse(token) {
            return self.verify_key(&key).await;
        }
        match &self.jwt {
            Some(jwt) => jwt
                .verify(token)
                .map(|user_id| Authenticated {
                    principal: Principal::User { user_id },
                    rate_limit_per_second: None,
                })
                .ok_or(AuthFailure::Unauthenticated),
            None => Err(AuthFailure::Unauthenticated),
        }
    }

    async fn verify_key(&self, token: &ApiKeyToken) -> Result<Authenticated, AuthFailure> {
        let cached = self
            .keys
            .try_get_with(token.id().to_owned(), self.load(token.id()))
            .await
            .map_err(|e| AuthFailure::Unavailable(Error::Unavailable(e.to_string().into())))?;
        match cached {
            Some(key) if !key.revoked && token.matches(&key.secret_sha256) => {
                Ok(key.authenticated.clone())
            }
            _ => Err(AuthFailure::Unauthenticated),
        }
    }

    async fn load(&self, id: &str) -> Result<Option<Arc<CachedKey>>, Error> {
        let mut conn = self.pool.get().await?;
        let Some(row) = api_keys::load_for_use(&mut conn, id, (self.clock)()).await? else {
            return Ok(None);
        };
        let principal = match (Role::parse(&row.role), row.tenant_id) {
            (Some(Role::Admin), _) => Principal::Admin { key_id: row.id },
            (Some(role @ (Role::Editor | Role::Viewer)), Some(tenant_id)) => Principal::TenantKey {
                key_id: row.id,
                tenant_id,
                can_write: role == Role::Editor,
            },
            // The table's checks make this unreachable; refuse rather than guess.
            _ => return Ok(None),
        };
        Ok(Some(Arc::new(CachedKey {
            secret_sha256: row.secret_sha256,
            revoked: row.revoked_at.is_some(),
            authenticated: Authenticated {
                principal,
                rate_limit_per_second: row
                    .rate_limit_per_second
                    .and_then(|n| u32::try_from(n).ok())
                    .and_then(NonZeroU32::new),
            },
        })))
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
