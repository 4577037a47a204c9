//! Per-caller rate limits, load shedding, request size and deadline caps.

use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;
use users_service::{
    auth::Role,
    pb::v1::{GetUserRequest, ListUsersRequest, UpdateUserRequest, UpdateUserResponse, UserUpdate},
};

use crate::helpers::{server, spawn_with, test_config};
use crate::users::{create, roq_user};

fn retry_delay(status: &tonic::Status) -> Duration {
    status
        .get_error_details()
        .retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RESOURCE_EXHAUSTED carries RetryInfo")
}

pub async fn app_with(
    adjust: impl FnOnce(&mut users_service::config::Config),
) -> crate::helpers::TestApp {
    let name = format!(
        "users_service_limits_{}_{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let mut config = test_config(Some(server().url(&name)));
    adjust(&mut config);
    let mut app = spawn_with(config).await;
    app.database = name;
    app
}

#[tokio::test]
async fn a_flooding_caller_is_limited_while_another_caller_is_not() {
    let mut app = app_with(|c| {
        c.rate_limit_per_second = 5;
        c.rate_limit_burst = Some(5);
    })
    .await;
    // The admin client's own calls count against the admin key: use fresh keys.
    let user = create(&mut app, roq_user()).await;
    let flooder = app.create_key(Role::Admin, None, None).await;
    let other = app.create_key(Role::Admin, None, None).await;
    let mut flooding = app.users_as(Some(&flooder));
    let mut calm = app.users_as(Some(&other));
    let get = || GetUserRequest {
        id: user.id.clone(),
        ..Default::default()
    };

    // All at once, so the bucket has no time to refill while they arrive.
    let flood = (0..30).map(|_| {
        let mut client = flooding.clone();
        let request = get();
        async move { client.get_user(request).await }
    });
    let refused: Vec<_> = futures::future::join_all(flood)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(refused.len() >= 20, "only {} of 30 refused", refused.len());
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let delay = retry_delay(status);
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(1),
            "{delay:?}"
        );
    }
    // The other caller's burst is untouched by the flood.
    for _ in 0..5 {
        calm.get_user(get())
            .await
            .expect("another caller is not limited");
    }

    // The quota recovers after the advertised wait.
    let wait = retry_delay(refused.last().unwrap());
    tokio::time::sleep(wait).await;
    flooding
        .get_user(get())
        .await
        .expect("quota recovers after the wait");
}

#[tokio::test]
async fn a_key_with_its_own_quota_is_limited_by_it() {
    let mut app = app_with(|c| c.rate_limit_per_second = 100).await;
    let user = create(&mut app, roq_user()).await;
    let slow = app.create_key(Role::Admin, None, Some(2)).await;
    let client = app.users_as(Some(&slow));
    let calls = (0..6).map(|_| {
        let mut client = client.clone();
        let request = GetUserRequest {
            id: user.id.clone(),
            ..Default::default()
        };
        async move { client.get_user(request).await.map(|_| ()) }
    });
    let outcomes = futures::future::join_all(calls).await;
    let passed = outcomes.iter().filter(|o| o.is_ok()).count();
    // Its burst is its rate, 2 (a third may pass if the calls straddle a refill).
    assert!((2..=3).contains(&passed), "{outcomes:?}");
}

#[tokio::test]
async fn unauthenticated_calls_are_limited_per_address() {
    let app = app_with(|c| {
        c.rate_limit_per_second = 3;
        c.rate_limit_burst = Some(3);
    })
    .await;
    let mut anonymous = app.users_as(None);
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(
            anonymous
                .get_user(GetUserRequest {
                    id: "x".into(),
                    ..Default::default()
                })
                .await
                .unwrap_err()
                .code(),
        );
    }
    assert_eq!(codes[..3], [Code::Unauthenticated; 3]);
    assert!(codes[3..].contains(&Code::ResourceExhausted), "{codes:?}");
}

#[tokio::test]
async fn rate_limit_zero_switches_per_caller_limiting_off() {
    let mut app = app_with(|c| c.rate_limit_per_second = 0).await;
    let user = create(&mut app, roq_user()).await;
    for _ in 0..300 {
        app.users
            .get_user(GetUserRequest {
                id: user.id.clone(),
                ..Default::default()
            })
            .await
            .expect("no limit");
    }
}

#[tokio::test]
async fn oversized_requests_are_refused() {
    let mut app = app_with(|c| c.max_request_bytes = 1024).await;
    let status = app
        .users
        .list_users(ListUsersRequest {
            search: "x".repeat(4096),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

/// Holds a row lock from the test's own connection, so that an UpdateUser on
/// that row waits inside its handler until the lock is released.
/// An UpdateUser of `id`'s first name to "Held", on its own task: it waits
/// while [`lock_user_row`] holds the row.
pub fn spawn_held_update(
    app: &crate::helpers::TestApp,
    id: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<UpdateUserResponse>, tonic::Status>> {
    let mut client = app.users.clone();
    let id = id.to_owned();
    tokio::spawn(async move {
        client
            .update_user(UpdateUserRequest {
                id,
                user: Some(UserUpdate {
                    first_name: Some("Held".into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
    })
}

pub async fn lock_user_row(app: &crate::helpers::TestApp, id: &str) -> tokio_postgres::Client {
    let (client, connection) = app.db_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("SELECT 1 FROM users WHERE id::text = $1 FOR UPDATE", &[&id])
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn calls_beyond_the_in_flight_limit_are_shed_with_unavailable() {
    let mut app = app_with(|c| c.max_in_flight = 1).await;
    let user = create(&mut app, roq_user()).await;
    let lock = lock_user_row(&app, &user.id).await;

    let pending = spawn_held_update(&app, &user.id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let shed = app
        .users
        .get_user(GetUserRequest {
            id: user.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(shed.code(), Code::Unavailable, "{shed:?}");

    lock.batch_execute("COMMIT").await.unwrap();
    let updated = pending.await.unwrap().expect("the held call completes");
    assert_eq!(updated.into_inner().user.unwrap().first_name, "Held");
    app.users
        .get_user(GetUserRequest {
            id: user.id,
            ..Default::default()
        })
        .await
        .expect("capacity is back");
}

#[tokio::test]
async fn the_server_caps_how_long_a_call_may_run() {
    let mut app = app_with(|c| c.max_call_duration = Duration::from_secs(1)).await;
    // Set up through the database: a call through the capped server could
    // itself hit the cap on a slow first disk flush.
    let id: String = app
        .db
        .query_one(
            "INSERT INTO users (tenant_id, id, first_name) \
             SELECT id, gen_random_uuid(), 'Anna' FROM tenants WHERE is_default RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let user = users_service::pb::v1::User {
        id,
        ..Default::default()
    };
    let lock = lock_user_row(&app, &user.id).await;
    let mut request = tonic::Request::new(UpdateUserRequest {
        id: user.id.clone(),
        user: Some(UserUpdate {
            first_name: Some("Late".into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    // The client would wait a minute; the server does not let it.
    request.set_timeout(Duration::from_secs(60));
    let started = std::time::Instant::now();
    let status = app.users.update_user(request).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // The abandoned UPDATE is cancelled in Postgres too, not left waiting
    // for the lock (after which it would commit).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let waiting: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'UPDATE%' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the statement is still running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lock.batch_execute("ROLLBACK").await.unwrap();
    let first_name: String = app
        .db
        .query_one(
            "SELECT first_name FROM users WHERE id::text = $1",
            &[&user.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        first_name, "Anna",
        "the cancelled update left nothing behind"
    );
}
