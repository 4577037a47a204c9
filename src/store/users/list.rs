//! Lists of users: filters, ordering, keyset pages and counts.

use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use diesel::{
    BoolExpressionMethods, ExpressionMethods, NullableExpressionMethods, PgJsonbExpressionMethods,
    PgTextExpressionMethods, QueryDsl, SelectableHelper, TextExpressionMethods, pg::Pg,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{BoolField, Condition, OrderField, TextField, TimeField, UuidField};
use crate::store::db;
use crate::store::events::{self, Snapshot};
use crate::store::filter::{
    Boxed, CursorValue, Direction, StringOp, TextOp, escape_like, text_condition, time_condition,
    uuid_condition,
};
use crate::store::models::UserRow;
use crate::store::page::{CursorMismatch, Page};
use crate::store::prepared::{Limit, Prepared, Shapes};
use crate::store::schema::users;

/// What a page of users is made of.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListQuery {
    pub conditions: Vec<Condition>,
    /// Ordering terms, most significant first, not including the `Id` tie-breaker.
    pub order: Vec<(OrderField, Direction)>,
    /// Keyset cursor: the sort key of the last row already seen, one value per
    /// term of [`ListQuery::terms`].
    pub after: Option<Vec<CursorValue>>,
    pub limit: i64,
    pub offset: i64,
    pub count_total: bool,
    /// With `count_total`: count at most this many matches plus one, so
    /// that a total above the limit tells that the count stopped there.
    pub count_limit: Option<i64>,
}

impl ListQuery {
    /// The ordering terms including the `Id` tie-breaker.
    pub fn terms(&self) -> Vec<(OrderField, Direction)> {
        let mut terms = self.order.clone();
        terms.push((OrderField::Id, Direction::Asc));
        terms
    }
}

/// One page of users, with the total count when asked for, and the
/// snapshot both were read at: the position in the change feed right after
/// every change the page shows (list, then watch from there).
///
/// Fails with [`CursorMismatch`] (inside `Ok`) when `query.after` does not fit
/// the order, which callers report as a bad page token.
pub async fn list(
    conn: &mut AsyncPgConnection,
    query: &ListQuery,
) -> diesel::QueryResult<Result<(Page<UserRow>, Snapshot), CursorMismatch>> {
    let terms = query.terms();
    let tenant = query
        .conditions
        .iter()
        .find_map(|condition| match condition {
            Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(tenant)) => Some(*tenant),
            _ => None,
        });
    // A page by token of one tenant in the order of `created_at` or `id`
    // starts at the tenant and the cursor together (see `keyset_condition`).
    let keyed = match (&query.after, tenant) {
        (Some(_), Some(tenant)) => {
            matches!(terms[0].0, OrderField::CreatedAt | OrderField::Id)
                && query.conditions.iter().all(|condition| match condition {
                    Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(other)) => {
                        *other == tenant
                    }
                    _ => true,
                })
        }
        _ => false,
    };
    let after = |values| keyset_condition(&terms, values, tenant.filter(|_| keyed));
    if query
        .after
        .as_ref()
        .is_some_and(|values| after(values).is_none())
    {
        return Ok(Err(CursorMismatch));
    }
    let rows_query = || {
        let mut rows = if keyed {
            // The tenant is in the bound instead.
            filtered(query.conditions.iter().filter(|condition| {
                !matches!(
                    condition,
                    Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(_))
                )
            }))
        } else {
            filtered(&query.conditions)
        };
        if let Some(after) = query.after.as_ref().and_then(|values| after(values)) {
            rows = rows.filter(after);
        }
        rows.order(OrderBy {
            by_tenant: keyed,
            terms: terms.clone(),
        })
    };
    // One row more than asked tells whether another page follows.
    let limit = query.limit + 1;
    let counter = super::count::counter(query);
    if !query.count_total || counter.is_some() {
        // One statement: the page, the snapshot it was read at and the
        // total the counters hold, in each row. An empty page has no row
        // to carry them, and is read again below.
        let snapshot = || diesel::dsl::sql::<Text>(events::SNAPSHOT);
        let seq = || diesel::dsl::sql::<Nullable<BigInt>>(events::LAST_SEQ);
        let prepared = prepared_shape(query).is_some_and(|shape| SHAPES.admit(shape));
        // Prepared with its limit in its text, or sent afresh.
        macro_rules! load_page {
            ($page:expr) => {
                if prepared {
                    Prepared::when(true, Limit::new($page, limit))
                        .load(conn)
                        .await?
                } else {
                    Prepared::when(false, $page.limit(limit).offset(query.offset))
                        .load(conn)
                        .await?
                }
            };
        }
        let rows: Vec<(UserRow, String, Option<i64>, Option<i64>)> = match counter {
            Some((tenant, counter)) => {
                let total = diesel::dsl::sql::<Nullable<BigInt>>(&counter.subquery())
                    .bind::<diesel::sql_types::Uuid, _>(tenant)
                    .sql(")");
                load_page!(rows_query().select((UserRow::as_select(), snapshot(), seq(), total)))
            }
            None => {
                let total = diesel::dsl::sql::<Nullable<BigInt>>("NULL::bigint");
                load_page!(rows_query().select((UserRow::as_select(), snapshot(), seq(), total)))
            }
        };
        if let Some((_, snapshot, seq, total)) = <[_]>::first(&rows) {
            let snapshot = events::snapshot_of(snapshot, *seq)?;
            let total = total.map(|total| super::count::limited(query, total));
            let rows = rows.into_iter().map(|(row, ..)| row).collect();
            return Ok(Ok((page_of(rows, query, &terms, total), snapshot)));
        }
    }
    // The count, the page and the snapshot in one transaction, so that
    // they agree.
    conn.build_transaction()
        .repeatable_read()
        .read_only()
        .run(async |conn| {
            let snapshot = events::now(conn).await?;
            // Totals the counters know are read from them (count.rs).
            let counted = super::count::counted(conn, query).await?;
            let total = match (query.count_total, query.count_limit) {
                _ if counted.is_some() => counted,
                (false, _) => None,
                (true, None) => Some(
                    filtered(&query.conditions)
                        .count()
                        .get_results::<i64>(conn)
                        .await
                        .and_then(db::single)?,
                ),
                // The first limit + 1 matches, counted: as many rows at most.
                (true, Some(limit)) => Some(
                    CountRows(
                        filtered(&query.conditions)
                            .select(users::id)
                            .limit(limit + 1),
                    )
                    .get_results::<i64>(conn)
                    .await
                    .and_then(db::single)?,
                ),
            };
            let rows = rows_query()
                .limit(limit)
                .offset(query.offset)
                .select(UserRow::as_select())
                .load::<UserRow>(conn)
                .await?;
            Ok(Ok((page_of(rows, query, &terms, total), snapshot)))
        })
        .await
}

/// The shapes of list statements that connections keep prepared.
static SHAPES: Shapes = Shapes::new(64);

/// What makes the text of the page statement of `query`, when it is one a
/// connection may keep prepared (up to [`SHAPES`]): the first page or a
/// page by token of the live users of one tenant (named once, or twice: by
/// the filter and by a tenant-bound caller's scope), maybe only its active
/// or inactive ones, in the order of one field or none. Each such order
/// has its index, whose plan is as good for any tenant and cursor, so the
/// plan is made once (a page by token holds the tenant in its bound: see
/// [`keyset_condition`]). `None` for any other list (another filter, an
/// order of several fields, an offset), sent afresh and planned for its
/// values.
fn prepared_shape(query: &ListQuery) -> Option<impl std::hash::Hash> {
    let mut kinds = Vec::with_capacity(query.conditions.len());
    let (mut live, mut tenant, mut active) = (0, 0, 0);
    for condition in &query.conditions {
        let (kind, count) = match condition {
            Condition::Live => (0u8, &mut live),
            Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(_)) => (1, &mut tenant),
            Condition::Bool(BoolField::Active, _) => (2, &mut active),
            _ => return None,
        };
        *count += 1;
        kinds.push(kind);
    }
    let fits = query.order.len() <= 1
        && query.offset == 0
        && live == 1
        && (1..=2).contains(&tenant)
        && active <= 1;
    fits.then(|| {
        let counter = super::count::counter(query).map(|(_, counter)| counter);
        (
            kinds,
            query.order.clone(),
            query.after.is_some(),
            counter,
            query.limit,
        )
    })
}

/// A page from the rows read (one more than asked, when there are).
fn page_of(
    mut rows: Vec<UserRow>,
    query: &ListQuery,
    terms: &[(OrderField, Direction)],
    total: Option<i64>,
) -> Page<UserRow> {
    let next = if rows.len() as i64 > query.limit {
        rows.truncate(query.limit as usize);
        rows.last().map(|row| cursor_of(row, terms))
    } else {
        None
    };
    Page { rows, total, next }
}

/// `SELECT count(*) FROM (query) AS matches`: counts the rows of a query
/// that has a LIMIT, which `query.count()` cannot (it would drop the limit)
/// and `id IN (query)` does badly (Postgres joins the whole table to it).
#[derive(Debug, Clone, diesel::query_builder::QueryId)]
struct CountRows<Q>(Q);

impl<Q> diesel::query_builder::Query for CountRows<Q> {
    type SqlType = diesel::sql_types::BigInt;
}

impl<Q: diesel::query_builder::QueryFragment<Pg>> diesel::query_builder::QueryFragment<Pg>
    for CountRows<Q>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        out.push_sql("SELECT count(*) FROM (");
        self.0.walk_ast(out.reborrow())?;
        out.push_sql(") AS matches");
        Ok(())
    }
}

/// The rows matching every condition, unordered.
pub(super) fn filtered<'a>(
    conditions: impl IntoIterator<Item = &'a Condition>,
) -> users::BoxedQuery<'static, Pg> {
    let mut query = users::table.into_boxed();
    for condition in conditions {
        query = query.filter(condition_expression(condition));
    }
    query
}

fn condition_expression(condition: &Condition) -> Boxed<users::table> {
    match condition {
        Condition::Text(field, op) => match field {
            TextField::Reference => text_condition!(users::reference, op),
            TextField::Email => in_search_text(email_condition(op), op),
            TextField::Phone => text_condition!(users::phone, op),
            TextField::FirstName => in_search_text(text_condition!(users::first_name, op), op),
            TextField::LastName => in_search_text(text_condition!(users::last_name, op), op),
            TextField::Locale => text_condition!(users::locale, op),
            TextField::Timezone => text_condition!(users::timezone, op),
            TextField::AvatarUrl => text_condition!(users::avatar_url, op),
        },
        Condition::Uuid(field, op) => match field {
            UuidField::Id => uuid_condition!(users::id, op),
            UuidField::TenantId => uuid_condition!(users::tenant_id, op),
        },
        Condition::Bool(field, value) => match field {
            BoolField::Active => Box::new(users::active.eq(*value)),
            BoolField::IsOptedIn => Box::new(users::is_opted_in.eq(*value)),
        },
        Condition::Time(field, op) => match field {
            TimeField::CreatedAt => time_condition!(users::created_at, *op),
            TimeField::UpdatedAt => time_condition!(users::updated_at, *op),
            // `IS NOT NULL AND`: false, not unknown, for a user without one.
            TimeField::DeleteTime => {
                let compared: Boxed<users::table> =
                    time_condition!(users::delete_time.assume_not_null(), *op);
                Box::new(users::delete_time.is_not_null().and(compared))
            }
            TimeField::ExpireTime => {
                let compared: Boxed<users::table> =
                    time_condition!(users::expire_time.assume_not_null(), *op);
                Box::new(users::expire_time.is_not_null().and(compared))
            }
        },
        Condition::CustomDataContains(value) => {
            Box::new(users::custom_data.contains(value.clone()))
        }
        Condition::Live => Box::new(users::delete_time.is_null()),
        Condition::UpdatedBy(actor) => Box::new(users::updated_by.eq(actor.as_str().to_owned())),
        Condition::Search(text) => {
            let pattern = format!("%{}%", escape_like(text));
            // The fields' own conditions decide; the search text's, which
            // they imply, is what the index serves.
            let fields = users::email
                .ilike(pattern.clone())
                .or(users::first_name.ilike(pattern.clone()))
                .or(users::last_name.ilike(pattern.clone()));
            Box::new(search_text_matches("ILIKE", pattern).and(fields))
        }
        Condition::All(conditions) => conditions
            .iter()
            .map(condition_expression)
            .reduce(|all, next| Box::new(all.and(next)))
            .unwrap_or_else(|| Box::new(diesel::dsl::sql::<Bool>("TRUE"))),
        Condition::Any(conditions) => conditions
            .iter()
            .map(condition_expression)
            .reduce(|any, next| Box::new(any.or(next)))
            .unwrap_or_else(|| Box::new(diesel::dsl::sql::<Bool>("FALSE"))),
        Condition::Not(condition) => Box::new(diesel::dsl::not(condition_expression(condition))),
    }
}

/// The text `search` looks in: email, first name and last name joined by
/// newlines, exactly the expression `users_search_text_idx` indexes (its
/// trigrams), so that the planner matches the two.
const SEARCH_TEXT: &str =
    r#"("users"."email" || E'\n' || "users"."first_name" || E'\n' || "users"."last_name")"#;

/// `SEARCH_TEXT LIKE pattern` (or `ILIKE`).
fn search_text_matches(operator: &str, pattern: String) -> Boxed<users::table> {
    Box::new(
        diesel::dsl::sql::<Bool>(&format!("{SEARCH_TEXT} {operator} ")).bind::<Text, _>(pattern),
    )
}

/// `condition` on email, first name or last name, and, when it is a pattern,
/// what it implies: that the search text holds a match of the pattern. The
/// two together mean what the field's condition means alone, and the second
/// lets the search text's trigram index find the candidates.
fn in_search_text(condition: Boxed<users::table>, op: &TextOp) -> Boxed<users::table> {
    let implied = match op {
        StringOp::Like(pattern) => search_text_matches("LIKE", format!("%{pattern}%")),
        StringOp::ILike(pattern) => search_text_matches("ILIKE", format!("%{pattern}%")),
        _ => return condition,
    };
    Box::new(implied.and(condition))
}

diesel::define_sql_function! {
    /// Postgres' `lower`, with the database's collation: the function the
    /// unique index on emails is built with.
    fn lower(text: Text) -> Text;
}

/// A comparison of `email` that ignores case the way its unique index
/// `(tenant_id, lower(email)) WHERE email <> ''` does, and can use that
/// index: a non-empty value implies `email <> ''`, which the planner needs
/// to see. Patterns compare the stored text as given.
fn email_condition(op: &TextOp) -> Boxed<users::table> {
    /// `lower(email) = ANY` (or `<> ALL`) the values, lowered by Postgres.
    fn lowered(quantifier: &str, values: Vec<String>) -> Boxed<users::table> {
        Box::new(
            diesel::dsl::sql::<Bool>(&format!(
                r#"lower("users"."email") {quantifier} (ARRAY(SELECT lower(v) FROM unnest("#
            ))
            .bind::<Array<Text>, _>(values)
            .sql(") AS v))"),
        )
    }
    let empty = String::is_empty;
    match op.clone() {
        StringOp::EqualTo(value) if value.is_empty() => Box::new(users::email.eq(value)),
        StringOp::EqualTo(value) => Box::new(
            users::email
                .ne("")
                .and(lower(users::email).eq(lower(value))),
        ),
        StringOp::NotEqualTo(value) => Box::new(lower(users::email).ne(lower(value))),
        StringOp::ValueIn(values) => {
            let with_empty = values.iter().any(empty);
            let found: Boxed<users::table> = Box::new(users::email.ne("").and(lowered(
                "= ANY",
                values.into_iter().filter(|v| !v.is_empty()).collect(),
            )));
            if with_empty {
                Box::new(found.or(users::email.eq("")))
            } else {
                found
            }
        }
        StringOp::ValueNotIn(values) => lowered("<> ALL", values),
        StringOp::Like(pattern) => Box::new(users::email.like(pattern)),
        StringOp::ILike(pattern) => Box::new(users::email.ilike(pattern)),
    }
}

/// The `ORDER BY` list of a user list, written out term by term, after
/// `tenant_id` (in the first term's direction) when `by_tenant`: a page
/// whose bound holds the tenant instead of `tenant_id = t`, which the
/// tenant's index then serves in this order.
///
/// diesel's `then_order_by` nests one more tuple per term, and walking a
/// nested tuple walks each level twice (once to ask whether it is empty), so
/// its cost doubles with every term. This walks the terms once.
#[derive(Debug, Clone)]
struct OrderBy {
    by_tenant: bool,
    terms: Vec<(OrderField, Direction)>,
}

impl diesel::Expression for OrderBy {
    type SqlType = diesel::expression::expression_types::NotSelectable;
}

impl diesel::AppearsOnTable<users::table> for OrderBy {}

impl diesel::query_builder::QueryFragment<Pg> for OrderBy {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        if let (true, Some((_, direction))) = (self.by_tenant, <[_]>::first(&self.terms)) {
            out.push_sql(match direction {
                Direction::Asc => r#""users"."tenant_id" ASC, "#,
                Direction::Desc => r#""users"."tenant_id" DESC, "#,
            });
        }
        for (i, (field, direction)) in self.terms.iter().enumerate() {
            if i > 0 {
                out.push_sql(", ");
            }
            out.push_identifier("users")?;
            out.push_sql(".");
            out.push_identifier(field.column())?;
            if field.is_read_by_people() {
                out.push_sql(" COLLATE ");
                out.push_identifier(COLLATION)?;
            }
            out.push_sql(match direction {
                Direction::Asc => " ASC",
                Direction::Desc => " DESC",
            });
        }
        Ok(())
    }
}

/// The collation of the text people read in a list (names, email,
/// reference): ICU's root collation, which compares letters first, then
/// accents, then case, so `anna` < `Bob` < `Émile` < `Zoe`. It is
/// deterministic: text that differs in any way never compares equal, so a
/// keyset cursor stays exact. The list indexes of these columns are built
/// with it.
pub const COLLATION: &str = "und-x-icu";

impl OrderField {
    /// Whether the field is text people read, ordered by [`COLLATION`]
    /// rather than by code point (phone, locale and time zone are codes).
    fn is_read_by_people(self) -> bool {
        matches!(
            self,
            Self::Email | Self::FirstName | Self::LastName | Self::Reference
        )
    }

    /// The column of `users` this field orders by.
    fn column(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::Email => "email",
            Self::FirstName => "first_name",
            Self::LastName => "last_name",
            Self::Locale => "locale",
            Self::Phone => "phone",
            Self::Timezone => "timezone",
            Self::Reference => "reference",
            Self::Active => "active",
            Self::Id => "id",
        }
    }
}

/// The sort key of `row` under `terms`, as a cursor.
fn cursor_of(row: &UserRow, terms: &[(OrderField, Direction)]) -> Vec<CursorValue> {
    terms
        .iter()
        .map(|(field, _)| match field {
            OrderField::CreatedAt => CursorValue::time(row.created_at),
            OrderField::UpdatedAt => CursorValue::time(row.updated_at),
            OrderField::Email => CursorValue::Text(row.email.clone()),
            OrderField::FirstName => CursorValue::Text(row.first_name.clone()),
            OrderField::LastName => CursorValue::Text(row.last_name.clone()),
            OrderField::Locale => CursorValue::Text(row.locale.clone()),
            OrderField::Phone => CursorValue::Text(row.phone.clone()),
            OrderField::Timezone => CursorValue::Text(row.timezone.clone()),
            OrderField::Reference => CursorValue::Text(row.reference.clone()),
            OrderField::Active => CursorValue::Bool(row.active),
            OrderField::Id => CursorValue::Text(row.id.to_string()),
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Before,
    After,
    AtOrAfter,
}

/// Rows strictly after the cursor in the order of `terms`:
/// `k1 > v1 OR (k1 = v1 AND k2 > v2) OR ...` (with `<` for descending terms),
/// plus the redundant `k1 >= v1`, which lets Postgres start the index scan at
/// the cursor instead of filtering every earlier row.
///
/// With a `tenant` (a list of one tenant ordered first by `created_at` or
/// `id`, whose caller drops `tenant_id = t` and orders by `tenant_id`
/// first), the redundant bound is `tenant_id <= t AND (tenant_id, k1) >=
/// (t, v1)` (`>=` and `<=` swapped for a descending term). `k1 >= v1` alone
/// also fits the index of `k1` across tenants, on which Postgres may plan
/// the page (it cannot know that the tenant's users end soon after the
/// cursor) and then read every later user of every tenant to find the few
/// of this one. With `tenant_id = t` beside the row comparison, the index
/// scan starts at the tenant's first user (an equality is the start key
/// of its column), and a deep page costs its position. The row comparison
/// alone starts the scan at the cursor, and `tenant_id <= t` ends it at the
/// tenant's last user. Other fields have no index across tenants, and keep
/// `tenant_id = t` and `k1 >= v1`, which start their tenant's index at the
/// cursor.
fn keyset_condition(
    terms: &[(OrderField, Direction)],
    values: &[CursorValue],
    tenant: Option<Uuid>,
) -> Option<Boxed<users::table>> {
    if terms.len() != values.len() {
        return None;
    }
    let mut any: Option<Boxed<users::table>> = None;
    for i in 0..terms.len() {
        let (field, direction) = terms[i];
        let past = match direction {
            Direction::Asc => Cmp::After,
            Direction::Desc => Cmp::Before,
        };
        let mut all = compare(field, past, &values[i])?;
        for j in 0..i {
            all = Box::new(diesel::BoolExpressionMethods::and(
                compare(terms[j].0, Cmp::Eq, &values[j])?,
                all,
            ));
        }
        any = Some(match any {
            None => all,
            Some(any) => Box::new(diesel::BoolExpressionMethods::or(any, all)),
        });
    }
    let (first, direction) = terms[0];
    let bound = match (tenant, direction) {
        (Some(tenant), _) if matches!(first, OrderField::CreatedAt | OrderField::Id) => {
            tenant_bound(tenant, first, direction, &values[0])?
        }
        (_, Direction::Asc) => compare(first, Cmp::AtOrAfter, &values[0])?,
        (_, Direction::Desc) => {
            // `k1 <= v1` for descending order.
            let before = compare(first, Cmp::Before, &values[0])?;
            let equal = compare(first, Cmp::Eq, &values[0])?;
            Box::new(diesel::BoolExpressionMethods::or(before, equal))
        }
    };
    Some(Box::new(diesel::BoolExpressionMethods::and(bound, any?)))
}

/// `tenant_id <= tenant AND (tenant_id, field) >= (tenant, value)` (`>=`
/// and `<=` swapped for a descending term), or `None` when the value has
/// the wrong type for the field.
fn tenant_bound(
    tenant: Uuid,
    field: OrderField,
    direction: Direction,
    value: &CursorValue,
) -> Option<Boxed<users::table>> {
    use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
    let key = if field.is_read_by_people() {
        format!(r#""users"."{}" COLLATE "{COLLATION}""#, field.column())
    } else {
        format!(r#""users"."{}""#, field.column())
    };
    let (within, cmp) = match direction {
        Direction::Asc => ("<=", ">="),
        Direction::Desc => (">=", "<="),
    };
    let row = diesel::dsl::sql::<Bool>(&format!(r#"("users"."tenant_id" {within} "#))
        .bind::<SqlUuid, _>(tenant)
        .sql(&format!(r#" AND ("users"."tenant_id", {key}) {cmp} ("#))
        .bind::<SqlUuid, _>(tenant)
        .sql(", ");
    Some(match (field, value) {
        (OrderField::CreatedAt | OrderField::UpdatedAt, CursorValue::Micros(m)) => Box::new(
            row.bind::<Timestamptz, _>(DateTime::<Utc>::from_timestamp_micros(*m)?)
                .sql("))"),
        ),
        (OrderField::Active, CursorValue::Bool(b)) => Box::new(row.bind::<Bool, _>(*b).sql("))")),
        (OrderField::Id, CursorValue::Text(s)) => {
            Box::new(row.bind::<SqlUuid, _>(Uuid::parse_str(s).ok()?).sql("))"))
        }
        (
            OrderField::Email
            | OrderField::FirstName
            | OrderField::LastName
            | OrderField::Reference
            | OrderField::Locale
            | OrderField::Phone
            | OrderField::Timezone,
            CursorValue::Text(s),
        ) => Box::new(row.bind::<Text, _>(s.clone()).sql("))")),
        _ => return None,
    })
}

/// The column of `field` in [`COLLATION`], as the list indexes hold it.
fn collated(field: OrderField) -> diesel::expression::SqlLiteral<Text> {
    diesel::dsl::sql(&format!(
        r#""users"."{}" COLLATE "{COLLATION}""#,
        field.column()
    ))
}

/// `field <cmp> value`, or `None` when the value has the wrong type for the field.
fn compare(field: OrderField, cmp: Cmp, value: &CursorValue) -> Option<Boxed<users::table>> {
    macro_rules! compare {
        ($column:expr, $value:expr) => {{
            let value = $value;
            let expression: Boxed<users::table> = match cmp {
                Cmp::Eq => Box::new($column.eq(value)),
                Cmp::Before => Box::new($column.lt(value)),
                Cmp::After => Box::new($column.gt(value)),
                Cmp::AtOrAfter => Box::new($column.ge(value)),
            };
            Some(expression)
        }};
    }
    match (field, value) {
        (OrderField::CreatedAt, CursorValue::Micros(m)) => {
            compare!(
                users::created_at,
                DateTime::<Utc>::from_timestamp_micros(*m)?
            )
        }
        (OrderField::UpdatedAt, CursorValue::Micros(m)) => {
            compare!(
                users::updated_at,
                DateTime::<Utc>::from_timestamp_micros(*m)?
            )
        }
        (
            OrderField::Email
            | OrderField::FirstName
            | OrderField::LastName
            | OrderField::Reference,
            CursorValue::Text(s),
        ) => compare!(collated(field), s.clone()),
        (OrderField::Locale, CursorValue::Text(s)) => compare!(users::locale, s.clone()),
        (OrderField::Phone, CursorValue::Text(s)) => compare!(users::phone, s.clone()),
        (OrderField::Timezone, CursorValue::Text(s)) => compare!(users::timezone, s.clone()),
        (OrderField::Active, CursorValue::Bool(b)) => compare!(users::active, *b),
        (OrderField::Id, CursorValue::Text(s)) => compare!(users::id, Uuid::parse_str(s).ok()?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SQL of a query of ids filtered by `condition`, binds included.
    fn sql(condition: Boxed<users::table>) -> String {
        diesel::debug_query::<Pg, _>(&users::table.select(users::id).filter(condition)).to_string()
    }

    const ID: &str = "0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e";

    #[test]
    fn a_keyset_starts_at_the_cursor_and_breaks_ties_by_id() {
        let terms = [
            (OrderField::LastName, Direction::Asc),
            (OrderField::Id, Direction::Asc),
        ];
        let values = [
            CursorValue::Text("Lovelace".into()),
            CursorValue::Text(ID.into()),
        ];
        assert_eq!(
            sql(keyset_condition(&terms, &values, None).unwrap()),
            format!(
                "SELECT \"users\".\"id\" FROM \"users\" WHERE ((\"users\".\"last_name\" COLLATE \"und-x-icu\" >= $1) AND \
                 ((\"users\".\"last_name\" COLLATE \"und-x-icu\" > $2) OR ((\"users\".\"last_name\" COLLATE \"und-x-icu\" = $3) \
                 AND (\"users\".\"id\" > $4)))) -- binds: [\"Lovelace\", \"Lovelace\", \"Lovelace\", {ID}]"
            )
        );
    }

    #[test]
    fn a_keyset_of_one_tenant_holds_the_tenant_in_its_bound() {
        let terms = [
            (OrderField::CreatedAt, Direction::Asc),
            (OrderField::Id, Direction::Asc),
        ];
        let values = [CursorValue::Micros(1_000_000), CursorValue::Text(ID.into())];
        let t = "1970-01-01T00:00:01Z";
        assert_eq!(
            sql(keyset_condition(&terms, &values, Some(Uuid::parse_str(ID).unwrap())).unwrap()),
            format!(
                "SELECT \"users\".\"id\" FROM \"users\" WHERE ((\"users\".\"tenant_id\" <= $1 AND \
                 (\"users\".\"tenant_id\", \"users\".\"created_at\") >= ($2, $3)) AND \
                 ((\"users\".\"created_at\" > $4) OR ((\"users\".\"created_at\" = $5) \
                 AND (\"users\".\"id\" > $6)))) -- binds: [{ID}, {ID}, {t}, {t}, {t}, {ID}]"
            )
        );
    }

    #[test]
    fn a_descending_term_pages_downwards() {
        let terms = [
            (OrderField::CreatedAt, Direction::Desc),
            (OrderField::Active, Direction::Asc),
            (OrderField::Id, Direction::Asc),
        ];
        let values = [
            CursorValue::Micros(1_000_000),
            CursorValue::Bool(true),
            CursorValue::Text(ID.into()),
        ];
        // created_at <= t AND (created_at < t OR (created_at = t AND active > a)
        //   OR (active = a AND created_at = t AND id > i))
        let t = "1970-01-01T00:00:01Z";
        assert_eq!(
            sql(keyset_condition(&terms, &values, None).unwrap()),
            format!(
                "SELECT \"users\".\"id\" FROM \"users\" WHERE (((\"users\".\"created_at\" < $1) OR \
                 (\"users\".\"created_at\" = $2)) AND (((\"users\".\"created_at\" < $3) OR \
                 ((\"users\".\"created_at\" = $4) AND (\"users\".\"active\" > $5))) OR \
                 ((\"users\".\"active\" = $6) AND ((\"users\".\"created_at\" = $7) AND \
                 (\"users\".\"id\" > $8))))) -- binds: [{t}, {t}, {t}, {t}, true, true, {t}, {ID}]"
            )
        );
    }

    #[test]
    fn a_cursor_that_does_not_fit_the_order_builds_nothing() {
        let terms = [
            (OrderField::Email, Direction::Asc),
            (OrderField::Id, Direction::Asc),
        ];
        // Too few values, a value of the wrong type, an id that is no UUID.
        assert!(keyset_condition(&terms, &[CursorValue::Text(ID.into())], None).is_none());
        assert!(
            keyset_condition(
                &terms,
                &[CursorValue::Bool(true), CursorValue::Text(ID.into())],
                None
            )
            .is_none()
        );
        assert!(
            keyset_condition(
                &terms,
                &[CursorValue::Text("a".into()), CursorValue::Text("x".into())],
                None
            )
            .is_none()
        );
        assert!(
            keyset_condition(
                &[(OrderField::CreatedAt, Direction::Asc)],
                &[CursorValue::Micros(i64::MAX)],
                Some(Uuid::parse_str(ID).unwrap())
            )
            .is_none(),
            "a time out of range"
        );
    }

    #[test]
    fn only_a_tenants_live_users_in_one_order_make_a_statement_kept_prepared() {
        let tenant = Condition::Uuid(
            UuidField::TenantId,
            StringOp::EqualTo(Uuid::parse_str(ID).unwrap()),
        );
        let query = |conditions: Vec<Condition>, order: Vec<(OrderField, Direction)>| ListQuery {
            conditions,
            order,
            ..ListQuery::default()
        };
        let by_last_name = vec![(OrderField::LastName, Direction::Desc)];
        let active = Condition::Bool(BoolField::Active, true);
        let reused = |query: &ListQuery| prepared_shape(query).is_some();
        assert!(reused(&query(
            vec![tenant.clone(), Condition::Live],
            vec![]
        )));
        assert!(reused(&query(
            vec![
                tenant.clone(),
                active.clone(),
                Condition::Live,
                tenant.clone()
            ],
            by_last_name.clone()
        )));
        // Deleted users too, another field, a second order term, an offset.
        assert!(!reused(&query(vec![tenant.clone()], vec![])));
        assert!(!reused(&query(
            vec![
                tenant.clone(),
                Condition::Live,
                Condition::Text(TextField::Email, StringOp::EqualTo("a@b.c".into())),
            ],
            vec![]
        )));
        let mut two_terms = by_last_name;
        two_terms.push((OrderField::Email, Direction::Asc));
        assert!(!reused(&query(
            vec![tenant.clone(), Condition::Live],
            two_terms
        )));
        assert!(!reused(&ListQuery {
            offset: 50,
            ..query(vec![tenant.clone(), Condition::Live], vec![])
        }));
        let by_token = |order| ListQuery {
            after: Some(vec![]),
            ..query(vec![tenant.clone(), Condition::Live], order)
        };
        assert!(reused(&by_token(vec![(
            OrderField::LastName,
            Direction::Asc
        )])));
    }

    #[test]
    fn the_order_by_is_written_once_per_term() {
        let order = OrderBy {
            by_tenant: false,
            terms: vec![
                (OrderField::LastName, Direction::Desc),
                (OrderField::Email, Direction::Asc),
                (OrderField::Id, Direction::Asc),
            ],
        };
        let query = users::table.into_boxed().select(users::id).order(order);
        assert_eq!(
            diesel::debug_query::<Pg, _>(&query).to_string(),
            "SELECT \"users\".\"id\" FROM \"users\" ORDER BY \"users\".\"last_name\" COLLATE \"und-x-icu\" DESC, \
             \"users\".\"email\" COLLATE \"und-x-icu\" ASC, \"users\".\"id\" ASC -- binds: []"
        );
    }
}
