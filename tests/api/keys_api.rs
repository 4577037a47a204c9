//! KeysService: admins make, list and revoke API keys over the API, with an
//! optional expiry.

use std::time::Duration;

use sha2::Digest;

use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};
use users_service::{
    auth::Role,
    pb::v1::{
        self as pb, CreateKeyRequest, KeyRole, ListKeysRequest, ListUsersRequest, RevokeKeyRequest,
        keys_service_client::KeysServiceClient,
    },
};

use crate::helpers::{Bearer, TestApp, spawn_app, violated_fields};

type Keys = KeysServiceClient<InterceptedService<Channel, Bearer>>;

fn keys_as(app: &TestApp, token: &str) -> Keys {
    KeysServiceClient::with_interceptor(app.channel.clone(), Bearer::new(Some(token)))
}

/// The answer of a ListUsers call made with `token`: OK or its code.
async fn list_users_with(app: &TestApp, token: &str) -> Code {
    match app
        .users_as(Some(token))
        .list_users(ListUsersRequest::default())
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Waits up to 2 s for `token`'s calls to answer `code`.
async fn answers(app: &TestApp, token: &str, code: Code) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let got = list_users_with(app, token).await;
        if got == code {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key answers {got:?}, not {code:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every key the list shows, page after page of `page_size`.
async fn listed(keys: &mut Keys, page_size: i32, show_revoked: bool) -> Vec<pb::ApiKey> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = keys
            .list_keys(ListKeysRequest {
                page_size,
                page_token: page_token.clone(),
                show_revoked,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.keys.len() <= page_size as usize);
        all.extend(page.keys);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// Revokes the key `id`; the key as RevokeKey answers it.
async fn revoke(keys: &mut Keys, id: &str) -> pb::ApiKey {
    keys.revoke_key(RevokeKeyRequest { id: id.to_owned() })
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap()
}

/// `id` is listed only when revoked keys are asked for.
async fn listed_only_with_the_revoked(keys: &mut Keys, id: &str) {
    let has = |all: Vec<pb::ApiKey>| all.iter().any(|k| k.id == id);
    assert!(!has(listed(keys, 100, false).await), "{id} is listed");
    assert!(has(listed(keys, 100, true).await), "{id} is not listed");
}

#[tokio::test]
async fn an_admin_makes_lists_and_revokes_keys_over_the_api() {
    let app = spawn_app().await;
    let mut keys = keys_as(&app, &app.admin_token);
    let tenant = app.default_tenant().await;

    let created = keys
        .create_key(CreateKeyRequest {
            name: "billing".into(),
            role: KeyRole::Editor.into(),
            tenant_id: tenant.clone(),
            rate_limit_per_second: Some(50),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key.unwrap();
    assert_eq!(key.name, "billing");
    assert_eq!(key.role(), KeyRole::Editor);
    assert_eq!(key.tenant_id, tenant);
    assert_eq!(key.rate_limit_per_second, Some(50));
    assert!(key.create_time.is_some() && key.revoke_time.is_none());
    assert!(created.token.starts_with(&format!("usk_{}_", key.id)));
    answers(&app, &created.token, Code::Ok).await;

    // The database holds the key as asked, and a hash of its secret only.
    let row = app
        .db
        .query_one(
            "SELECT name, role, tenant_id::text, rate_limit_per_second, secret_sha256 \
             FROM api_keys WHERE id = $1",
            &[&key.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "billing");
    assert_eq!(row.get::<_, String>(1), "editor");
    assert_eq!(row.get::<_, String>(2), tenant);
    assert_eq!(row.get::<_, i32>(3), 50);
    let stored_hash: Vec<u8> = row.get(4);
    let secret = created.token.rsplit('_').next().unwrap();
    assert_eq!(
        stored_hash,
        sha2::Sha256::digest(secret.as_bytes()).to_vec()
    );

    // More keys, so that the list takes pages; ids are in order, once each.
    for n in 0..4 {
        keys.create_key(CreateKeyRequest {
            name: format!("viewer {n}"),
            role: KeyRole::Viewer.into(),
            tenant_id: tenant.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let all = listed(&mut keys, 2, false).await;
    let stored: i64 = app
        .db
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(all.len() as i64, stored);
    assert!(all.windows(2).all(|pair| pair[0].id < pair[1].id));
    assert!(all.iter().any(|listed| listed.id == key.id));

    // Revoked: refused at once, hidden unless asked for.
    let revoked = revoke(&mut keys, &key.id).await;
    assert!(revoked.revoke_time.is_some());
    answers(&app, &created.token, Code::Unauthenticated).await;
    let stored_revoked: bool = app
        .db
        .query_one(
            "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1",
            &[&key.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored_revoked);
    listed_only_with_the_revoked(&mut keys, &key.id).await;
    // Again: the first revocation time stays.
    let again = revoke(&mut keys, &key.id).await;
    assert_eq!(again.revoke_time, revoked.revoke_time);

    let unknown = keys
        .revoke_key(RevokeKeyRequest {
            id: "0123456789abcdef".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn a_key_stops_working_at_its_expire_time() {
    let app = spawn_app().await;
    let mut keys = keys_as(&app, &app.admin_token);
    let now = chrono::Utc::now();
    let expire_at = now + chrono::Duration::hours(1);
    let created = keys
        .create_key(CreateKeyRequest {
            name: "rotating".into(),
            role: KeyRole::Admin.into(),
            expire_time: Some(prost_types::Timestamp {
                seconds: expire_at.timestamp(),
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.key.unwrap();
    assert_eq!(
        key.expire_time.as_ref().unwrap().seconds,
        expire_at.timestamp()
    );
    // Used once, so that the replica has it cached when it expires.
    answers(&app, &created.token, Code::Ok).await;
    app.clock.advance(Duration::from_secs(2 * 3600));
    answers(&app, &created.token, Code::Unauthenticated).await;
    // Listed with the revoked ones only.
    listed_only_with_the_revoked(&mut keys, &key.id).await;
}

#[tokio::test]
async fn only_admins_manage_keys_and_bad_requests_are_refused() {
    let app = spawn_app().await;
    let tenant = app.default_tenant().await;
    let editor = app
        .create_key(Role::Editor, Some(tenant.parse().unwrap()), None)
        .await;
    let mut as_editor = keys_as(&app, &editor);
    let refused = [
        as_editor
            .create_key(CreateKeyRequest {
                role: KeyRole::Admin.into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        as_editor
            .list_keys(ListKeysRequest::default())
            .await
            .unwrap_err(),
        as_editor
            .revoke_key(RevokeKeyRequest {
                id: "0123456789abcdef".into(),
            })
            .await
            .unwrap_err(),
    ];
    for status in refused {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    }
    let before: i64 = app
        .db
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);

    let mut keys = keys_as(&app, &app.admin_token);
    let past = chrono::Utc::now() - chrono::Duration::minutes(1);
    let far = chrono::Utc::now() + chrono::Duration::days(3700);
    let cases: Vec<(CreateKeyRequest, &[&str])> = vec![
        (CreateKeyRequest::default(), &["role"]),
        (
            CreateKeyRequest {
                role: KeyRole::Admin.into(),
                tenant_id: tenant.clone(),
                ..Default::default()
            },
            &["tenant_id"],
        ),
        (
            CreateKeyRequest {
                role: KeyRole::Viewer.into(),
                ..Default::default()
            },
            &["tenant_id"],
        ),
        (
            CreateKeyRequest {
                role: KeyRole::Viewer.into(),
                tenant_id: uuid::Uuid::now_v7().to_string(),
                ..Default::default()
            },
            &["tenant_id"],
        ),
        (
            CreateKeyRequest {
                name: "x".repeat(256),
                role: KeyRole::Admin.into(),
                rate_limit_per_second: Some(0),
                expire_time: Some(prost_types::Timestamp {
                    seconds: past.timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            },
            &["expire_time", "name", "rate_limit_per_second"],
        ),
        (
            CreateKeyRequest {
                role: KeyRole::Admin.into(),
                rate_limit_per_second: Some(2_000_000),
                expire_time: Some(prost_types::Timestamp {
                    seconds: far.timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            },
            &["expire_time", "rate_limit_per_second"],
        ),
    ];
    for (request, fields) in cases {
        let status = keys.create_key(request.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}");
        assert_eq!(violated_fields(&status), *fields, "{request:?}");
    }
    for (request, field) in [
        (
            ListKeysRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size",
        ),
        (
            ListKeysRequest {
                page_token: "not a token".into(),
                ..Default::default()
            },
            "page_token",
        ),
    ] {
        let status = keys.list_keys(request).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
    }
    let status = keys
        .revoke_key(RevokeKeyRequest {
            id: "x".repeat(10_000),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["id"]);

    // Nothing refused was stored.
    let after: i64 = app
        .db
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, after);
}
