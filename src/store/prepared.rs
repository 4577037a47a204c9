//! Which statements a connection prepares once and which it sends afresh.
//!
//! diesel keeps a prepared statement per connection for every statement it
//! deems safe to reuse, keyed by its text, and Postgres then parses it once
//! and, after a few runs, plans it once. A statement that is sent afresh
//! is parsed and planned at every call: on `users`, with its many indexes,
//! planning costs more than running a list's page or a lookup.
//!
//! diesel never reuses a statement that holds literal SQL (`sql()`,
//! `sql_query`) or is an UPDATE, whatever its text. [`Prepared`] decides
//! instead, and [`Update`] is an UPDATE that diesel may reuse. What is
//! reused has to be bounded: each prepared statement holds memory in the
//! service and in its Postgres backend for the connection's life, so a
//! statement whose text a caller shapes (any filter, any order) is never
//! kept, only those of a known few shapes.

use diesel::expression::Expression;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A statement, prepared once per connection when `reuse`, else sent
/// afresh at every call, whatever literal SQL it holds.
#[derive(Debug, Clone)]
pub struct Prepared<Q> {
    query: Q,
    reuse: bool,
}

impl<Q> Prepared<Q> {
    /// `query`, prepared once when `reuse`: a statement of one of a few
    /// shapes the program knows, never one a caller can vary at will.
    pub fn when(reuse: bool, query: Q) -> Self {
        Self { query, reuse }
    }
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> QueryId for Prepared<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        self.query.walk_ast(out)
    }

    /// Overrides diesel's judgement, which is "never" for any statement
    /// with literal SQL. On Postgres a statement is its text and the types
    /// of its parameters, which are what diesel's cache knows it by (this
    /// type has no identity of its own: `HAS_STATIC_QUERY_ID` is false), so
    /// reusing it is sound whatever it holds.
    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> diesel::QueryResult<bool> {
        Ok(self.reuse)
    }
}

/// `UPDATE table SET .. WHERE .. RETURNING ..` that a connection prepares
/// once. diesel sends every UPDATE afresh, since a changeset may leave out
/// the columns whose value it does not have; one whose columns are always
/// the same is written here.
pub struct Update<F, S, W, R> {
    from: F,
    set: S,
    filter: W,
    returning: R,
}

impl<F, S, W, R> Update<F, S, W, R> {
    /// Sets `changes` (every column, whatever the values) on the rows of
    /// `table` where `filter` holds, and returns `returning` of each.
    pub fn new<T, C>(table: T, changes: C, filter: W, returning: R) -> Self
    where
        T: diesel::QuerySource<FromClause = F>,
        C: diesel::AsChangeset<Target = T, Changeset = S>,
    {
        Self {
            from: table.from_clause(),
            set: changes.as_changeset(),
            filter,
            returning,
        }
    }
}

impl<F, S, W, R: Expression> Query for Update<F, S, W, R> {
    type SqlType = R::SqlType;
}

impl<F, S, W, R> QueryId for Update<F, S, W, R> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<F, S, W, R> QueryFragment<Pg> for Update<F, S, W, R>
where
    F: QueryFragment<Pg>,
    S: QueryFragment<Pg>,
    W: QueryFragment<Pg>,
    R: QueryFragment<Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql("UPDATE ");
        self.from.walk_ast(out.reborrow())?;
        out.push_sql(" SET ");
        self.set.walk_ast(out.reborrow())?;
        out.push_sql(" WHERE ");
        self.filter.walk_ast(out.reborrow())?;
        out.push_sql(" RETURNING ");
        self.returning.walk_ast(out.reborrow())
    }
}

/// A query with `LIMIT n` written into its text rather than bound: a plan
/// made once for all calls then knows how few rows it is for (with a bound
/// limit, Postgres costs a plan made in advance for a tenth of the table,
/// never finds it cheaper than planning again, and plans at every call).
#[derive(Debug, Clone)]
pub struct Limit<Q> {
    query: Q,
    sql: String,
}

impl<Q> Limit<Q> {
    pub fn new(query: Q, limit: i64) -> Self {
        Self {
            query,
            sql: format!(" LIMIT {limit}"),
        }
    }
}

impl<Q: Query> Query for Limit<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> QueryId for Limit<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Limit<Q> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        self.query.walk_ast(out.reborrow())?;
        out.push_sql(&self.sql);
        Ok(())
    }
}

/// The shapes of one kind of statement that connections keep prepared: the
/// first `max` to come, each one statement per connection. Each costs its
/// Postgres backend about 80 KB (the statement and its plan, on `users`),
/// so that a connection holds at most `max` of them, whatever callers send;
/// the shapes in common use come first and stay.
pub struct Shapes {
    admitted: std::sync::Mutex<Vec<u64>>,
    max: usize,
}

impl Shapes {
    pub const fn new(max: usize) -> Self {
        Self {
            admitted: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    /// Whether statements of `shape` (whatever makes their text) are kept.
    pub fn admit(&self, shape: impl std::hash::Hash) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let key = BuildHasherDefault::<DefaultHasher>::default().hash_one(shape);
        let mut admitted = self.admitted.lock().unwrap_or_else(|e| e.into_inner());
        if admitted.contains(&key) {
            return true;
        }
        if admitted.len() < self.max {
            admitted.push(key);
            return true;
        }
        false
    }
}
