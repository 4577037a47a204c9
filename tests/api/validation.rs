//! Every validation rule: accepted, rejected (all violations at once) and normalized.

use tonic::Code;
use users_service::pb::v1::{CreateUserRequest, UpdateUserRequest, User, UserUpdate};

use crate::helpers::{TestApp, error_info, spawn_app, violated_fields};
use crate::users::{create, roq_user};

fn json_struct(value: serde_json::Value) -> prost_types::Struct {
    fn convert(value: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match value {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(convert).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
                fields: o.into_iter().map(|(k, v)| (k, convert(v))).collect(),
            }),
        };
        prost_types::Value { kind: Some(kind) }
    }
    match convert(value) {
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(s)),
        } => s,
        _ => panic!("not an object"),
    }
}

/// `{"k": {"k": ... {"k": 1}}}`, `depth` levels deep.
fn nested(depth: usize) -> serde_json::Value {
    let mut value = serde_json::json!(1);
    for _ in 0..depth {
        value = serde_json::json!({ "k": value });
    }
    value
}

async fn try_create(app: &mut TestApp, user: User) -> Result<User, tonic::Status> {
    app.users
        .create_user(CreateUserRequest {
            user: Some(user),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().user.unwrap())
}

#[tokio::test]
async fn create_user_reports_every_invalid_field_at_once_and_stores_nothing() {
    let mut app = spawn_app().await;
    let status = try_create(
        &mut app,
        User {
            reference: "r".repeat(256),
            email: "not an email".into(),
            phone: Some("5550001234".into()),
            first_name: "Anna\u{0007}".into(),
            last_name: "x".repeat(256),
            locale: "en_US!".into(),
            timezone: Some("Mars/Olympus".into()),
            avatar_url: "ftp://example.com/a.png".into(),
            custom_data: Some(json_struct(nested(9))),
            tenant_id: "not-a-uuid".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        [
            "user.avatar_url",
            "user.custom_data",
            "user.email",
            "user.first_name",
            "user.last_name",
            "user.locale",
            "user.phone",
            "user.reference",
            "user.tenant_id",
            "user.timezone",
        ]
    );
    let (reason, _) = error_info(&status).expect("ErrorInfo");
    assert_eq!(reason, "INVALID_ARGUMENT");
    assert_eq!(app.user_count().await, 0);
}

#[tokio::test]
async fn create_user_without_a_user_is_invalid() {
    let mut app = spawn_app().await;
    let status = app
        .users
        .create_user(CreateUserRequest {
            user: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["user"]);
}

#[tokio::test]
async fn inputs_are_stored_normalized() {
    let mut app = spawn_app().await;
    let created = create(
        &mut app,
        User {
            phone: Some("+1 (555) 000-1234".into()),
            locale: "EN-us".into(),
            timezone: Some("asia/bangkok".into()),
            avatar_url: "HTTPS://Example.COM/a.png".into(),
            ..roq_user()
        },
    )
    .await;
    assert_eq!(created.phone.as_deref(), Some("+15550001234"));
    assert_eq!(created.locale, "en-US");
    assert_eq!(created.timezone.as_deref(), Some("Asia/Bangkok"));
    assert_eq!(created.avatar_url, "https://example.com/a.png");
    let row = app
        .db
        .query_one(
            "SELECT phone, locale, timezone, avatar_url FROM users WHERE id::text = $1",
            &[&created.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "+15550001234");
    assert_eq!(row.get::<_, String>(1), "en-US");
    assert_eq!(row.get::<_, String>(2), "Asia/Bangkok");
    assert_eq!(row.get::<_, String>(3), "https://example.com/a.png");
}

/// One field value and whether the service accepts it.
struct Case {
    field: &'static str,
    user: User,
    accepted: bool,
}

fn cases() -> Vec<Case> {
    let email_of = |len: usize| format!("{}@example.com", "a".repeat(len - "@example.com".len()));
    let url_of = |len: usize| {
        format!(
            "https://example.com/{}",
            "a".repeat(len - "https://example.com/".len())
        )
    };
    let case = |field, user, accepted| Case {
        field,
        user,
        accepted,
    };
    vec![
        case(
            "user.email",
            User {
                email: email_of(254),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.email",
            User {
                email: email_of(255),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.email",
            User {
                email: "a.b+c@sub.example.co".into(),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.email",
            User {
                email: "a@b".into(),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.email",
            User {
                email: "a@@b.com".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.email",
            User {
                email: " a@b.com".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.phone",
            User {
                phone: Some("+15550001234".into()),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.phone",
            User {
                phone: Some(String::new()),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.phone",
            User {
                phone: Some("+1".into()),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.phone",
            User {
                phone: Some("+1555000123456789".into()),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.phone",
            User {
                phone: Some("phone".into()),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.locale",
            User {
                locale: "zh-Hant-TW".into(),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.locale",
            User {
                locale: "en_US".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.locale",
            User {
                locale: "x".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.timezone",
            User {
                timezone: Some("UTC".into()),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.timezone",
            User {
                timezone: Some("Europe/Nowhere".into()),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.avatar_url",
            User {
                avatar_url: url_of(2048),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.avatar_url",
            User {
                avatar_url: url_of(2049),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.avatar_url",
            User {
                avatar_url: "javascript:alert(1)".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.avatar_url",
            User {
                avatar_url: "/relative.png".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.first_name",
            User {
                first_name: "é".repeat(255),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.first_name",
            User {
                first_name: "é".repeat(256),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.last_name",
            User {
                last_name: "W\n".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.reference",
            User {
                reference: "r".repeat(255),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.reference",
            User {
                reference: "r\u{0000}".into(),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.custom_data",
            User {
                custom_data: Some(json_struct(nested(8))),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.custom_data",
            User {
                custom_data: Some(json_struct(nested(9))),
                ..Default::default()
            },
            false,
        ),
        case(
            "user.custom_data",
            User {
                custom_data: Some(json_struct(
                    serde_json::json!({ "k": "x".repeat(16 * 1024 - 8) }),
                )),
                ..Default::default()
            },
            true,
        ),
        case(
            "user.custom_data",
            User {
                custom_data: Some(json_struct(
                    serde_json::json!({ "k": "x".repeat(16 * 1024) }),
                )),
                ..Default::default()
            },
            false,
        ),
    ]
}

#[tokio::test]
async fn each_field_rule_accepts_and_rejects_at_its_boundaries() {
    let mut app = spawn_app().await;
    let mut stored = 0;
    for Case {
        field,
        user,
        accepted,
    } in cases()
    {
        let result = try_create(&mut app, user.clone()).await;
        match (accepted, result) {
            (true, Ok(_)) => stored += 1,
            (false, Err(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{field}: {user:?}");
                assert_eq!(violated_fields(&status), [field], "{user:?}");
            }
            (true, Err(status)) => panic!("{field} rejected {user:?}: {status:?}"),
            (false, Ok(_)) => panic!("{field} accepted {user:?}"),
        }
    }
    assert_eq!(app.user_count().await, stored);
}

#[tokio::test]
async fn update_user_reports_every_invalid_field_and_changes_nothing() {
    let mut app = spawn_app().await;
    let created = create(&mut app, roq_user()).await;
    let status = app
        .users
        .update_user(UpdateUserRequest {
            id: created.id.clone(),
            user: Some(UserUpdate {
                email: Some("nope".into()),
                phone: Some("12".into()),
                locale: Some("??".into()),
                timezone: Some("Nowhere".into()),
                avatar_url: Some("mailto:a@b.c".into()),
                first_name: Some("a\tb".into()),
                custom_data: Some(json_struct(nested(9))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&status),
        [
            "user.avatar_url",
            "user.custom_data",
            "user.email",
            "user.first_name",
            "user.locale",
            "user.phone",
            "user.timezone",
        ]
    );
    let row = app
        .db
        .query_one(
            "SELECT first_name, phone, updated_at = created_at FROM users WHERE id::text = $1",
            &[&created.id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "Anna");
    assert_eq!(row.get::<_, String>(1), "+15550001234");
    assert!(row.get::<_, bool>(2), "updated_at untouched");
}

#[tokio::test]
async fn custom_data_round_trips_as_a_json_object() {
    let mut app = spawn_app().await;
    let data = json_struct(
        serde_json::json!({"plan": "pro", "seats": 3, "tags": ["a", "b"], "nested": {"ok": true, "none": null}}),
    );
    let created = create(
        &mut app,
        User {
            custom_data: Some(data.clone()),
            ..roq_user()
        },
    )
    .await;
    assert_eq!(created.custom_data, Some(data));
    let stored: serde_json::Value = app
        .db
        .query_one(
            "SELECT custom_data FROM users WHERE id::text = $1",
            &[&created.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored["plan"], "pro");
    assert_eq!(stored["seats"].as_f64(), Some(3.0));
    assert_eq!(stored["nested"]["ok"], true);
}
