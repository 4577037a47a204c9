//! Per-caller call quotas shared by every replica through Redis: one GCRA
//! check per call, one atomic script, so that a caller allowed 100 calls/s
//! gets 100 in all however many replicas it calls.
//!
//! Redis is a help, not a dependency: while it is down or slower than the
//! timeout, each replica limits its callers alone at its share of the rate
//! (the rate over `--replicas-hint`), and the service keeps answering. The
//! replica's own limiter counts the calls that pass while Redis answers,
//! so that a fall back gives no caller a fresh burst. It
//! tries Redis again at most once a second meanwhile, and logs each change
//! of state once.

use std::{
    num::NonZeroU32,
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;

use crate::quota::Quotas;

/// GCRA (the generic cell rate algorithm) on Redis' clock. KEYS[1] is the
/// caller's key; ARGV[1] the time between two calls at the steady rate and
/// ARGV[2] how far ahead of now a burst may run, both in microseconds.
/// Returns {1, 0} when the call passes, else {0, microseconds to wait}.
const GCRA: &str = r"
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local ahead = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > ahead then
  return {0, tat - now - ahead}
end
tat = tat + interval
redis.call('SET', KEYS[1], tat, 'PX', math.floor((tat - now) / 1000) + 1)
return {1, 0}
";

/// While Redis is thought down, how long between two tries of it (one
/// caller's check each time; the others limit alone meanwhile).
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// Answers later than the timeout in a row that make Redis count as down.
/// One late answer is a hiccup (a busy machine): that call is decided by
/// the replica's own limiter, and Redis still counts it when the script
/// runs. Falling back for a hiccup would cost more: what passes here while
/// alone, Redis never counts, so each fall back lets a caller through at
/// more than its rate for a moment.
const LATE_IN_A_ROW: u32 = 3;

/// How to reach Redis, and how to limit when it cannot be reached.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    pub url: String,
    /// Longer than this is as good as down.
    pub timeout: Duration,
    /// Replicas that share the rate; each takes its share when alone.
    pub replicas: NonZeroU32,
}

pub struct SharedQuotas {
    client: redis::Client,
    /// Made at the first check; it reconnects by itself after a failure.
    connection: tokio::sync::OnceCell<ConnectionManager>,
    script: redis::Script,
    per_second: NonZeroU32,
    burst: NonZeroU32,
    settings: SharedSettings,
    /// Each replica's own limits, at its share, while Redis is down.
    alone: Quotas<String>,
    state: Mutex<State>,
    on_state: Box<dyn Fn(bool) + Send + Sync>,
}

#[derive(Debug)]
struct State {
    /// `None` until Redis first answers or fails.
    shared: Option<bool>,
    /// While not shared: when to try Redis again.
    retry_at: Instant,
    /// Answers in a row that came too late.
    late: u32,
}

impl std::fmt::Debug for SharedQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuotas")
            .field("per_second", &self.per_second)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl SharedQuotas {
    /// `per_second` calls per second for each caller, with bursts of `burst`,
    /// counted in Redis at `settings.url`; `on_state` is told whether the
    /// limits are shared, at start and at each change.
    pub fn new(
        per_second: NonZeroU32,
        burst: NonZeroU32,
        settings: SharedSettings,
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(settings.url.as_str())?;
        on_state(false);
        Ok(Self {
            client,
            connection: tokio::sync::OnceCell::new(),
            script: redis::Script::new(GCRA),
            per_second,
            burst,
            alone: Quotas::new(
                share(per_second, settings.replicas),
                share(burst, settings.replicas),
            ),
            settings,
            state: Mutex::new(State {
                shared: None,
                retry_at: Instant::now(),
                late: 0,
            }),
            on_state: Box::new(on_state),
        })
    }

    /// Counts one call of `caller`; on refusal, how long to wait. `own` is
    /// the caller's own rate, if it has one (its burst is one second's
    /// worth).
    pub async fn check(&self, caller: String, own: Option<NonZeroU32>) -> Result<(), Duration> {
        let (per_second, burst) = match own {
            Some(rate) => (rate, rate),
            None => (self.per_second, self.burst),
        };
        if self.may_try() {
            match tokio::time::timeout(self.settings.timeout, self.ask(&caller, per_second, burst))
                .await
            {
                Ok(Ok(wait)) => {
                    self.set_shared(true, None);
                    return match wait {
                        0 => {
                            // The replica's own limiter counts what passed
                            // here too (and refuses nothing meanwhile): if
                            // Redis goes, a caller that was using its
                            // burst does not get a fresh one.
                            let _ = self
                                .alone
                                .check(caller, own.map(|rate| share(rate, self.settings.replicas)));
                            Ok(())
                        }
                        micros => Err(Duration::from_micros(micros)),
                    };
                }
                Ok(Err(error)) => self.set_shared(false, Some(&error)),
                Err(_) => {
                    if self.late() >= LATE_IN_A_ROW {
                        self.set_shared(false, None);
                    }
                }
            }
        }
        self.alone
            .check(caller, own.map(|rate| share(rate, self.settings.replicas)))
    }

    /// Whether to ask Redis: always while shared, else once per
    /// [`RETRY_EVERY`] (the caller that gets the turn).
    fn may_try(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.shared != Some(false) {
            return true;
        }
        let now = Instant::now();
        if now < state.retry_at {
            return false;
        }
        state.retry_at = now + RETRY_EVERY;
        true
    }

    /// Runs the script; 0 when the call passes, else microseconds to wait.
    async fn ask(
        &self,
        caller: &str,
        per_second: NonZeroU32,
        burst: NonZeroU32,
    ) -> redis::RedisResult<u64> {
        // No lock once made: every call takes its own handle.
        let mut connection = self
            .connection
            .get_or_try_init(|| ConnectionManager::new(self.client.clone()))
            .await?
            .clone();
        let interval = 1_000_000 / u64::from(per_second.get());
        let ahead = interval * u64::from(burst.get() - 1);
        let (passed, wait): (i64, i64) = self
            .script
            .key(format!("users-service:quota:{caller}:{per_second}:{burst}"))
            .arg(interval)
            .arg(ahead)
            .invoke_async(&mut connection)
            .await?;
        Ok(if passed == 1 {
            0
        } else {
            u64::try_from(wait).unwrap_or(0).max(1)
        })
    }

    /// Counts one answer that came too late; how many in a row now.
    fn late(&self) -> u32 {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.late += 1;
        state.late
    }

    fn set_shared(&self, shared: bool, error: Option<&redis::RedisError>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.late = 0;
        if state.shared == Some(shared) {
            return;
        }
        state.shared = Some(shared);
        state.retry_at = Instant::now() + RETRY_EVERY;
        drop(state);
        (self.on_state)(shared);
        if shared {
            tracing::info!("rate limits are shared through Redis");
        } else {
            let timeout = self.settings.timeout;
            let replicas = self.settings.replicas;
            match error {
                Some(error) => tracing::warn!(
                    %error,
                    replicas,
                    "Redis fails; each replica limits alone, at its share of the rate"
                ),
                None => tracing::warn!(
                    ?timeout,
                    replicas,
                    "Redis does not answer in time; each replica limits alone, at its share of the rate"
                ),
            }
        }
    }
}

/// A replica's share of `rate`, at least 1.
fn share(rate: NonZeroU32, replicas: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(rate.get() / replicas.get()).unwrap_or(NonZeroU32::MIN)
}
