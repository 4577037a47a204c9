//! The relay of the change feed to NATS JetStream, against a real
//! `nats-server -js` of the test's own, restarted under load.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::jetstream::{self, stream::Stream};
use prost::Message;
use users_service::pb::v1::{
    BatchUpsertUsersRequest, DeleteUserRequest, PurgeUserRequest, User, UserEvent, UserEventType,
};

use crate::helpers::{
    ChildServer, TestApp, fresh_database, scratch_dir, server, spawn_with, test_config,
};
use crate::safe_writes::{create, places_holding};

/// A `nats-server` with JetStream, on a port of its own, storing in a
/// directory of its own; killed when dropped.
struct Nats(ChildServer);

impl Nats {
    fn start() -> Self {
        let store = scratch_dir("nats");
        Self(ChildServer::start(nats_server(), |port| {
            vec![
                "-js".into(),
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-sd".into(),
                store.display().to_string(),
            ]
        }))
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.0.port)
    }

    fn stop(&mut self) {
        self.0.stop();
    }

    /// (Re)starts the server on the same port and store.
    fn restart(&mut self) {
        self.0.restart();
    }
}

fn nats_server() -> &'static str {
    if Path::new("/usr/sbin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        "nats-server"
    }
}

const STREAM: &str = "USERS_EVENTS";

/// Every message of the stream, in stream order: its subject and event.
async fn messages(stream: &mut Stream) -> Vec<(String, UserEvent)> {
    let state = stream.info().await.unwrap().state.clone();
    let mut found = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        // A purged message leaves a hole in the sequence.
        if let Ok(message) = stream.get_raw_message(sequence).await {
            let event = UserEvent::decode(message.payload).expect("a UserEvent");
            found.push((message.subject.to_string(), event));
        }
    }
    found
}

/// Waits until the stream holds `count` messages.
async fn wait_for(nats: &Nats, count: u64) -> Stream {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(client) = async_nats::connect(nats.url()).await
            && let Ok(mut stream) = jetstream::new(client).get_stream(STREAM).await
            && let Ok(info) = stream.info().await
            && info.state.messages >= count
        {
            return stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream holds {count} messages in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the relay has stored its first position: it relays every
/// change from then on.
async fn relay_started(app: &TestApp) {
    for _ in 0..200 {
        let stored: i64 = app
            .db
            .query_one("SELECT count(*) FROM user_events_relays", &[])
            .await
            .unwrap()
            .get(0);
        if stored > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay did not start");
}

/// The relay's lag metrics: events, seconds.
async fn relay_lag(app: &TestApp) -> (i64, f64) {
    let scraped = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
    let value = |name: &str| {
        scraped
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing: {scraped}"))
            .to_owned()
    };
    (
        value("users_service_relay_lag_events").parse().unwrap(),
        value("users_service_relay_lag_seconds").parse().unwrap(),
    )
}

/// Waits until the relay's lag metrics satisfy `wanted`.
async fn lag_until(app: &TestApp, what: &str, wanted: impl Fn((i64, f64)) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let lag = relay_lag(app).await;
        if wanted(lag) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the lag stayed at {lag:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn spawn_relaying(database: &str, nats: &Nats, data_dir: Option<PathBuf>) -> TestApp {
    let mut config = test_config(Some(server().url(database)));
    config.nats_url = Some(nats.url());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    if let Some(dir) = data_dir {
        config.data_dir = dir;
    }
    spawn_with(config).await
}

fn batch(from: usize, count: usize, first_name: &str) -> BatchUpsertUsersRequest {
    BatchUpsertUsersRequest {
        users: (from..from + count)
            .map(|i| User {
                reference: format!("ref-{i}"),
                first_name: first_name.into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_event_reaches_jetstream_once_in_order_across_restarts_of_nats_and_the_service() {
    let mut nats = Nats::start();
    let database = fresh_database().await;
    let mut app = spawn_relaying(&database, &nats, None).await;
    // The relay starts from now: wait for it.
    relay_started(&app).await;

    // 10,000 changes: 5,000 users created, then each changed, 100 a call.
    const USERS: usize = 5_000;
    let mut made = 0;
    for round in 0..2 {
        for from in (0..USERS).step_by(100) {
            if made == 3_000 {
                // NATS goes away and comes back while changes go on.
                nats.stop();
            }
            if made == 3_500 {
                // Meanwhile the lag shows: 500 changes, waiting for over a second.
                lag_until(&app, "NATS away", |(events, seconds)| {
                    events >= 500 && seconds >= 1.0
                })
                .await;
                nats.restart();
            }
            if made == 6_000 {
                // And then the service.
                let data_dir = app.config.data_dir.clone();
                app.shutdown().await;
                app = spawn_relaying(&database, &nats, Some(data_dir)).await;
            }
            let name = if round == 0 { "Created" } else { "Changed" };
            let results = app
                .users
                .clone()
                .batch_upsert_users(batch(from, 100, name))
                .await
                .unwrap()
                .into_inner()
                .results;
            assert_eq!(results.len(), 100);
            made += 100;
        }
    }

    let mut stream = wait_for(&nats, 10_000).await;
    lag_until(&app, "caught up", |lag| lag == (0, 0.0)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = messages(&mut stream).await;
    assert_eq!(held.len(), 10_000, "each event once");
    let stored: i64 = app
        .db
        .query_one("SELECT count(*) FROM user_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 10_000);
    // One writer, one call at a time: the feed's order is the order of
    // the event ids, and the stream's must be the same.
    let ids: Vec<i64> = held
        .iter()
        .map(|(_, event)| event.event_id.parse().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "in order");
    sorted.dedup();
    assert_eq!(sorted.len(), 10_000, "no event twice");
    // Subjects name the tenant, the user and the type.
    let (subject, event) = &held[0];
    let user = event.user.as_ref().unwrap();
    assert_eq!(
        subject,
        &format!("users.v1.events.{}.{}.created", user.tenant_id, user.id)
    );
    assert!(held[5_000].0.ends_with(".updated"));
    app.shutdown().await;
    crate::helpers::drop_database(&database);
}

#[tokio::test]
async fn purging_a_user_deletes_its_messages_from_the_stream() {
    let nats = Nats::start();
    let database = fresh_database().await;
    let app = spawn_relaying(&database, &nats, None).await;
    relay_started(&app).await;
    let mut users = app.users.clone();
    let email = "erase.me@example.com";
    let doomed = create(
        &mut users,
        User {
            email: email.into(),
            first_name: "Erasable".into(),
            ..Default::default()
        },
        "",
    )
    .await
    .unwrap();
    let kept = create(
        &mut users,
        User {
            email: "kept@example.com".into(),
            ..Default::default()
        },
        "",
    )
    .await
    .unwrap();
    users
        .delete_user(DeleteUserRequest {
            id: doomed.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut stream = wait_for(&nats, 3).await;
    let before = messages(&mut stream).await;
    assert!(
        before
            .iter()
            .any(|(_, event)| event.user.as_ref().unwrap().email == email)
    );

    users
        .purge_user(PurgeUserRequest {
            id: doomed.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The PURGED event arrives, and the user's earlier messages are gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let after = messages(&mut stream).await;
        if after
            .iter()
            .any(|(_, e)| e.r#type == UserEventType::Purged as i32)
        {
            break after;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purge is relayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let of_doomed: Vec<&UserEvent> = after
        .iter()
        .filter(|(_, e)| e.user.as_ref().unwrap().id == doomed.id)
        .map(|(_, e)| e)
        .collect();
    assert_eq!(
        of_doomed.len(),
        1,
        "only the PURGED event is left: {of_doomed:?}"
    );
    assert_eq!(of_doomed[0].r#type, UserEventType::Purged as i32);
    for (_, event) in &after {
        let text = format!("{event:?}");
        assert!(
            !text.contains(email) && !text.contains("Erasable"),
            "{text}"
        );
    }
    assert!(
        after
            .iter()
            .any(|(_, e)| e.user.as_ref().unwrap().id == kept.id),
        "other users' messages stay"
    );
    // And Postgres holds nothing of it either.
    assert_eq!(places_holding(&app.db, email).await, Vec::<String>::new());
    app.shutdown().await;
    crate::helpers::drop_database(&database);
}

#[tokio::test]
async fn another_replica_takes_over_the_relay_when_the_relaying_one_stops() {
    let nats = Nats::start();
    let database = fresh_database().await;
    // The first replica relays; the second waits for the lock.
    let first = spawn_relaying(&database, &nats, None).await;
    relay_started(&first).await;
    let second = spawn_relaying(&database, &nats, Some(first.config.data_dir.clone())).await;
    first
        .users
        .clone()
        .batch_upsert_users(batch(0, 50, "First"))
        .await
        .unwrap();
    let _ = wait_for(&nats, 50).await;
    first.shutdown().await;
    // Changes made through the second replica get relayed by it now.
    second
        .users
        .clone()
        .batch_upsert_users(batch(50, 50, "Second"))
        .await
        .unwrap();
    let mut stream = wait_for(&nats, 100).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = messages(&mut stream).await;
    let ids: Vec<i64> = held
        .iter()
        .map(|(_, event)| event.event_id.parse().unwrap())
        .collect();
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (100, 100), "each event once");
    assert_eq!(ids, unique, "in order");
    second.shutdown().await;
    crate::helpers::drop_database(&database);
}
