//! The Prometheus endpoint counts calls per method and code.

use tonic::Code;
use users_service::pb::v1::{CreateUserRequest, GetUserRequest, User};

use crate::helpers::{server, spawn_with, test_config};
use crate::users::{create, roq_user};

pub use crate::helpers::scrape;

/// The value of the sample `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn metrics_count_calls_per_method_and_code() {
    let name = format!("users_service_metrics_{}", std::process::id());
    let mut config = test_config(Some(server().url(&name)));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut app = spawn_with(config).await;
    app.database = name;
    let metrics_addr = app.metrics_addr.expect("metrics are on");

    let created = create(&mut app, roq_user()).await;
    create(&mut app, User::default()).await;
    for _ in 0..3 {
        app.users
            .get_user(GetUserRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let missing = app
        .users
        .get_user(GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let invalid = app
        .users
        .create_user(CreateUserRequest {
            user: Some(User {
                email: "nope".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let unauthenticated = app
        .users_as(None)
        .get_user(GetUserRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let text = scrape(metrics_addr).await;
    let users = ("grpc_service", "users.v1.UsersService");
    let handled = |method: &str, code: &str| {
        sample(
            &text,
            "grpc_server_handled_total",
            &[
                ("grpc_type", "unary"),
                users,
                ("grpc_method", method),
                ("grpc_code", code),
            ],
        )
    };
    assert_eq!(handled("GetUser", "OK"), Some(3.0), "{text}");
    assert_eq!(handled("GetUser", "NOT_FOUND"), Some(1.0));
    assert_eq!(handled("GetUser", "UNAUTHENTICATED"), Some(1.0));
    assert_eq!(handled("CreateUser", "OK"), Some(2.0));
    assert_eq!(handled("CreateUser", "INVALID_ARGUMENT"), Some(1.0));
    assert_eq!(handled("ListUsers", "OK"), None);
    assert_eq!(
        sample(
            &text,
            "grpc_server_started_total",
            &[users, ("grpc_method", "GetUser")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "grpc_server_handling_seconds_count",
            &[users, ("grpc_method", "GetUser")]
        ),
        Some(5.0)
    );
    assert!(
        sample(
            &text,
            "users_service_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ) == Some(1.0)
    );
    let idle = sample(
        &text,
        "users_service_db_pool_connections",
        &[("state", "idle")],
    )
    .unwrap();
    let in_use = sample(
        &text,
        "users_service_db_pool_connections",
        &[("state", "in_use")],
    )
    .unwrap();
    assert!(
        idle + in_use >= 1.0,
        "the pool has opened connections: {text}"
    );
}

#[tokio::test]
async fn calls_to_paths_that_name_no_method_share_one_label() {
    let name = format!(
        "users_service_metrics_{}_{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let mut config = test_config(Some(server().url(&name)));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut app = spawn_with(config).await;
    app.database = name;
    let metrics_addr = app.metrics_addr.expect("metrics are on");

    // Unique, long paths, with and without credentials.
    for i in 0..200 {
        let path: &'static str =
            Box::leak(format!("/users.v1.UsersService/{i}{}", "x".repeat(1000)).into_boxed_str());
        let token = (i % 2 == 0).then_some(app.admin_token.as_str());
        let status = crate::helpers::raw_call(&app.channel, token, path, Vec::new())
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::Unimplemented | Code::Unauthenticated),
            "{status:?}"
        );
    }
    create(&mut app, roq_user()).await;

    let text = scrape(metrics_addr).await;
    assert!(!text.contains("xxxx"), "a client's path became a label");
    assert_eq!(
        sample(
            &text,
            "grpc_server_started_total",
            &[("grpc_service", "unknown"), ("grpc_method", "unknown")]
        ),
        Some(200.0)
    );
    assert_eq!(
        sample(
            &text,
            "grpc_server_handled_total",
            &[("grpc_method", "CreateUser"), ("grpc_code", "OK")]
        ),
        Some(1.0)
    );
    let methods: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|line| line.starts_with("grpc_server_started_total{"))
        .filter_map(|line| line.split("grpc_method=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        methods,
        ["CreateUser", "unknown"].into_iter().collect(),
        "{text}"
    );
}

#[tokio::test]
async fn calls_their_clients_abandon_are_counted_once_as_the_client_saw_them() {
    let name = format!(
        "users_service_metrics_{}_{}",
        std::process::id(),
        uuid::Uuid::now_v7().simple()
    );
    let mut config = test_config(Some(server().url(&name)));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let mut app = spawn_with(config).await;
    app.database = name;
    let metrics_addr = app.metrics_addr.expect("metrics are on");
    let created = create(&mut app, roq_user()).await;
    let lock = crate::limits::lock_user_row(&app, &created.id).await;
    let update = || users_service::pb::v1::UpdateUserRequest {
        id: created.id.clone(),
        user: Some(users_service::pb::v1::UserUpdate {
            first_name: Some("Held".into()),
            ..Default::default()
        }),
        ..Default::default()
    };

    // One with a deadline that passes while it waits for the row...
    let mut request = tonic::Request::new(update());
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = app.users.clone().update_user(request).await.unwrap_err();
    assert!(matches!(
        status.code(),
        Code::DeadlineExceeded | Code::Cancelled
    ));
    // ...and one its client drops.
    let mut users = app.users.clone();
    let dropped = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        users.update_user(update()),
    )
    .await;
    assert!(dropped.is_err());
    lock.batch_execute("ROLLBACK").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    let text = scrape(metrics_addr).await;
    let handled = |code: &str| {
        sample(
            &text,
            "grpc_server_handled_total",
            &[("grpc_method", "UpdateUser"), ("grpc_code", code)],
        )
    };
    assert_eq!(handled("DEADLINE_EXCEEDED"), Some(1.0), "{text}");
    assert_eq!(handled("CANCELLED"), Some(1.0), "{text}");
    let total = |name: &str| -> f64 {
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(['{', ' ']))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(
        total("grpc_server_started_total"),
        total("grpc_server_handled_total"),
        "every call started is counted as handled"
    );
}
