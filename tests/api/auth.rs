//! Authentication and authorization: which caller may call which RPC on
//! which tenant's data, what bad credentials get, and what the database keeps
//! of an API key.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Code, Status};
use users_service::{
    auth::Role,
    pb::v1::{
        CreateTenantRequest, CreateUserRequest, DeactivateUserRequest, GetTenantRequest,
        GetUserRequest, ListTenantsRequest, ListTenantsResponse, ListUsersRequest,
        ListUsersResponse, ReactivateUserRequest, StringFilter, Tenant, TenantFilter, TenantUpdate,
        UpdateTenantRequest, UpdateUserRequest, User, UserFilter, UserUpdate,
    },
};
use uuid::Uuid;

use crate::helpers::{JWT_AUDIENCE, JWT_ISSUER, TestApp, fixture, spawn_app};
use crate::tenants::create_tenant;
use crate::users::user;

// ---------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Valid claims of an end-user token for `sub`, an hour from expiry.
pub(crate) fn claims(sub: &str) -> serde_json::Value {
    json!({
        "sub": sub,
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "exp": now_secs() + 3600,
    })
}

/// Signs `claims` as the identity provider does (RS256, fixture key).
pub(crate) fn sign(claims: &serde_json::Value) -> String {
    let pem = std::fs::read(fixture("jwt-rs256-private.pem")).expect("private key fixture");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA private key");
    encode(&Header::new(Algorithm::RS256), claims, &key).expect("JWT signs")
}

/// A valid end-user token of `user_id`.
fn user_token(user_id: &str) -> String {
    sign(&claims(user_id))
}

/// `claims` with `key` set to `value` (or removed when `value` is null).
pub(crate) fn with(
    mut claims: serde_json::Value,
    key: &str,
    value: serde_json::Value,
) -> serde_json::Value {
    let object = claims.as_object_mut().unwrap();
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.to_owned(), value);
    }
    claims
}

fn b64(value: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// The secret part of an API key token: what follows the second `_`.
fn secret_of(token: &str) -> &str {
    let mut parts = token.splitn(3, '_');
    assert_eq!(parts.next(), Some("usk"), "{token} is not an API key");
    parts.next().unwrap();
    parts.next().expect("a secret part")
}

/// The id part of an API key token.
fn id_of(token: &str) -> &str {
    token.split('_').nth(1).expect("an id part")
}

fn random_hex(bytes: usize) -> String {
    let mut out = String::new();
    while out.len() < bytes * 2 {
        out.push_str(&Uuid::new_v4().simple().to_string());
    }
    out.truncate(bytes * 2);
    out
}

// ---------------------------------------------------------------------------
// The world every matrix cell runs in
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Admin,
    EditorA,
    ViewerA,
    EditorB,
    /// End user X, who lives in tenant A.
    UserSelf,
    /// End user Z, another user of tenant A.
    OtherUser,
    Anonymous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    A,
    B,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    CreateUser,
    GetUser,
    UpdateUser,
    DeactivateUser,
    ReactivateUser,
    ListUsers,
    CreateTenant,
    GetTenant,
    UpdateTenant,
    ListTenants,
}

impl Rpc {
    fn writes(self) -> bool {
        matches!(
            self,
            Rpc::CreateUser
                | Rpc::UpdateUser
                | Rpc::DeactivateUser
                | Rpc::ReactivateUser
                | Rpc::CreateTenant
                | Rpc::UpdateTenant
        )
    }

    /// RPCs on one user id, whose out-of-scope answer must look like the
    /// answer for an id that does not exist.
    fn on_user_id(self) -> bool {
        matches!(
            self,
            Rpc::GetUser | Rpc::UpdateUser | Rpc::DeactivateUser | Rpc::ReactivateUser
        )
    }
}

/// Tenants A and B; X and Z in A, Y in B; a token for every caller.
struct World {
    app: TestApp,
    tenant_a: String,
    tenant_b: String,
    x: String,
    y: String,
    tokens: Vec<(Caller, Option<String>)>,
}

impl World {
    fn token(&self, caller: Caller) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(c, _)| *c == caller)
            .and_then(|(_, token)| token.as_deref())
    }

    fn tenant(&self, target: Target) -> &str {
        match target {
            Target::A => &self.tenant_a,
            Target::B => &self.tenant_b,
        }
    }

    /// The user a per-user RPC aims at: X in A, Y in B.
    fn target_user(&self, target: Target) -> &str {
        match target {
            Target::A => &self.x,
            Target::B => &self.y,
        }
    }

    async fn set_active(&self, user_id: &str, active: bool) {
        let id = Uuid::parse_str(user_id).unwrap();
        self.app
            .db
            .execute(
                "UPDATE users SET active = $2 WHERE id = $1",
                &[&id, &active],
            )
            .await
            .unwrap();
    }

    /// Ids of the users of `tenant` in the database, sorted.
    async fn users_of(&self, tenant: &str) -> Vec<String> {
        let tenant = Uuid::parse_str(tenant).unwrap();
        self.app
            .db
            .query(
                "SELECT id::text FROM users WHERE tenant_id = $1 ORDER BY id::text",
                &[&tenant],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect()
    }
}

/// Creates a user through the admin key in `tenant`; returns its id.
async fn create_user_in(app: &mut TestApp, tenant: &str, reference: &str) -> String {
    let created = app
        .users
        .create_user(CreateUserRequest {
            user: Some(User {
                tenant_id: tenant.into(),
                first_name: reference.to_uppercase(),
                ..user(reference, &format!("{reference}@example.com"))
            }),
            ..Default::default()
        })
        .await
        .expect("admin creates the user")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(created.tenant_id, tenant);
    created.id
}

async fn world() -> World {
    let mut app = spawn_app().await;
    let tenant_a = create_tenant(&mut app, "Tenant A", "tenant-a").await.id;
    let tenant_b = create_tenant(&mut app, "Tenant B", "tenant-b").await.id;
    let x = create_user_in(&mut app, &tenant_a, "user-x").await;
    let z = create_user_in(&mut app, &tenant_a, "user-z").await;
    let y = create_user_in(&mut app, &tenant_b, "user-y").await;
    let uuid_a = Uuid::parse_str(&tenant_a).unwrap();
    let uuid_b = Uuid::parse_str(&tenant_b).unwrap();
    let tokens = vec![
        (Caller::Admin, Some(app.admin_token.clone())),
        (
            Caller::EditorA,
            Some(app.create_key(Role::Editor, Some(uuid_a), None).await),
        ),
        (
            Caller::ViewerA,
            Some(app.create_key(Role::Viewer, Some(uuid_a), None).await),
        ),
        (
            Caller::EditorB,
            Some(app.create_key(Role::Editor, Some(uuid_b), None).await),
        ),
        (Caller::UserSelf, Some(user_token(&x))),
        (Caller::OtherUser, Some(user_token(&z))),
        (Caller::Anonymous, None),
    ];
    World {
        app,
        tenant_a,
        tenant_b,
        x,
        y,
        tokens,
    }
}

/// Every row of `users` and of `tenants`, as text.
async fn snapshot(app: &TestApp) -> (String, String) {
    let mut tables = Vec::new();
    for table in ["users", "tenants"] {
        let row = app
            .db
            .query_one(
                &format!(
                    "SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM {table} t"
                ),
                &[],
            )
            .await
            .unwrap();
        tables.push(row.get::<_, String>(0));
    }
    (tables[0].clone(), tables[1].clone())
}

// ---------------------------------------------------------------------------
// The matrix
// ---------------------------------------------------------------------------

const OK: Code = Code::Ok;
const DENIED: Code = Code::PermissionDenied;
const NOT_FOUND: Code = Code::NotFound;
const UNAUTH: Code = Code::Unauthenticated;

/// The expected code of every (caller, target A, target B), from the role
/// table of `src/grpc/authz.rs`. Written out rather than computed, so the
/// table is what is reviewed.
fn expected(rpc: Rpc) -> [(Caller, Code, Code); 7] {
    use Caller::*;
    match rpc {
        Rpc::CreateUser => [
            (Admin, OK, OK),
            (EditorA, OK, DENIED),
            (ViewerA, DENIED, DENIED),
            (EditorB, DENIED, OK),
            (UserSelf, DENIED, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        Rpc::GetUser => [
            (Admin, OK, OK),
            (EditorA, OK, NOT_FOUND),
            (ViewerA, OK, NOT_FOUND),
            (EditorB, NOT_FOUND, OK),
            (UserSelf, OK, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        Rpc::UpdateUser => [
            (Admin, OK, OK),
            (EditorA, OK, NOT_FOUND),
            (ViewerA, DENIED, DENIED),
            (EditorB, NOT_FOUND, OK),
            (UserSelf, OK, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        Rpc::DeactivateUser => [
            (Admin, OK, OK),
            (EditorA, OK, NOT_FOUND),
            (ViewerA, DENIED, DENIED),
            (EditorB, NOT_FOUND, OK),
            (UserSelf, DENIED, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        // Each cell deactivates its target first, so UserSelf (X) is
        // deactivated by then: its token is refused before any role check.
        Rpc::ReactivateUser => [
            (Admin, OK, OK),
            (EditorA, OK, NOT_FOUND),
            (ViewerA, DENIED, DENIED),
            (EditorB, NOT_FOUND, OK),
            (UserSelf, UNAUTH, UNAUTH),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        Rpc::ListUsers => [
            (Admin, OK, OK),
            (EditorA, OK, OK),
            (ViewerA, OK, OK),
            (EditorB, OK, OK),
            (UserSelf, DENIED, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
        Rpc::CreateTenant | Rpc::GetTenant | Rpc::UpdateTenant | Rpc::ListTenants => [
            (Admin, OK, OK),
            (EditorA, DENIED, DENIED),
            (ViewerA, DENIED, DENIED),
            (EditorB, DENIED, DENIED),
            (UserSelf, DENIED, DENIED),
            (OtherUser, DENIED, DENIED),
            (Anonymous, UNAUTH, UNAUTH),
        ],
    }
}

/// The tenant a tenant-bound key is confined to.
fn confined_to(caller: Caller) -> Option<Target> {
    match caller {
        Caller::EditorA | Caller::ViewerA => Some(Target::A),
        Caller::EditorB => Some(Target::B),
        _ => None,
    }
}

fn eq(value: &str) -> StringFilter {
    StringFilter {
        equal_to: Some(value.into()),
        ..Default::default()
    }
}

/// What an allowed call answered.
#[derive(Debug)]
enum Reply {
    User(Box<User>),
    Users(ListUsersResponse),
    Tenant(Tenant),
    Tenants(ListTenantsResponse),
}

/// Calls `rpc` with `token`, aimed at `user_id` / `tenant_id`; `tag` makes
/// what it writes unique to the cell.
async fn perform(
    app: &TestApp,
    rpc: Rpc,
    token: Option<&str>,
    user_id: &str,
    tenant_id: &str,
    tag: &str,
) -> Result<Reply, Status> {
    let mut users = app.users_as(token);
    let mut tenants = app.tenants_as(token);
    match rpc {
        Rpc::CreateUser => users
            .create_user(CreateUserRequest {
                user: Some(User {
                    tenant_id: tenant_id.into(),
                    ..user(tag, &format!("{tag}@example.com"))
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::User(Box::new(r.into_inner().user.unwrap()))),
        Rpc::GetUser => users
            .get_user(GetUserRequest {
                id: user_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| Reply::User(Box::new(r.into_inner().user.unwrap()))),
        Rpc::UpdateUser => users
            .update_user(UpdateUserRequest {
                id: user_id.into(),
                user: Some(UserUpdate {
                    first_name: Some(tag.into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::User(Box::new(r.into_inner().user.unwrap()))),
        Rpc::DeactivateUser => users
            .deactivate_user(DeactivateUserRequest {
                id: user_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| Reply::User(Box::new(r.into_inner().user.unwrap()))),
        Rpc::ReactivateUser => users
            .reactivate_user(ReactivateUserRequest {
                id: user_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| Reply::User(Box::new(r.into_inner().user.unwrap()))),
        Rpc::ListUsers => users
            .list_users(ListUsersRequest {
                limit: Some(100),
                filter: Some(UserFilter {
                    tenant_id: Some(eq(tenant_id)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::Users(r.into_inner())),
        Rpc::CreateTenant => tenants
            .create_tenant(CreateTenantRequest {
                tenant: Some(Tenant {
                    name: tag.into(),
                    reference: tag.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::Tenant(r.into_inner().tenant.unwrap())),
        Rpc::GetTenant => tenants
            .get_tenant(GetTenantRequest {
                id: tenant_id.into(),
                ..Default::default()
            })
            .await
            .map(|r| Reply::Tenant(r.into_inner().tenant.unwrap())),
        Rpc::UpdateTenant => tenants
            .update_tenant(UpdateTenantRequest {
                id: tenant_id.into(),
                tenant: Some(TenantUpdate {
                    name: Some(tag.into()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::Tenant(r.into_inner().tenant.unwrap())),
        Rpc::ListTenants => tenants
            .list_tenants(ListTenantsRequest {
                limit: Some(100),
                filter: Some(TenantFilter {
                    id: Some(eq(tenant_id)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| Reply::Tenants(r.into_inner())),
    }
}

/// Checks that an allowed call did what it was asked, on what it was asked.
async fn check_reply(
    w: &World,
    rpc: Rpc,
    caller: Caller,
    target: Target,
    tag: &str,
    reply: Reply,
) -> Result<(), String> {
    let tenant = w.tenant(target);
    let target_user = w.target_user(target);
    let fail = |what: String| Err(what);
    match (rpc, reply) {
        (Rpc::CreateUser, Reply::User(u)) => {
            if u.tenant_id != tenant || u.reference != tag {
                return fail(format!(
                    "created {}/{} instead of {tag} in {tenant}",
                    u.reference, u.tenant_id
                ));
            }
        }
        (Rpc::GetUser, Reply::User(u)) => {
            if u.id != target_user {
                return fail(format!("returned user {} instead of {target_user}", u.id));
            }
        }
        (Rpc::UpdateUser, Reply::User(u)) => {
            if u.id != target_user || u.first_name != tag {
                return fail(format!("returned {} named {:?}", u.id, u.first_name));
            }
        }
        (Rpc::DeactivateUser | Rpc::ReactivateUser, Reply::User(u)) => {
            let active = rpc == Rpc::ReactivateUser;
            if u.id != target_user || u.active != Some(active) {
                return fail(format!("returned {} with active {:?}", u.id, u.active));
            }
        }
        (Rpc::ListUsers, Reply::Users(page)) => {
            let mut got: Vec<String> = page.data.iter().map(|u| u.id.clone()).collect();
            got.sort();
            let want = match confined_to(caller) {
                // Confined to its own tenant, whatever the filter says.
                Some(own) if own != target => Vec::new(),
                _ => w.users_of(tenant).await,
            };
            if got != want || page.total_count != Some(want.len() as i64) {
                return fail(format!(
                    "listed {got:?} (total {:?}) instead of {want:?}",
                    page.total_count
                ));
            }
            if !want.is_empty() && !want.contains(&target_user.to_owned()) {
                return fail(format!("{target_user} is missing from {want:?}"));
            }
        }
        (Rpc::CreateTenant, Reply::Tenant(t)) => {
            if t.reference != tag || t.name != tag {
                return fail(format!("created tenant {t:?}"));
            }
        }
        (Rpc::GetTenant, Reply::Tenant(t)) => {
            if t.id != tenant {
                return fail(format!("returned tenant {} instead of {tenant}", t.id));
            }
        }
        (Rpc::UpdateTenant, Reply::Tenant(t)) => {
            if t.id != tenant || t.name != tag {
                return fail(format!("returned tenant {} named {:?}", t.id, t.name));
            }
        }
        (Rpc::ListTenants, Reply::Tenants(page)) => {
            let got: Vec<&str> = page.data.iter().map(|t| t.id.as_str()).collect();
            if got != [tenant] {
                return fail(format!("listed tenants {got:?} instead of [{tenant}]"));
            }
        }
        (rpc, reply) => return fail(format!("{rpc:?} answered {reply:?}")),
    }
    Ok(())
}

/// Runs every (caller, target) cell of `rpc` on a fresh world and reports
/// every cell that differs from [`expected`].
async fn check_matrix(rpc: Rpc) {
    let w = world().await;
    let mut failures = Vec::new();
    for (caller, on_a, on_b) in expected(rpc) {
        for (target, want) in [(Target::A, on_a), (Target::B, on_b)] {
            let cell = format!("{rpc:?} as {caller:?} on tenant {target:?}");
            let tag = format!("{rpc:?}-{caller:?}-{target:?}").to_lowercase();
            // A deactivation must have an active user to deactivate (and the
            // reverse), so that a call wrongly let through changes the row.
            match rpc {
                Rpc::DeactivateUser => w.set_active(w.target_user(target), true).await,
                Rpc::ReactivateUser => w.set_active(w.target_user(target), false).await,
                _ => {}
            }
            let token = w.token(caller);
            let before = snapshot(&w.app).await;
            let result = perform(
                &w.app,
                rpc,
                token,
                w.target_user(target),
                w.tenant(target),
                &tag,
            )
            .await;
            let after = snapshot(&w.app).await;
            let got = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
            if got != want {
                let detail = match &result {
                    Ok(reply) => format!("{reply:?}"),
                    Err(status) => status.message().to_owned(),
                };
                failures.push(format!("{cell}: expected {want:?}, got {got:?} ({detail})"));
            }
            match result {
                Ok(reply) => {
                    if got == want {
                        if let Err(problem) =
                            check_reply(&w, rpc, caller, target, &tag, reply).await
                        {
                            failures.push(format!("{cell}: {problem}"));
                        }
                    }
                    if !rpc.writes() && before != after {
                        failures.push(format!("{cell}: a read changed the database"));
                    }
                }
                Err(status) => {
                    if before != after {
                        failures.push(format!(
                            "{cell}: refused with {:?} but the database changed",
                            status.code()
                        ));
                    }
                    // Out of scope must be indistinguishable from absent.
                    if status.code() == Code::NotFound && rpc.on_user_id() {
                        let ghost = Uuid::now_v7().to_string();
                        let absent = perform(
                            &w.app,
                            rpc,
                            token,
                            &ghost,
                            w.tenant(target),
                            &format!("{tag}-ghost"),
                        )
                        .await
                        .expect_err("an unknown id is refused");
                        if (absent.code(), absent.message(), absent.details())
                            != (status.code(), status.message(), status.details())
                        {
                            failures.push(format!(
                                "{cell}: answered {:?} {:?}, an unknown id {:?} {:?}",
                                status.code(),
                                status.message(),
                                absent.code(),
                                absent.message()
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems in the 14 cells of {rpc:?}:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn create_user_follows_the_role_matrix() {
    check_matrix(Rpc::CreateUser).await;
}

#[tokio::test]
async fn get_user_follows_the_role_matrix() {
    check_matrix(Rpc::GetUser).await;
}

#[tokio::test]
async fn update_user_follows_the_role_matrix() {
    check_matrix(Rpc::UpdateUser).await;
}

#[tokio::test]
async fn deactivate_user_follows_the_role_matrix() {
    check_matrix(Rpc::DeactivateUser).await;
}

#[tokio::test]
async fn reactivate_user_follows_the_role_matrix() {
    check_matrix(Rpc::ReactivateUser).await;
}

#[tokio::test]
async fn list_users_follows_the_role_matrix() {
    check_matrix(Rpc::ListUsers).await;
}

#[tokio::test]
async fn create_tenant_follows_the_role_matrix() {
    check_matrix(Rpc::CreateTenant).await;
}

#[tokio::test]
async fn get_tenant_follows_the_role_matrix() {
    check_matrix(Rpc::GetTenant).await;
}

#[tokio::test]
async fn update_tenant_follows_the_role_matrix() {
    check_matrix(Rpc::UpdateTenant).await;
}

#[tokio::test]
async fn list_tenants_follows_the_role_matrix() {
    check_matrix(Rpc::ListTenants).await;
}

#[tokio::test]
async fn tenant_keys_list_only_their_own_tenant_whatever_the_filter() {
    let w = world().await;
    let both = StringFilter {
        value_in: vec![w.tenant_a.clone(), w.tenant_b.clone()],
        ..Default::default()
    };
    for caller in [Caller::EditorA, Caller::ViewerA, Caller::EditorB] {
        let own = w.tenant(confined_to(caller).unwrap());
        let want = w.users_of(own).await;
        for filter in [
            None,
            Some(UserFilter {
                tenant_id: Some(both.clone()),
                ..Default::default()
            }),
        ] {
            let page = w
                .app
                .users_as(w.token(caller))
                .list_users(ListUsersRequest {
                    limit: Some(100),
                    filter: filter.clone(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("{caller:?} lists: {s:?}"))
                .into_inner();
            let mut got: Vec<String> = page.data.iter().map(|u| u.id.clone()).collect();
            got.sort();
            assert_eq!(got, want, "{caller:?} with filter {filter:?}");
            assert_eq!(page.total_count, Some(want.len() as i64), "{caller:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// End users on their own profile
// ---------------------------------------------------------------------------

fn custom_data() -> prost_types::Struct {
    prost_types::Struct {
        fields: BTreeMap::from([(
            "plan".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("gold".into())),
            },
        )]),
    }
}

#[tokio::test]
async fn end_users_cannot_change_their_own_email_active_state_or_custom_data() {
    let w = world().await;
    let mut me = w.app.users_as(w.token(Caller::UserSelf));
    let cases = [
        (
            "email",
            UserUpdate {
                email: Some("new-x@example.com".into()),
                ..Default::default()
            },
        ),
        (
            "email cleared",
            UserUpdate {
                email: Some(String::new()),
                ..Default::default()
            },
        ),
        (
            "active false",
            UserUpdate {
                active: Some(false),
                ..Default::default()
            },
        ),
        (
            "active true (unchanged value, still refused)",
            UserUpdate {
                active: Some(true),
                ..Default::default()
            },
        ),
        (
            "custom_data",
            UserUpdate {
                custom_data: Some(custom_data()),
                ..Default::default()
            },
        ),
        (
            "empty custom_data",
            UserUpdate {
                custom_data: Some(prost_types::Struct::default()),
                ..Default::default()
            },
        ),
        (
            "email beside an allowed field",
            UserUpdate {
                first_name: Some("Sneaky".into()),
                email: Some("new-x@example.com".into()),
                ..Default::default()
            },
        ),
    ];
    for (case, update) in cases {
        let before = snapshot(&w.app).await;
        let status = me
            .update_user(UpdateUserRequest {
                id: w.x.clone(),
                user: Some(update),
                ..Default::default()
            })
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::PermissionDenied, "{case}: {status:?}");
        assert_eq!(
            snapshot(&w.app).await,
            before,
            "{case} changed the database"
        );
    }
}

#[tokio::test]
async fn end_users_may_change_their_own_profile_fields() {
    let w = world().await;
    let mut me = w.app.users_as(w.token(Caller::UserSelf));
    let x = Uuid::parse_str(&w.x).unwrap();
    let row_of = |columns: &'static str| {
        let db = &w.app.db;
        async move {
            let row = db
                .query_one(&format!("SELECT {columns} FROM users WHERE id = $1"), &[&x])
                .await
                .unwrap();
            (0..row.len())
                .map(|i| row.get::<_, String>(i))
                .collect::<Vec<_>>()
        }
    };
    let untouched = "email, active::text, custom_data::text";
    let restricted_before = row_of(untouched).await;

    // Each profile field alone.
    let single = [
        (
            "first_name",
            UserUpdate {
                first_name: Some("Xena".into()),
                ..Default::default()
            },
            "Xena",
        ),
        (
            "last_name",
            UserUpdate {
                last_name: Some("Warrior".into()),
                ..Default::default()
            },
            "Warrior",
        ),
        (
            "phone",
            UserUpdate {
                phone: Some("+15550009876".into()),
                ..Default::default()
            },
            "+15550009876",
        ),
        (
            "locale",
            UserUpdate {
                locale: Some("de-DE".into()),
                ..Default::default()
            },
            "de-DE",
        ),
        (
            "timezone",
            UserUpdate {
                timezone: Some("Asia/Tokyo".into()),
                ..Default::default()
            },
            "Asia/Tokyo",
        ),
        (
            "avatar_url",
            UserUpdate {
                avatar_url: Some("https://cdn.example.com/x-1.png".into()),
                ..Default::default()
            },
            "https://cdn.example.com/x-1.png",
        ),
        (
            "is_opted_in::text",
            UserUpdate {
                is_opted_in: Some(true),
                ..Default::default()
            },
            "true",
        ),
    ];
    for (column, update, stored) in single {
        me.update_user(UpdateUserRequest {
            id: w.x.clone(),
            user: Some(update),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("{column} alone: {s:?}"));
        assert_eq!(row_of(column).await, [stored], "{column} alone");
    }

    // All of them at once.
    let updated = me
        .update_user(UpdateUserRequest {
            id: w.x.clone(),
            user: Some(UserUpdate {
                first_name: Some("Xavier".into()),
                last_name: Some("Yates".into()),
                phone: Some("+15550001111".into()),
                locale: Some("fr-FR".into()),
                timezone: Some("Europe/Paris".into()),
                avatar_url: Some("https://cdn.example.com/x-2.png".into()),
                is_opted_in: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("an end user updates its own profile")
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.id, w.x);
    assert_eq!(updated.first_name, "Xavier");
    assert_eq!(
        row_of("first_name, last_name, phone, locale, timezone, avatar_url, is_opted_in::text")
            .await,
        [
            "Xavier",
            "Yates",
            "+15550001111",
            "fr-FR",
            "Europe/Paris",
            "https://cdn.example.com/x-2.png",
            "false",
        ]
    );
    assert_eq!(row_of(untouched).await, restricted_before);
}

// ---------------------------------------------------------------------------
// Tenant-bound keys creating users
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_editors_user_without_a_tenant_lands_in_the_editors_tenant() {
    let w = world().await;
    let default_tenant = w.app.default_tenant().await;
    assert_ne!(default_tenant, w.tenant_a);
    let mut editor = w.app.users_as(w.token(Caller::EditorA));
    for (case, tenant_id) in [
        ("empty tenantId", String::new()),
        ("own tenantId", w.tenant_a.clone()),
    ] {
        let created = editor
            .create_user(CreateUserRequest {
                user: Some(User {
                    tenant_id: tenant_id.clone(),
                    ..user(&format!("editor-made-{}", tenant_id.len()), "")
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("{case}: {s:?}"))
            .into_inner()
            .user
            .unwrap();
        assert_eq!(created.tenant_id, w.tenant_a, "{case}");
        let stored: String = w
            .app
            .db
            .query_one(
                "SELECT tenant_id::text FROM users WHERE id = $1",
                &[&Uuid::parse_str(&created.id).unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(stored, w.tenant_a, "{case}");
    }
}

#[tokio::test]
async fn an_editor_cannot_create_users_in_another_tenant() {
    let w = world().await;
    let default_tenant = w.app.default_tenant().await;
    let unknown = Uuid::now_v7().to_string();
    let mut editor = w.app.users_as(w.token(Caller::EditorA));
    for (case, tenant_id) in [
        ("tenant B", w.tenant_b.as_str()),
        ("the default tenant", default_tenant.as_str()),
        ("a tenant that does not exist", unknown.as_str()),
    ] {
        let before = snapshot(&w.app).await;
        let status = editor
            .create_user(CreateUserRequest {
                user: Some(User {
                    tenant_id: tenant_id.into(),
                    ..user("intruder", "intruder@example.com")
                }),
                ..Default::default()
            })
            .await
            .expect_err(case);
        assert_eq!(status.code(), Code::PermissionDenied, "{case}: {status:?}");
        assert_eq!(
            snapshot(&w.app).await,
            before,
            "{case} changed the database"
        );
    }
}

// ---------------------------------------------------------------------------
// Bad credentials
// ---------------------------------------------------------------------------

/// GetUser with the malformed id "nope" and `authorization: <header>`: a
/// handler would answer INVALID_ARGUMENT, so UNAUTHENTICATED means none ran.
async fn get_nope(app: &TestApp, header: Option<&str>) -> Status {
    let mut request = tonic::Request::new(GetUserRequest {
        id: "nope".into(),
        ..Default::default()
    });
    if let Some(header) = header {
        request
            .metadata_mut()
            .insert("authorization", header.parse().expect("ASCII header"));
    }
    app.users_as(None)
        .get_user(request)
        .await
        .expect_err("GetUser of \"nope\" fails")
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_with_one_message_before_any_handler() {
    let app = spawn_app().await;
    let key = app.create_key(Role::Admin, None, None).await;
    let user_id = Uuid::now_v7().to_string();
    let good_jwt = user_token(&user_id);

    // The controls: with good credentials the same call reaches the handler.
    for (case, token) in [("API key", &key), ("JWT", &good_jwt)] {
        let status = get_nope(&app, Some(&format!("Bearer {token}"))).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "good {case}: {status:?}"
        );
    }

    let base = claims(&user_id);
    let public_pem = std::fs::read(fixture("jwt-rs256-public.pem")).unwrap();
    let key_confusion = encode(
        &Header::new(Algorithm::HS256),
        &base,
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&base)
    );
    let tampered = {
        // A valid signature over someone else's claims.
        let mut parts: Vec<String> = good_jwt.split('.').map(str::to_owned).collect();
        parts[1] = b64(&claims(&Uuid::now_v7().to_string()));
        parts.join(".")
    };
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("Bearer without a token", Some("Bearer".into())),
        ("Bearer and a space", Some("Bearer ".into())),
        ("Basic scheme", Some("Basic abc".into())),
        (
            "Basic scheme with a valid key",
            Some(format!("Basic {key}")),
        ),
        ("a bare valid key without scheme", Some(key.clone())),
        ("garbage", Some("Bearer garbage".into())),
        (
            "unknown key id",
            Some(format!("Bearer usk_{}_{}", random_hex(8), secret_of(&key))),
        ),
        (
            "right key id, wrong secret",
            Some(format!("Bearer usk_{}_{}", id_of(&key), random_hex(32))),
        ),
        (
            "expired JWT",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "exp", json!(now_secs() - 3600)))
            )),
        ),
        (
            "JWT without exp",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "exp", json!(null)))
            )),
        ),
        (
            "JWT with the wrong issuer",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "iss", json!("https://evil.test")))
            )),
        ),
        (
            "JWT with the wrong audience",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "aud", json!("another-service")))
            )),
        ),
        (
            "JWT without sub",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "sub", json!(null)))
            )),
        ),
        (
            "JWT whose sub is not a UUID",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "sub", json!("not-a-uuid")))
            )),
        ),
        (
            "JWT whose sub is a braced UUID",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "sub", json!(format!("{{{user_id}}}"))))
            )),
        ),
        (
            "JWT whose sub is a urn:uuid",
            Some(format!(
                "Bearer {}",
                sign(&with(
                    base.clone(),
                    "sub",
                    json!(format!("urn:uuid:{user_id}"))
                ))
            )),
        ),
        (
            "JWT whose sub is an upper-case UUID",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "sub", json!(user_id.to_uppercase())))
            )),
        ),
        (
            "JWT not valid before an hour from now",
            Some(format!(
                "Bearer {}",
                sign(&with(base.clone(), "nbf", json!(now_secs() + 3600)))
            )),
        ),
        ("unsigned alg none JWT", Some(format!("Bearer {alg_none}"))),
        (
            "HS256 JWT keyed with the RSA public key",
            Some(format!("Bearer {key_confusion}")),
        ),
        (
            "JWT with tampered claims",
            Some(format!("Bearer {tampered}")),
        ),
    ];

    let mut answers = Vec::new();
    for (case, header) in &cases {
        let status = get_nope(&app, header.as_deref()).await;
        assert_eq!(status.code(), Code::Unauthenticated, "{case}: {status:?}");
        answers.push((case, status.message().to_owned(), status.details().to_vec()));
    }
    let (first_case, message, details) = &answers[0];
    assert!(!message.is_empty());
    for (case, m, d) in &answers {
        assert_eq!(
            (m, d),
            (message, details),
            "{case} answers differently from {first_case}"
        );
    }
}

#[tokio::test]
async fn a_revoked_key_is_refused_once_the_cache_period_has_passed() {
    let app = spawn_app().await;
    let key = app.create_key(Role::Admin, None, None).await;
    let header = format!("Bearer {key}");

    let status = get_nope(&app, Some(&header)).await;
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "before revocation: {status:?}"
    );

    let revoked = app
        .db
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1",
            &[&id_of(&key)],
        )
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    tokio::time::sleep(app.config.key_cache_ttl + Duration::from_millis(200)).await;

    let status = get_nope(&app, Some(&header)).await;
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "after revocation: {status:?}"
    );
    let anonymous = get_nope(&app, None).await;
    assert_eq!(
        (status.message(), status.details()),
        (anonymous.message(), anonymous.details()),
        "a revoked key is told apart from no credentials"
    );
}

/// Replicas on one database, each caching keys for a minute: a key revoked
/// or demoted in the database is refused (or acts with its new role) on
/// every replica within a second, told by Postgres rather than waiting for
/// the cache period.
#[tokio::test]
async fn a_key_revoked_or_demoted_is_refused_on_every_replica_within_a_second() {
    let name = crate::helpers::fresh_database().await;
    let config = || {
        let mut config = crate::helpers::test_config(Some(crate::helpers::server().url(&name)));
        config.key_cache_ttl = Duration::from_secs(60);
        config
    };
    let first = crate::helpers::spawn_with(config()).await;
    let mut second_config = config();
    second_config.data_dir = first.config.data_dir.clone();
    let second = crate::helpers::spawn_with(second_config).await;
    let replicas = [&first, &second];

    let revoked = first.create_key(Role::Admin, None, None).await;
    let demoted = first.create_key(Role::Admin, None, None).await;
    let kept = first.create_key(Role::Admin, None, None).await;
    // Every key verified, and cached, on both replicas.
    for app in replicas {
        for key in [&revoked, &demoted, &kept] {
            let status = get_nope(app, Some(&format!("Bearer {key}"))).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        }
    }
    let tenant = first.default_tenant().await;
    first
        .db
        .execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = $1",
            &[&id_of(&revoked)],
        )
        .await
        .unwrap();
    first
        .db
        .execute(
            "UPDATE api_keys SET role = 'viewer', tenant_id = $2::text::uuid WHERE id = $1",
            &[&id_of(&demoted), &tenant],
        )
        .await
        .unwrap();
    let changed = std::time::Instant::now();
    for app in replicas {
        loop {
            let refused = get_nope(app, Some(&format!("Bearer {revoked}"))).await;
            // A viewer may not write: refused before its request is read
            // (an admin learns that the id is malformed).
            let demoted = app
                .users_as(Some(&demoted))
                .deactivate_user(DeactivateUserRequest {
                    id: "nope".into(),
                    ..Default::default()
                })
                .await;
            if refused.code() == Code::Unauthenticated
                && demoted.as_ref().err().map(Status::code) == Some(Code::PermissionDenied)
            {
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(1),
                "still {:?} and {:?} after a second",
                refused.code(),
                demoted.map(|_| ()).map_err(|s| s.code())
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The others are as they were, on both.
    for app in replicas {
        let status = get_nope(app, Some(&format!("Bearer {kept}"))).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    first.shutdown().await;
    second.shutdown().await;
    crate::helpers::drop_database(&name);
}

// ---------------------------------------------------------------------------
// Storage of keys
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_database_holds_no_plaintext_key_secret() {
    let app = spawn_app().await;
    let tenant = Uuid::parse_str(&app.default_tenant().await).unwrap();
    let created = app.create_key(Role::Editor, Some(tenant), None).await;
    let rows: Vec<(String, String, String)> = app
        .db
        .query(
            "SELECT id, t::text, encode(secret_sha256, 'hex') FROM api_keys t",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(rows.len(), 2, "the bootstrap key and the new one: {rows:?}");

    for token in [&created, &app.admin_token] {
        let secret = secret_of(token);
        // The secret as text, as raw bytes (bytea shows them as hex), and as
        // the hex of its text.
        let forms = [token.to_string(), secret.to_owned(), hex_of_ascii(secret)];
        for (_, row, _) in &rows {
            for form in &forms {
                assert!(
                    !row.contains(form.as_str()),
                    "api_keys row {row} holds the secret of {}",
                    id_of(token)
                );
            }
        }
        // What it holds instead is the SHA-256 of the secret.
        let (_, _, stored) = rows
            .iter()
            .find(|(id, _, _)| id == id_of(token))
            .expect("a row for the key");
        assert_eq!(*stored, hex_digest(secret));
    }
}

fn hex_of_ascii(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_digest(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------
// Deactivated end users, and floods of bad credentials
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_deactivated_users_token_is_refused_until_it_is_reactivated() {
    let mut app = spawn_app().await;
    let created = crate::users::create(&mut app, user("ada", "ada@example.com")).await;
    let token = user_token(&created.id);
    let mut own = app.users_as(Some(&token));
    let read = |id: &str| GetUserRequest {
        id: id.to_owned(),
        ..Default::default()
    };
    let rename = |id: &str| UpdateUserRequest {
        id: id.to_owned(),
        user: Some(UserUpdate {
            first_name: Some("Ada".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    own.get_user(read(&created.id))
        .await
        .expect("active: reads");
    // A token whose sub has no user still authenticates (and finds nothing).
    let nobody = Uuid::now_v7().to_string();
    let status = app
        .users_as(Some(&user_token(&nobody)))
        .get_user(read(&nobody))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    crate::users::deactivate(&mut app, &created.id).await;
    tokio::time::sleep(app.config.key_cache_ttl + Duration::from_millis(200)).await;
    for status in [
        own.get_user(read(&created.id)).await.unwrap_err(),
        own.update_user(rename(&created.id)).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    let stored: String = app
        .db
        .query_one("SELECT first_name FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "", "the refused update changed nothing");

    crate::users::reactivate(&mut app, &created.id).await;
    tokio::time::sleep(app.config.key_cache_ttl + Duration::from_millis(200)).await;
    own.update_user(rename(&created.id))
        .await
        .expect("reactivated: updates");
}

/// A call with a well-formed key token whose id no key has.
async fn unknown_key_call(app: &TestApp, id: &str) -> Status {
    let token = format!("usk_{id}_{}", random_hex(32));
    let mut request = tonic::Request::new(GetUserRequest {
        id: Uuid::now_v7().to_string(),
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(1500));
    app.users_as(Some(&token))
        .get_user(request)
        .await
        .expect_err("an unknown key is refused")
}

#[tokio::test]
async fn a_flood_of_unknown_key_ids_is_refused_before_the_database_and_known_keys_still_work() {
    let app = crate::limits::app_with(|c| {
        c.auth_failures_per_second = std::num::NonZeroU32::new(5).unwrap();
        // Long enough for the service's key to stay cached through the
        // flood below; the lookups that hang on the lock end sooner.
        c.key_cache_ttl = Duration::from_secs(4);
        c.db_statement_timeout = Duration::from_secs(1);
    })
    .await;
    let service_key = app.create_key(Role::Admin, None, None).await;
    let header = format!("Bearer {service_key}");
    assert_eq!(
        get_nope(&app, Some(&header)).await.code(),
        Code::InvalidArgument,
        "the service's key works"
    );
    let looked_up = random_hex(8);
    assert_eq!(
        unknown_key_call(&app, &looked_up).await.code(),
        Code::Unauthenticated
    );

    // With api_keys locked, any lookup would hang: what answers at once
    // did no database work.
    let (locker, connection) = app.db_config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker
        .batch_execute("BEGIN; LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();

    // An id found unknown is answered from memory.
    assert_eq!(
        unknown_key_call(&app, &looked_up).await.code(),
        Code::Unauthenticated
    );
    // A flood of never-seen ids: the budget (15 at once) gets lookups, which
    // hang on the lock; the rest are refused at once.
    let started = std::time::Instant::now();
    let flood = futures::future::join_all((0..60).map(|_| {
        let id = random_hex(8);
        let app = &app;
        async move {
            let status = unknown_key_call(app, &id).await;
            (status.code(), started.elapsed())
        }
    }))
    .await;
    let refused: Vec<_> = flood
        .iter()
        .filter(|(code, _)| *code == Code::ResourceExhausted)
        .collect();
    assert!(
        refused.len() >= 40,
        "{} of 60 refused: {flood:?}",
        refused.len()
    );
    assert!(
        refused
            .iter()
            .all(|(_, at)| *at < Duration::from_millis(1000)),
        "refused without waiting for the database: {refused:?}"
    );
    // The service behind the same address is not limited by the flood.
    assert_eq!(
        get_nope(&app, Some(&header)).await.code(),
        Code::InvalidArgument
    );

    locker.batch_execute("ROLLBACK").await.unwrap();

    // Once its cache entry has expired, a known key is looked up again even
    // while its address is over the failure budget; a key never seen before
    // waits for the budget to refill.
    let new_key = app.create_key(Role::Admin, None, None).await;
    tokio::time::sleep(app.config.key_cache_ttl + Duration::from_millis(200)).await;
    for _ in 0..30 {
        unknown_key_call(&app, &random_hex(8)).await;
    }
    assert_eq!(
        unknown_key_call(&app, &random_hex(8)).await.code(),
        Code::ResourceExhausted,
        "the address is over its budget"
    );
    assert_eq!(
        get_nope(&app, Some(&header)).await.code(),
        Code::InvalidArgument
    );
    assert_eq!(
        get_nope(&app, Some(&format!("Bearer {new_key}")))
            .await
            .code(),
        Code::ResourceExhausted
    );
}
