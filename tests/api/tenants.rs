//! CreateTenant, GetTenant, UpdateTenant, ListTenants.

use tonic::Code;
use users_service::pb::v1::{
    CreateTenantRequest, GetTenantRequest, ListTenantsRequest, ListTenantsResponse,
    ListUsersRequest, StringFilter, Tenant, TenantFilter, TenantUpdate, UpdateTenantRequest, User,
    UserFilter,
};

use crate::helpers::{TestApp, error_info, spawn_app, violated_fields};
use crate::users::{create, user};

/// Creates a tenant through the API and returns it.
pub async fn create_tenant(app: &mut TestApp, name: &str, reference: &str) -> Tenant {
    app.tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: name.into(),
                reference: reference.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create tenant succeeds")
        .into_inner()
        .tenant
        .unwrap()
}

async fn create_tenant_err(app: &mut TestApp, name: &str, reference: &str) -> tonic::Status {
    app.tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                name: name.into(),
                reference: reference.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect_err("create tenant fails")
}

async fn get_tenant(app: &mut TestApp, id: &str) -> Result<Tenant, tonic::Status> {
    app.tenants
        .get_tenant(GetTenantRequest {
            id: id.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().tenant.unwrap())
}

async fn update_tenant(
    app: &mut TestApp,
    id: &str,
    update: TenantUpdate,
) -> Result<Tenant, tonic::Status> {
    app.tenants
        .update_tenant(UpdateTenantRequest {
            id: id.into(),
            tenant: Some(update),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().tenant.unwrap())
}

async fn list_tenants(app: &mut TestApp, request: ListTenantsRequest) -> ListTenantsResponse {
    app.tenants
        .list_tenants(request)
        .await
        .expect("list tenants succeeds")
        .into_inner()
}

async fn list_tenants_err(app: &mut TestApp, request: ListTenantsRequest) -> tonic::Status {
    app.tenants
        .list_tenants(request)
        .await
        .expect_err("list tenants fails")
}

fn ids(tenants: &[Tenant]) -> Vec<String> {
    tenants.iter().map(|t| t.id.clone()).collect()
}

fn by_reference(filter: StringFilter) -> Option<TenantFilter> {
    Some(TenantFilter {
        reference: Some(filter),
        ..Default::default()
    })
}

fn by_id(filter: StringFilter) -> Option<TenantFilter> {
    Some(TenantFilter {
        id: Some(filter),
        ..Default::default()
    })
}

/// (name, reference, is_default, created_at) of a tenant row.
async fn tenant_row(
    app: &TestApp,
    id: &str,
) -> Option<(String, String, bool, prost_types::Timestamp)> {
    let row = app
        .db
        .query_opt(
            "SELECT name, reference, is_default, \
             (extract(epoch from created_at) * 1000000)::bigint \
             FROM tenants WHERE id::text = $1",
            &[&id],
        )
        .await
        .unwrap()?;
    let micros: i64 = row.get(3);
    Some((
        row.get(0),
        row.get(1),
        row.get(2),
        prost_types::Timestamp {
            seconds: micros.div_euclid(1_000_000),
            nanos: (micros.rem_euclid(1_000_000) * 1000) as i32,
        },
    ))
}

#[tokio::test]
async fn default_tenant_exists_with_reference_default() {
    let mut app = spawn_app().await;
    let default_id = app.default_tenant().await;
    let page = list_tenants(
        &mut app,
        ListTenantsRequest {
            filter: by_reference(StringFilter {
                equal_to: Some("default".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page.total_count, Some(1));
    assert_eq!(ids(&page.data), vec![default_id.clone()]);
    assert_eq!(page.data[0].reference, "default");
    assert!(!page.data[0].name.is_empty());
    assert!(page.next_page_token.is_empty());

    let got = get_tenant(&mut app, &default_id).await.unwrap();
    assert_eq!(got, page.data[0]);

    // On a fresh database it is the only tenant.
    let all = list_tenants(&mut app, ListTenantsRequest::default()).await;
    assert_eq!(all.total_count, Some(1));
    assert_eq!(ids(&all.data), [default_id]);
}

#[tokio::test]
async fn create_tenant_returns_the_tenant_and_stores_it() {
    let mut app = spawn_app().await;
    let created = app
        .tenants
        .create_tenant(CreateTenantRequest {
            tenant: Some(Tenant {
                id: "00000000-0000-0000-0000-000000000001".into(),
                name: "Acme".into(),
                reference: "acme".into(),
                created_at: Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 0,
                }),
                updated_at: None,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap();

    let id = uuid::Uuid::parse_str(&created.id).expect("id is a UUID");
    assert_ne!(created.id, "00000000-0000-0000-0000-000000000001");
    assert_eq!(id.get_version_num(), 7);
    assert_eq!(created.name, "Acme");
    assert_eq!(created.reference, "acme");
    assert!(created.created_at.is_some());
    assert_ne!(created.created_at.unwrap().seconds, 1);
    assert_eq!(created.created_at, created.updated_at);

    let (name, reference, is_default, created_at) =
        tenant_row(&app, &created.id).await.expect("row stored");
    assert_eq!(name, "Acme");
    assert_eq!(reference, "acme");
    assert!(!is_default);
    assert_eq!(Some(created_at), created.created_at);
    let count: i64 = app
        .db
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn create_tenant_without_reference_is_fine_and_empty_references_never_clash() {
    let mut app = spawn_app().await;
    let a = create_tenant(&mut app, "A", "").await;
    let b = create_tenant(&mut app, "B", "").await;
    assert_ne!(a.id, b.id);
    assert_eq!(a.reference, "");
    assert_eq!(b.reference, "");
    let count: i64 = app
        .db
        .query_one("SELECT count(*) FROM tenants WHERE reference = ''", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn get_tenant_returns_the_stored_tenant() {
    let mut app = spawn_app().await;
    let created = create_tenant(&mut app, "Acme", "acme").await;
    let got = get_tenant(&mut app, &created.id).await.unwrap();
    assert_eq!(got, created);
}

#[tokio::test]
async fn get_and_update_tenant_with_unknown_id_are_not_found() {
    let mut app = spawn_app().await;
    create_tenant(&mut app, "Acme", "acme").await;
    let unknown = uuid::Uuid::now_v7().to_string();

    let get = get_tenant(&mut app, &unknown).await.unwrap_err();
    assert_eq!(get.code(), Code::NotFound, "{get:?}");
    assert_eq!(error_info(&get).unwrap().1["resource"], "tenant");

    let update = update_tenant(
        &mut app,
        &unknown,
        TenantUpdate {
            name: Some("X".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(update.code(), Code::NotFound, "{update:?}");
}

#[tokio::test]
async fn get_and_update_tenant_with_malformed_id_are_invalid_argument() {
    let mut app = spawn_app().await;
    for id in ["not-a-uuid", "", "1234"] {
        let get = get_tenant(&mut app, id).await.unwrap_err();
        assert_eq!(get.code(), Code::InvalidArgument, "id {id:?}: {get:?}");
        assert_eq!(violated_fields(&get), ["id"]);

        let update = update_tenant(
            &mut app,
            id,
            TenantUpdate {
                name: Some("X".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert_eq!(
            update.code(),
            Code::InvalidArgument,
            "id {id:?}: {update:?}"
        );
        assert_eq!(violated_fields(&update), ["id"]);
    }
}

#[tokio::test]
async fn update_tenant_changes_only_the_fields_present() {
    let mut app = spawn_app().await;
    let created = create_tenant(&mut app, "Acme", "acme").await;

    let renamed = update_tenant(
        &mut app,
        &created.id,
        TenantUpdate {
            name: Some("Acme Corp".into()),
            reference: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(renamed.name, "Acme Corp");
    assert_eq!(renamed.reference, "acme");
    assert_eq!(renamed.created_at, created.created_at);
    assert_ne!(renamed.updated_at, created.updated_at);
    assert_eq!(
        renamed,
        Tenant {
            name: "Acme Corp".into(),
            updated_at: renamed.updated_at,
            ..created.clone()
        }
    );

    let re_referenced = update_tenant(
        &mut app,
        &created.id,
        TenantUpdate {
            name: None,
            reference: Some("acme-2".into()),
        },
    )
    .await
    .unwrap();
    assert_eq!(re_referenced.name, "Acme Corp");
    assert_eq!(re_referenced.reference, "acme-2");

    let (name, reference, _, _) = tenant_row(&app, &created.id).await.unwrap();
    assert_eq!((name.as_str(), reference.as_str()), ("Acme Corp", "acme-2"));
    assert_eq!(
        get_tenant(&mut app, &created.id).await.unwrap(),
        re_referenced
    );

    // An empty reference clears it.
    let cleared = update_tenant(
        &mut app,
        &created.id,
        TenantUpdate {
            name: None,
            reference: Some(String::new()),
        },
    )
    .await
    .unwrap();
    assert_eq!(cleared.reference, "");
    assert_eq!(cleared.name, "Acme Corp");
    let (_, reference, _, _) = tenant_row(&app, &created.id).await.unwrap();
    assert_eq!(reference, "");
}

#[tokio::test]
async fn update_tenant_with_no_fields_changes_nothing_but_updated_at() {
    let mut app = spawn_app().await;
    let created = create_tenant(&mut app, "Acme", "acme").await;
    let same = update_tenant(&mut app, &created.id, TenantUpdate::default())
        .await
        .unwrap();
    assert_eq!(same.name, created.name);
    assert_eq!(same.reference, created.reference);
    assert_eq!(same.created_at, created.created_at);
}

#[tokio::test]
async fn create_tenant_with_empty_name_is_invalid_argument() {
    let mut app = spawn_app().await;
    let status = create_tenant_err(&mut app, "", "acme").await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["tenant.name"]);

    let missing = app
        .tenants
        .create_tenant(CreateTenantRequest {
            tenant: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&missing), ["tenant"]);

    let count: i64 = app
        .db
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1, "only the default tenant");
}

#[tokio::test]
async fn update_tenant_with_empty_name_is_invalid_argument_and_changes_nothing() {
    let mut app = spawn_app().await;
    let created = create_tenant(&mut app, "Acme", "acme").await;
    let status = update_tenant(
        &mut app,
        &created.id,
        TenantUpdate {
            name: Some(String::new()),
            reference: Some("other".into()),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["tenant.name"]);
    let (name, reference, _, _) = tenant_row(&app, &created.id).await.unwrap();
    assert_eq!((name.as_str(), reference.as_str()), ("Acme", "acme"));
}

#[tokio::test]
async fn create_tenant_with_a_taken_reference_is_already_exists() {
    let mut app = spawn_app().await;
    create_tenant(&mut app, "Acme", "acme").await;

    for reference in ["acme", "default"] {
        let status = create_tenant_err(&mut app, "Other", reference).await;
        assert_eq!(
            status.code(),
            Code::AlreadyExists,
            "{reference}: {status:?}"
        );
        let (reason, metadata) = error_info(&status).expect("ErrorInfo");
        assert_eq!(reason, "ALREADY_EXISTS");
        assert_eq!(metadata["field"], "reference");
        assert_eq!(metadata["resource"], "tenant");
    }
    let count: i64 = app
        .db
        .query_one("SELECT count(*) FROM tenants", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
}

#[tokio::test]
async fn update_tenant_to_a_taken_reference_is_already_exists_and_changes_nothing() {
    let mut app = spawn_app().await;
    create_tenant(&mut app, "Acme", "acme").await;
    let other = create_tenant(&mut app, "Other", "other").await;
    let status = update_tenant(
        &mut app,
        &other.id,
        TenantUpdate {
            name: Some("Renamed".into()),
            reference: Some("acme".into()),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(error_info(&status).unwrap().1["field"], "reference");
    let (name, reference, _, _) = tenant_row(&app, &other.id).await.unwrap();
    assert_eq!((name.as_str(), reference.as_str()), ("Other", "other"));
}

#[tokio::test]
async fn list_tenants_filters_by_id() {
    let mut app = spawn_app().await;
    let a = create_tenant(&mut app, "A", "a").await;
    let b = create_tenant(&mut app, "B", "b").await;
    let c = create_tenant(&mut app, "C", "c").await;

    let one = list_tenants(
        &mut app,
        ListTenantsRequest {
            filter: by_id(StringFilter {
                equal_to: Some(b.id.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one.data, vec![b.clone()]);
    assert_eq!(one.total_count, Some(1));

    let two = list_tenants(
        &mut app,
        ListTenantsRequest {
            filter: by_id(StringFilter {
                value_in: vec![a.id.clone(), c.id.clone()],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&two.data), [a.id.clone(), c.id.clone()]);
    assert_eq!(two.total_count, Some(2));

    let default_id = app.default_tenant().await;
    let others = list_tenants(
        &mut app,
        ListTenantsRequest {
            filter: by_id(StringFilter {
                not_equal_to: Some(default_id),
                value_not_in: vec![a.id.clone()],
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&others.data), [b.id.clone(), c.id.clone()]);
    assert_eq!(others.total_count, Some(2));

    let unknown = list_tenants(
        &mut app,
        ListTenantsRequest {
            filter: by_id(StringFilter {
                equal_to: Some(uuid::Uuid::now_v7().to_string()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert!(unknown.data.is_empty());
    assert_eq!(unknown.total_count, Some(0));

    let malformed = list_tenants_err(
        &mut app,
        ListTenantsRequest {
            filter: by_id(StringFilter {
                equal_to: Some("nope".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&malformed), ["filter.id.equal_to"]);
}

#[tokio::test]
async fn list_tenants_filters_by_reference() {
    let mut app = spawn_app().await;
    let alpha = create_tenant(&mut app, "Alpha", "team-alpha").await;
    let beta = create_tenant(&mut app, "Beta", "team-beta").await;
    let gamma = create_tenant(&mut app, "Gamma", "TEAM-gamma").await;
    let default_id = app.default_tenant().await;

    let cases: Vec<(StringFilter, Vec<&str>)> = vec![
        (
            StringFilter {
                equal_to: Some("team-beta".into()),
                ..Default::default()
            },
            vec![beta.id.as_str()],
        ),
        (
            StringFilter {
                not_equal_to: Some("team-beta".into()),
                ..Default::default()
            },
            vec![default_id.as_str(), alpha.id.as_str(), gamma.id.as_str()],
        ),
        (
            StringFilter {
                value_in: vec!["team-alpha".into(), "TEAM-gamma".into(), "nope".into()],
                ..Default::default()
            },
            vec![alpha.id.as_str(), gamma.id.as_str()],
        ),
        (
            StringFilter {
                value_not_in: vec!["default".into(), "team-alpha".into()],
                ..Default::default()
            },
            vec![beta.id.as_str(), gamma.id.as_str()],
        ),
        (
            StringFilter {
                like: Some("team-%".into()),
                ..Default::default()
            },
            vec![alpha.id.as_str(), beta.id.as_str()],
        ),
        (
            StringFilter {
                i_like: Some("team-%".into()),
                ..Default::default()
            },
            vec![alpha.id.as_str(), beta.id.as_str(), gamma.id.as_str()],
        ),
    ];
    for (filter, expected) in cases {
        let page = list_tenants(
            &mut app,
            ListTenantsRequest {
                filter: by_reference(filter.clone()),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(ids(&page.data), expected, "{filter:?}");
        assert_eq!(page.total_count, Some(expected.len() as i64), "{filter:?}");
    }
}

#[tokio::test]
async fn list_tenants_pages_by_limit_and_offset_with_total_count() {
    let mut app = spawn_app().await;
    let mut all = vec![app.default_tenant().await];
    for i in 0..4 {
        all.push(
            create_tenant(&mut app, &format!("T{i}"), &format!("t{i}"))
                .await
                .id,
        );
    }

    let page = |limit, offset| ListTenantsRequest {
        limit: Some(limit),
        offset,
        ..Default::default()
    };
    let first = list_tenants(&mut app, page(2, 0)).await;
    assert_eq!(ids(&first.data), all[0..2]);
    assert_eq!(first.total_count, Some(5));
    let middle = list_tenants(&mut app, page(2, 2)).await;
    assert_eq!(ids(&middle.data), all[2..4]);
    assert_eq!(middle.total_count, Some(5));
    let last = list_tenants(&mut app, page(2, 4)).await;
    assert_eq!(ids(&last.data), all[4..5]);
    assert!(last.next_page_token.is_empty());
    let past = list_tenants(&mut app, page(2, 10)).await;
    assert!(past.data.is_empty());
    assert_eq!(past.total_count, Some(5));

    let none = list_tenants(&mut app, page(0, 0)).await;
    assert!(none.data.is_empty());
    assert_eq!(none.total_count, Some(5));

    let uncounted = list_tenants(
        &mut app,
        ListTenantsRequest {
            limit: Some(3),
            skip_total_count: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&uncounted.data), all[0..3]);
    assert_eq!(uncounted.total_count, None);

    for (limit, offset, field) in [(1001, 0, "limit"), (-1, 0, "limit"), (10, -1, "offset")] {
        let status = list_tenants_err(&mut app, page(limit, offset)).await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&status), [field]);
    }
}

#[tokio::test]
async fn list_tenants_page_tokens_walk_every_tenant_once() {
    let mut app = spawn_app().await;
    let mut all = vec![app.default_tenant().await];
    for i in 0..4 {
        all.push(
            create_tenant(&mut app, &format!("T{i}"), &format!("t{i}"))
                .await
                .id,
        );
    }

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_tenants(
            &mut app,
            ListTenantsRequest {
                limit: Some(2),
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(page.total_count, Some(5));
        seen.extend(ids(&page.data));
        pages += 1;
        assert!(pages <= 3, "too many pages: {seen:?}");
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, all);

    // Filtered walk; a tenant created between pages shows up on a later page.
    let filter = by_reference(StringFilter {
        like: Some("t%".into()),
        ..Default::default()
    });
    let first = list_tenants(
        &mut app,
        ListTenantsRequest {
            limit: Some(3),
            filter: filter.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&first.data), all[1..4]);
    assert!(!first.next_page_token.is_empty());
    let late = create_tenant(&mut app, "Late", "t-late").await;
    let second = list_tenants(
        &mut app,
        ListTenantsRequest {
            limit: Some(3),
            filter: filter.clone(),
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&second.data), [all[4].clone(), late.id]);
    assert!(second.next_page_token.is_empty());

    // The token belongs to its filter.
    let other_filter = list_tenants_err(
        &mut app,
        ListTenantsRequest {
            limit: Some(3),
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(other_filter.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&other_filter), ["page_token"]);

    let garbage = list_tenants_err(
        &mut app,
        ListTenantsRequest {
            page_token: "garbage!".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(garbage.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&garbage), ["page_token"]);

    let with_offset = list_tenants_err(
        &mut app,
        ListTenantsRequest {
            limit: Some(3),
            offset: 1,
            filter,
            page_token: first.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(with_offset.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&with_offset), ["offset"]);
}

#[tokio::test]
async fn user_created_with_a_tenant_id_lands_in_that_tenant() {
    let mut app = spawn_app().await;
    let acme = create_tenant(&mut app, "Acme", "acme").await;
    let in_acme = create(
        &mut app,
        User {
            tenant_id: acme.id.clone(),
            ..user("ref-1", "anna@example.com")
        },
    )
    .await;
    let in_default = create(&mut app, user("ref-2", "bob@example.com")).await;
    assert_eq!(in_acme.tenant_id, acme.id);
    assert_eq!(in_default.tenant_id, app.default_tenant().await);

    let stored: String = app
        .db
        .query_one(
            "SELECT tenant_id::text FROM users WHERE id::text = $1",
            &[&in_acme.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, acme.id);

    let listed = app
        .users
        .list_users(ListUsersRequest {
            filter: Some(UserFilter {
                tenant_id: Some(StringFilter {
                    equal_to: Some(acme.id.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.data, [in_acme]);
    assert_eq!(listed.total_count, Some(1));
}
