//! ListUsers' `totalCount` of a tenant, and of its active or inactive
//! users, read from the counters in `user_counts` (issue 14): exact after
//! every kind of change, by any path; every other total counted as before.

use tonic::Code;
use users_service::{
    auth::Role,
    pb::v1::{
        BatchUpsertUsersRequest, BoolFilter, CreateTenantRequest, CreateUserRequest,
        DeactivateUserRequest, DeleteTenantRequest, DeleteUserRequest, ListUsersRequest,
        ListUsersResponse, PurgeTenantRequest, PurgeUserRequest, ReactivateUserRequest,
        StringFilter, Tenant, UndeleteTenantRequest, UndeleteUserRequest, User, UserFilter,
        batch_upsert_users_result::Outcome,
    },
};
use uuid::Uuid;

use crate::helpers::{TestApp, Users, spawn_app};

async fn create_tenant(app: &mut TestApp, name: &str) -> Uuid {
    let tenant = app
        .tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: name.into(),
                reference: name.into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create tenant succeeds")
        .into_inner()
        .tenant
        .expect("a tenant");
    tenant.id.parse().expect("a tenant id")
}

/// A user of `tenant` unique to `tag`.
fn person(tenant: Uuid, tag: &str, active: bool) -> User {
    User {
        tenant_id: tenant.to_string(),
        reference: format!("ref-{tag}"),
        email: format!("{tag}@example.com"),
        first_name: "Ada".into(),
        active: Some(active),
        ..Default::default()
    }
}

fn of_tenant(tenant: Uuid, active: Option<bool>) -> UserFilter {
    UserFilter {
        tenant_id: Some(StringFilter {
            equal_to: Some(tenant.to_string()),
            ..Default::default()
        }),
        active: active.map(|active| BoolFilter {
            equal_to: Some(active),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn list(users: &mut Users, request: ListUsersRequest) -> ListUsersResponse {
    users
        .list_users(request)
        .await
        .expect("list users succeeds")
        .into_inner()
}

/// ListUsers' `totalCount` of the tenant, of its active and of its inactive
/// users, with a page of one user.
async fn listed_totals(users: &mut Users, tenant: Uuid) -> [i64; 3] {
    let mut totals = [0; 3];
    for (total, active) in totals.iter_mut().zip([None, Some(true), Some(false)]) {
        let page = list(
            users,
            ListUsersRequest {
                filter: Some(of_tenant(tenant, active)),
                limit: Some(1),
                ..Default::default()
            },
        )
        .await;
        assert!(!page.total_count_capped);
        *total = page.total_count.expect("a total count");
    }
    totals
}

/// The tenant's live users, active and inactive, by `count(*)`.
async fn stored_totals(app: &TestApp, tenant: Uuid) -> [i64; 3] {
    let row = app
        .db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE active), count(*) FILTER (WHERE NOT active) \
             FROM users WHERE tenant_id = $1 AND delete_time IS NULL",
            &[&tenant],
        )
        .await
        .unwrap();
    [row.get(0), row.get(1), row.get(2)]
}

/// The sums of the tenant's counters: live, active, inactive.
async fn counter_totals(app: &TestApp, tenant: Uuid) -> [i64; 3] {
    let row = app
        .db
        .query_one(
            "SELECT COALESCE(sum(users), 0)::bigint, COALESCE(sum(active), 0)::bigint, \
             COALESCE(sum(users - active), 0)::bigint FROM user_counts WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .unwrap();
    [row.get(0), row.get(1), row.get(2)]
}

/// ListUsers' totals and the counters agree with `count(*)`, which is
/// `expected` (live, active, inactive).
async fn assert_totals(app: &mut TestApp, tenant: Uuid, expected: [i64; 3], after: &str) {
    assert_eq!(
        stored_totals(app, tenant).await,
        expected,
        "stored, {after}"
    );
    assert_eq!(
        counter_totals(app, tenant).await,
        expected,
        "counters, {after}"
    );
    assert_eq!(
        listed_totals(&mut app.users, tenant).await,
        expected,
        "ListUsers totalCount, {after}"
    );
}

async fn create(users: &mut Users, user: User) -> User {
    users
        .create_user(CreateUserRequest {
            user: Some(user),
            request_id: String::new(),
        })
        .await
        .expect("create succeeds")
        .into_inner()
        .user
        .expect("a user")
}

/// Creates `n` users in `tenant` with `n` concurrent calls, every third
/// one inactive; returns them.
async fn create_concurrently(app: &TestApp, tenant: Uuid, tag: &str, n: usize) -> Vec<User> {
    let calls = (0..n).map(|i| {
        let mut users = app.users.clone();
        let user = person(tenant, &format!("{tag}{i}"), i % 3 != 0);
        async move { create(&mut users, user).await }
    });
    futures::future::join_all(calls).await
}

async fn upsert(users: &mut Users, batch: Vec<User>) -> Vec<User> {
    users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: batch,
            request_id: String::new(),
        })
        .await
        .expect("batch upsert succeeds")
        .into_inner()
        .results
        .into_iter()
        .map(|result| match result.outcome {
            Some(Outcome::User(user)) => user,
            other => panic!("an item was refused: {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn the_totals_of_a_tenant_equal_its_count_after_every_kind_of_change() {
    let mut app = spawn_app().await;
    let tenant = create_tenant(&mut app, "counted").await;
    assert_totals(&mut app, tenant, [0, 0, 0], "no user yet").await;

    // 48 concurrent creates, 16 of them inactive.
    let created = create_concurrently(&app, tenant, "c", 48).await;
    assert_totals(&mut app, tenant, [48, 32, 16], "concurrent creates").await;

    // Batches: 10 existing users (5 active ones deactivated, 5 inactive
    // ones activated) and 20 new ones, 4 of them inactive; then two
    // batches of new users at once.
    let mut batch: Vec<User> = (0..10)
        .map(|i| person(tenant, &format!("c{}", i * 3 + 1), false))
        .take(5)
        .chain((0..5).map(|i| person(tenant, &format!("c{}", i * 3), true)))
        .collect();
    batch.extend((0..20).map(|i| person(tenant, &format!("b{i}"), i % 5 != 0)));
    upsert(&mut app.users, batch).await;
    assert_totals(
        &mut app,
        tenant,
        [68, 48, 20],
        "a batch of new and existing users",
    )
    .await;
    let batches = (0..2).map(|b| {
        let mut users = app.users.clone();
        let batch = (0..25)
            .map(|i| person(tenant, &format!("p{b}-{i}"), true))
            .collect();
        async move { upsert(&mut users, batch).await }
    });
    futures::future::join_all(batches).await;
    assert_totals(&mut app, tenant, [118, 98, 20], "concurrent batches").await;

    // Users c2, c5, c8 ... are active and untouched by the batch.
    let active: Vec<&User> = created.iter().skip(2).step_by(3).take(6).collect();
    for user in &active {
        app.users
            .deactivate_user(DeactivateUserRequest {
                id: user.id.clone(),
                ..Default::default()
            })
            .await
            .expect("deactivate succeeds");
    }
    assert_totals(&mut app, tenant, [118, 92, 26], "deactivations").await;
    for user in &active[..2] {
        app.users
            .reactivate_user(ReactivateUserRequest {
                id: user.id.clone(),
                ..Default::default()
            })
            .await
            .expect("reactivate succeeds");
    }
    assert_totals(&mut app, tenant, [118, 94, 24], "reactivations").await;

    // Deletes: two active users (c2, c5) and two inactive ones (c14, c17,
    // deactivated above).
    let doomed = [&active[0], &active[1], &active[4], &active[5]];
    for user in doomed {
        app.users
            .delete_user(DeleteUserRequest {
                id: user.id.clone(),
                ..Default::default()
            })
            .await
            .expect("delete succeeds");
    }
    assert_totals(&mut app, tenant, [114, 92, 22], "deletions").await;
    app.users
        .undelete_user(UndeleteUserRequest {
            id: doomed[0].id.clone(),
            ..Default::default()
        })
        .await
        .expect("undelete succeeds");
    assert_totals(&mut app, tenant, [115, 93, 22], "an undeletion").await;
    for user in &doomed[1..] {
        app.users
            .purge_user(PurgeUserRequest {
                id: user.id.clone(),
                request_id: String::new(),
            })
            .await
            .expect("purge succeeds");
    }
    assert_totals(&mut app, tenant, [115, 93, 22], "purges of deleted users").await;

    // A tenant key lists its tenant without a filter of its own.
    let token = app.create_key(Role::Viewer, Some(tenant), None).await;
    let mut viewer = app.users_as(Some(&token));
    let page = list(
        &mut viewer,
        ListUsersRequest {
            limit: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        page.total_count,
        Some(115),
        "a tenant key's unfiltered list"
    );

    // Another tenant: deleted, undeleted, deleted again and purged. The
    // first tenant's totals never move.
    let other = create_tenant(&mut app, "leaving").await;
    create_concurrently(&app, other, "o", 9).await;
    assert_totals(&mut app, other, [9, 6, 3], "the other tenant's creates").await;
    let delete = |id: Uuid| DeleteTenantRequest {
        id: id.to_string(),
        request_id: String::new(),
    };
    app.tenants
        .delete_tenant(delete(other))
        .await
        .expect("delete tenant succeeds");
    assert_totals(&mut app, other, [0, 0, 0], "the tenant's deletion").await;
    app.tenants
        .undelete_tenant(UndeleteTenantRequest {
            id: other.to_string(),
            request_id: String::new(),
        })
        .await
        .expect("undelete tenant succeeds");
    assert_totals(&mut app, other, [9, 6, 3], "the tenant's undeletion").await;
    app.tenants
        .delete_tenant(delete(other))
        .await
        .expect("delete tenant succeeds");
    app.tenants
        .purge_tenant(PurgeTenantRequest {
            id: other.to_string(),
            request_id: String::new(),
        })
        .await
        .expect("purge tenant succeeds");
    let rows: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM user_counts WHERE tenant_id = $1",
            &[&other],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "a purged tenant's counters are gone with it");
    assert_totals(&mut app, tenant, [115, 93, 22], "the other tenant's purge").await;
}

#[tokio::test]
async fn the_counters_follow_changes_made_in_sql_whatever_they_change() {
    let mut app = spawn_app().await;
    let (a, b) = (
        create_tenant(&mut app, "a").await,
        create_tenant(&mut app, "b").await,
    );
    create_concurrently(&app, a, "a", 12).await;
    create_concurrently(&app, b, "b", 6).await;
    // An operator's import without the service, a move between tenants,
    // an erasure of live users, and one statement across both tenants.
    app.db
        .batch_execute(&format!(
            "INSERT INTO users (tenant_id, id, reference, active) \
               SELECT '{a}', gen_random_uuid(), 'sql-' || g, g % 2 = 0 FROM generate_series(1, 10) g; \
             UPDATE users SET tenant_id = '{b}' WHERE tenant_id = '{a}' AND reference IN ('sql-1', 'sql-2'); \
             DELETE FROM users WHERE tenant_id = '{a}' AND reference IN ('sql-3', 'sql-4', 'sql-5'); \
             UPDATE users SET active = NOT active WHERE reference IN ('ref-a0', 'ref-b1', 'sql-6')"
        ))
        .await
        .unwrap();
    let (in_a, in_b) = (stored_totals(&app, a).await, stored_totals(&app, b).await);
    assert_eq!(in_a[0] + in_b[0], 12 + 6 + 10 - 3, "the changes were made");
    assert_totals(&mut app, a, in_a, "SQL changes").await;
    assert_totals(&mut app, b, in_b, "SQL changes").await;
}

#[tokio::test]
async fn a_total_of_live_users_comes_from_the_counters_and_any_other_is_counted() {
    let mut app = spawn_app().await;
    let tenant = create_tenant(&mut app, "read").await;
    create_concurrently(&app, tenant, "r", 6).await;
    // Counters that disagree with the table show which totals are read
    // from them.
    app.db
        .execute(
            "UPDATE user_counts SET users = users + 1000, active = active + 100 \
             WHERE tenant_id = $1 AND shard = (SELECT min(shard) FROM user_counts WHERE tenant_id = $1)",
            &[&tenant],
        )
        .await
        .unwrap();
    assert_eq!(
        listed_totals(&mut app.users, tenant).await,
        [1006, 104, 902],
        "unfiltered, active and inactive totals"
    );
    let filter = of_tenant(tenant, None);
    for (what, request) in [
        (
            "opted-in users",
            ListUsersRequest {
                filter: Some(UserFilter {
                    is_opted_in: Some(BoolFilter {
                        equal_to: Some(false),
                        ..Default::default()
                    }),
                    ..filter.clone()
                }),
                ..Default::default()
            },
        ),
        (
            "a search",
            ListUsersRequest {
                filter: Some(filter.clone()),
                search: "example".into(),
                ..Default::default()
            },
        ),
        (
            "deleted users too",
            ListUsersRequest {
                filter: Some(filter.clone()),
                show_deleted: true,
                ..Default::default()
            },
        ),
    ] {
        let page = list(&mut app.users, request).await;
        assert_eq!(page.total_count, Some(6), "{what}");
    }
    // Every tenant: an admin's list without a tenant.
    let everyone = list(&mut app.users, ListUsersRequest::default())
        .await
        .total_count;
    assert_eq!(everyone, Some(6), "every tenant");
}

#[tokio::test]
async fn total_count_limit_and_skip_total_count_keep_their_meaning() {
    let mut app = spawn_app().await;
    let tenant = create_tenant(&mut app, "limits").await;
    // 6 users: 4 active, 2 inactive.
    create_concurrently(&app, tenant, "l", 6).await;
    let limited = |active: Option<bool>, limit: i32| ListUsersRequest {
        filter: Some(of_tenant(tenant, active)),
        total_count_limit: Some(limit),
        limit: Some(1),
        ..Default::default()
    };
    for (active, limit, total, capped) in [
        (None, 1, 1, true),
        (None, 5, 5, true),
        (None, 6, 6, false),
        (None, 100_000, 6, false),
        (Some(true), 3, 3, true),
        (Some(true), 4, 4, false),
        (Some(false), 1, 1, true),
        (Some(false), 2, 2, false),
    ] {
        let page = list(&mut app.users, limited(active, limit)).await;
        assert_eq!(
            (page.total_count, page.total_count_capped),
            (Some(total), capped),
            "active {active:?}, totalCountLimit {limit}"
        );
        // A filtered count stops at the limit as it always did.
        let page = list(
            &mut app.users,
            ListUsersRequest {
                search: "example.com".into(),
                ..limited(active, limit)
            },
        )
        .await;
        assert_eq!(
            (page.total_count, page.total_count_capped),
            (Some(total), capped),
            "with a search: active {active:?}, totalCountLimit {limit}"
        );
    }
    for search in ["", "example.com"] {
        let page = list(
            &mut app.users,
            ListUsersRequest {
                filter: Some(of_tenant(tenant, None)),
                search: search.into(),
                skip_total_count: true,
                limit: Some(2),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(page.total_count, None, "skipTotalCount, search {search:?}");
        assert!(!page.total_count_capped);
        assert_eq!(page.data.len(), 2);
    }
    // The limit is still checked.
    let refused = app
        .users
        .list_users(limited(None, 0))
        .await
        .expect_err("a limit of 0 is refused");
    assert_eq!(refused.code(), Code::InvalidArgument);
}
