//! End-user tokens whose claims grant a role (`--jwt-roles-claim`,
//! `--jwt-tenant-claim`): an admin web app signs people in with the
//! identity provider instead of carrying an API key.

use serde_json::json;
use tonic::Code;
use users_service::pb::v1::{
    CreateUserRequest, ListKeysRequest, ListTenantsRequest, ListUsersRequest, User,
    keys_service_client::KeysServiceClient,
};
use uuid::Uuid;

use crate::auth::{claims, sign, with};
use crate::helpers::{Bearer, TestApp, fresh_database, server, spawn_app, spawn_with, test_config};
use crate::tenants::create_tenant;

const ROLES: &str = "https://idp.test/roles";
const TENANT: &str = "https://idp.test/tenant";

async fn spawn_with_roles() -> TestApp {
    let name = fresh_database().await;
    let mut config = test_config(Some(server().url(&name)));
    config.jwt_roles_claim = Some(ROLES.into());
    config.jwt_tenant_claim = Some(TENANT.into());
    let mut app = spawn_with(config).await;
    app.database = name;
    app
}

/// A token of `person` whose roles claim is `roles`, with `tenant` in the
/// tenant claim when given.
fn token(person: Uuid, roles: serde_json::Value, tenant: Option<&str>) -> String {
    let claims = with(claims(&person.to_string()), ROLES, roles);
    let claims = match tenant {
        Some(tenant) => with(claims, TENANT, json!(tenant)),
        None => claims,
    };
    sign(&claims)
}

async fn create_in(app: &TestApp, token: &str, tenant: &str, email: &str) -> Result<User, Code> {
    app.users_as(Some(token))
        .create_user(CreateUserRequest {
            user: Some(User {
                email: email.into(),
                tenant_id: tenant.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|response| response.into_inner().user.unwrap())
        .map_err(|status| status.code())
}

async fn list_with(app: &TestApp, token: &str) -> Result<Vec<User>, Code> {
    app.users_as(Some(token))
        .list_users(ListUsersRequest::default())
        .await
        .map(|response| response.into_inner().data)
        .map_err(|status| status.code())
}

#[tokio::test]
async fn a_token_whose_claims_grant_a_role_acts_with_it() {
    let mut app = spawn_with_roles().await;
    let acme = create_tenant(&mut app, "Acme", "acme").await.id;
    let other = create_tenant(&mut app, "Other", "other").await.id;
    create_in(&app, &app.admin_token.clone(), &other, "someone@other.test")
        .await
        .unwrap();
    // Someone of the identity provider, not a user of this service.
    let person = Uuid::now_v7();

    // Admin (the highest of the roles named): tenants and keys too.
    let admin = token(person, json!(["viewer", "admin"]), None);
    app.tenants_as(Some(&admin))
        .list_tenants(ListTenantsRequest::default())
        .await
        .expect("an admin lists tenants");
    KeysServiceClient::with_interceptor(app.channel.clone(), Bearer::new(Some(&admin)))
        .list_keys(ListKeysRequest::default())
        .await
        .expect("an admin lists keys");
    assert_eq!(list_with(&app, &admin).await.unwrap().len(), 1);

    // Editor of Acme: writes there, recorded as the person's doing; not
    // elsewhere; sees Acme only.
    let editor = token(person, json!("editor"), Some(&acme));
    let made = create_in(&app, &editor, &acme, "ada@acme.test")
        .await
        .unwrap();
    let updated_by: String = app
        .db
        .query_one(
            "SELECT updated_by FROM users WHERE id = $1::text::uuid",
            &[&made.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(updated_by, format!("user:{person}"));
    assert_eq!(
        create_in(&app, &editor, &other, "eve@other.test")
            .await
            .unwrap_err(),
        Code::PermissionDenied
    );
    let seen = list_with(&app, &editor).await.unwrap();
    assert_eq!(
        seen.iter().map(|u| u.email.as_str()).collect::<Vec<_>>(),
        ["ada@acme.test"]
    );
    assert_eq!(
        app.tenants_as(Some(&editor))
            .list_tenants(ListTenantsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Viewer of Acme: reads, never writes.
    let viewer = token(person, json!(["viewer"]), Some(&acme));
    assert_eq!(list_with(&app, &viewer).await.unwrap().len(), 1);
    assert_eq!(
        create_in(&app, &viewer, &acme, "bob@acme.test")
            .await
            .unwrap_err(),
        Code::PermissionDenied
    );

    // No tenant, a tenant that is no UUID, or no known role: the token
    // keeps only its own user, as without the options.
    for weak in [
        token(person, json!("editor"), None),
        token(person, json!("editor"), Some("acme")),
        token(person, json!(["owner", 7]), Some(&acme)),
        token(person, json!({"admin": true}), None),
    ] {
        assert_eq!(
            list_with(&app, &weak).await.unwrap_err(),
            Code::PermissionDenied
        );
    }
    let stored: i64 = app
        .db
        .query_one("SELECT count(*) FROM users WHERE email LIKE '%.test'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored, 2,
        "only the admin's and the editor's creates are stored"
    );
}

#[tokio::test]
async fn without_the_options_a_token_keeps_its_own_user_only() {
    let app = spawn_app().await;
    let admin_claims = token(Uuid::now_v7(), json!("admin"), None);
    assert_eq!(
        list_with(&app, &admin_claims).await.unwrap_err(),
        Code::PermissionDenied
    );
}
