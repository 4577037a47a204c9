//! Abuse: while a hostile tenant key and an unauthenticated client run
//! every known attack at their rate limits, a well-behaved admin client
//! keeps calling GetUser. It must see no error and no call slower than a
//! second (starvation shows as seconds, noise as milliseconds).
//!
//! `ABUSE_SECONDS` sets how long the attacks run (10 s by default; CI runs
//! 30 s). The run prints the well-behaved caller's latency percentiles.

#[allow(dead_code)]
#[path = "../api/helpers.rs"]
mod helpers;
#[allow(dead_code)]
#[path = "../api/process.rs"]
mod process;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use tonic::transport::Channel;
use users_service::{auth::Role, pb::v1 as pb};

use helpers::{RawCodec, raw_call};
use process::{ServiceProcess, Start};

/// Calls per second each attacker makes: near the server's per-caller limit.
const ATTACK_RATE: u32 = 150;
/// The server's per-caller limit in this run.
const RATE_LIMIT: &str = "200";
/// The well-behaved caller's pace.
const CALM_RATE: u32 = 50;
/// Slower than this is starvation.
const STARVED: Duration = Duration::from_secs(1);

fn seconds() -> Duration {
    Duration::from_secs(
        std::env::var("ABUSE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    )
}

/// `{"k": {"k": ...}}`, `levels` deep.
fn nested(levels: usize) -> prost_types::Struct {
    let mut data = prost_types::Struct::default();
    for _ in 0..levels {
        data = prost_types::Struct {
            fields: [(
                "k".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(data)),
                },
            )]
            .into(),
        };
    }
    data
}

fn list(request: pb::ListUsersRequest) -> (&'static str, Vec<u8>) {
    ("/users.v1.UsersService/ListUsers", request.encode_to_vec())
}

fn create(user: pb::User) -> (&'static str, Vec<u8>) {
    (
        "/users.v1.UsersService/CreateUser",
        pb::CreateUserRequest {
            user: Some(user),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// The attacks a tenant key makes, one per call, in turn.
fn hostile_requests(own_user: &str) -> Vec<(&'static str, Vec<u8>)> {
    (0..9).map(|i| hostile_request(i, own_user)).collect()
}

fn hostile_request(i: u64, own_user: &str) -> (&'static str, Vec<u8>) {
    let text_filter = |filter: pb::StringFilter| pb::ListUsersRequest {
        filter: Some(pb::UserFilter {
            last_name: Some(filter),
            ..Default::default()
        }),
        ..Default::default()
    };
    match i % 9 {
        0 => list(pb::ListUsersRequest {
            order: (0..10_000)
                .map(|i| pb::UserOrder {
                    field: 1 + (i % 10),
                    direction: 2,
                })
                .collect(),
            ..Default::default()
        }),
        1 => list(pb::ListUsersRequest {
            search: "x".repeat(100_000),
            ..Default::default()
        }),
        2 => list(text_filter(pb::StringFilter {
            equal_to: Some("a\0b".into()),
            ..Default::default()
        })),
        3 => list(text_filter(pb::StringFilter {
            like: Some("abc\\".into()),
            value_in: vec!["v".repeat(255); 1000],
            ..Default::default()
        })),
        4 => create(pb::User {
            reference: format!("deep-{i}"),
            custom_data: Some(nested(60)),
            ..Default::default()
        }),
        5 => create(pb::User {
            reference: format!("bidi-{i}"),
            first_name: "Ada\u{202E}ecalevoL".into(),
            ..Default::default()
        }),
        6 => (
            "/users.v1.UsersService/BatchUpsertUsers",
            pb::BatchUpsertUsersRequest {
                users: (0..1000)
                    .map(|j| pb::User {
                        reference: format!("b{j}\0"),
                        custom_data: Some(nested(9)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        7 => list(pb::ListUsersRequest {
            page_token: "A".repeat(8000),
            offset: i32::MAX,
            ..Default::default()
        }),
        _ => (
            "/users.v1.UsersService/GetUser",
            pb::GetUserRequest {
                id: own_user.to_owned(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    }
}

/// A call whose client sends its headers and never its message.
fn stalled(channel: &Channel, token: &str) {
    let channel = channel.clone();
    let header = format!("Bearer {token}");
    tokio::spawn(async move {
        let mut grpc = tonic::client::Grpc::new(channel);
        if grpc.ready().await.is_err() {
            return;
        }
        let mut request = tonic::Request::new(futures::stream::pending::<Vec<u8>>());
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let _ = grpc
            .client_streaming(
                request,
                http::uri::PathAndQuery::from_static("/users.v1.UsersService/GetUser"),
                RawCodec,
            )
            .await;
    });
}

/// An export over a connection whose client never reads.
fn unread_export(addr: std::net::SocketAddr, token: &str) {
    let header = format!("Bearer {token}");
    tokio::spawn(async move {
        let Ok(tcp) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let Ok((mut send, connection)) = h2::client::Builder::new()
            .initial_window_size(1024)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
        else {
            return;
        };
        let driver = tokio::spawn(connection);
        let request =
            http::Request::post(format!("http://{addr}/users.v1.UsersService/ExportUsers"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("authorization", header)
                .body(())
                .unwrap();
        if let Ok((_response, mut body)) = send.send_request(request, false) {
            let _ = body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        driver.abort();
    });
}

/// Ticks `rate` times a second, skipping ticks a slow step missed.
fn pace(rate: u32) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_caller_is_served_while_others_attack() {
    let service = ServiceProcess::start(Start {
        args: [
            "--rate-limit-per-second",
            RATE_LIMIT,
            "--request-read-timeout",
            "5s",
            "--stream-stall-timeout",
            "3s",
            "--connection-idle-timeout",
            "10s",
        ]
        .map(String::from)
        .to_vec(),
        ..Default::default()
    })
    .await;
    let mut admin = service.users().await;
    let target = admin
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                reference: "calm".into(),
                email: "calm@example.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let tenant = uuid::Uuid::parse_str(&target.tenant_id).unwrap();
    // Enough users that an unread export cannot fit in the buffers.
    for chunk in 0..3 {
        admin
            .batch_upsert_users(pb::BatchUpsertUsersRequest {
                users: (0..1000)
                    .map(|i| pb::User {
                        reference: format!("u{chunk}-{i}"),
                        first_name: "n".repeat(200),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let hostile_key = service.create_key(Role::Editor, Some(tenant), None).await;

    let stop = Arc::new(AtomicBool::new(false));
    let hostile_calls = Arc::new(AtomicU64::new(0));
    let anonymous_calls = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();

    // The hostile tenant key.
    {
        let channel = service.channel().await;
        let (stop, calls, key, own) = (
            Arc::clone(&stop),
            Arc::clone(&hostile_calls),
            hostile_key.clone(),
            target.id.clone(),
        );
        let addr = service.addr;
        let requests = hostile_requests(&own);
        attackers.push(tokio::spawn(async move {
            let mut tick = pace(ATTACK_RATE);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                match i % 20 {
                    0 => stalled(&channel, &key),
                    10 if i % 100 == 10 => unread_export(addr, &key),
                    _ => {
                        let (path, message) = requests[(i % 9) as usize].clone();
                        let channel = channel.clone();
                        let key = key.clone();
                        tokio::spawn(async move {
                            let _ = raw_call(&channel, Some(&key), path, message).await;
                        });
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The unauthenticated client.
    {
        let channel = service.channel().await;
        let (stop, calls) = (Arc::clone(&stop), Arc::clone(&anonymous_calls));
        let addr = service.addr;
        attackers.push(tokio::spawn(async move {
            let mut idle = Vec::new();
            let mut tick = pace(ATTACK_RATE);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                i += 1;
                let channel = channel.clone();
                match i % 4 {
                    0 => {
                        let path: &'static str = Box::leak(
                            format!("/users.v1.UsersService/{i}{}", "p".repeat(4000))
                                .into_boxed_str(),
                        );
                        tokio::spawn(async move {
                            let _ = raw_call(&channel, None, path, Vec::new()).await;
                        });
                    }
                    1 => {
                        let token =
                            format!("usk_{:016x}_{}", rand::random::<u64>(), "0".repeat(64));
                        tokio::spawn(async move {
                            let _ = raw_call(
                                &channel,
                                Some(&token),
                                "/users.v1.UsersService/GetUser",
                                Vec::new(),
                            )
                            .await;
                        });
                    }
                    2 => {
                        tokio::spawn(async move {
                            let _ = raw_call(
                                &channel,
                                Some("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
                                "/users.v1.UsersService/ListUsers",
                                vec![0xff; 64],
                            )
                            .await;
                        });
                    }
                    _ => {
                        if idle.len() < 500 {
                            if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
                                idle.push(tcp);
                            }
                        }
                    }
                }
                calls.fetch_add(1, Ordering::Relaxed);
            }
            drop(idle);
        }));
    }

    // The well-behaved admin, on a connection of its own.
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / CALM_RATE);
    while started.elapsed() < seconds() {
        tick.tick().await;
        let mut request = tonic::Request::new(pb::GetUserRequest {
            id: target.id.clone(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        let began = Instant::now();
        let outcome = admin.get_user(request).await;
        latencies.push(began.elapsed());
        if let Err(status) = outcome {
            errors.push(format!("{:?}: {}", status.code(), status.message()));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        let _ = attacker.await;
    }

    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "well-behaved GetUser: {} calls, p50 {:?}, p99 {:?}, max {:?}; attacks: {} from the hostile key, {} unauthenticated; server RSS {} MiB",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0),
        hostile_calls.load(Ordering::Relaxed),
        anonymous_calls.load(Ordering::Relaxed),
        service.rss() / (1 << 20),
    );
    assert!(
        errors.is_empty(),
        "the well-behaved caller saw errors: {errors:?}"
    );
    assert!(
        at(1.0) < STARVED,
        "the well-behaved caller waited {:?}",
        at(1.0)
    );
    let panics: Vec<_> = service
        .log_lines()
        .into_iter()
        .filter(|line| line.to_string().contains("panicked") || line["level"] == "ERROR")
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
}
