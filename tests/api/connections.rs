//! Connections and streams: how many, for how long, and what a caller's
//! stalled streams can hold.

use std::time::Duration;

use tonic::{Code, transport::Channel};
use users_service::{auth::Role, pb::v1::GetUserRequest};

use crate::helpers::{RawCodec, TestApp};
use crate::limits::app_with;
use crate::process::{ServiceProcess, Start};
use crate::users::{create, roq_user};

/// A call of `path` whose client sends its headers and never a message.
fn stalled_call(
    channel: &Channel,
    token: &str,
    path: &'static str,
) -> tokio::task::JoinHandle<Result<Vec<u8>, tonic::Status>> {
    let channel = channel.clone();
    let header = format!("Bearer {token}");
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut request = tonic::Request::new(futures::stream::pending::<Vec<u8>>());
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        grpc.client_streaming(
            request,
            http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
        .map(tonic::Response::into_inner)
    })
}

async fn get(app: &TestApp, id: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(GetUserRequest {
        id: id.to_owned(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(2));
    app.users.clone().get_user(request).await.map(|_| ())
}

#[tokio::test]
async fn streams_without_a_message_hold_no_in_flight_slot_and_time_out() {
    let mut app = app_with(|c| {
        c.max_in_flight = 8;
        c.request_read_timeout = Duration::from_millis(1500);
    })
    .await;
    let user = create(&mut app, roq_user()).await;
    let tenant = uuid::Uuid::parse_str(&user.tenant_id).unwrap();
    let viewer = app.create_key(Role::Viewer, Some(tenant), None).await;

    // A viewer's 50 headers-only streams, on a connection of their own.
    let own = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stalled: Vec<_> = (0..50)
        .map(|_| stalled_call(&own, &viewer, "/users.v1.UsersService/GetUser"))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..20 {
        get(&app, &user.id)
            .await
            .expect("other callers are served meanwhile");
    }
    for call in stalled {
        let status = call
            .await
            .unwrap()
            .expect_err("a call without a message fails");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    }
}

/// An HTTP/2 connection of the test's own, without gRPC: to see what the
/// server advertises and when it closes the connection.
async fn raw_h2(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    h2::client::Connection<tokio::net::TcpStream, bytes::Bytes>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    h2::client::handshake(tcp).await.expect("HTTP/2 handshake")
}

#[tokio::test]
async fn each_connection_advertises_its_stream_limit() {
    let app = app_with(|c| c.max_concurrent_streams = 16).await;
    let (_send, mut connection) = raw_h2(app.addr).await;
    // The server's SETTINGS arrive while the connection is driven.
    let _ = tokio::time::timeout(Duration::from_millis(300), &mut connection).await;
    assert_eq!(connection.max_concurrent_send_streams(), 16);
}

#[tokio::test]
async fn an_idle_connection_is_closed_with_goaway() {
    let app = app_with(|c| {
        c.connection_idle_timeout = Duration::from_millis(300);
        c.keepalive_timeout = Duration::from_secs(1);
    })
    .await;
    let (_send, connection) = raw_h2(app.addr).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the server closes the idle connection cleanly: {closed:?}"
    );
    // A connection that never says anything is dropped too.
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buffer = [0u8; 1024];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        while silent.read(&mut buffer).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(ended.is_ok(), "a silent connection is closed");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once_and_counted() {
    let mut app = app_with(|c| {
        c.max_connections = 3;
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let user = create(&mut app, roq_user()).await;
    // The app's own channel is one; two more make three.
    let mut open = Vec::new();
    for _ in 0..2 {
        let channel = Channel::from_shared(format!("http://{}", app.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut users =
            users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
                channel,
                crate::helpers::Bearer::new(Some(&app.admin_token)),
            );
        users
            .get_user(GetUserRequest {
                id: user.id.clone(),
                ..Default::default()
            })
            .await
            .expect("within the limit");
        open.push(users);
    }
    let over = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await;
    let refused = match over {
        Err(_) => true,
        Ok(channel) => {
            let mut users =
                users_service::pb::v1::users_service_client::UsersServiceClient::new(channel);
            users
                .get_user(GetUserRequest {
                    id: user.id.clone(),
                    ..Default::default()
                })
                .await
                .is_err()
        }
    };
    assert!(refused, "a fourth connection is refused");
    let text = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
    let plain = |name: &str| crate::metrics::sample(&text, name, &[]);
    assert!(
        plain("users_service_refused_connections_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(plain("users_service_connections"), Some(3.0));
    // Once one closes, there is room again.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    users_service::pb::v1::users_service_client::UsersServiceClient::with_interceptor(
        channel,
        crate::helpers::Bearer::new(Some(&app.admin_token)),
    )
    .get_user(GetUserRequest {
        id: user.id,
        ..Default::default()
    })
    .await
    .expect("room again");
}

#[tokio::test]
async fn running_out_of_file_descriptors_pauses_accepting_instead_of_spinning() {
    let service = ServiceProcess::start(Start {
        args: vec!["--max-connections".into(), "10000".into()],
        max_open_files: Some(64),
        ..Default::default()
    })
    .await;
    let mut users = service.users().await;
    let user = service.create_user(roq_user()).await;

    // More connections than the process may have files.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(tokio::net::TcpStream::connect(service.addr).await.unwrap());
    }
    service
        .wait_for_log(Duration::from_secs(5), |line| {
            line["message"] == "cannot accept connections; pausing"
        })
        .await
        .expect("the accept error is logged");
    let before = service.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = service.cpu_time() - before;
    assert!(
        used < Duration::from_millis(400),
        "{used:?} of CPU in 2 s while out of file descriptors"
    );

    drop(held);
    let mut request = tonic::Request::new(GetUserRequest {
        id: user.id,
        ..Default::default()
    });
    request.set_timeout(Duration::from_secs(5));
    users
        .get_user(request)
        .await
        .expect("serves again once descriptors are free");
}

/// An ExportUsers call over a raw HTTP/2 connection whose receive window
/// is one kilobyte and which never reads: the server can send almost
/// nothing, as with a client that stopped reading.
async fn unread_export(addr: std::net::SocketAddr, token: &str) -> impl Drop {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(1024)
        .initial_connection_window_size(1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}/users.v1.UsersService/ExportUsers"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    // An empty ExportUsersRequest: no compression, length 0.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(1), response).await;
    struct Held {
        driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
        _body: h2::SendStream<bytes::Bytes>,
    }
    impl Drop for Held {
        fn drop(&mut self) {
            self.driver.abort();
        }
    }
    Held {
        driver,
        _body: body,
    }
}

/// Stores `n` users of about a kilobyte each: more than the channel and
/// HTTP/2 buffers between an export and its client hold.
async fn fill(app: &mut TestApp, n: usize) {
    let note = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("n".repeat(1000))),
    };
    let users: Vec<_> = (0..n)
        .map(|i| users_service::pb::v1::User {
            reference: format!("r{i}"),
            custom_data: Some(prost_types::Struct {
                fields: [("note".to_owned(), note.clone())].into(),
            }),
            ..Default::default()
        })
        .collect();
    for chunk in users.chunks(1000) {
        app.users
            .batch_upsert_users(users_service::pb::v1::BatchUpsertUsersRequest {
                users: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

async fn idle_in_transaction(app: &TestApp) -> i64 {
    app.db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_export_nobody_reads_releases_its_slot_and_transaction() {
    let mut app = app_with(|c| {
        // One export slot.
        c.db_pool_size = Some(4);
        c.stream_stall_timeout = Duration::from_millis(800);
    })
    .await;
    fill(&mut app, 3000).await;

    let held = unread_export(app.addr, &app.admin_token).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        idle_in_transaction(&app).await,
        1,
        "the export holds its snapshot"
    );
    let busy = app
        .users
        .export_users(users_service::pb::v1::ExportUsersRequest::default())
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(busy, Some(Code::ResourceExhausted), "its slot is taken");

    // Past the stall timeout the export lets go of both.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idle_in_transaction(&app).await, 0);
    let mut stream = app
        .users
        .export_users(users_service::pb::v1::ExportUsersRequest::default())
        .await
        .expect("the slot is free again")
        .into_inner();
    let mut exported = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        exported += chunk.users.len();
    }
    assert_eq!(exported, 3000);
    drop(held);
}

#[tokio::test]
async fn an_export_ends_with_deadline_exceeded_at_the_call_limit() {
    let mut app = app_with(|c| {
        c.max_call_duration = Duration::from_secs(1);
        c.stream_stall_timeout = Duration::from_secs(30);
    })
    .await;
    fill(&mut app, 3000).await;

    // A reader that starts reading only after the call limit.
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!(
        "http://{}/users.v1.UsersService/ExportUsers",
        app.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {}", app.admin_token))
    .body(())
    .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let mut response = response.await.unwrap().into_body();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut received = 0;
    while let Some(data) = response.data().await {
        let data = data.unwrap();
        received += data.len();
        response
            .flow_control()
            .release_capacity(data.len())
            .unwrap();
    }
    let trailers = response.trailers().await.unwrap().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("4"),
        "DEADLINE_EXCEEDED after {received} bytes: {trailers:?}"
    );
    assert!(received < 3_000_000, "the export stopped early");
    assert_eq!(idle_in_transaction(&app).await, 0);
}

#[tokio::test]
async fn sigterm_ends_every_call_within_the_grace_period_and_exits_cleanly() {
    let mut service = ServiceProcess::start(Start {
        args: ["--shutdown-grace", "2s", "--request-read-timeout", "60s"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await;
    let user = service.create_user(roq_user()).await;

    // Well-behaved callers, each on a connection of its own...
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut users = service.users().await;
        let id = user.id.clone();
        load.push(tokio::spawn(async move {
            loop {
                let outcome = users
                    .get_user(GetUserRequest {
                        id: id.clone(),
                        ..Default::default()
                    })
                    .await;
                if let Err(status) = outcome {
                    return status.code();
                }
            }
        }));
    }
    // ...and streams that never send their message.
    let hostile = service.channel().await;
    let stalled: Vec<_> = (0..20)
        .map(|_| {
            stalled_call(
                &hostile,
                &service.admin_token,
                "/users.v1.UsersService/GetUser",
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (exit, took) = service.terminate(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(took < Duration::from_secs(4), "exited after {took:?}");
    for call in load.into_iter().chain([]) {
        let code = tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .expect("no call outlives the process")
            .unwrap();
        assert_ne!(code, Code::Internal);
    }
    for call in stalled {
        tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .expect("no call outlives the process")
            .unwrap()
            .expect_err("a stalled call ends with an error");
    }
    assert!(
        service
            .log_lines()
            .iter()
            .any(|line| line["message"] == "grace period over, cancelling the calls still running"),
        "the stalled calls held the drain to the end of the grace"
    );
}
