//! The change feed's table, `user_events`: positions in it, reading the
//! events that committed after a position, pruning, and the relay's stored
//! position.
//!
//! # Positions
//!
//! Events are written by triggers in the transactions of their changes,
//! and transactions commit in any order, so a sequence number is no
//! position: a reader that has seen 11 would never see a 10 that commits
//! later. A position is a Postgres snapshot instead ([`Snapshot`], from
//! `pg_current_snapshot()`): the set of transactions that had ended when it
//! was taken. The events after a position `F`, read at a later snapshot
//! `T`, are those whose transaction `T` sees and `F` does not: they
//! committed between the two. They are read in `seq` order, which is
//! commit order for the events of one user (a change waits for the row lock
//! of the one before, and writes its event after). A long transaction holds
//! nobody up: it is in `F`'s list of running transactions until it ends.
//!
//! When the events between `F` and `T` are more than a page,
//! [`Position::Within`] names the rest of them: those with a larger `seq`.
//!
//! A position also carries the largest `seq` its snapshot sees
//! ([`Snapshot::seq`]), so that a read never walks the events before it.
//! The events written since are past it in `seq`; the few that drew a
//! smaller one (their transactions were running at `F`) are found by their
//! xid instead, among the transactions that ended since `F` (see
//! [`read`]).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use diesel::{
    QueryableByName,
    sql_types::{Array, BigInt, Jsonb, Nullable, SmallInt, Text, Timestamptz},
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use prost::Message;
use uuid::Uuid;

use super::db;
use super::prepared::Prepared;

/// Tells the feed's reader that a write committed events, so that it reads
/// them now rather than at its next poll. Cheap, and never blocks: a count
/// that readers watch.
#[derive(Debug, Clone)]
pub struct Committed(std::sync::Arc<tokio::sync::watch::Sender<u64>>);

impl Default for Committed {
    fn default() -> Self {
        Self(std::sync::Arc::new(tokio::sync::watch::Sender::new(0)))
    }
}

impl Committed {
    /// Called after a commit that may have written events.
    pub fn poke(&self) {
        self.0.send_modify(|count| *count = count.wrapping_add(1));
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// The transactions a Postgres snapshot sees as ended (committed or
/// aborted): every xid below `xmin`, and those below `xmax` not in `xip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    /// Sorted, each in `xmin..xmax`.
    pub xip: Vec<u64>,
    /// The largest event `seq` the snapshot sees, when known (`None` in
    /// the tokens of earlier versions): where the events it does not see
    /// begin, but for those of the transactions running when it was taken.
    pub seq: Option<i64>,
}

impl Snapshot {
    /// `pg_snapshot`'s text form, `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|xid| xid.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        let snapshot = Self {
            xmin,
            xmax,
            xip,
            seq: None,
        };
        (parts.next().is_none() && snapshot.is_valid()).then_some(snapshot)
    }

    fn is_valid(&self) -> bool {
        self.xmin <= self.xmax
            && self.seq.is_none_or(|seq| seq >= 0)
            && self.xip.len() <= MAX_RUNNING
            && self.xip.windows(2).all(|pair| pair[0] < pair[1])
            && self
                .xip
                .iter()
                .all(|xid| (self.xmin..self.xmax).contains(xid))
    }

    pub fn to_text(&self) -> String {
        let xip: Vec<String> = self.xip.iter().map(u64::to_string).collect();
        format!("{}:{}:{}", self.xmin, self.xmax, xip.join(","))
    }

    /// Whether the transaction `xid` had ended.
    fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// Whether this snapshot sees every transaction `earlier` sees (it was
    /// taken at the same time or later).
    pub fn includes(&self, earlier: &Self) -> bool {
        earlier.xmax <= self.xmax && self.xip.iter().all(|&xid| !earlier.sees(xid))
    }
}

/// Most running transactions a snapshot of a token may list: far more than
/// a server runs at once (`max_connections`), and a bound on a forged one.
const MAX_RUNNING: usize = 4096;

/// Where a reader of the feed is: every event before it has been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    /// After every event whose transaction `0` sees.
    At(Snapshot),
    /// After every event `from` sees, and the events `to` sees and `from`
    /// does not up to `seq` `after`.
    Within {
        from: Snapshot,
        to: Snapshot,
        after: i64,
    },
}

/// Why a token is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadToken {
    /// Not a token this service made.
    Malformed,
    /// Older than the oldest event kept.
    Expired,
}

impl Position {
    /// The earliest snapshot of the position: the events it has not read
    /// are not seen by it.
    fn from(&self) -> &Snapshot {
        match self {
            Self::At(from) | Self::Within { from, .. } => from,
        }
    }

    /// The `seq` up to which this position has read about everything:
    /// events past it are (nearly all) still to read.
    fn read_up_to(&self) -> i64 {
        match self {
            Self::At(at) => at.seq.unwrap_or(0),
            Self::Within { from, after, .. } => (*after).max(from.seq.unwrap_or(0)),
        }
    }

    /// The position as clients carry it: opaque, URL-safe.
    pub fn encode(&self) -> String {
        let token = match self {
            Self::At(at) => Token {
                from: Some(TokenSnapshot::from(at)),
                to: None,
                after: None,
            },
            Self::Within { from, to, after } => Token {
                from: Some(TokenSnapshot::from(from)),
                to: Some(TokenSnapshot::from(to)),
                after: Some(*after),
            },
        };
        URL_SAFE_NO_PAD.encode(token.encode_to_vec())
    }

    /// A position from a token of [`Position::encode`].
    pub fn decode(token: &str) -> Result<Self, BadToken> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(BadToken::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| BadToken::Malformed)?;
        let token = Token::decode(bytes.as_slice()).map_err(|_| BadToken::Malformed)?;
        let snapshot = |part: Option<TokenSnapshot>| {
            part.and_then(TokenSnapshot::into_snapshot)
                .ok_or(BadToken::Malformed)
        };
        let from = snapshot(token.from)?;
        match (token.to, token.after) {
            (None, None) => Ok(Self::At(from)),
            (Some(to), Some(after)) => {
                let to = snapshot(Some(to))?;
                if to.includes(&from) {
                    Ok(Self::Within { from, to, after })
                } else {
                    Err(BadToken::Malformed)
                }
            }
            _ => Err(BadToken::Malformed),
        }
    }

    /// Whether this position can still be read from, now that `now` is the
    /// current snapshot: not from the future (a forged token), and not
    /// older than what pruning removed (`horizon`: every pruned event's
    /// transaction is at most it, and had ended before the prune began).
    ///
    /// A pruned event this position has not read is one whose transaction
    /// it does not see: at or past its `xmax`, or running when it was taken.
    /// A transaction that began after the prune is above the horizon, so a
    /// fresh position is never refused, whatever long transaction runs.
    pub fn check(&self, now: &Snapshot, horizon: u64) -> Result<(), BadToken> {
        let latest = match self {
            Self::At(at) => at,
            Self::Within { to, .. } => to,
        };
        if !now.includes(latest) {
            return Err(BadToken::Malformed);
        }
        let from = self.from();
        let missed = horizon >= from.xmax || from.xip.iter().any(|&xid| xid <= horizon);
        if horizon > 0 && missed {
            return Err(BadToken::Expired);
        }
        Ok(())
    }
}

/// Longest token accepted, in characters.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A token's wire form: protobuf, with a snapshot's running transactions
/// as deltas so that a token stays short.
#[derive(Clone, PartialEq, prost::Message)]
struct Token {
    #[prost(message, optional, tag = "1")]
    from: Option<TokenSnapshot>,
    #[prost(message, optional, tag = "2")]
    to: Option<TokenSnapshot>,
    #[prost(int64, optional, tag = "3")]
    after: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TokenSnapshot {
    #[prost(uint64, tag = "1")]
    xmin: u64,
    /// `xmax - xmin`.
    #[prost(uint64, tag = "2")]
    span: u64,
    /// Each running xid less the one before (the first: less `xmin`).
    #[prost(uint64, repeated, tag = "3")]
    running: Vec<u64>,
    #[prost(int64, optional, tag = "4")]
    seq: Option<i64>,
}

impl From<&Snapshot> for TokenSnapshot {
    fn from(snapshot: &Snapshot) -> Self {
        let mut last = snapshot.xmin;
        Self {
            xmin: snapshot.xmin,
            span: snapshot.xmax - snapshot.xmin,
            running: snapshot
                .xip
                .iter()
                .map(|&xid| {
                    let delta = xid - last;
                    last = xid;
                    delta
                })
                .collect(),
            seq: snapshot.seq,
        }
    }
}

impl TokenSnapshot {
    fn into_snapshot(self) -> Option<Snapshot> {
        if self.running.len() > MAX_RUNNING {
            return None;
        }
        let mut last = self.xmin;
        let xip = self
            .running
            .iter()
            .map(|&delta| {
                last = last.checked_add(delta)?;
                Some(last)
            })
            .collect::<Option<Vec<u64>>>()?;
        let snapshot = Snapshot {
            xmin: self.xmin,
            xmax: self.xmin.checked_add(self.span)?,
            xip,
            seq: self.seq,
        };
        snapshot.is_valid().then_some(snapshot)
    }
}

/// One event as stored, with the position right after it.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: i64,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    /// `users.v1.UserEventType`.
    pub kind: i16,
    /// Proto field names.
    pub changed: Vec<String>,
    /// `key:<id>`, `user:<id>` or empty.
    pub actor: String,
    /// The name of the actor's API key, when it is one that still exists.
    pub key_name: Option<String>,
    pub time: DateTime<Utc>,
    /// `to_jsonb` of the user after the change; `None` once purged.
    pub state: Option<serde_json::Value>,
    pub position: Position,
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// One tenant's, or every tenant's.
    pub tenant: Option<Uuid>,
    /// These types only; empty: all.
    pub kinds: Vec<i16>,
    /// Where the events are and what they are, without the user's state,
    /// the actor or its key's name (for a reader that only moves on).
    pub heads_only: bool,
}

impl Filter {
    pub fn matches(&self, tenant: Uuid, kind: i16) -> bool {
        self.tenant.is_none_or(|wanted| wanted == tenant)
            && (self.kinds.is_empty() || self.kinds.contains(&kind))
    }
}

/// Events read after a position, and the position after them.
#[derive(Debug, Clone)]
pub struct Page {
    pub events: Vec<Event>,
    pub end: Position,
}

#[derive(QueryableByName)]
struct EventRow {
    #[diesel(sql_type = Nullable<Text>)]
    snapshot: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    last_seq: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    tenant_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    user_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SmallInt>)]
    kind: Option<i16>,
    #[diesel(sql_type = Nullable<Array<Text>>)]
    changed: Option<Vec<String>>,
    #[diesel(sql_type = Nullable<Text>)]
    actor: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    key_name: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    time: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    state: Option<serde_json::Value>,
}

/// The columns of an event, and the name of its actor's key; [`FILTER`]
/// and the position's conditions follow.
const EVENT: &str = "SELECT e.seq, e.tenant_id, e.user_id, e.kind, e.changed, e.actor, \
     k.name AS key_name, e.time, e.state \
     FROM user_events e \
     LEFT JOIN api_keys k ON e.actor LIKE 'key:%' AND k.id = substr(e.actor, 5)";
/// [`EVENT`] for [`Filter::heads_only`].
const EVENT_HEAD: &str = "SELECT e.seq, e.tenant_id, e.user_id, e.kind, e.changed, \
     NULL::text AS actor, NULL::text AS key_name, e.time, NULL::jsonb AS state \
     FROM user_events e";
/// The reader's filter, after [`EVENT`] or [`EVENT_HEAD`].
const FILTER: &str = "WHERE ($3::uuid IS NULL OR e.tenant_id = $3) \
     AND (cardinality($4::int2[]) = 0 OR e.kind = ANY($4))";

/// The events `from` does not see, in three parts that each have an index
/// (`$1` is `from`'s `xmax`, `$2` its running transactions, `$6` its largest
/// `seq`), each also under `cond`:
///
/// - those of transactions at or past its `xmax` with a larger `seq`: the
///   events written since, by `seq` (a range of the primary key);
/// - those of the transactions it lists as running, whatever `seq` they
///   drew (by xid);
/// - those of transactions at or past its `xmax` with a smaller `seq`: a
///   transaction is only listed as running once a later one has ended, so
///   one that took its xid (and then its `seq`) before the snapshot but
///   was still the latest to have begun is past `xmax` (by xid, among the
///   transactions between `xmax` and `below`; `None`: no such part).
fn unseen(event: &str, cond: &str, stragglers_below: Option<&str>) -> String {
    let event = format!("{event} {FILTER}");
    let mut parts = format!(
        "({event} AND e.seq > $6 AND e.xid >= $1::text::xid8 {cond} ORDER BY e.seq LIMIT $5) \
         UNION ALL \
         ({event} AND e.xid = ANY($2::text[]::xid8[]) {cond} ORDER BY e.seq LIMIT $5)"
    );
    if let Some(below) = stragglers_below {
        parts.push_str(&format!(
            " UNION ALL ({event} AND e.seq <= $6 AND e.xid >= $1::text::xid8 \
             AND e.xid < {below} {cond})"
        ));
    }
    parts
}

/// Up to `limit` events of `filter` after `position`, in order.
///
/// From [`Position::At`], the events are read at the statement's own
/// snapshot, which the page's end names; from [`Position::Within`], at the
/// snapshot it names.
///
/// The hub reads after every commit, so its statement is prepared once per
/// connection: its text is one of six (the position's kind, whether
/// stragglers are read, [`Filter::heads_only`]), whatever the values.
pub async fn read(
    conn: &mut AsyncPgConnection,
    position: &Position,
    filter: &Filter,
    limit: i64,
) -> diesel::QueryResult<Page> {
    let from = position.from();
    let xip: Vec<String> = from.xip.iter().map(u64::to_string).collect();
    let event = if filter.heads_only { EVENT_HEAD } else { EVENT };
    let query = match position {
        Position::At(_) => diesel::sql_query(format!(
            "SELECT s.snapshot, s.last_seq, e.* FROM \
             (SELECT {SNAPSHOT} AS snapshot, {LAST_SEQ} AS last_seq) s \
             LEFT JOIN LATERAL (SELECT * FROM ({unseen}) u ORDER BY u.seq LIMIT $5) e ON true",
            unseen = unseen(event, "", Some("pg_snapshot_xmax(pg_current_snapshot())"))
        ))
        .into_boxed(),
        // `$7` is `to`'s `xmax`, `$8` the snapshot, `$9` its largest `seq`,
        // `$10` the last event read.
        Position::Within { after, .. } => {
            let stragglers = *after < from.seq.unwrap_or(0);
            diesel::sql_query(format!(
                "SELECT NULL::text AS snapshot, NULL::int8 AS last_seq, e.* FROM ({unseen}) e \
                 ORDER BY e.seq LIMIT $5",
                unseen = unseen(
                    event,
                    "AND e.seq > $10 AND e.seq <= $9 AND e.xid < $7::text::xid8 \
                     AND pg_visible_in_snapshot(e.xid, $8::text::pg_snapshot)",
                    stragglers.then_some("$7::text::xid8"),
                )
            ))
            .into_boxed()
        }
    };
    let query = query
        .bind::<Text, _>(from.xmax.to_string())
        .bind::<Array<Text>, _>(xip)
        .bind::<Nullable<diesel::sql_types::Uuid>, _>(filter.tenant)
        .bind::<Array<SmallInt>, _>(filter.kinds.clone())
        .bind::<BigInt, _>(limit)
        .bind::<BigInt, _>(from.seq.unwrap_or(0));
    let (rows, to) = match position {
        Position::At(_) => {
            let rows: Vec<EventRow> = Prepared::when(true, query).load(conn).await?;
            let first = <[EventRow]>::first(&rows);
            let to = snapshot_of(
                first.and_then(|row| row.snapshot.as_deref()).unwrap_or(""),
                first.and_then(|row| row.last_seq),
            )?;
            (rows, to)
        }
        Position::Within { to, after, .. } => {
            let query = query
                .bind::<Text, _>(to.xmax.to_string())
                .bind::<Text, _>(to.to_text())
                .bind::<BigInt, _>(to.seq.unwrap_or(i64::MAX))
                .bind::<BigInt, _>(*after);
            let rows: Vec<EventRow> = Prepared::when(true, query).load(conn).await?;
            (rows, to.clone())
        }
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let (Some(seq), Some(tenant_id), Some(user_id), Some(kind), Some(time)) =
            (row.seq, row.tenant_id, row.user_id, row.kind, row.time)
        else {
            continue;
        };
        events.push(Event {
            seq,
            tenant_id,
            user_id,
            kind,
            changed: row.changed.unwrap_or_default(),
            actor: row.actor.unwrap_or_default(),
            key_name: row.key_name,
            time,
            state: row.state,
            position: Position::Within {
                from: from.clone(),
                to: to.clone(),
                after: seq,
            },
        });
    }
    let end = match events.last() {
        Some(last) if events.len() as i64 >= limit => last.position.clone(),
        _ => Position::At(to),
    };
    Ok(Page { events, end })
}

fn unexpected(what: &str) -> diesel::result::Error {
    diesel::result::Error::DeserializationError(what.into())
}

#[derive(QueryableByName)]
struct Text1 {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct Now {
    #[diesel(sql_type = Text)]
    snapshot: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    last_seq: Option<i64>,
}

/// The current snapshot: a position right after every event committed now.
pub async fn now(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Snapshot> {
    let now = diesel::sql_query(format!(
        "SELECT {SNAPSHOT} AS snapshot, {LAST_SEQ} AS last_seq"
    ));
    let row: Now = Prepared::when(true, now)
        .get_results(conn)
        .await
        .and_then(db::single)?;
    snapshot_of(&row.snapshot, row.last_seq)
}

/// A statement's snapshot, as text: with [`LAST_SEQ`], a position right
/// after every event the statement sees (see [`snapshot_of`]).
pub const SNAPSHOT: &str = "pg_current_snapshot()::text";
/// The largest event `seq` a statement sees.
pub const LAST_SEQ: &str = "(SELECT max(seq) FROM user_events)";

/// The position of a statement that selected [`SNAPSHOT`] and [`LAST_SEQ`].
pub fn snapshot_of(snapshot: &str, last_seq: Option<i64>) -> diesel::QueryResult<Snapshot> {
    let mut snapshot = Snapshot::parse(snapshot)
        .ok_or_else(|| unexpected("pg_current_snapshot() in an unknown form"))?;
    snapshot.seq = Some(last_seq.unwrap_or(0));
    Ok(snapshot)
}

/// The transaction below which events may have been pruned.
pub async fn horizon(conn: &mut AsyncPgConnection) -> diesel::QueryResult<u64> {
    let row: Text1 = diesel::sql_query("SELECT xid::text AS value FROM user_events_horizon")
        .get_results(conn)
        .await
        .and_then(db::single)?;
    row.value
        .parse()
        .map_err(|_| unexpected("user_events_horizon.xid in an unknown form"))
}

/// Deletes up to `limit` of the oldest events written before `before` by
/// transactions that ended before every transaction running now began, and
/// moves the horizon to them; how many. One short transaction.
pub async fn prune(
    conn: &mut AsyncPgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> diesel::QueryResult<usize> {
    #[derive(QueryableByName)]
    struct Pruned {
        #[diesel(sql_type = BigInt)]
        count: i64,
    }
    conn.transaction(async |conn| {
        let pruned: Pruned = diesel::sql_query(
            "WITH oldest AS (SELECT seq FROM user_events ORDER BY seq LIMIT $1), \
             gone AS (DELETE FROM user_events e USING oldest o \
                      WHERE e.seq = o.seq AND e.time < $2 \
                      AND e.xid < pg_snapshot_xmin(pg_current_snapshot()) RETURNING e.xid), \
             moved AS (UPDATE user_events_horizon \
                       SET xid = greatest(xid, (SELECT max(xid) FROM gone)) \
                       WHERE EXISTS (SELECT 1 FROM gone)) \
             SELECT count(*) AS count FROM gone",
        )
        .bind::<BigInt, _>(limit)
        .bind::<Timestamptz, _>(before)
        .get_results(conn)
        .await
        .and_then(db::single)?;
        Ok(usize::try_from(pruned.count).unwrap_or(0))
    })
    .await
}

#[derive(QueryableByName)]
struct Backlog {
    #[diesel(sql_type = BigInt)]
    events: i64,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    oldest: Option<DateTime<Utc>>,
}

/// How far the events committed now are past `position`: about how many
/// there are (by `seq`), and the time of the oldest (`None`: there are
/// none).
pub async fn backlog(
    conn: &mut AsyncPgConnection,
    position: &Position,
) -> diesel::QueryResult<(i64, Option<DateTime<Utc>>)> {
    let row: Backlog = diesel::sql_query(
        "SELECT greatest(coalesce((SELECT max(seq) FROM user_events), 0) - $1, 0) AS events, \
         (SELECT time FROM user_events WHERE seq > $1 ORDER BY seq LIMIT 1) AS oldest",
    )
    .bind::<BigInt, _>(position.read_up_to())
    .get_results(conn)
    .await
    .and_then(db::single)?;
    Ok((row.events, row.oldest))
}

/// The position a relay stored for `stream`.
pub async fn relay_position(
    conn: &mut AsyncPgConnection,
    stream: &str,
) -> diesel::QueryResult<Option<String>> {
    let rows: Vec<Text1> =
        diesel::sql_query("SELECT position AS value FROM user_events_relays WHERE stream = $1")
            .bind::<Text, _>(stream)
            .load(conn)
            .await?;
    Ok(rows.into_iter().next().map(|row| row.value))
}

/// Stores the position a relay has got to for `stream`.
pub async fn set_relay_position(
    conn: &mut AsyncPgConnection,
    stream: &str,
    position: &str,
) -> diesel::QueryResult<()> {
    diesel::sql_query(
        "INSERT INTO user_events_relays (stream, position) VALUES ($1, $2) \
         ON CONFLICT (stream) DO UPDATE SET position = excluded.position, updated_at = now()",
    )
    .bind::<Text, _>(stream)
    .bind::<Text, _>(position)
    .execute(conn)
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).expect("a snapshot")
    }

    #[test]
    fn snapshots_parse_as_postgres_writes_them() {
        assert_eq!(
            snapshot("10:20:12,15"),
            Snapshot {
                xmin: 10,
                xmax: 20,
                xip: vec![12, 15],
                seq: None,
            }
        );
        assert_eq!(snapshot("778:778:").xip, Vec::<u64>::new());
        for bad in ["", "1:2", "5:4:", "1:9:9", "1:9:5,3", "a:b:", "1:2::"] {
            assert_eq!(Snapshot::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_later_snapshot_includes_an_earlier_one() {
        let earlier = snapshot("10:20:12,15");
        // 12 ended since, 15 still runs, 20..25 started.
        let later = snapshot("15:25:15,21");
        assert!(later.includes(&earlier));
        assert!(!earlier.includes(&later));
        // 12 ended in `a` only, 13 in `b` only: neither includes the other.
        let a = snapshot("10:20:13");
        let b = snapshot("10:20:12");
        assert!(!a.includes(&b) && !b.includes(&a));
    }

    #[test]
    fn tokens_round_trip_and_refuse_what_they_cannot_hold() {
        let from = snapshot("1000:1010:1002,1007");
        let to = Snapshot {
            seq: Some(4711),
            ..snapshot("1007:1030:1007,1021")
        };
        for position in [
            Position::At(from.clone()),
            Position::Within {
                from: from.clone(),
                to: to.clone(),
                after: 42,
            },
        ] {
            assert_eq!(Position::decode(&position.encode()), Ok(position));
        }
        // `to` must include `from`.
        let backwards = Position::Within {
            from: to,
            to: from,
            after: 1,
        };
        assert_eq!(
            Position::decode(&backwards.encode()),
            Err(BadToken::Malformed)
        );
        for bad in ["", "!!", "AAAA", &"A".repeat(MAX_TOKEN_LEN + 1)] {
            assert_eq!(Position::decode(bad), Err(BadToken::Malformed), "{bad}");
        }
    }

    #[test]
    fn a_position_past_the_horizon_or_from_the_future_is_refused() {
        let now = snapshot("2000:2010:");
        let at = Position::At(snapshot("1000:1010:1005"));
        assert_eq!(at.check(&now, 0), Ok(()));
        assert_eq!(at.check(&now, 1004), Ok(()));
        // 1005 was running: its pruned events were never read.
        assert_eq!(at.check(&now, 1005), Err(BadToken::Expired));
        assert_eq!(at.check(&now, 1010), Err(BadToken::Expired));
        let idle = Position::At(snapshot("1000:1010:"));
        assert_eq!(idle.check(&now, 1009), Ok(()));
        let future = Position::At(snapshot("3000:3000:"));
        assert_eq!(future.check(&now, 0), Err(BadToken::Malformed));
    }
}
