//! DeleteTenant, UndeleteTenant, PurgeTenant (issue 12): a company that
//! leaves, with every user in it.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use tonic::{Code, Status};
use users_service::{
    auth::Role,
    pb::v1::{
        CreateTenantRequest, DeleteTenantRequest, DeleteUserRequest, ExportUsersRequest,
        GetTenantRequest, ListTenantsRequest, ListUsersRequest, ListUsersResponse,
        PurgeTenantRequest, StringFilter, Tenant, UndeleteTenantRequest, User, UserFilter,
    },
};
use uuid::Uuid;

use crate::helpers::{Tenants, TestApp, Users, spawn_app};
use crate::safe_writes::{
    create as create_user, get as get_user, micros, places_holding, request_id, spawn_configured,
    user_row, user_token,
};

async fn create_tenant(app: &mut TestApp, name: &str, reference: &str, request_id: &str) -> Tenant {
    app.tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: name.into(),
                reference: reference.into(),
                ..Default::default()
            }),
            request_id: request_id.into(),
        })
        .await
        .expect("create tenant succeeds")
        .into_inner()
        .tenant
        .unwrap()
}

async fn get_tenant(tenants: &mut Tenants, id: &str, show_deleted: bool) -> Result<Tenant, Status> {
    tenants
        .get_tenant(GetTenantRequest {
            id: id.into(),
            show_deleted,
        })
        .await
        .map(|r| r.into_inner().tenant.expect("a tenant"))
}

async fn delete_tenant(tenants: &mut Tenants, id: &str) -> Result<Tenant, Status> {
    tenants
        .delete_tenant(DeleteTenantRequest {
            id: id.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().tenant.expect("a tenant"))
}

async fn undelete_tenant(tenants: &mut Tenants, id: &str) -> Result<Tenant, Status> {
    tenants
        .undelete_tenant(UndeleteTenantRequest {
            id: id.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().tenant.expect("a tenant"))
}

async fn purge_tenant(tenants: &mut Tenants, id: &str) -> Result<String, Status> {
    tenants
        .purge_tenant(PurgeTenantRequest {
            id: id.into(),
            request_id: String::new(),
        })
        .await
        .map(|r| r.into_inner().id)
}

/// A user of `tenant` unique to `tag`.
fn member(tenant: &str, tag: &str) -> User {
    User {
        tenant_id: tenant.into(),
        reference: format!("ref-{tag}"),
        email: format!("{tag}@example.com"),
        first_name: "Member".into(),
        ..Default::default()
    }
}

/// ListUsers of an admin, filtered on `tenant` when given.
async fn list_users(
    users: &mut Users,
    tenant: Option<&str>,
    show_deleted: bool,
) -> ListUsersResponse {
    users
        .list_users(ListUsersRequest {
            filter: tenant.map(|t| UserFilter {
                tenant_id: Some(StringFilter {
                    equal_to: Some(t.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            show_deleted,
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("list users succeeds")
        .into_inner()
}

/// The ids of every tenant ListTenants returns, and its total.
async fn list_tenants(tenants: &mut Tenants, show_deleted: bool) -> (HashSet<String>, Option<i64>) {
    let page = tenants
        .list_tenants(ListTenantsRequest {
            show_deleted,
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .expect("list tenants succeeds")
        .into_inner();
    (
        page.data.iter().map(|t| t.id.clone()).collect(),
        page.total_count,
    )
}

fn ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> HashSet<String> {
    ids.into_iter().map(str::to_owned).collect()
}

fn user_ids(users: &[User]) -> HashSet<String> {
    users.iter().map(|u| u.id.clone()).collect()
}

/// The tenant row `id` as JSON text; None when there is none.
async fn tenant_row(db: &tokio_postgres::Client, id: &str) -> Option<String> {
    db.query_opt(
        "SELECT to_jsonb(t)::text FROM tenants t WHERE t.id::text = $1",
        &[&id],
    )
    .await
    .unwrap()
    .map(|row| row.get(0))
}

/// Rows of `table` whose `tenant_id` is `tenant`.
async fn rows_of_tenant(db: &tokio_postgres::Client, table: &str, tenant: &str) -> i64 {
    db.query_one(
        &format!("SELECT count(*) FROM {table} WHERE tenant_id::text = $1"),
        &[&tenant],
    )
    .await
    .unwrap()
    .get(0)
}

/// Calls ListUsers with `token` every 50 ms until `done` says yes of the
/// outcome, for at most 2 s; the last outcome.
async fn poll_list(
    app: &TestApp,
    token: &str,
    done: impl Fn(&Result<ListUsersResponse, Status>) -> bool,
) -> Result<ListUsersResponse, Status> {
    let mut users = app.users_as(Some(token));
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let outcome = users
            .list_users(ListUsersRequest::default())
            .await
            .map(tonic::Response::into_inner);
        if done(&outcome) || Instant::now() > deadline {
            return outcome;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn refused(outcome: &Result<ListUsersResponse, Status>) -> bool {
    matches!(outcome, Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied))
}

#[tokio::test]
async fn only_admins_may_delete_undelete_and_purge_a_tenant() {
    let mut app = spawn_app().await;
    let leaving = create_tenant(&mut app, "Leaving", "leaving", "").await;
    let staying = create_tenant(&mut app, "Staying", "staying", "").await;
    let leaving_uuid = Uuid::parse_str(&leaving.id).unwrap();
    let editor = app.create_key(Role::Editor, Some(leaving_uuid), None).await;
    let viewer = app.create_key(Role::Viewer, Some(leaving_uuid), None).await;
    let other_editor = app
        .create_key(
            Role::Editor,
            Some(Uuid::parse_str(&staying.id).unwrap()),
            None,
        )
        .await;
    let member = create_user(&mut app.users, member(&leaving.id, "m"), "")
        .await
        .unwrap();
    let end_user = user_token(&member.id);

    let before = tenant_row(&app.db, &leaving.id).await;
    for (caller, token) in [
        ("its editor", &editor),
        ("its viewer", &viewer),
        ("an end user", &end_user),
    ] {
        let status = delete_tenant(&mut app.tenants_as(Some(token)), &leaving.id)
            .await
            .expect_err("not an admin");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{caller}: {status:?}"
        );
        assert_eq!(tenant_row(&app.db, &leaving.id).await, before, "{caller}");
    }

    let deleted = delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    assert_eq!(deleted.id, leaving.id);
    assert_eq!(deleted.name, "Leaving");
    assert_eq!(
        micros(&deleted.expire_time) - micros(&deleted.delete_time),
        30 * 24 * 3600 * 1_000_000,
        "the default retention"
    );
    assert!(
        tenant_row(&app.db, &leaving.id).await.is_some(),
        "kept until purged"
    );

    let deleted_row = tenant_row(&app.db, &leaving.id).await;
    let mut other = app.tenants_as(Some(&other_editor));
    let status = undelete_tenant(&mut other, &leaving.id).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "undelete: {status:?}"
    );
    let status = purge_tenant(&mut other, &leaving.id).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "purge: {status:?}");
    assert_eq!(tenant_row(&app.db, &leaving.id).await, deleted_row);

    let restored = undelete_tenant(&mut app.tenants, &leaving.id)
        .await
        .unwrap();
    assert_eq!(restored.delete_time, None);
    assert_eq!(restored.expire_time, None);
    assert_eq!(
        get_tenant(&mut app.tenants, &leaving.id, false)
            .await
            .unwrap(),
        restored
    );
}

#[tokio::test]
async fn the_default_tenant_cannot_be_deleted() {
    let mut app = spawn_app().await;
    let default_tenant = app.default_tenant().await;
    let before = tenant_row(&app.db, &default_tenant).await;
    let status = delete_tenant(&mut app.tenants, &default_tenant)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(tenant_row(&app.db, &default_tenant).await, before);
    let tenant = get_tenant(&mut app.tenants, &default_tenant, false)
        .await
        .unwrap();
    assert_eq!(tenant.delete_time, None);
}

#[tokio::test]
async fn a_deleted_tenant_and_its_users_are_hidden_unless_show_deleted() {
    let mut app = spawn_app().await;
    let default_tenant = app.default_tenant().await;
    let leaving = create_tenant(&mut app, "Leaving", "leaving", "").await;
    let staying = create_tenant(&mut app, "Staying", "staying", "").await;
    let a = create_user(&mut app.users, member(&leaving.id, "a"), "")
        .await
        .unwrap();
    let b = create_user(&mut app.users, member(&leaving.id, "b"), "")
        .await
        .unwrap();
    let c = create_user(&mut app.users, member(&staying.id, "c"), "")
        .await
        .unwrap();
    let deleted = delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();

    let status = get_tenant(&mut app.tenants, &leaving.id, false)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let shown = get_tenant(&mut app.tenants, &leaving.id, true)
        .await
        .unwrap();
    assert_eq!(shown, deleted);
    assert!(shown.delete_time.is_some());

    let (listed, total) = list_tenants(&mut app.tenants, false).await;
    assert_eq!(listed, ids([default_tenant.as_str(), &staying.id]));
    assert_eq!(total, Some(2));
    let (listed, total) = list_tenants(&mut app.tenants, true).await;
    assert_eq!(
        listed,
        ids([default_tenant.as_str(), &staying.id, &leaving.id])
    );
    assert_eq!(total, Some(3));

    // Its users.
    let page = list_users(&mut app.users, Some(&leaving.id), false).await;
    assert!(page.data.is_empty(), "{:?}", page.data);
    assert_eq!(page.total_count, Some(0));
    let page = list_users(&mut app.users, Some(&leaving.id), true).await;
    assert_eq!(user_ids(&page.data), user_ids(&[a.clone(), b.clone()]));
    assert_eq!(page.total_count, Some(2));
    let page = list_users(&mut app.users, None, false).await;
    assert_eq!(user_ids(&page.data), user_ids(std::slice::from_ref(&c)));
    assert_eq!(page.total_count, Some(1));
    for user in [&a, &b] {
        let status = get_user(&mut app.users, &user.id, false).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let shown = get_user(&mut app.users, &user.id, true).await.unwrap();
        assert_eq!(shown.id, user.id);
    }
    let mut stream = app
        .users
        .export_users(ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut exported = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        exported.extend(chunk.users);
    }
    assert_eq!(user_ids(&exported), user_ids(&[c]));

    // Its reference stays reserved.
    let status = app
        .tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: "Newcomer".into(),
                reference: "leaving".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
}

#[tokio::test]
async fn no_user_can_be_created_in_a_deleted_tenant() {
    let mut app = spawn_app().await;
    let leaving = create_tenant(&mut app, "Leaving", "leaving", "").await;
    delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    let status = create_user(&mut app.users, member(&leaving.id, "late"), "")
        .await
        .expect_err("no user in a deleted tenant");
    assert!(
        matches!(status.code(), Code::FailedPrecondition | Code::NotFound),
        "{status:?}"
    );
    assert_eq!(rows_of_tenant(&app.db, "users", &leaving.id).await, 0);
    assert_eq!(app.user_count().await, 0);
}

/// A tenant with an editor and a viewer key, both seen working.
async fn tenant_with_keys(app: &mut TestApp) -> (Tenant, [String; 2]) {
    let tenant = create_tenant(app, "Leaving", "leaving", "").await;
    let uuid = Uuid::parse_str(&tenant.id).unwrap();
    let editor = app.create_key(Role::Editor, Some(uuid), None).await;
    let viewer = app.create_key(Role::Viewer, Some(uuid), None).await;
    for key in [&editor, &viewer] {
        poll_list(app, key, Result::is_ok)
            .await
            .expect("the key works");
    }
    (tenant, [editor, viewer])
}

#[tokio::test]
async fn a_deleted_tenants_api_keys_stop_working() {
    let mut app = spawn_app().await;
    let (leaving, [editor, viewer]) = tenant_with_keys(&mut app).await;

    delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    for (name, key) in [("editor", &editor), ("viewer", &viewer)] {
        let outcome = poll_list(&app, key, refused).await;
        assert!(refused(&outcome), "{name} key still works: {outcome:?}");
    }
    let status = create_user(
        &mut app.users_as(Some(&editor)),
        member(&leaving.id, "by-dead-key"),
        "",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            status.code(),
            Code::Unauthenticated | Code::PermissionDenied
        ),
        "{status:?}"
    );
    assert_eq!(app.user_count().await, 0);
}

#[tokio::test]
async fn a_deleted_tenants_api_keys_work_again_once_it_is_undeleted() {
    let mut app = spawn_app().await;
    let (leaving, [editor, viewer]) = tenant_with_keys(&mut app).await;
    delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    for key in [&editor, &viewer] {
        let outcome = poll_list(&app, key, refused).await;
        assert!(refused(&outcome), "deleted: {outcome:?}");
    }

    undelete_tenant(&mut app.tenants, &leaving.id)
        .await
        .unwrap();
    // As a revoked key stops working within the key cache period, a
    // restored one works again within it (300 ms here; polled for 2 s).
    for (name, key) in [("editor", &editor), ("viewer", &viewer)] {
        let outcome = poll_list(&app, key, Result::is_ok).await;
        assert!(outcome.is_ok(), "{name} key after undelete: {outcome:?}");
    }
}

#[tokio::test]
async fn undelete_tenant_restores_the_users_deleted_with_it_but_not_those_deleted_before() {
    let mut app = spawn_app().await;
    let leaving = create_tenant(&mut app, "Leaving", "leaving", "").await;
    let kept_1 = create_user(&mut app.users, member(&leaving.id, "k1"), "")
        .await
        .unwrap();
    let kept_2 = create_user(&mut app.users, member(&leaving.id, "k2"), "")
        .await
        .unwrap();
    let gone = create_user(&mut app.users, member(&leaving.id, "gone"), "")
        .await
        .unwrap();
    let gone_deleted = app
        .users
        .delete_user(DeleteUserRequest {
            id: gone.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    let restored = undelete_tenant(&mut app.tenants, &leaving.id)
        .await
        .unwrap();
    assert_eq!(restored.delete_time, None);
    assert_eq!(restored.expire_time, None);
    assert!(
        get_tenant(&mut app.tenants, &leaving.id, false)
            .await
            .is_ok()
    );

    for user in [&kept_1, &kept_2] {
        let back = get_user(&mut app.users, &user.id, false)
            .await
            .expect("restored with its tenant");
        assert_eq!(back.delete_time, None);
        assert_eq!(back.expire_time, None);
    }
    let page = list_users(&mut app.users, Some(&leaving.id), false).await;
    assert_eq!(user_ids(&page.data), user_ids(&[kept_1, kept_2]));
    assert_eq!(page.total_count, Some(2));

    let status = get_user(&mut app.users, &gone.id, false).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "deleted on its own: {status:?}"
    );
    let still_deleted = get_user(&mut app.users, &gone.id, true).await.unwrap();
    assert_eq!(still_deleted.delete_time, gone_deleted.delete_time);
    assert_eq!(still_deleted.expire_time, gone_deleted.expire_time);
}

#[tokio::test]
async fn purge_tenant_requires_a_deleted_tenant_then_erases_it_with_its_users_keys_and_request_ids()
{
    let mut app = spawn_app().await;
    let unique = Uuid::new_v4().simple().to_string();
    let tenant_reference = format!("leaving-{unique}");
    let leaving = create_tenant(&mut app, "Leaving", &tenant_reference, &request_id()).await;
    let staying = create_tenant(&mut app, "Staying", "staying", "").await;
    let uuid = Uuid::parse_str(&leaving.id).unwrap();
    let editor = app.create_key(Role::Editor, Some(uuid), None).await;
    app.create_key(Role::Viewer, Some(uuid), None).await;
    let other_key = app
        .create_key(
            Role::Editor,
            Some(Uuid::parse_str(&staying.id).unwrap()),
            None,
        )
        .await;
    // Users made with request ids, by the tenant's own key and by an admin.
    let by_editor = create_user(
        &mut app.users_as(Some(&editor)),
        member(&leaving.id, &format!("e-{unique}")),
        &request_id(),
    )
    .await
    .unwrap();
    let by_admin = create_user(
        &mut app.users,
        member(&leaving.id, &format!("a-{unique}")),
        &request_id(),
    )
    .await
    .unwrap();
    let bystander = create_user(
        &mut app.users,
        member(&staying.id, "bystander"),
        &request_id(),
    )
    .await
    .unwrap();

    assert_eq!(rows_of_tenant(&app.db, "users", &leaving.id).await, 2);
    assert_eq!(rows_of_tenant(&app.db, "api_keys", &leaving.id).await, 2);
    assert!(
        rows_of_tenant(&app.db, "request_ids", &leaving.id).await >= 1,
        "the editor's request is recorded with its tenant"
    );
    for needle in [&by_editor.email, &by_admin.reference, &tenant_reference] {
        assert!(
            !places_holding(&app.db, needle).await.is_empty(),
            "before the purge the search finds {needle}"
        );
    }

    let before = tenant_row(&app.db, &leaving.id).await;
    let status = purge_tenant(&mut app.tenants, &leaving.id)
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "not deleted: {status:?}"
    );
    assert_eq!(tenant_row(&app.db, &leaving.id).await, before);
    assert_eq!(rows_of_tenant(&app.db, "users", &leaving.id).await, 2);

    delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    let purged = purge_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    assert_eq!(purged, leaving.id);

    let status = get_tenant(&mut app.tenants, &leaving.id, true)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(tenant_row(&app.db, &leaving.id).await, None);
    for table in ["users", "api_keys", "request_ids"] {
        assert_eq!(
            rows_of_tenant(&app.db, table, &leaving.id).await,
            0,
            "{table} still holds rows of the tenant"
        );
    }
    for needle in [
        &by_editor.email,
        &by_editor.reference,
        &by_admin.email,
        &by_admin.reference,
        &tenant_reference,
    ] {
        assert_eq!(
            places_holding(&app.db, needle).await,
            Vec::<String>::new(),
            "after the purge, {needle} is still kept"
        );
    }

    // The other tenant keeps everything.
    assert!(user_row(&app.db, &bystander.id).await.is_some());
    assert_eq!(rows_of_tenant(&app.db, "api_keys", &staying.id).await, 1);
    poll_list(&app, &other_key, Result::is_ok)
        .await
        .expect("another tenant's key still works");
}

#[tokio::test]
async fn the_service_purges_deleted_tenants_once_their_expire_time_has_passed() {
    let mut app = spawn_configured(|config| {
        config.delete_retention = Duration::from_secs(3600);
        config.purge_interval = Duration::from_millis(100);
    })
    .await;
    let leaving = create_tenant(&mut app, "Leaving", "leaving", "").await;
    let uuid = Uuid::parse_str(&leaving.id).unwrap();
    app.create_key(Role::Editor, Some(uuid), None).await;
    let member = create_user(&mut app.users, member(&leaving.id, "m"), "")
        .await
        .unwrap();
    let deleted = delete_tenant(&mut app.tenants, &leaving.id).await.unwrap();
    assert_eq!(
        micros(&deleted.expire_time) - micros(&deleted.delete_time),
        3600 * 1_000_000
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        tenant_row(&app.db, &leaving.id).await.is_some(),
        "not expired yet"
    );

    app.clock.advance(Duration::from_secs(2 * 3600));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tenant_row(&app.db, &leaving.id).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the expired tenant is still stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(user_row(&app.db, &member.id).await, None);
    assert_eq!(rows_of_tenant(&app.db, "users", &leaving.id).await, 0);
    assert_eq!(rows_of_tenant(&app.db, "api_keys", &leaving.id).await, 0);
}
