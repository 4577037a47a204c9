//! gRPC handlers: parse the request into domain types, make one store call,
//! convert the rows back.

pub mod authz;
pub mod bulk;
pub mod convert;
pub mod idempotent;
pub mod json;
pub mod keys;
pub mod list;
pub mod tenants;
pub mod users;
pub mod watch;

use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use crate::{error::Error, metrics::Metrics};
use diesel_async::AsyncPgConnection;

use crate::store::{
    coalesce::{Batch, Coalescer},
    db::{self, DbPool},
    standby::{Lsn, Standbys, WalPosition},
    users::{FindUsers, InsertUsers},
};

pub use crate::clock::Clock;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: DbPool,
    /// The tenant of users created without one.
    pub default_tenant: Uuid,
    pub clock: Clock,
    /// Exports hold a connection for as long as the client reads; at most a
    /// quarter of the pool may be taken by them, so other calls still get one.
    pub exports: Arc<tokio::sync::Semaphore>,
    /// GetUser and CreateUser calls that wait for a connection together go
    /// to Postgres as one statement (see [`crate::store::coalesce`]).
    pub finds: Arc<Coalescer<FindUsers>>,
    pub inserts: Arc<Coalescer<InsertUsers>>,
    /// A streamed response whose client reads nothing for this long ends.
    pub stream_stall_timeout: std::time::Duration,
    /// Turns true when the server gives up on the calls still running at
    /// the end of its shutdown grace: they answer UNAVAILABLE.
    pub abandon: Arc<tokio::sync::watch::Sender<bool>>,
    pub retention: Retention,
    /// Told after every write that may have written change events.
    pub committed: crate::store::events::Committed,
    /// The process's reader of the change feed.
    pub hub: Arc<watch::Hub>,
    /// A watch stream sends a response at least this often.
    pub watch_heartbeat: std::time::Duration,
    /// The standbys reads may go to (none: every read from the primary).
    pub standbys: Arc<Standbys>,
    /// The primary's WAL position after a write: its consistency token.
    pub wal: Arc<Coalescer<WalPosition>>,
    pub metrics: Arc<Metrics>,
}

/// How long the service keeps what it keeps for a while.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// A deleted user or tenant can be undeleted this long, then it is purged.
    pub deleted: chrono::Duration,
    /// A request id is remembered this long.
    pub request_ids: chrono::Duration,
    /// Change events are kept this long.
    pub events: chrono::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            deleted: chrono::Duration::days(30),
            request_ids: chrono::Duration::hours(24),
            events: chrono::Duration::days(7),
        }
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("default_tenant", &self.default_tenant)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// `clock` is where handlers read the time from (tests control it);
    /// `max_watchers` bounds the WatchUsers streams.
    pub fn new(
        pool: DbPool,
        default_tenant: Uuid,
        metrics: &Arc<Metrics>,
        clock: Clock,
        max_watchers: usize,
    ) -> Self {
        let exports = (pool.status().max_size / 4).max(1);
        let committed = crate::store::events::Committed::default();
        Self {
            finds: Coalescer::new(
                FindUsers,
                pool.clone(),
                metrics.batch_items(FindUsers::NAME),
            ),
            inserts: Coalescer::new(
                InsertUsers {
                    committed: committed.clone(),
                },
                pool.clone(),
                metrics.batch_items(InsertUsers::NAME),
            ),
            wal: Coalescer::new(
                WalPosition,
                pool.clone(),
                metrics.batch_items(WalPosition::NAME),
            ),
            standbys: Arc::default(),
            metrics: Arc::clone(metrics),
            pool,
            default_tenant,
            clock,
            exports: Arc::new(tokio::sync::Semaphore::new(exports)),
            stream_stall_timeout: std::time::Duration::from_secs(10),
            abandon: Arc::new(tokio::sync::watch::Sender::new(false)),
            retention: Retention::default(),
            committed,
            hub: Arc::new(watch::Hub::new(metrics.watchers(), max_watchers, exports)),
            watch_heartbeat: std::time::Duration::from_secs(10),
        }
    }

    /// The current time at the precision Postgres stores (microseconds), so
    /// what a create returns equals what a later read returns.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)().trunc_subsecs(6)
    }

    /// Runs one store call on a pooled connection (see [`db::run`]).
    pub async fn db<T, E: Into<Error>>(
        &self,
        work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    ) -> Result<T, Error> {
        db::run(&self.pool, work).await?.map_err(Into::into)
    }

    /// Runs a read on a standby that has what it must see (the writes up
    /// to `after`, or else any within the lag allowed), given its pool and
    /// its GetUser batches; on the primary when there is none, or when the
    /// standby fails with UNAVAILABLE (it is then left alone until the
    /// monitor finds it well again).
    pub async fn read<T, F>(
        &self,
        after: Option<Lsn>,
        work: impl Fn(DbPool, Arc<Coalescer<FindUsers>>) -> F,
    ) -> Result<T, Error>
    where
        F: std::future::Future<Output = Result<T, Error>>,
    {
        if let Some(standby) = self.standbys.pick(after).await {
            match work(standby.pool.clone(), Arc::clone(&standby.finds)).await {
                Err(Error::Unavailable(cause)) => {
                    tracing::warn!(standby = %standby.name, error = %cause, "a read failed on the standby; reading from the primary");
                    standby.failed();
                }
                answer => {
                    self.metrics.read_from(true);
                    return answer;
                }
            }
        }
        self.metrics.read_from(false);
        work(self.pool.clone(), Arc::clone(&self.finds)).await
    }

    /// The consistency token of every write that has committed by now: the
    /// primary's WAL position.
    pub async fn written(&self) -> Result<Lsn, Error> {
        self.wal.submit(()).await.map_err(Error::from)
    }

    /// [`AppState::db`] for work that writes users: the change feed is
    /// told when it is done (committed or not: a look costs one query).
    pub async fn write<T, E: Into<Error>>(
        &self,
        work: impl AsyncFnOnce(&mut AsyncPgConnection) -> Result<T, E>,
    ) -> Result<T, Error> {
        let result = self.db(work).await;
        self.committed.poke();
        result
    }
}
