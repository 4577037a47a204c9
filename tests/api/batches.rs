//! Calls that wait for the database together are served by one statement,
//! and each still gets its own outcome.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use tonic::Code;
use users_service::{
    auth::Role,
    pb::v1::{CreateUserRequest, GetUserRequest, User},
};

use crate::helpers::{TestApp, Users, error_info, violated_fields};
use crate::limits::{app_with, lock_user_row, spawn_held_update};
use crate::metrics::{sample, scrape};
use crate::tenants::create_tenant;
use crate::users::{create, user};

/// Occupies the pool's only connection with an UpdateUser that waits for a
/// row lock, until the returned transaction ends.
async fn hold_the_only_connection(app: &TestApp, id: &str) -> tokio_postgres::Client {
    let lock = lock_user_row(app, id).await;
    spawn_held_update(app, id);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Its UPDATE waits; or, when the user already has the name (a
        // second hold), the locking read that tells "unchanged" does.
        let waiting: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND (query LIKE 'UPDATE%' OR query LIKE '%FOR UPDATE') \
                 AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            return lock;
        }
        assert!(Instant::now() < deadline, "the update never blocked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `calls` while the pool's only connection is held, and releases it
/// once they all wait for it.
async fn while_held<T: Send + 'static>(
    app: &TestApp,
    held: &str,
    calls: impl Future<Output = T> + Send + 'static,
) -> T {
    let lock = hold_the_only_connection(app, held).await;
    let calls = tokio::spawn(calls);
    tokio::time::sleep(Duration::from_millis(400)).await;
    lock.batch_execute("COMMIT").await.unwrap();
    calls.await.unwrap()
}

/// Creates `users` at once, each queued after the one before.
async fn create_all(client: Users, users: Vec<User>) -> Vec<Result<User, tonic::Status>> {
    let calls = users.into_iter().enumerate().map(|(i, new)| {
        let mut client = client.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            client
                .create_user(CreateUserRequest {
                    user: Some(new),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().user.unwrap())
        }
    });
    futures::future::join_all(calls).await
}

async fn get(mut client: Users, id: String) -> Result<User, tonic::Status> {
    client
        .get_user(GetUserRequest {
            id,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().user.unwrap())
}

/// What the lookups of a batch need: a user to find, a user whose row a
/// test holds locked, and a viewer of another tenant, who finds neither.
struct Lookups {
    taken: User,
    held: User,
    viewer: Users,
}

async fn lookups(app: &mut TestApp) -> Lookups {
    let taken = create(app, user("taken", "taken@example.com")).await;
    let held = create(app, user("held", "held@example.com")).await;
    let other_tenant = create_tenant(app, "Other", "other").await;
    let viewer = app
        .create_key(Role::Viewer, Some(other_tenant.id.parse().unwrap()), None)
        .await;
    let viewer = app.users_as(Some(&viewer));
    // The key is looked up once now, not while the pool is held.
    let _ = get(viewer.clone(), taken.id.clone()).await;
    Lookups {
        taken,
        held,
        viewer,
    }
}

#[tokio::test]
async fn creates_and_gets_that_wait_together_share_a_statement_and_keep_their_own_outcomes() {
    let mut app = app_with(|c| {
        c.db_pool_size = Some(1);
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let Lookups {
        taken,
        held,
        viewer,
    } = lookups(&mut app).await;

    // A multi-row insert that skips the rows that clash, which then fail on
    // their own; and lookups, each seen through its caller's scope.
    let creates = create_all(
        app.users.clone(),
        vec![
            user("fresh-1", "fresh1@example.com"),
            user("fresh-2", "fresh2@example.com"),
            // Clashes with a stored user.
            user("taken", "another@example.com"),
            // Two of the batch clash with each other: the first one wins.
            user("twin-1", "twin@example.com"),
            user("twin-2", "twin@example.com"),
        ],
    );
    let gets = futures::future::join3(
        get(app.users.clone(), taken.id.clone()),
        get(app.users.clone(), uuid::Uuid::now_v7().to_string()),
        // A viewer of another tenant does not see the user.
        get(viewer.clone(), taken.id.clone()),
    );
    let (mut created, (found, missing, hidden)) =
        while_held(&app, &held.id, futures::future::join(creates, gets)).await;
    for (result, reference) in created.iter().zip(["fresh-1", "fresh-2"]) {
        assert_eq!(result.as_ref().unwrap().reference, reference);
    }
    let clash = created[2].as_ref().unwrap_err();
    assert_eq!(clash.code(), Code::AlreadyExists, "{clash:?}");
    assert_eq!(error_info(clash).unwrap().1["field"], "reference");
    assert_eq!(created[3].as_ref().unwrap().reference, "twin-1");
    let twin = created[4].as_ref().unwrap_err();
    assert_eq!(twin.code(), Code::AlreadyExists, "{twin:?}");
    assert_eq!(error_info(twin).unwrap().1["field"], "email");
    assert_eq!(found.unwrap(), taken);
    assert_eq!(missing.unwrap_err().code(), Code::NotFound);
    assert_eq!(hidden.unwrap_err().code(), Code::NotFound);

    // A row that fails the whole statement: every row is then tried alone.
    let fallback = while_held(
        &app,
        &held.id,
        create_all(
            app.users.clone(),
            vec![
                user("fresh-3", "fresh3@example.com"),
                User {
                    tenant_id: uuid::Uuid::now_v7().to_string(),
                    ..user("lost", "lost@example.com")
                },
                user("fresh-4", "fresh4@example.com"),
            ],
        ),
    )
    .await;
    assert_eq!(fallback[0].as_ref().unwrap().reference, "fresh-3");
    let lost = fallback[1].as_ref().unwrap_err();
    assert_eq!(lost.code(), Code::InvalidArgument, "{lost:?}");
    assert_eq!(violated_fields(lost), ["user.tenant_id"]);
    assert_eq!(fallback[2].as_ref().unwrap().reference, "fresh-4");
    created.extend(fallback);

    // The database holds the created users, each once, as they were returned.
    let rows = app
        .db
        .query(
            "SELECT id::text, reference, email FROM users ORDER BY reference",
            &[],
        )
        .await
        .unwrap();
    let stored: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut expected: Vec<_> = created
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .chain([&taken, &held])
        .map(|u| (u.id.clone(), u.reference.clone(), u.email.clone()))
        .collect();
    expected.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(stored, expected);

    // And the waiting calls went to Postgres in batches, not one by one.
    let metrics = scrape(app.metrics_addr.unwrap()).await;
    for batch in ["create_user", "get_user"] {
        let labels = [("batch", batch)];
        let items = sample(&metrics, "users_service_db_batch_items_sum", &labels).unwrap();
        let batches = sample(&metrics, "users_service_db_batch_items_count", &labels).unwrap();
        assert!(
            items > batches,
            "{batch}: {items} items in {batches} batches"
        );
    }
}

#[tokio::test]
async fn many_gets_that_wait_together_each_get_their_own_outcome() {
    let mut app = app_with(|c| c.db_pool_size = Some(1)).await;
    let Lookups {
        taken,
        held,
        viewer,
    } = lookups(&mut app).await;

    // More calls than a batch looks up one by one: found, missing, and
    // hidden from a viewer of another tenant, four of each.
    let calls = (0..12).map(|i| match i % 3 {
        0 => get(app.users.clone(), taken.id.clone()),
        1 => get(app.users.clone(), uuid::Uuid::now_v7().to_string()),
        _ => get(viewer.clone(), taken.id.clone()),
    });
    let outcomes = while_held(&app, &held.id, futures::future::join_all(calls)).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        match i % 3 {
            0 => assert_eq!(outcome.unwrap(), taken, "call {i}"),
            _ => assert_eq!(outcome.unwrap_err().code(), Code::NotFound, "call {i}"),
        }
    }
}

/// A CreateUser whose statement waits for another transaction's insert of
/// the same reference, while `rest` runs; that transaction then rolls back.
async fn create_behind_an_open_insert(
    app: &TestApp,
    reference: &str,
    client_deadline: Duration,
) -> (Result<User, tonic::Status>, tokio_postgres::Client) {
    let (blocker, connection) = app.db_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    blocker
        .batch_execute(&format!(
            "BEGIN; INSERT INTO users (tenant_id, id, reference) \
             SELECT id, gen_random_uuid(), '{reference}' FROM tenants WHERE is_default"
        ))
        .await
        .unwrap();
    let mut request = tonic::Request::new(CreateUserRequest {
        user: Some(user(reference, "late@example.com")),
        ..Default::default()
    });
    request.set_timeout(client_deadline);
    let outcome = app
        .users
        .clone()
        .create_user(request)
        .await
        .map(|r| r.into_inner().user.unwrap());
    (outcome, blocker)
}

async fn waiting_inserts(app: &TestApp) -> i64 {
    app.db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND query LIKE 'INSERT%' AND state = 'active' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_shared_insert_whose_callers_all_left_is_cancelled_and_leaves_nothing() {
    let app = crate::helpers::spawn_app().await;
    let (outcome, blocker) =
        create_behind_an_open_insert(&app, "contested", Duration::from_millis(700)).await;
    let status = outcome.expect_err("the caller gave up");
    // The client's own timer may end the call before the server's answer.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // No caller waits any more: the statement does not either.
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting_inserts(&app).await > 0 {
        assert!(Instant::now() < deadline, "the abandoned insert still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Had it still been waiting, it would now go through.
    blocker.batch_execute("ROLLBACK").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stored: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM users WHERE reference = 'contested'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "nothing of the abandoned write remains");
}
