//! ListUsers: filters, search, order, paging and page tokens.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use tonic::Code;
use users_service::pb::v1::{
    BoolFilter, JsonFilter, ListUsersRequest, ListUsersResponse, SortDirection, StringFilter,
    Tenant, TimestampFilter, User, UserFilter, UserOrder, UserOrderField, UserUpdate,
};

use crate::helpers::{TestApp, spawn_app, violated_fields};
use crate::tenants::create_tenant;
use crate::users::{create, roq_user, update, user};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

pub(crate) async fn list(app: &mut TestApp, request: ListUsersRequest) -> ListUsersResponse {
    app.users
        .list_users(request.clone())
        .await
        .unwrap_or_else(|status| panic!("list {request:?} failed: {status:?}"))
        .into_inner()
}

pub(crate) async fn list_err(app: &mut TestApp, request: ListUsersRequest) -> tonic::Status {
    match app.users.list_users(request.clone()).await {
        Ok(response) => panic!("list {request:?} succeeded: {:?}", response.into_inner()),
        Err(status) => status,
    }
}

pub(crate) fn ids(users: &[User]) -> Vec<String> {
    users.iter().map(|u| u.id.clone()).collect()
}

pub(crate) fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Ids of `users`, sorted: the expected set of a filter.
pub(crate) fn set_of(users: &[&User]) -> Vec<String> {
    sorted(users.iter().map(|u| u.id.clone()).collect())
}

/// Lists with `filter` (one page big enough for all) and checks the exact
/// set of users returned and the total count.
pub(crate) async fn assert_filter(app: &mut TestApp, filter: UserFilter, expected: &[&User]) {
    let page = list(
        app,
        ListUsersRequest {
            limit: Some(1000),
            filter: Some(filter.clone()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        sorted(ids(&page.data)),
        set_of(expected),
        "filter {filter:?} returned {:?}",
        page.data.iter().map(|u| &u.reference).collect::<Vec<_>>()
    );
    assert_eq!(
        page.total_count,
        Some(expected.len() as i64),
        "total of {filter:?}"
    );
    assert!(page.next_page_token.is_empty());
}

pub(crate) fn eq(value: &str) -> StringFilter {
    StringFilter {
        equal_to: Some(value.into()),
        ..Default::default()
    }
}

pub(crate) fn ne(value: &str) -> StringFilter {
    StringFilter {
        not_equal_to: Some(value.into()),
        ..Default::default()
    }
}

pub(crate) fn any_of<S: AsRef<str>>(values: &[S]) -> StringFilter {
    StringFilter {
        value_in: values.iter().map(|v| v.as_ref().to_owned()).collect(),
        ..Default::default()
    }
}

pub(crate) fn none_of<S: AsRef<str>>(values: &[S]) -> StringFilter {
    StringFilter {
        value_not_in: values.iter().map(|v| v.as_ref().to_owned()).collect(),
        ..Default::default()
    }
}

pub(crate) fn like(pattern: &str) -> StringFilter {
    StringFilter {
        like: Some(pattern.into()),
        ..Default::default()
    }
}

pub(crate) fn ilike(pattern: &str) -> StringFilter {
    StringFilter {
        i_like: Some(pattern.into()),
        ..Default::default()
    }
}

/// A filter on one text field, by its proto name.
pub(crate) fn on(field: &str, filter: StringFilter) -> UserFilter {
    let mut f = UserFilter::default();
    let slot = match field {
        "id" => &mut f.id,
        "reference" => &mut f.reference,
        "email" => &mut f.email,
        "phone" => &mut f.phone,
        "first_name" => &mut f.first_name,
        "last_name" => &mut f.last_name,
        "locale" => &mut f.locale,
        "timezone" => &mut f.timezone,
        "tenant_id" => &mut f.tenant_id,
        "avatar_url" => &mut f.avatar_url,
        other => panic!("no text filter {other}"),
    };
    *slot = Some(filter);
    f
}

fn order(field: UserOrderField, direction: SortDirection) -> UserOrder {
    UserOrder {
        field: field as i32,
        direction: direction as i32,
    }
}

/// A `google.protobuf.Struct` from a JSON object.
fn to_struct(value: serde_json::Value) -> prost_types::Struct {
    let serde_json::Value::Object(map) = value else {
        panic!("not an object")
    };
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        object @ serde_json::Value::Object(_) => Kind::StructValue(to_struct(object)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// (seconds, nanos) of a timestamp, for comparisons.
fn instant(ts: &Option<prost_types::Timestamp>) -> (i64, i32) {
    let ts = ts.as_ref().expect("timestamp set");
    (ts.seconds, ts.nanos)
}

/// Follows `next_page_token` from the first page of `request` to the last and
/// returns every page's ids.
pub(crate) async fn walk(app: &mut TestApp, request: ListUsersRequest) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(
            app,
            ListUsersRequest {
                page_token: token.clone(),
                ..request.clone()
            },
        )
        .await;
        pages.push(ids(&page.data));
        assert!(pages.len() <= 100, "page tokens never end: {pages:?}");
        if page.next_page_token.is_empty() {
            return pages;
        }
        token = page.next_page_token;
    }
}

/// Three users that differ in every filterable field; `c` is in tenant `t`.
struct Fixture {
    a: User,
    b: User,
    c: User,
    t: Tenant,
}

async fn fixture(app: &mut TestApp) -> Fixture {
    let t = create_tenant(app, "Other", "other").await;
    let a = create(
        app,
        User {
            reference: "ref-alpha".into(),
            email: "alice@example.com".into(),
            phone: Some("+15550001111".into()),
            first_name: "Alice".into(),
            last_name: "Smith".into(),
            locale: "en-US".into(),
            timezone: Some("Europe/Berlin".into()),
            is_opted_in: false,
            active: Some(true),
            custom_data: Some(to_struct(serde_json::json!({
                "plan": "pro",
                "features": {"beta": true, "tier": 2},
                "tags": ["vip", "early"],
            }))),
            ..Default::default()
        },
    )
    .await;
    let b = create(
        app,
        User {
            reference: "ref-beta".into(),
            email: "bob@example.org".into(),
            phone: Some("+15550002222".into()),
            first_name: "Bob".into(),
            last_name: "smithers".into(),
            locale: "de-DE".into(),
            timezone: Some("Asia/Bangkok".into()),
            is_opted_in: true,
            active: Some(false),
            custom_data: Some(to_struct(serde_json::json!({"plan": "free"}))),
            ..Default::default()
        },
    )
    .await;
    let c = create(
        app,
        User {
            reference: "REF-gamma".into(),
            email: "carol@example.com".into(),
            phone: None,
            first_name: "Carol".into(),
            last_name: "Jones".into(),
            locale: "fr-FR".into(),
            timezone: None,
            is_opted_in: true,
            active: Some(true),
            tenant_id: t.id.clone(),
            custom_data: Some(to_struct(serde_json::json!({
                "plan": "pro",
                "features": {"beta": false},
            }))),
            ..Default::default()
        },
    )
    .await;
    Fixture { a, b, c, t }
}

/// Runs `(field, filter, expected)` cases against the fixture.
async fn assert_cases(app: &mut TestApp, cases: Vec<(&str, StringFilter, Vec<&User>)>) {
    for (field, filter, expected) in cases {
        assert_filter(app, on(field, filter), &expected).await;
    }
}

// ---------------------------------------------------------------------------
// The ROQ example
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_filters_by_reference_equal_to_as_in_the_roq_example() {
    let mut app = spawn_app().await;
    let roq = create(&mut app, roq_user()).await;
    create(&mut app, user("8d04d09a-8ff8-4393-840d-c69f3f1f7dfb", "")).await;
    create(&mut app, user("other", "other@example.com")).await;

    // {"limit": 10, "offset": 0, "filter": {"reference": {"equalTo": "8d04d09a-..."}}}
    let page = list(
        &mut app,
        ListUsersRequest {
            limit: Some(10),
            offset: 0,
            filter: Some(UserFilter {
                reference: Some(eq("8d04d09a-8ff8-4393-840d-c69f3f1f7dfa")),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page.data, [roq]);
    assert_eq!(page.total_count, Some(1));
    assert!(page.next_page_token.is_empty());
}

// ---------------------------------------------------------------------------
// Text filters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_filters_reference_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("reference", eq("ref-alpha"), vec![&a]),
            ("reference", eq("ref-ALPHA"), vec![]),
            ("reference", ne("ref-alpha"), vec![&b, &c]),
            (
                "reference",
                any_of(&["ref-alpha", "REF-gamma", "missing"]),
                vec![&a, &c],
            ),
            (
                "reference",
                none_of(&["ref-alpha", "missing"]),
                vec![&b, &c],
            ),
            ("reference", like("ref-%"), vec![&a, &b]),
            ("reference", like("ref-_eta"), vec![&b]),
            ("reference", ilike("ref-%"), vec![&a, &b, &c]),
            ("reference", ilike("%GAMMA"), vec![&c]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_email_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("email", eq("bob@example.org"), vec![&b]),
            // Equality and the value lists ignore case, as uniqueness does.
            ("email", eq("BOB@example.org"), vec![&b]),
            ("email", ne("bob@example.org"), vec![&a, &c]),
            ("email", ne("Bob@Example.org"), vec![&a, &c]),
            (
                "email",
                any_of(&["alice@example.com", "carol@example.com"]),
                vec![&a, &c],
            ),
            ("email", none_of(&["alice@example.com"]), vec![&b, &c]),
            ("email", none_of(&["ALICE@example.com"]), vec![&b, &c]),
            // Patterns compare the stored text as given.
            ("email", like("%@example.com"), vec![&a, &c]),
            ("email", like("%@EXAMPLE.ORG"), vec![]),
            ("email", ilike("%@EXAMPLE.ORG"), vec![&b]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_first_name_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("first_name", eq("Alice"), vec![&a]),
            ("first_name", ne("Alice"), vec![&b, &c]),
            ("first_name", any_of(&["Bob", "Carol"]), vec![&b, &c]),
            ("first_name", none_of(&["Bob", "Carol"]), vec![&a]),
            ("first_name", like("%o%"), vec![&b, &c]),
            ("first_name", like("a%"), vec![]),
            ("first_name", ilike("a%"), vec![&a]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_last_name_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("last_name", eq("Jones"), vec![&c]),
            ("last_name", ne("Jones"), vec![&a, &b]),
            ("last_name", any_of(&["Smith", "smithers"]), vec![&a, &b]),
            ("last_name", none_of(&["Smith"]), vec![&b, &c]),
            ("last_name", like("Smith%"), vec![&a]),
            ("last_name", ilike("smith%"), vec![&a, &b]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_phone_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("phone", eq("+15550001111"), vec![&a]),
            // A user without a phone has an empty one.
            ("phone", eq(""), vec![&c]),
            ("phone", ne(""), vec![&a, &b]),
            ("phone", ne("+15550001111"), vec![&b, &c]),
            ("phone", any_of(&["+15550002222", ""]), vec![&b, &c]),
            ("phone", none_of(&["+15550001111"]), vec![&b, &c]),
            ("phone", like("+1555000%"), vec![&a, &b]),
            ("phone", ilike("%2222"), vec![&b]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_locale_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("locale", eq("de-DE"), vec![&b]),
            ("locale", ne("en-US"), vec![&b, &c]),
            ("locale", any_of(&["en-US", "fr-FR"]), vec![&a, &c]),
            ("locale", none_of(&["en-US", "fr-FR"]), vec![&b]),
            ("locale", like("%-DE"), vec![&b]),
            ("locale", like("de-de"), vec![]),
            ("locale", ilike("de-de"), vec![&b]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_timezone_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    assert_cases(
        &mut app,
        vec![
            ("timezone", eq("Asia/Bangkok"), vec![&b]),
            // A user without a time zone has an empty one.
            ("timezone", eq(""), vec![&c]),
            ("timezone", ne(""), vec![&a, &b]),
            (
                "timezone",
                any_of(&["Europe/Berlin", "Asia/Bangkok"]),
                vec![&a, &b],
            ),
            ("timezone", none_of(&["Europe/Berlin"]), vec![&b, &c]),
            ("timezone", like("Europe/%"), vec![&a]),
            ("timezone", like("asia/%"), vec![]),
            ("timezone", ilike("asia/%"), vec![&b]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_id_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    // The last 12 hex digits of a UUIDv7 are random, so they single a user out.
    let tail = |u: &User| format!("%{}", &u.id[24..]);
    assert_cases(
        &mut app,
        vec![
            ("id", eq(&a.id), vec![&a]),
            // Equality is on the UUID, not the text: upper case is the same id.
            ("id", eq(&a.id.to_uppercase()), vec![&a]),
            ("id", eq(&unknown), vec![]),
            ("id", ne(&a.id), vec![&b, &c]),
            ("id", any_of(&[&a.id, &c.id, &unknown]), vec![&a, &c]),
            ("id", none_of(&[&a.id]), vec![&b, &c]),
            ("id", like(&tail(&b)), vec![&b]),
            ("id", like(&b.id), vec![&b]),
            // The text form is lower case: LIKE is case-sensitive, ILIKE is not.
            ("id", like(&b.id.to_uppercase()), vec![]),
            ("id", ilike(&b.id.to_uppercase()), vec![&b]),
            ("id", like("%"), vec![&a, &b, &c]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_filters_tenant_id_with_every_text_operator() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, t } = fixture(&mut app).await;
    let default = app.default_tenant().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_cases(
        &mut app,
        vec![
            ("tenant_id", eq(&t.id), vec![&c]),
            ("tenant_id", eq(&default), vec![&a, &b]),
            ("tenant_id", eq(&unknown), vec![]),
            ("tenant_id", ne(&t.id), vec![&a, &b]),
            ("tenant_id", any_of(&[&t.id, &default]), vec![&a, &b, &c]),
            ("tenant_id", any_of(&[&unknown]), vec![]),
            ("tenant_id", none_of(&[&t.id]), vec![&a, &b]),
            ("tenant_id", like(&format!("%{}", &t.id[24..])), vec![&c]),
            ("tenant_id", like(&t.id.to_uppercase()), vec![]),
            ("tenant_id", ilike(&t.id.to_uppercase()), vec![&c]),
        ],
    )
    .await;
}

#[tokio::test]
async fn list_users_with_a_malformed_uuid_in_an_id_filter_is_invalid_argument() {
    let mut app = spawn_app().await;
    fixture(&mut app).await;
    let valid = uuid::Uuid::now_v7().to_string();
    for field in ["id", "tenant_id"] {
        let cases = [
            (eq("nope"), "equal_to"),
            (ne("12345"), "not_equal_to"),
            (any_of(&[valid.as_str(), "not-a-uuid"]), "value_in[1]"),
            (none_of(&[""]), "value_not_in[0]"),
        ];
        for (filter, operator) in cases {
            let status = list_err(
                &mut app,
                ListUsersRequest {
                    filter: Some(on(field, filter)),
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(
                violated_fields(&status),
                [format!("filter.{field}.{operator}")]
            );
        }
        // Patterns are matched against the text form, so they need not be UUIDs.
        let page = list(
            &mut app,
            ListUsersRequest {
                filter: Some(on(field, like("not-a-uuid%"))),
                ..Default::default()
            },
        )
        .await;
        assert!(page.data.is_empty());
        assert_eq!(page.total_count, Some(0));
    }
}

#[tokio::test]
async fn list_users_ignores_empty_text_filters_and_empty_value_lists() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    for field in ["reference", "email", "phone", "timezone", "id", "tenant_id"] {
        assert_filter(&mut app, on(field, StringFilter::default()), &[&a, &b, &c]).await;
        let empty_lists = StringFilter {
            value_in: vec![],
            value_not_in: vec![],
            ..Default::default()
        };
        assert_filter(&mut app, on(field, empty_lists), &[&a, &b, &c]).await;
    }
    assert_filter(&mut app, UserFilter::default(), &[&a, &b, &c]).await;
}

#[tokio::test]
async fn list_users_ands_the_operators_of_one_text_filter() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    let both = StringFilter {
        i_like: Some("ref-%".into()),
        not_equal_to: Some("ref-alpha".into()),
        ..Default::default()
    };
    assert_filter(&mut app, on("reference", both), &[&b, &c]).await;
    let contradictory = StringFilter {
        equal_to: Some("ref-alpha".into()),
        value_not_in: vec!["ref-alpha".into()],
        ..Default::default()
    };
    assert_filter(&mut app, on("reference", contradictory), &[]).await;
    let in_and_like = StringFilter {
        value_in: vec!["ref-alpha".into(), "ref-beta".into()],
        like: Some("%alpha".into()),
        ..Default::default()
    };
    assert_filter(&mut app, on("reference", in_and_like), &[&a]).await;
}

// ---------------------------------------------------------------------------
// Bool filters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_filters_active_with_equal_to_and_not_equal_to() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    let active = |equal_to, not_equal_to| UserFilter {
        active: Some(BoolFilter {
            equal_to,
            not_equal_to,
        }),
        ..Default::default()
    };
    assert_filter(&mut app, active(Some(true), None), &[&a, &c]).await;
    assert_filter(&mut app, active(Some(false), None), &[&b]).await;
    assert_filter(&mut app, active(None, Some(true)), &[&b]).await;
    assert_filter(&mut app, active(None, Some(false)), &[&a, &c]).await;
    assert_filter(&mut app, active(Some(true), Some(false)), &[&a, &c]).await;
    assert_filter(&mut app, active(Some(true), Some(true)), &[]).await;
    assert_filter(&mut app, active(None, None), &[&a, &b, &c]).await;
}

#[tokio::test]
async fn list_users_filters_is_opted_in_with_equal_to_and_not_equal_to() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    let opted_in = |equal_to, not_equal_to| UserFilter {
        is_opted_in: Some(BoolFilter {
            equal_to,
            not_equal_to,
        }),
        ..Default::default()
    };
    assert_filter(&mut app, opted_in(Some(true), None), &[&b, &c]).await;
    assert_filter(&mut app, opted_in(Some(false), None), &[&a]).await;
    assert_filter(&mut app, opted_in(None, Some(true)), &[&a]).await;
    assert_filter(&mut app, opted_in(None, Some(false)), &[&b, &c]).await;
    assert_filter(&mut app, opted_in(Some(false), Some(false)), &[]).await;
}

// ---------------------------------------------------------------------------
// Timestamp filters
// ---------------------------------------------------------------------------

/// Three users created a few milliseconds apart, so their `created_at` differ.
async fn three_in_sequence(app: &mut TestApp) -> [User; 3] {
    let mut users = Vec::new();
    for i in 0..3 {
        if i > 0 {
            app.clock.advance(Duration::from_millis(5));
        }
        users.push(create(app, user(&format!("seq-{i}"), "")).await);
    }
    let users: [User; 3] = users.try_into().unwrap();
    assert!(instant(&users[0].created_at) < instant(&users[1].created_at));
    assert!(instant(&users[1].created_at) < instant(&users[2].created_at));
    users
}

#[tokio::test]
async fn list_users_filters_created_at_with_every_operator() {
    let mut app = spawn_app().await;
    let [u1, u2, u3] = three_in_sequence(&mut app).await;
    let t1 = u1.created_at;
    let t2 = u2.created_at;
    let t3 = u3.created_at;
    let created = |f: TimestampFilter| UserFilter {
        created_at: Some(f),
        ..Default::default()
    };
    let cases = [
        (
            TimestampFilter {
                equal_to: t2,
                ..Default::default()
            },
            vec![&u2],
        ),
        (
            TimestampFilter {
                not_equal_to: t2,
                ..Default::default()
            },
            vec![&u1, &u3],
        ),
        (
            TimestampFilter {
                less_than: t2,
                ..Default::default()
            },
            vec![&u1],
        ),
        (
            TimestampFilter {
                less_than_equal: t2,
                ..Default::default()
            },
            vec![&u1, &u2],
        ),
        (
            TimestampFilter {
                more_than: t2,
                ..Default::default()
            },
            vec![&u3],
        ),
        (
            TimestampFilter {
                more_than_equal: t2,
                ..Default::default()
            },
            vec![&u2, &u3],
        ),
        (
            TimestampFilter {
                more_than: t1,
                less_than: t3,
                ..Default::default()
            },
            vec![&u2],
        ),
        (
            TimestampFilter {
                more_than_equal: t1,
                less_than_equal: t3,
                ..Default::default()
            },
            vec![&u1, &u2, &u3],
        ),
        (
            TimestampFilter {
                less_than: t1,
                ..Default::default()
            },
            vec![],
        ),
    ];
    for (filter, expected) in cases {
        assert_filter(&mut app, created(filter), &expected).await;
    }
}

#[tokio::test]
async fn list_users_filters_updated_at_with_every_operator() {
    let mut app = spawn_app().await;
    let [u1, u2, u3] = three_in_sequence(&mut app).await;
    app.clock.advance(Duration::from_millis(5));
    // Updating the first user moves it last by updated_at, while it stays
    // first by created_at: a filter on the wrong column would fail.
    let u1 = update(
        &mut app,
        &u1.id,
        UserUpdate {
            first_name: Some("Changed".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(instant(&u3.updated_at) < instant(&u1.updated_at));
    let t3 = u3.updated_at;
    let updated = |f: TimestampFilter| UserFilter {
        updated_at: Some(f),
        ..Default::default()
    };
    let cases = [
        (
            TimestampFilter {
                equal_to: t3,
                ..Default::default()
            },
            vec![&u3],
        ),
        (
            TimestampFilter {
                not_equal_to: t3,
                ..Default::default()
            },
            vec![&u1, &u2],
        ),
        (
            TimestampFilter {
                less_than: t3,
                ..Default::default()
            },
            vec![&u2],
        ),
        (
            TimestampFilter {
                less_than_equal: t3,
                ..Default::default()
            },
            vec![&u2, &u3],
        ),
        (
            TimestampFilter {
                more_than: t3,
                ..Default::default()
            },
            vec![&u1],
        ),
        (
            TimestampFilter {
                more_than_equal: t3,
                ..Default::default()
            },
            vec![&u3, &u1],
        ),
        (
            TimestampFilter {
                more_than: u2.updated_at,
                less_than: u1.updated_at,
                ..Default::default()
            },
            vec![&u3],
        ),
    ];
    for (filter, expected) in cases {
        assert_filter(&mut app, updated(filter), &expected).await;
    }
}

#[tokio::test]
async fn list_users_timestamp_bounds_finer_than_a_microsecond_compare_exactly() {
    let mut app = spawn_app().await;
    let u = create(&mut app, user("u", "")).await;
    let t = u.created_at.unwrap();
    assert_eq!(t.nanos % 1000, 0, "stored at microsecond precision");
    // Half a microsecond after the user was created: t < after, so
    // less_than and less_than_equal hold and more_than(_equal) do not.
    let after = Some(prost_types::Timestamp {
        seconds: t.seconds,
        nanos: t.nanos + 500,
    });
    let cases = [
        (
            "less_than",
            TimestampFilter {
                less_than: after,
                ..Default::default()
            },
            vec![u.id.clone()],
        ),
        (
            "less_than_equal",
            TimestampFilter {
                less_than_equal: after,
                ..Default::default()
            },
            vec![u.id.clone()],
        ),
        (
            "more_than",
            TimestampFilter {
                more_than: after,
                ..Default::default()
            },
            vec![],
        ),
        (
            "more_than_equal",
            TimestampFilter {
                more_than_equal: after,
                ..Default::default()
            },
            vec![],
        ),
    ];
    let mut wrong = Vec::new();
    for (operator, filter, expected) in cases {
        let page = list(
            &mut app,
            ListUsersRequest {
                filter: Some(UserFilter {
                    created_at: Some(filter),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
        if ids(&page.data) != expected {
            wrong.push(format!(
                "{operator}: expected {expected:?}, got {:?}",
                ids(&page.data)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "created_at = {t:?}, bound = {after:?}:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test]
async fn list_users_with_an_invalid_timestamp_filter_is_invalid_argument() {
    let mut app = spawn_app().await;
    let status = list_err(
        &mut app,
        ListUsersRequest {
            filter: Some(UserFilter {
                created_at: Some(TimestampFilter {
                    less_than: Some(prost_types::Timestamp {
                        seconds: 0,
                        nanos: -1,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["filter.created_at.less_than"]);
}

// ---------------------------------------------------------------------------
// Custom data
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_filters_custom_data_by_containment() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    let d = create(&mut app, user("no-data", "")).await;
    let contains = |value: serde_json::Value| UserFilter {
        custom_data: Some(JsonFilter {
            contains: Some(to_struct(value)),
        }),
        ..Default::default()
    };
    use serde_json::json;
    let cases = [
        (json!({"plan": "pro"}), vec![&a, &c]),
        (json!({"plan": "free"}), vec![&b]),
        (json!({"plan": "enterprise"}), vec![]),
        (json!({"features": {"beta": true}}), vec![&a]),
        (json!({"features": {"beta": false}}), vec![&c]),
        (json!({"features": {}}), vec![&a, &c]),
        (json!({"plan": "pro", "features": {"tier": 2}}), vec![&a]),
        (json!({"features": {"tier": 3}}), vec![]),
        (json!({"tags": ["vip"]}), vec![&a]),
        (json!({"tags": ["vip", "nope"]}), vec![]),
        // The empty object is contained in every object.
        (json!({}), vec![&a, &b, &c, &d]),
    ];
    for (value, expected) in cases {
        assert_filter(&mut app, contains(value), &expected).await;
    }
}

// ---------------------------------------------------------------------------
// Several filters
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_ands_filters_on_different_fields() {
    let mut app = spawn_app().await;
    let Fixture { a, b, c, .. } = fixture(&mut app).await;
    // Another user that matches every filter but one.
    let d = create(
        &mut app,
        User {
            reference: "ref-delta".into(),
            email: "dave@example.com".into(),
            last_name: "Smithson".into(),
            active: Some(false),
            custom_data: Some(to_struct(serde_json::json!({"plan": "pro"}))),
            ..Default::default()
        },
    )
    .await;
    let pro = Some(JsonFilter {
        contains: Some(to_struct(serde_json::json!({"plan": "pro"}))),
    });
    let all = UserFilter {
        email: Some(like("%@example.com")),
        last_name: Some(ilike("smith%")),
        active: Some(BoolFilter {
            equal_to: Some(true),
            not_equal_to: None,
        }),
        custom_data: pro.clone(),
        ..Default::default()
    };
    assert_filter(&mut app, all.clone(), &[&a]).await;

    // Each filter alone is wider, so each one is doing work.
    let alone = [
        (
            UserFilter {
                email: all.email.clone(),
                ..Default::default()
            },
            vec![&a, &c, &d],
        ),
        (
            UserFilter {
                last_name: all.last_name.clone(),
                ..Default::default()
            },
            vec![&a, &b, &d],
        ),
        (
            UserFilter {
                active: all.active,
                ..Default::default()
            },
            vec![&a, &c],
        ),
        (
            UserFilter {
                custom_data: pro,
                ..Default::default()
            },
            vec![&a, &c, &d],
        ),
    ];
    for (filter, expected) in alone {
        assert_filter(&mut app, filter, &expected).await;
    }

    // Filters and search combine too.
    let page = list(
        &mut app,
        ListUsersRequest {
            filter: Some(UserFilter {
                email: all.email.clone(),
                ..Default::default()
            }),
            search: "smith".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sorted(ids(&page.data)), set_of(&[&a, &d]));
    assert_eq!(page.total_count, Some(2));
}

// ---------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------

async fn search(app: &mut TestApp, text: &str) -> ListUsersResponse {
    list(
        app,
        ListUsersRequest {
            search: text.into(),
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await
}

#[tokio::test]
async fn list_users_searches_email_first_and_last_name_case_insensitively() {
    let mut app = spawn_app().await;
    let anna = create(
        &mut app,
        User {
            email: "Anna.Lee@Example.com".into(),
            first_name: "Anna".into(),
            last_name: "Lee".into(),
            ..user("s1", "")
        },
    )
    .await;
    let bob = create(
        &mut app,
        User {
            email: "bob@example.org".into(),
            first_name: "Bob".into(),
            last_name: "Hanna".into(),
            ..user("s2", "")
        },
    )
    .await;
    let carl = create(
        &mut app,
        User {
            email: "c3@x.io".into(),
            first_name: "Carl".into(),
            last_name: "O'Neil".into(),
            ..user("s3", "")
        },
    )
    .await;
    // Fields outside the search: reference and phone.
    let other = create(
        &mut app,
        User {
            phone: Some("+15550009999".into()),
            ..user("anna-ref", "")
        },
    )
    .await;

    let cases: [(&str, Vec<&User>); 10] = [
        // First name of one, last name of another.
        ("ANNA", vec![&anna, &bob]),
        // Never across two fields, though one index holds them together.
        ("anna\nlee", vec![]),
        ("example.com\nanna", vec![]),
        // Email only.
        ("EXAMPLE.ORG", vec![&bob]),
        // First name only.
        ("carl", vec![&carl]),
        // Last name only, mid-word.
        ("neI", vec![&carl]),
        ("'", vec![&carl]),
        ("nobody", vec![]),
        ("9999", vec![]),
        ("", vec![&anna, &bob, &carl, &other]),
    ];
    for (text, expected) in cases {
        let page = search(&mut app, text).await;
        assert_eq!(
            sorted(ids(&page.data)),
            set_of(&expected),
            "search {text:?}"
        );
        assert_eq!(
            page.total_count,
            Some(expected.len() as i64),
            "search {text:?}"
        );
    }
}

#[tokio::test]
async fn list_users_search_matches_percent_underscore_and_backslash_literally() {
    let mut app = spawn_app().await;
    let percent = create(
        &mut app,
        User {
            first_name: "100%".into(),
            ..user("p1", "")
        },
    )
    .await;
    let digits = create(
        &mut app,
        User {
            first_name: "1000".into(),
            ..user("p2", "")
        },
    )
    .await;
    let underscore = create(
        &mut app,
        User {
            last_name: "snake_case".into(),
            ..user("u1", "")
        },
    )
    .await;
    let letter = create(
        &mut app,
        User {
            last_name: "snakeXcase".into(),
            ..user("u2", "")
        },
    )
    .await;
    let backslash = create(
        &mut app,
        User {
            first_name: r"back\slash".into(),
            ..user("b1", "")
        },
    )
    .await;
    let plain = create(
        &mut app,
        User {
            first_name: "backslash".into(),
            ..user("b2", "")
        },
    )
    .await;

    let cases: [(&str, Vec<&User>); 7] = [
        ("100%", vec![&percent]),
        ("100", vec![&percent, &digits]),
        ("%", vec![&percent]),
        ("e_c", vec![&underscore]),
        ("_", vec![&underscore]),
        (r"k\s", vec![&backslash]),
        ("backs", vec![&plain]),
    ];
    for (text, expected) in cases {
        let page = search(&mut app, text).await;
        assert_eq!(
            sorted(ids(&page.data)),
            set_of(&expected),
            "search {text:?}"
        );
        assert_eq!(
            page.total_count,
            Some(expected.len() as i64),
            "search {text:?}"
        );
    }
    let _ = letter;
}

// ---------------------------------------------------------------------------
// Order
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_orders_by_last_name_desc_with_ties_broken_by_id_ascending() {
    let mut app = spawn_app().await;
    let mut created = Vec::new();
    for (i, last_name) in ["Miller", "Adams", "Zed", "Miller", "Miller"]
        .iter()
        .enumerate()
    {
        created.push(
            create(
                &mut app,
                User {
                    last_name: (*last_name).into(),
                    ..user(&format!("o{i}"), "")
                },
            )
            .await,
        );
    }
    let mut millers: Vec<String> = created
        .iter()
        .filter(|u| u.last_name == "Miller")
        .map(|u| u.id.clone())
        .collect();
    millers.sort();
    let mut expected = vec![created[2].id.clone()];
    expected.extend(millers);
    expected.push(created[1].id.clone());

    let page = list(
        &mut app,
        ListUsersRequest {
            order: vec![order(UserOrderField::LastName, SortDirection::Desc)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&page.data), expected);
    assert_eq!(page.total_count, Some(5));

    // Page by page, across the ties.
    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            order: vec![order(UserOrderField::LastName, SortDirection::Desc)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pages.len(), 3);
    assert_eq!(pages.concat(), expected);
}

#[tokio::test]
async fn list_users_orders_by_two_fields() {
    let mut app = spawn_app().await;
    let names = [
        ("Ann", "B"),
        ("Bob", "A"),
        ("Ann", "Z"),
        ("Ann", "M"),
        ("Ann", "M"),
    ];
    let mut created = Vec::new();
    for (i, (first, last)) in names.iter().enumerate() {
        created.push(
            create(
                &mut app,
                User {
                    first_name: (*first).into(),
                    last_name: (*last).into(),
                    ..user(&format!("o{i}"), "")
                },
            )
            .await,
        );
    }
    let mut ann_m = [created[3].id.clone(), created[4].id.clone()];
    ann_m.sort();
    let expected = vec![
        created[2].id.clone(),
        ann_m[0].clone(),
        ann_m[1].clone(),
        created[0].id.clone(),
        created[1].id.clone(),
    ];
    let request = ListUsersRequest {
        order: vec![
            order(UserOrderField::FirstName, SortDirection::Asc),
            order(UserOrderField::LastName, SortDirection::Desc),
        ],
        ..Default::default()
    };
    let page = list(&mut app, request.clone()).await;
    assert_eq!(ids(&page.data), expected);
    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            ..request
        },
    )
    .await;
    assert_eq!(pages.concat(), expected);

    // The other way round: last name first.
    let page = list(
        &mut app,
        ListUsersRequest {
            order: vec![
                order(UserOrderField::LastName, SortDirection::Asc),
                order(UserOrderField::FirstName, SortDirection::Desc),
            ],
            ..Default::default()
        },
    )
    .await;
    let expected = vec![
        created[1].id.clone(),
        created[0].id.clone(),
        ann_m[0].clone(),
        ann_m[1].clone(),
        created[2].id.clone(),
    ];
    assert_eq!(ids(&page.data), expected);
}

#[tokio::test]
async fn list_users_default_order_is_created_at_ascending() {
    let mut app = spawn_app().await;
    let mut created = Vec::new();
    // Names and references run backwards, so only created_at gives this order.
    for (i, name) in ["Zoe", "Yan", "Xia", "Wes"].iter().enumerate() {
        if i > 0 {
            app.clock.advance(Duration::from_millis(3));
        }
        created.push(
            create(
                &mut app,
                User {
                    first_name: (*name).into(),
                    last_name: (*name).into(),
                    ..user(
                        &format!("r{}", 9 - i),
                        &format!("{}@example.com", name.to_lowercase()),
                    )
                },
            )
            .await,
        );
    }
    let page = list(&mut app, ListUsersRequest::default()).await;
    assert_eq!(ids(&page.data), ids(&created));

    let explicit = list(
        &mut app,
        ListUsersRequest {
            order: vec![order(UserOrderField::CreatedAt, SortDirection::Unspecified)],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&explicit.data), ids(&created));

    let desc = list(
        &mut app,
        ListUsersRequest {
            order: vec![order(UserOrderField::CreatedAt, SortDirection::Desc)],
            ..Default::default()
        },
    )
    .await;
    let mut reversed = ids(&created);
    reversed.reverse();
    assert_eq!(ids(&desc.data), reversed);
}

/// The sort key of `user` for an order field, as comparable text.
fn key_of(user: &User, field: UserOrderField) -> String {
    let ts = |t: &Option<prost_types::Timestamp>| {
        let (s, n) = instant(t);
        format!("{s:020}.{n:09}")
    };
    match field {
        UserOrderField::CreatedAt => ts(&user.created_at),
        UserOrderField::UpdatedAt => ts(&user.updated_at),
        UserOrderField::Email => user.email.clone(),
        UserOrderField::FirstName => user.first_name.clone(),
        UserOrderField::LastName => user.last_name.clone(),
        UserOrderField::Locale => user.locale.clone(),
        UserOrderField::Phone => user.phone.clone().unwrap_or_default(),
        UserOrderField::Timezone => user.timezone.clone().unwrap_or_default(),
        UserOrderField::Reference => user.reference.clone(),
        UserOrderField::Active => user.active.unwrap().to_string(),
        UserOrderField::Unspecified => unreachable!(),
    }
}

/// The ids of `users` in the order of `field` in `direction`, ties by id.
fn in_order<'a>(
    users: impl Iterator<Item = &'a User>,
    field: UserOrderField,
    direction: SortDirection,
) -> Vec<String> {
    let mut users: Vec<&User> = users.collect();
    users.sort_by(|x, y| {
        let keys = key_of(x, field).cmp(&key_of(y, field));
        let keys = if direction == SortDirection::Desc {
            keys.reverse()
        } else {
            keys
        };
        keys.then_with(|| x.id.cmp(&y.id))
    });
    users.iter().map(|u| u.id.clone()).collect()
}

#[tokio::test]
async fn list_users_orders_and_pages_by_every_order_field_in_both_directions() {
    let mut app = spawn_app().await;
    // Lower-case ASCII (and values whose order is the same under any
    // collation), with ties in several fields.
    let rows = [
        (
            "c",
            "carl@example.com",
            "+15550000003",
            "carl",
            "x",
            "en-US",
            "Europe/Berlin",
            true,
        ),
        ("a", "anna@example.com", "", "anna", "y", "de-DE", "", false),
        (
            "d",
            "dora@example.com",
            "+15550000001",
            "dora",
            "x",
            "en-US",
            "Asia/Bangkok",
            true,
        ),
        (
            "b",
            "bert@example.com",
            "+15550000002",
            "bert",
            "z",
            "fr-FR",
            "Europe/Berlin",
            false,
        ),
        ("e", "emil@example.com", "", "anna", "y", "en-US", "", true),
    ];
    let mut created = Vec::new();
    for (reference, email, phone, first, last, locale, tz, active) in rows {
        created.push(
            create(
                &mut app,
                User {
                    reference: reference.into(),
                    email: email.into(),
                    phone: Some(phone.into()).filter(|p: &String| !p.is_empty()),
                    first_name: first.into(),
                    last_name: last.into(),
                    locale: locale.into(),
                    timezone: Some(tz.into()).filter(|t: &String| !t.is_empty()),
                    active: Some(active),
                    ..Default::default()
                },
            )
            .await,
        );
        app.clock.advance(Duration::from_millis(2));
    }
    // Make updated_at differ from created_at order.
    let d = update(
        &mut app,
        &created[0].id,
        UserUpdate {
            is_opted_in: Some(true),
            ..Default::default()
        },
    )
    .await;
    created[0] = d;
    let tenant = app.default_tenant().await;

    let fields = [
        UserOrderField::CreatedAt,
        UserOrderField::UpdatedAt,
        UserOrderField::Email,
        UserOrderField::FirstName,
        UserOrderField::LastName,
        UserOrderField::Locale,
        UserOrderField::Phone,
        UserOrderField::Timezone,
        UserOrderField::Reference,
        UserOrderField::Active,
    ];
    for field in fields {
        for direction in [SortDirection::Asc, SortDirection::Desc] {
            let expected = in_order(created.iter(), field, direction);
            let request = ListUsersRequest {
                order: vec![order(field, direction)],
                ..Default::default()
            };
            let page = list(&mut app, request.clone()).await;
            assert_eq!(ids(&page.data), expected, "{field:?} {direction:?}");
            let pages = walk(
                &mut app,
                ListUsersRequest {
                    limit: Some(2),
                    ..request.clone()
                },
            )
            .await;
            assert_eq!(pages.concat(), expected, "{field:?} {direction:?} by pages");
            assert_eq!(pages.len(), 3, "{field:?} {direction:?}");
            // Bound to one tenant, an ascending cursor is one row comparison
            // that starts with tenant_id: the same pages.
            let within = walk(
                &mut app,
                ListUsersRequest {
                    limit: Some(2),
                    filter: Some(on("tenant_id", eq(&tenant))),
                    ..request
                },
            )
            .await;
            assert_eq!(pages, within, "{field:?} {direction:?} within the tenant");
        }
    }

    // Two ascending terms within the tenant.
    let (last, first) = (UserOrderField::LastName, UserOrderField::FirstName);
    let mut expected: Vec<&User> = created.iter().collect();
    expected.sort_by(|x, y| {
        (key_of(x, last), key_of(x, first), &x.id).cmp(&(key_of(y, last), key_of(y, first), &y.id))
    });
    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            filter: Some(on("tenant_id", eq(&tenant))),
            order: vec![
                order(last, SortDirection::Asc),
                order(first, SortDirection::Asc),
            ],
            ..Default::default()
        },
    )
    .await;
    let expected: Vec<String> = expected.iter().map(|u| u.id.clone()).collect();
    assert_eq!(pages.concat(), expected);
}

#[tokio::test]
async fn list_users_with_an_unspecified_order_field_is_invalid_argument() {
    let mut app = spawn_app().await;
    create(&mut app, user("a", "")).await;
    let status = list_err(
        &mut app,
        ListUsersRequest {
            order: vec![UserOrder {
                field: UserOrderField::Unspecified as i32,
                direction: SortDirection::Asc as i32,
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["order[0].field"]);

    let second = list_err(
        &mut app,
        ListUsersRequest {
            order: vec![
                order(UserOrderField::LastName, SortDirection::Asc),
                UserOrder {
                    field: 0,
                    direction: 0,
                },
            ],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(violated_fields(&second), ["order[1].field"]);

    let unknown = list_err(
        &mut app,
        ListUsersRequest {
            order: vec![UserOrder {
                field: 999,
                direction: 0,
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&unknown), ["order[0].field"]);

    let bad_direction = list_err(
        &mut app,
        ListUsersRequest {
            order: vec![UserOrder {
                field: UserOrderField::Email as i32,
                direction: 42,
            }],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(bad_direction.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&bad_direction), ["order[0].direction"]);
}

// ---------------------------------------------------------------------------
// Paging
// ---------------------------------------------------------------------------

async fn create_many(app: &mut TestApp, n: usize) -> Vec<User> {
    let mut created = Vec::new();
    for i in 0..n {
        created.push(
            create(
                app,
                user(&format!("u{i:02}"), &format!("u{i:02}@example.com")),
            )
            .await,
        );
    }
    created
}

/// The ids of `users` in the default order (created_at, then id).
fn in_default_order(users: &[User]) -> Vec<String> {
    let mut users: Vec<&User> = users.iter().collect();
    users.sort_by(|x, y| {
        instant(&x.created_at)
            .cmp(&instant(&y.created_at))
            .then_with(|| x.id.cmp(&y.id))
    });
    users.iter().map(|u| u.id.clone()).collect()
}

#[tokio::test]
async fn list_users_default_limit_is_20() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 25).await;
    let all = in_default_order(&created);
    let page = list(&mut app, ListUsersRequest::default()).await;
    assert_eq!(page.data.len(), 20);
    assert_eq!(ids(&page.data), all[..20]);
    assert_eq!(page.total_count, Some(25));
    assert!(!page.next_page_token.is_empty());

    let rest = list(
        &mut app,
        ListUsersRequest {
            page_token: page.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&rest.data), all[20..]);
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test]
async fn list_users_with_limit_0_returns_no_rows_but_the_total() {
    let mut app = spawn_app().await;
    create_many(&mut app, 3).await;
    let page = list(
        &mut app,
        ListUsersRequest {
            limit: Some(0),
            ..Default::default()
        },
    )
    .await;
    assert!(page.data.is_empty());
    assert_eq!(page.total_count, Some(3));
}

#[tokio::test]
async fn list_users_total_count_limit_counts_up_to_the_limit_and_says_when_more_match() {
    let mut app = spawn_app().await;
    create_many(&mut app, 5).await;
    let count = |total_count_limit: Option<i32>, filter: Option<UserFilter>| ListUsersRequest {
        limit: Some(2),
        total_count_limit,
        filter,
        ..Default::default()
    };
    for (limit, total, capped) in [(1, 1, true), (4, 4, true), (5, 5, false), (100, 5, false)] {
        let page = list(&mut app, count(Some(limit), None)).await;
        assert_eq!(
            (page.total_count, page.total_count_capped, page.data.len()),
            (Some(total), capped, 2),
            "limit {limit}"
        );
    }
    // The limit applies to the matches of the filter.
    let two = Some(on("reference", any_of(&["u00", "u01"])));
    let page = list(&mut app, count(Some(1), two.clone())).await;
    assert_eq!((page.total_count, page.total_count_capped), (Some(1), true));
    let page = list(&mut app, count(Some(2), two)).await;
    assert_eq!(
        (page.total_count, page.total_count_capped),
        (Some(2), false)
    );
    // Unset: the exact count; skipped: no count at all.
    let page = list(&mut app, count(None, None)).await;
    assert_eq!(
        (page.total_count, page.total_count_capped),
        (Some(5), false)
    );
    let page = list(
        &mut app,
        ListUsersRequest {
            skip_total_count: true,
            ..count(Some(1), None)
        },
    )
    .await;
    assert_eq!((page.total_count, page.total_count_capped), (None, false));
    for limit in [0, -1, 100_001] {
        let status = list_err(&mut app, count(Some(limit), None)).await;
        assert_eq!(status.code(), Code::InvalidArgument, "limit {limit}");
        assert_eq!(
            violated_fields(&status),
            ["total_count_limit"],
            "limit {limit}"
        );
    }
}

#[tokio::test]
async fn list_users_limit_must_be_between_0_and_1000() {
    let mut app = spawn_app().await;
    create_many(&mut app, 2).await;
    for limit in [1001, -1, i32::MIN, i32::MAX] {
        let status = list_err(
            &mut app,
            ListUsersRequest {
                limit: Some(limit),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "limit {limit}");
        assert_eq!(violated_fields(&status), ["limit"], "limit {limit}");
    }
    let max = list(
        &mut app,
        ListUsersRequest {
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(max.data.len(), 2);
}

#[tokio::test]
async fn list_users_with_a_negative_offset_is_invalid_argument() {
    let mut app = spawn_app().await;
    let status = list_err(
        &mut app,
        ListUsersRequest {
            offset: -1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["offset"]);

    // Every bad field is reported, not only the first.
    let both = list_err(
        &mut app,
        ListUsersRequest {
            limit: Some(5000),
            offset: -3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(violated_fields(&both), ["limit", "offset"]);
}

#[tokio::test]
async fn list_users_pages_by_offset() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 5).await;
    let all = in_default_order(&created);
    for (offset, expected) in [
        (0, &all[0..2]),
        (2, &all[2..4]),
        (4, &all[4..5]),
        (5, &all[5..5]),
        (50, &all[5..5]),
    ] {
        let page = list(
            &mut app,
            ListUsersRequest {
                limit: Some(2),
                offset,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(ids(&page.data), expected, "offset {offset}");
        assert_eq!(page.total_count, Some(5), "offset {offset}");
    }

    // The token of a page reached by offset continues right after it.
    let by_offset = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            offset: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&by_offset.data), all[1..3]);
    let next = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            page_token: by_offset.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&next.data), all[3..5]);
    assert!(next.next_page_token.is_empty());
}

#[tokio::test]
async fn list_users_with_skip_total_count_leaves_total_count_absent() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 3).await;
    let page = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            skip_total_count: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(page.total_count, None);
    assert_eq!(ids(&page.data), in_default_order(&created)[..2]);
    assert!(!page.next_page_token.is_empty());

    let counted = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(counted.total_count, Some(3));

    // Zero matches still count as a present zero.
    let none = list(
        &mut app,
        ListUsersRequest {
            filter: Some(on("reference", eq("nobody"))),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(none.total_count, Some(0));
}

// ---------------------------------------------------------------------------
// Page tokens
// ---------------------------------------------------------------------------

#[tokio::test]
async fn list_users_page_tokens_walk_every_user_exactly_once_in_order() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 7).await;
    let all = in_default_order(&created);

    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(3),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), all);

    // An exact multiple of the page size ends without an empty extra page.
    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(7),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pages, vec![all.clone()]);
    let pages = walk(
        &mut app,
        ListUsersRequest {
            limit: Some(1),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(pages.len(), 7);
    assert_eq!(pages.concat(), all);

    // With a filter, search and order, and total counts on every page.
    let request = ListUsersRequest {
        limit: Some(2),
        filter: Some(on("reference", none_of(&["u03"]))),
        search: "@example".into(),
        order: vec![order(UserOrderField::Email, SortDirection::Desc)],
        ..Default::default()
    };
    let mut expected: Vec<&User> = created.iter().filter(|u| u.reference != "u03").collect();
    expected.sort_by(|x, y| y.email.cmp(&x.email));
    let expected: Vec<String> = expected.iter().map(|u| u.id.clone()).collect();
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = list(
            &mut app,
            ListUsersRequest {
                page_token: token,
                ..request.clone()
            },
        )
        .await;
        assert_eq!(page.total_count, Some(6));
        seen.extend(ids(&page.data));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn list_users_page_token_can_continue_with_another_limit() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 6).await;
    let all = in_default_order(&created);
    let first = list(
        &mut app,
        ListUsersRequest {
            limit: Some(2),
            ..Default::default()
        },
    )
    .await;
    let second = list(
        &mut app,
        ListUsersRequest {
            limit: Some(10),
            page_token: first.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(ids(&second.data), all[2..]);
    assert!(second.next_page_token.is_empty());
}

#[tokio::test]
async fn list_users_page_tokens_stay_correct_when_users_are_inserted_between_pages() {
    let mut app = spawn_app().await;
    let mk = |reference: &str, last_name: &str| User {
        last_name: last_name.into(),
        ..user(reference, "")
    };
    let b = create(&mut app, mk("b", "B")).await;
    let d = create(&mut app, mk("d", "D")).await;
    let f = create(&mut app, mk("f", "F")).await;
    let h = create(&mut app, mk("h", "H")).await;
    let request = ListUsersRequest {
        limit: Some(2),
        order: vec![order(UserOrderField::LastName, SortDirection::Asc)],
        ..Default::default()
    };

    let first = list(&mut app, request.clone()).await;
    assert_eq!(ids(&first.data), [b.id.clone(), d.id.clone()]);
    assert_eq!(first.total_count, Some(4));

    // One sorts before the cursor, one after it, one ties with it.
    let a = create(&mut app, mk("a", "A")).await;
    let g = create(&mut app, mk("g", "G")).await;
    let d2 = create(&mut app, mk("d2", "D")).await;

    let mut rest = Vec::new();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let page = list(
            &mut app,
            ListUsersRequest {
                page_token: token,
                ..request.clone()
            },
        )
        .await;
        assert_eq!(page.total_count, Some(7));
        rest.extend(ids(&page.data));
        token = page.next_page_token;
    }
    // D2 ties with the cursor's D on last name; the id decides which comes first.
    let mut expected = Vec::new();
    if d2.id > d.id {
        expected.push(d2.id.clone());
    }
    expected.extend([f.id.clone(), g.id.clone(), h.id.clone()]);
    assert_eq!(rest, expected);
    assert!(
        !rest.contains(&a.id),
        "a user before the cursor is not returned"
    );
    assert!(
        !rest.contains(&b.id) && !rest.contains(&d.id),
        "no duplicates"
    );
}

#[tokio::test]
async fn list_users_page_tokens_in_default_order_pick_up_users_created_later() {
    let mut app = spawn_app().await;
    let created = create_many(&mut app, 4).await;
    let all = in_default_order(&created);
    let request = ListUsersRequest {
        limit: Some(2),
        ..Default::default()
    };
    let first = list(&mut app, request.clone()).await;
    assert_eq!(ids(&first.data), all[..2]);

    // A new user sorts after everything, so it comes on a later page; users
    // deleted from the first page, the cursor's own row included, do not
    // shift the second.
    let late = create(&mut app, user("late", "")).await;
    let deleted = app
        .db
        .execute(
            "DELETE FROM users WHERE id::text = $1 OR id::text = $2",
            &[&all[0], &all[1]],
        )
        .await
        .unwrap();
    assert_eq!(deleted, 2);

    let second = list(
        &mut app,
        ListUsersRequest {
            page_token: first.next_page_token,
            ..request.clone()
        },
    )
    .await;
    assert_eq!(ids(&second.data), all[2..4]);
    assert_eq!(second.total_count, Some(3));
    assert!(!second.next_page_token.is_empty());
    let third = list(
        &mut app,
        ListUsersRequest {
            page_token: second.next_page_token,
            ..request
        },
    )
    .await;
    assert_eq!(ids(&third.data), [late.id]);
    assert!(third.next_page_token.is_empty());
}

#[tokio::test]
async fn list_users_page_token_with_another_filter_search_or_order_is_invalid_argument() {
    let mut app = spawn_app().await;
    create_many(&mut app, 4).await;
    let request = ListUsersRequest {
        limit: Some(2),
        filter: Some(on("email", like("%@example.com"))),
        order: vec![order(UserOrderField::Email, SortDirection::Asc)],
        ..Default::default()
    };
    let first = list(&mut app, request.clone()).await;
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());

    let variants = [
        (
            "another filter",
            ListUsersRequest {
                filter: Some(on("email", like("u%"))),
                ..request.clone()
            },
        ),
        (
            "no filter",
            ListUsersRequest {
                filter: None,
                ..request.clone()
            },
        ),
        (
            "a search",
            ListUsersRequest {
                search: "u".into(),
                ..request.clone()
            },
        ),
        (
            "another order",
            ListUsersRequest {
                order: vec![order(UserOrderField::Email, SortDirection::Desc)],
                ..request.clone()
            },
        ),
        (
            "another order field",
            ListUsersRequest {
                order: vec![order(UserOrderField::Reference, SortDirection::Asc)],
                ..request.clone()
            },
        ),
        (
            "the default order",
            ListUsersRequest {
                order: vec![],
                ..request.clone()
            },
        ),
    ];
    for (what, variant) in variants {
        let status = list_err(
            &mut app,
            ListUsersRequest {
                page_token: token.clone(),
                ..variant
            },
        )
        .await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(violated_fields(&status), ["page_token"], "{what}");
    }

    // The same request still accepts it.
    let second = list(
        &mut app,
        ListUsersRequest {
            page_token: token,
            ..request
        },
    )
    .await;
    assert_eq!(second.data.len(), 2);
}

#[tokio::test]
async fn list_users_with_a_garbage_page_token_is_invalid_argument() {
    let mut app = spawn_app().await;
    create_many(&mut app, 3).await;
    let real = list(
        &mut app,
        ListUsersRequest {
            limit: Some(1),
            ..Default::default()
        },
    )
    .await
    .next_page_token;

    // A token of the right request whose cursor was tampered with.
    let mut decoded: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&real).expect("token is base64url"))
            .expect("token is JSON");
    let tamper = |k: serde_json::Value| {
        let mut token = decoded.clone();
        token["k"] = k;
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&token).unwrap())
    };
    let tampered = [
        tamper(serde_json::json!([])),
        tamper(serde_json::json!(["x"])),
        tamper(serde_json::json!([
            true,
            "0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e"
        ])),
        tamper(serde_json::json!([0, "not-a-uuid"])),
        tamper(serde_json::json!([
            i64::MAX,
            "0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e"
        ])),
    ];
    decoded["f"] = serde_json::json!("000000000000000000000000");
    let wrong_fingerprint = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&decoded).unwrap());

    // A token of ListTenants is not a token of ListUsers.
    create_tenant(&mut app, "Other", "other").await;
    let tenants_token = app
        .tenants
        .list_tenants(users_service::pb::v1::ListTenantsRequest {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!tenants_token.is_empty());

    let mut garbage = vec![
        tenants_token,
        "garbage".to_owned(),
        "!!!".to_owned(),
        URL_SAFE_NO_PAD.encode(b"not json"),
        URL_SAFE_NO_PAD.encode(b"{\"x\":1}"),
        format!("{real}x"),
        wrong_fingerprint,
    ];
    garbage.extend(tampered);
    for token in garbage {
        let status = list_err(
            &mut app,
            ListUsersRequest {
                limit: Some(1),
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "token {token:?}: {status:?}"
        );
        assert_eq!(violated_fields(&status), ["page_token"], "token {token:?}");
    }
}

#[tokio::test]
async fn list_users_with_an_offset_and_a_page_token_is_invalid_argument() {
    let mut app = spawn_app().await;
    create_many(&mut app, 3).await;
    let first = list(
        &mut app,
        ListUsersRequest {
            limit: Some(1),
            ..Default::default()
        },
    )
    .await;
    let status = list_err(
        &mut app,
        ListUsersRequest {
            limit: Some(1),
            offset: 1,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["offset"]);

    // Offset 0 with a token is simply the next page.
    let next = list(
        &mut app,
        ListUsersRequest {
            limit: Some(1),
            offset: 0,
            page_token: first.next_page_token,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(next.data.len(), 1);
}

/// A page by token of one tenant in creation order starts at the tenant and
/// the cursor together (`tenant_id <= t AND (tenant_id, created_at) >= (t,
/// c)`, without `tenant_id = t`): with users of tenants on both sides of it
/// created in between, ties in creation time within and across tenants, and
/// the tenant named by the filter, by a tenant-bound key, or by both.
#[tokio::test]
async fn a_tenants_pages_by_token_in_creation_order_hold_exactly_its_users() {
    let mut app = spawn_app().await;
    let mut tenants = vec![app.default_tenant().await];
    for name in ["second", "third"] {
        tenants.push(create_tenant(&mut app, name, name).await.id);
    }
    let mut created: Vec<User> = Vec::new();
    for round in 0..4 {
        for (i, tenant) in tenants.iter().enumerate() {
            for copy in 0..2 {
                created.push(
                    create(
                        &mut app,
                        User {
                            tenant_id: tenant.clone(),
                            ..user(&format!("r{round}-{i}-{copy}"), "")
                        },
                    )
                    .await,
                );
            }
        }
        // Every other round shares its creation time with the one before.
        if round % 2 == 1 {
            app.clock.advance(Duration::from_millis(3));
        }
    }
    let admin = app.users.clone();
    for tenant in &tenants {
        let bound: uuid::Uuid = tenant.parse().unwrap();
        let key = app
            .create_key(users_service::auth::Role::Viewer, Some(bound), None)
            .await;
        for direction in [SortDirection::Asc, SortDirection::Desc] {
            let expected = in_order(
                created.iter().filter(|u| &u.tenant_id == tenant),
                UserOrderField::CreatedAt,
                direction,
            );
            let request = ListUsersRequest {
                limit: Some(3),
                order: vec![order(UserOrderField::CreatedAt, direction)],
                ..Default::default()
            };
            let by_filter = ListUsersRequest {
                filter: Some(on("tenant_id", eq(tenant))),
                ..request.clone()
            };
            app.users = admin.clone();
            let pages = walk(&mut app, by_filter.clone()).await;
            assert_eq!(pages.concat(), expected, "{tenant} {direction:?}");
            assert_eq!(pages.len(), 3, "{tenant} {direction:?}");
            app.users = app.users_as(Some(&key));
            let pages = walk(&mut app, request).await;
            assert_eq!(pages.concat(), expected, "{tenant} {direction:?} bound");
            let pages = walk(&mut app, by_filter).await;
            assert_eq!(pages.concat(), expected, "{tenant} {direction:?} both");
            // Bound to one tenant, a filter on another finds nothing.
            let other = tenants.iter().find(|t| *t != tenant).unwrap();
            let page = list(
                &mut app,
                ListUsersRequest {
                    filter: Some(on("tenant_id", eq(other))),
                    limit: Some(3),
                    ..Default::default()
                },
            )
            .await;
            assert!(page.data.is_empty(), "{tenant} {direction:?} {other}");
        }
    }
    app.users = admin;
    assert_eq!(app.user_count().await, created.len() as i64);
}
