//! BatchUpsertUsers and ExportUsers.

use std::collections::HashSet;

use prost::Message;
use tonic::Code;
use users_service::{
    auth::Role,
    pb::v1::{
        BatchUpsertUsersRequest, BatchUpsertUsersResult, DeleteUserRequest, ExportUsersRequest,
        StringFilter, User, UserFilter, batch_upsert_users_result::Outcome,
    },
};

use crate::helpers::{TestApp, spawn_app};
use crate::tenants::create_tenant;
use crate::users::{create, footprint, user};

async fn upsert(app: &mut TestApp, users: Vec<User>) -> Vec<BatchUpsertUsersResult> {
    app.users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .expect("batch call succeeds")
        .into_inner()
        .results
}

fn stored(result: &BatchUpsertUsersResult) -> &User {
    match &result.outcome {
        Some(Outcome::User(user)) => user,
        other => panic!("expected a stored user, got {other:?}"),
    }
}

/// The code and BadRequest fields of a refused item.
fn refused(result: &BatchUpsertUsersResult) -> (Code, Vec<String>) {
    let Some(Outcome::Error(status)) = &result.outcome else {
        panic!("expected an error, got {result:?}");
    };
    let fields = status
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("google.rpc.BadRequest"))
        .flat_map(|any| {
            tonic_types::pb::BadRequest::decode(any.value.as_slice())
                .unwrap()
                .field_violations
        })
        .map(|v| v.field)
        .collect();
    (Code::from_i32(status.code), fields)
}

#[tokio::test]
async fn batch_upsert_creates_the_missing_and_updates_the_present() {
    let mut app = spawn_app().await;
    let existing = create(
        &mut app,
        User {
            first_name: "Old".into(),
            ..user("r1", "r1@example.com")
        },
    )
    .await;

    let results = upsert(
        &mut app,
        vec![
            User {
                first_name: "New".into(),
                ..user("r1", "r1@example.com")
            },
            User {
                first_name: "Bea".into(),
                locale: "de-de".into(),
                ..user("r2", "r2@example.com")
            },
        ],
    )
    .await;
    assert_eq!(results.len(), 2);
    assert!(!results[0].created);
    assert_eq!(
        stored(&results[0]).id,
        existing.id,
        "matched on reference, same user"
    );
    assert_eq!(stored(&results[0]).first_name, "New");
    assert_eq!(stored(&results[0]).created_at, existing.created_at);
    assert!(results[1].created);
    assert_eq!(
        stored(&results[1]).locale,
        "de-DE",
        "validated and normalized as CreateUser"
    );

    let rows = app
        .db
        .query(
            "SELECT reference, first_name FROM users ORDER BY reference",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        rows,
        [("r1".into(), "New".into()), ("r2".into(), "Bea".into())]
    );
}

#[tokio::test]
async fn batch_upsert_reports_each_refused_item_and_stores_the_rest() {
    let mut app = spawn_app().await;
    create(&mut app, user("taken", "taken@example.com")).await;
    let results = upsert(
        &mut app,
        vec![
            user("ok-1", "ok1@example.com"),
            User {
                phone: Some("123".into()),
                ..user("bad", "not an email")
            },
            user("", "noref@example.com"),
            user("clash", "TAKEN@example.com"),
            user("ok-2", "ok2@example.com"),
            user("ok-2", "dup@example.com"),
            User {
                tenant_id: uuid::Uuid::now_v7().to_string(),
                ..user("ghost", "")
            },
        ],
    )
    .await;
    assert_eq!(results.len(), 7, "one result per item, in order");
    assert_eq!(stored(&results[0]).reference, "ok-1");
    assert_eq!(
        refused(&results[1]),
        (
            Code::InvalidArgument,
            vec!["user.email".into(), "user.phone".into()]
        )
    );
    assert_eq!(
        refused(&results[2]),
        (Code::InvalidArgument, vec!["user.reference".into()])
    );
    assert_eq!(refused(&results[3]).0, Code::AlreadyExists);
    assert_eq!(stored(&results[4]).reference, "ok-2");
    assert_eq!(
        refused(&results[5]),
        (Code::InvalidArgument, vec!["user.reference".into()])
    );
    assert_eq!(
        refused(&results[6]),
        (Code::InvalidArgument, vec!["user.tenant_id".into()])
    );

    let references: HashSet<String> = app
        .db
        .query("SELECT reference FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        references,
        HashSet::from(["taken".into(), "ok-1".into(), "ok-2".into()])
    );
}

#[tokio::test]
async fn batch_upsert_of_users_as_stored_changes_nothing_and_answers_them_as_they_are() {
    let mut app = spawn_app().await;
    let acme = create_tenant(&mut app, "Acme", "acme").await;
    let plan = prost_types::Struct {
        fields: [(
            "plan".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("pro".into())),
            },
        )]
        .into(),
    };
    let sent = vec![
        User {
            first_name: "Ada".into(),
            locale: "en-gb".into(),
            ..user("same", "same@example.com")
        },
        // The same reference in another tenant.
        User {
            tenant_id: acme.id.clone(),
            custom_data: Some(plan),
            ..user("same", "")
        },
        user("changes", "changes@example.com"),
        user("deleted", ""),
    ];
    let first = upsert(&mut app, sent.clone()).await;
    assert!(first.iter().all(|result| result.created), "{first:?}");
    app.users
        .delete_user(DeleteUserRequest {
            id: stored(&first[3]).id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut before = Vec::new();
    for result in &first[..3] {
        before.push(footprint(&app, &stored(result).id).await);
    }

    // The same users again, from another key, with one real change and one
    // new user.
    let mut again = sent.clone();
    again[2].first_name = "Changed".into();
    again.push(user("new", ""));
    let results = app
        .users_as(Some(&app.create_key(Role::Admin, None, None).await))
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: again,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results.len(), 5);
    for i in 0..2 {
        assert!(!results[i].created);
        assert_eq!(stored(&results[i]), stored(&first[i]), "item {i} as it is");
        let id = &stored(&first[i]).id;
        assert_eq!(footprint(&app, id).await, before[i], "item {i}");
    }
    let changed = stored(&results[2]);
    assert!(!results[2].created);
    assert_eq!(changed.first_name, "Changed");
    assert_ne!(changed.updated_at, stored(&first[2]).updated_at);
    assert_ne!(changed.updated_by, stored(&first[2]).updated_by);
    let (_, _, events) = footprint(&app, &changed.id).await;
    assert_eq!(events, before[2].2 + 1);
    assert_eq!(
        refused(&results[3]).0,
        Code::AlreadyExists,
        "still reserved"
    );
    assert!(results[4].created);

    // A batch of one item takes another path, to the same outcomes.
    let results = upsert(&mut app, vec![sent[0].clone()]).await;
    assert!(!results[0].created);
    assert_eq!(stored(&results[0]), stored(&first[0]));
    assert_eq!(footprint(&app, &stored(&first[0]).id).await, before[0]);
    let results = upsert(&mut app, vec![sent[3].clone()]).await;
    assert_eq!(
        refused(&results[0]).0,
        Code::AlreadyExists,
        "still reserved"
    );
}

#[tokio::test]
async fn batch_upsert_takes_at_most_1000_users() {
    let mut app = spawn_app().await;
    let users: Vec<User> = (0..1001).map(|i| user(&format!("r{i}"), "")).collect();
    let status = app
        .users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(app.user_count().await, 0);

    let users: Vec<User> = (0..1000)
        .map(|i| user(&format!("r{i}"), &format!("u{i}@example.com")))
        .collect();
    let results = upsert(&mut app, users).await;
    assert!(results.iter().all(|r| r.created));
    assert_eq!(app.user_count().await, 1000);
}

#[tokio::test]
async fn batch_upsert_by_an_editor_stays_in_its_tenant() {
    let mut app = spawn_app().await;
    let a = create_tenant(&mut app, "A", "a").await;
    let b = create_tenant(&mut app, "B", "b").await;
    let editor = app
        .create_key(Role::Editor, Some(a.id.parse().unwrap()), None)
        .await;
    let viewer = app
        .create_key(Role::Viewer, Some(a.id.parse().unwrap()), None)
        .await;
    let results = app
        .users_as(Some(&editor))
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: vec![
                user("mine", ""),
                User {
                    tenant_id: b.id.clone(),
                    ..user("theirs", "")
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(stored(&results[0]).tenant_id, a.id);
    assert_eq!(refused(&results[1]).0, Code::PermissionDenied);

    let status = app
        .users_as(Some(&viewer))
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: vec![user("v", "")],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let tenants: Vec<String> = app
        .db
        .query("SELECT tenant_id::text FROM users", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tenants, [a.id]);
}

async fn export_all(app: &TestApp, request: ExportUsersRequest) -> Vec<User> {
    let mut stream = app
        .users
        .clone()
        .export_users(request)
        .await
        .unwrap()
        .into_inner();
    let mut users = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(chunk.users.len() <= 500);
        users.extend(chunk.users);
    }
    users
}

#[tokio::test]
async fn export_streams_every_matching_user_once_in_id_order() {
    let mut app = spawn_app().await;
    let batch: Vec<User> = (0..1200)
        .map(|i| User {
            first_name: if i % 2 == 0 {
                "Even".into()
            } else {
                "Odd".into()
            },
            ..user(&format!("r{i}"), "")
        })
        .collect();
    upsert(&mut app, batch[..1000].to_vec()).await;
    upsert(&mut app, batch[1000..].to_vec()).await;

    let all = export_all(&app, ExportUsersRequest::default()).await;
    assert_eq!(all.len(), 1200);
    let ids: Vec<&String> = all.iter().map(|u| &u.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(ids, sorted, "id order, each once");

    let even = export_all(
        &app,
        ExportUsersRequest {
            filter: Some(UserFilter {
                first_name: Some(StringFilter {
                    equal_to: Some("Even".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            search: String::new(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(even.len(), 600);
    assert!(even.iter().all(|u| u.first_name == "Even"));
}

#[tokio::test]
async fn export_reads_one_snapshot_while_users_change() {
    let mut app = spawn_app().await;
    let batch: Vec<User> = (0..1000).map(|i| user(&format!("r{i}"), "")).collect();
    upsert(&mut app, batch).await;

    let mut stream = app
        .users
        .clone()
        .export_users(ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    // Written after the export began: not part of it.
    let late = create(&mut app, user("late", "")).await;
    app.db
        .execute("DELETE FROM users WHERE reference = 'r999'", &[])
        .await
        .unwrap();
    let mut users = first.users;
    while let Some(chunk) = stream.message().await.unwrap() {
        users.extend(chunk.users);
    }
    assert_eq!(users.len(), 1000);
    assert!(users.iter().all(|u| u.id != late.id));
    assert!(users.iter().any(|u| u.reference == "r999"));
}

#[tokio::test]
async fn export_by_a_tenant_key_is_confined_to_its_tenant() {
    let mut app = spawn_app().await;
    let a = create_tenant(&mut app, "A", "a").await;
    create(
        &mut app,
        User {
            tenant_id: a.id.clone(),
            ..user("in-a", "")
        },
    )
    .await;
    create(&mut app, user("in-default", "")).await;
    let viewer = app
        .create_key(Role::Viewer, Some(a.id.parse().unwrap()), None)
        .await;
    let mut stream = app
        .users_as(Some(&viewer))
        .export_users(ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut references = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        references.extend(chunk.users.into_iter().map(|u| u.reference));
    }
    assert_eq!(references, ["in-a"]);
}

#[tokio::test]
async fn exports_may_not_take_over_the_pool() {
    let mut app = spawn_app().await;
    // More chunks than the export's buffer holds, so that the first export
    // is still reading when the second asks.
    for part in 0..4 {
        let batch: Vec<User> = (0..1000)
            .map(|i| user(&format!("r{part}-{i}"), ""))
            .collect();
        upsert(&mut app, batch).await;
    }

    // The test pool has 4 connections: one export at a time.
    let mut first = app
        .users
        .clone()
        .export_users(ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    first.message().await.unwrap().unwrap();
    let second = app
        .users
        .clone()
        .export_users(ExportUsersRequest::default())
        .await;
    let status = match second {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Other calls still get a connection meanwhile.
    create(&mut app, user("meanwhile", "")).await;

    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match app
            .users
            .clone()
            .export_users(ExportUsersRequest::default())
            .await
        {
            Ok(_) => break,
            Err(status) if std::time::Instant::now() < deadline => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the export slot was not given back: {status:?}"),
        }
    }
}
