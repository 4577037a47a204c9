//! Start-up, restart, database outages, health, reflection and shutdown.

use std::time::{Duration, Instant};

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1alpha::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use users_service::pb::v1::GetUserRequest;

use crate::helpers::{scratch_dir, server, spawn_app, spawn_with, start_embedded, test_config};
use crate::users::{create, get, roq_user};

#[tokio::test]
async fn embedded_postgres_keeps_users_across_a_restart() {
    let dir = scratch_dir("restart");
    let mut config = test_config(None);
    config.data_dir = dir.clone();

    let mut app = spawn_with(config.clone()).await;
    let created = create(&mut app, roq_user()).await;
    app.shutdown().await;
    assert!(
        !dir.join("pgdata/postmaster.pid").exists(),
        "stopping the service stops its Postgres"
    );

    let mut app = spawn_with(config).await;
    let got = get(&mut app, &created.id).await;
    assert_eq!(got, created);
    app.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn calls_fail_unavailable_while_postgres_is_down_and_recover_after() {
    let dir = scratch_dir("outage");
    let cluster = start_embedded(&dir, true).await;
    let url = format!(
        "host={} user=postgres dbname=outage",
        cluster.socket_dir().display()
    );
    let mut app = spawn_with(test_config(Some(url))).await;
    let created = create(&mut app, roq_user()).await;
    cluster.stop().await.unwrap();

    for _ in 0..3 {
        let started = Instant::now();
        let status = app
            .users
            .get_user(GetUserRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fails fast, never hangs"
        );
        assert!(!status.message().to_lowercase().contains("sql"));
    }

    let cluster = start_embedded(&dir, true).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match app
            .users
            .get_user(GetUserRequest {
                id: created.id.clone(),
                ..Default::default()
            })
            .await
        {
            Ok(response) => {
                assert_eq!(response.into_inner().user.unwrap(), created);
                break;
            }
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("did not recover: {status:?}"),
        }
    }
    app.shutdown().await;
    cluster.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_database_named_in_database_url_is_created_when_missing() {
    let name = format!("users_service_created_{}", std::process::id());
    let mut app = spawn_with(test_config(Some(server().url(&name)))).await;
    app.database = name.clone();
    create(&mut app, roq_user()).await;
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test]
async fn health_is_serving_and_turns_not_serving_on_shutdown() {
    let app = spawn_app().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "",
        "users.v1.UsersService",
        "users.v1.TenantsService",
        "users.v1.KeysService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let stopping = tokio::spawn(app.shutdown());
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    stopping.await.unwrap();
}

#[tokio::test]
async fn reflection_lists_the_services_and_resolves_error_details() {
    let app = spawn_app().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "google.rpc.BadRequest".into(),
            )),
        },
    ];
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "users.v1.UsersService",
        "users.v1.TenantsService",
        "users.v1.KeysService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected the file of google.rpc.BadRequest");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn replicas_starting_together_on_a_new_database_both_come_up() {
    let name = format!("users_service_replicas_{}", std::process::id());
    // Same database and data directory, as two replicas on one host.
    let config = test_config(Some(server().url(&name)));
    let (a, b) = tokio::join!(spawn_with(config.clone()), spawn_with(config));
    let (mut a, b) = (a, b);
    a.database = name;
    create(&mut a, roq_user()).await;
    let versions: i64 =
        b.db.query_one("SELECT count(*) FROM __diesel_schema_migrations", &[])
            .await
            .unwrap()
            .get(0);
    let embedded = diesel::migration::MigrationSource::<diesel::pg::Pg>::migrations(
        &users_service::store::db::MIGRATIONS,
    )
    .unwrap()
    .len();
    assert_eq!(versions, embedded as i64, "each migration applied once");
    let bootstrap_keys: i64 =
        b.db.query_one("SELECT count(*) FROM api_keys WHERE is_bootstrap", &[])
            .await
            .unwrap()
            .get(0);
    assert_eq!(bootstrap_keys, 1, "one bootstrap key, not one per replica");
    b.shutdown().await;
}
