//! Reads from streaming-replication standbys, and the consistency token
//! that makes them read-your-writes.
//!
//! A write answers with the primary's WAL position after its commit (its
//! LSN, [`WalPosition`]). A read that sends it back goes to a standby only
//! once that standby has replayed past it, which then holds the write; a
//! read without one goes to any standby within `--max-replica-lag`. Failing
//! both, or when a standby fails, the read goes to the primary.
//!
//! The lag is measured, not asked of the standby: every
//! [`MONITOR_INTERVAL`] the monitor reads the primary's WAL position, then
//! each standby's replay position. A standby that has replayed what the
//! primary had at some sample holds everything committed by then, so its
//! lag is at most the age of the latest such sample (0 when it has replayed
//! the position just read). A standby that cannot be reached, is no longer
//! in recovery, or when the primary cannot be read, is not read from.

use std::{
    collections::VecDeque,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use diesel::sql_types::{Nullable, Text};
use diesel_async::AsyncPgConnection;
use tokio::time::Instant;
use tokio_postgres::{NoTls, types::PgLsn};

use super::coalesce::{Batch, Coalescer};
use super::db::{self, DbPool};
use super::error::StoreError;
use super::prepared::Prepared;
use super::users::FindUsers;

/// How often the monitor measures each standby's lag.
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(100);
/// Longest a read with a consistency token waits for a standby to replay
/// up to it before it goes to the primary.
const REPLAY_WAIT: Duration = Duration::from_millis(20);
/// How often a waiting read looks at the standby's replay position again.
const REPLAY_POLL: Duration = Duration::from_millis(2);

/// The request metadata, and response metadata of writes, that carries the
/// consistency token.
pub const CONSISTENCY_HEADER: &str = "x-users-consistency";
/// The longest token: `FFFFFFFF/FFFFFFFF`.
const MAX_TOKEN_LEN: usize = 17;

/// A WAL position, as `pg_lsn` writes it (`16/B374D848`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The position of a consistency token, `None` when it is not one.
    pub fn parse(token: &str) -> Option<Self> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        PgLsn::from_str(token).ok().map(|lsn| Self(lsn.into()))
    }
}

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        PgLsn::from(self.0).fmt(f)
    }
}

/// The primary's WAL position, read after the writes that ask for it have
/// committed: one query for every write that asks while it waits for its
/// turn, so that a burst of writes costs one statement.
#[derive(Debug)]
pub struct WalPosition;

impl Batch for WalPosition {
    type Item = ();
    type Output = Lsn;
    const MAX: usize = 4096;
    /// The query is tiny; one at a time and the rest queue for the next.
    const POOL_SHARE: usize = usize::MAX;
    const NAME: &'static str = "wal_position";
    const STATEMENT: (&'static str, Option<&'static str>) = ("SELECT", None);

    async fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<()>,
    ) -> Result<Vec<Result<Lsn, StoreError>>, StoreError> {
        use diesel_async::RunQueryDsl;
        let position = Prepared::when(
            true,
            diesel::select(diesel::dsl::sql::<Text>("pg_current_wal_lsn()::text")),
        )
        .load::<String>(conn)
        .await?;
        let lsn = <[_]>::first(&position)
            .and_then(|text| Lsn::parse(text))
            .ok_or_else(|| StoreError::Unavailable("the WAL position could not be read".into()))?;
        Ok(items.iter().map(|()| Ok(lsn)).collect())
    }
}

/// One standby and what is known of it.
pub struct Standby {
    /// `host:port`, in logs and metrics.
    pub name: String,
    config: tokio_postgres::Config,
    pub pool: DbPool,
    pub finds: Arc<Coalescer<FindUsers>>,
    /// Replayed up to here, at least.
    replayed: AtomicU64,
    /// Reachable, in recovery and within the lag allowed, at the last look.
    usable: AtomicBool,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Standby {
    pub fn new(
        name: String,
        config: tokio_postgres::Config,
        pool: DbPool,
        finds: Arc<Coalescer<FindUsers>>,
    ) -> Self {
        Self {
            name,
            config,
            pool,
            finds,
            replayed: AtomicU64::new(0),
            usable: AtomicBool::new(false),
        }
    }

    fn usable(&self) -> bool {
        self.usable.load(Ordering::Acquire)
    }

    /// Reads go elsewhere until the monitor finds it well again.
    pub fn failed(&self) {
        self.usable.store(false, Ordering::Release);
    }

    fn has_replayed(&self, lsn: Lsn) -> bool {
        self.replayed.load(Ordering::Acquire) >= lsn.0
    }

    /// Waits, at most [`REPLAY_WAIT`], until this standby has replayed up
    /// to `lsn`; whether it has.
    async fn wait_for(&self, lsn: Lsn) -> bool {
        let deadline = Instant::now() + REPLAY_WAIT;
        loop {
            let replayed = db::run(&self.pool, async |conn| {
                use diesel_async::RunQueryDsl;
                Prepared::when(
                    true,
                    diesel::select(diesel::dsl::sql::<Nullable<Text>>(
                        "pg_last_wal_replay_lsn()::text",
                    )),
                )
                .load::<Option<String>>(conn)
                .await
            })
            .await;
            let Ok(Ok(rows)) = replayed else {
                return false;
            };
            match rows
                .into_iter()
                .flatten()
                .next()
                .and_then(|t| Lsn::parse(&t))
            {
                Some(at) => {
                    self.replayed.fetch_max(at.0, Ordering::AcqRel);
                    if at >= lsn {
                        return true;
                    }
                }
                None => return false,
            }
            if Instant::now() + REPLAY_POLL > deadline {
                return false;
            }
            tokio::time::sleep(REPLAY_POLL).await;
        }
    }
}

/// The standbys reads may go to.
#[derive(Debug, Default)]
pub struct Standbys {
    list: Vec<Arc<Standby>>,
    /// Where the next read starts looking, so reads spread over them.
    next: AtomicUsize,
}

impl Standbys {
    pub fn new(list: Vec<Standby>) -> Self {
        Self {
            list: list.into_iter().map(Arc::new).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Standby>> {
        self.list.iter()
    }

    /// A standby to read from: one within the lag allowed and, for a read
    /// that must see the writes up to `after`, one that has replayed them
    /// (waiting a moment for one that has not yet); `None`: the primary.
    pub async fn pick(&self, after: Option<Lsn>) -> Option<&Arc<Standby>> {
        let count = self.list.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let usable = || {
            (0..count)
                .map(move |i| &self.list[(start + i) % count])
                .filter(|standby| standby.usable())
        };
        let Some(after) = after else {
            return usable().next();
        };
        if let Some(standby) = usable().find(|standby| standby.has_replayed(after)) {
            return Some(standby);
        }
        let standby = usable().next()?;
        // However slow the standby's pool is to lend a connection.
        let caught_up = tokio::time::timeout(REPLAY_WAIT * 2, standby.wait_for(after)).await;
        caught_up.unwrap_or(false).then_some(standby)
    }

    /// Measures every standby's lag each [`MONITOR_INTERVAL`], for ever:
    /// `report` is told each one's name, lag (when measured) and whether
    /// reads go to it. Logs when a standby stops or starts being read from.
    pub async fn monitor(
        self: Arc<Self>,
        primary: tokio_postgres::Config,
        max_lag: Duration,
        timeout: Duration,
        report: impl Fn(&str, Option<Duration>, bool),
    ) {
        let mut primary_link = Link::new(primary);
        let mut links: Vec<Link> = self
            .list
            .iter()
            .map(|standby| Link::new(standby.config.clone()))
            .collect();
        // The primary's positions over the lag allowed, oldest first.
        let mut samples: VecDeque<(Instant, Lsn)> = VecDeque::new();
        let mut ticks = tokio::time::interval(MONITOR_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = Instant::now();
            let head = primary_link
                .query(timeout, "SELECT pg_current_wal_lsn()::text, false")
                .await
                .and_then(|(lsn, _)| lsn);
            if let Some(head) = head {
                samples.push_back((now, head));
            }
            while samples
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > max_lag + MONITOR_INTERVAL)
            {
                samples.pop_front();
            }
            for (standby, link) in self.list.iter().zip(&mut links) {
                let replay = link
                    .query(
                        timeout,
                        "SELECT pg_last_wal_replay_lsn()::text, pg_is_in_recovery()",
                    )
                    .await;
                let lag = match (head, replay) {
                    (Some(head), Some((Some(replayed), true))) => {
                        standby.replayed.fetch_max(replayed.0, Ordering::AcqRel);
                        if replayed >= head {
                            Some(Duration::ZERO)
                        } else {
                            samples
                                .iter()
                                .rev()
                                .find(|(_, lsn)| *lsn <= replayed)
                                .map(|(at, _)| now.duration_since(*at))
                        }
                    }
                    _ => None,
                };
                let usable = lag.is_some_and(|lag| lag <= max_lag);
                let was = standby.usable.swap(usable, Ordering::AcqRel);
                if was != usable {
                    if usable {
                        tracing::info!(standby = %standby.name, "reading from the standby");
                    } else {
                        let why = match (head, replay) {
                            (None, _) => "the primary's WAL position cannot be read",
                            (_, None) => "the standby does not answer",
                            (_, Some((_, false))) => "the server is not a standby (promoted?)",
                            _ => "its replay lag is over --max-replica-lag",
                        };
                        tracing::warn!(standby = %standby.name, reason = why, "not reading from the standby");
                    }
                }
                report(&standby.name, lag, usable);
            }
        }
    }
}

/// A monitoring connection, opened again when it fails.
struct Link {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
}

impl Link {
    fn new(config: tokio_postgres::Config) -> Self {
        Self {
            config,
            client: None,
        }
    }

    /// Runs `sql`, which returns one row of a position (text, or NULL) and
    /// a flag, within `timeout`; `None` on any failure.
    async fn query(&mut self, timeout: Duration, sql: &str) -> Option<(Option<Lsn>, bool)> {
        let answer = tokio::time::timeout(timeout, async {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                let (client, connection) = self.config.connect(NoTls).await.ok()?;
                tokio::spawn(connection);
                self.client = Some(client);
            }
            let row = self.client.as_ref()?.query_one(sql, &[]).await.ok()?;
            let lsn: Option<String> = row.get(0);
            Some((
                lsn.and_then(|text| Lsn::parse(&text)),
                row.get::<_, bool>(1),
            ))
        })
        .await
        .ok()
        .flatten();
        if answer.is_none() {
            self.client = None;
        }
        answer
    }
}

/// `host:port` of a standby's connection string, for logs and metrics.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}
