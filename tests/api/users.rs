//! CreateUser, GetUser, UpdateUser, DeactivateUser, ReactivateUser.

use tonic::Code;
use users_service::{
    auth::Role,
    pb::v1::{
        BatchUpsertUsersRequest, CreateUserRequest, DeactivateUserRequest, DeleteUserRequest,
        GetUserRequest, ReactivateUserRequest, UpdateUserRequest, User, UserUpdate,
        batch_upsert_users_result::Outcome,
    },
};

use crate::helpers::{TestApp, error_info, spawn_app, violated_fields};

/// The user of the ROQ createUser example.
pub fn roq_user() -> User {
    User {
        reference: "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa".into(),
        email: String::new(),
        phone: Some("+15550001234".into()),
        first_name: "Anna".into(),
        last_name: "W".into(),
        locale: "en-Us".into(),
        timezone: Some("Asia/Bangkok".into()),
        is_opted_in: false,
        active: Some(true),
        ..Default::default()
    }
}

pub fn user(reference: &str, email: &str) -> User {
    User {
        reference: reference.into(),
        email: email.into(),
        ..Default::default()
    }
}

pub async fn create(app: &mut crate::helpers::TestApp, user: User) -> User {
    app.users
        .create_user(CreateUserRequest {
            user: Some(user),
            ..Default::default()
        })
        .await
        .expect("create succeeds")
        .into_inner()
        .user
        .unwrap()
}

pub async fn get(app: &mut crate::helpers::TestApp, id: &str) -> User {
    let id = id.to_owned();
    app.users
        .get_user(GetUserRequest {
            id,
            ..Default::default()
        })
        .await
        .expect("get succeeds")
        .into_inner()
        .user
        .unwrap()
}

pub async fn update(app: &mut crate::helpers::TestApp, id: &str, changes: UserUpdate) -> User {
    let id = id.to_owned();
    app.users
        .update_user(UpdateUserRequest {
            id,
            user: Some(changes),
            ..Default::default()
        })
        .await
        .expect("update succeeds")
        .into_inner()
        .user
        .unwrap()
}

pub async fn deactivate(app: &mut crate::helpers::TestApp, id: &str) -> User {
    let id = id.to_owned();
    app.users
        .deactivate_user(DeactivateUserRequest {
            id,
            ..Default::default()
        })
        .await
        .expect("deactivate succeeds")
        .into_inner()
        .user
        .unwrap()
}

pub async fn reactivate(app: &mut crate::helpers::TestApp, id: &str) -> User {
    let id = id.to_owned();
    app.users
        .reactivate_user(ReactivateUserRequest {
            id,
            ..Default::default()
        })
        .await
        .expect("reactivate succeeds")
        .into_inner()
        .user
        .unwrap()
}

#[tokio::test]
async fn create_user_stores_the_roq_example_normalized_in_the_default_tenant() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;

    let id = uuid::Uuid::parse_str(&created.id).expect("id is a UUID");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(created.locale, "en-US");
    assert_eq!(created.tenant_id, app.default_tenant().await);
    assert!(created.synced);
    assert_eq!(created.active, Some(true));
    assert_eq!(created.phone.as_deref(), Some("+15550001234"));
    assert_eq!(created.timezone.as_deref(), Some("Asia/Bangkok"));
    assert_eq!(created.created_at, created.updated_at);
    assert!(created.created_at.is_some());

    let row = app
        .db
        .query_one(
            "SELECT reference, email, phone, first_name, last_name, locale, timezone, \
             is_opted_in, active, tenant_id::text FROM users WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "8d04d09a-8ff8-4393-840d-c69f3f1f7dfa"
    );
    assert_eq!(row.get::<_, String>(1), "");
    assert_eq!(row.get::<_, String>(2), "+15550001234");
    assert_eq!(row.get::<_, String>(3), "Anna");
    assert_eq!(row.get::<_, String>(4), "W");
    assert_eq!(row.get::<_, String>(5), "en-US");
    assert_eq!(row.get::<_, String>(6), "Asia/Bangkok");
    assert!(!row.get::<_, bool>(7));
    assert!(row.get::<_, bool>(8));
    assert_eq!(row.get::<_, String>(9), created.tenant_id);
}

#[tokio::test]
async fn create_user_ignores_output_only_fields_and_defaults_to_active() {
    let mut app = spawn_app().await;
    let created = create(
        &mut app,
        User {
            id: "00000000-0000-0000-0000-000000000001".into(),
            synced: false,
            created_at: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            active: None,
            ..Default::default()
        },
    )
    .await;
    assert_ne!(created.id, "00000000-0000-0000-0000-000000000001");
    assert!(created.synced);
    assert_ne!(created.created_at.unwrap().seconds, 1);
    assert_eq!(created.active, Some(true));
    assert_eq!(created.locale, "en-US");
    assert_eq!(created.phone, None);
    assert_eq!(created.timezone, None);
}

#[tokio::test]
async fn get_user_returns_the_stored_user() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let got = get(&mut app, &created.id).await;
    assert_eq!(got, created);
}

#[tokio::test]
async fn unknown_ids_are_not_found_and_malformed_ids_are_invalid() {
    let mut app = spawn_app().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    for id in [unknown.as_str(), "not-a-uuid", ""] {
        let expected = if id == unknown {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        let get = app
            .users
            .get_user(GetUserRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let update = app
            .users
            .update_user(UpdateUserRequest {
                id: id.into(),
                user: Some(UserUpdate {
                    first_name: Some("X".into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let deactivate = app
            .users
            .deactivate_user(DeactivateUserRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let reactivate = app
            .users
            .reactivate_user(ReactivateUserRequest {
                id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        for status in [get, update, deactivate, reactivate] {
            assert_eq!(status.code(), expected, "id {id:?}: {status:?}");
            if expected == Code::InvalidArgument {
                assert_eq!(violated_fields(&status), ["id"]);
            }
        }
    }
}

#[tokio::test]
async fn update_user_changes_only_the_fields_present() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let updated = update(
        &mut app,
        &created.id,
        UserUpdate {
            first_name: Some("Anna-Maria".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(updated.first_name, "Anna-Maria");
    assert!(updated.updated_at.unwrap().seconds >= created.updated_at.unwrap().seconds);
    assert_ne!(updated.updated_at, created.updated_at);
    assert_ne!(updated.etag, created.etag, "a change changes the etag");
    let expected = User {
        first_name: "Anna-Maria".into(),
        updated_at: updated.updated_at,
        etag: updated.etag.clone(),
        ..created.clone()
    };
    assert_eq!(updated, expected);

    let stored = get(&mut app, &created.id).await;
    assert_eq!(stored, updated);
}

#[tokio::test]
async fn update_user_with_empty_strings_clears_text_fields() {
    let mut app = spawn_app().await;
    let created = create(
        &mut app,
        User {
            email: "anna@example.com".into(),
            avatar_url: "https://example.com/a.png".into(),
            locale: "de-DE".into(),
            ..roq_user()
        },
    )
    .await;
    let updated = update(
        &mut app,
        &created.id,
        UserUpdate {
            email: Some(String::new()),
            phone: Some(String::new()),
            timezone: Some(String::new()),
            avatar_url: Some(String::new()),
            locale: Some(String::new()),
            last_name: Some(String::new()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(updated.email, "");
    assert_eq!(updated.phone, None);
    assert_eq!(updated.timezone, None);
    assert_eq!(updated.avatar_url, "");
    assert_eq!(updated.locale, "en-US");
    assert_eq!(updated.last_name, "");
    assert_eq!(updated.first_name, "Anna");
    let row = app
        .db
        .query_one(
            "SELECT email, phone, timezone, avatar_url FROM users WHERE id::text = $1",
            &[&created.id],
        )
        .await
        .unwrap();
    for i in 0..4 {
        assert_eq!(row.get::<_, String>(i), "");
    }
}

#[tokio::test]
async fn update_user_with_active_false_deactivates() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let updated = update(
        &mut app,
        &created.id,
        UserUpdate {
            active: Some(false),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(updated.active, Some(false));
    let active: bool = app
        .db
        .query_one(
            "SELECT active FROM users WHERE id::text = $1",
            &[&created.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!active);
}

/// What a write that changes nothing leaves as it was: the stored
/// `updated_at` and `updated_by`, and the number of the user's events.
pub async fn footprint(app: &TestApp, id: &str) -> (String, String, i64) {
    let row = app
        .db
        .query_one(
            "SELECT updated_at::text, updated_by, \
             (SELECT count(*) FROM user_events e WHERE e.user_id = u.id) \
             FROM users u WHERE id::text = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn update_user_that_changes_nothing_keeps_update_time_actor_and_change_feed() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let before = footprint(&app, &created.id).await;
    assert_eq!(before.2, 1, "the creation is one event");
    // Another key sends the writes: a user they do not change keeps its
    // actor too.
    let mut other = app.users_as(Some(&app.create_key(Role::Admin, None, None).await));
    let writes = [
        ("no user", None, String::new()),
        ("user: {}", Some(UserUpdate::default()), String::new()),
        (
            "every field as stored (locale before normalization)",
            Some(UserUpdate {
                first_name: Some("Anna".into()),
                last_name: Some("W".into()),
                phone: Some("+15550001234".into()),
                locale: Some("en-us".into()),
                timezone: Some("Asia/Bangkok".into()),
                email: Some(String::new()),
                avatar_url: Some(String::new()),
                is_opted_in: Some(false),
                active: Some(true),
                custom_data: Some(prost_types::Struct::default()),
            }),
            String::new(),
        ),
        (
            "user: {} with the current etag",
            Some(UserUpdate::default()),
            created.etag.clone(),
        ),
    ];
    for (case, changes, etag) in writes {
        let answered = other
            .update_user(UpdateUserRequest {
                id: created.id.clone(),
                user: changes,
                etag,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("{case}: {status:?}"))
            .into_inner()
            .user
            .unwrap();
        assert_eq!(answered, created, "{case}: the user as it is");
        assert_eq!(footprint(&app, &created.id).await, before, "{case}");
    }
    assert_eq!(get(&mut app, &created.id).await, created);
}

#[tokio::test]
async fn update_user_that_changes_nothing_still_checks_the_etag_and_the_user() {
    let mut app = spawn_app().await;
    let created = create(&mut app, user("checked", "")).await;
    let renamed = update(
        &mut app,
        &created.id,
        UserUpdate {
            first_name: Some("Renamed".into()),
            ..Default::default()
        },
    )
    .await;
    let before = footprint(&app, &created.id).await;
    let stale = app
        .users
        .update_user(UpdateUserRequest {
            id: created.id.clone(),
            user: Some(UserUpdate::default()),
            etag: created.etag.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let (reason, metadata) = error_info(&stale).expect("ErrorInfo");
    assert_eq!(reason, "ETAG_MISMATCH");
    assert_eq!(metadata.get("etag"), Some(&renamed.etag));
    assert_eq!(footprint(&app, &created.id).await, before);

    let unknown = app
        .users
        .update_user(UpdateUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    app.users
        .delete_user(DeleteUserRequest {
            id: created.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted = app
        .users
        .update_user(UpdateUserRequest {
            id: created.id.clone(),
            user: Some(UserUpdate {
                first_name: Some("Renamed".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(deleted.code(), Code::NotFound, "{deleted:?}");
}

#[tokio::test]
async fn update_user_with_active_false_on_an_inactive_user_changes_nothing() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let inactive = UserUpdate {
        active: Some(false),
        ..Default::default()
    };
    let deactivated = update(&mut app, &created.id, inactive.clone()).await;
    assert_eq!(deactivated.active, Some(false));
    assert!(micros(&deactivated.updated_at) > micros(&created.updated_at));
    let before = footprint(&app, &created.id).await;
    assert_eq!(before.2, 2, "the creation and the deactivation");

    let mut other = app.users_as(Some(&app.create_key(Role::Admin, None, None).await));
    let again = other
        .update_user(UpdateUserRequest {
            id: created.id.clone(),
            user: Some(inactive),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(again, deactivated);
    assert_eq!(footprint(&app, &created.id).await, before);
}

#[tokio::test]
async fn update_user_that_changes_one_field_of_several_sent_moves_update_time() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let editor = app.create_key(Role::Admin, None, None).await;
    let mut other = app.users_as(Some(&editor));
    let updated = other
        .update_user(UpdateUserRequest {
            id: created.id.clone(),
            user: Some(UserUpdate {
                first_name: Some("Anna".into()),
                last_name: Some("Walker".into()),
                active: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.last_name, "Walker");
    assert!(micros(&updated.updated_at) > micros(&created.updated_at));
    assert_ne!(updated.etag, created.etag);
    assert_ne!(
        updated.updated_by, created.updated_by,
        "the actor of the change"
    );
    let (_, actor, events) = footprint(&app, &created.id).await;
    assert_eq!(actor, format!("key:{}", editor.split('_').nth(1).unwrap()));
    assert_eq!(events, 2);
    let changed: Vec<String> = app
        .db
        .query_one(
            "SELECT changed FROM user_events WHERE user_id::text = $1 AND kind = 2",
            &[&created.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, ["last_name"]);
}

#[tokio::test]
async fn deactivate_and_reactivate_are_idempotent() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let id = created.id.clone();

    let first = deactivate(&mut app, &id).await;
    assert_eq!(first.active, Some(false));
    let second = deactivate(&mut app, &id).await;
    assert_eq!(second, first, "a second deactivation changes nothing");

    let back = reactivate(&mut app, &id).await;
    assert_eq!(back.active, Some(true));
    let again = reactivate(&mut app, &id).await;
    assert_eq!(again, back);
    let active: bool = app
        .db
        .query_one("SELECT active FROM users WHERE id::text = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(active);
}

#[tokio::test]
async fn duplicate_reference_or_email_in_a_tenant_is_already_exists() {
    let mut app = spawn_app().await;
    create(&mut app, user("ref-1", "Anna@Example.com")).await;

    let same_reference = app
        .users
        .create_user(CreateUserRequest {
            user: Some(user("ref-1", "other@example.com")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(same_reference.code(), Code::AlreadyExists);
    let (reason, metadata) = error_info(&same_reference).unwrap();
    assert_eq!(reason, "ALREADY_EXISTS");
    assert_eq!(metadata["field"], "reference");

    let same_email_other_case = app
        .users
        .create_user(CreateUserRequest {
            user: Some(user("ref-2", "anna@EXAMPLE.com")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(same_email_other_case.code(), Code::AlreadyExists);
    assert_eq!(
        error_info(&same_email_other_case).unwrap().1["field"],
        "email"
    );

    // Empty references and emails never clash.
    create(&mut app, user("", "")).await;
    create(&mut app, user("", "")).await;
    assert_eq!(app.user_count().await, 3);
}

#[tokio::test]
async fn update_user_to_a_taken_email_is_already_exists_and_changes_nothing() {
    let mut app = spawn_app().await;
    create(&mut app, user("a", "a@example.com")).await;
    let b = create(&mut app, user("b", "b@example.com")).await;
    let status = app
        .users
        .update_user(UpdateUserRequest {
            id: b.id.clone(),
            user: Some(UserUpdate {
                email: Some("A@example.com".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists);
    assert_eq!(error_info(&status).unwrap().1["field"], "email");
    let email: String = app
        .db
        .query_one("SELECT email FROM users WHERE id::text = $1", &[&b.id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, "b@example.com");
}

#[tokio::test]
async fn same_reference_and_email_in_another_tenant_is_fine() {
    let mut app = spawn_app().await;
    let other = crate::tenants::create_tenant(&mut app, "Other", "other").await;
    create(&mut app, user("ref", "same@example.com")).await;
    let in_other = create(
        &mut app,
        User {
            tenant_id: other.id.clone(),
            ..user("ref", "same@example.com")
        },
    )
    .await;
    assert_eq!(in_other.tenant_id, other.id);
    let count: i64 = app
        .db
        .query_one(
            "SELECT count(DISTINCT tenant_id) FROM users WHERE reference = 'ref'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn concurrent_creates_with_the_same_email_let_exactly_one_win() {
    let app = spawn_app().await;
    let attempts = (0..8).map(|i| {
        let mut client = app.users.clone();
        async move {
            client
                .create_user(CreateUserRequest {
                    user: Some(user(&format!("r{i}"), "race@example.com")),
                    ..Default::default()
                })
                .await
        }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    let clashed = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::AlreadyExists && error_info(s).unwrap().1["field"] == "email"))
        .count();
    assert_eq!((won, clashed), (1, 7), "{results:?}");
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test]
async fn create_user_in_an_unknown_tenant_is_invalid() {
    let mut app = spawn_app().await;
    for tenant_id in [uuid::Uuid::now_v7().to_string(), "nope".to_owned()] {
        let status = app
            .users
            .create_user(CreateUserRequest {
                user: Some(User {
                    tenant_id,
                    ..roq_user()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), ["user.tenant_id"]);
    }
    assert_eq!(app.user_count().await, 0);
}

fn micros(time: &Option<prost_types::Timestamp>) -> i64 {
    let time = time.as_ref().expect("a time");
    time.seconds * 1_000_000 + i64::from(time.nanos) / 1000
}

#[tokio::test]
async fn concurrent_updates_of_one_user_leave_updated_at_in_commit_order() {
    let mut app = spawn_app().await;
    for round in 0..5 {
        let created = create(&mut app, user(&format!("r{round}"), "")).await;
        let calls = (0..32).map(|i| {
            let mut users = app.users.clone();
            let id = created.id.clone();
            async move {
                users
                    .update_user(UpdateUserRequest {
                        id,
                        user: Some(UserUpdate {
                            first_name: Some(format!("n{i}")),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .expect("the update succeeds")
                    .into_inner()
                    .user
                    .unwrap()
            }
        });
        let acknowledged = futures::future::join_all(calls).await;
        let latest = acknowledged
            .iter()
            .max_by_key(|u| micros(&u.updated_at))
            .unwrap();
        let stored = get(&mut app, &created.id).await;
        // The last change committed is the one with the latest updatedAt.
        assert_eq!(
            (micros(&stored.updated_at), &stored.first_name),
            (micros(&latest.updated_at), &latest.first_name),
            "round {round}"
        );
        let mut times: Vec<i64> = acknowledged.iter().map(|u| micros(&u.updated_at)).collect();
        times.sort_unstable();
        times.dedup();
        assert_eq!(times.len(), 32, "every change has its own updatedAt");
        assert!(times[0] > micros(&created.updated_at));
    }
}

#[tokio::test]
async fn updated_at_moves_forward_with_every_change_even_when_the_clock_goes_back() {
    let mut app = spawn_app().await;
    let created = create(&mut app, user("behind", "")).await;
    let rename = |name: &str| UserUpdate {
        first_name: Some(name.into()),
        ..Default::default()
    };
    let first = update(&mut app, &created.id, rename("one")).await;
    // The next change is made by a clock a minute behind (another replica).
    app.clock.rewind(std::time::Duration::from_secs(60));
    let second = update(&mut app, &created.id, rename("two")).await;
    let third = deactivate(&mut app, &created.id).await;
    assert!(micros(&second.updated_at) > micros(&first.updated_at));
    assert!(micros(&third.updated_at) > micros(&second.updated_at));
    let stored = get(&mut app, &created.id).await;
    assert_eq!(stored.updated_at, third.updated_at);
    // BatchUpsertUsers follows the same rule.
    let upserted = app
        .users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: vec![User {
                reference: "behind".into(),
                first_name: "four".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let Some(Outcome::User(fourth)) = upserted[0].outcome.clone() else {
        panic!("{upserted:?}");
    };
    assert!(micros(&fourth.updated_at) > micros(&third.updated_at));
}

#[tokio::test]
async fn racing_deactivations_and_reactivations_each_return_the_state_they_set() {
    let mut app = spawn_app().await;
    let created = create(&mut app, user("racer", "")).await;
    for _ in 0..10 {
        let calls = (0..16).map(|i| {
            let mut users = app.users.clone();
            let id = created.id.clone();
            async move {
                let deactivate = i % 2 == 0;
                let user = if deactivate {
                    users
                        .deactivate_user(DeactivateUserRequest {
                            id,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .user
                } else {
                    users
                        .reactivate_user(ReactivateUserRequest {
                            id,
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner()
                        .user
                };
                (deactivate, user.unwrap().active)
            }
        });
        for (deactivate, active) in futures::future::join_all(calls).await {
            assert_eq!(active, Some(!deactivate));
        }
    }
}

#[tokio::test]
async fn a_write_whose_commit_fails_is_not_acknowledged() {
    let mut app = spawn_app().await;
    let kept = create(&mut app, user("kept", "kept@example.com")).await;
    // A check that Postgres runs at commit, after the statement has sent
    // its rows and CommandComplete.
    app.db
        .batch_execute(
            "CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.first_name = 'Doomed' THEN RAISE EXCEPTION 'refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_doomed AFTER INSERT OR UPDATE ON users \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_doomed();",
        )
        .await
        .unwrap();

    let created = app
        .users
        .create_user(CreateUserRequest {
            user: Some(User {
                first_name: "Doomed".into(),
                ..user("doomed", "doomed@example.com")
            }),
            ..Default::default()
        })
        .await;
    let status = created.expect_err("a create that did not commit was acknowledged");
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    let updated = app
        .users
        .update_user(UpdateUserRequest {
            id: kept.id.clone(),
            user: Some(UserUpdate {
                first_name: Some("Doomed".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await;
    let status = updated.expect_err("an update that did not commit was acknowledged");
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    let rows = app
        .db
        .query("SELECT reference, first_name FROM users", &[])
        .await
        .unwrap();
    let stored: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(stored, [("kept".to_owned(), kept.first_name)]);
}
