//! Totals of a tenant's users read from the counters that triggers keep
//! in `user_counts` (migration `2026-12-04-090000_user_counts`) instead of
//! counted: the cost of a total that an admin browsing a tenant asks for
//! on every page does not grow with the tenant.
//!
//! The counters know the live users of a tenant and how many of them are
//! active; every other list is counted as before.

use diesel::sql_types::BigInt;
use diesel::{ExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{BoolField, Condition, ListQuery, UuidField};
use crate::store::db;
use crate::store::filter::StringOp;
use crate::store::schema::user_counts;

/// The total of `query` as [`super::list`] reports it, from the counters,
/// when `query` asks for one the counters know; `None` when it asks for
/// none or for one that must be counted.
///
/// Read in the caller's transaction, the total agrees with the page: the
/// counters change in the transaction of every change they count. With a
/// `count_limit` it stops where a count would, at the limit plus one.
pub async fn counted(
    conn: &mut AsyncPgConnection,
    query: &ListQuery,
) -> diesel::QueryResult<Option<i64>> {
    let Some((tenant, counter)) = counter(query) else {
        return Ok(None);
    };
    let total = user_counts::table
        .filter(user_counts::tenant_id.eq(tenant))
        .select(diesel::dsl::sql::<BigInt>(counter.sum()))
        .get_results::<i64>(conn)
        .await
        .and_then(db::single)?;
    Ok(Some(limited(query, total)))
}

/// The tenant and counter that know the total `query` asks for, if any.
pub(super) fn counter(query: &ListQuery) -> Option<(Uuid, Counter)> {
    query
        .count_total
        .then(|| counter_of(&query.conditions))
        .flatten()
}

/// A total read from the counters, stopped where a count would stop.
pub(super) fn limited(query: &ListQuery, total: i64) -> i64 {
    match query.count_limit {
        Some(limit) => total.min(limit + 1),
        None => total,
    }
}

/// The counted users a list selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Counter {
    Live,
    Active,
    Inactive,
}

impl Counter {
    /// The SQL sum over a tenant's shards; 0 for a tenant without rows
    /// (one that never had a user).
    fn sum(self) -> &'static str {
        match self {
            Self::Live => "COALESCE(sum(user_counts.users), 0)::bigint",
            Self::Active => "COALESCE(sum(user_counts.active), 0)::bigint",
            Self::Inactive => "COALESCE(sum(user_counts.users - user_counts.active), 0)::bigint",
        }
    }

    /// The total of a tenant as a column of another statement, read in
    /// that statement's snapshot (an uncorrelated subquery, computed once):
    /// the tenant's id is to be bound after this text, then `)`.
    pub(super) fn subquery(self) -> String {
        format!("(SELECT {} FROM user_counts WHERE tenant_id = ", self.sum())
    }
}

/// The tenant and counter of a list of its live users, with or without a
/// condition on `active`; `None` for any other list (another field,
/// deleted users, no tenant or several, contradicting conditions).
fn counter_of(conditions: &[Condition]) -> Option<(Uuid, Counter)> {
    let (mut live, mut tenant, mut active) = (false, None, None);
    for condition in conditions {
        match condition {
            Condition::Live => live = true,
            Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(id)) => {
                if *tenant.get_or_insert(*id) != *id {
                    return None;
                }
            }
            Condition::Bool(BoolField::Active, value) => {
                if *active.get_or_insert(*value) != *value {
                    return None;
                }
            }
            _ => return None,
        }
    }
    let counter = match active {
        None => Counter::Live,
        Some(true) => Counter::Active,
        Some(false) => Counter::Inactive,
    };
    live.then_some((tenant?, counter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::filter::TextOp;
    use crate::store::users::TextField;

    const TENANT: Uuid = Uuid::from_u128(0x0190_c8f2_5b7e_7c1a_9d3e_2f4a_6b8c_0d1e);

    fn of_tenant(more: &[Condition]) -> Vec<Condition> {
        let mut conditions = vec![
            Condition::Uuid(UuidField::TenantId, StringOp::EqualTo(TENANT)),
            Condition::Live,
        ];
        conditions.extend_from_slice(more);
        conditions
    }

    #[test]
    fn the_live_users_of_a_tenant_and_their_activity_are_counted_by_the_counters() {
        assert_eq!(counter_of(&of_tenant(&[])), Some((TENANT, Counter::Live)));
        let active = Condition::Bool(BoolField::Active, true);
        assert_eq!(
            counter_of(&of_tenant(std::slice::from_ref(&active))),
            Some((TENANT, Counter::Active))
        );
        assert_eq!(
            counter_of(&of_tenant(&[active.clone(), active])),
            Some((TENANT, Counter::Active)),
            "the same condition twice"
        );
        assert_eq!(
            counter_of(&of_tenant(&[Condition::Bool(BoolField::Active, false)])),
            Some((TENANT, Counter::Inactive))
        );
        // A tenant key's confinement repeats the filter's tenant.
        assert_eq!(
            counter_of(&of_tenant(&[Condition::Uuid(
                UuidField::TenantId,
                StringOp::EqualTo(TENANT)
            )])),
            Some((TENANT, Counter::Live))
        );
    }

    #[test]
    fn any_other_list_is_counted_row_by_row() {
        let other = Uuid::from_u128(7);
        for conditions in [
            // Deleted users too, every tenant, two tenants.
            vec![Condition::Uuid(
                UuidField::TenantId,
                StringOp::EqualTo(TENANT),
            )],
            vec![Condition::Live],
            of_tenant(&[Condition::Uuid(
                UuidField::TenantId,
                StringOp::EqualTo(other),
            )]),
            of_tenant(&[Condition::Uuid(
                UuidField::TenantId,
                StringOp::ValueIn(vec![TENANT]),
            )]),
            of_tenant(&[
                Condition::Bool(BoolField::Active, true),
                Condition::Bool(BoolField::Active, false),
            ]),
            of_tenant(&[Condition::Bool(BoolField::IsOptedIn, true)]),
            of_tenant(&[Condition::Search("ada".into())]),
            of_tenant(&[Condition::Text(
                TextField::Email,
                TextOp::EqualTo("ada@example.com".into()),
            )]),
        ] {
            assert_eq!(counter_of(&conditions), None, "{conditions:?}");
        }
    }
}
