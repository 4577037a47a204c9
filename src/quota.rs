//! Call quotas (GCRA, through governor), one per caller: one caller over its
//! quota never slows another.
//!
//! The callers are whoever the key says: an API key, an end user, an
//! address. Their limiters live in a bounded cache, so however many distinct
//! callers show up, memory stays bounded; a caller forgotten after being idle
//! comes back with a full bucket, which is what an idle caller would have
//! anyway.

use std::{hash::Hash, num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

/// Most callers remembered at once.
const MAX_CALLERS: u64 = 100_000;
/// An idle caller is forgotten after this long.
const IDLE: Duration = Duration::from_secs(600);

/// The limiters of every recent caller.
pub struct Quotas<K: Hash + Eq + Send + Sync + 'static> {
    default: Quota,
    callers: moka::sync::Cache<(K, u32), Arc<DefaultDirectRateLimiter>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Send + Sync + 'static> std::fmt::Debug for Quotas<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Send + Sync + 'static> Quotas<K> {
    /// `per_second` calls per second for each caller, with bursts of `burst`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            default: Quota::per_second(per_second).allow_burst(burst),
            callers: moka::sync::Cache::builder()
                .max_capacity(MAX_CALLERS)
                .time_to_idle(IDLE)
                .build(),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one call of `caller`; on refusal, how long to wait before the
    /// next call can pass. `own` is the caller's own quota, if it has one (its
    /// burst is one second's worth).
    pub fn check(&self, caller: K, own: Option<NonZeroU32>) -> Result<(), Duration> {
        let quota = match own {
            Some(per_second) => Quota::per_second(per_second).allow_burst(per_second),
            None => self.default,
        };
        // A key's quota is part of the cache key, so changing it takes effect
        // when the key is next verified.
        let limiter = self
            .callers
            .get_with((caller, quota.burst_size().get()), || {
                Arc::new(RateLimiter::direct(quota))
            });
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// The quotas of callers: this replica's own, or shared by every replica
/// through Redis.
#[derive(Debug)]
pub enum CallerQuotas {
    Local(Quotas<String>),
    Shared(Box<crate::shared_quota::SharedQuotas>),
}

impl CallerQuotas {
    /// Counts one call of `caller`, as [`Quotas::check`].
    pub async fn check(&self, caller: String, own: Option<NonZeroU32>) -> Result<(), Duration> {
        match self {
            Self::Local(quotas) => quotas.check(caller, own),
            Self::Shared(quotas) => quotas.check(caller, own).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(value: u32) -> NonZeroU32 {
        NonZeroU32::new(value).unwrap()
    }

    #[test]
    fn each_caller_has_its_own_bucket() {
        let quotas = Quotas::new(n(1), n(2));
        assert!(quotas.check("a", None).is_ok());
        assert!(quotas.check("a", None).is_ok());
        let wait = quotas.check("a", None).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(quotas.check("b", None).is_ok());
    }

    #[test]
    fn a_caller_with_its_own_quota_gets_that_quota() {
        let quotas = Quotas::new(n(1), n(1));
        for _ in 0..5 {
            assert!(quotas.check("big", Some(n(5))).is_ok());
        }
        assert!(quotas.check("big", Some(n(5))).is_err());
    }
}
