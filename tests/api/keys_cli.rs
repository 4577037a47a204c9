//! The `users-service keys` commands, run as a real process beside a
//! running server, and what the logs and the database hold of tokens.

use std::process::Command;

use tonic::Code;
use users_service::pb::v1::{GetUserRequest, ListUsersRequest};

use crate::helpers::{spawn_with, test_config};

fn keys(args: &[&str], data_dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_users-service"))
        .args(["keys"])
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("DATABASE_URL")
        .output()
        .expect("runs users-service")
}

#[tokio::test]
async fn keys_commands_work_beside_a_running_embedded_server() {
    let mut config = test_config(None);
    config.data_dir = crate::helpers::scratch_dir("keys-cli");
    let app = spawn_with(config.clone()).await;
    let key_file = config.data_dir.join("admin.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(
        mode & 0o777,
        0o600,
        "the bootstrap token is readable by its owner only"
    );

    let created = keys(
        &["create", "--role", "admin", "--name", "ci"],
        &config.data_dir,
    );
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(
        token.starts_with("usk_"),
        "stdout is the token alone: {token:?}"
    );
    let key_id = token.split('_').nth(1).unwrap().to_owned();

    let mut client = app.users_as(Some(&token));
    client
        .list_users(ListUsersRequest::default())
        .await
        .expect("the new key works at once");

    let listed = keys(&["list"], &config.data_dir);
    let listing = String::from_utf8(listed.stdout).unwrap();
    assert!(
        listing.contains(&key_id) && listing.contains("ci"),
        "{listing}"
    );
    assert!(
        !listing.contains(&token[token.len() - 64..]),
        "list never shows secrets"
    );

    let revoked = keys(&["revoke", &key_id], &config.data_dir);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    tokio::time::sleep(config.key_cache_ttl * 2).await;
    let status = client
        .list_users(ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A key with an expiry: stored as now plus the duration.
    let expiring = keys(
        &["create", "--role", "admin", "--expire-in", "90days"],
        &config.data_dir,
    );
    assert!(expiring.status.success());
    let expiring_id = String::from_utf8(expiring.stdout)
        .unwrap()
        .split('_')
        .nth(1)
        .unwrap()
        .to_owned();
    let expires_in: f64 = app
        .db
        .query_one(
            "SELECT extract(epoch FROM expire_time - now())::float8 FROM api_keys WHERE id = $1",
            &[&expiring_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!((expires_in - 90.0 * 86_400.0).abs() < 60.0, "{expires_in}");

    let bad = keys(&["create", "--role", "editor"], &config.data_dir);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--tenant"));
    app.shutdown().await;
}

#[tokio::test]
async fn no_log_line_contains_a_token() {
    // The binary itself, at debug level, serving calls made with a token.
    let data_dir = crate::helpers::scratch_dir("log");
    let database = format!("users_service_log_{}", std::process::id());
    let url = crate::helpers::server().url(&database);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = data_dir.join("service.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_users-service"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "debug")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let key_file = data_dir.join("admin.key");
    for _ in 0..100 {
        if key_file.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let token = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();
    let channel = loop {
        if let Ok(channel) =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
        {
            break channel;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let mut client =
        users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
            channel,
            crate::helpers::Bearer::new(Some(&token)),
        );
    client
        .list_users(ListUsersRequest::default())
        .await
        .unwrap();
    let _ = client
        .get_user(GetUserRequest {
            id: "nope".into(),
            ..Default::default()
        })
        .await;
    let wrong = format!("{}0", &token[..token.len() - 1]);
    let mut wrong_client =
        users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
            crate::helpers::Bearer::new(Some(&wrong)),
        );
    let _ = wrong_client.list_users(ListUsersRequest::default()).await;

    nix_kill(child.id());
    child.wait().unwrap();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("grpc.method"),
        "the calls were logged: {logged}"
    );
    let secret = &token[token.len() - 64..];
    assert!(!logged.contains(secret), "a token leaked into the log");
    assert!(
        !logged.contains(&wrong[wrong.len() - 64..]),
        "a wrong token leaked into the log"
    );

    let (admin, connection) = crate::helpers::server()
        .config("postgres")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .unwrap();
}

fn nix_kill(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
