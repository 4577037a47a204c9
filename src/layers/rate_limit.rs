//! Per-caller call quotas (GCRA, through governor): each caller gets its own
//! limiter, so one caller over its quota never slows another.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

/// The limiters of every recent caller.
pub struct RateLimits {
    default: Quota,
    callers: moka::sync::Cache<String, Arc<DefaultDirectRateLimiter>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

impl RateLimits {
    /// `per_second` calls per second for each caller, with bursts of `burst`.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            default: Quota::per_second(per_second).allow_burst(burst),
            // Idle callers are forgotten; a caller coming back starts with a
            // full bucket, which is what an idle caller would have anyway.
            callers: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(600))
                .build(),
            clock: DefaultClock::default(),
        }
    }

    /// Counts one call of `caller`; on refusal, how long to wait before the
    /// next call can pass. `own` is the caller's own quota, if it has one (its
    /// burst is one second's worth).
    pub fn check(&self, caller: &str, own: Option<NonZeroU32>) -> Result<(), Duration> {
        let quota = match own {
            Some(per_second) => Quota::per_second(per_second).allow_burst(per_second),
            None => self.default,
        };
        // A key's quota is part of the cache key, so changing it takes effect
        // when the key is next verified.
        let limiter = self
            .callers
            .get_with(format!("{caller}/{}", quota.burst_size()), || {
                Arc::new(RateLimiter::direct(quota))
            });
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}
