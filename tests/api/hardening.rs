//! Requests an attacker or a careless client sends: every one is answered
//! quickly, with INVALID_ARGUMENT naming the field, never INTERNAL, and
//! never at the cost of other callers.

use std::time::Duration;

use prost::Message;
use tonic::Code;
use users_service::pb::v1::{
    BatchUpsertUsersRequest, CreateUserRequest, GetUserRequest, JsonFilter, ListUsersRequest,
    SortDirection, StringFilter, User, UserFilter, UserOrder, UserOrderField,
    batch_upsert_users_result::Outcome,
};

use crate::helpers::{TestApp, raw_call, spawn_app, violated_fields};
use crate::users::{create, user};

/// Answers within a deadline far above any honest call, so that a request
/// whose cost runs away fails the test instead of hanging it.
async fn list(app: &TestApp, request: ListUsersRequest) -> Result<Vec<User>, tonic::Status> {
    let mut request = tonic::Request::new(request);
    request.set_timeout(Duration::from_secs(5));
    app.users
        .clone()
        .list_users(request)
        .await
        .map(|response| response.into_inner().data)
}

fn invalid(outcome: Result<Vec<User>, tonic::Status>) -> Vec<String> {
    let status = outcome.expect_err("the request is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    violated_fields(&status)
}

fn every_order_field() -> Vec<UserOrderField> {
    use UserOrderField as F;
    vec![
        F::CreatedAt,
        F::UpdatedAt,
        F::Email,
        F::FirstName,
        F::LastName,
        F::Locale,
        F::Phone,
        F::Timezone,
        F::Reference,
        F::Active,
    ]
}

fn terms(fields: &[UserOrderField]) -> Vec<UserOrder> {
    fields
        .iter()
        .enumerate()
        .map(|(i, field)| UserOrder {
            field: *field as i32,
            direction: if i % 2 == 0 {
                SortDirection::Asc
            } else {
                SortDirection::Desc
            } as i32,
        })
        .collect()
}

#[tokio::test]
async fn ordering_by_every_field_pages_through_and_more_terms_are_refused() {
    let mut app = spawn_app().await;
    for i in 0..5 {
        create(
            &mut app,
            user(&format!("r{i}"), &format!("u{i}@example.com")),
        )
        .await;
    }

    // One term per field, and pages by token through all of them.
    let order = terms(&every_order_field());
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let mut request = tonic::Request::new(ListUsersRequest {
            order: order.clone(),
            limit: Some(2),
            page_token: token.clone(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(5));
        let page = app.users.list_users(request).await.unwrap().into_inner();
        seen.extend(page.data.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);

    // A field twice.
    let mut twice = every_order_field()[..3].to_vec();
    twice.push(UserOrderField::Email);
    let fields = invalid(
        list(
            &app,
            ListUsersRequest {
                order: terms(&twice),
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(fields, ["order[3].field"]);

    // More terms than fields, up to the 10,000 terms (40 KB) that once hung
    // the server: refused at once, as one violation.
    for n in [11, 30, 10_000] {
        let many: Vec<UserOrder> = (0..n)
            .map(|i| UserOrder {
                field: every_order_field()[i % 10] as i32,
                direction: SortDirection::Desc as i32,
            })
            .collect();
        let fields = invalid(
            list(
                &app,
                ListUsersRequest {
                    order: many,
                    ..Default::default()
                },
            )
            .await,
        );
        assert_eq!(fields, ["order"], "{n} terms");
    }
}

#[tokio::test]
async fn search_and_filter_values_are_bounded() {
    let mut app = spawn_app().await;
    create(&mut app, user("r1", "anna@example.com")).await;

    // At the limits: answered.
    let at_limit = ListUsersRequest {
        search: "a".repeat(100),
        filter: Some(UserFilter {
            first_name: Some(StringFilter {
                equal_to: Some("é".repeat(255)),
                value_in: (0..100).map(|i| format!("v{i}")).collect(),
                i_like: Some(format!("%{}%", "a".repeat(98))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(list(&app, at_limit).await.unwrap().len(), 0);

    let over = ListUsersRequest {
        search: "a".repeat(101),
        filter: Some(UserFilter {
            first_name: Some(StringFilter {
                equal_to: Some("é".repeat(256)),
                value_in: (0..101).map(|i| format!("v{i}")).collect(),
                i_like: Some("a".repeat(101)),
                ..Default::default()
            }),
            id: Some(StringFilter {
                value_not_in: vec!["not a uuid".into(); 101],
                ..Default::default()
            }),
            ..Default::default()
        }),
        offset: 100_001,
        ..Default::default()
    };
    assert_eq!(
        invalid(list(&app, over).await),
        [
            "filter.first_name.equal_to",
            "filter.first_name.i_like",
            "filter.first_name.value_in",
            "filter.id.value_not_in",
            "offset",
            "search",
        ]
    );
}

#[tokio::test]
async fn huge_searches_from_one_caller_do_not_starve_another() {
    let mut app = spawn_app().await;
    let anna = create(&mut app, user("r1", "anna@example.com")).await;
    let searches = (0..8).map(|_| {
        list(
            &app,
            ListUsersRequest {
                search: "x".repeat(100_000),
                ..Default::default()
            },
        )
    });
    let mut users = app.users.clone();
    let gets = async {
        for _ in 0..20 {
            let mut request = tonic::Request::new(GetUserRequest {
                id: anna.id.clone(),
                ..Default::default()
            });
            request.set_timeout(Duration::from_secs(2));
            users.get_user(request).await.expect("GetUser is served");
        }
    };
    let (outcomes, ()) = tokio::join!(futures::future::join_all(searches), gets);
    for outcome in outcomes {
        assert_eq!(invalid(outcome), ["search"]);
    }
}

#[tokio::test]
async fn nul_characters_and_broken_patterns_are_invalid_arguments_not_internal_errors() {
    let mut app = spawn_app().await;
    create(&mut app, user("r1", "anna@example.com")).await;
    let filter = |text: StringFilter| ListUsersRequest {
        filter: Some(UserFilter {
            last_name: Some(text),
            ..Default::default()
        }),
        ..Default::default()
    };
    let cases = [
        (
            filter(StringFilter {
                equal_to: Some("a\0b".into()),
                ..Default::default()
            }),
            "filter.last_name.equal_to",
        ),
        (
            filter(StringFilter {
                value_in: vec!["ok".into(), "\0".into()],
                ..Default::default()
            }),
            "filter.last_name.value_in[1]",
        ),
        (
            filter(StringFilter {
                like: Some("abc\\".into()),
                ..Default::default()
            }),
            "filter.last_name.like",
        ),
        (
            filter(StringFilter {
                i_like: Some("a\0%".into()),
                ..Default::default()
            }),
            "filter.last_name.i_like",
        ),
        (
            ListUsersRequest {
                search: "an\0na".into(),
                ..Default::default()
            },
            "search",
        ),
        (
            ListUsersRequest {
                filter: Some(UserFilter {
                    custom_data: Some(JsonFilter {
                        contains: Some(prost_types::Struct {
                            fields: [(
                                "k".to_owned(),
                                prost_types::Value {
                                    kind: Some(prost_types::value::Kind::StringValue("\0".into())),
                                },
                            )]
                            .into(),
                        }),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "filter.custom_data.contains",
        ),
    ];
    for (request, field) in cases {
        assert_eq!(invalid(list(&app, request).await), [field]);
    }

    // An escaped backslash at the end is a fine pattern.
    let escaped = filter(StringFilter {
        like: Some("abc\\\\".into()),
        ..Default::default()
    });
    assert!(list(&app, escaped).await.unwrap().is_empty());

    // A forged page token whose cursor holds a NUL.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let genuine = {
        create(&mut app, user("r2", "bob@example.com")).await;
        app.users
            .list_users(ListUsersRequest {
                limit: Some(1),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .next_page_token
    };
    let mut token: serde_json::Value =
        serde_json::from_slice(&engine.decode(&genuine).unwrap()).unwrap();
    token["k"][1] = serde_json::Value::String("0190c8f2-5b7e-7c1a-9d3e-\0f4a6b8c0d1e".into());
    let forged = engine.encode(serde_json::to_vec(&token).unwrap());
    assert_eq!(
        invalid(
            list(
                &app,
                ListUsersRequest {
                    limit: Some(1),
                    page_token: forged,
                    ..Default::default()
                }
            )
            .await
        ),
        ["page_token"]
    );
    assert_eq!(
        invalid(
            list(
                &app,
                ListUsersRequest {
                    page_token: "x".repeat(9000),
                    ..Default::default()
                }
            )
            .await
        ),
        ["page_token"]
    );
}

/// `{"k": {"k": ... {"k": "leaf"}}}`, `levels` objects deep.
fn nested(levels: usize) -> prost_types::Struct {
    use prost_types::{Struct, Value, value::Kind};
    let leaf = Value {
        kind: Some(Kind::StringValue("leaf".into())),
    };
    let mut data = Struct {
        fields: [("k".to_owned(), leaf)].into(),
    };
    for _ in 1..levels {
        data = Struct {
            fields: [(
                "k".to_owned(),
                Value {
                    kind: Some(Kind::StructValue(data)),
                },
            )]
            .into(),
        };
    }
    data
}

#[tokio::test]
async fn messages_that_do_not_decode_are_invalid_arguments_with_their_field() {
    let app = spawn_app().await;
    let path = "/users.v1.UsersService/CreateUser";

    // Nested past prost's recursion limit.
    let deep = CreateUserRequest {
        user: Some(User {
            reference: "deep".into(),
            custom_data: Some(nested(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = raw_call(
        &app.channel,
        Some(&app.admin_token),
        path,
        deep.encode_to_vec(),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields = violated_fields(&status);
    assert!(fields[0].starts_with("user.custom_data"), "{fields:?}");

    // A string that is not UTF-8.
    let mut bytes = CreateUserRequest {
        user: Some(User {
            first_name: "Zoë".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let at = bytes.windows(2).position(|w| w == "ë".as_bytes()).unwrap();
    bytes[at + 1] = 0x28;
    let status = raw_call(&app.channel, Some(&app.admin_token), path, bytes)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(violated_fields(&status), ["user.first_name"]);

    // Garbage.
    let status = raw_call(&app.channel, Some(&app.admin_token), path, vec![0xff; 7])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(app.user_count().await, 0);
}

#[tokio::test]
async fn every_kind_of_bad_batch_item_is_refused_alone_and_the_valid_ones_are_stored() {
    let mut app = spawn_app().await;
    let with_data = |reference: &str, data: prost_types::Struct| User {
        reference: reference.into(),
        custom_data: Some(data),
        ..Default::default()
    };
    let nul_data = prost_types::Struct {
        fields: [(
            "note".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("a\0b".into())),
            },
        )]
        .into(),
    };
    let users = vec![
        user("ok-1", "one@example.com"),
        with_data("nul-data", nul_data),
        with_data("too-deep", nested(9)),
        User {
            reference: "bidi".into(),
            first_name: "Ada\u{202E}ecalevoL".into(),
            ..Default::default()
        },
        User {
            reference: "nul\0ref".into(),
            ..Default::default()
        },
        user("ok-2", "two@example.com"),
    ];
    let results = app
        .users
        .batch_upsert_users(BatchUpsertUsersRequest {
            users,
            ..Default::default()
        })
        .await
        .expect("the batch is answered")
        .into_inner()
        .results;
    let outcomes: Vec<Result<String, (i32, Vec<String>)>> = results
        .into_iter()
        .map(|result| match result.outcome.unwrap() {
            Outcome::User(user) => Ok(user.reference),
            Outcome::Error(status) => {
                let status: tonic::Status = tonic::Status::with_details(
                    Code::from(status.code),
                    status.message.clone(),
                    status.encode_to_vec().into(),
                );
                Err((status.code() as i32, violated_fields(&status)))
            }
        })
        .collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(
        outcomes,
        [
            Ok("ok-1".to_owned()),
            Err((invalid, vec!["user.custom_data".to_owned()])),
            Err((invalid, vec!["user.custom_data".to_owned()])),
            Err((invalid, vec!["user.first_name".to_owned()])),
            Err((invalid, vec!["user.reference".to_owned()])),
            Ok("ok-2".to_owned()),
        ]
    );
    let stored: Vec<String> = app
        .db
        .query("SELECT reference FROM users ORDER BY reference", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(stored, ["ok-1", "ok-2"]);
}

#[tokio::test]
async fn names_with_invisible_or_direction_changing_characters_are_refused() {
    let mut app = spawn_app().await;
    for (name, bad) in [
        ("Ada\u{202E}ecalevoL", true),
        ("Ada\u{200B}", true),
        ("\u{FEFF}Ada", true),
        ("Ada\u{2028}Lovelace", true),
        ("Ada\u{2067}x\u{2069}", true),
        ("\u{0645}\u{06CC}\u{200C}\u{062F}", false),
    ] {
        let outcome = app
            .users
            .create_user(CreateUserRequest {
                user: Some(User {
                    first_name: name.into(),
                    reference: name.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        match (outcome, bad) {
            (Err(status), true) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{name:?}");
                assert_eq!(
                    violated_fields(&status),
                    ["user.first_name", "user.reference"]
                );
            }
            (Ok(created), false) => {
                assert_eq!(created.into_inner().user.unwrap().first_name, name)
            }
            (outcome, _) => panic!("{name:?}: {outcome:?}"),
        }
    }
}

#[tokio::test]
async fn a_request_of_megabytes_is_answered_not_reset() {
    let app = spawn_app().await;
    for size in [300_000, 1_000_000, 3_000_000] {
        let outcome = list(
            &app,
            ListUsersRequest {
                search: "x".repeat(size),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(invalid(outcome), ["search"], "{size} bytes");
    }
}

#[tokio::test]
async fn a_big_request_without_credentials_is_answered_unauthenticated() {
    let app = spawn_app().await;
    for size in [300_000, 1_000_000, 3_000_000] {
        let status = app
            .users_as(None)
            .list_users(ListUsersRequest {
                search: "x".repeat(size),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{size}: {status:?}");
    }
}
