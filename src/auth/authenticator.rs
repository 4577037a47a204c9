//! Verifies bearer tokens. API keys are looked up in the database at most
//! once per key and cache period; a key that changes (revoked, demoted) is
//! forgotten at once on every replica, which Postgres tells of it
//! ([`Authenticator::follow_key_changes`]), or within the cache period when
//! a replica cannot listen. JWTs are verified locally, and their user's
//! active flag is looked up as keys are (within the cache period).
//!
//! Failed authentications are counted per address (an IPv4 address, or the
//! /64 of an IPv6 one). A key id this replica has never seen costs a
//! database lookup, so an address over its failure budget gets no lookup for
//! one: its calls are refused with RESOURCE_EXHAUSTED before any database
//! work, and ids found unknown are remembered for a while. Keys that were
//! valid before are looked up whatever their address's budget, so a flood
//! from one address never locks out the services that share it behind a
//! load balancer.

use std::{net::IpAddr, num::NonZeroU32, sync::Arc, time::Duration};

use moka::future::Cache;
use uuid::Uuid;

use super::{
    Authenticated, Holder, Principal, Role,
    api_key::ApiKeyToken,
    jwt::{Grant, JwtVerifier},
};
use crate::clock::Clock;
use crate::error::Error;
use crate::quota::Quotas;
use crate::store::{
    api_keys,
    db::{self, DbPool},
    users,
};

/// Why a call is not authenticated.
#[derive(Debug)]
pub enum AuthFailure {
    /// Missing, malformed, unknown, revoked or expired credentials, or the
    /// token of a deactivated user: all the same to the caller.
    Unauthenticated,
    /// The caller's address failed too often lately; its credentials were
    /// not checked. Retry after the delay.
    Throttled(Duration),
    /// The credentials could not be checked (database down).
    Unavailable(Error),
}

/// What the cache keeps of a key: enough to verify and authorize.
#[derive(Debug, Clone)]
struct CachedKey {
    secret_sha256: Vec<u8>,
    revoked: bool,
    /// It stops working then, cached or not.
    expire_time: Option<chrono::DateTime<chrono::Utc>>,
    /// It works only from a client certificate with this name.
    client_name: Option<String>,
    authenticated: Authenticated,
}

/// How many failed authentications an address may have.
#[derive(Debug, Clone, Copy)]
pub struct FailureBudget {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// How long a key id found unknown is answered from memory.
const UNKNOWN_TTL: Duration = Duration::from_secs(60);
/// Most unknown key ids remembered; only lookups within the failure budget
/// add to them.
const MAX_UNKNOWN: u64 = 10_000;
/// A key id that was valid is looked up whatever its address's budget for
/// this long after its last use.
const KNOWN_IDLE: Duration = Duration::from_secs(24 * 3600);
/// Most keys and end users cached.
const MAX_CACHED: u64 = 100_000;

pub struct Authenticator {
    pool: DbPool,
    jwt: Option<JwtVerifier>,
    keys: Cache<String, Arc<CachedKey>>,
    unknown: Cache<String, ()>,
    known: Cache<String, ()>,
    /// End users' active flag, by user id; `None` for an id with no user.
    users: Cache<Uuid, Option<bool>>,
    failures: Quotas<IpAddr>,
    clock: Clock,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt)
            .finish_non_exhaustive()
    }
}

/// The channel on which Postgres tells the id of a key that changed (see
/// the migration `api_keys_notify`).
pub const KEY_CHANGES: &str = "api_keys";

impl Authenticator {
    /// Forgets each key that Postgres tells has changed (revoked, another
    /// role, tenant, secret or rate limit, deleted), by whichever replica or
    /// operator, so that its next call looks it up again; and every key
    /// whenever it starts listening (changes told meanwhile were lost).
    /// While it cannot listen, a key is trusted for the cache period at
    /// most, as without it. `notified` counts each notification. Runs until
    /// aborted.
    pub async fn follow_key_changes(
        self: Arc<Self>,
        config: tokio_postgres::Config,
        notified: impl Fn() + Send + Sync + 'static,
    ) {
        let (keys, all) = (self.keys.clone(), self.keys.clone());
        db::listen(
            config,
            KEY_CHANGES,
            move || all.invalidate_all(),
            move |id| {
                notified();
                let (keys, id) = (keys.clone(), id.to_owned());
                tokio::spawn(async move { keys.invalidate(&id).await });
            },
        )
        .await;
    }

    pub fn new(
        pool: DbPool,
        jwt: Option<JwtVerifier>,
        cache_ttl: Duration,
        failures: FailureBudget,
        clock: Clock,
    ) -> Self {
        Self {
            pool,
            jwt,
            keys: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(cache_ttl)
                .build(),
            unknown: Cache::builder()
                .max_capacity(MAX_UNKNOWN)
                .time_to_live(UNKNOWN_TTL)
                .build(),
            known: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_idle(KNOWN_IDLE)
                .build(),
            users: Cache::builder()
                .max_capacity(MAX_CACHED)
                .time_to_live(cache_ttl)
                .build(),
            failures: Quotas::new(failures.per_second, failures.burst),
            clock,
        }
    }

    /// Verifies the value of an `authorization` header of a call from
    /// `peer`, whose client certificate (mutual TLS) carries `client`.
    pub async fn authenticate(
        &self,
        header: Option<&str>,
        peer: Option<IpAddr>,
        client: Option<&str>,
    ) -> Result<Authenticated, AuthFailure> {
        let outcome = self.verify(header, peer, client).await;
        if let Err(AuthFailure::Unauthenticated) = outcome {
            // Counted after the fact: the budget only decides whether a
            // never-seen key id is worth a lookup.
            let _ = self.failures.check(address(peer), None);
        }
        outcome
    }

    async fn verify(
        &self,
        header: Option<&str>,
        peer: Option<IpAddr>,
        client: Option<&str>,
    ) -> Result<Authenticated, AuthFailure> {
        let token = header
            .and_then(bearer_token)
            .ok_or(AuthFailure::Unauthenticated)?;
        if let Some(key) = ApiKeyToken::parse(token) {
            return self.verify_key(&key, peer, client).await;
        }
        let jwt = self.jwt.as_ref().ok_or(AuthFailure::Unauthenticated)?;
        let verified = jwt
            .verify(token)
            .await
            .ok_or(AuthFailure::Unauthenticated)?;
        let user_id = verified.user_id;
        // A deactivated or deleted user's tokens stop working within the cache period;
        // an id with no user may call (and finds nothing).
        let active = self
            .users
            .try_get_with(user_id, self.load_user(user_id))
            .await
            .map_err(|e| AuthFailure::Unavailable(Error::Unavailable(e.to_string().into())))?;
        if active == Some(false) {
            return Err(AuthFailure::Unauthenticated);
        }
        let holder = Holder::User(user_id);
        let principal = match verified.grant {
            None => Principal::User { user_id },
            Some(Grant::Admin) => Principal::Admin { holder },
            Some(Grant::Tenant {
                tenant_id,
                can_write,
            }) => Principal::Tenant {
                holder,
                tenant_id,
                can_write,
            },
        };
        Ok(Authenticated {
            principal,
            rate_limit_per_second: None,
        })
    }

    async fn verify_key(
        &self,
        token: &ApiKeyToken,
        peer: Option<IpAddr>,
        client: Option<&str>,
    ) -> Result<Authenticated, AuthFailure> {
        let id = token.id();
        let key = match self.keys.get(id).await {
            Some(key) => key,
            None => {
                if self.unknown.contains_key(id) {
                    return Err(AuthFailure::Unauthenticated);
                }
                // Concurrent calls with the same id share one lookup, and
                // only that lookup counts against the budget.
                let loaded = self
                    .keys
                    .try_get_with(id.to_owned(), async {
                        if !self.known.contains_key(id) {
                            self.failures
                                .check(address(peer), None)
                                .map_err(LoadError::Throttled)?;
                        }
                        self.load_key(id).await
                    })
                    .await;
                match loaded {
                    Ok(key) => {
                        self.known.insert(id.to_owned(), ()).await;
                        key
                    }
                    Err(error) => {
                        return Err(match &*error {
                            LoadError::Unknown => {
                                self.unknown.insert(id.to_owned(), ()).await;
                                AuthFailure::Unauthenticated
                            }
                            LoadError::Throttled(wait) => AuthFailure::Throttled(*wait),
                            LoadError::Database(e) => AuthFailure::Unavailable(e.duplicate()),
                        });
                    }
                }
            }
        };
        let expired = key
            .expire_time
            .is_some_and(|expire_time| (self.clock)() >= expire_time);
        // A bound key is refused, like a wrong one, from any other client.
        let from_its_client = key
            .client_name
            .as_deref()
            .is_none_or(|bound| client == Some(bound));
        if !key.revoked && !expired && from_its_client && token.matches(&key.secret_sha256) {
            Ok(key.authenticated.clone())
        } else {
            Err(AuthFailure::Unauthenticated)
        }
    }

    async fn load_key(&self, id: &str) -> Result<Arc<CachedKey>, LoadError> {
        let mut conn = db::checkout(&self.pool).await.map_err(Error::from)?;
        let row = api_keys::load_for_use(&mut conn, id, (self.clock)())
            .await
            .map_err(Error::from)?;
        let Some(row) = row else {
            conn.release();
            return Err(LoadError::Unknown);
        };
        // A deleted tenant's key is refused like a revoked one, for one
        // cache period, so that it works again soon after an undelete.
        let tenant_deleted = match row.tenant_id {
            Some(tenant) => api_keys::tenant_deleted(&mut conn, tenant)
                .await
                .map_err(Error::from)?,
            None => false,
        };
        conn.release();
        let principal = match (Role::parse(&row.role), row.tenant_id) {
            (Some(Role::Admin), _) => Principal::Admin {
                holder: Holder::Key(row.id),
            },
            (Some(role @ (Role::Editor | Role::Viewer)), Some(tenant_id)) => Principal::Tenant {
                holder: Holder::Key(row.id),
                tenant_id,
                can_write: role == Role::Editor,
            },
            // The table's checks make this unreachable; refuse rather than guess.
            _ => return Err(LoadError::Unknown),
        };
        Ok(Arc::new(CachedKey {
            secret_sha256: row.secret_sha256,
            revoked: row.revoked_at.is_some() || tenant_deleted,
            expire_time: row.expire_time,
            client_name: row.client_name,
            authenticated: Authenticated {
                principal,
                rate_limit_per_second: row
                    .rate_limit_per_second
                    .and_then(|n| u32::try_from(n).ok())
                    .and_then(NonZeroU32::new),
            },
        }))
    }

    async fn load_user(&self, id: Uuid) -> Result<Option<bool>, Error> {
        let mut conn = db::checkout(&self.pool).await?;
        let active = users::active_flag(&mut conn, id).await?;
        conn.release();
        Ok(active)
    }
}

/// Why a key could not be loaded.
#[derive(Debug)]
enum LoadError {
    /// No usable key has this id.
    Unknown,
    /// The caller's address is over its failure budget: not looked up.
    Throttled(Duration),
    Database(Error),
}

impl From<Error> for LoadError {
    fn from(error: Error) -> Self {
        Self::Database(error)
    }
}

/// The address failures are counted under: an IPv4 address, or the /64
/// network of an IPv6 one (one host usually has a whole /64).
fn address(peer: Option<IpAddr>) -> IpAddr {
    match peer {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        Some(IpAddr::V6(v6)) => IpAddr::V4(v6.to_ipv4_mapped().expect("checked above")),
        Some(v4) => v4,
        None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive).
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_failures_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address(Some(a)), address(Some(b)));
        assert_ne!(address(Some(a)), address(Some(other)));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(
            address(Some(mapped)),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
    }
}
