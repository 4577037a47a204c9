//! Safe writes (issue 12): etags, request ids, deletion, undeletion and
//! purge of users, erasure, who made the last change, and the purge the
//! service runs by itself.

use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prost::Message;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use users_service::{
    auth::Role,
    config::Config,
    pb::v1::{
        BatchUpsertUsersRequest, BatchUpsertUsersResult, CreateTenantRequest, CreateUserRequest,
        DeactivateUserRequest, DeleteUserRequest, ExportUsersRequest, GetUserRequest,
        ListUsersRequest, ListUsersResponse, PurgeUserRequest, ReactivateUserRequest, StringFilter,
        Tenant, UndeleteUserRequest, UpdateUserRequest, User, UserFilter, UserUpdate,
        batch_upsert_users_result::Outcome,
    },
};
use uuid::Uuid;

use crate::helpers::{
    JWT_AUDIENCE, JWT_ISSUER, TestApp, Users, drop_database, error_info, fixture, fresh_database,
    scratch_dir, server, spawn_app, spawn_with, test_config, violated_fields,
};

// ---------------------------------------------------------------------------
// Helpers, shared with tenant_deletion
// ---------------------------------------------------------------------------

/// A fresh request id.
pub fn request_id() -> String {
    Uuid::new_v4().to_string()
}

/// Starts a server on a fresh database with `adjust`ed test settings.
pub async fn spawn_configured(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let name = fresh_database().await;
    let mut config = test_config(Some(server().url(&name)));
    adjust(&mut config);
    let mut app = spawn_with(config).await;
    app.database = name;
    app
}

/// The id part of an API key token (`usk_<id>_<secret>`).
pub fn key_id(token: &str) -> &str {
    token.split('_').nth(1).expect("an API key token")
}

/// A valid end-user token of `user_id`, signed as the identity provider does.
pub fn user_token(user_id: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": user_id,
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "exp": now + 3600,
    });
    let pem = std::fs::read(fixture("jwt-rs256-private.pem")).expect("private key fixture");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA private key");
    encode(&Header::new(Algorithm::RS256), &claims, &key).expect("JWT signs")
}

/// Every `table.column` of the database whose value, in some row, contains
/// `needle`: every column of every table of the public schema, text,
/// JSON, arrays and other types as text, and bytea as bytes.
pub async fn places_holding(db: &tokio_postgres::Client, needle: &str) -> Vec<String> {
    use users_service::store::db::quote_identifier;
    let columns = db
        .query(
            "SELECT c.table_name::text, c.column_name::text, c.data_type::text \
             FROM information_schema.columns c \
             JOIN information_schema.tables t USING (table_schema, table_name) \
             WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' \
             AND c.data_type IN ('text', 'character varying', 'character', 'jsonb', 'json', \
                                 'bytea', 'ARRAY', 'USER-DEFINED') \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    assert!(
        columns.iter().any(|c| c.get::<_, String>(0) == "users"),
        "the catalog lists the users table"
    );
    let mut found = Vec::new();
    for column in columns {
        let (table, name, data_type): (String, String, String) =
            (column.get(0), column.get(1), column.get(2));
        let quoted = quote_identifier(&name);
        let condition = if data_type == "bytea" {
            format!("position(convert_to($1::text, 'UTF8') in {quoted}) > 0")
        } else {
            format!("position($1::text in {quoted}::text) > 0")
        };
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE {condition})",
            quote_identifier(&table)
        );
        if db
            .query_one(&sql, &[&needle])
            .await
            .unwrap()
            .get::<_, bool>(0)
        {
            found.push(format!("{table}.{name}"));
        }
    }
    found
}

/// The whole row of user `id` as JSON text; None when there is none.
pub async fn user_row(db: &tokio_postgres::Client, id: &str) -> Option<String> {
    db.query_opt(
        "SELECT to_jsonb(u)::text FROM users u WHERE u.id::text = $1",
        &[&id],
    )
    .await
    .unwrap()
    .map(|row| row.get(0))
}

/// Every row of `users`, as JSON text, in id order.
async fn all_user_rows(db: &tokio_postgres::Client) -> Vec<String> {
    db.query("SELECT to_jsonb(u)::text FROM users u ORDER BY u.id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Number of users with `reference`.
async fn users_with_reference(db: &tokio_postgres::Client, reference: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM users WHERE reference = $1",
        &[&reference],
    )
    .await
    .unwrap()
    .get(0)
}

/// Microseconds since the epoch.
pub fn micros(ts: &Option<prost_types::Timestamp>) -> i64 {
    let ts = ts.as_ref().expect("a timestamp");
    ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000
}

/// `updated_at` of user `id` in the database, in microseconds.
async fn stored_updated_at(db: &tokio_postgres::Client, id: &str) -> i64 {
    db.query_one(
        "SELECT (extract(epoch from updated_at) * 1000000)::bigint FROM users WHERE id::text = $1",
        &[&id],
    )
    .await
    .unwrap()
    .get(0)
}

/// A user unique to `tag`: its own reference and email, a first name.
fn person(tag: &str) -> User {
    User {
        reference: format!("ref-{tag}"),
        email: format!("{tag}@example.com"),
        first_name: "Ada".into(),
        ..Default::default()
    }
}

fn rename(first_name: &str) -> UserUpdate {
    UserUpdate {
        first_name: Some(first_name.into()),
        ..Default::default()
    }
}

pub async fn create(users: &mut Users, user: User, request_id: &str) -> Result<User, Status> {
    users
        .create_user(CreateUserRequest {
            user: Some(user),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

pub async fn get(users: &mut Users, id: &str, show_deleted: bool) -> Result<User, Status> {
    users
        .get_user(GetUserRequest {
            id: id.into(),
            show_deleted,
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn update(
    users: &mut Users,
    id: &str,
    changes: UserUpdate,
    etag: &str,
    request_id: &str,
) -> Result<User, Status> {
    users
        .update_user(UpdateUserRequest {
            id: id.into(),
            user: Some(changes),
            etag: etag.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn deactivate(
    users: &mut Users,
    id: &str,
    etag: &str,
    request_id: &str,
) -> Result<User, Status> {
    users
        .deactivate_user(DeactivateUserRequest {
            id: id.into(),
            etag: etag.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn reactivate(
    users: &mut Users,
    id: &str,
    etag: &str,
    request_id: &str,
) -> Result<User, Status> {
    users
        .reactivate_user(ReactivateUserRequest {
            id: id.into(),
            etag: etag.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn delete(users: &mut Users, id: &str, etag: &str, request_id: &str) -> Result<User, Status> {
    users
        .delete_user(DeleteUserRequest {
            id: id.into(),
            etag: etag.into(),
            request_id: request_id.into(),
            allow_missing: false,
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn undelete(
    users: &mut Users,
    id: &str,
    etag: &str,
    request_id: &str,
) -> Result<User, Status> {
    users
        .undelete_user(UndeleteUserRequest {
            id: id.into(),
            etag: etag.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().user.expect("a user"))
}

async fn purge(users: &mut Users, id: &str, request_id: &str) -> Result<String, Status> {
    users
        .purge_user(PurgeUserRequest {
            id: id.into(),
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().id)
}

async fn upsert(
    users: &mut Users,
    batch: Vec<User>,
    request_id: &str,
) -> Result<Vec<BatchUpsertUsersResult>, Status> {
    users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users: batch,
            request_id: request_id.into(),
        })
        .await
        .map(|r| r.into_inner().results)
}

async fn list(
    users: &mut Users,
    filter: Option<UserFilter>,
    show_deleted: bool,
) -> ListUsersResponse {
    users
        .list_users(ListUsersRequest {
            filter,
            show_deleted,
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("list succeeds")
        .into_inner()
}

async fn export(users: &mut Users, show_deleted: bool) -> Vec<User> {
    let mut stream = users
        .export_users(ExportUsersRequest {
            show_deleted,
            ..Default::default()
        })
        .await
        .expect("export starts")
        .into_inner();
    let mut exported = Vec::new();
    while let Some(chunk) = stream.message().await.expect("export streams") {
        exported.extend(chunk.users);
    }
    exported
}

fn eq(value: &str) -> StringFilter {
    StringFilter {
        equal_to: Some(value.into()),
        ..Default::default()
    }
}

fn by_id(id: &str) -> Option<UserFilter> {
    Some(UserFilter {
        id: Some(eq(id)),
        ..Default::default()
    })
}

fn ids(users: &[User]) -> HashSet<String> {
    users.iter().map(|u| u.id.clone()).collect()
}

/// The stored user of a batch item.
fn stored(result: &BatchUpsertUsersResult) -> &User {
    match &result.outcome {
        Some(Outcome::User(user)) => user,
        other => panic!("expected a stored user, got {other:?}"),
    }
}

/// Asserts `status` is an etag mismatch as the contract says; the current
/// etag it reports.
fn etag_mismatch(status: &Status) -> String {
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "ETAG_MISMATCH", "{status:?}");
    assert_eq!(info.domain, "users-service", "{status:?}");
    info.metadata
        .get("etag")
        .cloned()
        .expect("the current etag in the metadata")
}

/// The writes that take an etag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conditional {
    Update,
    Deactivate,
    Reactivate,
    Delete,
    Undelete,
}

const CONDITIONAL: [Conditional; 5] = [
    Conditional::Update,
    Conditional::Deactivate,
    Conditional::Reactivate,
    Conditional::Delete,
    Conditional::Undelete,
];

async fn write(users: &mut Users, op: Conditional, id: &str, etag: &str) -> Result<User, Status> {
    match op {
        Conditional::Update => update(users, id, rename("Written"), etag, "").await,
        Conditional::Deactivate => deactivate(users, id, etag, "").await,
        Conditional::Reactivate => reactivate(users, id, etag, "").await,
        Conditional::Delete => delete(users, id, etag, "").await,
        Conditional::Undelete => undelete(users, id, etag, "").await,
    }
}

/// A user on which `op` would change something, and an etag of it that is
/// no longer current.
async fn target_with_stale_etag(app: &mut TestApp, op: Conditional, tag: &str) -> (User, String) {
    let created = create(&mut app.users, person(tag), "").await.unwrap();
    let stale = created.etag.clone();
    let current = match op {
        Conditional::Update | Conditional::Deactivate | Conditional::Delete => {
            update(&mut app.users, &created.id, rename("Changed"), "", "")
                .await
                .unwrap()
        }
        Conditional::Reactivate => deactivate(&mut app.users, &created.id, "", "")
            .await
            .unwrap(),
        Conditional::Undelete => delete(&mut app.users, &created.id, "", "").await.unwrap(),
    };
    assert_ne!(current.etag, stale, "a change makes a new etag");
    (current, stale)
}

// ---------------------------------------------------------------------------
// Etags
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_call_that_returns_a_user_returns_its_etag_and_every_change_makes_a_new_one() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("etag"), "").await.unwrap();
    assert!(!created.etag.is_empty(), "CreateUser returns an etag");
    assert!(created.etag.len() <= 64);
    let mut etags = vec![created.etag.clone()];

    let got = get(&mut app.users, &created.id, false).await.unwrap();
    assert_eq!(got.etag, created.etag, "GetUser: same user, same etag");
    let listed = list(&mut app.users, by_id(&created.id), false).await;
    assert_eq!(listed.data[0].etag, created.etag, "ListUsers");
    let exported = export(&mut app.users, false).await;
    assert_eq!(exported[0].etag, created.etag, "ExportUsers");

    let updated = update(&mut app.users, &created.id, rename("Bea"), "", "")
        .await
        .unwrap();
    etags.push(updated.etag.clone());
    let deactivated = deactivate(&mut app.users, &created.id, "", "")
        .await
        .unwrap();
    etags.push(deactivated.etag.clone());

    // Deactivating an inactive user changes nothing, so neither does its etag.
    let again = deactivate(&mut app.users, &created.id, "", "")
        .await
        .unwrap();
    assert_eq!(again.etag, deactivated.etag, "a no-op keeps the etag");
    assert_eq!(again.updated_at, deactivated.updated_at);
    assert_eq!(
        stored_updated_at(&app.db, &created.id).await,
        micros(&deactivated.updated_at)
    );

    let reactivated = reactivate(&mut app.users, &created.id, "", "")
        .await
        .unwrap();
    etags.push(reactivated.etag.clone());
    let deleted = delete(&mut app.users, &created.id, "", "").await.unwrap();
    etags.push(deleted.etag.clone());
    let undeleted = undelete(&mut app.users, &created.id, "", "").await.unwrap();
    etags.push(undeleted.etag.clone());
    let results = upsert(
        &mut app.users,
        vec![
            User {
                first_name: "Upserted".into(),
                ..person("etag")
            },
            person("etag-new"),
        ],
        "",
    )
    .await
    .unwrap();
    let upserted = stored(&results[0]);
    assert_eq!(upserted.id, created.id);
    etags.push(upserted.etag.clone());
    assert!(!stored(&results[1]).etag.is_empty(), "a created item too");
    assert_eq!(
        get(&mut app.users, &created.id, false).await.unwrap().etag,
        upserted.etag,
        "GetUser returns the etag of the last change"
    );

    for etag in &etags {
        assert!(!etag.is_empty() && etag.len() <= 64, "{etag:?}");
    }
    let distinct: HashSet<&String> = etags.iter().collect();
    assert_eq!(distinct.len(), etags.len(), "every change: {etags:?}");
}

#[tokio::test]
async fn a_write_with_a_stale_etag_is_aborted_with_the_current_etag_and_changes_nothing() {
    let mut app = spawn_app().await;
    for op in CONDITIONAL {
        let (target, stale) = target_with_stale_etag(&mut app, op, &format!("stale-{op:?}")).await;
        let before = user_row(&app.db, &target.id).await;

        let status = write(&mut app.users, op, &target.id, &stale)
            .await
            .expect_err("a stale etag is refused");
        let reported = etag_mismatch(&status);
        let current = get(&mut app.users, &target.id, true).await.unwrap();
        assert_eq!(reported, current.etag, "{op:?} reports the current etag");
        assert_eq!(current.etag, target.etag, "{op:?} changed the user");
        assert_eq!(
            user_row(&app.db, &target.id).await,
            before,
            "{op:?} changed the database"
        );

        // The reported etag is the one to send next.
        write(&mut app.users, op, &target.id, &reported)
            .await
            .unwrap_or_else(|s| panic!("{op:?} with the current etag: {s:?}"));
        assert_ne!(user_row(&app.db, &target.id).await, before, "{op:?} wrote");
    }
}

#[tokio::test]
async fn a_malformed_etag_is_an_invalid_argument_on_field_etag() {
    let mut app = spawn_app().await;
    let too_long = "a".repeat(65);
    for op in CONDITIONAL {
        let (target, _) = target_with_stale_etag(&mut app, op, &format!("bad-{op:?}")).await;
        let before = user_row(&app.db, &target.id).await;
        for etag in ["nonsense", too_long.as_str()] {
            let status = write(&mut app.users, op, &target.id, etag)
                .await
                .expect_err("a malformed etag is refused");
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{op:?} {etag}: {status:?}"
            );
            assert_eq!(violated_fields(&status), ["etag"], "{op:?} {etag}");
        }
        assert_eq!(user_row(&app.db, &target.id).await, before, "{op:?}");
    }
}

#[tokio::test]
async fn a_write_without_an_etag_is_unconditional_and_one_with_the_current_etag_succeeds() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("unconditional"), "")
        .await
        .unwrap();
    update(&mut app.users, &created.id, rename("Other"), "", "")
        .await
        .unwrap();
    let blind = update(&mut app.users, &created.id, rename("Blind"), "", "")
        .await
        .expect("no etag: unconditional");
    let checked = update(
        &mut app.users,
        &created.id,
        rename("Checked"),
        &blind.etag,
        "",
    )
    .await
    .expect("the current etag: written");
    assert_eq!(checked.first_name, "Checked");
    assert_ne!(checked.etag, blind.etag);
    let stored: String = app
        .db
        .query_one("SELECT first_name FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "Checked");
}

#[tokio::test]
async fn of_32_concurrent_updates_with_the_same_etag_exactly_one_succeeds() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("race"), "").await.unwrap();
    let calls: Vec<_> = (0..32)
        .map(|i| {
            let mut users = app.users.clone();
            let (id, etag) = (created.id.clone(), created.etag.clone());
            tokio::spawn(async move {
                update(&mut users, &id, rename(&format!("Racer {i}")), &etag, "").await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers = Vec::new();
    for call in calls {
        match call.await.unwrap() {
            Ok(user) => winners.push(user),
            Err(status) => losers.push(status),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one wins; refused: {losers:?}");
    assert_eq!(losers.len(), 31);
    let winner = &winners[0];
    for status in &losers {
        assert_eq!(etag_mismatch(status), winner.etag, "the winner's etag");
    }
    let stored: String = app
        .db
        .query_one("SELECT first_name FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, winner.first_name);
    let current = get(&mut app.users, &created.id, false).await.unwrap();
    assert_eq!(current.etag, winner.etag);
    assert_eq!(current.first_name, winner.first_name);
}

// ---------------------------------------------------------------------------
// Request ids
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_request_id_that_is_not_a_uuid_is_an_invalid_argument() {
    let mut app = spawn_app().await;
    let existing = create(&mut app.users, person("existing"), "")
        .await
        .unwrap();
    let before = all_user_rows(&app.db).await;
    let long = "a".repeat(200);
    for bad in ["not-a-uuid", "1234", long.as_str()] {
        let statuses = [
            create(&mut app.users, person("new"), bad)
                .await
                .unwrap_err(),
            update(&mut app.users, &existing.id, rename("X"), "", bad)
                .await
                .unwrap_err(),
            deactivate(&mut app.users, &existing.id, "", bad)
                .await
                .unwrap_err(),
            delete(&mut app.users, &existing.id, "", bad)
                .await
                .unwrap_err(),
            upsert(&mut app.users, vec![person("batch")], bad)
                .await
                .unwrap_err(),
            app.tenants
                .create_tenant(CreateTenantRequest {
                    tenant: Some(Tenant {
                        name: "Bad id".into(),
                        ..Default::default()
                    }),
                    request_id: bad.into(),
                })
                .await
                .unwrap_err(),
        ];
        for status in statuses {
            assert_eq!(status.code(), Code::InvalidArgument, "{bad}: {status:?}");
            assert_eq!(violated_fields(&status), ["request_id"], "{bad}");
        }
    }
    assert_eq!(all_user_rows(&app.db).await, before, "nothing written");
    let tenants: i64 = app
        .db
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tenants, 1, "only the default tenant");
}

#[tokio::test]
async fn a_create_user_retried_with_its_request_id_returns_the_first_user_and_stores_one() {
    let mut app = spawn_app().await;
    // Without a reference a retry would make a second user; with one it
    // would be ALREADY_EXISTS. Both get the first response instead.
    for (case, user) in [
        (
            "no reference",
            User {
                first_name: "Nameless".into(),
                ..Default::default()
            },
        ),
        ("reference and email", person("retried")),
    ] {
        let id = request_id();
        let first = create(&mut app.users, user.clone(), &id).await.unwrap();
        let retried = create(&mut app.users, user.clone(), &id)
            .await
            .unwrap_or_else(|s| panic!("{case}: {s:?}"));
        assert_eq!(retried, first, "{case}: the first response");
        let rows: i64 = app
            .db
            .query_one(
                "SELECT count(*) FROM users WHERE first_name = $1",
                &[&user.first_name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 1, "{case}: one user stored");
    }
    assert_eq!(app.user_count().await, 2);
}

#[tokio::test]
async fn an_update_user_retried_with_its_request_id_has_no_second_effect() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("update-retry"), "")
        .await
        .unwrap();
    let id = request_id();
    let first = update(&mut app.users, &created.id, rename("First"), "", &id)
        .await
        .unwrap();
    let replay = update(&mut app.users, &created.id, rename("First"), "", &id)
        .await
        .unwrap();
    assert_eq!(
        replay, first,
        "the first response, same etag and updated_at"
    );
    assert_eq!(
        stored_updated_at(&app.db, &created.id).await,
        micros(&first.updated_at),
        "the replay did not touch the row"
    );
    assert_eq!(
        get(&mut app.users, &created.id, false).await.unwrap().etag,
        first.etag
    );

    // Someone else changes the name; a late retry must not undo that.
    let second = update(&mut app.users, &created.id, rename("Second"), "", "")
        .await
        .unwrap();
    let late = update(&mut app.users, &created.id, rename("First"), "", &id)
        .await
        .unwrap();
    assert_eq!(late, first, "still the first response");
    let row = app
        .db
        .query_one(
            "SELECT first_name, (extract(epoch from updated_at) * 1000000)::bigint FROM users",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Second");
    assert_eq!(row.get::<_, i64>(1), micros(&second.updated_at));
    assert_eq!(
        get(&mut app.users, &created.id, false).await.unwrap().etag,
        second.etag
    );
}

#[tokio::test]
async fn a_deactivate_retried_with_its_request_id_has_no_second_effect() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("deactivate-retry"), "")
        .await
        .unwrap();
    let id = request_id();
    let first = deactivate(&mut app.users, &created.id, "", &id)
        .await
        .unwrap();
    assert_eq!(first.active, Some(false));
    reactivate(&mut app.users, &created.id, "", "")
        .await
        .unwrap();
    let replay = deactivate(&mut app.users, &created.id, "", &id)
        .await
        .unwrap();
    assert_eq!(replay, first, "the first response");
    let active: bool = app
        .db
        .query_one("SELECT active FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(active, "the user stays reactivated");
    assert_eq!(
        get(&mut app.users, &created.id, false)
            .await
            .unwrap()
            .active,
        Some(true)
    );
}

#[tokio::test]
async fn a_delete_retried_with_its_request_id_has_no_second_effect() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("delete-retry"), "")
        .await
        .unwrap();
    let id = request_id();
    let first = delete(&mut app.users, &created.id, "", &id).await.unwrap();
    let deleted_row = user_row(&app.db, &created.id).await;
    let replay = delete(&mut app.users, &created.id, "", &id)
        .await
        .expect("a replay, not NOT_FOUND");
    assert_eq!(replay, first);
    assert_eq!(user_row(&app.db, &created.id).await, deleted_row);

    let restored = undelete(&mut app.users, &created.id, "", "").await.unwrap();
    let late = delete(&mut app.users, &created.id, "", &id).await.unwrap();
    assert_eq!(late, first, "still the first response");
    let current = get(&mut app.users, &created.id, false)
        .await
        .expect("the user stays undeleted");
    assert_eq!(current.etag, restored.etag);
}

#[tokio::test]
async fn a_batch_upsert_retried_with_its_request_id_has_no_second_effect() {
    let mut app = spawn_app().await;
    let batch = vec![person("batch-a"), person("batch-b")];
    let id = request_id();
    let first = upsert(&mut app.users, batch.clone(), &id).await.unwrap();
    assert!(first.iter().all(|r| r.created));
    let stored_rows = all_user_rows(&app.db).await;
    let replay = upsert(&mut app.users, batch.clone(), &id).await.unwrap();
    assert_eq!(
        replay, first,
        "the first response: created, same ids and etags"
    );
    assert_eq!(all_user_rows(&app.db).await, stored_rows);

    // A change made since is not overwritten by a late retry.
    update(
        &mut app.users,
        &stored(&first[0]).id,
        rename("Changed"),
        "",
        "",
    )
    .await
    .unwrap();
    let changed_rows = all_user_rows(&app.db).await;
    let late = upsert(&mut app.users, batch, &id).await.unwrap();
    assert_eq!(late, first);
    assert_eq!(all_user_rows(&app.db).await, changed_rows);
}

#[tokio::test]
async fn a_create_tenant_retried_with_its_request_id_creates_one_tenant() {
    let mut app = spawn_app().await;
    let request = CreateTenantRequest {
        tenant: Some(Tenant {
            name: "Retried Inc".into(),
            ..Default::default()
        }),
        request_id: request_id(),
    };
    let first = app
        .tenants
        .create_tenant(request.clone())
        .await
        .unwrap()
        .into_inner();
    let replay = app
        .tenants
        .create_tenant(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, first);
    let rows: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM tenants WHERE name = 'Retried Inc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_request_id_reused_for_a_different_request_is_refused() {
    let mut app = spawn_app().await;
    let id = request_id();
    let first = create(&mut app.users, person("reused-a"), &id)
        .await
        .unwrap();
    let status = create(&mut app.users, person("reused-b"), &id)
        .await
        .expect_err("another request under the same id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        error_info(&status).map(|(reason, _)| reason).as_deref(),
        Some("REQUEST_ID_REUSED")
    );

    let update_id = request_id();
    update(&mut app.users, &first.id, rename("One"), "", &update_id)
        .await
        .unwrap();
    let status = update(&mut app.users, &first.id, rename("Two"), "", &update_id)
        .await
        .expect_err("another update under the same id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(
        error_info(&status).map(|(reason, _)| reason).as_deref(),
        Some("REQUEST_ID_REUSED")
    );

    let rows = app
        .db
        .query("SELECT reference, first_name FROM users", &[])
        .await
        .unwrap();
    let rows: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rows, [("ref-reused-a".to_owned(), "One".to_owned())]);
}

#[tokio::test]
async fn request_ids_belong_to_their_caller() {
    let mut app = spawn_app().await;
    let other_key = app.create_key(Role::Admin, None, None).await;
    let mut other = app.users_as(Some(&other_key));
    let id = request_id();
    let nameless = User {
        first_name: "Same".into(),
        ..Default::default()
    };
    let mine = create(&mut app.users, nameless.clone(), &id).await.unwrap();
    let theirs = create(&mut other, nameless.clone(), &id)
        .await
        .expect("another caller's request");
    assert_ne!(theirs.id, mine.id, "another caller's id is its own");
    assert_eq!(app.user_count().await, 2);
    // Each still gets its own replay.
    assert_eq!(
        create(&mut other, nameless.clone(), &id).await.unwrap(),
        theirs
    );
    assert_eq!(create(&mut app.users, nameless, &id).await.unwrap(), mine);
    assert_eq!(app.user_count().await, 2);
}

#[tokio::test]
async fn a_failed_first_request_is_not_replayed_and_its_request_id_may_be_retried() {
    let mut app = spawn_app().await;
    let holder = create(&mut app.users, person("holder"), "").await.unwrap();
    let id = request_id();
    let newcomer = User {
        email: holder.email.clone(),
        ..person("newcomer")
    };
    let status = create(&mut app.users, newcomer.clone(), &id)
        .await
        .expect_err("the email is taken");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    update(
        &mut app.users,
        &holder.id,
        UserUpdate {
            email: Some("moved@example.com".into()),
            ..Default::default()
        },
        "",
        "",
    )
    .await
    .unwrap();
    let created = create(&mut app.users, newcomer.clone(), &id)
        .await
        .expect("the retry runs now");
    assert_eq!(created.email, holder.email);
    assert_eq!(
        create(&mut app.users, newcomer, &id).await.unwrap(),
        created
    );
    assert_eq!(users_with_reference(&app.db, "ref-newcomer").await, 1);

    // An invalid first request is not stored either: the id is still free.
    let id = request_id();
    let status = create(
        &mut app.users,
        User {
            email: "not an email".into(),
            ..person("fixed")
        },
        &id,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fixed = create(&mut app.users, person("fixed"), &id)
        .await
        .expect("not REQUEST_ID_REUSED: the failure was not kept");
    assert_eq!(fixed.email, "fixed@example.com");
    assert_eq!(app.user_count().await, 3);
}

#[tokio::test]
async fn concurrent_retries_with_one_request_id_create_one_user() {
    let app = spawn_app().await;
    let id = request_id();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut users = app.users.clone();
            let id = id.clone();
            tokio::spawn(async move { create(&mut users, person("concurrent"), &id).await })
        })
        .collect();
    let mut created = Vec::new();
    for call in calls {
        created.push(call.await.unwrap().expect("every retry succeeds"));
    }
    assert!(
        created.iter().all(|u| *u == created[0]),
        "one response for all: {created:?}"
    );
    assert_eq!(app.user_count().await, 1);
}

/// A database on the tests' server, dropped at the end of the test.
struct OwnedDatabase(String);

impl Drop for OwnedDatabase {
    fn drop(&mut self) {
        drop_database(&self.0);
    }
}

#[tokio::test]
async fn a_create_user_retried_across_a_sigkill_and_restart_stores_one_user() {
    use crate::process::{Database, ServiceProcess, Start};
    let database = OwnedDatabase(fresh_database().await);
    let start = Start {
        database: Database::Named(database.0.clone()),
        data_dir: Some(scratch_dir("request-id-restart")),
        ..Default::default()
    };
    let mut first = ServiceProcess::start(start.clone()).await;
    let mut users = first.users().await;

    // Answered just before the kill (and as good as lost to the caller).
    let answered_id = request_id();
    let answered = create(&mut users, person("answered"), &answered_id)
        .await
        .unwrap();
    // Under way when the service dies.
    let in_flight_id = request_id();
    let in_flight = {
        let mut users = users.clone();
        let id = in_flight_id.clone();
        tokio::spawn(async move { create(&mut users, person("in-flight"), &id).await })
    };
    tokio::time::sleep(Duration::from_millis(3)).await;
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("killed");
    let _ = in_flight.await.unwrap();

    let second = ServiceProcess::start(start).await;
    assert_eq!(second.admin_token, first.admin_token, "the same caller");
    let mut users = second.users().await;
    let replayed = tokio::time::timeout(
        Duration::from_secs(10),
        create(&mut users, person("answered"), &answered_id),
    )
    .await
    .expect("the retry does not wait forever")
    .expect("the retry succeeds");
    assert_eq!(replayed, answered, "the first response, same id and etag");
    let retried = tokio::time::timeout(
        Duration::from_secs(10),
        create(&mut users, person("in-flight"), &in_flight_id),
    )
    .await
    .expect("the retry does not wait for a dead request forever")
    .expect("the retry succeeds");
    assert_eq!(
        create(&mut users, person("in-flight"), &in_flight_id)
            .await
            .unwrap(),
        retried
    );

    let (db, connection) = server()
        .config(&database.0)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    for (reference, id) in [
        ("ref-answered", &answered.id),
        ("ref-in-flight", &retried.id),
    ] {
        let rows = db
            .query(
                "SELECT id::text FROM users WHERE reference = $1",
                &[&reference],
            )
            .await
            .unwrap();
        let rows: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            rows,
            std::slice::from_ref(id),
            "{reference}: exactly one user"
        );
    }
}

#[tokio::test]
async fn a_replay_after_the_user_was_purged_is_not_found_and_recreates_nobody() {
    let mut app = spawn_app().await;
    let tag = format!("replayed-{}", Uuid::new_v4().simple());
    let user = person(&tag);
    let id = request_id();
    let created = create(&mut app.users, user.clone(), &id).await.unwrap();
    delete(&mut app.users, &created.id, "", "").await.unwrap();
    purge(&mut app.users, &created.id, "").await.unwrap();

    let status = create(&mut app.users, user.clone(), &id)
        .await
        .expect_err("the person is not created again");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(app.user_count().await, 0);
    for needle in [&user.email, &user.reference] {
        assert_eq!(
            places_holding(&app.db, needle).await,
            Vec::<String>::new(),
            "{needle} is kept somewhere"
        );
    }
}

#[tokio::test]
async fn a_request_id_is_forgotten_after_its_retention() {
    let mut app = spawn_configured(|config| {
        config.request_id_retention = Duration::from_secs(3600);
        config.purge_interval = Duration::from_millis(100);
    })
    .await;
    let nameless = User {
        first_name: "Twice".into(),
        ..Default::default()
    };
    let id = request_id();
    let first = create(&mut app.users, nameless.clone(), &id).await.unwrap();

    app.clock.advance(Duration::from_secs(1800));
    assert_eq!(
        create(&mut app.users, nameless.clone(), &id).await.unwrap(),
        first,
        "within the retention: replayed"
    );
    assert_eq!(app.user_count().await, 1);

    app.clock.advance(Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let user = create(&mut app.users, nameless.clone(), &id).await.unwrap();
        if user.id != first.id || Instant::now() > deadline {
            break user;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(second.id, first.id, "past the retention: runs again");
    assert_eq!(app.user_count().await, 2);
}

// ---------------------------------------------------------------------------
// Deletion and undeletion
// ---------------------------------------------------------------------------

#[tokio::test]
async fn delete_user_returns_it_with_a_delete_time_and_an_expire_time_30_days_later() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("deleted"), "").await.unwrap();
    assert_eq!(created.delete_time, None);
    assert_eq!(created.expire_time, None);
    let deleted = delete(&mut app.users, &created.id, "", "").await.unwrap();
    assert_eq!(deleted.id, created.id);
    assert_eq!(deleted.email, created.email);
    assert_ne!(deleted.etag, created.etag);
    let retention = micros(&deleted.expire_time) - micros(&deleted.delete_time);
    assert_eq!(
        retention,
        30 * 24 * 3600 * 1_000_000,
        "the default retention"
    );
    assert!(micros(&deleted.delete_time) >= micros(&created.created_at));
    assert!(
        user_row(&app.db, &created.id).await.is_some(),
        "kept until purged"
    );
    assert_eq!(
        get(&mut app.users, &created.id, true).await.unwrap(),
        deleted
    );
}

#[tokio::test]
async fn the_expire_time_follows_the_configured_delete_retention() {
    let mut app = spawn_configured(|config| {
        config.delete_retention = Duration::from_secs(2 * 3600);
    })
    .await;
    let created = create(&mut app.users, person("retained"), "")
        .await
        .unwrap();
    let deleted = delete(&mut app.users, &created.id, "", "").await.unwrap();
    assert_eq!(
        micros(&deleted.expire_time) - micros(&deleted.delete_time),
        2 * 3600 * 1_000_000
    );
}

#[tokio::test]
async fn a_deleted_user_is_left_out_of_get_list_and_export_unless_show_deleted() {
    let mut app = spawn_app().await;
    let gone = create(&mut app.users, person("gone"), "").await.unwrap();
    let kept = create(&mut app.users, person("kept"), "").await.unwrap();
    let deleted = delete(&mut app.users, &gone.id, "", "").await.unwrap();

    let status = get(&mut app.users, &gone.id, false).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let shown = get(&mut app.users, &gone.id, true).await.unwrap();
    assert_eq!(shown, deleted);
    assert!(shown.delete_time.is_some());
    assert_eq!(get(&mut app.users, &kept.id, true).await.unwrap(), kept);

    let page = list(&mut app.users, None, false).await;
    assert_eq!(ids(&page.data), ids(std::slice::from_ref(&kept)));
    assert_eq!(page.total_count, Some(1), "the total leaves it out too");
    let page = list(&mut app.users, None, true).await;
    assert_eq!(ids(&page.data), ids(&[kept.clone(), gone.clone()]));
    assert_eq!(page.total_count, Some(2));
    let listed = page.data.iter().find(|u| u.id == gone.id).unwrap();
    assert_eq!(listed.delete_time, deleted.delete_time);

    assert_eq!(
        ids(&export(&mut app.users, false).await),
        ids(std::slice::from_ref(&kept))
    );
    assert_eq!(ids(&export(&mut app.users, true).await), ids(&[kept, gone]));
}

#[tokio::test]
async fn a_deleted_user_cannot_be_updated_or_deactivated() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("frozen"), "").await.unwrap();
    delete(&mut app.users, &created.id, "", "").await.unwrap();
    let before = user_row(&app.db, &created.id).await;
    for status in [
        update(&mut app.users, &created.id, rename("Thawed"), "", "")
            .await
            .unwrap_err(),
        deactivate(&mut app.users, &created.id, "", "")
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    assert_eq!(user_row(&app.db, &created.id).await, before);
}

#[tokio::test]
async fn a_deleted_users_email_and_reference_stay_reserved() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("reserved"), "")
        .await
        .unwrap();
    delete(&mut app.users, &created.id, "", "").await.unwrap();

    for (case, user) in [
        (
            "email",
            User {
                reference: "ref-other".into(),
                ..person("reserved")
            },
        ),
        (
            "reference",
            User {
                email: "other@example.com".into(),
                ..person("reserved")
            },
        ),
    ] {
        let status = create(&mut app.users, user, "").await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{case}: {status:?}");
    }

    let results = upsert(
        &mut app.users,
        vec![
            User {
                email: String::new(),
                first_name: "Revived".into(),
                ..person("reserved")
            },
            person("fresh"),
        ],
        "",
    )
    .await
    .unwrap();
    let Some(Outcome::Error(status)) = &results[0].outcome else {
        panic!("the deleted user's reference is refused: {:?}", results[0]);
    };
    assert_eq!(Code::from(status.code), Code::AlreadyExists, "{status:?}");
    let reasons: Vec<String> = status
        .details
        .iter()
        .filter(|any| any.type_url.ends_with("google.rpc.ErrorInfo"))
        .map(|any| {
            tonic_types::pb::ErrorInfo::decode(any.value.as_slice())
                .unwrap()
                .reason
        })
        .collect();
    assert_eq!(reasons, ["USER_DELETED"]);
    assert!(results[1].created, "the other item is stored");

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
        [
            ("ref-fresh".to_owned(), "Ada".to_owned()),
            ("ref-reserved".to_owned(), "Ada".to_owned())
        ]
    );
}

#[tokio::test]
async fn deleting_a_deleted_or_unknown_user_is_not_found_unless_allow_missing() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("twice"), "").await.unwrap();
    let deleted = delete(&mut app.users, &created.id, "", "").await.unwrap();
    let row = user_row(&app.db, &created.id).await;

    let status = delete(&mut app.users, &created.id, "", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let unknown = Uuid::now_v7().to_string();
    let status = delete(&mut app.users, &unknown, "", "").await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let allow_missing = |id: &str| DeleteUserRequest {
        id: id.into(),
        allow_missing: true,
        ..Default::default()
    };
    let again = app
        .users
        .delete_user(allow_missing(&created.id))
        .await
        .expect("allow_missing: OK")
        .into_inner();
    assert_eq!(again.user, Some(deleted), "the deleted user, unchanged");
    let missing = app
        .users
        .delete_user(allow_missing(&unknown))
        .await
        .expect("allow_missing on an unknown id: OK")
        .into_inner();
    assert_eq!(missing.user, None);
    assert_eq!(user_row(&app.db, &created.id).await, row);
    assert_eq!(app.user_count().await, 1);
}

#[tokio::test]
async fn undelete_restores_a_deleted_user_and_is_not_found_for_a_live_one() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("restored"), "")
        .await
        .unwrap();
    let deleted = delete(&mut app.users, &created.id, "", "").await.unwrap();
    let restored = undelete(&mut app.users, &created.id, "", "").await.unwrap();
    assert_eq!(restored.delete_time, None);
    assert_eq!(restored.expire_time, None);
    assert_ne!(restored.etag, deleted.etag);
    assert_eq!(restored.email, created.email);
    assert_eq!(
        get(&mut app.users, &created.id, false).await.unwrap(),
        restored
    );
    let page = list(&mut app.users, None, false).await;
    assert_eq!(ids(&page.data), ids(std::slice::from_ref(&created)));
    assert_eq!(page.total_count, Some(1));

    let row = user_row(&app.db, &created.id).await;
    let status = undelete(&mut app.users, &created.id, "", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(user_row(&app.db, &created.id).await, row);
}

#[tokio::test]
async fn undelete_after_the_expire_time_is_not_found() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("expired"), "").await.unwrap();
    delete(&mut app.users, &created.id, "", "").await.unwrap();
    app.clock.advance(Duration::from_secs(30 * 24 * 3600 + 60));
    let status = undelete(&mut app.users, &created.id, "", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = get(&mut app.users, &created.id, false).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
}

#[tokio::test]
async fn purge_erases_only_a_deleted_user_and_frees_its_email_and_reference() {
    let mut app = spawn_app().await;
    let created = create(&mut app.users, person("purged"), "").await.unwrap();
    let status = purge(&mut app.users, &created.id, "").await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        get(&mut app.users, &created.id, false).await.unwrap(),
        created,
        "a live user is not purged"
    );

    delete(&mut app.users, &created.id, "", "").await.unwrap();
    let purged = purge(&mut app.users, &created.id, "").await.unwrap();
    assert_eq!(purged, created.id);
    let status = get(&mut app.users, &created.id, true).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        user_row(&app.db, &created.id).await,
        None,
        "the row is gone"
    );
    let status = undelete(&mut app.users, &created.id, "", "")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    let again = create(&mut app.users, person("purged"), "")
        .await
        .expect("the email and reference are free again");
    assert_ne!(again.id, created.id);
    assert_eq!(users_with_reference(&app.db, "ref-purged").await, 1);
}

#[tokio::test]
async fn only_editors_of_the_users_tenant_and_admins_may_delete_undelete_and_purge() {
    let mut app = spawn_app().await;
    let tenant = |name: &'static str| {
        let mut tenants = app.tenants.clone();
        async move {
            tenants
                .create_tenant(CreateTenantRequest {
                    tenant: Some(Tenant {
                        name: name.into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .tenant
                .unwrap()
                .id
        }
    };
    let tenant_a = tenant("A").await;
    let tenant_b = tenant("B").await;
    let uuid_a = Uuid::parse_str(&tenant_a).unwrap();
    let uuid_b = Uuid::parse_str(&tenant_b).unwrap();
    let editor_a = app.create_key(Role::Editor, Some(uuid_a), None).await;
    let viewer_a = app.create_key(Role::Viewer, Some(uuid_a), None).await;
    let editor_b = app.create_key(Role::Editor, Some(uuid_b), None).await;
    let in_a = |tag: &str| User {
        tenant_id: tenant_a.clone(),
        ..person(tag)
    };
    let bystander = create(&mut app.users, in_a("bystander"), "").await.unwrap();
    let bystander_token = user_token(&bystander.id);

    for (allowed, tag) in [
        (editor_a.clone(), "by-editor"),
        (app.admin_token.clone(), "by-admin"),
    ] {
        let target = create(&mut app.users, in_a(tag), "").await.unwrap();
        let own_token = user_token(&target.id);
        let mut allowed = app.users_as(Some(&allowed));
        // (caller, expected code); the target's own token only while it is live.
        let refused = |live: bool| {
            let mut callers = vec![
                (
                    "viewer of the tenant",
                    viewer_a.clone(),
                    Code::PermissionDenied,
                ),
                (
                    "another end user",
                    bystander_token.clone(),
                    Code::PermissionDenied,
                ),
                ("editor of another tenant", editor_b.clone(), Code::NotFound),
            ];
            if live {
                callers.push(("the user itself", own_token.clone(), Code::PermissionDenied));
            }
            callers
        };

        for (step, live) in [
            ("delete", true),
            ("undelete", false),
            ("delete again", true),
            ("purge", false),
        ] {
            let before = user_row(&app.db, &target.id).await;
            for (caller, token, code) in refused(live) {
                let mut users = app.users_as(Some(&token));
                let status = match step {
                    "delete" | "delete again" => {
                        delete(&mut users, &target.id, "", "").await.map(drop)
                    }
                    "undelete" => undelete(&mut users, &target.id, "", "").await.map(drop),
                    _ => purge(&mut users, &target.id, "").await.map(drop),
                }
                .expect_err("refused");
                assert_eq!(status.code(), code, "{tag} {step} by {caller}: {status:?}");
                assert_eq!(
                    user_row(&app.db, &target.id).await,
                    before,
                    "{step} by {caller}"
                );
            }
            match step {
                "delete" | "delete again" => {
                    delete(&mut allowed, &target.id, "", "").await.map(drop)
                }
                "undelete" => undelete(&mut allowed, &target.id, "", "").await.map(drop),
                _ => purge(&mut allowed, &target.id, "").await.map(drop),
            }
            .unwrap_or_else(|s| panic!("{tag}: {step}: {s:?}"));
        }
        assert_eq!(user_row(&app.db, &target.id).await, None, "{tag}: purged");
    }
    assert!(user_row(&app.db, &bystander.id).await.is_some());
}

// ---------------------------------------------------------------------------
// Erasure
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_purged_user_leaves_nothing_that_identifies_them_anywhere_in_the_database() {
    let mut app = spawn_app().await;
    let unique = Uuid::new_v4().simple().to_string();
    let email = format!("erase-{unique}@example.com");
    let reference = format!("erase-ref-{unique}");
    let person = User {
        reference: reference.clone(),
        email: email.clone(),
        phone: Some("+15550001234".into()),
        first_name: "Erika".into(),
        last_name: "Mustermann".into(),
        custom_data: Some(prost_types::Struct {
            fields: [(
                "contact".to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(email.clone())),
                },
            )]
            .into(),
        }),
        ..Default::default()
    };
    // Someone else, who stays.
    let other = create(&mut app.users, crate::users::roq_user(), "")
        .await
        .unwrap();
    // Stored responses of idempotent requests about the person, each
    // holding their data.
    let created = create(&mut app.users, person.clone(), &request_id())
        .await
        .unwrap();
    upsert(&mut app.users, vec![person], &request_id())
        .await
        .unwrap();
    update(
        &mut app.users,
        &created.id,
        rename("Erika Maria"),
        "",
        &request_id(),
    )
    .await
    .unwrap();
    deactivate(&mut app.users, &created.id, "", &request_id())
        .await
        .unwrap();
    delete(&mut app.users, &created.id, "", &request_id())
        .await
        .unwrap();

    // The search finds them while they are there.
    for needle in [&email, &reference] {
        let places = places_holding(&app.db, needle).await;
        assert!(
            places.contains(&"users.email".to_owned())
                || places.contains(&"users.reference".to_owned()),
            "before the purge, {needle} is in users: {places:?}"
        );
    }

    purge(&mut app.users, &created.id, &request_id())
        .await
        .unwrap();

    for needle in [&email, &reference] {
        assert_eq!(
            places_holding(&app.db, needle).await,
            Vec::<String>::new(),
            "after the purge, {needle} is still kept"
        );
    }
    assert!(user_row(&app.db, &other.id).await.is_some());
}

// ---------------------------------------------------------------------------
// Who made the last change
// ---------------------------------------------------------------------------

#[tokio::test]
async fn updated_by_names_the_api_key_or_the_end_user_of_the_last_change() {
    let mut app = spawn_app().await;
    let default_tenant = Uuid::parse_str(&app.default_tenant().await).unwrap();
    let editor = app
        .create_key(Role::Editor, Some(default_tenant), None)
        .await;
    let admin_id = key_id(&app.admin_token).to_owned();
    let editor_id = key_id(&editor).to_owned();
    let stored_actor = |id: String| {
        let db = &app.db;
        async move {
            db.query_one("SELECT updated_by FROM users WHERE id::text = $1", &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };

    let created = create(&mut app.users, person("audited"), "").await.unwrap();
    let actor = created.updated_by.clone().expect("an actor");
    assert_eq!(actor.api_key_id, admin_id);
    assert_eq!(actor.user_id, "");
    assert_eq!(
        stored_actor(created.id.clone()).await,
        format!("key:{admin_id}")
    );

    let mut as_editor = app.users_as(Some(&editor));
    let edited = update(&mut as_editor, &created.id, rename("Edited"), "", "")
        .await
        .unwrap();
    let actor = edited.updated_by.clone().expect("an actor");
    assert_eq!(actor.api_key_id, editor_id);
    assert_eq!(actor.user_id, "");
    assert_eq!(
        stored_actor(created.id.clone()).await,
        format!("key:{editor_id}")
    );
    assert_eq!(
        get(&mut app.users, &created.id, false)
            .await
            .unwrap()
            .updated_by,
        edited.updated_by
    );

    let mut as_self = app.users_as(Some(&user_token(&created.id)));
    let own = update(&mut as_self, &created.id, rename("Own"), "", "")
        .await
        .unwrap();
    let actor = own.updated_by.clone().expect("an actor");
    assert_eq!(actor.user_id, created.id);
    assert_eq!(actor.api_key_id, "");
    assert_eq!(
        stored_actor(created.id.clone()).await,
        format!("user:{}", created.id)
    );
    assert_eq!(
        get(&mut app.users, &created.id, false)
            .await
            .unwrap()
            .updated_by,
        own.updated_by
    );

    let deactivated = deactivate(&mut app.users, &created.id, "", "")
        .await
        .unwrap();
    assert_eq!(deactivated.updated_by.unwrap().api_key_id, admin_id);
    assert_eq!(
        stored_actor(created.id.clone()).await,
        format!("key:{admin_id}")
    );
    let deleted = delete(&mut as_editor, &created.id, "", "").await.unwrap();
    assert_eq!(deleted.updated_by.unwrap().api_key_id, editor_id);
    assert_eq!(
        stored_actor(created.id.clone()).await,
        format!("key:{editor_id}")
    );
}

// ---------------------------------------------------------------------------
// The purge the service runs by itself
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_service_purges_deleted_users_once_their_expire_time_has_passed() {
    let mut app = spawn_configured(|config| {
        config.delete_retention = Duration::from_secs(3600);
        config.purge_interval = Duration::from_millis(100);
    })
    .await;
    let live = create(&mut app.users, person("live"), "").await.unwrap();
    let expiring = create(&mut app.users, person("expiring"), "")
        .await
        .unwrap();
    delete(&mut app.users, &expiring.id, "", "").await.unwrap();
    // Not yet expired: still there a few purge rounds later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(user_row(&app.db, &expiring.id).await.is_some());

    app.clock.advance(Duration::from_secs(2 * 3600));
    let recent = create(&mut app.users, person("recent"), "").await.unwrap();
    delete(&mut app.users, &recent.id, "", "").await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    while user_row(&app.db, &expiring.id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the expired user is still stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        user_row(&app.db, &recent.id).await.is_some(),
        "not expired yet"
    );
    assert!(user_row(&app.db, &live.id).await.is_some(), "live");
    assert_eq!(
        places_holding(&app.db, "ref-expiring").await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn the_service_forgets_request_ids_once_their_retention_has_passed() {
    let mut app = spawn_configured(|config| {
        config.request_id_retention = Duration::from_secs(3600);
        config.purge_interval = Duration::from_millis(100);
    })
    .await;
    for name in ["Kept", "Forgotten"] {
        let user = User {
            first_name: name.into(),
            ..Default::default()
        };
        create(&mut app.users, user, &request_id()).await.unwrap();
        if name == "Kept" {
            app.clock.advance(Duration::from_secs(1800));
        }
    }
    let stored = async |db: &tokio_postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM request_ids", &[])
            .await
            .unwrap()
            .get(0)
    };
    assert_eq!(stored(&app.db).await, 2);

    // The first record is past its retention now, the second is not.
    app.clock.advance(Duration::from_secs(2400));
    let deadline = Instant::now() + Duration::from_secs(5);
    while stored(&app.db).await != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<String> = app
        .db
        .query("SELECT response FROM request_ids", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| String::from_utf8_lossy(row.get::<_, &[u8]>(0)).into_owned())
        .collect();
    assert_eq!(
        left.len(),
        1,
        "the expired record is forgotten, the other kept"
    );
    assert!(left[0].contains("Forgotten"), "{left:?}");
}

#[tokio::test]
async fn a_deleted_users_own_token_stops_working_and_works_again_once_undeleted() {
    let mut app = spawn_app().await;
    let user = create(&mut app.users, person("token-holder"), "")
        .await
        .unwrap();
    let mut own = app.users_as(Some(&user_token(&user.id)));
    // Polled: the service remembers a token's user for the key cache
    // period. Until then a deleted user's own GetUser is NOT_FOUND.
    let poll = async |own: &mut Users, works: bool| {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let outcome = get(own, &user.id, false).await;
            let refused = matches!(&outcome, Err(s) if s.code() == Code::Unauthenticated);
            if outcome.is_ok() == works && (works || refused) || Instant::now() > deadline {
                return outcome;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    poll(&mut own, true)
        .await
        .expect("a live user's token works");

    delete(&mut app.users, &user.id, "", "").await.unwrap();
    let status = poll(&mut own, false).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    undelete(&mut app.users, &user.id, "", "").await.unwrap();
    poll(&mut own, true)
        .await
        .expect("the token works again once the user is undeleted");
}
