//! The change feed (issue 13): WatchUsers, its outbox, and list-then-watch.

use std::{collections::HashSet, time::Duration};

use tokio_postgres::NoTls;
use tonic::{Code, Streaming};
use users_service::{
    auth::Role,
    pb::v1::{
        BatchUpsertUsersRequest, CreateTenantRequest, DeactivateUserRequest, DeleteUserRequest,
        ListUsersRequest, PurgeUserRequest, ReactivateUserRequest, Tenant, UndeleteUserRequest,
        UpdateUserRequest, User, UserEvent, UserEventType, UserUpdate, WatchUsersRequest,
        WatchUsersResponse,
    },
};

use crate::helpers::{TestApp, Users, spawn_app, spawn_with, test_config};
use crate::safe_writes::{create, key_id, places_holding, spawn_configured, user_token};

/// Longest wait for an event the test expects.
const PATIENCE: Duration = Duration::from_secs(10);

/// Starts a watch and waits for its first response (which confirms it):
/// the stream, and that response's token.
pub async fn watch(
    users: &mut Users,
    request: WatchUsersRequest,
) -> (Streaming<WatchUsersResponse>, String) {
    let mut stream = users
        .watch_users(request)
        .await
        .expect("the watch starts")
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, stream.message())
        .await
        .expect("a first response in time")
        .expect("the stream works")
        .expect("a first response");
    assert!(
        first.events.is_empty(),
        "the first response is the position only"
    );
    assert!(!first.resume_token.is_empty());
    (stream, first.resume_token)
}

pub fn from(token: &str) -> WatchUsersRequest {
    WatchUsersRequest {
        resume_token: token.to_owned(),
        ..Default::default()
    }
}

/// The next `count` events of `stream`; fails if they do not come in time.
pub async fn events(stream: &mut Streaming<WatchUsersResponse>, count: usize) -> Vec<UserEvent> {
    let mut events = Vec::new();
    while events.len() < count {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {count} events came: {events:#?}", events.len()))
            .expect("the stream works")
            .expect("the stream goes on");
        events.extend(response.events);
    }
    assert_eq!(
        events.len(),
        count,
        "no more events than expected: {events:#?}"
    );
    events
}

/// Fails if an event arrives within `wait`.
async fn no_event(stream: &mut Streaming<WatchUsersResponse>, wait: Duration) {
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(response) = tokio::time::timeout_at(deadline, stream.message()).await {
        let response = response
            .expect("the stream works")
            .expect("the stream goes on");
        assert!(
            response.events.is_empty(),
            "no event expected: {:#?}",
            response.events
        );
    }
}

fn kind(event: &UserEvent) -> UserEventType {
    UserEventType::try_from(event.r#type).expect("a known type")
}

fn changed(event: &UserEvent) -> Vec<&str> {
    event
        .changed_fields
        .as_ref()
        .map(|mask| mask.paths.iter().map(String::as_str).collect())
        .unwrap_or_default()
}

fn user(email: &str) -> User {
    User {
        email: email.into(),
        first_name: "Ada".into(),
        ..Default::default()
    }
}

/// Number of rows of `user_events` about `user_id`.
async fn stored_events(app: &TestApp, user_id: &str) -> i64 {
    app.db
        .query_one(
            "SELECT count(*) FROM user_events WHERE user_id::text = $1",
            &[&user_id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn every_change_is_one_event_in_commit_order_and_a_change_of_nothing_is_none() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let (mut stream, _) = watch(&mut users, WatchUsersRequest::default()).await;

    let created = create(&mut users, user("ada@example.com"), "")
        .await
        .unwrap();
    let id = created.id.clone();
    users
        .update_user(UpdateUserRequest {
            id: id.clone(),
            user: Some(UserUpdate {
                last_name: Some("Lovelace".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    for _ in 0..2 {
        // The second deactivation changes nothing: no event.
        users
            .deactivate_user(DeactivateUserRequest {
                id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    users
        .reactivate_user(ReactivateUserRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let batch = |first_name: &str| BatchUpsertUsersRequest {
        users: vec![User {
            reference: "ref-1".into(),
            first_name: first_name.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    users.batch_upsert_users(batch("Bea")).await.unwrap();
    users.batch_upsert_users(batch("Cleo")).await.unwrap();
    // The same values again: nothing changes, no event.
    users.batch_upsert_users(batch("Cleo")).await.unwrap();
    users
        .delete_user(DeleteUserRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    users
        .undelete_user(UndeleteUserRequest {
            id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();

    let seen = events(&mut stream, 8).await;
    let kinds: Vec<UserEventType> = seen.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            UserEventType::Created,
            UserEventType::Updated,
            UserEventType::Deactivated,
            UserEventType::Reactivated,
            UserEventType::Created,
            UserEventType::Updated,
            UserEventType::Deleted,
            UserEventType::Undeleted,
        ]
    );
    no_event(&mut stream, Duration::from_millis(500)).await;

    // What each event says.
    let [created_event, updated, deactivated, ..] = &seen[..] else {
        unreachable!()
    };
    let state = created_event.user.as_ref().unwrap();
    assert_eq!(state.id, id);
    assert_eq!(state.email, "ada@example.com");
    assert_eq!(
        changed(created_event),
        ["email", "first_name", "locale", "active"]
    );
    assert_eq!(changed(updated), ["last_name"]);
    assert_eq!(updated.user.as_ref().unwrap().last_name, "Lovelace");
    assert_eq!(changed(deactivated), ["active"]);
    assert_eq!(deactivated.user.as_ref().unwrap().active, Some(false));
    assert_eq!(changed(&seen[5]), ["first_name"]);
    assert_eq!(changed(&seen[6]), ["delete_time", "expire_time"]);
    let actor = updated.actor.as_ref().unwrap();
    assert_eq!(actor.api_key_id, key_id(&app.admin_token));
    assert_eq!(actor.api_key_name, "bootstrap");
    assert!(updated.commit_time.is_some());
    // The event's user is the user as a read shows it after the change.
    assert_eq!(
        seen[7].user.as_ref().unwrap().updated_at,
        crate::safe_writes::get(&mut users, &id, false)
            .await
            .unwrap()
            .updated_at
    );
    let ids: HashSet<&str> = seen.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids.len(), 8, "event ids are unique");

    // The database holds one event per change, and the same ones.
    assert_eq!(stored_events(&app, &id).await, 6);
}

#[tokio::test]
async fn a_change_that_rolls_back_writes_no_event() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let taken = create(&mut users, user("taken@example.com"), "")
        .await
        .unwrap();
    let (mut stream, _) = watch(&mut users, WatchUsersRequest::default()).await;

    // Refused by the database: nothing committed.
    let clash = create(&mut users, user("TAKEN@example.com"), "").await;
    assert_eq!(clash.unwrap_err().code(), Code::AlreadyExists);
    // An operator's change that rolls back.
    let (client, connection) = app.db_config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "UPDATE users SET first_name = 'Rolled back' WHERE id::text = $1",
            &[&taken.id],
        )
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();

    no_event(&mut stream, Duration::from_millis(500)).await;
    assert_eq!(stored_events(&app, &taken.id).await, 1);
}

#[tokio::test]
async fn transactions_that_commit_out_of_order_are_all_delivered_in_commit_order() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let early = create(&mut users, user("early@example.com"), "")
        .await
        .unwrap();
    let (mut stream, _) = watch(&mut users, WatchUsersRequest::default()).await;

    // Transaction A writes its event first (the lower seq) and stays open.
    let (a, connection) = app.db_config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    a.batch_execute("BEGIN").await.unwrap();
    a.execute(
        "UPDATE users SET first_name = 'Held' WHERE id::text = $1",
        &[&early.id],
    )
    .await
    .unwrap();
    // Later ones commit meanwhile, and are delivered without waiting for A.
    let mut later = Vec::new();
    for i in 0..5 {
        later.push(
            create(&mut users, user(&format!("later{i}@example.com")), "")
                .await
                .unwrap()
                .id,
        );
    }
    let before_a = events(&mut stream, 5).await;
    assert_eq!(
        before_a
            .iter()
            .map(|e| e.user.as_ref().unwrap().id.clone())
            .collect::<Vec<_>>(),
        later
    );
    // Then A commits, and comes after them: the order of commits.
    a.batch_execute("COMMIT").await.unwrap();
    let after = events(&mut stream, 1).await;
    assert_eq!(kind(&after[0]), UserEventType::Updated);
    assert_eq!(after[0].user.as_ref().unwrap().id, early.id);
    assert_eq!(after[0].user.as_ref().unwrap().first_name, "Held");
    let a_seq: i64 = after[0].event_id.parse().unwrap();
    assert!(
        before_a
            .iter()
            .all(|e| e.event_id.parse::<i64>().unwrap() > a_seq),
        "A took its sequence number first, and was delivered last"
    );

    // A watcher that resumes after the first of them gets the other five.
    // (Changes of different users that commit close together may come in
    // another order to a watcher that reads them later: only the changes of
    // one user have one order for every watcher.)
    let (mut again, _) = watch(&mut users, from(&before_a[0].resume_token)).await;
    let rest: HashSet<String> = events(&mut again, 5)
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    let expected: HashSet<String> = before_a[1..]
        .iter()
        .chain(&after)
        .map(|e| e.event_id.clone())
        .collect();
    assert_eq!(rest, expected);
    no_event(&mut again, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_transaction_that_drew_its_seq_before_an_earlier_one_committed_is_delivered() {
    // Postgres lists a transaction as running in a snapshot only once a
    // later one has ended: B below, the latest to begin, is past the
    // snapshot's xmax while its event's seq is below A's.
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let first = create(&mut users, user("first@example.com"), "")
        .await
        .unwrap();
    let second = create(&mut users, user("second@example.com"), "")
        .await
        .unwrap();
    let (mut stream, _) = watch(&mut users, WatchUsersRequest::default()).await;
    // Let the feed's reader settle after the creates.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let connect = async || {
        let (client, connection) = app.db_config.connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let (a, b) = (connect().await, connect().await);
    // A takes its xid first, B the next one and the next seq.
    a.batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    b.batch_execute("BEGIN").await.unwrap();
    b.execute(
        "UPDATE users SET first_name = 'B' WHERE id::text = $1",
        &[&first.id],
    )
    .await
    .unwrap();
    a.execute(
        "UPDATE users SET first_name = 'A' WHERE id::text = $1",
        &[&second.id],
    )
    .await
    .unwrap();
    a.batch_execute("COMMIT").await.unwrap();
    let got_a = events(&mut stream, 1).await;
    assert_eq!(got_a[0].user.as_ref().unwrap().id, second.id);
    // The reader has read past A's seq; B commits now, and is delivered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.batch_execute("COMMIT").await.unwrap();
    let got_b = events(&mut stream, 1).await;
    assert_eq!(got_b[0].user.as_ref().unwrap().id, first.id);
    assert_eq!(got_b[0].user.as_ref().unwrap().first_name, "B");
    assert!(
        got_b[0].event_id.parse::<i64>().unwrap() < got_a[0].event_id.parse::<i64>().unwrap(),
        "B drew the smaller seq"
    );
    // And so does a watcher that resumes from before either.
    let (mut again, _) = watch(&mut users, from(&got_a[0].resume_token)).await;
    assert_eq!(events(&mut again, 1).await[0].event_id, got_b[0].event_id);
}

#[tokio::test]
async fn a_watcher_resumes_right_after_its_token_on_another_replica_and_after_a_restart() {
    let name = crate::helpers::fresh_database().await;
    let config = test_config(Some(crate::helpers::server().url(&name)));
    let first = spawn_with(config.clone()).await;
    let mut users = first.users.clone();
    let (mut stream, start) = watch(&mut users, WatchUsersRequest::default()).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            create(&mut users, user(&format!("r{i}@example.com")), "")
                .await
                .unwrap()
                .id,
        );
    }
    let seen = events(&mut stream, 6).await;
    drop(stream);

    // Another replica on the same database, from the third event's token.
    let mut second_config = test_config(Some(crate::helpers::server().url(&name)));
    second_config.data_dir = first.config.data_dir.clone();
    let second = spawn_with(second_config).await;
    let mut other = second.users.clone();
    let (mut resumed, _) = watch(&mut other, from(&seen[2].resume_token)).await;
    let rest = events(&mut resumed, 3).await;
    assert_eq!(
        rest.iter().map(|e| e.event_id.clone()).collect::<Vec<_>>(),
        seen[3..]
            .iter()
            .map(|e| e.event_id.clone())
            .collect::<Vec<_>>()
    );
    drop(resumed);

    // Both stop; after a restart, the very first token still resumes.
    first.shutdown().await;
    second.shutdown().await;
    let restarted = spawn_with(config).await;
    let mut users = restarted.users.clone();
    let late = create(&mut users, user("late@example.com"), "")
        .await
        .unwrap();
    let (mut replay, _) = watch(&mut users, from(&start)).await;
    let all = events(&mut replay, 7).await;
    let replayed: Vec<String> = all
        .iter()
        .map(|e| e.user.as_ref().unwrap().id.clone())
        .collect();
    ids.push(late.id);
    assert_eq!(replayed, ids);
    restarted.shutdown().await;
    crate::helpers::drop_database(&name);
}

#[tokio::test]
async fn listing_then_watching_from_the_watch_token_misses_nothing_and_repeats_nothing() {
    // With a count (page and count in one transaction), and without (the
    // page alone, one statement).
    list_then_watch(false).await;
    list_then_watch(true).await;
}

async fn list_then_watch(skip_total_count: bool) {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    // Writers run all along.
    let writer = {
        let mut users = users.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..120 {
                ids.push(
                    create(&mut users, user(&format!("w{i}@example.com")), "")
                        .await
                        .unwrap()
                        .id,
                );
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let page = users
        .list_users(ListUsersRequest {
            limit: Some(1000),
            skip_total_count,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.data.is_empty());
    if !skip_total_count {
        assert_eq!(
            page.total_count,
            Some(page.data.len() as i64),
            "one snapshot"
        );
    }
    let listed: HashSet<String> = page.data.into_iter().map(|u| u.id).collect();
    let (mut stream, _) = watch(&mut users, from(&page.watch_token)).await;
    let written = writer.await.unwrap();
    let missing = written.iter().filter(|id| !listed.contains(*id)).count();
    let watched: Vec<String> = events(&mut stream, missing)
        .await
        .into_iter()
        .map(|e| e.user.unwrap().id)
        .collect();
    no_event(&mut stream, Duration::from_millis(300)).await;
    let watched_set: HashSet<&String> = watched.iter().collect();
    assert_eq!(watched_set.len(), watched.len(), "no event twice");
    for id in &written {
        assert!(
            listed.contains(id) != watched_set.contains(id),
            "{id} is in the list or in the watch, exactly once"
        );
    }
}

#[tokio::test]
async fn tenant_keys_watch_their_tenant_only_and_end_users_may_not_watch() {
    let app = spawn_app().await;
    let mut admin = app.users.clone();
    let other: Tenant = app
        .tenants
        .clone()
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: "Other".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();
    let default_tenant = app.default_tenant().await;
    let viewer = app
        .create_key(Role::Viewer, Some(default_tenant.parse().unwrap()), None)
        .await;
    let mut as_viewer = app.users_as(Some(&viewer));

    let refused = as_viewer
        .watch_users(WatchUsersRequest {
            tenant_id: other.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let mine = create(&mut admin, user("mine@example.com"), "")
        .await
        .unwrap();
    let end_user = user_token(&mine.id);
    let refused = app
        .users_as(Some(&end_user))
        .watch_users(WatchUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    let (mut viewer_stream, _) = watch(&mut as_viewer, WatchUsersRequest::default()).await;
    let (mut admin_stream, _) = watch(&mut admin, WatchUsersRequest::default()).await;
    create(
        &mut admin,
        User {
            tenant_id: other.id.clone(),
            ..user("theirs@example.com")
        },
        "",
    )
    .await
    .unwrap();
    let ours = create(&mut admin, user("ours@example.com"), "")
        .await
        .unwrap();
    // The admin sees both; the viewer only its tenant's.
    assert_eq!(events(&mut admin_stream, 2).await.len(), 2);
    let seen = events(&mut viewer_stream, 1).await;
    assert_eq!(seen[0].user.as_ref().unwrap().id, ours.id);
    no_event(&mut viewer_stream, Duration::from_millis(300)).await;

    // A token of the admin's watch carries no tenant: the viewer who uses
    // it still gets its own tenant's events only.
    let (mut replay, _) = watch(&mut as_viewer, from(&seen[0].resume_token)).await;
    no_event(&mut replay, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn types_filter_and_bad_tokens() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let (mut stream, _) = watch(
        &mut users,
        WatchUsersRequest {
            types: vec![UserEventType::Deactivated as i32],
            ..Default::default()
        },
    )
    .await;
    let ada = create(&mut users, user("ada@example.com"), "")
        .await
        .unwrap();
    users
        .deactivate_user(DeactivateUserRequest {
            id: ada.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let seen = events(&mut stream, 1).await;
    assert_eq!(kind(&seen[0]), UserEventType::Deactivated);

    for token in ["not a token", "AAAA", &"x".repeat(20_000)] {
        let refused = users.watch_users(from(token)).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{token:.20}");
    }
    let refused = users
        .watch_users(WatchUsersRequest {
            types: vec![99],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn an_idle_watcher_gets_heartbeats_with_fresh_tokens() {
    let app = spawn_configured(|config| config.watch_heartbeat = Duration::from_millis(200)).await;
    let mut users = app.users.clone();
    let (mut stream, first) = watch(&mut users, WatchUsersRequest::default()).await;
    let started = tokio::time::Instant::now();
    let mut tokens = vec![first];
    while tokens.len() < 4 {
        let response = tokio::time::timeout(PATIENCE, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(response.events.is_empty());
        tokens.push(response.resume_token);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "heartbeats come every 200 ms"
    );
    // The latest heartbeat's token resumes: a change made after it comes.
    let (mut resumed, _) = watch(&mut users, from(tokens.last().unwrap())).await;
    create(&mut users, user("after@example.com"), "")
        .await
        .unwrap();
    assert_eq!(events(&mut resumed, 1).await.len(), 1);
}

#[tokio::test]
async fn purging_a_user_leaves_no_personal_data_in_its_events() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let (mut stream, start) = watch(&mut users, WatchUsersRequest::default()).await;
    let email = "erase.me@example.com";
    let doomed = create(&mut users, user(email), "").await.unwrap();
    users
        .delete_user(DeleteUserRequest {
            id: doomed.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events(&mut stream, 2).await.len(), 2);
    assert!(!places_holding(&app.db, email).await.is_empty());

    users
        .purge_user(PurgeUserRequest {
            id: doomed.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let purged = events(&mut stream, 1).await;
    assert_eq!(kind(&purged[0]), UserEventType::Purged);
    let state = purged[0].user.as_ref().unwrap();
    assert_eq!(state.id, doomed.id);
    assert_eq!(state.tenant_id, doomed.tenant_id);
    assert!(state.email.is_empty() && state.first_name.is_empty());
    assert_eq!(places_holding(&app.db, email).await, Vec::<String>::new());
    assert_eq!(places_holding(&app.db, "Ada").await, Vec::<String>::new());

    // Replayed from before, the earlier events hold the id only.
    let (mut replay, _) = watch(&mut users, from(&start)).await;
    let replayed = events(&mut replay, 3).await;
    for event in &replayed {
        let state = event.user.as_ref().unwrap();
        assert_eq!(state.id, doomed.id);
        assert!(state.email.is_empty(), "{event:?}");
    }
}

#[tokio::test]
async fn a_token_older_than_the_retention_is_out_of_range() {
    let app = spawn_configured(|config| {
        config.event_retention = Duration::from_secs(3600);
        config.purge_interval = Duration::from_millis(100);
    })
    .await;
    let mut users = app.users.clone();
    let (_, start) = watch(&mut users, WatchUsersRequest::default()).await;
    create(&mut users, user("old@example.com"), "")
        .await
        .unwrap();
    app.clock.advance(Duration::from_secs(2 * 3600));
    // The purge job prunes the event.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let left: i64 = app
            .db
            .query_one("SELECT count(*) FROM user_events", &[])
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event is pruned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = users.watch_users(from(&start)).await.unwrap_err();
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    // A fresh position works.
    let (_, _) = watch(&mut users, WatchUsersRequest::default()).await;
}

#[tokio::test]
async fn metrics_count_watchers_and_events() {
    let app = spawn_configured(|config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let mut users = app.users.clone();
    let (mut stream, _) = watch(&mut users, WatchUsersRequest::default()).await;
    for i in 0..3 {
        create(&mut users, user(&format!("m{i}@example.com")), "")
            .await
            .unwrap();
    }
    events(&mut stream, 3).await;
    // A watcher may get events from the table before the hub has read
    // (and counted) them: the count follows within moments.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let scraped = loop {
        let scraped = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
        if scraped.contains("\nusers_service_events_total 3\n")
            || tokio::time::Instant::now() > deadline
        {
            break scraped;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        scraped.contains("\nusers_service_watchers 1\n"),
        "{scraped}"
    );
    assert!(
        scraped.contains("\nusers_service_events_total 3\n"),
        "{scraped}"
    );
    drop(stream);
    // The stream ends on the server when its client goes.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let scraped = crate::metrics::scrape(app.metrics_addr.unwrap()).await;
        if scraped.contains("\nusers_service_watchers 0\n") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{scraped}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn one_caller_cannot_take_every_watch_stream() {
    let app = spawn_configured(|config| config.max_watchers = 102).await;
    let mut admin = app.users.clone();
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(watch(&mut admin, WatchUsersRequest::default()).await.0);
    }
    let refused = admin
        .watch_users(WatchUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Another caller still watches; past the replica's limit, nobody.
    let default_tenant = app.default_tenant().await;
    let viewer = app
        .create_key(Role::Viewer, Some(default_tenant.parse().unwrap()), None)
        .await;
    let mut other = app.users_as(Some(&viewer));
    let (_second, _) = watch(&mut other, WatchUsersRequest::default()).await;
    let (_third, _) = watch(&mut other, WatchUsersRequest::default()).await;
    let refused = other
        .watch_users(WatchUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // A closed stream gives its place back.
    open.pop();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while admin
        .watch_users(WatchUsersRequest::default())
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place comes back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_stalled_watcher_holds_up_nobody_and_catches_up_from_the_table() {
    let app = spawn_app().await;
    let mut users = app.users.clone();
    let (mut stalled, _) = watch(&mut users, WatchUsersRequest::default()).await;
    let (mut reader, _) = watch(&mut users, WatchUsersRequest::default()).await;
    // Far more than the stream's flow-control windows (a few MiB) and the
    // hub's broadcast (16 pages, one page or more per call here) hold.
    const CHANGES: usize = 12_000;
    let padding = "x".repeat(200);
    for from in (0..CHANGES).step_by(500) {
        let users_of_batch = (from..from + 500)
            .map(|i| User {
                reference: format!("stall-{i}"),
                first_name: padding.clone(),
                ..Default::default()
            })
            .collect();
        users
            .batch_upsert_users(BatchUpsertUsersRequest {
                users: users_of_batch,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // The reader gets everything while the other reads nothing.
    let read = events(&mut reader, CHANGES).await;
    assert_eq!(read.len(), CHANGES);
    // Then the stalled one reads, and gets everything too, in the same
    // order (one writer: one order), from the table.
    let late = events(&mut stalled, CHANGES).await;
    assert_eq!(
        late.iter().map(|e| &e.event_id).collect::<Vec<_>>(),
        read.iter().map(|e| &e.event_id).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_watch_ends_unavailable_when_the_server_shuts_down() {
    let app = spawn_app().await;
    let grace = app.config.shutdown_grace;
    let (mut stream, _) = watch(&mut app.users.clone(), WatchUsersRequest::default()).await;
    let began = tokio::time::Instant::now();
    let shutdown = tokio::spawn(app.shutdown());
    let ended = loop {
        match tokio::time::timeout(PATIENCE, stream.message()).await {
            Ok(Ok(Some(response))) => assert!(response.events.is_empty()),
            Ok(Ok(None)) => panic!("the stream ended without a status"),
            Ok(Err(status)) => break status,
            Err(_) => panic!("the stream did not end"),
        }
    };
    let took = began.elapsed();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    // As the shutdown begins, not when its grace period is over.
    assert!(took < grace, "{took:?}");
    shutdown.await.unwrap();
}
